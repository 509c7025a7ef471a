//! The bounded FIFO queue of one model, shared by its instances.
//!
//! Instances pull work between steps. A request whose prompt starts with blocks some instance
//! holds in its KV prefix store goes to the instance holding the most of them; otherwise an
//! instance takes a request only when no other instance of the model has more free batch slots,
//! so work goes to the least loaded instance. An idle instance waits on the condvar and is woken
//! by each push.
//!
//! Affinity never starves a request. Instance `i` with a free slot leaves a request to instance
//! `j` holding `extra` more cached tokens of it only while the request has waited less than
//! recomputing those tokens would take (`extra` × the measured time per fed token, an average
//! over this model's prefill steps). Waiting for the preferred instance up to what the
//! alternative costs, then taking the alternative, never costs more than twice the better of the
//! two choices in hindsight (the ski-rental bound), and needs no estimate of when `j` frees a
//! slot. While `j` has a free slot it takes the request at its next step, so the wait is short.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::engine::instance::WorkSource;
use crate::engine::prefix::{BlockKey, PrefixStore};
use crate::engine::sequence::Admitted;

/// Queued requests examined per take (affinity may skip the first ones).
const SCAN: usize = 32;
/// Time per fed token assumed before any prefill was measured (SmolLM2, 2 cores, ~1k context).
const DEFAULT_NS_PER_TOKEN: u64 = 1_500_000;
/// Steps feeding fewer tokens than this are decode-dominated and do not update the estimate.
const MIN_PREFILL_TOKENS: usize = 32;

/// A queued request and the chained keys of its prompt's reusable blocks.
struct Queued {
    a: Admitted,
    keys: Vec<BlockKey>,
}

/// The queue was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// Admission queue and free-slot board of one model.
pub struct Admission {
    queue: Mutex<VecDeque<Queued>>,
    ready: Condvar,
    max_queued: usize,
    free_slots: Vec<AtomicUsize>,
    running: AtomicBool,
    /// One KV prefix store per instance, or none.
    stores: Vec<Arc<PrefixStore>>,
    /// Moving average of the time per fed token in prefill steps, in nanoseconds.
    ns_per_token: AtomicU64,
}

impl Admission {
    /// A queue holding at most `max_queued` requests for `instances` instances of `max_batch`.
    pub fn new(max_queued: usize, instances: usize, max_batch: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            max_queued,
            free_slots: (0..instances)
                .map(|_| AtomicUsize::new(max_batch))
                .collect(),
            running: AtomicBool::new(true),
            stores: Vec::new(),
            ns_per_token: AtomicU64::new(DEFAULT_NS_PER_TOKEN),
        }
    }

    /// Keep one KV prefix store per instance (`stores[i]` for instance `i`) and dispatch by
    /// the prefix each holds.
    pub fn with_prefix_stores(mut self, stores: Vec<Arc<PrefixStore>>) -> Self {
        self.stores = stores;
        self
    }

    /// The prefix store of each instance (empty when prefixes are not kept).
    pub fn prefix_stores(&self) -> &[Arc<PrefixStore>] {
        &self.stores
    }

    /// The current estimate of what recomputing one prompt token costs.
    pub fn time_per_token(&self) -> Duration {
        Duration::from_nanos(self.ns_per_token.load(Ordering::Relaxed))
    }

    /// Queue a request and return the queue depth, or `Err(QueueFull)` when it is full (the
    /// request is dropped). Requests whose caller has left are purged first, so they never hold a
    /// place.
    pub fn push(&self, request: Admitted) -> Result<usize, QueueFull> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= self.max_queued {
            queue.retain(|q| !q.a.tx.is_closed());
        }
        if queue.len() >= self.max_queued {
            return Err(QueueFull);
        }
        // Only stores of several instances need the keys (to choose between them).
        let keys = match self.stores.first() {
            Some(s) if self.stores.len() > 1 && !request.prompt.is_empty() => {
                s.keys(&request.prompt[..request.prompt.len() - 1])
            }
            _ => Vec::new(),
        };
        queue.push_back(Queued { a: request, keys });
        let depth = queue.len();
        drop(queue);
        if self.stores.len() > 1 {
            // The preferred instance must see it, not just any one.
            self.ready.notify_all();
        } else {
            self.ready.notify_one();
        }
        Ok(depth)
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured bound.
    pub fn max_queued(&self) -> usize {
        self.max_queued
    }

    /// Free batch slots over all instances.
    pub fn free_slots(&self) -> usize {
        self.free_slots
            .iter()
            .map(|f| f.load(Ordering::Relaxed))
            .sum()
    }

    /// Stop handing out work; instances finish their batches and exit.
    pub fn close(&self) {
        self.running.store(false, Ordering::Relaxed);
        self.ready.notify_all();
    }

    /// Stop handing out work and take every queued request out, for the caller to refuse.
    pub fn close_and_take(&self) -> Vec<Admitted> {
        let taken = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            self.running.store(false, Ordering::Relaxed);
            queue.drain(..).map(|q| q.a).collect()
        };
        self.ready.notify_all();
        taken
    }

    /// The index of the queued request instance `instance` (with `free` slots) should take
    /// now, purging requests whose caller left; else how long until a request deferred to a
    /// preferred instance becomes its to take. `yield_to_idler`: leave requests no instance
    /// holds a prefix of to an instance with more free slots.
    fn pick(
        &self,
        queue: &mut VecDeque<Queued>,
        instance: usize,
        free: usize,
        yield_to_idler: bool,
    ) -> Result<usize, Option<Duration>> {
        queue.retain(|q| !q.a.tx.is_closed());
        let best_other_free = self
            .free_slots
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != instance)
            .map(|(_, f)| f.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let now = Instant::now();
        let mut next_turn: Option<Duration> = None;
        for (idx, q) in queue.iter().enumerate().take(SCAN) {
            let (mine, best_other) = self.cached_tokens(instance, &q.keys);
            if best_other > mine {
                // Recomputing the extra tokens here costs this much; wait no longer than that.
                let saving = self.time_per_token() * (best_other - mine) as u32;
                let waited = now.saturating_duration_since(q.a.arrived);
                if waited < saving {
                    let left = saving - waited;
                    next_turn = Some(next_turn.map_or(left, |n| n.min(left)));
                    continue;
                }
                return Ok(idx);
            }
            if mine > 0 {
                return Ok(idx);
            }
            // Nobody holds a prefix of it: the least loaded instance takes it.
            if yield_to_idler && best_other_free > free {
                continue;
            }
            return Ok(idx);
        }
        Err(next_turn)
    }

    /// Cached prompt tokens of a request in instance `instance`'s store and the most in any
    /// other instance's.
    fn cached_tokens(&self, instance: usize, keys: &[BlockKey]) -> (usize, usize) {
        if keys.is_empty() || self.stores.len() < 2 {
            return (0, 0);
        }
        let mut mine = 0;
        let mut best_other = 0;
        for (i, s) in self.stores.iter().enumerate() {
            let n = s.probe(keys);
            if i == instance {
                mine = n;
            } else {
                best_other = best_other.max(n);
            }
        }
        (mine, best_other)
    }
}

impl WorkSource for Admission {
    fn take(&self, instance: usize, free: usize, wait: Option<Duration>) -> Option<Admitted> {
        if let Some(slot) = self.free_slots.get(instance) {
            slot.store(free, Ordering::Relaxed);
        }
        if free == 0 {
            return None;
        }
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        // A busy instance (between steps) leaves unclaimed work to a less loaded one, which is
        // waiting and was woken by the push; an idle one takes it.
        let deferred = match self.pick(&mut queue, instance, free, wait.is_none()) {
            Ok(idx) => return queue.remove(idx).map(|q| q.a),
            Err(deferred) => deferred,
        };
        let wait = wait?;
        if !self.running.load(Ordering::Relaxed) {
            return None;
        }
        // Wake up in time to take a request whose preferred instance stayed busy too long.
        let wait = deferred.map_or(wait, |d| d.min(wait));
        let (mut queue, _) = self
            .ready
            .wait_timeout(queue, wait)
            .unwrap_or_else(|e| e.into_inner());
        match self.pick(&mut queue, instance, free, false) {
            Ok(idx) => queue.remove(idx).map(|q| q.a),
            Err(_) => None,
        }
    }

    fn prefix_store(&self, instance: usize) -> Option<Arc<PrefixStore>> {
        self.stores.get(instance).cloned()
    }

    fn on_step(&self, _instance: usize, tokens: usize, busy: Duration) {
        if tokens < MIN_PREFILL_TOKENS {
            return;
        }
        let sample = busy.as_nanos() as u64 / tokens as u64;
        let old = self.ns_per_token.load(Ordering::Relaxed);
        // An average over roughly the last eight prefill steps.
        let new = old - old / 8 + sample / 8;
        self.ns_per_token.store(new.max(1), Ordering::Relaxed);
    }

    fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }
}
