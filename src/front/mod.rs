//! What both fronts share: the neutral request, validation, auth, the error shape and the call
//! loop. The gRPC front (`grpc`) and the OpenAI HTTP front (`http`) only translate their wire
//! format to a [`RawRequest`] + [`CallMeta`], call [`Front::begin`], and spell what comes back
//! (events, a [`FrontError`]) in their own format. Knows no tonic or axum type.
//!
//! # Layout
//! - [`request`]: [`RawRequest`] (the caller's fields, unchecked) and [`CallMeta`] (id, tenant,
//!   deadline, method).
//! - [`validate`]: `RawRequest` → [`GenerationRequest`](crate::types::GenerationRequest), the only
//!   place inputs are checked.
//! - [`call`]: one admitted call ([`Call`]) and the loops that read its events: [`collect`]
//!   (unary) and [`forward`] (streaming, spelled by a [`StreamFront`]).
//! - [`error`]: [`FrontError`], every domain error gathered with its [`ErrorKind`].
//! - [`auth`]: the bearer-key check both fronts apply.

pub mod auth;
pub mod call;
pub mod error;
pub mod request;
pub mod validate;

use std::sync::Arc;

use crate::config::Limits;
use crate::engine::{Backend, EventStream};
use crate::metrics::Metrics;
use crate::node::{Node, NodeState};
use crate::types::{ModelInfo, ModelState};

pub use crate::types::ErrorKind;
pub use auth::{ApiKeyCheck, AuthError, KeyTenant};
pub use call::{collect, forward, Answer, Call, Step, StreamFront};
pub use error::FrontError;
pub use request::{header_text, CallMeta, RawRequest, WireToolChoice};
pub use validate::{ValidationError, SESSION_HEADER};

/// Metadata key (gRPC) and header (HTTP) naming the caller's tenant; answers are never shared
/// across tenants.
pub const TENANT_HEADER: &str = "x-qnode-tenant";

/// A fresh request id: 32 hex digits.
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The node as both fronts see it: where generations go, the lifecycle that admits them, the
/// limits they are checked against and the metrics they are counted in. Cheap to clone.
#[derive(Clone)]
pub struct Front {
    backend: Arc<dyn Backend>,
    node: Arc<Node>,
    limits: Limits,
    metrics: Metrics,
}

impl Front {
    /// Fronts over `backend`, admitted by `node`.
    pub fn new(
        backend: Arc<dyn Backend>,
        node: Arc<Node>,
        limits: Limits,
        metrics: Metrics,
    ) -> Self {
        Self {
            backend,
            node,
            limits,
            metrics,
        }
    }

    /// The node's lifecycle.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Where generations go (the cache over the pool).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The models served now.
    pub fn models(&self) -> Vec<ModelInfo> {
        self.backend.models()
    }

    /// Whether the node takes traffic, decided here once for gRPC health and HTTP `/ready`.
    pub fn readiness(&self) -> Readiness {
        let models_ready = self
            .backend
            .models()
            .iter()
            .filter(|m| m.state == ModelState::Ready)
            .count();
        Readiness {
            state: self.node.state(),
            models_ready,
        }
    }

    /// The opening steps of every generation call, for both fronts: admit (the node's
    /// lifecycle), open the [`Call`] (id, span, metric labels), validate, submit. A refusal after
    /// admission is logged and counted here; one at admission is not (the node said no before
    /// the call existed).
    pub async fn begin(
        &self,
        meta: CallMeta,
        raw: RawRequest,
    ) -> Result<(Call, EventStream), FrontError> {
        let guard = self.node.admit()?;
        let models = self.backend.models();
        let request_id = meta.request_id.unwrap_or_else(new_request_id);
        let call = Call::new(
            guard,
            meta.arrival,
            meta.deadline.clone().ok().flatten(),
            request_id.clone(),
            &raw.model,
            &models,
            meta.method,
            self.metrics.clone(),
        );
        let validated = meta.deadline.and_then(|deadline| {
            let caller = validate::Caller {
                request_id,
                deadline,
                tenant: meta.tenant,
                key_tenant: meta.key_tenant,
                session: meta.session,
            };
            validate::validate(raw, &models, &self.limits, caller).map_err(FrontError::from)
        });
        let submitted = match validated {
            Ok(request) => {
                use tracing::Instrument;
                let submit = self.backend.submit(request).instrument(call.span().clone());
                call::submitted(&call, &self.node, submit)
                    .await
                    .map_err(FrontError::from)
            }
            Err(e) => Err(e),
        };
        match submitted {
            Ok(events) => Ok((call, events)),
            Err(error) => {
                call.refused(&error);
                Err(error)
            }
        }
    }
}

/// The node's readiness at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// The node's lifecycle state.
    pub state: NodeState,
    /// Models ready to serve.
    pub models_ready: usize,
}

impl Readiness {
    /// Takes generation calls now: the node is ready and a model is.
    pub fn serving(&self) -> bool {
        self.state == NodeState::Ready && self.models_ready > 0
    }

    /// Up, loaded and warm, whether taking traffic or on standby.
    pub fn up(&self) -> bool {
        matches!(self.state, NodeState::Ready | NodeState::Standby) && self.models_ready > 0
    }
}
