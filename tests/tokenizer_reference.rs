//! The tokenizer and chat template rebuilt from GGUF metadata against llama.cpp's outputs for the same
//! files (tests/data/reference): ids, BOS handling, template rendering, streaming detokenization.

mod common;

use candle_core::quantized::gguf_file::Content;
use qnode::engine::detokenizer::IncrementalDecoder;
use qnode::engine::ChatMessage;
use qnode::model::chat_template::ChatTemplate;
use qnode::model::tokenizer::GgufTokenizer;
use serde_json::Value;

const SMOLLM: (&str, &str) = ("smollm2", "smollm2-q4_1");
const GEMMA: (&str, &str) = ("gemma3-270m", "gemma3-270m-q4_k_m");

fn content(model: &str) -> Content {
    let path = common::model_file(model);
    let mut file = std::fs::File::open(&path).unwrap();
    Content::read(&mut file).unwrap()
}

fn load((model, reference): (&str, &str)) -> (Content, GgufTokenizer, Value) {
    let content = content(model);
    let tokenizer = GgufTokenizer::from_gguf(&content).unwrap();
    (content, tokenizer, common::reference(reference))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).unwrap()
}

fn check_tokenize(model: (&str, &str)) {
    let (_, tok, reference) = load(model);
    let cases = reference["tokenize"].as_array().unwrap();
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, false).unwrap();
        if got != ids(&case["ids"]) {
            failures.push(format!(
                "{text:?}: got {got:?}, llama.cpp {:?}",
                ids(&case["ids"])
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn check_prompt_ids_with_bos(model: (&str, &str)) {
    let (_, tok, reference) = load(model);
    for case in reference["greedy"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            tok.encode(prompt, true).unwrap(),
            ids(&case["prompt_ids"]),
            "{prompt:?}"
        );
    }
}

fn check_decode_roundtrip(model: (&str, &str)) {
    let (_, tok, reference) = load(model);
    for case in reference["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        // Control tokens are skipped by decode, so texts that spell them cannot round-trip.
        if text.contains("<|im_start|>") && tok.token_to_id("<|im_start|>").is_some() {
            continue;
        }
        assert_eq!(tok.decode(&ids(&case["ids"])).unwrap(), text);
    }
}

fn check_streaming_equals_full_decode(model: (&str, &str)) {
    let (_, tok, reference) = load(model);
    let mut sequences: Vec<Vec<u32>> = Vec::new();
    for case in reference["greedy"].as_array().unwrap() {
        sequences.push(ids(&case["completion_ids"]));
        let mut whole = ids(&case["prompt_ids"]);
        whole.extend(ids(&case["completion_ids"]));
        sequences.push(whole);
    }
    for case in reference["tokenize"].as_array().unwrap() {
        sequences.push(ids(&case["ids"]));
    }
    for seq in sequences {
        let mut decoder = IncrementalDecoder::new();
        let mut streamed = String::new();
        for &id in &seq {
            if let Some(piece) = decoder.push(&tok, id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "{piece:?} in {seq:?}");
                streamed.push_str(&piece);
            }
        }
        streamed.push_str(&decoder.flush(&tok).unwrap());
        assert_eq!(streamed, tok.decode(&seq).unwrap(), "{seq:?}");
    }
}

/// llama.cpp's `completion_text` for its own greedy ids (raw prompts and chat turns, every reference
/// file of the model): our full decode and our streaming decode must both spell exactly that text.
fn check_decode_equals_llama_cpp_text(model: &str, references: &[&str]) {
    let tok = GgufTokenizer::from_gguf(&content(model)).unwrap();
    let mut checked = 0;
    let mut failures = Vec::new();
    for name in references {
        let reference = common::reference(name);
        let cases = reference["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .chain(reference["chat_template"].as_array().into_iter().flatten());
        for case in cases {
            let completion = ids(&case["completion_ids"]);
            let want = case["completion_text"].as_str().unwrap();
            let full = tok.decode(&completion).unwrap();
            let mut decoder = IncrementalDecoder::new();
            let mut streamed = String::new();
            for &id in &completion {
                if let Some(piece) = decoder.push(&tok, id).unwrap() {
                    streamed.push_str(&piece);
                }
            }
            streamed.push_str(&decoder.flush(&tok).unwrap());
            if full != want || streamed != want {
                failures.push(format!(
                    "{name} {:?}: llama.cpp {want:?}, our decode {full:?}, streamed {streamed:?}",
                    case["prompt"].as_str().unwrap_or("(chat)")
                ));
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} reference completions");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{model}: {checked} llama.cpp completions decoded to its exact text");
}

fn check_emoji_cjk_stream_without_replacement_chars(model: (&str, &str)) {
    let (_, tok, _) = load(model);
    for text in [
        "emoji 😀🚀👍🏽 and flags 🇫🇷🇯🇵 — 👩‍👩‍👧‍👦",
        "中文、日本語、한국어 😀 mixed with English",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP: 𐍈 𓀀 🀄",
    ] {
        let ids = tok.encode(text, false).unwrap();
        let mut decoder = IncrementalDecoder::new();
        let mut streamed = String::new();
        for id in ids {
            if let Some(piece) = decoder.push(&tok, id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "{piece:?} for {text:?}");
                streamed.push_str(&piece);
            }
        }
        streamed.push_str(&decoder.flush(&tok).unwrap());
        assert_eq!(streamed, text);
    }
}

#[test]
fn smollm2_ids_equal_llama_cpp() {
    check_tokenize(SMOLLM);
}

#[test]
fn gemma3_ids_equal_llama_cpp() {
    check_tokenize(GEMMA);
}

#[test]
fn smollm2_prompt_ids_without_bos() {
    check_prompt_ids_with_bos(SMOLLM);
}

#[test]
fn gemma3_prompt_ids_start_with_bos() {
    check_prompt_ids_with_bos(GEMMA);
}

#[test]
fn smollm2_decode_round_trips() {
    check_decode_roundtrip(SMOLLM);
}

#[test]
fn gemma3_decode_round_trips() {
    check_decode_roundtrip(GEMMA);
}

#[test]
fn smollm2_streaming_equals_full_decode() {
    check_streaming_equals_full_decode(SMOLLM);
}

#[test]
fn gemma3_streaming_equals_full_decode() {
    check_streaming_equals_full_decode(GEMMA);
}

#[test]
fn smollm2_decodes_llama_cpp_completions_to_its_text() {
    check_decode_equals_llama_cpp_text("smollm2", &["smollm2-q4_1", "smollm2-q8_0"]);
}

#[test]
fn gemma3_decodes_llama_cpp_completions_to_its_text() {
    check_decode_equals_llama_cpp_text("gemma3-270m", &["gemma3-270m-q4_k_m", "gemma3-270m-q8_0"]);
}

#[test]
fn smollm2_streams_emoji_and_cjk_whole() {
    check_emoji_cjk_stream_without_replacement_chars(SMOLLM);
}

#[test]
fn gemma3_streams_emoji_and_cjk_whole() {
    check_emoji_cjk_stream_without_replacement_chars(GEMMA);
}

#[test]
fn stop_ids_and_bos_flags() {
    let (_, smol, _) = load(SMOLLM);
    assert_eq!(smol.eos_id(), 2);
    assert_eq!(smol.bos_id(), Some(1));
    assert!(!smol.add_bos());
    // <|endoftext|> and <|im_end|>.
    assert_eq!(smol.stop_ids(), &[0, 2]);
    assert_eq!(smol.vocab_size(), 49_152);

    let (_, gemma, _) = load(GEMMA);
    assert_eq!(gemma.eos_id(), 1);
    assert_eq!(gemma.bos_id(), Some(2));
    assert!(gemma.add_bos());
    let end_of_turn = gemma.token_to_id("<end_of_turn>").unwrap();
    assert!(gemma.is_stop(1) && gemma.is_stop(end_of_turn));
    assert_eq!(gemma.vocab_size(), 262_144);
    // An explicit BOS in the text is not doubled.
    let ids = gemma.encode("<bos>Hi", true).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1);
    // Control tokens are single ids and skipped when decoding.
    let turn = gemma
        .encode("<start_of_turn>user\nHi<end_of_turn>", false)
        .unwrap();
    assert_eq!(turn.last(), Some(&end_of_turn));
    assert_eq!(gemma.decode(&turn).unwrap(), "user\nHi");
}

#[test]
fn smollm2_chat_template_renders_like_llama_cpp() {
    let (content, tok, reference) = load(SMOLLM);
    let template = ChatTemplate::from_gguf(&content, &tok)
        .unwrap()
        .expect("SmolLM2 has a chat template");
    let cases = reference["chat_template"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let rendered = template.render(&messages(&case["messages"]), true).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap());
        // The rendered prompt's control tokens are single ids: one <|im_start|> (1) per turn plus
        // the generation prompt, one <|im_end|> (2) per turn, no BOS added (add_bos is false).
        let ids = tok.encode(&rendered, true).unwrap();
        let turns = rendered.matches("<|im_end|>").count();
        assert_eq!(ids[0], 1);
        assert_eq!(Some(ids[1]), tok.token_to_id("system"));
        assert_eq!(ids.iter().filter(|&&i| i == 1).count(), turns + 1);
        assert_eq!(ids.iter().filter(|&&i| i == 2).count(), turns);
        assert_eq!(
            tok.decode(&ids).unwrap(),
            rendered
                .replace("<|im_start|>", "")
                .replace("<|im_end|>", "")
        );
    }
}

#[test]
fn gemma3_base_has_no_chat_template() {
    let (content, tok, _) = load(GEMMA);
    assert!(ChatTemplate::from_gguf(&content, &tok).unwrap().is_none());
}
