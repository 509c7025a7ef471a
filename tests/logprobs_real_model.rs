//! `logprobs` / `top_logprobs` on the real SmolLM2 file, through the whole node (`qnode::app`
//! with its answer cache over the real pool): the gRPC front with a tonic client, the legacy
//! completions shape with `curl`.

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
use tokio_stream::StreamExt;
use tonic::Code;

type Client = InferenceClient<tonic::transport::Channel>;

/// The node over the real pool, answer cache (L1) on; its gRPC client and HTTP base URL.
async fn start() -> (Client, String) {
    let metrics = Metrics::new().unwrap();
    let pool = common::smollm2_pool(4, &metrics);
    let identities = HashMap::from([(
        "smollm2".to_owned(),
        ModelIdentity {
            model_id: "smollm2".into(),
            file_digest: "logprobs-test".into(),
            quant: "q8_0".into(),
            template_id: "t".into(),
        },
    )]);
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

fn request(prompt: &str, max_tokens: u32, top: Option<u32>) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: "smollm2".into(),
        messages: vec![proto::ChatMessage {
            role: "user".into(),
            content: prompt.into(),
            ..Default::default()
        }],
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        logprobs: top.is_some(),
        top_logprobs: top,
        ..Default::default()
    }
}

/// What holds for every entry of a greedy answer with `top` alternatives.
fn check_greedy(entries: &[proto::TokenLogprob], text: &str, top: usize) {
    assert!(!entries.is_empty());
    let joined: Vec<u8> = entries.iter().flat_map(|e| e.token.clone()).collect();
    assert_eq!(
        String::from_utf8(joined).unwrap(),
        text,
        "the tokens' bytes joined are the text"
    );
    for e in entries {
        assert_eq!(e.top_logprobs.len(), top, "{e:?}");
        let values: Vec<f32> = e.top_logprobs.iter().map(|t| t.logprob).collect();
        assert!(
            values.windows(2).all(|w| w[0] >= w[1]),
            "most likely first: {values:?}"
        );
        assert!(values.iter().all(|&v| v <= 0.0), "{values:?}");
        let mass: f64 = values.iter().map(|&v| f64::from(v).exp()).sum();
        assert!(mass <= 1.0001, "{mass}");
        // Greedy: the chosen token is the most likely one, with the very same value.
        assert_eq!(e.top_logprobs[0].token_id, e.token_id, "{e:?}");
        assert_eq!(e.top_logprobs[0].logprob.to_bits(), e.logprob.to_bits());
        assert!(e.logprob < 0.0 && e.logprob > -30.0, "{e:?}");
    }
}

async fn streamed(
    client: &mut Client,
    req: proto::GenerateRequest,
) -> (String, Vec<proto::TokenLogprob>) {
    let mut stream = client.generate_stream(req).await.unwrap().into_inner();
    let (mut text, mut entries) = (String::new(), Vec::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if !chunk.text.is_empty() {
            assert!(
                !chunk.logprobs.is_empty(),
                "text with no logprobs: {chunk:?}"
            );
        }
        text.push_str(&chunk.text);
        entries.extend(chunk.logprobs);
    }
    (text, entries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_through_grpc_and_http() {
    let (mut client, http) = start().await;
    let question = "What is the capital of France? Answer in one word.";

    // Unary and streamed, greedy, 3 alternatives: the same tokens and values.
    let unary = client
        .generate(request(question, 8, Some(3)))
        .await
        .unwrap()
        .into_inner();
    check_greedy(&unary.logprobs, &unary.text, 3);
    assert!(unary.logprobs.len() as u32 <= unary.usage.unwrap().completion_tokens);
    let (text, entries) = streamed(&mut client, request(question, 8, Some(3))).await;
    assert_eq!(text, unary.text);
    check_greedy(&entries, &text, 3);
    assert_eq!(entries.len(), unary.logprobs.len());
    for (a, b) in entries.iter().zip(&unary.logprobs) {
        assert_eq!(a.token_id, b.token_id);
        assert!((a.logprob - b.logprob).abs() <= 1e-4, "{a:?} {b:?}");
        for (x, y) in a.top_logprobs.iter().zip(&b.top_logprobs) {
            assert_eq!(x.token_id, y.token_id);
            assert!((x.logprob - y.logprob).abs() <= 1e-4);
        }
    }

    // Values do not depend on temperature: a sampled request's first position (same prompt, so
    // the same distribution) lists the same alternatives with the same values.
    let mut sampled = request(question, 1, Some(5));
    sampled.temperature = Some(1.7);
    sampled.seed = Some(3);
    let first = client
        .generate(sampled)
        .await
        .unwrap()
        .into_inner()
        .logprobs;
    let greedy_first = client
        .generate(request(question, 1, Some(5)))
        .await
        .unwrap()
        .into_inner()
        .logprobs;
    assert_eq!(first[0].top_logprobs, greedy_first[0].top_logprobs);
    let chosen = &first[0];
    if let Some(t) = chosen
        .top_logprobs
        .iter()
        .find(|t| t.token_id == chosen.token_id)
    {
        assert_eq!(t.logprob.to_bits(), chosen.logprob.to_bits());
    }

    // Under an output constraint the values are those of the masked distribution: only tokens
    // the grammar allows are listed, and they hold all the mass.
    let mut constrained = request("Is Paris in France?", 4, Some(5));
    constrained.constraint = Some(proto::generate_request::Constraint::Regex(
        "(yes|no)".into(),
    ));
    let answer = client.generate(constrained).await.unwrap().into_inner();
    assert!(answer.text == "yes" || answer.text == "no", "{answer:?}");
    let position = &answer.logprobs[0];
    for t in &position.top_logprobs {
        assert!(
            b"yes".starts_with(&t.token) || b"no".starts_with(&t.token),
            "a masked token is listed: {t:?}"
        );
    }
    let mass: f64 = position
        .top_logprobs
        .iter()
        .map(|t| f64::from(t.logprob).exp())
        .sum();
    assert!(
        (mass - 1.0).abs() < 1e-3,
        "the allowed tokens hold all the mass: {mass}"
    );

    // The cache holds text only: a logprobs request after the same request was cached is
    // generated (and gets its logprobs); ONLY_IF_CACHED cannot answer it.
    let plain = request("Name a color.", 4, None);
    client.generate(plain.clone()).await.unwrap();
    let mut hit = None;
    for _ in 0..50 {
        // The answer is stored just after it is sent.
        let again = client.generate(plain.clone()).await.unwrap().into_inner();
        if again.cache_level == proto::CacheLevel::L1 as i32 {
            hit = Some(again);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let hit = hit.expect("the plain request is served from the cache");
    assert!(hit.logprobs.is_empty());
    let mut asks = plain.clone();
    asks.logprobs = true;
    asks.top_logprobs = Some(2);
    let answer = client.generate(asks.clone()).await.unwrap().into_inner();
    assert_eq!(answer.cache_level, proto::CacheLevel::None as i32);
    assert_eq!(answer.text, hit.text);
    check_greedy(&answer.logprobs, &answer.text, 2);
    let (text, entries) = streamed(&mut client, asks.clone()).await;
    assert_eq!(text, hit.text);
    assert_eq!(entries.len(), answer.logprobs.len());
    asks.cache_policy = proto::CachePolicy::OnlyIfCached as i32;
    let err = client.generate(asks).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Refusals, naming the field.
    let mut bad = request(question, 2, None);
    bad.top_logprobs = Some(3);
    let err = client.generate(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "`top_logprobs` needs `logprobs: true`. Given: 3"
    );
    let err = client
        .generate(request(question, 2, Some(21)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "`top_logprobs` must be <= 20. Given: 21");

    // The legacy completions shape, by curl.
    let body = r#"{"model":"smollm2","prompt":"The capital of France is","max_tokens":3,"temperature":0,"logprobs":2}"#;
    let out = Command::new("curl")
        .args(["-s", "-H", "Content-Type: application/json", "-d", body])
        .arg(format!("{http}/v1/completions"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let choice = &v["choices"][0];
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), choice["text"].as_str().unwrap(), "{v}");
    assert_eq!(lp["text_offset"][0], 0);
    let top = lp["top_logprobs"][0].as_object().unwrap();
    assert!(top.len() <= 3 && top.contains_key(tokens[0]), "{v}");
    assert_eq!(top[tokens[0]], lp["token_logprobs"][0], "{v}");
}
