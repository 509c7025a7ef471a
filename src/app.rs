//! The composition root: the one place the whole node is wired — metrics, lifecycle, model
//! pool, answer cache, model control and both fronts — from one [`Config`]. `qnode serve` parses
//! its flags and calls [`run`]; tests and benches build the same [`App`] over a stand-in backend
//! ([`Generator::Backend`]) instead of re-wiring the node by hand.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use tokio::net::TcpListener;

use crate::cache::{CacheError, CachedBackend, ModelIdentity};
use crate::config::{Config, DeviceKind};
use crate::engine::Backend;
use crate::grpc::{self, ServerConfig, ServerError, Services};
use crate::http::HttpConfig;
use crate::metrics::Metrics;
use crate::model::ModelError;
use crate::node::{Node, NodeModels};
use crate::pool::metrics::PoolMetrics;
use crate::pool::ModelPool;

/// Why the node could not start, or stopped other than by a clean drain.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A configured model is missing or its device cannot be opened.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The cache configuration is refused.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A metric could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A listener could not be bound.
    #[error("listen: {0}")]
    Io(#[from] std::io::Error),
    /// The gRPC server failed, or the drain timed out and calls were cut.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The device named by `server.device` is not available in this build or machine.
    #[error("{0}")]
    Device(String),
}

/// What generates the answers.
pub enum Generator {
    /// The models of `config.models`, loaded and warmed in the background once serving starts;
    /// the node turns ready (or standby) when they are.
    Models,
    /// Any backend, ready at once, with no model control (Admin's model calls answer
    /// UNIMPLEMENTED). `identities` are the models whose answers the cache keeps.
    Backend {
        /// Where generations go.
        backend: Arc<dyn Backend>,
        /// Cache identities per model id (empty: nothing is cached).
        identities: HashMap<String, ModelIdentity>,
    },
    /// Any backend, ready at once, called by the fronts directly with no answer cache in between
    /// (tests of what the fronts hand to the backend).
    Uncached(Arc<dyn Backend>),
}

/// The sockets the node serves on. Bound before [`App::serve`] so a caller (a test at port 0)
/// knows the addresses first.
pub struct Listeners {
    /// gRPC: Inference, Admin, health, reflection.
    pub grpc: TcpListener,
    /// The OpenAI-compatible HTTP front, when configured.
    pub http: Option<TcpListener>,
    /// `/metrics`, when configured.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses `config.server` names.
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let s = &config.server;
        Ok(Self {
            grpc: TcpListener::bind(s.listen).await?,
            http: match s.http_listen {
                Some(addr) => Some(TcpListener::bind(addr).await?),
                None => None,
            },
            metrics: match s.metrics_listen {
                Some(addr) => Some(TcpListener::bind(addr).await?),
                None => None,
            },
        })
    }

    /// Free ports on 127.0.0.1 for gRPC, and for HTTP and `/metrics` when asked (tests).
    pub async fn local(http: bool, metrics: bool) -> std::io::Result<Self> {
        let any = || TcpListener::bind("127.0.0.1:0");
        Ok(Self {
            grpc: any().await?,
            http: if http { Some(any().await?) } else { None },
            metrics: if metrics { Some(any().await?) } else { None },
        })
    }

    /// The bound addresses: (gRPC, HTTP, metrics).
    pub fn addrs(&self) -> (SocketAddr, Option<SocketAddr>, Option<SocketAddr>) {
        let addr = |l: &TcpListener| l.local_addr().expect("a bound listener has an address");
        (
            addr(&self.grpc),
            self.http.as_ref().map(addr),
            self.metrics.as_ref().map(addr),
        )
    }
}

/// The node, built and not yet serving. Its parts are reachable for the caller (a test reads
/// the metrics, drains the node, looks at the pool) before and while it serves.
pub struct App {
    config: Config,
    metrics: Metrics,
    node: Arc<Node>,
    /// What the fronts call: the cache, or the bare backend for [`Generator::Uncached`].
    backend: Arc<dyn Backend>,
    cache: Option<Arc<CachedBackend>>,
    pool: Option<Arc<ModelPool>>,
    models: Option<Arc<NodeModels>>,
    health_poll: Duration,
}

impl App {
    /// Builds every part from `config`: nothing is loaded or bound yet (model files are
    /// resolved, so a missing one fails here).
    pub fn new(config: Config, generator: Generator) -> Result<Self, AppError> {
        let metrics = Metrics::new()?;
        let cached = |backend, identities| -> Result<_, AppError> {
            let cache = Arc::new(CachedBackend::new(
                backend,
                identities,
                config.cache.clone(),
            )?);
            cache.metrics().register(metrics.registry())?;
            Ok(cache)
        };
        // `backend` is what the fronts call: the cache over the generator, or the bare backend.
        let (node, backend, cache, pool, models) = match generator {
            Generator::Models => {
                // Created first so `uptime` and `warm_after` count from process start.
                let node = Node::new(config.server.role, &metrics);
                let device = device(config.server.device)?;
                let pool_metrics = PoolMetrics::register(metrics.registry())?;
                let pool = Arc::new(ModelPool::new_in(
                    &config.server.models_dir,
                    &config.models,
                    pool_metrics,
                    device,
                )?);
                let cache = cached(Arc::clone(&pool) as Arc<dyn Backend>, HashMap::new())?;
                let models = NodeModels::with_overrides(
                    Arc::clone(&pool),
                    Arc::clone(&cache),
                    node.clone(),
                    config.model_overrides.clone(),
                );
                (
                    node,
                    cache.clone() as Arc<dyn Backend>,
                    Some(cache),
                    Some(pool),
                    Some(models),
                )
            }
            Generator::Backend {
                backend,
                identities,
            } => {
                let node = Node::ready(&metrics);
                let cache = cached(backend, identities)?;
                (
                    node,
                    cache.clone() as Arc<dyn Backend>,
                    Some(cache),
                    None,
                    None,
                )
            }
            Generator::Uncached(backend) => (Node::ready(&metrics), backend, None, None, None),
        };
        Ok(Self {
            config,
            metrics,
            node,
            backend,
            cache,
            pool,
            models,
            health_poll: grpc::HEALTH_POLL,
        })
    }

    /// How often gRPC health re-reads the models' states (tests poll faster).
    pub fn with_health_poll(mut self, every: Duration) -> Self {
        self.health_poll = every;
        self
    }

    /// The node's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The node's metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The node's lifecycle.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The answer cache over the generator (`None` for [`Generator::Uncached`]).
    pub fn cache(&self) -> Option<&Arc<CachedBackend>> {
        self.cache.as_ref()
    }

    /// The model pool, when the generator is [`Generator::Models`].
    pub fn pool(&self) -> Option<&Arc<ModelPool>> {
        self.pool.as_ref()
    }

    /// Serves until `shutdown` resolves (SIGTERM/SIGINT in `qnode serve`) or `Admin.Drain`,
    /// then drains: see [`grpc::run`]. Models load in the background meanwhile; once every
    /// call is done the instances stop.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AppError> {
        let Self {
            config,
            metrics,
            node,
            backend,
            pool,
            models,
            health_poll,
            ..
        } = self;
        if let Some(listener) = listeners.metrics {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "metrics listening on /metrics");
            }
            tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
                std::future::pending(),
            ));
        }
        if let Some(models) = &models {
            let models = Arc::clone(models);
            let hot_answers = config.cache.prewarm_top_k;
            tokio::spawn(async move { models.start(hot_answers).await });
        }
        let http = listeners.http.map(|listener| {
            let drained = {
                let node = Arc::clone(&node);
                async move { node.drain_requested().await }
            };
            tokio::spawn(crate::http::serve(
                listener,
                Arc::clone(&backend),
                Arc::clone(&node),
                HttpConfig::new(&config, metrics.clone()),
                drained,
            ))
        });
        let drain_timeout = config.server.drain_timeout;
        let mut server_config = ServerConfig::new(&config, metrics);
        server_config.health_poll = health_poll;
        let services = Services {
            backend,
            node,
            models: models.map(|m| m as Arc<dyn crate::node::ModelControl>),
        };
        let served = grpc::run(listeners.grpc, services, server_config, shutdown).await;
        // An HTTP call leaves the node's count once its last event is queued for the response
        // body, so the node can be idle while SSE bodies are still being written: let the HTTP
        // server finish its graceful shutdown (each connection closes once its response is out)
        // before the process exits, or a stream loses its tail (tests/signals.rs saw it).
        if let (Ok(()), Some(http)) = (&served, http) {
            let _ = tokio::time::timeout(drain_timeout, http).await;
        }
        // In-flight calls are done (or cut); let the instances finish their batch and exit.
        if let Some(pool) = pool {
            let _ = tokio::task::spawn_blocking(move || pool.shutdown()).await;
        }
        Ok(served?)
    }
}

/// Builds the node from `config` with its models and serves on `listeners` until `shutdown`
/// (then drains). What `qnode serve` runs.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    App::new(config, Generator::Models)?
        .serve(listeners, shutdown)
        .await
}

/// The candle device for `kind`; CUDA needs a build with `--features cuda`.
fn device(kind: DeviceKind) -> Result<Device, AppError> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Device::new_cuda(0).map_err(|e| AppError::Device(e.to_string())),
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => Err(AppError::Device(
            "`--device cuda` needs a qnode built with `cargo build --release --features cuda`; this build is CPU only".into(),
        )),
    }
}
