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
    /// The file is not a valid GGUF (bad magic, truncated, inconsistent header).
    #[error("{path}: not a valid GGUF file: {reason}")]
    InvalidGguf {
        /// File involved.
        path: PathBuf,
        /// What is wrong.
        reason: String,
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
    #[error("unsupported architecture `{0}` (supported: llama, gemma3)")]
    UnsupportedArchitecture(String),
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
    #[error("model `{id}` not found: {hint}")]
    ModelNotFound {
        /// What was asked for.
        id: String,
        /// What to do about it.
        hint: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
