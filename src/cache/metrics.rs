//! Prometheus metrics of the answer cache. Created unregistered so several caches (tests) can
//! live in one process; the server registers the node's one with its registry.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Counters and gauges of one `CachedBackend`.
#[derive(Clone)]
pub struct CacheMetrics {
    /// Answers served, by `level` (`l1`, `l2`, `semantic`).
    pub hits: IntCounterVec,
    /// Lookups that found nothing, by `level` (`l1`, `l2`, `semantic`).
    pub misses: IntCounterVec,
    /// Requests that joined a generation already running for the same key.
    pub singleflight_joins: IntCounter,
    /// Generations started by the cache layer (misses that went to the model).
    pub generations: IntCounter,
    /// Answers written to Redis because they crossed the hot threshold.
    pub hot_promotions: IntCounter,
    /// Redis values refused (bad envelope, too big, too old) and deleted.
    pub rejected_values: IntCounter,
    /// Failed Redis calls, by `kind` (`timeout`, `error`, `connect`).
    pub redis_errors: IntCounterVec,
    /// Redis calls skipped because the breaker was open.
    pub redis_skipped: IntCounter,
    /// 0 closed, 1 open, 2 half-open.
    pub breaker_state: IntGauge,
    /// Weighted bytes in L1.
    pub l1_bytes: IntGauge,
    /// Semantic tier: questions matched against the index (exact misses that qualified).
    /// Hits and misses are `hits_total` / `misses_total` with `level="semantic"`.
    pub semantic_lookups: IntCounter,
    /// Semantic tier: matches over the threshold refused by the guard, by `guard` (negation,
    /// number, entity, order, opposite, cjk).
    pub semantic_rejects: IntCounterVec,
    /// Semantic tier: questions held in the node's index.
    pub semantic_entries: IntGauge,
    /// Semantic tier: questions of answers loaded from Redis put in the index, by `from`
    /// (`prewarm`, `l2`).
    pub semantic_filled: IntCounterVec,
}

impl CacheMetrics {
    /// Fresh, unregistered metrics.
    pub fn new() -> Self {
        let vec = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help).namespace("cache"), &[label])
                .expect("static metric definition")
        };
        let counter = |name: &str, help: &str| {
            IntCounter::with_opts(Opts::new(name, help).namespace("cache"))
                .expect("static metric definition")
        };
        let gauge = |name: &str, help: &str| {
            IntGauge::with_opts(Opts::new(name, help).namespace("cache"))
                .expect("static metric definition")
        };
        Self {
            hits: vec("hits_total", "Answers served from the cache", "level"),
            misses: vec("misses_total", "Cache lookups that found nothing", "level"),
            singleflight_joins: counter(
                "singleflight_joins_total",
                "Requests that joined an identical generation in flight",
            ),
            generations: counter("generations_total", "Misses sent to the model"),
            hot_promotions: counter(
                "hot_promotions_total",
                "Answers written to Redis after crossing the hot threshold",
            ),
            rejected_values: counter(
                "rejected_values_total",
                "Redis values refused by a check and deleted",
            ),
            redis_errors: vec("redis_errors_total", "Failed Redis calls", "kind"),
            redis_skipped: counter(
                "redis_skipped_total",
                "Redis calls skipped while the breaker was open",
            ),
            breaker_state: gauge(
                "breaker_state",
                "Redis circuit breaker: 0 closed, 1 open, 2 half-open",
            ),
            l1_bytes: gauge("l1_bytes", "Weighted bytes held in the in-process cache"),
            semantic_lookups: counter(
                "semantic_lookups_total",
                "Exact misses matched against the semantic index",
            ),
            semantic_rejects: vec(
                "semantic_rejects_total",
                "Semantic matches over the threshold refused by the guard",
                "guard",
            ),
            semantic_entries: gauge("semantic_entries", "Questions held in the semantic index"),
            semantic_filled: vec(
                "semantic_filled_total",
                "Questions of answers loaded from Redis put in the semantic index",
                "from",
            ),
        }
    }

    /// Registers every metric with `registry`.
    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.hits.clone()))?;
        registry.register(Box::new(self.misses.clone()))?;
        registry.register(Box::new(self.singleflight_joins.clone()))?;
        registry.register(Box::new(self.generations.clone()))?;
        registry.register(Box::new(self.hot_promotions.clone()))?;
        registry.register(Box::new(self.rejected_values.clone()))?;
        registry.register(Box::new(self.redis_errors.clone()))?;
        registry.register(Box::new(self.redis_skipped.clone()))?;
        registry.register(Box::new(self.breaker_state.clone()))?;
        registry.register(Box::new(self.l1_bytes.clone()))?;
        registry.register(Box::new(self.semantic_lookups.clone()))?;
        registry.register(Box::new(self.semantic_rejects.clone()))?;
        registry.register(Box::new(self.semantic_entries.clone()))?;
        registry.register(Box::new(self.semantic_filled.clone()))?;
        Ok(())
    }

    pub(crate) fn hit(&self, level: &str) {
        self.hits.with_label_values(&[level]).inc();
    }

    pub(crate) fn miss(&self, level: &str) {
        self.misses.with_label_values(&[level]).inc();
    }
}

impl Default for CacheMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_once_and_refuses_twice() {
        let m = CacheMetrics::new();
        // The node's registry adds `qnode_`, as crate::metrics::Metrics does: the cache's names
        // carry `cache_` only, so they read `qnode_cache_…` (never `qnode_qnode_cache_…`).
        let r = Registry::new_custom(Some("qnode".to_owned()), None).unwrap();
        m.register(&r).unwrap();
        m.hit("l1");
        assert!(m.register(&r).is_err());
        let names: Vec<String> = r.gather().iter().map(|f| f.name().to_string()).collect();
        assert!(
            names.contains(&"qnode_cache_hits_total".to_string()),
            "{names:?}"
        );
        assert!(
            names.iter().all(|n| n.starts_with("qnode_cache_")),
            "{names:?}"
        );
    }
}
