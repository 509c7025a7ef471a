//! What the gRPC front costs: the same generation through the engine alone (pool `submit`) and
//! through the server on loopback (unary `Generate` and streamed `GenerateStream`), on the real
//! SmolLM2 file. A 1-token generation shows the fixed per-call overhead; a 64-token one the
//! decode tok/s end to end. The answer cache is bypassed so every call generates.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qnode::config::Config;
use qnode::engine::{Backend, GenerationEvent, GenerationRequest, PromptInput};
use qnode::grpc::proto::inference_client::InferenceClient;
use qnode::grpc::proto::{self, CachePolicy};
use qnode::grpc::{self, ServerConfig, Services};
use qnode::metrics::Metrics;
use qnode::pool::ModelPool;
use tokio_stream::StreamExt;

#[path = "../tests/common/mod.rs"]
mod common;

const PROMPT: &str = "The history of the printing press";

fn engine_request(max_tokens: u32) -> GenerationRequest {
    GenerationRequest::new(
        "bench",
        "smollm2",
        PromptInput::Text(PROMPT.into()),
        max_tokens,
    )
}

fn wire_request(max_tokens: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: "smollm2".into(),
        prompt: Some(PROMPT.into()),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        cache_policy: CachePolicy::Bypass as i32,
        ..Default::default()
    }
}

async fn engine_only(pool: &ModelPool, max_tokens: u32) {
    let mut rx = pool.submit(engine_request(max_tokens)).await.unwrap();
    while let Some(ev) = rx.recv().await {
        if let GenerationEvent::Finished(_) = ev.unwrap() {
            return;
        }
    }
}

fn bench_server(c: &mut Criterion) {
    assert!(
        Path::new("models/smollm2").exists(),
        "models/smollm2 missing: run `python3 models/fetch.py` first (`bash scripts/test.sh` does)"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let metrics = Metrics::new().unwrap();
    let pool = common::smollm2_pool(1, &metrics);
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ServerConfig::new(&Config::default(), metrics);
        let services = Services::ready(Arc::clone(&pool) as Arc<dyn Backend>, &config.metrics);
        tokio::spawn(grpc::run(
            listener,
            services,
            config,
            std::future::pending(),
        ));
        addr
    });
    let mut client = rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        InferenceClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
    });

    let mut g = c.benchmark_group("grpc_overhead");
    g.sample_size(10);
    for max_tokens in [1u32, 64] {
        g.throughput(Throughput::Elements(max_tokens as u64));
        g.bench_function(BenchmarkId::new("engine_only", max_tokens), |b| {
            b.iter(|| rt.block_on(engine_only(&pool, max_tokens)))
        });
        g.bench_function(BenchmarkId::new("grpc_unary", max_tokens), |b| {
            b.iter(|| {
                rt.block_on(async {
                    client.generate(wire_request(max_tokens)).await.unwrap();
                })
            })
        });
        g.bench_function(BenchmarkId::new("grpc_stream", max_tokens), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut s = client
                        .generate_stream(wire_request(max_tokens))
                        .await
                        .unwrap()
                        .into_inner();
                    while let Some(chunk) = s.next().await {
                        chunk.unwrap();
                    }
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_server);
criterion_main!(benches);
