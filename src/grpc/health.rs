//! `grpc.health.v1.Health` (`Check`, `Watch` and `List`), following the node's [`Readiness`]
//! (decided by the front, the same that HTTP `/ready` reports):
//! - `qnode.v1.Inference`: SERVING while the node is ready (takes traffic) and a model is ready;
//! - `""` (the whole node): SERVING while it is ready or on standby (up, loaded and warm);
//! - `qnode.v1.Admin`: SERVING until draining starts.
//!
//! Everything turns NOT_SERVING when draining starts (set by `run`), then the statuses are
//! cleared, which ends the `Watch` streams. The backend has no change notification, so its models
//! are polled; node state changes wake the follower at once.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::proto::health::health_check_response::ServingStatus;
use super::proto::health::health_server::{Health, HealthServer};
use super::proto::health::{
    HealthCheckRequest, HealthCheckResponse, HealthListRequest, HealthListResponse,
};
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

/// What the service reports; `None` once cleared (the node is going away).
type Shared = watch::Sender<Option<Statuses>>;

/// Sets the statuses the health service reports.
#[derive(Clone)]
pub(crate) struct Reporter(Shared);

/// The health service and its reporter, everything NOT_SERVING.
pub(crate) fn service() -> (Reporter, HealthServer<HealthService>) {
    let (tx, _) = watch::channel(Some([ServingStatus::NotServing; 3]));
    (Reporter(tx.clone()), HealthServer::new(HealthService(tx)))
}

impl Reporter {
    /// Sets every status to `status`.
    pub(crate) fn set_all(&self, status: ServingStatus) {
        self.set([status; 3]);
    }

    fn set(&self, statuses: Statuses) {
        self.0.send_replace(Some(statuses));
    }

    /// Drops every status, which ends the `Watch` streams.
    pub(crate) fn clear_all(&self) {
        self.0.send_replace(None);
    }
}

/// The `grpc.health.v1.Health` implementation over the reporter's statuses.
pub(crate) struct HealthService(Shared);

fn status_of(statuses: Option<Statuses>, service: &str) -> Option<ServingStatus> {
    let statuses = statuses?;
    SERVICES
        .iter()
        .position(|s| *s == service)
        .map(|i| statuses[i])
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        match status_of(*self.0.borrow(), &service) {
            Some(status) => Ok(Response::new(response(status))),
            None => Err(Status::not_found(format!(
                "unknown service {:?}; this node reports \"\", {} and {}",
                crate::types::echo(&service),
                SERVICES[1],
                SERVICES[2]
            ))),
        }
    }

    async fn list(
        &self,
        _request: Request<HealthListRequest>,
    ) -> Result<Response<HealthListResponse>, Status> {
        let statuses = match *self.0.borrow() {
            Some(statuses) => SERVICES
                .iter()
                .zip(statuses)
                .map(|(name, status)| (name.to_string(), response(status)))
                .collect(),
            None => HashMap::new(),
        };
        Ok(Response::new(HealthListResponse { statuses }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let rx = self.0.subscribe();
        // The status now, then each change of it. Cleared statuses (the node is going away)
        // end the stream, NOT_SERVING first if the watcher has not seen it: a set and a clear
        // in quick succession reach a watch channel's reader as the clear alone.
        let stream = futures::stream::unfold(Some((rx, None)), move |state| {
            let service = service.clone();
            async move {
                let (mut rx, last) = state?;
                let mut first = last.is_none();
                loop {
                    if !first && rx.changed().await.is_err() {
                        return None;
                    }
                    first = false;
                    let now = *rx.borrow_and_update();
                    let Some(statuses) = now else {
                        let gone = ServingStatus::NotServing;
                        return (last.is_some() && last != Some(gone))
                            .then(|| (Ok(response(gone)), None));
                    };
                    let status = status_of(Some(statuses), &service)
                        .unwrap_or(ServingStatus::ServiceUnknown);
                    if last != Some(status) {
                        return Some((Ok(response(status)), Some((rx, Some(status)))));
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
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
pub(crate) async fn follow(reporter: Reporter, front: Front, every: Duration) {
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
            reporter.set(now);
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

    #[test]
    fn unknown_services_are_none_and_cleared_is_none() {
        let all = Some([Yes, No, Yes]);
        assert_eq!(status_of(all, ""), Some(Yes));
        assert_eq!(status_of(all, "qnode.v1.Inference"), Some(No));
        assert_eq!(status_of(all, "nope"), None);
        assert_eq!(status_of(None, ""), None);
    }
}
