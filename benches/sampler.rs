//! Cost of choosing one token from a row of logits, at SmolLM2's (49,152) and Gemma 3's (262,144)
//! vocabulary sizes: greedy (one pass) and temperature + top-k + top-p sampling; and what a
//! request that asks for `logprobs` adds per token (log-softmax over the row, top 5).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use qnode::engine::logprobs::LogprobSpec;
use qnode::engine::sampler::Sampler;
use qnode::engine::SamplingParams;

const VOCABS: [usize; 2] = [49_152, 262_144];

/// Deterministic logits with a realistic spread: a few strong candidates over a long flat tail.
fn logits(n: usize) -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32;
            // Mostly in [-4, 4], with a heavier upper tail.
            8.0 * u * u - 4.0
        })
        .collect()
}

fn bench(c: &mut Criterion, group: &str, params: SamplingParams) {
    let mut g = c.benchmark_group(group);
    for n in VOCABS {
        let row = logits(n);
        let history: Vec<u32> = (0..512).map(|i| (i * 97 % n) as u32).collect();
        let mut sampler = Sampler::new(&params);
        let mut work = row.clone();
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                work.copy_from_slice(&row);
                black_box(sampler.sample(black_box(&mut work), &history))
            })
        });
    }
    g.finish();
}

fn samplers(c: &mut Criterion) {
    bench(c, "cpu_sample_greedy", SamplingParams::default());
    bench(
        c,
        "cpu_sample_greedy_penalty",
        SamplingParams {
            repetition_penalty: 1.1,
            ..SamplingParams::default()
        },
    );
    bench(
        c,
        "cpu_sample_topk40_topp095",
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed: Some(1),
            ..SamplingParams::default()
        },
    );
    bench(
        c,
        "cpu_sample_topp09_no_topk",
        SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: Some(1),
            ..SamplingParams::default()
        },
    );
    bench(
        c,
        "cpu_sample_minp005",
        SamplingParams {
            temperature: 1.0,
            min_p: 0.05,
            seed: Some(1),
            ..SamplingParams::default()
        },
    );
}

/// The per-token work of a `logprobs` request, on top of sampling: the chosen token's value and
/// its 5 most likely alternatives with their bytes.
fn logprobs(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_logprobs_top5");
    for n in VOCABS {
        let row = logits(n);
        let spec = LogprobSpec {
            top: 5,
            token_bytes: std::sync::Arc::new(
                (0..n).map(|i| format!("t{i}").into_bytes()).collect(),
            ),
        };
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(spec.entry(black_box(&row), 7)))
        });
    }
    g.finish();
}

criterion_group!(benches, samplers, logprobs);
criterion_main!(benches);
