//! Optional API key: `authorization: Bearer <key>`, checked the same way by both fronts (gRPC
//! metadata, HTTP header); each front decides which routes it guards (health, reflection and
//! readiness stay open, so load balancers and `grpcurl list` work without a key).
//!
//! Both keys are hashed before the constant-time compare, so neither the bytes nor the length of
//! the configured key leak through timing. The key is never logged.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::types::ErrorKind;

/// Interceptor that checks the bearer token when a key is configured, and passes all calls when not.
#[derive(Clone)]
pub struct ApiKeyCheck {
    expected: Option<[u8; 32]>,
}

impl ApiKeyCheck {
    /// `None` turns the check off.
    pub fn new(api_key: Option<&str>) -> Self {
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
pub enum AuthError {
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
    pub fn check(&self, authorization: Option<&str>) -> Result<(), AuthError> {
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

impl AuthError {
    /// Always [`ErrorKind::Unauthenticated`].
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Unauthenticated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_when_no_key_is_configured() {
        assert_eq!(ApiKeyCheck::new(None).check(None), Ok(()));
    }

    #[test]
    fn checks_the_bearer_token() {
        let check = ApiKeyCheck::new(Some("s3cret"));
        assert_eq!(check.check(Some("Bearer s3cret")), Ok(()));
        assert_eq!(check.check(None), Err(AuthError::Missing));
        assert_eq!(check.check(Some("s3cret")), Err(AuthError::Missing));
        for bad in ["Bearer s3cre", "Bearer s3cret2"] {
            assert_eq!(check.check(Some(bad)), Err(AuthError::Invalid), "{bad:?}");
        }
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let text = format!("{:?}", ApiKeyCheck::new(Some("s3cret")));
        assert!(!text.contains("s3cret"), "{text}");
    }
}
