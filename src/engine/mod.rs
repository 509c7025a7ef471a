//! One request's life inside a model instance: sampling, stop strings, incremental detokenization,
//! and the batching loop that runs the forward pass for all live sequences.

pub mod backend;
pub mod detokenizer;
pub mod error;
pub mod instance;
pub mod prefix;
pub mod request;
pub mod sampler;
pub mod sequence;
pub mod stop;

pub use backend::{Backend, EventStream};
pub use error::EngineError;
pub use request::{
    CachePolicy, ChatMessage, Completion, FinishReason, GenerationEvent, GenerationRequest,
    ModelInfo, ModelState, PromptInput, SamplingParams, Source, Timings,
};
