//! Requantization to Q8_0, at load time and ahead of time (`qnode quantize`).
//!
//! 2-D weights are dequantized and rounded to Q8_0 blocks of 32 (scale = max|x| / 127, the same
//! rounding as `llama-quantize`); 1-D tensors (norms) stay F32.

use std::io::{BufWriter, Seek, Write};
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use rayon::prelude::*;

use super::gguf::GgufFile;
use super::ModelError;

/// GGUF `general.file_type` for "mostly Q8_0".
const FILE_TYPE_Q8_0: u32 = 7;

/// Weight format a model runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quant {
    /// Every matrix requantized to Q8_0 (the product's format).
    #[default]
    Q8_0,
    /// Tensors as stored in the file.
    Original,
}

impl Quant {
    /// Lower-case name (`q8_0`, `original`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Original => "original",
        }
    }
}

impl FromStr for Quant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "original" | "orig" => Ok(Self::Original),
            other => Err(format!(
                "unknown quant `{other}` (expected q8_0 or original)"
            )),
        }
    }
}

impl std::fmt::Display for Quant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Convert one tensor to the format the runtime (or an output file) uses.
pub fn convert(name: &str, t: QTensor, quant: Quant) -> Result<QTensor, ModelError> {
    let dtype = t.dtype();
    let is_matrix = t.rank() >= 2;
    let unsupported = || ModelError::UnsupportedTensorType {
        name: name.to_string(),
        dtype: format!("{dtype:?}"),
    };
    if !is_matrix {
        if dtype == GgmlDType::F32 {
            return Ok(t);
        }
        let f = t.dequantize(&Device::Cpu).map_err(|_| unsupported())?;
        return Ok(QTensor::quantize(&f, GgmlDType::F32)?);
    }
    if quant == Quant::Original || dtype == GgmlDType::Q8_0 {
        return Ok(t);
    }
    let k = *t.shape().dims().last().unwrap_or(&0);
    if !k.is_multiple_of(GgmlDType::Q8_0.block_size()) {
        return Err(ModelError::UnsupportedTensorType {
            name: name.to_string(),
            dtype: format!("{dtype:?} with row length {k} (Q8_0 needs a multiple of 32)"),
        });
    }
    // A fresh dequantized tensor is contiguous with no offset: QTensor::quantize ignores views'
    // start offsets (CANDLE-NOTES), so never hand it a narrowed view.
    let f = t.dequantize(&Device::Cpu).map_err(|_| unsupported())?;
    Ok(QTensor::quantize(&f, GgmlDType::Q8_0)?)
}

/// What `quantize_file` did.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    /// Tensors written.
    pub tensors: usize,
    /// Tensors whose type changed.
    pub converted: usize,
    /// Size of the output file.
    pub bytes: u64,
}

/// Rewrite `input` as a GGUF whose matrices are Q8_0, keeping all metadata. `progress` is called
/// after each tensor with (done, total).
pub fn quantize_file(
    input: &Path,
    output: &Path,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<QuantizeReport, ModelError> {
    let file = GgufFile::open(input)?;
    let content = file.content();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let total = names.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let converted: Vec<(QTensor, bool)> = names
        .par_iter()
        .map(|name| {
            let t = file.tensor(name, &Device::Cpu)?;
            let before = t.dtype();
            let t = convert(name, t, Quant::Q8_0)?;
            let changed = t.dtype() != before;
            progress(
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
                total,
            );
            Ok((t, changed))
        })
        .collect::<Result<_, ModelError>>()?;

    let file_type = Value::U32(FILE_TYPE_Q8_0);
    let mut metadata: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        // candle's writer pads to 32 bytes; a different declared alignment would lie.
        .filter(|(k, _)| k.as_str() != "general.alignment" && k.as_str() != "general.file_type")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.push(("general.file_type", &file_type));
    metadata.sort_by_key(|(k, _)| *k);
    let tensors: Vec<(&str, &QTensor)> = names
        .iter()
        .zip(&converted)
        .map(|(n, (t, _))| (n.as_str(), t))
        .collect();

    let io = |source| ModelError::Io {
        path: output.to_path_buf(),
        source,
    };
    let partial = output.with_extension("gguf.partial");
    let mut w = BufWriter::new(std::fs::File::create(&partial).map_err(io)?);
    candle_core::quantized::gguf_file::write(&mut w, &metadata, &tensors)?;
    w.flush().map_err(io)?;
    let bytes = w.stream_position().map_err(io)?;
    drop(w);
    std::fs::rename(&partial, output).map_err(io)?;
    Ok(QuantizeReport {
        tensors: total,
        converted: converted.iter().filter(|(_, c)| *c).count(),
        bytes,
    })
}
