//! [`RawRequest`] → [`GenerationRequest`], checked in one place for both fronts, so the engine
//! never sees raw input.
//!
//! Messages follow TGI: they name the field, the limit and the value given
//! ("`max_tokens` must be <= 2048. Given: 5000"). Context overflow needs the tokenizer, so the
//! backend detects it at submit ([`crate::engine::EngineError::ContextOverflow`]).

use std::time::Instant;

use super::request::{RawRequest, WireToolChoice};
use crate::config::Limits;
use crate::types::{
    echo, ChatMessage, GenerationRequest, Grammar, ModelInfo, OutputConstraint, PromptInput,
    SamplingParams, TemplateKwargs, TemplateValue, Tool, ToolChoice, Tools, MAX_TOP_LOGPROBS,
    RESERVED_TEMPLATE_VARIABLES,
};

/// Roles the chat templates of the served models understand.
pub const ROLES: &[&str] = &["system", "user", "assistant", "tool"];
/// Most tools in one request (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;
/// Longest tool (function) name, in bytes (OpenAI's limit).
pub const MAX_TOOL_NAME_BYTES: usize = 64;
/// Largest `top_k`; beyond it the filter changes nothing a caller could want.
pub const MAX_TOP_K: u32 = 1000;
/// Longest caller-given `request_id`, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Longest tenant (`x-qnode-tenant`), in bytes.
pub const MAX_TENANT_BYTES: usize = 128;
/// Longest session key (`session_id`, `x-session-id`, OpenAI `user`), in bytes.
pub const MAX_SESSION_BYTES: usize = 256;
/// Largest JSON schema, regex or grammar of an output constraint, in bytes.
pub const MAX_CONSTRAINT_BYTES: usize = 64 * 1024;
/// Most chat-template options (`chat_template_kwargs` keys) in one request.
pub const MAX_TEMPLATE_KWARGS: usize = 16;
/// Longest chat-template option name, in bytes.
pub const MAX_TEMPLATE_KWARG_NAME_BYTES: usize = 64;
/// Longest chat-template option string value, in bytes.
pub const MAX_TEMPLATE_KWARG_VALUE_BYTES: usize = 256;
/// Header (gRPC metadata) naming the conversation a call continues.
pub const SESSION_HEADER: &str = "x-session-id";

/// Why a request was refused before reaching the backend.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// No model with this id is served (NOT_FOUND).
    #[error(
        "model `{}` is not served by this node; it serves: {served}",
        echo(model)
    )]
    UnknownModel {
        /// The id asked for.
        model: String,
        /// The ids served, comma-separated.
        served: String,
    },
    /// A value outside its range; names the field, the rule and the value given (a caller's
    /// text capped by [`echo`] where it is built).
    #[error("`{field}` must be {constraint}. Given: {given}")]
    OutOfRange {
        /// Field path, e.g. `messages[1].role`.
        field: String,
        /// The rule, e.g. `<= 2048`.
        constraint: String,
        /// The value given, as the caller would recognise it.
        given: String,
    },
    /// A text field that must not be empty is.
    #[error("`{field}` must not be empty")]
    Empty {
        /// Field path.
        field: String,
    },
    /// Both `prompt` and `messages` were given.
    #[error("give exactly one of `prompt` or `messages`, not both")]
    PromptAndMessages,
    /// Neither `prompt` nor `messages` was given.
    #[error("one of `prompt` or `messages` is required")]
    NoPrompt,
    /// A field that only means something with another one set (`top_logprobs` without
    /// `logprobs: true`), as OpenAI refuses it.
    #[error("`{field}` needs `{needs}`. Given: {given}")]
    Needs {
        /// The field given.
        field: String,
        /// What it needs, e.g. `logprobs: true`.
        needs: String,
        /// The value given.
        given: String,
    },
    /// A chat-template option (`chat_template_kwargs.KEY`) the template cannot take: reserved
    /// for the renderer, not read by this model's template, or given with a raw prompt.
    #[error("`{field}` {reason}")]
    TemplateOption {
        /// Field path, `chat_template_kwargs` or `chat_template_kwargs.KEY`.
        field: String,
        /// Why, and what would be taken.
        reason: String,
    },
    /// `tools`, `tool_choice` or a message's tool parts do not fit together (an undeclared
    /// function named, tools without `messages`, a call that is not an assistant's, ...).
    #[error("`{field}` {reason}")]
    Tools {
        /// Field path, e.g. `tool_choice.function.name`.
        field: String,
        /// Why, with the value given.
        reason: String,
    },
    /// `x-qnode-tenant` names another tenant than the one the caller's API key is bound to
    /// (PERMISSION_DENIED).
    #[error(
        "`x-qnode-tenant` {given} is not this API key's tenant: a key bound to a tenant cannot \
         claim another; leave the header out (the key's tenant applies) or send the key's own"
    )]
    TenantNotAllowed {
        /// The tenant claimed, quoted.
        given: String,
    },
}

fn out_of_range(
    field: impl Into<String>,
    constraint: impl Into<String>,
    given: impl ToString,
) -> ValidationError {
    ValidationError::OutOfRange {
        field: field.into(),
        constraint: constraint.into(),
        given: given.to_string(),
    }
}

/// What the transport says about the caller, beside the body: checked with it.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The id the caller gave (checked here) or one the front generated.
    pub request_id: String,
    /// From the front's timeout header.
    pub deadline: Option<Instant>,
    /// `x-qnode-tenant` as sent (it scopes the answer cache); `None` when absent or empty.
    pub tenant: Option<String>,
    /// The tenant the caller's API key is bound to, if any.
    pub key_tenant: Option<String>,
    /// `x-session-id` as sent; `None` when absent or empty.
    pub session: Option<String>,
}

/// Checks `wire` and `caller` against the served `models` and the node's `limits`.
pub fn validate(
    wire: RawRequest,
    models: &[ModelInfo],
    limits: &Limits,
    caller: Caller,
) -> Result<GenerationRequest, ValidationError> {
    let Caller {
        request_id,
        deadline,
        tenant,
        key_tenant,
        session,
    } = caller;
    if wire.model.is_empty() {
        return Err(ValidationError::Empty {
            field: "model".into(),
        });
    }
    let Some(info) = models.iter().find(|m| m.id == wire.model) else {
        let served: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
        return Err(ValidationError::UnknownModel {
            model: wire.model,
            served: served.join(", "),
        });
    };
    check_request_id(&request_id)?;
    let tenant = tenant_of(tenant, key_tenant)?;
    let sampling = sampling(&wire)?;
    let logprobs = logprobs(&wire)?;
    let tools = tools(&wire, limits)?;
    let session = session_key(session, wire.session_id, wire.user)?;
    let input = prompt_input(wire.prompt, wire.messages, limits)?;
    check_template_kwargs(&wire.chat_template_kwargs, &input, info)?;
    let max_tokens = match wire.max_tokens {
        None => limits.default_max_tokens.min(limits.max_tokens_limit),
        Some(0) => return Err(out_of_range("max_tokens", ">= 1", 0)),
        Some(n) if n > limits.max_tokens_limit => {
            return Err(out_of_range(
                "max_tokens",
                format!("<= {}", limits.max_tokens_limit),
                n,
            ))
        }
        Some(n) => n,
    };
    check_stop(&wire.stop, limits)?;
    if let Some(c) = &wire.constraint {
        check_constraint(c)?;
    }
    let constraint = match &tools {
        Some(t) => {
            let c = OutputConstraint {
                grammar: Grammar::JsonSchema(crate::tools::schema(t)),
                field: "tools".into(),
            };
            check_constraint(&c)?;
            Some(c)
        }
        None => wire.constraint,
    };
    let cache_policy = match wire.cache_policy {
        Ok(policy) => policy,
        Err(given) => {
            return Err(out_of_range(
                "cache_policy",
                "one of DEFAULT, BYPASS, REFRESH, ONLY_IF_CACHED",
                echo(&given),
            ))
        }
    };
    Ok(GenerationRequest {
        request_id,
        model: wire.model,
        input,
        sampling,
        max_tokens,
        stop: wire.stop,
        deadline,
        cache_policy,
        tenant,
        session,
        constraint,
        logprobs,
        chat_template_kwargs: wire.chat_template_kwargs,
        tools,
    })
}

fn tool_error(field: impl Into<String>, reason: impl Into<String>) -> ValidationError {
    ValidationError::Tools {
        field: field.into(),
        reason: reason.into(),
    }
}

/// `tools` and `tool_choice` as the request's [`Tools`]: `None` without tools or with
/// `tool_choice: none` (the tools are checked all the same). Names are 1 to
/// [`MAX_TOOL_NAME_BYTES`] of `a-z A-Z 0-9 _ -` and unique; parameters are an object schema
/// (whether it compiles is known at submit); a named choice names a declared function; tools go
/// with `messages` only and not with another output constraint.
fn tools(wire: &RawRequest, limits: &Limits) -> Result<Option<Tools>, ValidationError> {
    let choice = wire.tool_choice.as_ref();
    let invalid =
        |given: &str| out_of_range("tool_choice", "one of auto, none, required", quoted(given));
    if let Some(WireToolChoice::Invalid(given)) = choice {
        return Err(invalid(given));
    }
    if wire.tools.is_empty() {
        return match choice {
            None | Some(WireToolChoice::None | WireToolChoice::Auto) => Ok(None),
            Some(_) => Err(tool_error(
                "tool_choice",
                "needs `tools`: `required` or a named function can only be honoured with tools \
                 declared",
            )),
        };
    }
    if wire.tools.len() > MAX_TOOLS {
        return Err(out_of_range(
            "tools",
            format!("at most {MAX_TOOLS} tools"),
            wire.tools.len(),
        ));
    }
    if wire.prompt.is_some() {
        return Err(tool_error(
            "tools",
            "needs `messages`: tools are described through the chat template",
        ));
    }
    let mut bytes = 0;
    for (i, tool) in wire.tools.iter().enumerate() {
        let field = |leaf: &str| format!("tools[{i}].function.{leaf}");
        check_tool_name(&field("name"), &tool.name)?;
        if wire.tools[..i].iter().any(|t| t.name == tool.name) {
            return Err(tool_error(
                field("name"),
                format!("must be unique: {} is declared twice", quoted(&tool.name)),
            ));
        }
        match serde_json::from_str::<serde_json::Value>(&tool.parameters) {
            Ok(serde_json::Value::Object(o))
                if o.get("type").is_none() || o["type"] == "object" => {}
            _ => {
                return Err(out_of_range(
                    field("parameters"),
                    "a JSON Schema of an object (`{\"type\": \"object\", \"properties\": ...}`)",
                    quoted(&tool.parameters),
                ))
            }
        }
        bytes += tool.parameters.len() + tool.description.as_ref().map_or(0, String::len);
    }
    if bytes > limits.max_prompt_bytes {
        return Err(out_of_range(
            "tools",
            format!(
                "<= {} bytes (descriptions and parameters)",
                limits.max_prompt_bytes
            ),
            format!("{bytes} bytes"),
        ));
    }
    if let Some(c) = &wire.constraint {
        return Err(tool_error(
            c.field.as_str(),
            "cannot be combined with `tools`: the output is held to the tool-call format",
        ));
    }
    let choice = match choice {
        None | Some(WireToolChoice::Auto) => ToolChoice::Auto,
        Some(WireToolChoice::None) => return Ok(None),
        Some(WireToolChoice::Required) => ToolChoice::Required,
        Some(WireToolChoice::Invalid(given)) => return Err(invalid(given)),
        Some(WireToolChoice::Function(name)) => {
            if !wire.tools.iter().any(|t: &Tool| &t.name == name) {
                return Err(tool_error(
                    "tool_choice.function.name",
                    format!(
                        "must name one of the declared tools ({}). Given: {}",
                        wire.tools
                            .iter()
                            .map(|t| t.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        quoted(name)
                    ),
                ));
            }
            ToolChoice::Function(name.clone())
        }
    };
    Ok(Some(Tools {
        tools: wire.tools.clone(),
        choice,
    }))
}

/// A function name: 1 to [`MAX_TOOL_NAME_BYTES`] of `a-z A-Z 0-9 _ -` (OpenAI's rule).
fn check_tool_name(field: &str, name: &str) -> Result<(), ValidationError> {
    if name.is_empty()
        || name.len() > MAX_TOOL_NAME_BYTES
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(out_of_range(
            field,
            format!("1 to {MAX_TOOL_NAME_BYTES} of a-z, A-Z, 0-9, _ and -"),
            quoted(name),
        ));
    }
    Ok(())
}

/// A message's tool parts: calls on assistant turns only, each with an id, a declared-looking
/// name and arguments that are a JSON object; `tool_call_id` on (and required by) `tool` turns.
/// Returns the bytes they add to the prompt.
fn check_tool_parts(i: usize, m: &ChatMessage) -> Result<usize, ValidationError> {
    if !m.tool_calls.is_empty() && m.role != "assistant" {
        return Err(tool_error(
            format!("messages[{i}].tool_calls"),
            format!(
                "are only for `assistant` turns. Given on: {}",
                quoted(&m.role)
            ),
        ));
    }
    match (&m.tool_call_id, m.role == "tool") {
        (Some(id), true) if !id.is_empty() => {}
        (_, true) => {
            return Err(ValidationError::Empty {
                field: format!("messages[{i}].tool_call_id"),
            })
        }
        (Some(_), false) => {
            return Err(tool_error(
                format!("messages[{i}].tool_call_id"),
                format!("is only for `tool` turns. Given on: {}", quoted(&m.role)),
            ))
        }
        (None, false) => {}
    }
    let mut bytes = m.tool_call_id.as_ref().map_or(0, String::len);
    for (j, call) in m.tool_calls.iter().enumerate() {
        let field = |leaf: &str| format!("messages[{i}].tool_calls[{j}].{leaf}");
        if call.id.is_empty() {
            return Err(ValidationError::Empty { field: field("id") });
        }
        check_tool_name(&field("function.name"), &call.name)?;
        if !matches!(
            serde_json::from_str::<serde_json::Value>(&call.arguments),
            Ok(serde_json::Value::Object(_))
        ) {
            return Err(out_of_range(
                field("function.arguments"),
                "a JSON object, as text",
                quoted(&call.arguments),
            ));
        }
        bytes += call.id.len() + call.name.len() + call.arguments.len();
    }
    Ok(bytes)
}

/// `chat_template_kwargs`: only with `messages`; at most [`MAX_TEMPLATE_KWARGS`] keys, each an
/// identifier that the renderer does not set itself ([`RESERVED_TEMPLATE_VARIABLES`]) and that `model`'s
/// chat template reads ([`ModelInfo::template_options`]), so no option is accepted and ignored;
/// strings up to [`MAX_TEMPLATE_KWARG_VALUE_BYTES`].
fn check_template_kwargs(
    kwargs: &TemplateKwargs,
    input: &PromptInput,
    model: &ModelInfo,
) -> Result<(), ValidationError> {
    const FIELD: &str = "chat_template_kwargs";
    if kwargs.is_empty() {
        return Ok(());
    }
    if matches!(input, PromptInput::Text(_)) {
        return Err(ValidationError::TemplateOption {
            field: FIELD.into(),
            reason: "needs `messages`: chat template options apply to the chat template, which \
                     a raw `prompt` does not go through"
                .into(),
        });
    }
    if kwargs.len() > MAX_TEMPLATE_KWARGS {
        return Err(out_of_range(
            FIELD,
            format!("at most {MAX_TEMPLATE_KWARGS} keys"),
            format!("{} keys", kwargs.len()),
        ));
    }
    for (key, value) in kwargs {
        let identifier = !key.is_empty()
            && key.len() <= MAX_TEMPLATE_KWARG_NAME_BYTES
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !key.as_bytes()[0].is_ascii_digit();
        if !identifier {
            return Err(out_of_range(
                FIELD,
                format!(
                    "an object whose keys are identifiers (ASCII letters, digits and `_`, not \
                     starting with a digit, at most {MAX_TEMPLATE_KWARG_NAME_BYTES} bytes)"
                ),
                format!("the key {}", quoted(key)),
            ));
        }
        let field = format!("{FIELD}.{key}");
        if RESERVED_TEMPLATE_VARIABLES.contains(&key.as_str()) {
            return Err(ValidationError::TemplateOption {
                field,
                reason: format!(
                    "is reserved: the node sets it for the chat template itself (reserved: {})",
                    RESERVED_TEMPLATE_VARIABLES.join(", ")
                ),
            });
        }
        if let TemplateValue::Str(text) = value {
            if text.len() > MAX_TEMPLATE_KWARG_VALUE_BYTES {
                return Err(out_of_range(
                    field,
                    format!("<= {MAX_TEMPLATE_KWARG_VALUE_BYTES} bytes"),
                    format!("{} bytes", text.len()),
                ));
            }
        }
        if !model.template_options.contains(key) {
            let takes = if model.template_options.is_empty() {
                "it takes no options".to_owned()
            } else {
                format!("it takes: {}", model.template_options.join(", "))
            };
            return Err(ValidationError::TemplateOption {
                field,
                reason: format!(
                    "is not read by the chat template of model `{}` (it would be ignored); {takes}",
                    echo(&model.id)
                ),
            });
        }
    }
    Ok(())
}

/// `logprobs` / `top_logprobs` as the engine's `Some(alternatives)`: `top_logprobs` above 0
/// needs `logprobs: true`, and is at most [`MAX_TOP_LOGPROBS`] (OpenAI's rules).
fn logprobs(wire: &RawRequest) -> Result<Option<u32>, ValidationError> {
    let field = wire.top_logprobs_field;
    if let Some(n) = wire.top_logprobs {
        if n > MAX_TOP_LOGPROBS {
            return Err(out_of_range(field, format!("<= {MAX_TOP_LOGPROBS}"), n));
        }
        if n > 0 && wire.logprobs != Some(true) {
            return Err(ValidationError::Needs {
                field: field.to_owned(),
                needs: "logprobs: true".to_owned(),
                given: n.to_string(),
            });
        }
    }
    Ok((wire.logprobs == Some(true)).then(|| wire.top_logprobs.unwrap_or(0)))
}

/// A schema or grammar's size and shape; whether it compiles is known at submit, where the
/// model's vocabulary is.
fn check_constraint(c: &OutputConstraint) -> Result<(), ValidationError> {
    let text = match &c.grammar {
        Grammar::JsonObject => return Ok(()),
        Grammar::JsonSchema(t) | Grammar::Regex(t) | Grammar::Lark(t) => t,
    };
    if text.len() > MAX_CONSTRAINT_BYTES {
        return Err(out_of_range(
            c.field.as_str(),
            format!("<= {MAX_CONSTRAINT_BYTES} bytes"),
            format!("{} bytes", text.len()),
        ));
    }
    if text.trim().is_empty() {
        return Err(ValidationError::Empty {
            field: c.field.clone(),
        });
    }
    if let Grammar::JsonSchema(t) = &c.grammar {
        match serde_json::from_str::<serde_json::Value>(t) {
            Ok(serde_json::Value::Object(_) | serde_json::Value::Bool(_)) => {}
            _ => {
                return Err(out_of_range(
                    c.field.as_str(),
                    "a JSON Schema (a JSON object)",
                    quoted(t),
                ))
            }
        }
    }
    Ok(())
}

/// `value` as the caller would recognise it: capped, quoted and escaped, so control bytes show.
fn quoted(value: &str) -> String {
    format!("{:?}", echo(value))
}

/// A header-borne key (`x-session-id`, `x-qnode-tenant`): 1..=`max` bytes of visible ASCII, so
/// it can travel as an HTTP/2 header, be hashed by a load balancer and go into a log line as is.
fn check_key(field: &str, value: &str, max: usize) -> Result<(), ValidationError> {
    if value.len() > max {
        return Err(out_of_range(
            field,
            format!("<= {max} bytes"),
            format!("{} bytes", value.len()),
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(out_of_range(
            field,
            "visible ASCII (no spaces, no control or non-ASCII characters)",
            quoted(value),
        ));
    }
    Ok(())
}

/// The call's tenant: `x-qnode-tenant` checked (1..=[`MAX_TENANT_BYTES`] of visible ASCII:
/// anything else is refused, never dropped, so a caller cannot fall into the shared no-tenant
/// scope by mistake), then held to the tenant of the caller's API key when it has one.
fn tenant_of(
    header: Option<String>,
    key_tenant: Option<String>,
) -> Result<Option<String>, ValidationError> {
    if let Some(t) = &header {
        check_key(crate::front::TENANT_HEADER, t, MAX_TENANT_BYTES)?;
    }
    match (header, key_tenant) {
        (Some(claimed), Some(bound)) if claimed != bound => {
            Err(ValidationError::TenantNotAllowed {
                given: quoted(&claimed),
            })
        }
        (header, None) => Ok(header),
        (_, bound) => Ok(bound),
    }
}

/// The call's session key: the `x-session-id` header, else the body's `session_id` (the two
/// must agree when both are given), else the OpenAI `user`. `user` is free text in OpenAI's API,
/// so only its length is checked; the pool keeps a hash of the key, never the key.
fn session_key(
    header: Option<String>,
    field: Option<String>,
    user: Option<String>,
) -> Result<Option<String>, ValidationError> {
    if let Some(h) = &header {
        check_key(SESSION_HEADER, h, MAX_SESSION_BYTES)?;
    }
    if let Some(f) = &field {
        check_key("session_id", f, MAX_SESSION_BYTES)?;
    }
    if let (Some(h), Some(f)) = (&header, &field) {
        if h != f {
            return Err(out_of_range(
                "session_id",
                format!("equal to `{SESSION_HEADER}` when both are given (send one)"),
                format!("{} and {SESSION_HEADER} {}", quoted(f), quoted(h)),
            ));
        }
    }
    if let Some(u) = user.as_deref().filter(|u| u.len() > MAX_SESSION_BYTES) {
        return Err(out_of_range(
            "user",
            format!("<= {MAX_SESSION_BYTES} bytes (it is the session key when no `{SESSION_HEADER}` is sent)"),
            format!("{} bytes", u.len()),
        ));
    }
    Ok(header.or(field).or(user.filter(|u| !u.is_empty())))
}

fn check_request_id(id: &str) -> Result<(), ValidationError> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(out_of_range(
            "request_id",
            format!("<= {MAX_REQUEST_ID_BYTES} bytes"),
            format!("{} bytes", id.len()),
        ));
    }
    // It goes into every log line: printable ASCII only, so it cannot forge lines.
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(out_of_range(
            "request_id",
            "printable ASCII without spaces",
            quoted(id),
        ));
    }
    Ok(())
}

fn prompt_input(
    prompt: Option<String>,
    messages: Vec<ChatMessage>,
    limits: &Limits,
) -> Result<PromptInput, ValidationError> {
    let too_long = |field: &str, bytes: usize| {
        out_of_range(
            field,
            format!("<= {} bytes", limits.max_prompt_bytes),
            format!("{bytes} bytes"),
        )
    };
    match (prompt, messages.is_empty()) {
        (Some(_), false) => Err(ValidationError::PromptAndMessages),
        (None, true) => Err(ValidationError::NoPrompt),
        (Some(prompt), true) => {
            if prompt.is_empty() {
                return Err(ValidationError::Empty {
                    field: "prompt".into(),
                });
            }
            if prompt.len() > limits.max_prompt_bytes {
                return Err(too_long("prompt", prompt.len()));
            }
            Ok(PromptInput::Text(prompt))
        }
        (None, false) => {
            let mut total = 0usize;
            for (i, message) in messages.iter().enumerate() {
                if !ROLES.contains(&message.role.as_str()) {
                    return Err(out_of_range(
                        format!("messages[{i}].role"),
                        format!("one of {}", ROLES.join(", ")),
                        quoted(&message.role),
                    ));
                }
                total += check_tool_parts(i, message)?;
                if message.content.is_empty() && message.tool_calls.is_empty() {
                    return Err(ValidationError::Empty {
                        field: format!("messages[{i}].content"),
                    });
                }
                total += message.content.len();
            }
            if total > limits.max_prompt_bytes {
                return Err(too_long("messages[].content (total)", total));
            }
            Ok(PromptInput::Chat(messages))
        }
    }
}

/// Checks `value` with `ok`; `NaN` fails every range.
fn float_in(
    field: &str,
    value: Option<f32>,
    default: f32,
    range: &str,
    ok: impl Fn(f32) -> bool,
) -> Result<f32, ValidationError> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && ok(v) => Ok(v),
        Some(v) => Err(out_of_range(field, format!("in {range}"), v)),
    }
}

fn sampling(wire: &RawRequest) -> Result<SamplingParams, ValidationError> {
    let defaults = SamplingParams::default();
    let top_k = wire.top_k.unwrap_or(defaults.top_k);
    if top_k > MAX_TOP_K {
        return Err(out_of_range("top_k", format!("<= {MAX_TOP_K}"), top_k));
    }
    Ok(SamplingParams {
        temperature: float_in(
            "temperature",
            wire.temperature,
            defaults.temperature,
            "[0, 2]",
            |v| (0.0..=2.0).contains(&v),
        )?,
        top_p: float_in("top_p", wire.top_p, defaults.top_p, "(0, 1]", |v| {
            v > 0.0 && v <= 1.0
        })?,
        top_k,
        min_p: float_in("min_p", wire.min_p, defaults.min_p, "[0, 1]", |v| {
            (0.0..=1.0).contains(&v)
        })?,
        repetition_penalty: float_in(
            "repetition_penalty",
            wire.repetition_penalty,
            defaults.repetition_penalty,
            "(0, 2]",
            |v| v > 0.0 && v <= 2.0,
        )?,
        seed: wire.seed,
    })
}

fn check_stop(stop: &[String], limits: &Limits) -> Result<(), ValidationError> {
    if stop.len() > limits.max_stop_strings {
        return Err(out_of_range(
            "stop",
            format!("<= {} strings", limits.max_stop_strings),
            format!("{} strings", stop.len()),
        ));
    }
    for (i, s) in stop.iter().enumerate() {
        if s.is_empty() {
            return Err(ValidationError::Empty {
                field: format!("stop[{i}]"),
            });
        }
        if s.len() > limits.max_stop_string_bytes {
            return Err(out_of_range(
                format!("stop[{i}]"),
                format!("<= {} bytes", limits.max_stop_string_bytes),
                format!("{} bytes", s.len()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ModelState;

    fn models() -> Vec<ModelInfo> {
        let smollm2 = ModelInfo {
            id: "smollm2".into(),
            architecture: "llama".into(),
            quant: "q8_0".into(),
            context_length: 8192,
            instances: 1,
            state: ModelState::Ready,
            template_options: Vec::new(),
        };
        let qwen3 = ModelInfo {
            id: "qwen3".into(),
            architecture: "qwen3".into(),
            template_options: vec!["enable_thinking".into()],
            ..smollm2.clone()
        };
        vec![smollm2, qwen3]
    }

    fn good() -> RawRequest {
        RawRequest {
            model: "smollm2".into(),
            prompt: Some("Hello".into()),
            ..Default::default()
        }
    }

    fn caller(request_id: &str) -> Caller {
        Caller {
            request_id: request_id.into(),
            ..Caller::default()
        }
    }

    use crate::front::FrontError;

    fn check(wire: RawRequest) -> Result<GenerationRequest, ValidationError> {
        validate(wire, &models(), &Limits::default(), caller("id-1"))
    }

    fn message(wire: RawRequest) -> String {
        check(wire).unwrap_err().to_string()
    }

    fn tool(name: &str, parameters: &str) -> Tool {
        Tool {
            name: name.into(),
            description: None,
            parameters: parameters.into(),
        }
    }

    fn with_tools(tools: Vec<Tool>, choice: Option<WireToolChoice>) -> RawRequest {
        RawRequest {
            prompt: None,
            messages: vec![ChatMessage::text("user", "hi")],
            tools,
            tool_choice: choice,
            ..good()
        }
    }

    fn field_of(wire: RawRequest) -> String {
        match FrontError::from(check(wire).unwrap_err()).param {
            Some(p) => p,
            None => "-".into(),
        }
    }

    #[test]
    fn tools_become_the_request_s_tools_and_its_schema() {
        let obj = r#"{"type":"object","properties":{"x":{"type":"integer"}}}"#;
        let r = check(with_tools(vec![tool("f", obj), tool("g", "{}")], None)).unwrap();
        let tools = r.tools.clone().unwrap();
        assert_eq!(tools.choice, ToolChoice::Auto, "auto by default");
        let c = r.constraint.unwrap();
        assert_eq!(c.field, "tools");
        assert_eq!(c.grammar, Grammar::JsonSchema(crate::tools::schema(&tools)));
        let named = with_tools(
            vec![tool("f", obj)],
            Some(WireToolChoice::Function("f".into())),
        );
        assert_eq!(
            check(named).unwrap().tools.unwrap().choice,
            ToolChoice::Function("f".into())
        );
        // `none`: checked, then neither shown nor constrained.
        let none = check(with_tools(vec![tool("f", obj)], Some(WireToolChoice::None))).unwrap();
        assert_eq!((none.tools, none.constraint), (None, None));
        assert_eq!(
            field_of(with_tools(
                vec![tool("f", "[]")],
                Some(WireToolChoice::None)
            )),
            "tools[0].function.parameters"
        );
        // Without tools, `auto` and `none` mean nothing to do.
        assert!(check(with_tools(vec![], Some(WireToolChoice::Auto)))
            .unwrap()
            .tools
            .is_none());
    }

    #[test]
    fn bad_tools_are_refused_naming_the_field() {
        let obj = r#"{"type":"object"}"#;
        let cases: Vec<(RawRequest, &str)> = vec![
            (
                with_tools(vec![tool("", obj)], None),
                "tools[0].function.name",
            ),
            (
                with_tools(vec![tool("a b", obj)], None),
                "tools[0].function.name",
            ),
            (
                with_tools(vec![tool(&"x".repeat(65), obj)], None),
                "tools[0].function.name",
            ),
            (
                with_tools(vec![tool("f", obj), tool("f", obj)], None),
                "tools[1].function.name",
            ),
            (
                with_tools(vec![tool("f", "not json")], None),
                "tools[0].function.parameters",
            ),
            (
                with_tools(vec![tool("f", r#"{"type":"string"}"#)], None),
                "tools[0].function.parameters",
            ),
            (
                with_tools(
                    vec![tool("f", obj)],
                    Some(WireToolChoice::Function("g".into())),
                ),
                "tool_choice.function.name",
            ),
            (
                with_tools(vec![], Some(WireToolChoice::Required)),
                "tool_choice",
            ),
            (
                with_tools(vec![], Some(WireToolChoice::Function("f".into()))),
                "tool_choice",
            ),
            (
                with_tools(
                    vec![tool("f", obj)],
                    Some(WireToolChoice::Invalid("any".into())),
                ),
                "tool_choice",
            ),
            (
                RawRequest {
                    tools: vec![tool("f", obj)],
                    ..good()
                },
                "tools",
            ),
            (
                RawRequest {
                    constraint: Some(OutputConstraint {
                        grammar: Grammar::JsonObject,
                        field: "response_format".into(),
                    }),
                    ..with_tools(vec![tool("f", obj)], None)
                },
                "response_format",
            ),
            (
                with_tools(vec![tool("f", obj); MAX_TOOLS + 1], None),
                "tools",
            ),
        ];
        for (i, (wire, field)) in cases.into_iter().enumerate() {
            assert_eq!(field_of(wire), field, "case {i}");
        }
    }

    #[test]
    fn tool_turns_are_checked() {
        let call = |arguments: &str| crate::types::ToolCall {
            id: "call_1".into(),
            name: "f".into(),
            arguments: arguments.into(),
        };
        let turns = |m: ChatMessage| RawRequest {
            prompt: None,
            messages: vec![ChatMessage::text("user", "hi"), m],
            ..good()
        };
        let calling = ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![call("{}")],
            ..Default::default()
        };
        let answering = ChatMessage {
            role: "tool".into(),
            content: "42".into(),
            tool_call_id: Some("call_1".into()),
            ..Default::default()
        };
        assert!(
            check(turns(calling.clone())).is_ok(),
            "no content with a call"
        );
        assert!(check(turns(answering.clone())).is_ok());
        for (m, field) in [
            (
                ChatMessage {
                    role: "user".into(),
                    ..calling.clone()
                },
                "messages[1].tool_calls",
            ),
            (
                ChatMessage {
                    tool_calls: vec![call("[1]")],
                    ..calling.clone()
                },
                "messages[1].tool_calls[0].function.arguments",
            ),
            (
                ChatMessage {
                    tool_calls: vec![crate::types::ToolCall {
                        id: String::new(),
                        ..call("{}")
                    }],
                    ..calling.clone()
                },
                "messages[1].tool_calls[0].id",
            ),
            (
                ChatMessage {
                    tool_call_id: None,
                    ..answering.clone()
                },
                "messages[1].tool_call_id",
            ),
            (
                ChatMessage {
                    tool_call_id: Some(String::new()),
                    ..answering.clone()
                },
                "messages[1].tool_call_id",
            ),
            (
                ChatMessage {
                    role: "user".into(),
                    ..answering.clone()
                },
                "messages[1].tool_call_id",
            ),
            (
                ChatMessage {
                    content: String::new(),
                    ..answering.clone()
                },
                "messages[1].content",
            ),
        ] {
            assert_eq!(field_of(turns(m.clone())), field, "{m:?}");
        }
    }

    #[test]
    fn good_request_gets_defaults() {
        let request = check(good()).unwrap();
        assert_eq!(request.max_tokens, 256);
        assert_eq!(request.sampling, SamplingParams::default());
        assert_eq!(request.input, PromptInput::Text("Hello".into()));
        assert_eq!(request.request_id, "id-1");
    }

    #[test]
    fn logprobs_and_their_limits() {
        let with = |logprobs: Option<bool>, top: Option<u32>| {
            check(RawRequest {
                logprobs,
                top_logprobs: top,
                ..good()
            })
        };
        assert_eq!(with(None, None).unwrap().logprobs, None, "off by default");
        assert_eq!(with(Some(false), None).unwrap().logprobs, None);
        assert_eq!(with(Some(false), Some(0)).unwrap().logprobs, None);
        assert_eq!(with(Some(true), None).unwrap().logprobs, Some(0));
        assert_eq!(with(Some(true), Some(20)).unwrap().logprobs, Some(20));
        for bad in [with(None, Some(3)), with(Some(false), Some(3))] {
            let e = bad.unwrap_err();
            assert_eq!(
                e.to_string(),
                "`top_logprobs` needs `logprobs: true`. Given: 3"
            );
            assert_eq!(
                crate::front::FrontError::from(e).param.as_deref(),
                Some("top_logprobs")
            );
        }
        assert_eq!(
            with(Some(true), Some(21)).unwrap_err().to_string(),
            "`top_logprobs` must be <= 20. Given: 21"
        );
        // `/v1/completions` names its own field.
        let legacy = check(RawRequest {
            logprobs: Some(true),
            top_logprobs: Some(50),
            top_logprobs_field: "logprobs",
            ..good()
        });
        assert_eq!(
            legacy.unwrap_err().to_string(),
            "`logprobs` must be <= 20. Given: 50"
        );
    }

    #[test]
    fn chat_template_kwargs_are_checked_against_the_template() {
        let with = |model: &str, pairs: Vec<(&str, TemplateValue)>| RawRequest {
            model: model.into(),
            chat_template_kwargs: pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            prompt: None,
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            }],
            ..good()
        };
        let off = || vec![("enable_thinking", TemplateValue::Bool(false))];
        let r = check(with("qwen3", off())).unwrap();
        assert_eq!(
            r.chat_template_kwargs.get("enable_thinking"),
            Some(&TemplateValue::Bool(false))
        );
        assert!(check(good()).unwrap().chat_template_kwargs.is_empty());
        let field = |wire: RawRequest| match check(wire) {
            Err(e) => (
                crate::front::FrontError::from(e.clone())
                    .param
                    .unwrap_or_default(),
                e.to_string(),
            ),
            Ok(_) => panic!("accepted"),
        };
        let (f, m) = field(with("smollm2", off()));
        assert_eq!(f, "chat_template_kwargs.enable_thinking");
        assert!(
            m.contains("model `smollm2`") && m.contains("takes no options"),
            "{m}"
        );
        let (f, m) = field(with(
            "qwen3",
            vec![("thinking", TemplateValue::Bool(false))],
        ));
        assert_eq!(f, "chat_template_kwargs.thinking");
        assert!(m.contains("it takes: enable_thinking"), "{m}");
        let (f, m) = field(with(
            "qwen3",
            vec![("add_generation_prompt", TemplateValue::Bool(false))],
        ));
        assert_eq!(f, "chat_template_kwargs.add_generation_prompt");
        assert!(m.contains("reserved"), "{m}");
        for bad in ["", "a-b", "1x", "été", &"x".repeat(65)] {
            let (f, m) = field(with("qwen3", vec![(bad, TemplateValue::Int(1))]));
            assert_eq!(f, "chat_template_kwargs", "{bad:?}");
            assert!(m.contains("identifiers"), "{m}");
        }
        let long = TemplateValue::Str("x".repeat(MAX_TEMPLATE_KWARG_VALUE_BYTES + 1));
        let (f, m) = field(with("qwen3", vec![("enable_thinking", long)]));
        assert_eq!(f, "chat_template_kwargs.enable_thinking");
        assert!(m.contains("<= 256 bytes. Given: 257 bytes"), "{m}");
        let names: Vec<String> = (0..=MAX_TEMPLATE_KWARGS).map(|i| format!("k{i}")).collect();
        let many = names
            .iter()
            .map(|n| (n.as_str(), TemplateValue::Int(1)))
            .collect();
        let (f, m) = field(with("qwen3", many));
        assert_eq!(f, "chat_template_kwargs");
        assert!(m.contains("at most 16 keys. Given: 17 keys"), "{m}");
        let raw = RawRequest {
            prompt: Some("hi".into()),
            messages: Vec::new(),
            ..with("qwen3", off())
        };
        let (f, m) = field(raw);
        assert_eq!(f, "chat_template_kwargs");
        assert!(m.contains("needs `messages`"), "{m}");
    }

    #[test]
    fn zero_is_distinguished_from_absent() {
        let request = check(RawRequest {
            temperature: Some(0.0),
            top_k: Some(0),
            min_p: Some(0.0),
            seed: Some(0),
            ..good()
        })
        .unwrap();
        assert_eq!(request.sampling.seed, Some(0));
        assert_eq!(request.sampling.temperature, 0.0);
    }

    #[test]
    fn tgi_style_messages() {
        assert_eq!(
            message(RawRequest {
                max_tokens: Some(5000),
                ..good()
            }),
            "`max_tokens` must be <= 2048. Given: 5000"
        );
        assert_eq!(
            message(RawRequest {
                max_tokens: Some(0),
                ..good()
            }),
            "`max_tokens` must be >= 1. Given: 0"
        );
        assert_eq!(
            message(RawRequest {
                temperature: Some(f32::NAN),
                ..good()
            }),
            "`temperature` must be in [0, 2]. Given: NaN"
        );
        assert_eq!(
            message(RawRequest {
                top_p: Some(0.0),
                ..good()
            }),
            "`top_p` must be in (0, 1]. Given: 0"
        );
        assert_eq!(
            message(RawRequest {
                min_p: Some(1.5),
                ..good()
            }),
            "`min_p` must be in [0, 1]. Given: 1.5"
        );
        assert_eq!(
            message(RawRequest {
                repetition_penalty: Some(0.0),
                ..good()
            }),
            "`repetition_penalty` must be in (0, 2]. Given: 0"
        );
        assert_eq!(
            message(RawRequest {
                top_k: Some(5000),
                ..good()
            }),
            "`top_k` must be <= 1000. Given: 5000"
        );
    }

    #[test]
    fn prompt_shape() {
        assert_eq!(
            check(RawRequest {
                prompt: None,
                ..good()
            })
            .unwrap_err(),
            ValidationError::NoPrompt
        );
        let both = RawRequest {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            }],
            ..good()
        };
        assert_eq!(check(both).unwrap_err(), ValidationError::PromptAndMessages);
        assert_eq!(
            message(RawRequest {
                prompt: Some(String::new()),
                ..good()
            }),
            "`prompt` must not be empty"
        );
        let bad_role = RawRequest {
            prompt: None,
            messages: vec![
                ChatMessage {
                    role: "user".into(),
                    content: "hi".into(),
                    ..Default::default()
                },
                ChatMessage {
                    role: "bot".into(),
                    content: "hi".into(),
                    ..Default::default()
                },
            ],
            ..good()
        };
        assert_eq!(
            message(bad_role),
            "`messages[1].role` must be one of system, user, assistant, tool. Given: \"bot\""
        );
        let empty = RawRequest {
            prompt: None,
            messages: vec![ChatMessage {
                role: "user".into(),
                content: String::new(),
                ..Default::default()
            }],
            ..good()
        };
        assert_eq!(message(empty), "`messages[0].content` must not be empty");
    }

    #[test]
    fn limits_on_sizes() {
        let limits = Limits {
            max_prompt_bytes: 4,
            max_stop_strings: 1,
            ..Limits::default()
        };
        let err = validate(good(), &models(), &limits, caller("x")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`prompt` must be <= 4 bytes. Given: 5 bytes"
        );
        let err = validate(
            RawRequest {
                prompt: Some("hi".into()),
                stop: vec!["a".into(), "b".into()],
                ..good()
            },
            &models(),
            &limits,
            caller("x"),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "`stop` must be <= 1 strings. Given: 2 strings"
        );
        assert_eq!(
            message(RawRequest {
                stop: vec!["x".repeat(129)],
                ..good()
            }),
            "`stop[0]` must be <= 128 bytes. Given: 129 bytes"
        );
    }

    #[test]
    fn unknown_model_and_bad_request_id() {
        assert_eq!(
            check(RawRequest {
                model: "gpt-9".into(),
                ..good()
            })
            .unwrap_err(),
            ValidationError::UnknownModel {
                model: "gpt-9".into(),
                served: "smollm2, qwen3".into()
            }
        );
        assert_eq!(
            check(RawRequest {
                model: String::new(),
                ..good()
            })
            .unwrap_err()
            .to_string(),
            "`model` must not be empty"
        );
        let err = validate(good(), &models(), &Limits::default(), caller("a\nb")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("`request_id` must be printable ASCII"),
            "{err}"
        );
    }

    #[test]
    fn unknown_cache_policy_is_refused() {
        let err = check(RawRequest {
            cache_policy: Err("9".into()),
            ..good()
        })
        .unwrap_err();
        assert!(
            err.to_string().starts_with("`cache_policy` must be one of"),
            "{err}"
        );
    }

    fn with_session(
        header: Option<&str>,
        field: Option<&str>,
        user: Option<&str>,
    ) -> Result<Option<String>, ValidationError> {
        let wire = RawRequest {
            session_id: field.map(str::to_owned),
            user: user.map(str::to_owned),
            ..good()
        };
        let caller = Caller {
            session: header.map(str::to_owned),
            ..caller("id")
        };
        validate(wire, &models(), &Limits::default(), caller).map(|r| r.session)
    }

    #[test]
    fn session_key_header_then_field_then_user() {
        assert_eq!(with_session(None, None, None), Ok(None));
        let s = |v: &str| Ok(Some(v.to_owned()));
        assert_eq!(with_session(Some("h"), None, Some("u")), s("h"));
        assert_eq!(with_session(None, Some("f"), Some("u")), s("f"));
        assert_eq!(with_session(Some("k"), Some("k"), None), s("k"));
        assert_eq!(with_session(None, None, Some("Zoë Ng")), s("Zoë Ng"));
        assert_eq!(with_session(None, None, Some("")), Ok(None));
    }

    #[test]
    fn bad_session_keys_are_refused_naming_the_field() {
        let msg = |r: Result<Option<String>, ValidationError>| r.unwrap_err().to_string();
        assert_eq!(
            msg(with_session(Some("a"), Some("b"), None)),
            "`session_id` must be equal to `x-session-id` when both are given (send one). \
             Given: \"b\" and x-session-id \"a\""
        );
        assert!(msg(with_session(Some("café"), None, None))
            .starts_with("`x-session-id` must be visible ASCII"),);
        assert!(msg(with_session(None, Some("a b"), None))
            .starts_with("`session_id` must be visible ASCII"));
        assert_eq!(
            msg(with_session(None, Some(&"s".repeat(257)), None)),
            "`session_id` must be <= 256 bytes. Given: 257 bytes"
        );
        assert!(msg(with_session(None, None, Some(&"u".repeat(257))))
            .starts_with("`user` must be <= 256 bytes"));
        assert!(with_session(Some(&"s".repeat(256)), None, None).is_ok());
    }

    fn with_tenant(
        header: Option<&str>,
        key: Option<&str>,
    ) -> Result<Option<String>, ValidationError> {
        let caller = Caller {
            tenant: header.map(str::to_owned),
            key_tenant: key.map(str::to_owned),
            ..caller("id")
        };
        validate(good(), &models(), &Limits::default(), caller).map(|r| r.tenant)
    }

    #[test]
    fn tenants_are_checked_and_held_to_the_key() {
        let t = |v: &str| Ok(Some(v.to_owned()));
        assert_eq!(with_tenant(None, None), Ok(None));
        assert_eq!(with_tenant(Some("acme"), None), t("acme"));
        assert_eq!(with_tenant(None, Some("acme")), t("acme"));
        assert_eq!(with_tenant(Some("acme"), Some("acme")), t("acme"));
        assert_eq!(
            with_tenant(Some("globex"), Some("acme")).unwrap_err(),
            ValidationError::TenantNotAllowed {
                given: "\"globex\"".into()
            }
        );
        for bad in ["café", "租户", "a b", "a, b", "tab\there"] {
            let err = with_tenant(Some(bad), None).unwrap_err().to_string();
            assert!(
                err.starts_with("`x-qnode-tenant` must be visible ASCII"),
                "{bad}: {err}"
            );
        }
        assert_eq!(
            with_tenant(Some(&"t".repeat(129)), None)
                .unwrap_err()
                .to_string(),
            "`x-qnode-tenant` must be <= 128 bytes. Given: 129 bytes"
        );
    }
}
