//! The OpenAI-compatible HTTP front (`--http-listen`), so chat gateways that speak the OpenAI API
//! use a node with no code of their own: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `GET /v1/models`, plus `GET /health` (liveness) and `GET /ready` (readiness).
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
//! Differences from OpenAI: `n` must be 1; `presence_penalty` and `frequency_penalty` must be 0;
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
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::config::{Config, Limits};
use crate::engine::Backend;
use crate::front::{
    self, header_text, new_request_id, ApiKeyCheck, CallMeta, Front, FrontError, KeyTenant,
    RawRequest, SESSION_HEADER, TENANT_HEADER,
};
use crate::metrics::Metrics;
use crate::node::Node;
use crate::types::echo;

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
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct AppState {
    front: Front,
    auth: ApiKeyCheck,
    /// Unix seconds at start, the `created` of every model.
    started: u64,
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
    };
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
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
    axum::serve(listener, router(backend, node, config))
        .tcp_nodelay(true)
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

async fn chat_completions(
    State(state): State<AppState>,
    key: Option<Extension<KeyTenant>>,
    headers: HeaderMap,
    body: Result<Json<GenerateBody>, JsonRejection>,
) -> Response {
    let key = key.map(|Extension(k)| k).unwrap_or_default();
    converted_then_generate(state, key, headers, body, convert::chat, Kind::Chat).await
}

async fn completions(
    State(state): State<AppState>,
    key: Option<Extension<KeyTenant>>,
    headers: HeaderMap,
    body: Result<Json<GenerateBody>, JsonRejection>,
) -> Response {
    let key = key.map(|Extension(k)| k).unwrap_or_default();
    converted_then_generate(state, key, headers, body, convert::completion, Kind::Text).await
}

/// How one endpoint turns its body into the neutral request.
type Converter = fn(GenerateBody) -> Result<(RawRequest, Options), FrontError>;

/// Both generation endpoints: a JSON error or a conversion error answers at once, else generate.
async fn converted_then_generate(
    state: AppState,
    key: KeyTenant,
    headers: HeaderMap,
    body: Result<Json<GenerateBody>, JsonRejection>,
    convert: Converter,
    kind: Kind,
) -> Response {
    let converted = body
        .map_err(ApiError::from)
        .and_then(|Json(request)| convert(request).map_err(ApiError::from));
    match converted {
        Ok((wire, options)) => generate(state, key, headers, wire, options, kind).await,
        Err(e) => e.into_response(),
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

/// Translate the headers, [`Front::begin`] the call (admit, validate, submit: the steps of the
/// gRPC front, the same code), then answer whole or as a stream.
async fn generate(
    state: AppState,
    key: KeyTenant,
    headers: HeaderMap,
    raw: RawRequest,
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
    let model = raw.model.clone();
    let (mut call, events) = match state.front.begin(meta, raw) {
        Ok(begun) => begun,
        Err(e) => return with_request_id(ApiError::from(e).into_response(), &request_id),
    };
    let span = call.span().clone();
    if let Some(user) = &options.user {
        tracing::info!(parent: &span, user = ?user, "OpenAI user");
    }
    let id = kind.id(&request_id);
    let created = unix_now();
    let response = if options.stream {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let node = Arc::clone(state.front.node());
        match kind {
            Kind::Chat => {
                let spelling = sse::ChatStream {
                    id,
                    created,
                    model,
                    include_usage: options.include_usage,
                    sent_role: false,
                };
                tokio::spawn(front::forward(call, events, tx, node, spelling).instrument(span));
            }
            Kind::Text => {
                let spelling = sse::TextStream {
                    id,
                    created,
                    model,
                    include_usage: options.include_usage,
                };
                tokio::spawn(front::forward(call, events, tx, node, spelling).instrument(span));
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
        let result = front::collect(&mut call, events, state.front.node())
            .instrument(span)
            .await;
        match result {
            Err(e) => ApiError::from(e).into_response(),
            Ok((text, completion)) => match kind {
                Kind::Chat => Json(ChatCompletion {
                    id,
                    object: "chat.completion",
                    created,
                    model,
                    choices: vec![ChatChoice {
                        index: 0,
                        message: ResponseMessage {
                            role: "assistant",
                            content: text,
                        },
                        finish_reason: convert::finish_reason(completion.finish_reason),
                    }],
                    usage: convert::usage(&completion),
                    system_fingerprint: convert::fingerprint(completion.source),
                })
                .into_response(),
                Kind::Text => Json(TextCompletion {
                    id,
                    object: "text_completion",
                    created,
                    model,
                    choices: vec![TextChoice {
                        index: 0,
                        text,
                        finish_reason: Some(convert::finish_reason(completion.finish_reason)),
                        logprobs: None,
                    }],
                    usage: Some(convert::usage(&completion)),
                })
                .into_response(),
            },
        }
    };
    with_request_id(response, &request_id)
}

fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}
