//! qnode: an inference worker node that serves 8-bit (Q8_0) quantized LLMs over gRPC and an
//! OpenAI-compatible HTTP API.
//!
//! # Layout
//! - [`types`]: the crate's vocabulary (messages, prompt input, sampling, the generation request
//!   and its events, finish reasons, cache policy and source, model info, role, [`types::ErrorKind`]).
//!   A leaf: it imports nothing of the crate.
//! - [`duration`]: the one duration format of every setting (`"250ms"`, `"30s"`, `"1h"`). A leaf.
//! - [`config`]: the one `Config` (TOML file, `QNODE_*` env, flags), validated at start.
//! - [`model`]: GGUF reading, Q8_0 requantization and writing, the tokenizer and chat template built
//!   from GGUF metadata, and the forward pass (llama, gemma3) over a ragged batch of sequences, each
//!   with its own KV cache. Knows nothing of the fronts or caches.
//! - [`constrain`]: constrained decoding (JSON schema, JSON object, regex, Lark) with llguidance:
//!   a model's token trie built from its GGUF tokenizer, and the per-sequence mask the engine
//!   applies to the logits before sampling.
//! - [`tools`]: tool calling's one output format, defined once: the JSON schema the output is held
//!   to (from the declared functions and `tool_choice`), the system-turn description for templates
//!   that do not read `tools`, and the parser that turns the output back into calls. Uses only
//!   [`types`]; `model` renders with it, `front` constrains with it, the fronts read answers with it.
//! - [`engine`]: what one request is inside a model instance (sampling, stop strings, incremental
//!   detokenization), the batching loop of one instance on its own OS thread, and the
//!   [`engine::Backend`] seam the fronts call.
//! - [`pool`]: instances per model sharing weights, admission queue and dispatch; implements
//!   `Backend`.
//! - [`cache`]: the answer cache (L1 in process, L2 Redis, single flight), a decorator over any
//!   `Backend`.
//! - [`node`]: the node's lifecycle (loading, warming, ready or standby, draining) and in-flight
//!   calls, shared by every front.
//! - [`front`]: what both fronts share: the neutral request, validation, auth, the error shape
//!   and the call loop. Knows no tonic or axum type.
//! - [`grpc`]: the tonic services (Inference, Admin, health, reflection): wire translation and the
//!   one error → `Status` map.
//! - [`http`]: the OpenAI-compatible HTTP front (axum): JSON translation and the one error → OpenAI
//!   body map.
//! - [`metrics`]: the Prometheus registry and the `/metrics` listener.
//! - [`app`]: the composition root: builds every part above from one `Config` and serves
//!   (`qnode serve` calls [`app::run`]; tests build an [`app::App`] over a stand-in backend).
//!
//! A request flows: grpc or http (wire → neutral request) → front (admit, validate, open the call)
//! → cache → pool (admit, pick an instance) → engine instance thread (prefill, decode with the
//! other live sequences, sample, detokenize) → events back over a bounded channel per request →
//! front (deadline, cancel, stream) → wire.

pub mod app;
pub mod cache;
pub mod config;
pub mod constrain;
pub mod duration;
pub mod engine;
pub mod front;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod model;
pub mod node;
pub mod pool;
pub mod tools;
pub mod types;
