//! [`FrontError`]: any error a call can meet, in the one shape both fronts render.
//!
//! Each domain error reports its own [`ErrorKind`] (and a short machine `reason`); the `From`
//! impls here only gather that into one value. The gRPC front maps a `FrontError` to a
//! `tonic::Status` in `grpc::status`, the HTTP front to an OpenAI error body in `http::error`:
//! one map per front, no status chosen anywhere else.

use crate::engine::EngineError;
use crate::node::{ControlError, Refusal, TransitionError};
use crate::types::ErrorKind;

use super::auth::AuthError;
use super::call::CallError;
use super::validate::ValidationError;

/// A refused or failed call, ready for a front to render.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct FrontError {
    /// What kind of failure: picks the gRPC code, the HTTP status and the metric label.
    pub kind: ErrorKind,
    /// What happened and what to fix, for the caller.
    pub message: String,
    /// Short machine-readable cause (`queue_full`, `node_draining`, ...): the OpenAI `code`.
    pub reason: &'static str,
    /// The request field at fault, when one is (OpenAI's `param`).
    pub param: Option<String>,
}

impl FrontError {
    /// An error of `kind` with `reason` and `message`, no field named.
    pub fn new(kind: ErrorKind, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            reason,
            param: None,
        }
    }

    /// An invalid argument about the request field (or header) `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(ErrorKind::InvalidArgument, "invalid_value", message)
        }
    }

    /// The same error with `reason` as its machine-readable cause.
    pub fn with_reason(mut self, reason: &'static str) -> Self {
        self.reason = reason;
        self
    }
}

impl From<EngineError> for FrontError {
    fn from(error: EngineError) -> Self {
        let param = match &error {
            EngineError::UnknownModel(_) => Some("model"),
            EngineError::ContextOverflow { .. } => Some("messages"),
            EngineError::InvalidConstraint { field, .. } => Some(field.as_str()),
            _ => None,
        };
        Self {
            kind: error.kind(),
            reason: error.reason(),
            param: param.map(str::to_owned),
            message: error.to_string(),
        }
    }
}

impl From<ValidationError> for FrontError {
    fn from(error: ValidationError) -> Self {
        let message = error.to_string();
        let (kind, reason, param) = match error {
            ValidationError::UnknownModel { .. } => (
                ErrorKind::NotFound,
                "model_not_found",
                Some("model".to_owned()),
            ),
            ValidationError::OutOfRange { field, .. }
            | ValidationError::Empty { field }
            | ValidationError::Needs { field, .. }
            | ValidationError::TemplateOption { field, .. }
            | ValidationError::Tools { field, .. } => {
                (ErrorKind::InvalidArgument, "invalid_value", Some(field))
            }
            ValidationError::PromptAndMessages | ValidationError::NoPrompt => (
                ErrorKind::InvalidArgument,
                "invalid_value",
                Some("messages".to_owned()),
            ),
            ValidationError::TenantNotAllowed { .. } => (
                ErrorKind::PermissionDenied,
                "tenant_not_allowed",
                Some(super::TENANT_HEADER.to_owned()),
            ),
        };
        Self {
            kind,
            message,
            reason,
            param,
        }
    }
}

impl From<CallError> for FrontError {
    fn from(error: CallError) -> Self {
        match error {
            CallError::Engine(e) => e.into(),
            other => Self::new(other.kind(), other.reason(), other.to_string()),
        }
    }
}

impl From<Refusal> for FrontError {
    fn from(refusal: Refusal) -> Self {
        Self::new(refusal.kind(), refusal.reason(), refusal.to_string())
    }
}

impl From<AuthError> for FrontError {
    fn from(error: AuthError) -> Self {
        Self::new(
            error.kind(),
            "invalid_api_key",
            format!("{error}: send the node's key as `Authorization: Bearer <key>`"),
        )
    }
}

impl From<TransitionError> for FrontError {
    fn from(error: TransitionError) -> Self {
        Self::new(error.kind(), "invalid_state", error.to_string())
    }
}

impl From<ControlError> for FrontError {
    fn from(error: ControlError) -> Self {
        let param = match &error {
            ControlError::InvalidArgument { field, .. } => Some((*field).to_owned()),
            _ => None,
        };
        Self {
            kind: error.kind(),
            reason: error.reason(),
            param,
            message: error.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn domain_errors_keep_their_kind_message_and_field() {
        let e = FrontError::from(EngineError::QueueFull {
            model: "m".into(),
            max_queued: 4,
            retry_after: Duration::from_millis(1500),
        });
        assert_eq!(
            e.kind,
            ErrorKind::ResourceExhausted {
                retry_after: Duration::from_millis(1500)
            }
        );
        assert_eq!(e.reason, "queue_full");
        assert!(e.message.contains("(4 waiting)"), "{}", e.message);

        let e = FrontError::from(ValidationError::OutOfRange {
            field: "temperature".into(),
            constraint: "in [0, 2]".into(),
            given: "5".into(),
        });
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert_eq!(e.param.as_deref(), Some("temperature"));

        let e = FrontError::from(ValidationError::UnknownModel {
            model: "x".into(),
            served: "smollm2".into(),
        });
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.param.as_deref(), Some("model"));

        let e = FrontError::from(Refusal::Draining);
        assert_eq!(
            (e.kind, e.reason),
            (ErrorKind::Unavailable, "node_draining")
        );
        let e = FrontError::from(AuthError::Missing);
        assert_eq!(e.kind, ErrorKind::Unauthenticated);
        assert!(e.message.contains("Authorization: Bearer"), "{}", e.message);
    }

    #[test]
    fn call_errors_have_their_kinds() {
        let cases = [
            (CallError::HardStop, ErrorKind::Unavailable, "shutting_down"),
            (
                CallError::Deadline(Duration::from_millis(5)),
                ErrorKind::DeadlineExceeded,
                "deadline_exceeded",
            ),
            (CallError::EndedEarly, ErrorKind::Internal, "internal_error"),
            (
                CallError::Engine(EngineError::NotCached),
                ErrorKind::FailedPrecondition,
                "not_cached",
            ),
        ];
        for (error, kind, reason) in cases {
            let e = FrontError::from(error);
            assert_eq!((e.kind, e.reason), (kind, reason), "{}", e.message);
        }
    }

    #[test]
    fn unavailable_engine_errors_say_which_case() {
        let cases = [
            (
                EngineError::ModelFailed {
                    model: "m".into(),
                    reason: "bad header".into(),
                },
                "model_failed",
                "failed to load (bad header)",
            ),
            (
                EngineError::ModelUnloaded("m".into()),
                "model_unloaded",
                "was unloaded",
            ),
            (
                EngineError::ShuttingDown("m".into()),
                "shutting_down",
                "shutting down",
            ),
            (
                EngineError::NotReady("m".into()),
                "model_not_ready",
                "not ready",
            ),
        ];
        for (error, reason, says) in cases {
            let e = FrontError::from(error);
            assert_eq!(e.kind, ErrorKind::Unavailable);
            assert_eq!(e.reason, reason);
            assert!(e.message.contains(says), "{}", e.message);
        }
    }
}
