//! What a front hands to [`Front::begin`](super::Front::begin): the caller's request as the wire
//! gave it, unchecked ([`RawRequest`]), and what the transport knows about the call ([`CallMeta`]).

use std::time::Instant;

use crate::types::{CachePolicy, ChatMessage};

use super::error::FrontError;

/// A generation request in neither front's wire format and not yet checked: absent fields are
/// `None` (zero is a value), ranges are checked by [`validate`](super::validate::validate).
#[derive(Debug, Clone, PartialEq)]
pub struct RawRequest {
    /// Model id asked for.
    pub model: String,
    /// Raw prompt; exactly one of `prompt` and `messages` must be given.
    pub prompt: Option<String>,
    /// Chat turns; empty when absent.
    pub messages: Vec<ChatMessage>,
    /// New tokens asked for.
    pub max_tokens: Option<u32>,
    /// Softmax temperature.
    pub temperature: Option<f32>,
    /// Nucleus mass.
    pub top_p: Option<f32>,
    /// Top-k filter.
    pub top_k: Option<u32>,
    /// Min-p filter.
    pub min_p: Option<f32>,
    /// Repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// RNG seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Cache policy; `Err` holds the value given when the wire's value names no policy, so
    /// validation refuses it like any other out-of-range field.
    pub cache_policy: Result<CachePolicy, String>,
}

impl Default for RawRequest {
    fn default() -> Self {
        Self {
            model: String::new(),
            prompt: None,
            messages: Vec::new(),
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            min_p: None,
            repetition_penalty: None,
            seed: None,
            stop: Vec::new(),
            cache_policy: Ok(CachePolicy::Default),
        }
    }
}

/// What the transport knows about one call, beside its body.
#[derive(Debug, Clone)]
pub struct CallMeta {
    /// The method, a metric label (`Generate`, `chat.completions`, ...).
    pub method: &'static str,
    /// When the call arrived; latency and the deadline count from here.
    pub arrival: Instant,
    /// The caller's id; `None` gets a fresh one.
    pub request_id: Option<String>,
    /// The caller's tenant; it scopes the answer cache.
    pub tenant: Option<String>,
    /// When the caller stops waiting. A malformed deadline header is an `Err`, refused after
    /// admission and counted like any invalid argument.
    pub deadline: Result<Option<Instant>, FrontError>,
}

impl CallMeta {
    /// A call of `method` arriving now, with no id, tenant or deadline yet.
    pub fn new(method: &'static str) -> Self {
        Self {
            method,
            arrival: Instant::now(),
            request_id: None,
            tenant: None,
            deadline: Ok(None),
        }
    }
}
