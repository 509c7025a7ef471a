//! The OpenAI-compatible HTTP front over the scripted backend (tests/grpc_support), called with
//! `curl`: cancellation on disconnect, deadlines, hard stop, bad JSON, liveness and readiness.

mod grpc_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use grpc_support::ScriptedBackend;
use qnode::config::Config;
use qnode::engine::Backend;
use qnode::http::{self, HttpConfig};
use qnode::metrics::Metrics;
use qnode::node::{Node, Role};

struct Front {
    url: String,
    backend: Arc<ScriptedBackend>,
    node: Arc<Node>,
    metrics: Metrics,
}

async fn start(node: Arc<Node>, api_key: Option<&str>) -> Front {
    let mut config = Config::default();
    config.server.api_key = api_key.map(str::to_owned);
    start_with(node, config).await
}

async fn start_with(node: Arc<Node>, config: Config) -> Front {
    let backend = ScriptedBackend::new(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Metrics::new().unwrap();
    tokio::spawn(http::serve(
        listener,
        Arc::clone(&backend) as Arc<dyn Backend>,
        Arc::clone(&node),
        HttpConfig::new(&config, metrics.clone()),
        std::future::pending(),
    ));
    Front {
        url: format!("http://{addr}"),
        backend,
        node,
        metrics,
    }
}

async fn ready_front() -> Front {
    start(Node::ready(&Metrics::new().unwrap()), None).await
}

/// `curl -s` with `args`; returns (HTTP status, headers + body).
async fn curl(args: &[&str]) -> (u16, String) {
    let mut full = vec!["-s", "-i", "-w", "\n%{http_code}"];
    full.extend_from_slice(args);
    let full: Vec<String> = full.into_iter().map(str::to_owned).collect();
    let out = tokio::task::spawn_blocking(move || Command::new("curl").args(&full).output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.trim_end().rsplit_once('\n').expect("status line");
    (code.parse().expect("HTTP status"), body.to_owned())
}

async fn post(url: &str, body: &str, headers: &[&str]) -> (u16, String) {
    let mut args = vec!["-H", "Content-Type: application/json", "-d", body, url];
    for h in headers {
        args.extend_from_slice(&["-H", h]);
    }
    curl(&args).await
}

fn chat(content: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"smollm2","messages":[{{"role":"user","content":"{content}"}}],"stream":{stream}}}"#
    )
}

#[tokio::test]
async fn unary_and_streamed_answers_have_the_openai_shape() {
    let front = ready_front().await;
    let url = format!("{}/v1/chat/completions", front.url);
    let (code, out) = post(&url, &chat("hi", false), &["x-request-id: req-7"]).await;
    assert_eq!(code, 200, "{out}");
    assert!(out.contains("x-request-id: req-7"), "{out}");
    let json: serde_json::Value = serde_json::from_str(out.rsplit("\r\n\r\n").next().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(json["id"], "chatcmpl-req-7");
    assert_eq!(json["object"], "chat.completion");
    assert_eq!(json["choices"][0]["message"]["content"], "Hello!");
    assert_eq!(json["choices"][0]["finish_reason"], "stop");
    assert_eq!(json["usage"]["total_tokens"], 8);

    let body = r#"{"model":"smollm2","messages":[{"role":"user","content":"hi"}],"stream":true,
                   "max_tokens":2,"stream_options":{"include_usage":true}}"#;
    let (code, out) = post(&url, body, &[]).await;
    assert_eq!(code, 200, "{out}");
    assert!(out.contains("content-type: text/event-stream"), "{out}");
    let events: Vec<&str> = out
        .split("\n\n")
        .filter_map(|e| e.rsplit("data: ").next().filter(|_| e.contains("data: ")))
        .collect();
    assert_eq!(events.len(), 5, "2 deltas, finish, usage, DONE: {out}");
    assert_eq!(events[4], "[DONE]");
    let first: serde_json::Value = serde_json::from_str(events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(first["choices"][0]["delta"]["content"], "Hel");
    let finish: serde_json::Value = serde_json::from_str(events[2]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage: serde_json::Value = serde_json::from_str(events[3]).unwrap();
    assert_eq!(usage["choices"], serde_json::json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 2);

    let (code, out) = post(
        &format!("{}/v1/completions", front.url),
        r#"{"model":"smollm2","prompt":"hi"}"#,
        &[],
    )
    .await;
    assert_eq!(code, 200, "{out}");
    assert!(out.contains(r#""object":"text_completion""#), "{out}");
    assert!(out.contains(r#""text":"Hello!""#), "{out}");
}

#[tokio::test]
async fn closing_the_connection_cancels_the_generation() {
    let front = ready_front().await;
    let mut child = Command::new("curl")
        .args([
            "-sN",
            "-H",
            "Content-Type: application/json",
            "-d",
            &chat("hang", true),
            &format!("{}/v1/chat/completions", front.url),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    assert!(first.contains(r#""content":"tick""#), "{first}");
    assert_eq!(front.backend.cancelled(), 0);
    assert_eq!(front.node.in_flight(), 1, "the stream holds its admission");
    child.kill().unwrap();
    child.wait().unwrap();
    front.backend.wait_cancelled(1).await;
    for _ in 0..500 {
        if front.node.in_flight() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(front.node.in_flight(), 0);
    assert_eq!(front.backend.finished(), 0);
}

#[tokio::test]
async fn deadline_header_gives_504_and_cancels() {
    let front = ready_front().await;
    let url = format!("{}/v1/chat/completions", front.url);
    let (code, out) = post(&url, &chat("hang", false), &["x-qnode-timeout-ms: 100"]).await;
    assert_eq!(code, 504, "{out}");
    assert!(out.contains(r#""code":"deadline_exceeded""#), "{out}");
    front.backend.wait_cancelled(1).await;

    let (code, out) = post(&url, &chat("hi", false), &["x-qnode-timeout-ms: soon"]).await;
    assert_eq!(code, 400, "{out}");
    assert!(out.contains(r#""param":"x-qnode-timeout-ms""#), "{out}");
}

#[tokio::test]
async fn hard_stop_ends_a_stream_with_an_error_event() {
    let front = ready_front().await;
    let url = format!("{}/v1/chat/completions", front.url);
    let call = tokio::spawn(async move { post(&url, &chat("hang", true), &[]).await });
    front.backend.wait_submitted(1).await;
    front.node.hard_stop();
    let (code, out) = call.await.unwrap();
    assert_eq!(code, 200, "the stream had begun: {out}");
    assert!(out.contains(r#""content":"tick""#), "{out}");
    assert!(out.contains(r#"data: {"error":"#), "{out}");
    assert!(out.contains("shut down"), "{out}");
    assert!(!out.contains("[DONE]"), "{out}");
    front.backend.wait_cancelled(1).await;
}

#[tokio::test]
async fn bad_requests_say_what_to_fix() {
    let front = ready_front().await;
    let url = format!("{}/v1/chat/completions", front.url);
    let cases: &[(&str, &str)] = &[
        (r#"{"model":"smollm2","messages":["#, "not valid JSON"),
        (r#"{"model":"smollm2"}"#, "messages"),
        (
            r#"{"model":"smollm2","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
            "temperature",
        ),
        (
            r#"{"model":"smollm2","messages":[{"role":"robot","content":"x"}]}"#,
            "messages[0].role",
        ),
        (
            r#"{"model":"smollm2","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
            "max_tokens",
        ),
    ];
    for (body, needle) in cases {
        let (code, out) = post(&url, body, &[]).await;
        assert_eq!(code, 400, "{body}: {out}");
        assert!(out.contains(needle), "{body}: {out}");
        assert!(out.contains(r#""type":"invalid_request_error""#), "{out}");
    }
    let (code, out) = curl(&["-d", "{}", &url]).await;
    assert_eq!(code, 400, "{out}");
    assert!(out.contains("Content-Type: application/json"), "{out}");
    let (code, out) = post(&url, &chat("overflow", false), &[]).await;
    assert_eq!(code, 400, "{out}");
    assert!(out.contains("context_length_exceeded"), "{out}");
    let (code, out) = post(&url, &chat("internal", false), &[]).await;
    assert_eq!(code, 500, "{out}");
    let (code, out) = curl(&[&format!("{}/v2/nothing", front.url)]).await;
    assert_eq!(code, 404, "{out}");
    assert!(out.contains("/v1/chat/completions"), "{out}");
}

#[tokio::test]
async fn health_is_liveness_and_ready_follows_the_node() {
    let metrics = Metrics::new().unwrap();
    let node = Node::new(Role::Standby, &metrics);
    let front = start(Arc::clone(&node), Some("k")).await;
    let get = |path: &str| {
        let url = format!("{}{path}", front.url);
        async move { curl(&[&url]).await }
    };
    let (code, out) = get("/health").await;
    assert_eq!(code, 200, "{out}");
    let (code, out) = get("/ready").await;
    assert_eq!(code, 503, "{out}");
    assert!(out.contains(r#""state":"loading""#), "{out}");
    node.warmed();
    let (code, out) = get("/ready").await;
    assert_eq!(code, 503, "{out}");
    assert!(out.contains(r#""state":"standby""#), "{out}");
    node.activate().unwrap();
    let (code, out) = get("/ready").await;
    assert_eq!(code, 200, "{out}");
    node.drain();
    let (code, out) = get("/ready").await;
    assert_eq!(code, 503, "{out}");
    assert!(out.contains(r#""state":"draining""#), "{out}");
    let (code, _) = get("/health").await;
    assert_eq!(code, 200);
    // A draining node refuses new calls with 503, after the key check.
    let url = format!("{}/v1/chat/completions", front.url);
    let (code, out) = post(&url, &chat("hi", false), &["Authorization: Bearer k"]).await;
    assert_eq!(code, 503, "{out}");
    assert!(out.contains("node_draining"), "{out}");
    let (code, out) = post(&url, &chat("hi", false), &[]).await;
    assert_eq!(code, 401, "{out}");
    let (code, out) = curl(&[&format!("{}/v1/models", front.url)]).await;
    assert_eq!(code, 401, "{out}");
    assert!(front.backend.submitted.lock().unwrap().is_empty());
}

/// The session key: the `x-session-id` header, else the OpenAI `user` field; a header that is
/// not visible ASCII, repeated, or over 256 bytes is a 400 naming it, as is a `user` over 256.
#[tokio::test]
async fn session_key_is_the_header_else_user() {
    let front = ready_front().await;
    let url = format!("{}/v1/chat/completions", front.url);
    let with_user = |user: &str| {
        format!(
            r#"{{"model":"smollm2","messages":[{{"role":"user","content":"hi"}}],"user":"{user}"}}"#
        )
    };
    let cases: &[(String, &[&str], Option<&str>)] = &[
        (chat("hi", false), &["x-session-id: conv-1"], Some("conv-1")),
        (with_user("Zoë"), &["x-session-id: conv-2"], Some("conv-2")),
        (with_user("Zoë"), &[], Some("Zoë")),
        (chat("hi", false), &[], None),
    ];
    for (body, headers, want) in cases {
        let (code, out) = post(&url, body, headers).await;
        assert_eq!(code, 200, "{out}");
        let seen = front.backend.last_submitted().session;
        assert_eq!(seen.as_deref(), *want, "{body} {headers:?}");
    }
    let long_user = with_user(&"u".repeat(257));
    let long_header = format!("x-session-id: {}", "s".repeat(257));
    let refused: &[(&str, &[&str], &str)] = &[
        (
            &chat("hi", false),
            &["x-session-id: café"],
            "`x-session-id` must be visible ASCII",
        ),
        (
            &chat("hi", false),
            &["x-session-id: a", "x-session-id: b"],
            r#"Given: \"a, b\""#,
        ),
        (
            &chat("hi", false),
            &[&long_header],
            "`x-session-id` must be <= 256 bytes",
        ),
        (&long_user, &[], "`user` must be <= 256 bytes"),
    ];
    let before = front.backend.submitted.lock().unwrap().len();
    for (body, headers, needle) in refused {
        let (code, out) = post(&url, body, headers).await;
        assert_eq!(code, 400, "{out}");
        assert!(out.contains(needle), "{needle}: {out}");
    }
    assert_eq!(front.backend.submitted.lock().unwrap().len(), before);
}

/// A body without `temperature` (or with `null`) samples at OpenAI's default 1.0, as the OpenAI
/// clients gateways use expect; greedy only when asked for with `"temperature":0`.
#[tokio::test]
async fn missing_temperature_is_openai_default_not_greedy() {
    let front = ready_front().await;
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let url = format!("{}{path}", front.url);
        let input = if path == "/v1/completions" {
            r#""prompt":"hi""#
        } else {
            r#""messages":[{"role":"user","content":"hi"}]"#
        };
        for (extra, want) in [
            ("", 1.0),
            (r#","temperature":null"#, 1.0),
            (r#","temperature":0"#, 0.0),
        ] {
            let body = format!(r#"{{"model":"smollm2",{input}{extra}}}"#);
            let (code, out) = post(&url, &body, &[]).await;
            assert_eq!(code, 200, "{out}");
            let sampling = front.backend.last_submitted().sampling;
            assert_eq!(sampling.temperature, want, "{path} {body}");
            assert_eq!(sampling.seed, None);
            assert_eq!(sampling.is_deterministic(), want == 0.0, "{body}");
        }
    }
}

/// `top_k`, `min_p` and `repetition_penalty` (vLLM / llama.cpp server style) reach the engine, and
/// are checked by the same code as gRPC's fields: the same messages, naming the field.
#[tokio::test]
async fn vllm_sampling_fields_reach_the_engine_and_are_checked_as_on_grpc() {
    let front = ready_front().await;
    let url = format!("{}/v1/chat/completions", front.url);
    let with = |extra: &str| {
        format!(r#"{{"model":"smollm2","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
    };
    let (code, out) = post(
        &url,
        &with(r#","top_k":40,"min_p":0.05,"repetition_penalty":1.1"#),
        &[],
    )
    .await;
    assert_eq!(code, 200, "{out}");
    let s = front.backend.last_submitted().sampling;
    assert_eq!((s.top_k, s.min_p, s.repetition_penalty), (40, 0.05, 1.1));
    let before = front.backend.submitted.lock().unwrap().len();
    for (extra, param, message) in [
        (
            r#","top_k":5000"#,
            "top_k",
            "`top_k` must be <= 1000. Given: 5000",
        ),
        (
            r#","min_p":1.5"#,
            "min_p",
            "`min_p` must be in [0, 1]. Given: 1.5",
        ),
        (
            r#","repetition_penalty":0"#,
            "repetition_penalty",
            "`repetition_penalty` must be in (0, 2]. Given: 0",
        ),
    ] {
        let (code, out) = post(&url, &with(extra), &[]).await;
        assert_eq!(code, 400, "{extra}: {out}");
        let body: serde_json::Value =
            serde_json::from_str(out.rsplit("\r\n\r\n").next().unwrap()).unwrap();
        assert_eq!(body["error"]["param"], param, "{out}");
        let got = body["error"]["message"].as_str().unwrap();
        assert!(got.contains(message), "{extra}: {got}");
    }
    assert_eq!(front.backend.submitted.lock().unwrap().len(), before);
}

/// Data events of an SSE body, `[DONE]` included.
fn sse_events(out: &str) -> Vec<String> {
    out.split("\n\n")
        .filter_map(|e| e.split_once("data: ").map(|(_, d)| d.to_owned()))
        .collect()
}

fn json_body(out: &str) -> serde_json::Value {
    serde_json::from_str(out.rsplit("\r\n\r\n").next().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `/v1/completions` with a list of prompts: one choice per prompt with its `index`, all
/// submitted (so the pool batches them), usage summed, `system_fingerprint` as chat's; streamed,
/// the choices interleave by index and one usage chunk and one `[DONE]` end it.
#[tokio::test]
async fn completions_take_a_batch_of_prompts() {
    let front = ready_front().await;
    let url = format!("{}/v1/completions", front.url);
    let (code, out) = post(
        &url,
        r#"{"model":"smollm2","prompt":["hi","hi","hi"]}"#,
        &[],
    )
    .await;
    assert_eq!(code, 200, "{out}");
    let json = json_body(&out);
    let choices = json["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{json}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(
            (c["index"].as_u64(), c["text"].as_str()),
            (Some(i as u64), Some("Hello!"))
        );
    }
    assert_eq!(json["usage"]["prompt_tokens"], 15, "{json}");
    assert_eq!(json["usage"]["completion_tokens"], 9, "{json}");
    assert_eq!(json["usage"]["total_tokens"], 24, "{json}");
    assert_eq!(json["system_fingerprint"], "qnode-model", "{json}");
    assert_eq!(front.backend.submitted.lock().unwrap().len(), 3);

    let body = r#"{"model":"smollm2","prompt":["hi","hi"],"stream":true,"max_tokens":2,
                   "stream_options":{"include_usage":true}}"#;
    let (code, out) = post(&url, body, &[]).await;
    assert_eq!(code, 200, "{out}");
    let events = sse_events(&out);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{out}");
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1, "{out}");
    let mut text = [String::new(), String::new()];
    let mut finish = [None, None];
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let chunk: serde_json::Value = serde_json::from_str(e).unwrap();
        if !chunk["usage"].is_null() {
            usage = Some(chunk["usage"].clone());
        }
        for c in chunk["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            text[i].push_str(c["text"].as_str().unwrap());
            if let Some(f) = c["finish_reason"].as_str() {
                finish[i] = Some(f.to_owned());
            }
        }
    }
    assert_eq!(text, ["Hello".to_owned(), "Hello".to_owned()], "{out}");
    assert_eq!(finish, [Some("length".into()), Some("length".into())]);
    assert_eq!(
        usage.expect("a usage chunk")["completion_tokens"],
        4,
        "{out}"
    );

    // A refused prompt names its index; the prompts submitted before it are cancelled.
    let before = front.backend.submitted.lock().unwrap().len();
    let (code, out) = post(
        &url,
        r#"{"model":"smollm2","prompt":["hang","","hi"]}"#,
        &[],
    )
    .await;
    assert_eq!(code, 400, "{out}");
    assert_eq!(json_body(&out)["error"]["param"], "prompt[1]", "{out}");
    assert_eq!(front.backend.submitted.lock().unwrap().len(), before + 1);
    front.backend.wait_cancelled(1).await;
    // A prompt failing mid-stream ends the stream with its error, no [DONE].
    let body = r#"{"model":"smollm2","prompt":["hi","fail_midway"],"stream":true}"#;
    let (code, out) = post(&url, body, &[]).await;
    assert_eq!(code, 200, "{out}");
    assert!(out.contains(r#"data: {"error":"#), "{out}");
    assert!(!out.contains("[DONE]"), "{out}");
    // Token ids are refused naming `prompt`.
    for ids in ["[1,2,3]", "[[1,2],[3]]"] {
        let (code, out) = post(
            &url,
            &format!(r#"{{"model":"smollm2","prompt":{ids}}}"#),
            &[],
        )
        .await;
        assert_eq!(code, 400, "{out}");
        assert!(out.contains("token ids"), "{out}");
        assert_eq!(json_body(&out)["error"]["param"], "prompt", "{out}");
    }
}

/// `GET /v1/models/{id}`: the list's entry, or OpenAI's 404 `model_not_found` naming the ids
/// served, the id asked for echoed capped.
#[tokio::test]
async fn retrieve_model_by_id() {
    let front = ready_front().await;
    let (code, out) = curl(&[&format!("{}/v1/models/smollm2", front.url)]).await;
    assert_eq!(code, 200, "{out}");
    let json = json_body(&out);
    assert_eq!(
        (&json["id"], &json["object"], &json["owned_by"]),
        (
            &serde_json::json!("smollm2"),
            &serde_json::json!("model"),
            &serde_json::json!("qnode")
        ),
        "{json}"
    );
    assert!(json["created"].as_u64().unwrap() > 1_700_000_000, "{json}");
    let long = "x".repeat(10_000);
    for id in ["nope", "org/model", long.as_str()] {
        let (code, out) = curl(&[&format!("{}/v1/models/{id}", front.url)]).await;
        assert_eq!(code, 404, "{out}");
        let error = &json_body(&out)["error"];
        assert_eq!(error["code"], "model_not_found", "{out}");
        assert_eq!(error["param"], "model", "{out}");
        assert!(
            error["message"].as_str().unwrap().contains("smollm2"),
            "{out}"
        );
        assert!(
            out.len() < 1000,
            "the id is echoed capped: {} bytes",
            out.len()
        );
    }
}

/// A picture in a message (a QQ image): by default its text parts are served, the answer says
/// what was left out in `x-qnode-warning`, and a picture-only turn reads as omitted content;
/// with `openai.non_text_parts = "reject"` it is a 400 naming the part.
#[tokio::test]
async fn non_text_parts_are_dropped_with_a_warning_or_refused() {
    let body = r#"{"model":"smollm2","messages":[
        {"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]},
        {"role":"user","content":[{"type":"text","text":"What is "},
            {"type":"image_url","image_url":{"url":"https://example.com/cat.png"}},
            {"type":"text","text":"this?"}]}]}"#;
    let front = ready_front().await;
    let url = format!("{}/v1/chat/completions", front.url);
    let (code, out) = post(&url, body, &[]).await;
    assert_eq!(code, 200, "{out}");
    assert!(
        out.contains("x-qnode-warning: dropped 2 non-text content part(s)"),
        "{out}"
    );
    let submitted = front.backend.last_submitted();
    let qnode::types::PromptInput::Chat(messages) = &submitted.input else {
        panic!("a chat: {submitted:?}");
    };
    let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, ["[non-text content omitted]", "What is this?"]);
    // Text-only requests carry no warning.
    let (code, out) = post(&url, &chat("hi", false), &[]).await;
    assert_eq!(code, 200, "{out}");
    assert!(!out.contains("x-qnode-warning"), "{out}");

    let mut config = Config::default();
    config.openai.non_text_parts = qnode::config::NonTextParts::Reject;
    let front = start_with(Node::ready(&Metrics::new().unwrap()), config).await;
    let url = format!("{}/v1/chat/completions", front.url);
    let (code, out) = post(&url, body, &[]).await;
    assert_eq!(code, 400, "{out}");
    assert_eq!(
        json_body(&out)["error"]["param"],
        "messages[0].content[0].type",
        "{out}"
    );
    assert!(front.backend.submitted.lock().unwrap().is_empty());
}

/// The value of the sample `series` (`name{labels}` as Prometheus' text format writes it, labels
/// sorted) on a `/metrics` page; 0 when absent.
fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Malformed JSON (bad syntax, a wrong type, no JSON content type, a body over the limit) is
/// counted in `qnode_requests_total` as gRPC's malformed protobuf is: code `InvalidArgument`,
/// model `-`; a body that parses but is refused before submission (`n`: 2) under its model.
#[tokio::test]
async fn malformed_json_is_counted_like_malformed_protobuf() {
    let mut config = Config::default();
    config.server.max_message_bytes = 4096;
    let front = start_with(Node::ready(&Metrics::new().unwrap()), config).await;
    let url = format!("{}/v1/chat/completions", front.url);
    let before = front.metrics.render();
    let big = chat(&"x".repeat(8000), false);
    let cases: &[(&str, u16)] = &[
        (r#"{"model":"smollm2","messages":["#, 400),
        (
            r#"{"model":"smollm2","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
            400,
        ),
        (&big, 413),
    ];
    for (body, want) in cases {
        let (code, out) = post(&url, body, &[]).await;
        assert_eq!(code, *want, "{out}");
    }
    let (code, out) = curl(&["-d", "{}", &url]).await;
    assert_eq!(code, 400, "no JSON content type: {out}");
    let (code, out) = post(
        &format!("{}/v1/completions", front.url),
        r#"{"model":"smollm2","prompt":7}"#,
        &[],
    )
    .await;
    assert_eq!(code, 400, "{out}");
    let n2 = r#"{"model":"smollm2","messages":[{"role":"user","content":"x"}],"n":2}"#;
    let (code, out) = post(&url, n2, &[]).await;
    assert_eq!(code, 400, "{out}");
    let after = front.metrics.render();
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    for (series, want) in [
        (
            r#"qnode_requests_total{code="InvalidArgument",method="chat.completions",model="-"}"#,
            4.0,
        ),
        (
            r#"qnode_requests_total{code="InvalidArgument",method="completions",model="-"}"#,
            1.0,
        ),
        (
            r#"qnode_requests_total{code="InvalidArgument",method="chat.completions",model="smollm2"}"#,
            1.0,
        ),
    ] {
        assert_eq!(delta(series), want, "{series}\n{after}");
    }
    assert!(front.backend.submitted.lock().unwrap().is_empty());
}
