//! The exact scalar definition every kernel path is tested against.

use super::pack::QK;
use super::quantize::quantize_row_scalar;

/// `out = quant(x) · Wᵀ` computed naively from unpacked Q8_0 weights.
///
/// `w_qs` is `[n][k]` int8 quants and `w_d` `[n][k / 32]` their scales (as f32); `x` is
/// `[m][k]`, `out` `[m][n]`. Activations are quantized exactly as the kernels do; each block's
/// integer dot product is exact and blocks are summed in order in f32, so the kernels may differ
/// only by f32 rounding (summation order and fused multiply-add).
///
/// # Panics
/// If a slice length disagrees with `m`, `n`, `k`, or `k` is not a multiple of 32; this is a test
/// and bench helper, not a serving path.
#[allow(clippy::too_many_arguments)]
pub fn matmul_reference(
    w_qs: &[i8],
    w_d: &[f32],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    assert_eq!(k % QK, 0, "k = {k} is not a multiple of {QK}");
    let kb = k / QK;
    assert_eq!(w_qs.len(), n * k);
    assert_eq!(w_d.len(), n * kb);
    assert_eq!(x.len(), m * k);
    assert_eq!(out.len(), m * n);
    let mut aq = vec![0i8; k];
    let mut ad = vec![0f32; kb];
    let mut corr = vec![0i32; kb];
    for i in 0..m {
        quantize_row_scalar(&x[i * k..(i + 1) * k], &mut aq, &mut ad, &mut corr);
        for j in 0..n {
            let mut acc = 0f32;
            for b in 0..kb {
                let isum: i32 = (0..QK)
                    .map(|t| aq[b * QK + t] as i32 * w_qs[j * k + b * QK + t] as i32)
                    .sum();
                acc += isum as f32 * (w_d[j * kb + b] * ad[b]);
            }
            out[i * n + j] = acc;
        }
    }
}
