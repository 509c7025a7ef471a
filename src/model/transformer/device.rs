//! The step as candle ops, for devices other than the CPU (and for checking it against the host
//! step on the CPU: [`Transformer::new_tensor_cache`]).

use candle_core::{DType, Device, Tensor};

use super::host::HostRope;
use super::{Block, Logits, RopeParams, SeqStep, Span, Transformer};
use crate::model::hparams::{Activation, RopeStyle};
use crate::model::ModelError;

impl Transformer {
    /// The step as tensor ops; see the module docs. Caches are advanced by the caller.
    pub(super) fn forward_device(
        &self,
        steps: &mut [SeqStep<'_>],
        spans: &[Span],
        all_tokens: Vec<u32>,
        positions: &[u32],
    ) -> Result<Logits, ModelError> {
        let hp = &self.hp;
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
                    let (c, s) = rope_tables(positions, &self.ropes[block.rope], &self.device)?;
                    rope_cache[block.rope] = Some((c.clone(), s.clone()));
                    (c, s)
                }
            };
            let h = rms_norm(&x, &block.attn_norm.t, hp.rms_eps)?;
            let attn = self.attention(li, block, &h, &cos, &sin, steps, spans)?;
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
        let last: Vec<u32> = spans.iter().map(|s| s.last_row() as u32).collect();
        let last = Tensor::from_vec(last, spans.len(), &self.device)?;
        let x = x.index_select(&last, 0)?;
        let x = rms_norm(&x, &self.final_norm.t, hp.rms_eps)?;
        let logits = self.output.forward(&x)?.to_dtype(DType::F32)?;
        let vocab = logits.dim(1)?;
        Ok(Logits::new(logits.flatten_all()?.to_vec1()?, vocab))
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
        spans: &[Span],
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
        for (s, &Span { off, len, start }) in steps.iter_mut().zip(spans) {
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
