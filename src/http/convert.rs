//! OpenAI requests → the front's neutral [`RawRequest`], so both fronts go through the same
//! [`crate::front::validate::validate`]; results → OpenAI responses.
//!
//! Only what OpenAI has and the neutral request lacks is checked here (`n`, content parts, a
//! batch of prompts); every range (temperature, max_tokens, stop, roles, empty text) is left to
//! `validate`.

use crate::config::NonTextParts;
use crate::front::{FrontError, RawRequest, WireToolChoice};
use serde_json::{Map, Value};

use crate::tools::Output;
use crate::types::{
    echo, CachePolicy, ChatMessage, Completion, FinishReason, Grammar, OutputConstraint, Source,
    TemplateKwargs, TemplateValue, TokenLogprob, TokenProb, Tool, ToolCall,
};

use super::types::{
    ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, Content, GenerateBody, Prompt,
    PromptTokensDetails, RequestMessage, ResponseFunction, ResponseToolCall, TextLogprobs, Usage,
};

/// `temperature` when the body leaves it out (or sends `null`), as OpenAI's API reference says.
/// Sampled without a `seed`, so not cached as an exact answer (see the README's cache section).
pub const OPENAI_DEFAULT_TEMPERATURE: f32 = 1.0;

/// What a request wants beyond the neutral request: how to answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Answer as server-sent events.
    pub stream: bool,
    /// Streamed: end with a usage chunk.
    pub include_usage: bool,
    /// The caller's end user: logged (and the session key when no `x-session-id` is sent).
    pub user: Option<String>,
    /// Non-text content parts left out of the messages (`openai.non_text_parts = "drop"`).
    pub dropped_parts: usize,
    /// Log-probabilities asked for: choices carry `logprobs` (else `null`).
    pub logprobs: bool,
    /// The answer is in the tool format: read as a call or text ([`answer`]).
    pub tools: bool,
}

/// A chat request as the neutral request; non-text content parts are dropped (and counted in
/// [`Options::dropped_parts`]) or refused, as `non_text` says.
pub fn chat(
    mut body: GenerateBody,
    non_text: NonTextParts,
) -> Result<(RawRequest, Options), FrontError> {
    let mut dropped = 0;
    let messages = body
        .messages
        .take()
        .ok_or_else(|| FrontError::invalid("messages", "`messages` is required"))?
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(i, m, non_text, &mut dropped))
        .collect::<Result<Vec<_>, _>>()?;
    let logprobs = match body.logprobs.take() {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(b),
        Some(other) => {
            return Err(FrontError::invalid(
                "logprobs",
                format!(
                    "`logprobs` must be a boolean. Given: {}",
                    echo(&other.to_string())
                ),
            ))
        }
    };
    let top_logprobs = count(body.top_logprobs.take(), "top_logprobs")?;
    let tools = tools(body.tools.take())?;
    let tool_choice = tool_choice(body.tool_choice.take())?;
    let (mut wire, mut options) = sampling(body)?;
    wire.messages = messages;
    wire.logprobs = logprobs;
    wire.top_logprobs = top_logprobs;
    wire.tools = tools;
    wire.tool_choice = tool_choice;
    options.dropped_parts = dropped;
    options.logprobs = logprobs == Some(true);
    options.tools = wire.uses_tools();
    Ok((wire, options))
}

/// A count field (`top_logprobs`, legacy `logprobs`): absent, or a non-negative integer (its
/// range is `validate`'s).
fn count(v: Option<Value>, field: &'static str) -> Result<Option<u32>, FrontError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(Some(
            u32::try_from(n.as_u64().unwrap_or(0)).unwrap_or(u32::MAX),
        )),
        Some(other) => Err(FrontError::invalid(
            field,
            format!(
                "`{field}` must be a non-negative integer. Given: {}",
                echo(&other.to_string())
            ),
        )),
    }
}

/// The content of a message whose parts were all non-text and dropped.
pub const OMITTED: &str = "[non-text content omitted]";

/// Most prompts in one `/v1/completions` body (LangChain batches up to 20).
pub const MAX_PROMPTS: usize = 64;

/// A legacy completion request as one neutral request per prompt (a list of prompts is a batch:
/// one choice each, in order).
pub fn completion(mut body: GenerateBody) -> Result<(Vec<RawRequest>, Options), FrontError> {
    let prompts = match body.prompt.take() {
        None => return Err(FrontError::invalid("prompt", "`prompt` is required")),
        Some(Prompt::One(p)) => vec![p],
        Some(Prompt::Many(v)) if v.is_empty() || v.len() > MAX_PROMPTS => {
            return Err(FrontError::invalid(
                "prompt",
                format!(
                    "`prompt` must be a string or a list of 1 to {MAX_PROMPTS} strings. Given: a list of {}",
                    v.len()
                ),
            ))
        }
        Some(Prompt::Many(v)) => v,
        Some(Prompt::TokenIds(_) | Prompt::TokenIdLists(_)) => {
            return Err(FrontError::invalid(
                "prompt",
                "`prompt` must be text (a string or a list of strings): this node does not take \
                 token ids; send the text they encode",
            ))
        }
    };
    for (field, value) in [("tools", &body.tools), ("tool_choice", &body.tool_choice)] {
        if !matches!(value, None | Some(Value::Null)) {
            return Err(FrontError::invalid(
                field,
                format!("`{field}` is a chat completions field (/v1/chat/completions)"),
            ));
        }
    }
    if !matches!(body.top_logprobs, None | Some(Value::Null)) {
        return Err(FrontError::invalid(
            "top_logprobs",
            "`top_logprobs` is a chat completions field; on /v1/completions `logprobs` is the \
             number of alternatives per token",
        ));
    }
    // OpenAI's legacy `logprobs: N`: the chosen token's and the N most likely.
    let top_logprobs = count(body.logprobs.take(), "logprobs")?;
    let (mut wire, mut options) = sampling(body)?;
    if top_logprobs.is_some() {
        wire.logprobs = Some(true);
        wire.top_logprobs = top_logprobs;
        wire.top_logprobs_field = "logprobs";
        options.logprobs = true;
    }
    let requests = prompts
        .into_iter()
        .map(|prompt| RawRequest {
            prompt: Some(prompt),
            ..wire.clone()
        })
        .collect();
    Ok((requests, options))
}

fn message(
    i: usize,
    m: RequestMessage,
    non_text: NonTextParts,
    dropped: &mut usize,
) -> Result<ChatMessage, FrontError> {
    let content = match m.content {
        None => String::new(),
        Some(Content::Text(text)) => text,
        Some(Content::Parts(parts)) => {
            let dropped_before = *dropped;
            let mut text = String::new();
            for (j, part) in parts.into_iter().enumerate() {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    ("text", None) => {
                        return Err(FrontError::invalid(
                            format!("messages[{i}].content[{j}].text"),
                            format!("`messages[{i}].content[{j}].text` is required for a text part"),
                        ))
                    }
                    (_, _) if non_text == NonTextParts::Drop => *dropped += 1,
                    (other, _) => {
                        return Err(FrontError::invalid(
                            format!("messages[{i}].content[{j}].type"),
                            format!(
                                "`messages[{i}].content[{j}].type` must be text: this node serves text models \
                                 (`openai.non_text_parts = \"drop\"` would serve the text parts). Given: {:?}",
                                echo(other)
                            ),
                        ))
                    }
                }
            }
            if text.is_empty() && *dropped > dropped_before {
                // A turn that was only a picture still happened: the model is told so, and
                // answers it, instead of the whole conversation failing on an empty message.
                text.push_str(OMITTED);
            }
            text
        }
    };
    // OpenAI's newer name for the system role.
    let role = if m.role == "developer" {
        "system".to_owned()
    } else {
        m.role
    };
    let tool_calls = match m.tool_calls {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(calls)) => calls
            .into_iter()
            .enumerate()
            .map(|(j, c)| tool_call(&format!("messages[{i}].tool_calls[{j}]"), c))
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(FrontError::invalid(
                format!("messages[{i}].tool_calls"),
                format!("`messages[{i}].tool_calls` must be a list of calls"),
            ))
        }
    };
    Ok(ChatMessage {
        role,
        content,
        tool_calls,
        tool_call_id: m.tool_call_id,
    })
}

/// `field` of an object: its keys must be among `known` (a key the node would not read is
/// refused, naming it).
fn object(field: &str, v: Value, known: &[&str]) -> Result<Map<String, Value>, FrontError> {
    let Value::Object(o) = v else {
        return Err(FrontError::invalid(
            field,
            format!(
                "`{field}` must be an object. Given: {}",
                echo(&v.to_string())
            ),
        ));
    };
    if let Some(key) = o.keys().find(|k| !known.contains(&k.as_str())) {
        let path = format!("{field}.{}", echo(key));
        return Err(FrontError::invalid(
            path.clone(),
            format!(
                "`{path}` is not supported by this node (known: {}); remove it",
                known.join(", ")
            ),
        ));
    }
    Ok(o)
}

/// A string member of `o` (`None` when absent or `null`); `field` is `o`'s path.
fn string(
    o: &mut Map<String, Value>,
    field: &str,
    key: &str,
) -> Result<Option<String>, FrontError> {
    match o.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(FrontError::invalid(
            format!("{field}.{key}"),
            format!(
                "`{field}.{key}` must be a string. Given: {}",
                echo(&other.to_string())
            ),
        )),
    }
}

/// `type` of a tool, a call or a named choice: `function` (the only kind OpenAI has for chat).
fn function_type(o: &mut Map<String, Value>, field: &str) -> Result<(), FrontError> {
    match string(o, field, "type")?.as_deref() {
        Some("function") => Ok(()),
        Some(other) => Err(FrontError::invalid(
            format!("{field}.type"),
            format!(
                "`{field}.type` must be `function`. Given: {:?}",
                echo(other)
            ),
        )),
        None => Err(FrontError::invalid(
            format!("{field}.type"),
            format!("`{field}.type` is required: `function`"),
        )),
    }
}

/// One call of an assistant turn: `{"id", "type": "function", "function": {"name",
/// "arguments"}}`; `arguments` is JSON text (an object is taken too, as some clients send).
fn tool_call(field: &str, v: Value) -> Result<ToolCall, FrontError> {
    let mut o = object(field, v, &["id", "type", "function"])?;
    function_type(&mut o, field)?;
    let id = string(&mut o, field, "id")?.unwrap_or_default();
    let ffield = format!("{field}.function");
    let mut f = object(
        &ffield,
        o.remove("function").unwrap_or(Value::Null),
        &["name", "arguments"],
    )?;
    let name = string(&mut f, &ffield, "name")?.unwrap_or_default();
    let arguments = match f.remove("arguments") {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(Value::String(s)) => s,
        Some(object @ Value::Object(_)) => object.to_string(),
        Some(other) => {
            return Err(FrontError::invalid(
                format!("{ffield}.arguments"),
                format!(
                    "`{ffield}.arguments` must be a JSON object as a string. Given: {}",
                    echo(&other.to_string())
                ),
            ))
        }
    };
    Ok(ToolCall {
        id,
        name,
        arguments,
    })
}

/// `tools`: `[{"type": "function", "function": {"name", "description", "parameters",
/// "strict"}}]`. `parameters` absent is a function without arguments; `strict` (either value)
/// is honoured by always constraining the output. Names and schemas are `validate`'s.
fn tools(v: Option<Value>) -> Result<Vec<Tool>, FrontError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(FrontError::invalid(
                "tools",
                format!(
                    "`tools` must be a list of {{\"type\": \"function\", \"function\": {{...}}}}. Given: {}",
                    echo(&other.to_string())
                ),
            ))
        }
    };
    list.into_iter()
        .enumerate()
        .map(|(i, t)| {
            let field = format!("tools[{i}]");
            let mut o = object(&field, t, &["type", "function"])?;
            function_type(&mut o, &field)?;
            let ffield = format!("{field}.function");
            let mut f = object(
                &ffield,
                o.remove("function").unwrap_or(Value::Null),
                &["name", "description", "parameters", "strict"],
            )?;
            let name = string(&mut f, &ffield, "name")?.unwrap_or_default();
            let description = string(&mut f, &ffield, "description")?;
            if !matches!(f.get("strict"), None | Some(Value::Null | Value::Bool(_))) {
                return Err(FrontError::invalid(
                    format!("{ffield}.strict"),
                    format!("`{ffield}.strict` must be a boolean"),
                ));
            }
            let parameters = match f.remove("parameters") {
                None | Some(Value::Null) => r#"{"type":"object","properties":{}}"#.to_owned(),
                Some(p) => p.to_string(),
            };
            Ok(Tool {
                name,
                description,
                parameters,
            })
        })
        .collect()
}

/// `tool_choice`: `none`, `auto`, `required` or `{"type": "function", "function": {"name"}}`.
fn tool_choice(v: Option<Value>) -> Result<Option<WireToolChoice>, FrontError> {
    const FIELD: &str = "tool_choice";
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(Some(WireToolChoice::None)),
            "auto" => Ok(Some(WireToolChoice::Auto)),
            "required" => Ok(Some(WireToolChoice::Required)),
            other => Err(FrontError::invalid(
                FIELD,
                format!(
                    "`{FIELD}` must be `none`, `auto`, `required` or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}. Given: {:?}",
                    echo(other)
                ),
            )),
        },
        Some(v) => {
            let mut o = object(FIELD, v, &["type", "function"])?;
            function_type(&mut o, FIELD)?;
            let ffield = format!("{FIELD}.function");
            let mut f = object(&ffield, o.remove("function").unwrap_or(Value::Null), &["name"])?;
            match string(&mut f, &ffield, "name")? {
                Some(name) => Ok(Some(WireToolChoice::Function(name))),
                None => Err(FrontError::invalid(
                    format!("{ffield}.name"),
                    format!("`{ffield}.name` is required"),
                )),
            }
        }
    }
}

/// The answer of a request with tools as OpenAI spells it: the text (`None` for a call), the
/// calls, and the finish reason (`tool_calls` for a call). Output that is not the format (cut by
/// `max_tokens`) is returned as text with its own finish reason.
pub fn answer(
    text: &str,
    finish: FinishReason,
) -> (Option<String>, Option<Vec<ResponseToolCall>>, &'static str) {
    match crate::tools::parse(text) {
        Output::Call(call) => (
            None,
            Some(vec![ResponseToolCall {
                index: None,
                id: call.id,
                kind: "function",
                function: ResponseFunction {
                    name: call.name,
                    arguments: call.arguments,
                },
            }]),
            "tool_calls",
        ),
        Output::Text(text) | Output::Raw(text) => (Some(text), None, finish_reason(finish)),
    }
}

/// Everything but the prompt; `messages` and `prompt` are taken out already.
fn sampling(s: GenerateBody) -> Result<(RawRequest, Options), FrontError> {
    if let Some(n) = s.n.filter(|&n| n != 1) {
        return Err(FrontError::invalid(
            "n",
            format!("`n` must be 1: this node generates one choice per request. Given: {n}"),
        ));
    }
    if let Some(field) = s.unhonoured() {
        return Err(FrontError::invalid(
            field,
            format!(
                "`{field}` is not supported by this node yet; remove it (it would otherwise be \
                 ignored and the answer would not be what you asked for)"
            ),
        ));
    }
    for (field, value) in [
        ("presence_penalty", s.presence_penalty),
        ("frequency_penalty", s.frequency_penalty),
    ] {
        if let Some(p) = value.filter(|&p| p != 0.0) {
            return Err(FrontError::invalid(
                field,
                format!(
                    "`{field}` must be 0: this node has no such penalty (use `repetition_penalty`). Given: {p}"
                ),
            ));
        }
    }
    let cache_policy = match s.cache_policy.as_deref() {
        None | Some("default") => Ok(CachePolicy::Default),
        Some("bypass") => Ok(CachePolicy::Bypass),
        Some("refresh") => Ok(CachePolicy::Refresh),
        Some("only_if_cached") => Ok(CachePolicy::OnlyIfCached),
        Some(other) => Err(other.to_owned()),
    };
    let stream = s.stream.unwrap_or(false);
    let constraint = response_format(s.response_format)?;
    let chat_template_kwargs = template_kwargs(s.chat_template_kwargs)?;
    let wire = RawRequest {
        model: s.model,
        max_tokens: s.max_completion_tokens.or(s.max_tokens),
        // OpenAI's default, not the node's (greedy): gateways that leave it out expect samples,
        // and a greedy default would serve every identical conversation one cached reply.
        temperature: Some(s.temperature.unwrap_or(OPENAI_DEFAULT_TEMPERATURE)),
        top_p: s.top_p,
        top_k: s.top_k,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        seed: s.seed,
        stop: s.stop.map(|stop| stop.into_vec()).unwrap_or_default(),
        cache_policy,
        user: s.user.clone(),
        constraint,
        chat_template_kwargs,
        ..RawRequest::default()
    };
    let options = Options {
        stream,
        include_usage: stream
            && s.stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        user: s.user,
        dropped_parts: 0,
        logprobs: false,
        tools: false,
    };
    Ok((wire, options))
}

/// `chat_template_kwargs`: absent, or an object of scalars (booleans, numbers, strings). Keys are
/// `validate`'s to check (names, count, what the model's template reads).
fn template_kwargs(v: Option<Value>) -> Result<TemplateKwargs, FrontError> {
    const FIELD: &str = "chat_template_kwargs";
    let object = match v {
        None | Some(Value::Null) => return Ok(TemplateKwargs::new()),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(FrontError::invalid(
                FIELD,
                format!(
                    "`{FIELD}` must be an object of template options, e.g. \
                     {{\"enable_thinking\": false}}. Given: {}",
                    echo(&other.to_string())
                ),
            ))
        }
    };
    object
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                Value::Bool(b) => TemplateValue::Bool(b),
                Value::String(s) => TemplateValue::Str(s),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => TemplateValue::Int(i),
                    None => TemplateValue::Float(n.as_f64().unwrap_or(f64::NAN)),
                },
                other => {
                    let kind = match other {
                        Value::Object(_) => "a nested object",
                        Value::Array(_) => "an array",
                        _ => "null",
                    };
                    let field = format!("{FIELD}.{}", echo(&key));
                    return Err(FrontError::invalid(
                        field.clone(),
                        format!(
                            "`{field}` must be a boolean, a number or a string (template options \
                             are scalars). Given: {kind}"
                        ),
                    ));
                }
            };
            Ok((key, value))
        })
        .collect()
}

/// A token's text as OpenAI shows it: its bytes decoded, U+FFFD for part of a character.
fn token_text(t: &TokenProb) -> String {
    String::from_utf8_lossy(&t.bytes).into_owned()
}

/// Chat's `logprobs` of some tokens.
pub fn chat_logprobs(entries: &[TokenLogprob]) -> ChatLogprobs {
    ChatLogprobs {
        content: entries
            .iter()
            .map(|e| ChatTokenLogprob {
                token: token_text(&e.chosen),
                logprob: e.chosen.logprob,
                bytes: e.chosen.bytes.clone(),
                top_logprobs: e
                    .top
                    .iter()
                    .map(|t| ChatTopLogprob {
                        token: token_text(t),
                        logprob: t.logprob,
                        bytes: t.bytes.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The legacy completions' `logprobs` of some tokens whose text starts at character `offset`
/// of the completion; `offset` moves past them (for the next chunk of a stream).
pub fn text_logprobs(entries: &[TokenLogprob], offset: &mut u32) -> TextLogprobs {
    let mut out = TextLogprobs::default();
    for e in entries {
        let token = token_text(&e.chosen);
        let mut top = std::collections::BTreeMap::new();
        // Most likely first; a later token with the same text (two partial characters) keeps
        // the first's value. The chosen token is always listed, as OpenAI does.
        for t in e.top.iter().chain(std::iter::once(&e.chosen)) {
            top.entry(token_text(t)).or_insert(t.logprob);
        }
        out.text_offset.push(*offset);
        *offset = offset.saturating_add(token.chars().count() as u32);
        out.tokens.push(token);
        out.token_logprobs.push(e.chosen.logprob);
        out.top_logprobs.push(top);
    }
    out
}

/// `response_format` as an output constraint: absent or `{"type":"text"}` is free text,
/// `{"type":"json_object"}` any JSON object, `{"type":"json_schema","json_schema":{"name":..,
/// "schema":{..},"strict":..}}` JSON valid against `schema`. Output is constrained whatever
/// `strict` says (a guarantee costs nothing more than a hope).
fn response_format(v: Option<Value>) -> Result<Option<OutputConstraint>, FrontError> {
    const TYPES: &str = "one of `text`, `json_object`, `json_schema`";
    let obj = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(obj)) => obj,
        Some(other) => {
            return Err(FrontError::invalid(
                "response_format",
                format!(
                    "`response_format` must be an object such as {{\"type\": \"json_object\"}}. Given: {}",
                    echo(&other.to_string())
                ),
            ))
        }
    };
    let constraint = |grammar, field: &str| {
        Ok(Some(OutputConstraint {
            grammar,
            field: field.to_owned(),
        }))
    };
    match obj.get("type") {
        Some(Value::String(t)) if t == "text" => Ok(None),
        Some(Value::String(t)) if t == "json_object" => {
            constraint(Grammar::JsonObject, "response_format")
        }
        Some(Value::String(t)) if t == "json_schema" => {
            let field = "response_format.json_schema";
            let Some(Value::Object(spec)) = obj.get("json_schema") else {
                return Err(FrontError::invalid(
                    field,
                    format!("`{field}` (an object with `name` and `schema`) is required for type `json_schema`"),
                ));
            };
            for (key, ok) in [
                (
                    "name",
                    matches!(
                        spec.get("name"),
                        None | Some(Value::Null | Value::String(_))
                    ),
                ),
                (
                    "strict",
                    matches!(
                        spec.get("strict"),
                        None | Some(Value::Null | Value::Bool(_))
                    ),
                ),
                (
                    "description",
                    matches!(
                        spec.get("description"),
                        None | Some(Value::Null | Value::String(_))
                    ),
                ),
            ] {
                if !ok {
                    let what = if key == "strict" {
                        "a boolean"
                    } else {
                        "a string"
                    };
                    return Err(FrontError::invalid(
                        format!("{field}.{key}"),
                        format!("`{field}.{key}` must be {what}"),
                    ));
                }
            }
            match spec.get("schema") {
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => constraint(
                    Grammar::JsonSchema(schema.to_string()),
                    "response_format.json_schema.schema",
                ),
                _ => Err(FrontError::invalid(
                    "response_format.json_schema.schema",
                    "`response_format.json_schema.schema` (a JSON Schema object) is required",
                )),
            }
        }
        Some(other) => Err(FrontError::invalid(
            "response_format.type",
            format!(
                "`response_format.type` must be {TYPES}. Given: {}",
                echo(&other.to_string())
            ),
        )),
        None => Err(FrontError::invalid(
            "response_format.type",
            format!("`response_format.type` is required: {TYPES}"),
        )),
    }
}

/// OpenAI's `finish_reason`. A cancelled generation never reaches a client (it left), so it reads
/// as `stop`.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// Token counts in OpenAI's shape.
pub fn usage(c: &Completion) -> Usage {
    Usage {
        prompt_tokens: c.prompt_tokens,
        completion_tokens: c.completion_tokens,
        total_tokens: c.prompt_tokens.saturating_add(c.completion_tokens),
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: c.cached_prompt_tokens,
        },
    }
}

/// `system_fingerprint`: where the answer came from.
pub fn fingerprint(source: Source) -> &'static str {
    match source {
        Source::Model => "qnode-model",
        Source::CacheL1 => "qnode-cache-l1",
        Source::CacheL2 => "qnode-cache-l2",
        Source::CacheSemantic => "qnode-cache-semantic",
        Source::CacheVariant(n) => VARIANT_FINGERPRINTS
            .get(n as usize)
            .copied()
            .unwrap_or("qnode-cache-l2-variant"),
    }
}

/// `system_fingerprint` of sampled variant `n` (index n; 0 unused).
const VARIANT_FINGERPRINTS: [&str; 17] = [
    "qnode-cache-l2-variant",
    "qnode-cache-l2-v1",
    "qnode-cache-l2-v2",
    "qnode-cache-l2-v3",
    "qnode-cache-l2-v4",
    "qnode-cache-l2-v5",
    "qnode-cache-l2-v6",
    "qnode-cache-l2-v7",
    "qnode-cache-l2-v8",
    "qnode-cache-l2-v9",
    "qnode-cache-l2-v10",
    "qnode-cache-l2-v11",
    "qnode-cache-l2-v12",
    "qnode-cache-l2-v13",
    "qnode-cache-l2-v14",
    "qnode-cache-l2-v15",
    "qnode-cache-l2-v16",
];

#[cfg(test)]
mod tests {
    use super::*;
    fn chat_json(json: &str) -> Result<(RawRequest, Options), FrontError> {
        chat(
            serde_json::from_str::<GenerateBody>(json).expect("parses"),
            NonTextParts::Reject,
        )
    }

    #[test]
    fn unknown_fields_are_refused_naming_them() {
        let err = serde_json::from_str::<GenerateBody>(
            r#"{"model":"smollm2","messages":[],"frobnicate":true}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `frobnicate`"),
            "{err}"
        );
    }

    #[test]
    fn unknown_message_and_stream_option_fields_are_refused_naming_them() {
        for (json, field) in [
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi","name":"bob"}]}"#,
                "name",
            ),
            (
                r#"{"model":"m","messages":[{"role":"assistant","content":null,"audio":{"id":"a"}}]}"#,
                "audio",
            ),
            (
                r#"{"model":"m","messages":[],"stream_options":{"continuous_usage_stats":true}}"#,
                "continuous_usage_stats",
            ),
        ] {
            let err = serde_json::from_str::<GenerateBody>(json).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("unknown field `{field}`")),
                "{err}"
            );
        }
    }

    #[test]
    fn chat_fields_land_on_the_wire() {
        let (wire, options) = chat_json(
            r#"{"model":"smollm2","messages":[{"role":"developer","content":"Be short."},
                {"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]}],
                "max_tokens":5,"max_completion_tokens":7,"temperature":0.7,"top_p":0.9,"seed":42,
                "stop":"\n","stream":true,"stream_options":{"include_usage":true},"user":"u1",
                "n":1,"presence_penalty":0,"logit_bias":{},"tools":null}"#,
        )
        .unwrap();
        assert_eq!(wire.model, "smollm2");
        assert_eq!(wire.messages.len(), 2);
        assert_eq!(wire.messages[0].role, "system");
        assert_eq!(wire.messages[1].content, "Hi there");
        assert_eq!(wire.max_tokens, Some(7), "max_completion_tokens wins");
        assert_eq!(wire.temperature, Some(0.7));
        assert_eq!(wire.top_p, Some(0.9));
        assert_eq!(wire.seed, Some(42));
        assert_eq!(wire.stop, vec!["\n".to_owned()]);
        assert_eq!(wire.prompt, None);
        assert_eq!(
            options,
            Options {
                stream: true,
                include_usage: true,
                user: Some("u1".into()),
                dropped_parts: 0,
                logprobs: false,
                tools: false,
            }
        );
    }

    #[test]
    fn absent_and_null_fields_stay_absent() {
        let (wire, options) = chat_json(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":null,
                "stop":["a","b"],"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(
            wire.temperature,
            Some(OPENAI_DEFAULT_TEMPERATURE),
            "OpenAI's default, not greedy"
        );
        assert_eq!(wire.max_tokens, None);
        assert_eq!(wire.seed, None);
        assert_eq!(wire.stop, vec!["a".to_owned(), "b".to_owned()]);
        assert!(!options.stream);
        assert!(!options.include_usage, "usage chunks only when streaming");
    }

    #[test]
    fn n_other_than_one_is_refused_by_name() {
        let e = chat_json(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#)
            .unwrap_err();
        assert_eq!(e.kind, crate::types::ErrorKind::InvalidArgument);
        assert_eq!(e.param.as_deref(), Some("n"));
        assert!(e.message.contains("Given: 2"), "{}", e.message);
    }

    #[test]
    fn image_parts_are_refused_by_path() {
        let e = chat_json(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
    }

    #[test]
    fn non_text_parts_are_dropped_and_counted_when_configured() {
        let json = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"What is "},
            {"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"this?"}]},
            {"role":"user","content":[{"type":"input_audio"}]}]}"#;
        let body: GenerateBody = serde_json::from_str(json).unwrap();
        let (wire, options) = chat(body, NonTextParts::Drop).unwrap();
        assert_eq!(wire.messages[0].content, "What is this?");
        assert_eq!(
            wire.messages[1].content, OMITTED,
            "a picture-only turn still happened"
        );
        assert_eq!(options.dropped_parts, 2);
        let e = chat_json(json).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[1].type"));
    }

    #[test]
    fn null_content_reaches_validation_as_empty() {
        let (wire, _) =
            chat_json(r#"{"model":"m","messages":[{"role":"assistant","content":null}]}"#).unwrap();
        assert_eq!(wire.messages[0].content, "");
    }

    #[test]
    fn completion_takes_a_string_or_a_list_of_strings() {
        let parse = |prompt: &str| {
            let request: GenerateBody = serde_json::from_str(&format!(
                r#"{{"model":"m","prompt":{prompt},"max_tokens":3}}"#
            ))
            .unwrap();
            completion(request)
        };
        for prompt in [r#""Once""#, r#"["Once"]"#] {
            let (wires, _) = parse(prompt).unwrap();
            assert_eq!(wires.len(), 1);
            assert_eq!(wires[0].prompt.as_deref(), Some("Once"));
            assert!(wires[0].messages.is_empty());
            assert_eq!(wires[0].max_tokens, Some(3));
        }
        let (wires, _) = parse(r#"["a","b","c"]"#).unwrap();
        let prompts: Vec<_> = wires.iter().map(|w| w.prompt.as_deref().unwrap()).collect();
        assert_eq!(prompts, ["a", "b", "c"]);
        assert!(wires.iter().all(|w| w.max_tokens == Some(3)));
        let too_many = format!("[{}]", vec![r#""x""#; MAX_PROMPTS + 1].join(","));
        for bad in ["[]", too_many.as_str(), "[1,2,3]", "[[1,2],[3]]"] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("prompt"), "{bad}");
        }
        assert!(parse("[1,2]").unwrap_err().message.contains("token ids"));
    }

    #[test]
    fn finish_reasons_and_usage() {
        assert_eq!(finish_reason(FinishReason::Stop), "stop");
        assert_eq!(finish_reason(FinishReason::Length), "length");
        let c = Completion {
            finish_reason: FinishReason::Length,
            prompt_tokens: 4,
            completion_tokens: 6,
            cached_prompt_tokens: 3,
            timings: Default::default(),
            source: Source::CacheL1,
        };
        assert_eq!(usage(&c).total_tokens, 10);
        assert_eq!(usage(&c).prompt_tokens_details.cached_tokens, 3);
        assert_eq!(
            serde_json::to_value(usage(&c)).unwrap()["prompt_tokens_details"]["cached_tokens"],
            3,
            "OpenAI's shape"
        );
        assert_eq!(fingerprint(c.source), "qnode-cache-l1");
        assert_eq!(fingerprint(Source::CacheVariant(3)), "qnode-cache-l2-v3");
        assert_eq!(
            fingerprint(Source::CacheVariant(99)),
            "qnode-cache-l2-variant"
        );
    }

    #[test]
    fn unhonoured_openai_fields_are_refused_by_name() {
        for (extra, field) in [
            (r#""functions":[{"name":"f","parameters":{}}]"#, "functions"),
            (r#""function_call":"auto""#, "function_call"),
            (
                r#""response_format":{"type":"xml"}"#,
                "response_format.type",
            ),
            (r#""logit_bias":{"42":5}"#, "logit_bias"),
            (r#""echo":true"#, "echo"),
            (r#""suffix":"end""#, "suffix"),
            (r#""best_of":3"#, "best_of"),
            (r#""presence_penalty":0.5"#, "presence_penalty"),
            (r#""frequency_penalty":-1"#, "frequency_penalty"),
            (r#""chat_template":"{{ messages }}""#, "chat_template"),
            (r#""add_generation_prompt":false"#, "add_generation_prompt"),
            (r#""continue_final_message":true"#, "continue_final_message"),
        ] {
            let json =
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],{extra}}}"#);
            let err = chat_json(&json).expect_err(extra);
            assert_eq!(err.param.as_deref(), Some(field), "{extra}: {err:?}");
        }
        // Their "off" values are served.
        let json = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[],"tool_choice":"none","logprobs":false,"top_logprobs":0,"echo":false,"best_of":1,"response_format":{"type":"text"},"presence_penalty":0,"add_generation_prompt":true,"continue_final_message":false}"#;
        assert!(chat_json(json).is_ok());
    }

    #[test]
    fn tools_tool_choice_and_tool_turns_reach_the_neutral_request() {
        let (raw, options) = chat_json(
            r#"{"model":"m","messages":[
                {"role":"user","content":"Weather in Paris?"},
                {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
                  "function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
                {"role":"tool","tool_call_id":"call_1","content":"sunny"}],
              "tools":[{"type":"function","function":{"name":"get_weather","description":"d",
                "parameters":{"type":"object","properties":{"city":{"type":"string"}}},"strict":true}},
                {"type":"function","function":{"name":"now"}}],
              "tool_choice":{"type":"function","function":{"name":"get_weather"}},
              "parallel_tool_calls":false}"#,
        )
        .unwrap();
        assert!(options.tools);
        assert_eq!(
            raw.tool_choice,
            Some(WireToolChoice::Function("get_weather".into()))
        );
        assert_eq!(raw.tools.len(), 2);
        assert_eq!(raw.tools[0].description.as_deref(), Some("d"));
        assert_eq!(
            raw.tools[0].parameters,
            r#"{"type":"object","properties":{"city":{"type":"string"}}}"#
        );
        assert_eq!(
            raw.tools[1].parameters,
            r#"{"type":"object","properties":{}}"#
        );
        assert_eq!(raw.messages[1].content, "");
        assert_eq!(
            raw.messages[1].tool_calls,
            vec![ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            }]
        );
        assert_eq!(raw.messages[2].tool_call_id.as_deref(), Some("call_1"));
        for (choice, want) in [
            (r#""none""#, Some(WireToolChoice::None)),
            (r#""auto""#, Some(WireToolChoice::Auto)),
            (r#""required""#, Some(WireToolChoice::Required)),
            ("null", None),
        ] {
            let (raw, options) = chat_json(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"tools":[{{"type":"function","function":{{"name":"f"}}}}],"tool_choice":{choice}}}"#
            ))
            .unwrap();
            assert_eq!(raw.tool_choice, want, "{choice}");
            assert_eq!(
                options.tools,
                want != Some(WireToolChoice::None),
                "{choice}"
            );
        }
    }

    #[test]
    fn malformed_tools_are_refused_naming_the_field() {
        for (extra, field) in [
            (r#""tools":{"type":"function"}"#, "tools"),
            (
                r#""tools":[{"type":"retrieval","function":{"name":"f"}}]"#,
                "tools[0].type",
            ),
            (r#""tools":[{"function":{"name":"f"}}]"#, "tools[0].type"),
            (r#""tools":[{"type":"function"}]"#, "tools[0].function"),
            (
                r#""tools":[{"type":"function","function":{"name":"f","examples":[]}}]"#,
                "tools[0].function.examples",
            ),
            (
                r#""tools":[{"type":"function","function":{"name":7}}]"#,
                "tools[0].function.name",
            ),
            (
                r#""tools":[{"type":"function","function":{"name":"f","strict":"yes"}}]"#,
                "tools[0].function.strict",
            ),
            (
                r#""tools":[{"type":"function","function":{"name":"f"},"cache":true}]"#,
                "tools[0].cache",
            ),
            (r#""tool_choice":"any""#, "tool_choice"),
            (
                r#""tool_choice":{"type":"function"}"#,
                "tool_choice.function",
            ),
            (
                r#""tool_choice":{"type":"function","function":{}}"#,
                "tool_choice.function.name",
            ),
        ] {
            let json =
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],{extra}}}"#);
            let err = chat_json(&json).expect_err(extra);
            assert_eq!(err.param.as_deref(), Some(field), "{extra}: {err:?}");
        }
        for (message, field) in [
            (
                r#"{"role":"assistant","tool_calls":{}}"#,
                "messages[0].tool_calls",
            ),
            (
                r#"{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":[1]}}]}"#,
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                r#"{"role":"assistant","tool_calls":[{"id":"c","function":{"name":"f"}}]}"#,
                "messages[0].tool_calls[0].type",
            ),
        ] {
            let json = format!(r#"{{"model":"m","messages":[{message}]}}"#);
            let err = chat_json(&json).expect_err(message);
            assert_eq!(err.param.as_deref(), Some(field), "{message}: {err:?}");
        }
        // Legacy completions have no tools.
        let e = completion(
            serde_json::from_str(
                r#"{"model":"m","prompt":"x","tools":[{"type":"function","function":{"name":"f"}}]}"#,
            )
            .unwrap(),
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools"));
    }

    #[test]
    fn a_tool_answer_is_a_call_or_text() {
        let (content, calls, finish) = answer(
            r#"{"tool_call": {"name": "f", "arguments": {"x": 1}}}"#,
            FinishReason::Stop,
        );
        assert_eq!(content, None);
        assert_eq!(finish, "tool_calls");
        let calls = calls.unwrap();
        let json = serde_json::to_value(&calls).unwrap();
        assert_eq!(json[0]["type"], "function");
        assert_eq!(json[0]["function"]["name"], "f");
        assert_eq!(json[0]["function"]["arguments"], r#"{"x":1}"#);
        assert!(json[0].get("index").is_none(), "index is for chunks");
        assert_eq!(
            answer(r#"{"response": "Hi"}"#, FinishReason::Stop),
            (Some("Hi".into()), None, "stop")
        );
        assert_eq!(
            answer(r#"{"response": "Hi"#, FinishReason::Length),
            (Some("Hi".into()), None, "length"),
            "text cut by max_tokens"
        );
        assert_eq!(
            answer(r#"{"tool_call": {"na"#, FinishReason::Length),
            (Some(r#"{"tool_call": {"na"#.into()), None, "length"),
            "a cut call is returned raw"
        );
    }

    #[test]
    fn logprobs_fields_reach_the_neutral_request() {
        let (raw, options) = chat_json(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"logprobs":true,"top_logprobs":4}"#,
        )
        .unwrap();
        assert_eq!((raw.logprobs, raw.top_logprobs), (Some(true), Some(4)));
        assert_eq!(raw.top_logprobs_field, "top_logprobs");
        assert!(options.logprobs);
        // Ranges are `validate`'s: a large count passes through to be refused there.
        let (raw, _) = chat_json(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"top_logprobs":99}"#,
        )
        .unwrap();
        assert_eq!((raw.logprobs, raw.top_logprobs), (None, Some(99)));
        for (extra, field) in [
            (r#""logprobs":3"#, "logprobs"),
            (r#""top_logprobs":-1"#, "top_logprobs"),
            (r#""top_logprobs":"3""#, "top_logprobs"),
        ] {
            let json =
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],{extra}}}"#);
            let err = chat_json(&json).expect_err(extra);
            assert_eq!(err.param.as_deref(), Some(field), "{extra}: {err:?}");
        }
        // Legacy completions: `logprobs` is the count, and names its own errors.
        let legacy = |extra: &str| {
            completion(
                serde_json::from_str(&format!(r#"{{"model":"m","prompt":"x",{extra}}}"#)).unwrap(),
            )
        };
        let (raws, options) = legacy(r#""logprobs":2"#).unwrap();
        assert_eq!(
            (raws[0].logprobs, raws[0].top_logprobs),
            (Some(true), Some(2))
        );
        assert_eq!(raws[0].top_logprobs_field, "logprobs");
        assert!(options.logprobs);
        let (raws, options) = legacy(r#""logprobs":null"#).unwrap();
        assert_eq!(raws[0].logprobs, None);
        assert!(!options.logprobs);
        for extra in [r#""logprobs":true"#, r#""top_logprobs":2"#] {
            assert!(legacy(extra).is_err(), "{extra}");
        }
    }

    #[test]
    fn logprobs_in_both_openai_shapes() {
        let prob = |id: u32, bytes: &[u8], logprob: f32| TokenProb {
            id,
            bytes: bytes.to_vec(),
            logprob,
        };
        let entries = vec![
            TokenLogprob {
                chosen: prob(1, b" Pa", -0.5),
                top: vec![prob(1, b" Pa", -0.5), prob(2, b" Lo", -1.5)],
            },
            TokenLogprob {
                chosen: prob(3, &[0xC3], -0.25),
                top: vec![prob(4, b"ris", -0.125)],
            },
        ];
        let chat = serde_json::to_value(chat_logprobs(&entries)).unwrap();
        assert_eq!(chat["content"][0]["token"], " Pa");
        assert_eq!(chat["content"][0]["bytes"], serde_json::json!([32, 80, 97]));
        assert_eq!(chat["content"][0]["top_logprobs"][1]["token"], " Lo");
        assert_eq!(
            chat["content"][1]["token"], "\u{FFFD}",
            "part of a character"
        );
        let mut offset = 0;
        let text = serde_json::to_value(text_logprobs(&entries, &mut offset)).unwrap();
        assert_eq!(text["tokens"], serde_json::json!([" Pa", "\u{FFFD}"]));
        assert_eq!(text["token_logprobs"], serde_json::json!([-0.5, -0.25]));
        assert_eq!(text["text_offset"], serde_json::json!([0, 3]));
        assert_eq!(offset, 4, "the next chunk continues");
        // The chosen token is always among the alternatives.
        assert_eq!(
            text["top_logprobs"][1],
            serde_json::json!({"ris": -0.125, "\u{FFFD}": -0.25})
        );
    }

    #[test]
    fn response_format_becomes_an_output_constraint() {
        let with = |format: &str| {
            chat_json(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"response_format":{format}}}"#
            ))
        };
        assert_eq!(with(r#"{"type":"text"}"#).unwrap().0.constraint, None);
        assert_eq!(with("null").unwrap().0.constraint, None);
        assert_eq!(
            with(r#"{"type":"json_object"}"#).unwrap().0.constraint,
            Some(OutputConstraint {
                grammar: Grammar::JsonObject,
                field: "response_format".into()
            })
        );
        let schema = r#"{"type":"json_schema","json_schema":{"name":"p","strict":true,"schema":{"type":"object","properties":{"a":{"type":"integer"}}}}}"#;
        assert_eq!(
            with(schema).unwrap().0.constraint,
            Some(OutputConstraint {
                grammar: Grammar::JsonSchema(
                    r#"{"type":"object","properties":{"a":{"type":"integer"}}}"#.into()
                ),
                field: "response_format.json_schema.schema".into()
            })
        );
        for (format, param) in [
            (r#""json_object""#, "response_format"),
            (r#"{"kind":"json_object"}"#, "response_format.type"),
            (r#"{"type":"json_schema"}"#, "response_format.json_schema"),
            (
                r#"{"type":"json_schema","json_schema":{"name":"p"}}"#,
                "response_format.json_schema.schema",
            ),
            (
                r#"{"type":"json_schema","json_schema":{"schema":"{}"}}"#,
                "response_format.json_schema.schema",
            ),
            (
                r#"{"type":"json_schema","json_schema":{"strict":"yes","schema":{}}}"#,
                "response_format.json_schema.strict",
            ),
        ] {
            let err = with(format).expect_err(format);
            assert_eq!(err.param.as_deref(), Some(param), "{format}: {err:?}");
        }
    }

    #[test]
    fn chat_template_kwargs_reach_the_request_as_scalars() {
        let (wire, _) = chat_json(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],
                "chat_template_kwargs":{"enable_thinking":false,"n":3,"x":0.5,"s":"t"}}"#,
        )
        .unwrap();
        let want: TemplateKwargs = [
            ("enable_thinking", TemplateValue::Bool(false)),
            ("n", TemplateValue::Int(3)),
            ("x", TemplateValue::Float(0.5)),
            ("s", TemplateValue::Str("t".into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(wire.chat_template_kwargs, want);
        for absent in [
            "",
            r#","chat_template_kwargs":null"#,
            r#","chat_template_kwargs":{}"#,
        ] {
            let (wire, _) = chat_json(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{absent}}}"#
            ))
            .unwrap();
            assert!(wire.chat_template_kwargs.is_empty(), "{absent}");
        }
        for (kwargs, param, says) in [
            ("true", "chat_template_kwargs", "must be an object"),
            (
                r#""enable_thinking""#,
                "chat_template_kwargs",
                "must be an object",
            ),
            (r#"[1]"#, "chat_template_kwargs", "must be an object"),
            (
                r#"{"a":{"b":1}}"#,
                "chat_template_kwargs.a",
                "a nested object",
            ),
            (r#"{"a":[1]}"#, "chat_template_kwargs.a", "an array"),
            (r#"{"a":null}"#, "chat_template_kwargs.a", "null"),
        ] {
            let e = chat_json(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"chat_template_kwargs":{kwargs}}}"#
            ))
            .unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{kwargs}");
            assert!(e.message.contains(says), "{kwargs}: {}", e.message);
        }
    }

    #[test]
    fn vllm_style_sampling_fields_and_cache_policy_reach_the_request() {
        let json = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"top_k":5,"min_p":0.1,"repetition_penalty":1.2,"cache_policy":"bypass"}"#;
        let (raw, _) = chat_json(json).unwrap();
        assert_eq!(
            (raw.top_k, raw.min_p, raw.repetition_penalty),
            (Some(5), Some(0.1), Some(1.2))
        );
        assert_eq!(raw.cache_policy, Ok(CachePolicy::Bypass));
        let json =
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"cache_policy":"x"}"#;
        assert_eq!(chat_json(json).unwrap().0.cache_policy, Err("x".to_owned()));
    }
}
