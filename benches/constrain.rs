//! Constrained decoding costs on the real vocabularies of SmolLM2 (49,152 tokens) and Gemma 3
//! (262,144): building a model's token space (once per model), compiling a JSON schema (once
//! per request), and the mask per generated token (every step of a constrained sequence) while
//! writing a valid document token by token.
//!
//! Besides criterion's means, prints the per-token mask time's p50 / p99 / max over the
//! documents, the figure that says whether a mask can hide beside a forward pass, and the
//! aggregate decode rate of 8 concurrent SmolLM2 streams under a JSON schema against 8 free ones
//! (interleaved rounds through the real pool, so machine noise hits both alike).

use futures::executor::block_on;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use qnode::constrain::TokenSpace;
use qnode::engine::{Backend, GenerationEvent, GenerationRequest, PromptInput, SamplingParams};
use qnode::model::gguf::GgufFile;
use qnode::model::tokenizer::GgufTokenizer;
use qnode::types::{ChatMessage, Grammar, OutputConstraint};

const MODELS: [(&str, &str); 2] = [
    ("smollm2", "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("gemma3", "gemma3-270m/gemma-3-270m-q4_k_m.gguf"),
];

const SCHEMA: &str = r#"{"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string"},
    "address": {"type": "object", "properties": {
        "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["city", "zip"], "additionalProperties": false},
    "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}},
    "score": {"type": "number"}},
    "required": ["name", "age", "email", "address", "tags", "score"],
    "additionalProperties": false}"#;

/// Documents valid under [`SCHEMA`] in the layout the engine generates (one line, `", "` and
/// `": "`), so every token of their tokenization is allowed.
const DOCUMENTS: [&str; 3] = [
    r#"{"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "address": {"city": "London", "zip": "12345"}, "tags": ["admin", "user"], "score": 98.5}"#,
    r#"{"name": "Grace Hopper, rear admiral", "age": 85, "email": "grace.hopper@navy.example.org", "address": {"city": "Arlington", "zip": "22201"}, "tags": [], "score": -0.25}"#,
    r#"{"name": "K", "age": 0, "email": "", "address": {"city": "São Paulo 東京", "zip": "00000"}, "tags": ["guest", "guest", "user"], "score": 1e-3}"#,
];

fn tokenizer(file: &str) -> GgufTokenizer {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(file);
    let gguf = GgufFile::open(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (`bash scripts/test.sh` fetches the models, or `python3 models/fetch.py all`)",
            path.display()
        )
    });
    GgufTokenizer::from_gguf(gguf.content()).unwrap()
}

fn schema() -> OutputConstraint {
    OutputConstraint {
        grammar: Grammar::JsonSchema(SCHEMA.into()),
        field: "json_schema".into(),
    }
}

/// Mask time of every token of every document (the first mask, computed at compile, excluded).
fn mask_times(space: &TokenSpace, docs: &[Vec<u32>]) -> Vec<Duration> {
    let mut times = Vec::new();
    for doc in docs {
        let mut c = space.compile(&schema()).unwrap();
        for (i, &t) in doc.iter().enumerate() {
            if i > 0 {
                let started = Instant::now();
                c.prepare();
                times.push(started.elapsed());
            }
            assert!(
                c.allows(t),
                "token {i} ({t}) of a valid document was masked"
            );
            c.advance(t).unwrap();
        }
        assert!(c.is_accepting(), "a whole document is accepted");
    }
    times
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn bench(c: &mut Criterion) {
    for (name, file) in MODELS {
        let tok = tokenizer(file);
        let started = Instant::now();
        let space = TokenSpace::from_tokenizer(&tok).unwrap();
        let build = started.elapsed();
        let docs: Vec<Vec<u32>> = DOCUMENTS
            .iter()
            .map(|d| tok.encode_plain(d, false).unwrap())
            .collect();

        // Warm the lexer caches once, then measure a few passes.
        mask_times(&space, &docs);
        let mut times: Vec<Duration> = (0..5).flat_map(|_| mask_times(&space, &docs)).collect();
        times.sort_unstable();
        println!(
            "{name}: vocab {}, token space built in {:.0} ms; mask per token over {} tokens: \
             p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
            tok.vocab_size(),
            build.as_secs_f64() * 1e3,
            times.len(),
            percentile(&times, 0.5).as_secs_f64() * 1e6,
            percentile(&times, 0.99).as_secs_f64() * 1e6,
            times.last().unwrap().as_secs_f64() * 1e6,
        );

        let mut g = c.benchmark_group("constrain");
        g.sample_size(20);
        g.bench_with_input(BenchmarkId::new("compile_schema", name), &(), |b, _| {
            b.iter(|| black_box(space.compile(&schema()).unwrap()))
        });
        let tokens: usize = docs.iter().map(|d| d.len()).sum();
        g.bench_with_input(
            BenchmarkId::new(format!("mask_all_{tokens}_tokens"), name),
            &(),
            |b, _| b.iter(|| black_box(mask_times(&space, &docs))),
        );
        g.finish();
    }
}

/// One round: 8 concurrent chat requests (seeded sampling, 64 tokens at most), constrained by
/// `constraint` or free. Returns (tokens generated, wall time).
fn round(pool: &qnode::pool::ModelPool, constraint: Option<&OutputConstraint>) -> (u32, Duration) {
    let started = Instant::now();
    let streams: Vec<_> = (0..8u64)
        .map(|i| {
            block_on(pool.submit(GenerationRequest {
                request_id: format!("bench-{i}"),
                model: "smollm2".into(),
                input: PromptInput::Chat(vec![ChatMessage {
                    role: "user".into(),
                    content: format!("Describe person number {i} as JSON."),
                    ..Default::default()
                }]),
                sampling: SamplingParams {
                    temperature: 0.8,
                    seed: Some(i),
                    ..SamplingParams::default()
                },
                max_tokens: 64,
                stop: vec![],
                deadline: None,
                cache_policy: Default::default(),
                tenant: None,
                session: None,
                constraint: constraint.cloned(),
                logprobs: None,
                chat_template_kwargs: Default::default(),
                tools: None,
            }))
            .unwrap()
        })
        .collect();
    let mut tokens = 0;
    for mut rx in streams {
        while let Some(ev) = rx.blocking_recv() {
            if let GenerationEvent::Finished(done) = ev.unwrap() {
                tokens += done.completion_tokens;
            }
        }
    }
    (tokens, started.elapsed())
}

fn aggregate_rate() {
    std::env::set_var(
        "QNODE_MODELS_DIR",
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"),
    );
    let mut model = qnode::config::ModelConfig::new("smollm2");
    model.max_batch = 8;
    let metrics = qnode::metrics::Metrics::new().unwrap();
    let pool = qnode::pool::ModelPool::new(
        &[model],
        qnode::pool::metrics::PoolMetrics::register(metrics.registry()).unwrap(),
        candle_core::Device::Cpu,
    )
    .unwrap();
    pool.load_all().unwrap();
    // Long strings so constrained streams run to max_tokens like free ones do.
    let schema = OutputConstraint {
        grammar: Grammar::JsonSchema(
            r#"{"type": "object", "properties": {"name": {"type": "string"},
                "bio": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "bio", "age"]}"#
                .into(),
        ),
        field: "json_schema".into(),
    };
    round(&pool, Some(&schema)); // builds the token space and warms up
    let (mut free, mut constrained) = ((0u32, Duration::ZERO), (0u32, Duration::ZERO));
    for _ in 0..3 {
        let (t, d) = round(&pool, None);
        free = (free.0 + t, free.1 + d);
        let (t, d) = round(&pool, Some(&schema));
        constrained = (constrained.0 + t, constrained.1 + d);
    }
    let rate = |(t, d): (u32, Duration)| f64::from(t) / d.as_secs_f64();
    println!(
        "smollm2, 8 streams: free {:.1} tok/s ({} tokens), JSON schema {:.1} tok/s ({} tokens): \
         ratio {:.3}",
        rate(free),
        free.0,
        rate(constrained),
        constrained.0,
        rate(constrained) / rate(free)
    );
    pool.shutdown();
}

fn bench_aggregate(_: &mut Criterion) {
    aggregate_rate();
}

criterion_group!(benches, bench, bench_aggregate);
criterion_main!(benches);
