//! The models of a node: each loaded once, its weights shared by `Arc` between `instances`
//! instances, each instance with its own step loop, KV caches and compute threads.
//!
//! Admission is fail-fast: a request is tokenized and checked against the context window in
//! `submit`, then queued in the model's bounded FIFO queue (RESOURCE_EXHAUSTED at once when full);
//! the least loaded instance takes it between steps.
//!
//! Cores: instance `i` of the node (counting over all models) is pinned to its own
//! `threads_per_instance` cores when the node's total fits the machine; models then never compete
//! for a core. When it does not fit, nothing is pinned and the OS shares the cores.

pub mod admission;
pub mod metrics;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use candle_core::Device;
use tokio::sync::mpsc;

use crate::config::ModelConfig;
use crate::engine::instance::{self, InstanceSettings, WorkSource};
use crate::engine::sampler::Sampler;
use crate::engine::sequence::Admitted;
use crate::engine::{Backend, EngineError, EventStream, GenerationRequest, ModelInfo, ModelState};
use crate::model::loaded::LoadedModel;
use crate::model::registry::{self, ResolvedModel};
use crate::model::transformer::SeqStep;
use crate::model::ModelError;

use admission::Admission;
use metrics::PoolMetrics;

/// Events buffered per request before the instance holds text back for a slow reader.
const EVENT_BUFFER: usize = 64;
/// Prompt tokens fed per step, over all newcomers of an instance.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;
/// Suggested wait before retrying a request refused because the queue was full.
const RETRY_AFTER: Duration = Duration::from_secs(1);

enum State {
    Loading,
    Ready(Arc<Serving>),
    Failed(String),
}

struct Serving {
    model: Arc<LoadedModel>,
    admission: Arc<Admission>,
    context_length: usize,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

struct Entry {
    resolved: ResolvedModel,
    config: ModelConfig,
    threads_per_instance: usize,
    first_core: Option<usize>,
    state: RwLock<State>,
}

/// Every model of the node. Implements [`Backend`].
pub struct ModelPool {
    entries: Vec<Arc<Entry>>,
    by_id: HashMap<String, usize>,
    metrics: PoolMetrics,
    device: Device,
    prefill_chunk: usize,
}

impl ModelPool {
    /// Resolve every configured model to a file (fails fast when one is missing). Nothing is
    /// loaded yet: call [`ModelPool::load_all`] off the async runtime.
    pub fn new(
        models: &[ModelConfig],
        metrics: PoolMetrics,
        device: Device,
    ) -> Result<Self, ModelError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads_of = |m: &ModelConfig| {
            m.threads_per_instance
                .unwrap_or_else(|| (cores / m.instances.max(1)).max(1))
        };
        let total: usize = models.iter().map(|m| m.instances * threads_of(m)).sum();
        let pin = total <= cores;
        let dir = registry::models_dir();
        let mut next_core = 0;
        let mut entries = Vec::new();
        let mut by_id = HashMap::new();
        for m in models {
            let resolved = registry::resolve(&m.id, &dir)?;
            let threads = threads_of(m);
            by_id.insert(resolved.id.clone(), entries.len());
            entries.push(Arc::new(Entry {
                resolved,
                config: m.clone(),
                threads_per_instance: threads,
                first_core: pin.then_some(next_core),
                state: RwLock::new(State::Loading),
            }));
            next_core += m.instances * threads;
        }
        Ok(Self {
            entries,
            by_id,
            metrics,
            device,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        })
    }

    /// Load, warm and start every model. Blocking: run it on a blocking thread. A model that
    /// fails to load is reported and stays unavailable; the others serve.
    pub fn load_all(&self) -> Result<(), ModelError> {
        let mut first_error = None;
        for entry in &self.entries {
            match self.load_one(entry) {
                Ok(serving) => {
                    tracing::info!(
                        model = %entry.resolved.id,
                        load_ms = serving.model.load_time.as_millis() as u64,
                        instances = entry.config.instances,
                        threads_per_instance = entry.threads_per_instance,
                        "model ready"
                    );
                    *entry.state.write().unwrap_or_else(|e| e.into_inner()) = State::Ready(serving);
                }
                Err(e) => {
                    tracing::error!(model = %entry.resolved.id, error = %e, "model failed to load");
                    *entry.state.write().unwrap_or_else(|e| e.into_inner()) =
                        State::Failed(e.to_string());
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn load_one(&self, entry: &Entry) -> Result<Arc<Serving>, ModelError> {
        let cfg = &entry.config;
        let model = Arc::new(LoadedModel::load(
            &entry.resolved.id,
            &entry.resolved.path,
            cfg.quant,
            &self.device,
        )?);
        let native = model.hparams().context_length;
        let context_length = cfg
            .context_length
            .map_or(native, |c| (c as usize).min(native));
        warm_up(&model, entry.threads_per_instance)?;
        let admission = Arc::new(Admission::new(cfg.max_queued, cfg.instances, cfg.max_batch));
        let mut threads = Vec::new();
        for index in 0..cfg.instances {
            let cores = entry
                .first_core
                .map(|first| {
                    let start = first + index * entry.threads_per_instance;
                    (start..start + entry.threads_per_instance).collect()
                })
                .unwrap_or_default();
            let settings = InstanceSettings {
                index,
                max_batch: cfg.max_batch,
                prefill_chunk: self.prefill_chunk,
                threads: entry.threads_per_instance,
                cores,
                max_seq_len: context_length,
            };
            let handle = instance::spawn(
                Arc::clone(&model),
                admission.clone(),
                Arc::new(self.metrics.observer(&entry.resolved.id)),
                settings,
            )
            .map_err(|e| ModelError::Io {
                path: PathBuf::from("<thread>"),
                source: e,
            })?;
            threads.push(handle);
        }
        Ok(Arc::new(Serving {
            model,
            admission,
            context_length,
            threads: Mutex::new(threads),
        }))
    }

    /// Stop taking work and wait for every instance to finish its batch.
    pub fn shutdown(&self) {
        let mut handles = Vec::new();
        for entry in &self.entries {
            if let State::Ready(s) = &*entry.state.read().unwrap_or_else(|e| e.into_inner()) {
                s.admission.close();
                handles.append(&mut s.threads.lock().unwrap_or_else(|e| e.into_inner()));
            }
        }
        for h in handles {
            let _ = h.join();
        }
    }

    /// The loaded model behind `id`, once ready (for tools and tests).
    pub fn loaded(&self, id: &str) -> Option<Arc<LoadedModel>> {
        self.serving(id).ok().map(|s| Arc::clone(&s.model))
    }

    fn serving(&self, id: &str) -> Result<Arc<Serving>, EngineError> {
        let entry = self
            .by_id
            .get(id)
            .map(|&i| &self.entries[i])
            .ok_or_else(|| EngineError::UnknownModel(id.to_string()))?;
        match &*entry.state.read().unwrap_or_else(|e| e.into_inner()) {
            State::Ready(s) => Ok(Arc::clone(s)),
            State::Loading => Err(EngineError::NotReady(id.to_string())),
            State::Failed(why) => Err(EngineError::Unavailable(format!(
                "model `{id}` failed to load: {why}"
            ))),
        }
    }
}

impl Backend for ModelPool {
    fn models(&self) -> Vec<ModelInfo> {
        self.entries
            .iter()
            .map(|e| {
                let state = e.state.read().unwrap_or_else(|e| e.into_inner());
                let (arch, ctx, ready) = match &*state {
                    State::Ready(s) => (
                        s.model.hparams().arch.as_str().to_string(),
                        s.context_length as u32,
                        true,
                    ),
                    _ => (String::new(), e.config.context_length.unwrap_or(0), false),
                };
                ModelInfo {
                    id: e.resolved.id.clone(),
                    architecture: arch,
                    quant: e.config.quant.as_str().to_string(),
                    context_length: ctx,
                    instances: e.config.instances as u32,
                    state: if ready {
                        ModelState::Ready
                    } else {
                        ModelState::Loading
                    },
                }
            })
            .collect()
    }

    fn submit(&self, request: GenerationRequest) -> Result<EventStream, EngineError> {
        let arrived = Instant::now();
        let serving = self.serving(&request.model)?;
        if !serving.admission.running() {
            return Err(EngineError::Unavailable("shutting down".into()));
        }
        let prompt = serving
            .model
            .prompt_tokens(&request.input)
            .map_err(|e| match e {
                ModelError::Template(m) => EngineError::Template(m),
                other => EngineError::InvalidArgument(other.to_string()),
            })?;
        if prompt.is_empty() {
            return Err(EngineError::InvalidArgument(
                "prompt renders to no tokens".into(),
            ));
        }
        let max_tokens = request.max_tokens as usize;
        if prompt.len() + max_tokens > serving.context_length {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: prompt.len(),
                max_tokens,
                context_length: serving.context_length,
            });
        }
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let admitted = Admitted {
            request_id: request.request_id,
            prompt,
            max_tokens,
            stop: request.stop,
            sampler: Sampler::new(&request.sampling),
            tx,
            arrived,
            deadline: request.deadline,
        };
        match serving.admission.push(admitted) {
            Ok(depth) => {
                self.metrics
                    .queue_depth
                    .with_label_values(&[&request.model])
                    .set(depth as i64);
                Ok(rx)
            }
            Err(_) => Err(EngineError::QueueFull {
                model: request.model,
                max_queued: serving.admission.max_queued(),
                retry_after: RETRY_AFTER,
            }),
        }
    }
}

/// Run a short prompt and two decode steps so every weight page is touched and the first real
/// request pays no first-touch cost.
fn warm_up(model: &LoadedModel, threads: usize) -> Result<(), ModelError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| ModelError::Candle(candle_core::Error::Msg(e.to_string())))?;
    pool.install(|| {
        let t = &model.transformer;
        let mut cache = t.new_cache(64);
        let prompt: Vec<u32> = (0..16u32).map(|i| i % t.hparams().vocab as u32).collect();
        t.forward(&mut [SeqStep {
            tokens: &prompt,
            cache: &mut cache,
        }])?;
        for _ in 0..2 {
            t.forward(&mut [SeqStep {
                tokens: &[1],
                cache: &mut cache,
            }])?;
        }
        Ok(())
    })
}
