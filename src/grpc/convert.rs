//! Wire ⇄ the crate's types: requests into the front's neutral [`RawRequest`], results back
//! into proto messages. Only this front knows the gRPC wire.

use super::proto;
use crate::front::{self, RawRequest, WireToolChoice};
use crate::node::NodeState;
use crate::types::{
    CachePolicy, ChatMessage, Completion, FinishReason, Grammar, ModelInfo, ModelState,
    OutputConstraint, Role, Source, TemplateKwargs, TemplateValue, Timings, TokenLogprob, Tool,
    ToolCall,
};

/// A wire request as the front's neutral request, and the caller's `request_id` (`None` when
/// empty). Nothing is checked here: `front::validate` does that for both fronts.
pub(crate) fn request(wire: proto::GenerateRequest) -> (RawRequest, Option<String>) {
    let cache_policy = match proto::CachePolicy::try_from(wire.cache_policy) {
        Ok(proto::CachePolicy::Default) => Ok(CachePolicy::Default),
        Ok(proto::CachePolicy::Bypass) => Ok(CachePolicy::Bypass),
        Ok(proto::CachePolicy::Refresh) => Ok(CachePolicy::Refresh),
        Ok(proto::CachePolicy::OnlyIfCached) => Ok(CachePolicy::OnlyIfCached),
        Err(_) => Err(wire.cache_policy.to_string()),
    };
    let request_id = Some(wire.request_id).filter(|id| !id.is_empty());
    let raw = RawRequest {
        model: wire.model,
        prompt: wire.prompt,
        messages: wire
            .messages
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
                tool_calls: m
                    .tool_calls
                    .into_iter()
                    .map(|c| ToolCall {
                        id: c.id,
                        name: c.name,
                        arguments: c.arguments,
                    })
                    .collect(),
                tool_call_id: Some(m.tool_call_id).filter(|id| !id.is_empty()),
            })
            .collect(),
        max_tokens: wire.max_tokens,
        temperature: wire.temperature,
        top_p: wire.top_p,
        top_k: wire.top_k,
        min_p: wire.min_p,
        repetition_penalty: wire.repetition_penalty,
        seed: wire.seed,
        stop: wire.stop,
        cache_policy,
        session_id: Some(wire.session_id).filter(|s| !s.is_empty()),
        user: None,
        constraint: wire.constraint.and_then(constraint),
        logprobs: Some(wire.logprobs),
        top_logprobs: wire.top_logprobs,
        chat_template_kwargs: template_kwargs(wire.chat_template_kwargs),
        tools: wire
            .tools
            .into_iter()
            .map(|t| Tool {
                name: t.name,
                description: Some(t.description).filter(|d| !d.is_empty()),
                parameters: if t.parameters.is_empty() {
                    r#"{"type":"object","properties":{}}"#.to_owned()
                } else {
                    t.parameters
                },
            })
            .collect(),
        tool_choice: tool_choice(&wire.tool_choice, wire.tool_choice_function),
        ..RawRequest::default()
    };
    (raw, request_id)
}

/// `tool_choice` and `tool_choice_function` as one choice: a function with an empty or
/// `required` mode is that function; a function with another mode, like an unknown mode, is
/// refused by validation naming `tool_choice`.
fn tool_choice(mode: &str, function: String) -> Option<WireToolChoice> {
    match (mode, function.is_empty()) {
        ("", true) => None,
        ("" | "required", false) => Some(WireToolChoice::Function(function)),
        ("auto", true) => Some(WireToolChoice::Auto),
        ("none", true) => Some(WireToolChoice::None),
        ("required", true) => Some(WireToolChoice::Required),
        (mode, false) => Some(WireToolChoice::Invalid(format!(
            "{mode} (with tool_choice_function {function}: leave tool_choice empty or `required`)"
        ))),
        (mode, true) => Some(WireToolChoice::Invalid(mode.to_owned())),
    }
}

/// The output of a request with tools: its text (empty for a call), its calls, and the finish
/// reason (TOOL_CALLS for a call); output that is not the tool format stays text.
pub(crate) fn tool_answer(
    text: &str,
    finish: FinishReason,
) -> (String, Vec<proto::ToolCall>, proto::FinishReason) {
    match crate::tools::parse(text) {
        crate::tools::Output::Call(c) => (
            String::new(),
            vec![proto::ToolCall {
                id: c.id,
                name: c.name,
                arguments: c.arguments,
            }],
            proto::FinishReason::ToolCalls,
        ),
        crate::tools::Output::Text(t) | crate::tools::Output::Raw(t) => {
            (t, Vec::new(), finish_reason(finish))
        }
    }
}

/// `chat_template_kwargs` (string values on this wire): `"true"` / `"false"` are booleans, an
/// integer a number, anything else a string, as the proto documents.
fn template_kwargs(wire: std::collections::HashMap<String, String>) -> TemplateKwargs {
    wire.into_iter()
        .map(|(key, value)| {
            let value = match value.as_str() {
                "true" => TemplateValue::Bool(true),
                "false" => TemplateValue::Bool(false),
                text => match text.parse::<i64>() {
                    Ok(i) => TemplateValue::Int(i),
                    Err(_) => TemplateValue::Str(value),
                },
            };
            (key, value)
        })
        .collect()
}

/// The `constraint` oneof as the neutral constraint; `json_object: false` is free text.
fn constraint(c: proto::generate_request::Constraint) -> Option<OutputConstraint> {
    use proto::generate_request::Constraint as C;
    let (grammar, field) = match c {
        C::JsonSchema(schema) => (Grammar::JsonSchema(schema), "json_schema"),
        C::JsonObject(false) => return None,
        C::JsonObject(true) => (Grammar::JsonObject, "json_object"),
        C::Regex(rx) => (Grammar::Regex(rx), "regex"),
        C::Lark(grammar) => (Grammar::Lark(grammar), "lark"),
    };
    Some(OutputConstraint {
        grammar,
        field: field.to_owned(),
    })
}

pub(crate) fn finish_reason(reason: FinishReason) -> proto::FinishReason {
    match reason {
        FinishReason::Stop => proto::FinishReason::Stop,
        FinishReason::Length => proto::FinishReason::Length,
        FinishReason::Cancelled => proto::FinishReason::Cancelled,
    }
}

pub(crate) fn cache_level(source: Source) -> proto::CacheLevel {
    match source {
        Source::Model => proto::CacheLevel::None,
        Source::CacheL1 => proto::CacheLevel::L1,
        Source::CacheL2 | Source::CacheVariant(_) => proto::CacheLevel::L2,
        Source::CacheSemantic => proto::CacheLevel::Semantic,
    }
}

/// `cache_variant`: which sampled answer of a hot question was served, 0 for none.
pub(crate) fn cache_variant(source: Source) -> u32 {
    match source {
        Source::CacheVariant(n) => n,
        _ => 0,
    }
}

pub(crate) fn usage(completion: &Completion) -> proto::Usage {
    proto::Usage {
        prompt_tokens: completion.prompt_tokens,
        completion_tokens: completion.completion_tokens,
        cached_prompt_tokens: completion.cached_prompt_tokens,
    }
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

pub(crate) fn timings(t: &Timings) -> proto::Timings {
    proto::Timings {
        queue_us: micros(t.queue),
        time_to_first_token_us: micros(t.time_to_first_token),
        total_us: micros(t.total),
    }
}

pub(crate) fn model_info(m: &ModelInfo) -> proto::ModelInfo {
    proto::ModelInfo {
        id: m.id.clone(),
        architecture: m.architecture.clone(),
        quant_type: m.quant.clone(),
        context_length: m.context_length,
        instances: m.instances,
        state: match m.state {
            ModelState::Loading => proto::ModelState::Loading,
            ModelState::Warming => proto::ModelState::Warming,
            ModelState::Ready => proto::ModelState::Ready,
            ModelState::Failed => proto::ModelState::Failed,
        } as i32,
        template_options: m.template_options.clone(),
    }
}

pub(crate) fn node_state(s: NodeState) -> proto::NodeState {
    match s {
        NodeState::Loading => proto::NodeState::Loading,
        NodeState::Warming => proto::NodeState::Warming,
        NodeState::Ready => proto::NodeState::Ready,
        NodeState::Standby => proto::NodeState::Standby,
        NodeState::Draining => proto::NodeState::Draining,
    }
}

pub(crate) fn role(r: Role) -> proto::NodeRole {
    match r {
        Role::Active => proto::NodeRole::Active,
        Role::Standby => proto::NodeRole::Standby,
    }
}

/// Log-probabilities in the wire's shape.
pub(crate) fn logprobs(entries: &[TokenLogprob]) -> Vec<proto::TokenLogprob> {
    entries
        .iter()
        .map(|e| proto::TokenLogprob {
            token_id: e.chosen.id,
            token: e.chosen.bytes.clone(),
            logprob: e.chosen.logprob,
            top_logprobs: e
                .top
                .iter()
                .map(|t| proto::TopLogprob {
                    token_id: t.id,
                    token: t.bytes.clone(),
                    logprob: t.logprob,
                })
                .collect(),
        })
        .collect()
}

/// The response of a finished unary call; `tools`: the request had tools (its text is read as
/// a call or an answer).
pub(crate) fn response(
    answer: front::Answer,
    request_id: String,
    tools: bool,
) -> proto::GenerateResponse {
    let completion = &answer.completion;
    let (text, tool_calls, finish) = if tools {
        tool_answer(&answer.text, completion.finish_reason)
    } else {
        (
            answer.text,
            Vec::new(),
            finish_reason(completion.finish_reason),
        )
    };
    proto::GenerateResponse {
        text,
        tool_calls,
        logprobs: logprobs(&answer.logprobs),
        finish_reason: finish as i32,
        usage: Some(usage(completion)),
        timings: Some(timings(&completion.timings)),
        cache_level: cache_level(completion.source) as i32,
        cache_variant: cache_variant(completion.source),
        request_id,
    }
}

/// The last chunk of a stream.
pub(crate) fn last_chunk(completion: &Completion, request_id: String) -> proto::GenerateChunk {
    proto::GenerateChunk {
        text: String::new(),
        finish_reason: Some(finish_reason(completion.finish_reason) as i32),
        usage: Some(usage(completion)),
        timings: Some(timings(&completion.timings)),
        cache_level: cache_level(completion.source) as i32,
        cache_variant: cache_variant(completion.source),
        request_id,
        logprobs: Vec::new(),
        tool_calls: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_field_reaches_the_neutral_request() {
        let (raw, id) = request(proto::GenerateRequest {
            model: "m".into(),
            messages: vec![proto::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            }],
            max_tokens: Some(3),
            temperature: Some(0.5),
            top_p: Some(0.9),
            top_k: Some(7),
            min_p: Some(0.1),
            repetition_penalty: Some(1.1),
            seed: Some(0),
            stop: vec!["x".into()],
            cache_policy: proto::CachePolicy::Refresh as i32,
            request_id: "r-1".into(),
            session_id: "s-1".into(),
            logprobs: true,
            top_logprobs: Some(4),
            ..Default::default()
        });
        assert_eq!((raw.logprobs, raw.top_logprobs), (Some(true), Some(4)));
        assert_eq!(id.as_deref(), Some("r-1"));
        assert_eq!(raw.session_id.as_deref(), Some("s-1"));
        assert_eq!(raw.messages[0].content, "hi");
        assert_eq!(
            (raw.max_tokens, raw.top_k, raw.seed),
            (Some(3), Some(7), Some(0))
        );
        assert_eq!(raw.cache_policy, Ok(CachePolicy::Refresh));
        let (raw, id) = request(proto::GenerateRequest {
            cache_policy: 9,
            ..Default::default()
        });
        assert_eq!(id, None);
        assert_eq!(raw.cache_policy, Err("9".into()));
    }

    #[test]
    fn chat_template_kwargs_strings_become_booleans_integers_or_strings() {
        let (raw, _) = request(proto::GenerateRequest {
            chat_template_kwargs: [
                ("enable_thinking", "false"),
                ("b", "true"),
                ("n", "-3"),
                ("x", "0.5"),
                ("s", "True"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            ..Default::default()
        });
        let want: TemplateKwargs = [
            ("enable_thinking", TemplateValue::Bool(false)),
            ("b", TemplateValue::Bool(true)),
            ("n", TemplateValue::Int(-3)),
            ("x", TemplateValue::Str("0.5".into())),
            ("s", TemplateValue::Str("True".into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(raw.chat_template_kwargs, want);
    }

    #[test]
    fn tools_choices_and_tool_turns_reach_the_neutral_request() {
        let wire = |choice: &str, function: &str| proto::GenerateRequest {
            model: "m".into(),
            messages: vec![
                proto::ChatMessage {
                    role: "assistant".into(),
                    tool_calls: vec![proto::ToolCall {
                        id: "call_1".into(),
                        name: "f".into(),
                        arguments: "{}".into(),
                    }],
                    ..Default::default()
                },
                proto::ChatMessage {
                    role: "tool".into(),
                    content: "r".into(),
                    tool_call_id: "call_1".into(),
                    ..Default::default()
                },
            ],
            tools: vec![
                proto::Tool {
                    name: "f".into(),
                    description: String::new(),
                    parameters: String::new(),
                },
                proto::Tool {
                    name: "g".into(),
                    description: "d".into(),
                    parameters: r#"{"type":"object"}"#.into(),
                },
            ],
            tool_choice: choice.into(),
            tool_choice_function: function.into(),
            ..Default::default()
        };
        let (raw, _) = request(wire("", ""));
        assert_eq!(raw.tool_choice, None);
        assert_eq!(
            raw.tools,
            vec![
                Tool {
                    name: "f".into(),
                    description: None,
                    parameters: r#"{"type":"object","properties":{}}"#.into(),
                },
                Tool {
                    name: "g".into(),
                    description: Some("d".into()),
                    parameters: r#"{"type":"object"}"#.into(),
                },
            ]
        );
        assert_eq!(raw.messages[0].tool_calls[0].name, "f");
        assert_eq!(raw.messages[0].tool_call_id, None);
        assert_eq!(raw.messages[1].tool_call_id.as_deref(), Some("call_1"));
        for (choice, function, want) in [
            ("auto", "", WireToolChoice::Auto),
            ("none", "", WireToolChoice::None),
            ("required", "", WireToolChoice::Required),
            ("", "g", WireToolChoice::Function("g".into())),
            ("required", "g", WireToolChoice::Function("g".into())),
        ] {
            assert_eq!(request(wire(choice, function)).0.tool_choice, Some(want));
        }
        for (choice, function) in [("any", ""), ("none", "g"), ("auto", "g"), ("AUTO", "")] {
            assert!(
                matches!(
                    request(wire(choice, function)).0.tool_choice,
                    Some(WireToolChoice::Invalid(_))
                ),
                "{choice} {function}"
            );
        }
    }

    #[test]
    fn a_tool_answer_is_a_call_or_text_on_the_wire() {
        let (text, calls, finish) = tool_answer(
            r#"{"tool_call": {"name": "f", "arguments": {"x": 1}}}"#,
            FinishReason::Stop,
        );
        assert_eq!(
            (text.as_str(), finish),
            ("", proto::FinishReason::ToolCalls)
        );
        assert_eq!(
            (calls[0].name.as_str(), calls[0].arguments.as_str()),
            ("f", r#"{"x":1}"#)
        );
        assert!(calls[0].id.starts_with("call_"));
        let (text, calls, finish) = tool_answer(r#"{"response": "Hi"}"#, FinishReason::Stop);
        assert_eq!(
            (text.as_str(), calls.len(), finish),
            ("Hi", 0, proto::FinishReason::Stop)
        );
    }
}
