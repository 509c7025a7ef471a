//! A model ready to serve: weights, tokenizer, chat template and identity, loaded from one GGUF.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use sha2::{Digest, Sha256};

use super::chat_template::{render_without_template, ChatTemplate};
use super::gguf::GgufFile;
use super::hparams::HParams;
use super::kv_cache::KvDtype;
use super::quantize::Quant;
use super::tokenizer::GgufTokenizer;
use super::transformer::Transformer;
use super::ModelError;
use crate::types::{ChatMessage, PromptInput, TemplateKwargs, Tools};

/// Everything needed to run one model; shared by `Arc` between its instances.
pub struct LoadedModel {
    /// Id requests use.
    pub id: String,
    /// Hex sha256 of the GGUF file (identity for caches).
    pub file_digest: String,
    /// Format the weights run in.
    pub quant: Quant,
    /// Weights and forward pass.
    pub transformer: Arc<Transformer>,
    /// Tokenizer built from the file's metadata.
    pub tokenizer: Arc<GgufTokenizer>,
    /// The file's chat template, if it has one.
    pub template: Option<ChatTemplate>,
    /// Hex sha256 of the chat template source, `none` without one (identity for caches).
    pub template_digest: String,
    /// How long loading took.
    pub load_time: Duration,
}

impl LoadedModel {
    /// Sets the element type of the KV caches its sequences get (before it is shared).
    ///
    /// # Panics
    /// When the weights are already shared with another owner (a caller bug).
    pub fn with_kv_dtype(mut self, dtype: KvDtype) -> Self {
        Arc::get_mut(&mut self.transformer)
            .expect("KV type set on a freshly loaded model")
            .set_kv_dtype(dtype);
        self
    }

    /// Sets the context a sequence may reach (before it is shared): with su/longrope factors
    /// (Phi-3 128k) a context up to the original one takes the short factors, a longer one the
    /// long factors, as llama.cpp started with that context does. Loading assumes the native one.
    ///
    /// # Panics
    /// When the weights are already shared with another owner (a caller bug).
    pub fn with_context_length(mut self, n_ctx: usize) -> Self {
        Arc::get_mut(&mut self.transformer)
            .expect("context set on a freshly loaded model")
            .set_context_length(n_ctx);
        self
    }

    /// Load `path` as model `id`, converting matrices to `quant`.
    pub fn load(id: &str, path: &Path, quant: Quant, device: &Device) -> Result<Self, ModelError> {
        let started = Instant::now();
        let file = GgufFile::open(path)?;
        let hp = HParams::from_meta(file.meta())?;
        let (weights, (tokenizer, digest)) = rayon::join(
            || Transformer::load(&file, &hp, quant, device),
            || {
                let digest = hex::encode(Sha256::digest(file.bytes()));
                (GgufTokenizer::from_gguf(file.content()), digest)
            },
        );
        let tokenizer = tokenizer?;
        let template = ChatTemplate::from_gguf(file.content(), &tokenizer)?;
        let template_digest = match file.meta().opt_str("tokenizer.chat_template")? {
            Some(source) => hex::encode(Sha256::digest(source.as_bytes())),
            None => "none".to_string(),
        };
        Ok(Self {
            id: id.to_string(),
            file_digest: digest,
            quant,
            transformer: Arc::new(weights?),
            tokenizer: Arc::new(tokenizer),
            template,
            template_digest,
            load_time: started.elapsed(),
        })
    }

    /// Hyper-parameters of the weights.
    pub fn hparams(&self) -> &HParams {
        self.transformer.hparams()
    }

    /// Render the prompt as the model expects it and tokenize it. Raw text gets BOS per the file's
    /// `add_bos`; a chat template writes BOS itself when the model wants it, so none is added.
    ///
    /// Message contents are user text: a control token spelled in one (`<|im_end|>`) is tokenized
    /// as plain text, so only the template's own markup is special. A raw prompt is the caller's
    /// whole prompt, markup included, so control tokens written in it are parsed (as llama.cpp's
    /// server does).
    pub fn prompt_tokens(&self, input: &PromptInput) -> Result<Vec<u32>, ModelError> {
        self.prompt_tokens_with(input, &TemplateKwargs::new())
    }

    /// As [`LoadedModel::prompt_tokens`], with chat-template options (`enable_thinking`) set
    /// for the template. Options where no template is applied (a raw prompt, a model without
    /// a template) or that the template does not read are a [`ModelError::Template`], never
    /// ignored.
    pub fn prompt_tokens_with(
        &self,
        input: &PromptInput,
        kwargs: &TemplateKwargs,
    ) -> Result<Vec<u32>, ModelError> {
        self.prompt_tokens_for(input, kwargs, None)
    }

    /// As [`LoadedModel::prompt_tokens_with`], with the tools the model may call: given to a
    /// template that reads `tools` (plus the format line in the system turn), else described in
    /// the system turn by [`crate::tools::polyfill`], which also writes earlier calls and tool
    /// results as text (also without `tools`, for the turn after a call).
    pub fn prompt_tokens_for(
        &self,
        input: &PromptInput,
        kwargs: &TemplateKwargs,
        tools: Option<&Tools>,
    ) -> Result<Vec<u32>, ModelError> {
        if tools.is_some() && matches!(input, PromptInput::Text(_)) {
            return Err(ModelError::Template(
                "tools need a chat (`messages`)".into(),
            ));
        }
        if !kwargs.is_empty() && (matches!(input, PromptInput::Text(_)) || self.template.is_none())
        {
            return Err(ModelError::Template(
                "chat template options need a chat (`messages`) and a model with a chat template"
                    .into(),
            ));
        }
        match (input, &self.template) {
            (PromptInput::Text(text), _) => self.tokenizer.encode(text, true),
            (PromptInput::Chat(messages), Some(t)) => {
                let has_tool_parts = |ms: &[ChatMessage]| {
                    ms.iter()
                        .any(|m| !m.tool_calls.is_empty() || m.tool_call_id.is_some())
                };
                let (messages, tool_list) = if t.reads_tools() {
                    match tools {
                        Some(tools) => (
                            Cow::Owned(crate::tools::add_system(
                                messages,
                                crate::tools::instruction(tools),
                            )),
                            tools.tools.as_slice(),
                        ),
                        None => (Cow::Borrowed(messages), &[][..]),
                    }
                } else if tools.is_some() || has_tool_parts(messages) {
                    (Cow::Owned(crate::tools::polyfill(messages, tools)), &[][..])
                } else {
                    (Cow::Borrowed(messages), &[][..])
                };
                let rendered =
                    t.render_guarded_tools(&messages, true, kwargs, tool_list, |content| {
                        self.tokenizer.find_control_tokens(content)
                    })?;
                self.tokenizer
                    .encode_marked(&rendered.text, &rendered.user, false)
            }
            (PromptInput::Chat(messages), None) => {
                let messages = crate::tools::polyfill(messages, tools);
                self.tokenizer
                    .encode_plain(&render_without_template(&messages), true)
            }
        }
    }

    /// The chat rendered to text (template, or the documented plain fallback).
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, ModelError> {
        match &self.template {
            Some(t) => t.render(messages, true),
            None => Ok(render_without_template(messages)),
        }
    }
}
