//! The trait the fronts call: the pool implements it, the cache wraps it.

use tokio::sync::mpsc;

use super::{EngineError, GenerationEvent, GenerationRequest, ModelInfo};

/// Events of one generation: `Delta`s then one `Finished`, or an error. Bounded; dropping the
/// receiver cancels the generation at the next decode step and frees its batch slot.
pub type EventStream = mpsc::Receiver<Result<GenerationEvent, EngineError>>;

/// Something that turns validated requests into generations.
///
/// `submit` settles admission: it resolves once the request is checked against the model
/// (template, tokenization, prompt length, grammar, queue bound) with a stream, or with the
/// reason it was refused. A refusal is always its `Err`, never the stream's first item, so a
/// front can still answer with its own status (HTTP 429 + Retry-After, not an SSE error line
/// after a 200). It never waits for the generation itself, and never blocks a runtime worker:
/// tokenization runs on the pool's own threads.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The models this node serves, with their limits and state.
    fn models(&self) -> Vec<ModelInfo>;
    /// Start a generation.
    async fn submit(&self, request: GenerationRequest) -> Result<EventStream, EngineError>;
}
