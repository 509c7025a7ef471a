//! The node's models behind the lifecycle: the start-up sequence (load → warm → preload hot
//! answers → ready or standby) and the Admin service's model calls, over the pool and the cache.

use std::sync::Arc;
use std::time::Instant;

use super::control::{ControlError, ModelControl, WarmupReport};
use super::Node;
use crate::cache::{CachedBackend, ModelIdentity};
use crate::config::{ModelConfig, ModelOverrides};
use crate::engine::{Backend, ModelInfo};
use crate::model::ModelError;
use crate::pool::{ModelPool, PoolError};

/// The pool and the cache in front of it, driven together.
pub struct NodeModels {
    pool: Arc<ModelPool>,
    cache: Arc<CachedBackend>,
    node: Arc<Node>,
    /// The node's model flags, laid over models added at run time.
    overrides: ModelOverrides,
}

impl From<PoolError> for ControlError {
    fn from(error: PoolError) -> Self {
        match error {
            PoolError::AlreadyServed(id) => ControlError::AlreadyLoaded(id),
            PoolError::UnknownModel(id) => ControlError::UnknownModel(id),
            PoolError::Model(e @ ModelError::ModelNotFound { .. }) => {
                ControlError::NotFound(e.to_string())
            }
            PoolError::Oversubscribed {
                instances,
                threads,
                cores,
                ..
            } => ControlError::InvalidArgument {
                field: "instances x threads_per_instance",
                constraint: format!("<= available cores ({cores})"),
                value: format!("{instances} x {threads}"),
            },
            other => ControlError::Failed(other.to_string()),
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> ControlError {
    ControlError::Failed(format!("model task failed: {e}"))
}

impl NodeModels {
    /// Drives `pool` (wrapped by `cache`) for `node`.
    pub fn new(pool: Arc<ModelPool>, cache: Arc<CachedBackend>, node: Arc<Node>) -> Arc<Self> {
        Self::with_overrides(pool, cache, node, ModelOverrides::default())
    }

    /// As [`NodeModels::new`]; models added by `LoadModel` also get the node's model flags
    /// (`overrides`, [`crate::config::Config::model_overrides`]), as configured ones did.
    pub fn with_overrides(
        pool: Arc<ModelPool>,
        cache: Arc<CachedBackend>,
        node: Arc<Node>,
        overrides: ModelOverrides,
    ) -> Arc<Self> {
        Arc::new(Self {
            pool,
            cache,
            node,
            overrides,
        })
    }

    /// Start-up: load every model (node loading), run warm-up generations on every instance and
    /// preload up to `hot_answers` of the fleet's hot answers (node warming), then ready or
    /// standby by role. A model that fails is logged and left out; the others serve.
    pub async fn start(&self, hot_answers: usize) {
        let pool = Arc::clone(&self.pool);
        match tokio::task::spawn_blocking(move || pool.load_pending()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "loading failed"),
            Err(e) => tracing::error!(error = %e, "loader panicked"),
        }
        self.node.warming();
        if let Err(e) = self.warm_up(&[], hot_answers).await {
            tracing::error!(error = %e, "warm-up failed");
        }
        self.node.warmed();
        if let Some(after) = self.node.warm_after() {
            tracing::info!(
                warm_after_ms = after.as_millis() as u64,
                state = %self.node.state(),
                "node warm"
            );
        }
    }

    /// Lets the cache key answers of every loaded model by what identifies its weights.
    fn register_identities(&self) {
        for info in self.pool.models() {
            if let Some(model) = self.pool.loaded(&info.id) {
                self.cache.set_identity(ModelIdentity {
                    model_id: info.id.clone(),
                    file_digest: model.file_digest.clone(),
                    quant: model.quant.as_str().to_string(),
                    template_id: model.template_digest.clone(),
                });
            }
        }
    }
}

#[async_trait::async_trait]
impl ModelControl for NodeModels {
    async fn load_model(
        &self,
        id: String,
        overrides: ModelOverrides,
    ) -> Result<ModelInfo, ControlError> {
        let config = ModelConfig::resolve(ModelConfig::new(id), &self.overrides, &overrides);
        let pool = Arc::clone(&self.pool);
        let info = tokio::task::spawn_blocking(move || pool.add_model(config))
            .await
            .map_err(join_error)??;
        self.register_identities();
        Ok(info)
    }

    async fn unload_model(&self, id: &str) -> Result<usize, ControlError> {
        let pool = Arc::clone(&self.pool);
        let id = id.to_string();
        Ok(tokio::task::spawn_blocking(move || pool.remove_model(&id))
            .await
            .map_err(join_error)??)
    }

    async fn warm_up(
        &self,
        models: &[String],
        hot_answers: usize,
    ) -> Result<WarmupReport, ControlError> {
        let started = Instant::now();
        let served = self.pool.models();
        if let Some(unknown) = models
            .iter()
            .find(|id| !served.iter().any(|m| &m.id == *id))
        {
            return Err(ControlError::UnknownModel(unknown.clone()));
        }
        let pool = Arc::clone(&self.pool);
        let ids = models.to_vec();
        let generations = tokio::task::spawn_blocking(move || pool.warm_up(&ids))
            .await
            .map_err(join_error)??;
        self.register_identities();
        let hot_answers_loaded = if hot_answers > 0 {
            self.cache.prewarm_from_redis(hot_answers).await
        } else {
            0
        };
        if hot_answers_loaded > 0 {
            tracing::info!(
                loaded = hot_answers_loaded,
                "hot answers preloaded from Redis"
            );
        }
        Ok(WarmupReport {
            generations,
            hot_answers_loaded,
            elapsed: started.elapsed(),
        })
    }
}
