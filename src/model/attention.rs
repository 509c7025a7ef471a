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
/// Query rows per task in prefill: with every query head of one KV head, 16 rows make up to
/// 16 × group query vectors that share each block of keys while it sits in L1.
const ROWS_PER_TASK: usize = 16;
/// Bytes of keys (and as many of values) per block: two blocks fit a 32 KiB L1d with room to
/// spare for the queries and accumulators.
const KEY_BLOCK_BYTES: usize = 8 * 1024;

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
/// The loop is tiled as in flash attention: a task takes one sequence, one KV head and a block of
/// query rows with every query head sharing that KV head; it walks the visible keys in L1-sized
/// blocks, each block read once for all of the task's queries, keeping per query a running
/// maximum, sum and weighted value sum (online softmax), so no score matrix is ever stored and
/// each key and value is read from memory once per task. Scores are exponentiated a block at a
/// time with a vectorizable `exp` ([`exp_block`]). Causal and sliding-window masking are exact:
/// each query only visits its own visible range of each block.
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
    assert!(
        shape.n_kv_head > 0 && nh % shape.n_kv_head == 0,
        "query heads not a multiple of KV heads"
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
    // Work above this many MACs is split over the pool.
    let parallel = rayon::current_num_threads() > 1
        && seqs
            .iter()
            .map(|s| 2 * nh * hd * s.len * (s.start + s.len))
            .sum::<usize>()
            >= MIN_PAR_MACS;
    let group = nh / shape.n_kv_head;
    let block = key_block(hd);
    // Tasks: (sequence, KV head, first row, rows, key range, partial slot). A task per
    // (sequence, KV head, row block) leaves a lone decode with only `n_kv_head` tasks, too few to
    // keep the pool busy on a long history: then its keys are split into chunks whose partial
    // softmax states are merged afterwards (split-K, "flash decoding").
    let base_tasks: usize = seqs
        .iter()
        .map(|s| s.len.div_ceil(ROWS_PER_TASK) * shape.n_kv_head)
        .sum();
    let want = if parallel {
        4 * rayon::current_num_threads()
    } else {
        1
    };
    let mut tasks = Vec::new();
    let mut splits = Vec::new(); // (sequence, KV head, first task, chunks)
    let mut slots = 0usize;
    for (si, s) in seqs.iter().enumerate() {
        let keys = s.start + s.len;
        let chunks = if s.len <= SPLIT_MAX_ROWS && base_tasks < want {
            want.div_ceil(base_tasks).min(keys / (2 * block)).max(1)
        } else {
            1
        };
        for r0 in (0..s.len).step_by(ROWS_PER_TASK) {
            let n = ROWS_PER_TASK.min(s.len - r0);
            for g in 0..shape.n_kv_head {
                if chunks == 1 {
                    tasks.push(TaskSpec {
                        si,
                        g,
                        r0,
                        n,
                        keys: 0..usize::MAX,
                        slot: None,
                    });
                    continue;
                }
                splits.push((si, g, tasks.len(), chunks));
                for c in 0..chunks {
                    let keys = c * keys / chunks..(c + 1) * keys / chunks;
                    tasks.push(TaskSpec {
                        si,
                        g,
                        r0,
                        n,
                        keys,
                        slot: Some(slots),
                    });
                    slots += n * group;
                }
            }
        }
    }
    // Partial states of split tasks: per query `[max, sum, acc[hd]]`.
    let mut partial = vec![0f32; slots * (hd + 2)];
    let ptr = OutPtr(out.as_mut_ptr());
    let part_ptr = OutPtr(partial.as_mut_ptr());
    let run = |t: &TaskSpec| {
        let task = Task {
            shape,
            s: &seqs[t.si],
            g: t.g,
            r0: t.r0,
            n: t.n,
            keys: t.keys.clone(),
            q,
            q_stride,
            out: match t.slot {
                None => Dest::Out(ptr),
                Some(slot) => Dest::Partial(part_ptr, slot),
            },
        };
        match hd {
            64 => task.run::<64>(),
            128 => task.run::<128>(),
            256 => task.run::<256>(),
            _ => task.run_any(),
        }
    };
    if parallel {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
    // Merge the chunks of each split: rescale every partial to the common maximum.
    for &(si, g, first, chunks) in &splits {
        let s = &seqs[si];
        let t0 = &tasks[first];
        for i in 0..t0.n {
            let row = s.off + t0.r0 + i;
            for (j, h) in (g * group..(g + 1) * group).enumerate() {
                let part = |c: usize| {
                    let slot = tasks[first + c].slot.expect("split task") + i * group + j;
                    &partial[slot * (hd + 2)..(slot + 1) * (hd + 2)]
                };
                let m = (0..chunks)
                    .map(|c| part(c)[0])
                    .fold(f32::NEG_INFINITY, f32::max);
                let o = &mut out[row * width + h * hd..][..hd];
                o.fill(0.0);
                let mut sum = 0f32;
                for c in 0..chunks {
                    let p = part(c);
                    if p[0] == f32::NEG_INFINITY {
                        continue;
                    }
                    let w = (p[0] - m).exp();
                    sum += p[1] * w;
                    for (o, a) in o.iter_mut().zip(&p[2..]) {
                        *o = a.mul_add(w, *o);
                    }
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }
}

/// Rows of a sequence at or below which its keys may be split over several tasks.
const SPLIT_MAX_ROWS: usize = 2;

/// Keys per block for a head size: [`KEY_BLOCK_BYTES`] of keys, at least 8.
fn key_block(hd: usize) -> usize {
    (KEY_BLOCK_BYTES / (4 * hd)).max(8)
}

/// What a task covers: sequence, KV head, rows, key positions, and where its result goes.
struct TaskSpec {
    si: usize,
    g: usize,
    r0: usize,
    n: usize,
    keys: std::ops::Range<usize>,
    slot: Option<usize>,
}

/// Where a task writes: the output rows, or (split tasks) partial states from a slot on.
#[derive(Clone, Copy)]
enum Dest {
    Out(OutPtr),
    Partial(OutPtr, usize),
}

/// One task: rows `r0..r0 + n` of sequence `s`, every query head of KV head `g`.
struct Task<'a> {
    shape: &'a AttnShape,
    s: &'a SeqAttn<'a>,
    g: usize,
    r0: usize,
    n: usize,
    /// Key positions this task may visit (all of them unless the keys are split).
    keys: std::ops::Range<usize>,
    q: &'a [f32],
    q_stride: usize,
    out: Dest,
}

/// Running state of one query vector: maximum score, sum of `exp(score - max)`, and the
/// weighted sum of values.
struct Running<A> {
    max: f32,
    sum: f32,
    acc: A,
}

impl Task<'_> {
    /// First visible key position of a query at `pos`.
    fn first(&self, pos: usize) -> usize {
        match self.shape.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }

    /// Query heads of this task's KV head.
    fn heads(&self) -> std::ops::Range<usize> {
        let group = self.shape.n_head / self.shape.n_kv_head;
        self.g * group..(self.g + 1) * group
    }

    /// The task for a head dimension known at compile time (accumulators in registers).
    fn run<const HD: usize>(&self) {
        let heads = self.heads();
        let mut state: Vec<Running<[f32; HD]>> = (0..self.n * heads.len())
            .map(|_| Running {
                max: f32::NEG_INFINITY,
                sum: 0.0,
                acc: [0.0; HD],
            })
            .collect();
        self.walk(HD, &mut state, |st, qv, keys, vals, scores, scale| {
            let qv: &[f32; HD] = qv.try_into().expect("head_dim");
            for (sc, k) in scores.iter_mut().zip(keys.chunks_exact(HD)) {
                *sc = dot_n::<HD>(qv, k.try_into().expect("head_dim")) * scale;
            }
            let Some(p_sum) = online_step(&mut st.max, &mut st.sum, &mut st.acc, scores) else {
                return;
            };
            st.sum += p_sum;
            for (&p, v) in scores.iter().zip(vals.chunks_exact(HD)) {
                let v: &[f32; HD] = v.try_into().expect("head_dim");
                for (a, &x) in st.acc.iter_mut().zip(v) {
                    *a = p.mul_add(x, *a);
                }
            }
        });
    }

    /// The task for any head dimension.
    fn run_any(&self) {
        let hd = self.shape.head_dim;
        let heads = self.heads();
        let mut state: Vec<Running<Vec<f32>>> = (0..self.n * heads.len())
            .map(|_| Running {
                max: f32::NEG_INFINITY,
                sum: 0.0,
                acc: vec![0.0; hd],
            })
            .collect();
        self.walk(hd, &mut state, |st, qv, keys, vals, scores, scale| {
            for (sc, k) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
                *sc = dot(qv, k) * scale;
            }
            let Some(p_sum) = online_step(&mut st.max, &mut st.sum, &mut st.acc, scores) else {
                return;
            };
            st.sum += p_sum;
            for (&p, v) in scores.iter().zip(vals.chunks_exact(hd)) {
                for (a, &x) in st.acc.iter_mut().zip(v) {
                    *a = p.mul_add(x, *a);
                }
            }
        });
    }

    /// Walks the key blocks for every query of the task, then writes each query's result (or,
    /// for a split task, its partial state). `step(state, query, keys, values, scores, scale)`
    /// folds one query's visible keys of one block into its state (`scores` is scratch of one
    /// score per key).
    fn walk<A: AsRef<[f32]>>(
        &self,
        hd: usize,
        state: &mut [Running<A>],
        step: impl Fn(&mut Running<A>, &[f32], &[f32], &[f32], &mut [f32], f32),
    ) {
        let s = self.s;
        let heads = self.heads();
        let group = heads.len();
        let width = self.shape.n_head * hd;
        let base = self.g * s.kv.capacity * hd;
        let block = key_block(hd);
        let first_pos = s.start + self.r0;
        let end = (s.start + self.r0 + self.n).min(self.keys.end);
        let lo = self.first(first_pos).max(self.keys.start);
        let mut scores = vec![0f32; block];
        let mut b0 = lo;
        while b0 < end {
            let b1 = (b0 + block).min(end);
            for i in 0..self.n {
                let pos = first_pos + i;
                // This query's visible keys within the block.
                let k0 = b0.max(self.first(pos));
                let k1 = b1.min(pos + 1);
                if k0 >= k1 {
                    continue;
                }
                let keys = &s.kv.k[base + k0 * hd..base + k1 * hd];
                let vals = &s.kv.v[base + k0 * hd..base + k1 * hd];
                let row = s.off + self.r0 + i;
                for (j, h) in heads.clone().enumerate() {
                    let qv = &self.q[row * self.q_stride + h * hd..][..hd];
                    step(
                        &mut state[i * group + j],
                        qv,
                        keys,
                        vals,
                        &mut scores[..k1 - k0],
                        self.shape.scale,
                    );
                }
            }
            b0 = b1;
        }
        for i in 0..self.n {
            let row = s.off + self.r0 + i;
            for (j, h) in heads.clone().enumerate() {
                let st = &state[i * group + j];
                match self.out {
                    Dest::Out(ptr) => {
                        // SAFETY: row < rows and (h + 1) * hd <= width, checked by `attend`;
                        // this task alone writes the (row, h) cells of its rows and KV head.
                        let o = unsafe { ptr.slice(row * width + h * hd, hd) };
                        let inv = 1.0 / st.sum;
                        for (o, a) in o.iter_mut().zip(st.acc.as_ref()) {
                            *o = a * inv;
                        }
                    }
                    Dest::Partial(ptr, slot) => {
                        // SAFETY: `attend` sized the partial buffer for every split task's
                        // `n × group` slots from `slot`; this task alone owns them.
                        let o = unsafe { ptr.slice((slot + i * group + j) * (hd + 2), hd + 2) };
                        o[0] = st.max;
                        o[1] = st.sum;
                        o[2..].copy_from_slice(st.acc.as_ref());
                    }
                }
            }
        }
    }
}

/// Online-softmax update for one block of `scores` (at least one): rescales `sum` and `acc` to
/// the new maximum, turns `scores` into `exp(score - max)` and returns their sum, to be added by
/// the caller after it has folded the values in.
#[inline]
fn online_step<A: AsMut<[f32]>>(
    max: &mut f32,
    sum: &mut f32,
    acc: &mut A,
    scores: &mut [f32],
) -> Option<f32> {
    let bmax = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    if bmax.is_nan() {
        return None;
    }
    if bmax > *max {
        if *max != f32::NEG_INFINITY {
            let c = (*max - bmax).exp();
            *sum *= c;
            acc.as_mut().iter_mut().for_each(|a| *a *= c);
        }
        *max = bmax;
    }
    Some(exp_block(scores, *max))
}

/// `x ← exp(x - m)` over a block (every `x ≤ m`), returning the sum. A polynomial `exp` written
/// to vectorize (8 lanes at a time); within 2 ulp of libm's over the range softmax uses, where
/// libm's scalar `expf` call per score was a fifth of the time at long contexts.
#[inline]
fn exp_block(x: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for l in 0..8 {
            c[l] = exp_approx(c[l] - m);
            acc[l] += c[l];
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_approx(*v - m);
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

/// `e^x` for `x ≤ 0`: `2^n · e^r` with `n = round(x·log2 e)` and `r = x - n·ln 2` (ln 2 split in
/// two so `r` is exact), `e^r` by Cephes' degree-7 polynomial (relative error ~1e-7); 0 below
/// -87 (past f32's normal range, where softmax weights vanish anyway).
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let p = 1.987_569_1e-4f32;
    let p = p.mul_add(r, 1.398_2e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    // n is in [-126, 0], so the biased exponent is that of a normal float.
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    y * scale
}

/// Dot product of two `N`-vectors in 8 independent lanes.
#[inline(always)]
fn dot_n<const N: usize>(a: &[f32; N], b: &[f32; N]) -> f32 {
    let mut acc = [0f32; 8];
    for c in 0..N / 8 {
        for l in 0..8 {
            acc[l] = a[c * 8 + l].mul_add(b[c * 8 + l], acc[l]);
        }
    }
    let mut t = 0f32;
    for i in N / 8 * 8..N {
        t = a[i].mul_add(b[i], t);
    }
    let h = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (h[0] + h[2]) + (h[1] + h[3]) + t
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

    /// The definition, plainly: per query, every visible key's score, a two-pass softmax and the
    /// weighted sum of values, in f64.
    fn plain(
        shape: &AttnShape,
        q: &[f32],
        q_stride: usize,
        seqs: &[SeqAttn<'_>],
        rows: usize,
    ) -> Vec<f64> {
        let (nh, hd) = (shape.n_head, shape.head_dim);
        let group = nh / shape.n_kv_head;
        let mut out = vec![f64::NAN; rows * nh * hd];
        for s in seqs {
            for i in 0..s.len {
                let (row, pos) = (s.off + i, s.start + i);
                let first = shape.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                for h in 0..nh {
                    let base = (h / group) * s.kv.capacity * hd;
                    let qv = &q[row * q_stride + h * hd..][..hd];
                    let sc: Vec<f64> = (first..=pos)
                        .map(|j| {
                            let k = &s.kv.k[base + j * hd..][..hd];
                            qv.iter()
                                .zip(k)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                * shape.scale as f64
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|v| (v - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        out[(row * nh + h) * hd + d] = (first..=pos)
                            .zip(&e)
                            .map(|(j, p)| p * s.kv.v[base + j * hd + d] as f64)
                            .sum::<f64>()
                            / z;
                    }
                }
            }
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(40))]
        /// Tiled attention against the plain definition: any head layout, head size (the
        /// compile-time sizes and others), window, chunk start and length, including chunks
        /// longer than a task's rows and histories longer than a key block.
        #[test]
        fn tiled_matches_the_plain_definition(
            kv in 1usize..4, group in 1usize..5, hd_pick in 0usize..5,
            window in proptest::option::of(1usize..70),
            batch in proptest::collection::vec((0usize..300, 1usize..40), 1..4),
            threads in 1usize..3, seed: u64,
        ) {
            let hd = [64, 128, 256, 20, 8][hd_pick];
            let sh = shape(kv * group, kv, hd, window);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let width = sh.n_head * hd;
            let rows: usize = batch.iter().map(|b| b.1).sum();
            let q: Vec<f32> = (0..rows * width).map(|_| rng.gen_range(-3.0..3.0)).collect();
            let bufs: Vec<(Vec<f32>, Vec<f32>, usize)> = batch
                .iter()
                .map(|&(s, l)| {
                    let cap = s + l + 3;
                    let mut g = || (0..kv * cap * hd).map(|_| rng.gen_range(-2.0..2.0)).collect();
                    (g(), g(), cap)
                })
                .collect();
            let mut off = 0;
            let seqs: Vec<SeqAttn> = batch
                .iter()
                .zip(&bufs)
                .map(|(&(start, len), (k, v, capacity))| {
                    let s = SeqAttn { off, len, start, kv: HostLayerView { k, v, capacity: *capacity } };
                    off += len;
                    s
                })
                .collect();
            let mut got = vec![f32::NAN; rows * width];
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| attend(&sh, &q, width, &seqs, &mut got));
            let want = plain(&sh, &q, width, &seqs, rows);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                proptest::prop_assert!(
                    (*g as f64 - w).abs() <= 2e-5 * (1.0 + w.abs()),
                    "value {}: {} vs {}", i, g, w
                );
            }
        }
    }

    #[test]
    fn exp_approx_is_close_to_libm() {
        let mut worst = 0f32;
        let mut x = -90.0f32;
        while x <= 0.0 {
            let (a, b) = (exp_approx(x), x.exp());
            if b > 1e-30 {
                worst = worst.max((a - b).abs() / b);
            } else {
                assert!(a < 1e-30, "{x}: {a}");
            }
            x += 0.001;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
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
