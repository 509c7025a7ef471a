//! The step loop of one model instance, on its own OS thread with its own compute threads.
//!
//! Each step: take newcomers while batch slots are free, drop sequences whose caller left or whose
//! deadline passed, run one packed forward over the new tokens of every live sequence (prompts in
//! chunks, so decodes keep flowing), then sample and deliver. Nothing here blocks on a caller.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::prefix::PrefixStore;
use super::sequence::{Admitted, Exit, Sequence};
use super::EngineError;
use crate::model::kv_cache::KvCache;
use crate::model::loaded::LoadedModel;
use crate::model::transformer::SeqStep;

/// Largest cache (in positions) kept for reuse when its sequence ends: a chat turn's size.
const SPARE_MAX_POSITIONS: usize = 2048;

/// Where an instance gets its work: the pool's admission queue.
pub trait WorkSource: Send + Sync + 'static {
    /// A queued request for instance `instance`, which has `free` batch slots. With `wait`, block
    /// up to that long for one. `None` when there is nothing (or another instance should take it).
    fn take(&self, instance: usize, free: usize, wait: Option<Duration>) -> Option<Admitted>;
    /// False once the pool is shutting down: the loop ends when its batch is empty.
    fn running(&self) -> bool;
    /// The KV block store of instance `instance`, if prefixes are kept.
    fn prefix_store(&self, _instance: usize) -> Option<Arc<PrefixStore>> {
        None
    }
    /// Instance `instance` fed `tokens` tokens in a step that took `busy` (the dispatch's
    /// estimate of what a prefill costs).
    fn on_step(&self, _instance: usize, _tokens: usize, _busy: Duration) {}
}

/// Observer of what an instance does (metrics).
pub trait StepObserver: Send + Sync + 'static {
    /// One forward step over `batch` sequences feeding `tokens` tokens took `busy`; `sampled`
    /// tokens were generated.
    fn on_step(&self, instance: usize, batch: usize, tokens: usize, sampled: usize, busy: Duration);
    /// Of the step's `tokens`, `prompt_tokens` were prompt tokens the model computed (prefill;
    /// those restored from the prefix store are not fed, so not counted).
    fn on_prefill(&self, _instance: usize, _prompt_tokens: usize) {}
}

impl StepObserver for () {
    fn on_step(&self, _: usize, _: usize, _: usize, _: usize, _: Duration) {}
}

/// Settings of one instance.
#[derive(Debug, Clone)]
pub struct InstanceSettings {
    /// Index among the model's instances.
    pub index: usize,
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Prompt tokens fed per step at most, over all newcomers.
    pub prefill_chunk: usize,
    /// Compute threads of this instance.
    pub threads: usize,
    /// Cores to pin the compute threads to (empty: no pinning).
    pub cores: Vec<usize>,
    /// KV cache positions per sequence.
    pub max_seq_len: usize,
}

/// Start an instance thread. It runs until the source stops running and its batch is empty.
pub fn spawn(
    model: Arc<LoadedModel>,
    source: Arc<dyn WorkSource>,
    observer: Arc<dyn StepObserver>,
    settings: InstanceSettings,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let name = format!("qnode-{}-{}", model.id, settings.index);
    std::thread::Builder::new().name(name).spawn(move || {
        let cores = settings.cores.clone();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(settings.threads.max(1))
            .thread_name(move |i| format!("qnode-compute-{i}"))
            .start_handler(move |i| {
                if let Some(&core) = cores.get(i) {
                    core_affinity::set_for_current(core_affinity::CoreId { id: core });
                }
            })
            .build();
        let pool = match pool {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot start compute threads");
                return;
            }
        };
        Instance::new(model, source, observer, settings).run(&pool);
    })
}

struct Instance {
    model: Arc<LoadedModel>,
    source: Arc<dyn WorkSource>,
    observer: Arc<dyn StepObserver>,
    settings: InstanceSettings,
    live: Vec<Sequence>,
    spare_caches: Vec<KvCache>,
    prefix: Option<Arc<PrefixStore>>,
}

impl Instance {
    fn new(
        model: Arc<LoadedModel>,
        source: Arc<dyn WorkSource>,
        observer: Arc<dyn StepObserver>,
        settings: InstanceSettings,
    ) -> Self {
        let prefix = source.prefix_store(settings.index);
        Self {
            model,
            source,
            observer,
            live: Vec::with_capacity(settings.max_batch),
            spare_caches: Vec::new(),
            prefix,
            settings,
        }
    }

    fn run(mut self, pool: &rayon::ThreadPool) {
        loop {
            self.admit();
            if self.live.is_empty() {
                if !self.source.running() {
                    return;
                }
                let free = self.settings.max_batch;
                if let Some(a) =
                    self.source
                        .take(self.settings.index, free, Some(Duration::from_millis(100)))
                {
                    self.start(a);
                }
                continue;
            }
            self.reap();
            if self.live.is_empty() {
                continue;
            }
            let started = Instant::now();
            // Everything a step does, its observer included, is inside the guard: a panic fails
            // the batch's requests with INTERNAL and the instance goes on with an empty batch.
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let (batch, tokens, prefilled, sampled) = pool.install(|| self.step())?;
                let busy = started.elapsed();
                self.observer
                    .on_step(self.settings.index, batch, tokens, sampled, busy);
                self.observer.on_prefill(self.settings.index, prefilled);
                self.source.on_step(self.settings.index, tokens, busy);
                Ok::<(), crate::model::ModelError>(())
            }));
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.fail_all(format!("forward pass failed: {e}")),
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    tracing::error!(instance = self.settings.index, %what, "step panicked; batch failed, instance reset");
                    self.fail_all(format!("instance step panicked: {what}"));
                }
            }
        }
    }

    fn admit(&mut self) {
        while self.live.len() < self.settings.max_batch {
            let free = self.settings.max_batch - self.live.len();
            match self.source.take(self.settings.index, free, None) {
                Some(a) => self.start(a),
                None => break,
            }
        }
    }

    fn start(&mut self, a: Admitted) {
        if a.tx.is_closed() {
            return;
        }
        let cache = self
            .spare_caches
            .pop()
            .unwrap_or_else(|| self.model.transformer.new_cache(self.settings.max_seq_len));
        let mut seq = Sequence::new(a, cache);
        if seq.is_expired(Instant::now()) {
            let waited = seq.req.arrived.elapsed();
            seq.fail(EngineError::DeadlineExceeded(waited));
            self.recycle(seq);
            return;
        }
        if let Some(store) = &self.prefix {
            seq.reuse_prefix(store);
        }
        self.live.push(seq);
    }

    /// Drop sequences whose caller left; fail those past their deadline.
    fn reap(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.live.len() {
            let seq = &mut self.live[i];
            let exit = if seq.is_cancelled() {
                Some(Exit::Gone)
            } else if seq.is_expired(now) {
                let waited = seq.req.arrived.elapsed();
                Some(seq.fail(EngineError::DeadlineExceeded(waited)))
            } else {
                None
            };
            if exit.is_some() {
                let seq = self.live.swap_remove(i);
                self.recycle(seq);
            } else {
                i += 1;
            }
        }
    }

    /// One forward over the live batch; returns (sequences, tokens fed, prompt tokens fed,
    /// tokens sampled).
    fn step(&mut self) -> Result<(usize, usize, usize, usize), crate::model::ModelError> {
        let mut budget = self.settings.prefill_chunk.max(1);
        let mut chosen = Vec::with_capacity(self.live.len());
        let mut prefilled = 0;
        for (i, seq) in self.live.iter().enumerate() {
            if seq.in_prefill() {
                if budget == 0 {
                    continue;
                }
                let n = seq.next_input(budget).len();
                budget -= n;
                prefilled += n;
                chosen.push((i, n));
            } else {
                chosen.push((i, 1));
            }
        }
        let mut logits = {
            let mut steps = Vec::with_capacity(chosen.len());
            let mut masks = Vec::new();
            let mut rest: &mut [Sequence] = &mut self.live;
            let mut base = 0;
            for &(i, n) in &chosen {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - base);
                let (seq, tail) = tail.split_first_mut().expect("index in range");
                rest = tail;
                base = i + 1;
                let (tokens, cache, constraint) = seq.step_parts(n);
                steps.push(SeqStep { tokens, cache });
                masks.extend(constraint);
            }
            if masks.is_empty() {
                self.model.transformer.forward(&mut steps)?
            } else {
                // The next-token masks of constrained sequences depend only on the tokens
                // already sampled: compute them in parallel with each other and beside the
                // forward pass, on this instance's compute threads (idle ones steal the work).
                let transformer = &self.model.transformer;
                let (logits, ()) = rayon::join(
                    || transformer.forward(&mut steps),
                    || masks.par_iter_mut().for_each(|c| c.prepare()),
                );
                logits?
            }
        };
        let fed: usize = chosen.iter().map(|&(_, n)| n).sum();
        let mut sampled = 0;
        let mut exits = Vec::new();
        for (row, &(i, n)) in logits.rows_mut().zip(&chosen) {
            let seq = &mut self.live[i];
            if seq.fed(n) {
                sampled += 1;
                if let Some(exit) = seq.on_logits(row, &self.model.tokenizer) {
                    exits.push((i, exit));
                }
            }
        }
        let batch = chosen.len();
        exits.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, _) in exits {
            let seq = self.live.swap_remove(i);
            self.recycle(seq);
        }
        Ok((batch, fed, prefilled, sampled))
    }

    fn fail_all(&mut self, why: String) {
        for mut seq in std::mem::take(&mut self.live) {
            seq.forget_prefix();
            seq.fail(EngineError::Internal(why.clone()));
            // A cache that was mid-write in a failed step is dropped, not reused, and nothing of
            // it goes to the prefix store.
            drop(seq);
        }
    }

    /// A sequence left the batch between steps (finished, cancelled, expired): its cache holds
    /// only completed positions, which the prefix store keeps; the cache is reused.
    fn recycle(&mut self, mut seq: Sequence) {
        seq.keep_prefix();
        // A spare's buffers stay resident until reused, outside every budget: keep only caches
        // of chat-turn size. A long sequence's cache is freed; the next long one allocates
        // exactly what it needs (see `Sequence::new`).
        if self.spare_caches.len() < self.settings.max_batch
            && seq.cache.capacity() <= SPARE_MAX_POSITIONS
        {
            self.spare_caches.push(seq.cache);
        }
    }
}
