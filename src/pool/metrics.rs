//! What the pool tells Prometheus: batch sizes, queue depth, busy time and tokens per instance.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::engine::instance::StepObserver;

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
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(busy_seconds.clone()))?;
        registry.register(Box::new(instance_tokens.clone()))?;
        Ok(Self {
            batch_size,
            queue_depth,
            busy_seconds,
            instance_tokens,
        })
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
    }
}
