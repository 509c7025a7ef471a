//! Fail-open: Redis down at boot, killed or frozen (SIGSTOP) under load never fails a request,
//! and the cache uses Redis again once it is back.

mod cache_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_support::*;
use qnode::cache::{CacheConfig, CachedBackend};
use qnode::engine::{Backend, CachePolicy, Source};

fn fail_open_config(redis_url: String) -> CacheConfig {
    CacheConfig {
        redis_url: Some(redis_url),
        redis_timeout: Duration::from_millis(50),
        breaker_failures: 3,
        breaker_cooldown: Duration::from_millis(200),
        ..config(None)
    }
}

/// Runs `n` requests, 8 at a time, each with its own prompt (so each misses L1 and goes to
/// Redis), every 10th with Bypass, and returns how many failed.
async fn load(cache: Arc<CachedBackend>, n: usize, tag: &str) -> usize {
    load_counted(cache, n, tag, Arc::default()).await
}

/// [`load`], adding each finished request to `done` as it goes.
async fn load_counted(
    cache: Arc<CachedBackend>,
    n: usize,
    tag: &str,
    done: Arc<AtomicUsize>,
) -> usize {
    let mut failed = 0;
    for batch in (0..n).collect::<Vec<_>>().chunks(8) {
        let runs = batch.iter().map(|i| {
            let cache = cache.clone();
            let mut req = request(&format!("{tag}-{i}"));
            if i % 10 == 0 {
                req.cache_policy = CachePolicy::Bypass;
            }
            async move {
                match cache.submit(req).await {
                    Ok(s) => {
                        let c = collect(s).await;
                        c.error.is_some() || c.finished.is_none()
                    }
                    Err(_) => true,
                }
            }
        });
        let results = futures::future::join_all(runs).await;
        done.fetch_add(results.len(), Ordering::SeqCst);
        failed += results.into_iter().filter(|f| *f).count();
    }
    failed
}

/// Starts `n` requests of [`load`] in the background and returns once `at` of them are done and
/// Redis holds answers they wrote (it is in use); the caller then breaks Redis mid-load.
async fn start_load_and_wait_until_redis_in_use(
    cache: &Arc<CachedBackend>,
    redis: &RedisServer,
    n: usize,
    at: usize,
    tag: &'static str,
) -> (tokio::task::JoinHandle<usize>, Arc<AtomicUsize>) {
    let done = Arc::new(AtomicUsize::new(0));
    let runner = tokio::spawn(load_counted(cache.clone(), n, tag, done.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.load(Ordering::SeqCst) < at || redis.keys("qnode:v1:ans:*").is_empty() {
        // (`||` short-circuits: Redis is asked only once `at` requests are done.)
        assert!(
            Instant::now() < deadline,
            "load not under way after 30 s: {} done",
            done.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (runner, done)
}

/// After the load ended: it was really cut in the middle (requests ran on both sides of the
/// break), and every one of them succeeded.
fn assert_mid_load(done_at_break: usize, n: usize, failed: usize) {
    assert!(
        done_at_break < n,
        "the load had finished ({done_at_break} of {n}) before Redis broke: not mid-load"
    );
    assert_eq!(failed, 0, "no request may fail because Redis broke");
    eprintln!(
        "Redis broke after {done_at_break} of {n} requests; {} more ran after it, none failed",
        n - done_at_break
    );
}

/// Waits until the cache writes to Redis again (a new answer key appears).
async fn wait_until_redis_used(cache: &CachedBackend, redis: &RedisServer, tag: &str) {
    let before = redis.keys("qnode:v1:ans:*").len();
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0.. {
        let c = ask(cache, request(&format!("{tag}-probe-{i}"))).await;
        assert_eq!(c.error, None);
        if redis.keys("qnode:v1:ans:*").len() > before {
            return;
        }
        assert!(Instant::now() < deadline, "Redis was not used again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_boot_then_up() {
    let port = RedisServer::start().port; // started and dropped: a port nobody listens on
    let model = CountingBackend::new(Duration::ZERO);
    let cache = Arc::new(
        CachedBackend::new(
            model.clone(),
            identities(),
            fail_open_config(format!("redis://127.0.0.1:{port}/")),
        )
        .unwrap(),
    );
    assert_eq!(load(cache.clone(), 40, "boot").await, 0);
    assert_eq!(
        source(&ask(&cache, request("boot-1")).await),
        Source::CacheL1
    );
    let errors: u64 = ["connect", "error", "timeout"]
        .iter()
        .map(|k| cache.metrics().redis_errors.with_label_values(&[k]).get())
        .sum();
    assert!(errors >= 3, "failures counted: {errors}");
    assert!(cache.metrics().redis_skipped.get() > 0, "breaker opened");

    let redis = RedisServer::start_on(port);
    wait_until_redis_used(&cache, &redis, "boot").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_then_restarted() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let model = CountingBackend::new(Duration::from_millis(1));
    let cache = Arc::new(
        CachedBackend::new(model.clone(), identities(), fail_open_config(redis.url())).unwrap(),
    );
    let (runner, done) =
        start_load_and_wait_until_redis_in_use(&cache, &redis, 400, 40, "kill").await;
    redis.kill();
    let done_at_kill = done.load(Ordering::SeqCst);
    let failed = runner.await.unwrap();
    assert_mid_load(done_at_kill, 400, failed);
    let errors: u64 = ["connect", "error", "timeout"]
        .iter()
        .map(|k| cache.metrics().redis_errors.with_label_values(&[k]).get())
        .sum();
    assert!(errors > 0, "Redis died while the load was using it");

    let redis = RedisServer::start_on(port);
    wait_until_redis_used(&cache, &redis, "kill").await;
    assert_eq!(load(cache.clone(), 40, "kill-again").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_mid_load_then_thawed() {
    let redis = RedisServer::start();
    let model = CountingBackend::new(Duration::from_millis(1));
    let cache = Arc::new(
        CachedBackend::new(model.clone(), identities(), fail_open_config(redis.url())).unwrap(),
    );
    let (runner, done) =
        start_load_and_wait_until_redis_in_use(&cache, &redis, 400, 40, "stop").await;
    redis.pause();
    let done_at_pause = done.load(Ordering::SeqCst);
    let failed = runner.await.unwrap();
    assert_mid_load(done_at_pause, 400, failed);
    assert!(
        cache
            .metrics()
            .redis_errors
            .with_label_values(&["timeout"])
            .get()
            > 0
    );
    assert!(
        cache.metrics().redis_skipped.get() > 0,
        "breaker opened while frozen"
    );
    // While frozen, a fresh miss still completes (bounded so a hang fails instead of stalling).
    let c = tokio::time::timeout(
        Duration::from_secs(30),
        ask(&cache, request("while-frozen")),
    )
    .await
    .expect("a request hung on a frozen Redis");
    assert_eq!(c.error, None);

    redis.resume();
    wait_until_redis_used(&cache, &redis, "stop").await;
}

/// Issue #13 item 11: Redis restarted on the same port. Once the breaker's cooldown is over (a
/// manual clock moves it), the very first call, the probe, must reach the new Redis; a dead
/// cached connection used to fail it and keep L2 off for one more cooldown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_probe_after_a_restart_reaches_redis() {
    use qnode::cache::ManualClock;

    let mut redis = RedisServer::start();
    let port = redis.port;
    let model = CountingBackend::new(Duration::ZERO);
    let clock = ManualClock::new();
    let config = CacheConfig {
        breaker_failures: 1,
        breaker_cooldown: Duration::from_secs(2),
        ..config(Some(&redis))
    };
    let cache =
        CachedBackend::with_clock(model.clone(), identities(), config, Arc::new(clock.clone()))
            .unwrap();
    let m = cache.metrics();
    assert_eq!(source(&ask(&cache, request("before")).await), Source::Model);
    assert_eq!(redis.keys("qnode:v1:ans:*").len(), 1, "Redis in use");
    assert_eq!(m.breaker_state.get(), 0);

    redis.kill();
    ask(&cache, request("while down")).await;
    assert_eq!(m.breaker_state.get(), 1, "one failure opens the breaker");

    let redis = RedisServer::start_on(port);
    ask(&cache, request("cooling down")).await;
    assert_eq!(m.breaker_state.get(), 1, "skipped until the cooldown ends");
    clock.advance(Duration::from_secs(2));
    let errors_before: u64 = ["connect", "error", "timeout"]
        .iter()
        .map(|k| m.redis_errors.with_label_values(&[k]).get())
        .sum();
    ask(&cache, request("first probe")).await;
    let errors_after: u64 = ["connect", "error", "timeout"]
        .iter()
        .map(|k| m.redis_errors.with_label_values(&[k]).get())
        .sum();
    assert_eq!(errors_after, errors_before, "the probe failed");
    assert_eq!(m.breaker_state.get(), 0, "the probe closed the breaker");
    // And the answer went to the new Redis.
    assert_eq!(redis.keys("qnode:v1:ans:*").len(), 1);
}
