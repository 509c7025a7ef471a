//! A client that drops its stream (or its unary call) makes the server drop the backend's event
//! receiver, which is how a generation is cancelled. Observed through the backend's counter.
//! Uses `ScriptedBackend` (see tests/grpc_support).

mod grpc_support;

use grpc_support::{request, TestServer};
use tokio_stream::StreamExt;

#[tokio::test]
async fn dropping_the_stream_cancels_the_generation() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut stream = client
        .generate_stream(request("hang"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.next().await.unwrap().unwrap().text, "tick");
    assert_eq!(server.backend.cancelled(), 0);
    drop(stream);
    server.backend.wait_cancelled(1).await;
    assert_eq!(server.backend.finished(), 0);
}

#[tokio::test]
async fn abandoning_a_unary_call_cancels_the_generation() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let call = tokio::spawn(async move { client.generate(request("hang")).await });
    server.backend.wait_submitted(1).await;
    call.abort();
    server.backend.wait_cancelled(1).await;
}
