//! CPU attention over a ragged batch, straight on the KV caches' host buffers.
//!
//! One call covers every sequence of one layer: per sequence, per query head, per new token, the
//! scores over the visible cached keys (causal, and the sliding window when the layer has one),
//! a softmax, and the weighted sum of the values. Work is split over (sequence, key/value head,
//! block of up to 16 query rows) on the current rayon pool when there is enough of it to pay for
//! waking the workers.
//!
//! Each task takes every query vector of its block at once — the rows × the query heads sharing
//! one key/value head — so a key or value is read once per block, not once per query vector: a
//! chat turn is tens of new tokens against thousands of cached ones, where the old row-by-row loop
//! spent 79 % of a 4k prompt's time (../shared/PROFILE.md). Queries sit in SIMD lanes (8 per
//! register), each score is one chain of fused multiply-adds over `head_dim` in order, the
//! softmax runs lane-wise with a vectorised `exp`, and each output is a chain over the keys in
//! order. So a (query, key) score and a query's output come out bit-identical whichever block,
//! lane or batch the query lands in: prefill in one chunk or many, decode after a reused prefix,
//! batch of one or eight — the prefix store's exactness tests rely on it.

use rayon::prelude::*;

use super::kernels::Q8_0_BLOCK;
use super::kv_cache::{HostLayerView, KvRows, KEY_TILE};
use super::scores_q8::{self, Q8Keys, Q8Queries, PREFETCH_STEPS};
use super::vmath::exp_one;
#[cfg(target_arch = "x86_64")]
use super::vmath::{exp_avx2, exp_avx512};

/// Shape of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads; divides `n_head` (grouped-query attention).
    pub n_kv_head: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Sliding window: a token sees the `w` positions ending at itself. `None`: all before it.
    pub window: Option<usize>,
    /// Factor on the scores (`1 / sqrt(head_dim)`).
    pub scale: f32,
}

/// One sequence of the batch: its new tokens are rows `off..off + len` of the queries and the
/// output, at positions `start..start + len`; the cache already holds their keys and values.
#[derive(Clone, Copy)]
pub struct SeqAttn<'a> {
    /// First row of this sequence in the batch.
    pub off: usize,
    /// New tokens.
    pub len: usize,
    /// Position of the first new token.
    pub start: usize,
    /// The layer's cached keys and values, holding at least `start + len` positions.
    pub kv: HostLayerView<'a>,
}

/// Multiply-accumulates below which the whole call runs on the calling thread.
const MIN_PAR_MACS: usize = 150_000;
/// Query rows per task in prefill.
const ROWS_PER_TASK: usize = 16;
/// Query vectors per SIMD register (AVX2 at the x86-64-v3 baseline).
const LANES: usize = 8;
/// Keys scored together per lane group: independent FMA chains that hide the FMA latency.
const KEYS: usize = 8;
/// Keys per tile of the value pass (16 KB of values at head_dim 64: stays in L1).
const V_TILE: usize = 64;
/// Positions per chunk of the softmax: each query's keys are cut at multiples of this, every
/// chunk gets its own softmax (max, sum, weighted values), and the chunks are merged in order
/// ([`merge_query`]). The cut is by position, never by how the work was split, so a query's
/// output has the same bits in one task or spread over several — which is what lets one
/// decoded token's keys run on every thread.
const CHUNK: usize = 256;
/// A call with fewer tasks than this many per thread cuts its long tasks into pieces of whole
/// chunks (one decoded token has only one task per key/value head: 3 on 2 threads for SmolLM2).
const TASKS_PER_THREAD: usize = 6;
/// Fewest chunks per piece when a task is cut (smaller pieces cost more to schedule than they
/// share).
const MIN_PIECE_CHUNKS: usize = 2;

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

/// One unit of parallel work: rows `r0..r0 + n` of sequence `seq`, for every query head of
/// key/value head `kvh`, over the keys of chunks `c0..c1`.
#[derive(Clone, Copy)]
struct Task {
    seq: usize,
    kvh: usize,
    r0: usize,
    n: usize,
    c0: usize,
    c1: usize,
    /// Where a piece of a cut task leaves its chunks' partial results in the call's shared
    /// buffer (`None`: the task covers all its chunks and writes the output itself).
    part: Option<usize>,
}

impl Task {
    /// Floats of one chunk's partial result: `m` outputs of `hd`, then `m` maxima, `m` sums.
    fn slot(&self, group: usize, hd: usize) -> usize {
        self.n * group * (hd + 2)
    }
}

/// Per-thread buffers, reused across tasks and calls.
#[derive(Default)]
struct Scratch {
    /// Queries, lane-major: `[group of LANES][head_dim][LANES]`.
    q: Vec<f32>,
    /// Scores, then probabilities: `[key][padded query]`.
    p: Vec<f32>,
    /// Partial results of a whole task's chunks (see [`Task::slot`]).
    parts: Vec<f32>,
    /// Keys widened from the cache's half precision: `[KEYS][head_dim]`.
    k: Vec<f32>,
    /// Values widened likewise: `[V_TILE][head_dim]`.
    v: Vec<f32>,
    /// Queries in 8 bits, for caches of 8-bit keys.
    q8: Q8Queries,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Attention of every sequence of one layer.
///
/// `q` holds the (already position-encoded) queries, row `r` at `q[r * q_stride..]` with the
/// `n_head * head_dim` values of row `r` first; `out` is `[rows, n_head * head_dim]`.
///
/// # Panics
/// On buffers too short for the spans given (a caller bug).
pub fn attend(
    shape: &AttnShape,
    q: &[f32],
    q_stride: usize,
    seqs: &[SeqAttn<'_>],
    out: &mut [f32],
) {
    attend_on(Isa::detect(), shape, q, q_stride, seqs, out);
}

/// The kernels one call runs on. Every choice gives the same bits (each score, sum and output
/// is the same chain of operations in the same order; only how many run side by side differs),
/// so a machine's choice never changes what the prefix store's exactness rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable loops (and the AVX2 kernels where the CPU has them): queries 8 to a group.
    Avx2,
    /// 512-bit kernels for the prefill scores and the value sums: queries 16 to a group.
    Avx512,
}

impl Isa {
    /// The widest this CPU runs: AVX-512 F beside the AVX2 + FMA + F16C the rest needs.
    /// Detected once: every layer of every step asks.
    pub fn detect() -> Self {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if simd() && std::arch::is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            Self::Avx2
        })
    }

    /// Queries per group in the packed query buffer.
    fn lanes(self) -> usize {
        match self {
            Self::Avx2 => LANES,
            Self::Avx512 => 2 * LANES,
        }
    }
}

/// [`attend`] on the kernels of `isa`, which the CPU must have ([`Isa::detect`] or narrower):
/// for benchmarks and tests that set the paths side by side.
///
/// # Panics
/// As [`attend`], and when `isa` is wider than this CPU.
pub fn attend_on(
    isa: Isa,
    shape: &AttnShape,
    q: &[f32],
    q_stride: usize,
    seqs: &[SeqAttn<'_>],
    out: &mut [f32],
) {
    assert!(
        isa == Isa::Avx2 || Isa::detect() == isa,
        "{isa:?} kernels on a CPU without them"
    );
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
        "query heads must be a multiple of key/value heads"
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
    let mut tasks = Vec::new();
    let mut macs = 0usize;
    for (seq, s) in seqs.iter().enumerate() {
        for r0 in (0..s.len).step_by(ROWS_PER_TASK) {
            let n = ROWS_PER_TASK.min(s.len - r0);
            let first_pos = s.start + r0;
            let c0 = first_visible(shape, first_pos) / CHUNK;
            let c1 = (first_pos + n).div_ceil(CHUNK);
            for kvh in 0..shape.n_kv_head {
                tasks.push(Task {
                    seq,
                    kvh,
                    r0,
                    n,
                    c0,
                    c1,
                    part: None,
                });
            }
        }
        macs += 2 * nh * hd * s.len * (s.start + s.len);
    }
    let threads = rayon::current_num_threads();
    let parallel = macs >= MIN_PAR_MACS && threads > 1;
    let group = nh / shape.n_kv_head;
    // Few tasks for the threads (a decoded token): long ones are cut into pieces of whole chunks,
    // which leave their partial results in `parts` for the merge below.
    let mut cut = Vec::new();
    let mut parts_len = 0;
    if parallel && tasks.len() < TASKS_PER_THREAD * threads {
        let want = (TASKS_PER_THREAD * threads).div_ceil(tasks.len());
        let mut pieces = Vec::new();
        for t in tasks {
            let chunks = t.c1 - t.c0;
            let n = want.min(chunks / MIN_PIECE_CHUNKS);
            if n < 2 {
                pieces.push(t);
                continue;
            }
            cut.push((t, parts_len));
            for i in 0..n {
                let (a, b) = (t.c0 + chunks * i / n, t.c0 + chunks * (i + 1) / n);
                pieces.push(Task {
                    c0: a,
                    c1: b,
                    part: Some(parts_len),
                    ..t
                });
                parts_len += (b - a) * t.slot(group, hd);
            }
        }
        tasks = pieces;
    }
    let mut parts = vec![0f32; parts_len];
    let (ptr, parts_ptr) = (OutPtr(out.as_mut_ptr()), OutPtr(parts.as_mut_ptr()));
    let run = |t: &Task| {
        SCRATCH.with(|scratch| {
            let scratch = &mut scratch.borrow_mut();
            let (s, slot) = (&seqs[t.seq], t.slot(group, hd));
            let len = (t.c1 - t.c0) * slot;
            if let Some(at) = t.part {
                // SAFETY: pieces own disjoint ranges of `parts`, which outlives this section.
                let dst = unsafe { parts_ptr.slice(at, len) };
                // SAFETY: bounds were checked above; the task writes only `dst`.
                unsafe { run_task(isa, shape, q, q_stride, s, *t, dst, scratch) };
                return;
            }
            let mut own = std::mem::take(&mut scratch.parts);
            own.resize(len, 0.0);
            // SAFETY: bounds were checked above; the task writes only `own`.
            unsafe { run_task(isa, shape, q, q_stride, s, *t, &mut own, scratch) };
            // SAFETY: the task's (row, head) cells are its own.
            unsafe { write_out(shape, s, t, &own, ptr) };
            scratch.parts = own;
        })
    };
    if parallel {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
    for (t, at) in cut {
        let len = (t.c1 - t.c0) * t.slot(group, hd);
        // SAFETY: the parallel section is over; `out` is ours again and the cells in range.
        unsafe { write_out(shape, &seqs[t.seq], &t, &parts[at..at + len], ptr) };
    }
}

/// Merges the chunks' partial results of task `t` (whole) query by query and writes its
/// outputs.
///
/// # Safety
/// `out` points at the `[rows, n_head * head_dim]` output, whose (row, head) cells of `t` no
/// other live task touches.
unsafe fn write_out(shape: &AttnShape, s: &SeqAttn<'_>, t: &Task, parts: &[f32], out: OutPtr) {
    let (nh, hd) = (shape.n_head, shape.head_dim);
    let group = nh / shape.n_kv_head;
    let (m, slot) = (t.n * group, t.slot(group, hd));
    for i in 0..t.n {
        let row = s.off + t.r0 + i;
        for g in 0..group {
            let h = t.kvh * group + g;
            // SAFETY: per the contract, this task alone writes the (row, h) cell.
            let dst = unsafe { out.slice(row * nh * hd + h * hd, hd) };
            merge_query(parts, t.c1 - t.c0, slot, m, hd, i * group + g, dst);
        }
    }
}

/// Query `r`'s output from its chunks' partial results (unnormalised outputs, maxima, sums,
/// laid out as [`Task::slot`] says), merged in chunk order: the first chunk it sees as it is,
/// each later one rescaled to the running maximum (`o = o·e^(M−M') + o_c·e^(m_c−M')`), then
/// divided by the sum. One sequence of operations whoever computed the chunks, so the same bits;
/// with one chunk, the unmerged softmax's bits.
fn merge_query(
    parts: &[f32],
    chunks: usize,
    slot: usize,
    m: usize,
    hd: usize,
    r: usize,
    dst: &mut [f32],
) {
    let (mut max, mut sum, mut started) = (f32::NEG_INFINITY, 0f32, false);
    for c in 0..chunks {
        let part = &parts[c * slot..(c + 1) * slot];
        let (o_c, m_c, s_c) = (
            &part[r * hd..(r + 1) * hd],
            part[m * hd + r],
            part[m * hd + m + r],
        );
        // A chunk the query sees nothing of has a sum of +0 (one it sees has at least e^0).
        if s_c == 0.0 {
            continue;
        }
        if !started {
            dst.copy_from_slice(o_c);
            (max, sum, started) = (m_c, s_c, true);
            continue;
        }
        let top = max.max(m_c);
        let (a, b) = (exp_one(max - top), exp_one(m_c - top));
        for (x, &y) in dst.iter_mut().zip(o_c) {
            *x = b.mul_add(y, *x * a);
        }
        sum = b.mul_add(s_c, sum * a);
        max = top;
    }
    let inv = 1.0 / sum;
    for x in dst {
        *x *= inv;
    }
}

/// The query heads sharing key/value head `t.kvh`, rows `t.r0..t.r0 + t.n` of `s`, over the
/// keys of chunks `t.c0..t.c1`: each chunk's partial result (unnormalised outputs, maxima, sums)
/// into its slot of `parts` (see [`Task::slot`]), for [`merge_query`].
///
/// # Safety
/// `q` and `s.kv` were bounds-checked by [`attend_on`]; `parts` holds `t.c1 - t.c0` slots.
#[allow(clippy::too_many_arguments)]
unsafe fn run_task(
    isa: Isa,
    shape: &AttnShape,
    q: &[f32],
    q_stride: usize,
    s: &SeqAttn<'_>,
    t: Task,
    parts: &mut [f32],
    scratch: &mut Scratch,
) {
    let (nh, hd) = (shape.n_head, shape.head_dim);
    let group = nh / shape.n_kv_head;
    // Query vector r = i * group + g: row t.r0 + i, head t.kvh * group + g.
    let m = t.n * group;
    let slot = t.slot(group, hd);
    assert!(parts.len() >= (t.c1 - t.c0) * slot);
    // Queries packed `w` to a group; the scores keep 8-lane groups (two per packed group at w = 16).
    let w = isa.lanes();
    let packed = m.div_ceil(w);
    let lane_groups = packed * (w / LANES);
    let mp = lane_groups * LANES;
    let first_pos = s.start + t.r0;
    let Scratch {
        q: qt,
        p,
        k: kbuf,
        v: vbuf,
        q8: qq,
        ..
    } = scratch;

    let q8 = matches!(s.kv.k, KvRows::Q8 { .. });
    if q8 {
        qq.reset(packed, w, hd);
    } else {
        qt.clear();
        qt.resize(packed * hd * w, 0.0);
    }
    for i in 0..t.n {
        let row = &q[(s.off + t.r0 + i) * q_stride + t.kvh * group * hd..][..group * hd];
        for (g, head) in row.chunks_exact(hd).enumerate() {
            let r = i * group + g;
            if q8 {
                qq.set(r, head, shape.scale);
                continue;
            }
            let dst = &mut qt[(r / w) * hd * w + r % w..];
            for (d, &x) in head.iter().enumerate() {
                dst[d * w] = x;
            }
        }
    }
    assert!(
        mp <= ROWS_PER_TASK * 16,
        "more query heads per key/value head than supported"
    );
    kbuf.resize(KEY_TILE * hd, 0.0);
    vbuf.resize(V_TILE * hd, 0.0);
    let head = t.kvh * s.kv.capacity * hd;
    for (c, part) in (t.c0..t.c1).zip(parts.chunks_exact_mut(slot)) {
        let lo = first_visible(shape, first_pos).max(c * CHUNK);
        let hi = (first_pos + t.n).min((c + 1) * CHUNK);
        let (o, rest) = part.split_at_mut(m * hd);
        let (maxes, sums) = rest.split_at_mut(m);
        o.fill(0.0);
        maxes.fill(f32::NEG_INFINITY);
        sums.fill(0.0);
        if lo >= hi {
            continue;
        }
        // SAFETY: forwarded; the chunk's keys lie inside the span `attend_on` checked.
        unsafe {
            chunk(
                isa,
                shape,
                s,
                Chunk {
                    m,
                    w,
                    packed,
                    first_pos,
                    n: t.n,
                    head,
                    lo,
                    hi,
                },
                (qt, qq, p, kbuf, vbuf),
                (o, maxes, sums),
            )
        };
    }
}

/// What one chunk of one task covers: `m` query vectors (`n` rows from `first_pos`, packed `w`
/// to a group in `packed` groups) over the keys at positions `lo..hi` of the head at `head`.
#[derive(Clone, Copy)]
struct Chunk {
    m: usize,
    w: usize,
    packed: usize,
    first_pos: usize,
    n: usize,
    head: usize,
    lo: usize,
    hi: usize,
}

/// A task's packed queries and working buffers: f32 queries, 8-bit queries, scores, one key
/// tile, one value tile.
type Bufs<'a> = (
    &'a [f32],
    &'a Q8Queries,
    &'a mut Vec<f32>,
    &'a mut [f32],
    &'a mut [f32],
);

/// One chunk's scores, softmax (each query's maximum and sum into `maxes`, `sums`) and
/// weighted values (into `o`, zeroed) for the packed queries.
///
/// # Safety
/// As [`run_task`]: `s.kv` holds the positions `lo..hi`.
unsafe fn chunk(
    isa: Isa,
    shape: &AttnShape,
    s: &SeqAttn<'_>,
    c: Chunk,
    (qt, qq, p, kbuf, vbuf): Bufs<'_>,
    (o, maxes, sums): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let hd = shape.head_dim;
    let group = shape.n_head / shape.n_kv_head;
    let Chunk {
        m,
        w,
        packed,
        first_pos,
        n,
        head,
        lo,
        hi,
    } = c;
    let lane_groups = packed * (w / LANES);
    let mp = lane_groups * LANES;
    let keys = hi - lo;
    // Visible keys of each query vector in this chunk, as offsets from `lo`: `first[r]..end[r]`
    // (empty where the query sees none of it). Padding lanes see nothing.
    let mut first = [0u32; ROWS_PER_TASK * 16];
    let mut end = [0u32; ROWS_PER_TASK * 16];
    for i in 0..n {
        let pos = first_pos + i;
        let a = first_visible(shape, pos).clamp(lo, hi);
        let b = (pos + 1).clamp(a, hi);
        for g in 0..group {
            first[i * group + g] = (a - lo) as u32;
            end[i * group + g] = (b - lo) as u32;
        }
    }
    let mut lane_sums = [0f32; ROWS_PER_TASK * 16];
    let mut lane_maxes = [f32::NEG_INFINITY; ROWS_PER_TASK * 16];
    let span = KeySpan {
        k: s.kv.k,
        head,
        lo,
        keys,
    };
    let probs = if m <= DECODE_QUERIES && simd() {
        // One new token (or two of a 2-head group): keys in lanes. Scores land query-major,
        // `p[r * stride + off + j]` for key `lo + j`, `off` aligning tiles to the row.
        let off = lo % KEY_TILE;
        let stride = (off + keys).next_multiple_of(KEY_TILE);
        p.clear();
        p.resize(m * stride, 0.0);
        match span.q8() {
            Some(k) => scores_q8::decode(isa == Isa::Avx512, qq, m, k, p, stride),
            None => decode_scores(isa, qt, w, hd, m, span, shape.scale, p, stride),
        }
        for r in 0..m {
            let row = &mut p[r * stride..(r + 1) * stride];
            let (a, b) = (off + first[r] as usize, off + end[r] as usize);
            lane_maxes[r] = softmax_row(isa, row, a, b);
        }
        // The same sums as the lane-wise softmax: in key order, masked keys adding +0.
        row_sums(p, m, stride, &mut lane_sums);
        Probs {
            p: &p[off..],
            per_key: 1,
            per_query: stride,
        }
    } else {
        // `scores` writes every one of these cells, so stale values need no zeroing (zeroing
        // `keys × mp` floats per task was ~3 % of a 512-token prefill).
        if p.len() < keys * mp {
            p.resize(keys * mp, 0.0);
        }
        match span.q8() {
            Some(k) => scores_q8::prefill(isa == Isa::Avx512, qq, packed, k, p),
            None => scores(isa, qt, hd, lane_groups, span, shape.scale, p, kbuf),
        }
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 {
            for c in (0..lane_groups).step_by(2) {
                let lanes = c * LANES..(c + 2) * LANES;
                assert!(keys == 0 || (keys - 1) * mp + lanes.end <= p.len());
                // SAFETY: `Isa::Avx512` only where the CPU has AVX-512 F; every row `j < keys`
                // holds these 16 lanes (checked above).
                unsafe {
                    softmax_avx512(
                        p,
                        mp,
                        c * LANES,
                        keys,
                        first[lanes.clone()].try_into().expect("16 lanes"),
                        end[lanes.clone()].try_into().expect("16 lanes"),
                        (&mut lane_sums[lanes.clone()])
                            .try_into()
                            .expect("16 lanes"),
                        (&mut lane_maxes[lanes]).try_into().expect("16 lanes"),
                    )
                };
            }
        }
        if isa != Isa::Avx512 {
            for c in 0..lane_groups {
                let lanes = c * LANES..(c + 1) * LANES;
                softmax_lanes(
                    p,
                    mp,
                    c * LANES,
                    keys,
                    first[lanes.clone()].try_into().expect("LANES"),
                    end[lanes.clone()].try_into().expect("LANES"),
                    (&mut lane_sums[lanes.clone()]).try_into().expect("LANES"),
                    (&mut lane_maxes[lanes]).try_into().expect("LANES"),
                );
            }
        }
        Probs {
            p,
            per_key: mp,
            per_query: 1,
        }
    };
    weighted_values(
        isa,
        probs,
        s.kv.v,
        head + lo * hd,
        keys,
        hd,
        m,
        &first,
        &end,
        o,
        vbuf,
    );
    maxes.copy_from_slice(&lane_maxes[..m]);
    sums.copy_from_slice(&lane_sums[..m]);
}

/// The keys one task attends: positions `lo..lo + keys` of the tiled key buffer of one head,
/// which starts at `k[head..]`.
#[derive(Clone, Copy)]
struct KeySpan<'a> {
    k: KvRows<'a>,
    head: usize,
    lo: usize,
    keys: usize,
}

impl KeySpan<'_> {
    /// The key tiles covering the span, with the part of each inside it: `(tile start position,
    /// first position, end position)`.
    fn tiles(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let (lo, hi) = (self.lo, self.lo + self.keys);
        (lo / KEY_TILE..hi.div_ceil(KEY_TILE)).map(move |t| {
            let t0 = t * KEY_TILE;
            (t0, lo.max(t0), hi.min(t0 + KEY_TILE))
        })
    }

    /// The span of an 8-bit key cache, which scores in [`scores_q8`].
    fn q8(&self) -> Option<Q8Keys<'_>> {
        match self.k {
            KvRows::Q8 { q, scale, .. } => Some(Q8Keys {
                q,
                scale,
                head: self.head,
                lo: self.lo,
                keys: self.keys,
            }),
            _ => None,
        }
    }

    /// Widens the tile starting at position `t0` into `dst` (`[hd][KEY_TILE]`).
    fn widen_tile(&self, t0: usize, hd: usize, dst: &mut [f32]) {
        self.k.widen(self.head + t0 * hd, &mut dst[..KEY_TILE * hd]);
    }
}

/// `p[j * mp + r] = scale · Σ_d q_r[d]·k_j[d]` for every key `j` (position `lo + j`) and query
/// `r`, each sum one FMA chain over `d` in order (so the same in any lane, block or path). Keys
/// (f16) are widened a tile at a time into `kbuf` (`[hd][KEY_TILE]`) or (f32) read in place; a
/// tile stays in L1 while every query passes over it.
#[allow(clippy::too_many_arguments)]
fn scores(
    isa: Isa,
    qt: &[f32],
    hd: usize,
    lane_groups: usize,
    span: KeySpan<'_>,
    scale: f32,
    p: &mut [f32],
    kbuf: &mut [f32],
) {
    assert!(qt.len() >= lane_groups * hd * LANES && kbuf.len() >= KEY_TILE * hd);
    assert!(p.len() >= span.keys * lane_groups * LANES);
    assert!(isa == Isa::Avx2 || lane_groups.is_multiple_of(2));
    let mp = lane_groups * LANES;
    for (t0, a, b) in span.tiles() {
        // f32 tiles are read in place.
        let kt: &[f32] = match span.k {
            KvRows::F32(k) => &k[span.head + t0 * hd..][..KEY_TILE * hd],
            KvRows::F16(_) => {
                span.widen_tile(t0, hd, kbuf);
                kbuf
            }
            KvRows::Q8 { .. } | KvRows::Q8Rows { .. } => {
                unreachable!("8-bit keys are scored in scores_q8")
            }
        };
        let (j0, kn, lane0) = (a - span.lo, b - a, a - t0);
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 {
            // SAFETY: `Isa::Avx512` is only chosen where the CPU has AVX-512 F; the buffer
            // sizes were checked above (`qt` packed 16 to a group), `lane0 + kn <= KEY_TILE`.
            unsafe { scores_avx512(qt, hd, lane_groups / 2, kt, lane0, j0, kn, scale, p) };
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA; the buffer sizes were checked above, and
            // `lane0 + kn <= KEY_TILE`.
            unsafe { scores_avx2(qt, hd, lane_groups, kt, lane0, j0, kn, scale, p) };
            continue;
        }
        for c in 0..lane_groups {
            let qc = &qt[c * hd * LANES..][..hd * LANES];
            for kk in 0..kn {
                let mut acc = [0f32; LANES];
                for (d, qd) in qc.chunks_exact(LANES).enumerate() {
                    let kd = kt[d * KEY_TILE + lane0 + kk];
                    for l in 0..LANES {
                        acc[l] = qd[l].mul_add(kd, acc[l]);
                    }
                }
                let dst = &mut p[(j0 + kk) * mp + c * LANES..][..LANES];
                for l in 0..LANES {
                    dst[l] = acc[l] * scale;
                }
            }
        }
    }
}

/// [`scores`] of the `kn` keys in lanes `lane0..lane0 + kn` of one widened tile `k`
/// (`[hd][KEY_TILE]`), keys `j0..j0 + kn` of the span, with 8 keys × 8 queries in registers: per
/// `d`, one load of 8 queries, 8 key broadcasts and 8 FMAs (the same fused chain per score as
/// the portable loop, so the same bits).
///
/// # Safety
/// AVX2 and FMA present; `qt`, `k`, `p` as checked by [`scores`], `1 <= kn`,
/// `lane0 + kn <= KEY_TILE`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_avx2(
    qt: &[f32],
    hd: usize,
    lane_groups: usize,
    k: &[f32],
    lane0: usize,
    j0: usize,
    kn: usize,
    scale: f32,
    p: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mp = lane_groups * LANES;
    let sc = _mm256_set1_ps(scale);
    // A partial tile repeats its last key; those scores are not stored.
    let kl: [usize; KEYS] = std::array::from_fn(|kk| lane0 + kk.min(kn - 1));
    let kb = k.as_ptr();
    // Pairs of lane groups (prefill) take 4 keys × 16 queries per step: 2 query loads and 4
    // broadcasts per 8 FMAs instead of 1 + 8.
    let mut c = 0;
    while c + 2 <= lane_groups {
        let q0 = qt[c * hd * LANES..].as_ptr();
        let q1 = qt[(c + 1) * hd * LANES..].as_ptr();
        for h in 0..KEYS / 4 {
            let mut acc = [[_mm256_setzero_ps(); 4]; 2];
            for d in 0..hd {
                // SAFETY: d < hd: within query groups c, c + 1 and within the tile.
                unsafe {
                    let a = _mm256_loadu_ps(q0.add(d * LANES));
                    let b = _mm256_loadu_ps(q1.add(d * LANES));
                    for kk in 0..4 {
                        let kd = _mm256_broadcast_ss(&*kb.add(d * KEY_TILE + kl[h * 4 + kk]));
                        acc[0][kk] = _mm256_fmadd_ps(a, kd, acc[0][kk]);
                        acc[1][kk] = _mm256_fmadd_ps(b, kd, acc[1][kk]);
                    }
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                for (kk, a) in acc.iter().enumerate() {
                    let key = h * 4 + kk;
                    if key < kn {
                        let at = (j0 + key) * mp + (c + g) * LANES;
                        let dst = p[at..][..LANES].as_mut_ptr();
                        // SAFETY: 8 floats in bounds (slice above).
                        unsafe { _mm256_storeu_ps(dst, _mm256_mul_ps(*a, sc)) };
                    }
                }
            }
        }
        c += 2;
    }
    for c in c..lane_groups {
        let qc = qt[c * hd * LANES..].as_ptr();
        let mut acc = [_mm256_setzero_ps(); KEYS];
        for d in 0..hd {
            // SAFETY: d < hd: within query group c and within the tile.
            unsafe {
                let qd = _mm256_loadu_ps(qc.add(d * LANES));
                for kk in 0..KEYS {
                    let kd = _mm256_broadcast_ss(&*kb.add(d * KEY_TILE + kl[kk]));
                    acc[kk] = _mm256_fmadd_ps(qd, kd, acc[kk]);
                }
            }
        }
        for (kk, a) in acc.iter().enumerate().take(kn) {
            let dst = p[(j0 + kk) * mp + c * LANES..][..LANES].as_mut_ptr();
            // SAFETY: 8 floats in bounds (slice above).
            unsafe { _mm256_storeu_ps(dst, _mm256_mul_ps(*a, sc)) };
        }
    }
}

/// [`scores_avx2`] with 16 queries to a register (`qt` packed `[group][hd][16]`, `groups` of
/// them): up to 3 groups × 8 keys per pass, 24 accumulators fed per `d` by 3 query loads and 8 key
/// broadcasts. Each score is the same FMA chain over `d` as the other paths, so the same bits.
///
/// # Safety
/// AVX-512 F present; `qt` holds `groups * hd * 16` values, `k` a widened tile, `p` rows of
/// `groups * 16` for keys `j0..j0 + kn`; `1 <= kn`, `lane0 + kn <= KEY_TILE`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_avx512(
    qt: &[f32],
    hd: usize,
    groups: usize,
    k: &[f32],
    lane0: usize,
    j0: usize,
    kn: usize,
    scale: f32,
    p: &mut [f32],
) {
    let mut c = 0;
    while c < groups {
        let g = (groups - c).min(3);
        let args = (qt, hd, groups, k, lane0, j0, kn, scale, &mut *p, c);
        // SAFETY: forwarded; groups c..c + g exist.
        unsafe {
            match g {
                1 => scores_avx512_pass::<1>(args),
                2 => scores_avx512_pass::<2>(args),
                _ => scores_avx512_pass::<3>(args),
            }
        }
        c += g;
    }
}

/// Arguments of [`scores_avx512_pass`]: those of [`scores_avx512`] and the first group `c`.
#[cfg(target_arch = "x86_64")]
type Scores512Args<'a> = (
    &'a [f32],
    usize,
    usize,
    &'a [f32],
    usize,
    usize,
    usize,
    f32,
    &'a mut [f32],
    usize,
);

/// Groups `c..c + G` of [`scores_avx512`] against the tile's keys.
///
/// # Safety
/// As [`scores_avx512`], and `c + G <= groups`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512_pass<const G: usize>(a: Scores512Args<'_>) {
    use std::arch::x86_64::*;
    let (qt, hd, groups, k, lane0, j0, kn, scale, p, c) = a;
    const W: usize = 2 * LANES;
    assert!(c + G <= groups && qt.len() >= groups * hd * W && k.len() >= hd * KEY_TILE);
    assert!(kn >= 1 && lane0 + kn <= KEY_TILE && p.len() >= (j0 + kn) * groups * W);
    let mp = groups * W;
    let sc = _mm512_set1_ps(scale);
    // A partial tile repeats its last key; those scores are not stored.
    let kl: [usize; KEYS] = std::array::from_fn(|kk| lane0 + kk.min(kn - 1));
    let kb = k.as_ptr();
    let qs: [*const f32; G] = std::array::from_fn(|g| qt[(c + g) * hd * W..].as_ptr());
    let mut acc = [[_mm512_setzero_ps(); KEYS]; G];
    for d in 0..hd {
        // SAFETY: d < hd: within the query groups and within the tile (checked above).
        unsafe {
            let qd: [__m512; G] = std::array::from_fn(|g| _mm512_loadu_ps(qs[g].add(d * W)));
            for kk in 0..KEYS {
                let kd = _mm512_set1_ps(*kb.add(d * KEY_TILE + kl[kk]));
                for g in 0..G {
                    acc[g][kk] = _mm512_fmadd_ps(qd[g], kd, acc[g][kk]);
                }
            }
        }
    }
    for (g, acc) in acc.iter().enumerate() {
        for (kk, a) in acc.iter().enumerate().take(kn) {
            let dst = p[(j0 + kk) * mp + (c + g) * W..][..W].as_mut_ptr();
            // SAFETY: 16 floats in bounds (slice above).
            unsafe { _mm512_storeu_ps(dst, _mm512_mul_ps(*a, sc)) };
        }
    }
}

/// Whether the keys-in-lanes kernels may run: AVX2, FMA and F16C (they read half-precision keys
/// and values straight from the cache).
fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx2_fma() && std::arch::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Calls `$f::<M, HALF>(args...)` with `M` the query count `$m` (1 to [`DECODE_QUERIES`]) and
/// `HALF` whether the cache holds f16: the accumulators of a fixed query count stay in
/// registers (a run-time count kept them in memory, and every FMA waited on a store).
#[cfg(target_arch = "x86_64")]
macro_rules! by_queries {
    ($f:ident, $m:expr, $half:expr, $args:expr) => {{
        let a = $args;
        match ($m, $half) {
            (1, true) => $f::<1, true>(a),
            (2, true) => $f::<2, true>(a),
            (3, true) => $f::<3, true>(a),
            (4, true) => $f::<4, true>(a),
            (1, false) => $f::<1, false>(a),
            (2, false) => $f::<2, false>(a),
            (3, false) => $f::<3, false>(a),
            (4, false) => $f::<4, false>(a),
            (m, _) => unreachable!("{m} queries on the keys-in-lanes path"),
        }
    }};
}

/// Scores of `m <= DECODE_QUERIES` queries (lane group 0 of `qt`) with keys in lanes:
/// `p[r * stride + pos - lo / KEY_TILE * KEY_TILE]` for every position of every tile covering the
/// span (positions outside it get junk the softmax masks). Each score is the same FMA chain over
/// `d` as in [`scores`] (`q·k + acc` either way), so the same bits. Keys are read straight from
/// the cache's tiles (widened on load for f16): with at most 4 queries per key, copying a tile
/// out first cost more than the full lanes saved.
#[allow(clippy::too_many_arguments)]
fn decode_scores(
    isa: Isa,
    qt: &[f32],
    w: usize,
    hd: usize,
    m: usize,
    span: KeySpan<'_>,
    scale: f32,
    p: &mut [f32],
    stride: usize,
) {
    let base = span.lo / KEY_TILE * KEY_TILE;
    let end = span.lo + span.keys;
    assert!((1..=DECODE_QUERIES).contains(&m) && m <= w && qt.len() >= hd * w);
    assert!(p.len() >= m * stride && base + stride >= end);
    assert!(span.k.len() >= span.head + end.next_multiple_of(KEY_TILE) * hd);
    #[cfg(target_arch = "x86_64")]
    {
        assert!(simd(), "keys in lanes needs AVX2, FMA and F16C");
        let (k, elem) = raw(span.k);
        let half = matches!(elem, Elem::F16);
        let args = (
            qt.as_ptr(),
            w,
            hd,
            k,
            span.head,
            base,
            end,
            scale,
            p.as_mut_ptr(),
            stride,
        );
        // SAFETY: the CPU has AVX2, FMA and F16C; `qt` holds lane group 0, every tile covering
        // `base..end` lies in the key buffer and every row `r < m` of `p` holds its `stride >=
        // end - base` columns (all checked above).
        // `Isa::Avx512` only where the CPU has AVX-512 F.
        unsafe {
            if isa == Isa::Avx512 {
                by_queries!(decode_scores_avx512, m, half, args)
            } else {
                by_queries!(decode_scores_avx2, m, half, args)
            }
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, qt, w, hd, m, span, scale, p, stride);
        unreachable!("keys in lanes runs only where simd() holds");
    }
}

/// A key or value buffer as raw bytes, and how its elements read.
#[cfg(target_arch = "x86_64")]
fn raw(x: KvRows<'_>) -> (*const u8, Elem) {
    match x {
        KvRows::F16(x) => (x.as_ptr().cast(), Elem::F16),
        KvRows::F32(x) => (x.as_ptr().cast(), Elem::F32),
        KvRows::Q8Rows { q, scale } => (q.as_ptr(), Elem::Q8(scale.as_ptr())),
        KvRows::Q8 { .. } => unreachable!("8-bit keys are scored in scores_q8"),
    }
}

/// How many values ahead the value pass prefetches an f16 cache it reads in place.
const PREFETCH_VALUES: usize = 16;

/// Most query vectors per task that take the keys-in-lanes path.
const DECODE_QUERIES: usize = 4;

/// Eight values from element `i` of a cache buffer, widened if `HALF`.
///
/// # Safety
/// F16C (for `HALF`) and AVX present; elements `i..i + 8` lie in the buffer at `base`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<const HALF: bool>(base: *const u8, i: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: per the contract.
    unsafe {
        if HALF {
            _mm256_cvtph_ps(_mm_loadu_si128(base.cast::<u16>().add(i).cast()))
        } else {
            _mm256_loadu_ps(base.cast::<f32>().add(i))
        }
    }
}

/// Arguments of [`decode_scores_avx2`]: queries (lane group 0), queries per group, `hd`, key
/// buffer, offset of the head in it, first tile's position, end of the span, scale, scores, row
/// stride.
#[cfg(target_arch = "x86_64")]
type DecodeArgs = (
    *const f32,
    usize,
    usize,
    *const u8,
    usize,
    usize,
    usize,
    f32,
    *mut f32,
    usize,
);

/// [`decode_scores`] for `M` queries, `8 / M` tiles (2 to 8) per step so that at least 6 FMA
/// chains run side by side; a step past the span's end rescores its first tile and does not
/// store it.
///
/// # Safety
/// As in [`decode_scores`]: AVX2, FMA, F16C; every pointer covers what it is read or written at.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_scores_avx2<const M: usize, const HALF: bool>(a: DecodeArgs) {
    use std::arch::x86_64::*;
    let (qt, w, hd, k, head, base, end, scale, p, stride) = a;
    const MAX_TILES: usize = 8;
    let tiles = (MAX_TILES / M).clamp(2, MAX_TILES);
    let sc = _mm256_set1_ps(scale);
    // SAFETY: per the contract; d < hd keeps every load inside its tile and the query group.
    unsafe {
        for t0 in (base..end).step_by(tiles * KEY_TILE) {
            let at: [usize; MAX_TILES] = std::array::from_fn(|i| {
                let t = t0 + i * KEY_TILE;
                head + if t < end { t } else { t0 } * hd
            });
            let mut acc = [[_mm256_setzero_ps(); MAX_TILES]; M];
            for d in 0..hd {
                let kd: [__m256; MAX_TILES] = std::array::from_fn(|i| {
                    if i < tiles {
                        load8::<HALF>(k, at[i] + d * KEY_TILE)
                    } else {
                        _mm256_setzero_ps()
                    }
                });
                for (r, acc) in acc.iter_mut().enumerate() {
                    let qd = _mm256_broadcast_ss(&*qt.add(d * w + r));
                    for i in 0..tiles {
                        acc[i] = _mm256_fmadd_ps(qd, kd[i], acc[i]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (i, a) in acc.iter().enumerate().take(tiles) {
                    let t = t0 + i * KEY_TILE;
                    if t < end {
                        _mm256_storeu_ps(p.add(r * stride + t - base), _mm256_mul_ps(*a, sc));
                    }
                }
            }
        }
    }
}

/// [`decode_scores_avx2`] with two tiles (16 keys) per 512-bit register, `2 × clamp(8 / M, 2,
/// 8)` tiles per step (fewer for a span shorter than that: a short context would rescore
/// padding); the same FMA chain per score, so the same bits.
///
/// # Safety
/// As [`decode_scores_avx2`], with AVX-512 F present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn decode_scores_avx512<const M: usize, const HALF: bool>(a: DecodeArgs) {
    // SAFETY: forwarded.
    unsafe {
        match scores_q8::decode_pairs(M, a.5, a.6) {
            8.. => decode_scores_avx512_pairs::<M, HALF, 8>(a),
            4..8 => decode_scores_avx512_pairs::<M, HALF, 4>(a),
            2..4 => decode_scores_avx512_pairs::<M, HALF, 2>(a),
            _ => decode_scores_avx512_pairs::<M, HALF, 1>(a),
        }
    }
}

/// [`decode_scores_avx512`] with `PAIRS` pairs of tiles per step.
///
/// # Safety
/// As [`decode_scores_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn decode_scores_avx512_pairs<const M: usize, const HALF: bool, const PAIRS: usize>(
    a: DecodeArgs,
) {
    use std::arch::x86_64::*;
    let (qt, w, hd, k, head, base, end, scale, p, stride) = a;
    let sc = _mm512_set1_ps(scale);
    // SAFETY: per the contract; d < hd keeps every load inside its tile and the query group; a
    // tile past the span's end is read at the step's first tile and not stored.
    unsafe {
        let load16 = |x: usize, y: usize| -> __m512 {
            if HALF {
                let lo = _mm_loadu_si128(k.cast::<u16>().add(x).cast());
                let hi = _mm_loadu_si128(k.cast::<u16>().add(y).cast());
                _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi))
            } else {
                let lo = _mm256_loadu_ps(k.cast::<f32>().add(x));
                let hi = _mm256_loadu_ps(k.cast::<f32>().add(y));
                // (`insertf64x4` is AVX-512 F; the f32x8 insert would need DQ.)
                _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                    _mm512_castps_pd(_mm512_castps256_ps512(lo)),
                    _mm256_castps_pd(hi),
                ))
            }
        };
        let step_keys = 2 * PAIRS * KEY_TILE;
        let esize = if HALF { 2 } else { 4 };
        let lines_per_d = (step_keys * esize).div_ceil(64);
        for t0 in (base..end).step_by(step_keys) {
            let at: [[usize; 2]; PAIRS] = std::array::from_fn(|i| {
                std::array::from_fn(|h| {
                    let t = t0 + (2 * i + h) * KEY_TILE;
                    head + if t < end { t } else { t0 } * hd
                })
            });
            let mut acc = [[_mm512_setzero_ps(); PAIRS]; M];
            // A step's tiles are one contiguous run of `step_bytes`; fetch the run
            // `PREFETCH_STEPS` ahead a few lines per `d` (a decoded token streams its whole
            // cache from memory, and the loads alone kept too few lines in flight).
            let ahead = k.wrapping_add((head + (t0 + PREFETCH_STEPS * step_keys) * hd) * esize);
            for d in 0..hd {
                for l in 0..lines_per_d {
                    _mm_prefetch::<_MM_HINT_T0>(
                        ahead.wrapping_add((d * lines_per_d + l) * 64).cast(),
                    );
                }
                let kd: [__m512; PAIRS] = std::array::from_fn(|i| {
                    load16(at[i][0] + d * KEY_TILE, at[i][1] + d * KEY_TILE)
                });
                for (r, acc) in acc.iter_mut().enumerate() {
                    let qd = _mm512_set1_ps(*qt.add(d * w + r));
                    for (a, kd) in acc.iter_mut().zip(&kd) {
                        *a = _mm512_fmadd_ps(qd, *kd, *a);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (i, a) in acc.iter().enumerate() {
                    let t = t0 + 2 * i * KEY_TILE;
                    let dst = p.add(r * stride + t - base);
                    let x = _mm512_mul_ps(*a, sc);
                    if t + KEY_TILE < end {
                        _mm512_storeu_ps(dst, x);
                    } else if t < end {
                        _mm256_storeu_ps(dst, _mm512_castps512_ps256(x));
                    }
                }
            }
        }
    }
}

/// Each of the `m` rows' sum over its `stride` columns, in column order (the order of the
/// lane-wise softmax's sums, so the same bits), into `sums[..m]`.
fn row_sums(p: &[f32], m: usize, stride: usize, sums: &mut [f32]) {
    fn sum<const M: usize>(p: &[f32], stride: usize, sums: &mut [f32]) {
        let rows: [&[f32]; M] = std::array::from_fn(|r| &p[r * stride..][..stride]);
        let mut s = [0f32; M];
        // Column by column across the rows (that order is the point: the same bits as the
        // lane-wise sums), so an index loop, not an iterator over one row.
        #[allow(clippy::needless_range_loop)]
        for j in 0..stride {
            for r in 0..M {
                s[r] += rows[r][j];
            }
        }
        sums[..M].copy_from_slice(&s);
    }
    match m {
        1 => sum::<1>(p, stride, sums),
        2 => sum::<2>(p, stride, sums),
        3 => sum::<3>(p, stride, sums),
        4 => sum::<4>(p, stride, sums),
        _ => unreachable!("{m} queries on the keys-in-lanes path"),
    }
}

/// One query's softmax numerators in place over its row of scores: columns `a..b` become
/// `exp(score − max)` (the same `exp` as the lane-wise softmax, so the same bits), the others 0.
/// Returns the max (−∞ for an empty `a..b`, whose row becomes all 0).
fn softmax_row(isa: Isa, row: &mut [f32], a: usize, b: usize) -> f32 {
    assert!(row.len().is_multiple_of(LANES) && b <= row.len());
    if a >= b {
        row.fill(0.0);
        return f32::NEG_INFINITY;
    }
    #[cfg(target_arch = "x86_64")]
    {
        assert!(avx2_fma(), "keys in lanes needs AVX2 and FMA");
        if isa == Isa::Avx512 {
            // SAFETY: `Isa::Avx512` only where the CPU has AVX-512 F; a < b <= row.len().
            return unsafe { softmax_row_avx512(row, a, b) };
        }
        // SAFETY: AVX2 and FMA present; the row is whole vectors (checked above).
        unsafe { softmax_row_avx2(row, a, b) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        unreachable!("keys in lanes runs only where simd() holds");
    }
}

/// [`softmax_row`] 16 columns at a time (a decoded token's long rows spent most of their
/// softmax in the 8-lane `exp`); masked loads and stores cover a row of 8 · odd columns. The
/// same `exp` on 16 lanes gives the 8-lane bits, and the max is exact in any order.
///
/// # Safety
/// AVX-512 F present; `a < b <= row.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_avx512(row: &mut [f32], a: usize, b: usize) -> f32 {
    use std::arch::x86_64::*;
    let n = row.len();
    // SAFETY: every load and store is masked to columns < n.
    unsafe {
        let idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let (lo, hi, len) = (
            _mm512_set1_epi32(a as i32),
            _mm512_set1_epi32(b as i32),
            _mm512_set1_epi32(n as i32),
        );
        let cols = |c: usize| _mm512_add_epi32(idx, _mm512_set1_epi32(c as i32));
        let inside = |c: usize| _mm512_cmplt_epi32_mask(cols(c), len);
        let valid = |c: usize| {
            let j = cols(c);
            _mm512_cmpge_epi32_mask(j, lo) & _mm512_cmplt_epi32_mask(j, hi)
        };
        let base = row.as_mut_ptr();
        let (c0, c1) = (a / 16 * 16, b.div_ceil(16) * 16);
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in (c0..c1).step_by(16) {
            let m = valid(c);
            let x = _mm512_maskz_loadu_ps(m, base.add(c));
            max = _mm512_mask_max_ps(max, m, max, x);
        }
        let top = _mm512_reduce_max_ps(max);
        let max = _mm512_set1_ps(top);
        for c in (0..n).step_by(16) {
            let (m, keep) = (valid(c), inside(c));
            let y = if c + 16 <= c0 || c >= c1 {
                _mm512_setzero_ps()
            } else {
                let x = _mm512_maskz_loadu_ps(m, base.add(c));
                _mm512_maskz_mov_ps(m, exp_avx512(_mm512_sub_ps(x, max)))
            };
            _mm512_mask_storeu_ps(base.add(c), keep, y);
        }
        top
    }
}

/// [`softmax_row`] on AVX2.
///
/// # Safety
/// AVX2 and FMA present; `row.len()` a multiple of 8; `a < b <= row.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32], a: usize, b: usize) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: per the contract, every load and store below is in bounds.
    unsafe {
        let (lo, hi) = (_mm256_set1_epi32(a as i32), _mm256_set1_epi32(b as i32));
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let valid = |c: usize| in_range(lo, hi, _mm256_add_epi32(idx, _mm256_set1_epi32(c as i32)));
        let base = row.as_mut_ptr();
        let (c0, c1) = (a / LANES * LANES, b.div_ceil(LANES) * LANES);
        let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in (c0..c1).step_by(LANES) {
            let x = _mm256_loadu_ps(base.add(c));
            max = _mm256_blendv_ps(max, _mm256_max_ps(max, x), valid(c));
        }
        let mut lanes = [0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), max);
        let top = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let max = _mm256_set1_ps(top);
        for c in (0..row.len()).step_by(LANES) {
            let x = base.add(c);
            if c + LANES <= c0 || c >= c1 {
                _mm256_storeu_ps(x, _mm256_setzero_ps());
                continue;
            }
            let y = _mm256_and_ps(exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x), max)), valid(c));
            _mm256_storeu_ps(x, y);
        }
        top
    }
}

/// Lane-wise softmax numerators over the keys for the 8 queries at `p[.. + at..at + LANES]`:
/// keys outside a lane's `first..end` become 0, the others `exp(score − max)`; returns each
/// lane's sum (over keys in order) in `sums` and its max (−∞ where it sees no key) in `maxes`.
#[allow(clippy::too_many_arguments)]
fn softmax_lanes(
    p: &mut [f32],
    mp: usize,
    at: usize,
    keys: usize,
    first: [u32; LANES],
    end: [u32; LANES],
    sums: &mut [f32; LANES],
    maxes: &mut [f32; LANES],
) {
    assert!(keys == 0 || (keys - 1) * mp + at + LANES <= p.len());
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: AVX2 and FMA present; every row `j < keys` holds 8 floats from `at` (checked
        // above).
        unsafe { softmax_avx2(p, mp, at, keys, first, end, sums, maxes) };
        return;
    }
    let mut max = [f32::NEG_INFINITY; LANES];
    for j in 0..keys {
        let x = &p[j * mp + at..][..LANES];
        let j = j as u32;
        for l in 0..LANES {
            if j >= first[l] && j < end[l] {
                max[l] = max[l].max(x[l]);
            }
        }
    }
    let mut sum = [0f32; LANES];
    for j in 0..keys {
        let x: &mut [f32; LANES] = (&mut p[j * mp + at..][..LANES]).try_into().expect("LANES");
        let j = j as u32;
        for l in 0..LANES {
            x[l] = if j >= first[l] && j < end[l] {
                exp_one(x[l] - max[l])
            } else {
                0.0
            };
            sum[l] += x[l];
        }
    }
    *sums = sum;
    *maxes = max;
}

/// [`softmax_lanes`] on AVX2: masks from integer compares, [`exp_one`](super::vmath::exp_one)'s arithmetic lane-wise.
///
/// # Safety
/// AVX2 and FMA present; `(keys - 1) * mp + at + 8 <= p.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn softmax_avx2(
    p: &mut [f32],
    mp: usize,
    at: usize,
    keys: usize,
    first: [u32; LANES],
    end: [u32; LANES],
    sums: &mut [f32; LANES],
    maxes: &mut [f32; LANES],
) {
    use std::arch::x86_64::*;
    // SAFETY: per the contract, every load and store below is in bounds.
    unsafe {
        let f = _mm256_loadu_si256(first.as_ptr().cast());
        let e = _mm256_loadu_si256(end.as_ptr().cast());
        let valid = |j: usize| in_range(f, e, _mm256_set1_epi32(j as i32));
        let base = p.as_mut_ptr().add(at);
        let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
        for j in 0..keys {
            let x = _mm256_loadu_ps(base.add(j * mp));
            max = _mm256_blendv_ps(max, _mm256_max_ps(max, x), valid(j));
        }
        let mut sum = _mm256_setzero_ps();
        for j in 0..keys {
            let x = base.add(j * mp);
            let y = _mm256_and_ps(exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x), max)), valid(j));
            _mm256_storeu_ps(x, y);
            sum = _mm256_add_ps(sum, y);
        }
        _mm256_storeu_ps(sums.as_mut_ptr(), sum);
        _mm256_storeu_ps(maxes.as_mut_ptr(), max);
    }
}

/// [`softmax_avx2`] on 16 lanes: the same operations lane by lane (so the same bits), masks
/// in mask registers.
///
/// # Safety
/// AVX-512 F present; `(keys - 1) * mp + at + 16 <= p.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn softmax_avx512(
    p: &mut [f32],
    mp: usize,
    at: usize,
    keys: usize,
    first: [u32; 2 * LANES],
    end: [u32; 2 * LANES],
    sums: &mut [f32; 2 * LANES],
    maxes: &mut [f32; 2 * LANES],
) {
    use std::arch::x86_64::*;
    // SAFETY: per the contract, every load and store below is in bounds.
    unsafe {
        let f = _mm512_loadu_si512(first.as_ptr().cast());
        let e = _mm512_loadu_si512(end.as_ptr().cast());
        let valid = |j: usize| {
            let j = _mm512_set1_epi32(j as i32);
            _mm512_cmple_epi32_mask(f, j) & _mm512_cmpgt_epi32_mask(e, j)
        };
        let base = p.as_mut_ptr().add(at);
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for j in 0..keys {
            let x = _mm512_loadu_ps(base.add(j * mp));
            max = _mm512_mask_max_ps(max, valid(j), max, x);
        }
        let mut sum = _mm512_setzero_ps();
        for j in 0..keys {
            let x = base.add(j * mp);
            let y =
                _mm512_maskz_mov_ps(valid(j), exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(x), max)));
            _mm512_storeu_ps(x, y);
            sum = _mm512_add_ps(sum, y);
        }
        _mm512_storeu_ps(sums.as_mut_ptr(), sum);
        _mm512_storeu_ps(maxes.as_mut_ptr(), max);
    }
}

/// All-ones lanes where `first <= j < end` (both softmaxes' key masks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn in_range(
    first: std::arch::x86_64::__m256i,
    end: std::arch::x86_64::__m256i,
    j: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_castsi256_ps(_mm256_andnot_si256(
        _mm256_cmpgt_epi32(first, j),
        _mm256_cmpgt_epi32(end, j),
    ))
}

/// Probabilities of the keys for each query: key `j`, query `r` at `p[j * per_key + r *
/// per_query]` (key-major from the lane-wise softmax, query-major from the keys-in-lanes one).
#[derive(Clone, Copy)]
struct Probs<'a> {
    p: &'a [f32],
    per_key: usize,
    per_query: usize,
}

impl Probs<'_> {
    #[inline(always)]
    fn at(&self, j: usize, r: usize) -> usize {
        j * self.per_key + r * self.per_query
    }
}

/// `o_r = Σ_j p[j][r] · v_j` for the `m` queries, each a chain over `j` in order, over tiles of
/// `V_TILE` keys that stay in L1 while every query passes over them. Value `j` is
/// `v[base + j * hd..]`. Where the SIMD kernels run, f32 values are read in place, and f16 ones
/// are widened on load when at most [`DECODE_QUERIES`] queries read each (decode); with more, a
/// tile is widened once into `vbuf` (`[V_TILE][hd]`) and read from there.
#[allow(clippy::too_many_arguments)]
fn weighted_values(
    isa: Isa,
    p: Probs<'_>,
    v: KvRows<'_>,
    base: usize,
    keys: usize,
    hd: usize,
    m: usize,
    first: &[u32],
    end: &[u32],
    o: &mut [f32],
    vbuf: &mut [f32],
) {
    assert!(v.len() >= base + keys * hd);
    assert!(o.len() >= m * hd && first.len() >= m && end.len() >= m);
    assert!(keys == 0 || m == 0 || p.p.len() > p.at(keys - 1, m - 1));
    assert!(vbuf.len() >= V_TILE * hd);
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(64) && simd() {
        // 8-bit values are read in place by the 512-bit decode kernel only, widened elsewhere:
        // each value is its byte times its block's scale, the same f32 product either way.
        let in_place = match v {
            KvRows::F32(_) => true,
            KvRows::F16(_) => m <= DECODE_QUERIES,
            KvRows::Q8Rows { .. } => m <= DECODE_QUERIES && isa == Isa::Avx512,
            KvRows::Q8 { .. } => false,
        };
        for t0 in (0..keys).step_by(V_TILE) {
            let t1 = (t0 + V_TILE).min(keys);
            // The tile as (buffer, element type, element of key t0's value).
            let (src, elem, at) = if in_place {
                let (src, elem) = raw(v);
                (src, elem, base + t0 * hd)
            } else {
                v.widen(base + t0 * hd, &mut vbuf[..(t1 - t0) * hd]);
                (vbuf.as_ptr().cast(), Elem::F32, 0)
            };
            let half = matches!(elem, Elem::F16);
            let span = |r: usize| ((first[r] as usize).max(t0), (end[r] as usize).min(t1));
            if isa == Isa::Avx512 {
                // Up to 4 queries at once over the keys all of them see (16 independent FMA
                // chains); the keys only some see before and after, one query at a time, so each
                // output's chain still runs over its keys in order.
                let one = |o: &mut [f32], r: usize, a: usize, b: usize| {
                    if a < b {
                        let args = (p, r, src, at, t0, hd, a, b, &mut o[r * hd..(r + 1) * hd]);
                        // SAFETY: AVX-512 F present (`Isa::Avx512`); t0 <= a < b <= t1 <= keys
                        // and r < m keep every access in bounds (checked above: values `at..at +
                        // (t1 - t0) * hd` lie in `v`, or in `vbuf` when widened); hd % 64 == 0.
                        unsafe { values_avx512_dispatch::<1>(elem, args) }
                    }
                };
                let mut r = 0;
                while r < m {
                    let q = (m - r).min(4);
                    let a = (r..r + q).map(|r| span(r).0).max().unwrap_or(t1);
                    let b = (r..r + q).map(|r| span(r).1).min().unwrap_or(t0);
                    if q == 1 || a >= b {
                        (r..r + q).for_each(|r| one(o, r, span(r).0, span(r).1));
                        r += q;
                        continue;
                    }
                    (r..r + q).for_each(|r| one(o, r, span(r).0, a));
                    let args = (p, r, src, at, t0, hd, a, b, &mut o[r * hd..(r + q) * hd]);
                    // SAFETY: as in `one`, for queries r..r + q < m whose outputs `o` covers.
                    unsafe {
                        match q {
                            2 => values_avx512_dispatch::<2>(elem, args),
                            3 => values_avx512_dispatch::<3>(elem, args),
                            _ => values_avx512_dispatch::<4>(elem, args),
                        }
                    }
                    (r..r + q).for_each(|r| one(o, r, b, span(r).1));
                    r += q;
                }
                continue;
            }
            for r in 0..m {
                let (a, b) = span(r);
                if a >= b {
                    continue;
                }
                let o_r = &mut o[r * hd..(r + 1) * hd];
                let args = (p, r, src, at, t0, hd, a, b, o_r);
                // SAFETY: AVX2, FMA and F16C present; t0 <= a < b <= t1 <= keys and r < m keep
                // every access in bounds (checked above: values `at..at + (t1 - t0) * hd` lie
                // in `v`, or in `vbuf` when widened), hd is a multiple of 64.
                unsafe {
                    if half {
                        values_avx2::<true>(args)
                    } else {
                        values_avx2::<false>(args)
                    }
                };
            }
        }
        return;
    }
    for t0 in (0..keys).step_by(V_TILE) {
        let t1 = (t0 + V_TILE).min(keys);
        let tile = &mut vbuf[..(t1 - t0) * hd];
        v.widen(base + t0 * hd, tile);
        let tile = &*tile;
        for r in 0..m {
            let (a, b) = ((first[r] as usize).max(t0), (end[r] as usize).min(t1));
            for j in a..b {
                let w = p.p[p.at(j, r)];
                let o_r = &mut o[r * hd..(r + 1) * hd];
                for (o, &x) in o_r.iter_mut().zip(&tile[(j - t0) * hd..][..hd]) {
                    *o = w.mul_add(x, *o);
                }
            }
        }
    }
}

/// Arguments of [`values_avx2`]: probabilities, query, value buffer (f16 if `HALF`, else f32),
/// element of key `t0`'s value in it, `t0`, `hd`, keys `a..b`, the query's output.
#[cfg(target_arch = "x86_64")]
type ValuesArgs<'a, 'o> = (
    Probs<'a>,
    usize,
    *const u8,
    usize,
    usize,
    usize,
    usize,
    usize,
    &'o mut [f32],
);

/// One query's `o_r += Σ_{j in a..b} p[j][r] · v_j`, 64 outputs at a time in 8 registers (the
/// same fused chain over `j` per output as the portable loop); key `j`'s value starts at element
/// `at + (j - t0) * hd` of the buffer.
///
/// # Safety
/// AVX2, FMA and F16C present; `hd % 64 == 0`; `t0 <= a`; the buffer holds elements
/// `at..at + (b - t0) * hd`; `p.at(b - 1, r) < p.p.len()`; `o_r.len() == hd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn values_avx2<const HALF: bool>(args: ValuesArgs<'_, '_>) {
    use std::arch::x86_64::*;
    let (p, r, v, at, t0, hd, a, b, o_r) = args;
    for d0 in (0..hd).step_by(64) {
        // SAFETY: per the contract, every offset below is in bounds.
        unsafe {
            let op = o_r.as_mut_ptr().add(d0);
            let mut acc: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(op.add(8 * i)));
            for j in a..b {
                let w = _mm256_broadcast_ss(&*p.p.as_ptr().add(p.at(j, r)));
                let vj = at + (j - t0) * hd + d0;
                for (i, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(w, load8::<HALF>(v, vj + 8 * i), *acc);
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(op.add(8 * i), *acc);
            }
        }
    }
}

/// How the value pass reads a value buffer.
#[derive(Clone, Copy)]
enum Elem {
    F32,
    F16,
    /// 8-bit values (+128), with the buffer's scales (one per 32 values).
    Q8(*const f32),
}

/// [`Elem`] as a const parameter of [`values_avx512`].
const E_F32: u8 = 0;
const E_F16: u8 = 1;
const E_Q8: u8 = 2;

/// [`values_avx512`] for the element type `elem`.
///
/// # Safety
/// As [`values_avx512`]; for [`Elem::Q8`], the scales cover the values read.
#[cfg(target_arch = "x86_64")]
unsafe fn values_avx512_dispatch<const Q: usize>(elem: Elem, args: ValuesArgs<'_, '_>) {
    // SAFETY: forwarded.
    unsafe {
        match elem {
            Elem::F32 => values_avx512::<Q, E_F32>(args, std::ptr::null()),
            Elem::F16 => values_avx512::<Q, E_F16>(args, std::ptr::null()),
            Elem::Q8(scale) => values_avx512::<Q, E_Q8>(args, scale),
        }
    }
}

/// [`values_avx2`] in 512-bit registers for `Q` queries `r..r + Q` at once, whose outputs lie
/// one after another in `o` (`Q * hd` values): per key, 64 values loaded once into 4 registers
/// feed `Q` × 4 independent FMA chains (one query's 4 chains alone wait on the FMA latency).
/// Each output is the same fused chain over `j` as on the other paths, so the same bits.
///
/// # Safety
/// As [`values_avx2`] for each of the `Q` queries, with AVX-512 F present and
/// `o.len() == Q * hd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn values_avx512<const Q: usize, const E: u8>(args: ValuesArgs<'_, '_>, scale: *const f32) {
    use std::arch::x86_64::*;
    let (p, r, v, at, t0, hd, a, b, o) = args;
    assert!(o.len() == Q * hd);
    for d0 in (0..hd).step_by(64) {
        // SAFETY: per the contract, every offset below is in bounds.
        unsafe {
            let op: [*mut f32; Q] = std::array::from_fn(|q| o.as_mut_ptr().add(q * hd + d0));
            let mut acc: [[__m512; 4]; Q] = std::array::from_fn(|q| {
                std::array::from_fn(|i| _mm512_loadu_ps(op[q].add(16 * i)))
            });
            for j in a..b {
                let w: [__m512; Q] =
                    std::array::from_fn(|q| _mm512_set1_ps(*p.p.as_ptr().add(p.at(j, r + q))));
                let vj = at + (j - t0) * hd + d0;
                if E == E_F16 {
                    // Values read in place (decode) stream from memory: fetch ahead.
                    let ahead = v.wrapping_add(2 * (vj + PREFETCH_VALUES * hd));
                    _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64).cast());
                }
                if E == E_Q8 {
                    let ahead = vj + PREFETCH_VALUES * hd;
                    _mm_prefetch::<_MM_HINT_T0>(v.wrapping_add(ahead).cast());
                    _mm_prefetch::<_MM_HINT_T0>(scale.wrapping_add(ahead / Q8_0_BLOCK).cast());
                }
                // One load per `i` feeds every query's chain `i`: an index loop over both.
                #[allow(clippy::needless_range_loop)]
                for i in 0..4 {
                    let x = match E {
                        E_F16 => _mm512_cvtph_ps(_mm256_loadu_si256(
                            v.cast::<u16>().add(vj + 16 * i).cast(),
                        )),
                        E_Q8 => {
                            // Bytes +128 → i8 → f32, times the block's scale: `KvRows::get`'s
                            // product.
                            let b = _mm_xor_si128(
                                _mm_loadu_si128(v.add(vj + 16 * i).cast()),
                                _mm_set1_epi8(-128),
                            );
                            let s = _mm512_set1_ps(*scale.add((vj + 16 * i) / Q8_0_BLOCK));
                            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), s)
                        }
                        _ => _mm512_loadu_ps(v.cast::<f32>().add(vj + 16 * i)),
                    };
                    for q in 0..Q {
                        acc[q][i] = _mm512_fmadd_ps(w[q], x, acc[q][i]);
                    }
                }
            }
            for q in 0..Q {
                for (i, acc) in acc[q].iter().enumerate() {
                    _mm512_storeu_ps(op[q].add(16 * i), *acc);
                }
            }
        }
    }
}

/// Whether the AVX2 + FMA kernels may run (every `*_avx2` function here enables both).
#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The first position a query at `pos` sees (its sliding window's start, else 0).
fn first_visible(shape: &AttnShape, pos: usize) -> usize {
    match shape.window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv_cache::{key_elem, key_index, q8_blocks, quantize_q8_row};
    use candle_core::{Device, Tensor};
    use half::f16;
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

    /// Row-major keys `[nkv][cap][hd]` in the cache's tiled layout.
    fn tiled(rows: &[f16], nkv: usize, cap: usize, hd: usize) -> Vec<f16> {
        let mut out = vec![f16::ZERO; rows.len()];
        for h in 0..nkv {
            for pos in 0..cap {
                for d in 0..hd {
                    out[key_index(cap, hd, h, pos, d)] = rows[(h * cap + pos) * hd + d];
                }
            }
        }
        out
    }

    fn widened(x: &[f16]) -> Vec<f32> {
        x.iter().map(|x| x.to_f32()).collect()
    }

    fn bits_equal(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// A ragged batch `(start, len)` per sequence against the reference, sequence by sequence,
    /// on f16 caches and on f32 caches holding the same values (which must give the same bits).
    fn check(shape: AttnShape, batch: &[(usize, usize)], seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (nh, nkv, hd) = (shape.n_head, shape.n_kv_head, shape.head_dim);
        let width = nh * hd;
        // Queries in a wider row, as in the fused QKV buffer.
        let q_stride = width + 2 * nkv * hd;
        let rows: usize = batch.iter().map(|b| b.1).sum();
        let q: Vec<f32> = (0..rows * q_stride)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        // Caches with spare capacity, filled with junk past the last position; keys row-major
        // for the reference and tiled for the kernel.
        let caps: Vec<usize> = batch
            .iter()
            .map(|&(s, l)| (s + l + 5).next_multiple_of(KEY_TILE))
            .collect();
        let kvs: Vec<(Vec<f16>, Vec<f16>, Vec<f16>)> = caps
            .iter()
            .map(|&c| {
                let mut g = || -> Vec<f16> {
                    (0..nkv * c * hd)
                        .map(|_| f16::from_f32(rng.random_range(-2.0..2.0)))
                        .collect()
                };
                let (k, v) = (g(), g());
                (tiled(&k, nkv, c, hd), k, v)
            })
            .collect();
        let mut off = 0;
        let seqs: Vec<SeqAttn> = batch
            .iter()
            .zip(&kvs)
            .zip(&caps)
            .map(|((&(start, len), (k, _, v)), &capacity)| {
                let s = SeqAttn {
                    off,
                    len,
                    start,
                    kv: HostLayerView {
                        k: KvRows::F16(k),
                        v: KvRows::F16(v),
                        capacity,
                    },
                };
                off += len;
                s
            })
            .collect();
        let mut out = vec![f32::NAN; rows * width];
        attend(&shape, &q, q_stride, &seqs, &mut out);
        // The same values in f32 caches (read in place rather than widened) give the same bits.
        let wide: Vec<(Vec<f32>, Vec<f32>)> = kvs
            .iter()
            .map(|(k, _, v)| (widened(k), widened(v)))
            .collect();
        let seqs32: Vec<SeqAttn> = seqs
            .iter()
            .zip(&wide)
            .map(|(s, (k, v))| SeqAttn {
                kv: HostLayerView {
                    k: KvRows::F32(k),
                    v: KvRows::F32(v),
                    capacity: s.kv.capacity,
                },
                ..*s
            })
            .collect();
        let mut out32 = vec![f32::NAN; rows * width];
        attend(&shape, &q, q_stride, &seqs32, &mut out32);
        assert!(
            bits_equal(&out, &out32),
            "f32 caches changed bits ({batch:?})"
        );
        for ((s, &cap), (_, k_rows, _)) in seqs.iter().zip(&caps).zip(&kvs) {
            let total = s.start + s.len;
            let qs: Vec<f32> = (0..s.len)
                .flat_map(|i| q[(s.off + i) * q_stride..][..width].to_vec())
                .collect();
            let cut = |buf: KvRows<'_>| -> Vec<f32> {
                let mut out = vec![0f32; nkv * total * hd];
                for h in 0..nkv {
                    buf.widen(h * cap * hd, &mut out[h * total * hd..][..total * hd]);
                }
                out
            };
            let want = reference(
                &shape,
                &qs,
                s.len,
                s.start,
                &cut(KvRows::F16(k_rows)),
                &cut(s.kv.v),
            );
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
    fn long_context_blocks_match() {
        // A chat turn: 40 new rows after 700 cached positions, SmolLM2's shape, and Gemma's
        // window across the block boundary.
        check(shape(9, 3, 64, None), &[(700, 40), (900, 1)], 6);
        check(shape(4, 1, 256, Some(512)), &[(600, 33)], 7);
    }

    /// One sequence of `total` positions attended in the chunks `cuts` (lengths), each chunk a
    /// separate call, optionally next to an unrelated sequence: the outputs, row by row.
    fn chunked(
        shape: AttnShape,
        total: usize,
        cuts: &[usize],
        with_other: bool,
        cache: Cache,
    ) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (nh, nkv, hd) = (shape.n_head, shape.n_kv_head, shape.head_dim);
        let width = nh * hd;
        let mut g =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
        let q = g(total * width);
        let half = |x: Vec<f32>| -> Vec<f16> { x.into_iter().map(f16::from_f32).collect() };
        let cap = total.next_multiple_of(KEY_TILE);
        let (k, v) = (half(g(nkv * cap * hd)), half(g(nkv * cap * hd)));
        let k = tiled(&k, nkv, cap, hd);
        let (ok, ov) = (half(g(nkv * 304 * hd)), half(g(nkv * 304 * hd)));
        let ok = tiled(&ok, nkv, 304, hd);
        let oq = g(20 * width);
        let (k32, v32, ok32, ov32) = (widened(&k), widened(&v), widened(&ok), widened(&ov));
        let (k8, ok8) = (q8_keys(&k32, nkv, cap, hd), q8_keys(&ok32, nkv, 304, hd));
        let (v8, ov8) = (q8_values(&v32, hd), q8_values(&ov32, hd));
        fn pick<'a>(
            cache: Cache,
            h: &'a [f16],
            w: &'a [f32],
            k8: Option<&'a (Vec<u8>, Vec<f32>)>,
            v8: Option<&'a (Vec<u8>, Vec<f32>)>,
            hd: usize,
        ) -> KvRows<'a> {
            match (cache, k8, v8) {
                (Cache::F32, _, _) => KvRows::F32(w),
                (Cache::Q8 | Cache::Q8Kv, Some((q, scale)), _) => KvRows::Q8 { q, scale, hd },
                (Cache::Q8Kv, _, Some((q, scale))) => KvRows::Q8Rows { q, scale },
                _ => KvRows::F16(h),
            }
        }
        let (kr, vr) = (
            pick(cache, &k, &k32, Some(&k8), None, hd),
            pick(cache, &v, &v32, None, Some(&v8), hd),
        );
        let (okr, ovr) = (
            pick(cache, &ok, &ok32, Some(&ok8), None, hd),
            pick(cache, &ov, &ov32, None, Some(&ov8), hd),
        );
        let mut out = vec![f32::NAN; total * width];
        let mut start = 0;
        for &len in cuts {
            let mut rows = q[start * width..(start + len) * width].to_vec();
            let mut seqs = vec![SeqAttn {
                off: 0,
                len,
                start,
                kv: HostLayerView {
                    k: kr,
                    v: vr,
                    capacity: cap,
                },
            }];
            if with_other {
                rows.extend_from_slice(&oq);
                seqs.push(SeqAttn {
                    off: len,
                    len: 20,
                    start: 250,
                    kv: HostLayerView {
                        k: okr,
                        v: ovr,
                        capacity: 304,
                    },
                });
            }
            let mut o = vec![0f32; rows.len()];
            attend(&shape, &rows, width, &seqs, &mut o);
            out[start * width..(start + len) * width].copy_from_slice(&o[..len * width]);
            start += len;
        }
        assert_eq!(start, total);
        out
    }

    /// The key cache a test attends over.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Cache {
        F16,
        F32,
        /// 8-bit keys, f16 values.
        Q8,
        /// 8-bit keys and values.
        Q8Kv,
    }

    /// 8-bit keys or values and their scales.
    type Q8Buf = (Vec<u8>, Vec<f32>);

    /// Row-major values in the 8-bit layout (blocks of 32 per row), with scales.
    fn q8_values(v: &[f32], hd: usize) -> Q8Buf {
        let (mut q, mut scale) = (vec![0u8; v.len()], vec![0f32; v.len() / Q8_0_BLOCK]);
        for ((x, q), s) in v
            .chunks(hd)
            .zip(q.chunks_mut(hd))
            .zip(scale.chunks_mut(hd / Q8_0_BLOCK))
        {
            quantize_q8_row(x, q, s);
        }
        (q, scale)
    }

    /// Tiled keys (`[nkv][cap / KEY_TILE][hd][KEY_TILE]`, f32) in the 8-bit layout, with scales.
    fn q8_keys(k: &[f32], nkv: usize, cap: usize, hd: usize) -> (Vec<u8>, Vec<f32>) {
        let nb = q8_blocks(hd);
        let (mut q, mut scale) = (vec![0x80u8; nkv * cap * hd], vec![0f32; nkv * cap * nb]);
        let mut row = vec![0u8; hd];
        for h in 0..nkv {
            for pos in 0..cap {
                let x: Vec<f32> = (0..hd).map(|d| k[key_index(cap, hd, h, pos, d)]).collect();
                let at = (h * cap + pos) * nb;
                quantize_q8_row(&x, &mut row, &mut scale[at..at + nb]);
                for (d, &b) in row.iter().enumerate() {
                    q[h * cap * hd + key_elem(true, hd, pos, d)] = b;
                }
            }
        }
        (q, scale)
    }

    #[test]
    fn outputs_are_bit_identical_however_the_sequence_is_cut() {
        // What the prefix store's exactness rests on: a position's output does not depend on
        // the chunk, block, lane or batch it was computed in.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            // Group sizes 3, 4, 2 and 1: one decoded row takes each keys-in-lanes kernel.
            for shape in [
                shape(9, 3, 64, None),
                shape(4, 1, 32, Some(24)),
                shape(4, 2, 64, Some(40)),
                shape(2, 2, 64, None),
            ] {
                let whole = chunked(shape, 90, &[90], false, Cache::F16);
                let whole8 = chunked(shape, 90, &[90], false, Cache::Q8);
                let whole8kv = chunked(shape, 90, &[90], false, Cache::Q8Kv);
                for (cuts, other, cache) in [
                    (&[37, 1, 1, 16, 35][..], false, Cache::F16),
                    (&[5, 80, 1, 1, 1, 1, 1][..], true, Cache::F16),
                    (&[1; 90][..], true, Cache::F16),
                    (&[90][..], false, Cache::F32),
                    (&[1; 90][..], true, Cache::F32),
                    (&[37, 1, 1, 16, 35][..], false, Cache::Q8),
                    (&[5, 80, 1, 1, 1, 1, 1][..], true, Cache::Q8),
                    (&[1; 90][..], true, Cache::Q8),
                    (&[37, 1, 1, 16, 35][..], false, Cache::Q8Kv),
                    (&[1; 90][..], true, Cache::Q8Kv),
                ] {
                    let got = chunked(shape, 90, cuts, other, cache);
                    let want = match cache {
                        Cache::Q8 => &whole8,
                        Cache::Q8Kv => &whole8kv,
                        _ => &whole,
                    };
                    assert!(
                        bits_equal(want, &got),
                        "cuts {cuts:?} (with another sequence: {other}, {cache:?} cache) \
                         changed bits"
                    );
                }
                // 8-bit keys stay close to f16 ones (here, scores of ±2-valued vectors: the
                // worst output moves by a few hundredths).
                let worst = whole
                    .iter()
                    .zip(&whole8)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                eprintln!("{shape:?}: worst |q8 - f16| = {worst}");
                assert!(
                    worst > 0.0 && worst < 0.05,
                    "{shape:?}: 8-bit keys off by {worst}"
                );
                // 8-bit values add about half a step of ±2-valued values (2 / 127 / 2), plus the
                // f16 rounding of the block scale (up to 127 · 2^-11 of a step at the block's
                // largest value).
                let worst_kv = whole8
                    .iter()
                    .zip(&whole8kv)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                eprintln!("{shape:?}: worst |q8kv - q8| = {worst_kv}");
                assert!(
                    worst_kv > 0.0 && worst_kv <= 1.2 / 127.0,
                    "{shape:?}: 8-bit values off by {worst_kv}"
                );
            }
        });
    }

    /// Past one chunk of keys ([`CHUNK`]), the chunks' merge gives the same bits whether a
    /// query's chunks ran in one task (one thread, or a prefill) or in pieces on several threads
    /// (a decoded row is cut when the call has few tasks), on every key cache type; and the
    /// merged softmax stays within the reference's tolerance (`long_context_blocks_match`).
    #[test]
    fn chunks_merge_to_the_same_bits_however_the_work_is_split() {
        let pools: Vec<rayon::ThreadPool> = [1, 2, 3]
            .iter()
            .map(|&n| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .unwrap()
            })
            .collect();
        let total = 4 * CHUNK + 77;
        for shape in [shape(9, 3, 64, None), shape(4, 1, 256, Some(2 * CHUNK + 5))] {
            for cache in [Cache::F16, Cache::F32, Cache::Q8, Cache::Q8Kv] {
                let whole = pools[0].install(|| chunked(shape, total, &[total], false, cache));
                let decoded = |pool: &rayon::ThreadPool, other: bool| {
                    let mut cuts = vec![3 * CHUNK + 1, 1, 1, CHUNK - 30, 1];
                    cuts.push(total - cuts.iter().sum::<usize>());
                    pool.install(|| chunked(shape, total, &cuts, other, cache))
                };
                for (n, other) in [(0, false), (1, false), (2, true)] {
                    assert!(
                        bits_equal(&whole, &decoded(&pools[n], other)),
                        "{shape:?} {cache:?}: {} threads (with another sequence: {other}) \
                         changed bits",
                        n + 1
                    );
                }
            }
        }
    }

    /// The 512-bit kernels give the AVX2 kernels' bits (a machine's choice must not change an
    /// output): ragged batches of prefill chunks and decode rows (1 to 4 query vectors: the
    /// keys-in-lanes kernels), f16 and f32 caches, group sizes 3, 4 and 1, a sliding window, head
    /// widths 64 and 256.
    #[test]
    fn avx512_kernels_give_the_avx2_bits() {
        if Isa::detect() != Isa::Avx512 {
            eprintln!("skipped: this CPU has no AVX-512 F");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let cases = [
            (
                shape(9, 3, 64, None),
                vec![(700, 40), (900, 1), (0, 17), (31, 3)],
            ),
            (shape(4, 1, 256, Some(512)), vec![(600, 33), (5, 1), (0, 9)]),
            (shape(8, 8, 64, None), vec![(100, 21), (7, 2), (300, 1)]),
        ];
        for (shape, batch) in cases {
            let (nh, nkv, hd) = (shape.n_head, shape.n_kv_head, shape.head_dim);
            let width = nh * hd;
            let rows: usize = batch.iter().map(|b| b.1).sum();
            let q: Vec<f32> = (0..rows * width)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let caches: Vec<(usize, Vec<f16>, Vec<f16>)> = batch
                .iter()
                .map(|&(st, l)| {
                    let cap = (st + l).next_multiple_of(KEY_TILE);
                    let mut g = || -> Vec<f16> {
                        (0..nkv * cap * hd)
                            .map(|_| f16::from_f32(rng.random_range(-2.0..2.0)))
                            .collect()
                    };
                    (cap, g(), g())
                })
                .collect();
            let wide: Vec<(Vec<f32>, Vec<f32>)> = caches
                .iter()
                .map(|(_, k, v)| (widened(k), widened(v)))
                .collect();
            let q8: Vec<(Q8Buf, Q8Buf)> = caches
                .iter()
                .zip(&wide)
                .map(|((cap, _, _), (k32, v32))| (q8_keys(k32, nkv, *cap, hd), q8_values(v32, hd)))
                .collect();
            for cache in [Cache::F16, Cache::F32, Cache::Q8, Cache::Q8Kv] {
                let mut off = 0;
                let seqs: Vec<SeqAttn> = batch
                    .iter()
                    .zip(caches.iter().zip(wide.iter().zip(&q8)))
                    .map(
                        |(
                            &(start, len),
                            ((capacity, k, v), ((k32, v32), ((q, scale), (qv, sv)))),
                        )| {
                            let kv = match cache {
                                Cache::F32 => (KvRows::F32(k32), KvRows::F32(v32)),
                                Cache::F16 => (KvRows::F16(k), KvRows::F16(v)),
                                Cache::Q8 => (KvRows::Q8 { q, scale, hd }, KvRows::F16(v)),
                                Cache::Q8Kv => (
                                    KvRows::Q8 { q, scale, hd },
                                    KvRows::Q8Rows { q: qv, scale: sv },
                                ),
                            };
                            let s = SeqAttn {
                                off,
                                len,
                                start,
                                kv: HostLayerView {
                                    k: kv.0,
                                    v: kv.1,
                                    capacity: *capacity,
                                },
                            };
                            off += len;
                            s
                        },
                    )
                    .collect();
                let run = |isa| {
                    let mut out = vec![f32::NAN; rows * width];
                    attend_on(isa, &shape, &q, width, &seqs, &mut out);
                    out
                };
                assert!(
                    bits_equal(&run(Isa::Avx2), &run(Isa::Avx512)),
                    "{shape:?} {batch:?} ({cache:?} caches)"
                );
            }
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
