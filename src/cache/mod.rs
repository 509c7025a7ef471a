//! Two-level answer cache in front of the engine.
//!
//! [`CachedBackend`] wraps any [`crate::engine::Backend`] and implements it again, so the server
//! does not know whether a cache is there. A request flows:
//!
//! 1. Key ([`cache_key`]): SHA-256 over tagged, length-prefixed fields — model identity (id, file
//!    digest, quant, template), prompt, every sampling parameter, `max_tokens`, stops, tenant.
//! 2. Policy: only deterministic requests are cached (unless `cache_nondeterministic`);
//!    `CachePolicy` on the request can bypass, refresh, or ask for cached answers only.
//! 3. L1 ([`l1`]): moka, bounded by bytes, TTL, and a hard max age counted from generation.
//! 4. L2 ([`redis_store`]): Redis or Redis Cluster, only for hot questions (asked
//!    `hot_threshold` times within `hot_window` across the fleet). Values are envelopes signed
//!    with HMAC-SHA256 under the fleet secret (`redis_secret`, [`mac`]); a value that fails any
//!    check is a miss and is deleted.
//! 5. Semantic tier ([`semantic`], opt-in): on an exact miss, a standalone chat question matched
//!    by meaning (embedding cosine + a lexical guard) within its exact scope. A hot answer
//!    carries its question through Redis, and nodes that load it index the question too.
//! 6. Single flight ([`flight`]): identical concurrent misses share one generation.
//! 7. Fail-open: every Redis call is bounded by `redis_timeout` and guarded by a circuit breaker;
//!    Redis trouble makes misses, never errors.

pub mod backend;
pub mod breaker;
pub mod clock;
pub mod config;
pub mod entry;
pub mod error;
pub mod flight;
pub mod key;
pub mod l1;
pub mod mac;
pub mod metrics;
pub mod redis_store;
pub mod replay;
pub mod semantic;

pub use backend::CachedBackend;
pub use breaker::BreakerState;
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::CacheConfig;
pub use entry::CachedAnswer;
pub use error::CacheError;
pub use key::{cache_key, normalize_text, semantic_scope, CacheKey, ModelIdentity};
pub use mac::Secret;
pub use metrics::CacheMetrics;
pub use semantic::SemanticConfig;
