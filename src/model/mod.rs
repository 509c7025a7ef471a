//! Model files and the forward pass: GGUF in, logits out.

pub mod attention;
pub mod chat_template;
pub mod embed;
pub mod error;
pub mod gguf;
pub mod hparams;
pub mod kernels;
pub mod kv_cache;
pub mod linear;
pub mod loaded;
pub mod pyjson;
pub mod quantize;
pub mod registry;
mod scores_q8;
pub mod tiny;
pub mod tokenizer;
pub mod transformer;
pub mod vmath;

pub use error::ModelError;
