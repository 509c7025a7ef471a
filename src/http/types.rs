//! The OpenAI JSON shapes this front reads and writes, as OpenAI's API reference defines them.
//!
//! Every OpenAI request field is either honoured or, when set to something the node cannot do
//! (`functions`, `echo`, `suffix`, `best_of` > 1, penalties, ...),
//! refused with a 400 naming it. Fields OpenAI does not define are ignored (clients and SDKs add
//! their own); `null` reads as absent everywhere.

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

/// `stream_options`. Another option (vLLM's `continuous_usage_stats`, …) is refused, naming it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// One chat message of a request. Fields it does not define (`name`, `audio`, …) are refused,
/// naming them: the chat templates would drop them silently.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestMessage {
    /// `system`, `developer` (read as `system`), `user`, `assistant` or `tool`.
    pub role: String,
    /// The text; `null` reads as empty (refused by validation unless the turn has `tool_calls`).
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant turn's calls (`[{"id", "type": "function", "function": {"name",
    /// "arguments"}}]`), read by `convert`, which names the field at fault.
    #[serde(default)]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` turn: the id of the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// The body of `POST /v1/chat/completions` (which needs `messages`) and `POST /v1/completions`
/// (which needs `prompt`). One flat struct, not two sharing a flattened part: serde loses the field
/// path of errors inside a flattened struct, and the 400 must name the field. A field it does not
/// define is refused, naming it (as OpenAI's API does): a field the node would not read must not
/// look honoured.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// In [0, 2]; 0 is greedy. Absent: OpenAI's default, 1.0 (sampled).
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
    /// The end user: logged, and the session key when no `x-session-id` header is sent (the
    /// tenant is the `x-qnode-tenant` header). At most 256 bytes.
    #[serde(default)]
    pub user: Option<String>,
    /// Choices to generate; only 1 is served.
    #[serde(default)]
    pub n: Option<u32>,
    /// Only 0 is served (the engine has no such penalty): anything else is refused.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Only 0 is served (the engine has no such penalty): anything else is refused.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Top-k filter (vLLM / llama.cpp server extension).
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Min-p filter (vLLM / llama.cpp server extension).
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Repetition penalty (vLLM / llama.cpp server extension).
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Chat-template options (vLLM / llama.cpp server extension), e.g.
    /// `{"enable_thinking": false}` for Qwen3: an object of booleans, numbers and strings, read
    /// by `convert` (which names the field at fault).
    #[serde(default)]
    pub chat_template_kwargs: Option<serde_json::Value>,
    /// vLLM extension (a template to render with instead of the model's): refused when set.
    #[serde(default)]
    pub chat_template: Option<serde_json::Value>,
    /// vLLM extension; `true` (what the node always does) is served, `false` refused.
    #[serde(default)]
    pub add_generation_prompt: Option<serde_json::Value>,
    /// vLLM extension; `false` is served, `true` refused.
    #[serde(default)]
    pub continue_final_message: Option<serde_json::Value>,
    /// qnode extension: `default`, `bypass`, `refresh` or `only_if_cached`, as gRPC's
    /// `cache_policy`.
    #[serde(default)]
    pub cache_policy: Option<String>,
    /// Functions the model may call (`[{"type": "function", "function": {"name",
    /// "description", "parameters", "strict"}}]`), read by `convert`, which names the field at
    /// fault. The answer is held to `crate::tools`' format.
    #[serde(default)]
    pub tools: Option<serde_json::Value>,
    /// `none`, `auto`, `required` or `{"type": "function", "function": {"name": ...}}`.
    #[serde(default)]
    pub tool_choice: Option<serde_json::Value>,
    /// OpenAI fields this node does not honour: refused when set (see
    /// [`GenerateBody::unhonoured`]), never ignored. The legacy `functions` (use `tools`).
    #[serde(default)]
    pub functions: Option<serde_json::Value>,
    /// See `functions`.
    #[serde(default)]
    pub function_call: Option<serde_json::Value>,
    /// `true` (OpenAI's default: the model *may* make several calls) and `false` are both
    /// honoured: the node makes at most one call per turn.
    #[serde(default)]
    pub parallel_tool_calls: Option<serde_json::Value>,
    /// `text`, `json_object` or `json_schema`: the output is constrained to it (read by
    /// `convert`, which names the field at fault).
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
    /// Chat: `true` for each token's log-probability. Completions: how many alternatives per
    /// token (an integer). Read by `convert`, which names the field when its type is wrong.
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    /// Chat: alternatives per token, with `logprobs: true` (refused on completions, where
    /// `logprobs` is the count).
    #[serde(default)]
    pub top_logprobs: Option<serde_json::Value>,
    /// See `tools`.
    #[serde(default)]
    pub logit_bias: Option<serde_json::Value>,
    /// See `tools`; `false` is served.
    #[serde(default)]
    pub echo: Option<serde_json::Value>,
    /// See `tools`.
    #[serde(default)]
    pub suffix: Option<serde_json::Value>,
    /// See `tools`; `1` is served.
    #[serde(default)]
    pub best_of: Option<serde_json::Value>,
}

impl GenerateBody {
    /// The first OpenAI field set to something this node cannot honour, by name.
    pub fn unhonoured(&self) -> Option<&'static str> {
        use serde_json::Value;
        let off = |v: &Option<Value>| match v {
            None | Some(Value::Null) | Some(Value::Bool(false)) => true,
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            _ => false,
        };
        let fields: [(&'static str, bool); 10] = [
            ("functions", off(&self.functions)),
            (
                "function_call",
                off(&self.function_call) || self.function_call == Some(Value::from("none")),
            ),
            (
                "parallel_tool_calls",
                off(&self.parallel_tool_calls)
                    || self.parallel_tool_calls == Some(Value::Bool(true)),
            ),
            ("logit_bias", off(&self.logit_bias)),
            ("echo", off(&self.echo)),
            (
                "suffix",
                off(&self.suffix) || self.suffix == Some(Value::from("")),
            ),
            (
                "best_of",
                off(&self.best_of) || self.best_of == Some(Value::from(1)),
            ),
            // vLLM's siblings of `chat_template_kwargs` that would change the rendered prompt.
            (
                "chat_template",
                off(&self.chat_template) || self.chat_template == Some(Value::from("")),
            ),
            (
                "add_generation_prompt",
                matches!(&self.add_generation_prompt, None | Some(Value::Null))
                    || self.add_generation_prompt == Some(Value::Bool(true)),
            ),
            ("continue_final_message", off(&self.continue_final_message)),
        ];
        fields.into_iter().find(|(_, ok)| !ok).map(|(name, _)| name)
    }
}

/// `prompt` of a legacy completion: a string, or a list of strings answered one choice each.
/// Token ids are read only to be refused by name (this node takes text).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// The prompt.
    One(String),
    /// A batch of prompts: one choice per prompt, `index` = its position.
    Many(Vec<String>),
    /// One prompt as token ids (refused).
    TokenIds(Vec<u32>),
    /// Several prompts as token ids (refused).
    TokenIdLists(Vec<Vec<u32>>),
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
    /// OpenAI's prompt cache report: how many prompt tokens were reused.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the node's prefix store (an earlier turn).
    pub cached_tokens: u32,
}

/// An assistant message in a response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The generated text; `null` when the answer is a tool call.
    pub content: Option<String>,
    /// The tool calls made (absent when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ResponseToolCall>>,
}

/// One tool call of a response (`message.tool_calls[]`) or of a chunk (`delta.tool_calls[]`,
/// where `index` is set).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseToolCall {
    /// Position among the turn's calls; chunks only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// `call_...`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The function and its arguments.
    pub function: ResponseFunction,
}

/// `tool_calls[].function`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseFunction {
    /// The function called.
    pub name: String,
    /// Its arguments, a JSON object as text.
    pub arguments: String,
}

/// One choice of a non-streamed chat completion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChoice {
    /// Always 0 (`n` is 1).
    pub index: u32,
    /// The answer.
    pub message: ResponseMessage,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: &'static str,
    /// With `logprobs: true`; `null` otherwise.
    pub logprobs: Option<ChatLogprobs>,
}

/// `choices[].logprobs` of a chat completion or chunk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatLogprobs {
    /// One entry per generated token (of this chunk, when streamed).
    pub content: Vec<ChatTokenLogprob>,
}

/// One token's entry in [`ChatLogprobs`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    /// The token's text (its bytes decoded, U+FFFD for part of a character).
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// The token's raw UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The `top_logprobs` most likely tokens here, most likely first.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// One alternative in [`ChatTokenLogprob::top_logprobs`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTopLogprob {
    /// The token's text.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// The token's raw UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// `choices[].logprobs` of a legacy completion (or chunk), as OpenAI's completions API spells it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TextLogprobs {
    /// Each generated token's text.
    pub tokens: Vec<String>,
    /// Each token's log-probability.
    pub token_logprobs: Vec<f32>,
    /// Per token: the `logprobs` most likely tokens and the chosen one (so up to `logprobs` + 1),
    /// text → log-probability.
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f32>>,
    /// Per token: where its text starts in the completion's text, in characters (the lengths of
    /// the tokens before it summed, as vLLM counts; streamed, continued across chunks).
    pub text_offset: Vec<u32>,
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
    /// Where the answer came from: `qnode-model`, `qnode-cache-l1`, `qnode-cache-l2` (a sampled
    /// variant: `qnode-cache-l2-vN`) or `qnode-cache-semantic`.
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
    /// Tool calls (whole, in one chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ResponseToolCall>>,
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
    /// With `logprobs: true`, the entries of this chunk's tokens; `null` otherwise.
    pub logprobs: Option<ChatLogprobs>,
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
    /// On the last chunk (the one with `finish_reason`) and the usage chunk: where the answer came
    /// from (as on a whole answer), known once it has ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<&'static str>,
}

/// One choice of a legacy completion (streamed or not).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextChoice {
    /// The position of its prompt in `prompt` (0 for a single prompt).
    pub index: u32,
    /// The text (the whole answer, or the delta of a chunk).
    pub text: String,
    /// `stop` or `length`; `null` on chunks before the last.
    pub finish_reason: Option<&'static str>,
    /// With `logprobs`: this choice's (or chunk's) tokens; `null` otherwise.
    pub logprobs: Option<TextLogprobs>,
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
    /// On a whole answer, and on a stream's last and usage chunks: where it came from, as
    /// chat's (`qnode-mixed` when the prompts of a batch were answered from different places).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<&'static str>,
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
