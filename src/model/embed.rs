//! A sentence encoder for the semantic cache tier: a BERT model in safetensors (all-MiniLM-L6-v2
//! by default, `models/minilm-l6`), run on candle, giving what sentence-transformers gives for it —
//! the mean of the last hidden states over the tokens, L2-normalised — so a dot product of two
//! embeddings is their cosine similarity.
//!
//! candle-transformers' `BertModel` does the forward (the crate is already a dependency of the
//! node; a BERT of our own would be ~200 lines more to check). The tokenizer is the model's own
//! `tokenizer.json` read by the `tokenizers` crate, padding off and truncation at
//! [`MAX_TOKENS`] (the model's `max_seq_length`). Checked against a numpy reference of the same
//! model (`scripts/minilm_reference.py`, `tests/semantic_embed.rs`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams};

use super::ModelError;

/// Tokens embedded per text; the rest is cut (sentence-transformers' `max_seq_length` for
/// all-MiniLM-L6-v2). Questions worth caching are far shorter.
pub const MAX_TOKENS: usize = 256;

/// The files an encoder directory holds (as `models/fetch.py minilm-l6` writes them).
pub const FILES: [&str; 3] = ["model.safetensors", "tokenizer.json", "config.json"];

/// A loaded sentence encoder. `embed` is CPU-bound (milliseconds): call it off the async runtime.
pub struct SentenceEncoder {
    model: BertModel,
    tokenizer: Tokenizer,
    dim: usize,
}

impl SentenceEncoder {
    /// Loads `dir/{model.safetensors, tokenizer.json, config.json}` onto the CPU.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = |name: &str| dir.join(name);
        let read =
            |p: PathBuf| std::fs::read(&p).map_err(|source| ModelError::Io { path: p, source });
        let config: Config = serde_json::from_slice(&read(path("config.json"))?).map_err(|e| {
            ModelError::BadMetadata {
                key: format!("{}", path("config.json").display()),
                reason: e.to_string(),
            }
        })?;
        let mut tokenizer = Tokenizer::from_file(path("tokenizer.json"))
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", dir.display())))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS.min(config.max_position_embeddings),
                ..TruncationParams::default()
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let weights = read(path("model.safetensors"))?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)?;
        let model = BertModel::load(vb, &config)?;
        Ok(Self {
            model,
            tokenizer,
            dim: config.hidden_size,
        })
    }

    /// Length of every embedding (384 for MiniLM-L6).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The token ids `text` is embedded from ([CLS] … [SEP], truncated).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The unit-length embedding of `text`.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, ModelError> {
        let ids = self.token_ids(text)?;
        let n = ids.len();
        let input = Tensor::from_vec(ids, (1, n), &Device::Cpu)?;
        let types = input.zeros_like()?;
        let hidden = self.model.forward(&input, &types, None)?; // (1, n, dim)
        let mean = (hidden.sum(1)? / n as f64)?.squeeze(0)?;
        let mut v: Vec<f32> = mean.to_vec1()?;
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= norm);
        Ok(v)
    }
}

/// Dot product; the cosine similarity of two unit vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
