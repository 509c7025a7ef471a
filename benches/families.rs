//! Per-family speed against llama.cpp (#17): for each tiny family model, load time, prefill of 128
//! tokens and decode of 64 (one stream) on a 2-thread pool, each next to llama.cpp's `llama-bench`
//! on the same file, run right after ours so both see the same machine load.
//!
//! ```sh
//! for f in qwen2 qwen2-yarn qwen3 llama3 phi3 mistral mistral-nemo; do
//!     python3 scripts/tiny_family.py write $f /tmp/fam/tiny-$f.gguf
//! done
//! FAMILY_DIR=/tmp/fam LLAMA_BENCH=/path/to/llama-bench cargo bench --bench families
//! ```
//!
//! The point is that no family falls off the fast path (fused Q/K/V, packed Q8_0 kernels, host
//! RoPE with its factors): a family on a slow path would show as a ratio far below the others'.
//! The models are tiny (hidden 64-128), so per-token work is dominated by the output head (a
//! 152k- or 32k-row matrix) and by fixed per-step costs, not by the layers: the ratios say
//! nothing about speed on real sizes (docs/benchmarks.md has those, on SmolLM2).
//!
//! qnode's load time is `LoadedModel::load` in process (tokenizer, requantization check, packing);
//! llama.cpp's is the wall time of a `llama-bench -p 1 -n 0 -r 1` process (start, load, one
//! one-token run), an upper bound of its load.
//!
//! Both sides report their best of `RUNS` runs (llama-bench: the largest of its per-run samples),
//! the figure least disturbed by other work on a shared machine. `THREADS=N` sets the thread
//! count of both (default 2): on a loaded 2-core machine llama.cpp's spinning thread barriers
//! collapse at 2 threads (tg64 of the tiny llama3 measured 66 ± 56 tok/s at 2 threads, 428 at 1),
//! so 1 thread is the fairer comparison there.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use qnode::model::loaded::LoadedModel;
use qnode::model::quantize::Quant;
use qnode::model::transformer::{SeqStep, Transformer};

const PROMPT: usize = 128;
const GEN: usize = 64;
const RUNS: usize = 5;

/// Threads of both sides: `THREADS`, default 2.
fn threads() -> usize {
    std::env::var("THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2)
}

fn main() {
    let Some(dir) = std::env::var_os("FAMILY_DIR").map(PathBuf::from) else {
        eprintln!("set FAMILY_DIR to a directory of tiny-*.gguf (see the module docs)");
        std::process::exit(2);
    };
    let llama = std::env::var("LLAMA_BENCH").ok();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("FAMILY_DIR is readable")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    files.sort();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads())
        .build()
        .expect("pool");
    println!("threads: {}; load before: {}", threads(), load_avg());
    println!();
    println!(
        "| model | load ms qnode / llama.cpp | prefill {PROMPT} tok/s qnode / llama.cpp | ratio | \
         decode {GEN} tok/s qnode / llama.cpp | ratio |"
    );
    println!("|---|---|---|---|---|---|");
    for file in files {
        let name = file.file_stem().unwrap().to_string_lossy().to_string();
        let started = Instant::now();
        let model = LoadedModel::load(&name, &file, Quant::Q8_0, &Device::Cpu).expect("load");
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        let t = &model.transformer;
        let vocab = t.hparams().vocab as u32;
        let pp = pool.install(|| best(|| prefill(t, vocab)));
        let tg = pool.install(|| best(|| decode(t, vocab)));
        let theirs = llama.as_deref().map(|bin| {
            (
                llama_load_ms(bin, &file),
                llama_bench(bin, &file, PROMPT, 0),
                llama_bench(bin, &file, 0, GEN),
            )
        });
        let (lload, lpp, ltg) = theirs.unwrap_or((None, None, None));
        let fmt = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.0}"));
        let ratio = |ours: f64, v: Option<f64>| {
            v.map_or("–".to_string(), |v| format!("{:.2}×", ours / v))
        };
        println!(
            "| {name} | {load_ms:.0} / {} | {pp:.0} / {} | {} | {tg:.0} / {} | {} |",
            fmt(lload),
            fmt(lpp),
            ratio(pp, lpp),
            fmt(ltg),
            ratio(tg, ltg),
        );
    }
    println!();
    println!("load after: {}", load_avg());
}

/// The best of `RUNS` measurements (tok/s): the least disturbed by other work on the machine.
fn best(f: impl Fn() -> f64) -> f64 {
    (0..RUNS).map(|_| f()).fold(0.0, f64::max)
}

fn tokens(n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 100 + (i * 7919) % (vocab - 100))
        .collect()
}

/// Prefill of `PROMPT` tokens into a fresh cache, tok/s (as llama-bench's pp).
fn prefill(t: &Transformer, vocab: u32) -> f64 {
    let prompt = tokens(PROMPT, vocab);
    let mut cache = t.new_cache(PROMPT + GEN + 8);
    let started = Instant::now();
    t.forward(&mut [SeqStep {
        tokens: &prompt,
        cache: &mut cache,
    }])
    .expect("prefill");
    PROMPT as f64 / started.elapsed().as_secs_f64()
}

/// `GEN` one-token steps from an empty cache, tok/s (as llama-bench's tg).
fn decode(t: &Transformer, vocab: u32) -> f64 {
    let ids = tokens(GEN, vocab);
    let mut cache = t.new_cache(PROMPT + GEN + 8);
    let started = Instant::now();
    for id in &ids {
        t.forward(&mut [SeqStep {
            tokens: std::slice::from_ref(id),
            cache: &mut cache,
        }])
        .expect("decode");
    }
    GEN as f64 / started.elapsed().as_secs_f64()
}

/// llama-bench's best tok/s of `RUNS` runs of `-p prompt -n gen`, or `None` (reported) when it
/// fails.
fn llama_bench(bin: &str, model: &Path, prompt: usize, gen: usize) -> Option<f64> {
    let out = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args([
            "-o",
            "json",
            "-r",
            &RUNS.to_string(),
            "-t",
            &threads().to_string(),
        ])
        .args(["-p", &prompt.to_string(), "-n", &gen.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "llama-bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array()?
        .iter()
        .find(|r| r["n_prompt"].as_u64() == Some(prompt as u64))?["samples_ts"]
        .as_array()?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .reduce(f64::max)
}

/// Wall time of a whole `llama-bench -p 1 -n 0 -r 1` process, ms.
fn llama_load_ms(bin: &str, model: &Path) -> Option<f64> {
    let started = Instant::now();
    let ok = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args([
            "-r",
            "1",
            "-t",
            &threads().to_string(),
            "-p",
            "1",
            "-n",
            "0",
        ])
        .output()
        .ok()?
        .status
        .success();
    ok.then(|| started.elapsed().as_secs_f64() * 1e3)
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
