//! Embedded STUN/TURN service (UDP), built on the webrtc-rs `turn` 0.17 server.
//!
//! The turn crate does the TURN protocol work (allocations, permissions, channels, relaying).
//! Around it this module adds what a public deployment needs:
//!
//! * coturn-compatible REST credentials (`expiry:user` or `user:expiry`, password
//!   `base64(HMAC-SHA1(secret, username))`), refused with 401;
//! * allocation quotas (486 Allocation Quota Reached) per REST user part, per source address
//!   and in total. The per-source quota ([`TurnConfig::ip_quota`]) counts each allocation both
//!   under the UDP source address of its Allocate and under the address named by the user part
//!   (`peer7@203.0.113.5`, see [`session_user`]: the signaling session's source address, which
//!   the client cannot forge since the username is signed); either count reaching the quota
//!   refuses the Allocate. IPv6 addresses count per /64 (a subscriber's usual share), and
//!   IPv4-mapped IPv6 addresses as their IPv4 address;
//! * strict parsing of what the turn crate would misread: an XOR-PEER-ADDRESS whose length
//!   does not match its family (8 bytes for IPv4, 20 for IPv6), of an unknown family, or a
//!   CreatePermission / ChannelBind without any, gets 400 Bad Request (a Send indication with
//!   one is dropped); so does a REQUESTED-ADDRESS-FAMILY that is not 4 bytes long. Datagrams
//!   that are neither ChannelData nor a decodable STUN message are dropped. All of these are
//!   counted in [`TurnStats::refused_malformed`];
//! * RFC 6156 / RFC 8656 §7.2 address families: an Allocate asking (with
//!   REQUESTED-ADDRESS-FAMILY, or by default IPv4 without it) for a relay family the service
//!   does not have (the relay IP's family) gets 440 Address Family not Supported;
//! * a peer-address policy ([`is_denied_peer`]): CreatePermission / ChannelBind towards a denied
//!   peer get 403, Send indications to it are dropped, and relay sockets drop traffic to and from
//!   it as a second line of defence;
//! * RFC 8656 lifetimes (default 600 s, max 3599 s — see below), enlarged socket buffers,
//!   statistics and logging (target `peermesh_server::turn`);
//! * a ChannelData fast path. The turn crate's datapath copies each datagram about three
//!   times per direction and takes async mutexes per packet. The guard watches ChannelBind,
//!   CreatePermission, Refresh and Allocate requests and their success responses, so it knows
//!   each allocation's live channel bindings and permissions; ChannelData from a client on a
//!   live channel goes straight out of the allocation's relay socket, and a datagram from a
//!   bound peer goes straight to the client as ChannelData. Only traffic with both a live
//!   binding and a live permission (RFC 8656 §9, §12) takes it; everything else (Send and Data
//!   indications, unknown channels) still goes through the turn crate. The listener and relay
//!   sockets are read with `recvmmsg` (up to 32 and 8 datagrams per call) and each batch's
//!   ChannelData leaves with one `sendmmsg` per destination (see `batch.rs`).
//!
//! Lifetimes: allocations get `max(600, min(requested, 3599))` seconds (turn 0.17.2 cannot grant
//! exactly 3600); permissions last 300 s and channel bindings 600 s (turn's fixed
//! `PERMISSION_TIMEOUT` and [`TurnConfig::channel_lifetime`]), both refreshed by repeating the
//! request (a ChannelBind also refreshes the permission of its peer).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use peermesh_server::turn::{TurnConfig, TurnServer};
//! let turn = TurnServer::start(TurnConfig::default()).await?;
//! let (username, password) = turn.credentials("alice", std::time::Duration::from_secs(3600));
//! println!("turn:{}?transport=udp {username} {password}", turn.local_addr());
//! turn.shutdown().await;
//! # Ok(()) }
//! ```

mod auth;
mod batch;
#[cfg(test)]
mod fuzz_tests;
mod listener;
mod policy;
mod relay;
mod socket;
mod wire;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::prelude::BASE64_STANDARD;
use base64::Engine as _;
use ipnet::IpNet;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use turn::allocation::AllocationInfo;
use turn::server::config::{ConnConfig, ServerConfig};

pub use auth::{identity_user, rest_credentials, session_user};
pub use policy::is_denied_peer;

use listener::GuardedListener;
use relay::{FastMap, RelayConn, RelayGenerator};

/// The `tracing` target of everything this module logs.
pub(crate) const LOG: &str = "peermesh_server::turn";

/// Channel binding lifetime (RFC 8656 §12: 10 minutes).
pub const CHANNEL_BIND_LIFETIME: Duration = Duration::from_secs(600);
/// Permission lifetime (RFC 8656 §9: 300 s; fixed inside the turn crate).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Default allocation lifetime (RFC 8656 §7.2).
pub const DEFAULT_ALLOCATION_LIFETIME: Duration =
    Duration::from_secs(listener::DEFAULT_LIFETIME_SECS as u64);
/// Longest allocation lifetime granted (see the module docs for why not 3600 s).
pub const MAX_ALLOCATION_LIFETIME: Duration =
    Duration::from_secs(listener::MAX_LIFETIME_SECS as u64);

/// How often the statistics line is logged (only when something changed).
const STATS_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How long shutdown waits for the turn crate to close its allocations.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Configuration of the embedded STUN/TURN service.
#[derive(Debug, Clone)]
pub struct TurnConfig {
    /// UDP STUN/TURN listener (port 0 picks a free port). Default `127.0.0.1:3478`.
    pub listen: SocketAddr,
    /// Address advertised in XOR-RELAYED-ADDRESS (for a host behind a 1:1 NAT). Default `None`:
    /// the relay socket's own IP.
    pub public_ip: Option<IpAddr>,
    /// IP the relay sockets bind to. Default `None`: the listen IP.
    pub relay_ip: Option<IpAddr>,
    /// Inclusive port range of relay sockets. Default `(49152, 65535)`.
    pub relay_ports: (u16, u16),
    /// Authentication realm. Default `"peermesh"`.
    pub realm: String,
    /// Shared secret of the TURN REST credentials. Default: 32 random bytes, base64.
    pub secret: String,
    /// Live allocations allowed per identity: the REST user part without its address
    /// (`u.alice` for every session of user `alice`, see [`identity_user`]; `peer7` on an open
    /// server). Default 16.
    pub user_quota: usize,
    /// Live allocations allowed in total. Default 2048.
    pub total_quota: usize,
    /// Live allocations allowed per source address, counted both per UDP source address of
    /// the Allocate and per address in the REST user part (`peer7@203.0.113.5`, see
    /// [`session_user`]); either reaching it gives 486. IPv6 addresses count per /64.
    /// Default 64.
    pub ip_quota: usize,
    /// Peer CIDRs exempt from the deny list of [`is_denied_peer`] (e.g. `127.0.0.0/8` in tests).
    pub allow_peers: Vec<IpNet>,
    /// SO_RCVBUF and SO_SNDBUF requested for the listener and relay sockets. Default 4 MiB.
    pub recv_buffer_bytes: usize,
    /// Channel binding lifetime. Default [`CHANNEL_BIND_LIFETIME`] (the RFC's 10 minutes);
    /// shorter only for tests.
    pub channel_lifetime: Duration,
}

impl Default for TurnConfig {
    fn default() -> Self {
        let secret: [u8; 32] = rand::random();
        TurnConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 3478)),
            public_ip: None,
            relay_ip: None,
            relay_ports: (49152, 65535),
            realm: "peermesh".into(),
            secret: BASE64_STANDARD.encode(secret),
            user_quota: 16,
            total_quota: 2048,
            ip_quota: 64,
            allow_peers: Vec::new(),
            recv_buffer_bytes: 4 * 1024 * 1024,
            channel_lifetime: CHANNEL_BIND_LIFETIME,
        }
    }
}

/// A snapshot of the service's counters. `allocations`, `permissions` and `channel_bindings`
/// are gauges (live now), everything else counts since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TurnStats {
    /// Live allocations.
    pub allocations: u64,
    /// Live permissions (peer IPs a client may exchange data with, RFC 8656 §9), summed over
    /// the live allocations, as the ChannelData fast path knows them.
    pub permissions: u64,
    /// Live channel bindings (RFC 8656 §12), summed over the live allocations, as the
    /// ChannelData fast path knows them.
    pub channel_bindings: u64,
    /// Allocations created since start.
    pub allocations_total: u64,
    /// Datagrams relayed from clients to peers.
    pub relayed_to_peer_packets: u64,
    /// Of those, ChannelData relayed by our fast path (not through the turn crate).
    pub fast_path_to_peer_packets: u64,
    /// Payload bytes relayed from clients to peers.
    pub relayed_to_peer_bytes: u64,
    /// Datagrams relayed from peers to clients (ChannelData or Data indications).
    pub relayed_to_client_packets: u64,
    /// Of those, ChannelData sent by our fast path (not through the turn crate).
    pub fast_path_to_client_packets: u64,
    /// Payload bytes relayed from peers to clients.
    pub relayed_to_client_bytes: u64,
    /// Requests answered 401 although they carried credentials (bad, expired or malformed).
    pub refused_auth: u64,
    /// Allocate requests answered 486 because of the per-user quota.
    pub refused_user_quota: u64,
    /// Allocate requests answered 486 because of the total quota.
    pub refused_total_quota: u64,
    /// Allocate requests answered 486 because of the per-source quota ([`TurnConfig::ip_quota`]:
    /// UDP source address or address in the user part).
    pub refused_ip_quota: u64,
    /// Requests answered 403, indications dropped and relay datagrams dropped because of the
    /// peer policy.
    pub refused_peer: u64,
    /// Requests answered 400 and datagrams dropped because they could not be parsed: malformed
    /// or missing XOR-PEER-ADDRESS (CreatePermission, ChannelBind, Send indications), malformed
    /// REQUESTED-ADDRESS-FAMILY, and datagrams that are neither ChannelData nor a decodable
    /// STUN message.
    pub refused_malformed: u64,
}

/// Counters of one direction, on a cache line of their own (the two directions are counted
/// by different tasks, often on different cores).
#[derive(Default)]
#[repr(align(64))]
pub(crate) struct DirCounters {
    pub(crate) packets: AtomicU64,
    pub(crate) bytes: AtomicU64,
    /// Packets that took the ChannelData fast path.
    pub(crate) fast: AtomicU64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) to_peer: DirCounters,
    pub(crate) to_client: DirCounters,
    pub(crate) allocations_total: AtomicU64,
    pub(crate) refused_auth: AtomicU64,
    pub(crate) refused_user_quota: AtomicU64,
    pub(crate) refused_total_quota: AtomicU64,
    pub(crate) refused_ip_quota: AtomicU64,
    pub(crate) refused_peer: AtomicU64,
    pub(crate) refused_malformed: AtomicU64,
}

/// A live allocation, keyed by the client's transport address (one listener, UDP only, so that
/// identifies the 5-tuple).
pub(crate) struct Live {
    pub(crate) user: String,
    pub(crate) username: String,
    pub(crate) relay: SocketAddr,
    pub(crate) keys: IpKeys,
}

/// What an allocation counts against the per-source quota (see [`quota_ip`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IpKeys {
    /// The UDP source address of the Allocate.
    pub(crate) src: IpAddr,
    /// The address named in the REST user part (`peer7@203.0.113.5`), if any.
    pub(crate) cred: Option<IpAddr>,
}

impl IpKeys {
    pub(crate) fn new(src: IpAddr, user: &str) -> IpKeys {
        IpKeys {
            src: quota_ip(src),
            cred: auth::user_ip(user).map(quota_ip),
        }
    }
}

/// The key an address counts under for the per-source quota (and for the signaling listener's
/// `max_connections_per_ip`): IPv4 addresses as they are (IPv4-mapped IPv6 ones as their IPv4
/// address), other IPv6 addresses by their /64.
pub(crate) fn quota_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::MAX >> 64))),
        },
    }
}

/// An Allocate request handed to the turn crate, waiting for its answer.
pub(crate) struct Pending {
    pub(crate) src: SocketAddr,
    pub(crate) user: String,
    pub(crate) username: String,
    pub(crate) keys: IpKeys,
    pub(crate) at: Instant,
}

/// A request the fast path wants to see the outcome of.
pub(crate) enum PendingOp {
    ChannelBind { number: u16, peer: SocketAddr },
    CreatePermission { peers: Vec<SocketAddr> },
    Refresh,
}

/// A Refresh, CreatePermission or ChannelBind handed to the turn crate, waiting for its answer.
pub(crate) struct PendingReq {
    pub(crate) src: SocketAddr,
    pub(crate) op: PendingOp,
    pub(crate) at: Instant,
}

/// Quota bookkeeping, and the requests the fast path learns from.
#[derive(Default)]
pub(crate) struct Book {
    pub(crate) live: HashMap<SocketAddr, Live>,
    pub(crate) per_user: HashMap<String, usize>,
    /// Live allocations per [`IpKeys::src`].
    pub(crate) per_src_ip: HashMap<IpAddr, usize>,
    /// Live allocations per [`IpKeys::cred`].
    pub(crate) per_cred_ip: HashMap<IpAddr, usize>,
    pub(crate) pending: HashMap<[u8; 12], Pending>,
    pub(crate) pending_reqs: HashMap<[u8; 12], PendingReq>,
}

/// State shared by the guard, the relay sockets and the handle.
pub(crate) struct Shared {
    pub(crate) realm: String,
    pub(crate) secret: String,
    pub(crate) user_quota: usize,
    pub(crate) total_quota: usize,
    pub(crate) ip_quota: usize,
    /// Whether the relay sockets are IPv4 (else IPv6): the only family Allocate can get.
    pub(crate) relay_v4: bool,
    pub(crate) allow_peers: Vec<IpNet>,
    pub(crate) channel_lifetime: Duration,
    pub(crate) counters: Counters,
    book: Mutex<Book>,
    /// Relay sockets by port (they all bind the relay IP).
    relays: Mutex<HashMap<u16, Weak<RelayConn>>>,
    /// The fast path's allocations, by client transport address.
    fast: RwLock<FastMap<SocketAddr, Arc<RelayConn>>>,
    pub(crate) relay_buf_logged: AtomicBool,
}

impl Book {
    /// Counts a new live allocation.
    pub(crate) fn count(&mut self, user: &str, keys: IpKeys) {
        *self.per_user.entry(user.to_owned()).or_insert(0) += 1;
        *self.per_src_ip.entry(keys.src).or_insert(0) += 1;
        if let Some(k) = keys.cred {
            *self.per_cred_ip.entry(k).or_insert(0) += 1;
        }
    }

    /// Uncounts a live allocation that ended.
    fn uncount(&mut self, user: &str, keys: IpKeys) {
        fn dec<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, k: &K) {
            if let Some(n) = map.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(k);
                }
            }
        }
        dec(&mut self.per_user, &user.to_owned());
        dec(&mut self.per_src_ip, &keys.src);
        if let Some(k) = keys.cred {
            dec(&mut self.per_cred_ip, &k);
        }
    }
}

impl Shared {
    /// The state of a service configured by `config` whose relay sockets bind `relay_ip`.
    fn new(config: &TurnConfig, relay_ip: IpAddr) -> Shared {
        Shared {
            realm: config.realm.clone(),
            secret: config.secret.clone(),
            user_quota: config.user_quota,
            total_quota: config.total_quota,
            ip_quota: config.ip_quota,
            relay_v4: relay_ip.is_ipv4(),
            allow_peers: config.allow_peers.clone(),
            channel_lifetime: config.channel_lifetime,
            counters: Counters::default(),
            book: Mutex::new(Book::default()),
            relays: Mutex::new(HashMap::new()),
            fast: RwLock::new(FastMap::default()),
            relay_buf_logged: AtomicBool::new(false),
        }
    }

    /// Whether `src` holds a live allocation of the user in `username` (any expiry).
    pub(crate) fn owns_allocation(&self, src: SocketAddr, username: &str) -> bool {
        let Ok((_, user)) = auth::parse_rest_username(username) else {
            return false;
        };
        self.lock_book()
            .live
            .get(&src)
            .is_some_and(|l| l.user == auth::quota_user(user))
    }

    pub(crate) fn denied(&self, ip: IpAddr) -> bool {
        is_denied_peer(ip, &self.allow_peers)
    }

    /// Counts `n` requests, indications or datagrams refused by the peer policy.
    pub(crate) fn refuse_peer(&self, n: u64) {
        self.counters.refused_peer.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a request or datagram refused as malformed.
    pub(crate) fn refuse_malformed(&self) {
        self.counters
            .refused_malformed
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn lock_book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn register_relay(&self, conn: &Arc<RelayConn>) {
        let mut relays = self.relays.lock().unwrap_or_else(|e| e.into_inner());
        relays.retain(|_, w| w.strong_count() > 0);
        relays.insert(conn.local().port(), Arc::downgrade(conn));
    }

    fn shut_relays(&self) {
        self.fast.write().unwrap_or_else(|e| e.into_inner()).clear();
        let relays = std::mem::take(&mut *self.relays.lock().unwrap_or_else(|e| e.into_inner()));
        for r in relays.values().filter_map(Weak::upgrade) {
            r.shut();
        }
    }

    /// The fast path's view of the allocation of `client`, if any.
    pub(crate) fn fast_relay(&self, client: SocketAddr) -> Option<Arc<RelayConn>> {
        self.with_fast_relay(client, Arc::clone)
    }

    /// Runs `f` on the fast path's view of the allocation of `client` (under a read lock: `f`
    /// must not block).
    pub(crate) fn with_fast_relay<R>(
        &self,
        client: SocketAddr,
        f: impl FnOnce(&Arc<RelayConn>) -> R,
    ) -> Option<R> {
        self.fast
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&client)
            .map(f)
    }

    /// An allocation of `client` on relay port `port` was granted at `at` for `lifetime`:
    /// the fast path may serve it from now on.
    pub(crate) fn fast_attach(
        &self,
        client: SocketAddr,
        port: u16,
        at: Instant,
        lifetime: Duration,
    ) {
        let relay = self
            .relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&port)
            .and_then(Weak::upgrade);
        let Some(relay) = relay else {
            tracing::debug!(target: LOG, client = %client, port, "no relay socket for the fast path");
            return;
        };
        relay.attach(client, at, lifetime);
        self.fast
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client, relay);
    }

    /// The allocation of `client` (on relay port `port`, if known) ended.
    pub(crate) fn fast_detach(&self, client: SocketAddr, port: Option<u16>) {
        let mut fast = self.fast.write().unwrap_or_else(|e| e.into_inner());
        let matches = fast.get(&client).is_some_and(|r| match port {
            Some(p) => r.local().port() == p,
            None => true,
        });
        if matches {
            if let Some(r) = fast.remove(&client) {
                r.detach();
            }
        }
    }

    /// Live permissions and channel bindings over all allocations the fast path knows.
    fn live_grants(&self) -> (u64, u64) {
        let now = Instant::now();
        let fast = self.fast.read().unwrap_or_else(|e| e.into_inner());
        fast.values().fold((0, 0), |(p, c), relay| {
            let (rp, rc) = relay.live_counts(now);
            (p + rp as u64, c + rc as u64)
        })
    }

    fn stats(&self) -> TurnStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (permissions, channel_bindings) = self.live_grants();
        TurnStats {
            allocations: self.lock_book().live.len() as u64,
            permissions,
            channel_bindings,
            allocations_total: get(&c.allocations_total),
            relayed_to_peer_packets: get(&c.to_peer.packets),
            fast_path_to_peer_packets: get(&c.to_peer.fast),
            relayed_to_peer_bytes: get(&c.to_peer.bytes),
            relayed_to_client_packets: get(&c.to_client.packets),
            fast_path_to_client_packets: get(&c.to_client.fast),
            relayed_to_client_bytes: get(&c.to_client.bytes),
            refused_auth: get(&c.refused_auth),
            refused_user_quota: get(&c.refused_user_quota),
            refused_total_quota: get(&c.refused_total_quota),
            refused_ip_quota: get(&c.refused_ip_quota),
            refused_peer: get(&c.refused_peer),
            refused_malformed: get(&c.refused_malformed),
        }
    }

    /// An allocation ended (turn's close notification): free its quota slot.
    fn allocation_closed(&self, info: &AllocationInfo, why: &str) {
        let src = info.five_tuple.src_addr;
        self.fast_detach(src, Some(info.relay_addr.port()));
        let mut book = self.lock_book();
        let matches = book
            .live
            .get(&src)
            .is_some_and(|l| l.relay == info.relay_addr);
        if !matches {
            return;
        }
        if let Some(l) = book.live.remove(&src) {
            book.uncount(&l.user, l.keys);
            let live = book.live.len();
            drop(book);
            tracing::info!(target: LOG, client = %src, username = %l.username, relay = %l.relay,
                live, "allocation closed ({why})");
        }
    }
}

/// The embedded STUN/TURN service. See [`TurnServer::start`].
pub struct TurnServer;

impl TurnServer {
    /// Binds the UDP listener and starts serving STUN and TURN on it (on the current tokio
    /// runtime).
    pub async fn start(config: TurnConfig) -> anyhow::Result<TurnHandle> {
        let (min_port, max_port) = config.relay_ports;
        anyhow::ensure!(
            min_port != 0 && min_port <= max_port,
            "invalid relay port range {min_port}-{max_port}"
        );
        anyhow::ensure!(!config.secret.is_empty(), "the TURN REST secret is empty");
        anyhow::ensure!(!config.realm.is_empty(), "the TURN realm is empty");
        anyhow::ensure!(
            config.channel_lifetime >= Duration::from_secs(1),
            "the channel binding lifetime must be at least 1 s"
        );
        let stop = CancellationToken::new();
        let started = serve(config, stop.clone()).await?;
        Ok(started.into_handle(stop))
    }
}

/// What [`serve`] set up.
struct Started {
    shared: Arc<Shared>,
    listener: Arc<GuardedListener>,
    local_addr: SocketAddr,
    server: turn::server::Server,
}

impl Started {
    fn into_handle(self, stop: CancellationToken) -> TurnHandle {
        TurnHandle {
            inner: Arc::new(HandleInner {
                shared: self.shared,
                listener: self.listener,
                local_addr: self.local_addr,
                server: tokio::sync::Mutex::new(Some(self.server)),
                stop,
            }),
        }
    }
}

/// Binds the listener and starts the turn server and our tasks on the current runtime.
async fn serve(config: TurnConfig, stop: CancellationToken) -> anyhow::Result<Started> {
    let (min_port, max_port) = config.relay_ports;
    let bound = socket::bind_udp(config.listen, config.recv_buffer_bytes)
        .with_context(|| format!("binding TURN listener {}", config.listen))?;
    let local_addr = bound.socket.local_addr().context("reading local address")?;
    tracing::info!(target: LOG, %local_addr, requested = config.recv_buffer_bytes,
        rcvbuf = bound.rcvbuf, sndbuf = bound.sndbuf, "STUN/TURN listening (UDP)");
    let relay_ip = config.relay_ip.unwrap_or(local_addr.ip());
    if relay_ip.is_unspecified() && config.public_ip.is_none() {
        tracing::warn!(target: LOG, %relay_ip,
            "relay sockets bind an unspecified address and no public_ip is set: \
             clients will be told an unusable relayed address");
    }

    let shared = Arc::new(Shared::new(&config, relay_ip));
    let listener = Arc::new(GuardedListener::new(
        bound.socket,
        local_addr,
        Arc::clone(&shared),
    ));
    let generator = RelayGenerator {
        shared: Arc::clone(&shared),
        relay_ip,
        public_ip: config.public_ip,
        min_port,
        max_port,
        buffer_bytes: config.recv_buffer_bytes,
        listener: listener.socket(),
    };

    let (close_tx, mut close_rx) = mpsc::channel::<AllocationInfo>(1024);
    let server = turn::server::Server::new(ServerConfig {
        conn_configs: vec![ConnConfig {
            conn: listener.clone(),
            relay_addr_generator: Box::new(generator),
        }],
        realm: config.realm.clone(),
        auth_handler: Arc::new(auth::RestAuthHandler {
            secret: config.secret.clone(),
            realm: config.realm.clone(),
            shared: Arc::downgrade(&shared),
        }),
        channel_bind_timeout: config.channel_lifetime,
        alloc_close_notify: Some(close_tx),
    })
    .await
    .map_err(|e| anyhow::anyhow!("starting the TURN server: {e}"))?;

    // Ends by itself once the turn crate has dropped every notification sender.
    tokio::spawn({
        let shared = Arc::clone(&shared);
        async move {
            while let Some(info) = close_rx.recv().await {
                shared.allocation_closed(&info, "expired, refreshed to 0 or shut down");
            }
        }
    });
    tokio::spawn(log_stats(Arc::clone(&shared), stop));

    Ok(Started {
        shared,
        listener,
        local_addr,
        server,
    })
}

async fn log_stats(shared: Arc<Shared>, stop: CancellationToken) {
    let mut last = TurnStats::default();
    let mut tick = tokio::time::interval(STATS_LOG_INTERVAL);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = shared.stats();
        if now != last {
            tracing::info!(target: LOG,
                allocations = now.allocations,
                permissions = now.permissions,
                channel_bindings = now.channel_bindings,
                allocations_total = now.allocations_total,
                to_peer_packets = now.relayed_to_peer_packets,
                fast_to_peer_packets = now.fast_path_to_peer_packets,
                to_peer_bytes = now.relayed_to_peer_bytes,
                to_client_packets = now.relayed_to_client_packets,
                fast_to_client_packets = now.fast_path_to_client_packets,
                to_client_bytes = now.relayed_to_client_bytes,
                refused_auth = now.refused_auth,
                refused_user_quota = now.refused_user_quota,
                refused_total_quota = now.refused_total_quota,
                refused_ip_quota = now.refused_ip_quota,
                refused_peer = now.refused_peer,
                refused_malformed = now.refused_malformed,
                "TURN stats");
            last = now;
        }
    }
}

struct HandleInner {
    shared: Arc<Shared>,
    listener: Arc<GuardedListener>,
    local_addr: SocketAddr,
    server: tokio::sync::Mutex<Option<turn::server::Server>>,
    stop: CancellationToken,
}

impl Drop for HandleInner {
    /// The last handle is gone: stop serving. (Dropping the turn server ends its read loop,
    /// which then closes its allocations.)
    fn drop(&mut self) {
        self.stop.cancel();
        self.listener.shut();
    }
}

/// A running STUN/TURN service. Clones share it; dropping the last clone stops it (prefer
/// [`TurnHandle::shutdown`], which also waits for the allocations to close).
#[derive(Clone)]
pub struct TurnHandle {
    inner: Arc<HandleInner>,
}

impl TurnHandle {
    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TurnStats {
        self.inner.shared.stats()
    }

    /// The authentication realm.
    pub fn realm(&self) -> &str {
        &self.inner.shared.realm
    }

    /// REST credentials for `user`, valid for `ttl` from now: `("{expiry}:{user}", password)`.
    pub fn credentials(&self, user: &str, ttl: Duration) -> (String, String) {
        let expiry = auth::now_unix().saturating_add(ttl.as_secs());
        rest_credentials(&self.inner.shared.secret, user, expiry)
    }

    /// Stops serving: closes the listener, every allocation and every relay socket. Idempotent.
    pub async fn shutdown(&self) {
        let Some(server) = self.inner.server.lock().await.take() else {
            return;
        };
        if let Err(e) = server.close().await {
            tracing::debug!(target: LOG, "closing the turn server: {e}");
        }
        // The turn crate closes its allocations after `close` has returned; wait for the
        // notifications (bounded), then close whatever is left ourselves.
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while !self.inner.shared.lock_book().live.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.inner.listener.shut();
        self.inner.shared.shut_relays();
        self.inner.stop.cancel();
        let leftover = std::mem::take(&mut *self.inner.shared.lock_book());
        for (src, l) in leftover.live {
            tracing::info!(target: LOG, client = %src, username = %l.username, relay = %l.relay,
                "allocation closed (shutdown)");
        }
        drop(server);
        tracing::info!(target: LOG, local_addr = %self.inner.local_addr, "STUN/TURN stopped");
    }
}
