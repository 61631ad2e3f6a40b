//! Identity: the app's backend mints a JWT (HS256, the server's auth secret) per user, and the
//! client presents it in `hello` (`docs/PROTOCOL.md` §3.3). Any standard JWT library can mint
//! one; [`mint_token`] is the Rust helper and `peermesh-server token` prints one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// How the server identifies clients.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Auth {
    /// No tokens: anyone may join any group under any name. Allowed on loopback addresses only
    /// (local development); [`Server::bind`](crate::Server::bind) refuses another address.
    #[default]
    OpenOnLoopback,
    /// No tokens, on any address: given explicitly (`--auth open`).
    Open,
    /// Every `hello` must carry a token signed (HS256) with this secret.
    Secret(String),
}

/// The device's own limit on direct connections, from its token (the wire's
/// [`DirectPolicy`](peermesh::protocol::DirectPolicy)).
pub use peermesh::protocol::DirectPolicy as DirectLimit;

/// The claims of a peermesh token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Stable user id; one live session per `sub`.
    pub sub: String,
    /// Display name shown to co-members.
    pub name: String,
    /// Groups the holder may join by itself (may be empty).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// The device's own limit on direct connections (default: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<DirectLimit>,
}

impl Claims {
    /// Claims for `sub` named `name` that may join `groups`, valid for `ttl` from now.
    pub fn new(
        sub: impl Into<String>,
        name: impl Into<String>,
        groups: Vec<String>,
        ttl: Duration,
    ) -> Claims {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Claims {
            sub: sub.into(),
            name: name.into(),
            groups,
            exp: (now + ttl).as_secs(),
            direct: None,
        }
    }
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// `hello` had no token.
    #[error("this server requires a token in hello")]
    Missing,
    /// Not a JWT, a bad signature, another algorithm, expired, or claims missing.
    #[error("invalid token: {0}")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    /// The claims are well formed but unusable.
    #[error("invalid token: {0}")]
    BadClaims(&'static str),
}

/// Sign `claims` with `secret` (HS256).
pub fn mint_token(secret: &str, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// Check a token: signed with `secret` by HS256, not expired (5 s of leeway), `sub` 1–128 bytes,
/// `name` a valid display name, every group a valid group name.
pub fn verify_token(secret: &str, token: Option<&str>) -> Result<Claims, TokenError> {
    let token = token.ok_or(TokenError::Missing)?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 5;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data = jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map_err(TokenError::Invalid)?;
    let claims = data.claims;
    if claims.sub.is_empty() || claims.sub.len() > 128 {
        return Err(TokenError::BadClaims("sub must be 1-128 bytes"));
    }
    if !peermesh::protocol::validate_name(&claims.name) {
        return Err(TokenError::BadClaims("name is not a valid display name"));
    }
    if !claims
        .groups
        .iter()
        .all(|g| peermesh::protocol::validate_group(g))
    {
        return Err(TokenError::BadClaims("groups holds an invalid group name"));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cret";

    #[test]
    fn minted_tokens_verify_and_bad_ones_do_not() {
        let claims = Claims::new(
            "u-1",
            "alice",
            vec!["lobby".into()],
            Duration::from_secs(60),
        );
        let token = mint_token(SECRET, &claims).unwrap();
        assert_eq!(verify_token(SECRET, Some(&token)).unwrap(), claims);
        assert!(matches!(
            verify_token(SECRET, None),
            Err(TokenError::Missing)
        ));
        assert!(matches!(
            verify_token("other", Some(&token)),
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(
            verify_token(SECRET, Some("not.a.jwt")),
            Err(TokenError::Invalid(_))
        ));
        let mut old = claims.clone();
        old.exp = 1_000_000;
        let expired = mint_token(SECRET, &old).unwrap();
        assert!(matches!(
            verify_token(SECRET, Some(&expired)),
            Err(TokenError::Invalid(_))
        ));
        let mut bad = claims.clone();
        bad.name = "a\u{202e}b".into();
        assert!(matches!(
            verify_token(SECRET, Some(&mint_token(SECRET, &bad).unwrap())),
            Err(TokenError::BadClaims(_))
        ));
        let mut none = claims;
        none.sub = String::new();
        assert!(matches!(
            verify_token(SECRET, Some(&mint_token(SECRET, &none).unwrap())),
            Err(TokenError::BadClaims(_))
        ));
    }

    #[test]
    fn other_algorithms_are_refused() {
        let claims = Claims::new("u", "bob", vec![], Duration::from_secs(60));
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(verify_token(SECRET, Some(&hs512)).is_err());
    }

    #[test]
    fn claims_read_direct_limits() {
        let c: Claims = serde_json::from_str(
            r#"{"sub":"x","name":"y","exp":1,"direct":"relay","groups":["g"]}"#,
        )
        .unwrap();
        assert_eq!(c.direct, Some(DirectLimit::Relay));
        let c: Claims = serde_json::from_str(r#"{"sub":"x","name":"y","exp":1}"#).unwrap();
        assert!(c.groups.is_empty() && c.direct.is_none());
    }
}
