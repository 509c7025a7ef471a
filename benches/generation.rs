//! Model-level speed on the real SmolLM2 file run as Q8_0: prefill of a 128-token prompt, decode of
//! one stream, and decode of 8 streams batched, with 1 and 2 compute threads. Throughput is in
//! tokens (criterion's elements/s). Compare with ../shared/ANCHORS.md (llama.cpp pp128 / tg64).

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qnode::model::loaded::LoadedModel;
use qnode::model::quantize::Quant;
use qnode::model::transformer::{SeqStep, Transformer};

const MODEL: &str = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const DECODE_STEPS: usize = 64;

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 200 + (i * 37 + salt * 11) % 40_000)
        .collect()
}

/// Time `DECODE_STEPS` decode steps of `batch` sequences after a 16-token prompt each.
fn decode_run(model: &Transformer, batch: usize) -> Duration {
    let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache(512)).collect();
    let prompts: Vec<Vec<u32>> = (0..batch).map(|b| prompt(16, b as u32)).collect();
    let mut steps: Vec<SeqStep> = caches
        .iter_mut()
        .zip(&prompts)
        .map(|(cache, p)| SeqStep { tokens: p, cache })
        .collect();
    model.forward(&mut steps).unwrap();
    let next = [1234u32];
    let started = Instant::now();
    for _ in 0..DECODE_STEPS {
        let mut steps: Vec<SeqStep> = caches
            .iter_mut()
            .map(|cache| SeqStep {
                tokens: &next,
                cache,
            })
            .collect();
        model.forward(&mut steps).unwrap();
    }
    started.elapsed()
}

fn bench_model(c: &mut Criterion) {
    assert!(
        Path::new(MODEL).exists(),
        "{MODEL} missing: run `python3 models/fetch.py` first (`bash scripts/test.sh` does)"
    );
    let model = LoadedModel::load("smollm2", Path::new(MODEL), Quant::Q8_0, &Device::Cpu).unwrap();
    let t = &model.transformer;
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut g = c.benchmark_group("smollm2_q8_0");
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(8));

        let p128 = prompt(128, 0);
        g.throughput(Throughput::Elements(128));
        g.bench_function(
            BenchmarkId::new("prefill_128", format!("{threads}thread")),
            |b| {
                b.iter(|| {
                    pool.install(|| {
                        let mut cache = t.new_cache(256);
                        t.forward(&mut [SeqStep {
                            tokens: &p128,
                            cache: &mut cache,
                        }])
                        .unwrap()
                    })
                })
            },
        );
        for batch in [1usize, 8] {
            g.throughput(Throughput::Elements((batch * DECODE_STEPS) as u64));
            g.bench_function(
                BenchmarkId::new(format!("decode_b{batch}"), format!("{threads}thread")),
                |b| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| pool.install(|| decode_run(t, batch)))
                            .sum()
                    })
                },
            );
        }
        g.finish();
    }
}

criterion_group!(benches, bench_model);
criterion_main!(benches);
