//! A sentence encoder for the semantic cache tier: a BERT model in safetensors (all-MiniLM-L6-v2
//! by default, `models/minilm-l6`), run on candle, giving what sentence-transformers gives for it —
//! the mean of the last hidden states over the tokens, L2-normalised — so a dot product of two
//! embeddings is their cosine similarity.
//!
//! The forward is our own (~150 lines): three of the six matrices of each layer (attention
//! output, FFN in and out) requantized to Q8_0 at load and run on the node's int8 kernels
//! ([`super::linear`]); Q/K/V, attention, GELU and the norms in f32. Q/K/V stay f32 because the
//! kernels also quantize activations, and the normalised inputs of Q/K/V carry outlier
//! dimensions: all six in Q8_0 gave cosine 0.998 with the f32 reference, these three 0.999+ (a
//! numpy simulation per matrix picked them). candle-transformers' f32 `BertModel` (tried first) took 19–35 ms per 9-token question on
//! this 2-core machine under load: its gemm repacks every weight matrix on every call, and the
//! f32 weights (42 MB) do not stay in cache; Q8_0 holds them in 11 MB. The tokenizer is the
//! model's own `tokenizer.json` read by the `tokenizers` crate, padding off and truncation at
//! [`MAX_TOKENS`] (the model's `max_seq_length`). Checked against a numpy f32 reference of the
//! same model (`scripts/minilm_reference.py`, `tests/semantic_embed.rs`: cosine >= 0.999).
//!
//! Other BERT encoders load the same way: the pooling is sentence-transformers'
//! `1_Pooling/config.json` when the directory has one (mean or CLS; mean without it), and
//! [`resolve`] turns `cache.semantic.encoder` — a directory, a manifest id (`minilm-l6`,
//! `m3e-small` for Chinese) or `hf:OWNER/REPO` — into a directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tokenizers::{Tokenizer, TruncationParams};

use super::linear::Linear;
use super::ModelError;

/// Tokens embedded per text; the rest is cut (sentence-transformers' `max_seq_length` for
/// all-MiniLM-L6-v2). Questions worth caching are far shorter.
pub const MAX_TOKENS: usize = 256;

/// The files an encoder directory holds (as `models/fetch.py minilm-l6` writes them).
pub const FILES: [&str; 3] = ["model.safetensors", "tokenizer.json", "config.json"];

/// What the encoder reads of `config.json` (a BERT config).
#[derive(serde::Deserialize)]
struct Config {
    /// `bert`: the only forward written here (RoBERTa / XLM-R offset their positions).
    #[serde(default = "bert")]
    model_type: String,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    layer_norm_eps: f64,
    #[serde(default = "gelu")]
    hidden_act: String,
}

fn gelu() -> String {
    "gelu".into()
}

fn bert() -> String {
    "bert".into()
}

/// How token states become one vector (sentence-transformers' Pooling module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over the tokens (all-MiniLM-L6-v2, m3e).
    Mean,
    /// The first token's state, `[CLS]` (bge).
    Cls,
}

/// What sentence-transformers' `1_Pooling/config.json` asks for.
#[derive(serde::Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
}

/// The pooling of the encoder in `dir`: its `1_Pooling/config.json`, or mean without one.
pub fn pooling_of(dir: &Path) -> Result<Pooling, ModelError> {
    let path = dir.join("1_Pooling").join("config.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Pooling::Mean),
        Err(source) => return Err(ModelError::Io { path, source }),
    };
    let bad = |reason: String| ModelError::BadMetadata {
        key: path.display().to_string(),
        reason,
    };
    let c: PoolingConfig = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    match (
        c.pooling_mode_cls_token,
        c.pooling_mode_mean_tokens,
        c.pooling_mode_max_tokens,
    ) {
        (true, false, false) => Ok(Pooling::Cls),
        (false, true, false) => Ok(Pooling::Mean),
        _ => Err(bad(
            "only one of CLS or mean pooling is supported (max pooling and combinations are not)"
                .into(),
        )),
    }
}

/// One encoder layer: Q/K/V in f32 (as `[in, 3 × out]`, row-major), the other three matrices
/// in Q8_0 on the node's int8 kernels, f32 biases and norms.
struct Layer {
    qkv: Tensor,
    qkv_bias: Vec<f32>,
    attn_out: Linear,
    attn_out_bias: Vec<f32>,
    ln1: (Vec<f32>, Vec<f32>),
    inter: Linear,
    inter_bias: Vec<f32>,
    out: Linear,
    out_bias: Vec<f32>,
    ln2: (Vec<f32>, Vec<f32>),
}

/// A loaded sentence encoder. `embed` is CPU-bound (milliseconds, on the current rayon pool):
/// call it off the async runtime.
pub struct SentenceEncoder {
    tokenizer: Tokenizer,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    ln: (Vec<f32>, Vec<f32>),
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    eps: f32,
    pooling: Pooling,
    reads_cjk: bool,
}

/// Vocabulary entries with a CJK ideograph an encoder needs to count as reading Chinese
/// ([`SentenceEncoder::reads_cjk`]). all-MiniLM-L6-v2 has 488 (BERT's uncased vocabulary keeps the
/// commonest characters, seen in little Chinese text: its Chinese similarities are noise — 73 %
/// of the labelled Chinese near-misses score over 0.82); m3e-small has 14,642.
const MIN_CJK_TOKENS: usize = 2000;

fn is_cjk_ideograph(c: char) -> bool {
    matches!(c as u32, 0x3400..=0x4dbf | 0x4e00..=0x9fff | 0xf900..=0xfaff | 0x20000..=0x2fa1f)
}

impl SentenceEncoder {
    /// Loads `dir/{model.safetensors, tokenizer.json, config.json}`, its matrices requantized to
    /// Q8_0 (the node's int8 kernels; the embeddings, biases and norms stay f32).
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
        if config.model_type != "bert" {
            return Err(ModelError::BadMetadata {
                key: format!("{}: model_type", path("config.json").display()),
                reason: format!(
                    "only BERT encoders are supported, got {:?} (RoBERTa / XLM-R models such as \
                     multilingual-e5 number positions differently)",
                    config.model_type
                ),
            });
        }
        if config.hidden_act != "gelu"
            || config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(ModelError::BadMetadata {
                key: "hidden_act / num_attention_heads".into(),
                reason: format!(
                    "only BERT with exact GELU and heads dividing the width is supported (got {}, \
                     {} heads of {})",
                    config.hidden_act, config.num_attention_heads, config.hidden_size
                ),
            });
        }
        let mut tokenizer = Tokenizer::from_file(path("tokenizer.json"))
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", dir.display())))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS.min(config.max_position_embeddings),
                ..TruncationParams::default()
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let weights = Weights(candle_core::safetensors::load_buffer(
            &read(path("model.safetensors"))?,
            &Device::Cpu,
        )?);
        let e = "embeddings.";
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = format!("encoder.layer.{i}.");
            let a = format!("{l}attention.");
            let qkv = ["query", "key", "value"].map(|m| format!("{a}self.{m}"));
            let qkv_weights = qkv
                .iter()
                .map(|m| Ok(weights.get(&format!("{m}.weight"))?.t()?))
                .collect::<Result<Vec<_>, ModelError>>()?;
            let mut qkv_bias = Vec::new();
            for m in &qkv {
                qkv_bias.extend(weights.f32(&format!("{m}.bias"))?);
            }
            layers.push(Layer {
                qkv: Tensor::cat(&qkv_weights, 1)?
                    .to_dtype(candle_core::DType::F32)?
                    .contiguous()?,
                qkv_bias,
                attn_out: Linear::new(weights.q8(&format!("{a}output.dense.weight"))?)?,
                attn_out_bias: weights.f32(&format!("{a}output.dense.bias"))?,
                ln1: weights.norm(&format!("{a}output.LayerNorm"))?,
                inter: Linear::new(weights.q8(&format!("{l}intermediate.dense.weight"))?)?,
                inter_bias: weights.f32(&format!("{l}intermediate.dense.bias"))?,
                out: Linear::new(weights.q8(&format!("{l}output.dense.weight"))?)?,
                out_bias: weights.f32(&format!("{l}output.dense.bias"))?,
                ln2: weights.norm(&format!("{l}output.LayerNorm"))?,
            });
        }
        let hidden = config.hidden_size;
        let pooling = pooling_of(dir)?;
        let reads_cjk = tokenizer
            .get_vocab(false)
            .keys()
            .filter(|t| t.chars().any(is_cjk_ideograph))
            .count()
            >= MIN_CJK_TOKENS;
        let mut token_type = weights.f32(&format!("{e}token_type_embeddings.weight"))?;
        token_type.truncate(hidden); // type 0: a single sentence
        Ok(Self {
            tokenizer,
            word: weights.f32(&format!("{e}word_embeddings.weight"))?,
            position: weights.f32(&format!("{e}position_embeddings.weight"))?,
            token_type,
            ln: weights.norm(&format!("{e}LayerNorm"))?,
            layers,
            hidden,
            heads: config.num_attention_heads,
            eps: config.layer_norm_eps as f32,
            pooling,
            reads_cjk,
        })
    }

    /// How the token states are pooled.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Whether the vocabulary was built for Chinese (at least 2,000 entries with a CJK
    /// ideograph): only then is the embedding taken to say something about Chinese, and the
    /// guard lets Chinese pairs with different characters through to its Chinese checks
    /// ([`crate::cache::semantic::guard::Guard`]).
    pub fn reads_cjk(&self) -> bool {
        self.reads_cjk
    }

    /// Length of every embedding (384 for MiniLM-L6).
    pub fn dim(&self) -> usize {
        self.hidden
    }

    /// The token ids `text` is embedded from ([CLS] … [SEP], truncated).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The unit-length embedding of `text`: the mean of the last hidden states over its tokens
    /// (or the first token's, [`Pooling::Cls`]), L2-normalised.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, ModelError> {
        let ids = self.token_ids(text)?;
        let (n, h) = (ids.len(), self.hidden);
        let vocab = self.word.len() / h;
        let mut x = vec![0f32; n * h];
        for (i, (&id, row)) in ids.iter().zip(x.chunks_exact_mut(h)).enumerate() {
            let id = id as usize;
            if id >= vocab {
                return Err(ModelError::Tokenizer(format!(
                    "token id {id} >= vocab {vocab}"
                )));
            }
            let word = &self.word[id * h..][..h];
            let pos = &self.position[i * h..][..h];
            for j in 0..h {
                row[j] = word[j] + pos[j] + self.token_type[j];
            }
        }
        layer_norm(&mut x, h, &self.ln, self.eps);
        for layer in &self.layers {
            x = self.layer(layer, x, n)?;
        }
        let mut v = vec![0f32; h];
        let rows = match self.pooling {
            Pooling::Mean => &x[..],
            Pooling::Cls => &x[..h],
        };
        for row in rows.chunks_exact(h) {
            v.iter_mut().zip(row).for_each(|(s, r)| *s += r);
        }
        let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|a| *a /= norm);
        Ok(v)
    }

    fn layer(&self, l: &Layer, x: Vec<f32>, n: usize) -> Result<Vec<f32>, ModelError> {
        let h = self.hidden;
        let d = h / self.heads;
        let mut qkv: Vec<f32> = Tensor::from_slice(&x, (n, h), &Device::Cpu)?
            .matmul(&l.qkv)?
            .flatten_all()?
            .to_vec1()?;
        for row in qkv.chunks_exact_mut(3 * h) {
            row.iter_mut().zip(&l.qkv_bias).for_each(|(a, b)| *a += b);
        }
        // Every token attends to every token (one sentence, no padding).
        let scale = 1.0 / (d as f32).sqrt();
        let mut context = vec![0f32; n * h];
        let mut p = vec![0f32; n];
        for head in 0..self.heads {
            let part = |row: usize, which: usize| &qkv[row * 3 * h + which * h + head * d..][..d];
            for i in 0..n {
                let q = part(i, 0);
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj = dot(q, part(j, 1)) * scale;
                }
                softmax(&mut p);
                let out = &mut context[i * h + head * d..][..d];
                for (j, &pj) in p.iter().enumerate() {
                    out.iter_mut()
                        .zip(part(j, 2))
                        .for_each(|(o, v)| *o += pj * v);
                }
            }
        }
        let mut x1 = l.attn_out.forward_f32(&context, n)?;
        add_bias_residual(&mut x1, &l.attn_out_bias, &x);
        layer_norm(&mut x1, h, &l.ln1, self.eps);
        let mut f = l.inter.forward_f32(&x1, n)?;
        let width = l.inter_bias.len();
        for row in f.chunks_exact_mut(width) {
            for (a, b) in row.iter_mut().zip(&l.inter_bias) {
                let v = (*a + b) as f64;
                *a = (0.5
                    * v
                    * (1.0 + candle_core::cpu::erf::erf_f64(v / std::f64::consts::SQRT_2)))
                    as f32;
            }
        }
        let mut y = l.out.forward_f32(&f, n)?;
        add_bias_residual(&mut y, &l.out_bias, &x1);
        layer_norm(&mut y, h, &l.ln2, self.eps);
        Ok(y)
    }
}

/// The safetensors of a BERT checkpoint, by name (with or without a `bert.` prefix).
struct Weights(HashMap<String, Tensor>);

impl Weights {
    fn get(&self, name: &str) -> Result<&Tensor, ModelError> {
        self.0
            .get(name)
            .or_else(|| self.0.get(&format!("bert.{name}")))
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    fn f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        Ok(self
            .get(name)?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    }

    fn q8(&self, name: &str) -> Result<Arc<QTensor>, ModelError> {
        let t = self
            .get(name)?
            .to_dtype(candle_core::DType::F32)?
            .contiguous()?;
        Ok(Arc::new(QTensor::quantize(&t, GgmlDType::Q8_0)?))
    }

    fn norm(&self, prefix: &str) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
        Ok((
            self.f32(&format!("{prefix}.weight"))?,
            self.f32(&format!("{prefix}.bias"))?,
        ))
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn softmax(p: &mut [f32]) {
    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in p.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    p.iter_mut().for_each(|v| *v /= sum);
}

fn add_bias_residual(x: &mut [f32], bias: &[f32], residual: &[f32]) {
    for (row, res) in x
        .chunks_exact_mut(bias.len())
        .zip(residual.chunks_exact(bias.len()))
    {
        for ((a, b), r) in row.iter_mut().zip(bias).zip(res) {
            *a += b + r;
        }
    }
}

fn layer_norm(x: &mut [f32], h: usize, (w, b): &(Vec<f32>, Vec<f32>), eps: f32) {
    for row in x.chunks_exact_mut(h) {
        let mean = row.iter().sum::<f32>() / h as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(w).zip(b) {
            *v = (*v - mean) * inv * w + b;
        }
    }
}

/// Files fetched for `hf:OWNER/REPO` besides [`FILES`] when the repository has them (the
/// pooling of a sentence-transformers model).
pub const OPTIONAL_HUB_FILES: [&str; 1] = ["1_Pooling/config.json"];

/// Where an encoder spec (`cache.semantic.encoder`) points, before any I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncoderSpec {
    /// A directory holding [`FILES`].
    Dir(PathBuf),
    /// A repository on the Hugging Face hub, `hf:OWNER/REPO` (optionally `@REVISION`).
    Hub {
        /// `OWNER/REPO`.
        repo: String,
        /// A branch, tag or commit; `main` when not given.
        revision: Option<String>,
    },
}

impl EncoderSpec {
    /// Reads a spec: `hf:OWNER/REPO[@REVISION]`, an encoder id of the manifest (its directory
    /// under `models_dir`), or a directory. A malformed `hf:` spec is an error naming the form.
    pub fn parse(spec: &str, models_dir: &Path) -> Result<Self, ModelError> {
        if let Some(hub) = spec.strip_prefix("hf:") {
            let (repo, revision) = match hub.split_once('@') {
                Some((r, rev)) => (r, Some(rev)),
                None => (hub, None),
            };
            let parts: Vec<&str> = repo.split('/').collect();
            let ok_part = |p: &str| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            };
            if parts.len() != 2 || !parts.iter().all(|p| ok_part(p)) || revision == Some("") {
                return Err(ModelError::ModelNotFound {
                    id: spec.to_string(),
                    hint:
                        "cache.semantic.encoder: expected hf:OWNER/REPO or hf:OWNER/REPO@REVISION \
                           (a sentence-transformers BERT repository with model.safetensors, \
                           tokenizer.json and config.json)"
                            .into(),
                });
            }
            return Ok(Self::Hub {
                repo: repo.to_string(),
                revision: revision.map(str::to_string),
            });
        }
        let manifest = super::registry::Manifest::builtin();
        if manifest.encoders.iter().any(|e| e.id == spec) {
            return Ok(Self::Dir(models_dir.join(spec)));
        }
        Ok(Self::Dir(PathBuf::from(spec)))
    }
}

/// The directory of the encoder `spec` names ([`EncoderSpec::parse`]), downloading it first for
/// `hf:` (needs internet; one attempt, a clear error without it). A directory is checked for
/// [`FILES`]; a missing one names the setting and, for a manifest id, the fetch command.
pub fn resolve(spec: &str, models_dir: &Path) -> Result<PathBuf, ModelError> {
    match EncoderSpec::parse(spec, models_dir)? {
        EncoderSpec::Dir(dir) => {
            if let Some(missing) = FILES.iter().find(|f| !dir.join(f).is_file()) {
                let id = dir.file_name().map(|n| n.to_string_lossy().into_owned());
                let known = super::registry::Manifest::builtin();
                let fetch = match id {
                    Some(id) if known.encoders.iter().any(|e| e.id == id) => {
                        format!("; fetch it with `python3 models/fetch.py {id}`")
                    }
                    _ => format!(
                        "; known encoder ids: {}, or hf:OWNER/REPO",
                        known
                            .encoders
                            .iter()
                            .map(|e| e.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                return Err(ModelError::ModelNotFound {
                    id: spec.to_string(),
                    hint: format!(
                        "cache.semantic.encoder: {} has no {missing}{fetch}",
                        dir.display()
                    ),
                });
            }
            Ok(dir)
        }
        EncoderSpec::Hub { repo, revision } => resolve_hub(spec, &repo, revision.as_deref()),
    }
}

fn resolve_hub(spec: &str, repo: &str, revision: Option<&str>) -> Result<PathBuf, ModelError> {
    let bad = |hint: String| ModelError::ModelNotFound {
        id: spec.to_string(),
        hint: format!("cache.semantic.encoder: {hint}"),
    };
    let (owner, name) = repo.split_once('/').expect("parse checked OWNER/REPO");
    let model = super::registry::hub_client()
        .map_err(bad)?
        .model(owner, name);
    let get = |file: &str| {
        model
            .download_file()
            .filename(file)
            .maybe_revision(revision.map(str::to_string))
            .send()
    };
    let mut dir = None;
    for file in FILES {
        let path = get(file).map_err(|e| {
            bad(format!(
                "downloading {file} of {repo} from the Hugging Face hub failed ({e}); without \
                 internet access, copy the repository's model.safetensors, tokenizer.json and \
                 config.json (and 1_Pooling/config.json) into a directory and name that"
            ))
        })?;
        dir.get_or_insert_with(|| path.parent().map(Path::to_path_buf));
    }
    for file in OPTIONAL_HUB_FILES {
        // Absent from many repositories (then mean pooling); any failure reads as absent.
        if let Err(e) = get(file) {
            tracing::debug!(%e, file, repo, "optional encoder file not fetched");
        }
    }
    dir.flatten()
        .ok_or_else(|| bad("the hub returned no directory".into()))
}

/// Dot product; the cosine similarity of two unit vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_specs_parse() {
        let models = Path::new("/srv/models");
        assert_eq!(
            EncoderSpec::parse("hf:BAAI/bge-small-zh-v1.5", models).unwrap(),
            EncoderSpec::Hub {
                repo: "BAAI/bge-small-zh-v1.5".into(),
                revision: None
            }
        );
        assert_eq!(
            EncoderSpec::parse("hf:moka-ai/m3e-small@v1", models).unwrap(),
            EncoderSpec::Hub {
                repo: "moka-ai/m3e-small".into(),
                revision: Some("v1".into())
            }
        );
        for bad in [
            "hf:", "hf:owner", "hf:a/b/c", "hf:a/b@", "hf:/b", "hf:a b/c",
        ] {
            let err = EncoderSpec::parse(bad, models).unwrap_err().to_string();
            assert!(
                err.contains("cache.semantic.encoder") && err.contains("hf:OWNER/REPO"),
                "{bad}: {err}"
            );
        }
        // Manifest encoder ids live under the models directory; anything else is a path.
        assert_eq!(
            EncoderSpec::parse("m3e-small", models).unwrap(),
            EncoderSpec::Dir(models.join("m3e-small"))
        );
        assert_eq!(
            EncoderSpec::parse("minilm-l6", models).unwrap(),
            EncoderSpec::Dir(models.join("minilm-l6"))
        );
        assert_eq!(
            EncoderSpec::parse("my/encoder", models).unwrap(),
            EncoderSpec::Dir(PathBuf::from("my/encoder"))
        );
    }

    #[test]
    fn a_missing_encoder_names_the_setting_and_the_fix() {
        let empty = tempfile::tempdir().unwrap();
        let err = resolve("m3e-small", empty.path()).unwrap_err().to_string();
        assert!(
            err.contains("cache.semantic.encoder")
                && err.contains("model.safetensors")
                && err.contains("python3 models/fetch.py m3e-small"),
            "{err}"
        );
        let err = resolve(&empty.path().display().to_string(), empty.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("known encoder ids: minilm-l6, m3e-small"),
            "{err}"
        );
        // A directory with the three files resolves to itself (no loading here).
        for f in FILES {
            std::fs::write(empty.path().join(f), b"").unwrap();
        }
        let dir = empty.path().display().to_string();
        assert_eq!(resolve(&dir, Path::new("x")).unwrap(), empty.path());
    }

    #[test]
    fn pooling_follows_the_sentence_transformers_config() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(pooling_of(dir.path()).unwrap(), Pooling::Mean);
        let pooling = dir.path().join("1_Pooling");
        std::fs::create_dir(&pooling).unwrap();
        let write = |json: &str| std::fs::write(pooling.join("config.json"), json).unwrap();
        write(r#"{"word_embedding_dimension": 512, "pooling_mode_cls_token": true}"#);
        assert_eq!(pooling_of(dir.path()).unwrap(), Pooling::Cls);
        write(r#"{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false}"#);
        assert_eq!(pooling_of(dir.path()).unwrap(), Pooling::Mean);
        write(r#"{"pooling_mode_max_tokens": true}"#);
        assert!(pooling_of(dir.path()).is_err());
    }
}
