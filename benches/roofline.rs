//! Roofline report: this machine's limits, and the model's speed as a fraction of them.
//!
//! `cargo bench --bench roofline` measures
//! - **read bandwidth**: a multi-threaded streaming read of a 512 MiB buffer (far beyond any cache),
//!   1 and 2 threads, best of several passes;
//! - **int8 peak**: a dot-product micro-kernel that never leaves registers (AVX-512 VNNI
//!   `vpdpbusd` when the CPU has it, else AVX2 `vpmaddubsw`/`vpmaddwd`), 1 and 2 threads, counting
//!   2 ops (multiply + add) per int8 MAC;
//!
//! then runs SmolLM2-135M (the real file, requantized to Q8_0 at load) on a 2-thread pool, as one
//! model instance does: decode of one stream (B = 1), decode of 8 streams batched (B = 8), and
//! prefill of 128 and 512 tokens. Each is printed as a fraction of its roofline:
//! - decode: `weight bytes × steps/s ÷ bandwidth`, weight bytes = every matrix a step reads (all
//!   layers and the output head, Q8_0: 34 bytes per 32 weights); batched decode reads them once
//!   per step for B tokens, so its roofline is B × the single-stream one;
//! - prefill: `2 × params × tok/s ÷ int8 peak`, params = the layers' matrices (the head runs for
//!   the last token only); attention's own work is not counted, so long prompts sit lower.
//!
//! Arguments (after `--`): `depth` adds prefill of 512 tokens and decode after 2048 / 4096 tokens
//! of context (slow before the tiled attention: minutes); `threads=N` sets the pool (default 2);
//! `kv=q8_keys`, `kv=q8` (or `f32`) sets the KV cache type (default f16), and llama.cpp then runs
//! with the matching `-ctk q8_0` (and `-ctv q8_0`); `profile=SECS` only loops a prefill of 512 tokens (after `at=DEPTH`
//! tokens of context, default 0) for `perf record`, printing the best and median rates; with
//! `decode` beside it, it loops decode of one stream after `at=DEPTH` tokens instead.
//! With `LLAMA_BENCH=/path/to/llama-bench` and `LLAMA_MODEL=/path/to/SmolLM2...Q8_0.gguf` the
//! same run also runs llama.cpp's `llama-bench` (same thread count) right after each of our
//! measurements and prints each of ours as a ratio to it, so both see the same machine load.

use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::Device;
use qnode::model::hparams::HParams;
use qnode::model::kernels::{isa, isa_report};
use qnode::model::kv_cache::KvDtype;
use qnode::model::loaded::LoadedModel;
use qnode::model::quantize::Quant;
use qnode::model::transformer::{SeqStep, Transformer};

const MODEL: &str = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Bytes streamed by the bandwidth probe.
const BW_BYTES: usize = 512 << 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let depth = args.iter().any(|a| a == "depth");
    let threads = args
        .iter()
        .find_map(|a| a.strip_prefix("threads=")?.parse().ok())
        .unwrap_or(2usize);
    let kv: KvDtype = args
        .iter()
        .find_map(|a| a.strip_prefix("kv="))
        .map(|s| s.parse().unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_default();
    if !Path::new(MODEL).exists() {
        eprintln!(
            "{MODEL} is missing: `bash scripts/test.sh` fetches it (or `python3 models/fetch.py all`)"
        );
        std::process::exit(2);
    }
    if let Some(secs) = args
        .iter()
        .find_map(|a| a.strip_prefix("profile=")?.parse::<u64>().ok())
    {
        let at = args
            .iter()
            .find_map(|a| a.strip_prefix("at=")?.parse().ok())
            .unwrap_or(0);
        if args.iter().any(|a| a == "decode") {
            profile_decode(threads, secs, kv, at);
        } else {
            profile_prefill(threads, secs, kv, at);
        }
        return;
    }
    println!("# Roofline report");
    println!("cpu: {}", cpu_line());
    println!("kernel path: {} ({})", isa(), isa_report());
    println!("load before: {}", load_avg());

    let bw1 = bandwidth(1);
    let bw = bandwidth(threads);
    let (peak_kind, peak1) = int8_peak(1);
    let (_, peak) = int8_peak(threads);
    println!();
    println!("| limit | 1 thread | {threads} threads |");
    println!("|---|---|---|");
    println!(
        "| streaming read bandwidth | {:.1} GB/s | {:.1} GB/s |",
        bw1 / 1e9,
        bw / 1e9
    );
    println!(
        "| int8 peak ({peak_kind}, in registers) | {:.0} GOPS | {:.0} GOPS |",
        peak1 / 1e9,
        peak / 1e9
    );

    let model = LoadedModel::load("smollm2", Path::new(MODEL), Quant::Q8_0, &Device::Cpu)
        .expect("load")
        .with_kv_dtype(kv);
    let t = &model.transformer;
    let hp = t.hparams();
    println!("KV cache: {}", kv.as_str());
    let (layer_params, head_params) = matrix_params(hp);
    let step_bytes = (layer_params + head_params) as f64 * 34.0 / 32.0;
    println!();
    println!(
        "model: SmolLM2-135M as Q8_0; layer matrices {:.1} M params, head {:.1} M; a decode step \
         reads {:.1} MB of weights",
        layer_params as f64 / 1e6,
        head_params as f64 / 1e6,
        step_bytes / 1e6
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    let llama = Llama::from_env(threads, kv);

    println!();
    println!("| workload | qnode tok/s | roofline tok/s | fraction of roofline | llama.cpp tok/s | qnode / llama.cpp |");
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, tok_s: f64, roof: f64, llama_args: Option<(usize, usize, usize)>| {
        let theirs = llama_args.and_then(|(p, n, d)| llama.as_ref()?.run(p, n, d));
        let (l, r) = match theirs {
            Some(l) => (format!("{l:.1}"), format!("{:.2}×", tok_s / l)),
            None => ("–".into(), "–".into()),
        };
        println!(
            "| {name} | {tok_s:.1} | {roof:.0} | {:.1} % | {l} | {r} |",
            100.0 * tok_s / roof
        );
    };
    let decode_roof = bw / step_bytes;
    let prefill_roof = peak / (2.0 * layer_params as f64);
    let d1 = pool.install(|| decode(t, 1, 0));
    row("decode B=1", d1, decode_roof, Some((0, 64, 0)));
    let d8 = pool.install(|| decode(t, 8, 0));
    row("decode B=8 (aggregate)", d8, 8.0 * decode_roof, None);
    let p128 = pool.install(|| prefill(t, 128, 0));
    row("prefill 128", p128, prefill_roof, Some((128, 0, 0)));
    let p512 = pool.install(|| prefill(t, 512, 0));
    row("prefill 512", p512, prefill_roof, Some((512, 0, 0)));
    if depth {
        for d in [2048usize, 4096] {
            let p = pool.install(|| prefill(t, 512, d));
            row(
                &format!("prefill 512 @ depth {d}"),
                p,
                prefill_roof,
                Some((512, 0, d)),
            );
            println!(
                "|   (prefill @ {d} ÷ prefill 512 @ 0) | {:.2} | | | | |",
                p / p512
            );
            let dd = pool.install(|| decode(t, 1, d));
            row(
                &format!("decode B=1 @ depth {d}"),
                dd,
                decode_roof,
                Some((0, 64, d)),
            );
            println!("|   (decode @ {d} ÷ decode @ 0) | {:.2} | | | | |", dd / d1);
        }
    }
    println!();
    println!("load after: {}", load_avg());
}

/// `profile=SECS`: prefill 512 tokens over and over for SECS seconds and nothing else, for
/// `perf record` to attribute a prefill step's time.
fn profile_prefill(threads: usize, secs: u64, kv: KvDtype, at: usize) {
    let (model, pool) = model_and_pool(threads, kv);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut rates = Vec::new();
    while Instant::now() < until {
        rates.push(pool.install(|| prefill(&model.transformer, 512, at)));
    }
    report_rounds(
        &format!("prefill 512 (each the best of {PREFILL_RUNS})"),
        rates,
    );
}

/// The model on a pool of `threads`, for the profile modes.
fn model_and_pool(threads: usize, kv: KvDtype) -> (LoadedModel, rayon::ThreadPool) {
    let model = LoadedModel::load("smollm2", Path::new(MODEL), Quant::Q8_0, &Device::Cpu)
        .expect("load")
        .with_kv_dtype(kv);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    (model, pool)
}

/// Prints the best and median of the rounds' tok/s.
fn report_rounds(what: &str, mut rates: Vec<f64>) {
    rates.sort_by(f64::total_cmp);
    println!(
        "{} rounds of {what}: best {:.1} tok/s, median {:.1}",
        rates.len(),
        rates[rates.len() - 1],
        rates[rates.len() / 2]
    );
}

/// `profile=SECS decode`: decode one stream after `at=DEPTH` tokens of context, 64 steps at a
/// time over and over for SECS seconds, for `perf record` to attribute a decode step's time.
fn profile_decode(threads: usize, secs: u64, kv: KvDtype, at: usize) {
    let (model, pool) = model_and_pool(threads, kv);
    let t = &model.transformer;
    const STEPS: usize = 64;
    let mut cache = t.new_cache(at + STEPS + 8);
    pool.install(|| fill(t, std::slice::from_mut(&mut cache), at));
    let next = [1234u32];
    let until = Instant::now() + Duration::from_secs(secs);
    let mut rates = Vec::new();
    while Instant::now() < until {
        cache.truncate(at);
        let started = Instant::now();
        for _ in 0..STEPS {
            let step = SeqStep {
                tokens: &next,
                cache: &mut cache,
            };
            pool.install(|| black_box(t.forward(&mut [step]).expect("forward")));
        }
        rates.push(STEPS as f64 / started.elapsed().as_secs_f64());
    }
    report_rounds(&format!("decode @ {at} ({STEPS} steps each)"), rates);
}

/// Parameters of the matrices: (all layers, output head).
fn matrix_params(hp: &HParams) -> (usize, usize) {
    let q = hp.n_head * hp.head_dim;
    let kv = hp.n_kv_head * hp.head_dim;
    let per_layer = hp.hidden * (q + 2 * kv) + q * hp.hidden + 3 * hp.hidden * hp.ffn;
    (hp.n_layer * per_layer, hp.vocab * hp.hidden)
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 200 + (i * 37 + salt * 11) % 40_000)
        .collect()
}

/// Fills `caches` with `depth` tokens each, in chunks of 512.
fn fill(t: &Transformer, caches: &mut [qnode::model::kv_cache::KvCache], depth: usize) {
    for (b, cache) in caches.iter_mut().enumerate() {
        let p = prompt(depth, b as u32 + 1);
        for chunk in p.chunks(512) {
            t.forward(&mut [SeqStep {
                tokens: chunk,
                cache,
            }])
            .expect("forward");
        }
    }
}

/// Aggregate decode tok/s of `batch` streams after `depth` tokens (16 if 0), best of 3 runs of
/// 64 steps.
fn decode(t: &Transformer, batch: usize, depth: usize) -> f64 {
    const STEPS: usize = 64;
    let depth = depth.max(16);
    let mut caches: Vec<_> = (0..batch)
        .map(|_| t.new_cache(depth + 3 * STEPS + 8))
        .collect();
    fill(t, &mut caches, depth);
    let next = [1234u32];
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        for _ in 0..STEPS {
            let mut steps: Vec<SeqStep> = caches
                .iter_mut()
                .map(|cache| SeqStep {
                    tokens: &next,
                    cache,
                })
                .collect();
            black_box(t.forward(&mut steps).expect("forward"));
        }
        best = best.min(started.elapsed());
    }
    (batch * STEPS) as f64 / best.as_secs_f64()
}

/// Runs of a prefill at depth 0 (each ~0.1 s); the best is reported. Quiet runs on the 2-core VMs
/// here move ±30 % from one to the next, so a best of 3 mostly measured the VM.
const PREFILL_RUNS: usize = 10;

/// Prefill tok/s of `len` tokens in one step after `depth` tokens of context: the best of
/// [`PREFILL_RUNS`] at depth 0, of 2 at depth (each of those runs takes seconds).
fn prefill(t: &Transformer, len: usize, depth: usize) -> f64 {
    let mut cache = t.new_cache(depth + len + 8);
    fill(t, std::slice::from_mut(&mut cache), depth);
    let p = prompt(len, 99);
    let mut best = Duration::MAX;
    let runs = if depth > 0 { 2 } else { PREFILL_RUNS };
    for _ in 0..runs {
        cache_truncate(t, &mut cache, depth);
        let started = Instant::now();
        black_box(
            t.forward(&mut [SeqStep {
                tokens: &p,
                cache: &mut cache,
            }])
            .expect("forward"),
        );
        best = best.min(started.elapsed());
    }
    len as f64 / best.as_secs_f64()
}

/// Puts `cache` back at `depth` tokens: cleared and refilled (the cache has no truncate).
fn cache_truncate(t: &Transformer, cache: &mut qnode::model::kv_cache::KvCache, depth: usize) {
    if cache.len() == depth {
        return;
    }
    cache.clear();
    fill(t, std::slice::from_mut(cache), depth);
}

/// Bytes/s of a streaming read by `threads` threads over [`BW_BYTES`], best of 5 passes.
fn bandwidth(threads: usize) -> f64 {
    let buf = vec![1u8; BW_BYTES];
    let chunk = BW_BYTES / threads;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        std::thread::scope(|s| {
            for part in buf.chunks(chunk) {
                s.spawn(move || black_box(read_sum(part)));
            }
        });
        best = best.min(started.elapsed().as_secs_f64());
    }
    BW_BYTES as f64 / best
}

/// Sums `buf` as u64 words with 8 independent accumulators (the compiler vectorizes it).
fn read_sum(buf: &[u8]) -> u64 {
    let mut acc = [0u64; 8];
    for c in buf.chunks_exact(64) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = a.wrapping_add(u64::from_le_bytes(
                c[l * 8..l * 8 + 8].try_into().expect("8 bytes"),
            ));
        }
    }
    acc.iter().fold(0, |a, b| a.wrapping_add(*b))
}

/// int8 ops/s (2 per MAC) of an in-register dot-product loop on `threads` threads.
fn int8_peak(threads: usize) -> (&'static str, f64) {
    const ITERS: u64 = 20_000_000;
    #[cfg(target_arch = "x86_64")]
    let (kind, ops_per_iter, f): (&str, u64, fn(u64) -> i32) =
        if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bw") {
            ("AVX-512 VNNI vpdpbusd", 12 * 64 * 2, |n| unsafe {
                vnni512(n)
            })
        } else if is_x86_feature_detected!("avx2") {
            ("AVX2 vpmaddubsw+vpmaddwd", 12 * 32 * 2, |n| unsafe {
                avx2(n)
            })
        } else {
            return ("none", 0.0);
        };
    #[cfg(not(target_arch = "x86_64"))]
    return ("none", 0.0);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| black_box(f(black_box(ITERS))));
            }
        });
        best = best.min(started.elapsed().as_secs_f64());
    }
    (kind, (threads as u64 * ITERS * ops_per_iter) as f64 / best)
}

/// `n` iterations of 12 independent `vpdpbusd` chains (12 × 64 MACs per iteration).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni512(n: u64) -> i32 {
    use core::arch::x86_64::*;
    let a = _mm512_set1_epi8(3);
    let b = _mm512_set1_epi8(-2);
    let mut acc = [_mm512_setzero_si512(); 12];
    for _ in 0..n {
        for v in acc.iter_mut() {
            *v = _mm512_dpbusd_epi32(*v, a, b);
        }
    }
    let mut s = acc[0];
    for v in &acc[1..] {
        s = _mm512_add_epi32(s, *v);
    }
    _mm512_reduce_add_epi32(s)
}

/// `n` iterations of 12 independent `vpmaddubsw` + `vpmaddwd` + add chains (12 × 32 MACs).
/// Each chain multiplies its own accumulator (read as bytes): with constant operands the
/// products are loop-invariant, the compiler hoists them and the loop measures only adds (it
/// reported 36,000 GOPS on a 2-core Zen 3).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2(n: u64) -> i32 {
    use core::arch::x86_64::*;
    let a = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc: [__m256i; 12] = std::array::from_fn(|i| _mm256_set1_epi8(i as i8 - 6));
    for _ in 0..n {
        for v in acc.iter_mut() {
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(a, *v), ones);
            *v = _mm256_add_epi32(*v, p);
        }
    }
    let mut out = [0i32; 8];
    let mut s = acc[0];
    for v in &acc[1..] {
        s = _mm256_add_epi32(s, *v);
    }
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, s);
    out.iter().sum()
}

fn cpu_line() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = info
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags")?.split(':').nth(1))
        .unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    format!(
        "{name}, {} logical CPUs; avx512_vnni {}, avx_vnni {}, amx_int8 {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        yes(has("avx512_vnni")),
        yes(has("avx_vnni")),
        yes(has("amx_int8"))
    )
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// llama.cpp's `llama-bench`, run per measurement when configured.
struct Llama {
    bin: String,
    model: String,
    threads: usize,
    /// `-ctk` and `-ctv` matching our KV cache type.
    cache_k: &'static str,
    cache_v: &'static str,
}

impl Llama {
    fn from_env(threads: usize, kv: KvDtype) -> Option<Self> {
        let bin = std::env::var("LLAMA_BENCH").ok()?;
        let model = std::env::var("LLAMA_MODEL").ok()?;
        for p in [&bin, &model] {
            if !Path::new(p).exists() {
                eprintln!("{p} does not exist (LLAMA_BENCH / LLAMA_MODEL)");
                std::process::exit(2);
            }
        }
        let (cache_k, cache_v) = match kv {
            KvDtype::F16 => ("f16", "f16"),
            KvDtype::F32 => ("f32", "f32"),
            KvDtype::Q8Keys => ("q8_0", "f16"),
            KvDtype::Q8 => ("q8_0", "q8_0"),
        };
        Some(Self {
            bin,
            model,
            threads,
            cache_k,
            cache_v,
        })
    }

    /// tok/s of `-p prompt -n gen -d depth` (one of prompt/gen is 0), or `None` on failure
    /// (reported).
    fn run(&self, prompt: usize, gen: usize, depth: usize) -> Option<f64> {
        let out = Command::new(&self.bin)
            .args(["-m", &self.model, "-o", "json", "-r", "3"])
            .args(["-t", &self.threads.to_string()])
            .args(["-p", &prompt.to_string(), "-n", &gen.to_string()])
            .args(["-d", &depth.to_string()])
            .args(["-ctk", self.cache_k, "-ctv", self.cache_v])
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
        v.as_array()?.iter().find(|r| {
            r["n_prompt"].as_u64() == Some(prompt as u64) && r["n_gen"].as_u64() == Some(gen as u64)
        })?["avg_ts"]
            .as_f64()
    }
}
