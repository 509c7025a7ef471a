//! Models added and removed while the node serves (the Admin service's LoadModel/UnloadModel).

use std::sync::{Arc, RwLock};

use super::{info, Entry, ModelPool, PoolError, State};
use crate::config::ModelConfig;
use crate::engine::{EngineError, ModelInfo};
use crate::model::registry;

impl ModelPool {
    /// Load, warm and serve one more model while the node serves. Blocking.
    pub fn add_model(&self, config: ModelConfig) -> Result<ModelInfo, PoolError> {
        let threads = config
            .threads_per_instance
            .unwrap_or_else(|| (self.cores / config.instances.max(1)).max(1));
        if config.instances * threads > self.cores {
            return Err(PoolError::Oversubscribed {
                model: config.id,
                instances: config.instances,
                threads,
                cores: self.cores,
            });
        }
        let resolved = registry::resolve(&config.id, &self.models_dir)?;
        let entry = Arc::new(Entry {
            resolved,
            config,
            threads_per_instance: threads,
            first_core: None,
            state: RwLock::new(State::Loading),
        });
        let id = entry.resolved.id.clone();
        {
            let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
            if entries.iter().any(|e| e.resolved.id == id) {
                return Err(PoolError::AlreadyServed(id));
            }
            entries.push(Arc::clone(&entry));
        }
        // Leave no half-loaded model behind, even if loading panics: the operator may retry with
        // other settings or a fixed file.
        let mut guard = RemoveUnlessLoaded {
            pool: self,
            id: &id,
            loaded: false,
        };
        self.load_entry(&entry)
            .map_err(PoolError::from)
            .and_then(|()| self.warm_up(std::slice::from_ref(&id)))?;
        guard.loaded = true;
        Ok(info(&entry))
    }

    /// Stop serving `id`: new requests get NOT_FOUND, queued ones UNAVAILABLE, running
    /// generations finish; returns once its instances have exited, with the number of queued
    /// requests refused. Blocking.
    pub fn remove_model(&self, id: &str) -> Result<usize, PoolError> {
        let entry = {
            let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
            let index = entries
                .iter()
                .position(|e| e.resolved.id == id)
                .ok_or_else(|| PoolError::UnknownModel(id.to_string()))?;
            entries.remove(index)
        };
        let Some(serving) = entry.serving() else {
            return Ok(0);
        };
        let refused = serving.admission.close_and_take();
        let count = refused.len();
        for request in refused {
            let _ = request
                .tx
                .try_send(Err(EngineError::ModelUnloaded(id.to_string())));
        }
        let handles =
            std::mem::take(&mut *serving.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
        self.metrics.queue_depth.with_label_values(&[id]).set(0);
        tracing::info!(model = %id, refused_queued = count, "model unloaded");
        Ok(count)
    }
}

/// Removes a model being added unless its load and warm-up succeeded (error or panic).
struct RemoveUnlessLoaded<'a> {
    pool: &'a ModelPool,
    id: &'a str,
    loaded: bool,
}

impl Drop for RemoveUnlessLoaded<'_> {
    fn drop(&mut self) {
        if !self.loaded {
            let _ = self.pool.remove_model(self.id);
        }
    }
}
