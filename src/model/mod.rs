//! Model files and the forward pass: GGUF in, logits out.

pub mod error;

pub use error::ModelError;
