//! Masks checked against a brute-force oracle on a tiny vocabulary, and random walks that must
//! always find a legal token and end in an accepted string.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const EOS: u32 = 0;
const IM_END: u32 = 1;
const IM_START: u32 = 2;

/// Ids 0-2 are special (two stop ids, one other control token); then every byte but 0xFF as
/// its own token, then multi-byte tokens that cross the grammars' boundaries.
fn words() -> Vec<Vec<u8>> {
    let mut w: Vec<Vec<u8>> = vec![
        b"\xFF<eos>".to_vec(),
        b"\xFF<|im_end|>".to_vec(),
        b"\xFF<|im_start|>".to_vec(),
    ];
    w.extend((0u8..0xFF).map(|b| vec![b]));
    for multi in [
        "ca", "cat", "car", "rt", "do", "dog", "og", "{\"", "\":", ": ", ", ", "\"a\"", "true",
        "false", "ue", "12", "\"r", "ed\"", "gre", "en", "blu", "e\"", "{}", "}\n", "\"}", " t",
        "[1", ", 2", "]}", "\"\"", "é", "0.5",
    ] {
        w.push(multi.as_bytes().to_vec());
    }
    w
}

fn space() -> (TokenSpace, Vec<Vec<u8>>) {
    let w = words();
    (TokenSpace::new(w.clone(), &[EOS, IM_END]).unwrap(), w)
}

fn constraint(grammar: Grammar) -> OutputConstraint {
    OutputConstraint {
        grammar,
        field: "test".into(),
    }
}

/// Allowed next tokens by brute force over a finite language: a text token is allowed when the
/// output so far plus its bytes is a prefix of a word of the language; a stop id exactly when
/// the output is a word; other special tokens never.
fn oracle(language: &[&str], written: &[u8], words: &[Vec<u8>]) -> Vec<bool> {
    words
        .iter()
        .enumerate()
        .map(|(id, w)| {
            if id as u32 == EOS || id as u32 == IM_END {
                return language.iter().any(|l| l.as_bytes() == written);
            }
            if w.first() == Some(&0xFF) {
                return false;
            }
            let mut next = written.to_vec();
            next.extend_from_slice(w);
            language.iter().any(|l| l.as_bytes().starts_with(&next))
        })
        .collect()
}

fn mask_bits(c: &mut Constraint, n: usize) -> Vec<bool> {
    let m = c.mask().unwrap();
    (0..n).map(|i| m.is_allowed(i as u32)).collect()
}

/// Walk every path of a finite language (depth-first over allowed tokens, a few random picks
/// per state), comparing the mask with the oracle at each step.
fn check_finite(grammar: Grammar, language: &[&str]) {
    let (space, words) = space();
    let mut rng = StdRng::seed_from_u64(11);
    for _walk in 0..40 {
        let mut c = space.compile(&constraint(grammar.clone())).unwrap();
        let mut written = Vec::new();
        loop {
            let want = oracle(language, &written, &words);
            let got = mask_bits(&mut c, words.len());
            for (id, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g,
                    w,
                    "{grammar:?}: token {id} {:?} after {:?}",
                    String::from_utf8_lossy(&words[id]),
                    String::from_utf8_lossy(&written)
                );
            }
            let allowed: Vec<u32> = (0..words.len() as u32)
                .filter(|&t| got[t as usize])
                .collect();
            assert!(!allowed.is_empty(), "no legal token after {written:?}");
            assert_eq!(c.is_accepting(), got[EOS as usize]);
            let t = allowed[rng.random_range(0..allowed.len())];
            if t == EOS || t == IM_END {
                assert!(language.iter().any(|l| l.as_bytes() == written));
                break;
            }
            written.extend_from_slice(&words[t as usize]);
            if c.advance(t).unwrap() {
                // Finished: what was written is a word no other word extends.
                let s = String::from_utf8(written.clone()).unwrap();
                assert!(language.contains(&s.as_str()), "{s}");
                assert!(!language
                    .iter()
                    .any(|l| l.len() > s.len() && l.starts_with(&s)));
                break;
            }
        }
    }
}

#[test]
fn regex_mask_equals_brute_force() {
    check_finite(
        Grammar::Regex("(cat|car|cart|dog|do)".into()),
        &["cat", "car", "cart", "dog", "do"],
    );
}

#[test]
fn json_enum_mask_equals_brute_force() {
    check_finite(
        Grammar::JsonSchema(r#"{"enum": ["red", "green", "blue"]}"#.into()),
        &["\"red\"", "\"green\"", "\"blue\""],
    );
}

#[test]
fn json_object_schema_mask_equals_brute_force() {
    let schema = r#"{"type": "object", "properties": {"a": {"type": "boolean"}},
                     "required": ["a"], "additionalProperties": false}"#;
    check_finite(
        Grammar::JsonSchema(schema.into()),
        &[r#"{"a": true}"#, r#"{"a": false}"#],
    );
}

#[test]
fn lark_mask_equals_brute_force() {
    check_finite(
        Grammar::Lark("start: (\"ca\" | \"do\") (\"t\" | \"g\")".into()),
        &["cat", "cag", "dot", "dog"],
    );
}

/// Random walks over open languages: at every step some token is legal, a stop id is legal
/// exactly when the grammar accepts, and a walk that stops has written a valid document.
#[test]
fn walks_always_have_a_legal_token_and_end_valid() {
    let (space, words) = space();
    let schema = r#"{"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "x": {"type": "number", "minimum": -100, "maximum": 100}},
        "required": ["name", "n", "tags", "x"], "additionalProperties": false}"#;
    let cases = [
        Grammar::JsonObject,
        Grammar::JsonSchema(schema.into()),
        Grammar::Regex("[0-9]{1,4}(\\.[0-9]{1,2})?".into()),
    ];
    for grammar in cases {
        for seed in 0..25u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut c = space.compile(&constraint(grammar.clone())).unwrap();
            let mut written = Vec::new();
            let mut ended = false;
            for _ in 0..200 {
                let mask = mask_bits(&mut c, words.len());
                let allowed: Vec<u32> = (0..words.len() as u32)
                    .filter(|&t| mask[t as usize])
                    .collect();
                assert!(!allowed.is_empty(), "{grammar:?}: stuck after {written:?}");
                assert!(!mask[IM_START as usize], "a control token was allowed");
                assert_eq!(mask[EOS as usize], mask[IM_END as usize]);
                assert_eq!(c.is_accepting(), mask[EOS as usize]);
                // Prefer text so walks get somewhere; stop when a stop id is drawn.
                let t = if mask[EOS as usize] && rng.random_bool(0.3) {
                    EOS
                } else {
                    let text: Vec<u32> = allowed.iter().copied().filter(|&t| t > 2).collect();
                    if text.is_empty() {
                        EOS
                    } else {
                        text[rng.random_range(0..text.len())]
                    }
                };
                if t == EOS {
                    ended = true;
                    break;
                }
                written.extend_from_slice(&words[t as usize]);
                if c.advance(t).unwrap() {
                    ended = true;
                    break;
                }
            }
            if !ended {
                continue;
            }
            let text = String::from_utf8(written).unwrap();
            match &grammar {
                Grammar::JsonObject => match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(v) => assert!(v.is_object(), "{text}"),
                    // Valid JSON that serde_json cannot hold in an f64 (a random walk writes
                    // `1e999`): the grammar is right, the reader is narrower.
                    Err(e) if e.to_string().starts_with("number out of range") => {
                        assert!(text.starts_with('{') && text.ends_with('}'), "{text}")
                    }
                    Err(e) => panic!("{text}: {e}"),
                },
                Grammar::JsonSchema(_) => {
                    let v: serde_json::Value =
                        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
                    let name = v["name"].as_str().unwrap();
                    assert!(name.chars().count() <= 6, "{text}");
                    assert!((0..=99).contains(&v["n"].as_i64().unwrap()), "{text}");
                    assert!(v["tags"].as_array().unwrap().len() <= 3, "{text}");
                    let x = v["x"].as_f64().unwrap();
                    assert!((-100.0..=100.0).contains(&x), "{text}");
                }
                _ => {
                    let (int, frac) = text.split_once('.').unwrap_or((&text, "1"));
                    assert!((1..=4).contains(&int.len()), "{text}");
                    assert!((1..=2).contains(&frac.len()), "{text}");
                    assert!(text.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
                }
            }
        }
    }
}

#[test]
fn apply_masks_logits_and_the_rows_past_the_vocabulary() {
    let (space, words) = space();
    let mut c = space
        .compile(&constraint(Grammar::Regex("do".into())))
        .unwrap();
    // A row longer than the vocabulary, as an output matrix padded to a multiple of 64.
    let mut logits = vec![1.0f32; words.len() + 40];
    c.apply(&mut logits).unwrap();
    let open: Vec<usize> = (0..logits.len()).filter(|&i| logits[i] > 0.0).collect();
    let d = words.iter().position(|w| w == b"d").unwrap();
    let do_ = words.iter().position(|w| w == b"do").unwrap();
    assert_eq!(open, vec![d, do_]);
    assert!(c.allows(d as u32) && !c.allows(EOS));
    assert_eq!(c.first_allowed(), Some(d as u32));
    // After "do" the grammar is complete: finished, and only the stop ids are left.
    assert!(c.advance(do_ as u32).unwrap());
    let mut logits = vec![0.0f32; words.len()];
    c.apply(&mut logits).unwrap();
    let open: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| logits[i as usize] == 0.0)
        .collect();
    assert_eq!(open, vec![EOS, IM_END]);
}

#[test]
fn invalid_grammars_are_refused_naming_the_field() {
    let (space, _) = space();
    let cases = [
        (Grammar::JsonSchema("{not json".into()), "JSON schema"),
        (
            Grammar::JsonSchema(r#"{"type": "frobnicate"}"#.into()),
            "JSON schema",
        ),
        (Grammar::Regex("(unclosed".into()), "regular expression"),
        (
            Grammar::Lark("start: undefined_rule".into()),
            "Lark grammar",
        ),
    ];
    for (grammar, kind) in cases {
        let err = space
            .compile(&OutputConstraint {
                grammar: grammar.clone(),
                field: "response_format".into(),
            })
            .unwrap_err();
        match &err {
            ConstrainError::Invalid { field, what, .. } => {
                assert_eq!(field, "response_format");
                assert_eq!(*what, kind, "{grammar:?}");
            }
            other => panic!("{grammar:?}: {other:?}"),
        }
        assert!(err
            .to_string()
            .starts_with("`response_format` is not a valid"));
    }
}

#[test]
fn bad_vocabularies_are_refused() {
    assert!(matches!(
        TokenSpace::new(vec![], &[0]),
        Err(ConstrainError::Vocab(_))
    ));
    assert!(matches!(
        TokenSpace::new(vec![b"a".to_vec()], &[]),
        Err(ConstrainError::Vocab(_))
    ));
    assert!(matches!(
        TokenSpace::new(vec![b"a".to_vec()], &[3]),
        Err(ConstrainError::Vocab(_))
    ));
}

/// A model that always wants one more `0`: write `prefix` byte by byte, then pick `0` while it is
/// allowed, else `"`, else `}`, else a stop id. Returns what was written and whether it ended in time.
fn zero_loop(grammar: Grammar, prefix: &str, steps: usize) -> (String, bool) {
    let (space, words) = space();
    let byte = |b: u8| 3 + b as u32;
    let mut c = space.compile(&constraint(grammar)).unwrap();
    let mut written = Vec::new();
    for b in prefix.bytes() {
        assert!(c.allows(byte(b)), "prefix byte {:?}", b as char);
        written.push(b);
        c.advance(byte(b)).unwrap();
    }
    for _ in 0..steps {
        let t = [byte(b'0'), byte(b'"'), byte(b'}'), EOS]
            .into_iter()
            .find(|&t| c.allows(t))
            .expect("no legal token");
        if t == EOS {
            return (String::from_utf8(written).unwrap(), true);
        }
        written.extend_from_slice(&words[t as usize]);
        if c.advance(t).unwrap() {
            return (String::from_utf8(written).unwrap(), true);
        }
    }
    (String::from_utf8(written).unwrap(), false)
}

#[test]
fn json_numbers_end_after_the_longest_digit_run() {
    let schema = r#"{"type": "object", "properties": {"lon": {"type": "number"}},
        "required": ["lon"], "additionalProperties": false}"#;
    for (grammar, prefix) in [
        (Grammar::JsonSchema(schema.into()), r#"{"lon": 180."#),
        (Grammar::JsonObject, r#"{"n": 7"#),
    ] {
        let (text, ended) = zero_loop(grammar.clone(), prefix, 400);
        assert!(ended, "{grammar:?} looped: {text}");
        let run = text
            .bytes()
            .rev()
            .skip(1)
            .take_while(u8::is_ascii_digit)
            .count();
        assert_eq!(run, MAX_DIGIT_RUN, "{text}");
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v.is_object(), "{text}");
    }
}

#[test]
fn the_digit_cap_never_blocks_a_grammar_that_wants_digits() {
    // A regex is the caller's exact shape: not capped.
    let (text, ended) = zero_loop(Grammar::Regex("[0-9]{60}".into()), "", 100);
    assert!(ended && text == "0".repeat(60), "{text}");
    // A JSON string that must hold 50 digits: only digits are legal, so the cap steps aside.
    let schema = r#"{"type": "object", "properties": {"id": {"type": "string", "pattern": "^[0-9]{50}$"}},
        "required": ["id"], "additionalProperties": false}"#;
    let (text, ended) = zero_loop(Grammar::JsonSchema(schema.into()), r#"{"id": ""#, 100);
    assert!(ended, "{text}");
    assert_eq!(text, format!(r#"{{"id": "{}"}}"#, "0".repeat(50)));
}
