//! `grpc-timeout` becomes the request's deadline: handed to the backend and enforced by the
//! server → DEADLINE_EXCEEDED, generation cancelled. Uses `ScriptedBackend` (tests/grpc_support).

mod grpc_support;

use std::time::{Duration, Instant};

use grpc_support::{request, TestServer};
use tokio_stream::StreamExt;
use tonic::Code;

fn with_timeout(
    prompt: &str,
    timeout: Duration,
) -> tonic::Request<qnode::grpc::proto::GenerateRequest> {
    let mut req = tonic::Request::new(request(prompt));
    req.set_timeout(timeout);
    req
}

/// The raw client never gives up by itself: a server that ignored the deadline would hang the
/// test, so this turns that into a failure.
async fn guard<F: std::future::Future>(call: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the server did not end the call at its deadline")
}

#[tokio::test]
async fn unary_call_past_its_deadline_gets_deadline_exceeded() {
    let server = TestServer::start().await;
    let mut client = server.client_without_local_timeout();
    let status = guard(client.generate(with_timeout("hang", Duration::from_millis(200))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    server.backend.wait_cancelled(1).await;
}

#[tokio::test]
async fn stream_past_its_deadline_ends_with_deadline_exceeded() {
    let server = TestServer::start().await;
    let mut client = server.client_without_local_timeout();
    let mut stream = client
        .generate_stream(with_timeout("hang", Duration::from_millis(200)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.next().await.unwrap().unwrap().text, "tick");
    let status = guard(stream.next()).await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    server.backend.wait_cancelled(1).await;
}

#[tokio::test]
async fn the_deadline_reaches_the_backend() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let before = Instant::now();
    client
        .generate(with_timeout("hi", Duration::from_secs(30)))
        .await
        .unwrap();
    let deadline = server
        .backend
        .last_submitted()
        .deadline
        .expect("a deadline");
    assert!(deadline > before + Duration::from_secs(29), "{deadline:?}");
    assert!(deadline <= Instant::now() + Duration::from_secs(30));
}

#[tokio::test]
async fn a_call_within_its_deadline_succeeds() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let response = client
        .generate(with_timeout("hi", Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(response.into_inner().text, "Hello!");
}

/// A malformed `grpc-timeout` is refused naming the header, not run as "no deadline".
#[tokio::test]
async fn a_malformed_grpc_timeout_is_refused_naming_it() {
    let server = TestServer::start().await;
    let mut client = server.client_without_local_timeout();
    let mut req = tonic::Request::new(request("hello"));
    req.metadata_mut()
        .insert("grpc-timeout", "10s".parse().unwrap());
    let status = guard(client.generate(req)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("grpc-timeout") && status.message().contains("\"10s\""),
        "{status:?}"
    );
}
