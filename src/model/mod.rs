//! Model files and the forward pass: GGUF in, logits out.

pub mod chat_template;
pub mod error;
pub mod tokenizer;

pub use error::ModelError;
