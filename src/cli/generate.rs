//! `qnode generate`: one generation through the same pool and engine the server uses.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use candle_core::Device;
use qnode::config::{ModelConfig, Quant};
use qnode::engine::{
    Backend, ChatMessage, GenerationEvent, GenerationRequest, PromptInput, SamplingParams,
};
use qnode::pool::metrics::PoolMetrics;
use qnode::pool::ModelPool;

/// Flags of `qnode generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Manifest id (smollm2, gemma3-270m), a path to a .gguf, or hf:OWNER/REPO/FILE.gguf.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Raw text to continue (no chat template).
    #[arg(long, conflicts_with_all = ["user", "system"], required_unless_present = "user")]
    prompt: Option<String>,
    /// A user message, sent through the model's chat template.
    #[arg(long)]
    user: Option<String>,
    /// An optional system message before `--user`.
    #[arg(long, requires = "user")]
    system: Option<String>,
    /// New tokens at most.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Drop tokens below min_p × the top probability.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalty on repeated tokens; 1 is off.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed of the sampler (same seed + input → same text).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Weight format: q8_0 (requantize at load) or original.
    #[arg(long, default_value = "q8_0")]
    quant: Quant,
    /// Compute threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    dir: qnode::config::ModelsDirArg,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let mut model = ModelConfig::new(args.model.clone());
    model.quant = args.quant;
    model.max_batch = 1;
    model.threads_per_instance = args.threads;
    let pool = Arc::new(ModelPool::new_in(
        &args.dir.models_dir,
        &[model],
        PoolMetrics::unregistered(),
        Device::Cpu,
    )?);
    pool.load_all()?;
    let id = pool.models()[0].id.clone();
    let loaded = pool.loaded(&id).context("model did not load")?;
    let input = match (args.prompt, args.user) {
        (Some(p), _) => PromptInput::Text(p),
        (None, Some(user)) => {
            let mut messages = Vec::new();
            if let Some(system) = args.system {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: system,
                    ..Default::default()
                });
            }
            messages.push(ChatMessage {
                role: "user".into(),
                content: user,
                ..Default::default()
            });
            PromptInput::Chat(messages)
        }
        (None, None) => anyhow::bail!("give --prompt TEXT or --user TEXT"),
    };
    let request = GenerationRequest {
        request_id: "cli".into(),
        model: id,
        input,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
        max_tokens: args.max_tokens,
        stop: args.stop,
        deadline: None,
        cache_policy: Default::default(),
        tenant: None,
        session: None,
        constraint: None,
        logprobs: None,
        chat_template_kwargs: Default::default(),
        tools: None,
    };
    let mut events = futures::executor::block_on(pool.submit(request))?;
    let mut stdout = std::io::stdout().lock();
    let done = loop {
        match events.blocking_recv() {
            Some(Ok(GenerationEvent::Delta(text))) => {
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            Some(Ok(GenerationEvent::Finished(done))) => break done,
            // Not asked for.
            Some(Ok(GenerationEvent::Logprobs(_))) => {}
            Some(Err(e)) => anyhow::bail!(e),
            None => anyhow::bail!("generation ended without a result"),
        }
    };
    writeln!(stdout)?;
    let t = done.timings;
    let prefill = t.time_to_first_token.saturating_sub(t.queue).as_secs_f64();
    let decode = t.total.saturating_sub(t.time_to_first_token).as_secs_f64();
    let decoded = done.completion_tokens.saturating_sub(1);
    eprintln!(
        "prompt tokens: {}, completion tokens: {}, finish: {}, load: {} ms, prefill: {:.1} tok/s, decode: {:.1} tok/s",
        done.prompt_tokens,
        done.completion_tokens,
        done.finish_reason.as_str(),
        loaded.load_time.as_millis(),
        done.prompt_tokens as f64 / prefill.max(1e-9),
        if decoded > 0 { decoded as f64 / decode.max(1e-9) } else { 0.0 },
    );
    pool.shutdown();
    Ok(ExitCode::SUCCESS)
}
