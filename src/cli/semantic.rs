//! `qnode bench --semantic`: the semantic tier's threshold sweep on a labelled set of question
//! pairs (`tests/data/semantic_pairs.tsv`), and what an embedding costs.
//!
//! For each pair the first question is the one stored and the second the one asked; a pair is a
//! hit when their cosine is at least the threshold (and, guard on, the guard lets it through).
//! Per threshold it prints the hit rate among paraphrases (label 1) and the false-hit rate among
//! near-misses (label 0), each with a 95 % Wilson interval, guard off and on, for English and
//! Chinese apart (the default encoder is English-only; `--encoder m3e-small` reads Chinese, and
//! the guard's CJK checks follow the encoder). It names the lowest threshold whose
//! English false-hit rate, guard on, is at most 1 % — the default of `cache.semantic.threshold`.
//! No node is needed: the encoder runs in this process, on `CANDLE_NUM_THREADS` threads.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use qnode::cache::semantic::guard::{self, Reject};
use qnode::cache::semantic::index::Index;
use qnode::cache::CacheKey;
use qnode::model::embed::{cosine, SentenceEncoder};

/// Settings of a sweep (flags of `qnode bench`).
pub struct Sweep {
    /// The labelled pairs (TSV: label, class, stored question, asked question).
    pub pairs: PathBuf,
    /// The encoder directory.
    pub encoder: PathBuf,
    /// Thresholds to report.
    pub thresholds: Vec<f32>,
    /// Rounds of embedding every distinct text, for the cost figures.
    pub rounds: usize,
}

struct Pair {
    same: bool,
    class: String,
    zh: bool,
    stored: String,
    asked: String,
    score: f32,
    guard: Result<(), Reject>,
}

/// One line of the labelled set.
pub(super) struct Labelled {
    /// Label 1: the same question (a hit is right); 0: a different one (a hit is a false hit).
    pub same: bool,
    /// `paraphrase` or the near-miss kind; `-zh` for Chinese.
    pub class: String,
    /// The question stored first.
    pub stored: String,
    /// The question asked after it.
    pub asked: String,
}

/// The labelled pairs of `path` (TSV: label, class, stored question, asked question; `#`
/// comments).
pub(super) fn read_labelled(path: &std::path::Path) -> anyhow::Result<Vec<Labelled>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        anyhow::ensure!(
            f.len() == 4 && (f[0] == "0" || f[0] == "1"),
            "{}:{}: expected `label<TAB>class<TAB>question<TAB>asked`",
            path.display(),
            n + 1
        );
        out.push(Labelled {
            same: f[0] == "1",
            class: f[1].to_string(),
            stored: f[2].to_string(),
            asked: f[3].to_string(),
        });
    }
    Ok(out)
}

/// The most false hits accepted when picking the default threshold.
const MAX_FALSE_HIT_RATE: f64 = 0.01;

/// Runs the sweep and prints markdown tables.
pub fn run(sweep: Sweep) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = qnode::model::embed::resolve(
        &sweep.encoder.to_string_lossy(),
        std::path::Path::new("models"),
    )?;
    let encoder = SentenceEncoder::load(&dir)
        .with_context(|| format!("loading the encoder from {}", dir.display()))?;
    let load = started.elapsed();
    let guard = guard::Guard::for_encoder(&encoder);
    let mut pairs: Vec<Pair> = read_labelled(&sweep.pairs)?
        .into_iter()
        .map(|l| Pair {
            same: l.same,
            zh: l.class.ends_with("-zh"),
            guard: guard.check(&l.stored, &l.asked),
            class: l.class,
            stored: l.stored,
            asked: l.asked,
            score: 0.0,
        })
        .collect();
    // Embed every distinct text once, then time `rounds` more passes.
    let mut texts: Vec<String> = pairs
        .iter()
        .flat_map(|p| [p.stored.clone(), p.asked.clone()])
        .collect();
    texts.sort_unstable();
    texts.dedup();
    let mut vectors: HashMap<String, Vec<f32>> = HashMap::new();
    let mut tokens = 0usize;
    for t in &texts {
        vectors.insert(t.clone(), encoder.embed(t)?);
        tokens += encoder.token_ids(t)?.len();
    }
    let mut times = Vec::new();
    for _ in 0..sweep.rounds {
        for t in &texts {
            let start = Instant::now();
            std::hint::black_box(encoder.embed(t)?);
            times.push(start.elapsed());
        }
    }
    for p in &mut pairs {
        p.score = cosine(&vectors[p.stored.as_str()], &vectors[p.asked.as_str()]);
    }

    println!(
        "# Semantic tier sweep: {} pairs ({} paraphrases, {} near-misses) from {}; encoder {} \
         ({:?} pooling, reads Chinese: {})\n",
        pairs.len(),
        pairs.iter().filter(|p| p.same).count(),
        pairs.iter().filter(|p| !p.same).count(),
        sweep.pairs.display(),
        dir.display(),
        encoder.pooling(),
        encoder.reads_cjk()
    );
    let mut chosen = None;
    for (title, zh) in [("English", false), ("Chinese", true)] {
        let subset: Vec<&Pair> = pairs.iter().filter(|p| p.zh == zh).collect();
        if subset.is_empty() {
            continue;
        }
        println!("## {title}\n");
        println!("| threshold | hit rate, guard off | false hits, guard off | hit rate, guard on | false hits, guard on |");
        println!("|---:|---:|---:|---:|---:|");
        for &t in &sweep.thresholds {
            let rate = |same: bool, guarded: bool| {
                let of: Vec<&&Pair> = subset.iter().filter(|p| p.same == same).collect();
                let k = of
                    .iter()
                    .filter(|p| p.score >= t && (!guarded || p.guard.is_ok()))
                    .count();
                (k, of.len())
            };
            let (fh_on, n_on) = rate(false, true);
            if !zh
                && chosen.is_none()
                && n_on > 0
                && (fh_on as f64) <= MAX_FALSE_HIT_RATE * n_on as f64
            {
                chosen = Some(t);
            }
            println!(
                "| {t:.3} | {} | {} | {} | {} |",
                wilson_cell(rate(true, false)),
                wilson_cell(rate(false, false)),
                wilson_cell(rate(true, true)),
                wilson_cell((fh_on, n_on)),
            );
        }
        println!();
    }
    match chosen {
        Some(t) => println!(
            "Lowest threshold with English false hits <= {:.0} % (guard on): **{t:.3}**\n",
            MAX_FALSE_HIT_RATE * 100.0
        ),
        None => println!(
            "No threshold keeps English false hits <= {:.0} % (guard on)\n",
            MAX_FALSE_HIT_RATE * 100.0
        ),
    }
    let at = chosen.unwrap_or(qnode::cache::semantic::DEFAULT_THRESHOLD);
    print_classes(&pairs, at);
    print_false_hits(&pairs, at);
    print_cost(&encoder, &texts, tokens, &times, load, &vectors);
    Ok(())
}

/// Per class at threshold `t`: pairs, over the threshold, refused by the guard (and why), hits.
fn print_classes(pairs: &[Pair], t: f32) {
    println!("## By class at threshold {t:.3}\n");
    println!("| class | pairs | cosine >= t | refused by the guard | served (guard on) | guard refusals of all pairs, by check |");
    println!("|---|---:|---:|---:|---:|---|");
    let mut classes: BTreeMap<&str, Vec<&Pair>> = BTreeMap::new();
    for p in pairs {
        classes.entry(p.class.as_str()).or_default().push(p);
    }
    for (class, ps) in classes {
        let over = ps.iter().filter(|p| p.score >= t).count();
        let refused = ps
            .iter()
            .filter(|p| p.score >= t && p.guard.is_err())
            .count();
        let mut why: BTreeMap<&str, usize> = BTreeMap::new();
        for p in &ps {
            if let Err(r) = p.guard {
                *why.entry(r.label()).or_default() += 1;
            }
        }
        let why: Vec<String> = why.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "| {class} | {} | {over} | {refused} | {} | {} |",
            ps.len(),
            over - refused,
            why.join(", ")
        );
    }
    println!();
}

/// The near-misses served at threshold `t` with the guard on, one per line.
fn print_false_hits(pairs: &[Pair], t: f32) {
    let false_hits: Vec<&Pair> = pairs
        .iter()
        .filter(|p| !p.same && p.score >= t && p.guard.is_ok())
        .collect();
    println!("## False hits at {t:.3}, guard on: {}\n", false_hits.len());
    for p in false_hits {
        println!(
            "- {:.3} {}: {:?} / {:?}",
            p.score, p.class, p.stored, p.asked
        );
    }
    println!();
}

fn print_cost(
    encoder: &SentenceEncoder,
    texts: &[String],
    tokens: usize,
    times: &[Duration],
    load: Duration,
    vectors: &HashMap<String, Vec<f32>>,
) {
    println!(
        "## Cost ({} candle threads; load average {})\n",
        candle_core::utils::get_num_threads(),
        super::bench::load_average().map_or("?".into(), |l| format!("{l:.2}"))
    );
    println!(
        "- encoder load: {:.0} ms; {} distinct texts, {:.1} tokens each on average ([CLS] and [SEP] included)",
        load.as_secs_f64() * 1e3,
        texts.len(),
        tokens as f64 / texts.len().max(1) as f64
    );
    if !times.is_empty() {
        let mut sorted = times.to_vec();
        sorted.sort();
        let q = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
        println!(
            "- embedding one question: median {:.2} ms, p95 {:.2} ms, max {:.2} ms ({} embeddings)",
            q(0.5).as_secs_f64() * 1e3,
            q(0.95).as_secs_f64() * 1e3,
            q(1.0).as_secs_f64() * 1e3,
            sorted.len()
        );
    }
    // A full scope (the default bound: 1,024 questions) searched once per lookup.
    let mut index = Index::new(1, 1024);
    let scope = CacheKey([0; 32]);
    let dim = encoder.dim();
    for i in 0..1024u32 {
        let base = &vectors[&texts[i as usize % texts.len()]];
        let v: Vec<f32> = base
            .iter()
            .enumerate()
            .map(|(j, x)| x + ((i as usize * 31 + j) % 7) as f32 * 1e-3)
            .collect();
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&i.to_le_bytes());
        index.insert(scope, v, String::new(), CacheKey(key));
    }
    let query = &vectors[&texts[0]];
    let rounds = 200;
    let start = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(index.best(&scope, query));
    }
    println!(
        "- searching a full scope (1,024 questions of {dim} floats): {:.3} ms",
        start.elapsed().as_secs_f64() * 1e3 / rounds as f64
    );
}

/// `k/n = p % [lo, hi]` with the 95 % Wilson score interval.
pub(super) fn wilson_cell((k, n): (usize, usize)) -> String {
    if n == 0 {
        return "–".into();
    }
    let (lo, hi) = wilson(k, n);
    format!(
        "{k}/{n} = {:.1} % [{:.1}, {:.1}]",
        100.0 * k as f64 / n as f64,
        100.0 * lo,
        100.0 * hi
    )
}

/// 95 % Wilson score interval of `k` successes in `n` trials.
fn wilson(k: usize, n: usize) -> (f64, f64) {
    let z = 1.959_963_984_540_054_f64;
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    // At k = 0 (k = n) the bound is exactly 0 (1); the formula leaves rounding residue there.
    let lo = if k == 0.0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if k == n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_known_values() {
        // 0 of 100: [0, 3.70 %]; 5 of 100: [2.15 %, 11.18 %] (standard tables).
        let (lo, hi) = wilson(0, 100);
        assert!(lo == 0.0 && (hi - 0.0370).abs() < 1e-4, "{lo} {hi}");
        let (lo, hi) = wilson(5, 100);
        assert!(
            (lo - 0.0215).abs() < 1e-4 && (hi - 0.1118).abs() < 1e-4,
            "{lo} {hi}"
        );
    }
}
