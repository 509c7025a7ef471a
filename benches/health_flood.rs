//! Health under a tokenization flood (issue #13 item 8), on the real release binary and the
//! real SmolLM2 file: `qnode serve` gets 96 concurrent `Generate` calls of 130 KB prompts each
//! (the shape that once stalled health checks for 2.3 s), while one client checks
//! `grpc.health.v1.Health/Check` every 10 ms on its own connection. Prints health latency
//! (p50 / p99 / max) idle and during the flood, and how long the flood took. The target is
//! p99 < 50 ms during the flood (the k8s readiness probe times out at 3 s).
//!
//! `cargo bench --bench health_flood` (models fetched by `bash scripts/test.sh`).

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qnode::grpc::proto::inference_client::InferenceClient;
use qnode::grpc::proto::{self, CachePolicy};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const QNODE: &str = env!("CARGO_BIN_EXE_qnode");
const CALLS: usize = 96;
const PROMPT_BYTES: usize = 130_000;
const PROBE_EVERY: Duration = Duration::from_millis(10);

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
}

async fn connect(addr: SocketAddr) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).expect("endpoint");
    let since = Instant::now();
    loop {
        match endpoint.connect().await {
            Ok(c) => return c,
            Err(e) if since.elapsed() > Duration::from_secs(60) => {
                panic!("node at {addr} never listened: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Health latencies while `busy` is set, one probe every [`PROBE_EVERY`].
async fn probe(mut health: HealthClient<Channel>, busy: Arc<AtomicBool>) -> Vec<Duration> {
    let check = HealthCheckRequest {
        service: "qnode.v1.Inference".into(),
    };
    let mut seen = Vec::new();
    while busy.load(Ordering::SeqCst) {
        let t = Instant::now();
        let status = health.check(check.clone()).await.expect("health Check");
        assert_eq!(status.into_inner().status, ServingStatus::Serving as i32);
        seen.push(t.elapsed());
        tokio::time::sleep(PROBE_EVERY).await;
    }
    seen
}

fn summary(mut d: Vec<Duration>) -> String {
    d.sort();
    let at = |q: f64| d[((d.len() - 1) as f64 * q).round() as usize];
    format!(
        "n={:>4}  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        d.len(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        d[d.len() - 1].as_secs_f64() * 1e3
    )
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("models/smollm2").is_dir(),
        "models/smollm2 is missing: run `bash scripts/test.sh` (it fetches the models) first"
    );
    let addr = free_port();
    let _node = Node(
        Command::new(QNODE)
            .current_dir(root)
            .args(["serve", "--listen", &addr.to_string(), "--model", "smollm2"])
            .args(["--max-queued", "256"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {QNODE}: {e}")),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let channel = connect(addr).await;
        let mut health = HealthClient::new(connect(addr).await);
        let check = HealthCheckRequest {
            service: "qnode.v1.Inference".into(),
        };
        while health
            .check(check.clone())
            .await
            .map(|r| r.into_inner().status)
            .ok()
            != Some(ServingStatus::Serving as i32)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let busy = Arc::new(AtomicBool::new(true));
        let idle = tokio::spawn(probe(health.clone(), busy.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        busy.store(false, Ordering::SeqCst);
        let idle = idle.await.unwrap();

        // Words, so the tokenizer does real work (~30k tokens each: refused after tokenization
        // as longer than the context, which is the flood's point: no generation, only prep).
        let words = ["hello", "world", "qnode", "tokenizer", "flood", "health", "probe"];
        let prompt: String = (0..)
            .map(|i| words[i % words.len()])
            .scan(0, |len, w| {
                *len += w.len() + 1;
                (*len <= PROMPT_BYTES).then(|| format!("{w} "))
            })
            .collect();
        let busy = Arc::new(AtomicBool::new(true));
        let during = tokio::spawn(probe(health.clone(), busy.clone()));
        let started = Instant::now();
        let calls: Vec<_> = (0..CALLS)
            .map(|i| {
                let mut client = InferenceClient::new(channel.clone())
                    .max_decoding_message_size(8 << 20)
                    .max_encoding_message_size(8 << 20);
                let request = proto::GenerateRequest {
                    model: "smollm2".into(),
                    prompt: Some(format!("{i} {prompt}")),
                    max_tokens: Some(1),
                    temperature: Some(0.0),
                    cache_policy: CachePolicy::Bypass as i32,
                    ..Default::default()
                };
                tokio::spawn(async move { client.generate(request).await.map(|_| ()) })
            })
            .collect();
        let mut refused = 0;
        for c in calls {
            if c.await.unwrap().is_err() {
                refused += 1;
            }
        }
        let flood = started.elapsed();
        busy.store(false, Ordering::SeqCst);
        let during = during.await.unwrap();
        println!("health_flood: {CALLS} calls x {PROMPT_BYTES} B prompts, {refused} refused (context overflow), flood took {:.2} s", flood.as_secs_f64());
        println!("health idle        {}", summary(idle));
        println!("health under flood {}", summary(during));
    });
}
