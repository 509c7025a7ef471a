//! SIGTERM (how Kubernetes and Docker stop a pod) and SIGINT (Ctrl-C) on the real `qnode serve`
//! binary with the real SmolLM2: the node drains as the README says (the listener closes at once,
//! streams already running on both fronts finish whole), then exits 0.
//!
//! A call still running when `drain_timeout` runs out is cut with UNAVAILABLE, the node logs how
//! many it cut and exits 1 (README: a non-zero exit shows a too-short drain timeout).
//!
//! "In flight" is not assumed from timing: the node's own log lines (`draining: listener closed`,
//! `drain timeout: cutting calls still running`) carry the number of calls it still had, and the
//! test requires it to be the calls it opened.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use qnode::grpc::proto;
use qnode::grpc::proto::inference_client::InferenceClient;
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// New tokens of each in-flight call: long enough to outlast the signal, short enough to keep the
/// test quick in a debug build.
const TOKENS: u32 = 48;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

struct Serve {
    child: Option<Child>,
    grpc: SocketAddr,
    http: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Serve {
    fn start() -> Self {
        Self::start_with_drain_timeout("60s")
    }

    /// `qnode serve` with `--drain-timeout=drain_timeout`.
    fn start_with_drain_timeout(drain_timeout: &str) -> Self {
        common::model_file("smollm2");
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serve.log");
        let file = std::fs::File::create(&log).unwrap();
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_qnode"))
            .arg("serve")
            .arg(format!("--listen={grpc}"))
            .arg(format!("--http-listen={http}"))
            .arg("--threads-per-instance=1")
            .arg(format!("--drain-timeout={drain_timeout}"))
            .env("QNODE_MODELS_DIR", common::repo_root().join("models"))
            .env("RUST_LOG", "info")
            .env_remove("QNODE_API_KEY")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn qnode serve");
        Self {
            child: Some(child),
            grpc,
            http,
            log,
            _dir: dir,
        }
    }

    /// The node's log so far, without the ANSI colour codes tracing adds around field names.
    fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    async fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(channel) =
                tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))
                    .unwrap()
                    .connect()
                    .await
            {
                let status = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: "qnode.v1.Inference".into(),
                    })
                    .await
                    .map(|r| r.into_inner().status);
                if status.ok() == Some(ServingStatus::Serving as i32) {
                    return;
                }
            }
            if let Some(exit) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "qnode serve exited with {exit} while starting:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "not serving after 120 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// The `in_flight=N` of the node's `draining: listener closed` line, once it is logged.
    async fn drained_with(&self) -> usize {
        self.in_flight_logged("draining: listener closed").await
    }

    /// The `in_flight=N` of the first log line containing `needle`, once it is logged.
    async fn in_flight_logged(&self, needle: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                let n = line
                    .split("in_flight=")
                    .nth(1)
                    .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("no in_flight count in {line:?}"));
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} logged 30 s after the signal:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running 60 s after the signal:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn long_request() -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: "smollm2".into(),
        messages: vec![proto::ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
            ..Default::default()
        }],
        max_tokens: Some(TOKENS),
        temperature: Some(0.0),
        cache_policy: proto::CachePolicy::Bypass as i32,
        ..Default::default()
    }
}

/// A streamed chat completion through `curl -N`, read on a thread: returns once the first event
/// arrived; the handle yields every `data:` payload to the end.
fn http_stream(http: SocketAddr) -> std::thread::JoinHandle<Vec<String>> {
    let body = format!(
        r#"{{"model":"smollm2","messages":[{{"role":"user","content":"What is the capital of France?"}}],"max_tokens":{TOKENS},"temperature":0,"stream":true}}"#
    );
    let mut child = Command::new("curl")
        .args(["-s", "-N", "-H", "Content-Type: application/json", "-d"])
        .arg(body)
        .arg(format!("http://{http}/v1/chat/completions"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let mut events = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(data) = line.strip_prefix("data: ") {
                events.push(data.to_string());
                let _ = first_tx.send(());
            }
        }
        let _ = child.wait();
        events
    });
    first_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("no first SSE event within 60 s");
    handle
}

/// Starts the node, opens streams that are mid-generation, sends `signal`, and checks the drain
/// and the exit code.
async fn signal_drains_and_exits_0(signal: i32, with_http: bool) {
    let mut node = Serve::start();
    node.wait_serving().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = InferenceClient::new(channel);
    let mut stream = client
        .generate_stream(long_request())
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.expect("a first chunk").unwrap();
    assert!(first.finish_reason.is_none(), "finished at the first chunk");
    let http = with_http.then(|| http_stream(node.http));

    node.signal(signal);
    let in_flight = node.drained_with().await;
    let opened = 1 + usize::from(with_http);
    assert_eq!(
        in_flight, opened,
        "the node drained with {in_flight} calls in flight, the test had {opened} open"
    );
    // The listener is closed at once: a balancer's new connection is refused.
    assert!(
        TcpStream::connect(node.grpc).is_err(),
        "the gRPC listener still accepts during the drain"
    );

    // The running stream finishes whole.
    let mut last = first;
    let mut text = last.text.clone();
    while let Some(chunk) = stream.next().await {
        last = chunk.unwrap_or_else(|e| panic!("stream cut by the drain: {e:?}"));
        text.push_str(&last.text);
    }
    assert_eq!(
        last.finish_reason,
        Some(proto::FinishReason::Length as i32),
        "{text:?}"
    );
    assert_eq!(last.usage.unwrap().completion_tokens, TOKENS, "{text:?}");
    if let Some(http) = http {
        let events = http.join().unwrap();
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "the HTTP stream was cut: {events:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| e.contains(r#""finish_reason":"length""#)),
            "{events:?}"
        );
    }

    let exit = node.wait_exit().await;
    assert_eq!(exit.code(), Some(0), "exit status {exit}:\n{}", node.log());
    eprintln!("drained {in_flight} call(s) in flight, {exit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_both_fronts_and_exits_0() {
    signal_drains_and_exits_0(libc::SIGTERM, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_and_exits_0() {
    signal_drains_and_exits_0(libc::SIGINT, false).await;
}

/// README: calls still running at `drain_timeout` are cut (UNAVAILABLE), the count is logged and
/// the process exits 1. The drain timeout (10 ms) is far below what the rest of a 48-token stream
/// takes on any CPU, so the stream is still running when it runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_cuts_the_calls_left_and_exits_1() {
    let mut node = Serve::start_with_drain_timeout("10ms");
    node.wait_serving().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stream = InferenceClient::new(channel)
        .generate_stream(long_request())
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.expect("a first chunk").unwrap();
    assert!(first.finish_reason.is_none(), "finished at the first chunk");

    node.signal(libc::SIGTERM);
    assert_eq!(node.drained_with().await, 1, "in flight at the drain");
    let cut = node
        .in_flight_logged("drain timeout: cutting calls still running")
        .await;
    assert_eq!(cut, 1, "calls cut at the drain timeout");
    // The stream ends in an error, never in a clean finish.
    let mut outcome = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => assert!(
                c.finish_reason.is_none(),
                "the stream finished although the drain timeout cut it: {c:?}"
            ),
            Err(status) => {
                outcome = Some(status);
                break;
            }
        }
    }
    let status = outcome.expect("the cut stream ended without an error");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    let exit = node.wait_exit().await;
    assert_eq!(exit.code(), Some(1), "exit status {exit}:\n{}", node.log());
    eprintln!("drain timeout cut {cut} call; {exit}; the client got {status:?}");
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
