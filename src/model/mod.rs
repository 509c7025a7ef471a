//! Model files and the forward pass: GGUF in, logits out.

pub mod error;
pub mod gguf;
pub mod hparams;
pub mod kv_cache;
pub mod linear;
pub mod quantize;
pub mod transformer;

pub use error::ModelError;
