//! `qnode quantize`: the written file keeps every metadata key, has Q8_0 matrices and F32 norms,
//! equals an independent Q8_0 quantizer (Python `gguf`'s `quants.quantize`) in every block, and
//! loads back in qnode with the same logits as requantizing at load.

mod common;

use std::process::Command;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use qnode::model::gguf::GgufFile;
use qnode::model::loaded::LoadedModel;
use qnode::model::quantize::{quantize_file, Quant};
use qnode::model::transformer::SeqStep;

#[test]
fn smollm2_to_q8_0_round_trips() {
    let src = common::model_file("smollm2");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-q8_0.gguf");
    let report = quantize_file(&src, &out, &|_, _| {}).unwrap();
    assert_eq!(report.tensors, 272);
    assert_eq!(report.converted, 210, "every Q4_1 matrix requantized");

    let before = GgufFile::open(&src).unwrap();
    let after = GgufFile::open(&out).unwrap();
    for key in before.content().metadata.keys() {
        assert!(
            after.content().metadata.contains_key(key),
            "metadata key {key} lost"
        );
    }
    assert_eq!(
        after.meta().usize("general.file_type").unwrap(),
        7,
        "file type says Q8_0"
    );
    for (name, info) in &after.content().tensor_infos {
        let want = if info.shape.rank() == 1 {
            GgmlDType::F32
        } else {
            GgmlDType::Q8_0
        };
        assert_eq!(info.ggml_dtype, want, "{name}");
    }

    // Requantized ahead of time == requantized at load: same logits, bit for bit.
    let prompt = [504u32, 3575, 282, 4649, 314];
    let logits = |path: &std::path::Path, quant| {
        let m = LoadedModel::load("m", path, quant, &Device::Cpu).unwrap();
        let mut cache = m.transformer.new_cache(64);
        m.transformer
            .forward(&mut [SeqStep {
                tokens: &prompt,
                cache: &mut cache,
            }])
            .unwrap()
            .row(0)
            .to_vec()
    };
    assert_eq!(logits(&out, Quant::Original), logits(&src, Quant::Q8_0));

    // An independent reader and quantizer: Python `gguf` reads both files, dequantizes each source
    // matrix and rounds it to Q8_0 itself; every 34-byte block must equal ours
    // (tests/q8_0_reference.py).
    let py = Command::new("python3")
        .arg(common::repo_root().join("tests/q8_0_reference.py"))
        .arg(&src)
        .arg(&out)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&py.stdout);
    eprintln!("q8_0 reference: {}", stdout.trim());
    assert!(
        py.status.success(),
        "Q8_0 blocks differ from Python gguf's quantizer (or it failed; `bash scripts/test.sh` \
         installs gguf==0.19.0):\n{stdout}\n{}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert_eq!(
        stdout.trim(),
        "tensors 272 requantized 210 blocks 4202496 differing 0"
    );
}
