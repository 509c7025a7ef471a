//! The candle sentence encoder against a numpy reference of the same model
//! (`scripts/minilm_reference.py` → `tests/data/minilm_reference.json`): same token ids, and
//! embeddings with cosine >= 0.999 (all-MiniLM-L6-v2, mean pooling, L2 normalisation).

use std::path::Path;

use qnode::model::embed::{cosine, SentenceEncoder, FILES};

/// The encoder under `models/minilm-l6`, or `None` (with a message saying how to fetch it).
fn encoder() -> Option<SentenceEncoder> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/minilm-l6");
    if FILES.iter().any(|f| !dir.join(f).exists()) {
        eprintln!(
            "SKIPPED: {} is missing; fetch it with `python3 models/fetch.py minilm-l6` \
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
    let refs: Vec<Reference> =
        serde_json::from_str(include_str!("data/minilm_reference.json")).expect("reference parses");
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
