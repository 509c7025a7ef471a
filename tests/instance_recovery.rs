//! An instance whose step panics fails that batch's requests with INTERNAL, resets, and keeps
//! serving. The panic is injected through the step observer, which runs inside the step's guard.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use qnode::engine::instance::{self, InstanceSettings, StepObserver};
use qnode::engine::sampler::Sampler;
use qnode::engine::sequence::Admitted;
use qnode::engine::{EngineError, EventStream, GenerationEvent, SamplingParams};
use qnode::model::loaded::LoadedModel;
use qnode::model::quantize::Quant;
use qnode::pool::admission::Admission;

/// Panics at its `at`-th step, once.
struct PanicOnce {
    steps: AtomicUsize,
    at: usize,
}

impl StepObserver for PanicOnce {
    fn on_step(&self, _: usize, _: usize, _: usize, _: usize, _: Duration) {
        if self.steps.fetch_add(1, Ordering::SeqCst) + 1 == self.at {
            panic!("injected fault");
        }
    }
}

fn admit(queue: &Admission, model: &LoadedModel, prompt: &str, max_tokens: usize) -> EventStream {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let request = Admitted {
        request_id: prompt.into(),
        prompt: model.tokenizer.encode(prompt, true).unwrap(),
        max_tokens,
        stop: vec![],
        sampler: Sampler::new(&SamplingParams::default()),
        tx,
        arrived: Instant::now(),
        deadline: None,
        session: None,
        constraint: None,
        logprobs: None,
    };
    queue.push(request).expect("queue has room");
    rx
}

/// The error that ended the stream, or `None` when it finished normally.
fn outcome(mut rx: EventStream) -> Option<EngineError> {
    loop {
        match rx.blocking_recv().expect("stream ended without a result") {
            Ok(GenerationEvent::Delta(_) | GenerationEvent::Logprobs(_)) => continue,
            Ok(GenerationEvent::Finished(_)) => return None,
            Err(e) => return Some(e),
        }
    }
}

#[test]
fn a_panicking_step_fails_its_batch_and_the_instance_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    qnode::model::tiny::write_tiny_llama(&path, 3).unwrap();
    let model = Arc::new(LoadedModel::load("tiny", &path, Quant::Q8_0, &Device::Cpu).unwrap());
    let queue = Arc::new(Admission::new(16, 1, 4));
    // Both requests are queued before the instance starts, so they share the batch that panics.
    let first = admit(&queue, &model, "the first", 200);
    let second = admit(&queue, &model, "the second", 200);
    let observer = Arc::new(PanicOnce {
        steps: AtomicUsize::new(0),
        at: 3,
    });
    let settings = InstanceSettings {
        index: 0,
        max_batch: 4,
        prefill_chunk: 256,
        threads: 1,
        cores: vec![],
        max_seq_len: 512,
    };
    let handle = instance::spawn(Arc::clone(&model), queue.clone(), observer, settings).unwrap();

    for rx in [first, second] {
        match outcome(rx) {
            Some(EngineError::Internal(why)) => assert!(why.contains("injected fault"), "{why}"),
            other => panic!("expected INTERNAL from the panicking step, got {other:?}"),
        }
    }
    // The same instance serves the next request to its end.
    assert_eq!(outcome(admit(&queue, &model, "after the fault", 5)), None);

    queue.close();
    handle.join().unwrap();
}
