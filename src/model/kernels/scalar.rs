//! Portable fallback: the panel layout walked with plain integer arithmetic.

use super::pack::{Packed, LINES_PER_BLOCK, PANEL, QK};
use super::quantize::ActQ;
use super::OutPtr;

/// Output columns of panels `p0..p1` for every activation row.
///
/// # Safety
/// `out` must satisfy [`OutPtr`]'s contract for `a.m` rows and `w.n` columns, and no other
/// thread may write the columns of these panels during the call.
pub(crate) unsafe fn panels(w: &Packed, a: &ActQ<'_>, p0: usize, p1: usize, out: OutPtr) {
    let kb = w.kb;
    for i in 0..a.m {
        let arow = &a.qs[i * a.k..(i + 1) * a.k];
        for p in p0..p1 {
            let mut acc = [0f32; PANEL];
            for b in 0..kb {
                let mut isum = [a.corr[i * kb + b]; PANEL];
                let lines = &w.qs[(p * kb + b) * LINES_PER_BLOCK..][..LINES_PER_BLOCK];
                for (g, line) in lines.iter().enumerate() {
                    let av = &arow[b * QK + g * 4..][..4];
                    for (r, s) in isum.iter_mut().enumerate() {
                        for (j, &x) in av.iter().enumerate() {
                            *s += line.0[r * 4 + j] as i32 * x as i32;
                        }
                    }
                }
                let da = a.d[i * kb + b];
                let dw = &w.d[(p * kb + b) * PANEL..][..PANEL];
                for r in 0..PANEL {
                    acc[r] += isum[r] as f32 * (dw[r].to_f32() * da);
                }
            }
            let cols = PANEL.min(w.n - p * PANEL);
            for (r, &v) in acc[..cols].iter().enumerate() {
                // SAFETY: row i < m, column p * PANEL + r < n, owned by this caller.
                unsafe { out.write(i, p * PANEL + r, v) };
            }
        }
    }
}
