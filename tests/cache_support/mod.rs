//! Shared by the cache tests: a real `redis-server` on a free port, and a small deterministic
//! backend that stands in for the model and counts its generations.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qnode::cache::{CacheConfig, CachedBackend, ModelIdentity};
use qnode::engine::{
    Backend, CachePolicy, Completion, EngineError, EventStream, FinishReason, GenerationEvent,
    GenerationRequest, ModelInfo, ModelState, PromptInput, SamplingParams, Source, Timings,
};
use tokio::sync::mpsc;

pub const MODEL: &str = "tiny";

/// The fleet secret every test cache signs its Redis values with.
pub static SECRET: std::sync::LazyLock<qnode::cache::Secret> =
    std::sync::LazyLock::new(|| qnode::cache::Secret::new("test-fleet-secret-0123456789"));

/// A real Redis server owned by the test; killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    /// Starts `redis-server` on a free port, without persistence.
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        Self::start_on(port)
    }

    /// Starts it on `port` (to come back where a killed one was).
    pub fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): the cache tests need a real Redis; \
                     `bash scripts/test.sh` installs it (or `apt-get install -y redis-server`)"
                )
            });
        let server = Self {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = server.client().get_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return server;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not come up on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("url")
    }

    /// A synchronous connection for inspecting what the cache wrote.
    pub fn conn(&self) -> redis::Connection {
        self.client()
            .get_connection_with_timeout(Duration::from_secs(2))
            .expect("connect to test redis")
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the socket stays open, nothing answers.
    pub fn pause(&self) {
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(self.pid(), libc::SIGSTOP) }, 0);
    }

    /// SIGCONT.
    pub fn resume(&self) {
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(self.pid(), libc::SIGCONT) }, 0);
    }

    /// Keys matching `pattern`.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        redis::cmd("KEYS")
            .arg(pattern)
            .query(&mut self.conn())
            .expect("KEYS")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = unsafe { libc::kill(self.pid(), libc::SIGCONT) };
        }
        self.kill();
    }
}

/// Stands in for the model: answers are a pure function of the request, plus the number of the
/// generation, so a test can tell a fresh answer (new number) from a cached one (old number).
///
/// Prompts steer it: `fail` → an error event; `cancel` → `Finished(Cancelled)`; `big:N` → an
/// answer of N bytes; `queue_full` → refused at submit (QueueFull, retry after 1 s), uncounted. Each chunk waits `delay` so concurrent requests overlap.
pub struct CountingBackend {
    pub generations: AtomicUsize,
    pub cancelled: Arc<AtomicUsize>,
    pub delay: Duration,
}

impl CountingBackend {
    pub fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            generations: AtomicUsize::new(0),
            cancelled: Arc::new(AtomicUsize::new(0)),
            delay,
        })
    }

    pub fn count(&self) -> usize {
        self.generations.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Backend for CountingBackend {
    fn models(&self) -> Vec<ModelInfo> {
        vec![ModelInfo {
            id: MODEL.into(),
            architecture: "llama".into(),
            quant: "q8_0".into(),
            context_length: 2048,
            instances: 1,
            state: ModelState::Ready,
            template_options: Vec::new(),
        }]
    }

    async fn submit(&self, request: GenerationRequest) -> Result<EventStream, EngineError> {
        if request.model != MODEL {
            return Err(EngineError::UnknownModel(request.model));
        }
        if matches!(&request.input, PromptInput::Chat(m) if m.iter().any(|m| m.content == "queue_full"))
        {
            return Err(EngineError::QueueFull {
                model: request.model,
                max_queued: 0,
                retry_after: Duration::from_secs(1),
            });
        }
        let n = self.generations.fetch_add(1, Ordering::SeqCst) + 1;
        let prompt = match &request.input {
            PromptInput::Text(t) => t.clone(),
            PromptInput::Chat(m) => m.iter().map(|m| m.content.as_str()).collect(),
        };
        let (tx, rx) = mpsc::channel(4);
        let delay = self.delay;
        let cancelled = self.cancelled.clone();
        tokio::spawn(async move {
            let text = if let Some(size) = prompt.strip_prefix("big:") {
                "x".repeat(size.parse().unwrap_or(0))
            } else {
                format!(
                    "answer #{n} to «{prompt}» (t={}, seed={:?}) — héllo wörld 😀 日本語",
                    request.sampling.temperature, request.sampling.seed
                )
            };
            let pieces: Vec<String> = if prompt.starts_with("big:") {
                text.as_bytes()
                    .chunks(64 * 1024)
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect()
            } else {
                text.split_inclusive(' ').map(str::to_string).collect()
            };
            for piece in pieces {
                tokio::time::sleep(delay).await;
                if tx.send(Ok(GenerationEvent::Delta(piece))).await.is_err() {
                    cancelled.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
            if prompt == "fail" {
                let _ = tx
                    .send(Err(EngineError::Internal("forward pass failed".into())))
                    .await;
                return;
            }
            let finish_reason = if prompt == "cancel" {
                FinishReason::Cancelled
            } else {
                FinishReason::Stop
            };
            let _ = tx
                .send(Ok(GenerationEvent::Finished(Completion {
                    finish_reason,
                    prompt_tokens: prompt.len() as u32,
                    completion_tokens: 7,
                    cached_prompt_tokens: 0,
                    timings: Timings::default(),
                    source: Source::Model,
                })))
                .await;
        });
        Ok(rx)
    }
}

pub fn identities() -> HashMap<String, ModelIdentity> {
    identities_with_digest("digest-1")
}

pub fn identities_with_digest(digest: &str) -> HashMap<String, ModelIdentity> {
    HashMap::from([(
        MODEL.to_string(),
        ModelIdentity {
            model_id: MODEL.into(),
            file_digest: digest.into(),
            quant: "q8_0".into(),
            template_id: "chatml".into(),
        },
    )])
}

pub fn config(redis: Option<&RedisServer>) -> CacheConfig {
    CacheConfig {
        redis_url: redis.map(RedisServer::url),
        redis_secret: Some(SECRET.clone()),
        hot_threshold: 1,
        chunk_chars: 3,
        // Generous for a loaded 2-core CI box; the fail-open tests lower it.
        redis_timeout: Duration::from_millis(500),
        ..CacheConfig::default()
    }
}

pub fn request(prompt: &str) -> GenerationRequest {
    GenerationRequest {
        request_id: "t".into(),
        model: MODEL.into(),
        input: PromptInput::Text(prompt.into()),
        sampling: SamplingParams::default(),
        max_tokens: 32,
        stop: vec![],
        deadline: None,
        cache_policy: CachePolicy::Default,
        tenant: None,
        session: None,
        constraint: None,
        logprobs: None,
        chat_template_kwargs: Default::default(),
        tools: None,
    }
}

/// Everything a stream sent: the text, the `Finished` (if any), the error (if any), the deltas.
#[derive(Debug)]
pub struct Collected {
    pub text: String,
    pub deltas: Vec<String>,
    pub finished: Option<Completion>,
    pub error: Option<EngineError>,
}

pub async fn collect(mut stream: EventStream) -> Collected {
    let mut out = Collected {
        text: String::new(),
        deltas: vec![],
        finished: None,
        error: None,
    };
    while let Some(event) = stream.recv().await {
        match event {
            Ok(GenerationEvent::Delta(d)) => {
                out.text.push_str(&d);
                out.deltas.push(d);
            }
            Ok(GenerationEvent::Finished(c)) => out.finished = Some(c),
            Ok(GenerationEvent::Logprobs(_)) => {}
            Err(e) => out.error = Some(e),
        }
    }
    out
}

/// Submits and collects; panics on a refusal. Returns once the cache's background work for the
/// request (the Redis write) is done too, so the test can look at Redis.
pub async fn ask(cache: &CachedBackend, req: GenerationRequest) -> Collected {
    let out = collect(cache.submit(req).await.expect("submit")).await;
    settle(cache).await;
    out
}

/// Waits (up to 5 s) until the cache has no generation or fill in progress.
pub async fn settle(cache: &CachedBackend) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.in_flight() > 0 {
        assert!(Instant::now() < deadline, "cache still busy");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub fn source(c: &Collected) -> Source {
    c.finished.as_ref().expect("finished").source
}
