//! [`FrontError`] → an HTTP status and OpenAI's error body `{"error":{"message","type","param",
//! "code"}}`, here and nowhere else: the status and `type` come from the error's [`ErrorKind`],
//! `code` is its `reason`, `param` its field.
//!
//! | cause                                   | HTTP | type                  | code                      |
//! |-----------------------------------------|------|-----------------------|---------------------------|
//! | bad JSON, a field out of range          | 400  | invalid_request_error | invalid_value / ...       |
//! | prompt + max_tokens over the context    | 400  | invalid_request_error | context_length_exceeded   |
//! | missing or wrong bearer key             | 401  | invalid_request_error | invalid_api_key           |
//! | `x-qnode-tenant` not the key's tenant   | 403  | permission_error      | tenant_not_allowed        |
//! | unknown model                           | 404  | invalid_request_error | model_not_found           |
//! | model queue full (`Retry-After` set)    | 429  | rate_limit_error      | queue_full                |
//! | Admin-only: already exists              | 409  | invalid_request_error | ...                       |
//! | not cached (`only-if-cached`)           | 412  | invalid_request_error | not_cached                |
//! | node loading/warming/standby/draining, model not ready/failed/unloaded, shutting down | 503 | service_unavailable | node_draining, model_unloaded, ... |
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

use crate::front::{ErrorKind, FrontError};
use crate::types::echo;

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

impl From<FrontError> for ApiError {
    fn from(error: FrontError) -> Self {
        let (status, kind) = match error.kind {
            ErrorKind::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            ErrorKind::Unauthenticated => (StatusCode::UNAUTHORIZED, "invalid_request_error"),
            ErrorKind::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error"),
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error"),
            ErrorKind::AlreadyExists => (StatusCode::CONFLICT, "invalid_request_error"),
            ErrorKind::FailedPrecondition => {
                (StatusCode::PRECONDITION_FAILED, "invalid_request_error")
            }
            ErrorKind::ResourceExhausted { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error")
            }
            ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            ErrorKind::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            // Never sent (the client left); nginx's "client closed request".
            ErrorKind::Cancelled => (
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "invalid_request_error",
            ),
            ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        let retry_after = match error.kind {
            ErrorKind::ResourceExhausted { retry_after } => Some(retry_after),
            _ => None,
        };
        Self {
            status,
            kind,
            message: error.message,
            param: error.param,
            code: error.reason,
            retry_after,
        }
    }
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        FrontError::invalid(param, message).into()
    }

    /// A 404 for a path this front does not serve.
    pub fn no_route(path: &str) -> Self {
        FrontError::new(
            ErrorKind::NotFound,
            "unknown_url",
            format!(
                "no route for `{}`: this node serves POST /v1/chat/completions, \
                 POST /v1/completions, GET /v1/models, GET /v1/models/{{id}}, GET /health and \
                 GET /ready",
                echo(path)
            ),
        )
        .into()
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
                    echo(&rejection.body_text())
                ),
            ),
            JsonRejection::JsonDataError(_) => (
                "invalid_value",
                format!(
                    "the body does not match the OpenAI request schema ({}); fix that field",
                    echo(&rejection.body_text())
                ),
            ),
            _ => ("invalid_body", echo(&rejection.body_text()).into_owned()),
        };
        let mut e: ApiError = FrontError::new(ErrorKind::InvalidArgument, code, hint).into();
        // The one status OpenAI's shape has and the error kinds do not.
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            e.status = StatusCode::PAYLOAD_TOO_LARGE;
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineError;
    use crate::front::{AuthError, ValidationError};
    use crate::node::{NodeState, Refusal};

    fn body(e: &ApiError) -> serde_json::Value {
        serde_json::from_str(&e.body_json()).unwrap()
    }

    fn api(error: impl Into<FrontError>) -> ApiError {
        ApiError::from(error.into())
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
            (
                EngineError::ModelFailed {
                    model: "m".into(),
                    reason: "bad".into(),
                },
                503,
                "model_failed",
            ),
            (
                EngineError::ModelUnloaded("m".into()),
                503,
                "model_unloaded",
            ),
            (EngineError::ShuttingDown("m".into()), 503, "shutting_down"),
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
            let e = api(error);
            assert_eq!(e.status.as_u16(), status, "{message}");
            assert_eq!(e.code, code, "{message}");
            assert_eq!(e.message, message);
            let json = body(&e);
            assert_eq!(json["error"]["message"], message);
            assert_eq!(json["error"]["code"], code);
        }
    }

    #[test]
    fn queue_full_sets_retry_after_in_whole_seconds() {
        let e = api(EngineError::QueueFull {
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
        let e = api(ValidationError::OutOfRange {
            field: "temperature".into(),
            constraint: "in [0, 2]".into(),
            given: "5".into(),
        });
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let json = body(&e);
        assert_eq!(json["error"]["param"], "temperature");
        assert_eq!(json["error"]["type"], "invalid_request_error");
        let e = api(ValidationError::UnknownModel {
            model: "x".into(),
            served: "smollm2".into(),
        });
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(body(&e)["error"]["param"], "model");
    }

    #[test]
    fn refusals_and_auth() {
        for (refusal, code) in [
            (Refusal::Starting(NodeState::Loading), "node_starting"),
            (Refusal::Standby, "node_standby"),
            (Refusal::Draining, "node_draining"),
        ] {
            let e = api(refusal);
            assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(e.code, code);
        }
        for auth in [AuthError::Missing, AuthError::Invalid] {
            let e = api(auth);
            assert_eq!(e.status, StatusCode::UNAUTHORIZED);
            assert!(e.message.contains("Authorization: Bearer"), "{}", e.message);
        }
    }
}
