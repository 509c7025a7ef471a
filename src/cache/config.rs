//! Cache settings: one struct, read from the node's config file, checked once at start.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{CacheError, Secret};

/// Shortest fleet secret accepted: 16 bytes (128 bits when random).
pub const MIN_SECRET_BYTES: usize = 16;
/// Most sampled answers kept per question (`sampled_variants`).
pub const MAX_SAMPLED_VARIANTS: usize = 16;

/// Settings of the two-level answer cache. Durations are written `"50ms"`, `"30s"`, `"1h"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Upper bound on the bytes of answers held in process (L1), text plus a fixed per-entry cost.
    pub l1_max_bytes: u64,
    /// How long an answer stays in L1 after it was stored there.
    #[serde(with = "crate::duration::text")]
    pub l1_ttl: Duration,
    /// Hard age limit of an answer since it was generated, whichever level serves it; also the TTL
    /// of the Redis value (a hit does not extend it).
    #[serde(with = "crate::duration::text")]
    pub max_age: Duration,
    /// `redis://host:port/db` for one server, or `redis+cluster://h1:p1,h2:p2` (or a
    /// comma-separated list of `redis://` URLs) for a Redis Cluster. `None` turns L2 off.
    pub redis_url: Option<String>,
    /// The fleet's shared secret: every Redis value carries an HMAC-SHA256 under it, and a value
    /// that does not verify is a miss and is deleted, so only holders of the secret can plant
    /// answers. Required (at least 16 bytes) whenever `redis_url` is set, unless
    /// `redis_insecure`. Env `QNODE_CACHE_REDIS_SECRET`. Never printed.
    pub redis_secret: Option<Secret>,
    /// Run L2 without a secret (values are then signed under an empty key: anyone who can write
    /// to Redis can plant answers). Only for a Redis nobody else can reach.
    pub redis_insecure: bool,
    /// An answer goes to Redis only once the fleet asked for it this many times within
    /// `hot_window`; `1` stores every answer.
    pub hot_threshold: u64,
    /// Window over which asks are counted for `hot_threshold`.
    #[serde(with = "crate::duration::text")]
    pub hot_window: Duration,
    /// Most keys kept in the Redis sorted set of hot keys that `prewarm_from_redis` reads.
    pub hot_set_max: usize,
    /// Every Redis call (connecting included) gives up after this long; the request goes on
    /// as a miss.
    #[serde(with = "crate::duration::text")]
    pub redis_timeout: Duration,
    /// Consecutive Redis failures that open the circuit breaker (Redis is then skipped).
    pub breaker_failures: u32,
    /// How long the breaker stays open before one probe call is let through.
    #[serde(with = "crate::duration::text")]
    pub breaker_cooldown: Duration,
    /// Characters per `Delta` when a cached answer is replayed (never splits a UTF-8 character).
    pub chunk_chars: usize,
    /// Trim, collapse whitespace runs and apply NFKC to prompt text before keying. Off by default:
    /// it makes prompts that differ only in spacing share an answer the model might not give.
    pub normalize: bool,
    /// Cache sampled (non-deterministic) requests too. Off by default: a cache would freeze one
    /// sample of a distribution the caller asked to draw from.
    pub cache_nondeterministic: bool,
    /// Largest Redis value accepted or written; bigger ones are treated as misses and deleted.
    pub max_value_bytes: usize,
    /// Prefix of every Redis key, so several fleets (or format versions) can share a Redis.
    pub key_prefix: String,
    /// How many of the fleet's hottest answers a node loads from Redis into L1 while it warms up;
    /// `0` turns the preload off.
    pub prewarm_top_k: usize,
    /// Sampled answers kept in Redis per hot sampled question (temperature > 0, no seed): below
    /// this many, such a request is generated and its answer added; from then on one of them is
    /// served at random. `0` turns it off (sampled requests always generate). Needs Redis.
    pub sampled_variants: usize,
    /// The semantic tier (`[cache.semantic]`), off by default.
    pub semantic: super::SemanticConfig,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            l1_max_bytes: 256 * 1024 * 1024,
            l1_ttl: Duration::from_secs(3600),
            max_age: Duration::from_secs(24 * 3600),
            redis_url: None,
            redis_secret: None,
            redis_insecure: false,
            hot_threshold: 2,
            hot_window: Duration::from_secs(3600),
            hot_set_max: 10_000,
            redis_timeout: Duration::from_millis(50),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(2),
            chunk_chars: 64,
            normalize: false,
            cache_nondeterministic: false,
            max_value_bytes: 1024 * 1024,
            key_prefix: "qnode:v1".to_string(),
            prewarm_top_k: 256,
            sampled_variants: 4,
            semantic: super::SemanticConfig::default(),
        }
    }
}

impl CacheConfig {
    /// Checks the ranges that would otherwise fail later, deep inside a request.
    pub fn validate(&self) -> Result<(), CacheError> {
        let bad = |field: &'static str, value: String, rule: &'static str| {
            Err(CacheError::InvalidConfig { field, value, rule })
        };
        let secret_len = self.redis_secret.as_ref().map_or(0, Secret::len);
        if self.redis_url.is_some() && !self.redis_insecure && secret_len < MIN_SECRET_BYTES {
            return bad(
                "redis_secret",
                format!("{secret_len} bytes"),
                "L2 (redis_url) needs the fleet's shared secret of at least 16 bytes \
                 (cache.redis_secret or env QNODE_CACHE_REDIS_SECRET), or \
                 cache.redis_insecure = true to run unsigned",
            );
        }
        if self.chunk_chars == 0 {
            return bad("chunk_chars", "0".into(), "must be >= 1");
        }
        if self.sampled_variants > MAX_SAMPLED_VARIANTS {
            return bad(
                "sampled_variants",
                self.sampled_variants.to_string(),
                "must be <= 16",
            );
        }
        if self.hot_threshold == 0 {
            return bad("hot_threshold", "0".into(), "must be >= 1");
        }
        if self.breaker_failures == 0 {
            return bad("breaker_failures", "0".into(), "must be >= 1");
        }
        if self.redis_timeout.is_zero() {
            return bad("redis_timeout", "0".into(), "must be > 0 ms");
        }
        if self.max_age < Duration::from_secs(1) {
            return bad(
                "max_age",
                format!("{}ms", self.max_age.as_millis()),
                "must be >= 1000 ms (Redis TTLs are whole seconds)",
            );
        }
        if self.hot_window < Duration::from_secs(1) {
            return bad(
                "hot_window",
                format!("{}ms", self.hot_window.as_millis()),
                "must be >= 1000 ms (Redis TTLs are whole seconds)",
            );
        }
        self.semantic.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_round_trips_through_toml() {
        let c = CacheConfig::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("redis_timeout = \"50ms\""), "{text}");
        let back: CacheConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn partial_toml_keeps_defaults() {
        let c: CacheConfig = toml::from_str("hot_threshold = 3\nredis_timeout = \"20ms\"").unwrap();
        assert_eq!(c.hot_threshold, 3);
        assert_eq!(c.redis_timeout, Duration::from_millis(20));
        assert_eq!(c.chunk_chars, CacheConfig::default().chunk_chars);
    }

    #[test]
    fn l2_needs_a_secret_unless_insecure() {
        let with = |secret: Option<&str>, insecure: bool| CacheConfig {
            redis_url: Some("redis://127.0.0.1:6379/".into()),
            redis_secret: secret.map(Secret::new),
            redis_insecure: insecure,
            ..CacheConfig::default()
        };
        for short in [None, Some(""), Some("fifteen-bytes!!")] {
            match with(short, false).validate() {
                Err(CacheError::InvalidConfig { field, .. }) => assert_eq!(field, "redis_secret"),
                other => panic!("{short:?}: expected InvalidConfig, got {other:?}"),
            }
        }
        with(Some("sixteen-bytes!!!"), false).validate().unwrap();
        with(None, true).validate().unwrap();
        // Without L2 no secret is needed.
        CacheConfig::default().validate().unwrap();
        let c: CacheConfig = toml::from_str("redis_secret = \"0123456789abcdef\"").unwrap();
        assert_eq!(c.redis_secret, Some(Secret::new("0123456789abcdef")));
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn zero_chunk_is_rejected_with_field_name() {
        let c = CacheConfig {
            chunk_chars: 0,
            ..CacheConfig::default()
        };
        match c.validate() {
            Err(CacheError::InvalidConfig { field, .. }) => assert_eq!(field, "chunk_chars"),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }
}
