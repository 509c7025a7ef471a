//! Errors from reading, converting and running model files.

use std::path::PathBuf;

/// Why a model could not be loaded, converted or run. Variants name the file, key or limit.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A tensor's data could not be read although the header was consistent.
    #[error("{path}: not a valid GGUF file: {reason}")]
    InvalidGguf {
        /// File involved.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The header is malformed; `error` names the field and the value found.
    #[error("{path}: not a valid GGUF file: {error}")]
    BadHeader {
        /// File involved.
        path: PathBuf,
        /// What is wrong with the header.
        error: super::gguf::HeaderError,
    },
    /// A required metadata key is absent.
    #[error("GGUF metadata key `{0}` is missing")]
    MissingMetadata(String),
    /// A metadata key has the wrong type or an out-of-range value.
    #[error("GGUF metadata key `{key}`: {reason}")]
    BadMetadata {
        /// Metadata key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// `general.architecture` names a model family qnode does not run.
    #[error(
        "unsupported architecture `{name}` in `general.architecture` (supported: {supported})"
    )]
    UnsupportedArchitecture {
        /// The file's architecture.
        name: String,
        /// The families qnode runs, comma-separated.
        supported: String,
    },
    /// A tensor's quantization type cannot be read or requantized.
    #[error("tensor `{name}` has unsupported type {dtype}")]
    UnsupportedTensorType {
        /// Tensor name.
        name: String,
        /// Its GGML type.
        dtype: String,
    },
    /// A tensor the architecture needs is absent.
    #[error("tensor `{0}` is missing")]
    MissingTensor(String),
    /// Building or running the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A model id that is neither in the manifest nor a path to a file.
    #[error("model `{}` not found: {hint}", crate::types::echo(id))]
    ModelNotFound {
        /// What was asked for.
        id: String,
        /// What to do about it.
        hint: String,
    },
    /// Two configured models resolve to the same id (files with the same stem).
    #[error(
        "model id `{id}` would be served by both {} and {}: rename one file (the id is the file \
         name without `.gguf`)",
        first.display(),
        second.display()
    )]
    DuplicateModelId {
        /// The id both resolve to.
        id: String,
        /// The first file.
        first: PathBuf,
        /// The second file.
        second: PathBuf,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
