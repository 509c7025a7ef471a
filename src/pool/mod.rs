//! The models of a node: each loaded once, its weights shared by `Arc` between `instances`
//! instances, each instance with its own step loop, KV caches and compute threads.
//!
//! A model goes Loading → Warming (instances running, taking only warm-up work) → Ready, or
//! Failed. Models can be added and removed while the node serves ([`ModelPool::add_model`],
//! [`ModelPool::remove_model`]).
//!
//! Admission is fail-fast: a request is tokenized and checked against the context window in
//! `submit`, then queued in the model's bounded FIFO queue (RESOURCE_EXHAUSTED at once when full);
//! the least loaded instance takes it between steps.
//!
//! Cores: instance `i` of the node (counting over the configured models) is pinned to its own
//! `threads_per_instance` cores when the node's total fits the machine; models then never compete
//! for a core. When it does not fit, and for models added at run time, nothing is pinned and the
//! OS shares the cores.

pub mod admission;
pub mod metrics;
pub mod prep;
mod runtime;
mod warmup;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use candle_core::Device;
use tokio::sync::mpsc;

use crate::config::ModelConfig;
use crate::constrain::{ConstrainError, Constraint, TokenSpace};
use crate::engine::instance::{self, InstanceSettings, WorkSource};
use crate::engine::logprobs::LogprobSpec;
use crate::engine::prefix::{PrefixStore, DEFAULT_BLOCK_TOKENS};
use crate::engine::sampler::Sampler;
use crate::engine::sequence::Admitted;
use crate::engine::{Backend, EngineError, EventStream, GenerationRequest, ModelInfo, ModelState};
use crate::model::loaded::LoadedModel;
use crate::model::registry::{self, ResolvedModel};
use crate::model::ModelError;
use crate::types::OutputConstraint;

use admission::Admission;
use metrics::PoolMetrics;
use prep::{Prep, PrepError, PREP_THREADS};

/// Events buffered per request before the instance holds text back for a slow reader.
const EVENT_BUFFER: usize = 64;
/// Prompt tokens fed per step, over all newcomers of an instance.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;
/// Suggested wait before retrying a request refused because the queue was full.
const RETRY_AFTER: Duration = Duration::from_secs(1);

enum State {
    Loading,
    Warming(Arc<Serving>),
    Ready(Arc<Serving>),
    Failed(String),
}

struct Serving {
    model: Arc<LoadedModel>,
    admission: Arc<Admission>,
    context_length: usize,
    instances: usize,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The model's vocabulary for constrained decoding, built by the first constrained request
    /// (a fraction of a second for 262k tokens); unconstrained traffic never builds it.
    token_space: OnceLock<Result<TokenSpace, String>>,
    /// The bytes of every id, for requests that ask for log-probabilities; built by the first
    /// of them, never for other traffic.
    token_bytes: OnceLock<Arc<Vec<Vec<u8>>>>,
}

impl Serving {
    /// What a sequence needs to report `top` alternatives per token (the vocabulary's bytes
    /// built on first use). Blocking: runs on a preparation thread.
    fn logprob_spec(&self, top: u32) -> LogprobSpec {
        let bytes = self.token_bytes.get_or_init(|| {
            let started = Instant::now();
            let bytes = crate::constrain::vocab::token_texts(&self.model.tokenizer);
            tracing::info!(
                model = %self.model.id,
                build_ms = started.elapsed().as_millis() as u64,
                "logprobs token bytes built"
            );
            Arc::new(bytes)
        });
        LogprobSpec {
            top: top as usize,
            token_bytes: Arc::clone(bytes),
        }
    }

    /// `c` compiled over this model's vocabulary (built on first use). Blocking: runs on a
    /// preparation thread.
    fn compile(&self, c: &OutputConstraint) -> Result<Constraint, EngineError> {
        let space = self.token_space.get_or_init(|| {
            let build = || {
                let started = Instant::now();
                let space = TokenSpace::from_tokenizer(&self.model.tokenizer);
                tracing::info!(
                    model = %self.model.id,
                    build_ms = started.elapsed().as_millis() as u64,
                    ok = space.is_ok(),
                    "constraint token space built"
                );
                space.map_err(|e| e.to_string())
            };
            // Up to ~1.5 s for Gemma 3's 262k tokens, once, on a preparation thread.
            build()
        });
        let space = space
            .as_ref()
            .map_err(|e| EngineError::Internal(e.clone()))?;
        space.compile(c).map_err(|e| match e {
            ConstrainError::Invalid { ref field, .. } => EngineError::InvalidConstraint {
                field: field.clone(),
                message: e.to_string(),
            },
            other => EngineError::Internal(other.to_string()),
        })
    }
}

struct Entry {
    resolved: ResolvedModel,
    config: ModelConfig,
    threads_per_instance: usize,
    first_core: Option<usize>,
    state: RwLock<State>,
}

impl Entry {
    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, state: State) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// The running instances, warming or ready.
    fn serving(&self) -> Option<Arc<Serving>> {
        match &*self.state() {
            State::Warming(s) | State::Ready(s) => Some(Arc::clone(s)),
            State::Loading | State::Failed(_) => None,
        }
    }
}

/// Why a model could not be added or removed at run time.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The id is served already.
    #[error("model `{0}` is already served")]
    AlreadyServed(String),
    /// No such model on this node.
    #[error("model `{0}` is not served by this node")]
    UnknownModel(String),
    /// The id resolves to no file, or the file does not load.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A setting does not fit this machine.
    #[error("model `{model}`: instances ({instances}) x threads_per_instance ({threads}) must be <= available cores ({cores})")]
    Oversubscribed {
        /// Model id.
        model: String,
        /// Instances asked for.
        instances: usize,
        /// Threads per instance.
        threads: usize,
        /// Cores this process may use.
        cores: usize,
    },
    /// Warm-up generations failed.
    #[error("model `{model}` failed its warm-up: {source}")]
    WarmUp {
        /// Model id.
        model: String,
        /// What failed.
        source: EngineError,
    },
}

/// Every model of the node. Implements [`Backend`].
pub struct ModelPool {
    entries: RwLock<Vec<Arc<Entry>>>,
    metrics: PoolMetrics,
    device: Device,
    prefill_chunk: usize,
    kv_cache_mb: RwLock<std::collections::HashMap<String, usize>>,
    cores: usize,
    /// Where manifest ids resolve, for models added at run time too.
    models_dir: PathBuf,
    /// Template rendering, tokenization and grammar compilation, off the runtime's workers.
    prep: Prep,
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl ModelPool {
    /// [`ModelPool::new_in`] the default models directory (`./models`).
    pub fn new(
        models: &[ModelConfig],
        metrics: PoolMetrics,
        device: Device,
    ) -> Result<Self, ModelError> {
        Self::new_in(
            Path::new(crate::config::DEFAULT_MODELS_DIR),
            models,
            metrics,
            device,
        )
    }

    /// Resolve every configured model to a file, manifest ids under `models_dir` (fails fast
    /// when one is missing). Nothing is loaded yet: call [`ModelPool::load_all`] off the async
    /// runtime.
    pub fn new_in(
        models_dir: &Path,
        models: &[ModelConfig],
        metrics: PoolMetrics,
        device: Device,
    ) -> Result<Self, ModelError> {
        let cores = cores();
        let threads_of = |m: &ModelConfig| {
            m.threads_per_instance
                .unwrap_or_else(|| (cores / m.instances.max(1)).max(1))
        };
        let total: usize = models.iter().map(|m| m.instances * threads_of(m)).sum();
        let pin = total <= cores;
        let dir = models_dir.to_path_buf();
        let mut next_core = 0;
        let mut entries = Vec::new();
        for m in models {
            let threads = threads_of(m);
            let resolved = registry::resolve(&m.id, &dir)?;
            // Two files with one stem would both be served as one id: the second unreachable.
            if let Some(first) = entries
                .iter()
                .find(|e: &&Arc<Entry>| e.resolved.id == resolved.id)
            {
                return Err(ModelError::DuplicateModelId {
                    id: resolved.id,
                    first: first.resolved.path.clone(),
                    second: resolved.path,
                });
            }
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
            entries: RwLock::new(entries),
            metrics,
            device,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            kv_cache_mb: RwLock::new(std::collections::HashMap::new()),
            cores,
            models_dir: dir,
            prep: Prep::new(PREP_THREADS).map_err(|e| ModelError::Io {
                path: PathBuf::from("<prep thread>"),
                source: e,
            })?,
        })
    }

    /// Cap the KV prefix store of model `id` (all its instances together) at `mb` MiB; 0 keeps
    /// no prefixes. Takes effect when the model is next loaded; without it the model's
    /// `kv_cache_mb` config applies.
    pub fn set_kv_cache_mb(&self, id: &str, mb: usize) {
        self.kv_cache_mb
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), mb);
    }

    /// The budget set by [`ModelPool::set_kv_cache_mb`], else the model's configured one.
    fn kv_cache_mb(&self, id: &str, configured: usize) -> usize {
        self.kv_cache_mb
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied()
            .unwrap_or(configured)
    }

    /// The prefix-store counters of model `id`, summed over its instances (`None` when it is
    /// not running or keeps no prefixes).
    pub fn prefix_stats(&self, id: &str) -> Option<crate::engine::prefix::PrefixStats> {
        let serving = self.entry(id)?.serving()?;
        let stores = serving.admission.prefix_stores();
        if stores.is_empty() {
            return None;
        }
        let mut total = crate::engine::prefix::PrefixStats::default();
        for s in stores {
            let st = s.stats();
            total.bytes += st.bytes;
            total.blocks += st.blocks;
            total.evictions += st.evictions;
            total.hit_tokens += st.hit_tokens;
            total.prompt_tokens += st.prompt_tokens;
        }
        Some(total)
    }

    fn entries(&self) -> Vec<Arc<Entry>> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn entry(&self, id: &str) -> Option<Arc<Entry>> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|e| e.resolved.id == id)
            .cloned()
    }

    /// Load, warm and start every model: [`ModelPool::load_pending`] then
    /// [`ModelPool::warm_up`]. Blocking: run it on a blocking thread.
    pub fn load_all(&self) -> Result<(), ModelError> {
        let loaded = self.load_pending();
        let ids: Vec<String> = self
            .entries()
            .iter()
            .map(|e| e.resolved.id.clone())
            .collect();
        if let Err(e) = self.warm_up(&ids) {
            tracing::error!(error = %e, "warm-up failed");
        }
        loaded
    }

    /// Load and start every model still loading; they stay Warming until
    /// [`ModelPool::warm_up`]. Blocking. A model that fails to load is reported and stays
    /// unavailable; the others serve.
    pub fn load_pending(&self) -> Result<(), ModelError> {
        let mut first_error = None;
        for entry in self.entries() {
            if !matches!(&*entry.state(), State::Loading) {
                continue;
            }
            if let Err(e) = self.load_entry(&entry) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn load_entry(&self, entry: &Entry) -> Result<(), ModelError> {
        match self.start(entry) {
            Ok(serving) => {
                tracing::info!(
                    model = %entry.resolved.id,
                    load_ms = serving.model.load_time.as_millis() as u64,
                    instances = entry.config.instances,
                    threads_per_instance = entry.threads_per_instance,
                    "model loaded"
                );
                entry.set_state(State::Warming(serving));
                Ok(())
            }
            Err(e) => {
                tracing::error!(model = %entry.resolved.id, error = %e, "model failed to load");
                entry.set_state(State::Failed(e.to_string()));
                Err(e)
            }
        }
    }

    /// Run one short real generation on every instance of each of `ids` (every model when
    /// empty) that is warming or ready, then mark them ready. Blocking. Returns the number of
    /// generations run.
    pub fn warm_up(&self, ids: &[String]) -> Result<usize, PoolError> {
        let mut generations = 0;
        for entry in self.entries() {
            if !ids.is_empty() && !ids.contains(&entry.resolved.id) {
                continue;
            }
            let Some(serving) = entry.serving() else {
                continue;
            };
            let started = Instant::now();
            let ran = warmup::run(
                &entry.resolved.id,
                &serving.model,
                &serving.admission,
                serving.instances,
            )
            .map_err(|source| PoolError::WarmUp {
                model: entry.resolved.id.clone(),
                source,
            })?;
            generations += ran;
            tracing::info!(
                model = %entry.resolved.id,
                generations = ran,
                warm_up_ms = started.elapsed().as_millis() as u64,
                "model ready"
            );
            let mut state = entry.state.write().unwrap_or_else(|e| e.into_inner());
            if let State::Warming(s) = &*state {
                *state = State::Ready(Arc::clone(s));
            }
        }
        Ok(generations)
    }

    fn start(&self, entry: &Entry) -> Result<Arc<Serving>, ModelError> {
        let cfg = &entry.config;
        let model = LoadedModel::load(
            &entry.resolved.id,
            &entry.resolved.path,
            cfg.quant,
            &self.device,
        )?;
        let kv_dtype = cfg.kv_dtype.unwrap_or_default();
        let head_dim = model.hparams().head_dim;
        if kv_dtype.q8_keys() && !head_dim.is_multiple_of(32) {
            return Err(ModelError::BadMetadata {
                key: "attention.key_length".into(),
                reason: format!(
                    "head_dim {head_dim} is not a multiple of 32 (one Q8_0 block), which \
                     kv_dtype = \"{}\" needs; serve this model with kv_dtype = \"f16\"",
                    kv_dtype.as_str()
                ),
            });
        }
        let model = model.with_kv_dtype(kv_dtype);
        let native = model.hparams().context_length;
        let context_length = cfg
            .context_length
            .map_or(native, |c| (c as usize).min(native));
        // Phi-3 128k's RoPE factors depend on the context served (llama.cpp: `-c`).
        let model = Arc::new(model.with_context_length(context_length));
        let admission = Admission::new(cfg.max_queued, cfg.instances, cfg.max_batch)
            .with_depth_gauge(
                self.metrics
                    .queue_depth
                    .with_label_values(&[&entry.resolved.id]),
            );
        // Each instance keeps its own share of the model's prefix budget.
        let budget = self.kv_cache_mb(&entry.resolved.id, cfg.kv_cache_mb) << 20;
        let admission = if budget > 0 && self.device.is_cpu() {
            let probe = model.transformer.new_cache(1);
            let identity = format!(
                "{}:{}:kv-{}",
                model.file_digest,
                model.quant.as_str(),
                model.transformer.kv_dtype().as_str()
            );
            let stores = (0..cfg.instances)
                .map(|_| {
                    Arc::new(PrefixStore::new(
                        &identity,
                        DEFAULT_BLOCK_TOKENS,
                        probe.bytes_per_position(),
                        budget / cfg.instances.max(1),
                        Some(self.metrics.prefix(&entry.resolved.id)),
                    ))
                })
                .collect();
            admission.with_prefix_stores(stores)
        } else {
            admission
        };
        let admission = Arc::new(admission);
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
            instances: cfg.instances,
            threads: Mutex::new(threads),
            token_space: OnceLock::new(),
            token_bytes: OnceLock::new(),
        }))
    }

    /// Stop taking work and wait for every instance to finish its batch.
    pub fn shutdown(&self) {
        let mut handles = Vec::new();
        for entry in self.entries() {
            if let Some(s) = entry.serving() {
                s.admission.close();
                handles.append(&mut s.threads.lock().unwrap_or_else(|e| e.into_inner()));
            }
        }
        for h in handles {
            let _ = h.join();
        }
        self.prep.shutdown();
    }

    /// The loaded model behind `id`, once ready (for tools, the cache's identity and tests).
    pub fn loaded(&self, id: &str) -> Option<Arc<LoadedModel>> {
        self.entry(id)?.serving().map(|s| Arc::clone(&s.model))
    }

    fn ready(&self, id: &str) -> Result<Arc<Serving>, EngineError> {
        let entry = self
            .entry(id)
            .ok_or_else(|| EngineError::UnknownModel(id.to_string()))?;
        let state = entry.state();
        match &*state {
            State::Ready(s) => Ok(Arc::clone(s)),
            State::Loading | State::Warming(_) => Err(EngineError::NotReady(id.to_string())),
            State::Failed(why) => Err(EngineError::ModelFailed {
                model: id.to_string(),
                reason: why.to_string(),
            }),
        }
    }
}

fn info(e: &Entry) -> ModelInfo {
    let state = e.state();
    let template_options = match &*state {
        State::Warming(s) | State::Ready(s) => s
            .model
            .template
            .as_ref()
            .map(|t| t.options().to_vec())
            .unwrap_or_default(),
        State::Loading | State::Failed(_) => Vec::new(),
    };
    let (arch, ctx, model_state) = match &*state {
        State::Warming(s) | State::Ready(s) => (
            s.model.hparams().arch.as_str().to_string(),
            s.context_length as u32,
            if matches!(&*state, State::Ready(_)) {
                ModelState::Ready
            } else {
                ModelState::Warming
            },
        ),
        State::Loading => (
            String::new(),
            e.config.context_length.unwrap_or(0),
            ModelState::Loading,
        ),
        State::Failed(_) => (
            String::new(),
            e.config.context_length.unwrap_or(0),
            ModelState::Failed,
        ),
    };
    ModelInfo {
        id: e.resolved.id.clone(),
        architecture: arch,
        quant: e.config.quant.as_str().to_string(),
        context_length: ctx,
        instances: e.config.instances as u32,
        state: model_state,
        template_options,
    }
}

#[async_trait::async_trait]
impl Backend for ModelPool {
    fn models(&self) -> Vec<ModelInfo> {
        self.entries().iter().map(|e| info(e)).collect()
    }

    async fn submit(&self, request: GenerationRequest) -> Result<EventStream, EngineError> {
        let arrived = Instant::now();
        let serving = self.ready(&request.model)?;
        if !serving.admission.running() {
            return Err(EngineError::ShuttingDown(request.model));
        }
        let model = request.model.clone();
        let (request, (prompt, constraint, logprobs)) = {
            let serving = Arc::clone(&serving);
            self.prep
                .run(move || prepare(&serving, &request).map(|prepared| (request, prepared)))
                .await
                .map_err(|e| match e {
                    // Node-wide: thousands of prompts wait for tokenization.
                    PrepError::Full => EngineError::QueueFull {
                        model,
                        max_queued: prep::PREP_QUEUE,
                        retry_after: RETRY_AFTER,
                    },
                    PrepError::Gone => EngineError::Internal(
                        "request preparation failed (tokenizer thread gone)".into(),
                    ),
                })??
        };
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let admitted = Admitted {
            request_id: request.request_id,
            max_tokens: request.max_tokens as usize,
            prompt,
            stop: request.stop,
            sampler: Sampler::new(&request.sampling),
            tx,
            arrived,
            deadline: request.deadline,
            session: request.session,
            constraint,
            logprobs,
        };
        match serving.admission.push(admitted) {
            // The admission queue keeps `qnode_queue_depth` itself.
            Ok(_) => Ok(rx),
            Err(_) => Err(EngineError::QueueFull {
                model: request.model,
                max_queued: serving.admission.max_queued(),
                retry_after: RETRY_AFTER,
            }),
        }
    }
}

/// The prompt's tokens, the compiled output constraint, the log-probability spec.
type Prepared = (Vec<u32>, Option<Constraint>, Option<LogprobSpec>);

/// What `submit` computes before queueing, on a preparation thread: the prompt's tokens
/// (checked against the context window), the compiled output constraint and what reporting
/// log-probabilities needs.
fn prepare(serving: &Serving, request: &GenerationRequest) -> Result<Prepared, EngineError> {
    let prompt = serving
        .model
        .prompt_tokens_for(
            &request.input,
            &request.chat_template_kwargs,
            request.tools.as_ref(),
        )
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
    let constraint = match &request.constraint {
        Some(c) => Some(serving.compile(c)?),
        None => None,
    };
    let logprobs = request.logprobs.map(|top| serving.logprob_spec(top));
    Ok((prompt, constraint, logprobs))
}
