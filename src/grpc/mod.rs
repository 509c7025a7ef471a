//! The gRPC front door: `qnode.v1.Inference`, `grpc.health.v1.Health` and server reflection
//! (v1 and v1alpha) on one listener, with the optional API key, message size limits, deadlines
//! and graceful shutdown. Wire translation only: checking, admission and the call loop are
//! [`crate::front`]'s.
//!
//! # Layout
//! - [`proto`]: generated wire types and the descriptor set for reflection.
//! - `convert`: wire ⇄ neutral request and results.
//! - `status`: [`FrontError`](crate::front::FrontError) → `tonic::Status`, the only place codes
//!   are chosen.
//! - `inference`: the service; unary collects, streaming forwards on a bounded channel.
//! - `admin`: the Admin service (node lifecycle, models at run time, warm-up).
//! - `health`: follows the node's readiness.
//! - `auth`: the front's bearer-key check as an interceptor. `deadline`: `grpc-timeout`
//!   (a malformed one refused), and Admin calls held to it.
//! - `codec`: prost with malformed requests as INVALID_ARGUMENT, counted like other refusals.
//! - `transport`: the HTTP/2 server loop (ours, not tonic's `Server`, whose timeout layer raced
//!   our deadlines).

mod admin;
mod auth;
mod codec;
mod convert;
mod deadline;
mod health;
mod inference;
mod metadata;
pub mod proto;
mod status;
mod transport;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proto::health::health_check_response::ServingStatus;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Routes;

use crate::config::{Config, Limits};
use crate::engine::Backend;
use crate::front::{ApiKeyCheck, Front};
use crate::metrics::Metrics;
use crate::node::{ModelControl, Node};

/// What `run` needs, taken from [`Config`] plus the node's metrics.
#[derive(Clone)]
pub struct ServerConfig {
    /// Bearer key for Inference calls; `None` (and no `api_keys`) leaves them open. Never logged.
    pub api_key: Option<String>,
    /// More Inference keys, some bound to a tenant. Never logged.
    pub api_keys: crate::config::ApiKeys,
    /// Bearer key for Admin calls; `None` leaves them open. Never logged.
    pub admin_api_key: Option<String>,
    /// How long in-flight calls may run after shutdown begins.
    pub drain_timeout: Duration,
    /// Largest message decoded or encoded by the Inference service, in bytes.
    pub max_message_bytes: usize,
    /// Per-request limits checked by [`crate::front::validate::validate`].
    pub limits: Limits,
    /// Where the server's counters and histograms go.
    pub metrics: Metrics,
    /// How often health re-reads the backend's model states.
    pub health_poll: Duration,
}

impl ServerConfig {
    /// The server's part of the node configuration.
    pub fn new(config: &Config, metrics: Metrics) -> Self {
        Self {
            api_key: config.server.api_key.clone(),
            api_keys: config.server.api_keys.clone(),
            admin_api_key: config
                .server
                .admin_api_key
                .clone()
                .or_else(|| config.server.api_key.clone()),
            drain_timeout: config.server.drain_timeout,
            max_message_bytes: config.server.max_message_bytes,
            limits: config.limits.clone(),
            metrics,
            health_poll: HEALTH_POLL,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("api_keys", &self.api_keys)
            .field(
                "admin_api_key",
                &self.admin_api_key.as_ref().map(|_| "<set>"),
            )
            .field("drain_timeout", &self.drain_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("limits", &self.limits)
            .field("health_poll", &self.health_poll)
            .finish_non_exhaustive()
    }
}

/// How often gRPC health re-reads the models' states by default.
pub const HEALTH_POLL: Duration = Duration::from_millis(250);

/// Why the server stopped other than by a clean drain.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The reflection service could not be built from the descriptor sets.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// Calls were still running when the drain timeout ran out; they were cut.
    #[error("{in_flight} call(s) still running after the drain timeout of {drain_timeout:?}; cut")]
    DrainTimedOut {
        /// Calls cut.
        in_flight: usize,
        /// The configured drain timeout.
        drain_timeout: Duration,
    },
}

/// What the server serves: the generations, the node's lifecycle, and (for the Admin service's
/// model calls) the node's models.
#[derive(Clone)]
pub struct Services {
    /// Where generations go.
    pub backend: Arc<dyn Backend>,
    /// The node's lifecycle; gates every generation call.
    pub node: Arc<Node>,
    /// LoadModel, UnloadModel and Warmup; `None` answers them UNIMPLEMENTED.
    pub models: Option<Arc<dyn ModelControl>>,
}

impl Services {
    /// A ready node serving `backend`, with no model control (tests, benches).
    pub fn ready(backend: Arc<dyn Backend>, metrics: &Metrics) -> Self {
        Self {
            backend,
            node: Node::ready(metrics),
            models: None,
        }
    }
}

/// Serves on `listener` until `shutdown` resolves or `Admin.Drain` is called, then drains.
///
/// Draining: the node refuses new calls, health turns NOT_SERVING, the listener closes and every
/// connection gets GOAWAY; in-flight calls (streams included, and other fronts' calls) finish, then
/// `run` returns `Ok`. Whatever still runs after
/// `drain_timeout` is cut (UNAVAILABLE to the client, generation cancelled) and `run` returns
/// [`ServerError::DrainTimedOut`].
pub async fn run(
    listener: TcpListener,
    services: Services,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let Services {
        backend,
        node,
        models,
    } = services;
    let front = Front::new(
        backend,
        Arc::clone(&node),
        config.limits.clone(),
        config.metrics.clone(),
    );

    let (reporter, health_service) = health::service();
    let follower = tokio::spawn(health::follow(
        reporter.clone(),
        front.clone(),
        config.health_poll,
    ));

    // Both reflection versions list every service, both reflection services included, whichever
    // version a client speaks (grpcurl 1.8 speaks v1alpha only).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let admin = proto::admin_server::AdminServer::new(admin::AdminService {
        front: front.clone(),
        models,
    });
    let admin = metadata::MetadataLimit::new(
        deadline::AdminDeadline::new(InterceptedService::new(
            admin,
            auth::GrpcAuth(ApiKeyCheck::new(config.admin_api_key.as_deref())),
        )),
        config.metrics.clone(),
    );
    let inference =
        proto::inference_server::InferenceServer::new(inference::InferenceService { front })
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes);
    let inference = metadata::MetadataLimit::new(
        codec::CountMalformed::new(
            InterceptedService::new(
                inference,
                auth::GrpcAuth(ApiKeyCheck::with_keys(
                    config.api_key.as_deref(),
                    &config.api_keys,
                )),
            ),
            config.metrics.clone(),
        ),
        config.metrics.clone(),
    );

    // Draining closes the listener at once: a balancer then gets "connection refused" and tries
    // another node itself (nginx's `grpc_next_upstream error`), where an open listener answering
    // UNAVAILABLE instantly would attract a least-connections balancer's traffic for the whole
    // drain (measured in tests/fleet.rs). The graceful shutdown sends GOAWAY on every
    // connection and lets the calls in flight finish.
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "gRPC listening");
    }
    let (incoming, listener_closed) = accept_until_drain(listener, Arc::clone(&node));
    let (drain_started, drain_started_rx) = oneshot::channel::<()>();
    let signal = {
        let node = Arc::clone(&node);
        async move {
            tokio::select! {
                () = shutdown => {}
                () = node.drain_requested() => {}
            }
            node.drain();
            // The accept task drops the listener when it sees the drain: wait for it, so that
            // once this line is logged a new connection is refused (tests and operators read it).
            let _ = listener_closed.await;
            tracing::info!(in_flight = node.in_flight(), "draining: listener closed");
            follower.abort();
            let _ = follower.await;
            reporter.set_all(ServingStatus::NotServing);
            let _ = drain_started.send(());
            // Health `Watch` streams never end on their own and would hold their connections
            // open: dropping the statuses ends them.
            reporter.clear_all();
        }
    };

    let routes = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inference)
        .add_service(admin);
    let serve = transport::serve(routes, incoming, metadata::TRANSPORT_LIMIT, signal);

    let drain_timeout = config.drain_timeout;
    let hard_deadline = async {
        if drain_started_rx.await.is_err() {
            // The server stopped without a shutdown request: no drain to time.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::pin!(hard_deadline);

    // gRPC's connections closing is not enough: calls of other fronts count in the node too.
    let finished = async {
        serve.await;
        node.wait_idle().await;
        Ok::<(), ServerError>(())
    };
    tokio::pin!(finished);
    tokio::select! {
        finished = &mut finished => {
            finished?;
            tracing::info!("drained");
            Ok(())
        }
        () = &mut hard_deadline => {
            let in_flight = node.in_flight();
            tracing::warn!(in_flight, ?drain_timeout, "drain timeout: cutting calls still running");
            node.hard_stop();
            // Give the cut calls a moment to send their UNAVAILABLE and the connections to close.
            let _ = tokio::time::timeout(HARD_STOP_GRACE, &mut finished).await;
            Err(ServerError::DrainTimedOut {
                in_flight,
                drain_timeout,
            })
        }
    }
}

/// Accepts connections until draining starts, then drops the listener (and says so on the
/// returned receiver) so new connections are
/// refused at once (the server keeps its `incoming` until every connection has closed, and a
/// listener that is bound but no longer accepted from leaves clients hanging in the backlog).
fn accept_until_drain(
    listener: TcpListener,
    node: Arc<Node>,
) -> (
    ReceiverStream<std::io::Result<tokio::net::TcpStream>>,
    oneshot::Receiver<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let (closed_tx, closed_rx) = oneshot::channel();
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                () = node.drain_requested() => break,
                conn = listener.accept() => conn.map(|(stream, _)| stream),
            };
            if let Ok(stream) = &conn {
                // Small frames (one chunk per token, trailers) must not wait for Nagle / delayed
                // ACK: without TCP_NODELAY a 1-token stream took 44 ms instead of 17.
                let _ = stream.set_nodelay(true);
            }
            if tx.send(conn).await.is_err() {
                break;
            }
        }
        drop(listener);
        let _ = closed_tx.send(());
        // The stream stays open (pending) until the server drops it: the server must leave its
        // accept loop through the shutdown signal, which sets health first; a stream that ended
        // would make it drop that signal half-way.
        tx.closed().await;
    });
    (ReceiverStream::new(rx), closed_rx)
}

/// After the drain timeout, how long cut calls get to report UNAVAILABLE before `run` returns.
const HARD_STOP_GRACE: Duration = Duration::from_secs(1);
