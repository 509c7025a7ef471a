//! Warm-up: one short real generation on every instance of a model, so the first request pays no
//! first-touch cost (weights paged in, the instance's compute threads started, KV buffers and the
//! sampler's scratch allocated, the chat template compiled).

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::admission::Admission;
use super::EVENT_BUFFER;
use crate::engine::sampler::Sampler;
use crate::engine::sequence::Admitted;
use crate::engine::{ChatMessage, EngineError, GenerationEvent, PromptInput, SamplingParams};
use crate::model::loaded::LoadedModel;

/// Tokens generated per warm-up request: enough for the decode path to run its batched steps.
const WARM_UP_TOKENS: usize = 4;
/// A warm-up that takes longer than this is reported as failed.
const WARM_UP_DEADLINE: Duration = Duration::from_secs(120);

/// The prompt every warm-up runs through the model's chat template (raw text when it has none).
fn prompt(model: &LoadedModel) -> Vec<u32> {
    let chat = PromptInput::Chat(vec![ChatMessage {
        role: "user".into(),
        content: "Hello! Say hi back.".into(),
        ..Default::default()
    }]);
    model
        .prompt_tokens(&chat)
        .or_else(|_| model.prompt_tokens(&PromptInput::Text("Hello".into())))
        .unwrap_or_else(|_| vec![0])
}

/// Queues one generation per instance at once (the least-loaded dispatch hands each instance
/// one) and waits for all of them. Blocking: call it off the async runtime. Returns how many ran.
pub(super) fn run(
    id: &str,
    model: &LoadedModel,
    admission: &Admission,
    instances: usize,
) -> Result<usize, EngineError> {
    let tokens = prompt(model);
    let arrived = Instant::now();
    let mut receivers = Vec::with_capacity(instances);
    for index in 0..instances {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let request = Admitted {
            request_id: format!("warm-up-{index}"),
            prompt: tokens.clone(),
            max_tokens: WARM_UP_TOKENS,
            stop: Vec::new(),
            sampler: Sampler::new(&SamplingParams::default()),
            tx,
            arrived,
            deadline: Some(arrived + WARM_UP_DEADLINE),
            session: None,
            constraint: None,
            logprobs: None,
        };
        admission
            .push(request)
            .map_err(|_| EngineError::QueueFull {
                model: id.to_owned(),
                max_queued: admission.max_queued(),
                retry_after: Duration::from_secs(1),
            })?;
        receivers.push(rx);
    }
    // `futures`' executor, not `blocking_recv`: this may run on a thread that drives a tokio
    // runtime (a test or a tool calling `load_all`), where tokio refuses to block. The engine
    // ends each generation by its deadline, so the wait is bounded.
    for mut rx in receivers {
        loop {
            match futures::executor::block_on(rx.recv()) {
                Some(Ok(GenerationEvent::Delta(_) | GenerationEvent::Logprobs(_))) => {}
                Some(Ok(GenerationEvent::Finished(_))) => break,
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(EngineError::Internal(
                        "warm-up generation ended without a result".into(),
                    ))
                }
            }
        }
    }
    Ok(instances)
}
