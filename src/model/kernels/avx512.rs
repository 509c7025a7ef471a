//! AVX-512 VNNI micro-kernel: `MR` activation rows × one 16-column panel per tile.
//!
//! Per Q8_0 block, each of the 8 weight lines is loaded once into a register and applied to the
//! `MR` rows with `vpdpbusd` (the 4-byte activation broadcast folds into the instruction), so
//! one 64-byte load serves `MR` × 64 MACs. The i32 block sums start at the offset correction and
//! are converted to f32 once per block with the product of the two scales. The caller's panel
//! range is cut into L1-sized blocks ([`Packed::panels_per_block`]); each block runs every row
//! tile before the next, so its weights are reused from L1 across all `m` rows.
//!
//! Overflow: a block sum is at most 32 × 255 × 127 + 128 × 32 × 127 < 2^21 in magnitude.

use core::arch::x86_64::*;

use super::pack::{Packed, LINES_PER_BLOCK, PANEL, QK};
use super::quantize::ActQ;
use super::OutPtr;

/// Largest row tile: `MR` i32 + `MR` f32 accumulators, one weight and spare registers of 32.
const MR_MAX: usize = 8;
/// Row tiles up to this size split each block's dot product over two accumulators.
const SPLIT_MAX_MR: usize = 2;

/// Output columns of panels `p0..p1` for every activation row.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI; `out` must satisfy [`OutPtr`]'s contract for `a.m`
/// rows and `w.n` columns; `p1 <= w.n_panels`; `a.k == w.k`; no other thread may write the
/// columns of these panels during the call.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn panels(w: &Packed, a: &ActQ<'_>, p0: usize, p1: usize, out: OutPtr) {
    if a.m >= PAIR_MR {
        // SAFETY: forwarded from the caller.
        unsafe { panel_pairs(w, a, p0, p1, out) };
        return;
    }
    for c0 in (p0..p1).step_by(w.panels_per_block()) {
        let c1 = (c0 + w.panels_per_block()).min(p1);
        let mut m0 = 0;
        while m0 < a.m {
            let mr = (a.m - m0).min(MR_MAX);
            for p in c0..c1 {
                // SAFETY: forwarded from the caller; m0 + mr <= a.m, p < n_panels.
                unsafe {
                    match mr {
                        1 => tile::<1>(w, a, m0, p, out),
                        2 => tile::<2>(w, a, m0, p, out),
                        3 => tile::<3>(w, a, m0, p, out),
                        4 => tile::<4>(w, a, m0, p, out),
                        5 => tile::<5>(w, a, m0, p, out),
                        6 => tile::<6>(w, a, m0, p, out),
                        7 => tile::<7>(w, a, m0, p, out),
                        _ => tile::<8>(w, a, m0, p, out),
                    }
                }
            }
            m0 += mr;
        }
    }
}

/// Rows per tile of the two-panel kernel: 2 × 6 i32 and 2 × 6 f32 accumulators, two weight
/// lines and a broadcast of 32 registers, and 12 independent `vpdpbusd` chains.
const PAIR_MR: usize = 6;

/// [`panels`] for prefill-sized `m`: tiles of [`PAIR_MR`] rows × two panels, so one
/// broadcast activation feeds two `vpdpbusd` and twelve chains hide the instruction's latency.
/// The rows left over and an odd last panel take [`tile`].
///
/// # Safety
/// As [`panels`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn panel_pairs(w: &Packed, a: &ActQ<'_>, p0: usize, p1: usize, out: OutPtr) {
    let per_block = w.panels_per_block().max(2) & !1;
    for c0 in (p0..p1).step_by(per_block) {
        let c1 = (c0 + per_block).min(p1);
        let full = a.m - a.m % PAIR_MR;
        for m0 in (0..full).step_by(PAIR_MR) {
            let mut p = c0;
            while p + 2 <= c1 {
                // SAFETY: m0 + PAIR_MR <= a.m; p + 1 < p1 <= n_panels.
                unsafe { tile2::<PAIR_MR>(w, a, m0, p, out) };
                p += 2;
            }
            if p < c1 {
                // SAFETY: as above, p < n_panels.
                unsafe { tile::<PAIR_MR>(w, a, m0, p, out) };
            }
        }
        for p in c0..c1 {
            // SAFETY: full <= a.m; the rest is at most PAIR_MR - 1 rows.
            unsafe {
                match a.m - full {
                    0 => {}
                    1 => tile::<1>(w, a, full, p, out),
                    2 => tile::<2>(w, a, full, p, out),
                    3 => tile::<3>(w, a, full, p, out),
                    4 => tile::<4>(w, a, full, p, out),
                    _ => tile::<5>(w, a, full, p, out),
                }
            }
        }
    }
}

/// Rows `m0..m0 + MR` × panels `p` and `p + 1`, over all of `k`: [`tile`] with each activation
/// broadcast applied to both panels' weight lines.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile2<const MR: usize>(w: &Packed, a: &ActQ<'_>, m0: usize, p: usize, out: OutPtr) {
    let kb = w.kb;
    // SAFETY (all raw reads below): p + 1 < n_panels and b < kb bound the weight indices;
    // m0 + MR <= m and b < kb bound the activation indices.
    unsafe {
        let wq0 = w.qs.as_ptr().add(p * kb * LINES_PER_BLOCK) as *const __m512i;
        let wq1 = w.qs.as_ptr().add((p + 1) * kb * LINES_PER_BLOCK) as *const __m512i;
        let wd0 = w.d.as_ptr().add(p * kb * PANEL);
        let wd1 = w.d.as_ptr().add((p + 1) * kb * PANEL);
        let aq: [*const i8; MR] = core::array::from_fn(|i| a.qs.as_ptr().add((m0 + i) * a.k));
        let ad: [*const f32; MR] = core::array::from_fn(|i| a.d.as_ptr().add((m0 + i) * kb));
        let ac: [*const i32; MR] = core::array::from_fn(|i| a.corr.as_ptr().add((m0 + i) * kb));
        let mut acc0 = [_mm512_setzero_ps(); MR];
        let mut acc1 = [_mm512_setzero_ps(); MR];
        for b in 0..kb {
            let mut s0: [__m512i; MR] = core::array::from_fn(|i| _mm512_set1_epi32(*ac[i].add(b)));
            let mut s1 = s0;
            for g in 0..LINES_PER_BLOCK {
                let w0 = _mm512_load_si512(wq0.add(b * LINES_PER_BLOCK + g));
                let w1 = _mm512_load_si512(wq1.add(b * LINES_PER_BLOCK + g));
                for i in 0..MR {
                    let av = (aq[i].add(b * QK + g * 4) as *const i32).read_unaligned();
                    let av = _mm512_set1_epi32(av);
                    s0[i] = _mm512_dpbusd_epi32(s0[i], w0, av);
                    s1[i] = _mm512_dpbusd_epi32(s1[i], w1, av);
                }
            }
            let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(wd0.add(b * PANEL) as *const __m256i));
            let d1 = _mm512_cvtph_ps(_mm256_loadu_si256(wd1.add(b * PANEL) as *const __m256i));
            for i in 0..MR {
                let da = _mm512_set1_ps(*ad[i].add(b));
                acc0[i] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0[i]), _mm512_mul_ps(d0, da), acc0[i]);
                acc1[i] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1[i]), _mm512_mul_ps(d1, da), acc1[i]);
            }
        }
        for i in 0..MR {
            _mm512_storeu_ps(out.at(m0 + i, p * PANEL), acc0[i]);
            let cols = PANEL.min(w.n - (p + 1) * PANEL);
            let mask: __mmask16 = if cols == PANEL {
                !0
            } else {
                (1u16 << cols) - 1
            };
            _mm512_mask_storeu_ps(out.at(m0 + i, (p + 1) * PANEL), mask, acc1[i]);
        }
    }
}

/// Rows `m0..m0 + MR` × panel `p`, over all of `k`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile<const MR: usize>(w: &Packed, a: &ActQ<'_>, m0: usize, p: usize, out: OutPtr) {
    let kb = w.kb;
    // SAFETY (all raw reads below): p < n_panels and b < kb bound the weight indices;
    // m0 + MR <= m and b < kb bound the activation indices.
    unsafe {
        let wq = w.qs.as_ptr().add(p * kb * LINES_PER_BLOCK) as *const __m512i;
        let wd = w.d.as_ptr().add(p * kb * PANEL);
        let aq: [*const i8; MR] = core::array::from_fn(|i| a.qs.as_ptr().add((m0 + i) * a.k));
        let ad: [*const f32; MR] = core::array::from_fn(|i| a.d.as_ptr().add((m0 + i) * kb));
        let ac: [*const i32; MR] = core::array::from_fn(|i| a.corr.as_ptr().add((m0 + i) * kb));
        let mut acc = [_mm512_setzero_ps(); MR];
        for b in 0..kb {
            let mut isum: [__m512i; MR] =
                core::array::from_fn(|i| _mm512_set1_epi32(*ac[i].add(b)));
            // With few rows the 8-deep dependent `vpdpbusd` chain per block (5-cycle latency)
            // limits throughput: split it over two accumulators.
            let mut isum2 = [_mm512_setzero_si512(); MR];
            for g in 0..LINES_PER_BLOCK {
                let wv = _mm512_load_si512(wq.add(b * LINES_PER_BLOCK + g));
                for i in 0..MR {
                    let av = (aq[i].add(b * QK + g * 4) as *const i32).read_unaligned();
                    let av = _mm512_set1_epi32(av);
                    if MR <= SPLIT_MAX_MR && g % 2 == 1 {
                        isum2[i] = _mm512_dpbusd_epi32(isum2[i], wv, av);
                    } else {
                        isum[i] = _mm512_dpbusd_epi32(isum[i], wv, av);
                    }
                }
            }
            if MR <= SPLIT_MAX_MR {
                for i in 0..MR {
                    isum[i] = _mm512_add_epi32(isum[i], isum2[i]);
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(wd.add(b * PANEL) as *const __m256i));
            for i in 0..MR {
                let s = _mm512_mul_ps(dw, _mm512_set1_ps(*ad[i].add(b)));
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), s, acc[i]);
            }
        }
        let cols = PANEL.min(w.n - p * PANEL);
        let mask: __mmask16 = if cols == PANEL {
            !0
        } else {
            (1u16 << cols) - 1
        };
        for (i, v) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.at(m0 + i, p * PANEL), mask, *v);
        }
    }
}
