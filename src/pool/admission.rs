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
//!
//! A request naming its conversation (a session key) looks first at the instance that served
//! that conversation last, which holds its latest turns: that instance takes it whenever it has
//! a free slot, even when another is less loaded; another instance leaves it to that one by the
//! same rule as above, counting the tokens that one holds beyond its own. When the session's
//! instance lost the prefix (evicted), the prefix probe decides as for any request. The map from
//! session to instance is bounded ([`MAX_SESSIONS`], least recently served forgotten first) and
//! keeps a keyed hash of each key, never the key.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
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
/// Conversations per model whose last instance is remembered (~100 bytes each).
pub const MAX_SESSIONS: usize = 16_384;

/// A queued request, the chained keys of its prompt's reusable blocks, and its session's hash.
struct Queued {
    a: Admitted,
    keys: Vec<BlockKey>,
    session: Option<u64>,
}

/// Which instance served each conversation last: a map bounded to `cap` entries, the least
/// recently served dropped first.
struct Sessions {
    cap: usize,
    tick: u64,
    last: HashMap<u64, (usize, u64)>,
    by_age: BTreeMap<u64, u64>,
}

impl Sessions {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            tick: 0,
            last: HashMap::new(),
            by_age: BTreeMap::new(),
        }
    }

    /// The instance that served `session` last, if remembered.
    fn get(&self, session: u64) -> Option<usize> {
        self.last.get(&session).map(|&(instance, _)| instance)
    }

    /// `instance` took a turn of `session`.
    fn served(&mut self, session: u64, instance: usize) {
        self.tick += 1;
        if let Some((_, old)) = self.last.insert(session, (instance, self.tick)) {
            self.by_age.remove(&old);
        }
        self.by_age.insert(self.tick, session);
        while self.last.len() > self.cap {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            self.last.remove(&oldest);
        }
    }
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
    /// Session → the instance that served it last. Locked after `queue`, never before.
    sessions: Mutex<Sessions>,
    /// Keys the session hashes, so callers cannot aim collisions at each other's sessions.
    hasher: RandomState,
    /// Set to the queue's length on every change (`qnode_queue_depth`), under the queue's lock.
    depth: Option<prometheus::IntGauge>,
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
            sessions: Mutex::new(Sessions::new(MAX_SESSIONS)),
            hasher: RandomState::new(),
            depth: None,
        }
    }

    /// Report the queue's length to `gauge` whenever it changes, so it returns to 0 when the
    /// instances have taken everything.
    pub fn with_depth_gauge(mut self, gauge: prometheus::IntGauge) -> Self {
        gauge.set(0);
        self.depth = Some(gauge);
        self
    }

    fn publish(&self, queue: &VecDeque<Queued>) {
        if let Some(g) = &self.depth {
            g.set(queue.len() as i64);
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
            self.publish(&queue);
            return Err(QueueFull);
        }
        // Only stores of several instances need the keys and the session (to choose between
        // them).
        let (keys, session) = match self.stores.first() {
            Some(s) if self.stores.len() > 1 && !request.prompt.is_empty() => (
                s.keys(&request.prompt[..request.prompt.len() - 1]),
                request.session.as_ref().map(|k| self.hasher.hash_one(k)),
            ),
            _ => (Vec::new(), None),
        };
        queue.push_back(Queued {
            a: request,
            keys,
            session,
        });
        let depth = queue.len();
        self.publish(&queue);
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
            let taken = queue.drain(..).map(|q| q.a).collect();
            self.publish(&queue);
            taken
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
        self.publish(queue);
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
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for (idx, q) in queue.iter().enumerate().take(SCAN) {
            // Recomputing `extra` tokens here costs this much; wait no longer than that.
            let defer = |extra: usize| {
                let saving = self.time_per_token() * extra as u32;
                let waited = now.saturating_duration_since(q.a.arrived);
                (waited < saving).then(|| saving - waited)
            };
            if let Some(owner) = q.session.and_then(|s| sessions.get(s)) {
                if owner == instance {
                    return Ok(idx);
                }
                let held = |i: usize| self.stores.get(i).map_or(0, |s| s.probe(&q.keys));
                let extra = held(owner).saturating_sub(held(instance));
                if extra > 0 {
                    match defer(extra) {
                        Some(left) => {
                            next_turn = Some(next_turn.map_or(left, |n| n.min(left)));
                            continue;
                        }
                        None => return Ok(idx),
                    }
                }
                // The session's instance lost its prefix: the probe decides.
            }
            let (mine, best_other) = self.cached_tokens(instance, &q.keys);
            if best_other > mine {
                if let Some(left) = defer(best_other - mine) {
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

    /// `instance` takes `q`: it serves `q`'s session from now on.
    fn taken(&self, q: Queued, instance: usize) -> Admitted {
        if let Some(session) = q.session {
            self.sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .served(session, instance);
        }
        q.a
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
            Ok(idx) => {
                let q = queue.remove(idx);
                self.publish(&queue);
                return q.map(|q| self.taken(q, instance));
            }
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
            Ok(idx) => {
                let q = queue.remove(idx);
                self.publish(&queue);
                q.map(|q| self.taken(q, instance))
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampler::Sampler;
    use crate::engine::EventStream;
    use crate::model::kv_cache::KvCache;
    use crate::types::SamplingParams;
    use candle_core::Device;

    const BLOCK: usize = 16;

    fn queued(
        prompt: Vec<u32>,
        session: Option<&str>,
        arrived: Instant,
    ) -> (Admitted, EventStream) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let a = Admitted {
            request_id: "t".into(),
            prompt,
            max_tokens: 1,
            stop: Vec::new(),
            sampler: Sampler::new(&SamplingParams::default()),
            tx,
            arrived,
            deadline: None,
            session: session.map(str::to_owned),
            constraint: None,
            logprobs: None,
        };
        (a, rx)
    }

    fn kv(len: usize) -> KvCache {
        KvCache::new(1, 1, 2, len.max(1), &Device::Cpu)
    }

    /// Two instances, each with an empty prefix store.
    fn two_instances() -> Admission {
        let vpp = kv(1).bytes_per_position();
        let stores = (0..2)
            .map(|_| Arc::new(PrefixStore::new("m", BLOCK, vpp, 1 << 20, None)))
            .collect();
        Admission::new(16, 2, 8).with_prefix_stores(stores)
    }

    /// Store the KV of `tokens` in instance `i`'s prefix store.
    fn hold(admission: &Admission, i: usize, tokens: &[u32]) {
        let mut cache = kv(tokens.len());
        cache.reserve(tokens.len()).unwrap();
        let zeros = [0f32; 2];
        cache
            .write_host(0, tokens.len(), |_| &zeros, |_| &zeros)
            .unwrap();
        cache.advance(tokens.len());
        admission.stores[i].insert(tokens, &cache);
    }

    #[test]
    fn sessions_forget_the_least_recently_served_first() {
        let mut s = Sessions::new(2);
        s.served(1, 0);
        s.served(2, 1);
        s.served(1, 1); // 1 is now the most recent
        s.served(3, 0); // drops 2
        assert_eq!((s.get(1), s.get(2), s.get(3)), (Some(1), None, Some(0)));
        assert_eq!((s.last.len(), s.by_age.len()), (2, 2));
    }

    #[test]
    fn a_session_goes_back_to_its_instance_even_when_another_is_less_loaded() {
        let q = two_instances();
        let now = Instant::now();
        let (first, _rx1) = queued((0..40).collect(), Some("conv-1"), now);
        q.push(first).unwrap();
        // Both idle: instance 1 takes it and now serves conv-1.
        assert!(q.take(1, 8, None).is_some());
        // Instance 1 has 1 free slot, instance 0 has 8. A request of no session is left to the
        // less loaded instance 0; the next turn of conv-1 is taken by instance 1.
        let (other, _rx2) = queued((100..140).collect(), None, now);
        q.push(other).unwrap();
        assert!(q.take(1, 1, None).is_none(), "no session: least loaded");
        let (turn, _rx3) = queued((0..60).collect(), Some("conv-1"), now);
        q.push(turn).unwrap();
        let got = q.take(1, 1, None).expect("conv-1 goes back to instance 1");
        assert_eq!(got.session.as_deref(), Some("conv-1"));
        // Instance 0 then takes the session-less one.
        assert!(q.take(0, 8, None).is_some());
        assert!(q.is_empty());
    }

    #[test]
    fn another_instance_waits_for_the_session_only_as_long_as_recomputing_costs() {
        let q = two_instances();
        q.ns_per_token.store(1_000_000_000, Ordering::Relaxed); // 1 s per token
        let now = Instant::now();
        let (first, _rx1) = queued((0..40).collect(), Some("conv-1"), now);
        q.push(first).unwrap();
        assert!(q.take(1, 8, None).is_some());
        hold(&q, 1, &(0..40).collect::<Vec<_>>());
        // Instance 0 leaves the next turn to instance 1 (32 tokens = 32 s to recompute)...
        let (fresh, _rx2) = queued((0..60).collect(), Some("conv-1"), now);
        q.push(fresh).unwrap();
        assert!(q.take(0, 8, None).is_none(), "recomputing costs 32 s");
        // ...but takes one that has waited longer than that.
        let long_ago = now - Duration::from_secs(60);
        let (old, _rx3) = queued((0..61).collect(), Some("conv-1"), long_ago);
        q.push(old).unwrap();
        let got = q.take(0, 8, None).expect("waited beyond the saving");
        assert_eq!(got.prompt.len(), 61);
        // It served that turn, so it is conv-1's instance now: it takes the other turn too.
        assert_eq!(q.take(0, 8, None).map(|a| a.prompt.len()), Some(60));
    }
}
