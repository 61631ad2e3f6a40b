//! Configuration: built-in defaults (`peermesh-server.toml`, compiled in) < a `--config` file <
//! environment variables and flags. Every layer is a [`FileConfig`] whose absent keys leave the
//! layer below in force; [`FileConfig::resolve`] turns the result into a [`Config`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context as _};
use peermesh::protocol::{IceServer, Limits};
use serde::{Deserialize, Serialize};

use crate::turn::TurnConfig;
use crate::{Config, TurnMode};

/// The built-in defaults, documented key by key.
pub const DEFAULT_CONFIG: &str = include_str!("../peermesh-server.toml");

/// One layer of configuration (the TOML file format).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Signaling address.
    pub listen: Option<SocketAddr>,
    /// Extra `stun:` URLs for clients.
    pub ice_servers: Option<Vec<String>>,
    /// Heartbeat timeout in ms.
    pub heartbeat_timeout_ms: Option<u64>,
    /// `[limits]`.
    #[serde(default)]
    pub limits: LimitsFile,
    /// `[turn]`.
    #[serde(default)]
    pub turn: TurnFile,
}

/// The `[limits]` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// See [`Limits::max_frame_bytes`].
    pub max_frame_bytes: Option<usize>,
    /// See [`Limits::max_groups_per_client`].
    pub max_groups_per_client: Option<usize>,
    /// See [`Limits::max_members_per_group`].
    pub max_members_per_group: Option<usize>,
}

/// The `[turn]` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnFile {
    /// `embedded`, `external` or `off`.
    pub mode: Option<String>,
    /// UDP listen address.
    pub listen: Option<SocketAddr>,
    /// Public IP behind 1:1 NAT.
    pub public_ip: Option<IpAddr>,
    /// IP relay sockets bind to.
    pub relay_ip: Option<IpAddr>,
    /// `A-B`.
    pub relay_ports: Option<String>,
    /// Credential realm.
    pub realm: Option<String>,
    /// REST shared secret.
    pub secret: Option<String>,
    /// External TURN URLs.
    pub urls: Option<Vec<String>>,
    /// Credential lifetime in seconds.
    pub credential_ttl_s: Option<u64>,
    /// Allocations per user.
    pub user_quota: Option<usize>,
    /// Allocations in total.
    pub total_quota: Option<usize>,
    /// CIDRs exempt from the peer deny list.
    pub allow_peers: Option<Vec<String>>,
    /// Socket buffer size.
    pub recv_buffer_bytes: Option<usize>,
}

macro_rules! overlay {
    ($base:expr, $top:expr, $($field:ident),+) => {
        $( if $top.$field.is_some() { $base.$field = $top.$field; } )+
    };
}

impl FileConfig {
    /// The built-in defaults.
    pub fn defaults() -> FileConfig {
        FileConfig::parse(DEFAULT_CONFIG).expect("the built-in configuration parses")
    }

    /// Parse TOML text.
    pub fn parse(text: &str) -> anyhow::Result<FileConfig> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Read and parse a TOML file.
    pub fn load(path: &std::path::Path) -> anyhow::Result<FileConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        FileConfig::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Put `top` over `self`: every key `top` sets wins.
    pub fn overlay(&mut self, top: FileConfig) {
        overlay!(self, top, listen, ice_servers, heartbeat_timeout_ms);
        overlay!(
            self.limits,
            top.limits,
            max_frame_bytes,
            max_groups_per_client,
            max_members_per_group
        );
        overlay!(
            self.turn,
            top.turn,
            mode,
            listen,
            public_ip,
            relay_ip,
            relay_ports,
            realm,
            secret,
            urls,
            credential_ttl_s,
            user_quota,
            total_quota,
            allow_peers,
            recv_buffer_bytes
        );
    }

    /// TOML text of this layer.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }

    /// The server configuration this layer describes (missing keys take the library defaults).
    pub fn resolve(&self) -> anyhow::Result<Config> {
        let d = Config::default();
        let listen = self.listen.unwrap_or(d.listen);
        let ice_servers = self
            .ice_servers
            .iter()
            .flatten()
            .map(|url| {
                if url.starts_with("stun:") || url.starts_with("stuns:") {
                    Ok(IceServer {
                        urls: vec![url.clone()],
                        ..Default::default()
                    })
                } else {
                    bail!("ice_servers: {url:?} is not a stun: URL (TURN goes in [turn])")
                }
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let heartbeat_timeout = match self.heartbeat_timeout_ms {
            None => d.heartbeat_timeout,
            Some(ms) if ms >= 100 => Duration::from_millis(ms),
            Some(ms) => bail!("heartbeat_timeout_ms = {ms}: must be at least 100"),
        };
        // Smallest `max_frame_bytes` that every client can live with.
        const MIN_FRAME_BYTES: usize = 32 * 1024;
        let positive = |name: &str, v: Option<usize>, default: usize| match v {
            Some(0) => bail!("limits.{name} must be at least 1"),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let limits = Limits {
            max_frame_bytes: positive(
                "max_frame_bytes",
                self.limits.max_frame_bytes,
                d.limits.max_frame_bytes,
            )?,
            max_groups_per_client: positive(
                "max_groups_per_client",
                self.limits.max_groups_per_client,
                d.limits.max_groups_per_client,
            )?,
            max_members_per_group: positive(
                "max_members_per_group",
                self.limits.max_members_per_group,
                d.limits.max_members_per_group,
            )?,
        };
        if limits.max_frame_bytes < MIN_FRAME_BYTES {
            bail!(
                "limits.max_frame_bytes = {} is below {MIN_FRAME_BYTES} bytes: clients send relay \
                 frames of up to 16403 bytes and signals with whole SDPs",
                limits.max_frame_bytes
            );
        }
        if limits.max_frame_bytes > crate::HARD_FRAME_CAP {
            bail!(
                "limits.max_frame_bytes = {} is above the hard cap of {} bytes",
                limits.max_frame_bytes,
                crate::HARD_FRAME_CAP
            );
        }
        let t = &self.turn;
        let ttl = match t.credential_ttl_s {
            None => d.turn_credential_ttl,
            Some(s) if s >= 60 => Duration::from_secs(s),
            Some(s) => bail!("turn.credential_ttl_s = {s}: must be at least 60"),
        };
        let secret = t.secret.clone().filter(|s| !s.is_empty());
        let turn = match t.mode.as_deref().unwrap_or("off") {
            "off" => TurnMode::Disabled,
            "external" => {
                let urls = t.urls.clone().unwrap_or_default();
                if urls.is_empty() {
                    bail!("turn.mode = \"external\" needs turn.urls (e.g. [\"turn:turn.example.org:3478\"])");
                }
                for u in &urls {
                    if !(u.starts_with("turn:") || u.starts_with("turns:")) {
                        bail!("turn.urls: {u:?} is not a turn: or turns: URL");
                    }
                }
                let Some(secret) = secret else {
                    bail!("turn.mode = \"external\" needs turn.secret (the server's static-auth-secret)");
                };
                TurnMode::External { urls, secret }
            }
            "embedded" => {
                let mut tc = TurnConfig::default();
                tc.listen = t
                    .listen
                    .unwrap_or_else(|| SocketAddr::new(listen.ip(), tc.listen.port()));
                tc.public_ip = t.public_ip;
                tc.relay_ip = t.relay_ip;
                if tc.listen.ip().is_unspecified()
                    && tc.public_ip.is_none()
                    && tc.relay_ip.is_none()
                {
                    bail!(
                        "turn.listen is {}: set turn.public_ip (the address clients reach) or turn.relay_ip",
                        tc.listen
                    );
                }
                if let Some(ports) = &t.relay_ports {
                    tc.relay_ports = parse_port_range(ports)?;
                }
                if let Some(realm) = &t.realm {
                    if realm.is_empty() {
                        bail!("turn.realm must not be empty");
                    }
                    tc.realm = realm.clone();
                }
                if let Some(secret) = secret {
                    tc.secret = secret;
                }
                if let Some(q) = t.user_quota {
                    tc.user_quota = q;
                }
                if let Some(q) = t.total_quota {
                    tc.total_quota = q;
                }
                if let Some(b) = t.recv_buffer_bytes {
                    tc.recv_buffer_bytes = b;
                }
                tc.allow_peers = t
                    .allow_peers
                    .iter()
                    .flatten()
                    .map(|c| {
                        c.parse::<ipnet::IpNet>()
                            .or_else(|_| c.parse::<IpAddr>().map(ipnet::IpNet::from))
                            .map_err(|_| {
                                anyhow::anyhow!(
                                    "turn.allow_peers: {c:?} is not a CIDR (e.g. 127.0.0.0/8)"
                                )
                            })
                    })
                    .collect::<anyhow::Result<_>>()?;
                TurnMode::Embedded(tc)
            }
            other => bail!("turn.mode = {other:?}: expected \"embedded\", \"external\" or \"off\""),
        };
        Ok(Config {
            listen,
            ice_servers,
            heartbeat_interval: heartbeat_timeout / 3,
            heartbeat_timeout,
            limits,
            turn,
            turn_credential_ttl: ttl,
        })
    }
}

/// Parse `A-B` (inclusive, A ≤ B, A > 0).
pub fn parse_port_range(s: &str) -> anyhow::Result<(u16, u16)> {
    let parsed = s
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)));
    match parsed {
        Some((a, b)) if a > 0 && a <= b => Ok((a, b)),
        _ => bail!("port range {s:?}: expected A-B with 0 < A <= B <= 65535"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_the_embedded_turn_next_to_signaling() {
        let c = FileConfig::defaults().resolve().unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        let TurnMode::Embedded(t) = &c.turn else {
            panic!("{:?}", c.turn)
        };
        assert_eq!(t.listen, "127.0.0.1:3478".parse::<SocketAddr>().unwrap());
        assert_eq!(t.relay_ports, (49152, 65535));
        assert_eq!(t.user_quota, 16);
        assert!(!t.secret.is_empty(), "random secret");
        assert_eq!(c.turn_credential_ttl, Duration::from_secs(3600));
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(15));
    }

    #[test]
    fn layers_override_key_by_key() {
        let mut c = FileConfig::defaults();
        c.overlay(
            FileConfig::parse(
                "listen = \"0.0.0.0:9000\"\n[turn]\npublic_ip = \"203.0.113.7\"\nallow_peers = [\"127.0.0.0/8\"]\n",
            )
            .unwrap(),
        );
        let r = c.resolve().unwrap();
        let TurnMode::Embedded(t) = &r.turn else {
            panic!()
        };
        assert_eq!(t.listen, "0.0.0.0:3478".parse::<SocketAddr>().unwrap());
        assert_eq!(t.public_ip, Some("203.0.113.7".parse().unwrap()));
        assert_eq!(t.allow_peers.len(), 1);
        assert_eq!(t.realm, "peermesh");
    }

    #[test]
    fn bad_values_are_named() {
        let bad = |text: &str| {
            let mut c = FileConfig::defaults();
            c.overlay(FileConfig::parse(text)?);
            c.resolve().map(drop)
        };
        let msg = |r: anyhow::Result<()>| format!("{:#}", r.unwrap_err());
        assert!(msg(bad("nope = 1")).contains("unknown field"));
        assert!(msg(bad("[turn]\nrelay_ports = \"9-1\"")).contains("port range"));
        assert!(msg(bad("[turn]\nmode = \"external\"")).contains("turn.urls"));
        assert!(
            msg(bad("[turn]\nmode = \"external\"\nurls = [\"turn:x:3478\"]"))
                .contains("turn.secret")
        );
        assert!(msg(bad("listen = \"0.0.0.0:1\"")).contains("public_ip"));
        assert!(msg(bad("[turn]\nallow_peers = [\"x/8\"]")).contains("CIDR"));
        assert!(msg(bad("heartbeat_timeout_ms = 5")).contains("at least 100"));
        assert!(msg(bad("[limits]\nmax_frame_bytes = 1000")).contains("below 32768"));
        assert!(msg(bad("[limits]\nmax_frame_bytes = 2000000")).contains("hard cap"));
    }

    #[test]
    fn external_mode() {
        let mut c = FileConfig::defaults();
        c.overlay(
            FileConfig::parse(
                "[turn]\nmode = \"external\"\nurls = [\"turn:127.0.0.1:3478\"]\nsecret = \"s\"",
            )
            .unwrap(),
        );
        assert!(matches!(
            c.resolve().unwrap().turn,
            TurnMode::External { .. }
        ));
    }
}
