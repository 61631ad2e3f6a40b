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
//! Not yet here (the link stays on the server path, or uses host candidates only): server
//! reflexive candidates (STUN) and TURN relays, so relay-only PeerConnections are refused.

use std::collections::HashMap;
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
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit, RTCIceCandidateType,
};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::sdp::{candidate_json, parse_candidate};
use super::LinkInput;
use super::{
    Candidates, Channel, ConnState, FrameSink, RtcError, RtcEvent, RtcOptions, DC_LOW,
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
/// Connectivity-check pacing. The core waits one interval before its first check, so this is
/// also about the least time to open on loopback (the core's default is 200 ms).
const ICE_CHECK_INTERVAL: Duration = Duration::from_millis(50);
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
        if candidates == Candidates::RelayOnly {
            return Err(RtcError::new(
                "sansio backend",
                "relay-only direct paths (TURN) are not implemented in this backend yet",
            ));
        }
        let servers = self.ice_servers.lock().expect("rtc config lock").len();
        if servers > 0 {
            tracing::debug!(
                servers,
                "sansio backend: STUN/TURN servers unused (host only)"
            );
        }
        let sockets = bind_host_sockets(&self.opts)?;
        if sockets.is_empty() {
            return Err(RtcError::new(
                "sansio backend",
                "no local address to gather a host candidate from",
            ));
        }
        let settings = SettingEngineBuilder::new()
            // Fall back fast, so the link returns to the server path quickly when the direct
            // path dies.
            .with_ice_timeouts(
                Some(Duration::from_secs(3)),
                Some(Duration::from_secs(8)),
                Some(Duration::from_millis(500)),
            )
            .with_ice_connection_attempts(Some(ICE_CHECK_INTERVAL), None)
            // A peer's host candidate is often first learnt from its check (prflx) because the
            // check overtakes the trickled candidate; waiting for something better only delays
            // the direct path.
            .with_host_acceptance_min_wait(Some(Duration::ZERO))
            .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
            .with_srflx_acceptance_min_wait(Some(Duration::from_millis(100)))
            .with_relay_acceptance_min_wait(Some(Duration::from_millis(500)))
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
            pc,
            sockets,
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
            remote_set: false,
            pending: Vec::new(),
            signaled: HashMap::new(),
            pair: None,
            out: Vec::new(),
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

/// Non-blocking UDP sockets, one per local address the options allow, in the port range if
/// one is set, with large buffers.
fn bind_host_sockets(opts: &RtcOptions) -> Result<Vec<UdpSocket>, RtcError> {
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
        match bind_in_range(ip, opts.udp_ports) {
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
    /// from then on. The core applies its options (unordered, no retransmissions) on both ends.
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
    pc: RTCPeerConnection,
    sockets: Vec<UdpSocket>,
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
    /// The host candidates were added (after the local description was set).
    gathered: bool,
    remote_set: bool,
    pending: Vec<RTCIceCandidateInit>,
    /// Types of the candidates the peer signaled, by address and port.
    signaled: HashMap<(String, u16), CandidateType>,
    /// The selected pair last seen (local, remote).
    pair: Option<(SocketAddr, SocketAddr)>,
    out: Vec<TaggedBytesMut>,
}

impl Driver {
    async fn run(mut self) {
        let mut buf = vec![0u8; DATAGRAM_MAX];
        loop {
            self.settle().await;
            let deadline = self
                .pc
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + IDLE_WAKE);
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
                        tracing::warn!("sansio backend: socket: {e}");
                        break;
                    }
                },
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
            // Whatever woke the driver: a busy socket or a stream of commands must not starve
            // the core's timers (retransmission, delayed SACK, FORWARD-TSN).
            let now = Instant::now();
            if now >= deadline {
                if let Err(e) = self.pc.handle_timeout(now) {
                    tracing::debug!("sansio backend: timeout: {e}");
                }
            }
        }
        self.shut();
    }

    /// Close the PeerConnection and send what that queued (SCTP ABORT, DTLS close_notify).
    fn shut(&mut self) {
        if let Err(e) = self.pc.close() {
            tracing::debug!("sansio backend: close: {e}");
        }
        while let Some(w) = self.pc.poll_write() {
            if let Some(s) = self.socket_for(w.transport.local_addr) {
                let _ = s.try_send_to(&w.message, w.transport.peer_addr);
            }
        }
    }

    fn apply(&mut self, cmd: Cmd) {
        let now = Instant::now();
        match cmd {
            Cmd::Offer(reply) => {
                let r = (|| {
                    let offer = self.pc.create_offer(None)?;
                    let sdp = offer.sdp.clone();
                    self.pc.set_local_description(now, offer)?;
                    Ok(sdp)
                })();
                self.gather();
                let _ = reply.send(r);
            }
            Cmd::AcceptOffer(sdp, reply) => {
                let r = (|| {
                    self.pc
                        .set_remote_description(now, RTCSessionDescription::offer(sdp)?)?;
                    self.remote_set();
                    let answer = self.pc.create_answer(None)?;
                    let sdp = answer.sdp.clone();
                    self.pc.set_local_description(now, answer)?;
                    Ok(sdp)
                })();
                self.gather();
                let _ = reply.send(r);
            }
            Cmd::AcceptAnswer(sdp, reply) => {
                let r = (|| {
                    self.pc
                        .set_remote_description(now, RTCSessionDescription::answer(sdp)?)?;
                    self.remote_set();
                    Ok(())
                })();
                let _ = reply.send(r);
            }
            Cmd::Candidate(init) => {
                if let Some((key, typ)) = parse_candidate(&init.candidate) {
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
                    Some(mut dc) => dc.send(now, BytesMut::from(&data[..])),
                    None => Err(rtc::shared::error::Error::ErrDataChannelNotExisted),
                };
                if let Err(e) = sent {
                    // The link counts the frame as sent; a reliable one is re-sent after the
                    // generation fails, which a channel that refuses sends soon reports.
                    tracing::debug!(?ch, "sansio backend: send: {e}");
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

    /// Add a host candidate per socket (once, after the local description is set, so that they
    /// are signaled after the offer or answer), then end gathering.
    fn gather(&mut self) {
        if self.gathered {
            return;
        }
        self.gathered = true;
        for s in &self.sockets {
            let Ok(addr) = s.local_addr() else { continue };
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
            let added = host
                .map_err(RtcError::from)
                .and_then(|c| Ok(RTCIceCandidate::from(&c).to_json()?))
                .and_then(|init| Ok(self.pc.add_local_candidate(init)?));
            if let Err(e) = added {
                tracing::debug!(%addr, "sansio backend: host candidate: {e}");
            }
        }
        if let Err(e) = self.pc.add_local_candidate(RTCIceCandidateInit::default()) {
            tracing::debug!("sansio backend: end of candidates: {e}");
        }
    }

    fn socket_for(&self, local: SocketAddr) -> Option<&UdpSocket> {
        self.sockets
            .iter()
            .find(|s| s.local_addr().is_ok_and(|a| a == local))
            .or_else(|| {
                self.sockets
                    .iter()
                    .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv4() == local.is_ipv4()))
            })
    }

    /// Read what every socket has (a bounded burst each) into the core.
    fn read(&mut self, buf: &mut [u8]) {
        for i in 0..self.sockets.len() {
            let Ok(local_addr) = self.sockets[i].local_addr() else {
                continue;
            };
            for _ in 0..READ_BURST {
                let (n, peer_addr) = match self.sockets[i].try_recv_from(buf) {
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
                // Pipeline errors are logged by the core; this does not fail.
                let _ = self.pc.handle_read(msg);
                if !self.open.iter().all(|o| *o) {
                    self.pump_events();
                }
            }
        }
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
            while let Some(w) = self.pc.poll_write() {
                progressed = true;
                self.out.push(w);
            }
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
                    Ok(init) => self.emit(RtcEvent::Candidate(candidate_json(
                        init.candidate,
                        init.sdp_mid,
                        init.sdp_mline_index,
                        init.username_fragment,
                    ))),
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
async fn any_readable(sockets: &[UdpSocket]) -> io::Result<()> {
    std::future::poll_fn(|cx| {
        for s in sockets {
            if let Poll::Ready(r) = s.poll_recv_ready(cx) {
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
