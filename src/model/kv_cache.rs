//! Per-sequence key/value cache: one buffer per layer, written in place, grown in chunks.
//!
//! Each sequence owns its cache, so sequences at different positions can share one forward pass
//! (continuous batching) and join or leave between steps.
//!
//! On CPU the buffers are plain vectors laid out `[kv_head][capacity][head_dim]`, written and read
//! directly by the CPU attention ([`super::attention`]): no tensor op, no allocation per step.
//! Their element type is the model's [`KvDtype`]: IEEE half precision by default (llama.cpp's
//! default cache type), which halves the bytes per position — of every running sequence and of
//! the prefix store — against f32. A value is rounded once, when written (to nearest even), so a
//! position's keys and values are the same bits however and whenever they were computed, and
//! widening them back is exact. On other devices they are f32 candle tensors of the same shape.

use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::kernels::{quantize_row, Q8_0_BLOCK};

/// Element type of a host KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvDtype {
    /// IEEE half precision: half the memory, keys and values rounded to 11 significant bits.
    #[default]
    F16,
    /// Single precision: exactly what the layer computed (reference comparisons).
    F32,
    /// Keys in 8 bits with one scale per 32 values of a position and head (llama.cpp's
    /// `-ctk q8_0` blocks), values in f16: 0.78× the bytes of f16, and the scores run on
    /// integer dot products (`vpdpbusd`), ~4× fewer instructions than f32 FMAs.
    Q8Keys,
    /// Keys as [`Self::Q8Keys`] and values in the same 8-bit blocks (llama.cpp's `-ctk q8_0
    /// -ctv q8_0`): 0.56× the bytes of f16, which a decoded token streams from memory; values are
    /// widened to f32 for the weighted sums.
    Q8,
}

impl KvDtype {
    /// Lower-case name (`f16`, `f32`, `q8_keys`, `q8`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::F32 => "f32",
            Self::Q8Keys => "q8_keys",
            Self::Q8 => "q8",
        }
    }

    /// Whether keys are stored in 8 bits (so `head_dim` must be a multiple of 32).
    pub fn q8_keys(self) -> bool {
        matches!(self, Self::Q8Keys | Self::Q8)
    }

    /// Whether values are stored in 8 bits.
    fn q8_values(self) -> bool {
        self == Self::Q8
    }

    /// Bytes of one stored key value (its scale not counted).
    fn key_size(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
            Self::Q8Keys | Self::Q8 => 1,
        }
    }

    /// Bytes of one stored value (its scale not counted).
    fn value_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Q8Keys => 2,
            Self::Q8 => 1,
        }
    }

    /// Bytes one head's key takes per position, with its scales.
    fn key_row_bytes(self, hd: usize) -> usize {
        hd * self.key_size() + if self.q8_keys() { 4 * q8_blocks(hd) } else { 0 }
    }

    /// Bytes one head's value takes per position, with its scales.
    fn value_row_bytes(self, hd: usize) -> usize {
        hd * self.value_size()
            + if self.q8_values() {
                4 * q8_blocks(hd)
            } else {
                0
            }
    }

    /// Bytes one head's keys and values take per position.
    pub fn bytes_per_head_position(self, hd: usize) -> usize {
        self.key_row_bytes(hd) + self.value_row_bytes(hd)
    }
}

impl FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            "q8_keys" => Ok(Self::Q8Keys),
            "q8" => Ok(Self::Q8),
            other => Err(format!(
                "unknown KV cache type `{}` (expected f16, f32, q8_keys or q8)",
                crate::types::echo(other)
            )),
        }
    }
}

/// Positions per key tile. Host caches store keys `[kv_head][capacity / KEY_TILE][head_dim]
/// [KEY_TILE]` (capacity is a multiple of it), so the attention of one new token can score eight
/// cached keys per SIMD register; values stay `[kv_head][capacity][head_dim]`.
pub const KEY_TILE: usize = 8;

/// Key values per 32-bit group of an 8-bit key tile (one `vpdpbusd` lane).
pub const Q8_GROUP: usize = 4;

/// Scales per 8-bit key of `hd` values: one per Q8_0 block of 32 (`hd` must be a multiple of
/// it). A head's scales lie `[capacity][blocks]`.
pub fn q8_blocks(hd: usize) -> usize {
    hd / Q8_0_BLOCK
}

/// Where value `d` of the key at `pos` lies in a run of tiles starting at position 0: f16/f32
/// tiles are `[head_dim][KEY_TILE]`, 8-bit ones `[head_dim / 4][KEY_TILE][4]` (four values of
/// one key per 32-bit lane, as `vpdpbusd` reads them).
#[inline]
pub fn key_elem(q8: bool, hd: usize, pos: usize, d: usize) -> usize {
    let tile = pos / KEY_TILE * KEY_TILE * hd;
    if q8 {
        tile + (d / Q8_GROUP * KEY_TILE + pos % KEY_TILE) * Q8_GROUP + d % Q8_GROUP
    } else {
        tile + d * KEY_TILE + pos % KEY_TILE
    }
}

/// Where value `d` of the key at `pos` of head `h` lies in a tiled key buffer of `cap` positions
/// per head.
#[inline]
pub fn key_index(cap: usize, hd: usize, h: usize, pos: usize, d: usize) -> usize {
    h * cap * hd + key_elem(false, hd, pos, d)
}

/// One head's key or value `x` (a multiple of 32 values) in 8 bits with the matmuls' activation
/// quantizer (Q8_0 blocks: f16-rounded scale `max |x| / 127`, values rounded to it): the values
/// into `out` offset by +128 (`vpdpbusd`'s unsigned operand), the block scales into `scales`.
/// Queries go through the same quantizer, so every path's integer dot products agree.
pub fn quantize_q8_row(x: &[f32], out: &mut [u8], scales: &mut [f32]) {
    thread_local! {
        static ROW: std::cell::RefCell<(Vec<i8>, Vec<i32>)> = Default::default();
    }
    ROW.with(|row| {
        let (q, corr) = &mut *row.borrow_mut();
        q.resize(x.len(), 0);
        corr.resize(scales.len(), 0);
        quantize_row(x, q, scales, corr);
        for (o, &v) in out.iter_mut().zip(q.iter()) {
            *o = v as u8 ^ 0x80;
        }
    });
}

/// Keys or values of a host cache, in the cache's element type.
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    /// Half precision.
    F16(&'a [f16]),
    /// Single precision.
    F32(&'a [f32]),
    /// 8-bit keys (offset by +128, tiles of [`key_elem`]) and one scale per position
    /// (`[kv_head][capacity]`).
    Q8 {
        /// The values.
        q: &'a [u8],
        /// Their scales.
        scale: &'a [f32],
        /// Values per head.
        hd: usize,
    },
    /// 8-bit values (offset by +128, row-major like f16 values) and one scale per 32 of them
    /// (`[kv_head][capacity][head_dim / 32]`, so value `i`'s scale is `scale[i / 32]`).
    Q8Rows {
        /// The values.
        q: &'a [u8],
        /// Their scales.
        scale: &'a [f32],
    },
}

impl KvRows<'_> {
    /// Stored values.
    pub fn len(&self) -> usize {
        match self {
            Self::F16(x) => x.len(),
            Self::F32(x) => x.len(),
            Self::Q8 { q, .. } | Self::Q8Rows { q, .. } => q.len(),
        }
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `i`, widened (8-bit keys: times their scale).
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Self::F16(x) => x[i].to_f32(),
            Self::F32(x) => x[i],
            Self::Q8 { q, scale, hd } => {
                // Tiles of KEY_TILE positions run back to back across heads (capacities are
                // whole tiles), so the tile and the lane give the position, and the 4-value
                // group the value's block.
                let pos = i / (KEY_TILE * hd) * KEY_TILE + i % (KEY_TILE * Q8_GROUP) / Q8_GROUP;
                let d = i % (KEY_TILE * hd) / (KEY_TILE * Q8_GROUP) * Q8_GROUP + i % Q8_GROUP;
                ((q[i] ^ 0x80) as i8 as f32) * scale[pos * q8_blocks(*hd) + d / Q8_0_BLOCK]
            }
            Self::Q8Rows { q, scale } => ((q[i] ^ 0x80) as i8 as f32) * scale[i / Q8_0_BLOCK],
        }
    }

    /// Widens values `at..at + dst.len()` into `dst`, exactly (F16C-vectorised where present).
    pub fn widen(&self, at: usize, dst: &mut [f32]) {
        match self {
            Self::F16(x) => x[at..at + dst.len()].convert_to_f32_slice(dst),
            Self::F32(x) => dst.copy_from_slice(&x[at..at + dst.len()]),
            Self::Q8Rows { q, scale } if at.is_multiple_of(Q8_0_BLOCK) => {
                // Block by block, one scale each: the loop the compiler vectorises.
                let q = &q[at..at + dst.len()];
                for ((d, q), s) in dst
                    .chunks_mut(Q8_0_BLOCK)
                    .zip(q.chunks(Q8_0_BLOCK))
                    .zip(&scale[at / Q8_0_BLOCK..])
                {
                    for (d, &q) in d.iter_mut().zip(q) {
                        *d = ((q ^ 0x80) as i8 as f32) * s;
                    }
                }
            }
            Self::Q8 { .. } | Self::Q8Rows { .. } => {
                for (j, x) in dst.iter_mut().enumerate() {
                    *x = self.get(at + j);
                }
            }
        }
    }

    /// Value `d` of head `h`'s key at `pos`, widened, in a buffer of `cap` positions per head.
    pub fn key(&self, cap: usize, hd: usize, h: usize, pos: usize, d: usize) -> f32 {
        match self {
            Self::Q8 { .. } => self.get(h * cap * hd + key_elem(true, hd, pos, d)),
            _ => self.get(key_index(cap, hd, h, pos, d)),
        }
    }
}

/// Positions `start..start + t` of head `h` in a buffer of `cap` positions per head, `hd` values
/// of `size` bytes each per position (keys tiled as [`key_elem`] with `q8`).
#[derive(Clone, Copy)]
struct RowSpan {
    size: usize,
    cap: usize,
    hd: usize,
    h: usize,
    start: usize,
    t: usize,
    q8: bool,
}

impl RowSpan {
    /// The span's bytes when they lie row-major in one run: always for values, and for keys
    /// when the span is whole tiles (a tile run holds the same bytes either way).
    fn contiguous(&self, keys: bool) -> Option<std::ops::Range<usize>> {
        let whole_tiles = self.start.is_multiple_of(KEY_TILE) && self.t.is_multiple_of(KEY_TILE);
        (!keys || whole_tiles).then(|| {
            let at = (self.h * self.cap + self.start) * self.hd * self.size;
            at..at + self.t * self.hd * self.size
        })
    }

    /// Byte offsets of the span's key values in row-major order, gathered from their tiles.
    fn key_offsets(&self) -> impl Iterator<Item = usize> + '_ {
        let head = self.h * self.cap * self.hd;
        (self.start..self.start + self.t).flat_map(move |pos| {
            (0..self.hd).map(move |d| (head + key_elem(self.q8, self.hd, pos, d)) * self.size)
        })
    }

    /// The span's scales in a `[head][cap][blocks]` scale buffer.
    fn scales(&self) -> std::ops::Range<usize> {
        let nb = q8_blocks(self.hd);
        let at = (self.h * self.cap + self.start) * nb;
        at..at + self.t * nb
    }
}

/// One host buffer of keys or values.
enum HostBuf {
    F16(Vec<f16>),
    F32(Vec<f32>),
    /// 8-bit keys or values and their scales (see [`KvRows::Q8`], [`KvRows::Q8Rows`]).
    Q8 {
        q: Vec<u8>,
        scale: Vec<f32>,
    },
}

impl HostBuf {
    /// An empty key (`keys`) or value buffer of a cache of `dtype`.
    fn empty(dtype: KvDtype, keys: bool) -> Self {
        let eight_bit = if keys {
            dtype.q8_keys()
        } else {
            dtype.q8_values()
        };
        match dtype {
            KvDtype::F32 => Self::F32(Vec::new()),
            _ if eight_bit => Self::Q8 {
                q: Vec::new(),
                scale: Vec::new(),
            },
            _ => Self::F16(Vec::new()),
        }
    }

    /// The buffer as keys (`keys`, tiled) or values (row-major).
    fn rows(&self, hd: usize, keys: bool) -> KvRows<'_> {
        match self {
            Self::F16(x) => KvRows::F16(x),
            Self::F32(x) => KvRows::F32(x),
            Self::Q8 { q, scale } if keys => KvRows::Q8 { q, scale, hd },
            Self::Q8 { q, scale } => KvRows::Q8Rows { q, scale },
        }
    }

    /// Stores `src` (one head's value: whole 32-value blocks when 8-bit) from value `at`,
    /// rounded to the element type (value buffers).
    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Self::F16(x) => x[at..at + src.len()].convert_from_f32_slice(src),
            Self::F32(x) => x[at..at + src.len()].copy_from_slice(src),
            Self::Q8 { q, scale } => {
                let b = at / Q8_0_BLOCK;
                quantize_q8_row(
                    src,
                    &mut q[at..at + src.len()],
                    &mut scale[b..b + src.len() / Q8_0_BLOCK],
                );
            }
        }
    }

    /// Stores `src` as the key of head `h` at `pos` (tiled layout, `cap` positions per head).
    fn write_key(&mut self, cap: usize, hd: usize, h: usize, pos: usize, src: &[f32]) {
        let at = |q8: bool, d: usize| h * cap * hd + key_elem(q8, hd, pos, d);
        match self {
            Self::F16(x) => {
                let mut row = [f16::ZERO; 64];
                for (c, chunk) in src.chunks(64).enumerate() {
                    let row = &mut row[..chunk.len()];
                    row.convert_from_f32_slice(chunk);
                    for (i, &y) in row.iter().enumerate() {
                        x[at(false, c * 64 + i)] = y;
                    }
                }
            }
            Self::F32(x) => {
                for (d, &y) in src.iter().enumerate() {
                    x[at(false, d)] = y;
                }
            }
            Self::Q8 { q, scale } => {
                let mut stack = [0u8; 512];
                let mut heap = Vec::new();
                let row = if hd <= stack.len() {
                    &mut stack[..hd]
                } else {
                    heap.resize(hd, 0);
                    &mut heap[..]
                };
                let nb = q8_blocks(hd);
                let at_scale = (h * cap + pos) * nb;
                quantize_q8_row(src, row, &mut scale[at_scale..at_scale + nb]);
                // Four values of the key per 32-bit lane of its tile.
                for (g, y) in row.chunks_exact(Q8_GROUP).enumerate() {
                    let at = at(true, g * Q8_GROUP);
                    q[at..at + Q8_GROUP].copy_from_slice(y);
                }
            }
        }
    }

    fn raw(&self) -> &[u8] {
        match self {
            Self::F16(x) => bytemuck::cast_slice(x),
            Self::F32(x) => bytemuck::cast_slice(x),
            Self::Q8 { q, .. } => q,
        }
    }

    fn raw_mut(&mut self) -> &mut [u8] {
        match self {
            Self::F16(x) => bytemuck::cast_slice_mut(x),
            Self::F32(x) => bytemuck::cast_slice_mut(x),
            Self::Q8 { q, .. } => q,
        }
    }

    /// Appends to `out` the raw values of positions `start..start + t` of head `h`, row-major
    /// (`[t][hd]`) whatever the buffer's layout (see [`RowSpan::contiguous`]), then (8-bit keys)
    /// their `t` scales.
    fn read_rows(&self, keys: bool, at: RowSpan, out: &mut Vec<u8>) {
        let raw = self.raw();
        match at.contiguous(keys) {
            Some(bytes) => out.extend_from_slice(&raw[bytes]),
            None => at
                .key_offsets()
                .for_each(|o| out.extend_from_slice(&raw[o..o + at.size])),
        }
        if let Self::Q8 { scale, .. } = self {
            out.extend_from_slice(bytemuck::cast_slice(&scale[at.scales()]));
        }
    }

    /// Stores the scales that follow the `t * hd` bytes of `src` (8-bit keys or values), and
    /// returns the values' part of `src`.
    fn write_scales<'s>(&mut self, at: RowSpan, src: &'s [u8]) -> &'s [u8] {
        let Self::Q8 { scale, .. } = self else {
            return src;
        };
        let (values, scales) = src.split_at(at.t * at.hd);
        for (s, b) in scale[at.scales()].iter_mut().zip(scales.chunks_exact(4)) {
            *s = f32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
        values
    }

    /// Writes positions `start..start + t` of head `h` from raw values laid out as
    /// [`Self::read_rows`] gives them.
    fn write_rows(&mut self, keys: bool, at: RowSpan, src: &[u8]) {
        let src = self.write_scales(at, src);
        let raw = self.raw_mut();
        match at.contiguous(keys) {
            Some(bytes) => raw[bytes].copy_from_slice(src),
            None => at
                .key_offsets()
                .zip(src.chunks_exact(at.size))
                .for_each(|(o, e)| raw[o..o + at.size].copy_from_slice(e)),
        }
    }

    /// Writes key positions `start..start + t` of head `h` from row-major values
    /// (`[position][head_dim]`, then the scales of 8-bit keys), whatever the span's alignment.
    fn scatter_key_rows(&mut self, at: RowSpan, src: &[u8]) {
        let src = self.write_scales(at, src);
        let raw = self.raw_mut();
        at.key_offsets()
            .zip(src.chunks_exact(at.size))
            .for_each(|(o, e)| raw[o..o + at.size].copy_from_slice(e));
    }

    /// A buffer of `n` values holding `len` values per head from `old` (`old_cap` per head).
    fn regrow(&self, heads: usize, old_cap: usize, new_cap: usize, len: usize, hd: usize) -> Self {
        fn copy<T: Copy + Default>(
            old: &[T],
            heads: usize,
            oc: usize,
            nc: usize,
            n: usize,
        ) -> Vec<T> {
            let mut buf = vec![T::default(); heads * nc];
            for h in 0..heads {
                buf[h * nc..][..n].copy_from_slice(&old[h * oc..][..n]);
            }
            buf
        }
        let (oc, nc, n) = (old_cap * hd, new_cap * hd, len * hd);
        match self {
            Self::F16(x) => Self::F16(copy(x, heads, oc, nc, n)),
            Self::F32(x) => Self::F32(copy(x, heads, oc, nc, n)),
            Self::Q8 { q, scale } => {
                let nb = q8_blocks(hd);
                Self::Q8 {
                    q: copy(q, heads, oc, nc, n),
                    scale: copy(scale, heads, old_cap * nb, new_cap * nb, len * nb),
                }
            }
        }
    }
}

/// The first `t` positions of one head's keys as [`HostBuf::read_rows`] serialized a run of
/// `stored` positions starting on a tile, in row-major order (`[position][head_dim]`, then the
/// scales of 8-bit keys): a run of whole tiles is in tile order, any other is row-major already.
fn key_rows_prefix(src: &[u8], stored: usize, t: usize, hd: usize, dtype: KvDtype) -> Vec<u8> {
    let (size, q8) = (dtype.key_size(), dtype.q8_keys());
    let mut out = Vec::with_capacity(t * dtype.key_row_bytes(hd));
    if !stored.is_multiple_of(KEY_TILE) {
        out.extend_from_slice(&src[..t * hd * size]);
    } else {
        for pos in 0..t {
            for d in 0..hd {
                let e = key_elem(q8, hd, pos, d);
                out.extend_from_slice(&src[e * size..(e + 1) * size]);
            }
        }
    }
    if q8 {
        out.extend_from_slice(&src[stored * hd..][..t * 4 * q8_blocks(hd)]);
    }
    out
}

/// Capacity grows in multiples of this many positions (amortizes the copy on growth).
const GROW_STEP: usize = 256;

/// Keys and values of one layer on a device: `[n_kv_head, capacity, head_dim]` each.
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// Keys and values of one layer in host memory: `[n_kv_head][capacity][head_dim]` each.
struct HostLayer {
    k: HostBuf,
    v: HostBuf,
}

enum Store {
    Host(Vec<HostLayer>),
    Device(Vec<Option<LayerKv>>),
}

/// The KV cache of one sequence.
pub struct KvCache {
    store: Store,
    n_kv_head: usize,
    head_dim: usize,
    capacity: usize,
    max_len: usize,
    len: usize,
    dtype: KvDtype,
    device: Device,
}

/// Read access to one layer of a host cache: keys in [`KEY_TILE`]-position tiles (see
/// [`key_index`]), values `[n_kv_head][capacity][head_dim]`.
#[derive(Clone, Copy)]
pub struct HostLayerView<'a> {
    /// Keys.
    pub k: KvRows<'a>,
    /// Values.
    pub v: KvRows<'a>,
    /// Positions per head in the buffers (the stride between heads is `capacity * head_dim`).
    pub capacity: usize,
}

impl KvCache {
    /// An empty half-precision cache for a model with these shapes, holding at most `max_len`
    /// positions.
    pub fn new(
        n_layer: usize,
        n_kv_head: usize,
        head_dim: usize,
        max_len: usize,
        device: &Device,
    ) -> Self {
        Self::with_dtype(n_layer, n_kv_head, head_dim, max_len, KvDtype::F16, device)
    }

    /// [`Self::new`] storing `dtype` in host memory (device caches are always f32).
    ///
    /// # Panics
    /// With 8-bit keys ([`KvDtype::q8_keys`]) and `head_dim` not a multiple of 32 (the pool refuses such a
    /// model first).
    pub fn with_dtype(
        n_layer: usize,
        n_kv_head: usize,
        head_dim: usize,
        max_len: usize,
        dtype: KvDtype,
        device: &Device,
    ) -> Self {
        assert!(
            !dtype.q8_keys() || head_dim.is_multiple_of(Q8_0_BLOCK),
            "8-bit keys need head_dim a multiple of 32"
        );
        let store = if device.is_cpu() {
            let empty = || HostLayer {
                k: HostBuf::empty(dtype, true),
                v: HostBuf::empty(dtype, false),
            };
            Store::Host((0..n_layer).map(|_| empty()).collect())
        } else {
            Store::Device((0..n_layer).map(|_| None).collect())
        };
        Self {
            store,
            n_kv_head,
            head_dim,
            capacity: 0,
            max_len,
            len: 0,
            dtype,
            device: device.clone(),
        }
    }

    /// A cache of f32 candle tensors on `device` whatever the device: the layout non-CPU
    /// devices use, with which the forward pass takes its candle path even on the CPU (so that
    /// path is checked against the host one on machines without a GPU).
    pub fn with_tensors(
        n_layer: usize,
        n_kv_head: usize,
        head_dim: usize,
        max_len: usize,
        device: &Device,
    ) -> Self {
        Self {
            store: Store::Device((0..n_layer).map(|_| None).collect()),
            n_kv_head,
            head_dim,
            capacity: 0,
            max_len,
            len: 0,
            dtype: KvDtype::F32,
            device: device.clone(),
        }
    }

    /// Positions already stored (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold room for now (grown by [`Self::reserve`]).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Most positions this cache may hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forget everything (the buffers are kept for the next sequence).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Forget the positions from `len` on, keeping those before (rewind to an earlier point of
    /// the same sequence; a no-op when `len` is past the end).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Whether the buffers live in host memory (the CPU attention path).
    pub(crate) fn is_host(&self) -> bool {
        matches!(self.store, Store::Host(_))
    }

    /// Make room for `extra` more positions in every layer. Call once per step, before the layers.
    pub fn reserve(&mut self, extra: usize) -> candle_core::Result<()> {
        let need = self.len + extra;
        if need > self.max_len {
            candle_core::bail!(
                "sequence of {need} positions exceeds the KV cache limit {}",
                self.max_len
            );
        }
        if need <= self.capacity {
            return Ok(());
        }
        let new_cap = need
            .max(self.capacity * 2)
            .div_ceil(GROW_STEP)
            .saturating_mul(GROW_STEP)
            .min(self.max_len)
            .next_multiple_of(KEY_TILE);
        let (nkv, hd, len, old_cap) = (self.n_kv_head, self.head_dim, self.len, self.capacity);
        match &mut self.store {
            Store::Host(layers) => {
                // Whole key tiles: the last one may be partly written.
                let key_len = len.next_multiple_of(KEY_TILE);
                for layer in layers.iter_mut() {
                    layer.k = layer.k.regrow(nkv, old_cap, new_cap, key_len, hd);
                    layer.v = layer.v.regrow(nkv, old_cap, new_cap, len, hd);
                }
            }
            Store::Device(layers) => {
                let shape = (nkv, new_cap, hd);
                for layer in layers.iter_mut() {
                    let k = Tensor::zeros(shape, DType::F32, &self.device)?;
                    let v = Tensor::zeros(shape, DType::F32, &self.device)?;
                    if let Some(old) = layer.take() {
                        if len > 0 {
                            k.slice_set(&old.k.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                            v.slice_set(&old.v.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                        }
                    }
                    *layer = Some(LayerKv { k, v });
                }
            }
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// Write the keys and values of `t` new tokens of layer `layer` at the current position (host
    /// caches). `k_at(i)` and `v_at(i)` give token `i`'s `[n_kv_head * head_dim]` row.
    pub(crate) fn write_host<'a>(
        &mut self,
        layer: usize,
        t: usize,
        k_at: impl Fn(usize) -> &'a [f32],
        v_at: impl Fn(usize) -> &'a [f32],
    ) -> candle_core::Result<()> {
        let (nkv, hd, cap, len) = (self.n_kv_head, self.head_dim, self.capacity, self.len);
        let Store::Host(layers) = &mut self.store else {
            candle_core::bail!("KV cache is not in host memory");
        };
        let Some(kv) = layers.get_mut(layer) else {
            candle_core::bail!("KV cache has no layer {layer}");
        };
        if len + t > cap {
            candle_core::bail!("KV cache append past reserved capacity");
        }
        for i in 0..t {
            let (kr, vr) = (k_at(i), v_at(i));
            for h in 0..nkv {
                kv.k.write_key(cap, hd, h, len + i, &kr[h * hd..(h + 1) * hd]);
                kv.v.write((h * cap + len + i) * hd, &vr[h * hd..(h + 1) * hd]);
            }
        }
        Ok(())
    }

    /// The buffers of layer `layer` of a host cache.
    pub(crate) fn host_layer(&self, layer: usize) -> candle_core::Result<HostLayerView<'_>> {
        let Store::Host(layers) = &self.store else {
            candle_core::bail!("KV cache is not in host memory");
        };
        let Some(kv) = layers.get(layer) else {
            candle_core::bail!("KV cache has no layer {layer}");
        };
        Ok(HostLayerView {
            k: kv.k.rows(self.head_dim, true),
            v: kv.v.rows(self.head_dim, false),
            capacity: self.capacity,
        })
    }

    /// Write `k`, `v` (`[n_kv_head, t, head_dim]`, contiguous) of layer `layer` at the current
    /// position and return all keys and values up to and including them.
    pub fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        if self.len + t > self.capacity {
            candle_core::bail!("KV cache append past reserved capacity");
        }
        let total = self.len + t;
        match &mut self.store {
            Store::Device(layers) => {
                let Some(kv) = layers.get(layer).and_then(Option::as_ref) else {
                    candle_core::bail!("KV cache layer {layer} not reserved");
                };
                kv.k.slice_set(k, 1, self.len)?;
                kv.v.slice_set(v, 1, self.len)?;
                Ok((kv.k.narrow(1, 0, total)?, kv.v.narrow(1, 0, total)?))
            }
            Store::Host(_) => {
                let (nkv, hd) = (self.n_kv_head, self.head_dim);
                // [nkv, t, hd] → per token rows [nkv * hd].
                let rows = |x: &Tensor| -> candle_core::Result<Vec<f32>> {
                    x.transpose(0, 1)?.flatten_all()?.to_vec1::<f32>()
                };
                let (kr, vr) = (rows(k)?, rows(v)?);
                self.write_host(
                    layer,
                    t,
                    |i| &kr[i * nkv * hd..(i + 1) * nkv * hd],
                    |i| &vr[i * nkv * hd..(i + 1) * nkv * hd],
                )?;
                let view = self.host_layer(layer)?;
                let cap = view.capacity;
                let gather = |buf: KvRows<'_>, keys: bool| -> candle_core::Result<Tensor> {
                    let mut out = vec![0f32; nkv * total * hd];
                    for h in 0..nkv {
                        let dst = &mut out[h * total * hd..][..total * hd];
                        if keys {
                            for (i, x) in dst.iter_mut().enumerate() {
                                *x = buf.key(cap, hd, h, i / hd, i % hd);
                            }
                        } else {
                            buf.widen(h * cap * hd, dst);
                        }
                    }
                    Tensor::from_vec(out, (nkv, total, hd), &self.device)
                };
                Ok((gather(view.k, true)?, gather(view.v, false)?))
            }
        }
    }

    /// The element type of a host cache.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Bytes one position takes in every layer, keys (with their scales) and values, in a host
    /// cache (the size of one position in [`Self::read_positions`]' layout).
    pub fn bytes_per_position(&self) -> usize {
        let layers = match &self.store {
            Store::Host(l) => l.len(),
            Store::Device(l) => l.len(),
        };
        layers * self.n_kv_head * self.dtype.bytes_per_head_position(self.head_dim)
    }

    /// Where positions `start..start + t` of head `h` lie in this cache's key (`keys`) or value
    /// buffers.
    fn span(&self, keys: bool, h: usize, start: usize, t: usize) -> RowSpan {
        RowSpan {
            size: if keys {
                self.dtype.key_size()
            } else {
                self.dtype.value_size()
            },
            cap: self.capacity,
            hd: self.head_dim,
            h,
            start,
            t,
            q8: keys && self.dtype.q8_keys(),
        }
    }

    /// Copy positions `start..start + t` of every layer out of a host cache into `out`, as raw
    /// values laid out `[layer][k, v][kv_head][t][head_dim]`, each head's 8-bit keys followed by
    /// their `t` scales (what [`Self::push_positions`] of a
    /// cache of the same type and shape reads back). The prefix store keeps blocks of finished
    /// sequences in this form.
    pub fn read_positions(
        &self,
        start: usize,
        t: usize,
        out: &mut Vec<u8>,
    ) -> candle_core::Result<()> {
        let Store::Host(layers) = &self.store else {
            candle_core::bail!("KV cache is not in host memory");
        };
        if start + t > self.len {
            candle_core::bail!(
                "positions {start}..{} are not all written (cache holds {})",
                start + t,
                self.len
            );
        }
        out.reserve(self.bytes_per_position() * t);
        for layer in layers {
            for (buf, keys) in [(&layer.k, true), (&layer.v, false)] {
                for h in 0..self.n_kv_head {
                    buf.read_rows(keys, self.span(keys, h, start, t), out);
                }
            }
        }
        Ok(())
    }

    /// Append `t` positions to every layer of a host cache from `data`, laid out as
    /// [`Self::read_positions`] writes it, and advance past them.
    pub fn push_positions(&mut self, data: &[u8], t: usize) -> candle_core::Result<()> {
        self.push_positions_prefix(data, t, t)
    }

    /// Append the first `t` of the `stored` positions that `data` holds (laid out as
    /// [`Self::read_positions`] writes `stored` positions): a stored block whose first tokens
    /// match a prompt serves those positions alone.
    pub fn push_positions_prefix(
        &mut self,
        data: &[u8],
        stored: usize,
        t: usize,
    ) -> candle_core::Result<()> {
        if data.len() != self.bytes_per_position() * stored || t > stored {
            candle_core::bail!(
                "KV block holds {} bytes, expected {} for {stored} positions (want the first {t})",
                data.len(),
                self.bytes_per_position() * stored
            );
        }
        if !self.is_host() {
            candle_core::bail!("KV cache is not in host memory");
        }
        if t == 0 {
            return Ok(());
        }
        self.reserve(t)?;
        let (nkv, hd, dtype) = (self.n_kv_head, self.head_dim, self.dtype);
        let spans: Vec<[RowSpan; 2]> = (0..nkv)
            .map(|h| {
                [
                    self.span(true, h, self.len, t),
                    self.span(false, h, self.len, t),
                ]
            })
            .collect();
        let Store::Host(layers) = &mut self.store else {
            candle_core::bail!("KV cache is not in host memory");
        };
        let mut rest = data;
        for layer in layers.iter_mut() {
            for (buf, keys) in [(&mut layer.k, true), (&mut layer.v, false)] {
                let row = if keys {
                    dtype.key_row_bytes(hd)
                } else {
                    dtype.value_row_bytes(hd)
                };
                for span in &spans {
                    let at = span[usize::from(!keys)];
                    let (chunk, tail) = rest.split_at(stored * row);
                    rest = tail;
                    if keys && t < stored {
                        // The stored run may be in tile order (see `read_rows`): take its first
                        // `t` positions row by row and scatter them.
                        let rows = key_rows_prefix(chunk, stored, t, hd, dtype);
                        buf.scatter_key_rows(at, &rows);
                    } else if !keys && dtype.q8_values() && t < stored {
                        // Row-major 8-bit values, then the scales of all `stored` positions.
                        let mut rows = chunk[..t * hd].to_vec();
                        rows.extend_from_slice(&chunk[stored * hd..][..t * 4 * q8_blocks(hd)]);
                        buf.write_rows(keys, at, &rows);
                    } else {
                        // Values are row-major: the first `t` rows are a prefix.
                        buf.write_rows(keys, at, &chunk[..t * row]);
                    }
                }
            }
        }
        self.len += t;
        Ok(())
    }

    /// Mark `t` positions written in every layer (after the step's forward pass).
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        let layers = match &self.store {
            Store::Host(l) => l.len(),
            Store::Device(l) => l.len(),
        };
        let per_head = if self.is_host() {
            self.dtype.bytes_per_head_position(self.head_dim)
        } else {
            2 * self.head_dim * std::mem::size_of::<f32>()
        };
        layers * self.n_kv_head * self.capacity * per_head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYERS: usize = 2;
    const NKV: usize = 2;
    const HD: usize = 8;

    /// Head width of a test cache: [`HD`], or one Q8_0 block (32) for 8-bit keys.
    fn width(dtype: KvDtype) -> usize {
        if dtype.q8_keys() {
            Q8_0_BLOCK
        } else {
            HD
        }
    }

    /// A cache of `n` positions whose every key and value is distinct and exact in f16 (at
    /// [`HD`]; 8-bit keys round theirs).
    fn filled(dtype: KvDtype, n: usize) -> KvCache {
        let hd = width(dtype);
        let mut c = KvCache::with_dtype(LAYERS, NKV, hd, 1000, dtype, &Device::Cpu);
        c.reserve(n).unwrap();
        let row = |layer: usize, kv: usize, pos: usize| -> Vec<f32> {
            (0..NKV * hd)
                .map(|j| ((layer * 2 + kv) * 512 + pos * 16 + j) as f32 / 4.0)
                .collect()
        };
        for layer in 0..LAYERS {
            let ks: Vec<Vec<f32>> = (0..n).map(|p| row(layer, 0, p)).collect();
            let vs: Vec<Vec<f32>> = (0..n).map(|p| row(layer, 1, p)).collect();
            c.write_host(layer, n, |i| &ks[i], |i| &vs[i]).unwrap();
        }
        c.advance(n);
        c
    }

    /// Keys and values of positions `0..n` of every layer and head are equal in `a` and `b`.
    fn same_positions(a: &KvCache, b: &KvCache, n: usize, what: &str) {
        let hd = a.head_dim;
        for layer in 0..LAYERS {
            let (a, b) = (a.host_layer(layer).unwrap(), b.host_layer(layer).unwrap());
            for h in 0..NKV {
                for pos in 0..n {
                    for d in 0..hd {
                        let (x, y) = (
                            a.k.key(a.capacity, hd, h, pos, d),
                            b.k.key(b.capacity, hd, h, pos, d),
                        );
                        assert_eq!(x.to_bits(), y.to_bits(), "{what}: key {h}/{pos}/{d}");
                        let (i, j) = (
                            (h * a.capacity + pos) * hd + d,
                            (h * b.capacity + pos) * hd + d,
                        );
                        assert_eq!(a.v.get(i), b.v.get(j), "{what}: value {h}/{pos}/{d}");
                    }
                }
            }
        }
    }

    #[test]
    fn keys_are_tiled_and_blocks_round_trip_aligned_or_not() {
        for dtype in [KvDtype::F16, KvDtype::F32, KvDtype::Q8Keys, KvDtype::Q8] {
            let src = filled(dtype, 27);
            let view = src.host_layer(1).unwrap();
            // Key (kv 0) and value (kv 1) of layer 1, head 1, position 13, value 5: exact, or
            // within half a step where stored in 8 bits (the step of the row's largest value).
            let hd = width(dtype);
            for (kv, got, q8) in [
                (0, view.k.key(view.capacity, hd, 1, 13, 5), dtype.q8_keys()),
                (
                    1,
                    view.v.get((view.capacity + 13) * hd + 5),
                    dtype == KvDtype::Q8,
                ),
            ] {
                let base = (2 + kv) * 512 + 13 * 16;
                let want = ((base + hd + 5) as f32) / 4.0;
                let step = if q8 {
                    (base + 2 * hd) as f32 / 4.0 / 127.0
                } else {
                    0.0
                };
                assert!(
                    (got - want).abs() <= step / 2.0,
                    "{dtype:?} kv {kv}: {got} vs {want}"
                );
            }
            // Blocks of 8 (whole tiles, copied as stored) and of 3 (gathered).
            for block in [8, 3] {
                let mut dst =
                    KvCache::with_dtype(LAYERS, NKV, width(dtype), 64, dtype, &Device::Cpu);
                let mut start = 0;
                while start + block <= 24 {
                    let mut data = Vec::new();
                    src.read_positions(start, block, &mut data).unwrap();
                    assert_eq!(data.len(), block * src.bytes_per_position());
                    dst.push_positions(&data, block).unwrap();
                    start += block;
                }
                same_positions(&src, &dst, 24, &format!("{dtype:?} block {block}"));
            }
        }
    }

    /// The first positions of a stored run (whole tiles, so serialized in tile order, or not)
    /// pushed into an empty cache give exactly the source's keys and values, and the cache goes
    /// on at an unaligned position.
    #[test]
    fn the_first_positions_of_a_stored_run_round_trip() {
        for dtype in [KvDtype::F16, KvDtype::F32, KvDtype::Q8Keys, KvDtype::Q8] {
            let src = filled(dtype, 27);
            for (stored, t) in [
                (16, 7),
                (16, 8),
                (16, 9),
                (16, 15),
                (8, 3),
                (11, 5),
                (11, 11),
            ] {
                let mut data = Vec::new();
                src.read_positions(0, stored, &mut data).unwrap();
                let mut dst =
                    KvCache::with_dtype(LAYERS, NKV, width(dtype), 64, dtype, &Device::Cpu);
                dst.push_positions_prefix(&data, stored, t).unwrap();
                assert_eq!(dst.len(), t);
                // The cache goes on from there (an unaligned position for most `t`).
                let mut more = Vec::new();
                src.read_positions(t, 5, &mut more).unwrap();
                dst.push_positions(&more, 5).unwrap();
                same_positions(&src, &dst, t + 5, &format!("{dtype:?} {stored}/{t}"));
            }
            let mut data = Vec::new();
            src.read_positions(0, 8, &mut data).unwrap();
            let mut dst = KvCache::with_dtype(LAYERS, NKV, width(dtype), 64, dtype, &Device::Cpu);
            assert!(dst.push_positions_prefix(&data, 8, 9).is_err());
        }
    }

    #[test]
    fn growing_keeps_a_partial_key_tile() {
        for dtype in [KvDtype::F16, KvDtype::Q8Keys, KvDtype::Q8] {
            let mut c = filled(dtype, 5);
            let hd = width(dtype);
            let before = c.host_layer(0).unwrap().k.key(c.capacity, hd, 1, 4, 7);
            assert_eq!(c.capacity, 256);
            c.reserve(300).unwrap();
            let view = c.host_layer(0).unwrap();
            assert!(view.capacity >= 305 && view.capacity.is_multiple_of(KEY_TILE));
            assert_eq!(view.k.key(view.capacity, hd, 1, 4, 7), before, "{dtype:?}");
        }
    }

    /// `get` on the flat index of an 8-bit key finds the same value as `key`, and the bytes
    /// per position count the scales.
    #[test]
    fn eight_bit_keys_index_both_ways() {
        let c = filled(KvDtype::Q8Keys, 20);
        let hd = width(KvDtype::Q8Keys);
        let view = c.host_layer(1).unwrap();
        for h in 0..NKV {
            for pos in 0..20 {
                for d in 0..hd {
                    let flat = h * view.capacity * hd + key_elem(true, hd, pos, d);
                    assert_eq!(view.k.get(flat), view.k.key(view.capacity, hd, h, pos, d));
                }
            }
        }
        assert_eq!(c.bytes_per_position(), LAYERS * NKV * (hd + 4 + 2 * hd));
        let mut data = Vec::new();
        c.read_positions(3, 5, &mut data).unwrap();
        assert_eq!(data.len(), 5 * c.bytes_per_position());
    }

    /// 8-bit values widen (block by block, as the attention reads them) to what `get` gives
    /// value by value, and the bytes per position count both scales.
    #[test]
    fn eight_bit_values_widen_as_get() {
        let c = filled(KvDtype::Q8, 20);
        let hd = width(KvDtype::Q8);
        let view = c.host_layer(1).unwrap();
        for at in [0, hd, 7 * hd, (view.capacity + 3) * hd] {
            let mut wide = vec![0f32; 5 * hd];
            view.v.widen(at, &mut wide);
            for (j, x) in wide.iter().enumerate() {
                assert_eq!(
                    x.to_bits(),
                    view.v.get(at + j).to_bits(),
                    "value {}",
                    at + j
                );
            }
        }
        assert_eq!(c.bytes_per_position(), LAYERS * NKV * 2 * (hd + 4));
    }
}
