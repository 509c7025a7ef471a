//! Optional API key on the Inference service: `authorization: Bearer <key>`.
//!
//! Health and reflection are not wrapped, so load balancers and `grpcurl list` work without it.
//! Both keys are hashed before the constant-time compare, so neither the bytes nor the length of
//! the configured key leak through timing. The key is never logged.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// Interceptor that checks the bearer token when a key is configured, and passes all calls when not.
#[derive(Clone)]
pub(crate) struct ApiKeyCheck {
    expected: Option<[u8; 32]>,
}

impl ApiKeyCheck {
    /// `None` turns the check off.
    pub(crate) fn new(api_key: Option<&str>) -> Self {
        Self {
            expected: api_key.map(|key| Sha256::digest(key.as_bytes()).into()),
        }
    }
}

impl std::fmt::Debug for ApiKeyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyCheck")
            .field("enabled", &self.expected.is_some())
            .finish()
    }
}

/// Why a call's credentials were refused; front-agnostic (gRPC metadata, HTTP header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    /// No `authorization: Bearer <key>` at all.
    #[error("missing `authorization: Bearer <key>`")]
    Missing,
    /// A bearer key that is not the configured one.
    #[error("invalid API key")]
    Invalid,
}

impl ApiKeyCheck {
    /// Checks the value of the `authorization` header (or metadata), `None` when absent. Passes
    /// everything when no key is configured.
    pub(crate) fn check(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        let Some(expected) = &self.expected else {
            return Ok(());
        };
        let given = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(AuthError::Missing)?;
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        if bool::from(given.ct_eq(expected)) {
            Ok(())
        } else {
            Err(AuthError::Invalid)
        }
    }
}

impl tonic::service::Interceptor for ApiKeyCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match self.check(header) {
            Ok(()) => Ok(request),
            Err(AuthError::Missing) => Err(Status::unauthenticated(
                "missing `authorization: Bearer <key>` metadata",
            )),
            Err(e @ AuthError::Invalid) => Err(Status::unauthenticated(e.to_string())),
        }
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
        assert!(ApiKeyCheck::new(None).call(with_auth(None)).is_ok());
    }

    #[test]
    fn checks_the_bearer_token() {
        let mut check = ApiKeyCheck::new(Some("s3cret"));
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

    #[test]
    fn debug_does_not_print_the_key() {
        let text = format!("{:?}", ApiKeyCheck::new(Some("s3cret")));
        assert!(!text.contains("s3cret"), "{text}");
    }
}
