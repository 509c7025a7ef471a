//! The trait the fronts call: the pool implements it, the cache wraps it.

use tokio::sync::mpsc;

use super::{EngineError, GenerationEvent, GenerationRequest, ModelInfo};

/// Events of one generation: `Delta`s then one `Finished`, or an error. Bounded; dropping the
/// receiver cancels the generation at the next decode step and frees its batch slot.
pub type EventStream = mpsc::Receiver<Result<GenerationEvent, EngineError>>;

/// Something that turns validated requests into generations.
///
/// `submit` never blocks: it checks the request against the model (template, prompt length,
/// queue bound) and returns at once with a stream, or with the reason it was refused.
pub trait Backend: Send + Sync + 'static {
    /// The models this node serves, with their limits and state.
    fn models(&self) -> Vec<ModelInfo>;
    /// Start a generation.
    fn submit(&self, request: GenerationRequest) -> Result<EventStream, EngineError>;
}
