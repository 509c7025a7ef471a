//! Engine types → wire types. Only the server knows the wire.

use super::proto;
use crate::engine::{Completion, FinishReason, ModelInfo, ModelState, Source, Timings};
use crate::node::{NodeState, Role};

pub(crate) fn finish_reason(reason: FinishReason) -> proto::FinishReason {
    match reason {
        FinishReason::Stop => proto::FinishReason::Stop,
        FinishReason::Length => proto::FinishReason::Length,
        FinishReason::Cancelled => proto::FinishReason::Cancelled,
    }
}

pub(crate) fn cache_level(source: Source) -> proto::CacheLevel {
    match source {
        Source::Model => proto::CacheLevel::None,
        Source::CacheL1 => proto::CacheLevel::L1,
        Source::CacheL2 => proto::CacheLevel::L2,
    }
}

pub(crate) fn usage(completion: &Completion) -> proto::Usage {
    proto::Usage {
        prompt_tokens: completion.prompt_tokens,
        completion_tokens: completion.completion_tokens,
    }
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

pub(crate) fn timings(t: &Timings) -> proto::Timings {
    proto::Timings {
        queue_us: micros(t.queue),
        time_to_first_token_us: micros(t.time_to_first_token),
        total_us: micros(t.total),
    }
}

pub(crate) fn model_info(m: &ModelInfo) -> proto::ModelInfo {
    proto::ModelInfo {
        id: m.id.clone(),
        architecture: m.architecture.clone(),
        quant_type: m.quant.clone(),
        context_length: m.context_length,
        instances: m.instances,
        state: match m.state {
            ModelState::Loading => proto::ModelState::Loading,
            ModelState::Warming => proto::ModelState::Warming,
            ModelState::Ready => proto::ModelState::Ready,
            ModelState::Failed => proto::ModelState::Failed,
        } as i32,
    }
}

pub(crate) fn node_state(s: NodeState) -> proto::NodeState {
    match s {
        NodeState::Loading => proto::NodeState::Loading,
        NodeState::Warming => proto::NodeState::Warming,
        NodeState::Ready => proto::NodeState::Ready,
        NodeState::Standby => proto::NodeState::Standby,
        NodeState::Draining => proto::NodeState::Draining,
    }
}

pub(crate) fn role(r: Role) -> proto::NodeRole {
    match r {
        Role::Active => proto::NodeRole::Active,
        Role::Standby => proto::NodeRole::Standby,
    }
}

/// The response of a finished unary call.
pub(crate) fn response(
    text: String,
    completion: &Completion,
    request_id: String,
) -> proto::GenerateResponse {
    proto::GenerateResponse {
        text,
        finish_reason: finish_reason(completion.finish_reason) as i32,
        usage: Some(usage(completion)),
        timings: Some(timings(&completion.timings)),
        cache_level: cache_level(completion.source) as i32,
        request_id,
    }
}

/// The last chunk of a stream.
pub(crate) fn last_chunk(completion: &Completion, request_id: String) -> proto::GenerateChunk {
    proto::GenerateChunk {
        text: String::new(),
        finish_reason: Some(finish_reason(completion.finish_reason) as i32),
        usage: Some(usage(completion)),
        timings: Some(timings(&completion.timings)),
        cache_level: cache_level(completion.source) as i32,
        request_id,
    }
}
