//! Activation rows quantized to Q8_0-style int8 blocks, once per matmul call.
//!
//! The numerics are ggml's and candle's `quantize_row_q8_0`: per block of 32, `d = max|x| / 127`,
//! `q = round(x / d)`, and the scale used is `d` rounded to f16, so our results match
//! llama.cpp's and candle's Q8_0 paths up to f32 summation order. Each block also records
//! `-128 * sum(q)`, which removes the +128 offset of the packed weights from a `vpdpbusd` sum
//! (see [`super::pack`]).

use std::cell::RefCell;

use half::f16;
use rayon::prelude::*;

use super::pack::QK;

/// Quantized activations `[m, k]`: the view the micro-kernels read.
#[derive(Clone, Copy)]
pub(crate) struct ActQ<'a> {
    /// Rows.
    pub(crate) m: usize,
    /// Columns; a multiple of [`QK`].
    pub(crate) k: usize,
    /// `[m][k]` int8 quants in [-127, 127].
    pub(crate) qs: &'a [i8],
    /// `[m][k / 32]` scales (f16-rounded, as f32).
    pub(crate) d: &'a [f32],
    /// `[m][k / 32]` offset corrections `-128 * sum(q)` of each block.
    pub(crate) corr: &'a [i32],
}

/// Reusable storage for [`ActQ`], so a decode step does not allocate.
#[derive(Default)]
pub(crate) struct ActBuf {
    qs: Vec<i8>,
    d: Vec<f32>,
    corr: Vec<i32>,
}

/// Rows at and above which quantization is split over the current rayon pool.
const PAR_QUANT_MIN_ROWS: usize = 16;

impl ActBuf {
    /// Quantizes `x` (`[m, k]` row-major) into this buffer and returns the view.
    pub(crate) fn quantize(&mut self, x: &[f32], m: usize, k: usize, parallel: bool) -> ActQ<'_> {
        debug_assert_eq!(x.len(), m * k);
        self.quantize_by(m, k, parallel, |i, q, d, c| {
            quantize_row(&x[i * k..(i + 1) * k], q, d, c)
        })
    }

    /// Quantizes rows that `row(i, dst)` writes into a scratch row of `k` values, one at a time:
    /// an activation (norm, SiLU) fused with the quantization reads its inputs once and never
    /// writes its `[m, k]` f32 result to memory.
    pub(crate) fn quantize_rows(
        &mut self,
        m: usize,
        k: usize,
        parallel: bool,
        row: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) -> ActQ<'_> {
        self.quantize_by(m, k, parallel, |i, q, d, c| {
            ROW.with(|r| {
                let mut r = r.borrow_mut();
                r.resize(k, 0.0);
                row(i, &mut r[..]);
                quantize_row(&r[..], q, d, c);
            })
        })
    }

    /// Runs `quant(row, quants, scales, corrections)` for every row, in parallel when asked and
    /// worth it, and returns the view.
    fn quantize_by(
        &mut self,
        m: usize,
        k: usize,
        parallel: bool,
        quant: impl Fn(usize, &mut [i8], &mut [f32], &mut [i32]) + Sync,
    ) -> ActQ<'_> {
        debug_assert_eq!(k % QK, 0);
        let kb = k / QK;
        self.qs.resize(m * k, 0);
        self.d.resize(m * kb, 0.0);
        self.corr.resize(m * kb, 0);
        let (qs, d, corr) = (
            &mut self.qs[..m * k],
            &mut self.d[..m * kb],
            &mut self.corr[..m * kb],
        );
        if parallel && m >= PAR_QUANT_MIN_ROWS && k > 0 {
            qs.par_chunks_mut(k)
                .zip(d.par_chunks_mut(kb))
                .zip(corr.par_chunks_mut(kb))
                .enumerate()
                .for_each(|(i, ((q, d), c))| quant(i, q, d, c));
        } else if k > 0 {
            for (i, ((q, d), c)) in qs
                .chunks_mut(k)
                .zip(d.chunks_mut(kb))
                .zip(corr.chunks_mut(kb))
                .enumerate()
            {
                quant(i, q, d, c);
            }
        }
        ActQ {
            m,
            k,
            qs: &self.qs[..m * k],
            d: &self.d[..m * kb],
            corr: &self.corr[..m * kb],
        }
    }
}

thread_local! {
    /// One f32 row for [`ActBuf::quantize_rows`] per thread.
    static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

thread_local! {
    static SCRATCH: RefCell<ActBuf> = RefCell::new(ActBuf::default());
}

/// Runs `f` with this thread's activation buffer. The buffer is taken out of the thread-local
/// for the duration, so a re-entrant call (a rayon worker that steals another matmul while
/// waiting) gets a fresh buffer instead of a borrow panic; the larger one is kept afterwards.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut ActBuf) -> R) -> R {
    let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let r = f(&mut buf);
    SCRATCH.with(|s| {
        let mut slot = s.borrow_mut();
        if slot.qs.capacity() < buf.qs.capacity() {
            *slot = buf;
        }
    });
    r
}

/// Quantizes one row: `x.len() == q.len() == 32 * d.len() == 32 * corr.len()`. Uses the
/// AVX-512 block quantizer where the CPU has it (bit-identical to [`quantize_row_scalar`]: a
/// prefill spent a sixth of its time here when the scalar `max` fold did not vectorize).
pub(crate) fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], corr: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        assert!(x.len() == q.len() && x.len() == QK * d.len() && d.len() == corr.len());
        // SAFETY: the CPU has AVX-512 F/BW (checked above); the lengths are checked above.
        unsafe { quantize_row_avx512(x, q, d, corr) };
        return;
    }
    quantize_row_scalar(x, q, d, corr);
}

/// Whether the AVX-512 block quantizer can run (std caches the CPUID answer).
#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// [`quantize_block`] on 32 values as two 512-bit registers, operation for operation the same
/// IEEE results: the `max` fold ignores NaN as `f32::max` does (`vmaxps` returns its second
/// operand, the running maximum, when the first is NaN); `x · id` is the same product; NaN
/// becomes 0 and the rest is clamped to ±127 (clamping integers commutes with rounding); and
/// rounding is half away from zero like `f32::round`: truncate, then step away from zero where
/// the exact remainder is at least one half.
///
/// # Safety
/// The CPU must support AVX-512 F/BW; `x.len() == q.len() == 32 * d.len() == 32 * corr.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row_avx512(x: &[f32], q: &mut [i8], d: &mut [f32], corr: &mut [i32]) {
    use std::arch::x86_64::*;
    let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
    let sign_mask = _mm512_set1_epi32(i32::MIN);
    let abs = |v: __m512| _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs_mask));
    for (b, (d, c)) in d.iter_mut().zip(corr.iter_mut()).enumerate() {
        // SAFETY: block b lies within x and q (lengths checked by the caller).
        let (v0, v1) = unsafe {
            (
                _mm512_loadu_ps(x.as_ptr().add(b * QK)),
                _mm512_loadu_ps(x.as_ptr().add(b * QK + 16)),
            )
        };
        let m = _mm512_max_ps(abs(v1), _mm512_max_ps(abs(v0), _mm512_setzero_ps()));
        let amax = _mm512_reduce_max_ps(m);
        let scale = amax / 127.0;
        let id = _mm512_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
        let half = _mm512_set1_ps(0.5);
        let one = _mm512_set1_ps(1.0);
        let quant = |v: __m512| {
            let p = _mm512_mul_ps(v, id);
            let finite = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(p, p);
            let p = _mm512_min_ps(_mm512_max_ps(_mm512_maskz_mov_ps(finite, p), lo), hi);
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
            let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(abs(_mm512_sub_ps(p, t)), half);
            let step = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_and_si512(_mm512_castps_si512(p), sign_mask),
                _mm512_castps_si512(one),
            ));
            _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, step))
        };
        let (i0, i1) = (quant(v0), quant(v1));
        // SAFETY: as the loads above.
        unsafe {
            _mm_storeu_si128(
                q.as_mut_ptr().add(b * QK) as *mut __m128i,
                _mm512_cvtepi32_epi8(i0),
            );
            _mm_storeu_si128(
                q.as_mut_ptr().add(b * QK + 16) as *mut __m128i,
                _mm512_cvtepi32_epi8(i1),
            );
        }
        *d = f16::from_f32(scale).to_f32();
        *c = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    }
}

/// The portable [`quantize_row`].
pub(crate) fn quantize_row_scalar(x: &[f32], q: &mut [i8], d: &mut [f32], corr: &mut [i32]) {
    for (((xs, qs), d), c) in x
        .chunks_exact(QK)
        .zip(q.chunks_exact_mut(QK))
        .zip(d.iter_mut())
        .zip(corr.iter_mut())
    {
        let xs: &[f32; QK] = xs.try_into().expect("chunks_exact(QK)");
        let qs: &mut [i8; QK] = qs.try_into().expect("chunks_exact_mut(QK)");
        let (scale, sum) = quantize_block(xs, qs);
        *d = scale;
        *c = -128 * sum;
    }
}

/// One block: returns the f16-rounded scale and the sum of the quants.
#[inline]
fn quantize_block(xs: &[f32; QK], qs: &mut [i8; QK]) -> (f32, i32) {
    let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(xs) {
        // Non-finite input cannot make an out-of-range quant: NaN → 0, the rest clamped (a no-op
        // for finite input, where |v · id| ≤ 127). Written so the conversion vectorizes.
        let r = (v * id).round();
        let r = if r.is_nan() {
            0.0
        } else {
            r.clamp(-127.0, 127.0)
        };
        // SAFETY: `r` is finite and within [-127, 127].
        *q = unsafe { r.to_int_unchecked::<i32>() } as i8;
        sum += *q as i32;
    }
    (f16::from_f32(d).to_f32(), sum)
}
