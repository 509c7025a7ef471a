//! The answer cache over a real Redis: where answers come from, what is (not) cached, and what
//! a bad Redis value does.

mod cache_support;

use std::sync::Arc;
use std::time::Duration;

use cache_support::*;
use qnode::cache::{cache_key, CacheConfig, CachedBackend, ManualClock};
use qnode::engine::{Backend, CachePolicy, EngineError, PromptInput, Source};

fn answer_keys(redis: &RedisServer) -> Vec<String> {
    redis.keys("qnode:v1:ans:*")
}

#[tokio::test]
async fn miss_then_l1_hit_replays_the_same_text() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::ZERO);
    let cache = CachedBackend::new(model.clone(), identities(), config(Some(&redis))).unwrap();

    let first = ask(&cache, request("hello")).await;
    assert_eq!(source(&first), Source::Model);
    assert!(first.text.starts_with("answer #1 "), "{}", first.text);
    let again = ask(&cache, request("hello")).await;
    assert_eq!(source(&again), Source::CacheL1);
    assert_eq!(again.text, first.text, "replay equals the original");
    assert_eq!(again.finished.as_ref().unwrap().completion_tokens, 7);
    assert_eq!(again.finished.as_ref().unwrap().prompt_tokens, 5);
    // Replayed in chunks of 3 chars, none splitting a character.
    assert!(again.deltas.iter().all(|d| d.chars().count() <= 3));
    assert!(again.deltas.len() > 10);
    assert_eq!(model.count(), 1);
    let m = cache.metrics();
    assert_eq!(m.hits.with_label_values(&["l1"]).get(), 1);
    assert_eq!(m.misses.with_label_values(&["l1"]).get(), 1);
    assert_eq!(m.misses.with_label_values(&["l2"]).get(), 1);
}

#[tokio::test]
async fn second_node_hits_l2_then_its_own_l1() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::ZERO);
    let node_a = CachedBackend::new(model.clone(), identities(), config(Some(&redis))).unwrap();
    let node_b = CachedBackend::new(model.clone(), identities(), config(Some(&redis))).unwrap();

    let first = ask(&node_a, request("shared question")).await;
    assert_eq!(
        answer_keys(&redis).len(),
        1,
        "hot_threshold 1 writes at once"
    );
    let from_l2 = ask(&node_b, request("shared question")).await;
    assert_eq!(source(&from_l2), Source::CacheL2);
    assert_eq!(from_l2.text, first.text);
    let from_l1 = ask(&node_b, request("shared question")).await;
    assert_eq!(source(&from_l1), Source::CacheL1);
    assert_eq!(model.count(), 1);
    assert_eq!(node_b.metrics().hits.with_label_values(&["l2"]).get(), 1);
}

#[tokio::test]
async fn every_output_changing_field_misses() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::ZERO);
    let cache = CachedBackend::new(model.clone(), identities(), config(Some(&redis))).unwrap();
    let base = request("q");
    ask(&cache, base.clone()).await;
    let mut variants = vec![];
    let mut r = base.clone();
    r.max_tokens = 33;
    variants.push(r);
    let mut r = base.clone();
    r.stop = vec!["."].into_iter().map(String::from).collect();
    variants.push(r);
    let mut r = base.clone();
    r.sampling.repetition_penalty = 1.2;
    variants.push(r);
    let mut r = base.clone();
    r.sampling.seed = Some(7);
    variants.push(r);
    let mut r = base.clone();
    r.input = PromptInput::Text("q ".into());
    variants.push(r);
    let n = variants.len();
    for v in variants {
        assert_eq!(source(&ask(&cache, v).await), Source::Model);
    }
    assert_eq!(model.count(), 1 + n);
    // And a new model file (digest) never serves the old answers, even from Redis.
    let new_file = CachedBackend::new(
        model.clone(),
        identities_with_digest("digest-2"),
        config(Some(&redis)),
    )
    .unwrap();
    assert_eq!(source(&ask(&new_file, base).await), Source::Model);
    assert_eq!(model.count(), 2 + n);
}

#[tokio::test]
async fn sampled_requests_are_not_cached_unless_opted_in() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::ZERO);
    let cache = CachedBackend::new(model.clone(), identities(), config(Some(&redis))).unwrap();
    let mut sampled = request("poem");
    sampled.sampling.temperature = 0.8;
    for _ in 0..2 {
        assert_eq!(source(&ask(&cache, sampled.clone()).await), Source::Model);
    }
    assert_eq!(model.count(), 2);
    assert!(answer_keys(&redis).is_empty());

    // Seeded sampling is deterministic: cached.
    let mut seeded = sampled.clone();
    seeded.sampling.seed = Some(1);
    ask(&cache, seeded.clone()).await;
    assert_eq!(source(&ask(&cache, seeded).await), Source::CacheL1);

    let opted = CachedBackend::new(
        model.clone(),
        identities(),
        CacheConfig {
            cache_nondeterministic: true,
            ..config(Some(&redis))
        },
    )
    .unwrap();
    ask(&opted, sampled.clone()).await;
    assert_eq!(source(&ask(&opted, sampled).await), Source::CacheL1);
}

#[tokio::test]
async fn policies_bypass_refresh_only_if_cached() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::ZERO);
    let cache = CachedBackend::new(model.clone(), identities(), config(Some(&redis))).unwrap();
    let with = |p| {
        let mut r = request("policy");
        r.cache_policy = p;
        r
    };

    // OnlyIfCached on a miss never generates, and is refused by `submit` itself (after the
    // Redis lookup), so a front answers with its status, not an error line in a stream.
    assert_eq!(
        cache.submit(with(CachePolicy::OnlyIfCached)).await.err(),
        Some(EngineError::NotCached)
    );
    assert_eq!(model.count(), 0);

    // Bypass generates and stores nothing.
    ask(&cache, with(CachePolicy::Bypass)).await;
    assert_eq!(model.count(), 1);
    assert!(answer_keys(&redis).is_empty());
    assert_eq!(
        cache.submit(with(CachePolicy::OnlyIfCached)).await.err(),
        Some(EngineError::NotCached)
    );

    let first = ask(&cache, with(CachePolicy::Default)).await;
    assert!(first.text.starts_with("answer #2 "));
    // Refresh ignores the stored answer, generates, and replaces it on both levels.
    let fresh = ask(&cache, with(CachePolicy::Refresh)).await;
    assert_eq!(source(&fresh), Source::Model);
    assert!(fresh.text.starts_with("answer #3 "));
    let served = ask(&cache, with(CachePolicy::OnlyIfCached)).await;
    assert_eq!(source(&served), Source::CacheL1);
    assert_eq!(served.text, fresh.text);
    let other_node = CachedBackend::new(model.clone(), identities(), config(Some(&redis))).unwrap();
    let from_l2 = ask(&other_node, with(CachePolicy::OnlyIfCached)).await;
    assert_eq!(source(&from_l2), Source::CacheL2);
    assert_eq!(from_l2.text, fresh.text);
    assert_eq!(model.count(), 3);

    // Without Redis too.
    let local = CachedBackend::new(model.clone(), identities(), config(None)).unwrap();
    assert_eq!(
        local.submit(with(CachePolicy::OnlyIfCached)).await.err(),
        Some(EngineError::NotCached)
    );
}

#[tokio::test]
async fn hot_threshold_gates_the_redis_write() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::ZERO);
    let cfg = CacheConfig {
        hot_threshold: 3,
        ..config(Some(&redis))
    };
    // Three nodes (no shared L1), one ask each: the third crosses the threshold.
    let nodes: Vec<_> = (0..3)
        .map(|_| CachedBackend::new(model.clone(), identities(), cfg.clone()).unwrap())
        .collect();
    ask(&nodes[0], request("hot")).await;
    ask(&nodes[1], request("hot")).await;
    assert!(answer_keys(&redis).is_empty(), "not hot yet");
    ask(&nodes[2], request("hot")).await;
    assert_eq!(answer_keys(&redis).len(), 1);
    assert_eq!(nodes[2].metrics().hot_promotions.get(), 1);
    assert_eq!(model.count(), 3);
    let key = &answer_keys(&redis)[0];
    let ttl: i64 = redis::cmd("TTL").arg(key).query(&mut redis.conn()).unwrap();
    assert!(
        ttl > 0 && ttl <= 24 * 3600,
        "value TTL is the max age: {ttl}"
    );
    let count_ttl: i64 = redis::cmd("TTL")
        .arg(key.replace(":ans:", ":cnt:"))
        .query(&mut redis.conn())
        .unwrap();
    assert!(
        count_ttl > 0 && count_ttl <= 3600,
        "count expires with the hot window: {count_ttl}"
    );
    // A fourth node now hits L2.
    let fourth = CachedBackend::new(model.clone(), identities(), cfg).unwrap();
    assert_eq!(source(&ask(&fourth, request("hot")).await), Source::CacheL2);
}

#[tokio::test]
async fn asks_answered_from_l1_count_and_promote_the_answer_to_redis() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::ZERO);
    let cfg = CacheConfig {
        hot_threshold: 3,
        ..config(Some(&redis))
    };
    let node = CachedBackend::new(model.clone(), identities(), cfg.clone()).unwrap();
    let first = ask(&node, request("popular")).await;
    assert_eq!(source(&first), Source::Model);
    let count = |redis: &RedisServer| -> u64 {
        let keys = redis.keys("qnode:v1:cnt:*");
        assert_eq!(keys.len(), 1, "{keys:?}");
        redis::cmd("GET")
            .arg(&keys[0])
            .query(&mut redis.conn())
            .unwrap()
    };
    assert_eq!(count(&redis), 1);
    // Two more asks, both answered by this node's L1: they count for the fleet too, and the
    // third ask makes the key hot.
    for _ in 0..2 {
        assert_eq!(
            source(&ask(&node, request("popular")).await),
            Source::CacheL1
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while answer_keys(&redis).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the L1 answer was never promoted (count {})",
            count(&redis)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count(&redis), 3);
    assert_eq!(node.metrics().hot_promotions.get(), 1);
    assert_eq!(model.count(), 1, "promoted from L1: no second generation");
    // A restarted node (nothing in its L1) answers from Redis.
    let restarted = CachedBackend::new(model.clone(), identities(), cfg).unwrap();
    let again = ask(&restarted, request("popular")).await;
    assert_eq!(source(&again), Source::CacheL2);
    assert_eq!(again.text, first.text);
    assert_eq!(model.count(), 1);
}

#[tokio::test]
async fn hot_sampled_questions_keep_k_answers_and_serve_them_at_random() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::ZERO);
    let cfg = CacheConfig {
        hot_threshold: 2,
        sampled_variants: 3,
        ..config(Some(&redis))
    };
    let node = CachedBackend::new(model.clone(), identities(), cfg.clone()).unwrap();
    let sampled = || {
        let mut r = request("tell me a joke");
        r.sampling.temperature = 1.0;
        r
    };
    let kept = |redis: &RedisServer| -> usize {
        match redis.keys("qnode:v1:var:*").as_slice() {
            [] => 0,
            [key] => redis::cmd("LLEN")
                .arg(key)
                .query(&mut redis.conn())
                .unwrap(),
            more => panic!("{more:?}"),
        }
    };
    // Not hot yet (1 ask): generated, nothing kept.
    assert_eq!(source(&ask(&node, sampled()).await), Source::Model);
    assert_eq!(kept(&redis), 0);
    // Hot from the 2nd ask: each generated answer is kept until there are 3.
    let mut generated = std::collections::HashSet::new();
    for n in 1..=3 {
        let r = ask(&node, sampled()).await;
        assert_eq!(source(&r), Source::Model);
        generated.insert(r.text);
        assert_eq!(kept(&redis), n);
    }
    assert_eq!(model.count(), 4);
    assert_eq!(node.metrics().hot_promotions.get(), 3);
    // From then on one of the 3 at random, on this node and on a fresh one.
    let other = CachedBackend::new(model.clone(), identities(), cfg).unwrap();
    let mut served = std::collections::HashSet::new();
    for i in 0..40 {
        let r = ask(if i % 2 == 0 { &node } else { &other }, sampled()).await;
        match source(&r) {
            Source::CacheVariant(n) => assert!((1..=3).contains(&n), "variant {n}"),
            s => panic!("ask {i} came from {s:?}"),
        }
        assert!(generated.contains(&r.text), "{}", r.text);
        served.insert(r.text);
    }
    assert_eq!(model.count(), 4, "no generation once 3 are kept");
    // 40 uniform draws miss one of 3 answers with probability 3·(2/3)^40 ≈ 3e-7.
    assert_eq!(served.len(), 3, "every kept answer is served");
    assert_eq!(kept(&redis), 3);
    // BYPASS still generates; a seeded request is deterministic and cached as before.
    let mut bypass = sampled();
    bypass.cache_policy = CachePolicy::Bypass;
    assert_eq!(source(&ask(&node, bypass).await), Source::Model);
    assert_eq!(model.count(), 5);
}

#[tokio::test]
async fn max_age_expires_on_both_levels_and_deletes_the_old_value() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::ZERO);
    let clock = ManualClock::new();
    let cfg = CacheConfig {
        max_age: Duration::from_secs(60),
        ..config(Some(&redis))
    };
    let cache = CachedBackend::with_clock(
        model.clone(),
        identities(),
        cfg.clone(),
        Arc::new(clock.clone()),
    )
    .unwrap();
    ask(&cache, request("age")).await;
    assert_eq!(source(&ask(&cache, request("age")).await), Source::CacheL1);
    clock.advance(Duration::from_secs(61));
    // L1 refuses it by age; Redis still has it (its own TTL is wall time) but the envelope's
    // created_at is too old: refused and deleted, and the model answers again.
    let aged = ask(&cache, request("age")).await;
    assert_eq!(source(&aged), Source::Model);
    assert_eq!(cache.metrics().rejected_values.get(), 1);
    assert_eq!(model.count(), 2);
    // The fresh answer is stored again; a node whose clock is right serves it.
    assert_eq!(source(&ask(&cache, request("age")).await), Source::CacheL1);
}

#[tokio::test]
async fn poisoned_and_oversized_values_are_misses_and_deleted() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::ZERO);
    let ids = identities();
    let key = cache_key(&ids[MODEL], &request("poison"), false);
    let redis_key = format!("qnode:v1:ans:{key}");
    let mut conn = redis.conn();

    for (name, value) in [
        ("garbage", b"{not json".to_vec()),
        ("ten megabytes", vec![b'x'; 10 * 1024 * 1024]),
    ] {
        let _: () = redis::cmd("SET")
            .arg(&redis_key)
            .arg(value)
            .query(&mut conn)
            .unwrap();
        // A high threshold: the model's answer is not written back, so only the DEL clears it.
        let cfg = CacheConfig {
            hot_threshold: 100,
            ..config(Some(&redis))
        };
        let cache = CachedBackend::new(model.clone(), ids.clone(), cfg).unwrap();
        let got = ask(&cache, request("poison")).await;
        assert_eq!(source(&got), Source::Model, "{name}");
        assert_eq!(cache.metrics().rejected_values.get(), 1, "{name}");
        // The delete runs in the background.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let v: Option<Vec<u8>> = redis::cmd("GET").arg(&redis_key).query(&mut conn).unwrap();
            if v.is_none() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} was not deleted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // A value altered after writing (checksum) and one from other weights (digest) too.
    let cache = CachedBackend::new(model.clone(), ids.clone(), config(Some(&redis))).unwrap();
    ask(&cache, request("tamper")).await;
    let tkey = format!(
        "qnode:v1:ans:{}",
        cache_key(&ids[MODEL], &request("tamper"), false)
    );
    let stored: String = redis::cmd("GET").arg(&tkey).query(&mut conn).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&stored).unwrap();
    v["text"] = "forged".into();
    let _: () = redis::cmd("SET")
        .arg(&tkey)
        .arg(v.to_string())
        .query(&mut conn)
        .unwrap();
    let other = CachedBackend::new(model.clone(), ids.clone(), config(Some(&redis))).unwrap();
    let got = ask(&other, request("tamper")).await;
    assert_eq!(source(&got), Source::Model);
    assert!(!got.text.contains("forged"));
    assert_eq!(other.metrics().rejected_values.get(), 1);
}

#[tokio::test]
async fn a_tenant_never_sees_another_tenants_answer() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::ZERO);
    let cache = CachedBackend::new(model.clone(), identities(), config(Some(&redis))).unwrap();
    let as_tenant = |t: Option<&str>| {
        let mut r = request("secret plan");
        r.tenant = t.map(String::from);
        r
    };
    let a = ask(&cache, as_tenant(Some("a"))).await;
    let b = ask(&cache, as_tenant(Some("b"))).await;
    let none = ask(&cache, as_tenant(None)).await;
    assert_eq!(
        [source(&a), source(&b), source(&none)],
        [Source::Model, Source::Model, Source::Model]
    );
    assert_ne!(a.text, b.text);
    assert_eq!(ask(&cache, as_tenant(Some("b"))).await.text, b.text);
    let other_node = CachedBackend::new(model.clone(), identities(), config(Some(&redis))).unwrap();
    assert_eq!(ask(&other_node, as_tenant(Some("a"))).await.text, a.text);
    assert_eq!(model.count(), 3);
}

#[tokio::test]
async fn cancelled_and_failed_generations_are_not_cached() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::ZERO);
    let cache = CachedBackend::new(model.clone(), identities(), config(Some(&redis))).unwrap();
    for prompt in ["cancel", "fail"] {
        let first = ask(&cache, request(prompt)).await;
        assert!(first.error.is_some() || first.finished.is_some());
        let second = ask(&cache, request(prompt)).await;
        assert!(second.finished.is_none_or(|f| f.source == Source::Model));
    }
    assert_eq!(model.count(), 4);
    assert!(answer_keys(&redis).is_empty());
}

#[tokio::test]
async fn unknown_models_and_refusals_pass_through() {
    let model = CountingBackend::new(Duration::ZERO);
    let cache = CachedBackend::new(model.clone(), identities(), config(None)).unwrap();
    let mut r = request("x");
    r.model = "nope".into();
    assert_eq!(
        cache.submit(r).await.err(),
        Some(EngineError::UnknownModel("nope".into()))
    );
    assert_eq!(cache.models()[0].id, MODEL);
}

#[tokio::test]
async fn prewarm_loads_the_hottest_answers_into_l1() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::ZERO);
    let writer = CachedBackend::new(model.clone(), identities(), config(Some(&redis))).unwrap();
    for q in ["a", "b", "c"] {
        ask(&writer, request(q)).await;
    }
    // "c" is asked twice more (from other fresh nodes) so it ranks first.
    for _ in 0..2 {
        let n = CachedBackend::new(model.clone(), identities(), config(Some(&redis))).unwrap();
        assert_eq!(source(&ask(&n, request("c")).await), Source::CacheL2);
    }
    let standby = CachedBackend::new(model.clone(), identities(), config(Some(&redis))).unwrap();
    assert_eq!(standby.prewarm_from_redis(1).await, 1);
    let before = model.count();
    let mut only = request("c");
    only.cache_policy = CachePolicy::OnlyIfCached;
    assert_eq!(source(&ask(&standby, only).await), Source::CacheL1);
    assert_eq!(
        standby.prewarm_from_redis(10).await,
        2,
        "a and b; c already in L1"
    );
    assert_eq!(source(&ask(&standby, request("a")).await), Source::CacheL1);
    assert_eq!(model.count(), before);
}

/// Issue #13 item 3: a well-formed envelope written by someone without the fleet secret (another
/// secret, or none, as the unkeyed checksum allowed) is a miss, is counted, and is deleted.
#[tokio::test]
async fn a_value_planted_without_the_fleet_secret_is_a_miss_and_deleted() {
    use qnode::cache::{entry, CachedAnswer, Secret};
    use qnode::engine::FinishReason;

    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::ZERO);
    let ids = identities();
    let mut conn = redis.conn();
    let key = cache_key(&ids[MODEL], &request("planted"), false);
    let redis_key = format!("qnode:v1:ans:{key}");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let forged = CachedAnswer {
        text: "PLANTED ANSWER".into(),
        finish_reason: FinishReason::Stop,
        prompt_tokens: 1,
        completion_tokens: 1,
        created_at_ms: now_ms,
        question: None,
    };
    for planter in [Secret::new("attacker-guess-0123456789"), Secret::default()] {
        let bytes = entry::encode(&key, "digest-1", &forged, &planter);
        let _: () = redis::cmd("SET")
            .arg(&redis_key)
            .arg(bytes)
            .query(&mut conn)
            .unwrap();
        let cfg = CacheConfig {
            hot_threshold: 100,
            ..config(Some(&redis))
        };
        let cache = CachedBackend::new(model.clone(), ids.clone(), cfg).unwrap();
        let got = ask(&cache, request("planted")).await;
        assert_eq!(source(&got), Source::Model, "{planter:?}");
        assert!(!got.text.contains("PLANTED"), "{}", got.text);
        assert_eq!(cache.metrics().rejected_values.get(), 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while redis::cmd("EXISTS")
            .arg(&redis_key)
            .query::<u32>(&mut conn)
            .unwrap()
            == 1
        {
            assert!(std::time::Instant::now() < deadline, "not deleted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The same value signed with the fleet secret is served: the MAC is what decides.
    let bytes = entry::encode(&key, "digest-1", &forged, &SECRET);
    let _: () = redis::cmd("SET")
        .arg(&redis_key)
        .arg(bytes)
        .query(&mut conn)
        .unwrap();
    let cache = CachedBackend::new(model.clone(), ids.clone(), config(Some(&redis))).unwrap();
    let got = ask(&cache, request("planted")).await;
    assert_eq!(source(&got), Source::CacheL2);
    assert_eq!(got.text, "PLANTED ANSWER");
}

#[test]
fn l2_without_a_secret_refuses_to_start_unless_insecure() {
    let model = CountingBackend::new(Duration::ZERO);
    let no_secret = CacheConfig {
        redis_url: Some("redis://127.0.0.1:1/".into()),
        redis_secret: None,
        ..config(None)
    };
    match CachedBackend::new(model.clone(), identities(), no_secret.clone()) {
        Err(qnode::cache::CacheError::InvalidConfig { field, .. }) => {
            assert_eq!(field, "redis_secret")
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("L2 started without a fleet secret"),
    }
    let insecure = CacheConfig {
        redis_insecure: true,
        ..no_secret
    };
    assert!(CachedBackend::new(model, identities(), insecure).is_ok());
}
