//! Bad model files give typed errors that name the file or the key, never a panic.

use std::io::Write;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
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
    assert!(matches!(err, ModelError::InvalidGguf { .. }), "{err}");
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
            matches!(err, ModelError::InvalidGguf { .. }),
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
    assert!(matches!(err, ModelError::InvalidGguf { .. }), "{err}");
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
        matches!(&err, ModelError::UnsupportedArchitecture(a) if a == "mamba"),
        "{err}"
    );
}
