//! The constraint token table of the real SmolLM2 (byte-level BPE, 49,152 tokens) and Gemma 3
//! (SentencePiece with byte fallback, 262,144 tokens) vocabularies, checked against the
//! tokenizer's own decoder, and masks checked against a brute-force oracle over every token of
//! the real vocabulary.

mod common;

use qnode::constrain::{vocab, TokenSpace};
use qnode::model::gguf::GgufFile;
use qnode::model::tokenizer::GgufTokenizer;
use qnode::types::{Grammar, OutputConstraint};

/// toktrie's rule: a leading 0xFF marks a special token, unless it is the whole token (Gemma's
/// `<0xFF>` byte piece is the byte 0xFF).
fn is_special(bytes: &[u8]) -> bool {
    bytes.len() > 1 && bytes[0] == 0xFF
}

fn tokenizer(id: &str) -> GgufTokenizer {
    let file = GgufFile::open(&common::model_file(id)).unwrap();
    GgufTokenizer::from_gguf(file.content()).unwrap()
}

/// Every token that decodes on its own to whole characters has exactly those bytes in the table;
/// control tokens are marked special (0xFF then the name), never text.
fn table_matches_the_decoder(id: &str) {
    let tok = tokenizer(id);
    let table = vocab::token_bytes(&tok);
    assert_eq!(table.len(), tok.vocab_size());
    let (mut checked, mut special) = (0, 0);
    for (i, bytes) in table.iter().enumerate() {
        let text = tok.decode(&[i as u32]).unwrap();
        if is_special(bytes) {
            special += 1;
            assert!(
                text.is_empty(),
                "{id}: special token {i} decodes to {text:?}"
            );
            continue;
        }
        if text.contains('\u{FFFD}') || text.is_empty() {
            continue; // part of a character (a byte token, or half of a UTF-8 sequence)
        }
        assert_eq!(
            String::from_utf8_lossy(bytes),
            text,
            "{id}: token {i} {:?}",
            tok.id_to_token(i as u32)
        );
        checked += 1;
    }
    for &stop in tok.stop_ids() {
        assert!(is_special(&table[stop as usize]), "{id}: stop id {stop}");
    }
    assert!(checked > tok.vocab_size() * 9 / 10, "{id}: only {checked}");
    assert!(special >= tok.stop_ids().len(), "{id}: {special} special");
}

#[test]
fn smollm2_table_matches_its_decoder() {
    table_matches_the_decoder("smollm2");
}

#[test]
fn gemma3_table_matches_its_decoder() {
    table_matches_the_decoder("gemma3-270m");
    // Byte-fallback pieces are one raw byte each.
    let tok = tokenizer("gemma3-270m");
    let table = vocab::token_bytes(&tok);
    let byte = tok.token_to_id("<0xF0>").unwrap();
    assert_eq!(table[byte as usize], vec![0xF0]);
}

/// Along each word of a finite language, written with the model's own tokenization, the mask
/// over the whole real vocabulary equals the brute-force oracle: a text token is allowed iff
/// what is written plus its bytes starts a word, a stop id iff what is written is a word.
fn masks_equal_brute_force(id: &str) {
    let tok = tokenizer(id);
    let table = vocab::token_bytes(&tok);
    let space = TokenSpace::from_tokenizer(&tok).unwrap();
    let words = ["Paris", "Saint-Étienne", "Zürich 🦀"];
    let schema = serde_json::json!({"enum": words}).to_string();
    let language: Vec<String> = words.iter().map(|w| format!("\"{w}\"")).collect();
    let constraint = OutputConstraint {
        grammar: Grammar::JsonSchema(schema),
        field: "json_schema".into(),
    };
    for word in &language {
        let mut c = space.compile(&constraint).unwrap();
        let mut written: Vec<u8> = Vec::new();
        let ids = tok.encode_plain(word, false).unwrap();
        for step in 0..=ids.len() {
            let mask = c.mask().unwrap().clone();
            for (t, bytes) in table.iter().enumerate() {
                let want = if tok.is_stop(t as u32) {
                    language.iter().any(|l| l.as_bytes() == written)
                } else if is_special(bytes) || bytes.is_empty() {
                    false
                } else {
                    let mut next = written.clone();
                    next.extend_from_slice(bytes);
                    language.iter().any(|l| l.as_bytes().starts_with(&next))
                };
                assert_eq!(
                    mask.is_allowed(t as u32),
                    want,
                    "{id}: token {t} {:?} after {:?}",
                    tok.id_to_token(t as u32),
                    String::from_utf8_lossy(&written)
                );
            }
            if step == ids.len() {
                break;
            }
            let t = ids[step];
            written.extend_from_slice(&table[t as usize]);
            c.advance(t).unwrap();
        }
        assert_eq!(written, word.as_bytes());
        assert!(c.is_accepting());
    }
}

#[test]
fn smollm2_masks_equal_brute_force() {
    masks_equal_brute_force("smollm2");
}

#[test]
fn gemma3_masks_equal_brute_force() {
    masks_equal_brute_force("gemma3-270m");
}
