//! CPU attention over a ragged batch, straight on the KV caches' host buffers.
//!
//! One call covers every sequence of one layer: per sequence, per query head, per new token, the
//! scores over the visible cached keys (causal, and the sliding window when the layer has one),
//! a softmax, and the weighted sum of the values. With candle ops the same work is a dozen small
//! tensor ops per sequence and layer (narrow, copy, matmul, mask, softmax, matmul, cat), each a
//! few microseconds of dispatch and allocation, which at batch 8 × 30 layers dominated a decode
//! step. Work is split over (sequence, head, block of query rows) on the current rayon pool when
//! there is enough of it to pay for waking the workers.

use rayon::prelude::*;

use super::kv_cache::HostLayerView;

/// Shape of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnShape {
    /// Query heads.
    pub(crate) n_head: usize,
    /// Key/value heads; divides `n_head` (grouped-query attention).
    pub(crate) n_kv_head: usize,
    /// Values per head.
    pub(crate) head_dim: usize,
    /// Sliding window: a token sees the `w` positions ending at itself. `None`: all before it.
    pub(crate) window: Option<usize>,
    /// Factor on the scores (`1 / sqrt(head_dim)`).
    pub(crate) scale: f32,
}

/// One sequence of the batch: its new tokens are rows `off..off + len` of the queries and the
/// output, at positions `start..start + len`; the cache already holds their keys and values.
#[derive(Clone, Copy)]
pub(crate) struct SeqAttn<'a> {
    /// First row of this sequence in the batch.
    pub(crate) off: usize,
    /// New tokens.
    pub(crate) len: usize,
    /// Position of the first new token.
    pub(crate) start: usize,
    /// The layer's cached keys and values, holding at least `start + len` positions.
    pub(crate) kv: HostLayerView<'a>,
}

/// Multiply-accumulates below which the whole call runs on the calling thread.
const MIN_PAR_MACS: usize = 150_000;
/// Query rows per task in prefill.
const ROWS_PER_TASK: usize = 16;

/// Raw output rows shared by tasks that write disjoint (row, head) slices.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only the `head_dim` values of its own (row, head) cells of one live
// `&mut [f32]` that outlives the parallel section; no cell is touched by two tasks.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// `len` values from element `at`.
    ///
    /// # Safety
    /// The range lies in the buffer and no other live slice overlaps it.
    unsafe fn slice<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}

/// Attention of every sequence of one layer.
///
/// `q` holds the (already position-encoded) queries, row `r` at `q[r * q_stride..]` with the
/// `n_head * head_dim` values of row `r` first; `out` is `[rows, n_head * head_dim]`.
///
/// # Panics
/// On buffers too short for the spans given (a caller bug).
pub(crate) fn attend(
    shape: &AttnShape,
    q: &[f32],
    q_stride: usize,
    seqs: &[SeqAttn<'_>],
    out: &mut [f32],
) {
    let (nh, hd) = (shape.n_head, shape.head_dim);
    let width = nh * hd;
    let rows: usize = seqs.iter().map(|s| s.off + s.len).max().unwrap_or(0);
    assert!(out.len() >= rows * width, "attention output too short");
    assert!(
        rows == 0 || q.len() >= (rows - 1) * q_stride + width,
        "queries too short"
    );
    for s in seqs {
        let total = s.start + s.len;
        assert!(
            total <= s.kv.capacity
                && s.kv.k.len() >= shape.n_kv_head * s.kv.capacity * hd
                && s.kv.v.len() >= shape.n_kv_head * s.kv.capacity * hd,
            "KV cache smaller than the positions attended"
        );
    }
    // Tasks: (sequence, query head, first row, rows).
    let mut tasks = Vec::new();
    let mut macs = 0usize;
    for (si, s) in seqs.iter().enumerate() {
        for r0 in (0..s.len).step_by(ROWS_PER_TASK) {
            let n = ROWS_PER_TASK.min(s.len - r0);
            for h in 0..nh {
                tasks.push((si, h, r0, n));
            }
        }
        macs += 2 * nh * hd * s.len * (s.start + s.len);
    }
    let ptr = OutPtr(out.as_mut_ptr());
    let run = |&(si, h, r0, n): &(usize, usize, usize, usize)| {
        let s = &seqs[si];
        let mut scores = Vec::new();
        for i in r0..r0 + n {
            let row = s.off + i;
            let qr = &q[row * q_stride + h * hd..][..hd];
            // SAFETY: row < rows and (h + 1) * hd <= width, checked above; this task alone
            // writes the (row, h) cell.
            let o = unsafe { ptr.slice(row * width + h * hd, hd) };
            head_row(shape, s, h, s.start + i, qr, o, &mut scores);
        }
    };
    if macs < MIN_PAR_MACS || rayon::current_num_threads() == 1 {
        tasks.iter().for_each(run);
    } else {
        tasks.par_iter().for_each(run);
    }
}

/// One query row of head `h` at position `pos`: writes the attended values to `out`.
fn head_row(
    shape: &AttnShape,
    s: &SeqAttn<'_>,
    h: usize,
    pos: usize,
    q: &[f32],
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let hd = shape.head_dim;
    let kvh = h / (shape.n_head / shape.n_kv_head);
    let first = match shape.window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    };
    let base = kvh * s.kv.capacity * hd;
    let keys = &s.kv.k[base + first * hd..base + (pos + 1) * hd];
    let vals = &s.kv.v[base + first * hd..base + (pos + 1) * hd];
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for k in keys.chunks_exact(hd) {
        let sc = dot(q, k) * shape.scale;
        max = max.max(sc);
        scores.push(sc);
    }
    let mut sum = 0f32;
    for sc in scores.iter_mut() {
        *sc = (*sc - max).exp();
        sum += *sc;
    }
    out.fill(0.0);
    for (v, &p) in vals.chunks_exact(hd).zip(scores.iter()) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += p * x;
        }
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// Dot product in 8 independent lanes (vectorizes without reassociation flags).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    /// The candle-ops attention of one sequence (what the forward pass ran before this module):
    /// `q` `[len, nh, hd]`, keys/values `[nkv, total, hd]`; returns `[len, nh * hd]`.
    fn reference(
        shape: &AttnShape,
        q: &[f32],
        len: usize,
        start: usize,
        k: &[f32],
        v: &[f32],
    ) -> Vec<f32> {
        let (nh, nkv, hd) = (shape.n_head, shape.n_kv_head, shape.head_dim);
        let group = nh / nkv;
        let dev = Device::Cpu;
        let total = start + len;
        let q = Tensor::from_slice(q, (len, nh, hd), &dev).unwrap();
        let k = Tensor::from_slice(k, (nkv, total, hd), &dev).unwrap();
        let v = Tensor::from_slice(v, (nkv, total, hd), &dev).unwrap();
        let first = match shape.window {
            Some(w) => (start + 1).saturating_sub(w),
            None => 0,
        };
        let n_keys = total - first;
        let (k, v) = (
            k.narrow(1, first, n_keys).unwrap(),
            v.narrow(1, first, n_keys).unwrap(),
        );
        let qs = q
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((nkv, group * len, hd))
            .unwrap();
        let scores = (qs.matmul(&k.t().unwrap()).unwrap() * shape.scale as f64).unwrap();
        let mut mask = vec![0f32; len * n_keys];
        for i in 0..len {
            for j in 0..n_keys {
                let (qp, kp) = (start + i, first + j);
                if kp > qp || shape.window.is_some_and(|w| qp - kp >= w) {
                    mask[i * n_keys + j] = f32::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (len, n_keys), &dev).unwrap();
        let scores = scores
            .reshape((nkv, group, len, n_keys))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap()
            .reshape((nkv, group * len, n_keys))
            .unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let out = probs.matmul(&v.contiguous().unwrap()).unwrap();
        out.reshape((nh, len, hd))
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .reshape((len, nh * hd))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// A ragged batch `(start, len)` per sequence against the reference, sequence by sequence.
    fn check(shape: AttnShape, batch: &[(usize, usize)], seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (nh, nkv, hd) = (shape.n_head, shape.n_kv_head, shape.head_dim);
        let width = nh * hd;
        // Queries in a wider row, as in the fused QKV buffer.
        let q_stride = width + 2 * nkv * hd;
        let rows: usize = batch.iter().map(|b| b.1).sum();
        let q: Vec<f32> = (0..rows * q_stride)
            .map(|_| rng.gen_range(-2.0..2.0))
            .collect();
        // Caches with spare capacity, filled with junk past the last position.
        let caps: Vec<usize> = batch.iter().map(|&(s, l)| s + l + 5).collect();
        let kvs: Vec<(Vec<f32>, Vec<f32>)> = caps
            .iter()
            .map(|&c| {
                let mut g = || -> Vec<f32> {
                    (0..nkv * c * hd)
                        .map(|_| rng.gen_range(-2.0..2.0))
                        .collect()
                };
                (g(), g())
            })
            .collect();
        let mut off = 0;
        let seqs: Vec<SeqAttn> = batch
            .iter()
            .zip(&kvs)
            .zip(&caps)
            .map(|((&(start, len), (k, v)), &capacity)| {
                let s = SeqAttn {
                    off,
                    len,
                    start,
                    kv: HostLayerView { k, v, capacity },
                };
                off += len;
                s
            })
            .collect();
        let mut out = vec![f32::NAN; rows * width];
        attend(&shape, &q, q_stride, &seqs, &mut out);
        for (s, &cap) in seqs.iter().zip(&caps) {
            let total = s.start + s.len;
            let qs: Vec<f32> = (0..s.len)
                .flat_map(|i| q[(s.off + i) * q_stride..][..width].to_vec())
                .collect();
            let cut = |buf: &[f32]| -> Vec<f32> {
                (0..nkv)
                    .flat_map(|h| buf[h * cap * hd..][..total * hd].to_vec())
                    .collect()
            };
            let want = reference(&shape, &qs, s.len, s.start, &cut(s.kv.k), &cut(s.kv.v));
            let got = &out[s.off * width..(s.off + s.len) * width];
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "seq at {} len {}: value {i}: {g} vs {w}",
                    s.start,
                    s.len
                );
            }
        }
    }

    fn shape(n_head: usize, n_kv_head: usize, head_dim: usize, window: Option<usize>) -> AttnShape {
        AttnShape {
            n_head,
            n_kv_head,
            head_dim,
            window,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    #[test]
    fn decode_batch_gqa() {
        check(
            shape(9, 3, 64, None),
            &[(0, 1), (17, 1), (130, 1), (5, 1)],
            1,
        );
    }

    #[test]
    fn prefill_chunks_causal() {
        // A first chunk, a later chunk, and decode rows in one batch; head_dim not a multiple of 8.
        check(shape(4, 2, 20, None), &[(0, 37), (40, 9), (3, 1)], 2);
    }

    #[test]
    fn sliding_window_prefill_and_decode() {
        check(
            shape(4, 1, 32, Some(8)),
            &[(0, 40), (30, 12), (100, 1), (2, 3)],
            3,
        );
    }

    #[test]
    fn parallel_path_matches() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            check(shape(8, 2, 64, None), &[(0, 70), (200, 1), (64, 20)], 4);
            check(shape(8, 8, 64, Some(16)), &[(10, 50), (300, 1)], 5);
        });
    }
}
