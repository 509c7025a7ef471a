//! The candle sentence encoder against a numpy reference of the same model
//! (`scripts/minilm_reference.py` → `tests/data/minilm_reference.json`, and with `--zh` for
//! m3e-small → `tests/data/m3e_reference.json`): same token ids, and embeddings with cosine >=
//! 0.999 (mean pooling, L2 normalisation).

use std::path::Path;

use qnode::model::embed::{cosine, SentenceEncoder, FILES};

/// The encoder under `models/minilm-l6`, or `None` (with a message saying how to fetch it).
fn encoder() -> Option<SentenceEncoder> {
    encoder_id("minilm-l6")
}

/// The encoder under `models/<id>`, or `None` (with a message saying how to fetch it).
fn encoder_id(id: &str) -> Option<SentenceEncoder> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(id);
    if FILES.iter().any(|f| !dir.join(f).exists()) {
        eprintln!(
            "SKIPPED: {} is missing; fetch it with `python3 models/fetch.py {id}` \
             (scripts/test.sh does)",
            dir.display()
        );
        return None;
    }
    Some(SentenceEncoder::load(&dir).expect("the encoder loads"))
}

#[derive(serde::Deserialize)]
struct Reference {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

#[test]
fn embeddings_match_the_numpy_reference() {
    let Some(enc) = encoder() else { return };
    assert!(
        !enc.reads_cjk(),
        "MiniLM's vocabulary is not built for Chinese"
    );
    check_reference(&enc, include_str!("data/minilm_reference.json"));
}

#[test]
fn m3e_small_matches_its_numpy_reference_and_reads_chinese() {
    let Some(enc) = encoder_id("m3e-small") else {
        return;
    };
    assert!(enc.reads_cjk());
    assert_eq!(enc.dim(), 512);
    check_reference(&enc, include_str!("data/m3e_reference.json"));
}

fn check_reference(enc: &SentenceEncoder, json: &str) {
    let refs: Vec<Reference> = serde_json::from_str(json).expect("reference parses");
    assert!(refs.len() >= 5);
    let mut worst = 1f32;
    for r in &refs {
        assert_eq!(enc.token_ids(&r.text).unwrap(), r.ids, "{:?}", r.text);
        let v = enc.embed(&r.text).unwrap();
        assert_eq!(v.len(), enc.dim());
        let norm = cosine(&v, &v).sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{:?}: norm {norm}", r.text);
        let c = cosine(&v, &r.embedding);
        assert!(c >= 0.999, "{:?}: cosine with the reference {c}", r.text);
        worst = worst.min(c);
    }
    eprintln!("lowest cosine with the reference: {worst:.5}");
}
