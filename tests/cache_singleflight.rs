//! Single flight: identical concurrent requests share one generation, and the generation's
//! life follows its listeners, not its first caller.

mod cache_support;
mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use cache_support::*;
use qnode::cache::CachedBackend;
use qnode::engine::{Backend, GenerationEvent, Source};

async fn hundred_identical(cache: &CachedBackend, model: &CountingBackend) {
    // Submitted together: every caller's `submit` waits for the one admission.
    let streams: Vec<_> =
        futures::future::join_all((0..100).map(|_| cache.submit(request("same question"))))
            .await
            .into_iter()
            .map(|r| r.expect("submit"))
            .collect();
    let results = futures::future::join_all(streams.into_iter().map(collect)).await;
    assert_eq!(model.count(), 1, "exactly one generation");
    let first = &results[0];
    assert!(first.text.starts_with("answer #1 "));
    for r in &results {
        assert_eq!(r.error, None);
        assert_eq!(r.text, first.text);
        assert_eq!(r.finished.as_ref().unwrap().source, Source::Model);
    }
    assert_eq!(cache.metrics().singleflight_joins.get(), 99);
    settle(cache).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_identical_requests_one_generation_without_redis() {
    let model = CountingBackend::new(Duration::from_millis(5));
    let cache = CachedBackend::new(model.clone(), identities(), config(None)).unwrap();
    hundred_identical(&cache, &model).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_identical_requests_one_generation_with_redis() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::from_millis(5));
    let cache = CachedBackend::new(model.clone(), identities(), config(Some(&redis))).unwrap();
    hundred_identical(&cache, &model).await;
    assert_eq!(redis.keys("qnode:v1:ans:*").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_gets_the_whole_answer() {
    let model = CountingBackend::new(Duration::from_millis(20));
    let cache = CachedBackend::new(model.clone(), identities(), config(None)).unwrap();
    let mut leader = cache.submit(request("long")).await.unwrap();
    let mut seen = String::new();
    for _ in 0..3 {
        match leader.recv().await {
            Some(Ok(GenerationEvent::Delta(d))) => seen.push_str(&d),
            other => panic!("expected a delta, got {other:?}"),
        }
    }
    let joiner = collect(cache.submit(request("long")).await.unwrap()).await;
    let rest = collect(leader).await;
    assert_eq!(joiner.text, format!("{seen}{}", rest.text));
    assert_eq!(model.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generation_survives_its_leader_while_followers_listen() {
    let model = CountingBackend::new(Duration::from_millis(20));
    let cache = CachedBackend::new(model.clone(), identities(), config(None)).unwrap();
    let mut leader = cache.submit(request("leader leaves")).await.unwrap();
    let follower = cache.submit(request("leader leaves")).await.unwrap();
    assert!(matches!(
        leader.recv().await,
        Some(Ok(GenerationEvent::Delta(_)))
    ));
    drop(leader);
    let got = collect(follower).await;
    assert_eq!(got.error, None);
    assert!(got.text.ends_with("日本語"), "{}", got.text);
    assert_eq!(model.count(), 1);
    assert_eq!(model.cancelled.load(Ordering::SeqCst), 0);
    // Completed, so cached.
    assert_eq!(
        collect(cache.submit(request("leader leaves")).await.unwrap())
            .await
            .finished
            .unwrap()
            .source,
        Source::CacheL1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generation_stops_when_everyone_leaves() {
    let model = CountingBackend::new(Duration::from_millis(20));
    let cache = CachedBackend::new(model.clone(), identities(), config(None)).unwrap();
    let mut a = cache.submit(request("nobody waits")).await.unwrap();
    let b = cache.submit(request("nobody waits")).await.unwrap();
    assert!(matches!(
        a.recv().await,
        Some(Ok(GenerationEvent::Delta(_)))
    ));
    drop(a);
    drop(b);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while model.cancelled.load(Ordering::SeqCst) == 0 || cache.in_flight() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "generation was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Nothing was cached: the next ask generates.
    let next = collect(cache.submit(request("nobody waits")).await.unwrap()).await;
    assert_eq!(next.finished.unwrap().source, Source::Model);
    assert_eq!(model.count(), 2);
}

/// Issue #13 item 1, on the real engine (which enforces a submitted deadline): two identical
/// calls share one generation; the one with a short deadline gets DEADLINE_EXCEEDED alone and
/// the other, with none, gets the whole answer, whichever of them led.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_callers_deadline_never_fails_another() {
    use qnode::cache::ModelIdentity;
    use qnode::engine::{ChatMessage, EngineError, PromptInput};
    use std::collections::HashMap;
    use std::time::Instant;

    let metrics = qnode::metrics::Metrics::new().unwrap();
    let pool = tokio::task::block_in_place(|| common::smollm2_pool(4, &metrics));
    let identity = ModelIdentity {
        model_id: "smollm2".into(),
        file_digest: "d".into(),
        quant: "q8_0".into(),
        template_id: "t".into(),
    };
    let cache = CachedBackend::new(
        pool.clone(),
        HashMap::from([("smollm2".to_string(), identity)]),
        config(None),
    )
    .unwrap();
    for (n, short_leads) in [(0, true), (1, false)] {
        let mut req = request("");
        req.model = "smollm2".into();
        req.max_tokens = 96;
        req.input = PromptInput::Chat(vec![ChatMessage {
            role: "user".into(),
            content: format!("Tell me a long story about dragon number {n}."),
            ..Default::default()
        }]);
        let mut short = req.clone();
        short.deadline = Some(Instant::now() + Duration::from_millis(60));
        let (first, second) = if short_leads {
            (short, req)
        } else {
            (req, short)
        };
        let a = cache.submit(first).await.unwrap();
        let b = cache.submit(second).await.unwrap();
        let (a, b) = futures::future::join(collect(a), collect(b)).await;
        let (short, patient) = if short_leads { (a, b) } else { (b, a) };
        assert!(
            matches!(short.error, Some(EngineError::DeadlineExceeded(_))),
            "the short caller: {short:?}"
        );
        assert_eq!(
            patient.error, None,
            "the patient caller was failed: {patient:?}"
        );
        let done = patient.finished.expect("the patient caller gets Finished");
        assert!(done.completion_tokens > 1, "{done:?}");
        assert_eq!(cache.metrics().singleflight_joins.get(), n + 1);
    }
}
