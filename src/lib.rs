//! qnode: an inference worker node that serves 8-bit (Q8_0) quantized LLMs over gRPC.
//!
//! # Layout
//! - [`model`]: GGUF reading, Q8_0 requantization and writing, the tokenizer and chat template built
//!   from GGUF metadata, and the forward pass (llama, gemma3) over a ragged batch of sequences, each
//!   with its own KV cache. Knows nothing of gRPC or caches.
//! - [`engine`]: what one request is (validated input, sampling, stop strings, incremental
//!   detokenization) and the batching loop of one model instance on its own OS thread.
//! - [`pool`]: instances per model sharing weights, admission queue and dispatch.
//! - [`node`]: the node's lifecycle (loading, warming, ready or standby, draining) and in-flight
//!   calls, shared by every front.
//! - [`openai`]: the OpenAI-compatible HTTP front (axum) over the same node, backend and metrics.
//! - [`server`]: tonic services (Inference, health, reflection), errors → `Status` in one place.
//! - [`config`]: the one `Config` (TOML file, `QNODE_*` env, flags).
//!
//! A request flows: server (validate) → pool (admit, pick an instance) → engine instance thread
//! (prefill, decode with the other live sequences, sample, detokenize) → tokens back over a bounded
//! channel per request.

pub mod cache;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod node;
pub mod openai;
pub mod pool;
pub mod server;
