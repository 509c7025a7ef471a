//! The `qnode.v1.Admin` service: node lifecycle (status, activate, standby, drain) and, when the
//! node gives a [`ModelControl`], models loaded and warmed at run time.

// `tonic::Status` (176 bytes) is what handlers return; boxing it would only add conversions.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::admin_server::Admin;
use super::status::status;
use super::{convert, proto};
use crate::config::{ModelOverrides, Quant};
use crate::front::Front;
use crate::node::{ControlError, ModelControl};

/// Most instances a LoadModel may ask for.
const MAX_INSTANCES: u32 = 64;
/// Largest batch a LoadModel may ask for.
const MAX_BATCH: u32 = 256;

/// Implements the service over the node (through the front) and its model control.
pub(crate) struct AdminService {
    pub(crate) front: Front,
    pub(crate) models: Option<Arc<dyn ModelControl>>,
}

impl AdminService {
    fn status(&self) -> proto::NodeStatusResponse {
        let node = self.front.node();
        proto::NodeStatusResponse {
            state: convert::node_state(node.state()) as i32,
            role: convert::role(node.role()) as i32,
            models: self
                .front
                .models()
                .iter()
                .map(convert::model_info)
                .collect(),
            in_flight: u32::try_from(node.in_flight()).unwrap_or(u32::MAX),
            uptime_ms: millis(node.uptime()),
            warm_after_ms: node.warm_after().map_or(0, millis),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    fn control(&self) -> Result<&Arc<dyn ModelControl>, Status> {
        self.models
            .as_ref()
            .ok_or_else(|| Status::unimplemented("this server was started without model control"))
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A LoadModel request as the model id and the fields it sets, checked. Unset fields keep the
/// node's defaults and flags (resolved by the model control).
fn model_overrides(
    request: proto::LoadModelRequest,
) -> Result<(String, ModelOverrides), ControlError> {
    let invalid = |field, constraint: &str, value: String| ControlError::InvalidArgument {
        field,
        constraint: constraint.to_string(),
        value,
    };
    if request.id.is_empty() {
        return Err(invalid("id", "non-empty", "\"\"".into()));
    }
    let mut set = ModelOverrides::default();
    if let Some(n) = request.instances {
        if !(1..=MAX_INSTANCES).contains(&n) {
            return Err(invalid(
                "instances",
                &format!("in 1..={MAX_INSTANCES}"),
                n.to_string(),
            ));
        }
        set.instances = Some(n as usize);
    }
    if let Some(n) = request.threads_per_instance {
        if n == 0 {
            return Err(invalid("threads_per_instance", ">= 1", n.to_string()));
        }
        set.threads_per_instance = Some(n as usize);
    }
    if let Some(n) = request.max_batch {
        if !(1..=MAX_BATCH).contains(&n) {
            return Err(invalid(
                "max_batch",
                &format!("in 1..={MAX_BATCH}"),
                n.to_string(),
            ));
        }
        set.max_batch = Some(n as usize);
    }
    if let Some(n) = request.context_length {
        if n == 0 {
            return Err(invalid("context_length", ">= 1", n.to_string()));
        }
        set.context_length = Some(n);
    }
    set.quant = match request.quant.as_str() {
        "" => None,
        name => Some(
            name.parse::<Quant>()
                .map_err(|_| invalid("quant", "`q8_0` or `original`", format!("{name:?}")))?,
        ),
    };
    Ok((request.id, set))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn node_status(
        &self,
        _request: Request<proto::NodeStatusRequest>,
    ) -> Result<Response<proto::NodeStatusResponse>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn activate(
        &self,
        _request: Request<proto::ActivateRequest>,
    ) -> Result<Response<proto::NodeStatusResponse>, Status> {
        self.front.node().activate().map_err(status)?;
        Ok(Response::new(self.status()))
    }

    async fn standby(
        &self,
        _request: Request<proto::StandbyRequest>,
    ) -> Result<Response<proto::NodeStatusResponse>, Status> {
        self.front.node().standby().map_err(status)?;
        Ok(Response::new(self.status()))
    }

    async fn drain(
        &self,
        _request: Request<proto::DrainRequest>,
    ) -> Result<Response<proto::NodeStatusResponse>, Status> {
        self.front.node().drain();
        Ok(Response::new(self.status()))
    }

    async fn load_model(
        &self,
        request: Request<proto::LoadModelRequest>,
    ) -> Result<Response<proto::ModelInfo>, Status> {
        let control = self.control()?;
        let (id, overrides) = model_overrides(request.into_inner()).map_err(status)?;
        let info = control.load_model(id, overrides).await.map_err(status)?;
        Ok(Response::new(convert::model_info(&info)))
    }

    async fn unload_model(
        &self,
        request: Request<proto::UnloadModelRequest>,
    ) -> Result<Response<proto::UnloadModelResponse>, Status> {
        let control = self.control()?;
        let refused = control
            .unload_model(&request.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::UnloadModelResponse {
            refused_queued: u32::try_from(refused).unwrap_or(u32::MAX),
        }))
    }

    async fn warmup(
        &self,
        request: Request<proto::WarmupRequest>,
    ) -> Result<Response<proto::WarmupResponse>, Status> {
        let control = self.control()?;
        let request = request.into_inner();
        let report = control
            .warm_up(&request.models, request.hot_answers as usize)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::WarmupResponse {
            generations: u32::try_from(report.generations).unwrap_or(u32::MAX),
            hot_answers_loaded: u32::try_from(report.hot_answers_loaded).unwrap_or(u32::MAX),
            elapsed_us: u64::try_from(report.elapsed.as_micros()).unwrap_or(u64::MAX),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_model_fields_are_checked_and_named() {
        let bad = |r: proto::LoadModelRequest| model_overrides(r).unwrap_err().to_string();
        let base = || proto::LoadModelRequest {
            id: "smollm2".into(),
            ..Default::default()
        };
        assert!(bad(proto::LoadModelRequest::default()).contains("`id`"));
        assert!(bad(proto::LoadModelRequest {
            instances: Some(0),
            ..base()
        })
        .contains("`instances` must be in 1..=64. Given: 0"));
        assert!(bad(proto::LoadModelRequest {
            quant: "q4".into(),
            ..base()
        })
        .contains("`quant`"));
        let (id, set) = model_overrides(proto::LoadModelRequest {
            instances: Some(2),
            max_batch: Some(4),
            quant: "original".into(),
            ..base()
        })
        .unwrap();
        assert_eq!(id, "smollm2");
        assert_eq!(
            (set.instances, set.max_batch, set.quant, set.max_queued),
            (Some(2), Some(4), Some(Quant::Original), None)
        );
        // Unset fields come from the node's flags, the request's fields win over them.
        let node = crate::config::ModelOverrides {
            max_batch: Some(16),
            max_queued: Some(3),
            kv_cache_mb: Some(0),
            ..Default::default()
        };
        let model =
            crate::config::ModelConfig::resolve(crate::config::ModelConfig::new(id), &node, &set);
        assert_eq!(
            (
                model.instances,
                model.max_batch,
                model.max_queued,
                model.kv_cache_mb
            ),
            (2, 4, 3, 0)
        );
    }
}
