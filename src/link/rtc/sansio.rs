//! The direct path on webrtc-rs's Sans-I/O core (the `rtc` crate, 0.21; cargo feature `sansio`).
//!
//! The core does no I/O and no gathering: this file binds the sockets, adds the host
//! candidates, and runs one tokio task per PeerConnection (the [`Driver`]) that owns the
//! [`RTCPeerConnection`] and everything it reads and writes. The [`Rtc`] and [`DirectTx`] handles
//! talk to it through a command channel and read what it publishes in [`Shared`] (one owner per
//! piece of state).
//!
//! The one rule of driving the core: after every input (a datagram, a command, a timer), poll
//! events, reads and writes in turn until a pass produces nothing ("drain to quiescence").
//! `poll_event` queues writes (the DTLS handshake, dialing the negotiated channels), SCTP
//! flushes only inside `poll_write`, and `poll_timeout` does not report queued work; a driver
//! that waits for the next timer instead delays every handshake step by it.
//!
//! Gathering is ours too: a host candidate per allowed local address, a server-reflexive one per
//! STUN server (a Binding request from each host socket), and a relay candidate per TURN server
//! (UDP, long-term credentials) through webrtc-rs's Sans-I/O TURN client, one [`Gatherer`] per
//! (host socket, server). A datagram from a server's address goes to its gatherer, any other to
//! the PeerConnection; relayed data comes out of the gatherer into the PeerConnection with the
//! relayed address as its local address, and the PeerConnection's writes from a relayed address
//! go out through the relay.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::data_channel::{RTCDataChannelId, RTCDataChannelInit};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::{RTCIceConnectionState, RTCPeerConnectionState};
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, CandidateRelayConfig, CandidateServerReflexiveConfig,
    RTCIceCandidate, RTCIceCandidateInit, RTCIceCandidateType,
};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use rtc::stun::message::TransactionId;
use rtc::turn::client::{Client as TurnClient, ClientConfig as TurnConfig, Event as TurnEvent};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::sdp::{candidate_json, filter_sdp, parse_candidate, refused_remote, relay_candidate};
use super::LinkInput;
use super::{
    Candidates, Channel, ConnState, FrameSink, IceTuning, RtcError, RtcEvent, RtcOptions, DC_LOW,
    INBAND_LABEL, RELIABLE_ID, RELIABLE_LABEL, UNRELIABLE_ID, UNRELIABLE_LABEL,
};
use crate::protocol::IceServer;
use crate::{CandidatePair, CandidateType};

/// SO_RCVBUF and SO_SNDBUF of every socket (the kernel doubles and caps them): a burst of
/// SCTP packets must not overflow the default 208 KiB while the driver is busy.
const SOCKET_BUFFER: usize = 4 << 20;
/// Datagrams read from one socket before the core is drained.
const READ_BURST: usize = 64;
/// Largest datagram read (an SCTP packet is at most the MTU; STUN and DTLS are smaller).
const DATAGRAM_MAX: usize = 2048;
/// Connectivity-check pacing: every tick checks every pair in progress. The core's first check
/// waits one tick after the PeerConnection is made, so this is about the least time to open on
/// loopback (the core's default is 200 ms).
const ICE_CHECK_INTERVAL: Duration = Duration::from_millis(10);
/// Checks of a pair before it counts as failed: with the pacing above, a pair has 1.6 s to
/// answer (as with the default backend's 200 ms x 8), so a path of a long round trip is not
/// given up before its first answer can arrive. (A pair that never answers gets 100 checks a
/// second for those 1.6 s; one that answers is checked no more.)
const ICE_MAX_CHECKS: u16 = 160;
/// How often a TURN permission for one peer may be asked for while none is granted.
const PERMISSION_RETRY: Duration = Duration::from_secs(2);
/// Peers whose permission requests are remembered per relay (older ones are forgotten first).
const PERMISSIONS_REMEMBERED: usize = 64;
/// How long resolving the ICE servers' names may take in all (it delays the PeerConnection).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// DTLS datagrams held while ICE has not connected yet (see [`Driver::early`]).
const EARLY_MAX: usize = 16;
/// The longest the driver sleeps when the core names no deadline.
const IDLE_WAKE: Duration = Duration::from_secs(1);

impl From<rtc::shared::error::Error> for RtcError {
    fn from(e: rtc::shared::error::Error) -> Self {
        RtcError::new("webrtc-rs sansio", e)
    }
}

/// Builds PeerConnections for one client.
pub(crate) struct RtcFactory {
    opts: RtcOptions,
    ice_servers: Mutex<Vec<IceServer>>,
}

impl RtcFactory {
    pub(crate) fn new(opts: &RtcOptions, ice_servers: &[IceServer]) -> Result<Self, String> {
        if let Some((min, max)) = opts.udp_ports {
            if min == 0 || min > max {
                return Err(format!("UDP port range {min}-{max}: empty or starts at 0"));
            }
        }
        Ok(RtcFactory {
            opts: opts.clone(),
            ice_servers: Mutex::new(ice_servers.to_vec()),
        })
    }

    /// Use these ICE servers for PeerConnections created from now on.
    pub(crate) fn set_ice_servers(&self, ice_servers: &[IceServer]) {
        *self.ice_servers.lock().expect("rtc config lock") = ice_servers.to_vec();
    }

    /// A new PeerConnection of generation `gen` whose events go to `tx` and whose incoming
    /// messages go to `on_frame`, one at a time, in the order the channels deliver them.
    pub(crate) async fn create(
        &self,
        gen: u32,
        candidates: Candidates,
        tx: mpsc::UnboundedSender<LinkInput>,
        on_frame: FrameSink,
    ) -> Result<Rtc, RtcError> {
        let ice_servers = self.ice_servers.lock().expect("rtc config lock").clone();
        let servers =
            match tokio::time::timeout(RESOLVE_TIMEOUT, resolve_servers(&ice_servers)).await {
                Ok(servers) => servers,
                Err(_) => {
                    tracing::debug!("sansio backend: resolving the ICE servers timed out");
                    Vec::new()
                }
            };
        let sockets = bind_host_sockets(&self.opts)?;
        if sockets.is_empty() {
            return Err(RtcError::new(
                "sansio backend",
                "no local address to gather a host candidate from",
            ));
        }
        let mut gatherers = Vec::new();
        for (socket, s) in sockets.iter().enumerate() {
            let host = s.addr;
            for server in servers
                .iter()
                .filter(|v| v.addr.is_ipv4() == host.is_ipv4())
            {
                if candidates == Candidates::RelayOnly && server.turn.is_none() {
                    continue;
                }
                match Gatherer::new(socket, host, server) {
                    Ok(g) => gatherers.push(g),
                    Err(e) => tracing::debug!(server = %server.addr, "sansio backend: {e}"),
                }
            }
        }
        if candidates == Candidates::RelayOnly && gatherers.is_empty() {
            return Err(RtcError::new(
                "sansio backend",
                "relay-only needs a TURN server (turn:, UDP) reachable from a local address",
            ));
        }
        let ice = IceTuning::new(candidates);
        let settings = SettingEngineBuilder::new()
            .with_ice_timeouts(
                Some(ice.disconnected),
                Some(ice.failed),
                Some(ice.keepalive),
            )
            .with_ice_connection_attempts(Some(ICE_CHECK_INTERVAL), Some(ICE_MAX_CHECKS))
            .with_host_acceptance_min_wait(Some(ice.host_wait))
            .with_prflx_acceptance_min_wait(Some(ice.prflx_wait))
            .with_srflx_acceptance_min_wait(Some(ice.srflx_wait))
            .with_relay_acceptance_min_wait(Some(ice.relay_wait))
            .build();
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(settings)
            .build(Instant::now())?;
        let r = pc
            .create_data_channel(
                RELIABLE_LABEL,
                Some(RTCDataChannelInit {
                    ordered: true,
                    negotiated: Some(RELIABLE_ID),
                    ..Default::default()
                }),
            )?
            .id();
        let u = pc
            .create_data_channel(
                UNRELIABLE_LABEL,
                Some(RTCDataChannelInit {
                    ordered: false,
                    max_retransmits: Some(0),
                    negotiated: Some(UNRELIABLE_ID),
                    ..Default::default()
                }),
            )?
            .id();
        if let Some(mut dc) = pc.data_channel(r) {
            dc.set_buffered_amount_low_threshold(DC_LOW as u32);
        }
        let shared = Arc::new(Shared::default());
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (close, close_rx) = watch::channel(());
        let driver = Driver {
            gen,
            candidates,
            pc,
            sockets,
            gatherers,
            r,
            u,
            u2: None,
            peer_u2: None,
            open: [false; 2],
            cmds: cmd_rx,
            close: close_rx,
            events: tx,
            on_frame,
            delivering: None,
            shared: shared.clone(),
            gathered: false,
            gathering_ended: false,
            remote_set: false,
            pending: Vec::new(),
            signaled: HashMap::new(),
            pair: None,
            out: Vec::new(),
            ice_connected: false,
            early: Vec::new(),
        };
        tokio::spawn(driver.run());
        Ok(Rtc {
            cmds,
            shared,
            inband: false,
            _close: close,
        })
    }
}

/// A bound host socket and its address (read once: the hot paths route by it).
struct HostSocket {
    socket: UdpSocket,
    addr: SocketAddr,
}

/// Non-blocking UDP sockets, one per local address the options allow, in the port range if
/// one is set, with large buffers.
fn bind_host_sockets(opts: &RtcOptions) -> Result<Vec<HostSocket>, RtcError> {
    let interfaces = rtc::shared::ifaces::ifaces()
        .map_err(|e| RtcError::new("listing network interfaces", e))?;
    let mut ips: Vec<IpAddr> = interfaces
        .iter()
        .filter_map(|i| i.addr.map(|a| a.ip()))
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast())
        .filter(|ip| !ip.is_loopback() || opts.include_loopback)
        // IPv6 link-local addresses need a scope id no candidate line carries.
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .filter(|ip| opts.ip_filter.as_ref().is_none_or(|f| f(*ip)))
        .collect();
    ips.sort();
    ips.dedup();
    let mut sockets = Vec::new();
    for ip in ips {
        match bind_in_range(ip, opts.udp_ports).and_then(|socket| {
            let addr = socket.local_addr()?;
            Ok(HostSocket { socket, addr })
        }) {
            Ok(s) => sockets.push(s),
            Err(e) => tracing::debug!(%ip, "no host candidate: {e}"),
        }
    }
    Ok(sockets)
}

fn bind_in_range(ip: IpAddr, ports: Option<(u16, u16)>) -> io::Result<UdpSocket> {
    let (min, max) = ports.unwrap_or((0, 0));
    let mut last = io::Error::new(io::ErrorKind::AddrInUse, "no free port in range");
    for port in min..=max {
        match bind_one(SocketAddr::new(ip, port)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn bind_one(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(SockProtocol::UDP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Best effort: the kernel caps them at net.core.[rw]mem_max.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// A STUN or TURN server, resolved. A `stun:` and a `turn:` URL of the same address are one
/// server (one client per socket can tell their answers apart; two could not).
struct Server {
    addr: SocketAddr,
    /// The URL, as candidates gathered from it report it.
    url: String,
    /// `turn:` (UDP) with these credentials: allocate a relay.
    turn: Option<(String, String)>,
}

/// Scheme, host and port of a `stun:`/`turn:` URL (RFC 7064/7065), if it is one over UDP this
/// backend can use: `turns:` and `?transport=tcp` are not.
fn parse_ice_url(url: &str) -> Option<(bool, String, u16)> {
    let (turn, rest) = if let Some(rest) = url.strip_prefix("stun:") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("turn:") {
        (true, rest)
    } else {
        return None;
    };
    let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
    if query
        .split('&')
        .any(|kv| kv.eq_ignore_ascii_case("transport=tcp"))
    {
        return None;
    }
    let (host, port) = match hostport.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']')?;
            (host, after.strip_prefix(':'))
        }
        None => match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        },
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => 3478,
    };
    (!host.is_empty()).then(|| (turn, host.to_string(), port))
}

/// Resolve the servers' names (asynchronously: the TURN client would block on it), and merge
/// the URLs of one address.
async fn resolve_servers(ice_servers: &[IceServer]) -> Vec<Server> {
    let mut out: Vec<Server> = Vec::new();
    for server in ice_servers {
        for url in &server.urls {
            let Some((turn, host, port)) = parse_ice_url(url) else {
                tracing::debug!(%url, "sansio backend: ICE server not usable (TLS or TCP)");
                continue;
            };
            let addrs = match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(a) => a.collect::<Vec<_>>(),
                Err(e) => {
                    tracing::debug!(%url, "sansio backend: resolving ICE server: {e}");
                    continue;
                }
            };
            // One address per family.
            for v4 in [true, false] {
                let Some(addr) = addrs.iter().copied().find(|a| a.is_ipv4() == v4) else {
                    continue;
                };
                let creds = turn.then(|| {
                    (
                        server.username.clone().unwrap_or_default(),
                        server.credential.clone().unwrap_or_default(),
                    )
                });
                match out.iter_mut().find(|s| s.addr == addr) {
                    Some(s) => {
                        if s.turn.is_none() && creds.is_some() {
                            s.turn = creds;
                            s.url = url.clone();
                        }
                    }
                    None => out.push(Server {
                        addr,
                        url: url.clone(),
                        turn: creds,
                    }),
                }
            }
        }
    }
    out
}

/// Gathers from one server through one host socket: a server-reflexive candidate (Binding) and,
/// for a TURN server, a relay candidate (Allocate), whose traffic then goes through it.
struct Gatherer {
    /// Index of the host socket in [`Driver::sockets`].
    socket: usize,
    host: SocketAddr,
    server: SocketAddr,
    url: String,
    turn: bool,
    client: TurnClient,
    /// The allocation's relayed address, once allocated.
    relayed: Option<SocketAddr>,
    /// Its gathering requests (binding, allocate) still unanswered (empty: this gatherer is
    /// done); only these, not later permission or refresh transactions.
    waiting: HashSet<TransactionId>,
    /// When a permission was last asked for, per peer address.
    asked: HashMap<SocketAddr, Instant>,
}

impl Gatherer {
    /// A gathering request was answered or timed out: whether it was one of this gatherer's.
    /// `allocate` returns the id of the authenticated retry, which is the first attempt's id
    /// plus one in its last byte (rtc-turn 0.21.1); an error or timeout of the first attempt
    /// carries the first attempt's id.
    fn answered(&mut self, id: TransactionId) -> bool {
        let mut retry = id;
        if let Some(last) = retry.0.last_mut() {
            *last = last.wrapping_add(1);
        }
        self.waiting.remove(&id) || self.waiting.remove(&retry)
    }

    /// Forget gathering requests the client no longer has a transaction for (neither the
    /// request nor, for an allocation, its first attempt): they ended without an event.
    /// Returns whether any was forgotten.
    fn forget_ended(&mut self) -> bool {
        let before = self.waiting.len();
        let client = &self.client;
        self.waiting.retain(|id| {
            let mut first = *id;
            if let Some(last) = first.0.last_mut() {
                *last = last.wrapping_sub(1);
            }
            client.has_transaction(id) || client.has_transaction(&first)
        });
        self.waiting.len() < before
    }

    fn new(socket: usize, host: SocketAddr, server: &Server) -> Result<Self, RtcError> {
        let (username, password) = server.turn.clone().unwrap_or_default();
        let provider = rtc::crypto::default_provider()
            .map_err(|e| RtcError::new("sansio backend: crypto provider", e))?;
        let config = TurnConfig {
            stun_serv_addr: server.addr.to_string(),
            turn_serv_addr: if server.turn.is_some() {
                server.addr.to_string()
            } else {
                String::new()
            },
            local_addr: host,
            transport_protocol: TransportProtocol::UDP,
            username,
            password,
            ..Default::default()
        };
        Ok(Gatherer {
            socket,
            host,
            server: server.addr,
            url: server.url.clone(),
            turn: server.turn.is_some(),
            client: TurnClient::new(config, provider)?,
            relayed: None,
            waiting: HashSet::new(),
            asked: HashMap::new(),
        })
    }
}

/// What the driver publishes for the handles.
#[derive(Default)]
struct Shared {
    /// Bytes in [`Cmd::Send`]s not yet handed to the core, per channel ([`Channel`] index).
    queued: [AtomicUsize; 2],
    /// The core's `outstanding_bytes()` of each channel in use (given to it, not yet
    /// acknowledged or abandoned).
    outstanding: [AtomicUsize; 2],
    /// Fired when the reliable channel's queue falls below [`DC_LOW`].
    drained: Notify,
    /// The selected pair, with the prflx fix-up applied.
    pair: Mutex<Option<CandidatePair>>,
}

impl Shared {
    fn buffered(&self, ch: Channel) -> usize {
        let i = index(ch);
        self.queued[i].load(Ordering::Acquire) + self.outstanding[i].load(Ordering::Acquire)
    }
}

fn index(ch: Channel) -> usize {
    match ch {
        Channel::Reliable => 0,
        Channel::Unreliable => 1,
    }
}

/// What the handles ask of the driver.
enum Cmd {
    Offer(oneshot::Sender<Result<String, RtcError>>),
    AcceptOffer(String, oneshot::Sender<Result<String, RtcError>>),
    AcceptAnswer(String, oneshot::Sender<Result<(), RtcError>>),
    Candidate(RTCIceCandidateInit),
    OpenInband(oneshot::Sender<Result<(), RtcError>>),
    /// A frame for a channel: "u2" instead of "u" when `inband`.
    Send {
        ch: Channel,
        inband: bool,
        data: Bytes,
    },
}

/// One PeerConnection generation of a link.
pub(crate) struct Rtc {
    cmds: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
    /// [`Rtc::open_inband`] was called: unreliable frames go on "u2".
    inband: bool,
    /// Dropped with the last handle: the driver closes the PeerConnection and ends.
    _close: watch::Sender<()>,
}

fn gone() -> RtcError {
    RtcError::new("sansio backend", "the PeerConnection's driver has ended")
}

impl Rtc {
    async fn ask<T>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<Result<T, RtcError>>) -> Cmd,
    ) -> Result<T, RtcError> {
        let (reply, answer) = oneshot::channel();
        self.cmds.send(cmd(reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Create the offer and set it as the local description; returns its SDP.
    pub(crate) async fn offer(&self) -> Result<String, RtcError> {
        self.ask(Cmd::Offer).await
    }

    /// Apply the peer's offer and answer it; returns the answer's SDP.
    pub(crate) async fn accept_offer(&mut self, sdp: String) -> Result<String, RtcError> {
        self.ask(|reply| Cmd::AcceptOffer(sdp, reply)).await
    }

    /// Apply the peer's answer.
    pub(crate) async fn accept_answer(&mut self, sdp: String) -> Result<(), RtcError> {
        self.ask(|reply| Cmd::AcceptAnswer(sdp, reply)).await
    }

    /// Add a remote candidate (held until the remote description is set).
    pub(crate) async fn add_candidate(
        &mut self,
        candidate: serde_json::Value,
    ) -> Result<(), RtcError> {
        let init: RTCIceCandidateInit =
            serde_json::from_value(candidate).map_err(|e| RtcError::new("bad candidate", e))?;
        if init.candidate.is_empty() {
            return Ok(()); // end-of-candidates
        }
        self.cmds.send(Cmd::Candidate(init)).map_err(|_| gone())
    }

    /// Version 2: open this end's in-band unreliable send channel, used for unreliable frames
    /// from then on. The core applies its options (unordered, no retransmissions) to the SCTP
    /// stream on this end only: rtc 0.21.1 does not set them on a stream the peer opened, so a
    /// FORWARD-TSN does not clear unordered fragments there, which is why this backend asks for
    /// a reliable "u2" too (PROTOCOL.md §7.6).
    pub(crate) async fn open_inband(&mut self) -> Result<(), RtcError> {
        self.ask(Cmd::OpenInband).await?;
        self.inband = true;
        Ok(())
    }

    /// The sending half, for senders outside the link task.
    pub(crate) fn tx(&self) -> DirectTx {
        DirectTx {
            cmds: self.cmds.clone(),
            shared: self.shared.clone(),
            inband: self.inband,
        }
    }

    /// Candidate types and addresses of the selected pair, once ICE has selected one.
    pub(crate) async fn selected_pair(&self) -> Option<CandidatePair> {
        *self.shared.pair.lock().expect("pair lock")
    }

    /// Close: the driver sends SCTP ABORT and DTLS close_notify, and ends.
    pub(crate) fn close(self) {}
}

/// The channels of an open direct path, for sending; cheap to clone.
#[derive(Clone)]
pub(crate) struct DirectTx {
    cmds: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
    inband: bool,
}

impl DirectTx {
    /// Bytes `ch` has queued and not yet had acknowledged.
    pub(crate) async fn buffered(&self, ch: Channel) -> usize {
        self.shared.buffered(ch)
    }

    /// [`DirectTx::buffered`], which here can always be told at once.
    pub(crate) fn buffered_now(&self, ch: Channel) -> Option<usize> {
        Some(self.shared.buffered(ch))
    }

    /// Wait until the reliable channel's queue drains below `DC_LOW`, or at most `limit`.
    pub(crate) async fn drained(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.shared.drained.notified()).await;
    }

    /// Hand a frame to the driver. It is numbered on its stream when the driver takes it, in
    /// the order of these calls, so a send never leaves a hole.
    pub(crate) async fn send(&self, ch: Channel, data: &Bytes) -> Result<(), RtcError> {
        self.shared.queued[index(ch)].fetch_add(data.len(), Ordering::AcqRel);
        let cmd = Cmd::Send {
            ch,
            inband: self.inband,
            data: data.clone(),
        };
        self.cmds.send(cmd).map_err(|_| {
            self.shared.queued[index(ch)].fetch_sub(data.len(), Ordering::AcqRel);
            gone()
        })
    }
}

type Delivery = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Owns one [`RTCPeerConnection`], its sockets and its state; see the module doc.
struct Driver {
    gen: u32,
    candidates: Candidates,
    pc: RTCPeerConnection,
    sockets: Vec<HostSocket>,
    /// One per (host socket, STUN/TURN server).
    gatherers: Vec<Gatherer>,
    r: RTCDataChannelId,
    u: RTCDataChannelId,
    /// This end's in-band send channel (version 2).
    u2: Option<RTCDataChannelId>,
    /// The peer's in-band send channel: this end receives on it.
    peer_u2: Option<RTCDataChannelId>,
    /// "r" and "u" are open. Until both are, events are pumped after every datagram: the core
    /// dials negotiated channels only in `poll_event`, and SCTP data read before that for a
    /// channel not yet dialed is dropped (`ErrDataChannelNotExisted`).
    open: [bool; 2],
    cmds: mpsc::UnboundedReceiver<Cmd>,
    close: watch::Receiver<()>,
    events: mpsc::UnboundedSender<LinkInput>,
    on_frame: FrameSink,
    /// A frame the link had no room for yet: no other is read from the core until it is taken
    /// (not reading is SCTP's back-pressure: the receive window closes).
    delivering: Option<Delivery>,
    shared: Arc<Shared>,
    /// Gathering started (after the local description was set).
    gathered: bool,
    /// End of candidates was added.
    gathering_ended: bool,
    remote_set: bool,
    pending: Vec<RTCIceCandidateInit>,
    /// Types of the candidates the peer signaled, by address and port.
    signaled: HashMap<(String, u16), CandidateType>,
    /// The selected pair last seen (local, remote).
    pair: Option<(SocketAddr, SocketAddr)>,
    out: Vec<TaggedBytesMut>,
    /// ICE has connected (selected a pair) at least once.
    ice_connected: bool,
    /// DTLS datagrams that arrived before that, in order. The core drops any non-STUN datagram
    /// before its ICE agent has selected a pair, and the controlled side selects one a round
    /// trip before the controlling side, so the first DTLS flight from a peer that selected
    /// first was lost and the handshake waited for DTLS's 1 s retransmission (measured: join
    /// to direct 1.46 s at 50 ms RTT, against 0.46-0.56 s on the default backend). They are
    /// handed to the core once it has connected.
    early: Vec<TaggedBytesMut>,
}

/// A DTLS record (RFC 7983: first byte 20 to 63), as opposed to STUN (0 to 3).
fn is_dtls(datagram: &[u8]) -> bool {
    matches!(datagram.first(), Some(20..=63))
}

impl Driver {
    /// Hand a datagram from the network to the core (holding early DTLS, see
    /// [`Driver::early`]), then take what it sends (a SACK per datagram: the core defers its
    /// SCTP flush to poll_write, so a burst handed over in one go would get one SACK, and a
    /// sender recovering from loss too few duplicate SACKs for fast retransmit and to grow its
    /// window: found with aiortc under 5 % loss, 1 s stalls), and its events until the
    /// negotiated channels are open (the core dials them only in `poll_event`, and SCTP data
    /// read for a channel not yet dialed is dropped).
    fn feed(&mut self, msg: TaggedBytesMut) {
        if !self.ice_connected && is_dtls(&msg.message) {
            if self.early.len() < EARLY_MAX {
                self.early.push(msg);
            }
            return;
        }
        // Pipeline errors are logged by the core; this does not fail.
        let _ = self.pc.handle_read(msg);
        self.take_writes();
        if !self.open.iter().all(|o| *o) {
            self.pump_events();
        }
    }

    async fn run(mut self) {
        let mut buf = vec![0u8; DATAGRAM_MAX];
        loop {
            self.settle().await;
            let deadline = self.deadline();
            let delivering = self.delivering.is_some();
            tokio::select! {
                biased;
                _ = self.close.changed() => break,
                cmd = self.cmds.recv() => match cmd {
                    Some(cmd) => {
                        self.apply(cmd);
                        while let Ok(cmd) = self.cmds.try_recv() {
                            self.apply(cmd);
                        }
                    }
                    None => break,
                },
                () = deliver(&mut self.delivering), if delivering => self.delivering = None,
                ready = any_readable(&self.sockets) => match ready {
                    Ok(()) => self.read(&mut buf),
                    Err(e) => {
                        // The link hears the path failed (and takes the server path).
                        tracing::warn!("sansio backend: socket: {e}");
                        self.emit(RtcEvent::State(ConnState::Failed));
                        break;
                    }
                },
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
            // Whatever woke the driver: a busy socket or a stream of commands must not starve
            // the core's timers (retransmission, delayed SACK, FORWARD-TSN).
            let now = Instant::now();
            if now >= deadline {
                self.run_timers(now);
            }
        }
        self.shut();
    }

    /// The earliest timer of the core and the gatherers.
    fn deadline(&mut self) -> Instant {
        let mut at = self
            .pc
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + IDLE_WAKE);
        for g in &mut self.gatherers {
            if let Some(t) = g.client.poll_timeout() {
                at = at.min(t);
            }
        }
        at
    }

    /// Run every timer due at `now`.
    fn run_timers(&mut self, now: Instant) {
        if self.pc.poll_timeout().is_some_and(|t| t <= now) {
            if let Err(e) = self.pc.handle_timeout(now) {
                tracing::debug!("sansio backend: timeout: {e}");
            }
        }
        for g in &mut self.gatherers {
            if g.client.poll_timeout().is_some_and(|t| t <= now) {
                let _ = g.client.handle_timeout(now);
            }
        }
    }

    /// Close the PeerConnection and send what that queued (SCTP ABORT, DTLS close_notify), and
    /// release the relays (a Refresh with lifetime 0).
    fn shut(&mut self) {
        let now = Instant::now();
        if let Err(e) = self.pc.close() {
            tracing::debug!("sansio backend: close: {e}");
        }
        while let Some(w) = self.pc.poll_write() {
            if let Some(i) = self.relayed_by(w.transport.local_addr) {
                // Ahead of the relay's release below, in its client's queue.
                self.send_relayed(i, w);
                continue;
            }
            if let Some(s) = self.socket_for(w.transport.local_addr) {
                let _ = s.try_send_to(&w.message, w.transport.peer_addr);
            }
        }
        for g in &mut self.gatherers {
            if let Some(relayed) = g.relayed {
                if let Ok(mut relay) = g.client.relay(relayed) {
                    let _ = relay.close(now);
                }
            }
            while let Some(w) = g.client.poll_write() {
                let _ = self.sockets[g.socket]
                    .socket
                    .try_send_to(&w.message, w.transport.peer_addr);
            }
        }
    }

    /// The gatherer whose relay has this address.
    fn relayed_by(&self, local: SocketAddr) -> Option<usize> {
        self.gatherers.iter().position(|g| g.relayed == Some(local))
    }

    fn apply(&mut self, cmd: Cmd) {
        let now = Instant::now();
        match cmd {
            Cmd::Offer(reply) => {
                let r = (|| {
                    let offer = self.pc.create_offer(None)?;
                    let sdp = filter_sdp(&offer.sdp, self.candidates);
                    self.pc.set_local_description(now, offer)?;
                    Ok(sdp)
                })();
                self.gather();
                let _ = reply.send(r);
            }
            Cmd::AcceptOffer(sdp, reply) => {
                let sdp = filter_sdp(&sdp, self.candidates);
                let r = (|| {
                    self.pc
                        .set_remote_description(now, RTCSessionDescription::offer(sdp)?)?;
                    self.remote_set();
                    let answer = self.pc.create_answer(None)?;
                    let sdp = filter_sdp(&answer.sdp, self.candidates);
                    self.pc.set_local_description(now, answer)?;
                    Ok(sdp)
                })();
                self.gather();
                let _ = reply.send(r);
            }
            Cmd::AcceptAnswer(sdp, reply) => {
                let sdp = filter_sdp(&sdp, self.candidates);
                let r = (|| {
                    self.pc
                        .set_remote_description(now, RTCSessionDescription::answer(sdp)?)?;
                    self.remote_set();
                    Ok(())
                })();
                let _ = reply.send(r);
            }
            Cmd::Candidate(init) => {
                let parsed = parse_candidate(&init.candidate);
                if refused_remote(self.candidates, parsed.as_ref()) {
                    tracing::debug!(candidate = %init.candidate, "relay-only: remote candidate ignored");
                    return;
                }
                if let Some((key, typ)) = parsed {
                    self.learn_remote_type(&key, typ);
                    self.signaled.insert(key, typ);
                }
                if self.remote_set {
                    if let Err(e) = self.pc.add_remote_candidate(init) {
                        tracing::debug!("sansio backend: remote candidate: {e}");
                    }
                } else {
                    self.pending.push(init);
                }
            }
            Cmd::OpenInband(reply) => {
                let r = self
                    .pc
                    .create_data_channel(
                        INBAND_LABEL,
                        Some(RTCDataChannelInit {
                            ordered: false,
                            max_retransmits: Some(0),
                            ..Default::default()
                        }),
                    )
                    .map(|dc| dc.id());
                let _ = reply.send(match r {
                    Ok(id) => {
                        self.u2 = Some(id);
                        Ok(())
                    }
                    Err(e) => Err(e.into()),
                });
            }
            Cmd::Send { ch, inband, data } => {
                let len = data.len();
                let id = match (ch, inband) {
                    (Channel::Reliable, _) => Some(self.r),
                    (Channel::Unreliable, false) => Some(self.u),
                    (Channel::Unreliable, true) => self.u2,
                };
                let sent = match id.and_then(|id| self.pc.data_channel(id)) {
                    Some(mut dc) => dc.send(now, BytesMut::from(&data[..])).map(|()| {
                        // Counted as outstanding before it stops counting as queued, so the
                        // link never reads the channel emptier than it is.
                        let n = dc.outstanding_bytes();
                        self.shared.outstanding[index(ch)].store(n, Ordering::Release);
                    }),
                    None => Err(rtc::shared::error::Error::ErrDataChannelNotExisted),
                };
                if let Err(e) = sent {
                    tracing::debug!(?ch, "sansio backend: send: {e}");
                    if ch == Channel::Reliable {
                        // The link counts the frame as handed on; a channel that refuses one
                        // has a hole the peer would wait on: the generation fails, and the
                        // link re-sends what is unacknowledged on the server path.
                        self.emit(RtcEvent::Closed);
                    }
                }
                self.shared.queued[index(ch)].fetch_sub(len, Ordering::AcqRel);
            }
        }
    }

    /// The remote description is set: add the candidates that came before it.
    fn remote_set(&mut self) {
        self.remote_set = true;
        for c in std::mem::take(&mut self.pending) {
            if let Err(e) = self.pc.add_remote_candidate(c) {
                tracing::debug!("sansio backend: remote candidate: {e}");
            }
        }
    }

    /// Start gathering, once, after the local description is set (so that candidates are
    /// signaled after the offer or answer): a host candidate per socket (not for relay-only),
    /// and a Binding (not for relay-only) and an Allocate (TURN) to each server.
    fn gather(&mut self) {
        if self.gathered {
            return;
        }
        self.gathered = true;
        let now = Instant::now();
        if self.candidates == Candidates::All {
            let hosts: Vec<SocketAddr> = self.sockets.iter().map(|s| s.addr).collect();
            for addr in hosts {
                let host = CandidateHostConfig {
                    base_config: CandidateConfig {
                        network: "udp".to_owned(),
                        address: addr.ip().to_string(),
                        port: addr.port(),
                        component: 1,
                        ..Default::default()
                    },
                    ..Default::default()
                }
                .new_candidate_host();
                self.add_local(host, addr);
            }
        }
        for g in &mut self.gatherers {
            if self.candidates == Candidates::All {
                match g.client.send_binding_request_to(now, g.server) {
                    Ok(id) => _ = g.waiting.insert(id),
                    Err(e) => tracing::debug!(server = %g.server, "sansio backend: binding: {e}"),
                }
            }
            if g.turn {
                match g.client.allocate(now) {
                    Ok(id) => _ = g.waiting.insert(id),
                    Err(e) => tracing::debug!(server = %g.server, "sansio backend: allocate: {e}"),
                }
            }
        }
        self.end_gathering_when_done();
    }

    fn add_local(
        &mut self,
        candidate: rtc::shared::error::Result<rtc::ice::candidate::Candidate>,
        addr: SocketAddr,
    ) {
        let added = candidate
            .map_err(RtcError::from)
            .and_then(|c| Ok(RTCIceCandidate::from(&c).to_json()?))
            .and_then(|init| Ok(self.pc.add_local_candidate(init)?));
        if let Err(e) = added {
            tracing::debug!(%addr, "sansio backend: local candidate: {e}");
        }
    }

    /// End of candidates, once every server has answered or timed out.
    fn end_gathering_when_done(&mut self) {
        if self.gathering_ended || self.gatherers.iter().any(|g| !g.waiting.is_empty()) {
            return;
        }
        self.gathering_ended = true;
        if let Err(e) = self.pc.add_local_candidate(RTCIceCandidateInit::default()) {
            tracing::debug!("sansio backend: end of candidates: {e}");
        }
    }

    /// Take the gatherers' events (their candidates, relayed data) and writes. Returns whether
    /// there were any.
    fn pump_gatherers(&mut self) -> bool {
        let mut any = false;
        for i in 0..self.gatherers.len() {
            while let Some(event) = self.gatherers[i].client.poll_event() {
                any = true;
                self.gatherer_event(i, event);
            }
            while let Some(w) = self.gatherers[i].client.poll_write() {
                any = true;
                self.out.push(w);
            }
        }
        if any {
            self.end_gathering_when_done();
        }
        any
    }

    fn gatherer_event(&mut self, i: usize, event: TurnEvent) {
        let g = &mut self.gatherers[i];
        let (host, url) = (g.host, g.url.clone());
        match event {
            TurnEvent::BindingResponse(id, mapped) => {
                g.answered(id);
                // Behind no NAT the mapped address is the host's own: the candidate is
                // redundant then, but signaled as on the default backend (it tells the app and
                // the peer that the STUN server answered).
                let c = CandidateServerReflexiveConfig {
                    base_config: CandidateConfig {
                        network: "udp".to_owned(),
                        address: mapped.ip().to_string(),
                        port: mapped.port(),
                        component: 1,
                        ..Default::default()
                    },
                    rel_addr: host.ip().to_string(),
                    rel_port: host.port(),
                    url: Some(url),
                }
                .new_candidate_server_reflexive();
                self.add_local(c, mapped);
            }
            TurnEvent::AllocateResponse(id, relayed) => {
                g.answered(id);
                g.relayed = Some(relayed);
                let c = CandidateRelayConfig {
                    base_config: CandidateConfig {
                        network: "udp".to_owned(),
                        address: relayed.ip().to_string(),
                        port: relayed.port(),
                        component: 1,
                        ..Default::default()
                    },
                    rel_addr: host.ip().to_string(),
                    rel_port: host.port(),
                    url: Some(url),
                }
                .new_candidate_relay();
                self.add_local(c, relayed);
            }
            TurnEvent::BindingError(id, e) | TurnEvent::AllocateError(id, e) => {
                g.answered(id);
                tracing::debug!(server = %g.server, "sansio backend: gathering: {e}");
            }
            TurnEvent::TransactionTimeout(id) => {
                let gathering = g.answered(id);
                tracing::debug!(server = %g.server, gathering, "sansio backend: no answer from the server");
            }
            TurnEvent::DataIndicationOrChannelData(_, peer_addr, data) => {
                let Some(local_addr) = g.relayed else { return };
                self.feed(TaggedBytesMut {
                    now: Instant::now(),
                    transport: TransportContext {
                        local_addr,
                        peer_addr,
                        transport_protocol: TransportProtocol::UDP,
                        ecn: None,
                    },
                    message: data,
                });
            }
            _ => {}
        }
    }

    /// Send a datagram of the PeerConnection from a relayed address through its relay (with a
    /// permission for the peer; until the server grants it, the datagram is dropped, as a lost
    /// one: ICE checks are retried).
    fn send_relayed(&mut self, i: usize, w: TaggedBytesMut) {
        let now = Instant::now();
        let g = &mut self.gatherers[i];
        let Some(relayed) = g.relayed else { return };
        let peer = w.transport.peer_addr;
        // Ask for a permission at most every PERMISSION_RETRY per peer: the client sends a new
        // request for each send while none is granted (pending, or refused by the server).
        let ask = g
            .asked
            .get(&peer)
            .is_none_or(|at| now.saturating_duration_since(*at) >= PERMISSION_RETRY);
        if ask {
            if g.asked.len() >= PERMISSIONS_REMEMBERED {
                g.asked
                    .retain(|_, at| now.saturating_duration_since(*at) < PERMISSION_RETRY);
            }
            g.asked.insert(peer, now);
        }
        let sent = g.client.relay(relayed).and_then(|mut relay| {
            if ask {
                relay.create_permission(now, peer)?;
            }
            relay.send_to(now, &w.message, peer)
        });
        if let Err(e) = sent {
            tracing::trace!(%peer, "sansio backend: relayed send: {e}");
        }
    }

    fn socket_for(&self, local: SocketAddr) -> Option<&UdpSocket> {
        let s = self.sockets.iter().find(|s| s.addr == local).or_else(|| {
            self.sockets
                .iter()
                .find(|s| s.addr.is_ipv4() == local.is_ipv4())
        })?;
        Some(&s.socket)
    }

    /// Read what every socket has (a bounded burst each) into the core.
    fn read(&mut self, buf: &mut [u8]) {
        for i in 0..self.sockets.len() {
            let local_addr = self.sockets[i].addr;
            for _ in 0..READ_BURST {
                let (n, peer_addr) = match self.sockets[i].socket.try_recv_from(buf) {
                    Ok(got) => got,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // An ICMP error reported on the socket; the next read goes on.
                        tracing::trace!("sansio backend: recv: {e}");
                        continue;
                    }
                };
                let msg = TaggedBytesMut {
                    now: Instant::now(),
                    transport: TransportContext {
                        local_addr,
                        peer_addr,
                        transport_protocol: TransportProtocol::UDP,
                        ecn: None,
                    },
                    message: BytesMut::from(&buf[..n]),
                };
                if let Some(g) = self
                    .gatherers
                    .iter_mut()
                    .find(|g| g.socket == i && g.server == peer_addr)
                {
                    if let Err(e) = g.client.handle_read(msg) {
                        tracing::trace!(server = %peer_addr, "sansio backend: from server: {e}");
                        // A reply the client could not use (an Allocate success without a
                        // relayed address) may have ended its transaction without an event.
                        if g.forget_ended() {
                            self.end_gathering_when_done();
                        }
                    }
                    continue;
                }
                if self.candidates == Candidates::RelayOnly {
                    // A relay-only end talks to its TURN servers alone; anything else reaching
                    // its sockets must not become a (peer-reflexive) pair.
                    continue;
                }
                self.feed(msg);
            }
        }
    }

    /// Take the core's datagrams: into `out`, or through a relay. Returns whether there were any.
    fn take_writes(&mut self) -> bool {
        let mut any = false;
        while let Some(w) = self.pc.poll_write() {
            any = true;
            match self.relayed_by(w.transport.local_addr) {
                Some(i) => self.send_relayed(i, w),
                None => self.out.push(w),
            }
        }
        any
    }

    /// Drain the core to quiescence, send its datagrams, hand frames to the link and publish.
    async fn settle(&mut self) {
        // Bounded: each pass makes progress or ends the loop; the bound only guards against a
        // core that never settles.
        for _ in 0..10_000 {
            let mut progressed = self.pump_events();
            while self.delivering.is_none() {
                let Some(msg) = self.pc.poll_read() else {
                    break;
                };
                progressed = true;
                let RTCMessage::DataChannelMessage(id, m) = msg.message else {
                    continue;
                };
                if id == self.r || id == self.u || Some(id) == self.peer_u2 {
                    let mut fut = (self.on_frame)(m.data.freeze());
                    if poll_once(&mut fut).await.is_pending() {
                        self.delivering = Some(fut);
                    }
                }
            }
            progressed |= self.take_writes();
            progressed |= self.pump_gatherers();
            if !progressed {
                break;
            }
        }
        for w in std::mem::take(&mut self.out) {
            let Some(s) = self.socket_for(w.transport.local_addr) else {
                continue;
            };
            match s.try_send_to(&w.message, w.transport.peer_addr) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let _ = s.send_to(&w.message, w.transport.peer_addr).await;
                }
                Err(e) => {
                    tracing::trace!(peer = %w.transport.peer_addr, "sansio backend: send: {e}")
                }
            }
        }
        self.publish();
    }

    fn publish(&mut self) {
        let unreliable = self.u2.unwrap_or(self.u);
        for (i, id) in [(0, self.r), (1, unreliable)] {
            let n = self
                .pc
                .data_channel(id)
                .map_or(0, |dc| dc.outstanding_bytes());
            self.shared.outstanding[i].store(n, Ordering::Release);
        }
        if self.shared.buffered(Channel::Reliable) < DC_LOW {
            self.shared.drained.notify_waiters();
        }
        self.check_pair();
    }

    /// The core raises no event when ICE selects a pair: compare after every pass.
    fn check_pair(&mut self) {
        let Some(sctp) = self.pc.sctp() else { return };
        let Some(pair) = sctp
            .transport()
            .ice_transport()
            .get_selected_candidate_pair()
        else {
            return;
        };
        let addr = |c: &RTCIceCandidate| {
            c.address
                .parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, c.port))
        };
        let (Some(local), Some(remote)) = (addr(pair.local()), addr(pair.remote())) else {
            return;
        };
        if self.pair == Some((local, remote)) {
            return;
        }
        self.pair = Some((local, remote));
        let mut remote_type = conv(pair.remote().typ);
        if remote_type == CandidateType::Prflx {
            if let Some(&typ) = self
                .signaled
                .get(&(pair.remote().address.clone(), pair.remote().port))
            {
                remote_type = typ;
            }
        }
        *self.shared.pair.lock().expect("pair lock") = Some(CandidatePair {
            local_type: conv(pair.local().typ),
            remote_type,
            local,
            remote,
        });
        self.emit(RtcEvent::PairSelected);
    }

    /// A peer's check often arrives before its trickled candidate, so ICE first knows that
    /// address as peer-reflexive; once the candidate is signaled, its signaled type is the true
    /// one (browsers report it the same way), also for a pair selected before.
    fn learn_remote_type(&self, (addr, port): &(String, u16), typ: CandidateType) {
        let Ok(ip) = addr.parse::<IpAddr>() else {
            return;
        };
        let mut pair = self.shared.pair.lock().expect("pair lock");
        if let Some(p) = pair.as_mut() {
            if p.remote_type == CandidateType::Prflx && p.remote == SocketAddr::new(ip, *port) {
                p.remote_type = typ;
            }
        }
    }

    fn emit(&self, event: RtcEvent) {
        let _ = self.events.send(LinkInput::Rtc {
            gen: self.gen,
            event,
        });
    }

    /// Move the core's events to the link. Returns whether there were any.
    fn pump_events(&mut self) -> bool {
        let mut any = false;
        while let Some(event) = self.pc.poll_event() {
            any = true;
            match event {
                RTCPeerConnectionEvent::OnIceCandidateEvent(e) => match e.candidate.to_json() {
                    Ok(mut init) => {
                        if self.candidates == Candidates::RelayOnly {
                            // The last check before an address leaves the host: a relay
                            // candidate, without its related address.
                            match relay_candidate(&init.candidate) {
                                Some(line) => init.candidate = line,
                                None => continue,
                            }
                        }
                        self.emit(RtcEvent::Candidate(candidate_json(
                            init.candidate,
                            init.sdp_mid,
                            init.sdp_mline_index,
                            init.username_fragment,
                        )))
                    }
                    Err(e) => tracing::warn!("candidate not serializable: {e}"),
                },
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) => {
                    self.emit(RtcEvent::State(match s {
                        RTCPeerConnectionState::Connected => ConnState::Connected,
                        RTCPeerConnectionState::Disconnected => ConnState::Disconnected,
                        RTCPeerConnectionState::Failed => ConnState::Failed,
                        RTCPeerConnectionState::Closed => ConnState::Closed,
                        _ => ConnState::Other,
                    }))
                }
                RTCPeerConnectionEvent::OnDataChannel(e) => self.channel_event(e),
                RTCPeerConnectionEvent::OnIceConnectionStateChangeEvent(
                    RTCIceConnectionState::Connected | RTCIceConnectionState::Completed,
                ) if !self.ice_connected => {
                    self.ice_connected = true;
                    for msg in std::mem::take(&mut self.early) {
                        let _ = self.pc.handle_read(msg);
                        self.take_writes();
                    }
                }
                _ => {}
            }
        }
        any
    }

    fn channel_event(&mut self, event: RTCDataChannelEvent) {
        match event {
            RTCDataChannelEvent::OnOpen(id) if id == self.r => {
                self.open[0] = true;
                self.emit(RtcEvent::Open(Channel::Reliable));
            }
            RTCDataChannelEvent::OnOpen(id) if id == self.u => {
                self.open[1] = true;
                self.emit(RtcEvent::Open(Channel::Unreliable));
            }
            RTCDataChannelEvent::OnOpen(id) if Some(id) == self.u2 => {
                self.emit(RtcEvent::InbandOpen)
            }
            RTCDataChannelEvent::OnOpen(id) => {
                // The peer's in-band send channel of a version 2 generation (one; any other
                // in-band channel is closed).
                let Some(mut dc) = self.pc.data_channel(id) else {
                    return;
                };
                if dc.label() == INBAND_LABEL && !dc.negotiated() && self.peer_u2.is_none() {
                    self.peer_u2 = Some(id);
                    self.emit(RtcEvent::PeerInbandOpen);
                } else {
                    tracing::debug!(label = dc.label(), "closing an unexpected data channel");
                    let _ = dc.close();
                }
            }
            RTCDataChannelEvent::OnClose(id)
                if id == self.r
                    || id == self.u
                    || Some(id) == self.u2
                    || Some(id) == self.peer_u2 =>
            {
                self.emit(RtcEvent::Closed)
            }
            RTCDataChannelEvent::OnBufferedAmountLow(id) if id == self.r => {
                self.shared.drained.notify_waiters()
            }
            _ => {}
        }
    }
}

/// Poll a future once, from an async context.
async fn poll_once(fut: &mut Delivery) -> Poll<()> {
    std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
}

/// Finish the frame delivery in progress.
async fn deliver(delivering: &mut Option<Delivery>) {
    if let Some(fut) = delivering.as_mut() {
        fut.as_mut().await;
    }
}

/// Ready when any of the sockets may have a datagram.
async fn any_readable(sockets: &[HostSocket]) -> io::Result<()> {
    std::future::poll_fn(|cx| {
        for s in sockets {
            if let Poll::Ready(r) = s.socket.poll_recv_ready(cx) {
                return Poll::Ready(r);
            }
        }
        Poll::Pending
    })
    .await
}

fn conv(t: RTCIceCandidateType) -> CandidateType {
    match t {
        RTCIceCandidateType::Srflx => CandidateType::Srflx,
        RTCIceCandidateType::Prflx => CandidateType::Prflx,
        RTCIceCandidateType::Relay => CandidateType::Relay,
        _ => CandidateType::Host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TURN server that never answers: the binding request and the allocation's first
    /// (unauthenticated) attempt time out, and the gatherer is done, though `allocate` returned
    /// the id of the retry that was never sent.
    #[test]
    fn a_gatherer_whose_server_never_answers_is_done_after_the_timeouts() {
        let server = Server {
            addr: "127.0.0.1:3478".parse().unwrap(),
            url: "turn:127.0.0.1:3478".into(),
            turn: Some(("user".into(), "pass".into())),
        };
        let mut g = Gatherer::new(0, "127.0.0.1:40000".parse().unwrap(), &server).unwrap();
        let start = Instant::now();
        let binding = g
            .client
            .send_binding_request_to(start, server.addr)
            .unwrap();
        let allocate = g.client.allocate(start).unwrap();
        g.waiting.extend([binding, allocate]);
        let mut timeouts = 0;
        while let Some(at) = g.client.poll_timeout() {
            assert!(
                at < start + Duration::from_secs(60),
                "no timeout within 60 s"
            );
            g.client.handle_timeout(at).unwrap();
            while g.client.poll_write().is_some() {}
            while let Some(event) = g.client.poll_event() {
                if let TurnEvent::TransactionTimeout(id) = event {
                    assert!(g.answered(id), "a timeout of a request it did not make");
                    timeouts += 1;
                }
            }
            if g.waiting.is_empty() {
                break;
            }
        }
        assert_eq!(timeouts, 2);
        assert!(g.waiting.is_empty());
        // An id it never asked for is not its own.
        assert!(!g.answered(TransactionId::new()));
    }

    /// An Allocate success the client cannot use (no relayed address) ends its transaction
    /// without an event: the gatherer forgets the request and is done.
    #[test]
    fn a_gatherer_whose_allocation_reply_is_unusable_is_done() {
        use rtc::stun::attributes::{ATTR_NONCE, ATTR_REALM};
        use rtc::stun::error_code::{ErrorCodeAttribute, CODE_UNAUTHORIZED};
        use rtc::stun::message::{
            Message, MessageType, CLASS_ERROR_RESPONSE, CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE,
        };
        use rtc::stun::textattrs::TextAttribute;

        let server = Server {
            addr: "127.0.0.1:3478".parse().unwrap(),
            url: "turn:127.0.0.1:3478".into(),
            turn: Some(("user".into(), "pass".into())),
        };
        let host: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let mut g = Gatherer::new(0, host, &server).unwrap();
        let now = Instant::now();
        let retry = g.client.allocate(now).unwrap();
        g.waiting.insert(retry);
        let mut first = retry;
        *first.0.last_mut().unwrap() = first.0.last().unwrap().wrapping_sub(1);
        let reply = |attrs: &[Box<dyn rtc::stun::message::Setter>]| {
            let mut m = Message::new();
            m.build(attrs).unwrap();
            TaggedBytesMut {
                now,
                transport: TransportContext {
                    local_addr: host,
                    peer_addr: server.addr,
                    transport_protocol: TransportProtocol::UDP,
                    ecn: None,
                },
                message: BytesMut::from(&m.raw[..]),
            }
        };
        // 401 to the first attempt: the client retries with credentials.
        g.client
            .handle_read(reply(&[
                Box::new(first),
                Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_ERROR_RESPONSE)),
                Box::new(ErrorCodeAttribute {
                    code: CODE_UNAUTHORIZED,
                    reason: b"Unauthorized".to_vec(),
                }),
                Box::new(TextAttribute::new(ATTR_REALM, "realm".into())),
                Box::new(TextAttribute::new(ATTR_NONCE, "nonce".into())),
            ]))
            .unwrap();
        assert!(g.client.has_transaction(&retry), "the retry is on its way");
        assert!(!g.forget_ended(), "nothing has ended yet");
        // A success without a relayed address: an error, and no event.
        let unusable = g.client.handle_read(reply(&[
            Box::new(retry),
            Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_SUCCESS_RESPONSE)),
        ]));
        assert!(unusable.is_err());
        assert!(g.client.poll_event().is_none());
        assert!(g.forget_ended());
        assert!(g.waiting.is_empty());
    }

    #[test]
    fn ice_urls_over_udp_parse_and_others_are_refused() {
        let p = |u: &str| parse_ice_url(u);
        assert_eq!(
            p("stun:127.0.0.1:3478"),
            Some((false, "127.0.0.1".into(), 3478))
        );
        assert_eq!(
            p("turn:turn.example.org?transport=udp"),
            Some((true, "turn.example.org".into(), 3478))
        );
        assert_eq!(p("turn:[::1]:5349"), Some((true, "::1".into(), 5349)));
        assert_eq!(
            p("stun:[2001:db8::1]"),
            Some((false, "2001:db8::1".into(), 3478))
        );
        assert_eq!(p("turn:host:3478?transport=tcp"), None);
        assert_eq!(p("turns:host:5349"), None);
        assert_eq!(p("turn::3478"), None);
        assert_eq!(p("stun:host:port"), None);
        assert_eq!(p("http://host"), None);
    }
}
