//! grpc.health.v1: NOT_SERVING while the backend's models load, SERVING once Ready, for both the
//! overall ("") and the `qnode.v1.Inference` service. Uses `ScriptedBackend` (tests/grpc_support).

mod grpc_support;

use grpc_support::{test_config, ScriptedBackend, TestServer};
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

#[tokio::test]
async fn not_serving_until_models_are_ready_then_serving() {
    let server = TestServer::start_with(ScriptedBackend::new(false), test_config()).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "qnode.v1.Inference"] {
        let status = health
            .check(check(service))
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::NotServing as i32, "{service:?}");
    }
    let mut watch = health
        .watch(check("qnode.v1.Inference"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );

    server.backend.set_ready();
    // Watch pushes the change: no polling or sleeping in the test. tonic-health may repeat an
    // unchanged status, so skip repeats of NOT_SERVING but nothing else.
    loop {
        let status = watch.next().await.unwrap().unwrap().status;
        if status == ServingStatus::Serving as i32 {
            break;
        }
        assert_eq!(status, ServingStatus::NotServing as i32);
    }
    for service in ["", "qnode.v1.Inference"] {
        let status = health
            .check(check(service))
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

#[tokio::test]
async fn unknown_service_is_not_found() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    let status = health.check(check("no.such.Service")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
}
