//! Optional API key: Inference needs `authorization: Bearer <key>`; health and reflection do not.
//! Uses `ScriptedBackend` (see tests/grpc_support).

mod grpc_support;

use grpc_support::{request, test_config, ScriptedBackend, TestServer};
use qnode::grpc::proto;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn with_auth<T>(message: T, value: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert("authorization", value.parse().unwrap());
    req
}

async fn keyed_server() -> TestServer {
    let mut config = test_config();
    config.api_key = Some("s3cret-key".into());
    TestServer::start_with(ScriptedBackend::new(true), config).await
}

#[tokio::test]
async fn inference_needs_the_bearer_key() {
    let server = keyed_server().await;
    let mut client = server.client().await;

    let status = client.generate(request("hi")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    for wrong in [
        "Bearer wrong",
        "Bearer s3cret-ke",
        "s3cret-key",
        "Basic s3cret-key",
    ] {
        let status = client
            .generate(with_auth(request("hi"), wrong))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{wrong}");
        assert!(!status.message().contains("s3cret"));
    }
    let status = client.generate_stream(request("hi")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client
        .list_models(proto::ListModelsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(server.backend.submitted.lock().unwrap().is_empty());

    let ok = client
        .generate(with_auth(request("hi"), "Bearer s3cret-key"))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().text, "Hello!");
}

#[tokio::test]
async fn health_stays_open_with_a_key() {
    let server = keyed_server().await;
    let mut health = HealthClient::new(server.channel().await);
    let response = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(response.is_ok(), "{response:?}");
}

#[tokio::test]
async fn no_key_configured_means_open() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    assert!(client.generate(request("hi")).await.is_ok());
}
