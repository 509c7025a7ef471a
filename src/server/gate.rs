//! Refuses generation calls with **HTTP 503** while the node takes no traffic (loading, warming,
//! standby, draining), before the call reaches the Inference service.
//!
//! Why not let the handler answer: its refusal is a gRPC UNAVAILABLE sent as HTTP 200 with a
//! `grpc-status` header, and HTTP proxies cannot see gRPC statuses. A 503 is the same gRPC status
//! to a gRPC client (`grpc-status: 14` and `grpc-message` are set, Trailers-Only), but nginx's
//! `grpc_next_upstream http_503` (Envoy's `retry_on: 5xx`, HAProxy's `retry-on 503`) now resends
//! the call to another node by itself, so a standby node can sit in the balancer's upstream and a
//! draining node's refusals never reach the callers. Nothing of the call has run: resending it is
//! safe whatever the method.
//!
//! Only `Generate` and `GenerateStream` are gated; `ListModels` (which reports the node's state)
//! passes. The handler still admits each call itself ([`Node::admit`]): a state change between
//! this check and the handler gives the handler's HTTP-200 UNAVAILABLE, which clients retry too.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::BoxBody;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

use crate::node::{Node, Refusal};

/// Seconds a refused caller should wait before asking this node again (`retry-after`): about the
/// time an activation or a restart takes. Another node can be asked at once.
const RETRY_AFTER_SECS: &str = "1";

/// Paths of the gated methods.
const GATED: [&str; 2] = [
    "/qnode.v1.Inference/Generate",
    "/qnode.v1.Inference/GenerateStream",
];

/// Wraps the Inference service; see the module docs.
#[derive(Clone)]
pub(crate) struct Gate<S> {
    inner: S,
    node: Arc<Node>,
}

impl<S> Gate<S> {
    /// Gates `inner`'s generation calls on `node`'s state.
    pub(crate) fn new(inner: S, node: Arc<Node>) -> Self {
        Self { inner, node }
    }
}

/// The 503 answer for `refusal`: a Trailers-Only gRPC UNAVAILABLE with `:status 503` and
/// `retry-after`.
fn refused(refusal: Refusal) -> http::Response<BoxBody> {
    let mut response = Status::from(refusal).into_http();
    *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    response.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    response
}

impl<S, B> Service<http::Request<B>> for Gate<S>
where
    S: Service<http::Request<B>, Response = http::Response<BoxBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if GATED.contains(&request.uri().path()) {
            if let Some(refusal) = Refusal::for_state(self.node.state()) {
                return Box::pin(std::future::ready(Ok(refused(refusal))));
            }
        }
        let call = self.inner.call(request);
        Box::pin(async move { call.await.map_err(|e| match e {}) })
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::node::Role;

    /// Stands in for the Inference service: answers 200 and counts calls.
    #[derive(Clone, Default)]
    struct Inner(Arc<std::sync::atomic::AtomicUsize>);

    impl Service<http::Request<()>> for Inner {
        type Response = http::Response<BoxBody>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Infallible>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Ok(http::Response::new(tonic::body::empty_body())) })
        }
    }

    async fn call(gate: &mut Gate<Inner>, path: &str) -> http::Response<BoxBody> {
        let request = http::Request::builder().uri(path).body(()).unwrap();
        gate.call(request).await.unwrap()
    }

    fn gate(role: Role) -> (Gate<Inner>, Arc<Node>, Inner) {
        let node = Node::new(role, &Metrics::new().unwrap());
        let inner = Inner::default();
        (Gate::new(inner.clone(), Arc::clone(&node)), node, inner)
    }

    fn calls(inner: &Inner) -> usize {
        inner.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test]
    async fn standby_refuses_generation_with_503_and_grpc_unavailable() {
        let (mut gate, node, inner) = gate(Role::Standby);
        node.warmed();
        for path in GATED {
            let response = call(&mut gate, path).await;
            assert_eq!(response.status(), http::StatusCode::SERVICE_UNAVAILABLE);
            let h = response.headers();
            assert_eq!(h["content-type"], "application/grpc");
            assert_eq!(h["grpc-status"], "14");
            assert_eq!(h["retry-after"], RETRY_AFTER_SECS);
            let message = h["grpc-message"].to_str().unwrap();
            assert!(message.contains("standby"), "{message}");
        }
        assert_eq!(calls(&inner), 0);
    }

    #[tokio::test]
    async fn list_models_and_other_services_pass_while_refusing() {
        let (mut gate, _node, inner) = gate(Role::Standby);
        for path in [
            "/qnode.v1.Inference/ListModels",
            "/qnode.v1.Admin/Activate",
            "/qnode.v1.Inference/GenerateX",
        ] {
            assert_eq!(call(&mut gate, path).await.status(), http::StatusCode::OK);
        }
        assert_eq!(calls(&inner), 3);
    }

    #[tokio::test]
    async fn follows_the_node_state() {
        let (mut gate, node, inner) = gate(Role::Active);
        // Loading, then warming: refused.
        let path = "/qnode.v1.Inference/Generate";
        assert_eq!(call(&mut gate, path).await.status(), 503);
        node.warming();
        assert_eq!(call(&mut gate, path).await.status(), 503);
        node.warmed();
        assert_eq!(call(&mut gate, path).await.status(), http::StatusCode::OK);
        node.drain();
        let response = call(&mut gate, path).await;
        assert_eq!(response.status(), 503);
        assert!(response.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .contains("draining"));
        assert_eq!(calls(&inner), 1);
    }
}
