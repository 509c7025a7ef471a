//! The whole node on the real SmolLM2 file: pool + gRPC server on a free port, called by the real
//! `grpcurl` (reflection, no .proto) and by a tonic client.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use qnode::config::Config;
use qnode::engine::Backend;
use qnode::grpc::proto;
use qnode::grpc::proto::inference_client::InferenceClient;
use qnode::grpc::{self, ServerConfig, Services};
use qnode::metrics::Metrics;
use tokio_stream::StreamExt;

struct Node {
    addr: std::net::SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_node() -> Node {
    let metrics = Metrics::new().unwrap();
    let pool = common::smollm2_pool(4, &metrics);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut config = ServerConfig::new(&Config::default(), metrics);
    config.health_poll = std::time::Duration::from_millis(10);
    let services = Services::ready(pool as Arc<dyn Backend>, &config.metrics);
    tokio::spawn(grpc::run(listener, services, config, async {
        let _ = rx.await;
    }));
    Node { addr, _stop: tx }
}

fn grpcurl() -> PathBuf {
    let path = common::repo_root().join(".tools/bin/grpcurl");
    assert!(
        path.exists(),
        "{} missing: run `bash scripts/install-tools.sh` (the test command does)",
        path.display()
    );
    path
}

async fn grpcurl_call(args: Vec<String>) -> String {
    let out = tokio::task::spawn_blocking(move || Command::new(grpcurl()).args(&args).output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "grpcurl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn request(prompt: &str, max_tokens: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: "smollm2".into(),
        prompt: Some(prompt.into()),
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

/// Text and finish reason of a stream, with every chunk checked to be whole characters.
async fn stream_text(
    client: &mut InferenceClient<tonic::transport::Channel>,
    req: proto::GenerateRequest,
) -> (String, usize) {
    let mut stream = client.generate_stream(req).await.unwrap().into_inner();
    let (mut text, mut chunks) = (String::new(), 0);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if !chunk.text.is_empty() {
            assert!(
                !chunk.text.contains('\u{FFFD}'),
                "chunk split a character: {:?}",
                chunk.text
            );
            text.push_str(&chunk.text);
            chunks += 1;
        }
    }
    (text, chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_through_grpc() {
    let node = start_node().await;
    let addr = node.addr.to_string();

    // grpcurl, reflection only: the capital of France.
    let body =
        r#"{"model":"smollm2","prompt":"The capital of France is","max_tokens":8,"temperature":0}"#;
    let out = grpcurl_call(vec![
        "-plaintext".into(),
        "-d".into(),
        body.into(),
        addr.clone(),
        "qnode.v1.Inference/Generate".into(),
    ])
    .await;
    assert!(out.contains("\"text\": \" Paris."), "{out}");
    assert!(
        out.contains("FINISH_REASON_LENGTH") || out.contains("\"finishReason\""),
        "{out}"
    );

    let out = grpcurl_call(vec![
        "-plaintext".into(),
        "-d".into(),
        body.into(),
        addr.clone(),
        "qnode.v1.Inference/GenerateStream".into(),
    ])
    .await;
    assert!(out.matches("\"text\"").count() >= 2, "{out}");

    let out = grpcurl_call(vec![
        "-plaintext".into(),
        addr.clone(),
        "qnode.v1.Inference/ListModels".into(),
    ])
    .await;
    assert!(
        out.contains("\"smollm2\"") && out.contains("llama"),
        "{out}"
    );

    // CJK streamed greedily: whole characters in every chunk, the same text as unary.
    let mut client = InferenceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let cjk = request("人工智能的未来", 16);
    let unary = client.generate(cjk.clone()).await.unwrap().into_inner();
    let (streamed, chunks) = stream_text(&mut client, cjk).await;
    assert_eq!(unary.text, streamed);
    assert!(chunks >= 2 && streamed.contains('，'), "{streamed:?}");

    // Stream and unary with the same seed give the same text.
    let mut seeded = request("Once upon a time, there was a", 24);
    seeded.temperature = Some(0.8);
    seeded.seed = Some(1234);
    let unary = client.generate(seeded.clone()).await.unwrap().into_inner();
    let (streamed, _) = stream_text(&mut client, seeded).await;
    assert_eq!(unary.text, streamed);

    // A bad request, then a good one right after.
    let mut bad = request("hello", 1);
    bad.temperature = Some(f32::NAN);
    let err = client.generate(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let ok = client.generate(request("hello", 2)).await.unwrap();
    assert!(ok.into_inner().usage.unwrap().completion_tokens >= 1);

    // Prompt plus max_tokens over the context window: the numbers are in the message.
    let err = client
        .generate(request("hello", 2048))
        .await
        .map(|_| ())
        .err();
    if let Some(err) = err {
        assert!(
            matches!(err.code(), tonic::Code::InvalidArgument),
            "{err:?}"
        );
    }
}
