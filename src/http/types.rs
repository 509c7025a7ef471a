//! The OpenAI JSON shapes this front reads and writes, as OpenAI's API reference defines them.
//!
//! Requests ignore unknown fields (clients send many we have no use for); every field is optional
//! or defaulted where OpenAI's is, and `null` reads as absent.

use serde::{Deserialize, Serialize};

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

impl Stop {
    /// The stop strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` and no choices before `[DONE]`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// One part of an array `content`; only `{"type":"text","text":...}` is served.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ContentPart {
    /// Part type: `text` (others, like `image_url`, are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// A message's `content`: a string or a list of parts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts, joined in order.
    Parts(Vec<ContentPart>),
}

/// One chat message of a request.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RequestMessage {
    /// `system`, `developer` (read as `system`), `user` or `assistant`.
    pub role: String,
    /// The text; `null` reads as empty (and is refused by validation).
    #[serde(default)]
    pub content: Option<Content>,
}

/// The body of `POST /v1/chat/completions` (which needs `messages`) and `POST /v1/completions`
/// (which needs `prompt`). One flat struct, not two sharing a flattened part: serde loses the field
/// path of errors inside a flattened struct, and the 400 must name the field.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerateBody {
    /// Model id as listed by `/v1/models`.
    pub model: String,
    /// The conversation (chat).
    #[serde(default)]
    pub messages: Option<Vec<RequestMessage>>,
    /// Raw text to continue, no chat template (completions).
    #[serde(default)]
    pub prompt: Option<Prompt>,
    /// Upper bound on generated tokens (legacy name; `max_completion_tokens` wins when both).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Upper bound on generated tokens.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// In [0, 2]; 0 is greedy. Absent: the node's default (greedy).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass in (0, 1].
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Same seed and input, same output.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop strings, not included in the output.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Stream as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// The end user, for the log only (the tenant is the `x-qnode-tenant` header).
    #[serde(default)]
    pub user: Option<String>,
    /// Choices to generate; only 1 is served.
    #[serde(default)]
    pub n: Option<u32>,
    /// Accepted and ignored (the engine has no such penalty).
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Accepted and ignored (the engine has no such penalty).
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
}

/// `prompt` of a legacy completion: a string, or a list holding exactly one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// The prompt.
    One(String),
    /// A batch of prompts; only a batch of one is served.
    Many(Vec<String>),
}

/// Token counts of a finished call.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Usage {
    /// Tokens in the rendered prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
}

/// An assistant message in a response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The generated text.
    pub content: String,
}

/// One choice of a non-streamed chat completion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChoice {
    /// Always 0 (`n` is 1).
    pub index: u32,
    /// The answer.
    pub message: ResponseMessage,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
}

/// A non-streamed chat completion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-<request id>`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// One choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
    /// Where the answer came from: `qnode-model`, `qnode-cache-l1` or `qnode-cache-l2`.
    pub system_fingerprint: &'static str,
}

/// The `delta` of a streamed chat chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Delta {
    /// `assistant` on the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a streamed chat chunk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkChoice {
    /// Always 0.
    pub index: u32,
    /// What is new.
    pub delta: Delta,
    /// `null` until the last content chunk.
    pub finish_reason: Option<&'static str>,
}

/// A streamed chat chunk (`chat.completion.chunk`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletionChunk {
    /// Same id on every chunk of a stream.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds, same on every chunk.
    pub created: u64,
    /// The model.
    pub model: String,
    /// One choice, or none on the usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// Only on the usage chunk (`stream_options.include_usage`); `null` on the others, as OpenAI
    /// sends it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One choice of a legacy completion (streamed or not).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextChoice {
    /// Always 0.
    pub index: u32,
    /// The text (the whole answer, or the delta of a chunk).
    pub text: String,
    /// `stop` or `length`; `null` on chunks before the last.
    pub finish_reason: Option<&'static str>,
    /// Always `null` (no logprobs).
    pub logprobs: Option<()>,
}

/// A legacy completion or one of its chunks (`text_completion`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextCompletion {
    /// `cmpl-<request id>`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model.
    pub model: String,
    /// One choice, or none on the usage chunk.
    pub choices: Vec<TextChoice>,
    /// On a whole answer and on the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Model {
    /// Model id.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds (the node's start; OpenAI's is the model's release).
    pub created: u64,
    /// `qnode`.
    pub owned_by: &'static str,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// Every model served (ready or not).
    pub data: Vec<Model>,
}
