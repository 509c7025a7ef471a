//! The CPU step on plain `f32` rows: norms, RoPE and activations in place, Q/K/V and gate/up as
//! one kernel call each, keys and values written straight into the caches' host buffers and
//! attended there ([`crate::model::attention`]).

use rayon::prelude::*;

use super::{Logits, RopeParams, SeqStep, Span, Transformer};
use crate::model::attention::{self, AttnShape, SeqAttn};
use crate::model::hparams::{Activation, RopeStyle};
use crate::model::{vmath, ModelError};

impl Transformer {
    /// The CPU step on host rows; see the module docs. `positions` holds the position of every
    /// row. Caches are advanced by the caller.
    pub(super) fn forward_host(
        &self,
        steps: &mut [SeqStep<'_>],
        spans: &[Span],
        all_tokens: Vec<u32>,
        positions: &[u32],
    ) -> Result<Logits, ModelError> {
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
        // One buffer per role, reused by every layer (the shapes repeat): no allocation or
        // zeroing per layer.
        let (mut qkv, mut o, mut gu, mut mlp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (li, block) in self.blocks.iter().enumerate() {
            let rope = &*ropes[block.rope]
                .get_or_insert_with(|| HostRope::new(positions, hd, &self.ropes[block.rope]));

            // Attention.
            block.qkv.forward_rows_into(
                n_tok,
                dim,
                &normed_rows(&x, dim, &block.attn_norm.h, eps),
                &mut qkv,
            )?;
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
            for (s, &Span { off, len, .. }) in steps.iter_mut().zip(spans) {
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
                .map(|(s, &Span { off, len, start })| {
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
            block.wo.forward_f32_into(&attn_out, n_tok, &mut o)?;
            if let Some(w) = &block.post_attn_norm {
                rms_norm_rows(&mut o, dim, &w.h, eps);
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            // Feed-forward.
            block.gate_up.forward_rows_into(
                n_tok,
                dim,
                &normed_rows(&x, dim, &block.ffn_norm.h, eps),
                &mut gu,
            )?;
            let ffn = hp.ffn;
            let activation = self.spec.activation;
            let gu = &gu;
            block.down.forward_rows_into(
                n_tok,
                ffn,
                &|row, a| {
                    let (g, u) = gu[row * 2 * ffn..(row + 1) * 2 * ffn].split_at(ffn);
                    match activation {
                        Activation::Silu => vmath::silu_mul(g, u, a),
                        Activation::GeluTanh => {
                            for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                                *a = gelu_tanh(g) * u;
                            }
                        }
                    }
                },
                &mut mlp,
            )?;
            if let Some(w) = &block.post_ffn_norm {
                rms_norm_rows(&mut mlp, dim, &w.h, eps);
            }
            x.iter_mut().zip(&mlp).for_each(|(a, b)| *a += b);
        }
        let mut last = Vec::with_capacity(spans.len() * dim);
        for span in spans {
            let row = span.last_row();
            last.extend_from_slice(&x[row * dim..(row + 1) * dim]);
        }
        rms_norm_rows(&mut last, dim, &self.final_norm.h, eps);
        let logits = self.output.forward_f32(&last, spans.len())?;
        let vocab = logits.len() / spans.len();
        Ok(Logits::new(logits, vocab))
    }
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
        let m = rms_denominator(r, eps);
        for (v, &g) in r.iter_mut().zip(w) {
            *v = *v / m * g;
        }
    });
}

/// [`rms_norm_rows`] of one row `src` written to `dst`, the same operations in the same order
/// (so the same bits): fused into the next matmul's quantization, the normed row never goes to
/// memory.
fn rms_norm_to(src: &[f32], dst: &mut [f32], w: &[f32], eps: f32) {
    let m = rms_denominator(src, eps);
    for ((d, &v), &g) in dst.iter_mut().zip(src).zip(w) {
        *d = v / m * g;
    }
}

/// Row `i` of `x` (rows of `dim`) RMS-normed with weights `w`, for a matmul's fused quantization.
fn normed_rows<'a>(
    x: &'a [f32],
    dim: usize,
    w: &'a [f32],
    eps: f32,
) -> impl Fn(usize, &mut [f32]) + Sync + 'a {
    move |i, dst| rms_norm_to(&x[i * dim..(i + 1) * dim], dst, w, eps)
}

/// `sqrt(mean(x²) + eps)` of a row, the sum over 8 strided partial sums then the tail.
fn rms_denominator(r: &[f32], eps: f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = r.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l] * c[l];
        }
    }
    let sum2 = acc.iter().sum::<f32>() + tail;
    (sum2 / r.len() as f32 + eps).sqrt()
}

/// candle's `gelu` (tanh approximation) on one value.
fn gelu_tanh(v: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    0.5 * v * (1.0 + (SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v)).tanh())
}

/// cos/sin of every row's position (`[rows][dims / 2]`), for RoPE in place on host rows.
pub(super) struct HostRope {
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
    /// Rotated pairs per head (`dims / 2`).
    pub(super) half: usize,
    /// Width of a head.
    head_dim: usize,
}

impl HostRope {
    /// The tables ggml computes (`ggml_rope_cache_init` and `rope_yarn`): an f32 running product
    /// `theta = p * base^(-2i / dims)`, each angle divided by its frequency factor and times
    /// `freq_scale`, with YaRN mixed with the unscaled angle by the ramp, cos and sin times
    /// `mscale`. With no factors, no scaling and `mscale` 1 every step is exact, so the tables are
    /// the unscaled ones bit for bit.
    pub(super) fn new(positions: &[u32], head_dim: usize, params: &RopeParams) -> Self {
        let half = params.dims / 2;
        let theta_scale = (params.base as f32).powf(-2.0 / params.dims as f32);
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let mut theta = p as f32;
            for i in 0..half {
                let ff = params.factors.as_ref().map_or(1.0, |f| f[i]);
                let extrap = theta / ff;
                let interp = params.freq_scale * extrap;
                let t = match &params.yarn {
                    Some(y) => {
                        let mix = y.mix(i);
                        interp * (1.0 - mix) + extrap * mix
                    }
                    None => interp,
                };
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
        #[cfg(target_arch = "x86_64")]
        let wide = !neox && rope_avx512();
        for head in x.chunks_exact_mut(self.head_dim) {
            if neox {
                let (a, b) = head[..2 * half].split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x1 * sin[i] + x2 * cos[i];
                }
            } else {
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: the CPU has AVX-512 F; `head` holds 2 * half values, the
                    // tables half each.
                    done = unsafe { rotate_pairs_avx512(&mut head[..2 * half], cos, sin) };
                }
                for i in done..half {
                    let (x1, x2) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = x1 * cos[i] - x2 * sin[i];
                    head[2 * i + 1] = x1 * sin[i] + x2 * cos[i];
                }
            }
        }
    }
}

/// Whether [`rotate_pairs_avx512`] can run (std caches the answer).
#[cfg(target_arch = "x86_64")]
fn rope_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// The interleaved rotation of [`HostRope::apply`] on 8 pairs at a time, the same operations
/// (two products, then their difference or sum; no fused multiply-add), so the same bits; returns
/// how many pairs it rotated. The scalar loop was 2 % of a prefill.
///
/// # Safety
/// The CPU must support AVX-512 F; `head.len() == 2 * cos.len() == 2 * sin.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rotate_pairs_avx512(head: &mut [f32], cos: &[f32], sin: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let pairs = cos.len() / 8 * 8;
    let dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    // Negates the second product in the even lanes: x1·cos − x2·sin there, x2·cos + x1·sin in
    // the odd ones.
    let neg_even = _mm512_set_epi32(
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
    );
    for i in (0..pairs).step_by(8) {
        // SAFETY: i + 8 <= pairs <= cos.len() = sin.len(), 2 * (i + 8) <= head.len().
        unsafe {
            let x = _mm512_loadu_ps(head.as_ptr().add(2 * i));
            let c = _mm512_permutexvar_ps(
                dup,
                _mm512_castps256_ps512(_mm256_loadu_ps(cos.as_ptr().add(i))),
            );
            let sn = _mm512_permutexvar_ps(
                dup,
                _mm512_castps256_ps512(_mm256_loadu_ps(sin.as_ptr().add(i))),
            );
            let swapped = _mm512_permute_ps::<0b1011_0001>(x);
            let a = _mm512_mul_ps(x, c);
            let b = _mm512_castsi512_ps(_mm512_xor_si512(
                _mm512_castps_si512(_mm512_mul_ps(swapped, sn)),
                neg_even,
            ));
            _mm512_storeu_ps(head.as_mut_ptr().add(2 * i), _mm512_add_ps(a, b));
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 512-bit interleaved rotation gives the scalar loop's bits (values of both signs,
    /// zeros, large angles' cos/sin, a tail of pairs past the last 8).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn rope_pairs_avx512_gives_the_scalar_bits() {
        if !rope_avx512() {
            eprintln!("NOT RUN: this CPU lacks AVX-512 F");
            return;
        }
        let half = 36;
        let head: Vec<f32> = (0..2 * half)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.731)
            .collect();
        let cos: Vec<f32> = (0..half).map(|i| (i as f32 * 1.7 + 0.3).cos()).collect();
        let sin: Vec<f32> = (0..half).map(|i| (i as f32 * 1.7 + 0.3).sin()).collect();
        let mut want = head.clone();
        for i in 0..half {
            let (x1, x2) = (want[2 * i], want[2 * i + 1]);
            want[2 * i] = x1 * cos[i] - x2 * sin[i];
            want[2 * i + 1] = x1 * sin[i] + x2 * cos[i];
        }
        let mut got = head.clone();
        // SAFETY: AVX-512 F checked above; lengths 2 * half, half, half.
        let done = unsafe { rotate_pairs_avx512(&mut got, &cos, &sin) };
        assert_eq!(done, 32);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got[..2 * done]), bits(&want[..2 * done]));
        assert_eq!(
            bits(&got[2 * done..]),
            bits(&head[2 * done..]),
            "the tail is the caller's"
        );
    }
}
