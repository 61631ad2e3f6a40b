//! The ICE servers handed to each client: extra STUN URLs from the configuration plus, when a
//! TURN service is configured, `stun:` and `turn:` URLs with short-lived REST credentials minted
//! for that client (coturn's `--use-auth-secret` scheme, which the embedded TURN accepts too).

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use peermesh::protocol::{IceServer, PeerId};

/// Where clients reach the TURN service and how their credentials are made.
#[derive(Debug, Clone)]
pub(crate) struct TurnAdvert {
    /// `stun:`/`turn:` URLs; `{host}` stands for the host the client used to reach signaling.
    pub urls: Vec<String>,
    pub secret: String,
    pub ttl: Duration,
}

/// Builds each client's ICE server list.
#[derive(Debug, Clone, Default)]
pub(crate) struct IceList {
    pub extra: Vec<IceServer>,
    pub turn: Option<TurnAdvert>,
}

impl IceList {
    /// URLs for a TURN service at `host:port` (`host` may be `{host}`): STUN and TURN over UDP.
    pub(crate) fn urls_for(host: &str, port: u16) -> Vec<String> {
        vec![
            format!("stun:{host}:{port}"),
            format!("turn:{host}:{port}?transport=udp"),
        ]
    }

    /// URL host form of an IP address (`[v6]`), or `{host}` for an unspecified one.
    pub(crate) fn host_of(ip: IpAddr) -> String {
        match ip {
            ip if ip.is_unspecified() => "{host}".to_string(),
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        }
    }

    /// How often a client should get fresh credentials (half their lifetime), if at all.
    pub(crate) fn refresh_every(&self) -> Option<Duration> {
        self.turn
            .as_ref()
            .map(|t| (t.ttl / 2).max(Duration::from_secs(1)))
    }

    /// The list for one client. `request_host` is the host (without port) of the client's
    /// HTTP `Host` header, used where the TURN address is not fixed.
    ///
    /// `user` is the session's user id (token `sub`) and `client_ip` the signaling connection's
    /// source address: the TURN user part names both (see [`crate::turn::identity_user`]), so
    /// TURN quotas count per identity and per source address.
    pub(crate) fn for_peer(
        &self,
        peer: PeerId,
        user: Option<&str>,
        request_host: Option<&str>,
        client_ip: Option<IpAddr>,
    ) -> Vec<IceServer> {
        let mut list = self.extra.clone();
        let Some(turn) = &self.turn else {
            return list;
        };
        let host = request_host.unwrap_or("127.0.0.1");
        let urls: Vec<String> = turn
            .urls
            .iter()
            .map(|u| u.replace("{host}", host))
            .collect();
        let (stun, turn_urls): (Vec<String>, Vec<String>) =
            urls.into_iter().partition(|u| u.starts_with("stun"));
        if !stun.is_empty() {
            list.push(IceServer {
                urls: stun,
                username: None,
                credential: None,
            });
        }
        if !turn_urls.is_empty() {
            let expiry = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .saturating_add(turn.ttl)
                .as_secs();
            let (username, credential) = crate::turn::rest_credentials(
                &turn.secret,
                &crate::turn::identity_user(peer, user, client_ip),
                expiry,
            );
            list.push(IceServer {
                urls: turn_urls,
                username: Some(username),
                credential: Some(credential),
            });
        }
        list
    }
}

/// The host part of an HTTP `Host` header value (`example.org:8080` → `example.org`,
/// `[::1]:8080` → `[::1]`), if it looks like a host name or address.
pub(crate) fn host_from_header(value: &str) -> Option<String> {
    let value = value.trim();
    let host = if value.starts_with('[') {
        &value[..=value.find(']')?]
    } else {
        value.split(':').next()?
    };
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'));
    ok.then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_headers() {
        assert_eq!(
            host_from_header("example.org:8080").as_deref(),
            Some("example.org")
        );
        assert_eq!(host_from_header("127.0.0.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_from_header("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(host_from_header("bad host/x"), None);
        assert_eq!(host_from_header(""), None);
    }

    #[test]
    fn turn_entries_carry_fresh_credentials() {
        let list = IceList {
            extra: vec![],
            turn: Some(TurnAdvert {
                urls: IceList::urls_for("{host}", 3478),
                secret: "s".into(),
                ttl: Duration::from_secs(600),
            }),
        };
        let servers = list.for_peer(7, None, Some("203.0.113.9"), None);
        assert_eq!(servers[0].urls, vec!["stun:203.0.113.9:3478"]);
        assert_eq!(servers[1].urls, vec!["turn:203.0.113.9:3478?transport=udp"]);
        let user = servers[1].username.as_deref().unwrap();
        let (expiry, who) = user.split_once(':').unwrap();
        assert_eq!(who, "peer7");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!((now + 590..=now + 610).contains(&expiry.parse::<u64>().unwrap()));
        assert!(servers[1]
            .credential
            .as_deref()
            .is_some_and(|c| !c.is_empty()));
    }
}
