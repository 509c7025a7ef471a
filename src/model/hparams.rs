//! Architecture hyper-parameters read from GGUF metadata, checked for sane bounds so that a
//! corrupt header cannot ask for absurd buffers.

use super::gguf::Meta;
use super::ModelError;

/// Model families qnode runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama and its descendants (SmolLM2): RMSNorm, SwiGLU, interleaved RoPE.
    Llama,
    /// Gemma 3: extra post-norms, q/k norms, GELU-tanh MLP, NeoX RoPE, sliding-window layers.
    Gemma3,
}

impl Arch {
    /// Name as written in `general.architecture`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Gemma3 => "gemma3",
        }
    }
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
}

const MAX_LAYERS: usize = 512;
const MAX_WIDTH: usize = 1 << 17;
const MAX_VOCAB: usize = 1 << 21;

impl HParams {
    /// Read and check the hyper-parameters of `general.architecture`.
    pub fn from_meta(meta: Meta<'_>) -> Result<Self, ModelError> {
        let arch_name = meta.str("general.architecture")?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "gemma3" => Arch::Gemma3,
            other => return Err(ModelError::UnsupportedArchitecture(other.to_string())),
        };
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
        let (rope_default, local_default, window, pattern) = match arch {
            Arch::Llama => (10_000.0, 10_000.0, None, 1),
            Arch::Gemma3 => (
                1_000_000.0,
                10_000.0,
                meta.opt_usize(&key("attention.sliding_window"))?,
                6,
            ),
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
                .unwrap_or(rope_default),
            rope_base_local: meta
                .opt_f64(&key("rope.local_freq_base"))?
                .unwrap_or(local_default),
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
