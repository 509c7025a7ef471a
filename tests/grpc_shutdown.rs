//! SIGTERM-style shutdown: health NOT_SERVING, listener closed, new calls UNAVAILABLE, in-flight
//! streams complete, then `run` returns Ok; calls still running at the drain timeout are cut.
//! Uses `ScriptedBackend` (see tests/grpc_support).

mod grpc_support;

use std::time::Duration;

use grpc_support::{request, test_config, ScriptedBackend, TestServer};
use qnode::app::AppError;
use qnode::grpc::ServerError;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test]
async fn in_flight_streams_complete_and_new_calls_are_refused() {
    let mut server = TestServer::start().await;
    let channel = server.channel().await;
    let mut client = qnode::grpc::proto::inference_client::InferenceClient::new(channel.clone());
    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // The backend is Ready from the start; the watch may first report the initial NOT_SERVING.
    loop {
        let status = watch.next().await.unwrap().unwrap().status;
        if status == ServingStatus::Serving as i32 {
            break;
        }
    }

    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut stream = client
            .generate_stream(request("gated"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stream.next().await.unwrap().unwrap().text, "before ");
        streams.push(stream);
    }

    server.begin_shutdown();
    // Health turns NOT_SERVING when draining starts (tonic-health may repeat SERVING first).
    loop {
        let status = watch.next().await.unwrap().unwrap().status;
        if status == ServingStatus::NotServing as i32 {
            break;
        }
        assert_eq!(status, ServingStatus::Serving as i32);
    }
    // New calls are refused: by the node (UNAVAILABLE), or, once the GOAWAY reached this client,
    // by its own transport (CANCELLED "connection closed", which tonic has no transparent retry
    // for; docs/deploy.md lists it as retryable).
    let status = client.generate(request("hi")).await.unwrap_err();
    match status.code() {
        Code::Unavailable => assert!(status.message().contains("draining"), "{status:?}"),
        Code::Cancelled => assert!(
            format!("{status:?}").contains("connection closed"),
            "{status:?}"
        ),
        other => panic!("{other:?}: {status:?}"),
    }
    // The listener closed when draining started, while the streams still run: a balancer gets
    // "connection refused" and picks another node itself.
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err());
    assert_eq!(server.backend.finished(), 0);

    server.backend.open_gate();
    for mut stream in streams {
        let rest: Vec<_> = (&mut stream).collect::<Result<Vec<_>, _>>().await.unwrap();
        assert_eq!(rest[0].text, "after");
        assert!(rest.last().unwrap().finish_reason.is_some());
    }
    server.join().await.expect("clean drain");
    assert_eq!(server.backend.finished(), 2);
    assert_eq!(server.backend.cancelled(), 0);
}

#[tokio::test]
async fn calls_still_running_at_the_drain_timeout_are_cut() {
    let mut config = test_config();
    config.server.drain_timeout = Duration::from_millis(200);
    let mut server = TestServer::start_with(ScriptedBackend::new(true), config).await;
    let mut client = server.client().await;
    let mut stream = client
        .generate_stream(request("hang"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.next().await.unwrap().unwrap().text, "tick");

    server.begin_shutdown();
    let result = server.join().await;
    assert!(
        matches!(
            result,
            Err(AppError::Server(ServerError::DrainTimedOut {
                in_flight: 1,
                ..
            }))
        ),
        "{result:?}"
    );
    server.backend.wait_cancelled(1).await;
    let status = stream.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn idle_server_stops_at_once() {
    let mut server = TestServer::start().await;
    let _client = server.client().await;
    server.begin_shutdown();
    server.join().await.unwrap();
}
