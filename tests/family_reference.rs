//! The families beyond SmolLM2/gemma3 (qwen2, qwen3, Llama 3 style `llama`, phi3, Mistral style
//! `llama`) against llama.cpp, on tiny random-weight GGUF files that carry the real Qwen tokenizer
//! (152,064 tokens; llama3 and phi3 with their own control tokens and pre-tokenizer) or, for
//! mistral, mistral-common's v3 SentencePiece vocabulary (32,768 pieces), for mistral-nemo its
//! tekken byte-level BPE (131,072 tokens, pre `tekken`), and each family's metadata: Llama 3.1's
//! `rope_freqs.weight`, Phi-3's fused matrices, partial rotary and su/longrope, YaRN on qwen2
//! (`qwen2-yarn`), Mistral v0.3's and Nemo's [INST] templates.
//!
//! `scripts/tiny_family.py write FAMILY` regenerates the exact file llama.cpp ran (its sha256 is in
//! the reference, so a changed generator fails here rather than comparing against another model);
//! the references in tests/data/reference/tiny-FAMILY.json were made once with llama.cpp's server
//! (`scripts/tiny_family.py reference`). llama.cpp is not needed to run these tests.
//!
//! Checks, per family:
//! - tokenizer ids equal llama.cpp's on a shared string set (CJK, emoji, code, numbers, control
//!   tokens), and prompt ids with BOS as the file's `add_bos_token` says, or as llama.cpp's
//!   default for the pre-tokenizer says where a Llama 3 file has no such key
//!   (`llama3-no-add-bos`, tokenizer only);
//! - the chat template renders to llama.cpp's prompt ids;
//! - teacher-forced greedy tokens: at every position llama.cpp's token is our argmax, or within
//!   `TIE_MARGIN` logits of it (a near-tie, as in tests/model_reference.rs), and most are exact;
//! - log-probabilities of llama.cpp's top tokens: see `FIRST_TOL`;
//! - the same model stored as F32 and requantized to Q8_0 at load still gives llama.cpp's greedy
//!   tokens (requantization of each family's layout: biases, q/k norms, tied and untied heads);
//! - the raw prompts through the serving engine (pool, sampler, detokenizer) give llama.cpp's text
//!   up to each prompt's first near-tie;
//! - phi3 served with a context up to its original one takes the short su/longrope factors, as
//!   llama.cpp run with that context does;
//! - a qwen2 file missing a Q/K/V bias, a qwen3 file carrying RoPE factors, llama3 factors of the
//!   wrong length or value, and a bias the family does not add are refused at load naming the
//!   tensor.
//!
//! Figures print with `cargo test --test family_reference -- --nocapture`.

mod common;

use futures::executor::block_on;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use qnode::engine::ChatMessage;
use qnode::model::kv_cache::KvDtype;
use qnode::model::loaded::LoadedModel;
use qnode::model::quantize::Quant;
use qnode::model::transformer::{SeqStep, Transformer};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Largest gap between our best logit and llama.cpp's token's that still counts as a near-tie.
const TIE_MARGIN: f32 = 0.5;
/// Fraction of forced positions where our argmax must be llama.cpp's token exactly.
const MIN_EXACT: f64 = 0.9;
/// Log-probability agreement, on llama.cpp's top-5 tokens at every position. The references are
/// made with llama.cpp's KV cache in f32 and flash attention off (its defaults store K/V in f16),
/// so both sides run the same arithmetic up to summation order and where an activation lands on a
/// Q8_0 rounding boundary. Measured: most prompts agree to ~1e-4 at every position; in one or two
/// a rounding flip in a sharp attention row moves later log-probs by up to 0.42 (qwen3) / 0.19
/// (qwen2) while the greedy token stays llama.cpp's. So:
/// - the first generated position (the prefill's output) of every prompt within `FIRST_TOL`;
/// - at least `MIN_CLOSE_PROMPTS` of the prompts within `CLOSE_TOL` at every position;
/// - every position within `LOGPROB_TOL`. A missing bias, a skipped norm or the wrong RoPE
///   pairing moves log-probs by whole units (tried: see the commit that adds this test).
const FIRST_TOL: f64 = 0.01;
/// Fraction of prompts whose log-probs agree within `CLOSE_TOL` at every position.
const MIN_CLOSE_PROMPTS: f64 = 0.6;
/// Every-position agreement of a "close" prompt. Looser than `FIRST_TOL`: our attention sums
/// each score as one FMA chain over the head dimension (so that outputs do not depend on how a
/// sequence is chunked), llama.cpp in SIMD partial sums; a sharp softmax amplifies the ~1e-7
/// relative difference in later positions (measured: 0.0156 on one prompt that was within 0.01
/// with the previous, row-by-row attention).
const CLOSE_TOL: f64 = 0.02;
/// Largest log-probability difference allowed anywhere.
const LOGPROB_TOL: f64 = 0.6;

/// The bounds [`check_forward_of`] holds a family to.
struct Bounds {
    tie_margin: f32,
    min_exact: f64,
    first_tol: f64,
    min_close_prompts: f64,
    logprob_tol: f64,
}

/// qwen2 / qwen3: the constants above. llama3 / phi3 (hidden 128, ffn 256: twice the qwen
/// models' width), measured: phi3 agrees with llama.cpp to <= 3e-4 at every position of 4 of 5
/// prompts, llama3 to < 1e-4 in 2 of 5 (so RoPE factors, fused matrices, partial rotary and the
/// longrope magnitude are computed as llama.cpp computes them: breaking any one of them drops
/// exact greedy tokens to 1-33 %). Elsewhere log-probs differ by up to 0.30 (phi3), 0.30 (phi3,
/// short context, 4 of 5 prompts) and 1.24 (llama3), in the 33-token prompt already at the
/// prefill's output, while llama.cpp's greedy token stays within 0.55 logits of our best. The
/// cause is not established (the qwen models' rounding-flip explanation is a hypothesis here,
/// not shown), so these bounds are the measured figures with a margin, not a derived tolerance.
fn bounds(family: &str) -> Bounds {
    let wide = family.starts_with("llama3") || family.starts_with("phi3");
    if (wide || family.starts_with("mistral")) && family.ends_with("requantized") {
        // Weights that differ from the file llama.cpp ran (see `check_requantized_from_f32`):
        // measured 82-86 % exact (mistral 98/120), llama.cpp's token within 1.79 logits of our
        // best.
        Bounds {
            tie_margin: 2.0,
            min_exact: 0.8,
            first_tol: f64::INFINITY,
            min_close_prompts: 0.0,
            logprob_tol: f64::INFINITY,
        }
    } else if family == "mistral-nemo" {
        // Measured: greedy 117/120 exact (gaps <= 0.08 logits), but in no prompt within
        // `CLOSE_TOL` throughout (largest 0.40), and the prefill's output off by up to 0.085 in
        // one prompt. Not a Nemo-specific error, as far as variants of the tiny model show (same
        // tekken vocabulary, run once through llama.cpp, not committed): 8 heads of 16 at width
        // 128 agree to 2e-4 at every position of 5/5 prompts, 4 heads of 32 with one KV head at
        // width 160 (this model's head width apart from the hidden size) to 1e-4 in 3/5, and
        // qnode's own host and candle paths differ by up to 0.28 on some of these variants: how
        // close a prompt comes is how its rounding falls on these random weights.
        Bounds {
            tie_margin: TIE_MARGIN,
            min_exact: MIN_EXACT,
            first_tol: 0.15,
            min_close_prompts: 0.0,
            logprob_tol: LOGPROB_TOL,
        }
    } else if wide {
        Bounds {
            tie_margin: 0.6,
            min_exact: 0.8,
            first_tol: 0.5,
            min_close_prompts: 0.2,
            logprob_tol: 1.5,
        }
    } else {
        Bounds {
            tie_margin: TIE_MARGIN,
            min_exact: MIN_EXACT,
            first_tol: FIRST_TOL,
            min_close_prompts: MIN_CLOSE_PROMPTS,
            logprob_tol: LOGPROB_TOL,
        }
    }
}

struct Tiny {
    _dir: tempfile::TempDir,
    path: PathBuf,
    reference: Value,
}

/// The tiny FAMILY model, written once per test binary by the committed generator and checked
/// byte for byte (sha256) against the file llama.cpp ran.
fn tiny(family: &'static str) -> &'static Tiny {
    static QWEN2: OnceLock<Tiny> = OnceLock::new();
    static QWEN2_YARN: OnceLock<Tiny> = OnceLock::new();
    static QWEN3: OnceLock<Tiny> = OnceLock::new();
    static LLAMA3: OnceLock<Tiny> = OnceLock::new();
    static LLAMA3_NO_ADD_BOS: OnceLock<Tiny> = OnceLock::new();
    static PHI3: OnceLock<Tiny> = OnceLock::new();
    static MISTRAL: OnceLock<Tiny> = OnceLock::new();
    static MISTRAL_NEMO: OnceLock<Tiny> = OnceLock::new();
    let cell = match family {
        "qwen2" => &QWEN2,
        "qwen2-yarn" => &QWEN2_YARN,
        "qwen3" => &QWEN3,
        "llama3" => &LLAMA3,
        "llama3-no-add-bos" => &LLAMA3_NO_ADD_BOS,
        "phi3" => &PHI3,
        "mistral" => &MISTRAL,
        "mistral-nemo" => &MISTRAL_NEMO,
        other => panic!("no tiny family {other}"),
    };
    cell.get_or_init(|| {
        let reference = common::reference(&format!("tiny-{family}"));
        let header = common::model_file("deepseek-r1-qwen-header");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("tiny-{family}.gguf"));
        let out = std::process::Command::new("python3")
            .arg(common::repo_root().join("scripts/tiny_family.py"))
            .args(["write", family])
            .arg(&path)
            .arg("--header")
            .arg(&header)
            .output()
            .expect("python3 runs (scripts/test.sh installs gguf==0.19.0)");
        assert!(
            out.status.success(),
            "scripts/tiny_family.py write {family}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let digest = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
        assert_eq!(
            digest,
            reference["gguf_sha256"].as_str().unwrap(),
            "the regenerated tiny {family} is not the file llama.cpp ran: the generator or its \
             inputs changed; rerun `scripts/tiny_family.py reference {family}` with llama.cpp"
        );
        Tiny {
            _dir: dir,
            path,
            reference,
        }
    })
}

fn load(family: &'static str) -> (LoadedModel, &'static Value) {
    let t = tiny(family);
    // The reference ran llama.cpp with f32 caches (`-ctk f32 -ctv f32`, scripts/tiny_family.py):
    // random tiny weights give attention scores so large that half-precision keys alone move
    // log-probs by up to 0.9, far past the 0.02 this comparison holds the architecture to.
    let model = LoadedModel::load(family, &t.path, Quant::Q8_0, &Device::Cpu)
        .unwrap()
        .with_kv_dtype(KvDtype::F32);
    assert_eq!(model.hparams().arch.as_str(), arch_of(family));
    (model, &t.reference)
}

/// `general.architecture` of the tiny FAMILY file (Llama 3 files say `llama`).
fn arch_of(family: &str) -> &str {
    match family {
        "llama3" | "mistral" | "mistral-nemo" => "llama",
        "qwen2-yarn" => "qwen2",
        other => other,
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_tokenizer(family: &'static str) {
    let (model, reference) = load(family);
    let tok = &model.tokenizer;
    let mut failures = Vec::new();
    let cases = reference["tokenize"].as_array().unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, false).unwrap();
        if got != ids(&case["ids"]) {
            failures.push(format!("{text:?}: got {got:?}, llama.cpp {}", case["ids"]));
        }
    }
    for case in reference["greedy"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let got = tok.encode(prompt, true).unwrap();
        if got != ids(&case["prompt_ids"]) {
            failures.push(format!(
                "{prompt:?} with BOS: got {got:?}, llama.cpp {}",
                case["prompt_ids"]
            ));
        }
    }
    eprintln!(
        "[family_reference] {family} tokenizer: {}/{} strings equal llama.cpp's ids",
        cases.len() - failures.len().min(cases.len()),
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn check_chat_template(family: &'static str) {
    let (model, reference) = load(family);
    let mut with_kwargs = 0;
    for case in reference["chat_template"].as_array().unwrap() {
        // Template options (Qwen3's `enable_thinking`), as llama.cpp's `chat_template_kwargs`.
        let kwargs: qnode::types::TemplateKwargs = case["kwargs"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::Bool(b) => qnode::types::TemplateValue::Bool(*b),
                    other => panic!("{family}: a kwargs value this test does not read: {other}"),
                };
                (k.clone(), v)
            })
            .collect();
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let got = model
            .prompt_tokens_with(&qnode::engine::PromptInput::Chat(messages), &kwargs)
            .unwrap();
        assert_eq!(
            got,
            ids(&case["prompt_ids"]),
            "{family}: chat {} with {} renders differently from llama.cpp's {:?}",
            case["messages"],
            case["kwargs"],
            case["prompt"]
        );
        with_kwargs += usize::from(!kwargs.is_empty());
    }
    if family == "qwen3" {
        assert_eq!(
            model.template.as_ref().unwrap().options(),
            ["enable_thinking"],
            "the options Qwen3's template takes"
        );
        assert!(
            with_kwargs >= 4,
            "qwen3's enable_thinking cases were checked"
        );
    }
}

/// Logits after `prompt`, then after each forced token of `forced` (all but the last).
fn forced_logits(model: &Transformer, prompt: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(4096);
    let mut out = Vec::new();
    let mut next: Vec<u32> = prompt.to_vec();
    for tok in forced {
        let logits = model
            .forward(&mut [SeqStep {
                tokens: &next,
                cache: &mut cache,
            }])
            .unwrap();
        out.push(logits.row(0).to_vec());
        next = vec![*tok];
    }
    out
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits.iter().map(|&l| l as f64 - log_sum).collect()
}

fn check_forward(family: &'static str) {
    let (model, reference) = load(family);
    check_forward_of(family, &model.transformer, reference, true);
    // The candle path (GPUs) states the family's switches a second time: it must agree.
    let vocab = model.hparams().vocab as u32;
    let prompt: Vec<u32> = (1..40).map(|i| (i * 7919) % vocab).collect();
    let gap = common::host_vs_candle(&model.transformer, &prompt, 6);
    println!(
        "{family}: host vs candle path, largest logit gap {:.3} % of the spread",
        gap * 100.0
    );
    assert!(
        gap < PATH_GAP,
        "{family}: host and candle paths differ by {gap}"
    );
}

/// Largest logit difference between the host and the candle forward pass on a tiny family model
/// (f32 caches), as a fraction of the logits' spread. Measured: 0 (llama3) to 1.1 % (qwen2); the
/// random weights amplify rounding differences. Dropping the attention output on one path gives
/// ~70 %.
const PATH_GAP: f32 = 0.03;

/// The raw prompts through the serving engine (pool, batching loop, greedy sampler,
/// detokenizer): its text must be llama.cpp's `completion_text` up to the first near-tie the
/// forced check finds (all of it when there is none).
fn check_engine(family: &'static str) {
    use qnode::engine::{Backend, GenerationEvent, GenerationRequest, PromptInput};
    let (model, reference) = load(family);
    let first_ties = check_forward_of(family, &model.transformer, reference, false);
    let metrics = qnode::metrics::Metrics::new().unwrap();
    let mut config = qnode::config::ModelConfig::new(tiny(family).path.to_str().unwrap());
    config.kv_dtype = Some(KvDtype::F32);
    let pool = qnode::pool::ModelPool::new(
        &[config],
        qnode::pool::metrics::PoolMetrics::register(metrics.registry()).unwrap(),
        Device::Cpu,
    )
    .unwrap();
    pool.load_all().unwrap();
    let id = format!("tiny-{family}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut agreed, mut total) = (0, 0);
    for (case, &first_tie) in reference["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&first_ties)
    {
        let prompt = case["prompt"].as_str().unwrap();
        let want = ids(&case["completion_ids"]);
        let mut rx = block_on(pool.submit(GenerationRequest::new(
            format!("family {prompt}"),
            id.clone(),
            PromptInput::Text(prompt.to_string()),
            want.len() as u32,
        )))
        .unwrap();
        let text = runtime.block_on(async {
            let mut text = String::new();
            loop {
                match rx.recv().await.expect("stream ended early").unwrap() {
                    GenerationEvent::Delta(t) => text.push_str(&t),
                    GenerationEvent::Logprobs(_) => {}
                    GenerationEvent::Finished(_) => return text,
                }
            }
        });
        let llama_text = case["completion_text"].as_str().unwrap();
        if first_tie == want.len() {
            assert_eq!(text, llama_text, "{family} {prompt:?} through the engine");
        } else {
            let mut must = model.tokenizer.decode(&want[..first_tie]).unwrap();
            while must.ends_with('\u{FFFD}') {
                must.pop();
            }
            assert!(
                text.starts_with(&must),
                "{family} {prompt:?} through the engine: {text:?} differs from llama.cpp's \
                 {llama_text:?} before its first near-tie (token {first_tie})"
            );
        }
        agreed += first_tie;
        total += want.len();
    }
    eprintln!(
        "[family_reference] {family} through the engine: {agreed}/{total} tokens checked equal to \
         llama.cpp's text (the rest follow a near-tie)"
    );
    pool.shutdown();
}

/// The teacher-forced check of `model` against `reference`; with `logprobs`, the log-probability
/// bounds too (only for the exact file llama.cpp ran).
///
/// Returns, per prompt, the first position where llama.cpp's token is not our argmax (a near-tie),
/// or the number of reference tokens when there is none.
fn check_forward_of(
    family: &str,
    model: &Transformer,
    reference: &Value,
    logprobs: bool,
) -> Vec<usize> {
    let b = bounds(family);
    let (mut exact, mut total, mut worst_gap, mut worst_lp) = (0usize, 0usize, 0f32, 0f64);
    let (mut close_prompts, mut prompts) = (0usize, 0usize);
    let mut failures = Vec::new();
    let mut first_ties = Vec::new();
    for case in reference["greedy"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let want = ids(&case["completion_ids"]);
        assert!(!want.is_empty(), "{prompt:?}: no reference tokens");
        let tops = case["top_logprobs"].as_array().unwrap();
        let all = forced_logits(model, &ids(&case["prompt_ids"]), &want);
        let mut prompt_worst = 0f64;
        let mut first_tie = want.len();
        for (i, (logits, &want_tok)) in all.iter().zip(&want).enumerate() {
            let best = logits.iter().cloned().fold(f32::MIN, f32::max);
            let gap = best - logits[want_tok as usize];
            total += 1;
            worst_gap = worst_gap.max(gap);
            exact += usize::from(gap == 0.0);
            if gap != 0.0 {
                first_tie = first_tie.min(i);
            }
            if gap > b.tie_margin {
                failures.push(format!(
                    "{prompt:?} token {i}: llama.cpp chose {want_tok}, {gap} logits below our best"
                ));
            }
            if !logprobs {
                continue;
            }
            // Null where llama.cpp's server did not report them (a token ending inside a UTF-8
            // character).
            let Some(top) = tops[i].as_array() else {
                continue;
            };
            let lp = log_softmax(logits);
            for pair in top {
                let (id, theirs) = (
                    pair[0].as_u64().unwrap() as usize,
                    pair[1].as_f64().unwrap(),
                );
                let diff = (lp[id] - theirs).abs();
                prompt_worst = prompt_worst.max(diff);
                let tol = if i == 0 { b.first_tol } else { b.logprob_tol };
                if diff > tol {
                    failures.push(format!(
                        "{prompt:?} token {i}: log p({id}) = {:.4}, llama.cpp {theirs:.4} (> {tol})",
                        lp[id]
                    ));
                }
            }
        }
        first_ties.push(first_tie);
        prompts += 1;
        eprintln!("[family_reference] {family}: prompt {prompts} worst log-prob difference {prompt_worst:.4}");
        close_prompts += usize::from(prompt_worst <= CLOSE_TOL);
        worst_lp = worst_lp.max(prompt_worst);
    }
    let lp_figures = if logprobs {
        format!(
            "top-{} log-probs within {CLOSE_TOL} at every position in {close_prompts}/{prompts} \
             prompts, largest difference {worst_lp:.4}",
            tops_len(reference)
        )
    } else {
        "log-probs not compared".to_string()
    };
    eprintln!(
        "[family_reference] {family}: {exact}/{total} forced greedy tokens equal llama.cpp's ({:.1} %), \
         largest gap {worst_gap:.3} logits; {lp_figures}",
        100.0 * exact as f64 / total as f64,
    );
    assert!(failures.is_empty(), "{family}:\n{}", failures.join("\n"));
    assert!(
        exact as f64 / total as f64 >= b.min_exact,
        "{family}: only {exact}/{total} exact"
    );
    assert!(
        !logprobs || close_prompts as f64 / prompts as f64 >= b.min_close_prompts,
        "{family}: only {close_prompts}/{prompts} prompts agree within {CLOSE_TOL} throughout"
    );
    first_ties
}

fn tops_len(reference: &Value) -> usize {
    reference["greedy"][0]["top_logprobs"]
        .as_array()
        .and_then(|t| t.iter().find_map(Value::as_array))
        .map_or(0, Vec::len)
}

#[test]
fn qwen2_tokenizer_matches_llama_cpp() {
    check_tokenizer("qwen2");
}

#[test]
fn qwen2_chat_template_matches_llama_cpp() {
    check_chat_template("qwen2");
}

#[test]
fn qwen2_forward_matches_llama_cpp() {
    check_forward("qwen2");
}

#[test]
fn qwen2_through_the_engine_matches_llama_cpp_text() {
    check_engine("qwen2");
}

/// YaRN (`rope.scaling.type = yarn`, factor 4, original context 64): the ramp between kept and
/// interpolated frequencies and the `1 + 0.1 ln 4` magnitude on cos and sin, as llama.cpp.
#[test]
fn qwen2_yarn_forward_matches_llama_cpp() {
    check_forward("qwen2-yarn");
}

#[test]
fn qwen2_yarn_through_the_engine_matches_llama_cpp_text() {
    check_engine("qwen2-yarn");
}

/// The YaRN reference is one this test can fail: the same weights without the YaRN metadata (the
/// plain tiny qwen2) are far from it.
#[test]
fn qwen2_yarn_reference_is_not_met_without_yarn() {
    let (plain, _) = load("qwen2");
    let reference = &tiny("qwen2-yarn").reference;
    let (mut exact, mut total, mut worst) = (0, 0, 0f64);
    for case in reference["greedy"].as_array().unwrap() {
        let want = ids(&case["completion_ids"]);
        let all = forced_logits(&plain.transformer, &ids(&case["prompt_ids"]), &want);
        for ((logits, &want_tok), top) in all
            .iter()
            .zip(&want)
            .zip(case["top_logprobs"].as_array().unwrap())
        {
            let best = logits.iter().cloned().fold(f32::MIN, f32::max);
            exact += usize::from(logits[want_tok as usize] == best);
            total += 1;
            let lp = log_softmax(logits);
            for pair in top.as_array().into_iter().flatten() {
                let id = pair[0].as_u64().unwrap() as usize;
                worst = worst.max((lp[id] - pair[1].as_f64().unwrap()).abs());
            }
        }
    }
    eprintln!(
        "[family_reference] qwen2 without YaRN against the YaRN reference: {exact}/{total} exact, \
         largest log-prob difference {worst:.3}"
    );
    assert!(
        (exact as f64) < MIN_EXACT * total as f64 || worst > LOGPROB_TOL,
        "the unscaled model meets the YaRN reference: {exact}/{total} exact, worst {worst}"
    );
}

#[test]
fn qwen3_through_the_engine_matches_llama_cpp_text() {
    check_engine("qwen3");
}

/// With `enable_thinking` true and false: the false cases end with llama.cpp's empty think block.
#[test]
fn qwen3_chat_template_matches_llama_cpp() {
    check_chat_template("qwen3");
}

#[test]
fn qwen3_tokenizer_matches_llama_cpp() {
    check_tokenizer("qwen3");
}

#[test]
fn qwen3_forward_matches_llama_cpp() {
    check_forward("qwen3");
}

/// The tiny FAMILY file rewritten without the tensors in `drop` and with those in `add`.
fn rewritten(
    family: &'static str,
    dir: &std::path::Path,
    drop: &[&str],
    add: Vec<(String, candle_core::quantized::QTensor)>,
) -> PathBuf {
    rewritten_with(family, dir, drop, add, |_, t| t)
}

/// As [`rewritten`], passing every kept tensor through `map(name, tensor)`.
fn rewritten_with(
    family: &'static str,
    dir: &std::path::Path,
    drop: &[&str],
    add: Vec<(String, candle_core::quantized::QTensor)>,
    map: impl Fn(&str, candle_core::quantized::QTensor) -> candle_core::quantized::QTensor,
) -> PathBuf {
    use candle_core::quantized::gguf_file;
    let src = &tiny(family).path;
    let mut f = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut tensors: Vec<(String, candle_core::quantized::QTensor)> = content
        .tensor_infos
        .keys()
        .filter(|n| !drop.contains(&n.as_str()))
        .map(|n| {
            let t = content.tensor(&mut f, n, &Device::Cpu).unwrap();
            (n.clone(), map(n, t))
        })
        .collect();
    tensors.extend(add);
    let meta: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let path = dir.join(format!("{family}-rewritten.gguf"));
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &meta, &refs).unwrap();
    path
}

#[test]
fn qwen2_without_a_qkv_bias_is_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = rewritten("qwen2", dir.path(), &["blk.1.attn_k.bias"], vec![]);
    match LoadedModel::load("t", &path, Quant::Q8_0, &Device::Cpu) {
        Err(qnode::model::ModelError::MissingTensor(name)) => {
            assert_eq!(name, "blk.1.attn_k.bias")
        }
        Err(other) => panic!("expected MissingTensor, got {other}"),
        Ok(_) => panic!("a qwen2 file without its K bias loaded"),
    }
}

/// An F32 vector tensor.
fn f32_tensor(values: &[f32]) -> candle_core::quantized::QTensor {
    let t = candle_core::Tensor::new(values, &Device::Cpu).unwrap();
    candle_core::quantized::QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32).unwrap()
}

fn load_error(path: &std::path::Path) -> String {
    match LoadedModel::load("t", path, Quant::Q8_0, &Device::Cpu) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("{} loaded", path.display()),
    }
}

#[test]
fn rope_factors_a_family_does_not_read_are_refused() {
    // llama.cpp reads rope_freqs.weight for llama only (and refuses a file with a tensor it does
    // not load): a qwen3 file carrying Llama 3.1's factors, or Phi-3's long factors, is refused.
    let dir = tempfile::tempdir().unwrap();
    for name in ["rope_freqs.weight", "rope_factors_long.weight"] {
        let path = rewritten(
            "qwen3",
            dir.path(),
            &[],
            vec![(name.into(), f32_tensor(&[1.0; 16]))],
        );
        let msg = load_error(&path);
        assert!(
            msg.contains(name)
                && msg.contains("not read for qwen3")
                && msg.contains("supported: rope_freqs.weight for llama"),
            "{msg}"
        );
    }
}

#[test]
fn llama3_rope_factors_of_the_wrong_length_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = rewritten(
        "llama3",
        dir.path(),
        &["rope_freqs.weight"],
        vec![("rope_freqs.weight".into(), f32_tensor(&[1.0; 8]))],
    );
    let msg = load_error(&path);
    assert!(
        msg.contains("rope_freqs.weight") && msg.contains("expected [16]"),
        "{msg}"
    );
    let path = rewritten(
        "llama3",
        dir.path(),
        &["rope_freqs.weight"],
        vec![("rope_freqs.weight".into(), f32_tensor(&[0.0; 16]))],
    );
    let msg = load_error(&path);
    assert!(msg.contains("not a positive number"), "{msg}");
}

#[test]
fn a_bias_the_family_does_not_add_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = rewritten(
        "llama3",
        dir.path(),
        &[],
        vec![("blk.1.attn_output.bias".into(), f32_tensor(&[0.0; 128]))],
    );
    let msg = load_error(&path);
    assert!(
        msg.contains("blk.1.attn_output.bias") && msg.contains("supported: Q/K/V biases for qwen2"),
        "{msg}"
    );
}

/// Q8_0 requantization at load for each family's tensor layout (biases, q/k norms, tied and
/// untied heads): the tiny model with every matrix stored as F32 (the values of its Q8_0 blocks),
/// loaded as Q8_0, still gives llama.cpp's greedy tokens. Blocks whose largest value is not ±127
/// steps get a new scale, so the weights differ slightly from the file llama.cpp ran: greedy is
/// checked, log-probabilities are not.
fn check_requantized_from_f32(family: &'static str) {
    use candle_core::quantized::{GgmlDType, QTensor};
    let dir = tempfile::tempdir().unwrap();
    let path = rewritten_with(family, dir.path(), &[], vec![], |_, t| {
        if t.dtype() == GgmlDType::Q8_0 {
            QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
        } else {
            t
        }
    });
    let model = LoadedModel::load(family, &path, Quant::Q8_0, &Device::Cpu)
        .unwrap()
        .with_kv_dtype(KvDtype::F32);
    check_forward_of(
        &format!("{family} from F32, requantized"),
        &model.transformer,
        &tiny(family).reference,
        false,
    );
}

#[test]
fn qwen2_requantized_from_f32_matches_llama_cpp_greedy() {
    check_requantized_from_f32("qwen2");
}

#[test]
fn qwen3_requantized_from_f32_matches_llama_cpp_greedy() {
    check_requantized_from_f32("qwen3");
}

#[test]
fn llama3_tokenizer_matches_llama_cpp() {
    check_tokenizer("llama3");
}

/// A Llama 3 file with no `tokenizer.ggml.add_bos_token` (the tiny llama3 without the key,
/// tokenizer only): llama.cpp adds BOS by its `llama-bpe` default, and so must we (without that
/// default every prompt here lacked its BOS). The plain ids are the llama3 family's.
#[test]
fn llama3_without_add_bos_token_adds_bos_as_llama_cpp() {
    use candle_core::quantized::gguf_file::Content;
    use qnode::model::tokenizer::GgufTokenizer;
    let t = tiny("llama3-no-add-bos");
    let content = Content::read(&mut std::fs::File::open(&t.path).unwrap()).unwrap();
    assert!(!content
        .metadata
        .contains_key("tokenizer.ggml.add_bos_token"));
    let tok = GgufTokenizer::from_gguf(&content).unwrap();
    let bos = t.reference["config"]["bos"].as_u64().unwrap() as u32;
    let mut failures = Vec::new();
    for case in t.reference["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, false).unwrap();
        if got != ids(&case["ids"]) {
            failures.push(format!("{text:?}: got {got:?}, llama.cpp {}", case["ids"]));
        }
    }
    let with_bos = t.reference["tokenize_add_special"].as_array().unwrap();
    for case in with_bos {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(
            want.first(),
            Some(&bos),
            "llama.cpp's ids for {text:?} start with BOS"
        );
        let got = tok.encode(text, true).unwrap();
        if got != want {
            failures.push(format!(
                "{text:?} with BOS: got {got:?}, llama.cpp {want:?}"
            ));
        }
    }
    eprintln!(
        "[family_reference] llama3 without add_bos_token: {} failures over {} strings and {} \
         prompts with BOS",
        failures.len(),
        t.reference["tokenize"].as_array().unwrap().len(),
        with_bos.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(tok.add_bos());
}

#[test]
fn llama3_chat_template_matches_llama_cpp() {
    check_chat_template("llama3");
}

#[test]
fn llama3_forward_matches_llama_cpp() {
    check_forward("llama3");
}

#[test]
fn llama3_through_the_engine_matches_llama_cpp_text() {
    check_engine("llama3");
}

#[test]
fn llama3_requantized_from_f32_matches_llama_cpp_greedy() {
    check_requantized_from_f32("llama3");
}

#[test]
fn phi3_tokenizer_matches_llama_cpp() {
    check_tokenizer("phi3");
}

#[test]
fn phi3_chat_template_matches_llama_cpp() {
    check_chat_template("phi3");
}

#[test]
fn phi3_forward_matches_llama_cpp() {
    check_forward("phi3");
}

#[test]
fn phi3_through_the_engine_matches_llama_cpp_text() {
    check_engine("phi3");
}

#[test]
fn phi3_requantized_from_f32_matches_llama_cpp_greedy() {
    check_requantized_from_f32("phi3");
}

/// su/longrope picks its factors by the context served: llama.cpp run with a context up to the
/// original one (1024 for the tiny phi3) applies the short factors, and so does qnode told that
/// context (`LoadedModel::with_context_length`, which the pool calls with the served context);
/// the default (native 4096) took the long ones in `phi3_forward_matches_llama_cpp`.
#[test]
fn phi3_short_context_takes_the_short_rope_factors_as_llama_cpp() {
    let t = tiny("phi3");
    let short = &t.reference["greedy_short_context"];
    let n_ctx = short["context"].as_u64().unwrap() as usize;
    let model = LoadedModel::load("phi3", &t.path, Quant::Q8_0, &Device::Cpu)
        .unwrap()
        .with_kv_dtype(KvDtype::F32)
        .with_context_length(n_ctx);
    let reference = serde_json::json!({ "greedy": short["greedy"] });
    check_forward_of("phi3 short context", &model.transformer, &reference, true);
}

/// Mistral 7B v0.3 style: `llama` with a SentencePiece vocabulary (mistral-common's v3 model:
/// [INST] control tokens, byte fallback, llama.cpp's space prefix before every text fragment).
#[test]
fn mistral_tokenizer_matches_llama_cpp() {
    check_tokenizer("mistral");
}

#[test]
fn mistral_chat_template_matches_llama_cpp() {
    check_chat_template("mistral");
}

#[test]
fn mistral_forward_matches_llama_cpp() {
    check_forward("mistral");
}

#[test]
fn mistral_through_the_engine_matches_llama_cpp_text() {
    check_engine("mistral");
}

#[test]
fn mistral_requantized_from_f32_matches_llama_cpp_greedy() {
    check_requantized_from_f32("mistral");
}

/// Mistral Nemo style: `llama` with a head width apart from the hidden size and the tekken
/// tokenizer (mistral-common's tekken_240718.json as convert_hf_to_gguf.py writes it: byte-level
/// BPE, pre `tekken`, 1,000 reserved control tokens, merges rebuilt from the ranks), with
/// Nemo-Instruct-2407's [INST] template.
#[test]
fn mistral_nemo_tokenizer_matches_llama_cpp() {
    check_tokenizer("mistral-nemo");
}

#[test]
fn mistral_nemo_chat_template_matches_llama_cpp() {
    check_chat_template("mistral-nemo");
}

#[test]
fn mistral_nemo_forward_matches_llama_cpp() {
    check_forward("mistral-nemo");
}

#[test]
fn mistral_nemo_through_the_engine_matches_llama_cpp_text() {
    check_engine("mistral-nemo");
}

#[test]
fn mistral_nemo_requantized_from_f32_matches_llama_cpp_greedy() {
    check_requantized_from_f32("mistral-nemo");
}
