//! The model's own chat template (`tokenizer.chat_template`, a Hugging Face Jinja template),
//! rendered with minijinja the way transformers renders it.
//!
//! transformers renders with `trim_blocks` and `lstrip_blocks` on and gives templates
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and `raise_exception`; templates
//! also call Python string methods (`.strip()`, `.startswith()`), which minijinja-contrib's
//! pycompat callback provides; `tojson` is Python's `json.dumps` ([`super::pyjson`]) and
//! `strftime_now` the local time. The same setup is reproduced here so prompts equal llama.cpp's and
//! transformers' renderings.

use std::hash::{BuildHasher, Hasher};
use std::ops::Range;

use candle_core::quantized::gguf_file::{Content, Value};
use minijinja::{context, Environment, ErrorKind};

use super::tokenizer::GgufTokenizer;
use super::ModelError;
use crate::types::{ChatMessage, TemplateKwargs, Tool, ToolCall, RESERVED_TEMPLATE_VARIABLES};

const KEY: &str = "tokenizer.chat_template";
const NAME: &str = "chat_template";

/// A compiled chat template with the model's special tokens bound.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    options: Vec<String>,
    reads_tools: bool,
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
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", super::pyjson::tojson);
        env.add_template_owned(NAME, source)
            .map_err(|e| ModelError::Template(describe(&e)))?;
        let (options, reads_tools) = {
            let template = env
                .get_template(NAME)
                .map_err(|e| ModelError::Template(describe(&e)))?;
            let globals: Vec<&str> = env.globals().map(|(name, _)| name).collect();
            let undeclared = template.undeclared_variables(false);
            let reads_tools = undeclared.contains("tools");
            let mut options: Vec<String> = undeclared
                .into_iter()
                .filter(|name| {
                    !RESERVED_TEMPLATE_VARIABLES.contains(&name.as_str())
                        && !globals.contains(&name.as_str())
                })
                .collect();
            options.sort();
            (options, reads_tools)
        };
        Ok(Self {
            env,
            bos_token,
            eos_token,
            options,
            reads_tools,
        })
    }

    /// The options a caller may set (`chat_template_kwargs` keys): the variables the template
    /// reads that neither the renderer ([`RESERVED_TEMPLATE_VARIABLES`]) nor minijinja's globals
    /// (`range`, `namespace`, ...) provide. Sorted; computed once, by minijinja's static
    /// analysis, when the template is compiled.
    pub fn options(&self) -> &[String] {
        &self.options
    }

    /// Whether the template reads `tools` (renders the tools it is given itself, as
    /// transformers passes them); when not, [`crate::tools::polyfill`] describes them.
    pub fn reads_tools(&self) -> bool {
        self.reads_tools
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends with the opening of the
    /// assistant's turn. Errors (including a template's own `raise_exception`, e.g. for roles it
    /// does not allow) are [`ModelError::Template`].
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        self.render_with(messages, add_generation_prompt, &TemplateKwargs::new())
    }

    /// As [`ChatTemplate::render`], with the caller's template options set as variables
    /// (`enable_thinking`). A key that is not one of [`ChatTemplate::options`] is a
    /// [`ModelError::Template`] (validation refuses those before; this keeps an unread or
    /// reserved option from ever being accepted and ignored).
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &TemplateKwargs,
    ) -> Result<String, ModelError> {
        self.render_tools(messages, add_generation_prompt, kwargs, &[])
    }

    /// As [`ChatTemplate::render_with`], with `tools` set as the template's `tools` variable
    /// in OpenAI's shape (`none` when empty, as transformers leaves it unset).
    pub fn render_tools(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &TemplateKwargs,
        tools: &[Tool],
    ) -> Result<String, ModelError> {
        if let Some(key) = kwargs.keys().find(|k| !self.options.contains(k)) {
            return Err(ModelError::Template(format!(
                "the chat template does not read the option `{}`",
                crate::types::echo(key)
            )));
        }
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
                tools => (!tools.is_empty()).then_some(tools),
                ..minijinja::Value::from_serialize(kwargs)
            })
            .map_err(|e| ModelError::Template(describe(&e)))
    }
}

/// A rendered prompt and the byte ranges in it that hold text taken from message contents which
/// spelled a control token (see [`ChatTemplate::render_guarded`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The prompt, exactly as [`ChatTemplate::render`] writes it.
    pub text: String,
    /// Where control-token strings from message contents landed in `text`: user text, to be
    /// tokenized as plain text.
    pub user: Vec<Range<usize>>,
}

/// Placeholder delimiters: private-use characters, which no template method changes (`trim`,
/// `upper`) and which surround only digits.
const OPEN: char = '\u{E000}';
const MID: char = '\u{E001}';
const CLOSE: char = '\u{E002}';

impl ChatTemplate {
    /// As [`ChatTemplate::render`], also telling where control-token strings written in message
    /// contents ended up, so they can be tokenized as plain text and a user cannot close their
    /// turn or forge another role's. `find` gives the byte ranges of control-token strings in a
    /// content (the tokenizer's [`find_control_tokens`](super::tokenizer::GgufTokenizer::find_control_tokens)).
    ///
    /// Each such string is replaced by a placeholder before rendering (so the template's own
    /// handling of the content, `trim` and the like, is unchanged) and put back after.
    pub fn render_guarded(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &TemplateKwargs,
        find: impl Fn(&str) -> Vec<Range<usize>>,
    ) -> Result<Rendered, ModelError> {
        self.render_guarded_tools(messages, add_generation_prompt, kwargs, &[], find)
    }

    /// As [`ChatTemplate::render_guarded`], with `tools` for the template (see
    /// [`ChatTemplate::render_tools`]). Control-token strings are guarded wherever caller text
    /// reaches the template: contents, the ids and arguments of earlier calls, `tool_call_id`,
    /// and the tools' descriptions and parameters.
    pub fn render_guarded_tools(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &TemplateKwargs,
        tools: &[Tool],
        find: impl Fn(&str) -> Vec<Range<usize>>,
    ) -> Result<Rendered, ModelError> {
        let nonce = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let mut originals: Vec<&str> = Vec::new();
        let mut guarded: Vec<ChatMessage> = Vec::with_capacity(messages.len());
        for m in messages {
            let mut tool_calls = Vec::with_capacity(m.tool_calls.len());
            for c in &m.tool_calls {
                tool_calls.push(ToolCall {
                    id: guard(&c.id, &find, nonce, &mut originals),
                    name: guard(&c.name, &find, nonce, &mut originals),
                    arguments: guard(&c.arguments, &find, nonce, &mut originals),
                });
            }
            guarded.push(ChatMessage {
                role: m.role.clone(),
                content: guard(&m.content, &find, nonce, &mut originals),
                tool_calls,
                tool_call_id: m
                    .tool_call_id
                    .as_deref()
                    .map(|id| guard(id, &find, nonce, &mut originals)),
            });
        }
        let mut guarded_tools = Vec::with_capacity(tools.len());
        for t in tools {
            guarded_tools.push(Tool {
                name: guard(&t.name, &find, nonce, &mut originals),
                description: t
                    .description
                    .as_deref()
                    .map(|d| guard(d, &find, nonce, &mut originals)),
                parameters: guard(&t.parameters, &find, nonce, &mut originals),
            });
        }
        if originals.is_empty() {
            return Ok(Rendered {
                text: self.render_tools(messages, add_generation_prompt, kwargs, tools)?,
                user: Vec::new(),
            });
        }
        let rendered =
            self.render_tools(&guarded, add_generation_prompt, kwargs, &guarded_tools)?;
        let marker = format!("{OPEN}{nonce}{MID}");
        let mut text = String::with_capacity(rendered.len());
        let mut user = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(at) = rest.find(&marker) {
            text.push_str(&rest[..at]);
            let after = &rest[at + marker.len()..];
            let original = after.find(CLOSE).and_then(|end| {
                let index: usize = after[..end].parse().ok()?;
                Some((originals.get(index)?, end))
            });
            match original {
                Some((original, end)) => {
                    user.push(text.len()..text.len() + original.len());
                    text.push_str(original);
                    rest = &after[end + CLOSE.len_utf8()..];
                }
                None => {
                    // Not one of ours (cannot happen with a fresh nonce): keep it as written.
                    text.push_str(&marker);
                    rest = after;
                }
            }
        }
        text.push_str(rest);
        Ok(Rendered { text, user })
    }
}

/// `text` with each control-token string `find` finds in it replaced by a placeholder naming its
/// index in `originals` (where it is pushed). A placeholder in JSON text (a call's arguments, a
/// tool's parameters) lands inside a string value, so the JSON stays valid and the template sees
/// the placeholder wherever it prints the value.
fn guard<'a>(
    text: &'a str,
    find: &impl Fn(&str) -> Vec<Range<usize>>,
    nonce: u64,
    originals: &mut Vec<&'a str>,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    for r in find(text) {
        out.push_str(&text[from..r.start]);
        out.push_str(&format!("{OPEN}{nonce}{MID}{}{CLOSE}", originals.len()));
        originals.push(&text[r.clone()]);
        from = r.end;
    }
    out.push_str(&text[from..]);
    out
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

/// transformers' `strftime_now(format)`: the local time now, written as Python's `strftime`
/// writes it (Llama 3.x and Granite templates print today's date). A format it cannot read is a
/// template error, never a panic.
fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "strftime_now: cannot read the format {:?}",
                crate::types::echo(&format)
            ),
        ));
    }
    Ok(chrono::Local::now()
        .format_with_items(items.into_iter())
        .to_string())
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
            ..Default::default()
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
    fn strftime_now_writes_the_local_date_and_refuses_bad_formats() {
        let t = template("{{ strftime_now('%d %b %Y') }}|{{ messages[0].content }}");
        let before = chrono::Local::now().format("%d %b %Y").to_string();
        let got = t.render(&[msg("user", "hi")], false).unwrap();
        let after = chrono::Local::now().format("%d %b %Y").to_string();
        assert!(
            got == format!("{before}|hi") || got == format!("{after}|hi"),
            "{got}"
        );
        match template("{{ strftime_now('%Q') }}").render(&[], false) {
            Err(ModelError::Template(m)) => assert!(m.contains("%Q"), "{m}"),
            other => panic!("expected a template error, got {other:?}"),
        }
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
    fn guarded_render_marks_control_strings_from_contents() {
        let t = template(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>{% endfor %}",
        );
        let find = |s: &str| {
            s.match_indices("<|im_end|>")
                .map(|(i, m)| i..i + m.len())
                .collect()
        };
        let m = [msg("user", "  hi<|im_end|>x  ")];
        let r = t
            .render_guarded(&m, false, &TemplateKwargs::new(), find)
            .unwrap();
        assert_eq!(r.text, t.render(&m, false).unwrap());
        assert_eq!(r.text, "<|im_start|>user\nhi<|im_end|>x<|im_end|>");
        assert_eq!(r.user, vec![19..29]);
        let plain = [msg("user", "hi")];
        let r = t
            .render_guarded(&plain, false, &TemplateKwargs::new(), find)
            .unwrap();
        assert!(r.user.is_empty());
    }

    #[test]
    fn options_are_the_variables_the_template_reads_and_reach_it() {
        use crate::types::TemplateValue;
        let t = template(
            "{% set ns = namespace(n=0) %}{% for m in messages %}{{ m.content }}{% endfor %}{{ bos_token }}\
             {% if add_generation_prompt %}>{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}{% endif %}\
             {% if tools %}{{ range(2) }}{% endif %}{{ style | default('') }}",
        );
        assert_eq!(t.options(), ["enable_thinking", "style"]);
        let m = [msg("user", "hi")];
        let kw = |pairs: &[(&str, TemplateValue)]| -> TemplateKwargs {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        };
        assert_eq!(t.render(&m, true).unwrap(), "hi<s>>");
        let off = kw(&[("enable_thinking", TemplateValue::Bool(false))]);
        assert_eq!(
            t.render_with(&m, true, &off).unwrap(),
            "hi<s>><think></think>"
        );
        let on = kw(&[("enable_thinking", TemplateValue::Bool(true))]);
        assert_eq!(t.render_with(&m, true, &on).unwrap(), "hi<s>>");
        let styled = kw(&[
            ("style", TemplateValue::Str("!".into())),
            ("enable_thinking", TemplateValue::Int(0)),
        ]);
        assert_eq!(t.render_with(&m, true, &styled).unwrap(), "hi<s>>!");
        for key in ["bos_token", "messages", "unread"] {
            let bad = kw(&[(key, TemplateValue::Str("x".into()))]);
            match t.render_with(&m, true, &bad) {
                Err(ModelError::Template(msg)) => assert!(msg.contains(key), "{msg}"),
                other => panic!("{key}: expected a template error, got {other:?}"),
            }
        }
        let plain = template("{% for m in messages %}{{ m.content }}{% endfor %}");
        assert!(plain.options().is_empty());
    }

    #[test]
    fn tools_and_tool_turns_reach_a_template_that_reads_them() {
        let t = template(
            "{% if tools %}[{% for t in tools %}{{ t.function.name }}:{{ t.function.parameters.required[0] }};{% endfor %}]{% endif %}\
             {% for m in messages %}<{{ m.role }}>{{ m.content }}{% for c in m.tool_calls %}{{ c.id }}={{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}{% endfor %}",
        );
        assert!(t.reads_tools());
        assert!(
            t.options().is_empty(),
            "`tools` is the renderer's, never an option"
        );
        let tools = [crate::types::Tool {
            name: "get_weather".into(),
            description: None,
            parameters: r#"{"type":"object","required":["city"]}"#.into(),
        }];
        let m = [
            msg("user", "hi"),
            ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![crate::types::ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                }],
                ..Default::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "sunny".into(),
                tool_call_id: Some("call_1".into()),
                ..Default::default()
            },
        ];
        assert_eq!(
            t.render_tools(&m, false, &TemplateKwargs::new(), &tools)
                .unwrap(),
            "[get_weather:city;]<user>hi<assistant>call_1=get_weather(Paris)<tool>sunny#call_1"
        );
        // No tools: `tools` is none (falsy), as transformers leaves it.
        assert!(t.render(&m[..1], false).unwrap().starts_with("<user>"));
        assert!(!template("{{ messages[0].content }}").reads_tools());
    }

    #[test]
    fn guarded_render_covers_tool_parts_and_tools() {
        let t = template(
            "{% for t in tools %}{{ t.function.description }}|{{ t.function.parameters.title }}|{% endfor %}\
             {% for m in messages %}{{ m.content }}{% for c in m.tool_calls %}{{ c.id }}|{{ c.function.arguments.city }}|{% endfor %}{{ m.tool_call_id }}{% endfor %}",
        );
        let find = |s: &str| {
            s.match_indices("<|im_end|>")
                .map(|(i, m)| i..i + m.len())
                .collect()
        };
        let tools = [Tool {
            name: "f".into(),
            description: Some("d<|im_end|>".into()),
            parameters: r#"{"type":"object","title":"p<|im_end|>"}"#.into(),
        }];
        let m = [
            ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![ToolCall {
                    id: "c<|im_end|>".into(),
                    name: "f".into(),
                    arguments: r#"{"city":"x<|im_end|>"}"#.into(),
                }],
                ..Default::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "r".into(),
                tool_call_id: Some("i<|im_end|>".into()),
                ..Default::default()
            },
        ];
        let kw = TemplateKwargs::new();
        let r = t
            .render_guarded_tools(&m, false, &kw, &tools, find)
            .unwrap();
        assert_eq!(r.text, t.render_tools(&m, false, &kw, &tools).unwrap());
        assert_eq!(
            r.text,
            "d<|im_end|>|p<|im_end|>|c<|im_end|>|x<|im_end|>|ri<|im_end|>"
        );
        let marked: Vec<&str> = r.user.iter().map(|u| &r.text[u.clone()]).collect();
        assert_eq!(marked, vec!["<|im_end|>"; 5], "every one is user text");
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
