//! Prometheus metrics (text exposition via `prometheus-client`), served at `/metrics` on the
//! admin listener. Every metric is documented in `docs/OPERATIONS.md`.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::turn::TurnStats;

/// One label: `[(name, value)]`.
type Label = [(&'static str, &'static str); 1];

/// Why a connection was refused before any request was read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RefusedReason {
    MaxConnections,
    MaxConnectionsPerIp,
    FileDescriptors,
}

impl RefusedReason {
    fn as_str(self) -> &'static str {
        match self {
            RefusedReason::MaxConnections => "max_connections",
            RefusedReason::MaxConnectionsPerIp => "max_connections_per_ip",
            RefusedReason::FileDescriptors => "file_descriptors",
        }
    }
}

/// Which queue of a client overflowed when it was dropped for reading too slowly.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SlowQueue {
    /// Relayed frames and signals from other clients.
    Relay,
    /// Replies and events from the server.
    Control,
}

/// What the hub knows at scrape time.
pub(crate) struct HubSnapshot {
    pub(crate) sessions: usize,
    pub(crate) groups: usize,
    pub(crate) members: usize,
}

/// The server's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) connections: Gauge,
    sessions: Gauge,
    groups: Gauge,
    members: Gauge,
    pub(crate) relay_frames_in: Counter,
    pub(crate) relay_bytes_in: Counter,
    pub(crate) relay_frames_out: Counter,
    pub(crate) relay_bytes_out: Counter,
    pub(crate) signals: Counter,
    frames_refused: Family<Label, Counter>,
    closes: Family<Label, Counter>,
    slow_dropped: Family<Label, Counter>,
    connections_refused: Family<Label, Counter>,
    turn: Mutex<TurnMetrics>,
}

/// TURN figures, copied from [`TurnStats`] at scrape time.
struct TurnMetrics {
    last: TurnStats,
    allocations: Gauge,
    permissions: Gauge,
    channel_bindings: Gauge,
    allocations_total: Counter,
    packets: Family<Label, Counter>,
    bytes: Family<Label, Counter>,
    fast_path_packets: Family<Label, Counter>,
    auth_failures: Counter,
    quota_refusals: Family<Label, Counter>,
    peer_refusals: Counter,
    malformed: Counter,
}

/// Advance a counter that mirrors a monotonic figure kept elsewhere.
fn advance(counter: &Counter, old: u64, new: u64) {
    if new > old {
        counter.inc_by(new - old);
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("peermesh");
        macro_rules! reg {
            ($name:literal, $help:literal, $metric:expr) => {{
                let m = $metric;
                registry.register($name, $help, m.clone());
                m
            }};
        }
        let connections = reg!(
            "connections",
            "Open TCP connections to the signaling listener (HTTP and WebSocket)",
            Gauge::default()
        );
        let sessions = reg!(
            "sessions",
            "WebSocket sessions that said hello",
            Gauge::default()
        );
        let groups = reg!(
            "groups",
            "Groups with at least one member",
            Gauge::default()
        );
        let members = reg!(
            "members",
            "Group memberships (a session in two groups counts twice)",
            Gauge::default()
        );
        let relay_frames_in = reg!(
            "relay_frames_received",
            "Relay frames received from clients",
            Counter::default()
        );
        let relay_bytes_in = reg!(
            "relay_bytes_received",
            "Bytes of relay frames received from clients",
            Counter::default()
        );
        let relay_frames_out = reg!(
            "relay_frames_sent",
            "Relay frames forwarded to their receivers",
            Counter::default()
        );
        let relay_bytes_out = reg!(
            "relay_bytes_sent",
            "Bytes of relay frames forwarded to their receivers",
            Counter::default()
        );
        let signals = reg!(
            "signals_forwarded",
            "signal frames forwarded to their receivers",
            Counter::default()
        );
        let frames_refused = reg!(
            "frames_refused",
            "Client frames answered with an error frame, by error code",
            Family::<Label, Counter>::default()
        );
        let closes = reg!(
            "session_closes",
            "WebSocket sessions ended, by close code the server sent (\"client\": the client \
             closed or the connection dropped)",
            Family::<Label, Counter>::default()
        );
        let slow_dropped = reg!(
            "slow_clients_dropped",
            "Clients closed because they did not read, by queue that overflowed",
            Family::<Label, Counter>::default()
        );
        let connections_refused = reg!(
            "connections_refused",
            "TCP connections refused with HTTP 503 before any request, by limit",
            Family::<Label, Counter>::default()
        );
        let turn = TurnMetrics {
            last: TurnStats::default(),
            allocations: reg!(
                "turn_allocations",
                "Live TURN allocations",
                Gauge::default()
            ),
            permissions: reg!(
                "turn_permissions",
                "Live TURN permissions",
                Gauge::default()
            ),
            channel_bindings: reg!(
                "turn_channel_bindings",
                "Live TURN channel bindings",
                Gauge::default()
            ),
            allocations_total: reg!(
                "turn_allocations_created",
                "TURN allocations created",
                Counter::default()
            ),
            packets: reg!(
                "turn_relayed_packets",
                "Datagrams relayed by TURN, by direction (to_peer, to_client)",
                Family::<Label, Counter>::default()
            ),
            bytes: reg!(
                "turn_relayed_bytes",
                "Payload bytes relayed by TURN, by direction",
                Family::<Label, Counter>::default()
            ),
            fast_path_packets: reg!(
                "turn_fast_path_packets",
                "Relayed datagrams that took the ChannelData fast path, by direction (share = \
                 this / turn_relayed_packets)",
                Family::<Label, Counter>::default()
            ),
            auth_failures: reg!(
                "turn_auth_failures",
                "TURN requests refused with 401 although they carried credentials",
                Counter::default()
            ),
            quota_refusals: reg!(
                "turn_quota_refusals",
                "TURN Allocate requests refused with 486, by quota (user, ip, total)",
                Family::<Label, Counter>::default()
            ),
            peer_refusals: reg!(
                "turn_peer_refusals",
                "TURN requests, indications and datagrams refused by the peer-address policy",
                Counter::default()
            ),
            malformed: reg!(
                "turn_malformed",
                "TURN requests answered 400 or dropped because they were malformed",
                Counter::default()
            ),
        };
        Metrics {
            registry,
            connections,
            sessions,
            groups,
            members,
            relay_frames_in,
            relay_bytes_in,
            relay_frames_out,
            relay_bytes_out,
            signals,
            frames_refused,
            closes,
            slow_dropped,
            connections_refused,
            turn: Mutex::new(turn),
        }
    }

    pub(crate) fn refused(&self, reason: RefusedReason) {
        self.connections_refused
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    pub(crate) fn frame_refused(&self, code: peermesh::protocol::ErrorCode) {
        self.frames_refused
            .get_or_create(&[("code", code.as_str())])
            .inc();
    }

    /// A session ended; `code` is the close code the server sent, if it closed it.
    pub(crate) fn closed(&self, code: Option<u16>) {
        let label = match code {
            None => "client",
            Some(1001) => "1001",
            Some(1002) => "1002",
            Some(1007) => "1007",
            Some(1008) => "1008",
            Some(1009) => "1009",
            Some(1011) => "1011",
            Some(1013) => "1013",
            Some(_) => "other",
        };
        self.closes.get_or_create(&[("code", label)]).inc();
    }

    pub(crate) fn slow_dropped(&self, queue: SlowQueue) {
        let q = match queue {
            SlowQueue::Relay => "relay",
            SlowQueue::Control => "control",
        };
        self.slow_dropped.get_or_create(&[("queue", q)]).inc();
    }

    /// The text exposition, with the gauges that are read at scrape time brought up to date.
    pub(crate) fn render(&self, hub: HubSnapshot, turn: Option<TurnStats>) -> String {
        let clamp = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let clamp64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.sessions.set(clamp(hub.sessions));
        self.groups.set(clamp(hub.groups));
        self.members.set(clamp(hub.members));
        if let Some(s) = turn {
            let mut t = self.turn.lock().unwrap_or_else(|p| p.into_inner());
            t.allocations.set(clamp64(s.allocations));
            t.permissions.set(clamp64(s.permissions));
            t.channel_bindings.set(clamp64(s.channel_bindings));
            let old = t.last.clone();
            advance(
                &t.allocations_total,
                old.allocations_total,
                s.allocations_total,
            );
            for (dir, o_p, n_p, o_b, n_b, o_f, n_f) in [
                (
                    "to_peer",
                    old.relayed_to_peer_packets,
                    s.relayed_to_peer_packets,
                    old.relayed_to_peer_bytes,
                    s.relayed_to_peer_bytes,
                    old.fast_path_to_peer_packets,
                    s.fast_path_to_peer_packets,
                ),
                (
                    "to_client",
                    old.relayed_to_client_packets,
                    s.relayed_to_client_packets,
                    old.relayed_to_client_bytes,
                    s.relayed_to_client_bytes,
                    old.fast_path_to_client_packets,
                    s.fast_path_to_client_packets,
                ),
            ] {
                let l = [("direction", dir)];
                advance(&t.packets.get_or_create(&l), o_p, n_p);
                advance(&t.bytes.get_or_create(&l), o_b, n_b);
                advance(&t.fast_path_packets.get_or_create(&l), o_f, n_f);
            }
            advance(&t.auth_failures, old.refused_auth, s.refused_auth);
            for (quota, o, n) in [
                ("user", old.refused_user_quota, s.refused_user_quota),
                ("ip", old.refused_ip_quota, s.refused_ip_quota),
                ("total", old.refused_total_quota, s.refused_total_quota),
            ] {
                advance(&t.quota_refusals.get_or_create(&[("quota", quota)]), o, n);
            }
            advance(&t.peer_refusals, old.refused_peer, s.refused_peer);
            advance(&t.malformed, old.refused_malformed, s.refused_malformed);
            t.last = s;
        }
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!("cannot encode metrics: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.relay_frames_in.inc();
        m.frame_refused(peermesh::protocol::ErrorCode::RateLimited);
        m.closed(Some(1008));
        let text = m.render(
            HubSnapshot {
                sessions: 3,
                groups: 1,
                members: 3,
            },
            Some(TurnStats {
                allocations: 2,
                relayed_to_peer_packets: 10,
                ..Default::default()
            }),
        );
        assert!(text.contains("peermesh_sessions 3"), "{text}");
        assert!(
            text.contains("peermesh_relay_frames_received_total 1"),
            "{text}"
        );
        assert!(
            text.contains("peermesh_frames_refused_total{code=\"rate_limited\"} 1"),
            "{text}"
        );
        assert!(text.contains("peermesh_session_closes_total{code=\"1008\"} 1"));
        assert!(text.contains("peermesh_turn_allocations 2"));
        assert!(text.contains("peermesh_turn_relayed_packets_total{direction=\"to_peer\"} 10"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
