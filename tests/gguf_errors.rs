//! Bad model files give typed errors that name the file or the key, never a panic.

use std::io::Write;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use qnode::model::gguf::header::{read_header, HeaderError};
use qnode::model::loaded::LoadedModel;
use qnode::model::quantize::Quant;
use qnode::model::ModelError;

fn load(path: &std::path::Path) -> Result<LoadedModel, ModelError> {
    LoadedModel::load("t", path, Quant::Q8_0, &Device::Cpu)
}

#[test]
fn missing_file_names_the_path() {
    let err = load(std::path::Path::new("/nonexistent/model.gguf"))
        .err()
        .unwrap();
    assert!(matches!(err, ModelError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/model.gguf"));
}

#[test]
fn not_a_gguf_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.gguf");
    std::fs::write(&path, b"this is not a model file at all").unwrap();
    let err = load(&path).err().unwrap();
    assert!(
        matches!(
            err,
            ModelError::BadHeader {
                error: HeaderError::BadMagic(_),
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("junk.gguf"));
}

#[test]
fn truncated_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("tiny.gguf");
    qnode::model::tiny::write_tiny_llama(&full, 1).unwrap();
    let bytes = std::fs::read(&full).unwrap();
    for cut in [8, 64, bytes.len() / 2, bytes.len() - 100] {
        let path = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = load(&path).err().unwrap();
        assert!(
            matches!(
                err,
                ModelError::BadHeader {
                    error: HeaderError::Truncated { .. }
                        | HeaderError::CountTooLarge { .. }
                        | HeaderError::StringTooLong { .. }
                        | HeaderError::TensorOutOfFile { .. },
                    ..
                }
            ),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn header_claiming_huge_counts_is_rejected_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(b"GGUF").unwrap();
    f.write_all(&3u32.to_le_bytes()).unwrap();
    f.write_all(&u64::MAX.to_le_bytes()).unwrap(); // tensors
    f.write_all(&(1u64 << 40).to_le_bytes()).unwrap(); // metadata entries
    drop(f);
    let err = load(&path).err().unwrap();
    assert!(
        matches!(
            err,
            ModelError::BadHeader {
                error: HeaderError::CountTooLarge { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn unknown_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mamba.gguf");
    let arch = Value::String("mamba".into());
    let t = QTensor::quantize(
        &Tensor::zeros(32, candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let mut f = std::fs::File::create(&path).unwrap();
    candle_core::quantized::gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("x", &t)],
    )
    .unwrap();
    let err = load(&path).err().unwrap();
    assert!(
        matches!(&err, ModelError::UnsupportedArchitecture { name, .. } if name == "mamba"),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("general.architecture"), "{msg}");
    for family in ["llama", "gemma3", "qwen2", "qwen3"] {
        assert!(msg.contains(family), "{msg} should list {family}");
    }
}

/// A GGUF v3 file written byte by byte, so a test can put any value in any field.
#[derive(Default)]
struct Raw {
    kv: Vec<u8>,
    kv_count: u64,
    tensors: Vec<u8>,
    tensor_count: u64,
    data_len: usize,
}

impl Raw {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// A metadata entry with a raw type code and raw value bytes.
    fn kv(mut self, key: &str, code: u32, value: &[u8]) -> Self {
        Self::string(&mut self.kv, key);
        self.kv.extend(code.to_le_bytes());
        self.kv.extend(value);
        self.kv_count += 1;
        self
    }

    fn u32_kv(self, key: &str, v: u32) -> Self {
        self.kv(key, 4, &v.to_le_bytes())
    }

    /// A tensor info: dims innermost first, a ggml type code, an offset into the data section.
    fn tensor(mut self, name: &str, dims: &[u64], code: u32, offset: u64) -> Self {
        Self::string(&mut self.tensors, name);
        self.tensors.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.tensors.extend(d.to_le_bytes());
        }
        self.tensors.extend(code.to_le_bytes());
        self.tensors.extend(offset.to_le_bytes());
        self.tensor_count += 1;
        self
    }

    fn data(mut self, len: usize) -> Self {
        self.data_len = len;
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.tensor_count.to_le_bytes());
        out.extend(self.kv_count.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.tensors);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(std::iter::repeat_n(0u8, self.data_len));
        out
    }

    fn error(&self) -> HeaderError {
        read_header(&self.bytes()).expect_err("the header must be refused")
    }
}

/// One valid f32 tensor of 8 values, 32 bytes of data.
fn one_tensor() -> Raw {
    Raw::default().tensor("w", &[8], 0, 0).data(32)
}

#[test]
fn a_valid_raw_file_reads() {
    let content = read_header(&one_tensor().u32_kv("general.alignment", 32).bytes()).unwrap();
    assert_eq!(content.tensor_infos["w"].shape.dims(), &[8]);
}

#[test]
fn zero_alignment_is_a_typed_error_not_a_panic() {
    // Issue #13 item 5: candle divides by `general.alignment` unchecked.
    let err = one_tensor().u32_kv("general.alignment", 0).error();
    assert_eq!(err, HeaderError::BadAlignment("0".into()));
    for bad in [3u32, 48, 1 << 21] {
        let err = one_tensor().u32_kv("general.alignment", bad).error();
        assert_eq!(err, HeaderError::BadAlignment(bad.to_string()));
    }
    let err = one_tensor().kv("general.alignment", 8, &{
        let mut v = 2u64.to_le_bytes().to_vec();
        v.extend(b"32");
        v
    });
    assert!(matches!(err.error(), HeaderError::BadAlignment(_)));
}

#[test]
fn zero_alignment_through_the_loader_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("align0.gguf");
    std::fs::write(&path, one_tensor().u32_kv("general.alignment", 0).bytes()).unwrap();
    let err = load(&path).err().unwrap();
    assert!(
        matches!(
            &err,
            ModelError::BadHeader {
                error: HeaderError::BadAlignment(_),
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("align0.gguf"), "{err}");
}

#[test]
fn malformed_metadata_fields_are_typed_errors() {
    assert_eq!(
        Raw::default().kv("k", 13, &[0; 8]).error(),
        HeaderError::UnknownValueType {
            key: "k".into(),
            code: 13
        }
    );
    assert_eq!(
        Raw::default().kv("k", 7, &[2]).error(),
        HeaderError::BadBool {
            key: "k".into(),
            byte: 2
        }
    );
    let nested = {
        let mut v = 9u32.to_le_bytes().to_vec(); // array of arrays
        v.extend(1u64.to_le_bytes());
        v.extend(0u32.to_le_bytes());
        v.extend(0u64.to_le_bytes());
        v
    };
    assert_eq!(
        Raw::default().kv("k", 9, &nested).error(),
        HeaderError::NestedArray("k".into())
    );
    let long_array = {
        let mut v = 4u32.to_le_bytes().to_vec();
        v.extend((1u64 << 40).to_le_bytes());
        v
    };
    assert!(matches!(
        Raw::default().kv("k", 9, &long_array).error(),
        HeaderError::CountTooLarge {
            what: "array element",
            ..
        }
    ));
    let long_string = (1u64 << 31).to_le_bytes();
    assert!(matches!(
        Raw::default().kv("k", 8, &long_string).error(),
        HeaderError::StringTooLong { .. }
    ));
    assert_eq!(
        Raw::default().u32_kv("k", 1).u32_kv("k", 2).error(),
        HeaderError::DuplicateKey("k".into())
    );
}

#[test]
fn malformed_tensor_infos_are_typed_errors() {
    let name = || "w".to_string();
    assert_eq!(
        Raw::default().tensor("w", &[1; 5], 0, 0).data(4).error(),
        HeaderError::TooManyDimensions {
            tensor: name(),
            dims: 5
        }
    );
    assert!(matches!(
        Raw::default()
            .tensor("w", &[1 << 32, 1 << 32, 2], 0, 0)
            .error(),
        HeaderError::ShapeOverflow { .. }
    ));
    assert_eq!(
        Raw::default().tensor("w", &[8], 5, 0).data(32).error(),
        HeaderError::UnknownTensorType {
            tensor: name(),
            code: 5
        }
    );
    assert!(matches!(
        Raw::default().tensor("w", &[33], 8, 0).data(64).error(),
        HeaderError::NotWholeBlocks {
            row: 33,
            block: 32,
            ..
        }
    ));
    assert_eq!(
        Raw::default().tensor("w", &[8], 0, 4).data(64).error(),
        HeaderError::MisalignedTensor {
            tensor: name(),
            offset: 4,
            alignment: 32
        }
    );
    assert!(matches!(
        Raw::default().tensor("w", &[8], 0, 0).data(31).error(),
        HeaderError::TensorOutOfFile { len: 32, .. }
    ));
    assert!(matches!(
        Raw::default()
            .tensor("w", &[8], 0, u64::MAX - 31)
            .data(32)
            .error(),
        HeaderError::TensorOutOfFile { .. }
    ));
    assert_eq!(
        Raw::default()
            .tensor("w", &[8], 0, 0)
            .tensor("w", &[8], 0, 32)
            .data(64)
            .error(),
        HeaderError::DuplicateTensor(name())
    );
}

#[test]
fn bad_version_and_magic() {
    let mut bytes = one_tensor().bytes();
    bytes[4] = 9;
    assert_eq!(
        read_header(&bytes).unwrap_err(),
        HeaderError::UnsupportedVersion(9)
    );
    bytes[0] = b'X';
    assert!(matches!(
        read_header(&bytes).unwrap_err(),
        HeaderError::BadMagic(_)
    ));
}

/// A failed load through the pool's run-time path (Admin/LoadModel) leaves nothing behind: the
/// same id loads once the file is fixed.
#[test]
fn a_failed_load_leaves_no_pool_entry() {
    use qnode::config::ModelConfig;
    use qnode::engine::Backend;
    use qnode::pool::{metrics::PoolMetrics, ModelPool};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("retry.gguf");
    std::fs::write(&path, one_tensor().u32_kv("general.alignment", 0).bytes()).unwrap();
    let pool = ModelPool::new(&[], PoolMetrics::unregistered(), Device::Cpu).unwrap();
    let mut config = ModelConfig::new(path.to_str().unwrap());
    config.threads_per_instance = Some(1);
    let err = pool
        .add_model(config.clone())
        .expect_err("a bad file must not load");
    assert!(err.to_string().contains("general.alignment"), "{err}");
    assert!(pool.models().is_empty(), "{:?}", pool.models());
    qnode::model::tiny::write_tiny_llama(&path, 1).unwrap();
    let info = pool
        .add_model(config)
        .expect("the fixed file loads under the same id");
    assert_eq!(info.id, "retry");
}

/// Issue #13 item 10: two `--model` files with one stem would load twice under one id (the
/// second unreachable): refused, naming both paths.
#[test]
fn two_files_with_one_stem_are_refused_naming_both() {
    use qnode::config::ModelConfig;
    use qnode::pool::{metrics::PoolMetrics, ModelPool};
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = ["a", "b"]
        .iter()
        .map(|sub| {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
            let path = dir.path().join(sub).join("model.gguf");
            qnode::model::tiny::write_tiny_llama(&path, 1).unwrap();
            path
        })
        .collect();
    let configs: Vec<_> = paths
        .iter()
        .map(|p| ModelConfig::new(p.to_str().unwrap()))
        .collect();
    let err = ModelPool::new(&configs, PoolMetrics::unregistered(), Device::Cpu)
        .err()
        .expect("two files with one stem must be refused");
    assert!(
        matches!(&err, ModelError::DuplicateModelId { id, .. } if id == "model"),
        "{err}"
    );
    let message = err.to_string();
    for p in &paths {
        assert!(message.contains(p.to_str().unwrap()), "{message}");
    }
}
