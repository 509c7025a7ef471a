//! The canonical cache key: SHA-256 over tagged, length-prefixed fields, so no two different
//! requests can produce the same byte stream (`("ab","c")` and `("a","bc")` differ).

use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;

use crate::engine::{GenerationRequest, PromptInput};
use crate::types::{Grammar, TemplateValue, ToolChoice};

/// What identifies the weights and template that produced an answer. The backend's owner gives
/// one per model id; a new file (different digest) never serves answers of the old one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelIdentity {
    /// Model id as requests name it.
    pub model_id: String,
    /// Hex SHA-256 (or any stable digest) of the model file.
    pub file_digest: String,
    /// Quantization the weights run in, e.g. `q8_0`.
    pub quant: String,
    /// Digest or name of the chat template rendering `Chat` prompts.
    pub template_id: String,
}

/// A 32-byte cache key; `Display` gives lower-case hex, the form used in Redis keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// Lower-case hex of the key.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the hex form; `None` when it is not 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = hex::decode(s).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Field tags. Never reuse or renumber one: old keys would alias new ones.
mod tag {
    pub const MODEL_ID: u8 = 1;
    pub const FILE_DIGEST: u8 = 2;
    pub const QUANT: u8 = 3;
    pub const TEMPLATE: u8 = 4;
    pub const PROMPT_TEXT: u8 = 10;
    pub const CHAT_TURNS: u8 = 11;
    pub const ROLE: u8 = 12;
    pub const CONTENT: u8 = 13;
    pub const TEMPERATURE: u8 = 20;
    pub const TOP_P: u8 = 21;
    pub const TOP_K: u8 = 22;
    pub const MIN_P: u8 = 23;
    pub const REPETITION_PENALTY: u8 = 24;
    pub const SEED: u8 = 25;
    pub const NO_SEED: u8 = 26;
    pub const MAX_TOKENS: u8 = 27;
    pub const STOPS: u8 = 28;
    pub const STOP: u8 = 29;
    pub const TENANT: u8 = 30;
    pub const NO_TENANT: u8 = 31;
    // Output constraints; absent from an unconstrained request's key (so keys from before
    // constraints existed stay valid), and never equal to one another.
    pub const JSON_OBJECT: u8 = 40;
    pub const JSON_SCHEMA: u8 = 41;
    pub const REGEX: u8 = 42;
    pub const LARK: u8 = 43;
    // Chat-template options (`chat_template_kwargs`); absent without any (old keys stay valid).
    pub const TEMPLATE_KWARGS: u8 = 50;
    pub const KWARG_KEY: u8 = 51;
    pub const KWARG_BOOL: u8 = 52;
    pub const KWARG_INT: u8 = 53;
    pub const KWARG_FLOAT: u8 = 54;
    pub const KWARG_STR: u8 = 55;
    // Tools (absent without any, and with `tool_choice: none`) and a message's tool parts
    // (absent from a turn without them): old keys stay valid.
    pub const TOOLS: u8 = 60;
    pub const TOOL_NAME: u8 = 61;
    pub const TOOL_DESCRIPTION: u8 = 62;
    pub const TOOL_NO_DESCRIPTION: u8 = 63;
    pub const TOOL_PARAMETERS: u8 = 64;
    pub const TOOL_CHOICE_AUTO: u8 = 65;
    pub const TOOL_CHOICE_REQUIRED: u8 = 66;
    pub const TOOL_CHOICE_FUNCTION: u8 = 67;
    pub const TURN_TOOL_CALLS: u8 = 70;
    pub const TURN_CALL_ID: u8 = 71;
    pub const TURN_CALL_NAME: u8 = 72;
    pub const TURN_CALL_ARGUMENTS: u8 = 73;
    pub const TURN_TOOL_CALL_ID: u8 = 74;
}

/// Version of the key layout, hashed first.
const DOMAIN: &[u8] = b"qnode-answer-cache-key/v1";

struct KeyHasher(Sha256);

impl KeyHasher {
    fn field(&mut self, tag: u8, bytes: &[u8]) {
        self.0.update([tag]);
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn f32(&mut self, tag: u8, v: f32) {
        // -0.0 and 0.0 sample alike; NaN never reaches here (requests are validated).
        let v = if v == 0.0 { 0.0 } else { v };
        self.field(tag, &v.to_bits().to_le_bytes());
    }
}

/// Domain of semantic scope keys ([`semantic_scope`]): never equal to an answer key.
const SCOPE_DOMAIN: &[u8] = b"qnode-semantic-scope/v1";

/// Key of `req` as served by the model `identity`. `normalize` applies [`normalize_text`] to the
/// prompt text and chat contents (not roles, not stop strings).
pub fn cache_key(identity: &ModelIdentity, req: &GenerationRequest, normalize: bool) -> CacheKey {
    key_of(DOMAIN, identity, req, normalize, false)
}

/// The semantic tier's scope of a chat request: every field of its [`cache_key`] (model, system
/// prompt and earlier turns, sampling, limits, stops, tenant, constraint, template options) but
/// the last turn's text, which is what the tier compares by meaning. Two requests share a scope
/// exactly when they would share an answer key after swapping their last turns' texts.
pub fn semantic_scope(
    identity: &ModelIdentity,
    req: &GenerationRequest,
    normalize: bool,
) -> CacheKey {
    key_of(SCOPE_DOMAIN, identity, req, normalize, true)
}

fn key_of(
    domain: &[u8],
    identity: &ModelIdentity,
    req: &GenerationRequest,
    normalize: bool,
    blank_last: bool,
) -> CacheKey {
    let mut h = KeyHasher(Sha256::new());
    h.0.update(domain);
    h.field(tag::MODEL_ID, identity.model_id.as_bytes());
    h.field(tag::FILE_DIGEST, identity.file_digest.as_bytes());
    h.field(tag::QUANT, identity.quant.as_bytes());
    h.field(tag::TEMPLATE, identity.template_id.as_bytes());
    fn text(s: &str, normalize: bool) -> std::borrow::Cow<'_, str> {
        if normalize {
            std::borrow::Cow::Owned(normalize_text(s))
        } else {
            std::borrow::Cow::Borrowed(s)
        }
    }
    match &req.input {
        PromptInput::Text(t) => h.field(tag::PROMPT_TEXT, text(t, normalize).as_bytes()),
        PromptInput::Chat(turns) => {
            h.field(tag::CHAT_TURNS, &(turns.len() as u64).to_le_bytes());
            for (i, m) in turns.iter().enumerate() {
                h.field(tag::ROLE, m.role.as_bytes());
                if blank_last && i + 1 == turns.len() {
                    h.field(tag::CONTENT, &[]);
                } else {
                    h.field(tag::CONTENT, text(&m.content, normalize).as_bytes());
                }
                if !m.tool_calls.is_empty() {
                    h.field(
                        tag::TURN_TOOL_CALLS,
                        &(m.tool_calls.len() as u64).to_le_bytes(),
                    );
                    for call in &m.tool_calls {
                        h.field(tag::TURN_CALL_ID, call.id.as_bytes());
                        h.field(tag::TURN_CALL_NAME, call.name.as_bytes());
                        h.field(tag::TURN_CALL_ARGUMENTS, call.arguments.as_bytes());
                    }
                }
                if let Some(id) = &m.tool_call_id {
                    h.field(tag::TURN_TOOL_CALL_ID, id.as_bytes());
                }
            }
        }
    }
    let s = &req.sampling;
    h.f32(tag::TEMPERATURE, s.temperature);
    h.f32(tag::TOP_P, s.top_p);
    h.field(tag::TOP_K, &s.top_k.to_le_bytes());
    h.f32(tag::MIN_P, s.min_p);
    h.f32(tag::REPETITION_PENALTY, s.repetition_penalty);
    match s.seed {
        Some(seed) => h.field(tag::SEED, &seed.to_le_bytes()),
        None => h.field(tag::NO_SEED, &[]),
    }
    h.field(tag::MAX_TOKENS, &req.max_tokens.to_le_bytes());
    h.field(tag::STOPS, &(req.stop.len() as u64).to_le_bytes());
    for stop in &req.stop {
        h.field(tag::STOP, stop.as_bytes());
    }
    match &req.tenant {
        Some(t) => h.field(tag::TENANT, t.as_bytes()),
        None => h.field(tag::NO_TENANT, &[]),
    }
    // The grammar, not the field it came from: the same schema over gRPC and HTTP is one answer.
    match req.constraint.as_ref().map(|c| &c.grammar) {
        None => {}
        Some(Grammar::JsonObject) => h.field(tag::JSON_OBJECT, &[]),
        Some(Grammar::JsonSchema(schema)) => h.field(tag::JSON_SCHEMA, schema.as_bytes()),
        Some(Grammar::Regex(rx)) => h.field(tag::REGEX, rx.as_bytes()),
        Some(Grammar::Lark(g)) => h.field(tag::LARK, g.as_bytes()),
    }
    // Sorted (a BTreeMap), so the same options in any wire order are one answer.
    if !req.chat_template_kwargs.is_empty() {
        h.field(
            tag::TEMPLATE_KWARGS,
            &(req.chat_template_kwargs.len() as u64).to_le_bytes(),
        );
        for (name, value) in &req.chat_template_kwargs {
            h.field(tag::KWARG_KEY, name.as_bytes());
            match value {
                TemplateValue::Bool(b) => h.field(tag::KWARG_BOOL, &[u8::from(*b)]),
                TemplateValue::Int(i) => h.field(tag::KWARG_INT, &i.to_le_bytes()),
                TemplateValue::Float(f) => h.field(tag::KWARG_FLOAT, &f.to_bits().to_le_bytes()),
                TemplateValue::Str(s) => h.field(tag::KWARG_STR, s.as_bytes()),
            }
        }
    }
    // The tools change the prompt and the output's grammar: a tool answer is never served for
    // a request without them, nor for other tools or another choice.
    if let Some(tools) = &req.tools {
        h.field(tag::TOOLS, &(tools.tools.len() as u64).to_le_bytes());
        for t in &tools.tools {
            h.field(tag::TOOL_NAME, t.name.as_bytes());
            match &t.description {
                Some(d) => h.field(tag::TOOL_DESCRIPTION, d.as_bytes()),
                None => h.field(tag::TOOL_NO_DESCRIPTION, &[]),
            }
            h.field(tag::TOOL_PARAMETERS, t.parameters.as_bytes());
        }
        match &tools.choice {
            ToolChoice::Auto => h.field(tag::TOOL_CHOICE_AUTO, &[]),
            ToolChoice::Required => h.field(tag::TOOL_CHOICE_REQUIRED, &[]),
            ToolChoice::Function(name) => h.field(tag::TOOL_CHOICE_FUNCTION, name.as_bytes()),
        }
    }
    CacheKey(h.0.finalize().into())
}

/// NFKC, then trim, then every run of whitespace becomes one space.
pub fn normalize_text(s: &str) -> String {
    let nfkc: String = s.nfkc().collect();
    let mut out = String::with_capacity(nfkc.len());
    for word in nfkc.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CachePolicy, ChatMessage};

    fn identity() -> ModelIdentity {
        ModelIdentity {
            model_id: "m".into(),
            file_digest: "d1".into(),
            quant: "q8_0".into(),
            template_id: "t".into(),
        }
    }

    fn request() -> GenerationRequest {
        GenerationRequest::new("r", "m", PromptInput::Text("hello".into()), 16)
    }

    fn key(r: &GenerationRequest) -> CacheKey {
        cache_key(&identity(), r, false)
    }

    fn tools(choice: ToolChoice, description: Option<&str>) -> Option<crate::types::Tools> {
        Some(crate::types::Tools {
            tools: vec![crate::types::Tool {
                name: "f".into(),
                description: description.map(str::to_owned),
                parameters: r#"{"type":"object"}"#.into(),
            }],
            choice,
        })
    }

    fn call(id: &str, arguments: &str) -> Vec<crate::types::ToolCall> {
        vec![crate::types::ToolCall {
            id: id.into(),
            name: "f".into(),
            arguments: arguments.into(),
        }]
    }

    fn chat_turn(
        tool_calls: Vec<crate::types::ToolCall>,
        tool_call_id: Option<&str>,
    ) -> PromptInput {
        PromptInput::Chat(vec![ChatMessage {
            role: "assistant".into(),
            content: "hello".into(),
            tool_calls,
            tool_call_id: tool_call_id.map(str::to_owned),
        }])
    }

    #[test]
    fn every_output_changing_field_changes_the_key() {
        let base = key(&request());
        type Change = Box<dyn Fn(&mut GenerationRequest)>;
        let variants: Vec<(&str, Change)> = vec![
            ("temperature", Box::new(|r| r.sampling.temperature = 0.5)),
            ("top_p", Box::new(|r| r.sampling.top_p = 0.9)),
            ("top_k", Box::new(|r| r.sampling.top_k = 40)),
            ("min_p", Box::new(|r| r.sampling.min_p = 0.05)),
            ("rep", Box::new(|r| r.sampling.repetition_penalty = 1.1)),
            ("seed", Box::new(|r| r.sampling.seed = Some(0))),
            ("max_tokens", Box::new(|r| r.max_tokens = 17)),
            ("stop", Box::new(|r| r.stop = vec!["x".into()])),
            ("tenant", Box::new(|r| r.tenant = Some("a".into()))),
            ("empty tenant", Box::new(|r| r.tenant = Some(String::new()))),
            (
                "prompt",
                Box::new(|r| r.input = PromptInput::Text("hello!".into())),
            ),
            ("model", Box::new(|r| r.model = "other".into())),
            (
                "json_object",
                Box::new(|r| r.constraint = constrained(Grammar::JsonObject)),
            ),
            (
                "json_schema",
                Box::new(|r| r.constraint = constrained(Grammar::JsonSchema("{}".into()))),
            ),
            (
                "other json_schema",
                Box::new(|r| {
                    r.constraint = constrained(Grammar::JsonSchema(r#"{"type":"object"}"#.into()))
                }),
            ),
            (
                "regex",
                Box::new(|r| r.constraint = constrained(Grammar::Regex("{}".into()))),
            ),
            (
                "lark",
                Box::new(|r| r.constraint = constrained(Grammar::Lark("{}".into()))),
            ),
            (
                "enable_thinking true",
                Box::new(|r| r.chat_template_kwargs = kwarg(TemplateValue::Bool(true))),
            ),
            (
                "enable_thinking false",
                Box::new(|r| r.chat_template_kwargs = kwarg(TemplateValue::Bool(false))),
            ),
            (
                "enable_thinking 1",
                Box::new(|r| r.chat_template_kwargs = kwarg(TemplateValue::Int(1))),
            ),
            (
                "enable_thinking 1.0",
                Box::new(|r| r.chat_template_kwargs = kwarg(TemplateValue::Float(1.0))),
            ),
            (
                "enable_thinking \"1\"",
                Box::new(|r| r.chat_template_kwargs = kwarg(TemplateValue::Str("1".into()))),
            ),
            (
                "tools auto",
                Box::new(|r| r.tools = tools(ToolChoice::Auto, None)),
            ),
            (
                "tools required",
                Box::new(|r| r.tools = tools(ToolChoice::Required, None)),
            ),
            (
                "tools named",
                Box::new(|r| r.tools = tools(ToolChoice::Function("f".into()), None)),
            ),
            (
                "tools described",
                Box::new(|r| r.tools = tools(ToolChoice::Auto, Some("d"))),
            ),
            (
                "turn with a call",
                Box::new(|r| r.input = chat_turn(call("call_1", "{}"), None)),
            ),
            (
                "turn with another call id",
                Box::new(|r| r.input = chat_turn(call("call_2", "{}"), None)),
            ),
            (
                "turn with other arguments",
                Box::new(|r| r.input = chat_turn(call("call_1", r#"{"a":1}"#), None)),
            ),
            (
                "tool result",
                Box::new(|r| r.input = chat_turn(Vec::new(), Some("call_1"))),
            ),
            (
                "plain turn",
                Box::new(|r| r.input = chat_turn(Vec::new(), None)),
            ),
        ];
        let mut seen = std::collections::HashSet::new();
        for (name, change) in variants {
            let mut r = request();
            change(&mut r);
            let k = key(&r);
            // The model field is routed by identity, not hashed: same identity, same key.
            if name == "model" {
                assert_eq!(k, base, "{name}");
                continue;
            }
            assert_ne!(k, base, "{name} must change the key");
            assert!(seen.insert(k), "{name} collides with another variant");
        }
    }

    fn kwarg(value: TemplateValue) -> crate::types::TemplateKwargs {
        [("enable_thinking".to_string(), value)]
            .into_iter()
            .collect()
    }

    fn constrained(grammar: Grammar) -> Option<crate::types::OutputConstraint> {
        Some(crate::types::OutputConstraint {
            grammar,
            field: "response_format".into(),
        })
    }

    #[test]
    fn the_constraint_field_name_does_not_change_the_key() {
        let mut http = request();
        http.constraint = constrained(Grammar::JsonSchema("{}".into()));
        let mut grpc = http.clone();
        grpc.constraint.as_mut().unwrap().field = "json_schema".into();
        assert_eq!(key(&http), key(&grpc));
    }

    #[test]
    fn request_id_and_deadline_do_not_change_the_key() {
        let mut r = request();
        r.request_id = "other".into();
        r.deadline = Some(std::time::Instant::now());
        r.cache_policy = CachePolicy::Refresh;
        assert_eq!(key(&r), key(&request()));
    }

    #[test]
    fn identity_fields_change_the_key() {
        let r = request();
        let base = key(&r);
        for change in [
            |i: &mut ModelIdentity| i.file_digest = "d2".into(),
            |i: &mut ModelIdentity| i.quant = "q4_1".into(),
            |i: &mut ModelIdentity| i.template_id = "t2".into(),
            |i: &mut ModelIdentity| i.model_id = "m2".into(),
        ] {
            let mut id = identity();
            change(&mut id);
            assert_ne!(cache_key(&id, &r, false), base);
        }
    }

    #[test]
    fn fields_are_length_prefixed() {
        let mut a = request();
        a.stop = vec!["ab".into(), "c".into()];
        let mut b = request();
        b.stop = vec!["a".into(), "bc".into()];
        assert_ne!(key(&a), key(&b));

        let chat = |turns: &[(&str, &str)]| {
            let mut r = request();
            r.input = PromptInput::Chat(
                turns
                    .iter()
                    .map(|(role, content)| ChatMessage {
                        role: role.to_string(),
                        content: content.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            );
            key(&r)
        };
        assert_ne!(
            chat(&[("user", "ab"), ("user", "c")]),
            chat(&[("user", "a"), ("user", "bc")])
        );
        assert_ne!(chat(&[("user", "hi")]), chat(&[("use", "rhi")]));
        // A text prompt never equals a chat with the same bytes.
        let mut t = request();
        t.input = PromptInput::Text("userhi".into());
        assert_ne!(key(&t), chat(&[("user", "hi")]));
    }

    #[test]
    fn normalization_is_off_by_default_and_merges_spacing_when_on() {
        let mut a = request();
        a.input = PromptInput::Text("  Hello   world\n".into());
        let mut b = request();
        b.input = PromptInput::Text("Hello world".into());
        assert_ne!(
            cache_key(&identity(), &a, false),
            cache_key(&identity(), &b, false)
        );
        assert_eq!(
            cache_key(&identity(), &a, true),
            cache_key(&identity(), &b, true)
        );
        // NFKC folds the full-width form and the ligature.
        assert_eq!(normalize_text("ＡＢ ﬁ"), "AB fi");
    }

    #[test]
    fn hex_round_trips() {
        let k = key(&request());
        assert_eq!(CacheKey::from_hex(&k.to_hex()), Some(k));
        assert_eq!(CacheKey::from_hex("zz"), None);
        assert_eq!(CacheKey::from_hex("abcd"), None);
    }
}
