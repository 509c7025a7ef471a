//! Errors a generation request can meet. Each reports its [`ErrorKind`]; fronts map kinds to their
//! status codes in one place.

use std::time::Duration;

use crate::types::ErrorKind;

/// Why a request was refused or failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// No model with this id is loaded.
    #[error("model `{}` is not served by this node", crate::types::echo(.0))]
    UnknownModel(String),
    /// A request field is out of range; the message names the field, limit and value given.
    #[error("{0}")]
    InvalidArgument(String),
    /// The output constraint (JSON schema, regex, grammar) cannot be compiled; the message names
    /// the request field and says why.
    #[error("{message}")]
    InvalidConstraint {
        /// The request field at fault (`response_format`, `json_schema`).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Prompt plus `max_tokens` does not fit in the context window.
    #[error(
        "prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) must be <= the context length {context_length}"
    )]
    ContextOverflow {
        /// Tokens in the rendered prompt.
        prompt_tokens: usize,
        /// Requested new tokens.
        max_tokens: usize,
        /// The model's (or configured) context length.
        context_length: usize,
    },
    /// The chat template could not be rendered for these messages.
    #[error("chat template: {0}")]
    Template(String),
    /// The admission queue is full; retry after the hint.
    #[error("queue for model `{model}` is full ({max_queued} waiting); retry in {retry_after:?}")]
    QueueFull {
        /// Model id.
        model: String,
        /// Configured queue bound.
        max_queued: usize,
        /// Suggested wait before retrying.
        retry_after: Duration,
    },
    /// The model is still loading or warming up.
    #[error("model `{0}` is not ready yet")]
    NotReady(String),
    /// The model's file failed to load (or to warm up); the node serves it no more until an
    /// Admin `LoadModel` succeeds.
    #[error("model `{model}` failed to load ({reason}); retry on another node")]
    ModelFailed {
        /// Model id.
        model: String,
        /// What went wrong, as logged at load time.
        reason: String,
    },
    /// The model was unloaded (Admin `UnloadModel`) while the request waited for it.
    #[error("model `{0}` was unloaded from this node; retry on another node")]
    ModelUnloaded(String),
    /// The model's instances are stopping because the node is shutting down.
    #[error("model `{0}` is shutting down with the node; retry on another node")]
    ShuttingDown(String),
    /// The request's deadline passed.
    #[error("deadline exceeded after {0:?}")]
    DeadlineExceeded(Duration),
    /// The request asked for `CachePolicy::OnlyIfCached` and no cached answer exists (or the
    /// request is not cacheable). Fronts map it to FAILED_PRECONDITION, not NOT_FOUND, so a gateway
    /// never mistakes it for an unknown model.
    #[error("no cached answer for this request (cache policy only-if-cached)")]
    NotCached,
    /// A bug or a failed forward pass; the request is lost, others keep running.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// What kind of failure this is, for every front's status map and the metrics.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::UnknownModel(_) => ErrorKind::NotFound,
            EngineError::InvalidArgument(_)
            | EngineError::InvalidConstraint { .. }
            | EngineError::ContextOverflow { .. }
            | EngineError::Template(_) => ErrorKind::InvalidArgument,
            EngineError::QueueFull { retry_after, .. } => ErrorKind::ResourceExhausted {
                retry_after: *retry_after,
            },
            EngineError::NotReady(_)
            | EngineError::ModelFailed { .. }
            | EngineError::ModelUnloaded(_)
            | EngineError::ShuttingDown(_) => ErrorKind::Unavailable,
            EngineError::DeadlineExceeded(_) => ErrorKind::DeadlineExceeded,
            EngineError::NotCached => ErrorKind::FailedPrecondition,
            EngineError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// A short machine-readable cause (`queue_full`, `model_unloaded`, ...), the `code` of the
    /// OpenAI error body.
    pub fn reason(&self) -> &'static str {
        match self {
            EngineError::UnknownModel(_) => "model_not_found",
            EngineError::InvalidArgument(_)
            | EngineError::InvalidConstraint { .. }
            | EngineError::Template(_) => "invalid_value",
            EngineError::ContextOverflow { .. } => "context_length_exceeded",
            EngineError::QueueFull { .. } => "queue_full",
            EngineError::NotReady(_) => "model_not_ready",
            EngineError::ModelFailed { .. } => "model_failed",
            EngineError::ModelUnloaded(_) => "model_unloaded",
            EngineError::ShuttingDown(_) => "shutting_down",
            EngineError::DeadlineExceeded(_) => "deadline_exceeded",
            EngineError::NotCached => "not_cached",
            EngineError::Internal(_) => "internal_error",
        }
    }
}
