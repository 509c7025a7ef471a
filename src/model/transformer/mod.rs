//! The forward pass of every family in [`Arch`] over a ragged batch: each sequence brings its own new
//! tokens, its own position and its own KV cache.
//!
//! All new tokens of all sequences go through every linear layer as one `[T, hidden]` matrix (the
//! weights are read once per step, whatever the batch); only RoPE positions, the cache write and
//! attention are per sequence. A sequence's result does not depend on what else is in the batch.
//!
//! On CPU the step runs on plain `f32` rows: norms, RoPE and activations in place in Rust, Q/K/V
//! and gate/up as one kernel call each ([`MultiLinear`]), keys and values written straight into
//! the caches' host buffers and attended there ([`super::attention`]) — a handful of calls per
//! layer instead of dozens of small tensor ops per sequence. Other devices run the same maths
//! as candle ops.
//!
//! Families are described once, by [`ArchSpec`]: the forward pass reads its switches (RoPE
//! pairing, activation, QKV biases, q/k norms, post-norms, embedding scale), never the family.
//!
//! Files: [`load`] reads and checks the weights, [`host`] is the CPU step, [`device`] the candle
//! step; this file holds what both share.

mod device;
mod host;
mod load;

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use super::hparams::{ArchSpec, HParams};
use super::kv_cache::{KvCache, KvDtype};
use super::linear::{Linear, MultiLinear};
use super::ModelError;

/// One sequence's part of a step: new tokens, appended at `cache.len()`.
pub struct SeqStep<'a> {
    /// Tokens to feed (a prompt chunk, or the last sampled token).
    pub tokens: &'a [u32],
    /// The sequence's own cache; advanced by `tokens.len()` after the step.
    pub cache: &'a mut KvCache,
}

/// Where one sequence's new tokens sit in a step: rows `off..off + len` of the batch, at
/// positions `start..start + len`.
#[derive(Debug, Clone, Copy)]
struct Span {
    /// First row of the sequence in the step's batch.
    off: usize,
    /// New tokens.
    len: usize,
    /// Position of the first new token (the cache's length before the step).
    start: usize,
}

impl Span {
    /// Row of the sequence's last new token (the one whose logits are returned).
    fn last_row(&self) -> usize {
        self.off + self.len - 1
    }
}

/// Next-token logits of each sequence of a step, row-major `[sequences, vocab]` in host memory:
/// the sampler reads them there, so the CPU step hands over its buffer as it is.
#[derive(Debug, Clone)]
pub struct Logits {
    data: Vec<f32>,
    vocab: usize,
}

impl Logits {
    /// `data` holds whole rows of `vocab` values.
    fn new(data: Vec<f32>, vocab: usize) -> Self {
        debug_assert!(vocab > 0 && data.len().is_multiple_of(vocab));
        Self { data, vocab }
    }

    /// Sequences (rows).
    pub fn len(&self) -> usize {
        self.data.len() / self.vocab
    }

    /// True for a step of no sequences.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Values per row.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Row `i`: the logits of sequence `i` of the step.
    ///
    /// # Panics
    /// When `i >= self.len()`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    /// Every row, in step order, writable (constraints mask them in place).
    pub fn rows_mut(&mut self) -> std::slice::ChunksExactMut<'_, f32> {
        self.data.chunks_exact_mut(self.vocab)
    }
}

/// An RMS-norm weight, as a tensor (candle path) and as host values (CPU path).
#[derive(Debug)]
struct Norm {
    t: Tensor,
    h: Vec<f32>,
}

impl Norm {
    fn new(t: Tensor) -> Result<Self, ModelError> {
        let h = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self { t, h })
    }
}

/// Biases of Q, K and V (Qwen2): one tensor each (candle path) and `[q | k | v]` on the host.
#[derive(Debug)]
struct QkvBias {
    t: [Tensor; 3],
    h: Vec<f32>,
}

struct Block {
    attn_norm: Norm,
    /// Q, K, V stacked: outputs `[q_dim | kv_dim | kv_dim]`.
    qkv: MultiLinear,
    qkv_bias: Option<QkvBias>,
    wo: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    post_attn_norm: Option<Norm>,
    ffn_norm: Norm,
    /// Gate and up stacked: outputs `[ffn | ffn]`.
    gate_up: MultiLinear,
    down: Linear,
    post_ffn_norm: Option<Norm>,
    window: Option<usize>,
    /// Index of this layer's RoPE in [`Transformer::ropes`].
    rope: usize,
}

/// RoPE of a layer: ggml's `rope_ext` parameters (ggml-cpu `ggml_rope_cache_init`, `rope_yarn`).
#[derive(Debug, Clone, PartialEq)]
struct RopeParams {
    /// Frequency base.
    base: f64,
    /// Values of a head rotated (the first `dims`).
    dims: usize,
    /// Every angle times this (`1 / rope.scaling.factor` for linear and YaRN scaling).
    freq_scale: f32,
    /// Per-frequency divisors of the angle (`dims / 2`): Llama 3's `rope_freqs.weight`, Phi-3's
    /// long or short factors.
    factors: Option<Arc<[f32]>>,
    /// cos and sin times this: `rope.scaling.attn_factor`, and with YaRN its magnitude
    /// correction (`load::rope_params`).
    mscale: f32,
    /// YaRN's mix of scaled and unscaled angles; `None` without YaRN.
    yarn: Option<YarnRamp>,
}

/// Where YaRN keeps a frequency's angle (extrapolation) or scales it (interpolation): pairs
/// below `low` keep theirs, pairs above `high` are scaled, a linear ramp between (ggml's
/// `rope_yarn_ramp` over `ggml_rope_yarn_corr_dims`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct YarnRamp {
    /// Weight of the unscaled angle where the ramp is 1.
    ext_factor: f32,
    /// First pair index of the ramp.
    low: f32,
    /// Last pair index of the ramp.
    high: f32,
}

impl YarnRamp {
    /// Share of the unscaled angle for pair `i`: 1 below `low`, 0 above `high`, times
    /// `ext_factor`.
    fn mix(&self, i: usize) -> f32 {
        let y = (i as f32 - self.low) / (self.high - self.low).max(0.001);
        (1.0 - y.clamp(0.0, 1.0)) * self.ext_factor
    }
}

/// Per-frequency RoPE factors a file carries; which apply depends on the context (su/longrope).
#[derive(Debug, Clone, Default)]
struct RopeFactors {
    /// `rope_freqs.weight` (Llama 3.1 / 3.2): always applied.
    freqs: Option<Arc<[f32]>>,
    /// `rope_factors_long.weight`: contexts longer than the original one.
    long: Option<Arc<[f32]>>,
    /// `rope_factors_short.weight`: contexts up to the original one.
    short: Option<Arc<[f32]>>,
    /// `rope.scaling.original_context_length`.
    original_context: usize,
}

impl RopeFactors {
    /// The factors llama.cpp applies when it runs with a context of `n_ctx` per sequence
    /// (`llama_model::get_rope_factors`).
    fn pick(&self, n_ctx: usize) -> Option<Arc<[f32]>> {
        if self.freqs.is_some() {
            return self.freqs.clone();
        }
        if n_ctx > self.original_context {
            self.long.clone()
        } else {
            self.short.clone()
        }
    }
}

/// Weights of a model, immutable after load and shared by `Arc` between instances.
pub struct Transformer {
    hp: HParams,
    spec: ArchSpec,
    /// RoPE of global layers, then of sliding-window layers.
    ropes: Vec<RopeParams>,
    /// The file's per-frequency RoPE factors, for [`Self::set_context_length`].
    rope_factors: RopeFactors,
    /// Token embeddings; `None` when they are tied to the output head and that head holds them
    /// in our packed form (rows are looked up there, so the matrix is held once).
    embed: Option<Arc<QTensor>>,
    blocks: Vec<Block>,
    final_norm: Norm,
    output: Linear,
    device: Device,
    /// Element type of the host KV caches this model's sequences get.
    kv_dtype: KvDtype,
}

impl Transformer {
    /// Runs sequences of up to `n_ctx` positions from now on: with su/longrope factors
    /// (Phi-3 128k), a context longer than the original one takes the long factors, as llama.cpp
    /// started with `-c n_ctx` does. Loading assumes the model's native context.
    pub fn set_context_length(&mut self, n_ctx: usize) {
        let factors = self.rope_factors.pick(n_ctx);
        for r in &mut self.ropes {
            r.factors = factors.clone();
        }
    }

    /// Hyper-parameters.
    pub fn hparams(&self) -> &HParams {
        &self.hp
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Embedding rows of `ids`, `[ids.len() * hidden]` f32.
    fn embedding_rows(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        match &self.embed {
            Some(e) => {
                let ids = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
                Ok(e.embedding(&ids)?.flatten_all()?.to_vec1::<f32>()?)
            }
            None => Ok(self.output.rows_f32(ids).unwrap_or_else(|| {
                Err(candle_core::Error::Msg(
                    "tied embedding without a packed head".into(),
                ))
            })?),
        }
    }

    /// Store host KV caches as `dtype` from now on (f16 unless set).
    pub fn set_kv_dtype(&mut self, dtype: KvDtype) {
        self.kv_dtype = dtype;
    }

    /// Element type of the host KV caches.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// A fresh KV cache for one sequence of at most `max_len` positions.
    pub fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache::with_dtype(
            self.hp.n_layer,
            self.hp.n_kv_head,
            self.hp.head_dim,
            max_len,
            self.kv_dtype,
            &self.device,
        )
    }

    /// Run one step. Returns the logits `[steps.len(), vocab]` of each sequence's last new token,
    /// A cache held as candle tensors, as on non-CPU devices, even on the CPU: with it,
    /// [`Self::forward`] takes the candle path, so that path is checked on machines without a
    /// GPU (the host and candle paths must agree).
    pub fn new_tensor_cache(&self, max_len: usize) -> KvCache {
        KvCache::with_tensors(
            self.hp.n_layer,
            self.hp.n_kv_head,
            self.hp.head_dim,
            max_len,
            &self.device,
        )
    }

    /// Run one step. Returns the logits of each sequence's last new token, and advances each
    /// cache by its number of tokens.
    pub fn forward(&self, steps: &mut [SeqStep<'_>]) -> Result<Logits, ModelError> {
        let mut all_tokens = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(steps.len());
        for s in steps.iter_mut() {
            if s.tokens.is_empty() {
                return Err(candle_core::Error::Msg("empty sequence step".into()).into());
            }
            s.cache.reserve(s.tokens.len())?;
            let start = s.cache.len();
            spans.push(Span {
                off: all_tokens.len(),
                len: s.tokens.len(),
                start,
            });
            all_tokens.extend_from_slice(s.tokens);
            positions.extend((start..start + s.tokens.len()).map(|p| p as u32));
        }
        let logits = if self.device.is_cpu() && steps.iter().all(|s| s.cache.is_host()) {
            self.forward_host(steps, &spans, all_tokens, &positions)?
        } else {
            self.forward_device(steps, &spans, all_tokens, &positions)?
        };
        for (s, span) in steps.iter_mut().zip(&spans) {
            s.cache.advance(span.len);
        }
        Ok(logits)
    }
}
