//! Every error of the HTTP front → an HTTP status and OpenAI's error body
//! `{"error":{"message","type","param","code"}}`, here and nowhere else.
//!
//! | cause                                   | HTTP | type                  | code                      |
//! |-----------------------------------------|------|-----------------------|---------------------------|
//! | bad JSON, a field out of range          | 400  | invalid_request_error | invalid_value / ...       |
//! | prompt + max_tokens over the context    | 400  | invalid_request_error | context_length_exceeded   |
//! | missing or wrong bearer key             | 401  | invalid_request_error | invalid_api_key           |
//! | unknown model                           | 404  | invalid_request_error | model_not_found           |
//! | model queue full (`Retry-After` set)    | 429  | rate_limit_error      | queue_full                |
//! | node loading/warming/standby/draining, model not ready, hard stop | 503 | service_unavailable | node state |
//! | the `x-qnode-timeout-ms` deadline passed | 504 | timeout               | deadline_exceeded         |
//! | a bug                                   | 500  | server_error          | internal_error            |
//!
//! The `openai` Python client raises `BadRequestError`, `AuthenticationError`, `NotFoundError`,
//! `RateLimitError`, `InternalServerError` / `APIStatusError` by these statuses.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::EngineError;
use crate::node::Refusal;
use crate::server::auth::AuthError;
use crate::server::call::CallError;
use crate::server::ValidationError;

/// One refused or failed HTTP call, ready to be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI error `type`.
    pub kind: &'static str,
    /// What happened and what to fix.
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// Machine-readable cause.
    pub code: &'static str,
    /// Sent as `Retry-After` (whole seconds, rounded up).
    pub retry_after: Option<Duration>,
    /// The gRPC code name of the same failure, for the shared `requests_total` label.
    pub grpc: tonic::Code,
}

/// The JSON body, `{"error": {...}}`.
#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        let grpc = match status {
            StatusCode::BAD_REQUEST => tonic::Code::InvalidArgument,
            StatusCode::UNAUTHORIZED => tonic::Code::Unauthenticated,
            StatusCode::NOT_FOUND => tonic::Code::NotFound,
            StatusCode::PRECONDITION_FAILED => tonic::Code::FailedPrecondition,
            StatusCode::TOO_MANY_REQUESTS => tonic::Code::ResourceExhausted,
            StatusCode::SERVICE_UNAVAILABLE => tonic::Code::Unavailable,
            StatusCode::GATEWAY_TIMEOUT => tonic::Code::DeadlineExceeded,
            _ => tonic::Code::Internal,
        };
        Self {
            status,
            kind,
            message,
            param: None,
            code,
            retry_after: None,
            grpc,
        }
    }

    /// A 400 about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
            message.into(),
        );
        e.param = Some(param.into());
        e
    }

    /// A 404 for a model this node does not serve (from validation or from the pool).
    fn model_not_found(message: String) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            message,
        );
        e.param = Some("model".into());
        e
    }

    /// A 404 for a path this front does not serve.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_url",
            format!(
                "no route for `{path}`: this node serves POST /v1/chat/completions, \
                 POST /v1/completions, GET /v1/models, GET /health and GET /ready"
            ),
        )
    }

    /// The JSON body alone, for an SSE `data:` line.
    pub fn body_json(&self) -> String {
        serde_json::to_string(&Body {
            error: Detail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .unwrap_or_else(|_| r#"{"error":{"message":"error","type":"server_error"}}"#.to_owned())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body_json(),
        )
            .into_response();
        if let Some(after) = self.retry_after {
            let seconds = after.as_millis().div_ceil(1000).max(1);
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        let message = error.to_string();
        match error {
            ValidationError::UnknownModel { .. } => Self::model_not_found(message),
            ValidationError::OutOfRange { field, .. } | ValidationError::Empty { field } => {
                Self::invalid(field, message)
            }
            ValidationError::PromptAndMessages | ValidationError::NoPrompt => {
                Self::invalid("messages", message)
            }
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        let message = error.to_string();
        match error {
            EngineError::UnknownModel(_) => Self::model_not_found(message),
            EngineError::InvalidArgument(_) | EngineError::Template(_) => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                message,
            ),
            EngineError::ContextOverflow { .. } => {
                let mut e = Self::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "context_length_exceeded",
                    message,
                );
                e.param = Some("messages".into());
                e
            }
            EngineError::QueueFull { retry_after, .. } => {
                let mut e = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "queue_full",
                    message,
                );
                e.retry_after = Some(retry_after);
                e
            }
            EngineError::NotReady(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "model_not_ready",
                message,
            ),
            EngineError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "unavailable",
                message,
            ),
            EngineError::DeadlineExceeded(_) => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "deadline_exceeded",
                message,
            ),
            EngineError::NotCached => Self::new(
                StatusCode::PRECONDITION_FAILED,
                "invalid_request_error",
                "not_cached",
                message,
            ),
            EngineError::Internal(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                message,
            ),
        }
    }
}

impl From<CallError> for ApiError {
    fn from(error: CallError) -> Self {
        let message = error.to_string();
        match error {
            CallError::Engine(e) => e.into(),
            CallError::HardStop => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "shutting_down",
                message,
            ),
            CallError::Deadline(_) => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "deadline_exceeded",
                message,
            ),
            CallError::EndedEarly => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                message,
            ),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let code = match &refusal {
            Refusal::Starting(_) => "node_starting",
            Refusal::Standby => "node_standby",
            Refusal::Draining => "node_draining",
        };
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            code,
            refusal.to_string(),
        )
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            format!("{error}: send the node's key as `Authorization: Bearer <key>`"),
        )
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let (code, hint) = match &rejection {
            JsonRejection::MissingJsonContentType(_) => (
                "invalid_content_type",
                "send the body as JSON with `Content-Type: application/json`".to_owned(),
            ),
            JsonRejection::JsonSyntaxError(_) => (
                "invalid_json",
                format!(
                    "the body is not valid JSON ({}); send one JSON object",
                    rejection.body_text()
                ),
            ),
            JsonRejection::JsonDataError(_) => (
                "invalid_value",
                format!(
                    "the body does not match the OpenAI request schema ({}); fix that field",
                    rejection.body_text()
                ),
            ),
            _ => ("invalid_body", rejection.body_text()),
        };
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", code, hint);
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            e.status = StatusCode::PAYLOAD_TOO_LARGE;
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeState;

    fn body(e: &ApiError) -> serde_json::Value {
        serde_json::from_str(&e.body_json()).unwrap()
    }

    #[test]
    fn every_engine_error_has_its_status() {
        let cases = [
            (
                EngineError::UnknownModel("m".into()),
                404,
                "model_not_found",
            ),
            (
                EngineError::InvalidArgument("x".into()),
                400,
                "invalid_value",
            ),
            (
                EngineError::ContextOverflow {
                    prompt_tokens: 10,
                    max_tokens: 20,
                    context_length: 16,
                },
                400,
                "context_length_exceeded",
            ),
            (EngineError::Template("t".into()), 400, "invalid_value"),
            (
                EngineError::QueueFull {
                    model: "m".into(),
                    max_queued: 4,
                    retry_after: Duration::from_millis(1500),
                },
                429,
                "queue_full",
            ),
            (EngineError::NotReady("m".into()), 503, "model_not_ready"),
            (EngineError::Unavailable("d".into()), 503, "unavailable"),
            (
                EngineError::DeadlineExceeded(Duration::from_secs(1)),
                504,
                "deadline_exceeded",
            ),
            (EngineError::NotCached, 412, "not_cached"),
            (EngineError::Internal("bug".into()), 500, "internal_error"),
        ];
        for (error, status, code) in cases {
            let message = error.to_string();
            let grpc = tonic::Status::from(error.clone()).code();
            let e = ApiError::from(error);
            assert_eq!(e.status.as_u16(), status, "{message}");
            assert_eq!(e.code, code, "{message}");
            assert_eq!(e.message, message);
            assert_eq!(
                e.grpc, grpc,
                "same metric label as the gRPC front: {message}"
            );
            let json = body(&e);
            assert_eq!(json["error"]["message"], message);
            assert_eq!(json["error"]["code"], code);
        }
    }

    #[test]
    fn queue_full_sets_retry_after_in_whole_seconds() {
        let e = ApiError::from(EngineError::QueueFull {
            model: "m".into(),
            max_queued: 4,
            retry_after: Duration::from_millis(1500),
        });
        let response = e.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn validation_errors_name_the_field() {
        let e = ApiError::from(ValidationError::OutOfRange {
            field: "temperature".into(),
            constraint: "in [0, 2]".into(),
            given: "5".into(),
        });
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let json = body(&e);
        assert_eq!(json["error"]["param"], "temperature");
        assert_eq!(json["error"]["type"], "invalid_request_error");
        let e = ApiError::from(ValidationError::UnknownModel {
            model: "x".into(),
            served: "smollm2".into(),
        });
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(body(&e)["error"]["param"], "model");
    }

    #[test]
    fn refusals_auth_and_call_errors() {
        for (refusal, code) in [
            (Refusal::Starting(NodeState::Loading), "node_starting"),
            (Refusal::Standby, "node_standby"),
            (Refusal::Draining, "node_draining"),
        ] {
            let e = ApiError::from(refusal);
            assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(e.code, code);
        }
        for auth in [AuthError::Missing, AuthError::Invalid] {
            let e = ApiError::from(auth);
            assert_eq!(e.status, StatusCode::UNAUTHORIZED);
            assert!(e.message.contains("Authorization: Bearer"), "{}", e.message);
        }
        assert_eq!(
            ApiError::from(CallError::HardStop).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ApiError::from(CallError::Deadline(Duration::from_millis(5))).status,
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            ApiError::from(CallError::EndedEarly).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
