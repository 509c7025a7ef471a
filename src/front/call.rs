//! One generation call's life after admission, shared by both fronts: its guard, id, deadline,
//! span and metrics, and the loops that read the backend's events until the end, the deadline,
//! the client leaving or a hard stop.
//!
//! Fronts differ only in what they make of each event (a proto chunk, an SSE line) and how they
//! spell a [`FrontError`]; which events end a call, and what gets counted, is decided here once.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::error::FrontError;
use super::validate;
use crate::engine::{EngineError, EventStream};
use crate::metrics::Metrics;
use crate::node::{CallGuard, Node};
use crate::types::{Completion, ErrorKind, GenerationEvent, ModelInfo, Source, TokenLogprob};

/// How long a failed stream waits for buffer room to deliver its final error.
const FINAL_ERROR_WAIT: Duration = Duration::from_millis(500);

/// Why a call ended without a completion, once it reached the backend.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CallError {
    /// The backend refused the request or failed it.
    Engine(EngineError),
    /// The node was hard-stopped (drain timeout) before the call finished.
    HardStop,
    /// The caller's deadline passed; the time since arrival.
    Deadline(Duration),
    /// The backend dropped the stream without a result (a bug).
    EndedEarly,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Engine(e) => e.fmt(f),
            CallError::HardStop => f.write_str("node shut down before the request finished"),
            CallError::Deadline(after) => {
                write!(f, "deadline exceeded after {} ms", after.as_millis())
            }
            CallError::EndedEarly => f.write_str("generation ended without a result"),
        }
    }
}

impl CallError {
    /// What kind of failure this is.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            CallError::Engine(e) => e.kind(),
            CallError::HardStop => ErrorKind::Unavailable,
            CallError::Deadline(_) => ErrorKind::DeadlineExceeded,
            CallError::EndedEarly => ErrorKind::Internal,
        }
    }

    /// Short machine-readable cause.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            CallError::Engine(e) => e.reason(),
            CallError::HardStop => "shutting_down",
            CallError::Deadline(_) => "deadline_exceeded",
            CallError::EndedEarly => "internal_error",
        }
    }
}

/// What one admitted call carries until it ends: its guard, id, deadline, span and metric labels.
pub struct Call {
    _guard: CallGuard,
    arrival: Instant,
    deadline: Option<Instant>,
    /// The call's id (caller-given or generated).
    pub request_id: String,
    /// Served model id, or `-` for unknown ids (they would blow up label cardinality).
    model_label: String,
    method: &'static str,
    metrics: Metrics,
    /// Arrival to the first text, once seen.
    first_token: Option<Duration>,
    span: tracing::Span,
}

impl Call {
    /// A call admitted by `guard` at `arrival`. `model` is the id asked for; it becomes a metric
    /// label only when it is one of `models`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        guard: CallGuard,
        arrival: Instant,
        deadline: Option<Instant>,
        request_id: String,
        model: &str,
        models: &[ModelInfo],
        method: &'static str,
        metrics: Metrics,
    ) -> Self {
        let model_label = if models.iter().any(|m| m.id == model) {
            model.to_owned()
        } else {
            "-".to_owned()
        };
        // Only a valid id goes into the span; a bad one is echoed by the error message alone.
        let span_id = if request_id.len() <= validate::MAX_REQUEST_ID_BYTES
            && request_id.bytes().all(|b| b.is_ascii_graphic())
        {
            request_id.as_str()
        } else {
            "<invalid>"
        };
        let span =
            tracing::info_span!("request", request_id = %span_id, model = %model_label, method);
        Self {
            _guard: guard,
            arrival,
            deadline,
            request_id,
            model_label,
            method,
            metrics,
            first_token: None,
            span,
        }
    }

    /// The span the call's work runs in (request id, model, method).
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Counts the finished call under `code`: `Ok` or an [`ErrorKind::label`] (gRPC's code
    /// names, for both fronts, so one dashboard covers both).
    fn record(&self, code: &str, completion: Option<&Completion>) {
        let m = &self.metrics;
        m.requests
            .with_label_values(&[&self.model_label, self.method, code])
            .inc();
        m.request_duration
            .with_label_values(&[&self.model_label, self.method])
            .observe(self.arrival.elapsed().as_secs_f64());
        if let Some(c) = completion {
            let model = self.model_label.as_str();
            let (source, level) = match c.source {
                Source::Model => ("model", None),
                Source::CacheL1 => ("cache_l1", Some("l1")),
                Source::CacheL2 | Source::CacheVariant(_) => ("cache_l2", Some("l2")),
                Source::CacheSemantic => ("cache_semantic", Some("semantic")),
            };
            m.served_tokens
                .with_label_values(&[model, source])
                .inc_by(u64::from(c.completion_tokens));
            match level {
                // Only model work goes into the model's latency histograms: sub-millisecond
                // cache hits would hide a slow model.
                None => {
                    m.queue_time
                        .with_label_values(&[model])
                        .observe(c.timings.queue.as_secs_f64());
                    if let Some(first) = self.first_token {
                        m.time_to_first_token
                            .with_label_values(&[model])
                            .observe(first.as_secs_f64());
                    }
                }
                Some(level) => m
                    .cache_hit_duration
                    .with_label_values(&[model, level])
                    .observe(self.arrival.elapsed().as_secs_f64()),
            }
        }
        tracing::info!(
            code,
            elapsed_ms = self.arrival.elapsed().as_millis() as u64,
            "done"
        );
    }

    /// Logs and counts a call refused before it produced anything.
    pub(crate) fn refused(&self, error: &FrontError) {
        let code = error.kind.label();
        tracing::info!(parent: &self.span, code, message = %error.message, "refused");
        self.record(code, None);
    }

    /// Notes when the first text came; it goes into the TTFT histogram at the end, once the
    /// answer's source is known.
    fn saw_text(&mut self) {
        if self.first_token.is_none() {
            self.first_token = Some(self.arrival.elapsed());
        }
    }

    /// Sleeps until the deadline; forever without one.
    async fn deadline_passed(&self) {
        match self.deadline {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    }

    fn deadline_error(&self) -> CallError {
        CallError::Deadline(self.arrival.elapsed())
    }
}

/// Waits for `submit` (admission: the preparation queue, a Redis lookup, a single flight's
/// leader), but no longer than the caller's own deadline or the node's hard stop. Dropping the
/// submission there is safe: a preparation job whose caller has gone is skipped, and a flight's
/// leader runs on its own task.
pub(crate) async fn submitted(
    call: &Call,
    node: &Node,
    submit: impl std::future::Future<Output = Result<EventStream, EngineError>>,
) -> Result<EventStream, CallError> {
    tokio::select! {
        biased;
        () = node.stopped() => Err(CallError::HardStop),
        () = call.deadline_passed() => Err(call.deadline_error()),
        result = submit => result.map_err(CallError::Engine),
    }
}

/// One step of a generation as a front sees it.
pub enum Step {
    /// More text, and the log-probabilities of the tokens generated since the last step (empty
    /// unless the request asked; then the text may be empty too, at the end).
    Delta(String, Vec<TokenLogprob>),
    /// The end, with usage and timings.
    Finished(Completion),
}

/// The next step, or why the call ends: a hard stop or the deadline win over a waiting event.
/// Log-probabilities are joined to the text that follows them.
async fn next(call: &mut Call, events: &mut EventStream, node: &Node) -> Result<Step, CallError> {
    let mut logprobs = Vec::new();
    loop {
        let event = tokio::select! {
            biased;
            () = node.stopped() => return Err(CallError::HardStop),
            () = call.deadline_passed() => return Err(call.deadline_error()),
            event = events.recv() => event,
        };
        return match event {
            Some(Ok(GenerationEvent::Logprobs(mut more))) => {
                logprobs.append(&mut more);
                continue;
            }
            Some(Ok(GenerationEvent::Delta(delta))) => {
                call.saw_text();
                Ok(Step::Delta(delta, logprobs))
            }
            Some(Ok(GenerationEvent::Finished(completion))) => Ok(Step::Finished(completion)),
            Some(Err(error)) => Err(CallError::Engine(error)),
            None => Err(CallError::EndedEarly),
        };
    }
}

/// A whole answer, as [`collect`] gathers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The text.
    pub text: String,
    /// Each generated token's log-probabilities, in order (empty unless asked).
    pub logprobs: Vec<TokenLogprob>,
    /// Usage, timings, source.
    pub completion: Completion,
}

/// Unary: gathers the deltas into one text, and counts the call. Returning early drops `events`,
/// which cancels; so does dropping this future (the client left).
pub async fn collect(
    call: &mut Call,
    mut events: EventStream,
    node: &Node,
) -> Result<Answer, FrontError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let result = loop {
        match next(call, &mut events, node).await {
            Ok(Step::Delta(delta, mut more)) => {
                text.push_str(&delta);
                logprobs.append(&mut more);
            }
            Ok(Step::Finished(completion)) => {
                break Ok(Answer {
                    text: std::mem::take(&mut text),
                    logprobs: std::mem::take(&mut logprobs),
                    completion,
                })
            }
            Err(error) => break Err(error),
        }
    };
    drop(events);
    match &result {
        Ok(answer) => call.record("Ok", Some(&answer.completion)),
        Err(error) => call.record(error.kind().label(), None),
    }
    result.map_err(FrontError::from)
}

/// What a streaming front makes of each step; see [`forward`].
pub trait StreamFront: Send + 'static {
    /// What goes down the client's channel.
    type Item: Send + 'static;
    /// The items for one step (a front may send nothing for an empty delta, or several items for
    /// the end).
    fn step(&mut self, call: &Call, step: &Step) -> Vec<Self::Item>;
    /// The item that tells the client the call failed.
    fn failed(&mut self, call: &Call, error: &FrontError) -> Self::Item;
}

/// How a stream ended, for the log and the metrics.
enum End {
    Finished(Completion),
    Failed(CallError),
    ClientGone,
}

/// Streaming: sends each step as `front` spells it. Stops — dropping `events`, which cancels the
/// generation and frees its batch slot — when the client goes away (the channel closes), at the
/// deadline or a hard stop. Holds the call (and so its admission guard) to the end.
pub async fn forward<F: StreamFront>(
    mut call: Call,
    mut events: EventStream,
    tx: mpsc::Sender<F::Item>,
    node: std::sync::Arc<Node>,
    mut front: F,
) {
    let end = 'call: loop {
        let step = tokio::select! {
            biased;
            () = tx.closed() => break End::ClientGone,
            step = next(&mut call, &mut events, &node) => step,
        };
        let step = match step {
            Ok(step) => step,
            Err(error) => break End::Failed(error),
        };
        for item in front.step(&call, &step) {
            // A slow reader must not hold the generation past its deadline or a hard stop.
            let sent = tokio::select! {
                biased;
                sent = tx.send(item) => sent.is_ok(),
                () = node.stopped() => break 'call End::Failed(CallError::HardStop),
                () = call.deadline_passed() => break 'call End::Failed(call.deadline_error()),
            };
            if !sent {
                break 'call End::ClientGone;
            }
        }
        if let Step::Finished(completion) = step {
            break End::Finished(completion);
        }
    };
    drop(events);
    match end {
        End::Finished(completion) => call.record("Ok", Some(&completion)),
        End::Failed(error) => {
            call.record(error.kind().label(), None);
            let item = front.failed(&call, &FrontError::from(error));
            // The generation is gone already; this only waits for room in the client's buffer
            // (a send to a client that left fails at once), and for a client that stopped
            // reading, not for long.
            let _ = tokio::time::timeout(FINAL_ERROR_WAIT, tx.send(item)).await;
        }
        End::ClientGone => call.record(ErrorKind::Cancelled.label(), None),
    }
}
