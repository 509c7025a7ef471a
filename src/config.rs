//! The one node configuration: built-in defaults < TOML file (`--config`) < `QNODE_*` env < flags.
//!
//! clap reads the environment and the command line into [`ServeArgs`] (each flag has an env twin,
//! so env and flags are one layer with flags winning); [`Config::from_args`] lays that over the file
//! and the defaults, then validates the whole once at start. Nothing else reads the environment.
//!
//! Flags carry no clap `default_value`: a default there would be indistinguishable from a value the
//! operator typed and would silently override the file. The defaults live in the `Default` impls
//! below and are named in each flag's doc.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Model served when neither the file nor the flags name one.
pub const DEFAULT_MODEL: &str = "smollm2";

/// Why the configuration could not be built; each variant names the setting and the value given.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// File named by `--config`.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The `--config` file is not valid TOML for [`Config`].
    #[error("config file {path}: {source}")]
    Parse {
        /// File named by `--config`.
        path: PathBuf,
        /// Parser error, with line and column.
        source: Box<toml::de::Error>,
    },
    /// A duration setting could not be parsed.
    #[error("`{field}` must be {}. Given: {value}", crate::duration::EXPECTED)]
    Duration {
        /// Setting name.
        field: &'static str,
        /// What was given.
        value: String,
    },
    /// A setting is out of its range.
    #[error("`{field}` must be {constraint}. Given: {value}")]
    OutOfRange {
        /// Setting name.
        field: String,
        /// The rule, e.g. `>= 1`.
        constraint: String,
        /// What was given.
        value: String,
    },
    /// A model's instances would need more threads than this machine has cores.
    #[error(
        "model `{model}`: instances ({instances}) x threads_per_instance ({threads}) = {} must be <= available cores ({cores})",
        instances * threads
    )]
    Oversubscribed {
        /// Model id.
        model: String,
        /// Configured instances.
        instances: usize,
        /// Configured threads per instance.
        threads: usize,
        /// Cores this process may use.
        cores: usize,
    },
    /// The same model id is listed twice.
    #[error("model `{0}` is listed more than once")]
    DuplicateModel(String),
    /// No model to serve.
    #[error("at least one model must be configured")]
    NoModels,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

pub use crate::model::kv_cache::KvDtype;
pub use crate::model::quantize::Quant;

/// The `[server]` section: network, auth and shutdown.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address; off when absent.
    pub metrics_listen: Option<SocketAddr>,
    /// OpenAI-compatible HTTP listen address (`/v1/chat/completions`, ...); off when absent.
    pub http_listen: Option<SocketAddr>,
    /// When set, Inference calls need `authorization: Bearer <key>`. Never logged.
    pub api_key: Option<String>,
    /// More Inference keys, each optionally bound to a tenant: a caller with a bound key gets
    /// that tenant and cannot claim another. Never logged.
    pub api_keys: ApiKeys,
    /// How long in-flight calls may run after shutdown begins before they are cut.
    #[serde(with = "crate::duration::text")]
    pub drain_timeout: Duration,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// Log line format.
    pub log_format: LogFormat,
    /// Whether the node takes traffic once warm (`active`) or waits for `Admin.Activate`.
    pub role: crate::types::Role,
    /// Key for the Admin service; absent: `api_key` guards it too. Never logged.
    pub admin_api_key: Option<String>,
    /// Where the models run.
    pub device: DeviceKind,
    /// Directory holding `<id>/<file>` for manifest ids (relative paths from the working
    /// directory); `qnode models fetch` downloads there.
    pub models_dir: PathBuf,
}

/// The models directory when none is configured.
pub const DEFAULT_MODELS_DIR: &str = "models";

/// `--models-dir` for the tools that read models without a node config (`qnode generate`,
/// `qnode models`), with the same env twin as `qnode serve`'s.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelsDirArg {
    /// Directory holding `<id>/<file>` for manifest ids.
    #[arg(long, env = "QNODE_MODELS_DIR", value_name = "DIR", default_value = DEFAULT_MODELS_DIR)]
    pub models_dir: PathBuf,
}

/// One accepted API key and the tenant it binds, if any.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// The bearer key. Never logged.
    pub key: String,
    /// The tenant every call with this key gets; `None` leaves the tenant to `x-qnode-tenant`.
    pub tenant: Option<String>,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("key", &"<hidden>")
            .field("tenant", &self.tenant)
            .finish()
    }
}

/// `server.api_keys`: in TOML a list of keys (`["k1", "k2"]`, no tenant) or a table of key →
/// tenant (`{ "k1" = "acme" }`); in `--api-keys` / `QNODE_API_KEYS` comma-separated `KEY` or
/// `KEY=TENANT` entries. Its `Debug` prints neither keys nor tenants.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ApiKeys(pub Vec<ApiKey>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bound = self.0.iter().filter(|k| k.tenant.is_some()).count();
        write!(
            f,
            "ApiKeys({} keys, {bound} bound to a tenant)",
            self.0.len()
        )
    }
}

impl<'de> Deserialize<'de> for ApiKeys {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Keys(Vec<String>),
            Tenants(std::collections::BTreeMap<String, String>),
        }
        let keys = match Raw::deserialize(de)? {
            Raw::Keys(keys) => keys
                .into_iter()
                .map(|key| ApiKey { key, tenant: None })
                .collect(),
            Raw::Tenants(map) => map
                .into_iter()
                .map(|(key, tenant)| ApiKey {
                    key,
                    tenant: Some(tenant),
                })
                .collect(),
        };
        Ok(ApiKeys(keys))
    }
}

impl ApiKeys {
    /// Parses the flag / env form: `KEY` or `KEY=TENANT`, comma-separated.
    pub fn parse(text: &str) -> ApiKeys {
        let keys = text
            .split(',')
            .map(|entry| match entry.split_once('=') {
                Some((key, tenant)) => ApiKey {
                    key: key.to_owned(),
                    tenant: Some(tenant.to_owned()),
                },
                None => ApiKey {
                    key: entry.to_owned(),
                    tenant: None,
                },
            })
            .collect();
        ApiKeys(keys)
    }

    /// Entries are checked by position, never echoed (they are secrets).
    fn validate(&self) -> Result<(), ConfigError> {
        for (i, entry) in self.0.iter().enumerate() {
            let field = format!("server.api_keys[{i}]");
            if entry.key.is_empty() {
                return Err(out_of_range(&field, "a non-empty key", "an empty key"));
            }
            if self.0[..i].iter().any(|e| e.key == entry.key) {
                return Err(out_of_range(&field, "a key listed once", "a repeated key"));
            }
            if let Some(tenant) = &entry.tenant {
                let max = crate::front::validate::MAX_TENANT_BYTES;
                if tenant.is_empty()
                    || tenant.len() > max
                    || !tenant.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(out_of_range(
                        &format!("{field}'s tenant"),
                        &format!("1..={max} bytes of visible ASCII, as `x-qnode-tenant`"),
                        &format!("{} bytes", tenant.len()),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Where the models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The CPU, with qnode's own Q8_0 kernels.
    #[default]
    Cpu,
    /// CUDA GPU 0 (needs a build with `--features cuda`).
    Cuda,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: None,
            http_listen: None,
            api_key: None,
            api_keys: ApiKeys::default(),
            drain_timeout: Duration::from_secs(30),
            max_message_bytes: 4 * 1024 * 1024,
            log_format: LogFormat::Text,
            role: crate::types::Role::Active,
            admin_api_key: None,
            device: DeviceKind::Cpu,
            models_dir: PathBuf::from(DEFAULT_MODELS_DIR),
        }
    }
}

/// One `[[models]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Manifest id (e.g. `smollm2`) or a path to a GGUF file.
    pub id: String,
    /// Engine instances (each its own thread, batch and KV caches; weights shared).
    #[serde(default = "one")]
    pub instances: usize,
    /// Rayon threads per instance. Absent in a file means all cores / instances;
    /// [`Config::from_args`] fills it in, so it is always `Some` after loading.
    #[serde(default)]
    pub threads_per_instance: Option<usize>,
    /// Most sequences decoded together by one instance.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Most requests waiting for a batch slot; more get RESOURCE_EXHAUSTED.
    #[serde(default = "default_max_queued")]
    pub max_queued: usize,
    /// Caps the model's context window (prompt + completion tokens) below its native length.
    #[serde(default)]
    pub context_length: Option<u32>,
    /// Quantization the weights run in.
    #[serde(default)]
    pub quant: Quant,
    /// KV prefix store budget of this model in MiB, all its instances together (finished
    /// conversations' KV kept for the next turn; LRU beyond it); 0 keeps none.
    #[serde(default = "default_kv_cache_mb")]
    pub kv_cache_mb: usize,
    /// Element type of the host KV caches (running sequences and the prefix store): `f16`
    /// halves their memory (llama.cpp's default), `f32` keeps exactly what the layers computed,
    /// `q8_keys` stores keys in 8 bits (values f16) and scores them with integer dot products
    /// (llama.cpp's `-ctk q8_0`): faster long contexts, 0.78× the bytes of f16; `q8` stores the
    /// values in 8 bits too (`-ctk q8_0 -ctv q8_0`): 0.56× the bytes of f16, faster decode at
    /// long contexts.
    /// Unset: `f16` on the CPU; GPU caches are always f32, so anything else there is refused.
    #[serde(default)]
    pub kv_dtype: Option<KvDtype>,
}

fn one() -> usize {
    1
}
/// KV prefix store per model unless configured: enough for ~22k SmolLM2 positions.
fn default_kv_cache_mb() -> usize {
    1024
}
fn default_max_batch() -> usize {
    8
}
fn default_max_queued() -> usize {
    64
}

/// Settings laid over a model's: the node-wide flags (`--max-batch`, `--kv-dtype`, ...) and an
/// Admin `LoadModel` request's fields. `None` leaves the setting as it was.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelOverrides {
    /// Engine instances.
    pub instances: Option<usize>,
    /// Threads per instance.
    pub threads_per_instance: Option<usize>,
    /// Most sequences per batch.
    pub max_batch: Option<usize>,
    /// Most requests waiting.
    pub max_queued: Option<usize>,
    /// Context window cap.
    pub context_length: Option<u32>,
    /// Weight format.
    pub quant: Option<Quant>,
    /// KV prefix store budget, MiB.
    pub kv_cache_mb: Option<usize>,
    /// KV cache element type.
    pub kv_dtype: Option<KvDtype>,
}

impl ModelOverrides {
    /// Lays the set fields over `model`.
    pub fn apply_to(&self, model: &mut ModelConfig) {
        if let Some(n) = self.instances {
            model.instances = n;
        }
        if let Some(n) = self.threads_per_instance {
            model.threads_per_instance = Some(n);
        }
        if let Some(n) = self.max_batch {
            model.max_batch = n;
        }
        if let Some(n) = self.max_queued {
            model.max_queued = n;
        }
        if let Some(n) = self.context_length {
            model.context_length = Some(n);
        }
        if let Some(q) = self.quant {
            model.quant = q;
        }
        if let Some(n) = self.kv_cache_mb {
            model.kv_cache_mb = n;
        }
        if let Some(d) = self.kv_dtype {
            model.kv_dtype = Some(d);
        }
    }
}

impl ModelConfig {
    /// The one way a model's settings are decided, for file entries, flags and Admin
    /// `LoadModel` alike: `base` (a file entry, or the defaults), then the node's flags
    /// (`node`), then the caller's own fields (`request`).
    pub fn resolve(base: ModelConfig, node: &ModelOverrides, request: &ModelOverrides) -> Self {
        let mut model = base;
        node.apply_to(&mut model);
        request.apply_to(&mut model);
        model
    }

    /// A model with every setting at its default.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            instances: one(),
            threads_per_instance: None,
            max_batch: default_max_batch(),
            max_queued: default_max_queued(),
            context_length: None,
            quant: Quant::default(),
            kv_cache_mb: default_kv_cache_mb(),
            kv_dtype: None,
        }
    }
}

/// The `[limits]` section: what one request may ask for.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: u32,
    /// `max_tokens` used when a request leaves it out (capped by `max_tokens_limit`).
    pub default_max_tokens: u32,
    /// Most stop strings per request.
    pub max_stop_strings: usize,
    /// Longest stop string, in bytes.
    pub max_stop_string_bytes: usize,
    /// Longest prompt (or sum of message contents), in bytes.
    pub max_prompt_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tokens_limit: 2048,
            default_max_tokens: 256,
            max_stop_strings: 8,
            max_stop_string_bytes: 128,
            max_prompt_bytes: 128 * 1024,
        }
    }
}

/// What the OpenAI front does with a non-text content part (an image) of a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NonTextParts {
    /// Serve the text parts; the answer carries an `x-qnode-warning` header and a line is
    /// logged. Gateways forwarding a chat picture expect a reply, not a failed turn.
    #[default]
    Drop,
    /// Refuse the request with a 400 naming the part.
    Reject,
}

/// The `[openai]` section: how the OpenAI HTTP front treats what a text model cannot serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiSection {
    /// Non-text content parts: `drop` (default) or `reject`.
    pub non_text_parts: NonTextParts,
}

/// Everything the node needs to start, validated.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Network, auth, shutdown.
    pub server: ServerSection,
    /// Models to serve; `[smollm2]` when none is configured anywhere.
    pub models: Vec<ModelConfig>,
    /// Per-request limits.
    pub limits: Limits,
    /// The answer cache (L1 in process always; L2 Redis when `redis_url` is set).
    pub cache: crate::cache::CacheConfig,
    /// The OpenAI HTTP front.
    pub openai: OpenAiSection,
    /// The node-wide model flags (`--max-batch`, `--kv-dtype`, ...): laid over every configured
    /// model, and over models added at run time by Admin `LoadModel`.
    #[serde(skip)]
    pub model_overrides: ModelOverrides,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerSection::default(),
            models: vec![ModelConfig::new(DEFAULT_MODEL)],
            limits: Limits::default(),
            cache: crate::cache::CacheConfig::default(),
            openai: OpenAiSection::default(),
            model_overrides: ModelOverrides::default(),
        }
    }
}

/// Flags of `qnode serve`. Each has a `QNODE_*` env twin; flags win over env, both over the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (see qnode.toml). [default: none, built-in defaults]
    #[arg(long, env = "QNODE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// gRPC listen address. [default: 127.0.0.1:50051]
    #[arg(long, env = "QNODE_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory holding `<id>/<file>` for manifest ids. [default: models]
    #[arg(long, env = "QNODE_MODELS_DIR", value_name = "DIR")]
    pub models_dir: Option<PathBuf>,
    /// Model to serve, manifest id or GGUF path; repeat for several (env: comma-separated).
    /// Replaces the file's model list; a file entry with the same id keeps its settings.
    /// [default: smollm2]
    #[arg(
        long = "model",
        env = "QNODE_MODEL",
        value_name = "ID",
        value_delimiter = ','
    )]
    pub models: Vec<String>,
    /// Prometheus /metrics listen address. [default: none, metrics off]
    #[arg(long, env = "QNODE_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// OpenAI-compatible HTTP listen address. [default: none, HTTP off]
    #[arg(long, env = "QNODE_HTTP_LISTEN", value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,
    /// Require `authorization: Bearer <KEY>` on Inference calls. [default: none, auth off]
    #[arg(
        long,
        env = "QNODE_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// More Inference keys, comma-separated; `KEY=TENANT` binds the key to a tenant (its calls
    /// get that tenant and cannot claim another). Replaces the file's `server.api_keys`.
    /// [default: none]
    #[arg(
        long,
        env = "QNODE_API_KEYS",
        value_name = "KEY[=TENANT],...",
        hide_env_values = true
    )]
    pub api_keys: Option<String>,
    /// Engine instances per model. [default: 1]
    #[arg(long, env = "QNODE_INSTANCES", value_name = "N")]
    pub instances: Option<usize>,
    /// Threads per instance. [default: available cores / instances]
    #[arg(long, env = "QNODE_THREADS_PER_INSTANCE", value_name = "N")]
    pub threads_per_instance: Option<usize>,
    /// Most sequences decoded together by one instance. [default: 8]
    #[arg(long, env = "QNODE_MAX_BATCH", value_name = "N")]
    pub max_batch: Option<usize>,
    /// Most requests waiting per model before RESOURCE_EXHAUSTED. [default: 64]
    #[arg(long, env = "QNODE_MAX_QUEUED", value_name = "N")]
    pub max_queued: Option<usize>,
    /// KV prefix store budget per model in MiB (0: no prefix reuse). [default: 1024]
    #[arg(long, env = "QNODE_KV_CACHE_MB", value_name = "MIB")]
    pub kv_cache_mb: Option<usize>,
    /// KV cache element type of every model: f16, f32, q8_keys or q8. [default: f16]
    #[arg(long, env = "QNODE_KV_DTYPE", value_name = "TYPE")]
    pub kv_dtype: Option<KvDtype>,
    /// Time in-flight calls get to finish after shutdown starts: 30s, 500ms, 2m. [default: 30s]
    #[arg(long, env = "QNODE_DRAIN_TIMEOUT", value_name = "DURATION")]
    pub drain_timeout: Option<String>,
    /// Log line format. [default: text]
    #[arg(long, env = "QNODE_LOG_FORMAT", value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Redis (or Redis Cluster) URL of the fleet's shared answer cache, e.g. redis://host:6379.
    /// [default: none, in-process cache only]
    #[arg(long, env = "QNODE_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,
    /// The fleet's shared secret (>= 16 bytes) for signing Redis values; required with a Redis
    /// URL unless `cache.redis_insecure = true`. Prefer the env var to the flag (a flag shows in
    /// `ps`). [default: none]
    #[arg(
        long,
        env = "QNODE_CACHE_REDIS_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub redis_secret: Option<String>,
    /// Turn the semantic cache tier on (`cache.semantic.enabled`): on an exact miss, a standalone
    /// chat question asked in other words gets the answer of the earlier wording (embedding
    /// similarity plus a guard; see the README for its false-hit rate). Needs the encoder
    /// (`python3 models/fetch.py minilm-l6`). [default: off]
    #[arg(long, env = "QNODE_SEMANTIC_CACHE")]
    pub semantic_cache: bool,
    /// `standby`: load and warm, but take no traffic until `Admin.Activate`. [default: active]
    #[arg(long, env = "QNODE_ROLE", value_name = "ROLE", value_parser = parse_role)]
    pub role: Option<crate::types::Role>,
    /// Key for the Admin service (`authorization: Bearer <KEY>`). [default: the API key]
    #[arg(
        long,
        env = "QNODE_ADMIN_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub admin_api_key: Option<String>,
    /// Where the models run: cpu, or cuda (a build with `--features cuda`). [default: cpu]
    #[arg(long, env = "QNODE_DEVICE", value_enum, value_name = "DEVICE")]
    pub device: Option<DeviceKind>,
    /// OpenAI front: what an image (any non-text content part) in a chat message does: drop
    /// (serve the text, with an `x-qnode-warning` header) or reject (400). [default: drop]
    #[arg(
        long,
        env = "QNODE_OPENAI_NON_TEXT_PARTS",
        value_enum,
        value_name = "WHAT"
    )]
    pub openai_non_text_parts: Option<NonTextParts>,
}

impl Config {
    /// Builds and validates the configuration for `qnode serve` on this machine's cores.
    pub fn from_args(args: &ServeArgs) -> Result<Config, ConfigError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::from_args_with_cores(args, cores)
    }

    /// [`Config::from_args`] with the core count given, so tests do not depend on the machine.
    pub fn from_args_with_cores(args: &ServeArgs, cores: usize) -> Result<Config, ConfigError> {
        let mut config = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Config::default(),
        };
        config.apply(args)?;
        config.resolve_and_validate(cores)?;
        Ok(config)
    }

    /// Reads a TOML file over the defaults, without validating.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses TOML over the defaults; a file with an empty or absent `models` serves `smollm2`.
    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        let mut config: Config = toml::from_str(text)?;
        if config.models.is_empty() {
            config.models = Config::default().models;
        }
        Ok(config)
    }

    /// Lays the flags (and their env twins) over what the file gave.
    fn apply(&mut self, args: &ServeArgs) -> Result<(), ConfigError> {
        let server = &mut self.server;
        if let Some(listen) = args.listen {
            server.listen = listen;
        }
        if let Some(dir) = &args.models_dir {
            server.models_dir = dir.clone();
        }
        if let Some(addr) = args.metrics_listen {
            server.metrics_listen = Some(addr);
        }
        if let Some(addr) = args.http_listen {
            server.http_listen = Some(addr);
        }
        if let Some(key) = &args.api_key {
            server.api_key = Some(key.clone());
        }
        if let Some(keys) = &args.api_keys {
            server.api_keys = ApiKeys::parse(keys);
        }
        if let Some(text) = &args.drain_timeout {
            server.drain_timeout =
                crate::duration::parse(text).ok_or_else(|| ConfigError::Duration {
                    field: "drain_timeout",
                    value: text.clone(),
                })?;
        }
        if let Some(format) = args.log_format {
            server.log_format = format;
        }
        if let Some(role) = args.role {
            server.role = role;
        }
        if let Some(key) = &args.admin_api_key {
            server.admin_api_key = Some(key.clone());
        }
        if let Some(device) = args.device {
            server.device = device;
        }
        if let Some(what) = args.openai_non_text_parts {
            self.openai.non_text_parts = what;
        }
        if let Some(url) = &args.redis_url {
            self.cache.redis_url = Some(url.clone());
        }
        if let Some(secret) = &args.redis_secret {
            self.cache.redis_secret = Some(crate::cache::Secret::new(secret.as_str()));
        }
        if args.semantic_cache {
            self.cache.semantic.enabled = true;
        }
        // Unset, the encoder is the manifest's, under the models directory; an encoder id of the
        // manifest (`m3e-small`) is its directory there too.
        let encoder = self
            .cache
            .semantic
            .encoder
            .take()
            .unwrap_or_else(|| PathBuf::from(crate::cache::semantic::DEFAULT_ENCODER));
        self.cache.semantic.encoder = Some(
            match crate::model::embed::EncoderSpec::parse(
                &encoder.to_string_lossy(),
                &self.server.models_dir,
            ) {
                Ok(crate::model::embed::EncoderSpec::Dir(dir)) => dir,
                // `hf:` (checked by validate) and anything unparsable stay as written.
                _ => encoder,
            },
        );
        if !args.models.is_empty() {
            let from_file = std::mem::take(&mut self.models);
            self.models = args
                .models
                .iter()
                .map(|id| {
                    from_file
                        .iter()
                        .find(|m| &m.id == id)
                        .cloned()
                        .unwrap_or_else(|| ModelConfig::new(id.clone()))
                })
                .collect();
        }
        self.model_overrides = ModelOverrides {
            instances: args.instances,
            threads_per_instance: args.threads_per_instance,
            max_batch: args.max_batch,
            max_queued: args.max_queued,
            kv_cache_mb: args.kv_cache_mb,
            kv_dtype: args.kv_dtype,
            ..ModelOverrides::default()
        };
        self.models = std::mem::take(&mut self.models)
            .into_iter()
            .map(|m| ModelConfig::resolve(m, &self.model_overrides, &ModelOverrides::default()))
            .collect();
        Ok(())
    }

    /// Fills in per-model thread counts and checks every setting once.
    fn resolve_and_validate(&mut self, cores: usize) -> Result<(), ConfigError> {
        if self.models.is_empty() {
            return Err(ConfigError::NoModels);
        }
        if self.server.api_key.as_deref() == Some("") {
            return Err(out_of_range("server.api_key", "non-empty when set", "\"\""));
        }
        if self.server.admin_api_key.as_deref() == Some("") {
            return Err(out_of_range(
                "server.admin_api_key",
                "non-empty when set",
                "\"\"",
            ));
        }
        self.server.api_keys.validate()?;
        // Admin falls back to `api_key`, never to `api_keys`: a tenant's key must not drain the
        // node, and leaving Admin open when Inference has keys would be a surprise.
        if !self.server.api_keys.0.is_empty()
            && self.server.api_key.is_none()
            && self.server.admin_api_key.is_none()
        {
            return Err(out_of_range(
                "server.admin_api_key",
                "set when only `server.api_keys` are (they do not guard Admin)",
                "none",
            ));
        }
        at_least(
            "server.max_message_bytes",
            self.server.max_message_bytes,
            1024,
        )?;
        at_least(
            "limits.max_tokens_limit",
            self.limits.max_tokens_limit as usize,
            1,
        )?;
        at_least("limits.max_prompt_bytes", self.limits.max_prompt_bytes, 1)?;
        at_least(
            "limits.max_stop_string_bytes",
            self.limits.max_stop_string_bytes,
            1,
        )?;
        let limit = self.limits.max_tokens_limit;
        if self.limits.default_max_tokens == 0 || self.limits.default_max_tokens > limit {
            return Err(out_of_range(
                "limits.default_max_tokens",
                &format!("in 1..={limit} (limits.max_tokens_limit)"),
                &self.limits.default_max_tokens.to_string(),
            ));
        }
        for (i, model) in self.models.iter().enumerate() {
            if self.models[..i].iter().any(|m| m.id == model.id) {
                return Err(ConfigError::DuplicateModel(model.id.clone()));
            }
        }
        for model in &mut self.models {
            let field = |name: &str| format!("models[{}].{name}", model.id);
            if model.id.is_empty() {
                return Err(out_of_range("models[].id", "non-empty", "\"\""));
            }
            at_least(&field("instances"), model.instances, 1)?;
            at_least(&field("max_batch"), model.max_batch, 1)?;
            at_least(&field("max_queued"), model.max_queued, 1)?;
            if let Some(n) = model.context_length {
                at_least(&field("context_length"), n as usize, 1)?;
            }
            match model.kv_dtype {
                Some(d) if self.server.device != DeviceKind::Cpu && d != KvDtype::F32 => {
                    return Err(out_of_range(
                        &field("kv_dtype"),
                        "f32 or unset on a GPU (device KV caches are f32)",
                        d.as_str(),
                    ));
                }
                _ => {}
            }
            let threads = match model.threads_per_instance {
                Some(n) => n,
                None => (cores / model.instances).max(1),
            };
            at_least(&field("threads_per_instance"), threads, 1)?;
            if model.instances * threads > cores {
                return Err(ConfigError::Oversubscribed {
                    model: model.id.clone(),
                    instances: model.instances,
                    threads,
                    cores,
                });
            }
            model.threads_per_instance = Some(threads);
        }
        Ok(())
    }
}

fn out_of_range(field: &str, constraint: &str, value: &str) -> ConfigError {
    ConfigError::OutOfRange {
        field: field.to_owned(),
        constraint: constraint.to_owned(),
        value: value.to_owned(),
    }
}

fn at_least(field: &str, value: usize, min: usize) -> Result<(), ConfigError> {
    if value < min {
        return Err(out_of_range(
            field,
            &format!(">= {min}"),
            &value.to_string(),
        ));
    }
    Ok(())
}

/// `--role`: clap conversion lives here, so [`Role`](crate::types::Role) stays free of clap.
fn parse_role(text: &str) -> Result<crate::types::Role, String> {
    text.parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::io::Write;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(argv: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("qnode").chain(argv.iter().copied()))
            .expect("valid flags")
            .serve
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    const FILE: &str = r#"
        [server]
        listen = "0.0.0.0:6000"
        metrics_listen = "0.0.0.0:6001"
        http_listen = "0.0.0.0:6002"
        drain_timeout = "5s"
        role = "standby"
        device = "cpu"
        [cache]
        prewarm_top_k = 0
        [[models]]
        id = "gemma3-270m"
        instances = 2
        max_batch = 4
        [[models]]
        id = "smollm2"
        max_queued = 3
        context_length = 1024
        kv_cache_mb = 64
        kv_dtype = "f32"
        [limits]
        max_tokens_limit = 100
        default_max_tokens = 50
    "#;

    #[test]
    fn no_flags_serve_smollm2_on_default_address() {
        let config = Config::from_args_with_cores(&ServeArgs::default(), 4).unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(config.server.metrics_listen, None);
        assert_eq!(config.server.http_listen, None);
        assert_eq!(config.models.len(), 1);
        assert_eq!(config.models[0].id, "smollm2");
        assert_eq!(config.models[0].instances, 1);
        assert_eq!(config.models[0].threads_per_instance, Some(4));
        assert_eq!(config.models[0].max_batch, 8);
        assert_eq!(config.models[0].quant, Quant::Q8_0);
        assert_eq!(config.limits.max_tokens_limit, 2048);
        assert_eq!(config.server.drain_timeout, Duration::from_secs(30));
    }

    #[test]
    fn file_overrides_defaults() {
        let f = file(FILE);
        let args = ServeArgs {
            config: Some(f.path().to_owned()),
            ..ServeArgs::default()
        };
        let config = Config::from_args_with_cores(&args, 4).unwrap();
        assert_eq!(config.server.listen.to_string(), "0.0.0.0:6000");
        assert_eq!(config.server.drain_timeout, Duration::from_secs(5));
        assert_eq!(
            config.server.http_listen.map(|a| a.to_string()).as_deref(),
            Some("0.0.0.0:6002")
        );
        assert_eq!(config.models.len(), 2);
        assert_eq!(config.models[0].id, "gemma3-270m");
        assert_eq!(config.models[0].threads_per_instance, Some(2));
        assert_eq!(config.models[1].max_queued, 3);
        assert_eq!(config.models[1].context_length, Some(1024));
        assert_eq!(config.models[1].kv_cache_mb, 64);
        assert_eq!(config.models[1].kv_dtype, Some(KvDtype::F32));
        assert_eq!(config.models[0].kv_dtype, None);
        assert_eq!(config.models[0].kv_cache_mb, 1024, "unset: the default");
        assert_eq!(config.limits.max_tokens_limit, 100);
        assert_eq!(config.server.role, crate::types::Role::Standby);
        assert_eq!(config.cache.prewarm_top_k, 0);
        // Unset fields of a section keep their defaults.
        assert_eq!(config.limits.max_stop_strings, 8);
    }

    #[test]
    fn openai_non_text_parts_from_file_env_twin_and_flag() {
        let config = Config::from_args_with_cores(&parse(&[]), 4).unwrap();
        assert_eq!(
            config.openai.non_text_parts,
            NonTextParts::Drop,
            "the default"
        );
        let f = file("[openai]\nnon_text_parts = \"reject\"\n");
        let args = ServeArgs {
            config: Some(f.path().to_owned()),
            ..ServeArgs::default()
        };
        let config = Config::from_args_with_cores(&args, 4).unwrap();
        assert_eq!(config.openai.non_text_parts, NonTextParts::Reject);
        let args = ServeArgs {
            openai_non_text_parts: Some(NonTextParts::Drop),
            ..args
        };
        let config = Config::from_args_with_cores(&args, 4).unwrap();
        assert_eq!(
            config.openai.non_text_parts,
            NonTextParts::Drop,
            "the flag wins"
        );
        let flag = parse(&["--openai-non-text-parts", "reject"]);
        assert_eq!(flag.openai_non_text_parts, Some(NonTextParts::Reject));
        assert!(Config::from_toml("[openai]\nnon_text_parts = \"keep\"\n").is_err());
    }

    #[test]
    fn semantic_cache_is_off_unless_the_flag_or_the_file_turns_it_on() {
        let off = Config::from_args_with_cores(&parse(&[]), 4).unwrap();
        assert!(!off.cache.semantic.enabled);
        let on = Config::from_args_with_cores(&parse(&["--semantic-cache"]), 4).unwrap();
        assert!(on.cache.semantic.enabled);
        // The encoder defaults to the manifest's, under the models directory.
        let on = Config::from_args_with_cores(
            &parse(&["--semantic-cache", "--models-dir", "/srv/m"]),
            4,
        )
        .unwrap();
        assert_eq!(
            on.cache.semantic.encoder,
            Some(PathBuf::from("/srv/m/minilm-l6"))
        );
        let f = file("[cache.semantic]\nenabled = true\nthreshold = 0.9\n");
        let from_file = Config::from_file(f.path()).unwrap();
        assert!(from_file.cache.semantic.enabled);
        assert_eq!(from_file.cache.semantic.threshold, 0.9);
        let f = file("[cache.semantic]\nenabled = true\nthreshold = 1.5\n");
        let bad = Config::from_file(f.path()).unwrap();
        assert!(bad.cache.validate().is_err(), "threshold over 1 is refused");
    }

    #[test]
    fn semantic_encoder_takes_a_manifest_id_a_directory_or_hf() {
        let with = |toml: &str| {
            let f = file(toml);
            let args = parse(&[
                "--config",
                f.path().to_str().unwrap(),
                "--models-dir",
                "/srv/m",
            ]);
            Config::from_args_with_cores(&args, 4)
        };
        // An encoder id of the manifest is its directory under the models directory.
        let c = with("[cache.semantic]\nenabled = true\nencoder = \"m3e-small\"\n").unwrap();
        assert_eq!(
            c.cache.semantic.encoder,
            Some(PathBuf::from("/srv/m/m3e-small"))
        );
        let c = with("[cache.semantic]\nenabled = true\nencoder = \"/opt/enc\"\n").unwrap();
        assert_eq!(c.cache.semantic.encoder, Some(PathBuf::from("/opt/enc")));
        let c = with("[cache.semantic]\nenabled = true\nencoder = \"hf:BAAI/bge-small-zh-v1.5\"\n")
            .unwrap();
        assert_eq!(
            c.cache.semantic.encoder,
            Some(PathBuf::from("hf:BAAI/bge-small-zh-v1.5"))
        );
        // A malformed hf: spec is refused at start, naming the setting.
        let c = with("[cache.semantic]\nenabled = true\nencoder = \"hf:only-owner\"\n").unwrap();
        let err = c.cache.validate().unwrap_err().to_string();
        assert!(err.contains("semantic.encoder"), "{err}");
    }

    #[test]
    fn kv_cache_mb_flag_sets_every_model() {
        let config = Config::from_args_with_cores(&parse(&["--kv-cache-mb", "0"]), 4).unwrap();
        assert_eq!(config.models[0].kv_cache_mb, 0);
        let config = Config::from_args_with_cores(&parse(&[]), 4).unwrap();
        assert_eq!(config.models[0].kv_cache_mb, 1024);
    }

    #[test]
    fn half_precision_kv_is_refused_on_a_gpu_and_unset_means_the_device_default() {
        let err =
            Config::from_args_with_cores(&parse(&["--device", "cuda", "--kv-dtype", "f16"]), 4)
                .unwrap_err()
                .to_string();
        assert!(err.contains("kv_dtype") && err.contains("f16"), "{err}");
        let config = Config::from_args_with_cores(&parse(&["--device", "cuda"]), 4).unwrap();
        assert_eq!(config.models[0].kv_dtype, None);
        let config =
            Config::from_args_with_cores(&parse(&["--device", "cuda", "--kv-dtype", "f32"]), 4)
                .unwrap();
        assert_eq!(config.models[0].kv_dtype, Some(KvDtype::F32));
        let config = Config::from_args_with_cores(&parse(&["--kv-dtype", "f16"]), 4).unwrap();
        assert_eq!(config.models[0].kv_dtype, Some(KvDtype::F16));
        let err =
            Config::from_args_with_cores(&parse(&["--device", "cuda", "--kv-dtype", "q8_keys"]), 4)
                .unwrap_err()
                .to_string();
        assert!(err.contains("kv_dtype") && err.contains("q8_keys"), "{err}");
        let config = Config::from_args_with_cores(&parse(&["--kv-dtype", "q8_keys"]), 4).unwrap();
        assert_eq!(config.models[0].kv_dtype, Some(KvDtype::Q8Keys));
        let config = Config::from_args_with_cores(&parse(&["--kv-dtype", "q8"]), 4).unwrap();
        assert_eq!(config.models[0].kv_dtype, Some(KvDtype::Q8));
        let err =
            Config::from_args_with_cores(&parse(&["--device", "cuda", "--kv-dtype", "q8"]), 4)
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("kv_dtype") && err.ends_with("Given: q8"),
            "{err}"
        );
    }

    #[test]
    fn flags_override_file() {
        let f = file(FILE);
        let path = f.path().to_str().unwrap();
        let args = parse(&[
            "--config",
            path,
            "--listen",
            "127.0.0.1:50051",
            "--model",
            "smollm2",
            "--metrics-listen",
            "127.0.0.1:9464",
            "--http-listen",
            "127.0.0.1:8080",
            "--drain-timeout",
            "750ms",
            "--role",
            "active",
            "--admin-api-key",
            "adm",
        ]);
        let config = Config::from_args_with_cores(&args, 4).unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(config.server.role, crate::types::Role::Active);
        assert_eq!(config.server.admin_api_key.as_deref(), Some("adm"));
        assert_eq!(
            config
                .server
                .metrics_listen
                .map(|a| a.to_string())
                .as_deref(),
            Some("127.0.0.1:9464")
        );
        assert_eq!(
            config.server.http_listen.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(config.server.drain_timeout, Duration::from_millis(750));
        // The flag replaced the model list but kept the file's settings for `smollm2`.
        assert_eq!(config.models.len(), 1);
        assert_eq!(config.models[0].id, "smollm2");
        assert_eq!(config.models[0].max_queued, 3);
        assert_eq!(config.models[0].context_length, Some(1024));
        // The file's limits are untouched by flags that do not name them.
        assert_eq!(config.limits.max_tokens_limit, 100);
    }

    #[test]
    fn models_dir_from_file_and_flag() {
        assert_eq!(
            Config::from_args_with_cores(&parse(&[]), 4)
                .unwrap()
                .server
                .models_dir,
            PathBuf::from("models")
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qnode.toml");
        std::fs::write(&path, "[server]\nmodels_dir = \"/srv/models\"\n").unwrap();
        let path = path.to_str().unwrap();
        let from_file = Config::from_args_with_cores(&parse(&["--config", path]), 4).unwrap();
        assert_eq!(from_file.server.models_dir, PathBuf::from("/srv/models"));
        let from_flag =
            Config::from_args_with_cores(&parse(&["--config", path, "--models-dir", "/data/m"]), 4)
                .unwrap();
        assert_eq!(from_flag.server.models_dir, PathBuf::from("/data/m"));
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        // Only this test sets QNODE_MAX_BATCH; no other test reads max_batch from flags or env.
        std::env::set_var("QNODE_MAX_BATCH", "3");
        let f = file(FILE);
        let path = f.path().to_str().unwrap();
        let from_env = Config::from_args_with_cores(&parse(&["--config", path]), 4).unwrap();
        let from_flag =
            Config::from_args_with_cores(&parse(&["--config", path, "--max-batch", "2"]), 4)
                .unwrap();
        std::env::remove_var("QNODE_MAX_BATCH");
        assert!(from_env.models.iter().all(|m| m.max_batch == 3));
        assert!(from_flag.models.iter().all(|m| m.max_batch == 2));
    }

    #[test]
    fn repeated_model_flag_lists_several() {
        let args = parse(&["--model", "smollm2", "--model", "gemma3-270m"]);
        let config = Config::from_args_with_cores(&args, 2).unwrap();
        let ids: Vec<_> = config.models.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["smollm2", "gemma3-270m"]);
    }

    #[test]
    fn oversubscription_names_both_numbers() {
        let args = parse(&["--instances", "3", "--threads-per-instance", "2"]);
        let err = Config::from_args_with_cores(&args, 4).unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Oversubscribed {
                instances: 3,
                threads: 2,
                cores: 4,
                ..
            }
        ));
        let message = err.to_string();
        assert!(message.contains("instances (3)"), "{message}");
        assert!(message.contains("threads_per_instance (2)"), "{message}");
        assert!(message.contains("cores (4)"), "{message}");
    }

    #[test]
    fn more_instances_than_cores_is_refused_even_with_auto_threads() {
        let args = parse(&["--instances", "5"]);
        let err = Config::from_args_with_cores(&args, 4).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Oversubscribed {
                    instances: 5,
                    threads: 1,
                    cores: 4,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn zero_values_are_refused_with_field_name() {
        let err = Config::from_args_with_cores(&parse(&["--max-queued", "0"]), 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`models[smollm2].max_queued` must be >= 1. Given: 0"
        );
        let err = Config::from_args_with_cores(&parse(&["--instances", "0"]), 4).unwrap_err();
        assert!(err.to_string().contains("instances"), "{err}");
    }

    #[test]
    fn api_keys_from_file_list_table_and_flag() {
        let key = |k: &str, t: Option<&str>| ApiKey {
            key: k.into(),
            tenant: t.map(str::to_owned),
        };
        let list = Config::from_toml("[server]\napi_keys = [\"a\", \"b\"]\n").unwrap();
        assert_eq!(list.server.api_keys.0, vec![key("a", None), key("b", None)]);
        let f = file("[server]\nadmin_api_key = \"adm\"\napi_keys = { ka = \"acme\" }\n");
        let path = f.path().to_str().unwrap();
        let config = Config::from_args_with_cores(&parse(&["--config", path]), 4).unwrap();
        assert_eq!(config.server.api_keys.0, vec![key("ka", Some("acme"))]);
        // The flag (QNODE_API_KEYS) replaces the file's list.
        let args = parse(&["--config", path, "--api-keys", "k1=acme,k2"]);
        let config = Config::from_args_with_cores(&args, 4).unwrap();
        assert_eq!(
            config.server.api_keys.0,
            vec![key("k1", Some("acme")), key("k2", None)]
        );
        let debug = format!("{config:?}");
        assert!(!debug.contains("k1") && !debug.contains("acme"), "{debug}");
    }

    #[test]
    fn bad_api_keys_are_refused_without_echoing_them() {
        let refused = |flags: &[&str]| {
            let err = Config::from_args_with_cores(&parse(flags), 4).unwrap_err();
            err.to_string()
        };
        let err = refused(&["--api-keys", "secret-1=acme"]);
        assert!(
            err.starts_with("`server.admin_api_key` must be set"),
            "{err}"
        );
        let with_admin = |keys: &str| refused(&["--admin-api-key", "adm", "--api-keys", keys]);
        let err = with_admin("secret-1,secret-1");
        assert_eq!(
            err,
            "`server.api_keys[1]` must be a key listed once. Given: a repeated key"
        );
        assert!(with_admin("secret-1,").contains("non-empty"));
        let err = with_admin("secret-1=café");
        assert!(
            err.starts_with("`server.api_keys[0]'s tenant` must be 1..=128 bytes"),
            "{err}"
        );
        for err in [err, with_admin("secret-1,secret-1")] {
            assert!(!err.contains("secret-1") && !err.contains("café"), "{err}");
        }
    }

    #[test]
    fn bad_duration_is_refused() {
        let err =
            Config::from_args_with_cores(&parse(&["--drain-timeout", "soon"]), 4).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Duration { field: "drain_timeout", value } if value == "soon")
        );
    }

    #[test]
    fn unknown_toml_keys_and_bad_files_are_refused() {
        let f = file("[server]\nlisten_addr = \"0.0.0.0:1\"\n");
        let err = Config::from_file(f.path()).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(err.to_string().contains("listen_addr"), "{err}");
        let err = Config::from_file(Path::new("/nonexistent/qnode.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
    }

    #[test]
    fn duplicate_models_are_refused() {
        let args = parse(&["--model", "smollm2,smollm2"]);
        let err = Config::from_args_with_cores(&args, 4).unwrap_err();
        assert!(matches!(err, ConfigError::DuplicateModel(id) if id == "smollm2"));
    }

    #[test]
    fn example_file_at_repo_root_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("qnode.toml");
        let config = Config::from_file(&path).unwrap();
        assert!(!config.models.is_empty());
        // The documented [cache] and [openai] values are the defaults, so the file tells the truth.
        assert_eq!(config.cache, crate::cache::CacheConfig::default());
        assert_eq!(config.openai, OpenAiSection::default());
    }

    #[test]
    fn every_section_takes_the_one_duration_format() {
        let f = file("[server]\ndrain_timeout = \"2m\"\n[cache]\nredis_timeout = \"20ms\"\nmax_age = \"1h\"\n");
        let config = Config::from_file(f.path()).unwrap();
        assert_eq!(config.server.drain_timeout, Duration::from_secs(120));
        assert_eq!(config.cache.redis_timeout, Duration::from_millis(20));
        assert_eq!(config.cache.max_age, Duration::from_secs(3600));
        // A bare number is refused in every section, naming the format.
        for text in [
            "[server]\ndrain_timeout = 30\n",
            "[cache]\nredis_timeout = 50\n",
        ] {
            let err = Config::from_file(file(text).path())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("bare number") && err.contains("\"30s\""),
                "{err}"
            );
        }
        let err = Config::from_args_with_cores(&parse(&["--drain-timeout", "30"]), 4).unwrap_err();
        assert!(err.to_string().contains("\"250ms\""), "{err}");
    }
}
