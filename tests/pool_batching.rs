//! Continuous batching and admission on a tiny generated model: many requests complete, outputs do
//! not depend on the batch, a full queue refuses at once, a cancelled request frees its slot.

use futures::executor::block_on;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use qnode::config::ModelConfig;
use qnode::engine::{
    Backend, Completion, EngineError, EventStream, FinishReason, GenerationEvent,
    GenerationRequest, PromptInput, SamplingParams,
};
use qnode::pool::metrics::PoolMetrics;
use qnode::pool::ModelPool;

fn tiny_pool(dir: &Path, instances: usize, max_batch: usize, max_queued: usize) -> Arc<ModelPool> {
    tiny_pool_observed(
        dir,
        instances,
        max_batch,
        max_queued,
        PoolMetrics::unregistered(),
    )
}

/// [`tiny_pool`] reporting its steps to `metrics` (clones share the counters, so the test keeps
/// one to read the tokens sampled per instance).
fn tiny_pool_observed(
    dir: &Path,
    instances: usize,
    max_batch: usize,
    max_queued: usize,
    metrics: PoolMetrics,
) -> Arc<ModelPool> {
    let path = dir.join("tiny.gguf");
    if !path.exists() {
        qnode::model::tiny::write_tiny_llama(&path, 7).unwrap();
    }
    let mut cfg = ModelConfig::new(path.to_str().unwrap());
    cfg.instances = instances;
    cfg.threads_per_instance = Some(1);
    cfg.max_batch = max_batch;
    cfg.max_queued = max_queued;
    let pool = ModelPool::new(&[cfg], metrics, Device::Cpu).unwrap();
    pool.load_all().unwrap();
    Arc::new(pool)
}

/// Tokens instance 0 of the tiny model sampled so far (all its requests together).
fn sampled(metrics: &PoolMetrics) -> u64 {
    metrics
        .instance_tokens
        .with_label_values(&["tiny", "0"])
        .get()
}

/// When a request's first and last tokens were sampled, bounded from the test's side: the pool
/// stamps `arrived` inside `submit`, between `before` and `after`, and the timings count from it.
struct Span {
    first_token: (Instant, Instant),
    last_token: (Instant, Instant),
}

impl Span {
    fn of(before: Instant, after: Instant, done: &Completion) -> Self {
        let t = &done.timings;
        Self {
            first_token: (
                before + t.time_to_first_token,
                after + t.time_to_first_token,
            ),
            last_token: (before + t.total, after + t.total),
        }
    }

    /// Both sequences were sampling at one moment, so (one instance, every live sequence is in
    /// every step) they shared at least one forward step.
    fn surely_overlaps(&self, other: &Span) -> bool {
        self.last_token.0 > other.first_token.1 && other.last_token.0 > self.first_token.1
    }
}

fn request(prompt: &str, max_tokens: u32, sampling: SamplingParams) -> GenerationRequest {
    GenerationRequest {
        sampling,
        ..GenerationRequest::new(prompt, "tiny", PromptInput::Text(prompt.into()), max_tokens)
    }
}

/// Read a stream to its end: the text and the summary.
fn collect(mut rx: EventStream) -> Result<(String, Completion), EngineError> {
    let mut text = String::new();
    loop {
        match rx.blocking_recv().expect("stream ended without Finished")? {
            GenerationEvent::Delta(t) => text.push_str(&t),
            GenerationEvent::Logprobs(_) => {}
            GenerationEvent::Finished(done) => return Ok((text, done)),
        }
    }
}

fn seeded(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

#[test]
fn many_concurrent_requests_complete_with_their_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let pool = tiny_pool(dir.path(), 2, 4, 64);
    let streams: Vec<_> = (0..24)
        .map(|i| {
            let max = 4 + (i % 5) as u32 * 7;
            let rx = block_on(pool.submit(request(&format!("the request {i}"), max, seeded(i))))
                .unwrap();
            (max, rx)
        })
        .collect();
    for (max, rx) in streams {
        let (_, done) = collect(rx).unwrap();
        assert!(done.completion_tokens >= 1 && done.completion_tokens <= max);
        if done.finish_reason == FinishReason::Length {
            assert_eq!(done.completion_tokens, max);
        }
    }
    pool.shutdown();
}

#[test]
fn output_does_not_depend_on_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let pool = tiny_pool(dir.path(), 1, 8, 64);
    let cases = [
        ("the greedy one", SamplingParams::default()),
        ("the seeded one", seeded(42)),
    ];
    let timed = |prompt: &str, max: u32, sampling: SamplingParams| {
        let before = Instant::now();
        let rx = block_on(pool.submit(request(prompt, max, sampling))).unwrap();
        (before, Instant::now(), rx)
    };
    for (prompt, sampling) in cases {
        let alone =
            collect(block_on(pool.submit(request(prompt, 40, sampling.clone()))).unwrap()).unwrap();
        // The same request again, this time among 7 others at different positions, some joining
        // while it decodes.
        let others: Vec<_> = (0..4)
            .map(|i| {
                timed(
                    &format!("other prompt number {i} with more text"),
                    30,
                    seeded(i),
                )
            })
            .collect();
        let (before, after, target) = timed(prompt, 40, sampling.clone());
        let late: Vec<_> = (0..3)
            .map(|i| timed(&format!("late {i}"), 25, SamplingParams::default()))
            .collect();
        let batched = collect(target).unwrap();
        assert_eq!(alone.0, batched.0, "{prompt}: text changed inside a batch");
        assert_eq!(alone.1.completion_tokens, batched.1.completion_tokens);
        // It really was decoded among others: its sampling overlapped theirs on the one instance.
        let target_span = Span::of(before, after, &batched.1);
        let mut shared = 0;
        for (before, after, rx) in others.into_iter().chain(late) {
            let (_, done) = collect(rx).unwrap();
            if Span::of(before, after, &done).surely_overlaps(&target_span) {
                shared += 1;
            }
        }
        assert!(
            shared >= 1,
            "{prompt}: no other request was decoding at the same time, so nothing shows the output \
             is independent of the batch"
        );
        eprintln!("{prompt}: decoded alongside {shared} of 7 other requests");
    }
    pool.shutdown();
}

#[test]
fn full_queue_refuses_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (max_batch, max_queued) = (1, 2);
    let pool = tiny_pool(dir.path(), 1, max_batch, max_queued);
    let mut accepted = Vec::new();
    let mut refused = None;
    // At most max_batch requests can be running and max_queued waiting: one more must be refused.
    for i in 0..(max_batch + max_queued + 1) {
        match block_on(pool.submit(request(
            &format!("long {i}"),
            400,
            SamplingParams::default(),
        ))) {
            Ok(rx) => accepted.push(rx),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    match refused {
        Some(EngineError::QueueFull {
            max_queued: m,
            retry_after,
            ..
        }) => {
            assert_eq!(m, max_queued);
            assert!(retry_after > Duration::ZERO);
        }
        other => panic!("expected QueueFull, got {other:?}"),
    }
    assert!(accepted.len() >= max_queued);
    drop(accepted);
    pool.shutdown();
}

#[test]
fn cancelled_request_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = PoolMetrics::unregistered();
    // One slot, no queue room beyond one: the second request can only run once the first left.
    let pool = tiny_pool_observed(dir.path(), 1, 1, 1, metrics.clone());
    let long = || request("the long one", 500, SamplingParams::default());
    // Greedy is deterministic: left alone, this request decodes all its 500 tokens.
    let (_, whole) = collect(block_on(pool.submit(long())).unwrap()).unwrap();
    assert_eq!(
        (whole.finish_reason, whole.completion_tokens),
        (FinishReason::Length, 500)
    );

    let base = sampled(&metrics);
    let mut first = block_on(pool.submit(long())).unwrap();
    // Wait until it is generating, then walk away.
    match first.blocking_recv() {
        Some(Ok(GenerationEvent::Delta(_))) => {}
        other => panic!("unexpected {other:?}"),
    }
    drop(first);
    // Read after the drop: only a step already running at the drop can still add a token.
    let at_drop = sampled(&metrics) - base;
    assert!(
        at_drop < 499,
        "the request was nearly done ({at_drop} of 500 tokens) before the cancel, so this proves nothing"
    );
    let (_, next) =
        collect(block_on(pool.submit(request("the next", 5, SamplingParams::default()))).unwrap())
            .unwrap();
    assert!(next.completion_tokens >= 1);
    // The slot was free at once: the next request did not wait for the cancelled one's remaining
    // tokens (timed from the same request decoded whole, alone), not even for half of them.
    let rest = whole.timings.total.mul_f64((500 - at_drop) as f64 / 500.0);
    assert!(
        next.timings.queue < rest / 2,
        "the next request waited {:?} for the slot; the cancelled request's remaining {} tokens \
         take about {rest:?}: the slot was held after the cancel",
        next.timings.queue,
        500 - at_drop
    );
    // Everything sampled since the drop, less the next request's own tokens, was decoded for the
    // cancelled one: at most the step that was running when it left.
    let after_cancel = sampled(&metrics) - base - at_drop - next.completion_tokens as u64;
    assert!(
        after_cancel <= 1,
        "{after_cancel} tokens were decoded for a cancelled request (cancelled after {at_drop})"
    );
    eprintln!(
        "cancelled after {at_drop} of 500 tokens; {after_cancel} decoded after the cancel; \
         the next request waited {:?} for its slot",
        next.timings.queue
    );
    pool.shutdown();
}

#[test]
fn prompt_over_the_context_is_refused_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let pool = tiny_pool(dir.path(), 1, 1, 4);
    let long = "a".repeat(qnode::model::tiny::CONTEXT);
    match block_on(pool.submit(request(&long, 10, SamplingParams::default()))) {
        Err(EngineError::ContextOverflow {
            prompt_tokens,
            max_tokens,
            context_length,
        }) => {
            assert_eq!(max_tokens, 10);
            assert_eq!(context_length, qnode::model::tiny::CONTEXT);
            assert!(prompt_tokens >= 256);
        }
        other => panic!("expected ContextOverflow, got {:?}", other.map(|_| ())),
    }
    pool.shutdown();
}

#[test]
fn unknown_model_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let pool = tiny_pool(dir.path(), 1, 1, 4);
    let mut r = request("x", 1, SamplingParams::default());
    r.model = "nope".into();
    assert_eq!(
        block_on(pool.submit(r)).map(|_| ()),
        Err(EngineError::UnknownModel("nope".into()))
    );
    pool.shutdown();
}
