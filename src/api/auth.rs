//! Bearer-token checks for the tollgate.v1 services: Admin needs the admin token,
//! Metering the service token (the admin token is accepted there too).

use std::sync::Arc;

use tonic::{Request, Status};

/// Compares in time independent of where the first difference is.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A configured secret (a token, the gateway's shared secret), kept as its SHA-256 digest:
/// a presented value is compared by its digest (always 32 bytes), in time independent of
/// where they first differ and of the configured secret's length ([`constant_time_eq`]
/// alone answers at once when the lengths differ, which told the token's length). The
/// configured side is hashed once, at start.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl Secret {
    pub fn new(configured: &str) -> Self {
        Self(secret_digest(configured.as_bytes()))
    }

    /// Whether a presented value whose [`secret_digest`] is `presented` is this secret.
    pub fn matches(&self, presented: &[u8; 32]) -> bool {
        constant_time_eq(presented, &self.0)
    }
}

/// The digest a presented value is compared by ([`Secret::matches`]).
pub fn secret_digest(value: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(value).into()
}

/// Whether `presented` is any of `configured`, every one compared (no timing tells which
/// one matched).
fn any_secret_eq(presented: &str, configured: &[Secret]) -> bool {
    let presented = secret_digest(presented.as_bytes());
    configured
        .iter()
        .fold(false, |found, t| found | t.matches(&presented))
}

/// The token after `Bearer ` in an authorization value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A tonic interceptor accepting any of its tokens.
#[derive(Clone)]
pub struct TokenCheck {
    tokens: Arc<[Secret]>,
    /// Tokens of another service: known, but not enough here ([`TokenCheck::refusing`]).
    others: Arc<[Secret]>,
    others_message: &'static str,
}

impl TokenCheck {
    pub fn new(tokens: impl IntoIterator<Item = String>) -> Self {
        Self {
            tokens: nonempty(tokens),
            others: Arc::from([]),
            others_message: "",
        }
    }

    /// Refuses these tokens (valid for another service) with PERMISSION_DENIED and
    /// `message`, which says which token is needed: "invalid token" would send the caller
    /// looking for a typo in a token that is right, for another service.
    pub fn refusing(
        mut self,
        tokens: impl IntoIterator<Item = String>,
        message: &'static str,
    ) -> Self {
        self.others = nonempty(tokens);
        self.others_message = message;
        self
    }

    pub fn check(&self, authorization: Option<&str>) -> Result<(), Status> {
        let Some(token) = authorization.and_then(bearer) else {
            return Err(Status::unauthenticated(
                "missing authorization: Bearer <token>",
            ));
        };
        if any_secret_eq(token, &self.tokens) {
            Ok(())
        } else if any_secret_eq(token, &self.others) {
            Err(Status::permission_denied(self.others_message))
        } else {
            Err(Status::unauthenticated("invalid token"))
        }
    }
}

fn nonempty(tokens: impl IntoIterator<Item = String>) -> Arc<[Secret]> {
    tokens
        .into_iter()
        .filter(|t| !t.is_empty())
        .map(|t| Secret::new(&t))
        .collect()
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let value = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.check(value)?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked() {
        let check = TokenCheck::new(["secret".to_owned(), String::new()]);
        assert!(check.check(Some("Bearer secret")).is_ok());
        assert!(check.check(Some("bearer secret")).is_ok());
        assert!(check.check(Some("Bearer other")).is_err());
        assert!(check.check(Some("Bearer ")).is_err());
        assert!(check.check(Some("secret")).is_err());
        assert!(check.check(None).is_err());
    }

    #[test]
    fn secrets_compare_by_digest_whatever_their_lengths() {
        let secret = Secret::new("s3cret-token");
        assert!(secret.matches(&secret_digest(b"s3cret-token")));
        for other in [&b"s3cret-toke"[..], b"s3cret-token!", b"S3cret-token", b""] {
            assert!(!secret.matches(&secret_digest(other)), "{other:?}");
        }
        let tokens = [Secret::new("current"), Secret::new("previous")];
        assert!(any_secret_eq("current", &tokens) && any_secret_eq("previous", &tokens));
        assert!(!any_secret_eq("neither", &tokens));
    }

    #[test]
    fn another_service_token_is_told_apart_from_a_wrong_one() {
        let check = TokenCheck::new(["admin".to_owned()])
            .refusing(["service".to_owned(), String::new()], "use the admin token");
        assert!(check.check(Some("Bearer admin")).is_ok());
        let refused = check.check(Some("Bearer service")).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert_eq!(refused.message(), "use the admin token");
        for wrong in [Some("Bearer servic"), Some("Bearer "), None] {
            let refused = check.check(wrong).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{wrong:?}");
        }
    }
}
