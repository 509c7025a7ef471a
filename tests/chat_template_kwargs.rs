//! `chat_template_kwargs` (Qwen3's `enable_thinking`) through the whole node (`qnode::app`, its
//! answer cache (L1) over the real pool) on both fronts: the tiny qwen3 file whose template
//! llama.cpp rendered (tests/data/reference/tiny-qwen3.json, `scripts/tiny_family.py`) and the
//! real SmolLM2, whose template takes no options. HTTP by `curl`, gRPC by the tonic client.
//!
//! - `enable_thinking: false` reaches the template: the prompt is llama.cpp's, 4 tokens longer
//!   (the empty think block) than with `true`, on both fronts;
//! - two requests differing only in `enable_thinking` never share a cached answer, while a
//!   repeat of one is served from the cache;
//! - refused with 400 / INVALID_ARGUMENT naming the field: not an object, a nested value, a
//!   reserved name, a key the model's template does not read (listing what it takes), any key
//!   for SmolLM2, options with a raw prompt.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;

use qnode::app::Generator;
use qnode::cache::ModelIdentity;
use qnode::config::Config;
use qnode::engine::Backend;
use qnode::grpc::proto;
use qnode::grpc::proto::inference_client::InferenceClient;
use qnode::metrics::Metrics;
use serde_json::{json, Value};
use tonic::Code;

type Client = InferenceClient<tonic::transport::Channel>;

const QWEN3: &str = "tiny-qwen3";
const QUESTION: &str = "What is 2+2?";

/// The tiny qwen3 GGUF llama.cpp ran, written by the committed generator into `dir`.
fn tiny_qwen3(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join(format!("{QWEN3}.gguf"));
    let out = Command::new("python3")
        .arg(common::repo_root().join("scripts/tiny_family.py"))
        .args(["write", "qwen3"])
        .arg(&path)
        .arg("--header")
        .arg(common::model_file("deepseek-r1-qwen-header"))
        .output()
        .expect("python3 runs (scripts/test.sh installs gguf==0.19.0)");
    assert!(
        out.status.success(),
        "scripts/tiny_family.py write qwen3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// llama.cpp's prompt ids for [`QUESTION`] with `enable_thinking` = `thinking`.
fn reference_prompt_tokens(thinking: bool) -> u32 {
    let reference = common::reference(QWEN3);
    let case = reference["chat_template"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["messages"] == json!([{"role": "user", "content": QUESTION}])
                && c["kwargs"] == json!({ "enable_thinking": thinking })
        })
        .expect("the reference has the case");
    case["prompt_ids"].as_array().unwrap().len() as u32
}

/// The node over a pool of SmolLM2 and the tiny qwen3, answer cache (L1) on; its gRPC client and
/// HTTP base URL.
async fn start(dir: &std::path::Path) -> (Client, String) {
    let path = tiny_qwen3(dir);
    let pool = tokio::task::spawn_blocking(move || {
        std::env::set_var(
            "QNODE_MODELS_DIR",
            common::repo_root().join("models").as_os_str(),
        );
        let metrics = Metrics::new().unwrap();
        let configs = [
            qnode::config::ModelConfig::new("smollm2"),
            qnode::config::ModelConfig::new(path.to_str().unwrap()),
        ];
        let pool = qnode::pool::ModelPool::new(
            &configs,
            qnode::pool::metrics::PoolMetrics::register(metrics.registry()).unwrap(),
            candle_core::Device::Cpu,
        )
        .unwrap();
        pool.load_all().unwrap();
        Arc::new(pool)
    })
    .await
    .unwrap();
    let identity = |id: &str| ModelIdentity {
        model_id: id.into(),
        file_digest: format!("{id}-kwargs-test"),
        quant: "q8_0".into(),
        template_id: "t".into(),
    };
    let identities = HashMap::from([
        ("smollm2".to_owned(), identity("smollm2")),
        (QWEN3.to_owned(), identity(QWEN3)),
    ]);
    let node = common::serve_both(
        Config::default(),
        Generator::Backend {
            backend: pool as Arc<dyn Backend>,
            identities,
        },
    )
    .await;
    (node.grpc, node.http)
}

/// POST `body` to `{http}/v1/{path}` with curl: the status and the JSON answer.
fn post(http: &str, path: &str, body: &Value) -> (u16, Value) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            "-H",
            "Content-Type: application/json",
        ])
        .args(["-d", &body.to_string()])
        .arg(format!("{http}/v1/{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (json, code) = text.rsplit_once('\n').unwrap();
    (
        code.parse().unwrap(),
        serde_json::from_str(json).unwrap_or(Value::Null),
    )
}

fn chat(model: &str, kwargs: Value) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 3,
        "temperature": 0,
        "chat_template_kwargs": kwargs,
    })
}

fn grpc_request(model: &str, kwargs: &[(&str, &str)]) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: model.into(),
        messages: vec![proto::ChatMessage {
            role: "user".into(),
            content: QUESTION.into(),
            ..Default::default()
        }],
        max_tokens: Some(3),
        temperature: Some(0.0),
        chat_template_kwargs: kwargs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// A 400 whose `error.param` is `param` and whose message contains every one of `says`.
fn refused(http: &str, path: &str, body: Value, param: &str, says: &[&str]) {
    let (code, v) = post(http, path, &body);
    assert_eq!(code, 400, "{body}: {v}");
    assert_eq!(v["error"]["param"], param, "{body}: {v}");
    let message = v["error"]["message"].as_str().unwrap();
    for s in says {
        assert!(message.contains(s), "{body}: {message:?} lacks {s:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn enable_thinking_reaches_the_template_on_both_fronts_and_the_cache_key() {
    let dir = tempfile::tempdir().unwrap();
    let (mut client, http) = start(dir.path()).await;
    let (on, off) = (
        reference_prompt_tokens(true),
        reference_prompt_tokens(false),
    );
    assert_eq!(off, on + 4, "the empty think block is 4 tokens");

    // HTTP: true first (generated), then false (generated: another prompt, another key), then
    // false again (the cache's answer).
    let (code, v) = post(
        &http,
        "chat/completions",
        &chat(QWEN3, json!({"enable_thinking": true})),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], on, "{v}");
    assert_eq!(v["system_fingerprint"], "qnode-model", "{v}");
    let (code, v) = post(
        &http,
        "chat/completions",
        &chat(QWEN3, json!({"enable_thinking": false})),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["usage"]["prompt_tokens"], off,
        "llama.cpp's prompt with the think block: {v}"
    );
    assert_eq!(
        v["system_fingerprint"], "qnode-model",
        "enable_thinking false must not be served true's cached answer: {v}"
    );
    let (_, v) = post(
        &http,
        "chat/completions",
        &chat(QWEN3, json!({"enable_thinking": false})),
    );
    assert_eq!(
        v["system_fingerprint"], "qnode-cache-l1",
        "the cache is on: {v}"
    );
    assert_eq!(v["usage"]["prompt_tokens"], off, "{v}");
    // No options: the template's default (thinking on), and its own cache entry.
    let (_, v) = post(&http, "chat/completions", &chat(QWEN3, Value::Null));
    assert_eq!(v["usage"]["prompt_tokens"], on, "{v}");

    // gRPC: the same options as strings; the answers the HTTP calls cached are served.
    let r = client
        .generate(grpc_request(QWEN3, &[("enable_thinking", "false")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.usage.unwrap().prompt_tokens, off);
    assert_eq!(r.cache_level, proto::CacheLevel::L1 as i32);
    let r = client
        .generate(grpc_request(QWEN3, &[("enable_thinking", "true")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.usage.unwrap().prompt_tokens, on);
    // A fresh prompt over gRPC: true then false, both generated.
    let mut fresh = grpc_request(QWEN3, &[("enable_thinking", "true")]);
    fresh.messages[0].content = "And 3+3?".into();
    let first = client.generate(fresh.clone()).await.unwrap().into_inner();
    assert_eq!(first.cache_level, proto::CacheLevel::None as i32);
    fresh.chat_template_kwargs = [("enable_thinking".into(), "false".into())].into();
    let second = client.generate(fresh).await.unwrap().into_inner();
    assert_eq!(
        second.cache_level,
        proto::CacheLevel::None as i32,
        "enable_thinking false is not a cache hit of true"
    );
    assert_eq!(
        second.usage.unwrap().prompt_tokens,
        first.usage.unwrap().prompt_tokens + 4
    );

    // ListModels says which options each model's template takes.
    let models = client
        .list_models(proto::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    let options = |id: &str| {
        models
            .iter()
            .find(|m| m.id == id)
            .unwrap()
            .template_options
            .clone()
    };
    assert_eq!(options(QWEN3), ["enable_thinking"]);
    assert!(options("smollm2").is_empty());

    // Refusals over gRPC name the field.
    let e = client
        .generate(grpc_request("smollm2", &[("enable_thinking", "false")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("`chat_template_kwargs.enable_thinking`")
            && e.message().contains("takes no options"),
        "{}",
        e.message()
    );
    let e = client
        .generate(grpc_request(QWEN3, &[("thinking", "false")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("`chat_template_kwargs.thinking`")
            && e.message().contains("it takes: enable_thinking"),
        "{}",
        e.message()
    );
    let mut raw = grpc_request(QWEN3, &[("enable_thinking", "false")]);
    raw.messages.clear();
    raw.prompt = Some(QUESTION.into());
    let e = client.generate(raw).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("needs `messages`"), "{}", e.message());

    // Refusals over HTTP name the field. The README's example, byte for byte:
    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                      "chat_template_kwargs": {"enable_thinking": false}});
    let (code, v) = post(&http, "chat/completions", &body);
    assert_eq!(code, 400);
    assert_eq!(
        v.to_string(),
        r#"{"error":{"message":"`chat_template_kwargs.enable_thinking` is not read by the chat template of model `smollm2` (it would be ignored); it takes no options","type":"invalid_request_error","param":"chat_template_kwargs.enable_thinking","code":"invalid_value"}}"#
    );
    refused(
        &http,
        "chat/completions",
        chat("smollm2", json!({"enable_thinking": false})),
        "chat_template_kwargs.enable_thinking",
        &["model `smollm2`", "takes no options"],
    );
    refused(
        &http,
        "chat/completions",
        chat(QWEN3, json!(true)),
        "chat_template_kwargs",
        &["must be an object"],
    );
    refused(
        &http,
        "chat/completions",
        chat(QWEN3, json!({"enable_thinking": {"really": false}})),
        "chat_template_kwargs.enable_thinking",
        &["a nested object"],
    );
    refused(
        &http,
        "chat/completions",
        chat(QWEN3, json!({"add_generation_prompt": false})),
        "chat_template_kwargs.add_generation_prompt",
        &["reserved"],
    );
    refused(
        &http,
        "chat/completions",
        chat(QWEN3, json!({"thinking": false})),
        "chat_template_kwargs.thinking",
        &["not read by the chat template", "it takes: enable_thinking"],
    );
    refused(
        &http,
        "completions",
        json!({"model": QWEN3, "prompt": QUESTION, "max_tokens": 1,
               "chat_template_kwargs": {"enable_thinking": false}}),
        "chat_template_kwargs",
        &["needs `messages`"],
    );
}
