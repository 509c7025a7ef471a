//! Prometheus `/metrics` on its own HTTP listener reflects served calls.
//! Uses `ScriptedBackend` (see tests/grpc_support).

mod grpc_support;

use grpc_support::{request, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn metrics_count_calls_by_model_and_code() {
    let server = TestServer::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(qnode::metrics::serve(
        listener,
        server.metrics.clone(),
        async {
            let _ = stopped.await;
        },
    ));

    let mut client = server.client().await;
    client.generate(request("hi")).await.unwrap();
    client.generate(request("")).await.unwrap_err();
    let mut bad_model = request("hi");
    bad_model.model = "nope".into();
    client.generate(bad_model).await.unwrap_err();

    let page = http_get(metrics_addr, "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for line in [
        r#"qnode_requests_total{code="Ok",method="Generate",model="smollm2"} 1"#,
        r#"qnode_requests_total{code="InvalidArgument",method="Generate",model="smollm2"} 1"#,
        r#"qnode_requests_total{code="NotFound",method="Generate",model="-"} 1"#,
        // Served, not generated: the scripted backend is no model, so the pool's
        // `qnode_generated_tokens_total` (what the model computed) does not move.
        r#"qnode_served_tokens_total{model="smollm2",source="model"} 3"#,
        r#"qnode_time_to_first_token_seconds_count{model="smollm2"} 1"#,
        r#"qnode_request_duration_seconds_count{method="Generate",model="smollm2"} 2"#,
        "qnode_in_flight_requests 0",
    ] {
        assert!(page.contains(line), "missing {line}\n{page}");
    }
    assert!(!page.contains("qnode_generated_tokens_total"), "{page}");
    assert!(http_get(metrics_addr, "/other")
        .await
        .starts_with("HTTP/1.1 404"));

    stop.send(()).unwrap();
    http.await.unwrap().unwrap();
}
