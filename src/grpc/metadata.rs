//! The request-metadata limit. HTTP/2 itself refuses a header block over the limit the server
//! advertises with an HTTP 431 that gRPC clients can only report as UNKNOWN, or the client
//! library refuses to send it ("header list size ... violates the maximum size"). So the
//! transport advertises [`TRANSPORT_LIMIT`], well above what a call needs, and [`MetadataLimit`]
//! refuses a call whose metadata exceeds [`MAX_METADATA_BYTES`] as RESOURCE_EXHAUSTED (what gRPC
//! itself answers for oversized metadata) with a message that gives the size and the limit. The
//! refusal is counted in `qnode_requests_total` like any other.

use std::convert::Infallible;

use tonic::codegen::{http, BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;
use tonic::Status;

use crate::metrics::Metrics;

/// Largest request metadata a call may carry, counted as HTTP/2 does (name + value + 32 bytes
/// per entry). gRPC's own implementations default to 8–16 KiB.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// The header-list size the HTTP/2 transport advertises and enforces (a block over it never
/// reaches [`MetadataLimit`]): large enough that every oversized call in practice gets the clear
/// RESOURCE_EXHAUSTED, small enough that a stream's header block stays a bounded buffer.
pub const TRANSPORT_LIMIT: u32 = 256 * 1024;

/// The size of a header block as HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE counts it.
fn metadata_bytes(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

/// Wraps a service: calls whose metadata exceeds [`MAX_METADATA_BYTES`] are answered
/// RESOURCE_EXHAUSTED without reaching it.
#[derive(Clone)]
pub(crate) struct MetadataLimit<S> {
    inner: S,
    metrics: Metrics,
}

impl<S> MetadataLimit<S> {
    pub(crate) fn new(inner: S, metrics: Metrics) -> Self {
        Self { inner, metrics }
    }
}

impl<S: NamedService> NamedService for MetadataLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for MetadataLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>, Error = Infallible>,
    S::Future: Send + 'static,
    R: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    R::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let size = metadata_bytes(request.headers());
        if size <= MAX_METADATA_BYTES {
            // The refusal below is a plain tonic body; the service's own is boxed into one.
            let response = self.inner.call(request);
            return Box::pin(async move { Ok(response.await?.map(tonic::body::Body::new)) });
        }
        let method = super::codec::method_label(request.uri().path());
        // Resending the same headers fails again: no retry hint goes with this one.
        let code = "ResourceExhausted";
        self.metrics
            .requests
            .with_label_values(&["-", method, code])
            .inc();
        tracing::info!(method, code, size, "refused oversized request metadata");
        let status = Status::resource_exhausted(format!(
            "request metadata is {size} bytes (name + value + 32 per entry); this node takes at \
             most {MAX_METADATA_BYTES}: send large data in the request message, not in headers"
        ));
        Box::pin(async move { Ok(status.into_http()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_as_http2_does() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-a", http::HeaderValue::from_static("12345"));
        headers.append("x-a", http::HeaderValue::from_static("1"));
        assert_eq!(metadata_bytes(&headers), (3 + 5 + 32) + (3 + 1 + 32));
    }
}
