//! The protobuf codec of qnode's services: tonic's prost codec, except that a request body that
//! does not decode (invalid UTF-8 in a string field, a truncated or mangled field) is the
//! caller's fault, INVALID_ARGUMENT, not INTERNAL as tonic reports it. Such a call never reaches
//! a handler, so [`CountMalformed`] counts it in `qnode_requests_total` from the status this
//! codec marks.

// `tonic::Status` (176 bytes) is what codecs return.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;

use prost::Message;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::codegen::{http, BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;
use tonic::Status;
use tonic_prost::ProstCodec;

use crate::metrics::Metrics;

/// Metadata set on a malformed-request status so [`CountMalformed`] can count the call; it is
/// removed before the response leaves the node.
const MARKER: &str = "x-qnode-malformed";

/// [`ProstCodec`] with decode errors as INVALID_ARGUMENT. Used by the generated services
/// (`build.rs` sets it as their codec) and clients.
#[derive(Debug, Default)]
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as tonic::codec::Codec>::Encoder;
    type Decoder = MalformedIsInvalid<<ProstCodec<T, U> as tonic::codec::Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MalformedIsInvalid(self.0.decoder())
    }
}

/// A decoder whose errors say what to fix, as INVALID_ARGUMENT.
#[derive(Debug)]
pub struct MalformedIsInvalid<D>(D);

impl<D: Decoder<Error = Status>> Decoder for MalformedIsInvalid<D> {
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0.decode(buf).map_err(|e| {
            let mut status = Status::invalid_argument(format!(
                "the request is not a valid protobuf message of this method's type ({}); \
                 send the message of proto/qnode/v1 with UTF-8 strings",
                crate::types::echo(e.message())
            ));
            status
                .metadata_mut()
                .insert(MARKER, tonic::metadata::MetadataValue::from_static("1"));
            status
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// The metric's method label of a gRPC path: Inference's method names are few and static;
/// anything else is `-`.
pub(super) fn method_label(path: &str) -> &'static str {
    match path.rsplit('/').next() {
        Some("Generate") => "Generate",
        Some("GenerateStream") => "GenerateStream",
        Some("ListModels") => "ListModels",
        _ => "-",
    }
}

/// Counts the calls of the wrapped service that [`Codec`] refused as malformed, under model `-`,
/// their method and `InvalidArgument`, like any other refused call.
#[derive(Clone)]
pub(crate) struct CountMalformed<S> {
    inner: S,
    metrics: Metrics,
}

impl<S> CountMalformed<S> {
    pub(crate) fn new(inner: S, metrics: Metrics) -> Self {
        Self { inner, metrics }
    }
}

impl<S: NamedService> NamedService for CountMalformed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for CountMalformed<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>, Error = Infallible>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let metrics = self.metrics.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            if response.headers_mut().remove(MARKER).is_some() {
                metrics
                    .requests
                    .with_label_values(&["-", method, "InvalidArgument"])
                    .inc();
                tracing::info!(
                    method,
                    code = "InvalidArgument",
                    "refused a malformed request"
                );
            }
            Ok(response)
        })
    }
}
