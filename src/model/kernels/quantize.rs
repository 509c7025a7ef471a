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
                .zip(x.par_chunks(k))
                .for_each(|(((q, d), c), x)| quantize_row(x, q, d, c));
        } else if k > 0 {
            for (((q, d), c), x) in qs
                .chunks_mut(k)
                .zip(d.chunks_mut(kb))
                .zip(corr.chunks_mut(kb))
                .zip(x.chunks(k))
            {
                quantize_row(x, q, d, c);
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

/// Quantizes one row: `x.len() == q.len() == 32 * d.len() == 32 * corr.len()`.
pub(crate) fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], corr: &mut [i32]) {
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
