//! Configuration: built-in defaults (`peermesh-server.toml`, compiled in) < a `--config` file <
//! environment variables and flags. Every layer is a [`FileConfig`] whose absent keys leave the
//! layer below in force; [`FileConfig::resolve`] turns the result into a [`Config`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context as _};
use peermesh::protocol::{IceServer, Limits};
use serde::{Deserialize, Serialize};

use crate::turn::TurnConfig;
use crate::{Config, Rate, ServerLimits, TurnMode};

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
    /// Admin listener (`/metrics`, `/healthz`, the admin API), or `"off"`.
    pub admin_listen: Option<String>,
    /// Bearer secret of the admin API (`/v1/...`); without it the admin API answers 401.
    pub admin_secret: Option<String>,
    /// Whether a client's `join` creates a group that does not exist.
    pub client_groups: Option<bool>,
    /// How long a membership change waits for every member's `ack` (ms).
    pub ack_timeout_ms: Option<u64>,
    /// How long a dropped resumable session waits for its resume (ms).
    pub resume_grace_ms: Option<u64>,
    /// On shutdown, how long to wait for sessions to drain (ms).
    pub drain_timeout_ms: Option<u64>,
    /// On shutdown, where clients reconnect (`ws://` or `wss://` URL of another instance).
    pub reconnect_url: Option<String>,
    /// `[limits]`.
    #[serde(default)]
    pub limits: LimitsFile,
    /// `[turn]`.
    #[serde(default)]
    pub turn: TurnFile,
    /// `[auth]`.
    #[serde(default)]
    pub auth: AuthFile,
}

/// The `[auth]` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// HS256 secret the app's backend signs tokens with; every `hello` must carry one.
    pub secret: Option<String>,
    /// `"open"`: no tokens, even on a non-loopback address.
    pub mode: Option<String>,
}

/// The `[limits]` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// See [`Limits::max_frame_bytes`].
    #[arg(
        long,
        env = "PEERMESH_MAX_FRAME_BYTES",
        global = true,
        help = "Largest WebSocket frame accepted (bytes)"
    )]
    pub max_frame_bytes: Option<usize>,
    /// See [`Limits::max_groups_per_client`].
    #[arg(
        long,
        env = "PEERMESH_MAX_GROUPS_PER_CLIENT",
        global = true,
        help = "Most groups one client may be in"
    )]
    pub max_groups_per_client: Option<usize>,
    /// See [`Limits::max_members_per_group`].
    #[arg(
        long,
        env = "PEERMESH_MAX_MEMBERS_PER_GROUP",
        global = true,
        help = "Most members in one group"
    )]
    pub max_members_per_group: Option<usize>,
    /// See [`ServerLimits::max_connections`].
    #[arg(
        long,
        env = "PEERMESH_MAX_CONNECTIONS",
        global = true,
        help = "Open TCP connections in total (default 10000; fitted to the fd limit)"
    )]
    pub max_connections: Option<usize>,
    /// See [`ServerLimits::max_connections_per_ip`].
    #[arg(
        long,
        env = "PEERMESH_MAX_CONNECTIONS_PER_IP",
        global = true,
        help = "Open TCP connections from one source IP (default 64)"
    )]
    pub max_connections_per_ip: Option<usize>,
    /// See [`ServerLimits::listen_backlog`].
    #[arg(
        long,
        env = "PEERMESH_LISTEN_BACKLOG",
        global = true,
        help = "Listen backlog of the signaling socket (default 4096)"
    )]
    pub listen_backlog: Option<u32>,
    /// See [`ServerLimits::reserved_fds`].
    #[arg(
        long,
        env = "PEERMESH_RESERVED_FDS",
        global = true,
        help = "File descriptors kept free (default 64)"
    )]
    pub reserved_fds: Option<usize>,
    /// See [`ServerLimits::header_read_timeout`] (ms).
    #[arg(
        long,
        env = "PEERMESH_HEADER_READ_TIMEOUT_MS",
        global = true,
        help = "Request line and headers must arrive within this (ms, default 5000)"
    )]
    pub header_read_timeout_ms: Option<u64>,
    /// See [`ServerLimits::upgrade_timeout`] (ms).
    #[arg(
        long,
        env = "PEERMESH_UPGRADE_TIMEOUT_MS",
        global = true,
        help = "Close connections not upgraded to WebSocket within this (ms, default 30000)"
    )]
    pub upgrade_timeout_ms: Option<u64>,
    /// See [`ServerLimits::hello_timeout`] (ms).
    #[arg(
        long,
        env = "PEERMESH_HELLO_TIMEOUT_MS",
        global = true,
        help = "Close sessions without hello within this (ms, default 10000)"
    )]
    pub hello_timeout_ms: Option<u64>,
    /// See [`ServerLimits::hello_max_frames`].
    #[arg(
        long,
        env = "PEERMESH_HELLO_MAX_FRAMES",
        global = true,
        help = "Frames allowed before hello is accepted (default 4)"
    )]
    pub hello_max_frames: Option<u32>,
    /// See [`ServerLimits::hello_max_bytes`].
    #[arg(
        long,
        env = "PEERMESH_HELLO_MAX_BYTES",
        global = true,
        help = "Bytes allowed before hello is accepted (default 16384)"
    )]
    pub hello_max_bytes: Option<usize>,
    /// See [`ServerLimits::outbound_queue_bytes`].
    #[arg(
        long,
        env = "PEERMESH_OUTBOUND_QUEUE_BYTES",
        global = true,
        help = "Replies and events queued towards one client before it is closed (default 262144)"
    )]
    pub outbound_queue_bytes: Option<usize>,
    /// See [`ServerLimits::relay_queue_bytes`].
    #[arg(
        long,
        env = "PEERMESH_RELAY_QUEUE_BYTES",
        global = true,
        help = "Relayed bytes queued towards one receiver (default 4194304)"
    )]
    pub relay_queue_bytes: Option<usize>,
    /// See [`ServerLimits::requests`] (0: unlimited).
    #[arg(
        long,
        env = "PEERMESH_REQUESTS_PER_S",
        global = true,
        help = "Requests per second per session, 0 = unlimited (default 20)"
    )]
    pub requests_per_s: Option<u64>,
    /// Burst of [`ServerLimits::requests`].
    #[arg(
        long,
        env = "PEERMESH_REQUESTS_BURST",
        global = true,
        help = "Request burst per session (default 50)"
    )]
    pub requests_burst: Option<u64>,
    /// See [`ServerLimits::signals`] (0: unlimited).
    #[arg(
        long,
        env = "PEERMESH_SIGNALS_PER_S",
        global = true,
        help = "Signals per second per session, 0 = unlimited (default 200)"
    )]
    pub signals_per_s: Option<u64>,
    /// Burst of [`ServerLimits::signals`].
    #[arg(
        long,
        env = "PEERMESH_SIGNALS_BURST",
        global = true,
        help = "Signal burst per session (default 1000)"
    )]
    pub signals_burst: Option<u64>,
    /// See [`ServerLimits::joins`] (0: unlimited).
    #[arg(
        long,
        env = "PEERMESH_JOINS_PER_S",
        global = true,
        help = "Joins per second per session, 0 = unlimited (default 5)"
    )]
    pub joins_per_s: Option<u64>,
    /// Burst of [`ServerLimits::joins`].
    #[arg(
        long,
        env = "PEERMESH_JOINS_BURST",
        global = true,
        help = "Join burst per session (default 32)"
    )]
    pub joins_burst: Option<u64>,
    /// See [`ServerLimits::relay_bytes`] (0: unlimited).
    #[arg(
        long,
        env = "PEERMESH_RELAY_BYTES_PER_S",
        global = true,
        help = "Relay bytes per second per session, paced; 0 = unlimited (default 33554432)"
    )]
    pub relay_bytes_per_s: Option<u64>,
    /// Burst of [`ServerLimits::relay_bytes`].
    #[arg(
        long,
        env = "PEERMESH_RELAY_BURST_BYTES",
        global = true,
        help = "Relay burst per session in bytes (default 8388608)"
    )]
    pub relay_burst_bytes: Option<u64>,
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
    /// Allocations per source address.
    pub ip_quota: Option<usize>,
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
        overlay!(
            self,
            top,
            listen,
            ice_servers,
            heartbeat_timeout_ms,
            admin_listen,
            admin_secret,
            client_groups,
            ack_timeout_ms,
            resume_grace_ms,
            drain_timeout_ms,
            reconnect_url
        );
        overlay!(
            self.limits,
            top.limits,
            max_frame_bytes,
            max_groups_per_client,
            max_members_per_group,
            max_connections,
            max_connections_per_ip,
            listen_backlog,
            reserved_fds,
            header_read_timeout_ms,
            upgrade_timeout_ms,
            hello_timeout_ms,
            hello_max_frames,
            hello_max_bytes,
            outbound_queue_bytes,
            relay_queue_bytes,
            requests_per_s,
            requests_burst,
            signals_per_s,
            signals_burst,
            joins_per_s,
            joins_burst,
            relay_bytes_per_s,
            relay_burst_bytes
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
            ip_quota,
            total_quota,
            allow_peers,
            recv_buffer_bytes
        );
        overlay!(self.auth, top.auth, secret, mode);
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
                if let Some(q) = t.ip_quota {
                    tc.ip_quota = q;
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
        let admin_listen = match self.admin_listen.as_deref() {
            None | Some("off") | Some("") => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| {
                anyhow::anyhow!(
                    "admin_listen = {a:?}: expected IP:PORT (e.g. 127.0.0.1:8081) or \"off\""
                )
            })?),
        };
        let auth = match (self.auth.secret.as_deref(), self.auth.mode.as_deref()) {
            (Some(""), _) => bail!("auth.secret is empty"),
            (Some(secret), None | Some("secret")) => crate::Auth::Secret(secret.to_owned()),
            (Some(_), Some(m)) => bail!("auth.mode = {m:?} together with auth.secret"),
            (None, Some("open")) => crate::Auth::Open,
            (None, None) => crate::Auth::OpenOnLoopback,
            (None, Some(m)) => bail!("auth.mode = {m:?}: expected \"open\" (or give auth.secret)"),
        };
        let admin_secret = match self.admin_secret.as_deref() {
            Some("") => bail!("admin_secret is empty"),
            other => other.map(str::to_owned),
        };
        let ack_timeout = match self.ack_timeout_ms {
            Some(ms) if ms < 100 => bail!("ack_timeout_ms = {ms}: must be at least 100"),
            Some(ms) => Duration::from_millis(ms),
            None => d.ack_timeout,
        };
        let resume_grace = match self.resume_grace_ms {
            Some(ms) if ms > 3_600_000 => bail!("resume_grace_ms = {ms}: at most 3600000 (1 h)"),
            Some(ms) => Duration::from_millis(ms),
            None => d.resume_grace,
        };
        let drain_timeout = match self.drain_timeout_ms {
            Some(ms) if ms > 600_000 => bail!("drain_timeout_ms = {ms}: at most 600000 (10 min)"),
            Some(ms) => Duration::from_millis(ms),
            None => d.drain_timeout,
        };
        let reconnect_url = match self.reconnect_url.as_deref() {
            Some(url) if !(url.starts_with("ws://") || url.starts_with("wss://")) => {
                bail!("reconnect_url = {url:?}: expected a ws:// or wss:// URL")
            }
            other => other.map(str::to_owned),
        };
        Ok(Config {
            auth,
            resume_grace,
            drain_timeout,
            reconnect_url,
            admin_secret,
            client_groups: self.client_groups.unwrap_or(d.client_groups),
            ack_timeout,
            listen,
            ice_servers,
            heartbeat_interval: heartbeat_timeout / 3,
            heartbeat_timeout,
            limits,
            turn,
            turn_credential_ttl: ttl,
            server_limits: self.limits.server_limits()?,
            admin_listen,
        })
    }
}

impl LimitsFile {
    /// The [`ServerLimits`] these keys describe (absent keys keep the defaults).
    fn server_limits(&self) -> anyhow::Result<ServerLimits> {
        let d = ServerLimits::default();
        let at_least = |name: &str, v: Option<u64>, min: u64, default: u64| match v {
            Some(v) if v < min => bail!("limits.{name} = {v}: must be at least {min}"),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let ms = |name: &str, v: Option<u64>, min: u64, default: Duration| {
            at_least(name, v, min, default.as_millis() as u64).map(Duration::from_millis)
        };
        let count = |name: &str, v: Option<usize>, min: usize, default: usize| {
            at_least(name, v.map(|v| v as u64), min as u64, default as u64).map(|v| v as usize)
        };
        let rate = |name: &str, per_s: Option<u64>, burst: Option<u64>, default: Rate| {
            Ok::<_, anyhow::Error>(Rate {
                per_second: per_s.unwrap_or(default.per_second),
                burst: at_least(&format!("{name}_burst"), burst, 1, default.burst)?,
            })
        };
        let limits = ServerLimits {
            max_connections: count(
                "max_connections",
                self.max_connections,
                1,
                d.max_connections,
            )?,
            max_connections_per_ip: count(
                "max_connections_per_ip",
                self.max_connections_per_ip,
                1,
                d.max_connections_per_ip,
            )?,
            listen_backlog: at_least(
                "listen_backlog",
                self.listen_backlog.map(u64::from),
                1,
                u64::from(d.listen_backlog),
            )?
            .min(u64::from(u32::MAX)) as u32,
            reserved_fds: count("reserved_fds", self.reserved_fds, 16, d.reserved_fds)?,
            header_read_timeout: ms(
                "header_read_timeout_ms",
                self.header_read_timeout_ms,
                100,
                d.header_read_timeout,
            )?,
            upgrade_timeout: ms(
                "upgrade_timeout_ms",
                self.upgrade_timeout_ms,
                100,
                d.upgrade_timeout,
            )?,
            hello_timeout: ms(
                "hello_timeout_ms",
                self.hello_timeout_ms,
                100,
                d.hello_timeout,
            )?,
            hello_max_frames: at_least(
                "hello_max_frames",
                self.hello_max_frames.map(u64::from),
                1,
                u64::from(d.hello_max_frames),
            )?
            .min(u64::from(u32::MAX)) as u32,
            hello_max_bytes: count(
                "hello_max_bytes",
                self.hello_max_bytes,
                1024,
                d.hello_max_bytes,
            )?,
            outbound_queue_bytes: count(
                "outbound_queue_bytes",
                self.outbound_queue_bytes,
                64 * 1024,
                d.outbound_queue_bytes,
            )?,
            relay_queue_bytes: count(
                "relay_queue_bytes",
                self.relay_queue_bytes,
                crate::HARD_FRAME_CAP,
                d.relay_queue_bytes,
            )?,
            requests: rate(
                "requests",
                self.requests_per_s,
                self.requests_burst,
                d.requests,
            )?,
            signals: rate("signals", self.signals_per_s, self.signals_burst, d.signals)?,
            joins: rate("joins", self.joins_per_s, self.joins_burst, d.joins)?,
            relay_bytes: rate(
                "relay",
                self.relay_bytes_per_s,
                self.relay_burst_bytes,
                d.relay_bytes,
            )?,
        };
        for (name, v) in [
            ("relay_queue_bytes", limits.relay_queue_bytes),
            ("outbound_queue_bytes", limits.outbound_queue_bytes),
        ] {
            if v > 1 << 30 {
                bail!("limits.{name} = {v}: at most 1073741824 (1 GiB)");
            }
        }
        Ok(limits)
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
        assert_eq!(t.ip_quota, 64);
        assert!(!t.secret.is_empty(), "random secret");
        assert_eq!(c.turn_credential_ttl, Duration::from_secs(3600));
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(15));
    }

    #[test]
    fn the_built_in_file_spells_out_the_library_limits() {
        // `peermesh-server.toml` (the binary's defaults, documented key by key) and
        // `ServerLimits::default` (the library's) must not drift apart.
        let c = FileConfig::defaults().resolve().unwrap();
        assert_eq!(c.server_limits, ServerLimits::default());
        assert_eq!(c.admin_listen, Some("127.0.0.1:8081".parse().unwrap()));
    }

    #[test]
    fn drain_keys_are_read_and_checked() {
        let c = FileConfig::parse(
            "drain_timeout_ms = 2500\nreconnect_url = \"wss://b.example.com/ws\"\n",
        )
        .unwrap()
        .resolve()
        .unwrap();
        assert_eq!(c.drain_timeout, Duration::from_millis(2500));
        assert_eq!(c.reconnect_url.as_deref(), Some("wss://b.example.com/ws"));
        let d = FileConfig::defaults().resolve().unwrap();
        assert_eq!(d.drain_timeout, Duration::from_secs(10));
        assert_eq!(d.reconnect_url, None);
        let bad = FileConfig::parse("reconnect_url = \"https://b.example.com/ws\"\n")
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(format!("{bad:#}").contains("ws:// or wss://"), "{bad:#}");
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
