//! `qnode serve`: load and warm the models, serve gRPC (and /metrics), drain on SIGTERM/SIGINT or
//! `Admin.Drain`.

use std::process::ExitCode;

use qnode::app::{self, Listeners};
use qnode::config::{Config, LogFormat, ServeArgs};

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = Config::from_args(&args)?;
    super::init_tracing(config.server.log_format == LogFormat::Json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listeners = Listeners::bind(&config).await?;
        app::run(config, listeners, shutdown_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
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
