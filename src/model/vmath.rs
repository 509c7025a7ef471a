//! Vector math shared by the forward pass's host kernels: an `exp` for arguments ≤ 0 written once
//! as a chain of adds and multiplies ([`exp_one`]) and repeated lane for lane on 8 and 16 lanes,
//! so every width gives the same bits; and the SiLU-gated product of the feed-forward built on
//! it. libm's `expf` is a call per element and does not vectorize: in a prefill it took 6 % of
//! the time in the SiLU alone.

use std::sync::OnceLock;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting 1.5·2²³ rounds to the nearest integer in the FPU's default mode.
const ROUND: f32 = 12_582_912.0;
/// Cephes' `expf` polynomial, highest degree first.
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `exp(x)` for `x ≤ 0` (softmax after subtracting the max): Cody–Waite range reduction and
/// Cephes' degree-6 polynomial, within 2 ulp of libm's `expf`; only adds, multiplies and bit
/// casts, so [`exp_avx2`] and [`exp_avx512`] repeat it lane-wise where libm's `expf` is a call
/// per element (6 % of a long prompt's time in the softmax, and again in the SiLU). Arguments are clamped to [−87, 0] (below −87 the result is
/// ~1e-38): padding and fully masked lanes (±inf, NaN) give a value that is discarded.
#[inline(always)]
pub(crate) fn exp_one(x: f32) -> f32 {
    let a = if x >= -87.0 { x.min(0.0) } else { -87.0 };
    let n = (a * LOG2E + ROUND) - ROUND;
    let r = a - n * LN2_HI - n * LN2_LO;
    let mut q = EXP_P[0];
    for &c in &EXP_P[1..] {
        q = q * r + c;
    }
    let e = q * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `silu(g) · u` for each element, written to `out`: `g / (1 + e^-g)` computed as
/// `g / (1 + t)` for `g ≥ 0` and `g · t / (1 + t)` for `g < 0`, with `t = exp(-|g|) ≤ 1` from
/// [`exp_one`], so the exponent never overflows. The same bits on every width.
///
/// # Panics
/// If the three slices differ in length.
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(
        g.len() == u.len() && g.len() == out.len(),
        "silu_mul: lengths differ"
    );
    let done = match width() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `width` saw AVX-512 F; the lengths are equal (checked above).
        Width::Avx512 => unsafe { silu_mul_avx512(g, u, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `width` saw AVX2 and FMA; the lengths are equal (checked above).
        Width::Avx2 => unsafe { silu_mul_avx2(g, u, out) },
        Width::Scalar => 0,
    };
    for ((o, &g), &u) in out[done..].iter_mut().zip(&g[done..]).zip(&u[done..]) {
        *o = silu_one(g, u);
    }
}

/// One element of [`silu_mul`].
#[inline(always)]
fn silu_one(g: f32, u: f32) -> f32 {
    let t = exp_one(-g.abs());
    let num = if g < 0.0 { g * t } else { g };
    num / (1.0 + t) * u
}

/// The vector width [`silu_mul`] runs at, detected once.
#[derive(Clone, Copy)]
enum Width {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

fn width() -> Width {
    static W: OnceLock<Width> = OnceLock::new();
    *W.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Width::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Width::Avx2;
            }
        }
        Width::Scalar
    })
}

/// [`silu_one`] on 16 lanes at a time; returns how many elements it wrote (the rest is the
/// caller's scalar tail).
///
/// # Safety
/// The CPU must support AVX-512 F; the slices have equal lengths.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_avx512(g: &[f32], u: &[f32], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = g.len() / 16 * 16;
    let sign = _mm512_set1_epi32(i32::MIN);
    let one = _mm512_set1_ps(1.0);
    for i in (0..n).step_by(16) {
        // SAFETY: i + 16 <= n <= every slice's length.
        unsafe {
            let gv = _mm512_loadu_ps(g.as_ptr().add(i));
            let neg = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(gv), sign));
            let t = exp_avx512(neg);
            let lt = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(gv, _mm512_setzero_ps());
            let num = _mm512_mask_mul_ps(gv, lt, gv, t);
            let y = _mm512_mul_ps(
                _mm512_div_ps(num, _mm512_add_ps(one, t)),
                _mm512_loadu_ps(u.as_ptr().add(i)),
            );
            _mm512_storeu_ps(out.as_mut_ptr().add(i), y);
        }
    }
    n
}

/// [`silu_one`] on 8 lanes at a time; returns how many elements it wrote.
///
/// # Safety
/// The CPU must support AVX2 and FMA; the slices have equal lengths.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(g: &[f32], u: &[f32], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = g.len() / 8 * 8;
    let sign = _mm256_set1_ps(-0.0);
    let one = _mm256_set1_ps(1.0);
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 <= n <= every slice's length.
        unsafe {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let t = exp_avx2(_mm256_or_ps(gv, sign));
            let lt = _mm256_cmp_ps::<_CMP_LT_OQ>(gv, _mm256_setzero_ps());
            let num = _mm256_blendv_ps(gv, _mm256_mul_ps(gv, t), lt);
            let y = _mm256_mul_ps(
                _mm256_div_ps(num, _mm256_add_ps(one, t)),
                _mm256_loadu_ps(u.as_ptr().add(i)),
            );
            _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
        }
    }
    n
}

/// [`exp_one`] on 16 lanes, operation for operation (so the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let lim = _mm512_set1_ps(-87.0);
    let a = _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, lim),
        lim,
        _mm512_min_ps(x, _mm512_setzero_ps()),
    );
    let round = _mm512_set1_ps(ROUND);
    let n = _mm512_sub_ps(
        _mm512_add_ps(_mm512_mul_ps(a, _mm512_set1_ps(LOG2E)), round),
        round,
    );
    let r = _mm512_sub_ps(
        _mm512_sub_ps(a, _mm512_mul_ps(n, _mm512_set1_ps(LN2_HI))),
        _mm512_mul_ps(n, _mm512_set1_ps(LN2_LO)),
    );
    let mut q = _mm512_set1_ps(EXP_P[0]);
    for &c in &EXP_P[1..] {
        q = _mm512_add_ps(_mm512_mul_ps(q, r), _mm512_set1_ps(c));
    }
    let e = _mm512_add_ps(
        _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(q, r), r), r),
        _mm512_set1_ps(1.0),
    );
    let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvttps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(e, _mm512_castsi512_ps(bits))
}

/// [`exp_one`] on 8 lanes, operation for operation (so the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let lim = _mm256_set1_ps(-87.0);
    let a = _mm256_blendv_ps(
        lim,
        _mm256_min_ps(x, _mm256_setzero_ps()),
        _mm256_cmp_ps::<_CMP_GE_OQ>(x, lim),
    );
    let round = _mm256_set1_ps(ROUND);
    let n = _mm256_sub_ps(
        _mm256_add_ps(_mm256_mul_ps(a, _mm256_set1_ps(LOG2E)), round),
        round,
    );
    let r = _mm256_sub_ps(
        _mm256_sub_ps(a, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI))),
        _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)),
    );
    let mut q = _mm256_set1_ps(EXP_P[0]);
    for &c in &EXP_P[1..] {
        q = _mm256_add_ps(_mm256_mul_ps(q, r), _mm256_set1_ps(c));
    }
    let e = _mm256_add_ps(
        _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(q, r), r), r),
        _mm256_set1_ps(1.0),
    );
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvttps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(e, _mm256_castsi256_ps(bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_within_2_ulp() {
        let mut worst = 0u32;
        let xs: Vec<f32> = (0..=200_000)
            .map(|i| -87.0 * i as f32 / 200_000.0)
            .collect();
        let got: Vec<f32> = xs.iter().map(|&x| exp_one(x)).collect();
        for (&x, &g) in xs.iter().zip(&got) {
            let want = x.exp();
            let ulp = (g.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32;
            worst = worst.max(ulp);
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        let edge = [0.0f32, -1e-30, -200.0, f32::NEG_INFINITY].map(exp_one);
        assert_eq!(edge[0], 1.0);
        assert_eq!(edge[1], 1.0);
        assert!(edge[2] < 1e-37 && edge[3] < 1e-37 && edge[3] >= 0.0);
    }

    /// Every width gives the scalar bits, and the SiLU stays within a few ulp of libm's.
    #[test]
    fn silu_widths_agree_and_match_libm() {
        let g: Vec<f32> = (0..4099)
            .map(|i| (i as f32 - 2049.0) * 0.013)
            .chain([0.0, -0.0, 88.5, -88.5, 1e-30, -1e-30, 300.0, -300.0])
            .collect();
        let u: Vec<f32> = (0..g.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut got = vec![0f32; g.len()];
        silu_mul(&g, &u, &mut got);
        for (i, ((&g, &u), &y)) in g.iter().zip(&u).zip(&got).enumerate() {
            assert_eq!(
                y.to_bits(),
                silu_one(g, u).to_bits(),
                "element {i}, g = {g}"
            );
            let want = g / (1.0 + (-g).exp()) * u;
            let err = (y - want).abs();
            assert!(
                err <= 4.0 * f32::EPSILON * want.abs() + 1e-30,
                "g = {g}: {y} vs {want}"
            );
        }
        // The narrower path too, where this CPU also has it.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            let mut narrow = vec![0f32; g.len()];
            // SAFETY: AVX2 and FMA checked above; equal lengths.
            let n = unsafe { silu_mul_avx2(&g, &u, &mut narrow) };
            for i in 0..n {
                assert_eq!(narrow[i].to_bits(), got[i].to_bits(), "AVX2 element {i}");
            }
        }
    }
}
