//! One live generation inside an instance: prompt progress, sampling, detokenization, stop
//! strings, and delivery of text to the caller without ever blocking the batch.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use super::detokenizer::IncrementalDecoder;
use super::logprobs::LogprobSpec;
use super::prefix::PrefixStore;
use super::sampler::Sampler;
use super::stop::StopMatcher;
use super::{Completion, EngineError, FinishReason, GenerationEvent, Source, Timings};
use crate::constrain::Constraint;
use crate::model::kv_cache::KvCache;
use crate::model::tokenizer::GgufTokenizer;
use crate::types::TokenLogprob;

/// Sender half of a request's event channel.
pub type EventSender = Sender<Result<GenerationEvent, EngineError>>;

/// A request admitted to the queue: tokenized, checked, waiting for a batch slot.
pub struct Admitted {
    /// Caller's id, for logs.
    pub request_id: String,
    /// Rendered prompt tokens.
    pub prompt: Vec<u32>,
    /// New tokens allowed.
    pub max_tokens: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// The request's own sampler (seeded).
    pub sampler: Sampler,
    /// Where events go.
    pub tx: EventSender,
    /// When the request arrived at the node.
    pub arrived: Instant,
    /// When the caller stops waiting.
    pub deadline: Option<Instant>,
    /// The conversation it continues, if the caller named one: dispatch prefers the instance
    /// that served the conversation last.
    pub session: Option<String>,
    /// The grammar the output must follow, compiled; `None` for free text (which then costs
    /// nothing here).
    pub constraint: Option<Constraint>,
    /// Report each token's log-probabilities; `None` (nearly every request) computes nothing.
    pub logprobs: Option<LogprobSpec>,
}

/// Why a sequence left the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Finished normally; `Finished` was sent.
    Done,
    /// The caller went away; nothing more to send.
    Gone,
    /// Ended with an error sent to the caller (deadline, internal failure).
    Failed,
}

/// Reply positions reserved with the prompt when a sequence starts; a longer reply grows the
/// cache as it goes.
const REPLY_RESERVE: usize = 256;

/// A live sequence in an instance's batch.
pub struct Sequence {
    /// Queue entry it came from.
    pub req: Admitted,
    /// Its KV cache.
    pub cache: KvCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Prompt tokens whose keys and values came from the prefix store.
    cached: usize,
    /// Where this sequence's blocks go when it ends (`None`: nowhere, or already kept).
    store: Option<Arc<PrefixStore>>,
    /// Prompt then generated tokens (the repetition penalty's history).
    tokens: Vec<u32>,
    prompt_len: usize,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    /// Text produced but not yet accepted by the caller's channel.
    pending: String,
    /// Log-probabilities of tokens not yet sent (requests that ask only); they go just before
    /// the text that follows them.
    pending_logprobs: Vec<TokenLogprob>,
    admitted: Instant,
    first_token: Option<Instant>,
}

impl Sequence {
    /// Start a sequence with a (cleared) cache.
    pub fn new(mut req: Admitted, mut cache: KvCache) -> Self {
        cache.clear();
        let stop = StopMatcher::new(&req.stop);
        let tokens = std::mem::take(&mut req.prompt);
        // One allocation sized to the prompt and a typical reply, before the prefix store fills
        // the cache block by block: growing as the blocks arrived doubled the buffers three or
        // four times at long histories (a copy and a zero fill each) and left them up to twice
        // the size needed. Clamped to the cache's limit, this cannot fail; were it to, the
        // first step's own `reserve` reports it.
        let expected = tokens.len() + req.max_tokens.min(REPLY_RESERVE);
        let _ = cache.reserve(expected.min(cache.max_len()));
        Self {
            prompt_len: tokens.len(),
            tokens,
            req,
            cache,
            prefilled: 0,
            cached: 0,
            store: None,
            decoder: IncrementalDecoder::new(),
            stop,
            pending: String::new(),
            pending_logprobs: Vec::new(),
            admitted: Instant::now(),
            first_token: None,
        }
    }

    /// Start from the longest prefix of the prompt that `store` holds (copied into this
    /// sequence's cache), so only the rest is prefilled, and keep this sequence's own blocks
    /// there when it ends. Call before the first step. Returns the prompt tokens reused.
    pub fn reuse_prefix(&mut self, store: &Arc<PrefixStore>) -> usize {
        let n = store.restore(&self.tokens[..self.prompt_len], &mut self.cache);
        self.prefilled = n;
        self.cached = n;
        self.store = Some(Arc::clone(store));
        n
    }

    /// Hand the blocks (and the tail) of this sequence's computed positions (prompt and the generated
    /// tokens fed back so far) to its prefix store, once, for a later turn of the
    /// conversation. Runs between steps, when the cache holds exactly `cache.len()` computed
    /// positions, and before the caller hears the end, so its next turn finds them.
    pub fn keep_prefix(&mut self) -> usize {
        match self.store.take() {
            Some(store) => store.insert(&self.tokens, &self.cache),
            None => 0,
        }
    }

    /// Keep nothing of this sequence (its last step failed; its cache may be half written).
    pub fn forget_prefix(&mut self) {
        self.store = None;
    }

    /// Prompt tokens served from the prefix store.
    pub fn cached_tokens(&self) -> usize {
        self.cached
    }

    /// True while prompt tokens remain to be fed.
    pub fn in_prefill(&self) -> bool {
        self.prefilled < self.prompt_len
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens to feed this step; a prompt is fed in chunks of at most `chunk` tokens.
    pub fn next_input(&self, chunk: usize) -> &[u32] {
        if self.in_prefill() {
            let end = (self.prefilled + chunk.max(1)).min(self.prompt_len);
            &self.tokens[self.prefilled..end]
        } else {
            &self.tokens[self.tokens.len() - 1..]
        }
    }

    /// The tokens to feed (see [`Self::next_input`]), the cache they go into, and the
    /// constraint whose mask this step's logits need (only when feeding `n` tokens ends the
    /// prompt or continues decoding), so the mask can be computed beside the forward pass.
    pub fn step_parts(&mut self, n: usize) -> (&[u32], &mut KvCache, Option<&mut Constraint>) {
        let start = if self.in_prefill() {
            self.prefilled
        } else {
            self.tokens.len() - 1
        };
        let samples = !self.in_prefill() || self.prefilled + n >= self.prompt_len;
        let constraint = self.req.constraint.as_mut().filter(|_| samples);
        (&self.tokens[start..start + n], &mut self.cache, constraint)
    }

    /// Record that `n` tokens were fed. Returns true when the logits of this step are to be
    /// sampled (the prompt is complete).
    pub fn fed(&mut self, n: usize) -> bool {
        if self.in_prefill() {
            self.prefilled += n;
        }
        !self.in_prefill()
    }

    /// The caller dropped its receiver.
    pub fn is_cancelled(&self) -> bool {
        self.req.tx.is_closed()
    }

    /// The deadline passed.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.req.deadline.is_some_and(|d| now >= d)
    }

    /// Sample from this sequence's logits row and deliver the result. Returns `Some(exit)` when
    /// the sequence is over.
    pub fn on_logits(&mut self, logits: &mut [f32], tok: &GgufTokenizer) -> Option<Exit> {
        let mut complete = false;
        let token = match self.req.constraint.as_mut() {
            None => self.req.sampler.sample(logits, &self.tokens),
            Some(c) => {
                match constrained_sample(c, &mut self.req.sampler, logits, &self.tokens, tok) {
                    Ok((token, done)) => {
                        complete = done;
                        token
                    }
                    Err(e) => return Some(self.fail(EngineError::Internal(e.to_string()))),
                }
            }
        };
        if let Some(spec) = &self.req.logprobs {
            // `logits` is the row the token was drawn from: masked and penalized in place.
            if !tok.is_stop(token) {
                self.pending_logprobs.push(spec.entry(logits, token));
            }
        }
        if self.first_token.is_none() {
            self.first_token = Some(Instant::now());
        }
        self.tokens.push(token);
        if tok.is_stop(token) {
            return Some(self.finish_with_tail(tok, FinishReason::Stop));
        }
        let piece = match self.decoder.push(tok, token) {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => return Some(self.fail(EngineError::Internal(e.to_string()))),
        };
        let step = self.stop.push(&piece);
        self.pending.push_str(&step.text);
        if step.stopped {
            return Some(self.finish(FinishReason::Stop));
        }
        if complete {
            // The grammar can take nothing more: the answer is whole.
            return Some(self.finish_with_tail(tok, FinishReason::Stop));
        }
        if self.generated() >= self.req.max_tokens || self.cache.len() + 1 >= self.cache.max_len() {
            return Some(self.finish_with_tail(tok, FinishReason::Length));
        }
        self.deliver()
    }

    /// Finish after releasing text still held back by the decoder and the stop matcher (a stop
    /// string can still match in it).
    fn finish_with_tail(&mut self, tok: &GgufTokenizer, reason: FinishReason) -> Exit {
        // Bytes of a character the generation stopped in the middle of are dropped, not sent as
        // U+FFFD.
        let mut held = self.decoder.flush(tok).unwrap_or_default();
        while held.ends_with('\u{FFFD}') {
            held.pop();
        }
        let step = self.stop.push(&held);
        self.pending.push_str(&step.text);
        if step.stopped {
            return self.finish(FinishReason::Stop);
        }
        let stop = std::mem::replace(&mut self.stop, StopMatcher::new::<&str>(&[]));
        self.pending.push_str(&stop.flush());
        self.finish(reason)
    }

    /// Try to hand pending text to the caller without blocking.
    fn deliver(&mut self) -> Option<Exit> {
        if self.pending.is_empty() {
            return None;
        }
        if !self.pending_logprobs.is_empty() {
            let logprobs = std::mem::take(&mut self.pending_logprobs);
            match self
                .req
                .tx
                .try_send(Ok(GenerationEvent::Logprobs(logprobs)))
            {
                Ok(()) => {}
                Err(TrySendError::Full(Ok(GenerationEvent::Logprobs(logprobs)))) => {
                    // Keep them (and the text after them) for the next step.
                    self.pending_logprobs = logprobs;
                    return None;
                }
                Err(TrySendError::Full(_)) => return None,
                Err(TrySendError::Closed(_)) => return Some(Exit::Gone),
            }
        }
        let text = std::mem::take(&mut self.pending);
        match self.req.tx.try_send(Ok(GenerationEvent::Delta(text))) {
            Ok(()) => None,
            Err(TrySendError::Full(Ok(GenerationEvent::Delta(text)))) => {
                // The caller is slow: keep the text and try again after the next step.
                self.pending = text;
                None
            }
            Err(TrySendError::Full(_)) => None,
            Err(TrySendError::Closed(_)) => Some(Exit::Gone),
        }
    }

    fn timings(&self) -> Timings {
        let now = Instant::now();
        Timings {
            queue: self.admitted.duration_since(self.req.arrived),
            time_to_first_token: self
                .first_token
                .unwrap_or(now)
                .duration_since(self.req.arrived),
            total: now.duration_since(self.req.arrived),
        }
    }

    fn finish(&mut self, reason: FinishReason) -> Exit {
        self.keep_prefix();
        let done = Completion {
            finish_reason: reason,
            prompt_tokens: self.prompt_len as u32,
            completion_tokens: self.generated() as u32,
            cached_prompt_tokens: self.cached as u32,
            timings: self.timings(),
            source: Source::Model,
        };
        let tx = self.req.tx.clone();
        let pending = std::mem::take(&mut self.pending);
        let logprobs = std::mem::take(&mut self.pending_logprobs);
        // The last events must arrive even when the channel is momentarily full: hand them to a
        // detached sender so the batch never waits for a slow reader.
        send_tail(tx, pending, logprobs, Ok(GenerationEvent::Finished(done)));
        Exit::Done
    }

    /// End with an error sent to the caller.
    pub fn fail(&mut self, err: EngineError) -> Exit {
        self.keep_prefix();
        let pending = std::mem::take(&mut self.pending);
        send_tail(self.req.tx.clone(), pending, Vec::new(), Err(err));
        Exit::Failed
    }
}

/// Sample under a constraint: mask the logits, sample, and advance the grammar. Returns the
/// token and whether the grammar is now complete. A stop id is sampled only where the grammar
/// accepts; the grammar is not advanced past it (the sequence ends there).
fn constrained_sample(
    c: &mut Constraint,
    sampler: &mut Sampler,
    logits: &mut [f32],
    history: &[u32],
    tok: &GgufTokenizer,
) -> Result<(u32, bool), crate::constrain::ConstrainError> {
    c.apply(logits)?;
    let mut token = sampler.sample(logits, history);
    if !c.allows(token) {
        // Only when every allowed logit was -inf or NaN (the sampler's argmax fallback).
        token = c.first_allowed().unwrap_or(token);
    }
    if tok.is_stop(token) {
        return Ok((token, false));
    }
    Ok((token, c.advance(token)?))
}

/// Deliver the final log-probabilities, text and event; falls back to a thread only when the
/// channel is full. Log-probabilities are always followed by a `Delta`, an empty one if need be.
fn send_tail(
    tx: EventSender,
    pending: String,
    logprobs: Vec<TokenLogprob>,
    last: Result<GenerationEvent, EngineError>,
) {
    let mut events = Vec::with_capacity(3);
    let with_logprobs = !logprobs.is_empty();
    if with_logprobs {
        events.push(Ok(GenerationEvent::Logprobs(logprobs)));
    }
    if !pending.is_empty() || with_logprobs {
        events.push(Ok(GenerationEvent::Delta(pending)));
    }
    events.push(last);
    let mut iter = events.into_iter();
    while let Some(ev) = iter.next() {
        match tx.try_send(ev) {
            Ok(()) => continue,
            Err(TrySendError::Closed(_)) => return,
            Err(TrySendError::Full(ev)) => {
                let rest: Vec<_> = std::iter::once(ev).chain(iter).collect();
                std::thread::spawn(move || {
                    for ev in rest {
                        if tx.blocking_send(ev).is_err() {
                            return;
                        }
                    }
                });
                return;
            }
        }
    }
}
