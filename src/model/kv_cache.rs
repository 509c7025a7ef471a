//! Per-sequence key/value cache: one buffer per layer, written in place, grown in chunks.
//!
//! Each sequence owns its cache, so sequences at different positions can share one forward pass
//! (continuous batching) and join or leave between steps.

use candle_core::{DType, Device, Tensor};

/// Capacity grows in multiples of this many positions (amortizes the copy on growth).
const GROW_STEP: usize = 256;

/// Keys and values of one layer: `[n_kv_head, capacity, head_dim]` each.
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// The KV cache of one sequence.
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    n_kv_head: usize,
    head_dim: usize,
    capacity: usize,
    max_len: usize,
    len: usize,
    device: Device,
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
        Self {
            layers: (0..n_layer).map(|_| None).collect(),
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
        let shape = (self.n_kv_head, new_cap, self.head_dim);
        for layer in self.layers.iter_mut() {
            let k = Tensor::zeros(shape, DType::F32, &self.device)?;
            let v = Tensor::zeros(shape, DType::F32, &self.device)?;
            if let Some(old) = layer.take() {
                if self.len > 0 {
                    k.slice_set(&old.k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    v.slice_set(&old.v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
            }
            *layer = Some(LayerKv { k, v });
        }
        self.capacity = new_cap;
        Ok(())
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
        let Some(kv) = self.layers.get(layer).and_then(Option::as_ref) else {
            candle_core::bail!("KV cache layer {layer} not reserved");
        };
        if self.len + t > self.capacity {
            candle_core::bail!("KV cache append past reserved capacity");
        }
        kv.k.slice_set(k, 1, self.len)?;
        kv.v.slice_set(v, 1, self.len)?;
        let total = self.len + t;
        Ok((kv.k.narrow(1, 0, total)?, kv.v.narrow(1, 0, total)?))
    }

    /// Mark `t` positions written in every layer (after the step's forward pass).
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        2 * self.layers.len() * self.n_kv_head * self.capacity * self.head_dim * 4
    }
}
