//! The `qnode.v1.Inference` service: admit, validate, submit, then collect (unary) or forward
//! (streaming) the backend's events until the end, the deadline, the client leaving or a hard stop.

// `tonic::Status` (176 bytes) is what handlers return; boxing it would only add conversions.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use super::proto::inference_server::Inference;
use super::{convert, deadline, proto, validate};
use crate::config::Limits;
use crate::engine::{Backend, Completion, EventStream, GenerationEvent, GenerationRequest};
use crate::metrics::Metrics;
use crate::node::{CallGuard, Node};

/// How long a failed stream waits for buffer room to deliver its final status.
const FINAL_STATUS_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Chunks buffered between the forwarding task and the HTTP/2 stream of one call.
const STREAM_BUFFER: usize = 16;

/// Implements the service over any [`Backend`].
pub(crate) struct InferenceService {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) limits: Limits,
    pub(crate) node: Arc<Node>,
    pub(crate) metrics: Metrics,
}

/// What one call needs after admission: its guard, id, deadline, span and metric labels.
struct Call {
    _guard: CallGuard,
    arrival: Instant,
    deadline: Option<Instant>,
    request_id: String,
    /// Served model id, or `-` for unknown ids (they would blow up label cardinality).
    model_label: String,
    method: &'static str,
    metrics: Metrics,
    first_token_seen: bool,
}

impl Call {
    fn record(&self, code: Code, completion: Option<&Completion>) {
        let m = &self.metrics;
        m.requests
            .with_label_values(&[&self.model_label, self.method, &format!("{code:?}")])
            .inc();
        m.request_duration
            .with_label_values(&[&self.model_label, self.method])
            .observe(self.arrival.elapsed().as_secs_f64());
        if let Some(c) = completion {
            m.generated_tokens
                .with_label_values(&[&self.model_label])
                .inc_by(u64::from(c.completion_tokens));
        }
        tracing::info!(code = ?code, elapsed_ms = self.arrival.elapsed().as_millis() as u64, "done");
    }

    fn saw_text(&mut self) {
        if !self.first_token_seen {
            self.first_token_seen = true;
            self.metrics
                .time_to_first_token
                .with_label_values(&[&self.model_label])
                .observe(self.arrival.elapsed().as_secs_f64());
        }
    }

    /// Sleeps until the deadline; forever without one.
    async fn deadline_passed(&self) {
        match self.deadline {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    }

    fn deadline_status(&self) -> Status {
        Status::deadline_exceeded(format!(
            "deadline exceeded after {} ms",
            self.arrival.elapsed().as_millis()
        ))
    }
}

fn hard_stop_status() -> Status {
    Status::unavailable("node shut down before the request finished")
}

/// Metadata key naming the caller's tenant; answers are never shared across tenants.
pub const TENANT_HEADER: &str = "x-qnode-tenant";

fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl InferenceService {
    /// Admission, deadline, id and validation: everything before the backend.
    fn begin(
        &self,
        request: Request<proto::GenerateRequest>,
        method: &'static str,
    ) -> Result<(Call, tracing::Span, Result<GenerationRequest, Status>), Status> {
        let guard = self.node.admit().map_err(Status::from)?;
        let arrival = Instant::now();
        let deadline = deadline::from_metadata(request.metadata(), arrival);
        let tenant = request
            .metadata()
            .get(TENANT_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        let mut wire = request.into_inner();
        let request_id = match std::mem::take(&mut wire.request_id) {
            id if id.is_empty() => new_request_id(),
            id => id,
        };
        let models = self.backend.models();
        let model_label = if models.iter().any(|m| m.id == wire.model) {
            wire.model.clone()
        } else {
            "-".to_owned()
        };
        // Only a validated id goes into the span; a bad one is echoed by the error message alone.
        let span_id = if request_id.len() <= validate::MAX_REQUEST_ID_BYTES
            && request_id.bytes().all(|b| b.is_ascii_graphic())
        {
            request_id.as_str()
        } else {
            "<invalid>"
        };
        let span =
            tracing::info_span!("request", request_id = %span_id, model = %model_label, method);
        let call = Call {
            _guard: guard,
            arrival,
            deadline,
            request_id: request_id.clone(),
            model_label,
            method,
            metrics: self.metrics.clone(),
            first_token_seen: false,
        };
        let validated =
            validate::validate(wire, &models, &self.limits, request_id, deadline, tenant)
                .map_err(Status::from);
        Ok((call, span, validated))
    }

    fn submit(
        &self,
        call: &Call,
        request: Result<GenerationRequest, Status>,
    ) -> Result<EventStream, Status> {
        let result = request.and_then(|r| self.backend.submit(r).map_err(Status::from));
        if let Err(status) = &result {
            tracing::info!(code = ?status.code(), message = status.message(), "refused");
            call.record(status.code(), None);
        }
        result
    }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn generate(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<proto::GenerateResponse>, Status> {
        let (mut call, span, validated) = self.begin(request, "Generate")?;
        async move {
            let events = self.submit(&call, validated)?;
            let result = collect(&mut call, events, &self.node).await;
            match &result {
                Ok((_, completion)) => call.record(Code::Ok, Some(completion)),
                Err(status) => call.record(status.code(), None),
            }
            let (text, completion) = result?;
            Ok(Response::new(convert::response(
                text,
                &completion,
                call.request_id.clone(),
            )))
        }
        .instrument(span)
        .await
    }

    type GenerateStreamStream = ReceiverStream<Result<proto::GenerateChunk, Status>>;

    async fn generate_stream(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (call, span, validated) = self.begin(request, "GenerateStream")?;
        let events = {
            let _entered = span.enter();
            self.submit(&call, validated)?
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let node = Arc::clone(&self.node);
        tokio::spawn(forward(call, events, tx, node).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_models(
        &self,
        _request: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        let models = self
            .backend
            .models()
            .iter()
            .map(convert::model_info)
            .collect();
        Ok(Response::new(proto::ListModelsResponse {
            models,
            node_state: convert::node_state(self.node.state()) as i32,
        }))
    }
}

/// Unary: gathers the deltas into one text. Returning early drops `events`, which cancels.
async fn collect(
    call: &mut Call,
    mut events: EventStream,
    node: &Node,
) -> Result<(String, Completion), Status> {
    let mut text = String::new();
    loop {
        let event = tokio::select! {
            biased;
            () = node.stopped() => return Err(hard_stop_status()),
            () = call.deadline_passed() => return Err(call.deadline_status()),
            event = events.recv() => event,
        };
        match event {
            Some(Ok(GenerationEvent::Delta(delta))) => {
                call.saw_text();
                text.push_str(&delta);
            }
            Some(Ok(GenerationEvent::Finished(completion))) => return Ok((text, completion)),
            Some(Err(error)) => return Err(error.into()),
            None => return Err(ended_early()),
        }
    }
}

fn ended_early() -> Status {
    Status::internal("generation ended without a result")
}

/// How a stream ended, for the log and the metrics.
enum End {
    Finished(Completion),
    Failed(Status),
    ClientGone,
}

/// Streaming: forwards events as chunks. Stops — dropping `events`, which cancels the
/// generation — when the client goes away (the channel closes), at the deadline or a hard stop.
async fn forward(
    mut call: Call,
    mut events: EventStream,
    tx: mpsc::Sender<Result<proto::GenerateChunk, Status>>,
    node: Arc<Node>,
) {
    let end = loop {
        let event = tokio::select! {
            biased;
            () = tx.closed() => break End::ClientGone,
            () = node.stopped() => break End::Failed(hard_stop_status()),
            () = call.deadline_passed() => break End::Failed(call.deadline_status()),
            event = events.recv() => event,
        };
        let (chunk, end) = match event {
            Some(Ok(GenerationEvent::Delta(text))) => {
                call.saw_text();
                let chunk = proto::GenerateChunk {
                    text,
                    request_id: call.request_id.clone(),
                    ..Default::default()
                };
                (chunk, None)
            }
            Some(Ok(GenerationEvent::Finished(completion))) => (
                convert::last_chunk(&completion, call.request_id.clone()),
                Some(End::Finished(completion)),
            ),
            Some(Err(error)) => break End::Failed(error.into()),
            None => break End::Failed(ended_early()),
        };
        // A slow reader must not hold the generation past its deadline or a hard stop.
        let sent = tokio::select! {
            biased;
            sent = tx.send(Ok(chunk)) => sent.is_ok(),
            () = node.stopped() => break End::Failed(hard_stop_status()),
            () = call.deadline_passed() => break End::Failed(call.deadline_status()),
        };
        match (sent, end) {
            (false, _) => break End::ClientGone,
            (true, Some(end)) => break end,
            (true, None) => {}
        }
    };
    drop(events);
    match end {
        End::Finished(completion) => call.record(Code::Ok, Some(&completion)),
        End::Failed(status) => {
            call.record(status.code(), None);
            // The generation is gone already; this only waits for room in the client's buffer
            // (a send to a client that left fails at once), and for a client that stopped
            // reading, not for long.
            let _ = tokio::time::timeout(FINAL_STATUS_WAIT, tx.send(Err(status))).await;
        }
        End::ClientGone => call.record(Code::Cancelled, None),
    }
}
