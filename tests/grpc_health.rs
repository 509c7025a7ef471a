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

/// `Health/List` (the health proto's 2024 method, which tonic-health 0.12 and 0.14 lack): every service
/// the node reports, with the same statuses `Check` gives, through the generated client
/// (tests/grpc_grpcurl.rs calls it through the real grpcurl).
#[tokio::test]
async fn list_reports_every_service() {
    use qnode::grpc::proto::health::health_client::HealthClient as ListClient;
    use qnode::grpc::proto::health::HealthListRequest;

    let server = TestServer::start_with(ScriptedBackend::new(false), test_config()).await;
    let mut list = ListClient::new(server.channel().await);
    let mut health = HealthClient::new(server.channel().await);
    for (ready, inference) in [
        (false, ServingStatus::NotServing),
        (true, ServingStatus::Serving),
    ] {
        if ready {
            server.backend.set_ready();
            let mut watch = health
                .watch(check("qnode.v1.Inference"))
                .await
                .unwrap()
                .into_inner();
            while watch.next().await.unwrap().unwrap().status != ServingStatus::Serving as i32 {}
        }
        let listed = list
            .list(HealthListRequest {})
            .await
            .unwrap()
            .into_inner()
            .statuses;
        let mut names: Vec<&str> = listed.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["", "qnode.v1.Admin", "qnode.v1.Inference"]);
        assert_eq!(
            listed["qnode.v1.Inference"].status, inference as i32,
            "{listed:?}"
        );
        assert_eq!(listed[""].status, inference as i32, "{listed:?}");
        assert_eq!(
            listed["qnode.v1.Admin"].status,
            ServingStatus::Serving as i32,
            "{listed:?}"
        );
    }
}
