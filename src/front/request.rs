//! What a front hands to [`Front::begin`](super::Front::begin): the caller's request as the wire
//! gave it, unchecked ([`RawRequest`]), and what the transport knows about the call ([`CallMeta`]).

use std::time::Instant;

use crate::types::{CachePolicy, ChatMessage, OutputConstraint, TemplateKwargs, Tool};

use super::error::FrontError;

/// A generation request in neither front's wire format and not yet checked: absent fields are
/// `None` (zero is a value), ranges are checked by [`validate`](super::validate::validate).
#[derive(Debug, Clone, PartialEq)]
pub struct RawRequest {
    /// Model id asked for.
    pub model: String,
    /// Raw prompt; exactly one of `prompt` and `messages` must be given.
    pub prompt: Option<String>,
    /// Chat turns; empty when absent.
    pub messages: Vec<ChatMessage>,
    /// New tokens asked for.
    pub max_tokens: Option<u32>,
    /// Softmax temperature.
    pub temperature: Option<f32>,
    /// Nucleus mass.
    pub top_p: Option<f32>,
    /// Top-k filter.
    pub top_k: Option<u32>,
    /// Min-p filter.
    pub min_p: Option<f32>,
    /// Repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// RNG seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Cache policy; `Err` holds the value given when the wire's value names no policy, so
    /// validation refuses it like any other out-of-range field.
    pub cache_policy: Result<CachePolicy, String>,
    /// Session key given in the body (gRPC `session_id`); `None` when empty.
    pub session_id: Option<String>,
    /// OpenAI `user`: logged, and the session key when no other is given.
    pub user: Option<String>,
    /// The grammar the output must follow (OpenAI `response_format`, gRPC `constraint`).
    pub constraint: Option<OutputConstraint>,
    /// Per-token log-probabilities asked for (OpenAI chat `logprobs`, gRPC `logprobs`).
    pub logprobs: Option<bool>,
    /// Alternatives per token (OpenAI chat and gRPC `top_logprobs`, legacy completions'
    /// `logprobs: N`); needs `logprobs`.
    pub top_logprobs: Option<u32>,
    /// The wire's name of `top_logprobs`, named by its errors (`logprobs` on
    /// `/v1/completions`, where the count is the field itself).
    pub top_logprobs_field: &'static str,
    /// Chat-template options (`chat_template_kwargs` on both fronts), scalar values already
    /// read from the wire; keys unchecked.
    pub chat_template_kwargs: TemplateKwargs,
    /// Functions the model may call (OpenAI and gRPC `tools`), names and schemas unchecked.
    pub tools: Vec<Tool>,
    /// `tool_choice`; `None` when absent (`auto` with tools).
    pub tool_choice: Option<WireToolChoice>,
}

/// `tool_choice` as the wire gave it; which names exist is `validate`'s to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireToolChoice {
    /// No tool is shown to the model nor called: a plain answer.
    None,
    /// Text or one call, as the model decides.
    Auto,
    /// One call of any tool.
    Required,
    /// One call of this function.
    Function(String),
    /// A value that names no choice (gRPC's free-form string), refused by validation naming
    /// `tool_choice`.
    Invalid(String),
}

impl RawRequest {
    /// Whether the answer is in the tool format ([`crate::tools`]): tools given and
    /// `tool_choice` not `none`. Fronts read the output as calls then.
    pub fn uses_tools(&self) -> bool {
        !self.tools.is_empty() && self.tool_choice != Some(WireToolChoice::None)
    }
}

impl Default for RawRequest {
    fn default() -> Self {
        Self {
            model: String::new(),
            prompt: None,
            messages: Vec::new(),
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            min_p: None,
            repetition_penalty: None,
            seed: None,
            stop: Vec::new(),
            cache_policy: Ok(CachePolicy::Default),
            session_id: None,
            user: None,
            constraint: None,
            logprobs: None,
            top_logprobs: None,
            top_logprobs_field: "top_logprobs",
            chat_template_kwargs: TemplateKwargs::new(),
            tools: Vec::new(),
            tool_choice: None,
        }
    }
}

/// What the transport knows about one call, beside its body.
#[derive(Debug, Clone)]
pub struct CallMeta {
    /// The method, a metric label (`Generate`, `chat.completions`, ...).
    pub method: &'static str,
    /// When the call arrived; latency and the deadline count from here.
    pub arrival: Instant,
    /// The caller's id; `None` gets a fresh one.
    pub request_id: Option<String>,
    /// The caller's tenant header (`x-qnode-tenant`), unchecked: bytes that are not UTF-8 are
    /// replaced (and then refused, like any non-ASCII value). It scopes the answer cache.
    pub tenant: Option<String>,
    /// The tenant the caller's API key is bound to: the call gets it, and a `tenant` header
    /// naming another is refused.
    pub key_tenant: Option<String>,
    /// The session header (`x-session-id`), unchecked like `tenant`.
    pub session: Option<String>,
    /// When the caller stops waiting. A malformed deadline header is an `Err`, refused after
    /// admission and counted like any invalid argument.
    pub deadline: Result<Option<Instant>, FrontError>,
}

impl CallMeta {
    /// A call of `method` arriving now, with no id, tenant or deadline yet.
    pub fn new(method: &'static str) -> Self {
        Self {
            method,
            arrival: Instant::now(),
            request_id: None,
            tenant: None,
            key_tenant: None,
            session: None,
            deadline: Ok(None),
        }
    }
}

/// A header's (or metadata key's) values as one unchecked string for [`CallMeta`]: repeated
/// values joined by `", "` (as HTTP combines them; the space then fails validation, so a
/// repeated key is refused, never half-read), bytes that are not UTF-8 replaced (and then
/// refused as non-ASCII). `None` when absent or empty.
pub fn header_text<'a>(values: impl Iterator<Item = &'a [u8]>) -> Option<String> {
    let parts: Vec<String> = values
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let text = parts.join(", ");
    (!text.is_empty()).then_some(text)
}
