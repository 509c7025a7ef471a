//! Attention scores on 8-bit keys: one exact integer dot product per (query, key), then the same
//! two float products in every path.
//!
//! A cache of [`KvDtype::Q8Keys`](super::kv_cache::KvDtype) (or `Q8`) holds each head's key as 8-bit
//! values (offset by +128) with a scale per 32 (llama.cpp's `-ctk q8_0` blocks); queries are
//! quantized by the same quantizer (the matmuls' activation one), per query vector, when a task
//! packs them. A score is, block by block in order, `score = (Σ q·k) as f32 × (q_scale ×
//! k_scale) + score`, one fused multiply-add, where the sum is an exact `i32` however it is
//! computed (`vpdpbusd` on 16 queries in lanes, 16 keys in lanes, or a plain loop), so it has the
//! same bits whichever block, lane, batch or path a query lands in — what the prefix store's
//! exactness rests on, as for f16 keys. At head_dim 64 one `vpdpbusd` does the work of four f32
//! FMAs.

use super::kernels::{quantize_row, Path, Q8_0_BLOCK};
use super::kv_cache::{q8_blocks, KEY_TILE, Q8_GROUP};

/// How many steps ahead the keys-in-lanes kernels (these and the f16 ones in `attention`)
/// prefetch the key tiles: a decoded token streams its whole cache from memory, and the loads
/// alone kept too few lines in flight.
pub(crate) const PREFETCH_STEPS: usize = 2;

/// Pairs of key tiles per step of a keys-in-lanes decode kernel (these and the f16 ones in
/// `attention`) for `m` queries over the tiles from `base` to `end`: `clamp(8 / m, 2, 8)` (enough
/// independent chains to hide the FMA latency), no more than the span holds (a short context
/// would rescore padding). Each kernel takes it as a constant (1, 2, 4 or 8, rounded down): a
/// run-time count left the accumulators in memory, and one codegen change made a kernel 2×
/// slower.
pub(super) fn decode_pairs(m: usize, base: usize, end: usize) -> usize {
    (8 / m)
        .clamp(2, 8)
        .min((end - base).div_ceil(2 * KEY_TILE).max(1))
}

/// A task's queries in 8 bits, packed `w` to a group as `[group][hd / 4][w][4]` (four values of
/// one query per 32-bit lane), with each query vector's per-block scales (times the attention
/// scale) and `−128 × Σ q` per block (removes what the +128 offset of the keys adds to a
/// `vpdpbusd` sum), both `[group][block][w]`.
#[derive(Default)]
pub(super) struct Q8Queries {
    q: Vec<i8>,
    scale: Vec<f32>,
    corr: Vec<i32>,
    /// One query vector's quantizer output: values, block scales, block corrections.
    row: (Vec<i8>, Vec<f32>, Vec<i32>),
    w: usize,
    hd: usize,
    nb: usize,
}

impl Q8Queries {
    /// Empties the buffers for `packed` groups of `w` query vectors of `hd` values (padding
    /// vectors stay zero, scale 0).
    pub(super) fn reset(&mut self, packed: usize, w: usize, hd: usize) {
        assert!(
            hd.is_multiple_of(Q8_0_BLOCK),
            "8-bit keys need head_dim a multiple of 32"
        );
        (self.w, self.hd, self.nb) = (w, hd, q8_blocks(hd));
        self.q.clear();
        self.q.resize(packed * w * hd, 0);
        self.scale.clear();
        self.scale.resize(packed * w * self.nb, 0.0);
        self.corr.clear();
        self.corr.resize(packed * w * self.nb, 0);
        self.row.0.resize(hd, 0);
        self.row.1.resize(self.nb, 0.0);
        self.row.2.resize(self.nb, 0);
    }

    /// Quantizes query vector `r` (`x`, already position-encoded) with the attention scale.
    pub(super) fn set(&mut self, r: usize, x: &[f32], attn_scale: f32) {
        let (w, hd) = (self.w, self.hd);
        let (mut q, mut d, mut corr) = std::mem::take(&mut self.row);
        quantize_row(x, &mut q, &mut d, &mut corr);
        for (b, (&d, &c)) in d.iter().zip(&corr).enumerate() {
            let at = self.sb(r, b);
            self.scale[at] = d * attn_scale;
            self.corr[at] = c;
        }
        let group = (r / w) * hd * w + (r % w) * Q8_GROUP;
        for (g, v) in q.chunks_exact(Q8_GROUP).enumerate() {
            let at = group + g * w * Q8_GROUP;
            self.q[at..at + Q8_GROUP].copy_from_slice(v);
        }
        self.row = (q, d, corr);
    }

    /// Where block `b` of query vector `r` has its scale and sum.
    fn sb(&self, r: usize, b: usize) -> usize {
        ((r / self.w) * self.nb + b) * self.w + r % self.w
    }

    /// Value `d` of query vector `r`.
    fn at(&self, r: usize, d: usize) -> i32 {
        let (w, hd) = (self.w, self.hd);
        i32::from(self.q[(r / w) * hd * w + (d / Q8_GROUP * w + r % w) * Q8_GROUP + d % Q8_GROUP])
    }
}

/// The keys one task scores: positions `lo..lo + keys` of one head, whose tiles start at byte
/// `head` of `q` and whose scales at `scale[head / hd * blocks..]`.
#[derive(Clone, Copy)]
pub(super) struct Q8Keys<'a> {
    pub q: &'a [u8],
    pub scale: &'a [f32],
    pub head: usize,
    pub lo: usize,
    pub keys: usize,
}

impl Q8Keys<'_> {
    /// The exact `Σ q·k` over block `b` of query `r` and the key at `pos`.
    fn dot(&self, qq: &Q8Queries, r: usize, pos: usize, b: usize) -> i32 {
        let hd = qq.hd;
        let tile = self.head + pos / KEY_TILE * KEY_TILE * hd;
        (b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK)
            .map(|d| {
                let at = tile + (d / Q8_GROUP * KEY_TILE + pos % KEY_TILE) * Q8_GROUP;
                qq.at(r, d) * i32::from((self.q[at + d % Q8_GROUP] ^ 0x80) as i8)
            })
            .sum()
    }

    /// Index of the scale of block `b` of the key at `pos`.
    fn scale_at(&self, qq: &Q8Queries, pos: usize, b: usize) -> usize {
        (self.head / qq.hd + pos) * qq.nb + b
    }

    /// The score of query `r` and the key at `pos`: per block in order, one fused multiply-add
    /// of the exact dot product by the two scales' product — the float sequence every path runs.
    fn score(&self, qq: &Q8Queries, r: usize, pos: usize) -> f32 {
        (0..qq.nb).fold(0f32, |s, b| {
            let scales = qq.scale[qq.sb(r, b)] * self.scale[self.scale_at(qq, pos, b)];
            (self.dot(qq, r, pos, b) as f32).mul_add(scales, s)
        })
    }

    /// Checks that the tiles and scales covering the span lie in the buffers.
    fn check(&self, qq: &Q8Queries) {
        let end = (self.lo + self.keys).next_multiple_of(KEY_TILE);
        assert!(self.q.len() >= self.head + end * qq.hd);
        assert!(self.scale.len() >= (self.head / qq.hd + end) * qq.nb);
    }
}

/// Whether the 512-bit integer kernels may run: the CPU runs the matmuls' AVX-512 VNNI path (and
/// the AVX2 + FMA one, which the decode kernel's 256-bit steps use).
fn vnni512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| Path::Avx512Vnni.available() && Path::Avx2.available())
}

/// Key-major scores, `p[j * mp + r]` for key `lo + j` and query `r < mp` (the layout of the
/// lane-wise softmax), `mp = groups × w`. `wide` asks for the 512-bit kernel (queries packed 16
/// to a group); it runs where the CPU has AVX-512 VNNI, the portable loop elsewhere.
pub(super) fn prefill(wide: bool, qq: &Q8Queries, groups: usize, k: Q8Keys<'_>, p: &mut [f32]) {
    let w = qq.w;
    let mp = groups * w;
    assert!(qq.q.len() >= mp * qq.hd && qq.scale.len() >= mp * qq.nb);
    assert!(p.len() >= k.keys * mp);
    k.check(qq);
    #[cfg(target_arch = "x86_64")]
    if wide && w == 16 && vnni512() {
        // SAFETY: AVX-512 F and VNNI present; every query group, key tile, scale and score row
        // read or written lies in the buffers (checked above).
        unsafe { prefill_avx512(qq, groups, k, p) };
        return;
    }
    let _ = wide;
    for j in 0..k.keys {
        for r in 0..mp {
            p[j * mp + r] = k.score(qq, r, k.lo + j);
        }
    }
}

/// Query-major scores of the first `m` query vectors, `p[r * stride + pos - base]` for every
/// position `pos` of the span, `base` its first tile's position (the layout of the
/// keys-in-lanes softmax).
pub(super) fn decode(
    wide: bool,
    qq: &Q8Queries,
    m: usize,
    k: Q8Keys<'_>,
    p: &mut [f32],
    stride: usize,
) {
    let base = k.lo / KEY_TILE * KEY_TILE;
    let end = k.lo + k.keys;
    assert!(m <= qq.w && m <= 4 && p.len() >= m * stride && base + stride >= end);
    k.check(qq);
    #[cfg(target_arch = "x86_64")]
    if wide && vnni512() {
        // SAFETY: AVX-512 F and VNNI present; every tile covering `base..end`, its scales and
        // every row `r < m` of `p` lie in the buffers (checked above).
        unsafe {
            match m {
                1 => decode_avx512::<1>(qq, k, p, stride),
                2 => decode_avx512::<2>(qq, k, p, stride),
                3 => decode_avx512::<3>(qq, k, p, stride),
                _ => decode_avx512::<4>(qq, k, p, stride),
            }
        }
        return;
    }
    let _ = wide;
    for r in 0..m {
        for pos in k.lo..end {
            p[r * stride + pos - base] = k.score(qq, r, pos);
        }
    }
}

/// Keys scored side by side per query group in [`prefill_avx512`].
#[cfg(target_arch = "x86_64")]
const KEYS: usize = 8;

/// [`prefill`] with 16 queries in lanes: per 4 values, one load per query group and one 4-byte
/// key broadcast per key feed `vpdpbusd`; 3 groups × 8 keys = 24 accumulators. After each block
/// the scores in `p` take its fused multiply-add.
///
/// # Safety
/// AVX-512 F and VNNI present; buffers as [`prefill`] checks them, `qq.w == 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn prefill_avx512(qq: &Q8Queries, groups: usize, k: Q8Keys<'_>, p: &mut [f32]) {
    let mut c = 0;
    while c < groups {
        let g = (groups - c).min(3);
        // SAFETY: forwarded; groups c..c + g exist.
        unsafe {
            match g {
                1 => prefill_pass::<1>(qq, groups, k, p, c),
                2 => prefill_pass::<2>(qq, groups, k, p, c),
                _ => prefill_pass::<3>(qq, groups, k, p, c),
            }
        }
        c += g;
    }
}

/// Query groups `c..c + G` of [`prefill_avx512`] against every tile of the span.
///
/// # Safety
/// As [`prefill_avx512`], and `c + G <= groups`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn prefill_pass<const G: usize>(
    qq: &Q8Queries,
    groups: usize,
    k: Q8Keys<'_>,
    p: &mut [f32],
    c: usize,
) {
    use std::arch::x86_64::*;
    const W: usize = 16;
    let (hd, nb) = (qq.hd, qq.nb);
    let per_block = Q8_0_BLOCK / Q8_GROUP;
    let mp = groups * W;
    let (lo, hi) = (k.lo, k.lo + k.keys);
    // SAFETY: per the contract, every offset below lies in its buffer: query groups c..c + G,
    // tiles covering lo..hi, scales of those tiles, score rows j < keys.
    unsafe {
        let qb = qq.q.as_ptr();
        let scales = k.scale.as_ptr().add(k.scale_at(qq, 0, 0));
        for t in lo / KEY_TILE..hi.div_ceil(KEY_TILE) {
            let t0 = t * KEY_TILE;
            let (a, b) = (lo.max(t0), hi.min(t0 + KEY_TILE));
            let (lane0, kn) = (a - t0, b - a);
            // A partial tile repeats its last key; those scores are not stored.
            let kl: [usize; KEYS] = std::array::from_fn(|kk| (lane0 + kk.min(kn - 1)) * Q8_GROUP);
            let tile = k.q.as_ptr().add(k.head + t0 * hd);
            for blk in 0..nb {
                let mut acc = [[_mm512_setzero_si512(); KEYS]; G];
                for d4 in blk * per_block..(blk + 1) * per_block {
                    let qd: [__m512i; G] = std::array::from_fn(|g| {
                        _mm512_loadu_si512(qb.add((c + g) * hd * W + d4 * W * Q8_GROUP).cast())
                    });
                    let kt = tile.add(d4 * KEY_TILE * Q8_GROUP);
                    for kk in 0..KEYS {
                        let kb = _mm512_set1_epi32(kt.add(kl[kk]).cast::<i32>().read_unaligned());
                        for g in 0..G {
                            acc[g][kk] = _mm512_dpbusd_epi32(acc[g][kk], kb, qd[g]);
                        }
                    }
                }
                // This block's scale of each key of the tile.
                let ks: [f32; KEYS] =
                    std::array::from_fn(|kk| *scales.add((t0 + lane0 + kk.min(kn - 1)) * nb + blk));
                for (g, acc) in acc.iter().enumerate() {
                    let sb = ((c + g) * nb + blk) * W;
                    let qs = _mm512_loadu_ps(qq.scale.as_ptr().add(sb));
                    let corr = _mm512_loadu_si512(qq.corr.as_ptr().add(sb).cast());
                    for (kk, a) in acc.iter().enumerate().take(kn) {
                        let pos = t0 + lane0 + kk;
                        let ks = _mm512_set1_ps(ks[kk]);
                        let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(*a, corr));
                        let dst = p[(pos - lo) * mp + (c + g) * W..][..W].as_mut_ptr();
                        let prev = if blk == 0 {
                            _mm512_setzero_ps()
                        } else {
                            _mm512_loadu_ps(dst)
                        };
                        _mm512_storeu_ps(dst, _mm512_fmadd_ps(dot, _mm512_mul_ps(qs, ks), prev));
                    }
                }
            }
        }
    }
}

/// [`decode`] for `M` query vectors with 16 keys in lanes (two tiles, 4 values per lane): per 4
/// values, one 32-byte load from each tile, one query broadcast per query, `M` × pairs
/// `vpdpbusd`; after each block its fused multiply-add goes into the scores. `clamp(8 / M, 2, 8)`
/// pairs of tiles per step at most (no more than the span holds).
///
/// # Safety
/// AVX-512 F, VNNI, AVX2 and FMA present; buffers as [`decode`] checks them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni,avx2,fma")]
unsafe fn decode_avx512<const M: usize>(
    qq: &Q8Queries,
    k: Q8Keys<'_>,
    p: &mut [f32],
    stride: usize,
) {
    let base = k.lo / KEY_TILE * KEY_TILE;
    // SAFETY: forwarded.
    unsafe {
        match decode_pairs(M, base, k.lo + k.keys) {
            8.. => decode_avx512_pairs::<M, 8>(qq, k, p, stride),
            4..8 => decode_avx512_pairs::<M, 4>(qq, k, p, stride),
            2..4 => decode_avx512_pairs::<M, 2>(qq, k, p, stride),
            _ => decode_avx512_pairs::<M, 1>(qq, k, p, stride),
        }
    }
}

/// [`decode_avx512`] with `PAIRS` pairs of tiles per step.
///
/// # Safety
/// As [`decode_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni,avx2,fma")]
unsafe fn decode_avx512_pairs<const M: usize, const PAIRS: usize>(
    qq: &Q8Queries,
    k: Q8Keys<'_>,
    p: &mut [f32],
    stride: usize,
) {
    use std::arch::x86_64::*;
    let (hd, w, nb) = (qq.hd, qq.w, qq.nb);
    let base = k.lo / KEY_TILE * KEY_TILE;
    let end = k.lo + k.keys;
    let groups = Q8_0_BLOCK / Q8_GROUP;
    let step_keys = 2 * PAIRS * KEY_TILE;
    // A step's tiles are one contiguous run of `step_keys × hd` bytes; the run
    // `PREFETCH_STEPS` ahead is fetched `lines` lines per 4 values (a decoded token streams its
    // whole cache from memory).
    let lines = (step_keys * Q8_GROUP).div_ceil(64);
    // SAFETY: per the contract; a tile past the span's end is read at the step's first tile
    // and not stored; every load stays inside its tile, scales and the query group.
    unsafe {
        let qb = qq.q.as_ptr();
        let scales = k.scale.as_ptr().add(k.scale_at(qq, 0, 0));
        // Scales of one block for the 8 keys of a tile: `nb` apart.
        let lanes = _mm256_mullo_epi32(
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            _mm256_set1_epi32(nb as i32),
        );
        for t0 in (base..end).step_by(step_keys) {
            let at: [[usize; 2]; PAIRS] = std::array::from_fn(|i| {
                std::array::from_fn(|h| {
                    let t = t0 + (2 * i + h) * KEY_TILE;
                    if t < end {
                        t
                    } else {
                        t0
                    }
                })
            });
            let ahead =
                k.q.as_ptr()
                    .wrapping_add(k.head + (t0 + PREFETCH_STEPS * step_keys) * hd);
            let mut s = [[_mm512_setzero_ps(); PAIRS]; M];
            for blk in 0..nb {
                let mut acc = [[_mm512_setzero_si512(); PAIRS]; M];
                for d4 in blk * groups..(blk + 1) * groups {
                    for l in 0..lines {
                        _mm_prefetch::<_MM_HINT_T0>(
                            ahead.wrapping_add((d4 * lines + l) * 64).cast(),
                        );
                    }
                    let kd: [__m512i; PAIRS] = std::array::from_fn(|i| {
                        let off = |t: usize| k.head + t * hd + d4 * KEY_TILE * Q8_GROUP;
                        let lo = _mm256_loadu_si256(k.q.as_ptr().add(off(at[i][0])).cast());
                        let hi = _mm256_loadu_si256(k.q.as_ptr().add(off(at[i][1])).cast());
                        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
                    });
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let q4 = qb
                            .add((d4 * w + r) * Q8_GROUP)
                            .cast::<i32>()
                            .read_unaligned();
                        let qd = _mm512_set1_epi32(q4);
                        for (a, kd) in acc.iter_mut().zip(&kd) {
                            *a = _mm512_dpbusd_epi32(*a, *kd, qd);
                        }
                    }
                }
                // A tile past the span's end gathers the step's first tile's scales (not stored).
                let ks: [__m512; PAIRS] = std::array::from_fn(|i| {
                    let lo = _mm256_i32gather_ps::<4>(scales.add(at[i][0] * nb + blk), lanes);
                    let hi = _mm256_i32gather_ps::<4>(scales.add(at[i][1] * nb + blk), lanes);
                    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                        _mm512_castps_pd(_mm512_castps256_ps512(lo)),
                        _mm256_castps_pd(hi),
                    ))
                });
                for (r, (acc, s)) in acc.iter().zip(s.iter_mut()).enumerate() {
                    let at = qq.sb(r, blk);
                    let qs = _mm512_set1_ps(qq.scale[at]);
                    let corr = _mm512_set1_epi32(qq.corr[at]);
                    for ((s, acc), ks) in s.iter_mut().zip(acc).zip(&ks) {
                        let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(*acc, corr));
                        *s = _mm512_fmadd_ps(dot, _mm512_mul_ps(qs, *ks), *s);
                    }
                }
            }
            for (r, s) in s.iter().enumerate() {
                for (i, s) in s.iter().enumerate() {
                    let t = t0 + 2 * i * KEY_TILE;
                    let dst = p.as_mut_ptr().add(r * stride + t - base);
                    if t + KEY_TILE < end {
                        _mm512_storeu_ps(dst, *s);
                    } else if t < end {
                        _mm256_storeu_ps(dst, _mm512_castps512_ps256(*s));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv_cache::{key_elem, quantize_q8_row};
    use rand::{Rng, SeedableRng};

    /// A head of `n` random keys in the cache's 8-bit layout, with scales.
    fn keys(n: usize, hd: usize, rng: &mut rand::rngs::StdRng) -> (Vec<u8>, Vec<f32>) {
        let cap = n.next_multiple_of(KEY_TILE);
        let nb = q8_blocks(hd);
        let (mut q, mut scale) = (vec![0x80u8; cap * hd], vec![0f32; cap * nb]);
        let mut row = vec![0u8; hd];
        for pos in 0..n {
            let x: Vec<f32> = (0..hd).map(|_| rng.random_range(-3.0..3.0)).collect();
            quantize_q8_row(&x, &mut row, &mut scale[pos * nb..(pos + 1) * nb]);
            for (d, &b) in row.iter().enumerate() {
                q[key_elem(true, hd, pos, d)] = b;
            }
        }
        (q, scale)
    }

    /// The 512-bit kernels give the portable loop's bits, key-major and query-major, on partial
    /// tiles at both ends, for 1 to 4 decode queries and 1 to 5 prefill groups.
    #[test]
    fn simd_scores_give_the_portable_bits() {
        if !vnni512() {
            eprintln!("skipped: no AVX-512 VNNI on this CPU");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for hd in [64, 256, 32, 96] {
            let (kq, ks) = keys(77, hd, &mut rng);
            for (lo, n) in [(0, 77), (3, 70), (13, 1), (8, 16), (5, 9)] {
                let k = Q8Keys {
                    q: &kq,
                    scale: &ks,
                    head: 0,
                    lo,
                    keys: n,
                };
                for groups in 1..=5 {
                    let mut qq = Q8Queries::default();
                    qq.reset(groups, 16, hd);
                    for r in 0..groups * 16 - 3 {
                        let x: Vec<f32> = (0..hd).map(|_| rng.random_range(-2.0..2.0)).collect();
                        qq.set(r, &x, 0.125);
                    }
                    let mp = groups * 16;
                    let (mut a, mut b) = (vec![0f32; n * mp], vec![1f32; n * mp]);
                    prefill(true, &qq, groups, k, &mut a);
                    prefill(false, &qq, groups, k, &mut b);
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&a),
                        bits(&b),
                        "prefill hd {hd} lo {lo} n {n} g {groups}"
                    );
                    for m in 1..=4 {
                        let base = lo / KEY_TILE * KEY_TILE;
                        let stride = (lo + n - base).next_multiple_of(KEY_TILE);
                        let (mut x, mut y) = (vec![0f32; m * stride], vec![0f32; m * stride]);
                        decode(true, &qq, m, k, &mut x, stride);
                        decode(false, &qq, m, k, &mut y, stride);
                        for r in 0..m {
                            for pos in lo..lo + n {
                                let (u, v) =
                                    (x[r * stride + pos - base], y[r * stride + pos - base]);
                                assert_eq!(u.to_bits(), v.to_bits(), "decode hd {hd} m {m} {pos}");
                                // The same score as key-major.
                                assert_eq!(u.to_bits(), b[(pos - lo) * mp + r].to_bits());
                            }
                        }
                    }
                }
            }
        }
    }

    /// The integer dot times the scales is within the quantization error of the f32 score.
    #[test]
    fn scores_approximate_the_float_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let hd = 64;
        let (kq, ks) = keys(16, hd, &mut rng);
        let mut qq = Q8Queries::default();
        qq.reset(1, 16, hd);
        let x: Vec<f32> = (0..hd).map(|_| rng.random_range(-2.0..2.0)).collect();
        qq.set(0, &x, 1.0);
        let k = Q8Keys {
            q: &kq,
            scale: &ks,
            head: 0,
            lo: 0,
            keys: 16,
        };
        let mut p = vec![0f32; 16 * 16];
        prefill(false, &qq, 1, k, &mut p);
        for j in 0..16 {
            let exact: f32 = (0..hd)
                .map(|d| {
                    let k = ((kq[key_elem(true, hd, j, d)] ^ 0x80) as i8) as f32;
                    x[d] * k * ks[j * 2 + d / 32]
                })
                .sum();
            let err = (p[j * 16] - exact).abs();
            // |q| ≤ 2, |k| ≤ 3: each of 64 products off by at most 3·(2/254) + 2·(3/254).
            assert!(
                err < 64.0 * 12.0 / 254.0 / 4.0,
                "key {j}: {} vs {exact}",
                p[j * 16]
            );
        }
    }
}
