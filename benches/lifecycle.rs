//! How fast a node comes up and how fast a standby node takes traffic (issue #7), on the real
//! release binary and the real SmolLM2 file:
//!
//! - `lifecycle/cold_start_to_ready`: `qnode serve` spawned → grpc.health.v1 says SERVING for
//!   `qnode.v1.Inference` (polled every 5 ms over one channel, connecting again until the listener
//!   is up). Per start it also records when the node was first seen WARMING (models loaded) and
//!   the node's own `warm_after_ms`, printed as a split after the group.
//! - `lifecycle/activate_to_first_token`: a `--role standby` node put back on standby each
//!   iteration, then `Admin.Activate` → the first chunk of a 1-token `GenerateStream`; and as the
//!   baseline the same stream's first chunk on a node already active, so the two differ by what
//!   activation adds. The Activate call's own round trip is printed as a split after the group.
//!
//! Every child process is killed when its guard drops, panics included.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use qnode::grpc::proto::admin_client::AdminClient;
use qnode::grpc::proto::inference_client::InferenceClient;
use qnode::grpc::proto::{self, CachePolicy, NodeState};
use tokio::runtime::Runtime;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The release binary cargo built for this bench.
const QNODE: &str = env!("CARGO_BIN_EXE_qnode");
/// How often the client polls while a node starts.
const POLL: Duration = Duration::from_millis(5);
/// A start that takes longer than this is a failure, not a measurement.
const START_LIMIT: Duration = Duration::from_secs(60);

/// A `qnode serve` child, killed and reaped on drop.
struct Node {
    child: Child,
    addr: SocketAddr,
}

impl Node {
    fn spawn(role: &str) -> Self {
        let addr = free_port();
        let child = Command::new(QNODE)
            .args(["serve", "--listen", &addr.to_string(), "--model", "smollm2"])
            .args(["--threads-per-instance", "2", "--role", role])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {QNODE}: {e}"));
        Self { child, addr }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free now (the child binds it a few ms later; nothing else on loopback races for it).
fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr")
}

/// Connects to `addr`, trying again every [`POLL`] until the listener is up.
async fn connect(addr: SocketAddr, since: Instant) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).expect("endpoint");
    loop {
        match endpoint.connect().await {
            Ok(channel) => return channel,
            Err(e) if since.elapsed() > START_LIMIT => panic!("node at {addr} never listened: {e}"),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

async fn node_state(admin: &mut AdminClient<Channel>) -> proto::NodeStatusResponse {
    admin
        .node_status(proto::NodeStatusRequest {})
        .await
        .expect("NodeStatus")
        .into_inner()
}

/// Where one cold start's time went, on the client's clock (and the node's own figure).
#[derive(Default, Clone, Copy)]
struct Split {
    /// Spawn → the node first seen WARMING (or later): process start, parse, model load.
    loaded: Duration,
    /// Spawn → health SERVING for Inference: the measured total.
    serving: Duration,
    /// The node's `warm_after_ms`: its process start → warm (ready), on its clock.
    warm_after_ms: u64,
}

/// Spawns a node and waits for Inference SERVING; returns the node (still running) and the split.
async fn cold_start() -> (Node, Split) {
    let started = Instant::now();
    let node = Node::spawn("active");
    let channel = connect(node.addr, started).await;
    let mut health = HealthClient::new(channel.clone());
    let mut admin = AdminClient::new(channel);
    let check = HealthCheckRequest {
        service: "qnode.v1.Inference".into(),
    };
    let mut split = Split::default();
    let mut loaded = None;
    loop {
        let status = health.check(check.clone()).await.expect("health Check");
        if status.into_inner().status == ServingStatus::Serving as i32 {
            split.serving = started.elapsed();
            break;
        }
        if loaded.is_none() && node_state(&mut admin).await.state != NodeState::Loading as i32 {
            loaded = Some(started.elapsed());
        }
        assert!(
            started.elapsed() < START_LIMIT,
            "node not serving after {START_LIMIT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    split.loaded = loaded.unwrap_or(split.serving);
    split.warm_after_ms = node_state(&mut admin).await.warm_after_ms;
    (node, split)
}

fn stats(label: &str, values: &[f64]) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    eprintln!(
        "  {label:<34} mean {mean:8.2} ms  min {:8.2}  median {:8.2}  max {:8.2}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    );
}

fn report_splits(splits: &[Split]) {
    if splits.is_empty() {
        return;
    }
    let ms = |f: fn(&Split) -> f64| splits.iter().map(f).collect::<Vec<_>>();
    eprintln!(
        "cold start split over {} starts (client clock from spawn):",
        splits.len()
    );
    stats(
        "spawn -> WARMING (loaded)",
        &ms(|s| s.loaded.as_secs_f64() * 1e3),
    );
    stats(
        "WARMING -> Inference SERVING",
        &ms(|s| (s.serving - s.loaded).as_secs_f64() * 1e3),
    );
    stats(
        "spawn -> Inference SERVING",
        &ms(|s| s.serving.as_secs_f64() * 1e3),
    );
    stats(
        "node warm_after_ms (its clock)",
        &ms(|s| s.warm_after_ms as f64),
    );
}

fn rt() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn have_prerequisites() -> bool {
    if !Path::new("models/smollm2").exists() {
        eprintln!("models/smollm2 missing: run `python3 models/fetch.py` first");
        return false;
    }
    if !Path::new(QNODE).exists() {
        eprintln!("{QNODE} missing: `cargo bench --bench lifecycle` builds it; run it that way");
        return false;
    }
    true
}

fn bench_cold_start(c: &mut Criterion) {
    if !have_prerequisites() {
        return;
    }
    let rt = rt();
    let mut splits = Vec::new();
    let mut g = c.benchmark_group("lifecycle");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(10));
    g.bench_function("cold_start_to_ready", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (node, split) = rt.block_on(cold_start());
                drop(node);
                total += split.serving;
                splits.push(split);
            }
            total
        })
    });
    g.finish();
    // The first start is criterion's warm-up (page cache filled, binary paged in): left out.
    report_splits(splits.get(1..).unwrap_or_default());
}

fn stream_request() -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: "smollm2".into(),
        prompt: Some("Hello".into()),
        max_tokens: Some(1),
        temperature: Some(0.0),
        cache_policy: CachePolicy::Bypass as i32,
        ..Default::default()
    }
}

/// Time to the stream's first chunk, then reads it to its end.
async fn first_chunk(client: &mut InferenceClient<Channel>, since: Instant) -> Duration {
    let mut stream = client
        .generate_stream(stream_request())
        .await
        .expect("GenerateStream")
        .into_inner();
    stream
        .next()
        .await
        .expect("a first chunk")
        .expect("a chunk, not an error");
    let first = since.elapsed();
    while let Some(chunk) = stream.next().await {
        chunk.expect("a chunk, not an error");
    }
    first
}

fn bench_activate(c: &mut Criterion) {
    if !have_prerequisites() {
        return;
    }
    let rt = rt();
    let node = Node::spawn("standby");
    let channel = rt.block_on(async {
        let started = Instant::now();
        let channel = connect(node.addr, started).await;
        let mut admin = AdminClient::new(channel.clone());
        while node_state(&mut admin).await.state != NodeState::Standby as i32 {
            assert!(
                started.elapsed() < START_LIMIT,
                "node never reached standby"
            );
            tokio::time::sleep(POLL).await;
        }
        channel
    });
    let mut admin = AdminClient::new(channel.clone());
    let mut inference = InferenceClient::new(channel);

    let mut activate_ms = Vec::new();
    let mut g = c.benchmark_group("lifecycle");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    g.bench_function("activate_to_first_token", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    admin
                        .standby(proto::StandbyRequest {})
                        .await
                        .expect("Standby");
                    let started = Instant::now();
                    admin
                        .activate(proto::ActivateRequest {})
                        .await
                        .expect("Activate");
                    activate_ms.push(started.elapsed().as_secs_f64() * 1e3);
                    total += first_chunk(&mut inference, started).await;
                }
                total
            })
        })
    });
    rt.block_on(async {
        admin
            .activate(proto::ActivateRequest {})
            .await
            .expect("Activate");
    });
    g.bench_function("first_token_when_active", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += first_chunk(&mut inference, Instant::now()).await;
                }
                total
            })
        })
    });
    g.finish();
    drop(node);
    if !activate_ms.is_empty() {
        eprintln!("activate_to_first_token split:");
        stats("Activate RPC (call -> response)", &activate_ms);
    }
}

criterion_group!(benches, bench_cold_start, bench_activate);
criterion_main!(benches);
