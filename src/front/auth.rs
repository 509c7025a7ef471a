//! Optional API key: `authorization: Bearer <key>`, checked the same way by both fronts (gRPC
//! metadata, HTTP header); each front decides which routes it guards (health, reflection and
//! readiness stay open, so load balancers and `grpcurl list` work without a key).
//!
//! A key may be bound to a tenant (`server.api_keys` as key → tenant): the check then returns
//! that tenant, which the front passes on as [`KeyTenant`] so validation can hold the caller to it.
//!
//! Keys are hashed before the constant-time compare, so neither the bytes nor the length of a
//! configured key leak through timing, and every configured key is compared on every call. Keys
//! are never logged.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ApiKeys;
use crate::types::ErrorKind;

/// The tenant the caller's API key is bound to (`None`: an unbound key, or no auth); the fronts
/// carry it from their auth step to the call as a request extension.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyTenant(pub Option<String>);

/// Checks the bearer token when keys are configured, and passes all calls when not.
#[derive(Clone)]
pub struct ApiKeyCheck {
    keys: Vec<([u8; 32], Option<String>)>,
}

impl ApiKeyCheck {
    /// One key, bound to no tenant; `None` turns the check off.
    pub fn new(api_key: Option<&str>) -> Self {
        Self::with_keys(api_key, &ApiKeys::default())
    }

    /// `api_key` (bound to no tenant) and `keys`; none at all turns the check off.
    pub fn with_keys(api_key: Option<&str>, keys: &ApiKeys) -> Self {
        let hash = |key: &str| -> [u8; 32] { Sha256::digest(key.as_bytes()).into() };
        let keys = api_key
            .map(|key| (hash(key), None))
            .into_iter()
            .chain(keys.0.iter().map(|k| (hash(&k.key), k.tenant.clone())))
            .collect();
        Self { keys }
    }
}

impl std::fmt::Debug for ApiKeyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyCheck")
            .field("keys", &self.keys.len())
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
    /// Checks the value of the `authorization` header (or metadata), `None` when absent, and
    /// returns the tenant the key is bound to. Passes everything when no key is configured.
    pub fn check(&self, authorization: Option<&str>) -> Result<KeyTenant, AuthError> {
        if self.keys.is_empty() {
            return Ok(KeyTenant(None));
        }
        let given = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(AuthError::Missing)?;
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        let mut found = None;
        for (expected, tenant) in &self.keys {
            if bool::from(given.ct_eq(expected)) && found.is_none() {
                found = Some(KeyTenant(tenant.clone()));
            }
        }
        found.ok_or(AuthError::Invalid)
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
        assert_eq!(ApiKeyCheck::new(None).check(None), Ok(KeyTenant(None)));
    }

    #[test]
    fn checks_the_bearer_token() {
        let check = ApiKeyCheck::new(Some("s3cret"));
        assert_eq!(check.check(Some("Bearer s3cret")), Ok(KeyTenant(None)));
        assert_eq!(check.check(None), Err(AuthError::Missing));
        assert_eq!(check.check(Some("s3cret")), Err(AuthError::Missing));
        for bad in ["Bearer s3cre", "Bearer s3cret2"] {
            assert_eq!(check.check(Some(bad)), Err(AuthError::Invalid), "{bad:?}");
        }
    }

    #[test]
    fn bound_keys_return_their_tenant() {
        let keys = crate::config::ApiKeys::parse("k-acme=acme,k-free");
        let check = ApiKeyCheck::with_keys(Some("main"), &keys);
        let tenant = |t: &str| Ok(KeyTenant(Some(t.to_owned())));
        assert_eq!(check.check(Some("Bearer k-acme")), tenant("acme"));
        assert_eq!(check.check(Some("Bearer k-free")), Ok(KeyTenant(None)));
        assert_eq!(check.check(Some("Bearer main")), Ok(KeyTenant(None)));
        assert_eq!(check.check(Some("Bearer acme")), Err(AuthError::Invalid));
        let only_bound = ApiKeyCheck::with_keys(None, &keys);
        assert_eq!(only_bound.check(None), Err(AuthError::Missing));
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let text = format!("{:?}", ApiKeyCheck::new(Some("s3cret")));
        assert!(!text.contains("s3cret"), "{text}");
    }
}
