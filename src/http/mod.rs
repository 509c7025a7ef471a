//! The OpenAI-compatible HTTP front (`--http-listen`), so chat gateways that speak the OpenAI API
//! use a node with no code of their own: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `GET /v1/models`, `GET /v1/models/{id}`, plus `GET /health` (liveness) and `GET /ready` (readiness).
//!
//! Wire translation only: the JSON body becomes the front's neutral
//! [`RawRequest`](crate::front::RawRequest), and [`Front::begin`] admits, checks and submits it
//! exactly as for gRPC; the same loops ([`crate::front::call`]) read the events and count the call
//! in the same metrics (`method` label `chat.completions` / `completions`).
//!
//! # Layout
//! - [`types`]: the JSON shapes. [`convert`]: request → neutral request, results → responses.
//! - [`error`]: [`FrontError`] → HTTP status and OpenAI error body, in one place.
//! - [`sse`]: streamed answers as server-sent events.
//!
//! Differences from OpenAI: a body without `temperature` samples at OpenAI's 1.0 (gRPC's default
//! is greedy); `n` must be 1 (a list of prompts gives one choice each);
//! `presence_penalty` and `frequency_penalty` must be 0; non-text content parts are dropped with
//! an [`WARNING_HEADER`] or refused (`openai.non_text_parts`);
//! `user` is logged, and is the session key when no `x-session-id` header is sent (the cache
//! tenant is the `x-qnode-tenant` header);
//! `x-qnode-timeout-ms` sets a deadline (504 when it passes); `x-request-id` may carry the
//! caller's id, and every answer carries it back.

pub mod convert;
pub mod error;
pub mod sse;
pub mod types;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Extension, Json, Router};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::config::{Config, Limits, NonTextParts};
use crate::engine::Backend;
use crate::front::ErrorKind;
use crate::front::{
    self, header_text, new_request_id, ApiKeyCheck, CallMeta, Front, FrontError, KeyTenant,
    RawRequest, ValidationError, SESSION_HEADER, TENANT_HEADER,
};
use crate::metrics::Metrics;
use crate::node::Node;
use crate::types::{echo, Completion};

use convert::Options;
use error::ApiError;
use types::{
    ChatChoice, ChatCompletion, GenerateBody, Model, ModelList, ResponseMessage, TextChoice,
    TextCompletion,
};

/// Header carrying the call's deadline in milliseconds from arrival (HTTP has no `grpc-timeout`).
pub const TIMEOUT_HEADER: &str = "x-qnode-timeout-ms";
/// Header carrying the request id, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Header saying what the node left out of a request it served (`dropped 1 non-text content
/// part(s): ...`); OpenAI's clients ignore unknown headers, gateways may log it.
pub const WARNING_HEADER: &str = "x-qnode-warning";

/// Events buffered between a stream's forwarding task and its HTTP body.
const STREAM_BUFFER: usize = 16;

/// What the HTTP front needs from the node's configuration.
#[derive(Clone)]
pub struct HttpConfig {
    /// `Authorization: Bearer` key for `/v1/*`; `None` (and no `api_keys`) leaves them open.
    /// Never logged.
    pub api_key: Option<String>,
    /// More keys, some bound to a tenant (the same as gRPC's). Never logged.
    pub api_keys: crate::config::ApiKeys,
    /// Per-request limits, the same the gRPC front checks.
    pub limits: Limits,
    /// The node's metrics, shared with the gRPC front.
    pub metrics: Metrics,
    /// Largest request body, in bytes (the gRPC front's message limit).
    pub max_body_bytes: usize,
    /// What a non-text content part of a chat message does (`openai.non_text_parts`).
    pub non_text_parts: NonTextParts,
}

impl HttpConfig {
    /// The HTTP front's part of the node configuration: the same key and limits as gRPC.
    pub fn new(config: &Config, metrics: Metrics) -> Self {
        Self {
            api_key: config.server.api_key.clone(),
            api_keys: config.server.api_keys.clone(),
            limits: config.limits.clone(),
            metrics,
            max_body_bytes: config.server.max_message_bytes,
            non_text_parts: config.openai.non_text_parts,
        }
    }
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("api_keys", &self.api_keys)
            .field("limits", &self.limits)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("non_text_parts", &self.non_text_parts)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct AppState {
    front: Front,
    auth: ApiKeyCheck,
    /// Unix seconds at start, the `created` of every model.
    started: u64,
    /// What a non-text content part of a chat message does.
    non_text_parts: NonTextParts,
}

impl AppState {
    /// A body that is not the JSON asked for (bad syntax, a wrong type, no JSON content type,
    /// over the size limit): refused, and counted as gRPC's malformed protobuf is, under model
    /// `-` (the body named none we could read).
    fn malformed(&self, kind: Kind, rejection: JsonRejection) -> Response {
        let error = ApiError::from(rejection);
        self.count_refusal(kind, "-", ErrorKind::InvalidArgument, &error.message);
        error.into_response()
    }

    /// A body that parsed but asks for something refused before submission (`n`: 2, `tools`, a
    /// batch too big, ...): counted under its model when served, else `-`.
    fn refused(&self, kind: Kind, model: &str, error: FrontError) -> Response {
        let served = self.front.models().iter().any(|m| m.id == model);
        let label = if served { model } else { "-" };
        self.count_refusal(kind, label, error.kind, &error.message);
        ApiError::from(error).into_response()
    }

    fn count_refusal(&self, kind: Kind, model: &str, error: ErrorKind, message: &str) {
        let code = error.label();
        self.front
            .metrics()
            .requests
            .with_label_values(&[model, kind.method(), code])
            .inc();
        tracing::info!(
            method = kind.method(),
            code,
            message,
            "refused a request body"
        );
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The routes, over `backend` and `node`.
pub fn router(backend: Arc<dyn Backend>, node: Arc<Node>, config: HttpConfig) -> Router {
    let state = AppState {
        front: Front::new(backend, node, config.limits, config.metrics),
        auth: ApiKeyCheck::with_keys(config.api_key.as_deref(), &config.api_keys),
        started: unix_now(),
        non_text_parts: config.non_text_parts,
    };
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        // A wildcard: ids may hold a `/` (`org/model`), as OpenAI's fine-tune ids do `:`.
        .route("/v1/models/{*id}", get(retrieve_model))
        .route_layer(middleware::from_fn_with_state(state.clone(), check_key));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(api)
        .fallback(|uri: Uri| async move { ApiError::no_route(uri.path()) })
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(state)
}

/// Serves the routes on `listener` until `shutdown` resolves. Draining needs nothing here: the
/// node refuses new calls (503) and `/ready` turns 503, while in-flight calls hold their
/// admission guards so the gRPC server's drain waits for them too.
pub async fn serve(
    listener: TcpListener,
    backend: Arc<dyn Backend>,
    node: Arc<Node>,
    config: HttpConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "OpenAI-compatible HTTP listening");
    }
    // Streamed tokens go out as written, not held back by Nagle's algorithm.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(backend, node, config))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The bearer-key check; the key's tenant goes on to the handler as a request extension.
async fn check_key(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match state.auth.check(header) {
        Ok(tenant) => {
            request.extensions_mut().insert(tenant);
            next.run(request).await
        }
        Err(e) => ApiError::from(FrontError::from(e)).into_response(),
    }
}

async fn health(State(state): State<AppState>) -> Response {
    let body = serde_json::json!({"status": "ok", "state": state.front.node().state().as_str()});
    (StatusCode::OK, Json(body)).into_response()
}

async fn ready(State(state): State<AppState>) -> Response {
    let readiness = state.front.readiness();
    let ready = readiness.serving();
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "unavailable" },
        "state": readiness.state.as_str(),
        "models_ready": readiness.models_ready,
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let data = state
        .front
        .models()
        .into_iter()
        .map(|m| Model {
            id: m.id,
            object: "model",
            created: state.started,
            owned_by: "qnode",
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}

/// `GET /v1/models/{id}`: one entry of the list, or a 404 `model_not_found` naming the ids
/// served (the id echoed capped).
async fn retrieve_model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let models = state.front.models();
    match models.iter().find(|m| m.id == id) {
        Some(m) => Json(Model {
            id: m.id.clone(),
            object: "model",
            created: state.started,
            owned_by: "qnode",
        })
        .into_response(),
        None => {
            let served: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
            let error = ValidationError::UnknownModel {
                model: id,
                served: served.join(", "),
            };
            ApiError::from(FrontError::from(error)).into_response()
        }
    }
}

async fn chat_completions(
    State(state): State<AppState>,
    key: Option<Extension<KeyTenant>>,
    headers: HeaderMap,
    body: Result<Json<GenerateBody>, JsonRejection>,
) -> Response {
    let key = key.map(|Extension(k)| k).unwrap_or_default();
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return state.malformed(Kind::Chat, rejection),
    };
    let model = body.model.clone();
    match convert::chat(body, state.non_text_parts) {
        Ok((wire, options)) => generate(state, key, headers, vec![wire], options, Kind::Chat).await,
        Err(e) => state.refused(Kind::Chat, &model, e),
    }
}

async fn completions(
    State(state): State<AppState>,
    key: Option<Extension<KeyTenant>>,
    headers: HeaderMap,
    body: Result<Json<GenerateBody>, JsonRejection>,
) -> Response {
    let key = key.map(|Extension(k)| k).unwrap_or_default();
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return state.malformed(Kind::Text, rejection),
    };
    let model = body.model.clone();
    match convert::completion(body) {
        Ok((wires, options)) => generate(state, key, headers, wires, options, Kind::Text).await,
        Err(e) => state.refused(Kind::Text, &model, e),
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn method(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completions",
            Kind::Text => "completions",
        }
    }

    fn id(self, request_id: &str) -> String {
        match self {
            Kind::Chat => format!("chatcmpl-{request_id}"),
            Kind::Text => format!("cmpl-{request_id}"),
        }
    }
}

/// Every value of header `name`, unchecked, for [`CallMeta`].
fn header_values(headers: &HeaderMap, name: &str) -> Option<String> {
    header_text(headers.get_all(name).iter().map(HeaderValue::as_bytes))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// The deadline from [`TIMEOUT_HEADER`]; a value that is not a whole number of milliseconds is a
/// 400 naming the header.
fn deadline(headers: &HeaderMap, arrival: Instant) -> Result<Option<Instant>, FrontError> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    let ms = value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            let given = String::from_utf8_lossy(value.as_bytes());
            FrontError::invalid(
                TIMEOUT_HEADER,
                format!(
                    "`{TIMEOUT_HEADER}` must be a whole number of milliseconds. Given: {:?}",
                    echo(&given)
                ),
            )
        })?;
    Ok(Some(arrival + Duration::from_millis(ms)))
}

/// An error of prompt `i` of a batch: says which prompt.
fn in_batch(mut error: FrontError, i: usize) -> FrontError {
    error.message = format!("prompt[{i}]: {}", error.message);
    if error.param.as_deref() == Some("prompt") {
        error.param = Some(format!("prompt[{i}]"));
    }
    error
}

/// `system_fingerprint` of a batch: its prompts' common source, else `qnode-mixed`.
fn batch_fingerprint<'a>(mut completions: impl Iterator<Item = &'a Completion>) -> &'static str {
    let first = completions
        .next()
        .map(|c| convert::fingerprint(c.source))
        .unwrap_or("qnode-model");
    if completions.all(|c| convert::fingerprint(c.source) == first) {
        first
    } else {
        "qnode-mixed"
    }
}

/// Translate the headers, [`Front::begin`] one call per request (admit, validate, submit: the
/// steps of the gRPC front, the same code), then answer whole or as a stream. `raws` holds one
/// request, or a batch of prompts (`/v1/completions`): all are submitted before any is awaited,
/// so the pool batches them, and each is one call in the metrics.
async fn generate(
    state: AppState,
    key: KeyTenant,
    headers: HeaderMap,
    raws: Vec<RawRequest>,
    options: Options,
    kind: Kind,
) -> Response {
    let arrival = Instant::now();
    let request_id = header_str(&headers, REQUEST_ID_HEADER)
        .map(str::to_owned)
        .unwrap_or_else(new_request_id);
    let meta = CallMeta {
        method: kind.method(),
        arrival,
        request_id: Some(request_id.clone()),
        tenant: header_values(&headers, TENANT_HEADER),
        key_tenant: key.0,
        session: header_values(&headers, SESSION_HEADER),
        deadline: deadline(&headers, arrival),
    };
    let model = raws.first().map(|r| r.model.clone()).unwrap_or_default();
    let batch = raws.len() > 1;
    let mut begun = Vec::with_capacity(raws.len());
    for (i, raw) in raws.into_iter().enumerate() {
        match state.front.begin(meta.clone(), raw).await {
            Ok(call) => begun.push(call),
            Err(mut e) => {
                if batch {
                    e = in_batch(e, i);
                    // Dropping their events cancels the prompts already submitted.
                    let sibling = FrontError::new(
                        ErrorKind::Cancelled,
                        "batch_refused",
                        format!("prompt[{i}] of the same batch was refused"),
                    );
                    for (call, _) in &begun {
                        call.refused(&sibling);
                    }
                }
                return with_request_id(ApiError::from(e).into_response(), &request_id);
            }
        }
    }
    if let (Some(user), Some((call, _))) = (&options.user, begun.first()) {
        tracing::info!(parent: call.span(), user = ?user, "OpenAI user");
    }
    let warning = (options.dropped_parts > 0).then(|| {
        format!(
            "dropped {} non-text content part(s): this node serves text models",
            options.dropped_parts
        )
    });
    if let (Some(warning), Some((call, _))) = (&warning, begun.first()) {
        tracing::info!(parent: call.span(), dropped = options.dropped_parts, "{warning}");
    }
    let id = kind.id(&request_id);
    let created = unix_now();
    let node = Arc::clone(state.front.node());
    let response = if options.stream {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let text = sse::TextStream {
            id,
            created,
            model,
            include_usage: options.include_usage,
            text_offset: 0,
        };
        match (kind, begun.len()) {
            (Kind::Chat, _) => {
                for (call, events) in begun {
                    let span = call.span().clone();
                    let spelling = sse::ChatStream {
                        id: text.id.clone(),
                        created,
                        model: text.model.clone(),
                        include_usage: options.include_usage,
                        sent_role: false,
                        tools: options.tools.then(Default::default),
                    };
                    let forward = front::forward(call, events, tx.clone(), node.clone(), spelling);
                    tokio::spawn(forward.instrument(span));
                }
            }
            (Kind::Text, 1) => {
                for (call, events) in begun {
                    let span = call.span().clone();
                    let forward =
                        front::forward(call, events, tx.clone(), node.clone(), text.clone());
                    tokio::spawn(forward.instrument(span));
                }
            }
            (Kind::Text, _) => {
                let mut prompts = Vec::with_capacity(begun.len());
                for (index, (call, events)) in begun.into_iter().enumerate() {
                    let (piece_tx, piece_rx) = mpsc::channel(STREAM_BUFFER);
                    let span = call.span().clone();
                    let spelling = sse::IndexedText {
                        text: text.clone(),
                        index: index as u32,
                    };
                    let forward = front::forward(call, events, piece_tx, node.clone(), spelling);
                    tokio::spawn(forward.instrument(span));
                    prompts.push(piece_rx);
                }
                tokio::spawn(sse::merge(text, prompts, tx));
            }
        }
        (
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(ReceiverStream::new(rx)),
        )
            .into_response()
    } else {
        let collected = begun.into_iter().map(|(mut call, events)| {
            let node = Arc::clone(&node);
            async move {
                let span = call.span().clone();
                front::collect(&mut call, events, &node)
                    .instrument(span)
                    .await
            }
        });
        // All run to their end (each is counted); the first failure answers for the batch.
        let mut answers = Vec::new();
        let mut failure = None;
        for (i, result) in futures::future::join_all(collected)
            .await
            .into_iter()
            .enumerate()
        {
            match result {
                Ok(answer) => answers.push(answer),
                Err(e) if failure.is_none() => {
                    failure = Some(if batch { in_batch(e, i) } else { e });
                }
                Err(_) => {}
            }
        }
        match (failure, kind) {
            (Some(e), _) => ApiError::from(e).into_response(),
            (None, Kind::Chat) => {
                let Some(answer) = answers.pop() else {
                    let e = FrontError::new(ErrorKind::Internal, "internal_error", "no answer");
                    return with_request_id(ApiError::from(e).into_response(), &request_id);
                };
                let finish = answer.completion.finish_reason;
                let (content, tool_calls, finish_reason) = if options.tools {
                    convert::answer(&answer.text, finish)
                } else {
                    (Some(answer.text), None, convert::finish_reason(finish))
                };
                Json(ChatCompletion {
                    id,
                    object: "chat.completion",
                    created,
                    model,
                    choices: vec![ChatChoice {
                        index: 0,
                        message: ResponseMessage {
                            role: "assistant",
                            content,
                            tool_calls,
                        },
                        finish_reason,
                        logprobs: options
                            .logprobs
                            .then(|| convert::chat_logprobs(&answer.logprobs)),
                    }],
                    usage: convert::usage(&answer.completion),
                    system_fingerprint: convert::fingerprint(answer.completion.source),
                })
                .into_response()
            }
            (None, Kind::Text) => {
                let usage = sse::summed_usage(answers.iter().map(|a| &a.completion));
                let system_fingerprint =
                    Some(batch_fingerprint(answers.iter().map(|a| &a.completion)));
                let choices = answers
                    .into_iter()
                    .enumerate()
                    .map(|(index, a)| TextChoice {
                        index: index as u32,
                        text: a.text,
                        finish_reason: Some(convert::finish_reason(a.completion.finish_reason)),
                        logprobs: options
                            .logprobs
                            .then(|| convert::text_logprobs(&a.logprobs, &mut 0)),
                    })
                    .collect();
                Json(TextCompletion {
                    id,
                    object: "text_completion",
                    created,
                    model,
                    choices,
                    usage: Some(usage),
                    system_fingerprint,
                })
                .into_response()
            }
        }
    };
    let mut response = with_request_id(response, &request_id);
    if let Some(value) = warning.and_then(|w| HeaderValue::from_str(&w).ok()) {
        response.headers_mut().insert(WARNING_HEADER, value);
    }
    response
}

fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}
