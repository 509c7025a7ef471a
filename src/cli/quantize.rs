//! `qnode quantize IN.gguf OUT.gguf --type q8_0`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// Flags of `qnode quantize`.
#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// Input GGUF file.
    input: PathBuf,
    /// Output GGUF file (written to OUT.partial, then renamed).
    output: PathBuf,
    /// Target type; only q8_0 is supported.
    #[arg(long = "type", default_value = "q8_0")]
    target: String,
}

pub fn run(args: QuantizeArgs) -> anyhow::Result<ExitCode> {
    if !args.target.eq_ignore_ascii_case("q8_0") {
        anyhow::bail!("--type {} is not supported; use q8_0", args.target);
    }
    let started = Instant::now();
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {elapsed}")
            .expect("valid template"),
    );
    let report =
        qnode::model::quantize::quantize_file(&args.input, &args.output, &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })?;
    bar.finish_and_clear();
    eprintln!(
        "{}: {} tensors ({} requantized to Q8_0), {:.1} MiB in {:.2} s",
        args.output.display(),
        report.tensors,
        report.converted,
        report.bytes as f64 / (1024.0 * 1024.0),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
