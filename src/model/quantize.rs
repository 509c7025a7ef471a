//! Requantization to Q8_0, at load time and ahead of time (`qnode quantize`).
//!
//! 2-D weights are dequantized and rounded to Q8_0 blocks of 32 (scale = max|x| / 127, the same
//! rounding as `llama-quantize`) a chunk of rows at a time, so the f32 form of a large matrix is
//! never held whole; 1-D tensors (norms) stay F32.

use std::io::{BufWriter, Seek, Write};
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
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

/// Rows requantized per step. A conversion's transient is one chunk per worker thread (512 rows ×
/// k × 4 bytes of f32: 1.3 MB for k = 640), not the whole tensor dequantized (113 MB for
/// SmolLM2's 49152 × 576 embedding, 670 MB for a 262144 × 640 one).
const CHUNK_ROWS: usize = 512;

fn needs_q8_0(rank: usize, dtype: GgmlDType, quant: Quant) -> bool {
    rank >= 2 && quant == Quant::Q8_0 && dtype != GgmlDType::Q8_0
}

/// Convert one tensor to the format the runtime (or an output file) uses.
pub fn convert(name: &str, t: QTensor, quant: Quant) -> Result<QTensor, ModelError> {
    let dtype = t.dtype();
    if needs_q8_0(t.rank(), dtype, quant) {
        let dims = t.shape().dims().to_vec();
        let data = t.data()?;
        return requantize_q8_0(name, dtype, &dims, &data, CHUNK_ROWS);
    }
    keep_or_f32(name, t)
}

/// Read tensor `name` of `file` converted as [`convert`] would, without holding the whole tensor
/// twice: matrices to requantize stream from the file's map a chunk of rows at a time, and the
/// others are copied out of the map once.
pub fn read_converted(file: &GgufFile, name: &str, quant: Quant) -> Result<QTensor, ModelError> {
    let raw = file.raw_tensor(name)?;
    if needs_q8_0(raw.dims.len(), raw.dtype, quant) {
        return requantize_q8_0(name, raw.dtype, &raw.dims, raw.bytes, CHUNK_ROWS);
    }
    let t = qtensor_from_ggml(raw.dtype, raw.bytes, raw.dims, &Device::Cpu)
        .map_err(|_| unsupported(name, raw.dtype))?;
    keep_or_f32(name, t)
}

fn unsupported(name: &str, dtype: GgmlDType) -> ModelError {
    ModelError::UnsupportedTensorType {
        name: name.to_string(),
        dtype: format!("{dtype:?}"),
    }
}

/// Matrices unchanged (already Q8_0, or `Quant::Original`); 1-D tensors (norms) as F32.
fn keep_or_f32(name: &str, t: QTensor) -> Result<QTensor, ModelError> {
    let dtype = t.dtype();
    if t.rank() >= 2 || dtype == GgmlDType::F32 {
        return Ok(t);
    }
    let f = t
        .dequantize(&Device::Cpu)
        .map_err(|_| unsupported(name, dtype))?;
    Ok(QTensor::quantize(&f, GgmlDType::F32)?)
}

/// Requantize `src` (`dims`, stored as `dtype`) to Q8_0 over chunks of about `chunk_rows` rows,
/// in parallel: each chunk is dequantized to f32 and rounded into its slice of the output. The
/// result is bit-identical to dequantizing the whole tensor and quantizing it (both round each
/// block of 32 on its own, and a chunk holds whole rows), and the f32 transient is one chunk per
/// thread. Chunks are rounded to whole source blocks when a row is shorter than a block.
fn requantize_q8_0(
    name: &str,
    dtype: GgmlDType,
    dims: &[usize],
    src: &[u8],
    chunk_rows: usize,
) -> Result<QTensor, ModelError> {
    let k = *dims.last().unwrap_or(&0);
    if k == 0 || !k.is_multiple_of(BlockQ8_0::BLCK_SIZE) {
        return Err(ModelError::UnsupportedTensorType {
            name: name.to_string(),
            dtype: format!("{dtype:?} with row length {k} (Q8_0 needs a multiple of 32)"),
        });
    }
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let (block, block_bytes) = (dtype.block_size(), dtype.type_size());
    let elems = rows * k;
    if !elems.is_multiple_of(block) || src.len() != elems / block * block_bytes {
        return Err(ModelError::UnsupportedTensorType {
            name: name.to_string(),
            dtype: format!("{dtype:?}: {} bytes for {rows} × {k} values", src.len()),
        });
    }
    // Chunks start on a source block: a multiple of `step` rows, step × k = lcm(k, block).
    let step = block / gcd(k, block);
    let chunk = chunk_rows.max(1).div_ceil(step) * step;
    let kb = k / BlockQ8_0::BLCK_SIZE;
    let mut out = vec![BlockQ8_0::zeros(); rows * kb];
    out.par_chunks_mut(chunk * kb).enumerate().try_for_each(
        |(i, dst)| -> Result<(), ModelError> {
            let n = dst.len() / kb * k;
            let start = i * chunk * k / block * block_bytes;
            let bytes = &src[start..start + n / block * block_bytes];
            let part = qtensor_from_ggml(dtype, bytes, vec![n], &Device::Cpu)
                .map_err(|_| unsupported(name, dtype))?;
            let f = part
                .dequantize(&Device::Cpu)
                .map_err(|_| unsupported(name, dtype))?
                .to_vec1::<f32>()?;
            BlockQ8_0::from_float(&f, dst);
            Ok(())
        },
    )?;
    Ok(QTensor::new(QStorage::Cpu(Box::new(out)), dims.to_vec())?)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
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
            let before = content.tensor_infos[*name].ggml_dtype;
            let t = read_converted(&file, name, Quant::Q8_0)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use rand::{Rng, SeedableRng};

    fn random(rows: usize, k: usize, seed: u64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let data: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(data, (rows, k), &Device::Cpu).unwrap()
    }

    /// The reference: the whole tensor dequantized to f32, then quantized (the old `convert`).
    fn whole(t: &QTensor) -> Vec<u8> {
        let f = t.dequantize(&Device::Cpu).unwrap();
        QTensor::quantize(&f, GgmlDType::Q8_0)
            .unwrap()
            .data()
            .unwrap()
            .into_owned()
    }

    #[test]
    fn chunked_requantization_equals_whole_tensor() {
        // 37 rows: not a multiple of any chunk tried, so the last chunk is partial.
        let cases = [
            (GgmlDType::Q4K, 256),
            (GgmlDType::Q6K, 512),
            (GgmlDType::Q4_1, 96),
            (GgmlDType::Q5_0, 64),
            (GgmlDType::F16, 32),
            (GgmlDType::F32, 64),
        ];
        for (seed, (dtype, k)) in cases.into_iter().enumerate() {
            let src = QTensor::quantize(&random(37, k, seed as u64), dtype).unwrap();
            let want = whole(&src);
            let data = src.data().unwrap();
            for chunk in [1, 5, 16, 37, 512] {
                let got = requantize_q8_0("w", dtype, &[37, k], &data, chunk).unwrap();
                assert_eq!(got.dtype(), GgmlDType::Q8_0);
                assert_eq!(got.shape().dims(), [37, k]);
                assert!(
                    got.data().unwrap()[..] == want[..],
                    "{dtype:?} k={k} chunk={chunk} differs from whole-tensor conversion"
                );
            }
            let via_convert = convert("w", src, Quant::Q8_0).unwrap();
            assert!(via_convert.data().unwrap()[..] == want[..], "{dtype:?}");
        }
    }

    #[test]
    fn chunks_start_on_source_blocks_when_rows_are_shorter() {
        // Rows of 96 in Q4_K blocks of 256: blocks straddle rows, chunks round up to 8 rows.
        let f = random(8, 96, 7).flatten_all().unwrap();
        let q4k = QTensor::quantize(&f, GgmlDType::Q4K).unwrap();
        let want = {
            let g = q4k
                .dequantize(&Device::Cpu)
                .unwrap()
                .reshape((8, 96))
                .unwrap();
            QTensor::quantize(&g, GgmlDType::Q8_0)
                .unwrap()
                .data()
                .unwrap()
                .into_owned()
        };
        let data = q4k.data().unwrap();
        for chunk in [1, 3, 5, 8, 9] {
            let got = requantize_q8_0("w", GgmlDType::Q4K, &[8, 96], &data, chunk).unwrap();
            assert!(got.data().unwrap()[..] == want[..], "chunk={chunk}");
        }
    }

    #[test]
    fn bad_rows_are_typed_errors() {
        let src = QTensor::quantize(&random(4, 64, 1), GgmlDType::Q4_0).unwrap();
        let data = src.data().unwrap();
        assert!(matches!(
            requantize_q8_0("w", GgmlDType::Q4_0, &[4, 64], &data[..data.len() - 1], 2),
            Err(ModelError::UnsupportedTensorType { .. })
        ));
        assert!(matches!(
            requantize_q8_0("w", GgmlDType::Q4_0, &[8, 16], &data[..], 2),
            Err(ModelError::UnsupportedTensorType { .. })
        ));
    }
}
