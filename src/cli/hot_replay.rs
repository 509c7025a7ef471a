//! `qnode bench --hot-replay`: a hot-question workload against a running node's OpenAI front,
//! to see what the answer cache (exact tiers and, when the node has it on, the semantic tier)
//! answers, how fast, and how often it answers the wrong question.
//!
//! The questions come from the labelled pairs (`tests/data/semantic_pairs.tsv`): every stored
//! question is a topic, its label-1 partners are its paraphrases and its label-0 partners its
//! near-misses (a negation, another entity, another number, another intent). Topics are ranked in
//! a seeded random order and drawn Zipf-distributed (weight 1/rank^s); each draw asks the topic's
//! own words ([`ASK_STORED`]), one of its paraphrases ([`ASK_PARAPHRASE`]) or one of its
//! near-misses (the rest), so the popular questions come back in other words and with traps.
//!
//! Whether a cached answer was right is known without trusting the node: every text has a meaning
//! class (texts joined by label-1 pairs share one), every answer the model generates during the
//! run is recorded under its request's class, and a cache hit whose answer was generated only for
//! other classes is a false hit. Exact-tier hits are right by construction and checked the same
//! way. Run it on a fresh node (and an empty Redis) so that every cached answer was generated in
//! the run; answers from before are counted as unattributed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::bench::load_average;
use super::multiturn::post_sse;
use super::semantic::{read_labelled, wilson_cell};

/// Share of draws that ask the topic's stored words.
const ASK_STORED: f64 = 0.5;
/// Share of draws that ask one of its paraphrases (when it has any; else its own words).
const ASK_PARAPHRASE: f64 = 0.3;
/// An answer within this long counts as fast (the brief's hot-question promise).
const FAST: Duration = Duration::from_millis(100);

/// Settings of a hot-question replay (flags of `qnode bench`).
pub struct HotReplay {
    /// Base URL of the node's OpenAI front, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Model id sent in requests.
    pub model: String,
    /// The labelled pairs the questions come from.
    pub pairs: PathBuf,
    /// Requests in all.
    pub requests: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Zipf exponent of topic popularity.
    pub zipf: f64,
    /// Seeds the topic ranking and the draws.
    pub seed: u64,
    /// Greedy tokens per answer.
    pub max_tokens: u32,
    /// Chinese topics too (the shipped encoder is English-only).
    pub chinese: bool,
}

/// One topic: its stored words, paraphrases and near-misses.
struct Topic {
    stored: String,
    paraphrases: Vec<String>,
    near: Vec<String>,
}

/// What one request saw.
struct Sample {
    text: String,
    /// `model`, `l1`, `l2`, `l2-variant`, `semantic` (from `system_fingerprint`).
    source: String,
    answer: String,
    latency: Duration,
    near_miss: bool,
}

/// Meaning classes: texts joined by label-1 pairs (union-find over the texts).
struct Classes {
    index: HashMap<String, usize>,
    parent: Vec<usize>,
}

impl Classes {
    fn id(&mut self, text: &str) -> usize {
        if let Some(&i) = self.index.get(text) {
            return i;
        }
        let i = self.parent.len();
        self.parent.push(i);
        self.index.insert(text.to_string(), i);
        i
    }

    fn root(&mut self, mut i: usize) -> usize {
        while self.parent[i] != i {
            self.parent[i] = self.parent[self.parent[i]];
            i = self.parent[i];
        }
        i
    }

    fn join(&mut self, a: &str, b: &str) {
        let (a, b) = (self.id(a), self.id(b));
        let (a, b) = (self.root(a), self.root(b));
        self.parent[a] = b;
    }

    fn of(&mut self, text: &str) -> usize {
        let i = self.id(text);
        self.root(i)
    }
}

/// Build the workload, send it, print the report.
pub async fn run(replay: HotReplay) -> anyhow::Result<()> {
    if replay.requests == 0 || replay.concurrency == 0 || replay.zipf <= 0.0 {
        bail!("--hot-replay needs --requests >= 1, --concurrency >= 1 and --zipf > 0");
    }
    let labelled = read_labelled(&replay.pairs)?;
    let mut classes = Classes {
        index: HashMap::new(),
        parent: Vec::new(),
    };
    let mut topics: BTreeMap<String, Topic> = BTreeMap::new();
    for l in labelled
        .iter()
        .filter(|l| replay.chinese || !l.class.ends_with("-zh"))
    {
        let topic = topics.entry(l.stored.clone()).or_insert_with(|| Topic {
            stored: l.stored.clone(),
            paraphrases: Vec::new(),
            near: Vec::new(),
        });
        if l.same {
            topic.paraphrases.push(l.asked.clone());
            classes.join(&l.stored, &l.asked);
        } else {
            topic.near.push(l.asked.clone());
            classes.id(&l.asked);
        }
    }
    let mut topics: Vec<Topic> = topics.into_values().collect();
    let mut rng = StdRng::seed_from_u64(replay.seed);
    // Seeded ranking: popularity is not alphabetical.
    for i in (1..topics.len()).rev() {
        topics.swap(i, rng.random_range(0..=i));
    }
    let weights: Vec<f64> = (1..=topics.len())
        .map(|r| 1.0 / (r as f64).powf(replay.zipf))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cdf.push(acc);
    }
    let draws: Vec<(String, bool)> = (0..replay.requests)
        .map(|_| {
            let u: f64 = rng.random();
            let t = &topics[cdf.partition_point(|&c| c < u).min(topics.len() - 1)];
            let how: f64 = rng.random();
            if how < ASK_STORED
                || (how < ASK_STORED + ASK_PARAPHRASE && t.paraphrases.is_empty())
                || (how >= ASK_STORED + ASK_PARAPHRASE && t.near.is_empty())
            {
                (t.stored.clone(), false)
            } else if how < ASK_STORED + ASK_PARAPHRASE {
                let p = &t.paraphrases[rng.random_range(0..t.paraphrases.len())];
                (p.clone(), false)
            } else {
                (t.near[rng.random_range(0..t.near.len())].clone(), true)
            }
        })
        .collect();
    eprintln!(
        "hot replay: {} requests over {} topics (Zipf s = {}), {} at once ...",
        replay.requests,
        topics.len(),
        replay.zipf,
        replay.concurrency
    );
    let load_before = load_average();
    let started = Instant::now();
    let samples = send_all(&replay, draws).await?;
    let wall = started.elapsed();
    let report = report(
        &replay,
        &mut classes,
        &samples,
        wall,
        (load_before, load_average()),
    );
    println!("{report}");
    Ok(())
}

/// Send every draw with `concurrency` workers taking the next index; results in draw order.
async fn send_all(replay: &HotReplay, draws: Vec<(String, bool)>) -> anyhow::Result<Vec<Sample>> {
    let draws = Arc::new(draws);
    let next = Arc::new(AtomicUsize::new(0));
    let out: Arc<Mutex<Vec<Option<Sample>>>> =
        Arc::new(Mutex::new((0..draws.len()).map(|_| None).collect()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..replay.concurrency {
        let (draws, next, out) = (draws.clone(), next.clone(), out.clone());
        let (url, model, max_tokens) =
            (replay.url.clone(), replay.model.clone(), replay.max_tokens);
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((text, near_miss)) = draws.get(i) else {
                    return Ok::<_, anyhow::Error>(());
                };
                let sample = ask(&url, &model, max_tokens, text, *near_miss)
                    .await
                    .with_context(|| format!("request {i} ({text:?})"))?;
                out.lock().expect("results lock")[i] = Some(sample);
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    let out = std::mem::take(&mut *out.lock().expect("results lock"));
    Ok(out
        .into_iter()
        .map(|s| s.expect("every draw sent"))
        .collect())
}

/// One greedy chat completion of one user question.
async fn ask(
    url: &str,
    model: &str,
    max_tokens: u32,
    text: &str,
    near_miss: bool,
) -> anyhow::Result<Sample> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        // Not streamed: a whole answer is one read (a stream says its tier on the last chunk).
        "stream": false,
    })
    .to_string();
    let start = Instant::now();
    let mut answer = String::new();
    let mut fingerprint = String::new();
    let mut on_event = |v: &Value| {
        if let Some(d) = v
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
        {
            answer.push_str(d);
        }
        if let Some(f) = v.get("system_fingerprint").and_then(Value::as_str) {
            fingerprint = f.to_string();
        }
    };
    post_sse(
        url,
        "/v1/chat/completions",
        "hot-replay",
        &body,
        &mut on_event,
    )
    .await?;
    let source = match fingerprint.as_str() {
        "qnode-model" => "model",
        "qnode-cache-l1" => "l1",
        "qnode-cache-l2" => "l2",
        "qnode-cache-semantic" => "semantic",
        f if f.starts_with("qnode-cache-l2-") => "l2-variant",
        f => bail!("unexpected system_fingerprint {f:?}: is this a qnode node?"),
    };
    Ok(Sample {
        text: text.to_string(),
        source: source.to_string(),
        answer,
        latency: start.elapsed(),
        near_miss,
    })
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    xs[((p / 100.0 * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1]
}

/// The markdown report: answers by source with latency, fast share, and the cache's mistakes.
fn report(
    replay: &HotReplay,
    classes: &mut Classes,
    samples: &[Sample],
    wall: Duration,
    load: (Option<f64>, Option<f64>),
) -> String {
    use std::fmt::Write as _;
    // Which classes each generated answer was generated for.
    let mut generated_for: HashMap<&str, HashSet<usize>> = HashMap::new();
    for s in samples.iter().filter(|s| s.source == "model") {
        let class = classes.of(&s.text);
        generated_for.entry(&s.answer).or_default().insert(class);
    }
    let n = samples.len();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Hot-question replay: {n} requests, Zipf s = {}, {} at once, {} greedy tokens \
         (wall {:.1} s; load average {} → {})\n",
        replay.zipf,
        replay.concurrency,
        replay.max_tokens,
        wall.as_secs_f64(),
        load.0.map_or("?".into(), |l| format!("{l:.2}")),
        load.1.map_or("?".into(), |l| format!("{l:.2}")),
    );
    let _ = writeln!(
        out,
        "| answered by | requests | share | p50 ms | p95 ms | within {} ms |",
        FAST.as_millis()
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let mut by_source: BTreeMap<&str, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        by_source.entry(&s.source).or_default().push(s);
    }
    let row = |name: &str, group: &[&Sample], out: &mut String| {
        let mut ms: Vec<f64> = group
            .iter()
            .map(|s| s.latency.as_secs_f64() * 1e3)
            .collect();
        let fast = group.iter().filter(|s| s.latency <= FAST).count();
        let _ = writeln!(
            out,
            "| {name} | {} | {:.1} % | {:.1} | {:.1} | {:.1} % |",
            group.len(),
            100.0 * group.len() as f64 / n as f64,
            percentile(&mut ms, 50.0),
            percentile(&mut ms, 95.0),
            100.0 * fast as f64 / group.len().max(1) as f64
        );
    };
    for (source, group) in &by_source {
        row(source, group, &mut out);
    }
    let cached: Vec<&Sample> = samples.iter().filter(|s| s.source != "model").collect();
    row("**any cache tier**", &cached, &mut out);
    let all: Vec<&Sample> = samples.iter().collect();
    row("**all**", &all, &mut out);

    // Mistakes: a cached answer that was generated only for other meaning classes.
    let (mut right, mut wrong, mut unknown) = (BTreeMap::new(), BTreeMap::new(), 0usize);
    let mut wrong_examples = Vec::new();
    for s in &cached {
        let class = classes.of(&s.text);
        match generated_for.get(s.answer.as_str()) {
            None => unknown += 1,
            Some(c) if c.contains(&class) => *right.entry(s.source.as_str()).or_insert(0) += 1,
            Some(_) => {
                *wrong.entry(s.source.as_str()).or_insert(0) += 1;
                if wrong_examples.len() < 5 {
                    wrong_examples.push(s.text.clone());
                }
            }
        }
    }
    let _ = writeln!(
        out,
        "\n| tier | right | wrong (false hits, 95 % interval) |"
    );
    let _ = writeln!(out, "|---|---|---|");
    for source in by_source.keys().filter(|s| **s != "model") {
        let r = right.get(source).copied().unwrap_or(0);
        let w = wrong.get(source).copied().unwrap_or(0);
        let _ = writeln!(out, "| {source} | {r} | {} |", wilson_cell((w, r + w)));
    }
    let near = samples.iter().filter(|s| s.near_miss).count();
    let near_served = samples
        .iter()
        .filter(|s| s.near_miss && s.source == "semantic")
        .count();
    let _ = writeln!(
        out,
        "\nNear-miss requests: {near}, answered by the semantic tier: {near_served} \
         (right or wrong as above: a near-miss asked before is a right hit on its own answer)."
    );
    if unknown > 0 {
        let _ = writeln!(
            out,
            "Unattributed cache answers (generated before this run): {unknown}."
        );
    }
    for t in wrong_examples {
        let _ = writeln!(out, "- false hit: {t:?}");
    }
    out
}
