//! The `qnode.v1.Inference` service: translate the wire request, [`Front::begin`] the call, then
//! collect (unary) or forward (streaming) its events, spelled as proto messages.

// `tonic::Status` (176 bytes) is what handlers return; boxing it would only add conversions.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::proto::inference_server::Inference;
use super::{convert, deadline, proto};
use crate::engine::EventStream;
use crate::front::{
    self, header_text, Call, CallMeta, Front, FrontError, KeyTenant, Step, StreamFront,
    SESSION_HEADER, TENANT_HEADER,
};

/// Chunks buffered between the forwarding task and the HTTP/2 stream of one call.
const STREAM_BUFFER: usize = 16;

/// Implements the service over the front.
pub(crate) struct InferenceService {
    pub(crate) front: Front,
}

impl InferenceService {
    /// The wire request and its metadata, handed to [`Front::begin`].
    async fn begin(
        &self,
        request: Request<proto::GenerateRequest>,
        method: &'static str,
    ) -> Result<(Call, EventStream, bool), Status> {
        let arrival = Instant::now();
        let text = |key: &str| {
            header_text(
                request
                    .metadata()
                    .get_all(key)
                    .iter()
                    .map(|v| v.as_encoded_bytes()),
            )
        };
        let tenant = text(TENANT_HEADER);
        let session = text(SESSION_HEADER);
        let key_tenant = request.extensions().get::<KeyTenant>().cloned();
        let deadline = deadline::from_metadata(request.metadata(), arrival);
        let (raw, request_id) = convert::request(request.into_inner());
        let tools = raw.uses_tools();
        let meta = CallMeta {
            method,
            arrival,
            request_id,
            tenant,
            session,
            key_tenant: key_tenant.and_then(|k| k.0),
            deadline,
        };
        let (call, events) = self.front.begin(meta, raw).await?;
        Ok((call, events, tools))
    }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn generate(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<proto::GenerateResponse>, Status> {
        let (mut call, events, tools) = self.begin(request, "Generate").await?;
        let span = call.span().clone();
        let answer = front::collect(&mut call, events, self.front.node())
            .instrument(span)
            .await?;
        Ok(Response::new(convert::response(
            answer,
            call.request_id.clone(),
            tools,
        )))
    }

    type GenerateStreamStream = ReceiverStream<Result<proto::GenerateChunk, Status>>;

    async fn generate_stream(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (call, events, tools) = self.begin(request, "GenerateStream").await?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let node = Arc::clone(self.front.node());
        let span = call.span().clone();
        tokio::spawn(
            front::forward(call, events, tx, node, GrpcChunks::new(tools)).instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_models(
        &self,
        _request: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        let models = self
            .front
            .models()
            .iter()
            .map(convert::model_info)
            .collect();
        Ok(Response::new(proto::ListModelsResponse {
            models,
            node_state: convert::node_state(self.front.node().state()) as i32,
        }))
    }
}

/// The gRPC spelling of a stream: one chunk per delta, a last chunk with usage, a final status.
/// A request with tools reads its output as it comes ([`crate::tools::StreamReader`]): a text
/// answer's text is sent as it is written, a call is held back and sent whole in one chunk before
/// the last.
struct GrpcChunks {
    tools: Option<(crate::tools::StreamReader, Vec<crate::types::TokenLogprob>)>,
}

impl GrpcChunks {
    fn new(tools: bool) -> Self {
        Self {
            tools: tools.then(Default::default),
        }
    }
}

impl StreamFront for GrpcChunks {
    type Item = Result<proto::GenerateChunk, Status>;

    fn step(&mut self, call: &Call, step: &Step) -> Vec<Self::Item> {
        if let Some((reader, held)) = &mut self.tools {
            match step {
                Step::Delta(more, more_logprobs) => {
                    held.extend_from_slice(more_logprobs);
                    let text = reader.push(more);
                    if text.is_empty() {
                        return Vec::new();
                    }
                    return vec![Ok(proto::GenerateChunk {
                        text,
                        logprobs: convert::logprobs(&std::mem::take(held)),
                        request_id: call.request_id.clone(),
                        ..Default::default()
                    })];
                }
                Step::Finished(completion) => {
                    let (text, tool_calls, finish) =
                        convert::tool_answer(reader.raw(), completion.finish_reason);
                    let text = reader.rest(&text).to_owned();
                    let mut chunks = Vec::new();
                    if !text.is_empty() || !tool_calls.is_empty() || !held.is_empty() {
                        chunks.push(Ok(proto::GenerateChunk {
                            text,
                            tool_calls,
                            logprobs: convert::logprobs(held),
                            request_id: call.request_id.clone(),
                            ..Default::default()
                        }));
                    }
                    let mut last = convert::last_chunk(completion, call.request_id.clone());
                    last.finish_reason = Some(finish as i32);
                    chunks.push(Ok(last));
                    return chunks;
                }
            }
        }
        let chunk = match step {
            Step::Delta(text, logprobs) => proto::GenerateChunk {
                text: text.clone(),
                logprobs: convert::logprobs(logprobs),
                request_id: call.request_id.clone(),
                ..Default::default()
            },
            Step::Finished(completion) => convert::last_chunk(completion, call.request_id.clone()),
        };
        vec![Ok(chunk)]
    }

    fn failed(&mut self, _call: &Call, error: &FrontError) -> Self::Item {
        Err(error.clone().into())
    }
}
