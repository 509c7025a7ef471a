//! The OpenAI-compatible HTTP front on the real SmolLM2 file, called by clients nobody here wrote:
//! the official `openai` Python package (tests/openai_client.py) and `curl -N`.
//!
//! Three fronts on free ports: the real pool behind an API key, a standby node over the same pool,
//! and the scripted backend (tests/grpc_support) for failures the real model cannot be made to hit
//! on cue (a full queue, a failure mid-stream).

mod common;
mod grpc_support;

use std::process::Command;
use std::sync::Arc;

use qnode::config::Config;
use qnode::engine::Backend;
use qnode::http::{self, HttpConfig};
use qnode::metrics::Metrics;
use qnode::node::{Node, Role};

const KEY: &str = "test-key";

async fn spawn_front(backend: Arc<dyn Backend>, node: Arc<Node>, config: HttpConfig) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(http::serve(
        listener,
        backend,
        node,
        config,
        std::future::pending(),
    ));
    format!("http://{addr}")
}

async fn run(program: &str, args: Vec<String>) -> (bool, String, String) {
    let program = program.to_owned();
    let out = tokio::task::spawn_blocking(move || Command::new(program).args(&args).output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `curl -sN` POST of `body` to `url`; returns the body.
async fn curl(url: &str, body: &str) -> String {
    let (ok, out, err) = run(
        "curl",
        vec![
            "-sN".into(),
            "--fail-with-body".into(),
            "-H".into(),
            format!("Authorization: Bearer {KEY}"),
            "-H".into(),
            "Content-Type: application/json".into(),
            "-d".into(),
            body.into(),
            url.into(),
        ],
    )
    .await;
    assert!(ok, "curl failed: {out} {err}");
    out
}

/// The text of an SSE answer, checking its framing: `data: ` events, `[DONE]` last.
fn sse_text(body: &str) -> String {
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("every event is `data: `"))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let mut text = String::new();
    for event in &events[..events.len() - 1] {
        let chunk: serde_json::Value = serde_json::from_str(event).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_clients_against_the_real_model() {
    let metrics = Metrics::new().unwrap();
    let pool = common::smollm2_pool(4, &metrics);
    let backend = pool as Arc<dyn Backend>;

    let mut config = Config::default();
    config.server.api_key = Some(KEY.into());
    let real = spawn_front(
        Arc::clone(&backend),
        Node::ready(&metrics),
        HttpConfig::new(&config, metrics.clone()),
    )
    .await;
    let standby_node = Node::new(Role::Standby, &metrics);
    standby_node.warmed();
    let standby = spawn_front(
        Arc::clone(&backend),
        standby_node,
        HttpConfig::new(&config, metrics.clone()),
    )
    .await;
    let scripted_metrics = Metrics::new().unwrap();
    let scripted = spawn_front(
        grpc_support::ScriptedBackend::new(true),
        Node::ready(&scripted_metrics),
        HttpConfig::new(&Config::default(), scripted_metrics),
    )
    .await;

    // curl: non-streamed and streamed answers, sampled with a seed, are the same text.
    let body = |stream: bool| {
        format!(
            r#"{{"model":"smollm2","messages":[{{"role":"user","content":"Tell me about cats."}}],
                "max_tokens":16,"temperature":0.8,"seed":1234,"stream":{stream}}}"#
        )
    };
    let url = format!("{real}/v1/chat/completions");
    let whole: serde_json::Value = serde_json::from_str(&curl(&url, &body(false)).await).unwrap();
    let whole_text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!whole_text.is_empty(), "{whole}");
    let streamed_text = sse_text(&curl(&url, &body(true)).await);
    assert_eq!(streamed_text, whole_text);
    // Another seed samples another answer, so the equality above is not greedy by accident.
    let other: serde_json::Value =
        serde_json::from_str(&curl(&url, &body(false).replace("1234", "99")).await).unwrap();
    assert_ne!(other["choices"][0]["message"]["content"], whole_text);

    // The official Python client.
    let script = common::repo_root().join("tests/openai_client.py");
    let (ok, out, err) = run(
        "python3",
        vec![
            script.to_string_lossy().into_owned(),
            format!("{real}/v1"),
            format!("{standby}/v1"),
            format!("{scripted}/v1"),
            KEY.into(),
        ],
    )
    .await;
    assert!(
        ok,
        "openai client checks failed (is `openai` installed? scripts/test.sh installs it)\n{out}\n{err}"
    );
    for check in [
        "chat completion",
        "chat streaming with usage",
        "seeded stream == unary",
        "chat logprobs",
        "completions and models",
        "completions batch",
        "errors: 404, 400, 401, 503",
        "429 with Retry-After",
        "mid-stream failure",
    ] {
        assert!(
            out.contains(&format!("ok {check}\n")),
            "{check} not passed:\n{out}"
        );
    }
    // The shared metrics counted the HTTP calls under their own method label.
    let text = metrics.render();
    assert!(
        text.contains(r#"method="chat.completions""#) && text.contains(r#"method="completions""#),
        "{text}"
    );
}

/// Every Python check script of the suite checks explicitly: an `assert` vanishes under
/// `python3 -O` / PYTHONOPTIMIZE, and the script would pass whatever the server answered.
#[test]
fn python_check_scripts_never_use_assert() {
    let dir = common::repo_root().join("tests");
    let mut scripts = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "py") {
            continue;
        }
        scripts += 1;
        let source = std::fs::read_to_string(&path).unwrap();
        for (n, line) in source.lines().enumerate() {
            let code = line.trim_start();
            assert!(
                !(code.starts_with("assert ") || code.starts_with("assert(")),
                "{}:{}: `{code}`: use ensure() (python3 -O strips `assert`)",
                path.display(),
                n + 1
            );
        }
    }
    assert!(
        scripts >= 3,
        "found only {scripts} Python scripts in tests/"
    );
}
