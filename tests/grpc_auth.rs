//! Optional API key: Inference needs `authorization: Bearer <key>`; health and reflection do not.
//! Admin takes the admin key, which defaults to the API key (README): checked with no key, with
//! only the API key and with both, the server config built from a `Config` as `qnode serve`
//! builds it. Uses `ScriptedBackend` (see tests/grpc_support).

mod grpc_support;

use grpc_support::{request, ScriptedBackend, TestServer};
use qnode::config::Config;
use qnode::grpc::proto;
use qnode::grpc::proto::admin_client::AdminClient;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn with_auth<T>(message: T, value: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert("authorization", value.parse().unwrap());
    req
}

/// A server whose keys come from the node `Config` (`server.api_key`, `server.admin_api_key`),
/// built by the composition root as in `qnode serve`, so the admin key's default is the real one.
async fn server_with_keys(api_key: Option<&str>, admin_key: Option<&str>) -> TestServer {
    let mut node = Config::default();
    node.server.api_key = api_key.map(str::to_owned);
    node.server.admin_api_key = admin_key.map(str::to_owned);
    TestServer::start_with(ScriptedBackend::new(true), node).await
}

async fn keyed_server() -> TestServer {
    server_with_keys(Some("s3cret-key"), None).await
}

/// The code of `Admin/NodeStatus` with `authorization` set to `auth` (none when `None`).
async fn admin_status(server: &TestServer, auth: Option<&str>) -> Code {
    let mut admin = AdminClient::new(server.channel().await);
    let message = proto::NodeStatusRequest {};
    let call = match auth {
        Some(value) => with_auth(message, value),
        None => tonic::Request::new(message),
    };
    match admin.node_status(call).await {
        Ok(_) => Code::Ok,
        Err(status) => {
            assert!(!status.message().contains("s3cret"), "{status:?}");
            status.code()
        }
    }
}

#[tokio::test]
async fn admin_is_open_without_any_key() {
    let server = server_with_keys(None, None).await;
    assert_eq!(admin_status(&server, None).await, Code::Ok);
}

#[tokio::test]
async fn admin_key_defaults_to_the_api_key() {
    let server = server_with_keys(Some("s3cret-key"), None).await;
    assert_eq!(admin_status(&server, None).await, Code::Unauthenticated);
    assert_eq!(
        admin_status(&server, Some("Bearer wrong")).await,
        Code::Unauthenticated
    );
    assert_eq!(
        admin_status(&server, Some("Bearer s3cret-key")).await,
        Code::Ok
    );
}

#[tokio::test]
async fn admin_key_replaces_the_api_key_on_admin_only() {
    let server = server_with_keys(Some("s3cret-key"), Some("s3cret-admin")).await;
    assert_eq!(admin_status(&server, None).await, Code::Unauthenticated);
    assert_eq!(
        admin_status(&server, Some("Bearer s3cret-key")).await,
        Code::Unauthenticated,
        "the API key must not open Admin once an admin key is set"
    );
    assert_eq!(
        admin_status(&server, Some("Bearer s3cret-admin")).await,
        Code::Ok
    );
    // Inference keeps the API key, and the admin key does not open it.
    let mut client = server.client().await;
    let status = client
        .generate(with_auth(request("hi"), "Bearer s3cret-admin"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(client
        .generate(with_auth(request("hi"), "Bearer s3cret-key"))
        .await
        .is_ok());
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
