//! `qnode serve`: load the models, serve gRPC (and /metrics), drain on SIGTERM/SIGINT.

use std::process::ExitCode;
use std::sync::Arc;

use candle_core::Device;
use qnode::config::{Config, LogFormat, ServeArgs};
use qnode::metrics::Metrics;
use qnode::pool::metrics::PoolMetrics;
use qnode::pool::ModelPool;
use qnode::server::{self, ServerConfig};

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
    let loader = Arc::clone(&pool);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = loader.load_all() {
            tracing::error!(error = %e, "loading failed");
        }
    });
    let server_config = ServerConfig::new(&config, metrics);
    server::run(listener, pool, server_config, shutdown_signal()).await?;
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
