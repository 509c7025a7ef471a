//! The answer cache as callers see it through both fronts at once: the gRPC server and the
//! OpenAI HTTP front of one node over one `CachedBackend` (the real cache; a counting stand-in for
//! the model, tests/cache_support, so every generation is counted and numbered).
//!
//! - Tenants (`x-qnode-tenant`, gRPC metadata and HTTP header) never see each other's answers, on
//!   either front, while one tenant's answer is shared between the fronts.
//! - `CACHE_POLICY_ONLY_IF_CACHED` (gRPC) and `"cache_policy":"only_if_cached"` (HTTP) serve a
//!   hit and never generate on a miss, which fails with the status the proto promises
//!   (FAILED_PRECONDITION; HTTP 412 `not_cached`).
//! - The HTTP front has no cache policy field: one sent there must be honoured or refused, never
//!   silently ignored.

mod cache_support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cache_support::{config, identities, CountingBackend, MODEL};
use qnode::cache::CachedBackend;
use qnode::config::Config;
use qnode::engine::Backend;
use qnode::grpc::proto::inference_client::InferenceClient;
use qnode::grpc::proto::{self, CacheLevel};
use qnode::grpc::{self, ServerConfig, Services};
use qnode::http::{self, HttpConfig};
use qnode::metrics::Metrics;
use qnode::node::Node;
use tonic::Code;

struct Fronts {
    grpc: InferenceClient<tonic::transport::Channel>,
    http: String,
    model: Arc<CountingBackend>,
}

async fn start() -> Fronts {
    let model = CountingBackend::new(Duration::ZERO);
    let cache = Arc::new(
        CachedBackend::new(
            Arc::clone(&model) as Arc<dyn Backend>,
            identities(),
            config(None),
        )
        .unwrap(),
    );
    let metrics = Metrics::new().unwrap();
    let node = Node::ready(&metrics);

    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let mut grpc_config = ServerConfig::new(&Config::default(), metrics.clone());
    grpc_config.health_poll = Duration::from_millis(10);
    let services = Services {
        backend: Arc::clone(&cache) as Arc<dyn Backend>,
        node: Arc::clone(&node),
        models: None,
    };
    tokio::spawn(grpc::run(
        grpc,
        services,
        grpc_config,
        std::future::pending(),
    ));

    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    tokio::spawn(http::serve(
        http,
        cache as Arc<dyn Backend>,
        node,
        HttpConfig::new(&Config::default(), metrics),
        std::future::pending(),
    ));

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Fronts {
        grpc: InferenceClient::new(channel),
        http: format!("http://{http_addr}"),
        model,
    }
}

fn wire(prompt: &str, policy: proto::CachePolicy) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: MODEL.into(),
        messages: vec![proto::ChatMessage {
            role: "user".into(),
            content: prompt.into(),
            ..Default::default()
        }],
        max_tokens: Some(32),
        temperature: Some(0.0),
        cache_policy: policy as i32,
        ..Default::default()
    }
}

/// A unary gRPC call as `tenant` (no metadata when `None`).
async fn grpc_ask(
    fronts: &mut Fronts,
    prompt: &str,
    tenant: Option<&str>,
    policy: proto::CachePolicy,
) -> Result<proto::GenerateResponse, tonic::Status> {
    let mut call = tonic::Request::new(wire(prompt, policy));
    if let Some(t) = tenant {
        call.metadata_mut()
            .insert("x-qnode-tenant", t.parse().unwrap());
    }
    fronts.grpc.generate(call).await.map(|r| r.into_inner())
}

/// `POST /v1/chat/completions` as `tenant`, the same request as [`wire`] plus `extra` JSON
/// fields: (HTTP status, parsed body).
async fn http_ask(
    fronts: &Fronts,
    prompt: &str,
    tenant: Option<&str>,
    extra: &str,
) -> (u16, serde_json::Value) {
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"{prompt}"}}],"max_tokens":32,"temperature":0{extra}}}"#
    );
    http_post(fronts, body, tenant).await
}

/// `POST /v1/chat/completions` of `body` as `tenant`: (HTTP status, parsed body).
async fn http_post(
    fronts: &Fronts,
    body: String,
    tenant: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut args = vec![
        "-s".to_string(),
        "-w".into(),
        "\n%{http_code}".into(),
        "-H".into(),
        "Content-Type: application/json".into(),
        "-d".into(),
        body,
        format!("{}/v1/chat/completions", fronts.http),
    ];
    if let Some(t) = tenant {
        args.extend(["-H".into(), format!("x-qnode-tenant: {t}")]);
    }
    let out = tokio::task::spawn_blocking(move || Command::new("curl").args(&args).output())
        .await
        .unwrap()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.trim_end().rsplit_once('\n').expect("status line");
    (
        code.parse().expect("HTTP status"),
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

/// Text and cache source of a 200 chat completion (`system_fingerprint` names the source).
fn http_answer((code, body): (u16, serde_json::Value)) -> (String, String) {
    assert_eq!(code, 200, "{body}");
    (
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        body["system_fingerprint"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_share_answers_on_either_front() {
    let mut f = start().await;
    let q = "what is the plan";
    let default = proto::CachePolicy::Default;

    // alpha asks over gRPC: generated (#1); again: its own answer from L1.
    let a1 = grpc_ask(&mut f, q, Some("alpha"), default).await.unwrap();
    assert_eq!(a1.cache_level, CacheLevel::None as i32);
    assert!(a1.text.starts_with("answer #1 "), "{}", a1.text);
    let a2 = grpc_ask(&mut f, q, Some("alpha"), default).await.unwrap();
    assert_eq!(
        (a2.cache_level, &a2.text),
        (CacheLevel::L1 as i32, &a1.text)
    );
    // alpha over HTTP: the same answer, from the same cache.
    let (text, source) = http_answer(http_ask(&f, q, Some("alpha"), "").await);
    assert_eq!(
        (text.as_str(), source.as_str()),
        (a1.text.as_str(), "qnode-cache-l1")
    );
    assert_eq!(f.model.count(), 1);

    // beta, same question, over HTTP first: never alpha's answer, a generation of its own (#2).
    let (beta, source) = http_answer(http_ask(&f, q, Some("beta"), "").await);
    assert_eq!(source, "qnode-model", "beta was served a cached answer");
    assert!(beta.starts_with("answer #2 "), "{beta}");
    // beta over gRPC: its own answer back, not alpha's.
    let b2 = grpc_ask(&mut f, q, Some("beta"), default).await.unwrap();
    assert_eq!(
        (b2.cache_level, b2.text.as_str()),
        (CacheLevel::L1 as i32, beta.as_str())
    );

    // No tenant is a tenant of its own too, on both fronts.
    let n1 = grpc_ask(&mut f, q, None, default).await.unwrap();
    assert_eq!(n1.cache_level, CacheLevel::None as i32);
    assert!(n1.text.starts_with("answer #3 "), "{}", n1.text);
    let (none, source) = http_answer(http_ask(&f, q, None, "").await);
    assert_eq!((none, source.as_str()), (n1.text, "qnode-cache-l1"));
    assert_eq!(f.model.count(), 3, "one generation per tenant, no more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_if_cached_serves_hits_and_never_generates() {
    let mut f = start().await;
    let only = proto::CachePolicy::OnlyIfCached;
    let q = "a cached question";
    let first = grpc_ask(&mut f, q, Some("alpha"), proto::CachePolicy::Default)
        .await
        .unwrap();
    let hit = grpc_ask(&mut f, q, Some("alpha"), only).await.unwrap();
    assert_eq!(
        (hit.cache_level, &hit.text),
        (CacheLevel::L1 as i32, &first.text)
    );
    // A miss (another question, or the same one for another tenant) generates nothing.
    for (prompt, tenant) in [("never asked", Some("alpha")), (q, Some("beta")), (q, None)] {
        let miss = grpc_ask(&mut f, prompt, tenant, only).await;
        assert_eq!(
            miss.as_ref().map_err(|s| s.code()).err(),
            Some(Code::FailedPrecondition),
            "{prompt:?} {tenant:?}: {miss:?}"
        );
    }
    assert_eq!(f.model.count(), 1, "ONLY_IF_CACHED generated");
}

/// proto/qnode/v1/inference.proto: an ONLY_IF_CACHED miss fails with FAILED_PRECONDITION (not
/// NOT_FOUND, which means an unknown model).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_if_cached_miss_is_failed_precondition_as_the_proto_says() {
    let mut f = start().await;
    let miss = grpc_ask(
        &mut f,
        "never asked",
        None,
        proto::CachePolicy::OnlyIfCached,
    )
    .await
    .expect_err("a miss must fail");
    assert_eq!(miss.code(), Code::FailedPrecondition, "{miss:?}");
    assert_eq!(f.model.count(), 0);
}

/// `"cache_policy":"only_if_cached"` over HTTP is honoured as on gRPC: a miss is a 412
/// `not_cached` and nothing is generated (it used to be accepted and ignored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_never_ignores_a_cache_policy() {
    let f = start().await;
    let (code, body) = http_ask(
        &f,
        "never asked",
        None,
        r#","cache_policy":"only_if_cached""#,
    )
    .await;
    assert_eq!(code, 412, "{body}");
    assert_eq!(body["error"]["code"], "not_cached", "{body}");
    assert_eq!(f.model.count(), 0, "ONLY_IF_CACHED generated over HTTP");
    let (code, body) = http_ask(&f, "never asked", None, r#","cache_policy":"sometimes""#).await;
    assert_eq!(
        (code, &body["error"]["param"]),
        (400, &serde_json::json!("cache_policy")),
        "{body}"
    );
}

/// ONLY_IF_CACHED over HTTP serves what either front cached, for its own tenant only: a hit is the
/// cached text (`qnode-cache-l1`), another tenant's ask of the same question is a 412 miss, and a
/// gRPC ONLY_IF_CACHED ask is served what HTTP cached. Nothing beyond the first ask generates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_if_cached_serves_hits_over_http_across_fronts() {
    let mut f = start().await;
    let only = r#","cache_policy":"only_if_cached""#;
    let first = grpc_ask(
        &mut f,
        "asked on grpc",
        Some("alpha"),
        proto::CachePolicy::Default,
    )
    .await
    .unwrap();
    let (text, source) = http_answer(http_ask(&f, "asked on grpc", Some("alpha"), only).await);
    assert_eq!(
        (text.as_str(), source.as_str()),
        (first.text.as_str(), "qnode-cache-l1")
    );
    let (code, body) = http_ask(&f, "asked on grpc", Some("beta"), only).await;
    assert_eq!(
        (code, &body["error"]["code"]),
        (412, &serde_json::json!("not_cached")),
        "another tenant's ONLY_IF_CACHED ask: {body}"
    );
    let (cached, _) = http_answer(http_ask(&f, "asked on http", Some("beta"), "").await);
    let hit = grpc_ask(
        &mut f,
        "asked on http",
        Some("beta"),
        proto::CachePolicy::OnlyIfCached,
    )
    .await
    .unwrap();
    assert_eq!(
        (hit.cache_level, hit.text.as_str()),
        (CacheLevel::L1 as i32, cached.as_str())
    );
    assert_eq!(f.model.count(), 2, "ONLY_IF_CACHED generated");
}

/// An OpenAI body without `temperature` samples (OpenAI's default 1.0, no seed), so it is not an
/// exact answer to cache: asked twice, it is generated twice. With `"temperature":0` the second
/// ask is an L1 hit. (Hot sampled questions are served from `cache.sampled_variants`, which needs
/// Redis: tests/cache_levels.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_without_temperature_is_sampled_and_not_cached() {
    let f = start().await;
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"tell me a story"}}],"max_tokens":32}}"#
    );
    for n in 1..=2 {
        let (_, source) = http_answer(http_post(&f, body.clone(), None).await);
        assert_eq!(source, "qnode-model", "ask {n} of a sampled request");
        assert_eq!(f.model.count(), n);
    }
    let greedy = body.replace(r#""max_tokens":32"#, r#""max_tokens":32,"temperature":0"#);
    let (_, first) = http_answer(http_post(&f, greedy.clone(), None).await);
    let (_, second) = http_answer(http_post(&f, greedy, None).await);
    assert_eq!(
        (first.as_str(), second.as_str()),
        ("qnode-model", "qnode-cache-l1")
    );
    assert_eq!(f.model.count(), 3);
}
