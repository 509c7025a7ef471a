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
    default_rope_base: 10_000.0,
    default_sliding_pattern: None,
};

impl Arch {
    /// Every family, in the order errors list them.
    pub const ALL: [Arch; 4] = [Arch::Llama, Arch::Gemma3, Arch::Qwen2, Arch::Qwen3];

    /// Name as written in `general.architecture`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Gemma3 => "gemma3",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
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
            Self::Llama => LLAMA,
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
                ..LLAMA
            },
            Self::Qwen3 => ArchSpec {
                rope: RopeStyle::Neox,
                qk_norm: true,
                ..LLAMA
            },
        }
    }
}

/// `{arch}.rope.scaling.type` values qnode computes (the others change RoPE frequencies in ways
/// the forward pass does not implement, so such files are refused rather than run wrong).
pub const SUPPORTED_ROPE_SCALING: &str = "none";

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
        if let Some(rot) = meta.opt_usize(&key("rope.dimension_count"))? {
            if rot != head_dim {
                return Err(bad(
                    &key("rope.dimension_count"),
                    format!(
                        "RoPE over {rot} of a head's {head_dim} values is not supported (supported: \
                         the whole head, {head_dim})"
                    ),
                ));
            }
        }
        if let Some(kind) = meta.opt_str(&key("rope.scaling.type"))? {
            if kind != "none" {
                return Err(bad(
                    &key("rope.scaling.type"),
                    format!("`{kind}` is not supported (supported: {SUPPORTED_ROPE_SCALING})"),
                ));
            }
        }
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
        assert!(msg.contains("llama, gemma3, qwen2, qwen3"), "{msg}");
    }

    #[test]
    fn unknown_rope_scaling_names_the_key_and_what_is_supported() {
        for kind in ["yarn", "linear", "llama3", "longrope"] {
            let c = content(
                "qwen2",
                &[("rope.scaling.type", Value::String(kind.into()))],
            );
            match read(&c) {
                Err(ModelError::BadMetadata { key, reason }) => {
                    assert_eq!(key, "qwen2.rope.scaling.type");
                    assert!(reason.contains(kind) && reason.contains("supported: none"));
                }
                other => panic!("{kind}: expected BadMetadata, got {other:?}"),
            }
        }
        let none = content(
            "llama",
            &[("rope.scaling.type", Value::String("none".into()))],
        );
        assert!(read(&none).is_ok());
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
    }
}
