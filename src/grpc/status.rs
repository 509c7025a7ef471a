//! [`FrontError`] → `tonic::Status`, here and nowhere else: the code comes from the error's
//! [`ErrorKind`], the message is the error's own.

use std::time::Duration;

use tonic::{Code, Status};

use crate::front::{ErrorKind, FrontError};

/// The gRPC code of `kind`.
fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::ResourceExhausted { .. } => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::Internal => Code::Internal,
    }
}

impl From<FrontError> for Status {
    fn from(error: FrontError) -> Self {
        let mut status = Status::new(code(error.kind), error.message);
        if let ErrorKind::ResourceExhausted { retry_after } = error.kind {
            add_retry_after(&mut status, retry_after);
        }
        status
    }
}

/// Any domain error (engine, node, validation, auth) as a `Status`, for `map_err`.
pub(crate) fn status(error: impl Into<FrontError>) -> Status {
    Status::from(error.into())
}

/// `retry-after` in whole seconds (HTTP style, rounded up, at least 1) for people and proxies, and
/// `grpc-retry-pushback-ms` for gRPC clients with a retry policy.
fn add_retry_after(status: &mut Status, retry_after: Duration) {
    let seconds = retry_after.as_millis().div_ceil(1000).max(1);
    let millis = retry_after.as_millis();
    let metadata = status.metadata_mut();
    if let Ok(value) = seconds.to_string().parse() {
        metadata.insert("retry-after", value);
    }
    if let Ok(value) = millis.to_string().parse() {
        metadata.insert("grpc-retry-pushback-ms", value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineError;
    use crate::node::{ControlError, Refusal, TransitionError};

    /// Which variant `e` is. No wildcard arm: a new `EngineError` variant does not compile here
    /// until it is added to the cases of `every_engine_error_has_its_code`.
    fn variant(e: &EngineError) -> usize {
        match e {
            EngineError::UnknownModel(_) => 0,
            EngineError::InvalidArgument(_) => 1,
            EngineError::ContextOverflow { .. } => 2,
            EngineError::Template(_) => 3,
            EngineError::QueueFull { .. } => 4,
            EngineError::NotReady(_) => 5,
            EngineError::ModelFailed { .. } => 6,
            EngineError::ModelUnloaded(_) => 7,
            EngineError::ShuttingDown(_) => 8,
            EngineError::DeadlineExceeded(_) => 9,
            EngineError::NotCached => 10,
            EngineError::Internal(_) => 11,
            EngineError::InvalidConstraint { .. } => 12,
        }
    }
    const VARIANTS: usize = 13;

    /// Every variant, with the code proto/qnode/v1/inference.proto gives it.
    #[test]
    fn every_engine_error_has_its_code() {
        let cases = [
            (EngineError::UnknownModel("m".into()), Code::NotFound),
            (
                EngineError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (
                EngineError::ContextOverflow {
                    prompt_tokens: 10,
                    max_tokens: 20,
                    context_length: 16,
                },
                Code::InvalidArgument,
            ),
            (EngineError::Template("t".into()), Code::InvalidArgument),
            (
                EngineError::InvalidConstraint {
                    field: "json_schema".into(),
                    message: "`json_schema` is not a valid JSON schema: x".into(),
                },
                Code::InvalidArgument,
            ),
            (
                EngineError::QueueFull {
                    model: "m".into(),
                    max_queued: 4,
                    retry_after: Duration::from_millis(1500),
                },
                Code::ResourceExhausted,
            ),
            (EngineError::NotReady("m".into()), Code::Unavailable),
            (
                EngineError::ModelFailed {
                    model: "m".into(),
                    reason: "bad file".into(),
                },
                Code::Unavailable,
            ),
            (EngineError::ModelUnloaded("m".into()), Code::Unavailable),
            (EngineError::ShuttingDown("m".into()), Code::Unavailable),
            (
                EngineError::DeadlineExceeded(Duration::from_secs(1)),
                Code::DeadlineExceeded,
            ),
            (EngineError::NotCached, Code::FailedPrecondition),
            (EngineError::Internal("bug".into()), Code::Internal),
        ];
        let mut seen: Vec<usize> = cases.iter().map(|(e, _)| variant(e)).collect();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..VARIANTS).collect::<Vec<_>>(),
            "every variant once"
        );
        for (error, code) in cases {
            let message = error.to_string();
            let status = status(error);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn node_errors_have_their_codes() {
        assert_eq!(status(Refusal::Standby).code(), Code::Unavailable);
        assert_eq!(
            status(ControlError::AlreadyLoaded("m".into())).code(),
            Code::AlreadyExists
        );
        assert_eq!(
            status(TransitionError {
                action: "activate",
                state: crate::node::NodeState::Draining
            })
            .code(),
            Code::FailedPrecondition
        );
    }

    #[test]
    fn queue_full_carries_retry_metadata() {
        let status = status(EngineError::QueueFull {
            model: "m".into(),
            max_queued: 4,
            retry_after: Duration::from_millis(1500),
        });
        assert_eq!(status.metadata().get("retry-after").unwrap(), "2");
        assert_eq!(
            status.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "1500"
        );
        assert!(
            status.message().contains("(4 waiting)"),
            "{}",
            status.message()
        );
    }
}
