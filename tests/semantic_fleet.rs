//! The semantic tier across a fleet: two nodes (two `CachedBackend`s, each with its own scripted
//! model and the real sentence encoder, models/minilm-l6) over one real `redis-server`.
//!
//! Node A answers a question until it is hot; its answer goes to Redis with its question. Node B
//! — prewarmed from Redis, or after an ordinary L2 hit of the exact question — answers a
//! paraphrase from its semantic tier with A's answer (B's model never runs), indexing each
//! question once; a negated question, another system prompt and another tenant are generated.
//! A question altered in Redis is refused (MAC) and deleted, on both paths.
//!
//! Skipped (with a message) only when the encoder files are absent; `scripts/test.sh` fetches them.

#[path = "cache_support/mod.rs"]
mod cache_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_support::{
    ask, config, identities, request, source, CountingBackend, RedisServer, MODEL,
};
use qnode::cache::{semantic_scope, CacheConfig, CachedBackend};
use qnode::engine::{ChatMessage, GenerationRequest, PromptInput, Source};
use qnode::model::embed::FILES;

/// Asks (fleet-wide, within the hot window) that make a question hot.
const HOT: u64 = 3;
const SYSTEM: &str = "You are a geography tutor. Answer in one short sentence.";
const QUESTION: &str = "What is the capital of France?";
const PARAPHRASE: &str = "What's the capital city of France?";

fn encoder_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/minilm-l6");
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

/// One node: its own model (counting its generations) behind a cache with the semantic tier on,
/// over the shared `redis`.
fn node(redis: &RedisServer, encoder: &Path) -> (Arc<CountingBackend>, CachedBackend) {
    let model = CountingBackend::new(Duration::ZERO);
    let mut config = CacheConfig {
        hot_threshold: HOT,
        ..config(Some(redis))
    };
    config.semantic.enabled = true;
    config.semantic.encoder = Some(encoder.to_path_buf());
    let cache = CachedBackend::new(model.clone(), identities(), config).unwrap();
    (model, cache)
}

/// A greedy chat request: `system` (when given), then `question`, as `tenant` (when given).
fn chat(system: Option<&str>, question: &str, tenant: Option<&str>) -> GenerationRequest {
    let turn = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    };
    let mut messages: Vec<ChatMessage> = system.map(|s| turn("system", s)).into_iter().collect();
    messages.push(turn("user", question));
    GenerationRequest {
        input: PromptInput::Chat(messages),
        tenant: tenant.map(Into::into),
        ..request("")
    }
}

/// Redis keys of stored answers.
fn answer_keys(redis: &RedisServer) -> Vec<String> {
    redis.keys("*:ans:*")
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Node A answers `QUESTION` `HOT` times (one generation, then L1); the batch of L1 asks turns
/// it hot and promotes A's answer to Redis with its question. Returns A's answer and the Redis
/// key it is stored under.
async fn hot_on_a(redis: &RedisServer, encoder: &Path) -> (String, String) {
    let (model_a, a) = node(redis, encoder);
    let first = ask(&a, chat(Some(SYSTEM), QUESTION, None)).await;
    assert_eq!(source(&first), Source::Model);
    for _ in 1..HOT {
        let again = ask(&a, chat(Some(SYSTEM), QUESTION, None)).await;
        assert_eq!(source(&again), Source::CacheL1);
    }
    assert_eq!(model_a.count(), 1);
    until("A's answer in Redis", || answer_keys(redis).len() == 1).await;
    let key = answer_keys(redis).remove(0);
    let value: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query(&mut redis.conn())
        .unwrap();
    let envelope: serde_json::Value = serde_json::from_slice(&value).unwrap();
    let scope = semantic_scope(
        &identities()[MODEL],
        &chat(Some(SYSTEM), QUESTION, None),
        false,
    );
    assert_eq!(
        envelope["question"],
        serde_json::json!({"scope": scope.to_hex(), "text": QUESTION}),
        "the answer carries its question to Redis"
    );
    (first.text, key)
}

/// Questions near `QUESTION`'s paraphrase that node B must generate, not serve A's answer to.
const NOT_SHARED: [(Option<&str>, &str, Option<&str>, &str); 4] = [
    (
        Some(SYSTEM),
        "What is not the capital of France?",
        None,
        "negation",
    ),
    (
        Some("You are a pirate. Answer like one."),
        PARAPHRASE,
        None,
        "another system prompt",
    ),
    (None, PARAPHRASE, None, "no system prompt"),
    (Some(SYSTEM), PARAPHRASE, Some("acme"), "another tenant"),
];

async fn near_misses_are_generated(b: &CachedBackend, model_b: &CountingBackend, original: &str) {
    let mut served = Vec::new();
    for (system, question, tenant, why) in NOT_SHARED {
        let got = ask(b, chat(system, question, tenant)).await;
        if source(&got) != Source::Model || got.text == original {
            served.push(why);
        }
    }
    assert!(served.is_empty(), "A's answer served to: {served:?}");
    assert_eq!(model_b.count(), NOT_SHARED.len());
    let m = b.metrics();
    assert_eq!(m.semantic_rejects.with_label_values(&["negation"]).get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_prewarmed_from_redis_serves_a_paraphrase_with_the_fleets_answer() {
    let Some(encoder) = encoder_dir() else {
        return;
    };
    let redis = RedisServer::start();
    let (original, _) = hot_on_a(&redis, &encoder).await;

    let (model_b, b) = node(&redis, &encoder);
    assert_eq!(b.prewarm_from_redis(16).await, 1);
    let m = b.metrics();
    assert_eq!(m.semantic_filled.with_label_values(&["prewarm"]).get(), 1);
    assert_eq!(m.semantic_entries.get(), 1);

    let got = ask(&b, chat(Some(SYSTEM), PARAPHRASE, None)).await;
    assert_eq!(source(&got), Source::CacheSemantic, "a paraphrase on B");
    assert_eq!(got.text, original, "served with A's answer");
    assert_eq!(model_b.count(), 0, "B's model never ran");

    near_misses_are_generated(&b, &model_b, &original).await;
    assert_eq!(m.semantic_filled.with_label_values(&["l2"]).get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l2_hit_indexes_the_question_once() {
    let Some(encoder) = encoder_dir() else {
        return;
    };
    let redis = RedisServer::start();
    let (original, _) = hot_on_a(&redis, &encoder).await;

    // No prewarm: B first gets the exact question, an ordinary L2 hit; `ask` returns once the
    // flight is done, which is after the question is indexed.
    let (model_b, b) = node(&redis, &encoder);
    let m = b.metrics();
    assert_eq!(m.semantic_entries.get(), 0);
    let exact = ask(&b, chat(Some(SYSTEM), QUESTION, None)).await;
    assert_eq!(source(&exact), Source::CacheL2);
    assert_eq!(m.semantic_filled.with_label_values(&["l2"]).get(), 1);
    assert_eq!(m.semantic_entries.get(), 1);

    let got = ask(&b, chat(Some(SYSTEM), PARAPHRASE, None)).await;
    assert_eq!(source(&got), Source::CacheSemantic, "a paraphrase on B");
    assert_eq!(got.text, original, "served with A's answer");
    assert_eq!(model_b.count(), 0, "B's model never ran");

    // Not twice: once the answer has left B's L1 the exact question is an L2 hit again, and its
    // question, still held, is not embedded again.
    b.clear_l1();
    let again = ask(&b, chat(Some(SYSTEM), QUESTION, None)).await;
    assert_eq!(source(&again), Source::CacheL2);
    assert_eq!(m.semantic_filled.with_label_values(&["l2"]).get(), 1);
    assert_eq!(m.semantic_entries.get(), 1);

    near_misses_are_generated(&b, &model_b, &original).await;
    assert_eq!(m.semantic_filled.with_label_values(&["prewarm"]).get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_altered_in_redis_is_refused() {
    let Some(encoder) = encoder_dir() else {
        return;
    };
    let redis = RedisServer::start();
    let (original, key) = hot_on_a(&redis, &encoder).await;
    let good: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query(&mut redis.conn())
        .unwrap();
    // Planted: France's answer as the answer to a question about Germany, or under the scope of
    // another tenant. Either would serve it to questions it does not answer.
    let acme = semantic_scope(
        &identities()[MODEL],
        &chat(Some(SYSTEM), QUESTION, Some("acme")),
        false,
    );
    let alterations = [
        (
            "text",
            serde_json::json!("What is the capital of Germany?"),
            chat(Some(SYSTEM), "What's the capital city of Germany?", None),
        ),
        (
            "scope",
            serde_json::json!(acme.to_hex()),
            chat(Some(SYSTEM), PARAPHRASE, Some("acme")),
        ),
    ];
    for (field, value, probe) in alterations {
        for prewarm in [true, false] {
            let what = format!("{field}, {}", if prewarm { "prewarm" } else { "L2 hit" });
            let mut envelope: serde_json::Value = serde_json::from_slice(&good).unwrap();
            envelope["question"][field] = value.clone();
            let _: () = redis::cmd("SET")
                .arg(&key)
                .arg(serde_json::to_vec(&envelope).unwrap())
                .query(&mut redis.conn())
                .unwrap();

            let (_, b) = node(&redis, &encoder);
            let m = b.metrics();
            if prewarm {
                assert_eq!(b.prewarm_from_redis(16).await, 0, "{what}");
            } else {
                let exact = ask(&b, chat(Some(SYSTEM), QUESTION, None)).await;
                assert_eq!(source(&exact), Source::Model, "{what}");
            }
            assert_eq!(m.rejected_values.get(), 1, "{what}");
            assert_eq!(
                m.semantic_filled.with_label_values(&["prewarm"]).get()
                    + m.semantic_filled.with_label_values(&["l2"]).get(),
                0,
                "{what}"
            );
            if prewarm {
                // (After the L2 hit B generated and may store its own answer.)
                until("the refused value deleted", || {
                    answer_keys(&redis).is_empty()
                })
                .await;
            }
            let got = ask(&b, probe.clone()).await;
            assert_eq!(source(&got), Source::Model, "{what}");
            assert_ne!(got.text, original, "{what}");
        }
    }
}
