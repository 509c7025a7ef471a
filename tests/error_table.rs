//! The README's error table says what the node does: for every [`ErrorKind`], the row of its gRPC
//! status names the HTTP status the OpenAI front sends, both taken from the code that maps them
//! (`grpc::status`, `http::error`); and the proto's error list names every status an Inference
//! call can end with.

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
