//! The README's error table says what the node does: for every [`ErrorKind`], the row of its gRPC
//! status names the HTTP status the OpenAI front sends, both taken from the code that maps them
//! (`grpc::status`, `http::error`); the proto's error list names every status an Inference
//! call can end with; and every engine error, variant by variant, has the gRPC code the proto
//! gives it and the HTTP status and OpenAI code the README gives it.

use qnode::engine::EngineError;
use qnode::front::{ErrorKind, FrontError};
use qnode::http::error::ApiError;
use std::time::Duration;

/// Every kind; the match fails to compile when a kind is added, so the table must grow with it.
fn kinds() -> Vec<ErrorKind> {
    let all = vec![
        ErrorKind::InvalidArgument,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::FailedPrecondition,
        ErrorKind::ResourceExhausted {
            retry_after: Duration::from_secs(1),
        },
        ErrorKind::Unavailable,
        ErrorKind::DeadlineExceeded,
        ErrorKind::Cancelled,
        ErrorKind::Unauthenticated,
        ErrorKind::PermissionDenied,
        ErrorKind::Internal,
    ];
    for k in &all {
        match k {
            ErrorKind::InvalidArgument
            | ErrorKind::NotFound
            | ErrorKind::AlreadyExists
            | ErrorKind::FailedPrecondition
            | ErrorKind::ResourceExhausted { .. }
            | ErrorKind::Unavailable
            | ErrorKind::DeadlineExceeded
            | ErrorKind::Cancelled
            | ErrorKind::Unauthenticated
            | ErrorKind::PermissionDenied
            | ErrorKind::Internal => {}
        }
    }
    all
}

/// gRPC's spelling of a code (`INVALID_ARGUMENT`), as the README and the proto write it.
fn grpc_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The README's error table: gRPC status → the HTTP cell.
fn readme_rows() -> Vec<(String, String)> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("| gRPC status | HTTP |")
        .expect("README has the error table");
    readme[start..]
        .lines()
        .skip(2)
        .map(str::trim)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (cells[0].to_owned(), cells[1].to_owned())
        })
        .collect()
}

#[test]
fn readme_error_table_matches_both_fronts() {
    let rows = readme_rows();
    let kinds = kinds();
    assert_eq!(rows.len(), kinds.len(), "one row per kind: {rows:?}");
    for kind in kinds {
        let error = FrontError::new(kind, "x", "m");
        let grpc = grpc_name(tonic::Status::from(error.clone()).code());
        let http = ApiError::from(error).status.as_u16().to_string();
        let (_, cell) = rows
            .iter()
            .find(|(code, _)| *code == grpc)
            .unwrap_or_else(|| panic!("no README row for {grpc} ({kind:?}): {rows:?}"));
        assert!(
            cell.starts_with(&http),
            "{grpc}: README says HTTP {cell:?}, the front sends {http}"
        );
    }
}

/// `proto/qnode/v1/inference.proto` lists the statuses an Inference call ends with, the
/// ONLY_IF_CACHED miss (FAILED_PRECONDITION, not NOT_FOUND) among them.
#[test]
fn proto_error_list_names_every_inference_status() {
    let proto = include_str!("../proto/qnode/v1/inference.proto");
    let header: String = proto
        .lines()
        .take_while(|l| l.starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    for code in [
        "NOT_FOUND",
        "INVALID_ARGUMENT",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "FAILED_PRECONDITION",
        "CANCELLED",
        "INTERNAL",
    ] {
        assert!(
            header.contains(&format!("//   {code}")),
            "the proto's error list lacks {code}:\n{header}"
        );
    }
    let miss = proto
        .lines()
        .skip_while(|l| !l.contains("CACHE_POLICY_REFRESH"))
        .nth(1)
        .unwrap_or_default();
    assert!(miss.contains("FAILED_PRECONDITION"), "{miss}");
}

/// Which variant `e` is. No wildcard arm: a new `EngineError` variant fails to compile here until
/// [`every_engine_error_has_its_code_on_both_fronts`] gives it its codes.
fn engine_variant(e: &EngineError) -> usize {
    match e {
        EngineError::UnknownModel(_) => 0,
        EngineError::InvalidArgument(_) => 1,
        EngineError::InvalidConstraint { .. } => 2,
        EngineError::ContextOverflow { .. } => 3,
        EngineError::Template(_) => 4,
        EngineError::QueueFull { .. } => 5,
        EngineError::NotReady(_) => 6,
        EngineError::ModelFailed { .. } => 7,
        EngineError::ModelUnloaded(_) => 8,
        EngineError::ShuttingDown(_) => 9,
        EngineError::DeadlineExceeded(_) => 10,
        EngineError::NotCached => 11,
        EngineError::Internal(_) => 12,
    }
}
const ENGINE_VARIANTS: usize = 13;

/// Every engine error, each variant exactly once, with the gRPC code proto/qnode/v1/inference.proto
/// gives it (the ONLY_IF_CACHED miss is FAILED_PRECONDITION) and the HTTP status and OpenAI `code`
/// the README's table gives it, through the public conversions both fronts use. Nothing is
/// skipped: a variant whose code disagrees with the proto fails here.
#[test]
fn every_engine_error_has_its_code_on_both_fronts() {
    use tonic::Code;
    let cases = [
        (
            EngineError::UnknownModel("m".into()),
            Code::NotFound,
            404,
            "model_not_found",
        ),
        (
            EngineError::InvalidArgument("x".into()),
            Code::InvalidArgument,
            400,
            "invalid_value",
        ),
        (
            EngineError::InvalidConstraint {
                field: "json_schema".into(),
                message: "`json_schema` is not a valid JSON schema: x".into(),
            },
            Code::InvalidArgument,
            400,
            "invalid_value",
        ),
        (
            EngineError::ContextOverflow {
                prompt_tokens: 10,
                max_tokens: 20,
                context_length: 16,
            },
            Code::InvalidArgument,
            400,
            "context_length_exceeded",
        ),
        (
            EngineError::Template("t".into()),
            Code::InvalidArgument,
            400,
            "invalid_value",
        ),
        (
            EngineError::QueueFull {
                model: "m".into(),
                max_queued: 4,
                retry_after: Duration::from_millis(1500),
            },
            Code::ResourceExhausted,
            429,
            "queue_full",
        ),
        (
            EngineError::NotReady("m".into()),
            Code::Unavailable,
            503,
            "model_not_ready",
        ),
        (
            EngineError::ModelFailed {
                model: "m".into(),
                reason: "bad file".into(),
            },
            Code::Unavailable,
            503,
            "model_failed",
        ),
        (
            EngineError::ModelUnloaded("m".into()),
            Code::Unavailable,
            503,
            "model_unloaded",
        ),
        (
            EngineError::ShuttingDown("m".into()),
            Code::Unavailable,
            503,
            "shutting_down",
        ),
        (
            EngineError::DeadlineExceeded(Duration::from_secs(1)),
            Code::DeadlineExceeded,
            504,
            "deadline_exceeded",
        ),
        (
            EngineError::NotCached,
            Code::FailedPrecondition,
            412,
            "not_cached",
        ),
        (
            EngineError::Internal("bug".into()),
            Code::Internal,
            500,
            "internal_error",
        ),
    ];
    let mut seen: Vec<usize> = cases.iter().map(|(e, ..)| engine_variant(e)).collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..ENGINE_VARIANTS).collect::<Vec<_>>(),
        "every variant exactly once"
    );
    let rows = readme_rows();
    for (error, code, http, reason) in cases {
        let message = error.to_string();
        let front = FrontError::from(error);
        let status = tonic::Status::from(front.clone());
        assert_eq!(status.code(), code, "gRPC code of {message:?}");
        assert_eq!(status.message(), message);
        let api = ApiError::from(front);
        assert_eq!(
            (api.status.as_u16(), api.code),
            (http, reason),
            "HTTP status and code of {message:?}"
        );
        let (_, cell) = rows
            .iter()
            .find(|(name, _)| *name == grpc_name(code))
            .unwrap_or_else(|| panic!("no README row for {code:?}"));
        assert!(
            cell.starts_with(&http.to_string()),
            "README row {code:?}: {cell}"
        );
    }
}
