//! Admission is settled before a front answers: a generation the backend refuses is that
//! front's own status (HTTP 429 + `Retry-After`, gRPC RESOURCE_EXHAUSTED), streamed or not, and
//! with Redis configured as without it — never a 200 whose stream carries the error.
//!
//! The node is built by the composition root (`qnode::app`) over the real answer cache and a
//! counting stand-in for the model (tests/cache_support), with a real redis-server.

mod cache_support;
mod common;
mod grpc_support;

use std::process::Command;
use std::sync::Arc;

use cache_support::{config, identities, CountingBackend, RedisServer, MODEL};
use common::Served;
use qnode::app::Generator;
use qnode::config::Config;
use qnode::engine::Backend;
use qnode::grpc::proto::{self};
use std::time::Duration;
use tonic::Code;

async fn start(redis: Option<&RedisServer>) -> Served {
    start_with(config(redis)).await
}

async fn start_with(cache: qnode::cache::CacheConfig) -> Served {
    let node = Config {
        cache,
        ..Config::default()
    };
    common::serve_both(
        node,
        Generator::Backend {
            backend: CountingBackend::new(Duration::ZERO) as Arc<dyn Backend>,
            identities: identities(),
        },
    )
    .await
}

/// `POST /v1/chat/completions` (streamed when `stream`): (status line, headers, body) as curl
/// saw them.
fn http_chat(node: &Served, content: &str, stream: bool) -> (u16, String, String) {
    http_chat_with(node, content, stream, &[])
}

/// [`http_chat`] with extra request headers.
fn http_chat_with(
    node: &Served,
    content: &str,
    stream: bool,
    headers: &[&str],
) -> (u16, String, String) {
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"{content}"}}],"max_tokens":8,"temperature":0,"stream":{stream}}}"#
    );
    let out = Command::new("curl")
        .args([
            "-s",
            "-i",
            "-H",
            "content-type: application/json",
            "-d",
            &body,
        ])
        .args(headers.iter().flat_map(|h| ["-H", h]))
        .arg(format!("{}/v1/chat/completions", node.http))
        .output()
        .expect("curl runs (bash scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

async fn refusals_are_the_fronts_own_status(redis: Option<&RedisServer>) {
    let mut node = start(redis).await;
    for stream in [false, true] {
        let (status, head, body) = http_chat(&node, "queue_full", stream);
        assert_eq!(status, 429, "stream={stream}: {head}\n{body}");
        assert!(head.contains("retry-after: 1"), "stream={stream}: {head}");
        assert!(
            !head.contains("text/event-stream"),
            "a refusal is no SSE stream: {head}"
        );
        assert!(body.contains("queue_full"), "{body}");
    }
    let request = || proto::GenerateRequest {
        model: MODEL.into(),
        messages: vec![proto::ChatMessage {
            role: "user".into(),
            content: "queue_full".into(),
            ..Default::default()
        }],
        max_tokens: Some(8),
        temperature: Some(0.0),
        ..Default::default()
    };
    let unary = node.grpc.generate(request()).await.unwrap_err();
    assert_eq!(unary.code(), Code::ResourceExhausted, "{unary:?}");
    // Streamed: the call itself fails, before any chunk.
    let streamed = node.grpc.generate_stream(request()).await.unwrap_err();
    assert_eq!(streamed.code(), Code::ResourceExhausted, "{streamed:?}");

    // An admitted request still answers 200, streamed, through the same path.
    let (status, head, body) = http_chat(&node, "hello", true);
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(body.contains("[DONE]"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_generation_is_429_without_redis() {
    refusals_are_the_fronts_own_status(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_generation_is_429_with_redis() {
    let redis = RedisServer::start();
    refusals_are_the_fronts_own_status(Some(&redis)).await;
}

/// A caller's deadline holds while its call waits for admission, not only once it generates:
/// with Redis frozen (SIGSTOP: the socket accepts, nothing answers) and a 30 s Redis timeout,
/// the answer-cache lookup would hold each call for 30 s; a 400 ms deadline ends it first, on
/// both fronts (gRPC through a transport that only sends `grpc-timeout`, so what the test sees
/// is the server's doing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_cuts_a_call_waiting_for_admission() {
    let redis = RedisServer::start();
    let mut cache = config(Some(&redis));
    cache.redis_timeout = Duration::from_secs(30);
    let node = start_with(cache).await;
    redis.pause();
    let started = std::time::Instant::now();

    let (status, head, body) = http_chat_with(
        &node,
        "waits for a frozen redis",
        false,
        &["x-qnode-timeout-ms: 400"],
    );
    assert_eq!(status, 504, "{head}\n{body}");
    assert!(body.contains("deadline"), "{body}");

    let mut raw = grpc_support::raw_client(&node.grpc_url);
    let mut request = tonic::Request::new(proto::GenerateRequest {
        model: MODEL.into(),
        prompt: Some("also waits for the frozen redis".into()),
        max_tokens: Some(8),
        temperature: Some(0.0),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("grpc-timeout", "400m".parse().unwrap());
    let status = raw.generate(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // Both answers came long before the 30 s lookups could have ended.
    let waited = started.elapsed();
    redis.resume();
    assert!(
        waited < Duration::from_secs(15),
        "the calls waited {waited:?}: for Redis, not for their own deadline"
    );
}
