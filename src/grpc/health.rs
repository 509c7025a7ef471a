//! `grpc.health.v1.Health`, following the node's [`Readiness`] (decided by the front, the same
//! that HTTP `/ready` reports):
//! - `qnode.v1.Inference`: SERVING while the node is ready (takes traffic) and a model is ready;
//! - `""` (the whole node): SERVING while it is ready or on standby (up, loaded and warm);
//! - `qnode.v1.Admin`: SERVING until draining starts.
//!
//! Everything turns NOT_SERVING when draining starts (set by `run`). The backend has no change
//! notification, so its models are polled; node state changes wake the follower at once.

use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::proto::{admin_server, inference_server};
use crate::front::{Front, Readiness};
use crate::node::NodeState;

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

/// What health says for a node that is `readiness`.
fn statuses(readiness: Readiness) -> Statuses {
    [
        serving(readiness.up()),
        serving(readiness.serving()),
        serving(readiness.state != NodeState::Draining),
    ]
}

/// Follows the node and the backend until draining starts. Starts from everything NOT_SERVING,
/// which `run` sets before spawning it.
pub(crate) async fn follow(mut reporter: HealthReporter, front: Front, every: Duration) {
    let mut changes = front.node().subscribe();
    let mut last = [ServingStatus::NotServing; 3];
    loop {
        let readiness = front.readiness();
        let state = readiness.state;
        if state == NodeState::Draining {
            return;
        }
        let now = statuses(readiness);
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

    fn of(state: NodeState, model_ready: bool) -> Statuses {
        statuses(Readiness {
            state,
            models_ready: usize::from(model_ready),
        })
    }

    #[test]
    fn standby_is_up_but_takes_no_inference() {
        assert_eq!(of(NodeState::Standby, true), [Yes, No, Yes]);
        assert_eq!(of(NodeState::Ready, true), [Yes, Yes, Yes]);
        assert_eq!(of(NodeState::Ready, false), [No, No, Yes]);
        assert_eq!(of(NodeState::Warming, true), [No, No, Yes]);
        assert_eq!(of(NodeState::Draining, true), [No, No, No]);
    }
}
