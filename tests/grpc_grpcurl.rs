//! The real `grpcurl` against the server: reflection (`list`, `describe`) and health work with no
//! .proto on the client side. Needs .tools/bin/grpcurl, which `bash scripts/test.sh` installs (through
//! scripts/install-tools.sh); without it the test fails and says so. Uses `ScriptedBackend` (see
//! tests/grpc_support).

mod grpc_support;

use std::path::PathBuf;

use grpc_support::TestServer;

/// The grpcurl binary; a missing one fails the test (a skip would read as a pass).
fn grpcurl() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/grpcurl");
    assert!(
        path.exists(),
        "{} is missing: run `bash scripts/test.sh` (it installs grpcurl through \
         scripts/install-tools.sh) or `bash scripts/install-tools.sh`",
        path.display()
    );
    path
}

/// Runs grpcurl off the async runtime and returns its stdout; panics with stderr on failure.
async fn run(bin: &PathBuf, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("grpcurl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn list_describe_health_and_call_with_reflection() {
    let bin = grpcurl();
    let server = TestServer::start().await;
    let addr = server.addr.to_string();

    let list = run(&bin, &["-plaintext", &addr, "list"]).await;
    let services: Vec<&str> = list.lines().collect();
    for expected in [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "qnode.v1.Inference",
    ] {
        assert!(
            services.contains(&expected),
            "{expected} not in {services:?}"
        );
    }

    let described = run(
        &bin,
        &["-plaintext", &addr, "describe", "qnode.v1.Inference"],
    )
    .await;
    for rpc in [
        "rpc Generate ( .qnode.v1.GenerateRequest ) returns ( .qnode.v1.GenerateResponse );",
        "rpc GenerateStream ( .qnode.v1.GenerateRequest ) returns ( stream .qnode.v1.GenerateChunk );",
        "rpc ListModels ( .qnode.v1.ListModelsRequest ) returns ( .qnode.v1.ListModelsResponse );",
    ] {
        assert!(described.contains(rpc), "missing {rpc}\n{described}");
    }
    let message = run(
        &bin,
        &["-plaintext", &addr, "describe", "qnode.v1.GenerateRequest"],
    )
    .await;
    assert!(
        message.contains("optional float temperature = 5;"),
        "{message}"
    );

    let health = run(&bin, &["-plaintext", &addr, "grpc.health.v1.Health/Check"]).await;
    assert!(health.contains(r#""status": "SERVING""#), "{health}");
    let health = run(
        &bin,
        &[
            "-plaintext",
            "-d",
            r#"{"service":"qnode.v1.Inference"}"#,
            &addr,
            "grpc.health.v1.Health/Check",
        ],
    )
    .await;
    assert!(health.contains(r#""status": "SERVING""#), "{health}");
    let listed = run(&bin, &["-plaintext", &addr, "grpc.health.v1.Health/List"]).await;
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("grpcurl prints JSON");
    for service in ["", "qnode.v1.Inference", "qnode.v1.Admin"] {
        assert_eq!(
            listed["statuses"][service]["status"], "SERVING",
            "{service:?}: {listed}"
        );
    }

    let answer = run(
        &bin,
        &[
            "-plaintext",
            "-d",
            r#"{"model":"smollm2","prompt":"hi","request_id":"curl-1"}"#,
            &addr,
            "qnode.v1.Inference/Generate",
        ],
    )
    .await;
    assert!(answer.contains(r#""text": "Hello!""#), "{answer}");
    assert!(
        answer.contains(r#""finishReason": "FINISH_REASON_STOP""#),
        "{answer}"
    );
    assert!(answer.contains(r#""requestId": "curl-1""#), "{answer}");

    // Tools, grpcurl-friendly: parameters as JSON text, the call back in `toolCalls`, unary and
    // streamed (the scripted backend writes the tool format for the message `tool_call`).
    let body = r#"{"model":"smollm2","messages":[{"role":"user","content":"tool_call"}],
        "tools":[{"name":"f","description":"d","parameters":"{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"}}}"}],
        "tool_choice":"required"}"#;
    for method in ["Generate", "GenerateStream"] {
        let out = run(
            &bin,
            &[
                "-plaintext",
                "-d",
                body,
                &addr,
                &format!("qnode.v1.Inference/{method}"),
            ],
        )
        .await;
        assert!(out.contains(r#""name": "f""#), "{method}: {out}");
        assert!(
            out.contains(r#""arguments": "{\"a\":1}""#),
            "{method}: {out}"
        );
        assert!(out.contains(r#""id": "call_"#), "{method}: {out}");
        assert!(
            out.contains(r#""finishReason": "FINISH_REASON_TOOL_CALLS""#),
            "{method}: {out}"
        );
    }
}
