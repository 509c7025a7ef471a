//! Q8_0 × f32 matmul: qnode's kernels against candle's `QMatMul`, on SmolLM2-135M's MLP shapes
//! (`[m × 576]·[576 × 1536]ᵀ` up/gate, `[m × 1536]·[1536 × 576]ᵀ` down) for m = 1 (decode),
//! 8 (batched decode) and 128 (prefill).
//!
//! Throughput is reported as elements/s with 2·m·n·k elements per call, i.e. GOPS.
//!
//! Threads: ours run inside a dedicated rayon pool of 1 and 2 threads (`install`), as a model
//! instance does. candle's quantized matmul ignores the caller's pool and uses one process-global
//! pool sized once by `CANDLE_NUM_THREADS`, else `RAYON_NUM_THREADS`, else the core count; its
//! benches are named with that size. For both candle settings run:
//! `CANDLE_NUM_THREADS=1 cargo bench --bench matmul -- candle` and
//! `CANDLE_NUM_THREADS=2 cargo bench --bench matmul -- candle`.

use std::time::Duration;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qnode::model::kernels::{isa, Q8Matrix};

/// (k, n): the weight is `[n, k]`.
const SHAPES: [(usize, usize); 2] = [(576, 1536), (1536, 576)];
const ROWS: [usize; 3] = [1, 8, 128];

/// The pool size candle's quantized matmul uses in this process (its own rule).
fn candle_threads() -> usize {
    ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .find_map(|v| {
            std::env::var(v)
                .ok()?
                .parse()
                .ok()
                .filter(|&t: &usize| t > 0)
        })
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn weights(n: usize, k: usize) -> QTensor {
    let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu).expect("randn");
    QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize")
}

fn bench_matmul(c: &mut Criterion) {
    eprintln!(
        "qnode kernel isa: {}; candle pool: {} threads",
        isa(),
        candle_threads()
    );
    for (k, n) in SHAPES {
        let qt = weights(n, k);
        let ours = Q8Matrix::from_qtensor(&qt).expect("Q8Matrix");
        let theirs = QMatMul::from_qtensor(qt).expect("QMatMul");
        let mut group = c.benchmark_group(format!("q8_0_matmul_k{k}_n{n}"));
        group
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sample_size(20);
        for m in ROWS {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).expect("randn");
            group.throughput(Throughput::Elements((2 * m * n * k) as u64));
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool");
                group.bench_with_input(
                    BenchmarkId::new(format!("qnode_t{threads}"), m),
                    &x,
                    |b, x| b.iter(|| pool.install(|| ours.forward(x).expect("forward"))),
                );
            }
            group.bench_with_input(
                BenchmarkId::new(format!("candle_t{}", candle_threads()), m),
                &x,
                |b, x| b.iter(|| theirs.forward(x).expect("forward")),
            );
        }
        group.finish();
    }
}

criterion_group!(benches, bench_matmul);
criterion_main!(benches);
