//! Constrained output on the real SmolLM2, through both fronts of one node over the real answer
//! cache: OpenAI `response_format` through the official `openai` Python client
//! (tests/constrained_client.py, which validates every answer with `jsonschema`), and the gRPC
//! `constraint` oneof through tonic. The cache key carries the constraint: a free-text answer is
//! never served for a constrained request, nor one schema's answer for another.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;

use qnode::cache::{CacheConfig, CachedBackend};
use qnode::config::Config;
use qnode::engine::Backend;
use qnode::grpc::proto::generate_request::Constraint;
use qnode::grpc::proto::inference_client::InferenceClient;
use qnode::grpc::proto::{self, CacheLevel, FinishReason};
use qnode::grpc::{self, ServerConfig, Services};
use qnode::http::{self, HttpConfig};
use qnode::metrics::Metrics;
use qnode::node::Node;
use tonic::Code;

struct Fronts {
    grpc: InferenceClient<tonic::transport::Channel>,
    http: String,
}

async fn start() -> Fronts {
    let metrics = Metrics::new().unwrap();
    let pool = tokio::task::spawn_blocking({
        let metrics = metrics.clone();
        move || common::smollm2_pool(8, &metrics)
    })
    .await
    .unwrap();
    let model = pool.loaded("smollm2").unwrap();
    let identity = common::identity("smollm2", &model);
    let cache = Arc::new(
        CachedBackend::new(
            pool as Arc<dyn Backend>,
            HashMap::from([("smollm2".to_string(), identity)]),
            CacheConfig::default(),
        )
        .unwrap(),
    ) as Arc<dyn Backend>;
    let node = Node::ready(&metrics);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = listener.local_addr().unwrap();
    let services = Services {
        backend: Arc::clone(&cache),
        node: Arc::clone(&node),
        models: None,
    };
    tokio::spawn(grpc::run(
        listener,
        services,
        ServerConfig::new(&Config::default(), metrics.clone()),
        std::future::pending(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = listener.local_addr().unwrap();
    tokio::spawn(http::serve(
        listener,
        cache,
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
        http: format!("http://{http_addr}/v1"),
    }
}

fn request(content: &str, constraint: Option<Constraint>) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: "smollm2".into(),
        messages: vec![proto::ChatMessage {
            role: "user".into(),
            content: content.into(),
            ..Default::default()
        }],
        max_tokens: Some(96),
        temperature: Some(0.0),
        constraint,
        ..Default::default()
    }
}

const PERSON: &str = r#"{"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
    "required": ["name", "age", "pets"], "additionalProperties": false}"#;

fn check_person(text: &str) {
    let v: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON: {text:?}: {e}"));
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 3, "{text}");
    assert!(v["name"].as_str().unwrap().chars().count() <= 20, "{text}");
    assert!((0..=120).contains(&v["age"].as_i64().unwrap()), "{text}");
    let pets = v["pets"].as_array().unwrap();
    assert!(pets.len() <= 3, "{text}");
    for p in pets {
        assert!(
            ["cat", "dog", "fish"].contains(&p.as_str().unwrap()),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_output_through_both_fronts_and_the_cache() {
    let mut f = start().await;
    let ask = "Describe a person who likes animals.";

    // Free text first: generated, then a cache hit.
    let free = f
        .grpc
        .generate(request(ask, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(free.cache_level(), CacheLevel::None);
    assert!(serde_json::from_str::<serde_json::Value>(&free.text).is_err());
    let again = f
        .grpc
        .generate(request(ask, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.cache_level(), CacheLevel::L1);

    // The same prompt under a schema is never the free-text answer: generated, and valid.
    let schema = Some(Constraint::JsonSchema(PERSON.into()));
    let person = f
        .grpc
        .generate(request(ask, schema.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(person.cache_level(), CacheLevel::None, "{}", person.text);
    assert_eq!(person.finish_reason(), FinishReason::Stop);
    check_person(&person.text);
    let hit = f
        .grpc
        .generate(request(ask, schema.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hit.cache_level(), CacheLevel::L1);
    assert_eq!(hit.text, person.text);

    // Another grammar for the same prompt is another answer: json_object, then a regex.
    let object = f
        .grpc
        .generate(request(ask, Some(Constraint::JsonObject(true))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(object.cache_level(), CacheLevel::None);
    let v: serde_json::Value = serde_json::from_str(&object.text).unwrap();
    assert!(v.is_object(), "{}", object.text);
    let age = f
        .grpc
        .generate(request(
            "How old is the oldest person ever? Answer with a number.",
            Some(Constraint::Regex("[0-9]{2,3} years".into())),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(age.finish_reason(), FinishReason::Stop);
    let (n, unit) = age.text.split_once(' ').unwrap();
    assert!(
        n.len() >= 2 && n.bytes().all(|b| b.is_ascii_digit()),
        "{}",
        age.text
    );
    assert_eq!(unit, "years");
    // A Lark grammar; `json_object: false` is free text (the free answer's cache entry).
    let yes_no = f
        .grpc
        .generate(request(
            "Is Paris in France?",
            Some(Constraint::Lark(r#"start: ("Yes" | "No") "." "#.into())),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        ["Yes.", "No."].contains(&yes_no.text.as_str()),
        "{}",
        yes_no.text
    );
    let off = f
        .grpc
        .generate(request(ask, Some(Constraint::JsonObject(false))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(off.cache_level(), CacheLevel::L1);
    assert_eq!(off.text, free.text);

    // Streamed under a schema, sampled with a seed: the same text as unary, valid.
    let mut sampled = request(ask, schema.clone());
    sampled.temperature = Some(0.9);
    sampled.seed = Some(7);
    let unary = f.grpc.generate(sampled.clone()).await.unwrap().into_inner();
    check_person(&unary.text);
    let mut stream = f.grpc.generate_stream(sampled).await.unwrap().into_inner();
    let mut streamed = String::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        streamed.push_str(&chunk.text);
    }
    assert_eq!(streamed, unary.text);

    // Invalid schemas and grammars: INVALID_ARGUMENT naming the field, the echo capped.
    let long = format!("({}", "a".repeat(10_000));
    for (constraint, field) in [
        (
            Constraint::JsonSchema("{\"type\": \"frobnicate\"}".into()),
            "json_schema",
        ),
        (Constraint::JsonSchema("[1, 2]".into()), "json_schema"),
        (Constraint::Regex(long), "regex"),
        (Constraint::Lark("start: nowhere".into()), "lark"),
        (Constraint::Lark(String::new()), "lark"),
    ] {
        let status = f
            .grpc
            .generate(request("hi", Some(constraint.clone())))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{constraint:?}");
        assert!(
            status.message().contains(&format!("`{field}`")),
            "{constraint:?}: {}",
            status.message()
        );
        assert!(status.message().len() < 2_000, "{}", status.message());
    }

    // The official Python client over the HTTP front.
    let script = common::repo_root().join("tests/constrained_client.py");
    let url = f.http.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "constrained_client.py failed:\n{stdout}\n{stderr}"
    );
}
