//! Architecture hyper-parameters read from GGUF metadata, checked for sane bounds so that a
//! corrupt header cannot ask for absurd buffers.

use super::gguf::Meta;
use super::ModelError;

/// Model families qnode runs. What each one changes in the llama block is data: [`Arch::spec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama and its descendants (SmolLM2): RMSNorm, SwiGLU, interleaved RoPE.
    Llama,
    /// Gemma 3: extra post-norms, q/k norms, GELU-tanh MLP, NeoX RoPE, sliding-window layers.
    Gemma3,
    /// Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen: llama with biases on Q, K, V and NeoX RoPE.
    Qwen2,
    /// Qwen3: llama with per-head RMSNorm on Q and K before NeoX RoPE, no biases.
    Qwen3,
    /// Phi-3 / Phi-3.5 / Phi-4-mini: llama with NeoX RoPE, Q/K/V fused in one matrix
    /// (`attn_qkv`), gate and up fused in `ffn_up`, and su/longrope factors.
    Phi3,
}

/// How RoPE pairs the values of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i + 1)` (llama.cpp's `LLAMA_ROPE_TYPE_NORM`).
    Interleaved,
    /// Pairs `(i, i + head_dim / 2)` (llama.cpp's `LLAMA_ROPE_TYPE_NEOX`).
    Neox,
}

/// The gate activation of the gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: `silu(gate) * up`.
    Silu,
    /// GeGLU with the tanh approximation of GELU.
    GeluTanh,
}

/// What a family changes in the llama block. The forward pass reads only this, never the family,
/// so a family that differs in these ways alone is one more table entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArchSpec {
    /// RoPE pairing.
    pub rope: RopeStyle,
    /// MLP gate activation.
    pub activation: Activation,
    /// Q, K and V carry biases (`blk.N.attn_{q,k,v}.bias`, required).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on Q and K before RoPE (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// RMSNorm on the attention and MLP outputs before the residual add.
    pub post_norms: bool,
    /// Embeddings are multiplied by `sqrt(hidden)`.
    pub scale_embeddings: bool,
    /// Gate and up are one matrix, `ffn_up` `[2 * ffn, hidden]`, gate first (Phi-3); otherwise
    /// `ffn_gate` and `ffn_up`.
    pub fused_gate_up: bool,
    /// Values of `{arch}.rope.scaling.type` this family runs, besides `none` and `linear`.
    pub extra_rope_scaling: &'static [&'static str],
    /// Reads Llama 3.1's per-frequency RoPE factors (`rope_freqs.weight`), as llama.cpp does for
    /// this family.
    pub rope_freqs: bool,
    /// RoPE base when the file has none.
    pub default_rope_base: f64,
    /// Every `n`-th layer is global and the others slide, when the file says nothing; `None`: no
    /// sliding-window layers.
    pub default_sliding_pattern: Option<usize>,
}

const LLAMA: ArchSpec = ArchSpec {
    rope: RopeStyle::Interleaved,
    activation: Activation::Silu,
    qkv_bias: false,
    qk_norm: false,
    post_norms: false,
    scale_embeddings: false,
    fused_gate_up: false,
    extra_rope_scaling: &[],
    rope_freqs: false,
    default_rope_base: 10_000.0,
    default_sliding_pattern: None,
};

impl Arch {
    /// Every family, in the order errors list them.
    pub const ALL: [Arch; 5] = [
        Arch::Llama,
        Arch::Gemma3,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Phi3,
    ];

    /// Name as written in `general.architecture`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Gemma3 => "gemma3",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Phi3 => "phi3",
        }
    }

    /// The family named `name` in `general.architecture`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }

    /// Names of every family, comma-separated, for errors.
    pub fn supported() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }

    /// What this family changes in the llama block.
    pub fn spec(self) -> ArchSpec {
        match self {
            // llama.cpp reads `rope_freqs.weight` (Llama 3.1/3.2 frequency factors) and, with
            // `rope.scaling.type = longrope`, the long/short factors, for its llama architecture.
            Self::Llama => ArchSpec {
                extra_rope_scaling: &["longrope", "yarn"],
                rope_freqs: true,
                ..LLAMA
            },
            Self::Gemma3 => ArchSpec {
                rope: RopeStyle::Neox,
                activation: Activation::GeluTanh,
                qk_norm: true,
                post_norms: true,
                scale_embeddings: true,
                default_rope_base: 1_000_000.0,
                default_sliding_pattern: Some(6),
                ..LLAMA
            },
            Self::Qwen2 => ArchSpec {
                rope: RopeStyle::Neox,
                qkv_bias: true,
                extra_rope_scaling: &["yarn"],
                ..LLAMA
            },
            Self::Qwen3 => ArchSpec {
                rope: RopeStyle::Neox,
                qk_norm: true,
                extra_rope_scaling: &["yarn"],
                ..LLAMA
            },
            Self::Phi3 => ArchSpec {
                rope: RopeStyle::Neox,
                fused_gate_up: true,
                extra_rope_scaling: &["longrope", "yarn"],
                ..LLAMA
            },
        }
    }
}

/// How RoPE angles are scaled, from `{arch}.rope.scaling.*` (llama.cpp's rules).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Angles as computed (`none`, or `linear` with factor 1).
    None,
    /// Every angle times `1 / factor` (`linear`; also what llama.cpp assumes when the type is
    /// absent and `rope.scaling.factor` is set).
    Linear {
        /// `rope.scaling.factor`.
        factor: f32,
    },
    /// Phi-3's su/longrope: per-frequency factors, `rope_factors_long.weight` when the context a
    /// sequence may reach is longer than [`RopeConfig::original_context`] (llama.cpp: the context
    /// it runs with), `rope_factors_short.weight` otherwise; cos and sin times
    /// `rope.scaling.attn_factor`.
    LongRope,
    /// YaRN (Qwen2.5 / Qwen3 long-context files): angles of the low frequencies interpolated by
    /// `1 / factor`, of the high ones kept, a linear ramp between (over the dimensions set by
    /// [`Yarn::beta_fast`], [`Yarn::beta_slow`] and [`RopeConfig::original_context`]), and cos
    /// and sin scaled by `1 + 0.1 ln(factor)`.
    Yarn(Yarn),
}

/// YaRN's parameters, as llama.cpp runs the families qnode has: it reads only the factor and
/// the original context from the file, and fixes the rest (`llama_hparams` defaults; its
/// `yarn_*` keys are read for other architectures only). A file whose `yarn_*` keys ask for
/// other values is refused (see `rope_config`), so these are always the values llama.cpp uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    /// `rope.scaling.factor`: context extension.
    pub factor: f32,
    /// Weight of the extrapolation mix (1: YaRN's ramp in full).
    pub ext_factor: f32,
    /// Rotations over the original context above which a frequency is kept as is.
    pub beta_fast: f32,
    /// Rotations below which a frequency is fully interpolated.
    pub beta_slow: f32,
}

impl Yarn {
    /// llama.cpp's fixed values for the families qnode runs.
    const EXT_FACTOR: f32 = 1.0;
    const BETA_FAST: f32 = 32.0;
    const BETA_SLOW: f32 = 1.0;

    /// YaRN's magnitude correction for context extension `factor`: `1 + 0.1 ln(factor)`, 1 for
    /// a factor of at most 1 (in f32, as llama.cpp and ggml compute it).
    pub fn magnitude(factor: f32) -> f32 {
        if factor <= 1.0 {
            1.0
        } else {
            1.0 + 0.1 * factor.ln()
        }
    }
}

/// RoPE hyper-parameters beyond the base.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// Values of a head that are rotated (`rope.dimension_count`), the first ones; the rest pass
    /// through.
    pub dims: usize,
    /// Frequency scaling.
    pub scaling: RopeScaling,
    /// cos and sin are multiplied by this (`rope.scaling.attn_factor`, 1 when absent).
    pub attn_factor: f32,
    /// `rope.scaling.original_context_length` (the native context when absent): longer contexts
    /// take the long su/longrope factors; YaRN's ramp is placed by it.
    pub original_context: usize,
}

/// Everything the forward pass needs to know about the shapes of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct HParams {
    /// Model family.
    pub arch: Arch,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Residual stream width.
    pub hidden: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_head`).
    pub n_kv_head: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// MLP inner width.
    pub ffn: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// Context length the model was trained for.
    pub context_length: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// RoPE base of global layers.
    pub rope_base: f64,
    /// RoPE base of sliding-window layers (Gemma 3).
    pub rope_base_local: f64,
    /// Sliding window width of local layers, `None` when every layer is global.
    pub sliding_window: Option<usize>,
    /// Every `sliding_pattern`-th layer is global; the others use the sliding window.
    pub sliding_pattern: usize,
    /// RoPE dimensions, scaling and magnitude.
    pub rope: RopeConfig,
}

const MAX_LAYERS: usize = 512;
const MAX_WIDTH: usize = 1 << 17;
const MAX_VOCAB: usize = 1 << 21;

impl HParams {
    /// Read and check the hyper-parameters of `general.architecture`.
    pub fn from_meta(meta: Meta<'_>) -> Result<Self, ModelError> {
        let arch_name = meta.str("general.architecture")?;
        let arch =
            Arch::from_name(arch_name).ok_or_else(|| ModelError::UnsupportedArchitecture {
                name: arch_name.to_string(),
                supported: Arch::supported(),
            })?;
        let spec = arch.spec();
        let key = |k: &str| format!("{arch_name}.{k}");
        let n_layer = bounded(meta, &key("block_count"), MAX_LAYERS)?;
        let hidden = bounded(meta, &key("embedding_length"), MAX_WIDTH)?;
        let n_head = bounded(meta, &key("attention.head_count"), 1024)?;
        let n_kv_head = match meta.opt_usize(&key("attention.head_count_kv"))? {
            Some(_) => bounded(meta, &key("attention.head_count_kv"), n_head)?,
            None => n_head,
        };
        if n_head % n_kv_head != 0 {
            return Err(bad(
                &key("attention.head_count_kv"),
                format!("{n_kv_head} does not divide head_count {n_head}"),
            ));
        }
        let head_dim = match meta.opt_usize(&key("attention.key_length"))? {
            Some(_) => bounded(meta, &key("attention.key_length"), 4096)?,
            None => hidden / n_head,
        };
        if head_dim % 2 != 0 {
            return Err(bad(&key("attention.key_length"), "head size must be even"));
        }
        let ffn = bounded(meta, &key("feed_forward_length"), MAX_WIDTH * 8)?;
        let vocab = match meta.opt_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => match meta.get("tokenizer.ggml.tokens") {
                Some(candle_core::quantized::gguf_file::Value::Array(a)) => a.len(),
                _ => 0,
            },
        };
        if vocab == 0 || vocab > MAX_VOCAB {
            return Err(bad(&key("vocab_size"), format!("{vocab} out of range")));
        }
        let context_length = meta.opt_usize(&key("context_length"))?.unwrap_or(2048);
        let rms_eps = meta
            .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-6);
        let rope = rope_config(meta, arch, head_dim, context_length)?;
        let (window, pattern) = match spec.default_sliding_pattern {
            Some(pattern) => (meta.opt_usize(&key("attention.sliding_window"))?, pattern),
            None => (None, 1),
        };
        Ok(Self {
            arch,
            n_layer,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            ffn,
            vocab,
            context_length,
            rms_eps,
            rope_base: meta
                .opt_f64(&key("rope.freq_base"))?
                .unwrap_or(spec.default_rope_base),
            rope_base_local: meta
                .opt_f64(&key("rope.local_freq_base"))?
                .unwrap_or(10_000.0),
            sliding_window: window,
            sliding_pattern: meta
                .opt_usize(&key("attention.sliding_window_pattern"))?
                .unwrap_or(pattern)
                .max(1),
            rope,
        })
    }

    /// The sliding window of layer `i`, `None` for a global layer.
    pub fn window_of_layer(&self, i: usize) -> Option<usize> {
        let global = (i + 1).is_multiple_of(self.sliding_pattern);
        if global {
            None
        } else {
            self.sliding_window
        }
    }
}

/// `{arch}.rope.*` as llama.cpp reads them (llama-model.cpp `load_hparams`): the scaling type
/// defaults to `linear`, whose factor defaults to 1; `none` ignores any factor. Types this family
/// does not run (`longrope` outside phi3/llama, `yarn` for gemma3, anything llama.cpp does not
/// know) are refused naming the key, the value and what is supported.
fn rope_config(
    meta: Meta<'_>,
    arch: Arch,
    head_dim: usize,
    context_length: usize,
) -> Result<RopeConfig, ModelError> {
    let name = arch.as_str();
    let key = |k: &str| format!("{name}.{k}");
    let spec = arch.spec();
    let dims = match meta.opt_usize(&key("rope.dimension_count"))? {
        None => head_dim,
        Some(rot) if rot == head_dim => rot,
        // llama.cpp refuses partial rotary for its llama architecture ("invalid n_rot"); Phi-4-mini
        // (phi3) rotates 3/4 of each head.
        Some(rot) if arch == Arch::Phi3 && rot > 0 && rot < head_dim && rot % 2 == 0 => rot,
        Some(rot) => {
            let supported = if arch == Arch::Phi3 {
                format!("an even count in 2..={head_dim}")
            } else {
                format!("the whole head, {head_dim}")
            };
            return Err(bad(
                &key("rope.dimension_count"),
                format!(
                    "RoPE over {rot} of a head's {head_dim} values is not supported for {name} \
                     (supported: {supported})"
                ),
            ));
        }
    };
    let supported = ["none", "linear"]
        .iter()
        .chain(spec.extra_rope_scaling)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    let supported = if spec.rope_freqs {
        format!("{supported}; Llama 3 frequency factors in rope_freqs.weight")
    } else {
        supported
    };
    let kind = meta.opt_str(&key("rope.scaling.type"))?.unwrap_or("linear");
    let factor = match meta.opt_f64(&key("rope.scaling.factor"))? {
        Some(f) => Some(f),
        None => meta.opt_f64(&key("rope.scale_linear"))?,
    };
    let scaling = match kind {
        "none" => RopeScaling::None,
        "linear" => match factor {
            None => RopeScaling::None,
            Some(f) if f == 0.0 || f == 1.0 => RopeScaling::None,
            Some(f) if f.is_finite() && f > 0.0 => RopeScaling::Linear { factor: f as f32 },
            Some(f) => {
                return Err(bad(
                    &key("rope.scaling.factor"),
                    format!("{f} is not a positive scaling factor"),
                ))
            }
        },
        "longrope" if spec.extra_rope_scaling.contains(&"longrope") => RopeScaling::LongRope,
        "yarn" if spec.extra_rope_scaling.contains(&"yarn") => match factor {
            Some(f) if f.is_finite() && f > 0.0 => RopeScaling::Yarn(yarn(meta, name, f as f32)?),
            Some(f) => {
                return Err(bad(
                    &key("rope.scaling.factor"),
                    format!("{f} is not a positive scaling factor"),
                ))
            }
            None => {
                return Err(bad(
                    &key("rope.scaling.factor"),
                    "missing: rope.scaling.type `yarn` needs a factor",
                ))
            }
        },
        other => {
            return Err(bad(
                &key("rope.scaling.type"),
                format!("`{other}` is not supported for {name} (supported: {supported})"),
            ))
        }
    };
    let attn_factor = meta
        .opt_f64(&key("rope.scaling.attn_factor"))?
        .unwrap_or(1.0);
    if !(attn_factor.is_finite() && attn_factor > 0.0) {
        return Err(bad(
            &key("rope.scaling.attn_factor"),
            format!("{attn_factor} is not a positive factor"),
        ));
    }
    Ok(RopeConfig {
        dims,
        scaling,
        attn_factor: attn_factor as f32,
        original_context: meta
            .opt_usize(&key("rope.scaling.original_context_length"))?
            .unwrap_or(context_length),
    })
}

/// YaRN with `factor` for family `name`. llama.cpp does not read the `yarn_*` keys for these
/// families (only for grok, mistral3 and deepseek2): it runs with `ext_factor` 1, `beta_fast` 32,
/// `beta_slow` 1, no log multiplier, and the magnitude `1 + 0.1 ln(factor)`. A key present with that
/// value is fine; another value is refused naming the key, rather than run the file other than
/// its metadata says (or other than llama.cpp does).
fn yarn(meta: Meta<'_>, name: &str, factor: f32) -> Result<Yarn, ModelError> {
    let mscale = f64::from(Yarn::magnitude(factor));
    let fixed = [
        ("yarn_ext_factor", f64::from(Yarn::EXT_FACTOR)),
        ("yarn_beta_fast", f64::from(Yarn::BETA_FAST)),
        ("yarn_beta_slow", f64::from(Yarn::BETA_SLOW)),
        ("yarn_log_multiplier", 0.0),
        ("yarn_attn_factor", mscale),
    ];
    for (k, want) in fixed {
        let full = format!("{name}.rope.scaling.{k}");
        if let Some(v) = meta.opt_f64(&full)? {
            if (v - want).abs() > 1e-4 * want.abs().max(1.0) {
                return Err(bad(
                    &full,
                    format!(
                        "{v} is not supported for {name} (supported: {want}, the value llama.cpp \
                         runs {name} with; it does not read this key for {name})"
                    ),
                ));
            }
        }
    }
    Ok(Yarn {
        factor,
        ext_factor: Yarn::EXT_FACTOR,
        beta_fast: Yarn::BETA_FAST,
        beta_slow: Yarn::BETA_SLOW,
    })
}

fn bad(key: &str, reason: impl Into<String>) -> ModelError {
    ModelError::BadMetadata {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn bounded(meta: Meta<'_>, key: &str, max: usize) -> Result<usize, ModelError> {
    let v = meta.usize(key)?;
    if v == 0 || v > max {
        return Err(bad(key, format!("must be in 1..={max}. Given: {v}")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};

    fn content(arch: &str, extra: &[(&str, Value)]) -> Content {
        let mut metadata: std::collections::HashMap<String, Value> = [
            ("block_count", Value::U32(2)),
            ("embedding_length", Value::U32(64)),
            ("feed_forward_length", Value::U32(128)),
            ("attention.head_count", Value::U32(4)),
            ("vocab_size", Value::U32(300)),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (format!("{arch}.{k}"), v.clone()))
        .collect();
        metadata.insert("general.architecture".into(), Value::String(arch.into()));
        Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        }
    }

    fn read(c: &Content) -> Result<HParams, ModelError> {
        HParams::from_meta(Meta(c))
    }

    #[test]
    fn every_family_reads_with_its_spec() {
        for arch in Arch::ALL {
            let hp = read(&content(arch.as_str(), &[])).unwrap();
            assert_eq!(hp.arch, arch);
            assert_eq!(hp.rope_base, arch.spec().default_rope_base);
        }
        assert!(Arch::Qwen2.spec().qkv_bias && !Arch::Qwen3.spec().qkv_bias);
        assert!(Arch::Qwen3.spec().qk_norm && !Arch::Qwen2.spec().qk_norm);
    }

    #[test]
    fn unknown_architecture_lists_the_supported_ones() {
        let err = read(&content("mamba", &[])).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, ModelError::UnsupportedArchitecture { name, .. } if name == "mamba"),
            "{msg}"
        );
        assert!(msg.contains("llama, gemma3, qwen2, qwen3, phi3"), "{msg}");
    }

    #[test]
    fn unknown_rope_scaling_names_the_key_and_what_is_supported() {
        for kind in ["llama3", "longrope", "dynamic"] {
            let c = content(
                "qwen2",
                &[("rope.scaling.type", Value::String(kind.into()))],
            );
            match read(&c) {
                Err(ModelError::BadMetadata { key, reason }) => {
                    assert_eq!(key, "qwen2.rope.scaling.type");
                    assert!(
                        reason.contains(kind) && reason.contains("supported: none, linear, yarn)"),
                        "{reason}"
                    );
                }
                other => panic!("{kind}: expected BadMetadata, got {other:?}"),
            }
        }
        let c = content(
            "llama",
            &[("rope.scaling.type", Value::String("dynamic".into()))],
        );
        let msg = read(&c).unwrap_err().to_string();
        assert!(
            msg.contains("llama.rope.scaling.type")
                && msg.contains("`dynamic`")
                && msg.contains(
                    "supported: none, linear, longrope, yarn; Llama 3 frequency factors in \
                     rope_freqs.weight"
                ),
            "{msg}"
        );
        let c = content(
            "gemma3",
            &[("rope.scaling.type", Value::String("yarn".into()))],
        );
        let msg = read(&c).unwrap_err().to_string();
        assert!(
            msg.contains("gemma3.rope.scaling.type")
                && msg.contains("`yarn`")
                && msg.contains("(supported: none, linear)"),
            "{msg}"
        );
        let none = content(
            "llama",
            &[("rope.scaling.type", Value::String("none".into()))],
        );
        assert_eq!(read(&none).unwrap().rope.scaling, RopeScaling::None);
    }

    #[test]
    fn yarn_reads_as_llama_cpp_does() {
        let f = |v: f32| Value::F32(v);
        let yarn = |extra: &[(&str, Value)]| {
            let mut kv = vec![
                ("rope.scaling.type", Value::String("yarn".into())),
                ("rope.scaling.factor", f(4.0)),
                ("rope.scaling.original_context_length", Value::U32(32768)),
            ];
            kv.extend_from_slice(extra);
            read(&content("qwen2", &kv))
        };
        let r = yarn(&[]).unwrap().rope;
        assert_eq!(
            r.scaling,
            RopeScaling::Yarn(Yarn {
                factor: 4.0,
                ext_factor: 1.0,
                beta_fast: 32.0,
                beta_slow: 1.0
            })
        );
        assert_eq!(r.original_context, 32768);
        // Keys llama.cpp ignores for qwen2 are fine at the values it runs with...
        assert!(yarn(&[
            ("rope.scaling.yarn_beta_fast", f(32.0)),
            ("rope.scaling.yarn_beta_slow", f(1.0)),
            ("rope.scaling.yarn_ext_factor", f(1.0)),
            ("rope.scaling.yarn_attn_factor", f(1.138_629_4)),
        ])
        .is_ok());
        // ...and refused, naming the key, at any other.
        for (k, v) in [
            ("yarn_beta_fast", 16.0),
            ("yarn_ext_factor", 0.5),
            ("yarn_log_multiplier", 0.1),
            ("yarn_attn_factor", 1.0),
        ] {
            let key = format!("rope.scaling.{k}");
            match yarn(&[(key.as_str(), f(v))]) {
                Err(ModelError::BadMetadata { key, reason }) => {
                    assert_eq!(key, format!("qwen2.rope.scaling.{k}"));
                    assert!(reason.contains("llama.cpp"), "{reason}");
                }
                other => panic!("{k} = {v}: expected BadMetadata, got {other:?}"),
            }
        }
        // No factor, or a bad one: refused naming the factor's key.
        for kv in [
            vec![("rope.scaling.type", Value::String("yarn".into()))],
            vec![
                ("rope.scaling.type", Value::String("yarn".into())),
                ("rope.scaling.factor", f(-2.0)),
            ],
        ] {
            match read(&content("qwen3", &kv)) {
                Err(ModelError::BadMetadata { key, .. }) => {
                    assert_eq!(key, "qwen3.rope.scaling.factor")
                }
                other => panic!("expected BadMetadata, got {other:?}"),
            }
        }
    }

    #[test]
    fn rope_scaling_reads_as_llama_cpp_does() {
        let f = |v: f32| Value::F32(v);
        let s = |v: &str| Value::String(v.into());
        let scaling = |extra: &[(&str, Value)]| read(&content("llama", extra)).unwrap().rope;
        // No type: llama.cpp assumes linear, with factor 1 unless one is given.
        assert_eq!(scaling(&[]).scaling, RopeScaling::None);
        assert_eq!(
            scaling(&[("rope.scaling.factor", f(4.0))]).scaling,
            RopeScaling::Linear { factor: 4.0 }
        );
        assert_eq!(
            scaling(&[
                ("rope.scaling.type", s("linear")),
                ("rope.scaling.factor", f(2.0))
            ])
            .scaling,
            RopeScaling::Linear { factor: 2.0 }
        );
        // `none` ignores a factor.
        assert_eq!(
            scaling(&[
                ("rope.scaling.type", s("none")),
                ("rope.scaling.factor", f(2.0))
            ])
            .scaling,
            RopeScaling::None
        );
        let r = read(&content(
            "phi3",
            &[
                ("rope.scaling.type", s("longrope")),
                ("rope.scaling.original_context_length", Value::U32(4096)),
                ("rope.scaling.attn_factor", f(1.5)),
                ("context_length", Value::U32(131072)),
            ],
        ))
        .unwrap()
        .rope;
        assert_eq!(r.scaling, RopeScaling::LongRope);
        assert_eq!((r.original_context, r.attn_factor), (4096, 1.5));
        let bad = read(&content("llama", &[("rope.scaling.factor", f(-1.0))]));
        assert!(
            matches!(&bad, Err(ModelError::BadMetadata { key, .. }) if key == "llama.rope.scaling.factor"),
            "{bad:?}"
        );
    }

    #[test]
    fn partial_rotary_is_refused() {
        let c = content("llama", &[("rope.dimension_count", Value::U32(8))]);
        match read(&c) {
            Err(ModelError::BadMetadata { key, reason }) => {
                assert_eq!(key, "llama.rope.dimension_count");
                assert!(reason.contains("supported: the whole head, 16"), "{reason}");
            }
            other => panic!("expected BadMetadata, got {other:?}"),
        }
        let whole = content("llama", &[("rope.dimension_count", Value::U32(16))]);
        assert!(read(&whole).is_ok());
        // Phi-4-mini (phi3) rotates part of each head.
        let phi = content("phi3", &[("rope.dimension_count", Value::U32(12))]);
        assert_eq!(read(&phi).unwrap().rope.dims, 12);
        let odd = content("phi3", &[("rope.dimension_count", Value::U32(7))]);
        assert!(read(&odd).is_err());
    }
}
