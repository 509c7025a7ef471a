//! Per-sequence key/value cache: one buffer per layer, written in place, grown in chunks.
//!
//! Each sequence owns its cache, so sequences at different positions can share one forward pass
//! (continuous batching) and join or leave between steps.
//!
//! On CPU the buffers are plain `Vec<f32>` laid out `[kv_head][capacity][head_dim]`, written and
//! read directly by the CPU attention ([`super::attention`]): no tensor op, no allocation per step.
//! On other devices they are candle tensors of the same shape, used by candle ops.

use candle_core::{DType, Device, Tensor};

/// Capacity grows in multiples of this many positions (amortizes the copy on growth).
const GROW_STEP: usize = 256;

/// Keys and values of one layer on a device: `[n_kv_head, capacity, head_dim]` each.
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// Keys and values of one layer in host memory: `[n_kv_head][capacity][head_dim]` each.
#[derive(Default)]
struct HostLayer {
    k: Vec<f32>,
    v: Vec<f32>,
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
    device: Device,
}

/// Read access to one layer of a host cache: `[n_kv_head][capacity][head_dim]` keys and values.
#[derive(Clone, Copy)]
pub struct HostLayerView<'a> {
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// Positions per head in the buffers (the stride between heads is `capacity * head_dim`).
    pub capacity: usize,
}

impl KvCache {
    /// An empty cache for a model with these shapes, holding at most `max_len` positions.
    pub fn new(
        n_layer: usize,
        n_kv_head: usize,
        head_dim: usize,
        max_len: usize,
        device: &Device,
    ) -> Self {
        let store = if device.is_cpu() {
            Store::Host((0..n_layer).map(|_| HostLayer::default()).collect())
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

    /// Most positions this cache may hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forget everything (the buffers are kept for the next sequence).
    pub fn clear(&mut self) {
        self.len = 0;
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
            .min(self.max_len);
        let (nkv, hd, len, old_cap) = (self.n_kv_head, self.head_dim, self.len, self.capacity);
        match &mut self.store {
            Store::Host(layers) => {
                let regrow = |old: &mut Vec<f32>| {
                    let mut buf = vec![0f32; nkv * new_cap * hd];
                    for h in 0..nkv {
                        buf[h * new_cap * hd..][..len * hd]
                            .copy_from_slice(&old[h * old_cap * hd..][..len * hd]);
                    }
                    *old = buf;
                };
                for layer in layers.iter_mut() {
                    regrow(&mut layer.k);
                    regrow(&mut layer.v);
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
                let dst = (h * cap + len + i) * hd;
                kv.k[dst..dst + hd].copy_from_slice(&kr[h * hd..(h + 1) * hd]);
                kv.v[dst..dst + hd].copy_from_slice(&vr[h * hd..(h + 1) * hd]);
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
            k: &kv.k,
            v: &kv.v,
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
                let gather = |buf: &[f32]| -> candle_core::Result<Tensor> {
                    let mut out = Vec::with_capacity(nkv * total * hd);
                    for h in 0..nkv {
                        out.extend_from_slice(&buf[h * view.capacity * hd..][..total * hd]);
                    }
                    Tensor::from_vec(out, (nkv, total, hd), &self.device)
                };
                Ok((gather(view.k)?, gather(view.v)?))
            }
        }
    }

    /// Values one position takes in every layer, keys and values: `n_layer * 2 * n_kv_head *
    /// head_dim` (the size of one position in [`Self::read_positions`]' layout).
    pub fn values_per_position(&self) -> usize {
        let layers = match &self.store {
            Store::Host(l) => l.len(),
            Store::Device(l) => l.len(),
        };
        layers * 2 * self.n_kv_head * self.head_dim
    }

    /// Copy positions `start..start + t` of every layer out of a host cache into `out`, laid out
    /// `[layer][k, v][kv_head][t][head_dim]` (what [`Self::push_positions`] reads back). The
    /// prefix store keeps blocks of finished sequences in this form.
    pub fn read_positions(
        &self,
        start: usize,
        t: usize,
        out: &mut Vec<f32>,
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
        let (nkv, hd, cap) = (self.n_kv_head, self.head_dim, self.capacity);
        out.reserve(layers.len() * 2 * nkv * t * hd);
        for layer in layers {
            for buf in [&layer.k, &layer.v] {
                for h in 0..nkv {
                    out.extend_from_slice(&buf[(h * cap + start) * hd..][..t * hd]);
                }
            }
        }
        Ok(())
    }

    /// Append `t` positions to every layer of a host cache from `data`, laid out as
    /// [`Self::read_positions`] writes it, and advance past them.
    pub fn push_positions(&mut self, data: &[f32], t: usize) -> candle_core::Result<()> {
        if data.len() != self.values_per_position() * t {
            candle_core::bail!(
                "KV block holds {} values, expected {} for {t} positions",
                data.len(),
                self.values_per_position() * t
            );
        }
        if !self.is_host() {
            candle_core::bail!("KV cache is not in host memory");
        }
        if t == 0 {
            return Ok(());
        }
        self.reserve(t)?;
        let (nkv, hd, cap, len) = (self.n_kv_head, self.head_dim, self.capacity, self.len);
        let Store::Host(layers) = &mut self.store else {
            candle_core::bail!("KV cache is not in host memory");
        };
        let mut chunks = data.chunks_exact(t * hd);
        for layer in layers.iter_mut() {
            for buf in [&mut layer.k, &mut layer.v] {
                for h in 0..nkv {
                    let src = chunks.next().expect("length checked");
                    buf[(h * cap + len) * hd..][..t * hd].copy_from_slice(src);
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
        2 * layers * self.n_kv_head * self.capacity * self.head_dim * 4
    }
}
