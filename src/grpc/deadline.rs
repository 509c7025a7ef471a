//! The caller's deadline, from the `grpc-timeout` header: read by the Inference service, and
//! enforced around the Admin service by [`AdminDeadline`].

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

use crate::front::FrontError;
use crate::types::echo;

/// When the caller stops waiting, counted from `arrival`; `None` without `grpc-timeout`. A
/// malformed value is refused naming the header (as HTTP's `x-qnode-timeout-ms`), never run as
/// "no deadline".
pub(crate) fn from_metadata(
    metadata: &MetadataMap,
    arrival: Instant,
) -> Result<Option<Instant>, FrontError> {
    Ok(timeout(metadata.get("grpc-timeout").map(|v| v.as_encoded_bytes()))?.map(|t| arrival + t))
}

/// The `grpc-timeout` value `raw`, if any, as a duration.
fn timeout(raw: Option<&[u8]>) -> Result<Option<Duration>, FrontError> {
    let Some(raw) = raw else { return Ok(None) };
    std::str::from_utf8(raw)
        .ok()
        .and_then(parse_grpc_timeout)
        .map(Some)
        .ok_or_else(|| {
            FrontError::invalid(
                "grpc-timeout",
                format!(
                    "`grpc-timeout` must be 1 to 8 digits and a unit (H, M, S, m, u, n). Given: {:?}",
                    echo(&String::from_utf8_lossy(raw))
                ),
            )
        })
}

/// Parses the gRPC wire format: at most 8 ASCII digits then one unit letter
/// (`H` hours, `M` minutes, `S` seconds, `m` millis, `u` micros, `n` nanos).
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 || !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Wraps the Admin service so a call's `grpc-timeout` is honoured there too: when it runs out the
/// caller gets DEADLINE_EXCEEDED at that moment, and the operation itself runs to its end on the
/// node. A model load or warm-up cut halfway would leave the pool and the answer cache's model
/// identities out of step; finished, a retry simply finds it done (`ALREADY_EXISTS`) or
/// `NodeStatus` / `ListModels` show it. (Inference calls keep their own deadline, which also
/// cancels the generation.)
#[derive(Clone)]
pub(crate) struct AdminDeadline<S> {
    inner: S,
}

impl<S> AdminDeadline<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for AdminDeadline<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> tonic::codegen::Service<tonic::codegen::http::Request<B>> for AdminDeadline<S>
where
    S: tonic::codegen::Service<
        tonic::codegen::http::Request<B>,
        Response = tonic::codegen::http::Response<R>,
        Error = std::convert::Infallible,
    >,
    S::Future: Send + 'static,
    R: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    R::Error: Into<tonic::codegen::StdError>,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, std::convert::Infallible>;

    fn poll_ready(
        &mut self,
        cx: &mut tonic::codegen::Context<'_>,
    ) -> tonic::codegen::Poll<Result<(), std::convert::Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<B>) -> Self::Future {
        let timeout = match timeout(request.headers().get("grpc-timeout").map(|v| v.as_bytes())) {
            Ok(timeout) => timeout,
            Err(refused) => {
                let status = super::status::status(refused);
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        let response = self.inner.call(request);
        let Some(timeout) = timeout else {
            return Box::pin(async move { Ok(response.await?.map(tonic::body::Body::new)) });
        };
        Box::pin(async move {
            // Spawned, so that the caller leaving does not cut the operation short.
            let mut operation = tokio::spawn(response);
            match tokio::time::timeout(timeout, &mut operation).await {
                Ok(Ok(Ok(done))) => Ok(done.map(tonic::body::Body::new)),
                Ok(Ok(Err(never))) => match never {},
                Ok(Err(panicked)) => Ok(tonic::Status::internal(format!(
                    "the admin operation failed: {panicked}"
                ))
                .into_http()),
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the deadline (grpc-timeout, {} ms) passed; the operation goes on to its end on \
                     the node: NodeStatus and ListModels show when it is done",
                    timeout.as_millis()
                ))
                .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "S",
            "10",
            "10s",
            "123456789S",
            "-1S",
            "1.5S",
            "1 S",
            "১S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    /// Answers after `delay`, then marks `done`.
    #[derive(Clone)]
    struct Slow {
        done: std::sync::Arc<std::sync::atomic::AtomicBool>,
        delay: Duration,
    }

    impl tonic::codegen::Service<tonic::codegen::http::Request<()>> for Slow {
        type Response = tonic::codegen::http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = tonic::codegen::BoxFuture<Self::Response, std::convert::Infallible>;

        fn poll_ready(
            &mut self,
            _: &mut tonic::codegen::Context<'_>,
        ) -> tonic::codegen::Poll<Result<(), std::convert::Infallible>> {
            tonic::codegen::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: tonic::codegen::http::Request<()>) -> Self::Future {
            let (done, delay) = (self.done.clone(), self.delay);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(tonic::codegen::http::Response::new(
                    tonic::body::Body::empty(),
                ))
            })
        }
    }

    /// Past its `grpc-timeout` an Admin call is answered DEADLINE_EXCEEDED while the operation
    /// is still running, and the operation still ends; without one the call waits for it. (A
    /// tonic client enforces the same header itself, so this is checked on the service.)
    #[tokio::test]
    async fn admin_calls_are_answered_at_their_deadline_and_the_work_finishes() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tonic::codegen::Service;
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let mut service = AdminDeadline::new(Slow {
            done: done.clone(),
            delay: Duration::from_secs(2),
        });
        let request = tonic::codegen::http::Request::builder()
            .header("grpc-timeout", "20m")
            .body(())
            .unwrap();
        let answer = service.call(request).await.unwrap();
        let status = tonic::Status::from_header_map(answer.headers()).expect("a grpc-status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(
            status.message().contains("goes on to its end"),
            "{status:?}"
        );
        assert!(
            !done.load(Ordering::SeqCst),
            "answered before the work ended"
        );
        for _ in 0..400 {
            if done.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(done.load(Ordering::SeqCst), "the operation ran to its end");

        let waited = std::sync::Arc::new(AtomicBool::new(false));
        let mut service = AdminDeadline::new(Slow {
            done: waited.clone(),
            delay: Duration::from_millis(50),
        });
        let answer = service
            .call(tonic::codegen::http::Request::new(()))
            .await
            .unwrap();
        assert!(tonic::Status::from_header_map(answer.headers()).is_none());
        assert!(waited.load(Ordering::SeqCst), "no deadline: the call waits");

        // A malformed deadline is refused naming the header, before the operation starts.
        let untouched = std::sync::Arc::new(AtomicBool::new(false));
        let mut service = AdminDeadline::new(Slow {
            done: untouched.clone(),
            delay: Duration::ZERO,
        });
        let request = tonic::codegen::http::Request::builder()
            .header("grpc-timeout", "soon")
            .body(())
            .unwrap();
        let answer = service.call(request).await.unwrap();
        let status = tonic::Status::from_header_map(answer.headers()).expect("a grpc-status");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("grpc-timeout"), "{status:?}");
        tokio::task::yield_now().await;
        assert!(!untouched.load(Ordering::SeqCst), "the operation never ran");
    }

    #[test]
    fn deadline_is_counted_from_arrival() {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "100m".parse().unwrap());
        let arrival = Instant::now();
        let deadline = from_metadata(&metadata, arrival).unwrap().unwrap();
        assert_eq!(deadline, arrival + Duration::from_millis(100));
        assert_eq!(from_metadata(&MetadataMap::new(), arrival).unwrap(), None);
        metadata.insert("grpc-timeout", "10s".parse().unwrap());
        let refused = from_metadata(&metadata, arrival).unwrap_err();
        assert_eq!(refused.param.as_deref(), Some("grpc-timeout"));
        assert!(refused.message.contains("\"10s\""), "{}", refused.message);
    }
}
