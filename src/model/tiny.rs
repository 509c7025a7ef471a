//! A tiny random llama-architecture GGUF (2 blocks, width 64, byte-level vocabulary with a ChatML
//! template), written in milliseconds so tests can load, batch and serve a real file without the
//! real model. Its text is gibberish; its shapes and code paths are the real ones.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use super::ModelError;

const HIDDEN: usize = 64;
const FFN: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
/// Context window of the tiny model.
pub const CONTEXT: usize = 512;

/// GPT-2's byte → printable character table.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// The tiny model's own chat template: plain ChatML.
const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Write the tiny model to `path`; `seed` picks the weights.
pub fn write_tiny_llama(path: &Path, seed: u64) -> Result<(), ModelError> {
    write_tiny_llama_with_template(path, seed, CHATML, CONTEXT)
}

/// As [`write_tiny_llama`], with another chat template (a real model's, using the ChatML
/// control tokens `<|im_start|>` / `<|im_end|>` the tiny vocabulary has) and context window
/// (a byte-level vocabulary makes long prompts), so tests can serve what that template does
/// (Qwen's `tools` block) through the whole node.
pub fn write_tiny_llama_with_template(
    path: &Path,
    seed: u64,
    template: &str,
    context: usize,
) -> Result<(), ModelError> {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    tokens.extend(specials.iter().map(|s| s.to_string()));
    tokens.extend(["th", "the", "Ġthe"].map(String::from));
    let merges = ["t h", "th e", "Ġ the"];
    let vocab = tokens.len();
    let types: Vec<Value> = (0..vocab)
        .map(|i| Value::I32(if (256..259).contains(&i) { 3 } else { 1 }))
        .collect();

    let s = |v: &str| Value::String(v.to_string());
    let u = |v: usize| Value::U32(v as u32);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("general.name", s("qnode-tiny")),
        ("llama.block_count", u(LAYERS)),
        ("llama.embedding_length", u(HIDDEN)),
        ("llama.feed_forward_length", u(FFN)),
        ("llama.attention.head_count", u(HEADS)),
        ("llama.attention.head_count_kv", u(KV_HEADS)),
        ("llama.context_length", u(context)),
        ("llama.vocab_size", u(vocab)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("gpt2")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.merges",
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", u(256)),
        ("tokenizer.ggml.eos_token_id", u(258)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", s(template)),
    ];

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut matrix = |rows: usize, cols: usize| -> Result<QTensor, ModelError> {
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-0.2..0.2))
            .collect();
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu)?;
        Ok(QTensor::quantize(&t, GgmlDType::Q8_0)?)
    };
    let ones = |n: usize| -> Result<QTensor, ModelError> {
        let t = Tensor::ones(n, candle_core::DType::F32, &Device::Cpu)?;
        Ok(QTensor::quantize(&t, GgmlDType::F32)?)
    };
    let head_dim = HIDDEN / HEADS;
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), matrix(vocab, HIDDEN)?),
        ("output_norm.weight".into(), ones(HIDDEN)?),
    ];
    for i in 0..LAYERS {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        tensors.push((p("attn_norm"), ones(HIDDEN)?));
        tensors.push((p("attn_q"), matrix(HEADS * head_dim, HIDDEN)?));
        tensors.push((p("attn_k"), matrix(KV_HEADS * head_dim, HIDDEN)?));
        tensors.push((p("attn_v"), matrix(KV_HEADS * head_dim, HIDDEN)?));
        tensors.push((p("attn_output"), matrix(HIDDEN, HEADS * head_dim)?));
        tensors.push((p("ffn_norm"), ones(HIDDEN)?));
        tensors.push((p("ffn_gate"), matrix(FFN, HIDDEN)?));
        tensors.push((p("ffn_up"), matrix(FFN, HIDDEN)?));
        tensors.push((p("ffn_down"), matrix(HIDDEN, FFN)?));
    }
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::create(path).map_err(io)?;
    candle_core::quantized::gguf_file::write(&mut file, &meta_refs, &tensor_refs)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::loaded::LoadedModel;
    use crate::model::quantize::Quant;

    #[test]
    fn tiny_model_loads_and_tokenizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path, 1).unwrap();
        let m = LoadedModel::load("tiny", &path, Quant::Q8_0, &Device::Cpu).unwrap();
        assert_eq!(m.hparams().n_layer, LAYERS);
        let ids = m.tokenizer.encode("the cat", false).unwrap();
        assert_eq!(ids, [260, 32, 99, 97, 116], "`the` merged, then bytes");
        assert!(m.template.is_some());
    }
}
