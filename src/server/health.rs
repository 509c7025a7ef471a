//! `grpc.health.v1.Health`, following the node's state and the backend's models:
//! - `qnode.v1.Inference`: SERVING while the node is ready (takes traffic) and a model is ready;
//! - `""` (the whole node): SERVING while it is ready or on standby (up, loaded and warm);
//! - `qnode.v1.Admin`: SERVING until draining starts.
//!
//! Everything turns NOT_SERVING when draining starts (set by `run`). The backend has no change
//! notification, so its models are polled; node state changes wake the follower at once.

use std::sync::Arc;
use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::proto::{admin_server, inference_server};
use crate::engine::{Backend, ModelState};
use crate::node::{Node, NodeState};

/// The three statuses: overall, Inference, Admin.
type Statuses = [ServingStatus; 3];

const SERVICES: [&str; 3] = [
    "",
    inference_server::SERVICE_NAME,
    admin_server::SERVICE_NAME,
];

/// Sets every status to `status`.
pub(crate) async fn set_all(reporter: &mut HealthReporter, status: ServingStatus) {
    set(reporter, [status; 3]).await;
}

async fn set(reporter: &mut HealthReporter, statuses: Statuses) {
    for (service, status) in SERVICES.iter().zip(statuses) {
        reporter.set_service_status(*service, status).await;
    }
}

/// Drops every status, which ends the `Watch` streams.
pub(crate) async fn clear_all(reporter: &mut HealthReporter) {
    for service in SERVICES {
        reporter.clear_service_status(service).await;
    }
}

fn serving(yes: bool) -> ServingStatus {
    if yes {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// What health says for a node in `state` whose backend has a ready model or not.
fn statuses(state: NodeState, model_ready: bool) -> Statuses {
    let up = matches!(state, NodeState::Ready | NodeState::Standby);
    [
        serving(up && model_ready),
        serving(state == NodeState::Ready && model_ready),
        serving(state != NodeState::Draining),
    ]
}

/// Follows the node and the backend until draining starts. Starts from everything NOT_SERVING,
/// which `run` sets before spawning it.
pub(crate) async fn follow(
    mut reporter: HealthReporter,
    node: Arc<Node>,
    backend: Arc<dyn Backend>,
    every: Duration,
) {
    let mut changes = node.subscribe();
    let mut last = [ServingStatus::NotServing; 3];
    loop {
        let state = node.state();
        if state == NodeState::Draining {
            return;
        }
        let model_ready = backend
            .models()
            .iter()
            .any(|m| m.state == ModelState::Ready);
        let now = statuses(state, model_ready);
        if now != last {
            tracing::info!(node = %state, inference = ?now[1], "health");
            set(&mut reporter, now).await;
            last = now;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ServingStatus::{NotServing as No, Serving as Yes};

    #[test]
    fn standby_is_up_but_takes_no_inference() {
        assert_eq!(statuses(NodeState::Standby, true), [Yes, No, Yes]);
        assert_eq!(statuses(NodeState::Ready, true), [Yes, Yes, Yes]);
        assert_eq!(statuses(NodeState::Ready, false), [No, No, Yes]);
        assert_eq!(statuses(NodeState::Warming, true), [No, No, Yes]);
        assert_eq!(statuses(NodeState::Draining, true), [No, No, No]);
    }
}
