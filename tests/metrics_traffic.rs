//! `/metrics` of a real `qnode serve` process (real SmolLM2, real Redis) scraped before and after
//! scripted traffic, checked by exact deltas: what the model computed (prompt and generated
//! tokens) apart from what callers were served (by source); TTFT and queue time for model work
//! only, cache hits in their own histogram; a cancelled stream's tokens counted; queue depth and
//! in-flight back to 0; one `qnode_` naming scheme.

#[path = "cache_support/mod.rs"]
mod cache_support;
mod common;
mod fleet_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleet_support::{free_port, NodeSetup, QnodeProcess};
use qnode::grpc::proto;

/// Every sample of a page: `name{labels}` → value.
fn samples(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

struct Delta {
    before: BTreeMap<String, f64>,
    after: BTreeMap<String, f64>,
}

impl Delta {
    fn of(&self, series: &str) -> f64 {
        let get = |m: &BTreeMap<String, f64>| m.get(series).copied().unwrap_or(0.0);
        get(&self.after) - get(&self.before)
    }

    fn now(&self, series: &str) -> f64 {
        self.after.get(series).copied().unwrap_or(0.0)
    }
}

fn ask(prompt: &str, max_tokens: u32, policy: proto::CachePolicy) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: "smollm2".into(),
        messages: vec![proto::ChatMessage {
            role: "user".into(),
            content: prompt.into(),
            ..Default::default()
        }],
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        cache_policy: policy as i32,
        ..Default::default()
    }
}

const MODEL: &str = r#"model="smollm2""#;

/// The page once the engine's counters stop moving. The pool counts a step's tokens just after
/// the step, which may be after the answer reached the caller, so a scrape right after a call
/// can miss its last step; two scrapes 200 ms apart that agree mean the engine is idle.
async fn settled(node: &QnodeProcess) -> BTreeMap<String, f64> {
    let engine = |m: &BTreeMap<String, f64>| {
        m.iter()
            .filter(|(k, _)| k.contains("tokens_total"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
    };
    let mut last = samples(&node.scrape());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = samples(&node.scrape());
        if engine(&now) == engine(&last) {
            return now;
        }
        assert!(Instant::now() < deadline, "the engine never settled");
        last = now;
    }
}

fn series(name: &str, labels: &str) -> String {
    format!("qnode_{name}{{{labels}}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_exactly_the_scripted_traffic() {
    let setup = NodeSetup::new();
    let mut node = QnodeProcess::start(&setup, "metrics", free_port(), false);
    node.wait_up(Duration::from_secs(120)).await;
    let mut client = node.inference();
    let default = proto::CachePolicy::Default;

    // 1. A greedy question the model answers, then the same again from L1.
    let before = settled(&node).await;
    let first = client
        .generate(ask("Describe a long walk along the sea.", 8, default))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.finish_reason,
        proto::FinishReason::Length as i32,
        "{first:?}"
    );
    assert_eq!(first.cache_level, proto::CacheLevel::None as i32);
    let usage = first.usage.unwrap();
    let computed_prompt = f64::from(usage.prompt_tokens - usage.cached_prompt_tokens);
    let again = client
        .generate(ask("Describe a long walk along the sea.", 8, default))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.cache_level, proto::CacheLevel::L1 as i32, "{again:?}");
    let d = Delta {
        before,
        after: settled(&node).await,
    };
    let ok = series(
        "requests_total",
        r#"code="Ok",method="Generate",model="smollm2""#,
    );
    let checks = [
        (ok.clone(), 2.0),
        (series("generated_tokens_total", MODEL), 8.0),
        (series("prompt_tokens_total", MODEL), computed_prompt),
        (
            series("served_tokens_total", r#"model="smollm2",source="model""#),
            8.0,
        ),
        (
            series(
                "served_tokens_total",
                r#"model="smollm2",source="cache_l1""#,
            ),
            8.0,
        ),
        (series("time_to_first_token_seconds_count", MODEL), 1.0),
        (series("queue_time_seconds_count", MODEL), 1.0),
        (
            series(
                "cache_hit_duration_seconds_count",
                r#"level="l1",model="smollm2""#,
            ),
            1.0,
        ),
        (series("cache_hits_total", r#"level="l1""#), 1.0),
    ];
    for (s, want) in &checks {
        assert_eq!(d.of(s), *want, "{s}\n{}", node.scrape());
        println!("model answer + L1 hit: {s} +{want}");
    }

    // 2. Three identical new questions at once: the model generates once (single flight, or
    // L1 for a late one); each caller is served the answer.
    let before = d.after;
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let mut c = node.inference();
            tokio::spawn(async move {
                c.generate(ask(
                    "Name three rivers of Europe and a fact about each.",
                    16,
                    default,
                ))
                .await
                .unwrap()
                .into_inner()
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    let tokens = f64::from(answers[0].usage.unwrap().completion_tokens);
    assert!(answers.iter().all(|a| a.text == answers[0].text));
    let d = Delta {
        before,
        after: settled(&node).await,
    };
    assert_eq!(
        d.of(&series("generated_tokens_total", MODEL)),
        tokens,
        "computed once"
    );
    let served = d.of(&series(
        "served_tokens_total",
        r#"model="smollm2",source="model""#,
    )) + d.of(&series(
        "served_tokens_total",
        r#"model="smollm2",source="cache_l1""#,
    ));
    assert_eq!(served, 3.0 * tokens, "served to each caller");
    assert_eq!(d.of(&ok), 3.0);
    println!("3 identical at once: generated +{tokens}, served +{served}");

    // 3. A stream cancelled after its first chunk: the tokens the model computed are counted,
    // nothing is served, the call is `Cancelled`.
    let before = d.after;
    let mut stream = client
        .generate_stream(ask(
            "Write a long story about a lighthouse keeper.",
            400,
            proto::CachePolicy::Bypass,
        ))
        .await
        .unwrap()
        .into_inner();
    let chunk = stream.message().await.unwrap().expect("a first chunk");
    assert!(!chunk.text.is_empty());
    drop(stream);
    let cancelled = series(
        "requests_total",
        r#"code="Cancelled",method="GenerateStream",model="smollm2""#,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let d = loop {
        let d = Delta {
            before: before.clone(),
            after: settled(&node).await,
        };
        if d.of(&cancelled) == 1.0 && d.now("qnode_in_flight_requests") == 0.0 {
            break d;
        }
        assert!(Instant::now() < deadline, "{}", node.scrape());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let generated = d.of(&series("generated_tokens_total", MODEL));
    assert!(
        (1.0..400.0).contains(&generated),
        "a cancelled stream's tokens: {generated}"
    );
    assert_eq!(
        d.of(&series(
            "served_tokens_total",
            r#"model="smollm2",source="model""#
        )),
        0.0
    );
    assert_eq!(
        d.of(&series("time_to_first_token_seconds_count", MODEL)),
        0.0
    );
    println!("cancelled stream: generated +{generated}, served +0, Cancelled +1");

    // 4. Idle again: the gauges are back to 0; every family is `qnode_…`, none doubled.
    let page = node.scrape();
    let idle = samples(&page);
    assert_eq!(idle.get("qnode_in_flight_requests"), Some(&0.0), "{page}");
    assert_eq!(
        idle.get(&series("queue_depth", MODEL)),
        Some(&0.0),
        "queue depth returns to 0:\n{page}"
    );
    for name in idle.keys() {
        assert!(
            name.starts_with("qnode_") && !name.starts_with("qnode_qnode_"),
            "{name}"
        );
    }
    // The README's metrics table lists every family the page shows.
    let readme = include_str!("../README.md");
    let table = &readme[readme
        .find("| metric | type | labels | what |")
        .expect("the table")..];
    let listed: Vec<&str> = table
        .lines()
        .take_while(|l| l.trim_start().starts_with('|'))
        .flat_map(|l| l.split('|').nth(1).unwrap_or("").split('`'))
        .filter(|w| w.starts_with("qnode_"))
        .collect();
    for family in page.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split(' ').next().unwrap();
        assert!(
            listed.contains(&name),
            "README's metrics table lacks {name}"
        );
    }
}
