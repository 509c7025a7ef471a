//! Fuzzing with a bounded budget, run by `cargo test` (so in CI): mutated inputs to every parser
//! that reads bytes from outside the node. Zero panics; every rejection is the parser's typed
//! error. Each target runs `CASES` cases (proptest's shrinking reports a minimal failing input).
//!
//! Targets: the GGUF header reader (mutated real SmolLM2 header and a whole generated model), the
//! tokenizers of both real models on arbitrary bytes and on control-token soup, the chat-template
//! renderer (arbitrary message contents and roles; arbitrary template sources), and the Redis
//! envelope decoder (arbitrary bytes and mutated signed envelopes).

mod common;

use std::sync::LazyLock;

use proptest::prelude::*;
use qnode::cache::entry::{self, EnvelopeError, Expect};
use qnode::cache::semantic::Question;
use qnode::cache::{CacheKey, CachedAnswer, Secret};
use qnode::engine::{ChatMessage, FinishReason};
use qnode::model::chat_template::ChatTemplate;
use qnode::model::gguf::header::read_header;
use qnode::model::tokenizer::GgufTokenizer;
use qnode::model::ModelError;

/// Cases per target: 7 targets × 256 stay well under 30 s on a loaded 2-core box.
const CASES: u32 = 256;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        // Failures are reported with their input; no files under tests/.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The first 256 KiB of the real SmolLM2 file: magic, counts and the first metadata entries
/// (the vocabulary array starts inside it).
static SMOLLM_HEAD: LazyLock<Vec<u8>> = LazyLock::new(|| {
    use std::io::Read;
    let mut head = vec![0; 256 * 1024];
    std::fs::File::open(common::model_file("smollm2"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    head
});

/// A whole generated model file (tiny Llama): header, tensor infos and data.
static TINY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    qnode::model::tiny::write_tiny_llama(&path, 3).unwrap();
    std::fs::read(path).unwrap()
});

fn tokenizer(id: &str) -> GgufTokenizer {
    let bytes = std::fs::read(common::model_file(id)).unwrap();
    GgufTokenizer::from_gguf(&read_header(&bytes).unwrap()).unwrap()
}

static SMOLLM: LazyLock<GgufTokenizer> = LazyLock::new(|| tokenizer("smollm2"));
static GEMMA: LazyLock<GgufTokenizer> = LazyLock::new(|| tokenizer("gemma3-270m"));

/// SmolLM2's own chat template, bound to its tokens.
static SMOLLM_TEMPLATE: LazyLock<ChatTemplate> = LazyLock::new(|| {
    let bytes = std::fs::read(common::model_file("smollm2")).unwrap();
    ChatTemplate::from_gguf(&read_header(&bytes).unwrap(), &SMOLLM)
        .unwrap()
        .expect("SmolLM2 has a chat template")
});

/// Up to `n` byte edits (position, value) applied within the first `span` bytes, then an
/// optional truncation.
fn mutations(n: usize) -> impl Strategy<Value = (Vec<(usize, u8)>, Option<usize>)> {
    (
        proptest::collection::vec((any::<usize>(), any::<u8>()), 1..=n),
        proptest::option::of(any::<usize>()),
    )
}

fn mutate(base: &[u8], span: usize, edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut bytes = base.to_vec();
    let span = span.min(bytes.len());
    for &(at, v) in edits {
        bytes[at % span] = v;
    }
    if let Some(cut) = cut {
        bytes.truncate(cut % (bytes.len() + 1));
    }
    bytes
}

/// Pieces that make a tokenizer or template work hard: control tokens of both models, template
/// syntax, odd whitespace and multi-byte text.
fn soup() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("<|im_start|>".to_string()),
        Just("<|im_end|>".to_string()),
        Just("<|endoftext|>".to_string()),
        Just("<start_of_turn>".to_string()),
        Just("<end_of_turn>".to_string()),
        Just("<bos>".to_string()),
        Just("{{ messages }}".to_string()),
        Just("{% endfor %}".to_string()),
        Just("\u{E000}".to_string()),
        Just(" \n\t\r".to_string()),
        Just("日本語 😀 é".to_string()),
        ".{0,8}",
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn gguf_header_of_real_smollm2_mutated(
        (edits, cut) in mutations(8),
    ) {
        // Mutations land in the first 4 KiB: magic, counts, keys, value types, array lengths.
        let bytes = mutate(&SMOLLM_HEAD, 4096, &edits, cut);
        // Typed by construction: the only error type is `HeaderError`. What matters is no panic
        // and no huge allocation (the process would abort).
        let _ = read_header(&bytes);
    }

    #[test]
    fn gguf_whole_tiny_model_mutated(
        (edits, cut) in mutations(16),
    ) {
        let bytes = mutate(&TINY, TINY.len(), &edits, cut);
        if let Ok(content) = read_header(&bytes) {
            // A header that reads must describe tensors that lie inside the file.
            for (name, info) in &content.tensor_infos {
                let start = content.tensor_data_offset + info.offset;
                prop_assert!(start <= bytes.len() as u64, "{name} starts past the end");
            }
            // Reading every tensor's bytes through the loader is then safe.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.gguf");
            std::fs::write(&path, &bytes).unwrap();
            let file = qnode::model::gguf::GgufFile::open(&path).unwrap();
            for name in content.tensor_infos.keys() {
                let _ = file.raw_tensor(name);
            }
        }
    }

    #[test]
    fn tokenizers_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        for tok in [&*SMOLLM, &*GEMMA] {
            let ids = tok.encode(&text, true);
            prop_assert!(ids.is_ok(), "{ids:?}");
            let plain = tok.encode_plain(&text, false);
            prop_assert!(plain.is_ok(), "{plain:?}");
            // Decoding any id, in range or not, is Ok or a typed tokenizer error.
            let mut any_ids = ids.unwrap();
            any_ids.extend(bytes.iter().map(|&b| u32::from(b) * 4099));
            match tok.decode(&any_ids) {
                Ok(_) | Err(ModelError::Tokenizer(_)) => {}
                Err(other) => prop_assert!(false, "untyped decode error {other}"),
            }
        }
    }

    #[test]
    fn user_text_never_yields_control_tokens(text in soup()) {
        for tok in [&*SMOLLM, &*GEMMA] {
            let ids = tok.encode_plain(&text, false).unwrap();
            for special in ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>"] {
                if let Some(id) = tok.token_to_id(special) {
                    prop_assert!(!ids.contains(&id), "{special} from {text:?}");
                }
            }
        }
    }

    #[test]
    fn chat_template_renders_any_messages(
        messages in proptest::collection::vec(
            (prop_oneof![Just("system"), Just("user"), Just("assistant"), Just("tool"), Just("")], soup()),
            0..5,
        ),
    ) {
        let messages: Vec<ChatMessage> = messages
            .into_iter()
            .map(|(role, content)| ChatMessage { role: role.into(), content, ..Default::default() })
            .collect();
        match SMOLLM_TEMPLATE.render_guarded(&messages, true, &Default::default(), |c| SMOLLM.find_control_tokens(c)) {
            Ok(rendered) => {
                // Guarding never changes the text, only says which parts are user text.
                let plain = SMOLLM_TEMPLATE.render(&messages, true).unwrap();
                prop_assert_eq!(&rendered.text, &plain);
                let ids = SMOLLM.encode_marked(&rendered.text, &rendered.user, false).unwrap();
                let im_start = SMOLLM.token_to_id("<|im_start|>").unwrap();
                // One `<|im_start|>` per message, the default system turn and the generation
                // prompt at most: none from contents.
                let from_markup = ids.iter().filter(|&&i| i == im_start).count();
                prop_assert!(from_markup <= messages.len() + 2, "{from_markup} for {messages:?}");
            }
            Err(ModelError::Template(_)) => {}
            Err(other) => prop_assert!(false, "untyped template error {other}"),
        }
    }

    #[test]
    fn chat_template_sources_compile_or_fail_typed(source in soup()) {
        match ChatTemplate::new(source, "<s>".into(), "</s>".into()) {
            Ok(t) => {
                let m = [ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() }];
                match t.render(&m, true) {
                    Ok(_) | Err(ModelError::Template(_)) => {}
                    Err(other) => prop_assert!(false, "untyped render error {other}"),
                }
            }
            Err(ModelError::Template(_)) => {}
            Err(other) => prop_assert!(false, "untyped compile error {other}"),
        }
    }

    #[test]
    fn redis_envelope_decoder(
        noise in proptest::collection::vec(any::<u8>(), 0..256),
        (edits, cut) in mutations(4),
        text in soup(),
        question in proptest::option::of(soup()),
    ) {
        let secret = Secret::new("fuzz-fleet-secret-0123456789");
        let key = CacheKey([9; 32]);
        let now_ms = 1_700_000_000_000;
        let expect = Expect {
            key: &key,
            digests: &["d"],
            max_bytes: 1 << 20,
            now_ms,
            max_age_ms: 60_000,
            secret: &secret,
        };
        let answer = CachedAnswer {
            text,
            finish_reason: FinishReason::Stop,
            prompt_tokens: 3,
            completion_tokens: 4,
            created_at_ms: now_ms,
            question: question.map(|text| Question { scope: CacheKey([4; 32]), text }),
        };
        let good = entry::encode(&key, "d", &answer, &secret);
        // A blank or oversized question is left out when writing; the answer is stored.
        let mut answer = answer;
        answer.question = answer
            .question
            .filter(|q| !q.text.trim().is_empty() && q.text.len() <= entry::MAX_QUESTION_BYTES);
        prop_assert_eq!(entry::decode(&good, &expect), Ok(answer.clone()));
        let _: Result<_, EnvelopeError> = entry::decode(&noise, &expect);
        let mutated = mutate(&good, good.len(), &edits, cut);
        if let Ok(got) = entry::decode(&mutated, &expect) {
            // Only an edit that changed nothing the MAC covers (JSON spacing, an escape spelled
            // otherwise) may still be accepted, and then it is the same answer.
            prop_assert_eq!(got, answer);
        }
    }
}
