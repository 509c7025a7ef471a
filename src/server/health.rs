//! `grpc.health.v1.Health`: NOT_SERVING until every model the backend lists is Ready, SERVING
//! while they are, NOT_SERVING again once draining starts (set by `run`).
//!
//! The backend has no change notification, so its model list is polled; `models()` is a cheap
//! snapshot by contract.

use std::sync::Arc;
use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::proto::inference_server::SERVICE_NAME;
use crate::engine::{Backend, ModelState};

/// Sets the overall (`""`) and `qnode.v1.Inference` statuses together.
pub(crate) async fn set(reporter: &mut HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

/// Follows the backend's model states forever; `run` aborts it when draining starts.
/// Starts from NOT_SERVING, which `run` sets before spawning it.
pub(crate) async fn follow_backend(
    mut reporter: HealthReporter,
    backend: Arc<dyn Backend>,
    every: Duration,
) {
    // `run` has set NOT_SERVING already; tonic-health notifies watchers even of an unchanged value.
    let mut last = Some(ServingStatus::NotServing);
    loop {
        let models = backend.models();
        let ready = !models.is_empty() && models.iter().all(|m| m.state == ModelState::Ready);
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            tracing::info!(?status, "health");
            set(&mut reporter, status).await;
            last = Some(status);
        }
        tokio::time::sleep(every).await;
    }
}
