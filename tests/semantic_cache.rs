//! The semantic cache tier on a real node: the real SmolLM2 behind the composition root's cache
//! and both fronts, and the real sentence encoder (models/minilm-l6).
//! - a paraphrase is served from the semantic tier with the original's answer (gRPC level
//!   SEMANTIC, HTTP `system_fingerprint` `qnode-cache-semantic`);
//! - a negated or entity-swapped question is generated, not served;
//! - different system prompts or tenants never share;
//! - off by default: the same paraphrase without `cache.semantic.enabled` is generated.
//! - its metrics count lookups, hits, misses, the guard's refusals and the questions held.
//!
//! Skipped (with a message) only when the encoder files are absent; `scripts/test.sh` fetches them.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use qnode::app::Generator;
use qnode::cache::{CachedBackend, ModelIdentity};
use qnode::config::Config;
use qnode::engine::Backend;
use qnode::grpc::proto::inference_client::InferenceClient;
use qnode::grpc::proto::{self, CacheLevel};
use qnode::metrics::Metrics;
use qnode::model::embed::FILES;
use tonic::transport::Channel;

fn encoder_dir() -> Option<std::path::PathBuf> {
    let dir = common::repo_root().join("models/minilm-l6");
    if FILES.iter().any(|f| !dir.join(f).exists()) {
        eprintln!(
            "SKIPPED: {} is missing; fetch it with `python3 models/fetch.py minilm-l6` \
             (scripts/test.sh does)",
            dir.display()
        );
        return None;
    }
    Some(dir)
}

/// A node serving the real SmolLM2 over both fronts (as `qnode serve` does, through the
/// composition root) with the answer cache as configured (`semantic` on or off).
struct Node {
    grpc: InferenceClient<Channel>,
    http: String,
    cache: Arc<CachedBackend>,
}

async fn node(semantic: bool) -> Option<Node> {
    let dir = encoder_dir()?;
    let metrics = Metrics::new().unwrap();
    let pool = common::smollm2_pool(2, &metrics);
    let mut config = Config::default();
    config.cache.semantic.enabled = semantic;
    config.cache.semantic.encoder = Some(dir);
    let identities = HashMap::from([(
        "smollm2".to_string(),
        ModelIdentity {
            model_id: "smollm2".into(),
            file_digest: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into(),
            quant: "q4_1".into(),
            template_id: "chatml".into(),
        },
    )]);
    let generator = Generator::Backend {
        backend: pool as Arc<dyn Backend>,
        identities,
    };
    let listeners = qnode::app::Listeners::local(true, false).await.unwrap();
    let (grpc, http, _) = listeners.addrs();
    let app = qnode::app::App::new(config, generator).unwrap();
    let cache = Arc::clone(app.cache().expect("the node has an answer cache"));
    tokio::spawn(app.serve(listeners, std::future::pending()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Some(Node {
        grpc: InferenceClient::new(channel),
        http: format!("http://{}", http.unwrap()),
        cache,
    })
}

/// A greedy chat call: `system` (when given), then `question`, as `tenant` (when given).
fn ask(
    system: Option<&str>,
    question: &str,
    tenant: Option<&str>,
) -> tonic::Request<proto::GenerateRequest> {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(proto::ChatMessage {
            role: "system".into(),
            content: s.into(),
            ..Default::default()
        });
    }
    messages.push(proto::ChatMessage {
        role: "user".into(),
        content: question.into(),
        ..Default::default()
    });
    let mut request = tonic::Request::new(proto::GenerateRequest {
        model: "smollm2".into(),
        messages,
        max_tokens: Some(12),
        temperature: Some(0.0),
        ..Default::default()
    });
    if let Some(t) = tenant {
        request
            .metadata_mut()
            .insert("x-qnode-tenant", t.parse().unwrap());
    }
    request
}

/// (cache level, text) of a call.
async fn level(
    served: &mut Node,
    request: tonic::Request<proto::GenerateRequest>,
) -> (CacheLevel, String) {
    let r = served.grpc.generate(request).await.unwrap().into_inner();
    (r.cache_level(), r.text)
}

const SYSTEM: &str = "You are a geography tutor. Answer in one short sentence.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paraphrase_gets_the_original_answer_and_near_misses_do_not() {
    let Some(mut n) = node(true).await else {
        return;
    };
    let (first, original) = level(
        &mut n,
        ask(Some(SYSTEM), "What is the capital of France?", None),
    )
    .await;
    assert_eq!(first, CacheLevel::None);
    let (lvl, text) = level(
        &mut n,
        ask(Some(SYSTEM), "What's the capital city of France?", None),
    )
    .await;
    assert_eq!(lvl, CacheLevel::Semantic, "a paraphrase is a semantic hit");
    assert_eq!(text, original, "served with the original's answer");

    // Over HTTP too, reported in `system_fingerprint`.
    let body = serde_json::json!({
        "model": "smollm2", "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": "Which city is the capital of France?"}],
    });
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body.to_string(),
        ])
        .arg(format!("{}/v1/chat/completions", n.http))
        .output()
        .expect("run curl");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON reply");
    assert_eq!(
        reply["system_fingerprint"], "qnode-cache-semantic",
        "{reply}"
    );
    assert_eq!(reply["choices"][0]["message"]["content"], original.as_str());

    // Near-misses that score close to the original are generated, not served.
    for near_miss in [
        "What is not the capital of France?",
        "What is the capital of Germany?",
        "What is the capital of France in 1700?",
    ] {
        let (lvl, _) = level(&mut n, ask(Some(SYSTEM), near_miss, None)).await;
        assert_eq!(
            lvl,
            CacheLevel::None,
            "{near_miss:?} must not be served France's answer"
        );
    }

    // Every exact miss above was a lookup; two hits; the negation was over the threshold
    // (0.90) and refused by the guard; the original and the three generated near-misses are
    // held.
    let m = n.cache.metrics();
    assert_eq!(m.semantic_lookups.get(), 6);
    assert_eq!(m.hits.with_label_values(&["semantic"]).get(), 2);
    assert_eq!(m.misses.with_label_values(&["semantic"]).get(), 4);
    assert_eq!(m.semantic_rejects.with_label_values(&["negation"]).get(), 1);
    assert_eq!(m.semantic_entries.get(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_system_prompts_or_tenants_never_share() {
    let Some(mut n) = node(true).await else {
        return;
    };
    let q = "How far is the Moon from Earth?";
    let p = "How far away is the Moon from Earth?";
    assert_eq!(
        level(&mut n, ask(Some(SYSTEM), q, None)).await.0,
        CacheLevel::None
    );
    let other = "You are a pirate. Answer like one.";
    assert_eq!(
        level(&mut n, ask(Some(other), p, None)).await.0,
        CacheLevel::None,
        "system prompt"
    );
    assert_eq!(
        level(&mut n, ask(None, p, None)).await.0,
        CacheLevel::None,
        "no system prompt"
    );
    assert_eq!(
        level(&mut n, ask(Some(SYSTEM), p, Some("acme"))).await.0,
        CacheLevel::None,
        "tenant"
    );
    // The control: in the original's scope the paraphrase is a hit.
    assert_eq!(
        level(&mut n, ask(Some(SYSTEM), p, None)).await.0,
        CacheLevel::Semantic
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_by_default() {
    // The node as `Config::default()` has it (no flag, no file).
    let Some(mut n) = node(Config::default().cache.semantic.enabled).await else {
        return;
    };
    assert_eq!(
        level(
            &mut n,
            ask(Some(SYSTEM), "What is the capital of France?", None)
        )
        .await
        .0,
        CacheLevel::None
    );
    let (lvl, _) = level(
        &mut n,
        ask(Some(SYSTEM), "What's the capital city of France?", None),
    )
    .await;
    assert_eq!(lvl, CacheLevel::None, "no semantic tier unless turned on");
    // The exact tiers still work.
    assert_eq!(
        level(
            &mut n,
            ask(Some(SYSTEM), "What is the capital of France?", None)
        )
        .await
        .0,
        CacheLevel::L1
    );
}
