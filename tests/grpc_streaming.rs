//! GenerateStream: one chunk per delta, the last carrying finish reason, usage and timings.
//! Uses `ScriptedBackend` (see tests/grpc_support).

mod grpc_support;

use grpc_support::{request, TestServer};
use qnode::grpc::proto;
use tokio_stream::StreamExt;
use tonic::Code;

#[tokio::test]
async fn one_chunk_per_delta_then_a_final_chunk() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut stream = client
        .generate_stream(proto::GenerateRequest {
            request_id: "s-1".into(),
            ..request("hi")
        })
        .await
        .unwrap()
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.unwrap());
    }
    let texts: Vec<_> = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts, ["Hel", "lo", "!", ""]);
    assert!(chunks.iter().all(|c| c.request_id == "s-1"));
    assert!(chunks[..3]
        .iter()
        .all(|c| c.finish_reason.is_none() && c.usage.is_none()));
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, Some(proto::FinishReason::Stop as i32));
    assert_eq!(last.usage.unwrap().completion_tokens, 3);
    assert_eq!(last.timings.unwrap().total_us, 40_000);
    assert_eq!(last.cache_level, proto::CacheLevel::None as i32);
    assert_eq!(server.backend.finished(), 1);
}

#[tokio::test]
async fn generated_request_id_is_echoed_in_every_chunk() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let chunks: Vec<_> = client
        .generate_stream(request("hi"))
        .await
        .unwrap()
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .unwrap();
    let id = &chunks[0].request_id;
    assert_eq!(id.len(), 32, "{id}");
    assert!(chunks.iter().all(|c| &c.request_id == id));
    assert_eq!(&server.backend.last_submitted().request_id, id);
}

#[tokio::test]
async fn an_error_event_ends_the_stream_with_its_status_after_the_text_so_far() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut stream = client
        .generate_stream(request("fail_midway"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.next().await.unwrap().unwrap().text, "par");
    let status = stream.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(status.message(), "internal error: scripted failure");
    assert!(stream.next().await.is_none());
}
