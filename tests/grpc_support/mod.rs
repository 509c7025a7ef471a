//! Shared by the `grpc_*` tests: a real server on port 0 over [`ScriptedBackend`].
//!
//! `ScriptedBackend` is a deterministic stand-in for the pool, used ONLY to test server behaviour
//! (validation, status mapping, streaming, cancellation, deadlines, shutdown, auth). What it does
//! is chosen by the prompt text:
//! - `queue_full` / `overflow` / `not_ready` / `internal` → that `EngineError` at submit;
//! - `fail_midway` → one delta then an `Internal` error event;
//! - `hang` → one delta, then nothing until the receiver is dropped;
//! - `gated` → one delta, then waits for [`ScriptedBackend::open_gate`], then finishes;
//! - anything else → deltas `Hel`, `lo`, `!` (fewer if `max_tokens` < 3), then `Finished`.
//!
//! Every generation task counts how it ended (`finished`, `cancelled`), on watch channels so
//! tests wait for a count instead of sleeping.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qnode::app::{App, AppError, Generator, Listeners};
use qnode::config::Config;
use qnode::engine::{
    Backend, Completion, EngineError, EventStream, FinishReason, GenerationEvent,
    GenerationRequest, ModelInfo, ModelState, PromptInput, Source, Timings,
};
use qnode::grpc::proto;
use qnode::metrics::Metrics;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// An inference client whose transport leaves deadlines to the server.
pub type RawClient = proto::inference_client::InferenceClient<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tonic::body::Body,
    >,
>;

/// An inference client for the gRPC server at `url` (`http://host:port`) that only sends a
/// request's `grpc-timeout` and leaves the deadline to the server (see
/// [`TestServer::client_without_local_timeout`]).
pub fn raw_client(url: &str) -> RawClient {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.enforce_http(true);
    let transport =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(connector);
    proto::inference_client::InferenceClient::with_origin(
        transport,
        url.parse().expect("server url"),
    )
}

/// Deterministic test backend; see the module docs.
pub struct ScriptedBackend {
    ready: Mutex<bool>,
    gate: watch::Sender<bool>,
    finished: watch::Sender<usize>,
    cancelled: watch::Sender<usize>,
    /// Every request the server submitted, in order.
    pub submitted: Mutex<Vec<GenerationRequest>>,
}

impl ScriptedBackend {
    /// Serves model `smollm2`, Ready when `ready`.
    pub fn new(ready: bool) -> Arc<Self> {
        Arc::new(Self {
            ready: Mutex::new(ready),
            gate: watch::channel(false).0,
            finished: watch::channel(0).0,
            cancelled: watch::channel(0).0,
            submitted: Mutex::new(Vec::new()),
        })
    }

    pub fn set_ready(&self) {
        *self.ready.lock().unwrap() = true;
    }

    /// Lets every `gated` generation finish.
    pub fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    pub fn cancelled(&self) -> usize {
        *self.cancelled.borrow()
    }

    pub fn finished(&self) -> usize {
        *self.finished.borrow()
    }

    /// Waits until `n` generations saw their receiver dropped.
    pub async fn wait_cancelled(&self, n: usize) {
        let mut rx = self.cancelled.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c >= n))
            .await
            .expect("backend saw no cancellation within 10 s")
            .unwrap();
    }

    /// Waits until `n` submissions reached the backend.
    pub async fn wait_submitted(&self, n: usize) {
        for _ in 0..1000 {
            if self.submitted.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} submissions within 10 s");
    }

    pub fn last_submitted(&self) -> GenerationRequest {
        self.submitted
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a submission")
    }
}

fn completion(finish_reason: FinishReason, completion_tokens: u32) -> Completion {
    Completion {
        finish_reason,
        prompt_tokens: 5,
        completion_tokens,
        cached_prompt_tokens: 0,
        timings: Timings {
            queue: Duration::from_micros(1500),
            time_to_first_token: Duration::from_millis(20),
            total: Duration::from_millis(40),
        },
        source: Source::Model,
    }
}

#[async_trait::async_trait]
impl Backend for ScriptedBackend {
    fn models(&self) -> Vec<ModelInfo> {
        let ready = *self.ready.lock().unwrap();
        vec![ModelInfo {
            id: "smollm2".into(),
            architecture: "llama".into(),
            quant: "q8_0".into(),
            context_length: 8192,
            instances: 1,
            state: if ready {
                ModelState::Ready
            } else {
                ModelState::Loading
            },
            // As Qwen3's template: `chat_template_kwargs` reach the backend checked.
            template_options: vec!["enable_thinking".into()],
        }]
    }

    async fn submit(&self, request: GenerationRequest) -> Result<EventStream, EngineError> {
        self.submitted.lock().unwrap().push(request.clone());
        let script = match &request.input {
            PromptInput::Text(t) => t.clone(),
            PromptInput::Chat(m) => m.last().map(|m| m.content.clone()).unwrap_or_default(),
        };
        match script.as_str() {
            "queue_full" => {
                return Err(EngineError::QueueFull {
                    model: request.model,
                    max_queued: 64,
                    retry_after: Duration::from_millis(2500),
                })
            }
            "overflow" => {
                return Err(EngineError::ContextOverflow {
                    prompt_tokens: 8000,
                    max_tokens: request.max_tokens as usize,
                    context_length: 8192,
                })
            }
            "not_ready" => return Err(EngineError::NotReady(request.model)),
            "internal" => return Err(EngineError::Internal("scripted failure".into())),
            _ => {}
        }
        let (tx, rx) = mpsc::channel(4);
        let mut gate = self.gate.subscribe();
        let finished = self.finished.clone();
        let cancelled = self.cancelled.clone();
        tokio::spawn(async move {
            let ended = async {
                match script.as_str() {
                    "hang" => {
                        tx.send(Ok(GenerationEvent::Delta("tick".into())))
                            .await
                            .map_err(drop)?;
                        tx.closed().await;
                        return Err(());
                    }
                    "gated" => {
                        tx.send(Ok(GenerationEvent::Delta("before ".into())))
                            .await
                            .map_err(drop)?;
                        tokio::select! {
                            _ = gate.wait_for(|open| *open) => {}
                            () = tx.closed() => return Err(()),
                        }
                        tx.send(Ok(GenerationEvent::Delta("after".into())))
                            .await
                            .map_err(drop)?;
                        tx.send(Ok(GenerationEvent::Finished(completion(
                            FinishReason::Stop,
                            2,
                        ))))
                        .await
                        .map_err(drop)?;
                    }
                    "tool_call" => {
                        // What a request with tools generates: the tool format, in pieces.
                        for piece in [
                            r#"{"tool_call": {"name": "f", "#,
                            r#""arguments": {"a": "#,
                            "1}}}",
                        ] {
                            tx.send(Ok(GenerationEvent::Delta(piece.into())))
                                .await
                                .map_err(drop)?;
                        }
                        tx.send(Ok(GenerationEvent::Finished(completion(
                            FinishReason::Stop,
                            3,
                        ))))
                        .await
                        .map_err(drop)?;
                    }
                    "fail_midway" => {
                        tx.send(Ok(GenerationEvent::Delta("par".into())))
                            .await
                            .map_err(drop)?;
                        tx.send(Err(EngineError::Internal("scripted failure".into())))
                            .await
                            .map_err(drop)?;
                    }
                    _ => {
                        let n = request.max_tokens.min(3);
                        for piece in ["Hel", "lo", "!"].iter().take(n as usize) {
                            tx.send(Ok(GenerationEvent::Delta((*piece).into())))
                                .await
                                .map_err(drop)?;
                        }
                        let reason = if n < 3 {
                            FinishReason::Length
                        } else {
                            FinishReason::Stop
                        };
                        tx.send(Ok(GenerationEvent::Finished(completion(reason, n))))
                            .await
                            .map_err(drop)?;
                    }
                }
                Ok::<(), ()>(())
            }
            .await;
            match ended {
                Ok(()) => finished.send_modify(|n| *n += 1),
                Err(()) => cancelled.send_modify(|n| *n += 1),
            }
        });
        Ok(rx)
    }
}

/// A running server: its address, the way to stop it, and its result.
pub struct TestServer {
    pub addr: SocketAddr,
    pub backend: Arc<ScriptedBackend>,
    pub metrics: Metrics,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), AppError>>>,
}

/// The node config tests start from: the defaults.
pub fn test_config() -> Config {
    Config::default()
}

impl TestServer {
    /// Starts the node on 127.0.0.1:0 with a Ready backend and default config.
    pub async fn start() -> Self {
        Self::start_with(ScriptedBackend::new(true), test_config()).await
    }

    /// Starts the node built by the composition root (`qnode::app`, as `qnode serve` does) from
    /// `config`, over `backend` with no answer cache in between, health polled every 10 ms.
    pub async fn start_with(backend: Arc<ScriptedBackend>, config: Config) -> Self {
        let listeners = Listeners::local(false, false).await.unwrap();
        let (addr, _, _) = listeners.addrs();
        let app = App::new(
            config,
            Generator::Uncached(Arc::clone(&backend) as Arc<dyn Backend>),
        )
        .expect("the test node builds")
        .with_health_poll(Duration::from_millis(10));
        let metrics = app.metrics().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.serve(listeners, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            backend,
            metrics,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connect to test server")
    }

    pub async fn client(
        &self,
    ) -> proto::inference_client::InferenceClient<tonic::transport::Channel> {
        proto::inference_client::InferenceClient::new(self.channel().await)
    }

    /// A client over plain hyper HTTP/2. tonic's `Channel` enforces a request's `grpc-timeout`
    /// on the client side too, and its timer starts before the server's, so a deadline test
    /// through it races the client against the server. This transport only sends the header:
    /// what the test sees is what the server did.
    pub fn client_without_local_timeout(&self) -> RawClient {
        raw_client(&self.url())
    }

    /// Sends the shutdown signal (SIGTERM in production).
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// The result `run` returned.
    pub fn join(&mut self) -> impl Future<Output = Result<(), AppError>> {
        let handle = self.handle.take().expect("joined once");
        async move {
            tokio::time::timeout(Duration::from_secs(20), handle)
                .await
                .expect("server stopped within 20 s")
                .expect("server task did not panic")
        }
    }
}

/// A plain-text request for `smollm2`.
pub fn request(prompt: &str) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: "smollm2".into(),
        prompt: Some(prompt.into()),
        ..Default::default()
    }
}
