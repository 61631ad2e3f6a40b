//! coturn-style "TURN REST API" credentials (time-limited, HMAC-SHA1 of a shared secret).

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::prelude::BASE64_STANDARD;
use base64::Engine as _;
use ring::hmac;

/// Username and password for the TURN REST scheme: `username = "{expiry_unix}:{user}"`,
/// `password = base64(HMAC-SHA1(secret, username))`.
pub fn rest_credentials(secret: &str, user: &str, expiry_unix: u64) -> (String, String) {
    let username = format!("{expiry_unix}:{user}");
    let password = rest_password(secret, &username);
    (username, password)
}

/// The REST user part minted for signaling session `peer` connected from `ip`:
/// `peer{peer}@{ip}` (just `peer{peer}` when the address is unknown).
pub fn session_user(peer: u32, ip: Option<std::net::IpAddr>) -> String {
    match ip {
        Some(ip) => format!("peer{peer}@{ip}"),
        None => format!("peer{peer}"),
    }
}

/// The REST user part minted for a session: with a user id (token `sub`),
/// `u.{sub}@{ip}` with every byte of `sub` outside `A–Z a–z 0–9 . _ -` written `%XX`, so quotas
/// count per identity whatever the session; without one, [`session_user`].
pub fn identity_user(peer: u32, user: Option<&str>, ip: Option<std::net::IpAddr>) -> String {
    let Some(sub) = user else {
        return session_user(peer, ip);
    };
    let mut id = String::from("u.");
    for b in sub.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            id.push(b as char);
        } else {
            id.push_str(&format!("%{b:02X}"));
        }
    }
    match ip {
        Some(ip) => format!("{id}@{ip}"),
        None => id,
    }
}

/// What a REST user part counts under for the per-user quota: the identity without the
/// source address (`u.alice@203.0.113.5` → `u.alice`, `peer7@…` → `peer7`).
pub(crate) fn quota_user(user: &str) -> &str {
    match user.rsplit_once('@') {
        Some((id, ip)) if ip.parse::<std::net::IpAddr>().is_ok() => id,
        _ => user,
    }
}

/// The address a REST user part names after its last `@` (`peer7@203.0.113.5` → 203.0.113.5,
/// see [`session_user`]), if it parses as one.
pub(crate) fn user_ip(user: &str) -> Option<std::net::IpAddr> {
    user.rsplit_once('@')?.1.parse().ok()
}

/// `base64(HMAC-SHA1(secret, username))`.
pub(crate) fn rest_password(secret: &str, username: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    BASE64_STANDARD.encode(hmac::sign(&key, username.as_bytes()).as_ref())
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a REST username was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CredError {
    Malformed,
    Expired(u64),
}

impl std::fmt::Display for CredError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredError::Malformed => f.write_str("malformed REST username"),
            CredError::Expired(t) => write!(f, "credentials expired at {t}"),
        }
    }
}

/// Splits a REST username into `(expiry, user part)`. Accepted forms: `expiry:user`,
/// `user:expiry` and a bare `expiry` (user part empty).
pub(crate) fn parse_rest_username(username: &str) -> Result<(u64, &str), CredError> {
    fn num(s: &str) -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }
    if let Some(t) = num(username) {
        return Ok((t, ""));
    }
    if let Some((first, rest)) = username.split_once(':') {
        if let Some(t) = num(first) {
            return Ok((t, rest));
        }
    }
    if let Some((rest, last)) = username.rsplit_once(':') {
        if let Some(t) = num(last) {
            return Ok((t, rest));
        }
    }
    Err(CredError::Malformed)
}

/// The long-term credential key (`MD5(username:realm:password)`) for a REST username, or why it
/// is refused.
///
/// `renewing`: the request comes from the 5-tuple of a live allocation of the same user, and is
/// not an Allocate. Then expired credentials still count: a PeerConnection keeps the
/// credentials it started with, and refusing its Refresh, CreatePermission and ChannelBind would
/// kill a working relay path once per credential lifetime. New allocations need valid ones.
pub(crate) fn rest_key(
    secret: &str,
    username: &str,
    realm: &str,
    now: u64,
    renewing: bool,
) -> Result<Vec<u8>, CredError> {
    let (expiry, _) = parse_rest_username(username)?;
    if expiry < now && !renewing {
        return Err(CredError::Expired(expiry));
    }
    let password = rest_password(secret, username);
    Ok(turn::auth::generate_auth_key(username, realm, &password))
}

/// The [`turn::auth::AuthHandler`] handed to the turn crate. Requests only reach it after the
/// listener guard has already verified them (see `listener.rs`), so it mostly re-derives the key.
pub(crate) struct RestAuthHandler {
    pub(crate) secret: String,
    pub(crate) realm: String,
    pub(crate) shared: std::sync::Weak<super::Shared>,
}

impl turn::auth::AuthHandler for RestAuthHandler {
    fn auth_handle(
        &self,
        username: &str,
        realm: &str,
        src_addr: SocketAddr,
    ) -> Result<Vec<u8>, turn::Error> {
        if realm != self.realm {
            return Err(turn::Error::Other(format!("unknown realm {realm:?}")));
        }
        // The listener guard already refused expired credentials everywhere but on a live
        // allocation's own 5-tuple (an Allocate from there gets 437 from turn).
        let renewing = self
            .shared
            .upgrade()
            .is_some_and(|s| s.owns_allocation(src_addr, username));
        rest_key(&self.secret, username, realm, now_unix(), renewing).map_err(|e| {
            tracing::debug!(target: "peermesh_server::turn", %src_addr, username, "auth: {e}");
            turn::Error::Other(e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_forms() {
        assert_eq!(
            parse_rest_username("1700000000:alice"),
            Ok((1700000000, "alice"))
        );
        assert_eq!(
            parse_rest_username("alice:1700000000"),
            Ok((1700000000, "alice"))
        );
        assert_eq!(parse_rest_username("1700000000"), Ok((1700000000, "")));
        assert_eq!(parse_rest_username("1:a:b"), Ok((1, "a:b")));
        assert_eq!(parse_rest_username("alice"), Err(CredError::Malformed));
        assert_eq!(parse_rest_username("alice:bob"), Err(CredError::Malformed));
        assert_eq!(parse_rest_username(""), Err(CredError::Malformed));
    }

    #[test]
    fn identity_users_escape_the_sub_and_count_per_identity() {
        let ip = Some("203.0.113.5".parse().unwrap());
        assert_eq!(identity_user(7, None, ip), "peer7@203.0.113.5");
        assert_eq!(identity_user(7, Some("alice"), ip), "u.alice@203.0.113.5");
        // '@' and ':' cannot make the user part name another address or split differently.
        let tricky = identity_user(7, Some("a@198.51.100.1:x y"), None);
        assert_eq!(tricky, "u.a%40198.51.100.1%3Ax%20y");
        assert_eq!(user_ip(&tricky), None);
        assert_eq!(quota_user("u.alice@203.0.113.5"), "u.alice");
        assert_eq!(quota_user("u.alice@2001:db8::1"), "u.alice");
        assert_eq!(quota_user("peer7"), "peer7");
        assert_eq!(quota_user("a@example.org"), "a@example.org");
    }

    #[test]
    fn user_ip_forms() {
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        assert_eq!(user_ip("peer7@203.0.113.5"), ip("203.0.113.5"));
        assert_eq!(user_ip("peer7@2001:db8::1"), ip("2001:db8::1"));
        assert_eq!(
            user_ip(&session_user(3, ip("::ffff:1.2.3.4"))),
            ip("::ffff:1.2.3.4")
        );
        assert_eq!(user_ip("a@b@10.0.0.1"), ip("10.0.0.1"));
        assert_eq!(user_ip("peer7"), None);
        assert_eq!(user_ip("peer7@"), None);
        assert_eq!(user_ip("peer7@example.org"), None);
        assert_eq!(user_ip(""), None);
    }
}
