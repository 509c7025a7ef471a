//! Reading a model's weights: which tensors a family has, their shapes, fused matrices taken
//! apart, RoPE factors, and biases the forward pass would otherwise ignore.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::{Block, Norm, QkvBias, RopeFactors, RopeParams, Transformer, YarnRamp};
use crate::model::gguf::GgufFile;
use crate::model::hparams::{Arch, ArchSpec, HParams, RopeConfig, RopeScaling, Yarn};
use crate::model::kv_cache::KvDtype;
use crate::model::linear::{Linear, MultiLinear};
use crate::model::quantize::{read_converted, Quant};
use crate::model::ModelError;

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
        // [global layers, sliding-window layers] (Gemma 3 gives the latter their own base).
        let ropes = vec![
            rope_params(&hp.rope, hp.rope_base, false, factors.clone()),
            rope_params(&hp.rope, hp.rope_base_local, true, factors),
        ];
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
}

/// ggml's `rope_ext` parameters for layers of frequency base `base`, derived as llama.cpp derives
/// them (llama-context.cpp, in f32 as there): `freq_scale = 1 / factor`; with YaRN, the magnitude
/// `1 + 0.1 ln(factor)` (llama.cpp sets `attn_factor` to that over itself, ~1, and ggml multiplies
/// by it again) and the ramp of `ggml_rope_yarn_corr_dims`. Sliding-window layers (Gemma 3) are
/// never frequency-scaled: llama.cpp gives them `rope_freq_scale_train_swa`, 1 for every file.
fn rope_params(
    rope: &RopeConfig,
    base: f64,
    sliding: bool,
    factors: Option<Arc<[f32]>>,
) -> RopeParams {
    let scale_train = match rope.scaling {
        RopeScaling::Linear { factor } => 1.0 / factor,
        RopeScaling::Yarn(y) => 1.0 / y.factor,
        RopeScaling::None | RopeScaling::LongRope => 1.0,
    };
    let freq_scale = if sliding { 1.0 } else { scale_train };
    let (attn, yarn) = match rope.scaling {
        RopeScaling::Yarn(y) if y.ext_factor != 0.0 => {
            // llama.cpp divides its attn_factor by the magnitude ggml then multiplies by: ~1,
            // kept in the same f32 steps.
            let factor = 1.0 / scale_train;
            let attn = Yarn::magnitude(factor) * (1.0 / Yarn::magnitude(factor));
            let [low, high] = yarn_corr_dims(
                rope.dims,
                rope.original_context,
                base as f32,
                y.beta_fast,
                y.beta_slow,
            );
            let ramp = YarnRamp {
                ext_factor: y.ext_factor,
                low,
                high,
            };
            (attn, Some(ramp))
        }
        _ => (1.0, None),
    };
    let attn = attn * rope.attn_factor;
    let mscale = match yarn {
        Some(_) => attn * Yarn::magnitude(1.0 / freq_scale),
        None => attn,
    };
    RopeParams {
        base,
        dims: rope.dims,
        freq_scale,
        factors,
        mscale,
        yarn,
    }
}

/// The pair indices between which YaRN's ramp runs: where a frequency turns `beta_fast`, and
/// `beta_slow`, times over the original context (ggml's `ggml_rope_yarn_corr_dims`, in f32).
fn yarn_corr_dims(
    dims: usize,
    original_context: usize,
    base: f32,
    beta_fast: f32,
    beta_slow: f32,
) -> [f32; 2] {
    let corr = |rotations: f32| {
        dims as f32 * (original_context as f32 / (rotations * 2.0 * std::f32::consts::PI)).ln()
            / (2.0 * base.ln())
    };
    [
        corr(beta_fast).floor().max(0.0),
        corr(beta_slow).ceil().min(dims as f32 - 1.0),
    ]
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
                    RopeScaling::Yarn(_) => "yarn",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(scaling: RopeScaling) -> RopeConfig {
        RopeConfig {
            dims: 16,
            scaling,
            attn_factor: 1.0,
            original_context: 64,
        }
    }

    #[test]
    fn linear_scaling_skips_sliding_window_layers_as_llama_cpp() {
        // Gemma 3 4B+: `linear` factor 8 on global layers only (llama.cpp's swa freq scale is 1).
        let c = config(RopeScaling::Linear { factor: 8.0 });
        assert_eq!(rope_params(&c, 1e6, false, None).freq_scale, 0.125);
        assert_eq!(rope_params(&c, 1e4, true, None).freq_scale, 1.0);
    }

    #[test]
    fn yarn_parameters_are_llama_cpps() {
        let c = config(RopeScaling::Yarn(Yarn {
            factor: 4.0,
            ext_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
        }));
        let p = rope_params(&c, 1_000_000.0, false, None);
        assert_eq!(p.freq_scale, 0.25);
        // 1 + 0.1 ln 4 on cos and sin.
        assert!((p.mscale - 1.138_629_4).abs() < 1e-6, "{}", p.mscale);
        // 16 dims, original context 64, base 1e6: beta_fast 32 turns below pair 0, beta_slow 1
        // at pair 1.34 -> ramp over pairs [0, 2].
        let y = p.yarn.unwrap();
        assert_eq!((y.low, y.high), (0.0, 2.0));
        assert_eq!(
            (y.mix(0), y.mix(1), y.mix(2), y.mix(7)),
            (1.0, 0.5, 0.0, 0.0)
        );
        // No YaRN: no ramp, magnitude as the file's attn_factor.
        let plain = rope_params(&config(RopeScaling::None), 1e6, false, None);
        assert_eq!(
            (plain.yarn, plain.mscale, plain.freq_scale),
            (None, 1.0, 1.0)
        );
    }
}
