//! `qnode serve`: load the models, serve gRPC (and /metrics), drain on SIGTERM/SIGINT.

use std::process::ExitCode;
use std::sync::Arc;

use candle_core::Device;
use qnode::cache::{CachedBackend, ModelIdentity};
use qnode::config::{Config, LogFormat, ServeArgs};
use qnode::engine::Backend;
use qnode::metrics::Metrics;
use qnode::node::Node;
use qnode::pool::metrics::PoolMetrics;
use qnode::pool::ModelPool;
use qnode::server::{self, ServerConfig, Services};

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = Config::from_args(&args)?;
    super::init_tracing(config.server.log_format == LogFormat::Json);
    let metrics = Metrics::new()?;
    let pool_metrics = PoolMetrics::register(metrics.registry())?;
    let pool = Arc::new(ModelPool::new(&config.models, pool_metrics, Device::Cpu)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(config, metrics, Arc::clone(&pool)))?;
    // In-flight calls are done; let the instances finish and exit.
    pool.shutdown();
    Ok(ExitCode::SUCCESS)
}

async fn serve(config: Config, metrics: Metrics, pool: Arc<ModelPool>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "gRPC listening");
    if let Some(addr) = config.server.metrics_listen {
        let metrics_listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "metrics listening on /metrics");
        tokio::spawn(qnode::metrics::serve(
            metrics_listener,
            metrics.clone(),
            std::future::pending(),
        ));
    }
    let cache = Arc::new(CachedBackend::new(
        Arc::clone(&pool) as Arc<dyn Backend>,
        Default::default(),
        config.cache.clone(),
    )?);
    cache.metrics().register(metrics.registry())?;
    let node = Node::new(config.server.role, &metrics);
    if let Some(addr) = config.server.http_listen {
        let http = tokio::net::TcpListener::bind(addr).await?;
        let http_config = qnode::openai::HttpConfig::new(&config, metrics.clone());
        let backend = Arc::clone(&cache) as Arc<dyn Backend>;
        let serve = qnode::openai::serve(
            http,
            backend,
            Arc::clone(&node),
            http_config,
            std::future::pending(),
        );
        tokio::spawn(serve);
    }
    tokio::spawn(load_models(
        Arc::clone(&pool),
        Arc::clone(&cache),
        Arc::clone(&node),
    ));
    let server_config = ServerConfig::new(&config, metrics);
    let services = Services {
        backend: cache,
        node,
        models: None,
    };
    server::run(listener, services, server_config, shutdown_signal()).await?;
    Ok(())
}

/// Hot questions of the fleet loaded into L1 at start.
const PREWARM_TOP_K: usize = 256;

/// Load every model off the runtime, then let the cache key answers by each model's identity and
/// preload the fleet's hot questions.
async fn load_models(pool: Arc<ModelPool>, cache: Arc<CachedBackend>, node: Arc<Node>) {
    let loader = Arc::clone(&pool);
    match tokio::task::spawn_blocking(move || loader.load_all()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "loading failed"),
        Err(e) => tracing::error!(error = %e, "loader panicked"),
    }
    node.warming();
    for info in pool.models() {
        if let Some(model) = pool.loaded(&info.id) {
            cache.set_identity(ModelIdentity {
                model_id: info.id.clone(),
                file_digest: model.file_digest.clone(),
                quant: model.quant.as_str().to_string(),
                template_id: model.template_digest.clone(),
            });
        }
    }
    let loaded = cache.prewarm_from_redis(PREWARM_TOP_K).await;
    if loaded > 0 {
        tracing::info!(loaded, "hot answers preloaded from Redis");
    }
    node.warmed();
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
    tracing::info!("shutdown signal: draining");
}
