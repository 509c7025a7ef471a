use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use half::f16;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::pack::{BLOCK_BYTES, QK};
use super::*;

/// Raw Q8_0 weights with their unpacked view, for building both the QTensor and the reference.
struct Weights {
    n: usize,
    k: usize,
    bytes: Vec<u8>,
    qs: Vec<i8>,
    d: Vec<f32>,
}

impl Weights {
    /// Random quants over the full i8 range (−128 included: the packing offset must handle it)
    /// and random f16 scales.
    fn random(n: usize, k: usize, rng: &mut StdRng) -> Self {
        let kb = k / QK;
        let mut bytes = Vec::with_capacity(n * kb * BLOCK_BYTES);
        let mut qs = Vec::with_capacity(n * k);
        let mut d = Vec::with_capacity(n * kb);
        for _ in 0..n * kb {
            let scale = f16::from_f32(rng.random_range(1e-4f32..2e-2));
            bytes.extend_from_slice(&scale.to_le_bytes());
            d.push(scale.to_f32());
            for _ in 0..QK {
                let q: i8 = rng.random();
                bytes.push(q as u8);
                qs.push(q);
            }
        }
        Self { n, k, bytes, qs, d }
    }

    fn qtensor(&self) -> QTensor {
        let storage =
            QStorage::from_data(Cow::Borrowed(&self.bytes), &Device::Cpu, GgmlDType::Q8_0).unwrap();
        QTensor::new(storage, (self.n, self.k)).unwrap()
    }

    fn reference(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * self.n];
        matmul_reference(&self.qs, &self.d, self.n, self.k, x, m, &mut out);
        out
    }

    /// Per-output bound on f32 rounding: Σ_b |w_d · a_d · isum_b| scaled by a few ulps per block.
    fn tolerance(&self, x: &[f32], m: usize) -> Vec<f32> {
        let kb = self.k / QK;
        let mut tol = vec![0f32; m * self.n];
        for i in 0..m {
            let xr = &x[i * self.k..(i + 1) * self.k];
            for j in 0..self.n {
                let mut s = 0f32;
                for b in 0..kb {
                    let amax = xr[b * QK..(b + 1) * QK]
                        .iter()
                        .fold(0f32, |a, v| a.max(v.abs()));
                    let blk: f32 = (0..QK)
                        .map(|t| (self.qs[j * self.k + b * QK + t] as f32).abs() * 127.0)
                        .sum();
                    s += blk * self.d[j * kb + b] * amax / 127.0 * 1.001;
                }
                tol[i * self.n + j] = s * 4.0 * kb as f32 * f32::EPSILON + 1e-6;
            }
        }
        tol
    }
}

fn random_x(m: usize, k: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..m * k).map(|_| rng.random_range(-3.0f32..3.0)).collect()
}

fn available_paths() -> Vec<Path> {
    Path::ALL.into_iter().filter(|p| p.available()).collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: &[f32], what: &str) {
    assert_eq!(got.len(), want.len());
    for (idx, ((g, w), t)) in got.iter().zip(want).zip(tol).enumerate() {
        assert!(
            (g - w).abs() <= *t,
            "{what}: element {idx}: got {g}, want {w}, tolerance {t}"
        );
    }
}

#[test]
fn packing_round_trips_every_quant_and_scale() {
    let mut rng = StdRng::seed_from_u64(1);
    let w = Weights::random(37, 96, &mut rng);
    let q = Q8Matrix::from_qtensor(&w.qtensor()).unwrap();
    assert_eq!((q.n_out(), q.k()), (37, 96));
    for row in 0..37 {
        for col in 0..96 {
            assert_eq!(
                q.packed.quant(row, col),
                w.qs[row * 96 + col],
                "({row}, {col})"
            );
        }
        for b in 0..3 {
            assert_eq!(q.packed.scale(row, b), w.d[row * 3 + b]);
        }
    }
}

#[test]
fn every_path_matches_the_reference_on_edge_shapes() {
    let mut rng = StdRng::seed_from_u64(2);
    for &(n, k) in &[(1, 32), (15, 64), (16, 32), (17, 96), (33, 576), (64, 256)] {
        let w = Weights::random(n, k, &mut rng);
        let q = Q8Matrix::from_qtensor(&w.qtensor()).unwrap();
        for m in [1, 2, 3, 4, 5, 7, 8, 9, 13, 17] {
            let x = random_x(m, k, &mut rng);
            let want = w.reference(&x, m);
            let tol = w.tolerance(&x, m);
            for path in available_paths() {
                let mut got = vec![f32::NAN; m * n];
                q.matmul_with(path, &x, m, &mut got);
                assert_close(&got, &want, &tol, &format!("{path:?} n={n} k={k} m={m}"));
            }
        }
    }
}

#[test]
fn extreme_activations_do_not_overflow() {
    // All weights −128 or 127 and activations at ±max: the largest block sums the kernels see.
    let (n, k) = (16, 64);
    let kb = k / QK;
    for fill in [-128i8, 127] {
        let mut bytes = Vec::new();
        for _ in 0..n * kb {
            bytes.extend_from_slice(&f16::from_f32(1.0).to_le_bytes());
            bytes.extend(std::iter::repeat_n(fill as u8, QK));
        }
        let w = Weights {
            n,
            k,
            qs: vec![fill; n * k],
            d: vec![1.0; n * kb],
            bytes,
        };
        let q = Q8Matrix::from_qtensor(&w.qtensor()).unwrap();
        for sign in [1.0f32, -1.0] {
            let x = vec![sign * 127.0; 2 * k];
            let want = w.reference(&x, 2);
            assert_eq!(want[0], sign * fill as f32 * 127.0 * k as f32);
            for path in available_paths() {
                let mut got = vec![0f32; 2 * n];
                q.matmul_with(path, &x, 2, &mut got);
                assert_eq!(got, want, "{path:?} fill={fill} sign={sign}");
            }
        }
    }
}

#[test]
fn non_finite_activations_do_not_panic() {
    let mut rng = StdRng::seed_from_u64(3);
    let w = Weights::random(20, 64, &mut rng);
    let q = Q8Matrix::from_qtensor(&w.qtensor()).unwrap();
    let mut x = random_x(2, 64, &mut rng);
    x[3] = f32::NAN;
    x[64 + 40] = f32::INFINITY;
    x[64 + 7] = f32::NEG_INFINITY;
    let want = w.reference(&x, 2);
    // An infinite block scale makes that row non-finite (as in ggml); a lone NaN quantizes to 0.
    assert!(want[..20].iter().all(|v| v.is_finite()));
    assert!(want[20..].iter().all(|v| !v.is_finite()));
    for path in available_paths() {
        let mut got = vec![0f32; 40];
        q.matmul_with(path, &x, 2, &mut got);
        assert!(got[20..].iter().all(|v| !v.is_finite()), "{path:?}");
        assert_close(
            &got[..20],
            &want[..20],
            &w.tolerance(&x, 1),
            &format!("{path:?}"),
        );
    }
}

#[test]
fn dispatch_picks_the_fastest_available_path() {
    let first = Path::ALL.into_iter().find(|p| p.available()).unwrap();
    assert_eq!(isa(), first.name());
}

#[test]
fn thread_split_is_bit_identical_to_one_thread() {
    let mut rng = StdRng::seed_from_u64(4);
    let w = Weights::random(200, 512, &mut rng);
    let q = Q8Matrix::from_qtensor(&w.qtensor()).unwrap();
    let m = 24;
    let x = random_x(m, 512, &mut rng);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut out = vec![0f32; m * 200];
        pool.install(|| q.matmul_f32(&x, m, &mut out));
        out
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}

#[test]
fn concurrent_matmuls_in_one_pool_share_scratch_safely() {
    let mut rng = StdRng::seed_from_u64(5);
    let w = Weights::random(48, 256, &mut rng);
    let q = Q8Matrix::from_qtensor(&w.qtensor()).unwrap();
    let xs: Vec<(usize, Vec<f32>)> = (1..12).map(|m| (m, random_x(m, 256, &mut rng))).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let outs: Vec<Vec<f32>> = pool.install(|| {
        xs.par_iter()
            .map(|(m, x)| {
                let mut out = vec![0f32; m * 48];
                q.matmul_f32(x, *m, &mut out);
                out
            })
            .collect()
    });
    for ((m, x), got) in xs.iter().zip(&outs) {
        assert_close(
            got,
            &w.reference(x, *m),
            &w.tolerance(x, *m),
            &format!("m={m}"),
        );
    }
}

/// candle's Q8_0 path (used when `k` is not a multiple of 256) quantizes activations the same
/// way, so only f32 summation order may differ.
#[test]
fn forward_matches_candle_qmatmul() {
    let mut rng = StdRng::seed_from_u64(6);
    for &(n, k, m) in &[(40, 576, 1), (33, 96, 5), (64, 1056, 9)] {
        let w = Weights::random(n, k, &mut rng);
        let qt = w.qtensor();
        let ours = Q8Matrix::from_qtensor(&qt).unwrap();
        let theirs = QMatMul::from_qtensor(qt).unwrap();
        let x = random_x(m, k, &mut rng);
        let xt = Tensor::from_slice(&x, (1, m, k), &Device::Cpu).unwrap();
        let got = ours.forward(&xt).unwrap();
        assert_eq!(got.dims(), &[1, m, n]);
        let want = theirs.forward(&xt).unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_close(
            &got,
            &want,
            &w.tolerance(&x, m),
            &format!("n={n} k={k} m={m}"),
        );
    }
}

/// For `k` a multiple of 256 candle repacks and quantizes activations per 256 values (Q8_K), a
/// coarser grid than Q8_0's: agreement within quantization noise, not f32 rounding.
#[test]
fn forward_is_near_candle_qmatmul_on_its_q8k_path() {
    let mut rng = StdRng::seed_from_u64(7);
    let (n, k, m) = (64, 1536, 4);
    let w = Weights::random(n, k, &mut rng);
    let qt = w.qtensor();
    let x = random_x(m, k, &mut rng);
    let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap();
    let got = Q8Matrix::from_qtensor(&qt).unwrap().forward(&xt).unwrap();
    let want = QMatMul::from_qtensor(qt).unwrap().forward(&xt).unwrap();
    let diff = (&got - &want)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let norm = want
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (diff / norm).sqrt() < 1e-2,
        "relative error {}",
        (diff / norm).sqrt()
    );
}

#[test]
fn forward_handles_leading_dims_and_strided_input() {
    let mut rng = StdRng::seed_from_u64(8);
    let w = Weights::random(24, 64, &mut rng);
    let q = Q8Matrix::from_qtensor(&w.qtensor()).unwrap();
    // [k, 6] transposed to [6, k]: not contiguous.
    let x = random_x(6, 64, &mut rng);
    let xt = Tensor::from_slice(&x, (6, 64), &Device::Cpu).unwrap();
    let strided = xt.t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!strided.is_contiguous());
    let got = q.forward(&strided).unwrap();
    assert_eq!(got.dims(), &[6, 24]);
    let want = w.reference(&x, 6);
    assert_close(
        &got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        &want,
        &w.tolerance(&x, 6),
        "strided",
    );
    let batched = q.forward(&xt.reshape((2, 3, 64)).unwrap()).unwrap();
    assert_eq!(batched.dims(), &[2, 3, 24]);
    // A view with a start offset (row 2 onwards).
    let tail = q.forward(&xt.narrow(0, 2, 4).unwrap()).unwrap();
    assert_close(
        &tail.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        &want[2 * 24..],
        &w.tolerance(&x, 6)[2 * 24..],
        "offset view",
    );
}

#[test]
fn bad_weights_are_typed_errors() {
    let x = Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap();
    let q4 = QTensor::quantize(&x, GgmlDType::Q4_0).unwrap();
    assert_eq!(
        Q8Matrix::try_from(&q4).unwrap_err(),
        KernelError::DType("Q4_0".into())
    );
    assert!(Q8Matrix::from_qtensor(&q4).is_err());
    let flat = QTensor::quantize(&x.flatten_all().unwrap(), GgmlDType::Q8_0).unwrap();
    assert_eq!(
        Q8Matrix::try_from(&flat).unwrap_err(),
        KernelError::WeightRank(vec![256])
    );
    assert_eq!(
        check_weight(GgmlDType::Q8_0, &[4, 40], None).unwrap_err(),
        KernelError::BlockMultiple { block: 32, k: 40 }
    );
    assert_eq!(
        check_weight(GgmlDType::Q8_0, &[4, 0], None).unwrap_err(),
        KernelError::BlockMultiple { block: 32, k: 0 }
    );
    assert_eq!(
        check_weight(GgmlDType::Q8_0, &[4, 64], 100).unwrap_err(),
        KernelError::DataSize {
            expected: 4 * 2 * 34,
            got: 100
        }
    );
}

#[test]
fn bad_activations_are_errors_not_panics() {
    let mut rng = StdRng::seed_from_u64(9);
    let q = Q8Matrix::from_qtensor(&Weights::random(8, 64, &mut rng).qtensor()).unwrap();
    assert_eq!(
        q.check_dims(&[3, 32]).unwrap_err(),
        KernelError::InnerDim {
            expected: 64,
            got: 32
        }
    );
    let wrong_k = Tensor::zeros((3, 32), DType::F32, &Device::Cpu).unwrap();
    let err = q.forward(&wrong_k).unwrap_err();
    assert!(
        err.to_string()
            .contains("does not match the weight's k = 64"),
        "{err}"
    );
    let f16x = Tensor::zeros((3, 64), DType::F16, &Device::Cpu).unwrap();
    let err = q.forward(&f16x).unwrap_err();
    assert!(err.to_string().contains("expected f32"), "{err}");
    let scalar = Tensor::new(1f32, &Device::Cpu).unwrap();
    assert!(q.forward(&scalar).is_err());
    // Rank 1 is one row.
    let row = Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(q.forward(&row).unwrap().dims(), &[8]);
    // Zero rows is an empty result, not an error.
    let empty = Tensor::zeros((0, 64), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(q.forward(&empty).unwrap().dims(), &[0, 8]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn every_path_matches_the_reference(n in 1usize..80, kb in 1usize..=64, m in 1usize..=33, seed: u64) {
        let k = kb * QK;
        let mut rng = StdRng::seed_from_u64(seed);
        let w = Weights::random(n, k, &mut rng);
        let q = Q8Matrix::from_qtensor(&w.qtensor()).unwrap();
        let x = random_x(m, k, &mut rng);
        let want = w.reference(&x, m);
        let tol = w.tolerance(&x, m);
        for path in available_paths() {
            let mut got = vec![f32::NAN; m * n];
            q.matmul_with(path, &x, m, &mut got);
            for (idx, ((g, r), t)) in got.iter().zip(&want).zip(&tol).enumerate() {
                prop_assert!((g - r).abs() <= *t, "{:?} n={} k={} m={} idx={}: {} vs {}", path, n, k, m, idx, g, r);
            }
        }
    }
}

/// A line in the test output even when the test passes: libtest captures `print!`/`eprint!` of
/// passing tests, not direct writes to the stderr handle.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// One path against the reference on shapes that cover every row-tile size and a partial panel;
/// when the CPU lacks the path, checks that it is refused (never silently run as another) and
/// says in the test output that it did not run.
fn check_one_path(path: Path) {
    let mut rng = StdRng::seed_from_u64(40 + path as u64);
    let picked = isa();
    if !path.available() {
        let w = Weights::random(16, 64, &mut rng);
        let q = Q8Matrix::from_qtensor(&w.qtensor()).unwrap();
        let x = random_x(1, 64, &mut rng);
        let err = std::panic::catch_unwind(|| {
            let mut out = vec![0f32; 16];
            q.matmul_with(path, &x, 1, &mut out);
        })
        .expect_err("an unavailable path must be refused");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("not supported by this CPU"), "{msg}");
        say(&format!(
            "kernel path {}: NOT RUN - this CPU lacks it (dispatch picks {picked}); \
             run the suite on a CPU with it to test it",
            path.name()
        ));
        return;
    }
    let mut runs = 0;
    for &(n, k) in &[(17, 96), (48, 576), (33, 1536)] {
        let w = Weights::random(n, k, &mut rng);
        let q = Q8Matrix::from_qtensor(&w.qtensor()).unwrap();
        for m in [1, 2, 3, 5, 8, 9, 16, 33] {
            let x = random_x(m, k, &mut rng);
            let mut got = vec![f32::NAN; m * n];
            q.matmul_with(path, &x, m, &mut got);
            assert_close(
                &got,
                &w.reference(&x, m),
                &w.tolerance(&x, m),
                &format!("{path:?} n={n} k={k} m={m}"),
            );
            runs += 1;
        }
    }
    let how = if path.name() == picked {
        "the path dispatch picks"
    } else {
        "forced below the dispatched path"
    };
    say(&format!(
        "kernel path {}: ran {runs} shapes against the reference ({how}, dispatch picks {picked})",
        path.name()
    ));
}

#[test]
fn path_avx512vnni_matches_the_reference_or_says_it_did_not_run() {
    check_one_path(Path::Avx512Vnni);
}

#[test]
fn path_avxvnni_matches_the_reference_or_says_it_did_not_run() {
    check_one_path(Path::AvxVnni);
}

#[test]
fn path_avx2_matches_the_reference_or_says_it_did_not_run() {
    check_one_path(Path::Avx2);
}

#[test]
fn path_scalar_matches_the_reference() {
    assert!(Path::Scalar.available());
    check_one_path(Path::Scalar);
}

#[test]
fn amx_is_detected_and_skipped_cleanly() {
    let status = amx::status();
    // The dispatcher never picks a path that is not built, whatever AMX says.
    assert!(Path::ALL.contains(&isa_path()));
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !flags.is_empty() {
        let listed = flags.split_whitespace().any(|f| f == "amx_int8");
        assert_eq!(
            status != amx::AmxStatus::Absent,
            listed,
            "CPUID and /proc/cpuinfo disagree on amx_int8: {status}"
        );
    }
    assert!(isa_report().contains(&status.to_string()));
    say(&format!("kernel path amx: NOT BUILT - AMX {status}"));
}

/// The AVX-512 block quantizer gives the scalar one's bytes, scales and corrections on rows
/// built to hit its edges: exact halves (`x · id` = n + 0.5 for both signs), values just
/// below a half, ±0, NaN, ±∞, subnormals, all-zero and constant blocks.
#[test]
fn simd_quantizer_gives_the_scalar_bits() {
    let mut rng = StdRng::seed_from_u64(11);
    let k = 32 * 12;
    for round in 0..400 {
        let mut x: Vec<f32> = (0..k).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        for b in 0..k / 32 {
            let blk = &mut x[b * 32..(b + 1) * 32];
            match (round + b) % 8 {
                // amax 127 → id 1: halves round away from zero, -2.5 → -3, 2.5 → 3.
                0 => blk.iter_mut().enumerate().for_each(|(j, v)| {
                    *v = if j == 0 {
                        127.0
                    } else {
                        (j as f32 - 16.0) + 0.5
                    }
                }),
                1 => blk.iter_mut().for_each(|v| *v = 0.0),
                2 => blk
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, v)| *v = if j % 2 == 0 { -0.0 } else { 1e-41 * j as f32 }),
                3 => {
                    blk[rng.random_range(0..32)] = f32::NAN;
                }
                4 => {
                    blk[rng.random_range(0..32)] = if rng.random() {
                        f32::INFINITY
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                5 => blk.iter_mut().enumerate().for_each(|(j, v)| {
                    *v = if j == 3 {
                        127.0
                    } else {
                        f32::from_bits(0x3eff_ffff) * (j as f32 - 9.0).signum()
                    }
                }),
                6 => blk.iter_mut().for_each(|v| *v = 7.25),
                _ => {}
            }
        }
        let (mut q0, mut d0, mut c0) = (vec![0i8; k], vec![0f32; k / 32], vec![0i32; k / 32]);
        let (mut q1, mut d1, mut c1) = (q0.clone(), d0.clone(), c0.clone());
        quantize::quantize_row_scalar(&x, &mut q0, &mut d0, &mut c0);
        quantize::quantize_row(&x, &mut q1, &mut d1, &mut c1);
        assert_eq!(q1, q0, "quants, round {round}");
        assert_eq!(
            d1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            d0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "scales, round {round}"
        );
        assert_eq!(c1, c0, "corrections, round {round}");
    }
}

/// A row's output has the same bits whichever tile computes it (one row alone, a row tile of
/// 8, or the two-panel tiles of a prefill): block sums are integers and every path applies the
/// scales in the same order. The prefix store's exactness relies on it, since a prompt's rows
/// are computed in batches of different sizes with and without a reused prefix.
#[test]
fn a_rows_bits_do_not_depend_on_its_batch() {
    let mut rng = StdRng::seed_from_u64(21);
    for &(n, k) in &[(80, 576), (48, 1536), (17, 96)] {
        let w = Weights::random(n, k, &mut rng);
        let q = Q8Matrix::from_qtensor(&w.qtensor()).unwrap();
        let m = 29;
        let x = random_x(m, k, &mut rng);
        for path in available_paths() {
            let mut all = vec![0f32; m * n];
            q.matmul_with(path, &x, m, &mut all);
            for r in [0, 5, 6, 13, 28] {
                let mut one = vec![0f32; n];
                q.matmul_with(path, &x[r * k..(r + 1) * k], 1, &mut one);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&one),
                    bits(&all[r * n..(r + 1) * n]),
                    "{path:?} n={n} k={k} row {r}"
                );
            }
        }
    }
}
