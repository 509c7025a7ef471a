//! Errors a generation request can meet. Fronts map each variant to their status code in one place.

use std::time::Duration;

/// Why a request was refused or failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// No model with this id is loaded.
    #[error("model `{0}` is not served by this node")]
    UnknownModel(String),
    /// A request field is out of range; the message names the field, limit and value given.
    #[error("{0}")]
    InvalidArgument(String),
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
    /// The node is draining or on standby and takes no new work.
    #[error("node is not accepting requests ({0})")]
    Unavailable(String),
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
