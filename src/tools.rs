//! Tool calling: the one output format a request with tools is held to, the JSON Schema that holds
//! it there, the prompt that tells the model about its tools, and the parser that turns the output
//! back into calls. Defined once here, so the schema, the prompt and the parser cannot drift.
//!
//! # The format
//! The model answers with one JSON object, on one line:
//! - a call: `{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}`;
//! - with `tool_choice: auto` only, text instead: `{"response": "It is sunny."}`.
//!
//! This is llama.cpp's generic tool format (`common/chat.cpp`, one call per turn). It suits a
//! 135M model because the choice between calling and answering is made once, at the first key,
//! right after the prompt told it so, and everything after is held to a schema: the `name` is one
//! of the declared functions (a `const` per function, so `arguments` follow that function's own
//! schema), and nothing the model writes can fail to parse. A free-text-or-JSON grammar would let a
//! small model drift into prose that announces a call without making it, and text starting with
//! `{` would be ambiguous. The cost: `auto` text is a JSON string, decoded as it grows
//! ([`StreamReader`]) so that it still streams.
//!
//! `required` and a named function allow the `tool_call` object only (a named function: that one
//! function). `none` has no tools at all (see [`Tools`]). Objects in the arguments take only the
//! properties they declare unless their schema sets `additionalProperties` (see
//! `close_objects`).
//!
//! # The prompt
//! When the model's chat template reads `tools`, it renders them itself (as transformers passes
//! them); otherwise [`polyfill`] writes them into the system turn the way llama.cpp's template
//! polyfills do (tool list, an example call), turns earlier assistant calls into the format above
//! and `tool` results into user turns (`{"tool_response": ...}`). Either way one line asking for
//! the format is added to the system turn, because the output is held to it whatever the template
//! describes.

use serde_json::{json, Map, Value};

use crate::types::{ChatMessage, ToolCall, ToolChoice, Tools};

/// Added to the system turn when the model may answer or call (`auto`).
pub const INSTRUCTION_AUTO: &str = "Respond in JSON format, either with `tool_call` (a request to \
     call tools) or with `response` reply to the user's request";

/// Added to the system turn when the model must call (`required`, a named function).
pub const INSTRUCTION_CALL: &str =
    "Respond in JSON format with `tool_call` (a request to call one of the tools)";

/// The JSON Schema of the output of a request with `tools` (see the module's doc), as JSON text.
pub fn schema(tools: &Tools) -> String {
    let functions: Vec<Value> = tools
        .tools
        .iter()
        .filter(|t| match &tools.choice {
            ToolChoice::Function(name) => &t.name == name,
            ToolChoice::Auto | ToolChoice::Required => true,
        })
        .map(|t| {
            let mut parameters: Value =
                serde_json::from_str(&t.parameters).unwrap_or_else(|_| json!({"type": "object"}));
            close_objects(&mut parameters);
            // `name` first: the function is chosen before its arguments are written.
            json!({
                "type": "object",
                "properties": {
                    "name": {"const": t.name},
                    "arguments": parameters,
                },
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let call = match <[Value; 1]>::try_from(functions) {
        Ok([one]) => one,
        Err(many) => json!({"anyOf": many}),
    };
    let call = json!({
        "type": "object",
        "properties": {"tool_call": call},
        "required": ["tool_call"],
        "additionalProperties": false,
    });
    let schema = match tools.choice {
        ToolChoice::Auto => json!({"anyOf": [
            call,
            {
                "type": "object",
                "properties": {"response": {"type": "string"}},
                "required": ["response"],
                "additionalProperties": false,
            },
        ]}),
        ToolChoice::Required | ToolChoice::Function(_) => call,
    };
    schema.to_string()
}

/// Objects of a tool's arguments take only the properties they declare unless the schema says
/// otherwise (`additionalProperties` set): JSON Schema's default (any extra key) lets a small model
/// invent keys until `max_tokens` cuts the call (LangChain's schemas from pydantic models leave it
/// unset), and a function cannot take keys it does not declare. OpenAI's `strict` mode asks the
/// same of schemas. The arguments still validate against the caller's schema.
fn close_objects(schema: &mut Value) {
    let Value::Object(o) = schema else { return };
    let is_object = o.contains_key("properties") || o.get("type") == Some(&json!("object"));
    if is_object && !o.contains_key("additionalProperties") {
        o.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (key, value) in o.iter_mut() {
        match (key.as_str(), value) {
            ("properties" | "$defs" | "definitions" | "patternProperties", Value::Object(m)) => {
                m.values_mut().for_each(close_objects)
            }
            ("items" | "additionalProperties" | "not", v @ Value::Object(_)) => close_objects(v),
            ("anyOf" | "oneOf" | "allOf" | "prefixItems" | "items", Value::Array(a)) => {
                a.iter_mut().for_each(close_objects)
            }
            _ => {}
        }
    }
}

/// The system-turn line asking for the format.
pub fn instruction(tools: &Tools) -> &'static str {
    match tools.choice {
        ToolChoice::Auto => INSTRUCTION_AUTO,
        ToolChoice::Required | ToolChoice::Function(_) => INSTRUCTION_CALL,
    }
}

/// `text` added to the system turn: appended to a first `system` message after a blank line, or
/// a new first `system` message (llama.cpp's `add_system`).
pub fn add_system(messages: &[ChatMessage], text: &str) -> Vec<ChatMessage> {
    let mut out = messages.to_vec();
    match out.first_mut() {
        Some(first) if first.role == "system" => {
            first.content = format!("{}\n\n{text}", first.content);
        }
        _ => out.insert(0, ChatMessage::text("system", text)),
    }
    out
}

/// An earlier assistant turn's calls as the model writes them: one call in the format above,
/// several as `{"tool_calls": [...]}`; its text, when it had some, before them on its own line.
fn calls_as_text(m: &ChatMessage) -> String {
    let call = |c: &ToolCall| {
        let arguments = serde_json::from_str::<Value>(&c.arguments)
            .unwrap_or(Value::String(c.arguments.clone()));
        json!({"name": c.name, "arguments": arguments})
    };
    let calls = match m.tool_calls.as_slice() {
        [one] => json!({"tool_call": call(one)}),
        many => json!({"tool_calls": many.iter().map(call).collect::<Vec<_>>()}),
    };
    let calls = format_json(&calls);
    if m.content.is_empty() {
        calls
    } else {
        format!("{}\n{calls}", m.content)
    }
}

/// JSON on one line with the separators the constrained output uses (`{"a": 1, "b": [2]}`), so
/// earlier calls in the prompt look like the model's own.
fn format_json(v: &Value) -> String {
    match v {
        Value::Object(o) => {
            let items: Vec<String> = o
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), format_json(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(format_json).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// The conversation for a template that does not read `tools` (see the module's doc): the tools
/// (when given) and the format line in the system turn, earlier calls as text, `tool` turns as
/// user turns. Messages without tool parts pass unchanged.
pub fn polyfill(messages: &[ChatMessage], tools: Option<&Tools>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = messages
        .iter()
        .map(|m| {
            if !m.tool_calls.is_empty() {
                ChatMessage::text(m.role.clone(), calls_as_text(m))
            } else if m.role == "tool" {
                let mut response = Map::new();
                if let Some(id) = &m.tool_call_id {
                    response.insert("tool_call_id".into(), id.clone().into());
                }
                response.insert("content".into(), m.content.clone().into());
                let text = format_json(&json!({"tool_response": response}));
                ChatMessage::text("user", text)
            } else {
                m.clone()
            }
        })
        .collect();
    if let Some(tools) = tools {
        let list: Vec<String> = tools
            .tools
            .iter()
            .map(|t| format_json(&serde_json::to_value(t).unwrap_or(Value::Null)))
            .collect();
        let example = match tools.tools.first() {
            Some(t) => format!(
                r#"{{"tool_call": {{"name": "{}", "arguments": {{...}}}}}}"#,
                t.name
            ),
            None => String::new(),
        };
        let text = format!(
            "You can call any of the following tools to satisfy the user's requests:\n{}\n\n\
             Example tool call syntax:\n\n{example}\n\n{}",
            list.join("\n"),
            instruction(tools)
        );
        out = add_system(&out, &text);
    }
    out
}

/// Reads a tool answer as it is generated, so that text is streamed as it is written: once the
/// output is known to be `{"response": "...`, each [`StreamReader::push`] returns the text
/// decoded so far (escapes decoded, one cut in half held back); a call is held back whole (it is
/// read at the end with [`parse`]).
#[derive(Debug, Default)]
pub struct StreamReader {
    raw: String,
    /// Byte offset in `raw` of the first undecoded character of a text answer; `None` until the
    /// output is known to be one.
    text_at: Option<usize>,
    /// The output is known not to be text (a call).
    held: bool,
    /// The string has ended (its closing quote was read).
    closed: bool,
    /// Bytes of text returned so far.
    emitted: usize,
}

impl StreamReader {
    /// Takes more output; returns the text for the user that is now known (empty when none, and
    /// always for a call).
    pub fn push(&mut self, delta: &str) -> String {
        self.raw.push_str(delta);
        if self.held || self.closed {
            return String::new();
        }
        let at = match self.text_at {
            Some(at) => at,
            None if self.raw.starts_with(RESPONSE_OPEN) => RESPONSE_OPEN.len(),
            None if RESPONSE_OPEN.starts_with(self.raw.as_str()) => return String::new(),
            None => {
                self.held = true;
                return String::new();
            }
        };
        let (text, next, closed) = decode_string(&self.raw[at..]);
        self.text_at = Some(at + next);
        self.closed = closed;
        self.emitted += text.len();
        text
    }

    /// Whether the output is a text answer being streamed.
    pub fn is_text(&self) -> bool {
        self.text_at.is_some()
    }

    /// The whole output so far.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// What of `content` (the answer read whole at the end) was not returned yet.
    pub fn rest<'a>(&self, content: &'a str) -> &'a str {
        content.get(self.emitted..).unwrap_or("")
    }
}

/// Decodes the start of a JSON string body (after its opening quote): the text of every complete
/// character or escape, how many bytes of `body` that took, and whether the closing quote came.
fn decode_string(body: &str) -> (String, usize, bool) {
    let mut out = String::new();
    let mut i = 0;
    let bytes = body.as_bytes();
    while i < body.len() {
        match bytes[i] {
            b'"' => return (out, i + 1, true),
            b'\\' => {
                let Some(&e) = bytes.get(i + 1) else { break };
                let simple = match e {
                    b'"' => Some('"'),
                    b'\\' => Some('\\'),
                    b'/' => Some('/'),
                    b'b' => Some('\u{8}'),
                    b'f' => Some('\u{c}'),
                    b'n' => Some('\n'),
                    b'r' => Some('\r'),
                    b't' => Some('\t'),
                    _ => None,
                };
                if let Some(c) = simple {
                    out.push(c);
                    i += 2;
                    continue;
                }
                let hex = |from: usize| {
                    body.get(from..from + 4)
                        .and_then(|h| u32::from_str_radix(h, 16).ok())
                };
                let Some(unit) = hex(i + 2) else { break };
                if (0xD800..0xDC00).contains(&unit) {
                    // A surrogate pair: wait for its second half.
                    if body.get(i + 6..i + 8) != Some("\\u") {
                        break;
                    }
                    let Some(low) = hex(i + 8) else { break };
                    let c = char::from_u32(
                        0x10000 + ((unit - 0xD800) << 10) + (low.wrapping_sub(0xDC00)),
                    );
                    out.push(c.unwrap_or('\u{FFFD}'));
                    i += 12;
                } else {
                    out.push(char::from_u32(unit).unwrap_or('\u{FFFD}'));
                    i += 6;
                }
            }
            _ => {
                let c = body[i..].chars().next().expect("in bounds");
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    (out, i, false)
}

/// What a tool-enabled answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Text for the user (`{"response": ...}`).
    Text(String),
    /// A call; its id is fresh.
    Call(ToolCall),
    /// Not the format (cut by `max_tokens` or a stop string): the raw text, to be returned as
    /// is.
    Raw(String),
}

/// A fresh call id: `call_` and 24 letters and digits, as OpenAI's.
pub fn new_call_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

/// How a text answer starts, as the constrained output writes it.
const RESPONSE_OPEN: &str = r#"{"response": ""#;

/// The text of a `{"response": "...` cut short (by `max_tokens` or a stop string): what was
/// written of the string, an escape cut in half dropped.
fn cut_response(text: &str) -> Option<String> {
    let rest = text.strip_prefix(RESPONSE_OPEN)?;
    (0..=6)
        .filter_map(|drop| rest.len().checked_sub(drop))
        .find_map(|end| {
            let body = rest.get(..end)?;
            serde_json::from_str::<String>(&format!("\"{body}\"")).ok()
        })
}

/// Reads the output of a request with tools. A text answer cut short is the text written so far
/// (its finish reason says it was cut), as a streamed answer would have shown it.
pub fn parse(text: &str) -> Output {
    let raw = || match cut_response(text) {
        Some(cut) => Output::Text(cut),
        None => Output::Raw(text.to_owned()),
    };
    let Ok(Value::Object(mut o)) = serde_json::from_str::<Value>(text) else {
        return raw();
    };
    if o.len() != 1 {
        return raw();
    }
    match (o.remove("tool_call"), o.remove("response")) {
        (Some(Value::Object(mut call)), None) => {
            match (call.remove("name"), call.remove("arguments")) {
                (Some(Value::String(name)), Some(arguments @ Value::Object(_))) => {
                    Output::Call(ToolCall {
                        id: new_call_id(),
                        name,
                        arguments: arguments.to_string(),
                    })
                }
                _ => raw(),
            }
        }
        (None, Some(Value::String(text))) => Output::Text(text),
        _ => raw(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Tool;

    fn tools(choice: ToolChoice) -> Tools {
        Tools {
            tools: vec![
                Tool {
                    name: "get_weather".into(),
                    description: Some("Weather in a city".into()),
                    parameters: r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#.into(),
                },
                Tool {
                    name: "add".into(),
                    description: None,
                    parameters: r#"{"type":"object","properties":{"a":{"type":"integer"},"b":{"type":"integer"}},"required":["a","b"]}"#.into(),
                },
            ],
            choice,
        }
    }

    #[test]
    fn schema_per_choice() {
        let auto: Value = serde_json::from_str(&schema(&tools(ToolChoice::Auto))).unwrap();
        let branches = auto["anyOf"].as_array().unwrap();
        assert_eq!(branches.len(), 2);
        assert_eq!(branches[1]["properties"]["response"]["type"], "string");
        let calls = branches[0]["properties"]["tool_call"]["anyOf"]
            .as_array()
            .unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["properties"]["name"]["const"], "get_weather");
        assert_eq!(
            calls[1]["properties"]["arguments"]["required"],
            json!(["a", "b"])
        );
        let keys: Vec<&String> = calls[0]["properties"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["name", "arguments"], "the name is written first");

        let required: Value = serde_json::from_str(&schema(&tools(ToolChoice::Required))).unwrap();
        assert_eq!(required["required"], json!(["tool_call"]));
        assert!(required.get("anyOf").is_none(), "no text branch");

        let named: Value =
            serde_json::from_str(&schema(&tools(ToolChoice::Function("add".into())))).unwrap();
        let call = &named["properties"]["tool_call"];
        assert_eq!(call["properties"]["name"]["const"], "add", "{named}");
        assert!(call.get("anyOf").is_none());
    }

    #[test]
    fn argument_objects_take_only_declared_properties_unless_told() {
        let t = Tools {
            tools: vec![Tool {
                name: "f".into(),
                description: None,
                parameters:
                    r#"{"type":"object","properties":{"p":{"type":"object","properties":{"x":{}}},
                    "q":{"type":"array","items":{"properties":{"y":{}}}},
                    "r":{"type":"object","additionalProperties":true}},
                    "$defs":{"D":{"type":"object"}}}"#
                        .into(),
            }],
            choice: ToolChoice::Required,
        };
        let s: Value = serde_json::from_str(&schema(&t)).unwrap();
        let args = &s["properties"]["tool_call"]["properties"]["arguments"];
        assert_eq!(args["additionalProperties"], false);
        assert_eq!(args["properties"]["p"]["additionalProperties"], false);
        assert_eq!(
            args["properties"]["q"]["items"]["additionalProperties"],
            false
        );
        assert_eq!(
            args["properties"]["r"]["additionalProperties"], true,
            "as told"
        );
        assert_eq!(args["$defs"]["D"]["additionalProperties"], false);
    }

    #[test]
    fn parse_reads_calls_and_text_and_keeps_anything_else_raw() {
        match parse(r#"{"tool_call": {"name": "add", "arguments": {"a": 1, "b": 2}}}"#) {
            Output::Call(c) => {
                assert_eq!(c.name, "add");
                assert_eq!(c.arguments, r#"{"a":1,"b":2}"#);
                assert!(c.id.starts_with("call_") && c.id.len() == 29, "{}", c.id);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(r#"{"response": "Hi \"there\"\n"}"#),
            Output::Text("Hi \"there\"\n".into())
        );
        for raw in [
            r#"{"tool_call": {"name": "add", "argu"#,
            r#"{"response": 3}"#,
            r#"{"tool_call": {"name": "add", "arguments": [1]}}"#,
            r#"{"response": "a", "tool_call": {}}"#,
            "plain text",
        ] {
            assert_eq!(parse(raw), Output::Raw(raw.into()), "{raw}");
        }
        assert_ne!(new_call_id(), new_call_id());
        // Text cut by max_tokens: what was written, a half escape dropped.
        for (cut, want) in [
            (r#"{"response": "The sea is"#, "The sea is"),
            (r#"{"response": "a \"b\" \n"#, "a \"b\" \n"),
            (r#"{"response": "tab\"#, "tab"),
            (r#"{"response": "x \u00e"#, "x "),
            (r#"{"response": "done""#, "done"),
            (r#"{"response": ""#, ""),
        ] {
            assert_eq!(parse(cut), Output::Text(want.into()), "{cut}");
        }
    }

    #[test]
    fn a_streamed_text_answer_comes_out_as_written_split_anywhere() {
        let outputs = [
            r#"{"response": "Hi \"you\"\n\u00e9\ud83d\ude00 caf\u00e9 \\ end"}"#,
            r#"{"response": "Paris"}"#,
            r#"{"response": "cut here \u00"#,
            r#"{"response": ""}"#,
        ];
        for output in outputs {
            let whole = match parse(output) {
                Output::Text(t) => t,
                other => panic!("{other:?}"),
            };
            let chars: Vec<(usize, char)> = output.char_indices().collect();
            for step in 1..=4 {
                let mut reader = StreamReader::default();
                let mut streamed = String::new();
                for piece in chars.chunks(step) {
                    let from = piece[0].0;
                    let to = piece.last().map(|(i, c)| i + c.len_utf8()).unwrap();
                    streamed.push_str(&reader.push(&output[from..to]));
                }
                assert!(reader.is_text());
                streamed.push_str(reader.rest(&whole));
                assert_eq!(streamed, whole, "{output} by {step}");
                assert_eq!(reader.raw(), output);
            }
        }
        // A call is held back whole.
        let call = r#"{"tool_call": {"name": "f", "arguments": {"response": "x"}}}"#;
        let mut reader = StreamReader::default();
        for c in call.chars() {
            assert_eq!(reader.push(&c.to_string()), "");
        }
        assert!(!reader.is_text());
        assert_eq!(reader.raw(), call);
    }

    #[test]
    fn polyfill_describes_tools_and_rewrites_tool_turns() {
        let history = vec![
            ChatMessage::text("system", "Be brief."),
            ChatMessage::text("user", "Weather in Paris?"),
            ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                }],
                ..ChatMessage::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "sunny".into(),
                tool_call_id: Some("call_1".into()),
                ..ChatMessage::default()
            },
        ];
        let t = tools(ToolChoice::Auto);
        let out = polyfill(&history, Some(&t));
        assert_eq!(out.len(), 4);
        assert!(
            out[0].content.starts_with("Be brief.\n\nYou can call"),
            "{}",
            out[0].content
        );
        assert!(out[0].content.contains(r#""name": "get_weather""#));
        assert!(out[0].content.ends_with(INSTRUCTION_AUTO));
        assert_eq!(
            out[2].content,
            r#"{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}"#
        );
        assert!(out[2].tool_calls.is_empty());
        assert_eq!(out[3].role, "user");
        assert_eq!(
            out[3].content,
            r#"{"tool_response": {"tool_call_id": "call_1", "content": "sunny"}}"#
        );
        // Without tools (`none`, or a follow-up that sends none) only the turns are rewritten.
        let out = polyfill(&history, None);
        assert_eq!(out[0], history[0]);
        assert_eq!(out[3].role, "user");
        // No system turn: one is added.
        let out = polyfill(&history[1..2], Some(&t));
        assert_eq!(out[0].role, "system");
        assert_eq!(out[1], history[1]);
    }
}
