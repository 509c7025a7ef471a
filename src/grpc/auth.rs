//! The front's bearer-key check ([`ApiKeyCheck`]) as a tonic interceptor on `authorization`
//! metadata. Health and reflection are not wrapped, so load balancers and `grpcurl list` work
//! without a key.

// `tonic::Status` (176 bytes) is what interceptors return.
#![allow(clippy::result_large_err)]

use tonic::{Request, Status};

use super::status::status;
use crate::front::ApiKeyCheck;

/// Refuses calls without a configured key (UNAUTHENTICATED); passes all when none is set. The
/// key's tenant goes on as a [`KeyTenant`](crate::front::KeyTenant) request extension.
#[derive(Debug, Clone)]
pub(crate) struct GrpcAuth(pub(crate) ApiKeyCheck);

impl tonic::service::Interceptor for GrpcAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let tenant = self.0.check(header).map_err(status)?;
        request.extensions_mut().insert(tenant);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn with_auth(value: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = value {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    }

    #[test]
    fn off_when_no_key_is_configured() {
        assert!(GrpcAuth(ApiKeyCheck::new(None))
            .call(with_auth(None))
            .is_ok());
    }

    #[test]
    fn checks_the_bearer_token() {
        let mut check = GrpcAuth(ApiKeyCheck::new(Some("s3cret")));
        assert!(check.call(with_auth(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("s3cret"),
            Some("Bearer s3cret2"),
        ] {
            let status = check.call(with_auth(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
            assert!(!status.message().contains("s3cret"));
        }
    }
}
