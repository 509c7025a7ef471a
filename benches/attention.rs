//! Attention of one layer, SmolLM2-135M's shape (9 query heads, 3 key/value heads, head_dim 64),
//! on a 2-thread pool as one model instance runs it: a chat turn's new tokens (64 rows) against
//! 0, 1,024 and 4,096 positions of history (and the multi-turn replay's last turn, 98 after
//! 1,552), and decode (one row) of 1 and 8 sequences at 1,024 and
//! 4,096.
//!
//! Each case runs on half-precision caches (the default `kv_dtype`) and on f32 ones, with the
//! AVX2 kernels and, where the CPU has them, the 512-bit ones (ids `f16/avx2`, `f16/avx512`), and
//! on 8-bit keys (`kv_dtype = "q8_keys"`, f16 values) with the widest kernels (`q8k/...`), and on
//! 8-bit keys and values (`kv_dtype = "q8"`, `q8kv/...`).
//!
//! Throughput is in elements/s with 2 × heads × head_dim × visible keys per row (the multiply-adds
//! of `Q·Kᵀ` and `P·V`), i.e. flops/2.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use qnode::model::attention::{attend_on, AttnShape, Isa, SeqAttn};
use qnode::model::kv_cache::{
    key_elem, key_index, q8_blocks, quantize_q8_row, HostLayerView, KvRows, KEY_TILE,
};

const SHAPE: AttnShape = AttnShape {
    n_head: 9,
    n_kv_head: 3,
    head_dim: 64,
    window: None,
    scale: 0.125,
};

/// (name, new rows per sequence, history, sequences)
const CASES: [(&str, usize, usize, usize); 8] = [
    ("turn64@0", 64, 0, 1),
    ("turn64@1024", 64, 1024, 1),
    // Turn 13 of `qnode bench --multi-turn`: 98 new tokens after 1,552 reused ones.
    ("turn98@1552", 98, 1552, 1),
    ("turn64@4096", 64, 4096, 1),
    ("decode@1024", 1, 1024, 1),
    ("decode@4096", 1, 4096, 1),
    ("decode8@1024", 1, 1024, 8),
    ("decode8@4096", 1, 4096, 8),
];

fn isa_name(isa: Isa) -> &'static str {
    match isa {
        Isa::Avx2 => "avx2",
        Isa::Avx512 => "avx512",
    }
}

fn noise(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    let (nh, nkv, hd) = (SHAPE.n_head, SHAPE.n_kv_head, SHAPE.head_dim);
    let width = nh * hd;
    let q_stride = width + 2 * nkv * hd;
    // The kernels this CPU runs, and the AVX2 ones beside them where it has wider ones.
    let isas: Vec<Isa> = match Isa::detect() {
        Isa::Avx2 => vec![Isa::Avx2],
        wide => vec![Isa::Avx2, wide],
    };
    let mut group = c.benchmark_group("attention");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for (name, len, history, n_seqs) in CASES {
        let capacity = (history + len).next_multiple_of(KEY_TILE);
        let kvs: Vec<(Vec<f32>, Vec<f32>)> = (0..n_seqs)
            .map(|i| {
                let n = nkv * capacity * hd;
                (noise(n, 2 * i as u32 + 1), noise(n, 2 * i as u32 + 2))
            })
            .collect();
        // Keys in the cache's tiled layout (their values do not matter here).
        let kvs: Vec<(Vec<f32>, Vec<f32>)> = kvs
            .into_iter()
            .map(|(k, v)| {
                let mut t = vec![0f32; k.len()];
                for h in 0..nkv {
                    for pos in 0..capacity {
                        for d in 0..hd {
                            t[key_index(capacity, hd, h, pos, d)] =
                                k[(h * capacity + pos) * hd + d];
                        }
                    }
                }
                (t, v)
            })
            .collect();
        let half = |x: &[f32]| -> Vec<f16> { x.iter().copied().map(f16::from_f32).collect() };
        let halves: Vec<(Vec<f16>, Vec<f16>)> =
            kvs.iter().map(|(k, v)| (half(k), half(v))).collect();
        // 8-bit keys: each (head, position) row quantized, in the 8-bit tile layout.
        let q8: Vec<(Vec<u8>, Vec<f32>)> = kvs
            .iter()
            .map(|(k, _)| {
                let nb = q8_blocks(hd);
                let (mut q, mut scale) = (vec![0u8; k.len()], vec![0f32; nkv * capacity * nb]);
                let mut row = vec![0u8; hd];
                for h in 0..nkv {
                    for pos in 0..capacity {
                        let x: Vec<f32> = (0..hd)
                            .map(|d| k[key_index(capacity, hd, h, pos, d)])
                            .collect();
                        let at = (h * capacity + pos) * nb;
                        quantize_q8_row(&x, &mut row, &mut scale[at..at + nb]);
                        for (d, &b) in row.iter().enumerate() {
                            q[h * capacity * hd + key_elem(true, hd, pos, d)] = b;
                        }
                    }
                }
                (q, scale)
            })
            .collect();
        // 8-bit values: row-major, each (head, position) row quantized.
        let q8v: Vec<(Vec<u8>, Vec<f32>)> = kvs
            .iter()
            .map(|(_, v)| {
                let (mut q, mut scale) = (vec![0u8; v.len()], vec![0f32; v.len() / 32]);
                for ((x, q), s) in v
                    .chunks(hd)
                    .zip(q.chunks_mut(hd))
                    .zip(scale.chunks_mut(q8_blocks(hd)))
                {
                    quantize_q8_row(x, q, s);
                }
                (q, scale)
            })
            .collect();
        let q = noise(n_seqs * len * q_stride, 99);
        let seq = |i: usize, k, v| SeqAttn {
            off: i * len,
            len,
            start: history,
            kv: HostLayerView { k, v, capacity },
        };
        let f16_seqs: Vec<SeqAttn> = halves
            .iter()
            .enumerate()
            .map(|(i, (k, v))| seq(i, KvRows::F16(k), KvRows::F16(v)))
            .collect();
        let f32_seqs: Vec<SeqAttn> = kvs
            .iter()
            .enumerate()
            .map(|(i, (k, v))| seq(i, KvRows::F32(k), KvRows::F32(v)))
            .collect();
        let q8_seqs: Vec<SeqAttn> = q8
            .iter()
            .zip(&halves)
            .enumerate()
            .map(|(i, ((q, scale), (_, v)))| seq(i, KvRows::Q8 { q, scale, hd }, KvRows::F16(v)))
            .collect();
        let q8kv_seqs: Vec<SeqAttn> = q8
            .iter()
            .zip(&q8v)
            .enumerate()
            .map(|(i, ((q, scale), (qv, sv)))| {
                let v = KvRows::Q8Rows { q: qv, scale: sv };
                seq(i, KvRows::Q8 { q, scale, hd }, v)
            })
            .collect();
        let mut out = vec![0f32; n_seqs * len * width];
        let macs: usize = (0..len).map(|i| 2 * nh * hd * (history + i + 1)).sum();
        group.throughput(Throughput::Elements((macs * n_seqs) as u64));
        for (dtype, seqs) in [
            ("f16", &f16_seqs),
            ("f32", &f32_seqs),
            ("q8k", &q8_seqs),
            ("q8kv", &q8kv_seqs),
        ] {
            for isa in isas.iter().copied() {
                if dtype.starts_with("q8") && isa != Isa::detect() {
                    continue;
                }
                let id = format!("{dtype}/{}", isa_name(isa));
                group.bench_function(BenchmarkId::new(id, name), |b| {
                    b.iter(|| pool.install(|| attend_on(isa, &SHAPE, &q, q_stride, seqs, &mut out)))
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
