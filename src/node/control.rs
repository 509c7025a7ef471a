//! Changing what a running node serves: the operations behind the Admin service's model calls.

use std::time::Duration;

use crate::config::ModelOverrides;
use crate::engine::ModelInfo;
use crate::types::ErrorKind;

/// What a warm-up did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WarmupReport {
    /// Warm-up generations run (one per instance).
    pub generations: usize,
    /// Hot answers loaded from the fleet's cache.
    pub hot_answers_loaded: usize,
    /// Wall time of the whole warm-up.
    pub elapsed: Duration,
}

/// Why a model operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such model on this node.
    #[error(
        "model `{}` is not served by this node; ListModels lists the ones that are",
        crate::types::echo(.0)
    )]
    UnknownModel(String),
    /// LoadModel of a model already served.
    #[error(
        "model `{}` is already served; UnloadModel it first to load it with other settings",
        crate::types::echo(.0)
    )]
    AlreadyLoaded(String),
    /// The id resolves to no file.
    #[error("{0}")]
    NotFound(String),
    /// A setting is out of range.
    #[error("`{field}` must be {constraint}. Given: {}", crate::types::echo(value))]
    InvalidArgument {
        /// Field name.
        field: &'static str,
        /// The rule.
        constraint: String,
        /// What was given.
        value: String,
    },
    /// Loading or warming failed.
    #[error("{0}")]
    Failed(String),
}

impl ControlError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ControlError::UnknownModel(_) | ControlError::NotFound(_) => ErrorKind::NotFound,
            ControlError::AlreadyLoaded(_) => ErrorKind::AlreadyExists,
            ControlError::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            ControlError::Failed(_) => ErrorKind::Internal,
        }
    }

    /// Short machine-readable cause.
    pub fn reason(&self) -> &'static str {
        match self {
            ControlError::UnknownModel(_) | ControlError::NotFound(_) => "model_not_found",
            ControlError::AlreadyLoaded(_) => "model_already_loaded",
            ControlError::InvalidArgument { .. } => "invalid_value",
            ControlError::Failed(_) => "internal_error",
        }
    }
}

/// LoadModel, UnloadModel and Warmup.
#[async_trait::async_trait]
pub trait ModelControl: Send + Sync + 'static {
    /// Load, warm and start serving one more model: `id` with the node's model defaults and
    /// flags, then `overrides` (the caller's own fields).
    async fn load_model(
        &self,
        id: String,
        overrides: ModelOverrides,
    ) -> Result<ModelInfo, ControlError>;
    /// Stop serving `id`; returns how many queued requests were refused.
    async fn unload_model(&self, id: &str) -> Result<usize, ControlError>;
    /// Warm-up generations on every instance of `models` (all when empty), then preload up to
    /// `hot_answers` of the fleet's hot answers.
    async fn warm_up(
        &self,
        models: &[String],
        hot_answers: usize,
    ) -> Result<WarmupReport, ControlError>;
}
