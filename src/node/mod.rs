//! The node's lifecycle, shared by every front (gRPC, HTTP) and driven by `qnode serve` and the
//! Admin service.
//!
//! The state is a phase set by the process (loading → warming → up → draining) combined with a role
//! set by the operator (active or standby): an up node is [`NodeState::Ready`] when active and
//! [`NodeState::Standby`] otherwise. Activation only flips the role, so it is instant. Fronts call
//! [`Node::admit`] before every generation; it refuses with a retryable [`Refusal`] unless ready.

mod calls;
mod control;
mod models;
mod state;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus::IntGaugeVec;
use tokio::sync::watch;

use crate::metrics::Metrics;

pub use crate::types::Role;
pub use calls::CallGuard;
pub(crate) use calls::Calls;
pub use control::{ControlError, ModelControl, WarmupReport};
pub use models::NodeModels;
pub use state::{NodeState, Refusal, TransitionError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Loading,
    Warming,
    Up,
    Draining,
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    role: Role,
}

impl Inner {
    fn state(&self) -> NodeState {
        match (self.phase, self.role) {
            (Phase::Loading, _) => NodeState::Loading,
            (Phase::Warming, _) => NodeState::Warming,
            (Phase::Up, Role::Active) => NodeState::Ready,
            (Phase::Up, Role::Standby) => NodeState::Standby,
            (Phase::Draining, _) => NodeState::Draining,
        }
    }
}

/// One per process. See the module docs.
#[derive(Debug)]
pub struct Node {
    inner: Mutex<Inner>,
    state: watch::Sender<NodeState>,
    calls: Arc<Calls>,
    started: Instant,
    warm_after: OnceLock<Duration>,
    state_gauge: IntGaugeVec,
}

impl Node {
    /// A node that starts loading, with `role` once warm. Its in-flight count and state go to
    /// `metrics`.
    pub fn new(role: Role, metrics: &Metrics) -> Arc<Self> {
        let inner = Inner {
            phase: Phase::Loading,
            role,
        };
        let node = Arc::new(Self {
            state: watch::channel(inner.state()).0,
            inner: Mutex::new(inner),
            calls: Calls::new(metrics.in_flight.clone()),
            started: Instant::now(),
            warm_after: OnceLock::new(),
            state_gauge: metrics.node_state.clone(),
        });
        node.publish(&node.lock());
        node
    }

    /// A node that is warm already (tests, tools, benches that load their backend themselves).
    pub fn ready(metrics: &Metrics) -> Arc<Self> {
        let node = Self::new(Role::Active, metrics);
        node.warmed();
        node
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, inner: &Inner) {
        let state = inner.state();
        for s in NodeState::ALL {
            self.state_gauge
                .with_label_values(&[s.as_str()])
                .set(i64::from(s == state));
        }
        let changed = self.state.send_if_modified(|old| {
            let changed = *old != state;
            *old = state;
            changed
        });
        if changed {
            tracing::info!(state = %state, role = inner.role.as_str(), "node state");
        }
    }

    fn update(&self, change: impl FnOnce(&mut Inner)) -> NodeState {
        let mut inner = self.lock();
        change(&mut inner);
        self.publish(&inner);
        inner.state()
    }

    /// The state now.
    pub fn state(&self) -> NodeState {
        self.lock().state()
    }

    /// The role now.
    pub fn role(&self) -> Role {
        self.lock().role
    }

    /// Follows every state change.
    pub fn subscribe(&self) -> watch::Receiver<NodeState> {
        self.state.subscribe()
    }

    /// Models are loaded; warm-up begins.
    pub fn warming(&self) {
        self.update(|i| {
            if i.phase == Phase::Loading {
                i.phase = Phase::Warming;
            }
        });
    }

    /// Warm-up is done: ready or standby, by role. The first call records the start-to-warm time.
    pub fn warmed(&self) {
        self.update(|i| {
            if matches!(i.phase, Phase::Loading | Phase::Warming) {
                i.phase = Phase::Up;
            }
        });
        let _ = self.warm_after.set(self.started.elapsed());
    }

    /// Take traffic: instant when warm, otherwise as soon as warm-up ends.
    pub fn activate(&self) -> Result<NodeState, TransitionError> {
        self.set_role(Role::Active, "activate")
    }

    /// Take no new traffic but stay loaded and warm; in-flight calls finish.
    pub fn standby(&self) -> Result<NodeState, TransitionError> {
        self.set_role(Role::Standby, "put on standby")
    }

    fn set_role(&self, role: Role, action: &'static str) -> Result<NodeState, TransitionError> {
        let mut inner = self.lock();
        if inner.phase == Phase::Draining {
            return Err(TransitionError {
                action,
                state: NodeState::Draining,
            });
        }
        inner.role = role;
        self.publish(&inner);
        Ok(inner.state())
    }

    /// Stop taking new calls for good. Idempotent; whoever serves watches [`Node::drain_requested`].
    pub fn drain(&self) -> NodeState {
        self.update(|i| i.phase = Phase::Draining)
    }

    /// Resolves once [`Node::drain`] has been called.
    pub async fn drain_requested(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| *s == NodeState::Draining).await;
    }

    /// Admits one generation call, or says why not. The guard counts it as in flight.
    pub fn admit(&self) -> Result<CallGuard, Refusal> {
        // Count first, then check: a call that slips in while `drain` runs is either refused here
        // or seen by `wait_idle`, never lost.
        let guard = self.calls.enter();
        match Refusal::for_state(self.state()) {
            None => Ok(guard),
            Some(refusal) => Err(refusal),
        }
    }

    /// Generation calls running now.
    pub fn in_flight(&self) -> usize {
        self.calls.in_flight()
    }

    /// Resolves once no generation call is in flight.
    pub async fn wait_idle(&self) {
        self.calls.wait_idle().await;
    }

    /// Tells every call still running to give up (after the drain timeout).
    pub fn hard_stop(&self) {
        self.calls.hard_stop();
    }

    /// Resolves when [`Node::hard_stop`] has been called.
    pub async fn stopped(&self) {
        self.calls.stopped().await;
    }

    /// Time since the node was created (process start, near enough).
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Time from creation to the end of the first warm-up, once it ended.
    pub fn warm_after(&self) -> Option<Duration> {
        self.warm_after.get().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(role: Role) -> Arc<Node> {
        Node::new(role, &Metrics::new().unwrap())
    }

    #[test]
    fn walks_loading_warming_then_ready_or_standby_by_role() {
        let active = node(Role::Active);
        assert_eq!(active.state(), NodeState::Loading);
        active.warming();
        assert_eq!(active.state(), NodeState::Warming);
        assert!(active.warm_after().is_none());
        active.warmed();
        assert_eq!(active.state(), NodeState::Ready);
        assert!(active.warm_after().is_some());

        let standby = node(Role::Standby);
        standby.warming();
        standby.warmed();
        assert_eq!(standby.state(), NodeState::Standby);
        assert_eq!(standby.admit().unwrap_err(), Refusal::Standby);
        assert_eq!(standby.activate(), Ok(NodeState::Ready));
        assert!(standby.admit().is_ok());
        assert_eq!(standby.standby(), Ok(NodeState::Standby));
    }

    #[test]
    fn activation_during_warm_up_takes_effect_when_warm() {
        let n = node(Role::Standby);
        n.warming();
        assert_eq!(n.activate(), Ok(NodeState::Warming));
        assert_eq!(
            n.admit().unwrap_err(),
            Refusal::Starting(NodeState::Warming)
        );
        n.warmed();
        assert_eq!(n.state(), NodeState::Ready);
    }

    #[test]
    fn draining_is_final_and_refuses_role_changes() {
        let n = node(Role::Active);
        n.warmed();
        n.drain();
        assert_eq!(n.admit().unwrap_err(), Refusal::Draining);
        assert_eq!(
            n.activate(),
            Err(TransitionError {
                action: "activate",
                state: NodeState::Draining
            })
        );
        n.warmed();
        assert_eq!(n.state(), NodeState::Draining);
    }

    #[test]
    fn state_gauge_marks_the_current_state_only() {
        let metrics = Metrics::new().unwrap();
        let n = Node::new(Role::Standby, &metrics);
        n.warmed();
        let gauge = |s: &str| metrics.node_state.with_label_values(&[s]).get();
        assert_eq!(gauge("standby"), 1);
        assert_eq!(gauge("loading"), 0);
        assert_eq!(gauge("ready"), 0);
    }

    #[tokio::test]
    async fn refused_calls_leave_no_count_and_idle_waits_for_admitted_ones() {
        let n = node(Role::Active);
        n.warmed();
        let guard = n.admit().unwrap();
        n.drain();
        assert!(n.admit().is_err());
        assert_eq!(n.in_flight(), 1);
        let waiter = tokio::spawn({
            let n = Arc::clone(&n);
            async move { n.wait_idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(guard);
        waiter.await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), n.drain_requested())
            .await
            .unwrap();
    }
}
