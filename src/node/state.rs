//! The node's lifecycle states and why a call or a transition was refused.

use crate::types::ErrorKind;

/// Lifecycle of the node: loading → warming → ready or standby → draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Models being read.
    Loading,
    /// Models loaded; warm-up generations and the hot-answer preload running.
    Warming,
    /// Taking traffic.
    Ready,
    /// Loaded and warm, taking no traffic until activated.
    Standby,
    /// Finishing in-flight calls; the process exits when they are done.
    Draining,
}

impl NodeState {
    /// Every state, for metrics.
    pub const ALL: [NodeState; 5] = [
        NodeState::Loading,
        NodeState::Warming,
        NodeState::Ready,
        NodeState::Standby,
        NodeState::Draining,
    ];

    /// Lower-case name, as in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Loading => "loading",
            NodeState::Warming => "warming",
            NodeState::Ready => "ready",
            NodeState::Standby => "standby",
            NodeState::Draining => "draining",
        }
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the node takes no new call now. Every variant is retryable on another node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Loading or warming.
    #[error("node is {0}: models are not ready yet; retry on another node")]
    Starting(NodeState),
    /// Standby role.
    #[error("node is on standby and takes no traffic until activated; retry on another node")]
    Standby,
    /// Draining.
    #[error("node is draining and takes no new requests; retry on another node")]
    Draining,
}

impl Refusal {
    /// The refusal for a node in `state`, or `None` when it takes traffic.
    pub fn for_state(state: NodeState) -> Option<Self> {
        match state {
            NodeState::Ready => None,
            NodeState::Loading | NodeState::Warming => Some(Refusal::Starting(state)),
            NodeState::Standby => Some(Refusal::Standby),
            NodeState::Draining => Some(Refusal::Draining),
        }
    }

    /// Always [`ErrorKind::Unavailable`]: another node may take the call.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Unavailable
    }

    /// `node_starting`, `node_standby` or `node_draining`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Starting(_) => "node_starting",
            Refusal::Standby => "node_standby",
            Refusal::Draining => "node_draining",
        }
    }
}

/// An Admin transition the node's state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a node that is {state}")]
pub struct TransitionError {
    /// What was asked, e.g. `activate`.
    pub action: &'static str,
    /// The node's state when asked.
    pub state: NodeState,
}

impl TransitionError {
    /// Always [`ErrorKind::FailedPrecondition`]: the node's state forbids it.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::FailedPrecondition
    }
}
