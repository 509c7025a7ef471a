//! Errors of the cache layer. Only construction can fail: at request time every cache fault is
//! a miss (fail-open), never an error the caller sees.

/// Why a cache could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CacheError {
    /// A config value is out of range.
    #[error("cache config `{field}` = {value}: {rule}")]
    InvalidConfig {
        /// Field name in `CacheConfig`.
        field: &'static str,
        /// The value given.
        value: String,
        /// The rule it broke.
        rule: &'static str,
    },
    /// The semantic tier's sentence encoder could not be loaded.
    #[error("semantic cache encoder: {0}")]
    Encoder(String),
    /// The Redis URL could not be parsed.
    #[error("redis url `{url}`: {reason}")]
    InvalidRedisUrl {
        /// The URL given (password masked).
        url: String,
        /// What the Redis client said.
        reason: String,
    },
}
