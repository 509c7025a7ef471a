//! A fleet on loopback for tests/fleet.rs and tests/session_affinity.rs: real `qnode serve`
//! processes, real nginx (Debian's package, run as the test user with every file in a temp dir)
//! templated from deploy/nginx/qnode.conf, and a load generator of tonic clients with a bounded
//! retry policy.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qnode::grpc::proto;
use qnode::grpc::proto::admin_client::AdminClient;
use qnode::grpc::proto::inference_client::InferenceClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A lazily connecting channel to `127.0.0.1:port`.
pub fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

/// One `qnode serve` process; SIGKILLed on drop if still running.
pub struct QnodeProcess {
    pub name: &'static str,
    pub port: u16,
    pub metrics_port: u16,
    child: Option<Child>,
    pub log: PathBuf,
}

/// What every node of the fleet shares: a temp dir holding the node config (and logs), one real
/// `redis-server`, and the fetched models. Nodes started from it must be dropped before it.
pub struct NodeSetup {
    pub dir: tempfile::TempDir,
    pub redis: crate::cache_support::RedisServer,
    pub models_dir: PathBuf,
}

impl NodeSetup {
    /// Checks the model is fetched, writes the config, starts Redis.
    pub fn new() -> Self {
        crate::common::model_file("smollm2");
        let dir = tempfile::tempdir().expect("temp dir");
        write_node_config(dir.path());
        Self {
            dir,
            redis: crate::cache_support::RedisServer::start(),
            models_dir: crate::common::repo_root().join("models"),
        }
    }

    /// The shared directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl QnodeProcess {
    /// Starts `qnode serve` on `port` (1 engine thread, the fleet's Redis, the test config file
    /// written by [`write_node_config`]); `standby` adds `--role standby`.
    pub fn start(setup: &NodeSetup, name: &'static str, port: u16, standby: bool) -> Self {
        let metrics_port = free_port();
        let log = setup.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qnode"));
        cmd.arg("serve")
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!("--metrics-listen=127.0.0.1:{metrics_port}"))
            .arg("--threads-per-instance=1")
            .arg(format!("--redis-url={}", setup.redis.url()))
            .arg(format!(
                "--config={}",
                setup.path().join("qnode.toml").display()
            ))
            .env("QNODE_MODELS_DIR", &setup.models_dir)
            .env("QNODE_CACHE_REDIS_SECRET", "fleet-test-secret-0123456789")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        if standby {
            cmd.arg("--role=standby");
        }
        let child = cmd.spawn().expect("spawn qnode serve");
        Self {
            name,
            port,
            metrics_port,
            child: Some(child),
            log,
        }
    }

    /// Waits until the node's overall health is SERVING (ready, or standby): models loaded and
    /// warm. Panics with the log's tail after `within`.
    pub async fn wait_up(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut health = HealthClient::new(channel(self.port));
        loop {
            let status = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status);
            if status.ok() == Some(ServingStatus::Serving as i32) {
                return;
            }
            if let Some(exit) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited with {exit} while starting:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not up after {within:?}:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The Admin client of this node.
    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(channel(self.port))
    }

    /// An Inference client straight to this node (no nginx).
    pub fn inference(&self) -> InferenceClient<Channel> {
        InferenceClient::new(channel(self.port))
    }

    /// kill -9, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself, up to `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Successful Inference calls this node has answered, from its own Prometheus /metrics.
    pub fn ok_calls(&self) -> u64 {
        let text = http_get(self.metrics_port, "/metrics");
        text.lines()
            .filter(|l| l.starts_with("qnode_requests_total{") && l.contains(r#"code="Ok""#))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// This node's whole /metrics page.
    pub fn scrape(&self) -> String {
        http_get(self.metrics_port, "/metrics")
    }

    /// One counter or gauge on this node's /metrics, summed over its labels (0 when absent).
    pub fn metric(&self, name: &str) -> u64 {
        let text = http_get(self.metrics_port, "/metrics");
        text.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The last lines of the node's log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 30)
    }
}

impl Drop for QnodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The config file every node reads: hot after one ask (so one answer is enough to share it),
/// and Redis calls given time on a 2-core machine running three models.
pub fn write_node_config(dir: &Path) {
    std::fs::write(
        dir.join("qnode.toml"),
        "[cache]\nhot_threshold = 1\nredis_timeout = \"2s\"\n\n[server]\ndrain_timeout = \"20s\"\n",
    )
    .expect("write qnode.toml");
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A plain HTTP/1.0 GET on loopback; the body.
fn http_get(port: u16, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// deploy/nginx/qnode.conf with the edits its header lists, for nginx 1.22 on loopback: the
/// upstream servers `worker-1`, `worker-2`, `standby` become `127.0.0.1:{ports[0..3]}`; the
/// standby's line (commented out in the file) is uncommented with `standby_in`.
/// Panics when an edit does not match exactly, so the file and the test cannot drift apart.
pub fn nginx_config(
    deploy: &str,
    listen: u16,
    ports: [u16; 3],
    standby_in: bool,
    non_idempotent: bool,
) -> String {
    fn replace_once(text: &str, from: &str, to: &str) -> String {
        assert_eq!(
            text.matches(from).count(),
            1,
            "deploy/nginx/qnode.conf: expected exactly one `{from}`"
        );
        text.replacen(from, to, 1)
    }
    let resolver: Vec<&str> = deploy
        .lines()
        .filter(|l| l.starts_with("resolver "))
        .collect();
    assert_eq!(
        resolver.len(),
        1,
        "deploy/nginx/qnode.conf: one resolver line"
    );
    let mut conf = replace_once(deploy, &format!("{}\n", resolver[0]), "");
    for (name, port) in ["worker-1", "worker-2", "standby"].iter().zip(ports) {
        conf = replace_once(
            &conf,
            &format!("server {name}:50051 resolve "),
            &format!("server 127.0.0.1:{port} "),
        );
    }
    conf = replace_once(
        &conf,
        "    listen 8080;\n    http2 on;\n",
        &format!("    listen 127.0.0.1:{listen} http2;\n"),
    );
    if standby_in {
        conf = replace_once(
            &conf,
            &format!("# server 127.0.0.1:{} ", ports[2]),
            &format!("server 127.0.0.1:{} ", ports[2]),
        );
    }
    if non_idempotent {
        conf = replace_once(
            &conf,
            "grpc_next_upstream error timeout;",
            "grpc_next_upstream error timeout non_idempotent;",
        );
    }
    let directives = conf.lines().filter(|l| !l.trim_start().starts_with('#'));
    for line in directives {
        assert!(!line.contains(" resolve"), "a `resolve` left: {line}");
    }
    conf
}

/// nginx as the test user, everything under its own directory; stopped on drop.
pub struct Nginx {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl Nginx {
    /// Starts `nginx -p DIR -c nginx.conf -g 'daemon off;'` with `site` (a config for inside
    /// `http {}`) and waits until it accepts connections.
    pub fn start(dir: &Path, port: u16, site: &str) -> Self {
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
        std::fs::write(dir.join("qnode.conf"), site).expect("write site");
        // As root, nginx's workers would switch to `nobody`, who cannot read a private temp dir.
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;\n"
        } else {
            ""
        };
        let main = format!(
            "{user}worker_processes 1;\npid nginx.pid;\nerror_log error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             client_body_temp_path tmp/body; proxy_temp_path tmp/proxy;\n\
             fastcgi_temp_path tmp/fastcgi; uwsgi_temp_path tmp/uwsgi; scgi_temp_path tmp/scgi;\n\
             log_format fleet '$status $upstream_addr $upstream_status $request_time $request_uri';\n\
             access_log access.log fleet;\n\
             include qnode.conf;\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).expect("write nginx.conf");
        let test = nginx_command(dir)
            .args(["-t", "-q"])
            .output()
            .expect("nginx -t");
        assert!(
            test.status.success(),
            "nginx -t rejected the config: {}",
            String::from_utf8_lossy(&test.stderr)
        );
        let child = nginx_command(dir)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            port,
            child: Some(child),
            dir: dir.to_path_buf(),
        }
    }

    /// Replaces the site config and runs `nginx -s reload`, as an orchestrator would. The reload
    /// is asynchronous: new workers take over within milliseconds, old ones finish their calls.
    pub fn reload(&self, site: &str) {
        std::fs::write(self.dir.join("qnode.conf"), site).expect("write site");
        let out = nginx_command(&self.dir)
            .args(["-s", "reload"])
            .output()
            .expect("nginx -s reload");
        assert!(
            out.status.success(),
            "nginx -s reload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Access log lines: `status upstream_addr upstream_status request_time uri`. An upstream
    /// list with a comma is a call nginx passed to more than one node.
    pub fn access_log(&self) -> Vec<String> {
        lines(&self.dir.join("access.log"))
    }

    /// All error log lines.
    pub fn error_log(&self) -> Vec<String> {
        lines(&self.dir.join("error.log"))
    }

    /// The error log's tail.
    pub fn error_log_tail(&self) -> String {
        tail(&self.dir.join("error.log"), 20)
    }
}

/// A file's lines (none when it does not exist yet).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT: graceful stop; then make sure.
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn nginx_binary() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "nginx is missing: the fleet test needs it; `bash scripts/test.sh` installs it \
         (or `apt-get install -y nginx-light`)"
    )
}

/// The client's retry policy, as docs/deploy.md recommends for a gateway.
pub const MAX_ATTEMPTS: u32 = 6;
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(1000);
/// Each attempt's own deadline (`grpc-timeout`); never retried when it runs out.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a failed attempt is worth another: UNAVAILABLE, and the errors of a connection or an
/// HTTP/2 stream that broke under the call. tonic reports those as INTERNAL/UNKNOWN (nginx reset
/// the stream of a node that died mid-call: "h2 protocol error") or CANCELLED with a "connection
/// closed" source (a call that raced the GOAWAY of nginx's reload: never processed, like gRPC's
/// transparent retry). Never DEADLINE_EXCEEDED, INVALID_ARGUMENT, RESOURCE_EXHAUSTED without
/// pushback, ….
pub fn retryable(status: &Status) -> bool {
    let mut text = status.message().to_ascii_lowercase();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        text.push_str(&format!(" / {e:?}").to_ascii_lowercase());
        source = e.source();
    }
    let broken_connection = [
        "h2 protocol error",
        "connection closed",
        "connection reset",
        "broken pipe",
        "transport error",
    ]
    .iter()
    .any(|needle| text.contains(needle));
    match status.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Internal | Code::Cancelled => broken_connection,
        _ => false,
    }
}

/// What one request looks like.
#[derive(Clone, Debug)]
pub struct Ask {
    pub prompt: String,
    pub policy: proto::CachePolicy,
    pub stream: bool,
    pub max_tokens: u32,
}

/// The answer of a request that succeeded.
#[derive(Debug)]
pub struct Answer {
    pub text: String,
    pub cache_level: i32,
    pub attempts: u32,
}

/// Counts over a load run.
#[derive(Debug, Default)]
pub struct Stats {
    pub sent: usize,
    pub succeeded: usize,
    /// Requests that needed more than one attempt.
    pub retried: usize,
    /// Extra attempts over all requests.
    pub retries: usize,
    pub failed: usize,
    /// Failed attempts by code and message (retried or not).
    pub errors: BTreeMap<String, usize>,
}

impl Stats {
    fn add(&mut self, result: &Result<Answer, (Status, u32)>, errors: &[Status]) {
        self.sent += 1;
        let attempts = match result {
            Ok(a) => {
                self.succeeded += 1;
                a.attempts
            }
            Err((_, attempts)) => {
                self.failed += 1;
                *attempts
            }
        };
        if attempts > 1 {
            self.retried += 1;
            self.retries += attempts as usize - 1;
        }
        for e in errors {
            let key = format!("{:?}: {}", e.code(), e.message());
            *self.errors.entry(key).or_default() += 1;
        }
    }

    /// One line for the test output.
    pub fn line(&self) -> String {
        format!(
            "sent {} succeeded {} retried {} (extra attempts {}) failed {}",
            self.sent, self.succeeded, self.retried, self.retries, self.failed
        )
    }
}

fn request(ask: &Ask) -> tonic::Request<proto::GenerateRequest> {
    let mut request = tonic::Request::new(proto::GenerateRequest {
        model: "smollm2".into(),
        prompt: Some(ask.prompt.clone()),
        max_tokens: Some(ask.max_tokens),
        cache_policy: ask.policy as i32,
        ..Default::default()
    });
    request.set_timeout(ATTEMPT_TIMEOUT);
    request
}

async fn attempt(
    client: &mut InferenceClient<Channel>,
    ask: &Ask,
) -> Result<(String, i32), Status> {
    if !ask.stream {
        let r = client.generate(request(ask)).await?.into_inner();
        return Ok((r.text, r.cache_level));
    }
    let mut stream = client.generate_stream(request(ask)).await?.into_inner();
    let (mut text, mut level, mut finished) = (String::new(), 0, false);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        text.push_str(&chunk.text);
        if chunk.finish_reason.is_some() {
            level = chunk.cache_level;
            finished = true;
        }
    }
    if !finished {
        return Err(Status::unknown("stream ended without a final chunk"));
    }
    Ok((text, level))
}

/// Sends `ask` until it succeeds, a non-retryable status comes, or [`MAX_ATTEMPTS`] ran out, with
/// exponential backoff between attempts. The statuses of failed attempts go to `errors`.
pub async fn ask_with_retry(
    client: &mut InferenceClient<Channel>,
    ask: &Ask,
    errors: &mut Vec<Status>,
) -> Result<Answer, (Status, u32)> {
    let mut backoff = INITIAL_BACKOFF;
    for n in 1..=MAX_ATTEMPTS {
        match attempt(client, ask).await {
            Ok((text, cache_level)) => {
                return Ok(Answer {
                    text,
                    cache_level,
                    attempts: n,
                })
            }
            Err(status) => {
                errors.push(status.clone());
                if !retryable(&status) || n == MAX_ATTEMPTS {
                    return Err((status, n));
                }
                // Full jitter would be kinder to a real fleet; a fixed ladder keeps runs alike.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    unreachable!("the loop returns on the last attempt")
}

/// A load run in progress: `concurrency` tasks share `asks` and one channel.
pub struct Load {
    pub done: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stats: Arc<Mutex<Stats>>,
}

impl Load {
    /// Starts sending `asks` through `channel`, `concurrency` at a time.
    pub fn start(channel: Channel, asks: Vec<Ask>, concurrency: usize) -> Self {
        let queue = Arc::new(Mutex::new(asks.into_iter()));
        let done = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Mutex::new(Stats::default()));
        let tasks = (0..concurrency)
            .map(|_| {
                let (queue, done, stats) = (queue.clone(), done.clone(), stats.clone());
                let mut client = InferenceClient::new(channel.clone());
                tokio::spawn(async move {
                    loop {
                        let Some(ask) = queue.lock().unwrap().next() else {
                            return;
                        };
                        let mut errors = vec![];
                        let result = ask_with_retry(&mut client, &ask, &mut errors).await;
                        if let Err((status, _)) = &result {
                            eprintln!("request {:?} failed: {status:?}", ask.prompt);
                        }
                        stats.lock().unwrap().add(&result, &errors);
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Self { done, tasks, stats }
    }

    /// Waits until `n` requests have finished (succeeded or failed).
    pub async fn wait_done(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.done.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "load stalled before {n} requests"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for every request; the counts.
    pub async fn finish(self) -> Stats {
        for task in self.tasks {
            task.await.expect("load task panicked");
        }
        Arc::try_unwrap(self.stats)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_default()
    }
}

/// `n` requests of a load phase named `phase`: two in three BYPASS with prompts of their own
/// (the model runs), one in three DEFAULT on a few hot questions (cache hits after the first);
/// one in four streamed.
pub fn asks(phase: &str, n: usize) -> Vec<Ask> {
    const HOT: [&str; 4] = [
        "What is the capital of France?",
        "Name a primary color.",
        "What is two plus two?",
        "Say hello.",
    ];
    (0..n)
        .map(|i| {
            let (prompt, policy) = if i % 3 == 0 {
                (
                    HOT[i / 3 % HOT.len()].to_string(),
                    proto::CachePolicy::Default,
                )
            } else {
                (
                    format!("Request {phase}-{i}: write one word about the sea."),
                    proto::CachePolicy::Bypass,
                )
            };
            Ask {
                prompt,
                policy,
                stream: i % 4 == 1,
                max_tokens: 4 + (i % 5) as u32,
            }
        })
        .collect()
}

/// `nginx` run on the test's own prefix directory, config and error log (never the system's).
fn nginx_command(dir: &Path) -> Command {
    let mut command = Command::new(nginx_binary());
    command.arg("-p").arg(format!("{}/", dir.display())).args([
        "-c",
        "nginx.conf",
        "-e",
        "error.log",
    ]);
    command
}
