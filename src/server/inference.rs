//! The `qnode.v1.Inference` service: admit, validate, submit, then collect (unary) or forward
//! (streaming) the backend's events until the end, the deadline, the client leaving or a hard stop.

// `tonic::Status` (176 bytes) is what handlers return; boxing it would only add conversions.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::call::{self, new_request_id, Call, CallError, Step, StreamFront};
use super::proto::inference_server::Inference;
use super::{convert, deadline, proto, validate};
use crate::config::Limits;
use crate::engine::{Backend, EventStream, GenerationRequest};
use crate::metrics::Metrics;
use crate::node::Node;

/// Chunks buffered between the forwarding task and the HTTP/2 stream of one call.
const STREAM_BUFFER: usize = 16;

/// Implements the service over any [`Backend`].
pub(crate) struct InferenceService {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) limits: Limits,
    pub(crate) node: Arc<Node>,
    pub(crate) metrics: Metrics,
}

use super::call::TENANT_HEADER;

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
        let (call, span) = Call::new(
            guard,
            arrival,
            deadline,
            request_id.clone(),
            &wire.model,
            &models,
            method,
            self.metrics.clone(),
        );
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
            call.refused(status.code(), status.message());
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
            let (text, completion) = call::collect(&mut call, events, &self.node).await?;
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
        tokio::spawn(call::forward(call, events, tx, node, GrpcChunks).instrument(span));
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

/// The gRPC spelling of a stream: one chunk per delta, a last chunk with usage, a final status.
struct GrpcChunks;

impl StreamFront for GrpcChunks {
    type Item = Result<proto::GenerateChunk, Status>;

    fn step(&mut self, call: &Call, step: &Step) -> Vec<Self::Item> {
        let chunk = match step {
            Step::Delta(text) => proto::GenerateChunk {
                text: text.clone(),
                request_id: call.request_id.clone(),
                ..Default::default()
            },
            Step::Finished(completion) => convert::last_chunk(completion, call.request_id.clone()),
        };
        vec![Ok(chunk)]
    }

    fn failed(&mut self, _call: &Call, error: &CallError) -> Self::Item {
        Err(error.clone().into())
    }
}
