//! Subcommands of the `qnode` binary. Each file is one command; none holds engine logic.

mod admin;
mod bench;
mod generate;
mod health;
mod hot_replay;
mod models;
mod multiturn;
mod quantize;
mod semantic;
mod serve;

use clap::{Parser, Subcommand};

/// qnode: an inference worker node serving 8-bit quantized LLMs over gRPC.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configured models over gRPC.
    Serve(qnode::config::ServeArgs),
    /// Generate text from a prompt or a chat message, printing it as it comes.
    Generate(generate::GenerateArgs),
    /// Rewrite a GGUF file with its matrices in Q8_0.
    Quantize(quantize::QuantizeArgs),
    /// List or fetch the models of the manifest.
    Models(models::ModelsArgs),
    /// Ask a node for its grpc.health.v1 status (exit 0 when SERVING).
    Health(health::HealthArgs),
    /// Load a running node with concurrent streaming requests and print a markdown table.
    Bench(bench::BenchArgs),
    /// Operate a running node: status, activate, standby, drain, load, unload, warmup.
    Admin(admin::AdminArgs),
}

/// Parse the command line and run the command.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Models(args) => models::run(args),
        Command::Health(args) => health::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Admin(args) => admin::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qnode: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Log to stderr, `RUST_LOG` style filtering (default `info`), text or JSON lines.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
