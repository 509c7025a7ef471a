//! What the pool tells Prometheus: batch sizes, queue depth, busy time and tokens per instance,
//! and the KV prefix store of each model (its memory against the budget, evictions, and how many
//! prompt tokens it served).

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::engine::instance::StepObserver;
use crate::engine::prefix::PrefixMetrics;

/// Collectors of the pool (cheap to clone).
#[derive(Clone)]
pub struct PoolMetrics {
    /// Sequences per forward step, by model.
    pub batch_size: HistogramVec,
    /// Requests waiting for a batch slot, by model.
    pub queue_depth: IntGaugeVec,
    /// Seconds spent in forward steps, by model and instance (its rate is the busy ratio).
    pub busy_seconds: prometheus::CounterVec,
    /// Tokens sampled, by model and instance (its rate is the instance's tokens/s).
    pub instance_tokens: IntCounterVec,
    /// Bytes held by the KV prefix stores, by model (against `kv_cache_mb`).
    pub prefix_bytes: IntGaugeVec,
    /// Blocks held by the KV prefix stores, by model.
    pub prefix_blocks: IntGaugeVec,
    /// Blocks evicted from the KV prefix stores to stay within budget, by model.
    pub prefix_evictions: IntCounterVec,
    /// Prompt tokens whose KV came from a prefix store, by model.
    pub prefix_hit_tokens: IntCounterVec,
    /// Prompt tokens of every sequence started, by model (hit ratio = hits / this).
    pub prefix_prompt_tokens: IntCounterVec,
    /// Tokens the model generated, by model: cancelled streams' included; cache hits and
    /// callers joined to another's generation never reach the model, so are not.
    pub generated_tokens: IntCounterVec,
    /// Prompt tokens the model computed (prefill), by model; not those restored from the prefix
    /// store, nor any of a cache hit.
    pub prompt_tokens: IntCounterVec,
}

impl PoolMetrics {
    /// Create and register in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let batch_size = HistogramVec::new(
            HistogramOpts::new("batch_size", "Sequences per forward step")
                .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0]),
            &["model"],
        )?;
        let queue_depth = IntGaugeVec::new(
            Opts::new("queue_depth", "Requests waiting for a batch slot"),
            &["model"],
        )?;
        let busy_seconds = prometheus::CounterVec::new(
            Opts::new(
                "instance_busy_seconds_total",
                "Time instances spent in forward steps; rate() is the busy ratio",
            ),
            &["model", "instance"],
        )?;
        let instance_tokens = IntCounterVec::new(
            Opts::new(
                "instance_tokens_total",
                "Tokens sampled per instance; rate() is its tokens/s",
            ),
            &["model", "instance"],
        )?;
        let prefix_bytes = IntGaugeVec::new(
            Opts::new(
                "kv_prefix_bytes",
                "Bytes held by the KV prefix stores (capped by kv_cache_mb)",
            ),
            &["model"],
        )?;
        let prefix_blocks = IntGaugeVec::new(
            Opts::new("kv_prefix_blocks", "Blocks held by the KV prefix stores"),
            &["model"],
        )?;
        let prefix_evictions = IntCounterVec::new(
            Opts::new(
                "kv_prefix_evictions_total",
                "KV prefix blocks evicted to stay within the budget",
            ),
            &["model"],
        )?;
        let prefix_hit_tokens = IntCounterVec::new(
            Opts::new(
                "kv_prefix_hit_tokens_total",
                "Prompt tokens whose keys and values came from the prefix store",
            ),
            &["model"],
        )?;
        let prefix_prompt_tokens = IntCounterVec::new(
            Opts::new(
                "kv_prefix_prompt_tokens_total",
                "Prompt tokens of every sequence started (hit ratio denominator)",
            ),
            &["model"],
        )?;
        let generated_tokens = IntCounterVec::new(
            Opts::new(
                "generated_tokens_total",
                "Tokens the model generated (cancelled calls included, cache hits not)",
            ),
            &["model"],
        )?;
        let prompt_tokens = IntCounterVec::new(
            Opts::new(
                "prompt_tokens_total",
                "Prompt tokens the model computed (prefill; prefix-store reuse and cache hits not)",
            ),
            &["model"],
        )?;
        registry.register(Box::new(generated_tokens.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(prefix_bytes.clone()))?;
        registry.register(Box::new(prefix_blocks.clone()))?;
        registry.register(Box::new(prefix_evictions.clone()))?;
        registry.register(Box::new(prefix_hit_tokens.clone()))?;
        registry.register(Box::new(prefix_prompt_tokens.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(busy_seconds.clone()))?;
        registry.register(Box::new(instance_tokens.clone()))?;
        Ok(Self {
            batch_size,
            queue_depth,
            busy_seconds,
            instance_tokens,
            prefix_bytes,
            prefix_blocks,
            prefix_evictions,
            prefix_hit_tokens,
            prefix_prompt_tokens,
            generated_tokens,
            prompt_tokens,
        })
    }

    /// The prefix-store collectors bound to `model`.
    pub fn prefix(&self, model: &str) -> PrefixMetrics {
        PrefixMetrics {
            bytes: self.prefix_bytes.with_label_values(&[model]),
            blocks: self.prefix_blocks.with_label_values(&[model]),
            evictions: self.prefix_evictions.with_label_values(&[model]),
            hit_tokens: self.prefix_hit_tokens.with_label_values(&[model]),
            prompt_tokens: self.prefix_prompt_tokens.with_label_values(&[model]),
        }
    }

    /// Collectors in a private registry (for tools and tests that expose no metrics).
    pub fn unregistered() -> Self {
        Self::register(&Registry::new()).expect("fresh registry")
    }

    /// The observer an instance of `model` reports its steps to.
    pub fn observer(&self, model: &str) -> ModelObserver {
        ModelObserver {
            model: model.to_string(),
            metrics: self.clone(),
        }
    }
}

/// Step observer bound to one model.
pub struct ModelObserver {
    model: String,
    metrics: PoolMetrics,
}

impl StepObserver for ModelObserver {
    fn on_step(
        &self,
        instance: usize,
        batch: usize,
        _tokens: usize,
        sampled: usize,
        busy: Duration,
    ) {
        let instance = instance.to_string();
        let labels = [self.model.as_str(), instance.as_str()];
        self.metrics
            .batch_size
            .with_label_values(&[&self.model])
            .observe(batch as f64);
        self.metrics
            .busy_seconds
            .with_label_values(&labels)
            .inc_by(busy.as_secs_f64());
        self.metrics
            .instance_tokens
            .with_label_values(&labels)
            .inc_by(sampled as u64);
        self.metrics
            .generated_tokens
            .with_label_values(&[&self.model])
            .inc_by(sampled as u64);
    }

    fn on_prefill(&self, _instance: usize, prompt_tokens: usize) {
        if prompt_tokens > 0 {
            self.metrics
                .prompt_tokens
                .with_label_values(&[&self.model])
                .inc_by(prompt_tokens as u64);
        }
    }
}
