//! One request's life inside a model instance: sampling, stop strings, incremental detokenization,
//! and the batching loop that runs the forward pass for all live sequences.

pub mod backend;
pub mod detokenizer;
pub mod error;
pub mod instance;
pub mod logprobs;
pub mod prefix;
pub mod sampler;
pub mod sequence;
pub mod stop;

pub use backend::{Backend, EventStream};
pub use error::EngineError;
// The engine's API speaks the crate's vocabulary; re-exported so callers of the engine need one path.
pub use crate::types::{
    CachePolicy, ChatMessage, Completion, FinishReason, GenerationEvent, GenerationRequest,
    ModelInfo, ModelState, PromptInput, SamplingParams, Source, Timings,
};
