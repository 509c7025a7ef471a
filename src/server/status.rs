//! Every error a call can meet, mapped to its gRPC status here and nowhere else.

use std::time::Duration;

use tonic::{Code, Status};

use super::validate::ValidationError;
use crate::engine::EngineError;
use crate::node::{ControlError, Refusal, TransitionError};

impl From<EngineError> for Status {
    fn from(error: EngineError) -> Self {
        let message = error.to_string();
        match error {
            EngineError::UnknownModel(_) => Status::not_found(message),
            EngineError::InvalidArgument(_)
            | EngineError::ContextOverflow { .. }
            | EngineError::Template(_) => Status::invalid_argument(message),
            EngineError::QueueFull { retry_after, .. } => {
                let mut status = Status::resource_exhausted(message);
                add_retry_after(&mut status, retry_after);
                status
            }
            EngineError::NotReady(_) | EngineError::Unavailable(_) => Status::unavailable(message),
            EngineError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            EngineError::Internal(_) => Status::internal(message),
            EngineError::NotCached => Status::failed_precondition(message),
        }
    }
}

impl From<Refusal> for Status {
    fn from(refusal: Refusal) -> Self {
        Status::unavailable(refusal.to_string())
    }
}

impl From<TransitionError> for Status {
    fn from(error: TransitionError) -> Self {
        Status::failed_precondition(error.to_string())
    }
}

impl From<ControlError> for Status {
    fn from(error: ControlError) -> Self {
        let code = match error {
            ControlError::UnknownModel(_) | ControlError::NotFound(_) => Code::NotFound,
            ControlError::AlreadyLoaded(_) => Code::AlreadyExists,
            ControlError::InvalidArgument { .. } => Code::InvalidArgument,
            ControlError::Failed(_) => Code::Internal,
        };
        Status::new(code, error.to_string())
    }
}

impl From<ValidationError> for Status {
    fn from(error: ValidationError) -> Self {
        let code = match error {
            ValidationError::UnknownModel { .. } => Code::NotFound,
            ValidationError::OutOfRange { .. }
            | ValidationError::Empty { .. }
            | ValidationError::PromptAndMessages
            | ValidationError::NoPrompt => Code::InvalidArgument,
        };
        Status::new(code, error.to_string())
    }
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
            EngineError::Unavailable(_) => 6,
            EngineError::DeadlineExceeded(_) => 7,
            EngineError::NotCached => 8,
            EngineError::Internal(_) => 9,
        }
    }
    const VARIANTS: usize = 10;

    /// Every variant, with the code proto/qnode/v1/inference.proto gives it.
    ///
    /// KNOWN FAILING (reported to the lead): the proto says an ONLY_IF_CACHED miss "fails with
    /// NOT_FOUND"; `From<EngineError>` gives FAILED_PRECONDITION. The hardening helper (#13)
    /// decides whether the proto or the code changes; this test holds the proto's word until then.
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
                EngineError::QueueFull {
                    model: "m".into(),
                    max_queued: 4,
                    retry_after: Duration::from_millis(1500),
                },
                Code::ResourceExhausted,
            ),
            (EngineError::NotReady("m".into()), Code::Unavailable),
            (
                EngineError::Unavailable("draining".into()),
                Code::Unavailable,
            ),
            (
                EngineError::DeadlineExceeded(Duration::from_secs(1)),
                Code::DeadlineExceeded,
            ),
            (EngineError::NotCached, Code::NotFound),
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
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn queue_full_carries_retry_metadata() {
        let status = Status::from(EngineError::QueueFull {
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
