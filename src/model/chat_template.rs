//! The model's own chat template (`tokenizer.chat_template`, a Hugging Face Jinja template),
//! rendered with minijinja the way transformers renders it.
//!
//! transformers renders with `trim_blocks` and `lstrip_blocks` on and gives templates
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and `raise_exception`; templates
//! also call Python string methods (`.strip()`, `.startswith()`), which minijinja-contrib's
//! pycompat callback provides. The same setup is reproduced here so prompts equal llama.cpp's and
//! transformers' renderings.

use candle_core::quantized::gguf_file::{Content, Value};
use minijinja::{context, Environment, ErrorKind};

use super::tokenizer::GgufTokenizer;
use super::ModelError;
use crate::types::ChatMessage;

const KEY: &str = "tokenizer.chat_template";
const NAME: &str = "chat_template";

/// A compiled chat template with the model's special tokens bound.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The template of a GGUF file, `None` when it has none (base models such as Gemma 3 270M).
    /// A template that does not parse is a [`ModelError::Template`] with minijinja's message.
    pub fn from_gguf(
        content: &Content,
        tokenizer: &GgufTokenizer,
    ) -> Result<Option<Self>, ModelError> {
        let source = match content.metadata.get(KEY) {
            None => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                return Err(ModelError::BadMetadata {
                    key: KEY.to_string(),
                    reason: format!("expected a string, found {:?}", v.value_type()),
                })
            }
        };
        let token = |id: Option<u32>| {
            id.and_then(|id| tokenizer.id_to_token(id))
                .unwrap_or_default()
        };
        Self::new(
            source,
            token(tokenizer.bos_id()),
            token(Some(tokenizer.eos_id())),
        )
        .map(Some)
    }

    /// Compiles `source` with the given BOS/EOS token strings.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(NAME, source)
            .map_err(|e| ModelError::Template(describe(&e)))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends with the opening of the
    /// assistant's turn. Errors (including a template's own `raise_exception`, e.g. for roles it
    /// does not allow) are [`ModelError::Template`].
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| ModelError::Template(describe(&e)))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| ModelError::Template(describe(&e)))
    }
}

/// The prompt for a model without a chat template: each message's content, in order, joined by a
/// blank line (`"\n\n"`), roles omitted, nothing appended. A base model then simply continues the
/// text; any turn markup would be invented and might mislead it.
pub fn render_without_template(messages: &[ChatMessage]) -> String {
    messages
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// HF templates call `raise_exception("...")` to refuse input; it becomes a render error.
fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// minijinja's message with its cause chain, on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(source.into(), "<s>".into(), "</s>".into()).unwrap()
    }

    #[test]
    fn binds_tokens_and_generation_prompt() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
        );
        let m = [msg("user", "hi")];
        assert_eq!(t.render(&m, true).unwrap(), "<s>[user]hi</s>[assistant]");
        assert_eq!(t.render(&m, false).unwrap(), "<s>[user]hi</s>");
    }

    #[test]
    fn python_string_methods_and_trimmed_blocks() {
        let t = template(
            "{% for m in messages %}\n  {% if m.content.startswith('x') %}{{ m.content.strip().upper() }}{% endif %}\n{% endfor %}",
        );
        assert_eq!(t.render(&[msg("user", "  x y  ")], false).unwrap(), "");
        assert_eq!(t.render(&[msg("user", "xy  ")], false).unwrap(), "XY");
    }

    #[test]
    fn raise_exception_is_a_template_error_with_its_message() {
        let t = template(
            "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok",
        );
        assert_eq!(t.render(&[msg("user", "a")], true).unwrap(), "ok");
        match t.render(&[msg("assistant", "a")], true) {
            Err(ModelError::Template(m)) => {
                assert!(m.contains("Conversation must start with user"), "{m}")
            }
            other => panic!("expected a template error, got {other:?}"),
        }
    }

    #[test]
    fn syntax_errors_are_template_errors() {
        assert!(matches!(
            ChatTemplate::new("{% for %}".into(), String::new(), String::new()),
            Err(ModelError::Template(_))
        ));
    }

    #[test]
    fn no_template_joins_contents_with_blank_lines() {
        let m = [msg("system", "Be brief."), msg("user", "Hi")];
        assert_eq!(render_without_template(&m), "Be brief.\n\nHi");
        assert_eq!(render_without_template(&[]), "");
    }
}
