//! `CachedBackend`: the answer cache as a decorator over any [`Backend`].
//!
//! `submit` resolves once admission is settled. An L1 hit is answered inside `submit` from a
//! pre-filled channel (no task, no Redis); with Redis configured the ask is also noted, and the
//! notes are added to the fleet's hot counts in batches (every [`ASK_FLUSH`]) by a spawned task,
//! which promotes an L1 answer to Redis when its key turns hot — so a question one node answers
//! from memory still becomes hot for the fleet. A miss starts (or joins) a single flight whose
//! driver task does the Redis lookup and the inner `submit`; every caller's `submit` awaits the
//! flight's settlement, so a refusal (queue full, prompt too long) is its `Err` with or without
//! Redis. The generation and the fill of both levels run in that task. Needs a tokio runtime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::entry::{self, Expect};
use super::flight::{Caller, Flight, Flights, Joined};
use super::key::cache_key;
use super::l1::L1;
use super::redis_store::L2;
use super::replay;
use super::semantic::{Embedded, FillSource, Question, SemanticTier};
use super::{
    CacheConfig, CacheError, CacheKey, CacheMetrics, CachedAnswer, Clock, ModelIdentity, Secret,
    SystemClock,
};
use crate::engine::{
    Backend, CachePolicy, EngineError, EventStream, FinishReason, GenerationEvent,
    GenerationRequest, ModelInfo, Source,
};

/// A [`Backend`] that answers repeated deterministic requests from L1 (process memory) or L2
/// (Redis), runs one generation for identical concurrent requests, and stores what the inner
/// backend finishes. Redis faults never fail a request.
///
/// Behaviour worth knowing at the call site:
/// - Requests for a model without a [`ModelIdentity`] pass straight through, uncached.
/// - A refusal by the inner backend is `submit`'s `Err` for the leader and every joiner.
/// - Joiners of a single flight get `Source::Model` (the answer was generated now, once).
pub struct CachedBackend {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Arc<dyn Backend>,
    identities: RwLock<HashMap<String, ModelIdentity>>,
    config: CacheConfig,
    l1: L1,
    l2: Option<Arc<L2>>,
    flights: Flights,
    clock: Arc<dyn Clock>,
    metrics: CacheMetrics,
    /// The fleet secret L2 values are signed with (empty only when `redis_insecure`).
    secret: Secret,
    /// Asks answered by L1 and not yet counted in Redis.
    asks: Mutex<AskNotes>,
    /// The semantic tier, when `cache.semantic.enabled`.
    semantic: Option<SemanticTier>,
}

/// How long L1-answered asks are gathered before one batch adds them to the Redis counts.
pub const ASK_FLUSH: Duration = Duration::from_millis(100);

/// Longest an L2 hit's question waits for its callers to take their whole answer before it is
/// embedded anyway (a caller that reads slowly must not hold the fill for ever).
const FILL_WAIT_MAX: Duration = Duration::from_millis(250);

/// L1-answered asks since the last flush: per key, the model digest and the number of asks.
#[derive(Default)]
struct AskNotes {
    pending: HashMap<CacheKey, (String, u64)>,
    /// A flush task is scheduled.
    flushing: bool,
}

impl CachedBackend {
    /// Wraps `inner`. `identities` maps each served model id to what identifies its weights;
    /// no connection is made here (Redis is reached lazily, so a node boots with Redis down).
    pub fn new(
        inner: Arc<dyn Backend>,
        identities: HashMap<String, ModelIdentity>,
        config: CacheConfig,
    ) -> Result<Self, CacheError> {
        Self::with_clock(inner, identities, config, Arc::new(SystemClock))
    }

    /// As [`CachedBackend::new`], with the clock that the hard max age is checked against.
    pub fn with_clock(
        inner: Arc<dyn Backend>,
        identities: HashMap<String, ModelIdentity>,
        config: CacheConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, CacheError> {
        config.validate()?;
        let metrics = CacheMetrics::new();
        if config.redis_url.is_some() && config.redis_insecure {
            tracing::warn!(
                "cache.redis_insecure: Redis values are not signed with a fleet secret; anyone \
                 who can write to this Redis can plant answers"
            );
        }
        let l2 = match &config.redis_url {
            Some(url) => Some(Arc::new(L2::new(
                url,
                &config,
                metrics.clone(),
                clock.clone(),
            )?)),
            None => None,
        };
        let semantic = if config.semantic.enabled {
            Some(SemanticTier::load(
                config.semantic.clone(),
                metrics.clone(),
            )?)
        } else {
            None
        };
        Ok(Self {
            shared: Arc::new(Shared {
                semantic,
                inner,
                identities: RwLock::new(identities),
                l1: L1::new(&config, clock.clone()),
                l2,
                flights: Flights::default(),
                clock,
                metrics,
                secret: config.redis_secret.clone().unwrap_or_default(),
                asks: Mutex::default(),
                config,
            }),
        })
    }

    /// Start caching answers of `identity.model_id` (called once its model is loaded; requests
    /// before that pass through uncached).
    pub fn set_identity(&self, identity: ModelIdentity) {
        self.shared
            .identities
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(identity.model_id.clone(), identity);
    }

    /// This cache's metrics; register them with `CacheMetrics::register`.
    pub fn metrics(&self) -> &CacheMetrics {
        &self.shared.metrics
    }

    /// Keys whose generation, or the Redis write after it, is still running. Zero means every
    /// answer streamed so far has been stored wherever it will be.
    pub fn in_flight(&self) -> usize {
        self.shared.flights.in_flight()
    }

    /// Drops every answer held in process (L1); Redis is untouched. For an admin purge after a
    /// model swap that kept its digest, and for benchmarks of the L2 path.
    pub fn clear_l1(&self) {
        self.shared.l1.clear();
        self.shared.publish_l1_bytes();
    }

    /// Loads the `top_k` most-asked answers from Redis into L1 (at start, or when a standby node
    /// joins). Values failing a check are deleted. With the semantic tier on, the question each
    /// answer carries is embedded and indexed before this returns (a few ms each, on the blocking
    /// pool), so the node is ready to match paraphrases of the fleet's hot questions. Returns how
    /// many answers were loaded.
    pub async fn prewarm_from_redis(&self, top_k: usize) -> usize {
        let s = &self.shared;
        let Some(l2) = &s.l2 else { return 0 };
        let digests: Vec<String> = s
            .identities
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|i| i.file_digest.clone())
            .collect();
        let digests: Vec<&str> = digests.iter().map(String::as_str).collect();
        let mut loaded = 0;
        for key in l2.hot_keys(top_k).await {
            if s.l1.get(&key).is_some() {
                continue;
            }
            let Some(bytes) = l2.get(&key).await else {
                continue;
            };
            match entry::decode(&bytes, &s.expect(&key, &digests)) {
                Ok(answer) => {
                    let answer = Arc::new(answer);
                    s.l1.insert(key, answer.clone());
                    loaded += 1;
                    fill_index(s, key, &answer, FillSource::Prewarm).await;
                }
                Err(e) => s.reject(&key, e),
            }
        }
        s.publish_l1_bytes();
        loaded
    }
}

#[async_trait::async_trait]
impl Backend for CachedBackend {
    fn models(&self) -> Vec<ModelInfo> {
        self.shared.inner.models()
    }

    async fn submit(&self, request: GenerationRequest) -> Result<EventStream, EngineError> {
        let s = &self.shared;
        let policy = request.cache_policy;
        if request.logprobs.is_some() {
            // Entries hold text, not log-probabilities: a request that asks for them neither
            // reads the cache (a hit could not answer it) nor fills it, nor joins a flight.
            return match policy {
                CachePolicy::OnlyIfCached => Err(EngineError::NotCached),
                _ => s.inner.submit(request).await,
            };
        }
        let identity = s
            .identities
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&request.model)
            .cloned();
        let Some(identity) = identity else {
            return match policy {
                CachePolicy::OnlyIfCached => Err(EngineError::NotCached),
                _ => s.inner.submit(request).await,
            };
        };
        let cacheable = request.sampling.is_deterministic() || s.config.cache_nondeterministic;
        match (policy, cacheable) {
            (CachePolicy::Bypass, _) => return s.inner.submit(request).await,
            (CachePolicy::OnlyIfCached, false) => return Err(EngineError::NotCached),
            (CachePolicy::Default, false) if s.config.sampled_variants > 0 => {
                if let Some(l2) = s.l2.clone() {
                    let key = cache_key(&identity, &request, s.config.normalize);
                    return sampled(s.clone(), l2, key, identity.file_digest.clone(), request)
                        .await;
                }
                return s.inner.submit(request).await;
            }
            (_, false) => return s.inner.submit(request).await,
            _ => {}
        }
        let started = Instant::now();
        let key = cache_key(&identity, &request, s.config.normalize);
        let question = s
            .semantic
            .as_ref()
            .and_then(|tier| tier.question(&identity, &request, s.config.normalize));
        let read = policy != CachePolicy::Refresh;
        if read {
            if let Some(answer) = s.l1.get(&key) {
                s.metrics.hit("l1");
                note_ask(s, key, &identity.file_digest);
                return Ok(prefilled(
                    &answer,
                    s.config.chunk_chars,
                    Source::CacheL1,
                    started,
                ));
            }
            s.metrics.miss("l1");
        }
        let digest = identity.file_digest.clone();
        if policy == CachePolicy::OnlyIfCached {
            let Some(l2) = s.l2.clone() else {
                return Err(EngineError::NotCached);
            };
            return only_if_cached(s, &l2, key, &digest, started).await;
        }
        let caller = Caller {
            arrival: started,
            deadline: request.deadline,
        };
        // The shared generation belongs to no single caller: it runs without a deadline and each
        // subscriber's stream ends at its own (see `flight`), so it stops only once every
        // interested caller has gone.
        let mut request = request;
        request.deadline = None;
        let (flight, stream) = match s.flights.join_or_lead(key, caller) {
            Joined::Follow(flight, stream) => {
                s.metrics.singleflight_joins.inc();
                flight.admitted().await?;
                return Ok(stream);
            }
            Joined::Lead(flight, stream) => (flight, stream),
        };
        // Driven by its own task (it outlives this caller when others join), which settles the
        // flight once the lookup or the inner `submit` has answered.
        tokio::spawn(lead(
            s.clone(),
            key,
            digest,
            flight.clone(),
            request,
            question,
            started,
        ));
        flight.admitted().await?;
        Ok(stream)
    }
}

/// Notes an ask that L1 answered, for the next batch of Redis counts (nothing without Redis).
/// Schedules the batch's flush when none is pending.
fn note_ask(s: &Arc<Shared>, key: CacheKey, digest: &str) {
    if s.l2.is_none() {
        return;
    }
    let mut notes = s.asks.lock().unwrap_or_else(|e| e.into_inner());
    notes
        .pending
        .entry(key)
        .or_insert_with(|| (digest.to_string(), 0))
        .1 += 1;
    if !notes.flushing {
        notes.flushing = true;
        tokio::spawn(flush_asks(Arc::clone(s)));
    }
}

/// After [`ASK_FLUSH`], adds the noted asks to the Redis counts in one call; a key whose count
/// crossed the hot threshold with these asks gets the answer L1 holds written to Redis (no
/// second generation).
async fn flush_asks(s: Arc<Shared>) {
    tokio::time::sleep(ASK_FLUSH).await;
    let pending = {
        let mut notes = s.asks.lock().unwrap_or_else(|e| e.into_inner());
        notes.flushing = false;
        std::mem::take(&mut notes.pending)
    };
    let Some(l2) = s.l2.clone() else {
        return;
    };
    let batch: Vec<(CacheKey, u64)> = pending.iter().map(|(k, (_, n))| (*k, *n)).collect();
    let Some(counts) = l2.count_asks(&batch).await else {
        return;
    };
    let threshold = s.config.hot_threshold;
    for ((key, added), count) in batch.into_iter().zip(counts) {
        if count < threshold || count - added >= threshold {
            continue;
        }
        if let (Some(answer), Some((digest, _))) = (s.l1.get(&key), pending.get(&key)) {
            store_if_hot(&s, &key, digest, &answer, Some(count)).await;
        }
    }
}

/// A sampled request (temperature > 0, no seed) with Redis: once its question is hot and the
/// fleet keeps `sampled_variants` answers for it, one of them at random; otherwise a generation
/// of its own (no single flight: each caller draws its own sample), whose answer is added to the
/// kept ones while the question is hot and fewer are kept.
async fn sampled(
    s: Arc<Shared>,
    l2: Arc<L2>,
    key: CacheKey,
    digest: String,
    request: GenerationRequest,
) -> Result<EventStream, EngineError> {
    let started = Instant::now();
    let want = s.config.sampled_variants;
    let (count, kept) = l2.lookup_variants(&key).await.unwrap_or((0, Vec::new()));
    let hot = count >= s.config.hot_threshold;
    if hot && kept.len() >= want {
        let mut valid = Vec::new();
        for (i, bytes) in kept.into_iter().enumerate() {
            match entry::decode(&bytes, &s.expect(&key, &[&digest])) {
                Ok(answer) => valid.push((i, answer)),
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "refusing a kept sampled answer; removing it");
                    s.metrics.rejected_values.inc();
                    let l2 = l2.clone();
                    tokio::spawn(async move { l2.remove_variant(&key, bytes).await });
                }
            }
        }
        if !valid.is_empty() {
            let (i, answer) = &valid[rand::Rng::random_range(&mut rand::rng(), 0..valid.len())];
            s.metrics.hit("l2");
            let source = Source::CacheVariant(*i as u32 + 1);
            return Ok(prefilled(answer, s.config.chunk_chars, source, started));
        }
    }
    s.metrics.miss("l2");
    s.metrics.generations.inc();
    let inner = s.inner.submit(request).await?;
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(keep_variant(s, l2, key, digest, hot, inner, tx));
    Ok(rx)
}

/// Forwards a sampled generation to its caller; when its question is hot, adds the finished
/// answer to the fleet's kept variants.
async fn keep_variant(
    s: Arc<Shared>,
    l2: Arc<L2>,
    key: CacheKey,
    digest: String,
    hot: bool,
    mut inner: EventStream,
    tx: mpsc::Sender<Result<GenerationEvent, EngineError>>,
) {
    let mut text = String::new();
    let completion = loop {
        let event = tokio::select! {
            event = inner.recv() => event,
            () = tx.closed() => return, // the caller left: dropping `inner` cancels
        };
        match event {
            Some(Ok(GenerationEvent::Delta(d))) => {
                text.push_str(&d);
                if tx.send(Ok(GenerationEvent::Delta(d))).await.is_err() {
                    return;
                }
            }
            Some(Ok(GenerationEvent::Finished(c))) => break c,
            // Requests that ask for log-probabilities never come through the cache.
            Some(Ok(GenerationEvent::Logprobs(_))) => {}
            Some(Err(e)) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            None => {
                let lost = EngineError::Internal("backend stream closed before Finished".into());
                let _ = tx.send(Err(lost)).await;
                return;
            }
        }
    };
    let keep = hot && completion.finish_reason != FinishReason::Cancelled;
    let answer = CachedAnswer::finished(text, &completion, s.clock.now_ms());
    let _ = tx.send(Ok(GenerationEvent::Finished(completion))).await;
    if keep {
        if let Some(bytes) = s.sealed(&key, &digest, &answer) {
            if l2
                .add_variant(&key, bytes, s.config.max_age, s.config.sampled_variants)
                .await
            {
                s.metrics.hot_promotions.inc();
            }
        }
    }
}

/// A stream already holding every event of the replay: no task, nothing to await.
fn prefilled(
    answer: &CachedAnswer,
    chunk_chars: usize,
    source: Source,
    started: Instant,
) -> EventStream {
    let events = replay::events(answer, chunk_chars, source, started.elapsed());
    let (tx, rx) = mpsc::channel(events.len().max(1));
    for event in events {
        // Capacity equals the number of events and the receiver is alive: cannot fail.
        let _ = tx.try_send(Ok(event));
    }
    rx
}

impl Shared {
    fn expect<'a>(&'a self, key: &'a CacheKey, digests: &'a [&'a str]) -> Expect<'a> {
        Expect {
            key,
            digests,
            max_bytes: self.config.max_value_bytes,
            now_ms: self.clock.now_ms(),
            max_age_ms: self.config.max_age.as_millis() as u64,
            secret: &self.secret,
        }
    }

    /// Reads and checks the L2 value; a bad one is deleted (in the background) and is a miss.
    fn check_l2(
        &self,
        key: &CacheKey,
        digest: &str,
        bytes: Option<Vec<u8>>,
    ) -> Option<CachedAnswer> {
        let Some(bytes) = bytes else {
            self.metrics.miss("l2");
            return None;
        };
        match entry::decode(&bytes, &self.expect(key, &[digest])) {
            Ok(answer) => {
                self.metrics.hit("l2");
                Some(answer)
            }
            Err(e) => {
                self.metrics.miss("l2");
                self.reject(key, e);
                None
            }
        }
    }

    /// `answer` as a signed Redis value, unless it is over `max_value_bytes`.
    fn sealed(&self, key: &CacheKey, digest: &str, answer: &CachedAnswer) -> Option<Vec<u8>> {
        let bytes = entry::encode(key, digest, answer, &self.secret);
        (bytes.len() <= self.config.max_value_bytes).then_some(bytes)
    }

    fn reject(&self, key: &CacheKey, why: entry::EnvelopeError) {
        tracing::warn!(key = %key, error = %why, "refusing cached value; deleting it");
        self.metrics.rejected_values.inc();
        if let Some(l2) = self.l2.clone() {
            let key = *key;
            tokio::spawn(async move { l2.delete(&key).await });
        }
    }

    fn publish_l1_bytes(&self) {
        self.metrics
            .l1_bytes
            .set(i64::try_from(self.l1.weighted_bytes()).unwrap_or(i64::MAX));
    }
}

/// `OnlyIfCached` after an L1 miss: Redis's answer, or `NotCached`. Its question is indexed by
/// a task of its own.
async fn only_if_cached(
    s: &Arc<Shared>,
    l2: &L2,
    key: CacheKey,
    digest: &str,
    started: Instant,
) -> Result<EventStream, EngineError> {
    let found = l2.lookup(&key, true, false).await;
    let answer = s
        .check_l2(&key, digest, found.value)
        .ok_or(EngineError::NotCached)?;
    let answer = Arc::new(answer);
    s.l1.insert(key, answer.clone());
    s.publish_l1_bytes();
    if s.semantic.is_some() && answer.question.is_some() {
        let (s, answer) = (s.clone(), answer.clone());
        tokio::spawn(async move { fill_index(&s, key, &answer, FillSource::L2).await });
    }
    Ok(prefilled(
        &answer,
        s.config.chunk_chars,
        Source::CacheL2,
        started,
    ))
}

/// Settles a flight with an error if its driver ends (or panics) before settling it, so no
/// caller waits on an admission that will never come.
struct SettleOnDrop(Arc<Flight>);

impl Drop for SettleOnDrop {
    fn drop(&mut self) {
        self.0.settle(Err(EngineError::Internal(
            "the shared generation ended before it was admitted".into(),
        )));
    }
}

/// Drives a new flight: the Redis lookup (when L2 is configured and the policy reads), then the
/// semantic tier (when on and `question` qualifies), else the inner `submit`; settles the flight
/// with the outcome, then pumps the generation.
async fn lead(
    s: Arc<Shared>,
    key: CacheKey,
    digest: String,
    flight: Arc<Flight>,
    request: GenerationRequest,
    question: Option<Question>,
    started: Instant,
) {
    let _settle = SettleOnDrop(flight.clone());
    let read = request.cache_policy != CachePolicy::Refresh;
    let mut count = None;
    if let Some(l2) = s.l2.clone() {
        let found = l2.lookup(&key, read, true).await;
        count = found.count;
        if read {
            if let Some(answer) = s.check_l2(&key, &digest, found.value) {
                let answer = Arc::new(answer);
                s.l1.insert(key, answer.clone());
                s.publish_l1_bytes();
                let events = replay::events(
                    &answer,
                    s.config.chunk_chars,
                    Source::CacheL2,
                    started.elapsed(),
                );
                flight.settle(Ok(()));
                flight.push(events.into_iter().map(Ok), true);
                // The question is indexed after every caller has its whole answer (their
                // streams hold it all: the embedding would otherwise take the cores the
                // replay needs), in this task, before the flight leaves the table
                // (`in_flight() == 0` then means it is indexed too). Callers that come
                // meanwhile are answered by L1.
                if s.semantic.is_some() && answer.question.is_some() {
                    let _ = tokio::time::timeout(FILL_WAIT_MAX, flight.unwatched()).await;
                    fill_index(&s, key, &answer, FillSource::L2).await;
                }
                s.flights.finish(&key, &flight);
                return;
            }
        }
        if s.flights.abandon_if_unwatched(&key, &flight) {
            return; // everyone left during the lookup
        }
    }
    let mut embedded = None;
    if let (Some(tier), Some(question)) = (&s.semantic, question) {
        // Only now, on an exact miss, is the question embedded.
        if let Some(e) = tier.embed(question).await {
            if read {
                if let Some(answer) = semantic_answer(&s, tier, &e) {
                    let events = replay::events(
                        &answer,
                        s.config.chunk_chars,
                        Source::CacheSemantic,
                        started.elapsed(),
                    );
                    flight.settle(Ok(()));
                    flight.push(events.into_iter().map(Ok), true);
                    s.flights.finish(&key, &flight);
                    return;
                }
            }
            embedded = Some(e);
        }
        if s.flights.abandon_if_unwatched(&key, &flight) {
            return; // everyone left during the embedding
        }
    }
    s.metrics.generations.inc();
    match s.inner.submit(request).await {
        Ok(inner) => {
            flight.settle(Ok(()));
            drive(s, key, digest, flight, inner, count, embedded).await;
        }
        Err(e) => {
            flight.settle(Err(e.clone()));
            flight.push([Err(e)], true);
            s.flights.finish(&key, &flight);
        }
    }
}

/// Indexes the question of `answer`, just loaded from Redis into L1 under `key`, when the
/// semantic tier is on and the answer carries one (see [`SemanticTier::fill`]).
async fn fill_index(s: &Shared, key: CacheKey, answer: &CachedAnswer, from: FillSource) {
    if let (Some(tier), Some(question)) = (&s.semantic, &answer.question) {
        tier.fill(question.clone(), key, from).await;
    }
}

/// The L1 answer of the stored question `e` matches, if any; a match whose answer has left L1
/// is forgotten (a miss).
fn semantic_answer(s: &Shared, tier: &SemanticTier, e: &Embedded) -> Option<Arc<CachedAnswer>> {
    let original = tier.lookup(e)?;
    match s.l1.get(&original) {
        Some(answer) => {
            s.metrics.hit("semantic");
            Some(answer)
        }
        None => {
            tier.forget(&e.question.scope, &original);
            s.metrics.miss("semantic");
            None
        }
    }
}

/// Pumps the inner stream into the flight; on a successful finish stores the answer in L1 (and
/// its question in the semantic index when `embedded`, and with the answer, which carries it
/// into Redis), and in L2 when the key is hot (`count >= hot_threshold`).
async fn drive(
    s: Arc<Shared>,
    key: CacheKey,
    digest: String,
    flight: Arc<Flight>,
    mut inner: EventStream,
    count: Option<u64>,
    embedded: Option<Embedded>,
) {
    let mut text = String::new();
    let completion = loop {
        let event = tokio::select! {
            event = inner.recv() => event,
            _ = flight.unwatched() => {
                if s.flights.abandon_if_unwatched(&key, &flight) {
                    return; // dropping `inner` cancels the generation
                }
                continue;
            }
        };
        match event {
            Some(Ok(GenerationEvent::Delta(d))) => {
                text.push_str(&d);
                flight.push([Ok(GenerationEvent::Delta(d))], false);
            }
            Some(Ok(GenerationEvent::Finished(c))) => break c,
            // Requests that ask for log-probabilities never come through the cache.
            Some(Ok(GenerationEvent::Logprobs(_))) => {}
            Some(Err(e)) => {
                flight.push([Err(e)], true);
                s.flights.finish(&key, &flight);
                return;
            }
            None => {
                let lost = EngineError::Internal("backend stream closed before Finished".into());
                flight.push([Err(lost)], true);
                s.flights.finish(&key, &flight);
                return;
            }
        }
    };
    if completion.finish_reason == FinishReason::Cancelled {
        flight.push([Ok(GenerationEvent::Finished(completion))], true);
        s.flights.finish(&key, &flight);
        return;
    }
    let mut answer = CachedAnswer::finished(text, &completion, s.clock.now_ms());
    answer.question = embedded.as_ref().map(|e| e.question.clone());
    let answer = Arc::new(answer);
    // L1 before the caller sees `Finished` and before leaving the table: whoever asks next
    // either joins or hits.
    s.l1.insert(key, answer.clone());
    if let (Some(tier), Some(e)) = (&s.semantic, embedded) {
        tier.insert(e, key);
    }
    flight.push([Ok(GenerationEvent::Finished(completion))], true);
    s.publish_l1_bytes();
    // The flight stays in the table until the Redis write is done (joiners replay its log), so
    // `in_flight() == 0` means every fill has landed.
    store_if_hot(&s, &key, &digest, &answer, count).await;
    s.flights.finish(&key, &flight);
}

async fn store_if_hot(
    s: &Shared,
    key: &CacheKey,
    digest: &str,
    answer: &CachedAnswer,
    count: Option<u64>,
) {
    let (Some(l2), Some(count)) = (&s.l2, count) else {
        return;
    };
    if count < s.config.hot_threshold {
        return;
    }
    let Some(bytes) = s.sealed(key, digest, answer) else {
        return;
    };
    let ttl = s.config.max_age.saturating_sub(Duration::from_millis(
        s.clock.now_ms().saturating_sub(answer.created_at_ms),
    ));
    if l2.store(key, bytes, ttl, count).await {
        s.metrics.hot_promotions.inc();
    }
}
