//! `qnode bench`: a load generator for a running node, measuring what batching and instances buy.
//!
//! For each concurrency level C, C workers share a fixed list of requests (streaming chat, greedy,
//! answer cache bypassed) and the level reports aggregate generated tokens per second, latency and
//! time to first token percentiles, and errors. The shape follows the llama-server figures in
//! `ANCHORS.md` (16 requests per level, ~40-token chat prompt, 64 new tokens), so the two can be
//! compared as ratios on the same machine.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use qnode::grpc::proto::inference_client::InferenceClient;
use qnode::grpc::proto::{CachePolicy, ChatMessage, GenerateRequest};
use tonic::transport::Channel;

/// Flags of `qnode bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Node address.
    #[arg(
        long,
        default_value = "http://127.0.0.1:50051",
        env = "QNODE_BENCH_ADDR"
    )]
    addr: String,
    /// Model id to request.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Concurrency levels, comma separated; each level is measured on its own.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    concurrency: Vec<usize>,
    /// Requests per level, shared among the level's workers.
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// New tokens per request (greedy; a request may stop earlier at end of sequence).
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Ask for each token's log-probability and this many alternatives (`logprobs` +
    /// `top_logprobs`, 0..=20), to measure what they cost. Absent: not asked (nothing computed).
    #[arg(long)]
    top_logprobs: Option<u32>,
    /// Unmeasured requests sent one at a time before the first level (warms caches and pages).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Give up on one request after this many seconds (counted as an error).
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Replay multi-turn conversations over OpenAI-compatible HTTP instead: `--concurrency`
    /// conversations at once, `--turns` turns each, every turn the whole history.
    #[arg(long)]
    multi_turn: bool,
    /// `NAME=URL` of an OpenAI-compatible server (`http://`) or a qnode gRPC endpoint
    /// (`grpc://host:port`) for `--multi-turn` (repeatable; servers are measured interleaved).
    /// Default: `qnode=http://127.0.0.1:8080`.
    #[arg(long = "server")]
    servers: Vec<String>,
    /// Turns per conversation (`--multi-turn`).
    #[arg(long, default_value_t = 12)]
    turns: usize,
    /// Greedy tokens per reply (`--multi-turn`).
    #[arg(long, default_value_t = 32)]
    reply_tokens: u32,
    /// `NAME=PID` of a server process whose resident memory is reported (`--multi-turn`;
    /// repeatable).
    #[arg(long = "watch-pid")]
    watch_pids: Vec<String>,
    /// Varies the replayed conversations' text (`--multi-turn`): runs with different salts
    /// share no history, so a soak of many runs never hits a previous run's prefixes.
    #[arg(long, default_value_t = 0)]
    replay_salt: usize,
    /// Sweep the semantic cache tier's threshold on a labelled set of question pairs instead (no
    /// node needed): hit and false-hit rates with 95 % intervals, guard off and on, and what an
    /// embedding costs.
    #[arg(long)]
    semantic: bool,
    /// Labelled pairs for `--semantic`.
    #[arg(long, default_value = "tests/data/semantic_pairs.tsv")]
    pairs: std::path::PathBuf,
    /// Sentence encoder for `--semantic`: a directory, an encoder id of the manifest
    /// (`minilm-l6`, `m3e-small`) or `hf:OWNER/REPO`.
    #[arg(long, default_value = "models/minilm-l6")]
    encoder: std::path::PathBuf,
    /// Thresholds reported by `--semantic`, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.70,0.75,0.78,0.80,0.82,0.85,0.88,0.90,0.92,0.95"
    )]
    thresholds: Vec<f32>,
    /// Timed passes over every distinct text of the pairs (`--semantic`).
    #[arg(long, default_value_t = 3)]
    embed_rounds: usize,
    /// Replay a Zipf-distributed hot-question workload (the `--pairs` questions, their
    /// paraphrases and near-misses) against a node's OpenAI front instead: what the cache tiers
    /// answer, how fast, and their false hits. `--requests` in all, the first `--concurrency`
    /// level at once, `--max-tokens` each, against the first `--server` (default
    /// `http://127.0.0.1:8080`).
    #[arg(long)]
    hot_replay: bool,
    /// Zipf exponent of topic popularity (`--hot-replay`).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Seed of the topic ranking and the draws (`--hot-replay`).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Include the Chinese topics (`--hot-replay`; the shipped encoder is English-only).
    #[arg(long)]
    chinese: bool,
}

/// `NAME=VALUE` pairs of a repeatable flag.
fn pairs(flag: &str, values: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    values
        .iter()
        .map(|v| {
            v.split_once('=')
                .map(|(n, u)| (n.to_string(), u.to_string()))
                .with_context(|| format!("--{flag} {v:?}: expected NAME=VALUE"))
        })
        .collect()
}

fn replay(args: &BenchArgs) -> anyhow::Result<super::multiturn::Replay> {
    let mut servers = pairs("server", &args.servers)?;
    if servers.is_empty() {
        servers.push(("qnode".into(), "http://127.0.0.1:8080".into()));
    }
    let watch = pairs("watch-pid", &args.watch_pids)?
        .into_iter()
        .map(|(n, p)| {
            p.parse::<u32>()
                .map(|p| (n, p))
                .with_context(|| format!("--watch-pid: {p:?} is not a process id"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(super::multiturn::Replay {
        servers,
        model: args.model.clone(),
        conversations: args.concurrency.clone(),
        turns: args.turns,
        reply_tokens: args.reply_tokens,
        watch,
        timeout: Duration::from_secs(args.timeout_secs),
        salt: args.replay_salt,
    })
}

/// Topics of the prompts. Each request asks about a different one, so no two requests of a level
/// share an answer even where the cache policy would be ignored.
const TOPICS: &[&str] = &[
    "photosynthesis",
    "plate tectonics",
    "the water cycle",
    "black holes",
    "vaccines",
    "the stock market",
    "volcanoes",
    "electric motors",
    "the internet",
    "honey bees",
    "ocean tides",
    "solar panels",
    "the immune system",
    "rainbows",
    "earthquakes",
    "compilers",
    "glaciers",
    "coral reefs",
    "batteries",
    "the moon landing",
    "bread baking",
    "hurricanes",
    "DNA",
    "airplane wings",
];

/// The chat turn of request `i`: a dozen words of user text, which SmolLM2's template (its default
/// system turn included) renders to about 40 tokens, like the llama-server runs of `ANCHORS.md`;
/// "in detail" keeps most greedy answers going to `max_tokens`.
fn question(i: usize) -> String {
    let topic = TOPICS[i % TOPICS.len()];
    let round = i / TOPICS.len();
    let suffix = if round == 0 {
        String::new()
    } else {
        format!(" (variant {round})")
    };
    format!("Explain {topic} in detail, with an everyday example{suffix}.")
}

/// What one measured request produced.
struct Sample {
    latency: Duration,
    /// Until the first chunk carrying text; `None` when no text came.
    ttft: Option<Duration>,
    completion_tokens: u64,
    prompt_tokens: u64,
}

/// The results of one concurrency level.
struct Level {
    concurrency: usize,
    samples: Vec<Sample>,
    /// gRPC status code name (or `TIMEOUT`) → count.
    errors: BTreeMap<String, usize>,
    wall: Duration,
    load_before: Option<f64>,
    load_after: Option<f64>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.semantic {
        super::semantic::run(super::semantic::Sweep {
            pairs: args.pairs,
            encoder: args.encoder,
            thresholds: args.thresholds,
            rounds: args.embed_rounds,
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.concurrency.contains(&0) || args.requests == 0 {
        anyhow::bail!("--concurrency levels and --requests must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if args.hot_replay {
        let url = match pairs("server", &args.servers)?.into_iter().next() {
            Some((_, url)) => url,
            None => "http://127.0.0.1:8080".into(),
        };
        rt.block_on(super::hot_replay::run(super::hot_replay::HotReplay {
            url,
            model: args.model.clone(),
            pairs: args.pairs.clone(),
            requests: args.requests,
            concurrency: args.concurrency[0],
            zipf: args.zipf,
            seed: args.seed,
            max_tokens: args.max_tokens,
            chinese: args.chinese,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.multi_turn {
        let replay = replay(&args)?;
        rt.block_on(super::multiturn::run(replay))?;
        return Ok(ExitCode::SUCCESS);
    }
    rt.block_on(run_async(args))
}

async fn run_async(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let channel = tonic::transport::Endpoint::from_shared(args.addr.clone())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    let client = InferenceClient::new(channel);
    let timeout = Duration::from_secs(args.timeout_secs);

    for i in 0..args.warmup {
        let request = make_request(
            &args,
            format!("bench-warmup-{i}"),
            "Say hello and tell me what you can do.".to_owned(),
        );
        one_request(client.clone(), request, timeout)
            .await
            .map_err(|code| anyhow::anyhow!("warmup request failed: {code}"))?;
    }

    let mut levels = Vec::new();
    for &c in &args.concurrency {
        let level = run_level(&client, &args, c, timeout).await;
        eprintln!(
            "C={c}: {} ok, {} errors, {:.1} s",
            level.samples.len(),
            level.errors.values().sum::<usize>(),
            level.wall.as_secs_f64()
        );
        levels.push(level);
    }
    print_table(&args, &levels);
    Ok(ExitCode::SUCCESS)
}

fn make_request(args: &BenchArgs, request_id: String, content: String) -> GenerateRequest {
    GenerateRequest {
        model: args.model.clone(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content,
            ..Default::default()
        }],
        max_tokens: Some(args.max_tokens),
        temperature: Some(0.0),
        cache_policy: CachePolicy::Bypass.into(),
        request_id,
        logprobs: args.top_logprobs.is_some(),
        top_logprobs: args.top_logprobs,
        ..Default::default()
    }
}

/// Run `args.requests` requests with `c` workers taking the next index from a shared counter.
async fn run_level(
    client: &InferenceClient<Channel>,
    args: &BenchArgs,
    c: usize,
    timeout: Duration,
) -> Level {
    let next = Arc::new(AtomicUsize::new(0));
    let requests: Arc<Vec<GenerateRequest>> = Arc::new(
        (0..args.requests)
            .map(|i| make_request(args, format!("bench-c{c}-{i}"), question(i)))
            .collect(),
    );
    let load_before = load_average();
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..c {
        let next = next.clone();
        let client = client.clone();
        let requests = requests.clone();
        workers.spawn(async move {
            let mut results = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(request) = requests.get(i) else {
                    break;
                };
                results.push(one_request(client.clone(), request.clone(), timeout).await);
            }
            results
        });
    }
    let mut samples = Vec::new();
    let mut errors = BTreeMap::new();
    while let Some(joined) = workers.join_next().await {
        let results = joined.unwrap_or_else(|e| vec![Err(format!("WORKER_FAILED: {e}"))]);
        for result in results {
            match result {
                Ok(sample) => samples.push(sample),
                Err(code) => *errors.entry(code).or_insert(0) += 1,
            }
        }
    }
    Level {
        concurrency: c,
        samples,
        errors,
        wall: start.elapsed(),
        load_before,
        load_after: load_average(),
    }
}

/// One streaming call; an error is the status code's name, so a level can tally them.
async fn one_request(
    mut client: InferenceClient<Channel>,
    request: GenerateRequest,
    timeout: Duration,
) -> Result<Sample, String> {
    let start = Instant::now();
    let call = async {
        let mut stream = client.generate_stream(request).await?.into_inner();
        let mut ttft = None;
        let mut usage = None;
        while let Some(chunk) = stream.message().await? {
            if ttft.is_none() && !chunk.text.is_empty() {
                ttft = Some(start.elapsed());
            }
            if chunk.finish_reason.is_some() {
                usage = chunk.usage;
            }
        }
        Ok::<_, tonic::Status>((ttft, usage))
    };
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err("TIMEOUT".to_owned()),
        Ok(Err(status)) => Err(format!("{:?}", status.code())),
        Ok(Ok((ttft, usage))) => {
            let usage = usage.ok_or_else(|| "NO_FINAL_CHUNK".to_owned())?;
            Ok(Sample {
                latency: start.elapsed(),
                ttft,
                completion_tokens: usage.completion_tokens.into(),
                prompt_tokens: usage.prompt_tokens.into(),
            })
        }
    }
}

/// Nearest-rank percentile (`p` in 0..=100) of an unsorted list; `None` when empty.
fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The 1-minute load average, so a noisy run can be recognised and repeated (Linux only).
pub(super) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.0}", d.as_secs_f64() * 1e3),
    )
}

fn print_table(args: &BenchArgs, levels: &[Level]) {
    let logprobs = match args.top_logprobs {
        None => "no logprobs".to_owned(),
        Some(n) => format!("logprobs with top {n}"),
    };
    println!(
        "model `{}`, {} requests per level, max_tokens {}, greedy, streaming, cache bypassed, {}\n",
        args.model, args.requests, args.max_tokens, logprobs
    );
    println!(
        "| C | ok | errors | aggregate gen tok/s | latency p50 / p95 ms | TTFT p50 / p95 ms \
         | tokens/req (prompt, gen) | wall s | load 1m before → after |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for level in levels {
        let latencies: Vec<Duration> = level.samples.iter().map(|s| s.latency).collect();
        let ttfts: Vec<Duration> = level.samples.iter().filter_map(|s| s.ttft).collect();
        let generated: u64 = level.samples.iter().map(|s| s.completion_tokens).sum();
        let prompt: u64 = level.samples.iter().map(|s| s.prompt_tokens).sum();
        let n = level.samples.len().max(1) as f64;
        let errors = if level.errors.is_empty() {
            "0".to_owned()
        } else {
            level
                .errors
                .iter()
                .map(|(code, count)| format!("{count} {code}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let load = |l: Option<f64>| l.map_or_else(|| "-".to_owned(), |l| format!("{l:.2}"));
        println!(
            "| {} | {} | {} | {:.1} | {} / {} | {} / {} | {:.0}, {:.1} | {:.2} | {} → {} |",
            level.concurrency,
            level.samples.len(),
            errors,
            generated as f64 / level.wall.as_secs_f64().max(1e-9),
            ms(percentile(&latencies, 50.0)),
            ms(percentile(&latencies, 95.0)),
            ms(percentile(&ttfts, 50.0)),
            ms(percentile(&ttfts, 95.0)),
            prompt as f64 / n,
            generated as f64 / n,
            level.wall.as_secs_f64(),
            load(level.load_before),
            load(level.load_after),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<Duration> = (1..=16).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Some(Duration::from_millis(8)));
        assert_eq!(percentile(&v, 95.0), Some(Duration::from_millis(16)));
        assert_eq!(percentile(&v, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn questions_differ_per_request() {
        let qs: std::collections::HashSet<String> = (0..64).map(question).collect();
        assert_eq!(qs.len(), 64);
    }
}
