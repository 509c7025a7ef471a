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

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::attention::{self, AttnShape, SeqAttn};
use super::gguf::GgufFile;
use super::hparams::{Activation, Arch, ArchSpec, HParams, RopeScaling, RopeStyle};
use super::kv_cache::{KvCache, KvDtype};
use super::linear::{Linear, MultiLinear};
use super::quantize::{read_converted, Quant};
use super::ModelError;

/// One sequence's part of a step: new tokens, appended at `cache.len()`.
pub struct SeqStep<'a> {
    /// Tokens to feed (a prompt chunk, or the last sampled token).
    pub tokens: &'a [u32],
    /// The sequence's own cache; advanced by `tokens.len()` after the step.
    pub cache: &'a mut KvCache,
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

/// RoPE of a layer: ggml's `rope_ext` parameters (ggml-cpu `ggml_rope_cache_init`, `rope_yarn`
/// without YaRN's extrapolation mix).
#[derive(Debug, Clone, PartialEq)]
struct RopeParams {
    /// Frequency base.
    base: f64,
    /// Values of a head rotated (the first `dims`).
    dims: usize,
    /// Every angle times this (`1 / rope.scaling.factor` for linear scaling).
    freq_scale: f32,
    /// Per-frequency divisors of the angle (`dims / 2`): Llama 3's `rope_freqs.weight`, Phi-3's
    /// long or short factors.
    factors: Option<Arc<[f32]>>,
    /// cos and sin times this (`rope.scaling.attn_factor`).
    mscale: f32,
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
    /// Load the weights of `file`, converting matrices to `quant` (in parallel over layers).
    pub fn load(
        file: &GgufFile,
        hp: &HParams,
        quant: Quant,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let mut names: Vec<String> = vec!["token_embd.weight".into(), "output_norm.weight".into()];
        let tied = !file.has_tensor("output.weight");
        if !tied {
            names.push("output.weight".into());
        }
        let spec = hp.arch.spec();
        for i in 0..hp.n_layer {
            let fused_qkv = file.has_tensor(&format!("blk.{i}.attn_qkv.weight"));
            names
                .extend(layer_tensor_names(&spec, fused_qkv).map(|part| format!("blk.{i}.{part}")));
        }
        let rope_factors = read_rope_factors(file, hp)?;
        check_no_ignored_bias(file, hp)?;
        for name in &names {
            if !file.has_tensor(name) {
                return Err(ModelError::MissingTensor(name.clone()));
            }
        }
        // Each weight is read, converted and packed before the next ones are read, so its
        // QTensor form (dropped once packed) never coexists with every other weight's: the
        // embedding and head first, then the layers in parallel.
        let upload = |t: QTensor| -> Result<Arc<QTensor>, ModelError> {
            let t = if device.is_cpu() {
                t
            } else {
                // Upload through the dequantized form is wasteful; QTensor::quantize_onto keeps
                // it quantized on the device.
                let f = t.dequantize(&Device::Cpu)?;
                QTensor::quantize_onto(&f, t.dtype(), device)?
            };
            Ok(Arc::new(t))
        };
        let take = |name: &str| upload(read_converted(file, name, quant)?);
        // A fused matrix `[Σ sizes, hidden]` read on the host, split by rows, then uploaded.
        let take_split = |name: &str, sizes: &[usize]| -> Result<Vec<Arc<QTensor>>, ModelError> {
            let t = read_converted(file, name, quant)?;
            check_shape(name, &t, &[sizes.iter().sum(), hp.hidden])?;
            split_rows(name, &t, sizes)?
                .into_iter()
                .map(&upload)
                .collect()
        };
        let norm =
            |name: &str| -> Result<Norm, ModelError> { Norm::new(take(name)?.dequantize(device)?) };

        let embed = take("token_embd.weight")?;
        check_shape("token_embd.weight", &embed, &[hp.vocab, hp.hidden])?;
        let output = if tied {
            Linear::new(embed.clone())?
        } else {
            Linear::new(take("output.weight")?)?
        };
        let embed = match output.rows_f32(&[]) {
            Some(_) if tied => None,
            _ => Some(embed),
        };
        let final_norm = norm("output_norm.weight")?;
        let blocks = (0..hp.n_layer)
            .into_par_iter()
            .map(|i| -> Result<Block, ModelError> {
                let p = |part: &str| format!("blk.{i}.{part}.weight");
                let q_dim = hp.n_head * hp.head_dim;
                let kv_dim = hp.n_kv_head * hp.head_dim;
                let shaped = |part: &str, want: &[usize]| -> Result<Arc<QTensor>, ModelError> {
                    let t = take(&p(part))?;
                    check_shape(&p(part), &t, want)?;
                    Ok(t)
                };
                let qkv = if file.has_tensor(&p("attn_qkv")) {
                    // Phi-3's fused Q/K/V: rows `[q | k | v]`, split and stacked again (so the
                    // kernels see the layout they see for separate matrices).
                    MultiLinear::new(&take_split(&p("attn_qkv"), &[q_dim, kv_dim, kv_dim])?)?
                } else {
                    MultiLinear::new(&[
                        shaped("attn_q", &[q_dim, hp.hidden])?,
                        shaped("attn_k", &[kv_dim, hp.hidden])?,
                        shaped("attn_v", &[kv_dim, hp.hidden])?,
                    ])?
                };
                let wo = Linear::new(shaped("attn_output", &[hp.hidden, q_dim])?)?;
                let gate_up = if spec.fused_gate_up {
                    // Phi-3's `ffn_up` holds gate then up (ggml_swiglu: silu of the first half
                    // times the second).
                    MultiLinear::new(&take_split(&p("ffn_up"), &[hp.ffn, hp.ffn])?)?
                } else {
                    MultiLinear::new(&[
                        shaped("ffn_gate", &[hp.ffn, hp.hidden])?,
                        shaped("ffn_up", &[hp.ffn, hp.hidden])?,
                    ])?
                };
                let down = Linear::new(shaped("ffn_down", &[hp.hidden, hp.ffn])?)?;
                let norm_if = |on: bool, part: &str| -> Result<Option<Norm>, ModelError> {
                    on.then(|| norm(&p(part))).transpose()
                };
                let qkv_bias = if spec.qkv_bias {
                    let b = |part: &str, len: usize| -> Result<Tensor, ModelError> {
                        let name = format!("blk.{i}.{part}.bias");
                        let t = take(&name)?;
                        check_shape(&name, &t, &[len])?;
                        Ok(t.dequantize(device)?)
                    };
                    let t = [
                        b("attn_q", q_dim)?,
                        b("attn_k", kv_dim)?,
                        b("attn_v", kv_dim)?,
                    ];
                    let h = Tensor::cat(&t, 0)?
                        .to_device(&Device::Cpu)?
                        .to_vec1::<f32>()?;
                    Some(QkvBias { t, h })
                } else {
                    None
                };
                let window = hp.window_of_layer(i);
                Ok(Block {
                    attn_norm: norm(&p("attn_norm"))?,
                    q_norm: norm_if(spec.qk_norm, "attn_q_norm")?,
                    k_norm: norm_if(spec.qk_norm, "attn_k_norm")?,
                    post_attn_norm: norm_if(spec.post_norms, "post_attention_norm")?,
                    post_ffn_norm: norm_if(spec.post_norms, "post_ffw_norm")?,
                    ffn_norm: norm(&p("ffn_norm"))?,
                    qkv,
                    qkv_bias,
                    wo,
                    gate_up,
                    down,
                    window,
                    rope: usize::from(window.is_some()),
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let factors = rope_factors.pick(hp.context_length);
        let rope = |base: f64| RopeParams {
            base,
            dims: hp.rope.dims,
            freq_scale: match hp.rope.scaling {
                RopeScaling::Linear { factor } => 1.0 / factor,
                RopeScaling::None | RopeScaling::LongRope => 1.0,
            },
            factors: factors.clone(),
            mscale: hp.rope.attn_factor,
        };
        // [global layers, sliding-window layers] (Gemma 3 gives the latter their own base).
        let ropes = vec![rope(hp.rope_base), rope(hp.rope_base_local)];
        Ok(Self {
            hp: hp.clone(),
            spec,
            ropes,
            rope_factors,
            embed,
            blocks,
            final_norm,
            output,
            device: device.clone(),
            kv_dtype: KvDtype::default(),
        })
    }

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
    /// and advances each cache by its number of tokens.
    pub fn forward(&self, steps: &mut [SeqStep<'_>]) -> Result<Tensor, ModelError> {
        let hp = &self.hp;
        let mut all_tokens = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(steps.len());
        for s in steps.iter_mut() {
            if s.tokens.is_empty() {
                return Err(candle_core::Error::Msg("empty sequence step".into()).into());
            }
            s.cache.reserve(s.tokens.len())?;
            let start = s.cache.len();
            spans.push((all_tokens.len(), s.tokens.len(), start));
            all_tokens.extend_from_slice(s.tokens);
            positions.extend((start..start + s.tokens.len()).map(|p| p as u32));
        }
        if self.device.is_cpu() && steps.iter().all(|s| s.cache.is_host()) {
            return self.forward_host(steps, &spans, all_tokens, &positions);
        }
        let n_tok = all_tokens.len();
        let ids = Tensor::from_vec(all_tokens, n_tok, &self.device)?;
        let mut x = match &self.embed {
            Some(e) => e.embedding(&ids)?,
            None => {
                let rows = self.embedding_rows(&ids.to_vec1::<u32>()?)?;
                Tensor::from_vec(rows, (n_tok, hp.hidden), &self.device)?
            }
        };
        if self.spec.scale_embeddings {
            x = (x * (hp.hidden as f64).sqrt())?;
        }
        let mut rope_cache: Vec<Option<(Tensor, Tensor)>> = vec![None; self.ropes.len()];
        for (li, block) in self.blocks.iter().enumerate() {
            let (cos, sin) = match &rope_cache[block.rope] {
                Some((c, s)) => (c.clone(), s.clone()),
                None => {
                    let (c, s) = rope_tables(&positions, &self.ropes[block.rope], &self.device)?;
                    rope_cache[block.rope] = Some((c.clone(), s.clone()));
                    (c, s)
                }
            };
            let h = rms_norm(&x, &block.attn_norm.t, hp.rms_eps)?;
            let attn = self.attention(li, block, &h, &cos, &sin, steps, &spans)?;
            let attn = block.wo.forward(&attn)?;
            let attn = match &block.post_attn_norm {
                Some(w) => rms_norm(&attn, &w.t, hp.rms_eps)?,
                None => attn,
            };
            x = (x + attn)?;
            let h = rms_norm(&x, &block.ffn_norm.t, hp.rms_eps)?;
            let [gate, up]: [Tensor; 2] = block
                .gate_up
                .forward(&h)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("gate/up outputs".into()))?;
            let gate = match self.spec.activation {
                Activation::Silu => gate.silu()?,
                Activation::GeluTanh => gate.gelu()?,
            };
            let mlp = block.down.forward(&(gate * up)?)?;
            let mlp = match &block.post_ffn_norm {
                Some(w) => rms_norm(&mlp, &w.t, hp.rms_eps)?,
                None => mlp,
            };
            x = (x + mlp)?;
        }
        for (s, &(_, len, _)) in steps.iter_mut().zip(&spans) {
            s.cache.advance(len);
        }
        let last: Vec<u32> = spans
            .iter()
            .map(|&(off, len, _)| (off + len - 1) as u32)
            .collect();
        let last = Tensor::from_vec(last, spans.len(), &self.device)?;
        let x = x.index_select(&last, 0)?;
        let x = rms_norm(&x, &self.final_norm.t, hp.rms_eps)?;
        Ok(self.output.forward(&x)?)
    }

    /// The CPU step on host rows; see the module docs. `spans` are `(row offset, new tokens,
    /// start position)` per sequence, `positions` the position of every row.
    fn forward_host(
        &self,
        steps: &mut [SeqStep<'_>],
        spans: &[(usize, usize, usize)],
        all_tokens: Vec<u32>,
        positions: &[u32],
    ) -> Result<Tensor, ModelError> {
        let hp = &self.hp;
        let (nh, nkv, hd, dim) = (hp.n_head, hp.n_kv_head, hp.head_dim, hp.hidden);
        let eps = hp.rms_eps as f32;
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let n_tok = all_tokens.len();
        let mut x = self.embedding_rows(&all_tokens)?;
        if self.spec.scale_embeddings {
            // As the candle path: the scale rounded to f32, applied in f32.
            let s = (hp.hidden as f64).sqrt() as f32;
            x.iter_mut().for_each(|v| *v *= s);
        }
        let mut ropes: Vec<Option<HostRope>> = (0..self.ropes.len()).map(|_| None).collect();
        let mut attn_out = vec![0f32; n_tok * q_dim];
        for (li, block) in self.blocks.iter().enumerate() {
            let rope = &*ropes[block.rope]
                .get_or_insert_with(|| HostRope::new(positions, hd, &self.ropes[block.rope]));

            // Attention.
            let mut h = x.clone();
            rms_norm_rows(&mut h, dim, &block.attn_norm.h, eps);
            let mut qkv = block.qkv.forward_f32(&h, n_tok)?;
            let width = block.qkv.width();
            let neox = self.spec.rope == RopeStyle::Neox;
            par_rows(&mut qkv, width, |row, r| {
                if let Some(b) = &block.qkv_bias {
                    r.iter_mut().zip(&b.h).for_each(|(v, b)| *v += b);
                }
                let (q, kv) = r.split_at_mut(q_dim);
                let k = &mut kv[..kv_dim];
                if let Some(w) = &block.q_norm {
                    rms_norm_rows(q, hd, &w.h, eps);
                }
                if let Some(w) = &block.k_norm {
                    rms_norm_rows(k, hd, &w.h, eps);
                }
                rope.apply(q, row, neox);
                rope.apply(k, row, neox);
            });
            for (s, &(off, len, _)) in steps.iter_mut().zip(spans) {
                let qkv = &qkv;
                s.cache.write_host(
                    li,
                    len,
                    |i| &qkv[(off + i) * width + q_dim..][..kv_dim],
                    |i| &qkv[(off + i) * width + q_dim + kv_dim..][..kv_dim],
                )?;
            }
            let seqs = steps
                .iter()
                .zip(spans)
                .map(|(s, &(off, len, start))| {
                    Ok(SeqAttn {
                        off,
                        len,
                        start,
                        kv: s.cache.host_layer(li)?,
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let shape = AttnShape {
                n_head: nh,
                n_kv_head: nkv,
                head_dim: hd,
                window: block.window,
                scale: (1.0 / (hd as f64).sqrt()) as f32,
            };
            attention::attend(&shape, &qkv, width, &seqs, &mut attn_out);
            let mut o = block.wo.forward_f32(&attn_out, n_tok)?;
            if let Some(w) = &block.post_attn_norm {
                rms_norm_rows(&mut o, dim, &w.h, eps);
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            // Feed-forward.
            let mut h = x.clone();
            rms_norm_rows(&mut h, dim, &block.ffn_norm.h, eps);
            let gu = block.gate_up.forward_f32(&h, n_tok)?;
            let ffn = hp.ffn;
            let mut act = vec![0f32; n_tok * ffn];
            let activation = self.spec.activation;
            par_rows(&mut act, ffn, |row, a| {
                let (g, u) = gu[row * 2 * ffn..(row + 1) * 2 * ffn].split_at(ffn);
                for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                    let g = match activation {
                        Activation::Silu => g / (1.0 + (-g).exp()),
                        Activation::GeluTanh => gelu_tanh(g),
                    };
                    *a = g * u;
                }
            });
            let mut mlp = block.down.forward_f32(&act, n_tok)?;
            if let Some(w) = &block.post_ffn_norm {
                rms_norm_rows(&mut mlp, dim, &w.h, eps);
            }
            x.iter_mut().zip(&mlp).for_each(|(a, b)| *a += b);
        }
        for (s, &(_, len, _)) in steps.iter_mut().zip(spans) {
            s.cache.advance(len);
        }
        let mut last = Vec::with_capacity(spans.len() * dim);
        for &(off, len, _) in spans {
            last.extend_from_slice(&x[(off + len - 1) * dim..(off + len) * dim]);
        }
        rms_norm_rows(&mut last, dim, &self.final_norm.h, eps);
        let logits = self.output.forward_f32(&last, spans.len())?;
        let vocab = logits.len() / spans.len();
        Ok(Tensor::from_vec(
            logits,
            (spans.len(), vocab),
            &Device::Cpu,
        )?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        block: &Block,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        steps: &mut [SeqStep<'_>],
        spans: &[(usize, usize, usize)],
    ) -> Result<Tensor, ModelError> {
        let hp = &self.hp;
        let (n_tok, _) = h.dims2()?;
        let (nh, nkv, hd) = (hp.n_head, hp.n_kv_head, hp.head_dim);
        let group = nh / nkv;
        let [q, k, v]: [Tensor; 3] = block
            .qkv
            .forward(h)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("q/k/v outputs".into()))?;
        let (q, k, v) = match &block.qkv_bias {
            Some(b) => (
                q.broadcast_add(&b.t[0])?,
                k.broadcast_add(&b.t[1])?,
                v.broadcast_add(&b.t[2])?,
            ),
            None => (q, k, v),
        };
        let q = q.reshape((n_tok, nh, hd))?;
        let k = k.reshape((n_tok, nkv, hd))?;
        let v = v.reshape((n_tok, nkv, hd))?;
        let q = match &block.q_norm {
            Some(w) => rms_norm(&q, &w.t, hp.rms_eps)?,
            None => q,
        };
        let k = match &block.k_norm {
            Some(w) => rms_norm(&k, &w.t, hp.rms_eps)?,
            None => k,
        };
        // [1, heads, T, hd] for candle's rope kernels; one call covers every sequence because the
        // cos/sin rows were gathered at each token's own position.
        let q = q.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
        let k = k.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
        let rotate = |x: &Tensor| -> candle_core::Result<Tensor> {
            let dims = self.hp.rope.dims;
            let part = if dims < hd {
                x.narrow(3, 0, dims)?.contiguous()?
            } else {
                x.clone()
            };
            let rotated = match self.spec.rope {
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&part, cos, sin)?,
                RopeStyle::Neox => candle_nn::rotary_emb::rope(&part, cos, sin)?,
            };
            if dims < hd {
                Tensor::cat(&[rotated, x.narrow(3, dims, hd - dims)?], 3)
            } else {
                Ok(rotated)
            }
        };
        let (q, k) = (rotate(&q)?, rotate(&k)?);
        let (q, k) = (q.squeeze(0)?, k.squeeze(0)?);
        let v = v.transpose(0, 1)?.contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();

        let mut outs = Vec::with_capacity(spans.len());
        for (s, &(off, len, start)) in steps.iter_mut().zip(spans) {
            let k_new = k.narrow(1, off, len)?.contiguous()?;
            let v_new = v.narrow(1, off, len)?.contiguous()?;
            let (k_all, v_all) = s.cache.append(layer, &k_new, &v_new)?;
            let total = start + len;
            // Keys a sliding-window layer can still see from the first new token.
            let first_visible = match block.window {
                Some(w) => (start + 1).saturating_sub(w),
                None => 0,
            };
            let (k_all, v_all) = if first_visible > 0 {
                let n = total - first_visible;
                (
                    k_all.narrow(1, first_visible, n)?,
                    v_all.narrow(1, first_visible, n)?,
                )
            } else {
                (k_all, v_all)
            };
            let n_keys = total - first_visible;
            // [nkv, group*len, hd]: the query heads sharing a kv head side by side, no repeat_kv.
            let qs = q
                .narrow(1, off, len)?
                .contiguous()?
                .reshape((nkv, group * len, hd))?;
            let scores = (qs.matmul(&k_all.t()?)? * scale)?;
            let scores = if len > 1 {
                let mask = causal_mask(len, start, first_visible, block.window, &self.device)?;
                scores
                    .reshape((nkv, group, len, n_keys))?
                    .broadcast_add(&mask)?
                    .reshape((nkv, group * len, n_keys))?
            } else {
                scores
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let out = probs.matmul(&v_all.contiguous()?)?; // [nkv, group*len, hd]
            let out = out
                .reshape((nh, len, hd))?
                .transpose(0, 1)?
                .reshape((len, nh * hd))?;
            outs.push(out);
        }
        Ok(Tensor::cat(&outs, 0)?)
    }
}

/// Tensors every block of a family has (`blk.N.` omitted); `fused_qkv`: the block stores Q, K
/// and V as one `attn_qkv` matrix.
fn layer_tensor_names(spec: &ArchSpec, fused_qkv: bool) -> impl Iterator<Item = &'static str> {
    let attn: &[&str] = if fused_qkv {
        &["attn_qkv.weight"]
    } else {
        &["attn_q.weight", "attn_k.weight", "attn_v.weight"]
    };
    let ffn: &[&str] = if spec.fused_gate_up {
        &["ffn_up.weight"]
    } else {
        &["ffn_gate.weight", "ffn_up.weight"]
    };
    let bias: &[&str] = if spec.qkv_bias {
        &["attn_q.bias", "attn_k.bias", "attn_v.bias"]
    } else {
        &[]
    };
    let qk_norm: &[&str] = if spec.qk_norm {
        &["attn_q_norm.weight", "attn_k_norm.weight"]
    } else {
        &[]
    };
    let post: &[&str] = if spec.post_norms {
        &["post_attention_norm.weight", "post_ffw_norm.weight"]
    } else {
        &[]
    };
    [
        "attn_norm.weight",
        "attn_output.weight",
        "ffn_norm.weight",
        "ffn_down.weight",
    ]
    .into_iter()
    .chain(attn.iter().copied())
    .chain(ffn.iter().copied())
    .chain(bias.iter().copied())
    .chain(qk_norm.iter().copied())
    .chain(post.iter().copied())
}

/// `t` (`[Σ sizes, cols]`) as one matrix per group of rows: a fused matrix taken apart. Rows are
/// whole blocks in every GGML type, so the split copies bytes and changes no value.
fn split_rows(name: &str, t: &QTensor, sizes: &[usize]) -> Result<Vec<QTensor>, ModelError> {
    let (rows, cols) = t.shape().dims2()?;
    let dtype = t.dtype();
    if sizes.iter().sum::<usize>() != rows || !cols.is_multiple_of(dtype.block_size()) {
        return Err(ModelError::BadMetadata {
            key: name.to_string(),
            reason: format!("[{rows}, {cols}] cannot be split into row groups {sizes:?}"),
        });
    }
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = t.data()?;
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            let bytes = &data[start * row_bytes..(start + n) * row_bytes];
            start += n;
            Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                bytes,
                vec![n, cols],
                &Device::Cpu,
            )?)
        })
        .collect()
}

/// The per-frequency RoPE factors `file` carries, as llama.cpp reads them: `rope_freqs.weight`
/// (Llama 3.1 / 3.2) for llama unless its scaling is `longrope`; `rope_factors_long` /
/// `rope_factors_short` for phi3, and for llama with `longrope`. A factor tensor the family does
/// not read is refused naming it (llama.cpp refuses a file with a tensor it does not load), so a
/// file is never run with its RoPE silently unscaled.
fn read_rope_factors(file: &GgufFile, hp: &HParams) -> Result<RopeFactors, ModelError> {
    let spec = hp.arch.spec();
    let longrope = hp.rope.scaling == RopeScaling::LongRope;
    let reads_freqs = spec.rope_freqs && !longrope;
    let reads_long_short = hp.arch == Arch::Phi3 || (hp.arch == Arch::Llama && longrope);
    let read = |name: &str, reads: bool| -> Result<Option<Arc<[f32]>>, ModelError> {
        if !file.has_tensor(name) {
            return Ok(None);
        }
        let bad = |reason: String| ModelError::BadMetadata {
            key: name.to_string(),
            reason,
        };
        if !reads {
            return Err(bad(format!(
                "per-frequency RoPE factors are not read for {} with rope.scaling.type `{}` \
                 (supported: rope_freqs.weight for llama; rope_factors_long/short.weight for \
                 phi3, and for llama with longrope)",
                hp.arch.as_str(),
                match hp.rope.scaling {
                    RopeScaling::None => "none",
                    RopeScaling::Linear { .. } => "linear",
                    RopeScaling::LongRope => "longrope",
                }
            )));
        }
        let t = file.tensor(name, &Device::Cpu)?.dequantize(&Device::Cpu)?;
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        if t.dims() != [hp.rope.dims / 2] {
            return Err(bad(format!(
                "shape {:?}, expected [{}] (half the rotated dimensions)",
                t.dims(),
                hp.rope.dims / 2
            )));
        }
        if let Some(v) = values.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
            return Err(bad(format!("factor {v} is not a positive number")));
        }
        Ok(Some(values.into()))
    };
    Ok(RopeFactors {
        freqs: read("rope_freqs.weight", reads_freqs)?,
        long: read("rope_factors_long.weight", reads_long_short)?,
        short: read("rope_factors_short.weight", reads_long_short)?,
        original_context: hp.rope.original_context,
    })
}

/// Refuses bias tensors the family's forward pass does not add (an output, MLP or fused-QKV bias,
/// or Q/K/V biases outside qwen2): ignoring one would run a different model.
fn check_no_ignored_bias(file: &GgufFile, hp: &HParams) -> Result<(), ModelError> {
    let spec = hp.arch.spec();
    let used = |name: &str| -> bool {
        spec.qkv_bias
            && name.starts_with("blk.")
            && ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
                .iter()
                .any(|b| name.ends_with(&format!(".{b}")))
    };
    let mut names: Vec<&String> = file.content().tensor_infos.keys().collect();
    names.sort();
    match names.into_iter().find(|n| n.ends_with(".bias") && !used(n)) {
        Some(name) => Err(ModelError::BadMetadata {
            key: name.clone(),
            reason: format!(
                "bias tensors are not supported for {} (supported: Q/K/V biases for qwen2)",
                hp.arch.as_str()
            ),
        }),
        None => Ok(()),
    }
}

fn check_shape(name: &str, t: &QTensor, want: &[usize]) -> Result<(), ModelError> {
    if t.shape().dims() != want {
        return Err(ModelError::BadMetadata {
            key: name.to_string(),
            reason: format!(
                "tensor shape {:?} does not match the hyper-parameters {want:?}",
                t.shape().dims()
            ),
        });
    }
    Ok(())
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
}

/// cos/sin rows `[positions.len(), dims / 2]`, computed the way ggml does (f32 running product
/// of the frequency scale), so greedy outputs track llama.cpp's.
fn rope_tables(
    positions: &[u32],
    params: &RopeParams,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let rope = HostRope::new(positions, params.dims, params);
    let shape = (positions.len(), rope.half);
    Ok((
        Tensor::from_vec(rope.cos, shape, device)?,
        Tensor::from_vec(rope.sin, shape, device)?,
    ))
}

/// Additive mask `[len, n_keys]` for `len` new tokens starting at position `start`, over keys from
/// position `first_visible`: causal, plus the sliding window when the layer has one.
fn causal_mask(
    len: usize,
    start: usize,
    first_visible: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n_keys = start + len - first_visible;
    let mut mask = vec![0f32; len * n_keys];
    for i in 0..len {
        let qpos = start + i;
        for j in 0..n_keys {
            let kpos = first_visible + j;
            let hidden = kpos > qpos || window.is_some_and(|w| qpos - kpos >= w);
            if hidden {
                mask[i * n_keys + j] = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_vec(mask, (len, n_keys), device)?.to_dtype(DType::F32)
}

/// Elements at and above which per-row host work is split over the current rayon pool.
const PAR_MIN_ELEMS: usize = 64 * 1024;

/// `f(row index, row)` over the rows of width `width` of `buf`, in parallel for large buffers.
fn par_rows(buf: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if buf.len() >= PAR_MIN_ELEMS && rayon::current_num_threads() > 1 {
        buf.par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        buf.chunks_mut(width).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// RMS norm of each row of width `w.len()` in place, as candle's `rms_norm` computes it (f32
/// mean of squares, `x / sqrt(mean + eps) * w`).
fn rms_norm_rows(buf: &mut [f32], width: usize, w: &[f32], eps: f32) {
    debug_assert_eq!(w.len(), width);
    par_rows(buf, width, |_, r| {
        let mut acc = [0f32; 8];
        let chunks = r.chunks_exact(8);
        let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        for c in chunks {
            for l in 0..8 {
                acc[l] += c[l] * c[l];
            }
        }
        let sum2 = acc.iter().sum::<f32>() + tail;
        let m = (sum2 / width as f32 + eps).sqrt();
        for (v, &g) in r.iter_mut().zip(w) {
            *v = *v / m * g;
        }
    });
}

/// candle's `gelu` (tanh approximation) on one value.
fn gelu_tanh(v: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    0.5 * v * (1.0 + (SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v)).tanh())
}

/// cos/sin of every row's position (`[rows][dims / 2]`), for RoPE in place on host rows.
struct HostRope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Rotated pairs per head (`dims / 2`).
    half: usize,
    /// Width of a head.
    head_dim: usize,
}

impl HostRope {
    /// The tables ggml computes (`ggml_rope_cache_init` and `rope_yarn` without extrapolation):
    /// an f32 running product `theta = p * base^(-2i / dims)`, each angle divided by its frequency
    /// factor and times `freq_scale`, cos and sin times `mscale`. With no factors, no scaling and
    /// `mscale` 1 every step is exact, so the tables are the unscaled ones bit for bit.
    fn new(positions: &[u32], head_dim: usize, params: &RopeParams) -> Self {
        let half = params.dims / 2;
        let theta_scale = (params.base as f32).powf(-2.0 / params.dims as f32);
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let mut theta = p as f32;
            for i in 0..half {
                let ff = params.factors.as_ref().map_or(1.0, |f| f[i]);
                let t = params.freq_scale * (theta / ff);
                cos.push(t.cos() * params.mscale);
                sin.push(t.sin() * params.mscale);
                theta *= theta_scale;
            }
        }
        Self {
            cos,
            sin,
            half,
            head_dim,
        }
    }

    /// Rotates the first `2 * half` values of every head of `x` at row `row`'s position: pairs
    /// `(2i, 2i + 1)` (llama, `rope_i`) or `(i, i + half)` (NeoX, gemma3), as candle's kernels
    /// and ggml's `rotate_pairs`; the rest of a head (partial rotary) passes through.
    fn apply(&self, x: &mut [f32], row: usize, neox: bool) {
        let half = self.half;
        let cos = &self.cos[row * half..(row + 1) * half];
        let sin = &self.sin[row * half..(row + 1) * half];
        for head in x.chunks_exact_mut(self.head_dim) {
            if neox {
                let (a, b) = head[..2 * half].split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x1 * sin[i] + x2 * cos[i];
                }
            } else {
                for i in 0..half {
                    let (x1, x2) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = x1 * cos[i] - x2 * sin[i];
                    head[2 * i + 1] = x1 * sin[i] + x2 * cos[i];
                }
            }
        }
    }
}
