//! 256-bit micro-kernels (AVX-VNNI and plain AVX2) over the same panel layout.
//!
//! A 16-row panel is two halves of 8 output columns (bytes 0..32 and 32..64 of each line); a tile
//! is `MR` activation rows × one half-panel, which keeps `2 × MR` accumulators plus temporaries
//! within the 16 ymm registers.
//!
//! - AVX-VNNI: `vpdpbusd` on the +128 weights exactly as the AVX-512 kernel, offset removed by
//!   the per-block activation correction.
//! - AVX2: `vpmaddubsw` saturates its i16 pair sums, and (w + 128) × a reaches 2 × 255 × 127 >
//!   i16::MAX, so the offset is undone (`xor 0x80`) and llama.cpp's sign trick is used instead:
//!   |w| (unsigned) × sign(w)·a (signed) keeps each pair within 2 × 128 × 127 = 32512; then
//!   `vpmaddwd` by ones widens to the same 4-value i32 sums. No offset correction is applied.

use core::arch::x86_64::*;

use super::pack::{Packed, LINES_PER_BLOCK, PANEL, QK};
use super::quantize::ActQ;
use super::OutPtr;

/// Largest row tile.
const MR_MAX: usize = 4;
/// Columns per half-panel (one ymm of f32).
const HALF: usize = PANEL / 2;

macro_rules! panels_fn {
    ($name:ident, $tile:ident, $features:literal) => {
        /// Output columns of panels `p0..p1` for every activation row.
        ///
        /// # Safety
        /// The CPU must support the enabled features; `out` must satisfy [`OutPtr`]'s contract
        /// for `a.m` rows and `w.n` columns; `p1 <= w.n_panels`; `a.k == w.k`; no other thread
        /// may write the columns of these panels during the call.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(w: &Packed, a: &ActQ<'_>, p0: usize, p1: usize, out: OutPtr) {
            for c0 in (p0..p1).step_by(w.panels_per_block()) {
                let c1 = (c0 + w.panels_per_block()).min(p1);
                let mut m0 = 0;
                while m0 < a.m {
                    let mr = (a.m - m0).min(MR_MAX);
                    for p in c0..c1 {
                        for h in 0..2 {
                            if p * PANEL + h * HALF >= w.n {
                                continue;
                            }
                            // SAFETY: forwarded from the caller; m0 + mr <= a.m, p < n_panels.
                            unsafe {
                                match mr {
                                    1 => $tile::<1>(w, a, m0, p, h, out),
                                    2 => $tile::<2>(w, a, m0, p, h, out),
                                    3 => $tile::<3>(w, a, m0, p, h, out),
                                    _ => $tile::<4>(w, a, m0, p, h, out),
                                }
                            }
                        }
                    }
                    m0 += mr;
                }
            }
        }
    };
}

panels_fn!(panels_avxvnni, tile_avxvnni, "avx2,fma,f16c,avxvnni");
panels_fn!(panels_avx2, tile_avx2, "avx2,fma,f16c");

/// Stores `MR` rows of one half-panel, masking columns past `n`.
#[inline(always)]
unsafe fn store<const MR: usize>(
    acc: &[__m256; MR],
    w: &Packed,
    m0: usize,
    col: usize,
    out: OutPtr,
) {
    let cols = HALF.min(w.n - col);
    for (i, v) in acc.iter().enumerate() {
        // SAFETY: row m0 + i < m; columns col..col + cols < n.
        unsafe {
            if cols == HALF {
                _mm256_storeu_ps(out.at(m0 + i, col), *v);
            } else {
                let mut tmp = [0f32; HALF];
                _mm256_storeu_ps(tmp.as_mut_ptr(), *v);
                core::ptr::copy_nonoverlapping(tmp.as_ptr(), out.at(m0 + i, col), cols);
            }
        }
    }
}

/// Rows `m0..m0 + MR` × half `h` of panel `p`, AVX-VNNI.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
#[inline]
unsafe fn tile_avxvnni<const MR: usize>(
    w: &Packed,
    a: &ActQ<'_>,
    m0: usize,
    p: usize,
    h: usize,
    out: OutPtr,
) {
    let kb = w.kb;
    // SAFETY (all raw reads): p < n_panels, b < kb, m0 + MR <= m bound every index.
    unsafe {
        let wq = (w.qs.as_ptr().add(p * kb * LINES_PER_BLOCK) as *const u8).add(h * 32);
        let wd = w.d.as_ptr().add(p * kb * PANEL + h * HALF);
        let aq: [*const i8; MR] = core::array::from_fn(|i| a.qs.as_ptr().add((m0 + i) * a.k));
        let ad: [*const f32; MR] = core::array::from_fn(|i| a.d.as_ptr().add((m0 + i) * kb));
        let ac: [*const i32; MR] = core::array::from_fn(|i| a.corr.as_ptr().add((m0 + i) * kb));
        let mut acc = [_mm256_setzero_ps(); MR];
        for b in 0..kb {
            let mut isum: [__m256i; MR] =
                core::array::from_fn(|i| _mm256_set1_epi32(*ac[i].add(b)));
            for g in 0..LINES_PER_BLOCK {
                let wv =
                    _mm256_load_si256(wq.add((b * LINES_PER_BLOCK + g) * 64) as *const __m256i);
                for i in 0..MR {
                    let av = (aq[i].add(b * QK + g * 4) as *const i32).read_unaligned();
                    isum[i] = _mm256_dpbusd_avx_epi32(isum[i], wv, _mm256_set1_epi32(av));
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(wd.add(b * PANEL) as *const __m128i));
            for i in 0..MR {
                let s = _mm256_mul_ps(dw, _mm256_set1_ps(*ad[i].add(b)));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), s, acc[i]);
            }
        }
        store(&acc, w, m0, p * PANEL + h * HALF, out);
    }
}

/// Rows `m0..m0 + MR` × half `h` of panel `p`, AVX2 (sign trick, no offset correction).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_avx2<const MR: usize>(
    w: &Packed,
    a: &ActQ<'_>,
    m0: usize,
    p: usize,
    h: usize,
    out: OutPtr,
) {
    let kb = w.kb;
    // SAFETY (all raw reads): p < n_panels, b < kb, m0 + MR <= m bound every index.
    unsafe {
        let wq = (w.qs.as_ptr().add(p * kb * LINES_PER_BLOCK) as *const u8).add(h * 32);
        let wd = w.d.as_ptr().add(p * kb * PANEL + h * HALF);
        let aq: [*const i8; MR] = core::array::from_fn(|i| a.qs.as_ptr().add((m0 + i) * a.k));
        let ad: [*const f32; MR] = core::array::from_fn(|i| a.d.as_ptr().add((m0 + i) * kb));
        let offset = _mm256_set1_epi8(0x80u8 as i8);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); MR];
        for b in 0..kb {
            let mut isum = [_mm256_setzero_si256(); MR];
            for g in 0..LINES_PER_BLOCK {
                let wv =
                    _mm256_load_si256(wq.add((b * LINES_PER_BLOCK + g) * 64) as *const __m256i);
                let wi = _mm256_xor_si256(wv, offset);
                let wabs = _mm256_abs_epi8(wi);
                for i in 0..MR {
                    let av = (aq[i].add(b * QK + g * 4) as *const i32).read_unaligned();
                    let sa = _mm256_sign_epi8(_mm256_set1_epi32(av), wi);
                    let p16 = _mm256_maddubs_epi16(wabs, sa);
                    isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(p16, ones));
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(wd.add(b * PANEL) as *const __m128i));
            for i in 0..MR {
                let s = _mm256_mul_ps(dw, _mm256_set1_ps(*ad[i].add(b)));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), s, acc[i]);
            }
        }
        store(&acc, w, m0, p * PANEL + h * HALF, out);
    }
}
