//! `qnode serve`: load and warm the models, serve gRPC (and /metrics), drain on SIGTERM/SIGINT or
//! `Admin.Drain`.

use std::process::ExitCode;
use std::sync::Arc;

use candle_core::Device;
use qnode::cache::CachedBackend;
use qnode::config::{Config, DeviceKind, LogFormat, ServeArgs};
use qnode::engine::Backend;
use qnode::grpc::{self, ServerConfig, Services};
use qnode::metrics::Metrics;
use qnode::node::{Node, NodeModels};
use qnode::pool::metrics::PoolMetrics;
use qnode::pool::ModelPool;

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = Config::from_args(&args)?;
    super::init_tracing(config.server.log_format == LogFormat::Json);
    let metrics = Metrics::new()?;
    // Created first so `uptime` and `warm_after` count from process start.
    let node = Node::new(config.server.role, &metrics);
    let pool_metrics = PoolMetrics::register(metrics.registry())?;
    let device = device(config.server.device)?;
    let pool = Arc::new(ModelPool::new(&config.models, pool_metrics, device)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(config, metrics, node, Arc::clone(&pool)))?;
    // In-flight calls are done; let the instances finish and exit.
    pool.shutdown();
    Ok(ExitCode::SUCCESS)
}

/// The candle device for `kind`; CUDA needs a build with `--features cuda`.
fn device(kind: DeviceKind) -> anyhow::Result<Device> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Ok(Device::new_cuda(0)?),
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => anyhow::bail!(
            "`--device cuda` needs a qnode built with `cargo build --release --features cuda`; this build is CPU only"
        ),
    }
}

async fn serve(
    config: Config,
    metrics: Metrics,
    node: Arc<Node>,
    pool: Arc<ModelPool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
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
    let models = NodeModels::new(pool, Arc::clone(&cache), Arc::clone(&node));
    tokio::spawn({
        let models = Arc::clone(&models);
        let hot_answers = config.cache.prewarm_top_k;
        async move { models.start(hot_answers).await }
    });
    if let Some(addr) = config.server.http_listen {
        let http = tokio::net::TcpListener::bind(addr).await?;
        let http_config = qnode::http::HttpConfig::new(&config, metrics.clone());
        let backend = Arc::clone(&cache) as Arc<dyn Backend>;
        let drained = {
            let node = Arc::clone(&node);
            async move { node.drain_requested().await }
        };
        tokio::spawn(qnode::http::serve(
            http,
            backend,
            Arc::clone(&node),
            http_config,
            drained,
        ));
    }
    let server_config = ServerConfig::new(&config, metrics);
    let services = Services {
        backend: cache,
        node,
        models: Some(models),
    };
    grpc::run(listener, services, server_config, shutdown_signal()).await?;
    Ok(())
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
