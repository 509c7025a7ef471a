//! L1: answers in process memory (moka), bounded by bytes, with a TTL from insertion and the
//! hard max age from generation, both read on the cache's [`Clock`] (so tests drive them with a
//! manual clock; moka's own TTL, on its own clock, only frees the memory of entries nobody asks
//! for again). moka's TinyLFU admission keeps one-off answers from evicting popular ones.

use std::sync::Arc;

use moka::sync::Cache;

use super::{CacheConfig, CacheKey, CachedAnswer, Clock};

/// The in-process answer cache. Lookups are synchronous and lock-free enough to run inside
/// `submit`.
pub struct L1 {
    /// Each answer with the clock's time of its insertion.
    cache: Cache<CacheKey, (u64, Arc<CachedAnswer>)>,
    clock: Arc<dyn Clock>,
    max_age_ms: u64,
    ttl_ms: u64,
}

impl L1 {
    /// An empty cache sized by `config`.
    pub fn new(config: &CacheConfig, clock: Arc<dyn Clock>) -> Self {
        let cache = Cache::builder()
            .max_capacity(config.l1_max_bytes)
            .weigher(|_k: &CacheKey, v: &(u64, Arc<CachedAnswer>)| v.1.weight())
            .time_to_live(config.l1_ttl)
            .build();
        Self {
            cache,
            clock,
            max_age_ms: config.max_age.as_millis() as u64,
            ttl_ms: config.l1_ttl.as_millis() as u64,
        }
    }

    /// The answer under `key`, unless absent, expired by TTL, or past the hard max age (then it
    /// is dropped).
    pub fn get(&self, key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        let (inserted, answer) = self.cache.get(key)?;
        let now = self.clock.now_ms();
        if now.saturating_sub(inserted) >= self.ttl_ms || answer.is_expired(now, self.max_age_ms) {
            self.cache.invalidate(key);
            return None;
        }
        Some(answer)
    }

    /// Stores `answer`, unless it is already past the max age.
    pub fn insert(&self, key: CacheKey, answer: Arc<CachedAnswer>) {
        let now = self.clock.now_ms();
        if !answer.is_expired(now, self.max_age_ms) {
            self.cache.insert(key, (now, answer));
        }
    }

    /// Drops the answer under `key`.
    pub fn remove(&self, key: &CacheKey) {
        self.cache.invalidate(key);
    }

    /// Drops every entry.
    pub fn clear(&self) {
        self.cache.invalidate_all();
    }

    /// Weighted bytes held (approximate until moka's pending maintenance runs).
    pub fn weighted_bytes(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Runs moka's pending housekeeping (evictions, size accounting); for metrics and tests.
    pub fn sync(&self) {
        self.cache.run_pending_tasks();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cache::ManualClock;
    use crate::engine::FinishReason;

    fn answer(text: &str, created_at_ms: u64) -> Arc<CachedAnswer> {
        Arc::new(CachedAnswer {
            text: text.into(),
            finish_reason: FinishReason::Stop,
            prompt_tokens: 1,
            completion_tokens: 1,
            created_at_ms,
            question: None,
        })
    }

    #[test]
    fn max_age_counts_from_generation_not_insertion() {
        let clock = ManualClock::new();
        let config = CacheConfig {
            max_age: Duration::from_secs(10),
            ..CacheConfig::default()
        };
        let l1 = L1::new(&config, Arc::new(clock.clone()));
        let k = CacheKey([1; 32]);
        l1.insert(k, answer("a", clock.now_ms()));
        assert!(l1.get(&k).is_some());
        clock.advance(Duration::from_secs(11));
        assert!(l1.get(&k).is_none());
        // An answer that was generated long ago (refilled from Redis) is refused on insert.
        l1.insert(k, answer("a", clock.now_ms() - 20_000));
        assert!(l1.get(&k).is_none());
    }

    #[test]
    fn ttl_expires_entries_on_the_cache_clock() {
        let config = CacheConfig {
            l1_ttl: Duration::from_secs(60),
            ..CacheConfig::default()
        };
        let clock = ManualClock::new();
        let l1 = L1::new(&config, Arc::new(clock.clone()));
        let k = CacheKey([2; 32]);
        l1.insert(k, answer("a", clock.now_ms()));
        clock.advance(Duration::from_millis(59_999));
        assert!(l1.get(&k).is_some(), "gone before its TTL");
        clock.advance(Duration::from_millis(1));
        // The max age (1 day by default) is far: only the TTL can expire it.
        assert!(l1.get(&k).is_none(), "still there at its TTL");
        // The TTL counts from insertion, not generation: an old answer inserted now lives a
        // whole TTL.
        l1.insert(k, answer("b", clock.now_ms() - 50_000));
        clock.advance(Duration::from_secs(30));
        assert!(l1.get(&k).is_some());
    }

    #[test]
    fn byte_bound_evicts() {
        let config = CacheConfig {
            l1_max_bytes: 10 * 1024,
            ..CacheConfig::default()
        };
        let clock = ManualClock::new();
        let l1 = L1::new(&config, Arc::new(clock.clone()));
        let text = "x".repeat(1000);
        for i in 0..100u8 {
            l1.insert(CacheKey([i; 32]), answer(&text, clock.now_ms()));
            l1.sync();
        }
        l1.sync();
        assert!(l1.weighted_bytes() <= 10 * 1024, "{}", l1.weighted_bytes());
        assert!(l1.weighted_bytes() > 0);
    }
}
