//! Cost of the answer cache itself, through `CachedBackend` directly: an L1 hit, an L2 hit
//! (Redis on localhost), and what a miss adds over calling the backend without a cache.
//! The L2 benches need `redis-server` on PATH and fail, saying how to install it, without it.

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use qnode::cache::{CacheConfig, CachedBackend, ModelIdentity};
use qnode::engine::{
    Backend, CachePolicy, Completion, EngineError, EventStream, FinishReason, GenerationEvent,
    GenerationRequest, ModelInfo, PromptInput, Source, Timings,
};
use tokio::sync::mpsc;

/// Answers at once with a fixed 600-byte text in 100 deltas: the cache's overhead stands out.
struct InstantBackend;

#[async_trait::async_trait]
impl Backend for InstantBackend {
    fn models(&self) -> Vec<ModelInfo> {
        vec![]
    }

    async fn submit(&self, _request: GenerationRequest) -> Result<EventStream, EngineError> {
        let (tx, rx) = mpsc::channel(128);
        for _ in 0..100 {
            let _ = tx.try_send(Ok(GenerationEvent::Delta("token ".into())));
        }
        let _ = tx.try_send(Ok(GenerationEvent::Finished(Completion {
            finish_reason: FinishReason::Stop,
            prompt_tokens: 20,
            completion_tokens: 100,
            cached_prompt_tokens: 0,
            timings: Timings::default(),
            source: Source::Model,
        })));
        Ok(rx)
    }
}

fn request(prompt: String, policy: CachePolicy) -> GenerationRequest {
    GenerationRequest {
        cache_policy: policy,
        ..GenerationRequest::new("bench", "m", PromptInput::Text(prompt), 100)
    }
}

fn cache(redis_url: Option<String>, hot_threshold: u64) -> CachedBackend {
    let ids = HashMap::from([(
        "m".to_string(),
        ModelIdentity {
            model_id: "m".into(),
            file_digest: "digest".into(),
            quant: "q8_0".into(),
            template_id: "t".into(),
        },
    )]);
    let config = CacheConfig {
        redis_url,
        hot_threshold,
        chunk_chars: 16,
        redis_timeout: Duration::from_millis(500),
        ..CacheConfig::default()
    };
    CachedBackend::new(Arc::new(InstantBackend), ids, config).expect("cache")
}

async fn drain(mut s: EventStream) -> usize {
    let mut n = 0;
    while let Some(e) = s.recv().await {
        assert!(e.is_ok());
        n += 1;
    }
    n
}

struct Redis(Child, u16);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `redis-server` on a free port. Panics when it cannot run: a bench that skipped its L2 part
/// would print a report that looks complete.
fn start_redis() -> Redis {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start redis-server ({e}): the L2 benches need it; `bash scripts/test.sh` \
                 installs it (or `apt-get install -y redis-server`)"
            )
        });
    let redis = Redis(child, port);
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return redis;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("redis-server did not listen on port {port} within 2 s");
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();

    let local = cache(None, 1);
    rt.block_on(async {
        drain(
            local
                .submit(request("warm".into(), CachePolicy::Default))
                .await
                .unwrap(),
        )
        .await
    });
    c.bench_function("cache_l1_hit_600b_16char_chunks", |b| {
        b.iter(|| {
            rt.block_on(async {
                drain(
                    local
                        .submit(request("warm".into(), CachePolicy::Default))
                        .await
                        .unwrap(),
                )
                .await
            })
        })
    });

    c.bench_function("cache_bypass_baseline", |b| {
        b.iter(|| {
            rt.block_on(async {
                drain(
                    local
                        .submit(request("x".into(), CachePolicy::Bypass))
                        .await
                        .unwrap(),
                )
                .await
            })
        })
    });

    let n = AtomicU64::new(0);
    c.bench_function("cache_miss_no_redis", |b| {
        b.iter(|| {
            let prompt = format!("miss {}", n.fetch_add(1, Ordering::Relaxed));
            rt.block_on(async {
                drain(
                    local
                        .submit(request(prompt, CachePolicy::Default))
                        .await
                        .unwrap(),
                )
                .await
            })
        })
    });

    let redis = start_redis();
    let url = format!("redis://127.0.0.1:{}/", redis.1);
    let l2 = cache(Some(url.clone()), 1);
    rt.block_on(async {
        drain(
            l2.submit(request("hot".into(), CachePolicy::Default))
                .await
                .unwrap(),
        )
        .await
    });
    while l2.in_flight() > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    c.bench_function("cache_l2_hit_600b_localhost", |b| {
        b.iter(|| {
            l2.clear_l1();
            rt.block_on(async {
                drain(
                    l2.submit(request("hot".into(), CachePolicy::Default))
                        .await
                        .unwrap(),
                )
                .await
            })
        })
    });

    // Threshold never reached: a miss pays GET + INCR, never a SET.
    let cold = cache(Some(url), u64::MAX);
    c.bench_function("cache_miss_with_redis_lookup", |b| {
        b.iter(|| {
            let prompt = format!("cold {}", n.fetch_add(1, Ordering::Relaxed));
            rt.block_on(async {
                drain(
                    cold.submit(request(prompt, CachePolicy::Default))
                        .await
                        .unwrap(),
                )
                .await
            })
        })
    });
}

criterion_group! {
    name = cache_benches;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(cache_benches);
