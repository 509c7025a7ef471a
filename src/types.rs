//! The crate's vocabulary: what a request, its events and its outcome are, shared by every layer.
//!
//! A leaf: this module imports nothing of the crate, so every other module may use it without an
//! arrow running back up. Fronts build a [`GenerationRequest`] from wire input after checking it
//! (the engine never sees raw wire types); events come back as [`GenerationEvent`]s; every domain
//! error reports an [`ErrorKind`], which each front maps to its own status once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One chat turn, as the model's chat template expects it (serialized as Hugging Face templates
/// read it: `tool_calls` and `tool_call_id` only when set).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text of the turn (may be empty for an assistant turn that only calls tools).
    pub content: String,
    /// An assistant turn's calls of tools, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` turn: the id of the call whose result `content` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A plain text turn.
    pub fn text(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }
}

/// One call of a tool, made by the model (a response) or earlier in the conversation (an
/// assistant turn of the request).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCall {
    /// The call's id (`call_...`), which the `tool` turn answering it names.
    pub id: String,
    /// The function called: one of the request's tools.
    pub name: String,
    /// Its arguments: a JSON object, as JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// Templates get a call the way transformers passes it: `{"id", "type": "function", "function":
/// {"name", "arguments"}}` with `arguments` as a JSON object (text that is not JSON stays text).
impl serde::Serialize for ToolCall {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let arguments = serde_json::from_str::<serde_json::Value>(&self.arguments)
            .unwrap_or_else(|_| serde_json::Value::String(self.arguments.clone()));
        serde_json::json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": arguments},
        })
        .serialize(s)
    }
}

/// Reads the shape [`ToolCall`] serializes to (`arguments` as an object or as JSON text).
impl<'de> serde::Deserialize<'de> for ToolCall {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        struct Function {
            name: String,
            #[serde(default)]
            arguments: serde_json::Value,
        }
        #[derive(serde::Deserialize)]
        struct Wire {
            #[serde(default)]
            id: String,
            function: Function,
        }
        let w = Wire::deserialize(d)?;
        let arguments = match w.function.arguments {
            serde_json::Value::String(s) => s,
            serde_json::Value::Null => "{}".to_owned(),
            other => other.to_string(),
        };
        Ok(Self {
            id: w.id,
            name: w.function.name,
            arguments,
        })
    }
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    /// Its name: 1 to 64 of `a-z A-Z 0-9 _ -`, unique in the request.
    pub name: String,
    /// What it does, for the model.
    pub description: Option<String>,
    /// The JSON Schema of its arguments (an object schema), as JSON text.
    pub parameters: String,
}

/// Templates get a tool in OpenAI's shape: `{"type": "function", "function": {"name",
/// "description", "parameters"}}`, `parameters` as a JSON object.
impl serde::Serialize for Tool {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let parameters = serde_json::from_str::<serde_json::Value>(&self.parameters)
            .unwrap_or_else(|_| serde_json::json!({"type": "object"}));
        let mut function = serde_json::Map::new();
        function.insert("name".into(), self.name.clone().into());
        if let Some(d) = &self.description {
            function.insert("description".into(), d.clone().into());
        }
        function.insert("parameters".into(), parameters);
        serde_json::json!({"type": "function", "function": function}).serialize(s)
    }
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Answer with text or call one tool, as the model decides.
    Auto,
    /// Call one of the tools.
    Required,
    /// Call this tool.
    Function(String),
}

/// The tools of a request the model may (or must) call. A request whose `tool_choice` is `none`
/// has none: its tools are neither shown to the model nor callable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// The functions, at least one.
    pub tools: Vec<Tool>,
    /// Whether one must be called.
    pub choice: ToolChoice,
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Raw text, tokenized as is (BOS added when the model says so), no template.
    Text(String),
    /// Chat turns rendered with the model's own chat template, generation prompt added.
    Chat(Vec<ChatMessage>),
}

/// One value of a chat-template option (`chat_template_kwargs`), as the template sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum TemplateValue {
    /// `true` / `false` (Qwen3's `enable_thinking`).
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A number with a fraction.
    Float(f64),
    /// Text.
    Str(String),
}

/// Chat-template options by name: template variables set beside the renderer's own (`messages`,
/// `add_generation_prompt`, ...), e.g. Qwen3's `enable_thinking`. Sorted, so equal options hash
/// alike in the cache key.
pub type TemplateKwargs = BTreeMap<String, TemplateValue>;

/// Variables the chat-template renderer sets itself (and `tools` / `documents`, which have
/// fields of their own the node does not serve): never a template option.
pub const RESERVED_TEMPLATE_VARIABLES: &[&str] = &[
    "messages",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "raise_exception",
    "tools",
    "documents",
];

/// Sampling settings. `temperature == 0` means greedy; `top_k == 0`, `top_p == 1`, `min_p == 0`
/// and `repetition_penalty == 1` switch those filters off.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature, `0` for greedy.
    pub temperature: f32,
    /// Nucleus sampling mass in `(0, 1]`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; `0` keeps all.
    pub top_k: u32,
    /// Drop tokens whose probability is below `min_p` × the top token's.
    pub min_p: f32,
    /// CTRL-style penalty on tokens already in the prompt or output; `1` is off.
    pub repetition_penalty: f32,
    /// Seed for the request's own RNG: same seed + same input → same output.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// True when the output depends only on the input (greedy, or seeded).
    pub fn is_deterministic(&self) -> bool {
        self.temperature == 0.0 || self.seed.is_some()
    }
}

/// A checked request, ready for the engine.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Caller's id for logs and tracing (generated when the caller gave none).
    pub request_id: String,
    /// Model id as listed by `ListModels`.
    pub model: String,
    /// Prompt text or chat turns.
    pub input: PromptInput,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Maximum number of new tokens, at least 1.
    pub max_tokens: u32,
    /// Stop strings; the output ends before the first match (matched across token boundaries).
    pub stop: Vec<String>,
    /// When the caller stops waiting; queue time counts against it.
    pub deadline: Option<Instant>,
    /// How the answer cache may serve and store this request.
    pub cache_policy: CachePolicy,
    /// Who asks. Part of the cache key, so one tenant never sees an answer cached for another.
    pub tenant: Option<String>,
    /// The conversation this call continues (`session_id` / `x-session-id` / OpenAI `user`):
    /// the pool prefers the instance that served its last turn, which holds its KV. Not part
    /// of the cache key (it does not change the output).
    pub session: Option<String>,
    /// A grammar the output must follow (constrained decoding); `None` for free text. Part of
    /// the cache key.
    pub constraint: Option<OutputConstraint>,
    /// Per-token log-probabilities: `None` for none (the default, which costs nothing),
    /// `Some(k)` for the chosen token's plus its `k` (0..=[`MAX_TOP_LOGPROBS`]) most likely
    /// alternatives, sent as [`GenerationEvent::Logprobs`]. Requests that ask are never served
    /// from nor stored in the answer cache (its entries hold text only).
    pub logprobs: Option<u32>,
    /// Chat-template options (`chat_template_kwargs`), checked against the names the model's
    /// template reads; only with [`PromptInput::Chat`]. Part of the cache key.
    pub chat_template_kwargs: TemplateKwargs,
    /// Tools the model may call (only with [`PromptInput::Chat`]): described in the prompt, and
    /// the output constrained to [`crate::tools`]' format (`constraint` holds its schema).
    /// Part of the cache key.
    pub tools: Option<Tools>,
}

impl GenerationRequest {
    /// `input` for `model`, up to `max_tokens`, every other setting at its default (greedy, no
    /// stop strings, deadline, tenant, session or grammar; default cache policy): what tools,
    /// tests and benches start from before setting the fields they exercise.
    pub fn new(
        request_id: impl Into<String>,
        model: impl Into<String>,
        input: PromptInput,
        max_tokens: u32,
    ) -> Self {
        Self {
            request_id: request_id.into(),
            model: model.into(),
            input,
            sampling: SamplingParams::default(),
            max_tokens,
            stop: Vec::new(),
            deadline: None,
            cache_policy: CachePolicy::default(),
            tenant: None,
            session: None,
            constraint: None,
            logprobs: None,
            chat_template_kwargs: TemplateKwargs::new(),
            tools: None,
        }
    }
}

/// A grammar the generated text must follow: every token that would leave it is masked before
/// sampling, so the output always parses (unless `max_tokens` or a stop string cuts it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputConstraint {
    /// The grammar.
    pub grammar: Grammar,
    /// The request field it came from (`response_format`, `json_schema`), named by errors.
    /// Not part of the cache key.
    pub field: String,
}

/// The grammars a request can ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grammar {
    /// One JSON object, any keys (OpenAI's `json_object`).
    JsonObject,
    /// One JSON value valid against this JSON Schema, given as JSON text. Object properties are
    /// written in the schema's order.
    JsonSchema(String),
    /// Text matching this regular expression (Rust `regex` syntax) as a whole.
    Regex(String),
    /// A grammar in llguidance's Lark dialect (`start: ...`).
    Lark(String),
}

/// How the answer cache treats one request. Only deterministic requests are cached at all (unless
/// the node opts in), whatever the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum CachePolicy {
    /// Serve from the cache when present, else generate and store.
    #[default]
    Default,
    /// Neither read nor write the cache: always generate, store nothing.
    Bypass,
    /// Do not read the cache but store the new answer (replacing a stale or bad one).
    Refresh,
    /// Serve only from the cache; never generate. A miss fails with `EngineError::NotCached`.
    OnlyIfCached,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FinishReason {
    /// End-of-sequence / end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller went away or cancelled.
    Cancelled,
}

impl FinishReason {
    /// Lower-case name used on the wire (`stop`, `length`, `cancelled`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Source {
    /// Generated by the model now.
    #[default]
    Model,
    /// Served from the in-process cache.
    CacheL1,
    /// Served from the fleet's Redis cache.
    CacheL2,
    /// One of the sampled answers the fleet keeps in Redis for a hot sampled question: variant
    /// `n` (1-based) of up to `cache.sampled_variants`.
    CacheVariant(u32),
    /// Served by the semantic tier: the in-process answer of a question asked in other words.
    CacheSemantic,
}

/// Where the time of a request went.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    /// Waiting for a batch slot.
    pub queue: Duration,
    /// From arrival to the first generated token.
    pub time_to_first_token: Duration,
    /// From arrival to the last token.
    pub total: Duration,
}

/// The summary that ends every successful generation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Completion {
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Tokens in the rendered prompt (BOS included).
    pub prompt_tokens: u32,
    /// Tokens generated (a matched stop string's tokens included).
    pub completion_tokens: u32,
    /// Prompt tokens whose KV came from the instance's prefix store instead of being computed
    /// (0 for an answer served from the answer cache).
    pub cached_prompt_tokens: u32,
    /// Queue, time to first token and total time.
    pub timings: Timings,
    /// Model or cache level.
    pub source: Source,
}

/// Most alternatives a request may ask for per token (`top_logprobs`), as OpenAI's limit.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// One token and its log-probability.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenProb {
    /// Token id.
    pub id: u32,
    /// The token's raw bytes as the tokenizer defines them (may be part of a UTF-8 character;
    /// a control token's bytes are its name, e.g. `<|im_end|>`).
    pub bytes: Vec<u8>,
    /// Natural log of its probability: finite, or `-9999.0` for a token the distribution gives
    /// no mass at all (OpenAI's floor).
    pub logprob: f32,
}

/// The log-probabilities of one generated token.
///
/// Semantics (as OpenAI's and vLLM's default `raw_logprobs`, after the processors that decide
/// what may be sampled): the log-softmax of the logits after the output constraint's mask
/// (masked tokens have no mass) and the repetition penalty, before temperature, top-k, top-p and
/// min-p. So the values do not depend on `temperature`, and with greedy decoding the chosen token
/// is the one with the largest log-probability.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprob {
    /// The token generated.
    pub chosen: TokenProb,
    /// The most likely tokens, most likely first (ties: lower id first), as many as asked
    /// (fewer when fewer tokens have any mass). When the chosen token is among them its value
    /// is bit-for-bit the same as `chosen.logprob`.
    pub top: Vec<TokenProb>,
}

/// What a request's receiver gets, in order: any number of `Delta`s (each preceded by a
/// `Logprobs` when the request asked for them), then one `Finished`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// New text; never splits a UTF-8 character, never includes a stop string.
    Delta(String),
    /// Only when the request asked ([`GenerationRequest::logprobs`]): the log-probabilities of
    /// the tokens generated since the last `Logprobs`, in order. Always followed by the `Delta`
    /// that carries (at least the start of) their text, possibly an empty one at the end; a
    /// receiver that reads two before a `Delta` appends them. The end-of-turn token is not
    /// listed (its text is not part of the output); the tokens that held a matched stop string
    /// are (OpenAI does the same).
    Logprobs(Vec<TokenLogprob>),
    /// The end, with usage and timings.
    Finished(Completion),
}

/// Lifecycle of a model on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    /// Weights being read.
    Loading,
    /// Loaded; warm-up generations running on its instances.
    Warming,
    /// Serving requests.
    Ready,
    /// Loading failed; the log says why.
    Failed,
}

/// What `ListModels` reports about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Id used in requests.
    pub id: String,
    /// `llama`, `gemma3`.
    pub architecture: String,
    /// Quantization the weights run in, e.g. `q8_0`.
    pub quant: String,
    /// Longest prompt + completion, in tokens.
    pub context_length: u32,
    /// Instances serving the model.
    pub instances: u32,
    /// Loading, warming, ready or failed.
    pub state: ModelState,
    /// The options (`chat_template_kwargs` keys) the model's chat template reads, sorted; empty
    /// without a template, for one that reads none, and until the model is loaded.
    pub template_options: Vec<String>,
}

/// Which traffic the node wants once warm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Take traffic once warm.
    #[default]
    Active,
    /// Stay loaded and warm, take no traffic until `Admin.Activate`.
    Standby,
}

impl Role {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(Role::Active),
            "standby" => Ok(Role::Standby),
            other => Err(format!("must be `active` or `standby`. Given: {other:?}")),
        }
    }
}

/// What kind of failure an error is, whatever layer it comes from. Every domain error reports one
/// (`kind()`); each front maps a kind to its own status exactly once (gRPC code, HTTP status), and
/// the `code` label of `qnode_requests_total` is [`ErrorKind::label`], the same for both fronts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or out of range; retrying it unchanged fails again.
    InvalidArgument,
    /// The model (or other named thing) does not exist here.
    NotFound,
    /// The thing to create exists already.
    AlreadyExists,
    /// The request is valid but the state it needs does not hold (e.g. not cached).
    FailedPrecondition,
    /// A bounded queue is full; retry after the hint.
    ResourceExhausted {
        /// Suggested wait before retrying.
        retry_after: Duration,
    },
    /// This node cannot take the request now; another node (or later) may.
    Unavailable,
    /// The caller's deadline passed.
    DeadlineExceeded,
    /// The caller went away.
    Cancelled,
    /// Missing or wrong credentials.
    Unauthenticated,
    /// Valid credentials that do not allow this (e.g. a key bound to another tenant).
    PermissionDenied,
    /// A bug; the message says what broke.
    Internal,
}

impl ErrorKind {
    /// The metric label (gRPC's code names, which both fronts share).
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "InvalidArgument",
            ErrorKind::NotFound => "NotFound",
            ErrorKind::AlreadyExists => "AlreadyExists",
            ErrorKind::FailedPrecondition => "FailedPrecondition",
            ErrorKind::ResourceExhausted { .. } => "ResourceExhausted",
            ErrorKind::Unavailable => "Unavailable",
            ErrorKind::DeadlineExceeded => "DeadlineExceeded",
            ErrorKind::Cancelled => "Cancelled",
            ErrorKind::Unauthenticated => "Unauthenticated",
            ErrorKind::PermissionDenied => "PermissionDenied",
            ErrorKind::Internal => "Internal",
        }
    }
}

/// Most characters of a caller's value an error message echoes back.
pub const ECHO_CHARS: usize = 128;

/// A caller's value (model id, field or header value) as an error message may echo it: at most
/// [`ECHO_CHARS`] characters, then `…` when cut (on a character boundary). A 100 kB model id
/// echoed whole made gRPC clients fail on the status size and HTTP bodies and log lines balloon;
/// every echo goes through here.
pub fn echo(value: &str) -> std::borrow::Cow<'_, str> {
    match value.char_indices().nth(ECHO_CHARS) {
        None => std::borrow::Cow::Borrowed(value),
        Some((cut, _)) => std::borrow::Cow::Owned(format!("{}…", &value[..cut])),
    }
}

#[cfg(test)]
mod echo_tests {
    use super::*;

    #[test]
    fn echo_caps_on_a_character_boundary() {
        assert_eq!(echo("short"), "short");
        let exact = "x".repeat(ECHO_CHARS);
        assert_eq!(echo(&exact), exact);
        let long = "é".repeat(10_000);
        let capped = echo(&long);
        assert_eq!(capped.chars().count(), ECHO_CHARS + 1);
        assert!(capped.ends_with("é…"), "{capped}");
        assert_eq!(echo(&"租".repeat(129)), format!("{}…", "租".repeat(128)));
    }
}
