//! Model files and the forward pass: GGUF in, logits out.

pub mod error;
pub mod kernels;

pub use error::ModelError;
