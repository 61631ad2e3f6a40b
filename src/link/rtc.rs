//! The direct path: one webrtc-rs PeerConnection with two pre-negotiated data channels, and
//! (link protocol version 2) an in-band unreliable one.
//!
//! This is the only module that names webrtc-rs types; everything above it speaks in
//! [`RtcEvent`], [`Channel`] and [`CandidateType`], so a move to another WebRTC stack touches
//! this file alone.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc::UnboundedSender;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::{APIBuilder, API};
use webrtc::data_channel::data_channel_init::RTCDataChannelInit;
use webrtc::data_channel::RTCDataChannel;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::udp_network::{EphemeralUDP, UDPNetwork};
use webrtc::ice_transport::ice_candidate::RTCIceCandidateInit;
use webrtc::ice_transport::ice_candidate_type::RTCIceCandidateType;
use webrtc::ice_transport::ice_server::RTCIceServer;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::policy::ice_transport_policy::RTCIceTransportPolicy;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::peer_connection::RTCPeerConnection;

use super::LinkInput;
use crate::protocol::IceServer;
use crate::{CandidatePair, CandidateType};

/// App data waits while more than this is queued in the reliable channel, and resumes when it
/// drains below the low mark. Our send window (8 MiB) would otherwise all sit in SCTP's queue,
/// which slows webrtc-rs's SCTP and delays acks and probes queued behind it.
pub(crate) const DC_HIGH: usize = 1 << 20;
const DC_LOW: usize = 512 << 10;
/// Most bytes the two channels may have queued for the link's own frames (acks, probes) to go
/// on the direct path; above it they take the server path. Half of webrtc-sctp's 128 KiB
/// pending queue, so that such a send (almost) never has to wait for room.
pub(crate) const OWN_QUEUE_MAX: usize = 64 << 10;
/// Most bytes the in-band unreliable channel (version 2) may have queued (sent and not yet
/// acknowledged) for another unreliable message to be handed to it; beyond that the message is
/// dropped, as at a full UDP socket buffer (Linux's default is 208 KiB). webrtc-sctp sends
/// every queued unordered chunk before any ordered one, so an unbounded unreliable queue on a
/// congested path would starve the reliable channel. (Version 1's "u" is ordered, queued in
/// turn with "r", and needs no bound.)
pub(crate) const UNRELIABLE_QUEUE_MAX: usize = 256 << 10;

/// Data channel labels and pre-negotiated stream ids (both sides create them identically).
const RELIABLE_LABEL: &str = "r";
const RELIABLE_ID: u16 = 0;
const UNRELIABLE_LABEL: &str = "u";
const UNRELIABLE_ID: u16 = 1;
/// Label of the in-band (DCEP) unreliable send channel each end opens in a version 2
/// generation. webrtc-rs applies the reliability options of an in-band channel (unordered, no
/// retransmissions) on both ends, and those of a pre-negotiated one on neither
/// (`docs/notes/sctp-unreliable.md`).
const INBAND_LABEL: &str = "u2";

/// Which of the two data channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channel {
    /// "r": ordered, reliable.
    Reliable,
    /// "u": unordered, maxRetransmits 0.
    Unreliable,
}

/// Connection state of the PeerConnection, reduced to what the link acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    Connected,
    Disconnected,
    Failed,
    Closed,
    Other,
}

/// What the PeerConnection reports to its link (tagged with the generation by the sender).
#[derive(Debug)]
pub(crate) enum RtcEvent {
    /// A local ICE candidate to trickle to the peer (JSON in the browser's `RTCIceCandidateInit`
    /// shape).
    Candidate(serde_json::Value),
    Open(Channel),
    /// The in-band unreliable channel this end opened (version 2) is open.
    InbandOpen,
    /// The peer's in-band unreliable channel (version 2) is open: it receives on it.
    PeerInbandOpen,
    Closed,
    State(ConnState),
    /// ICE selected a (new) candidate pair.
    PairSelected,
}

/// Report a channel's open and close to the link and feed its messages to `on_frame`.
fn wire_channel(
    dc: &Arc<RTCDataChannel>,
    gen: u32,
    tx: &UnboundedSender<LinkInput>,
    on_frame: &FrameSink,
    open: impl Fn() -> RtcEvent + Send + Sync + 'static,
) {
    let t = tx.clone();
    dc.on_open(Box::new(move || {
        let _ = t.send(LinkInput::Rtc { gen, event: open() });
        Box::pin(async {})
    }));
    let t = tx.clone();
    dc.on_close(Box::new(move || {
        let _ = t.send(LinkInput::Rtc {
            gen,
            event: RtcEvent::Closed,
        });
        Box::pin(async {})
    }));
    let sink = on_frame.clone();
    dc.on_message(Box::new(move |msg| sink(msg.data)));
}

/// Where a PeerConnection's incoming messages go.
pub(crate) type FrameSink = Arc<
    dyn Fn(Bytes) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync,
>;

/// Options for the direct path that apply to every link of a client. Whether a link's
/// PeerConnections are relay-only is the link's choice ([`RtcFactory::create`]).
#[derive(Clone, Default)]
pub(crate) struct RtcOptions {
    pub include_loopback: bool,
    pub ip_filter: Option<Arc<dyn Fn(IpAddr) -> bool + Send + Sync>>,
    pub udp_ports: Option<(u16, u16)>,
}

/// Which ICE candidates a PeerConnection may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Candidates {
    /// Host, server reflexive, peer reflexive and relay.
    All,
    /// TURN relay candidates only (`iceTransportPolicy: relay`): no other address of either end
    /// is sent, accepted or used (PROTOCOL.md: direct policy `relay`).
    RelayOnly,
}

/// Builds PeerConnections for one client.
pub(crate) struct RtcFactory {
    /// The client's settings; each API below is a copy with its own relay acceptance wait.
    settings: SettingEngine,
    /// Built on first use: most clients only ever need one of the two.
    api_all: std::sync::OnceLock<API>,
    api_relay: std::sync::OnceLock<API>,
    ice_servers: std::sync::Mutex<Vec<RTCIceServer>>,
}

fn rtc_ice_servers(ice_servers: &[IceServer]) -> Vec<RTCIceServer> {
    ice_servers
        .iter()
        .map(|s| RTCIceServer {
            urls: s.urls.clone(),
            username: s.username.clone().unwrap_or_default(),
            credential: s.credential.clone().unwrap_or_default(),
        })
        .collect()
}

impl RtcFactory {
    pub(crate) fn new(opts: &RtcOptions, ice_servers: &[IceServer]) -> Result<Self, String> {
        let mut s = SettingEngine::default();
        if let Some((min, max)) = opts.udp_ports {
            let ports = EphemeralUDP::new(min, max)
                .map_err(|e| format!("UDP port range {min}-{max}: {e}"))?;
            s.set_udp_network(UDPNetwork::Ephemeral(ports));
        }
        // mDNS would send multicast and hide host addresses behind .local names; peermesh
        // shares addresses only through its own signaling.
        s.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
        // Fall back fast, so the link returns to the server path quickly when the direct path dies.
        s.set_ice_timeouts(
            Some(Duration::from_secs(3)),
            Some(Duration::from_secs(8)),
            Some(Duration::from_millis(500)),
        );
        // A peer's host candidate is often first learnt from its check (prflx) because the check
        // overtakes the trickled candidate; waiting 1 s (the default) for something better only
        // delays the direct path.
        s.set_prflx_acceptance_min_wait(Some(Duration::ZERO));
        s.set_srflx_acceptance_min_wait(Some(Duration::from_millis(100)));
        if opts.include_loopback {
            s.set_include_loopback_candidate(true);
        }
        if let Some(f) = opts.ip_filter.clone() {
            s.set_ip_filter(Box::new(move |ip| f(ip)));
        }
        Ok(RtcFactory {
            settings: s,
            api_all: std::sync::OnceLock::new(),
            api_relay: std::sync::OnceLock::new(),
            ice_servers: std::sync::Mutex::new(rtc_ice_servers(ice_servers)),
        })
    }

    fn api(&self, candidates: Candidates) -> &API {
        let (cell, wait) = match candidates {
            // webrtc-rs waits 2 s before accepting a relay pair by default; 500 ms still lets a
            // host or srflx pair win when there is one.
            Candidates::All => (&self.api_all, Duration::from_millis(500)),
            // A relay-only PeerConnection has nothing better to wait for.
            Candidates::RelayOnly => (&self.api_relay, Duration::ZERO),
        };
        cell.get_or_init(|| {
            let mut s = self.settings.clone();
            s.set_relay_acceptance_min_wait(Some(wait));
            APIBuilder::new().with_setting_engine(s).build()
        })
    }

    /// Use these ICE servers for PeerConnections created from now on.
    pub(crate) fn set_ice_servers(&self, ice_servers: &[IceServer]) {
        *self.ice_servers.lock().expect("rtc config lock") = rtc_ice_servers(ice_servers);
    }

    /// A new PeerConnection of generation `gen` whose events go to `tx` and whose incoming
    /// messages go to `on_frame` (called in the channel's read loop, one message at a time).
    pub(crate) async fn create(
        &self,
        gen: u32,
        candidates: Candidates,
        tx: UnboundedSender<LinkInput>,
        on_frame: FrameSink,
    ) -> Result<Rtc, webrtc::Error> {
        let config = RTCConfiguration {
            ice_servers: self.ice_servers.lock().expect("rtc config lock").clone(),
            ice_transport_policy: match candidates {
                Candidates::All => RTCIceTransportPolicy::All,
                Candidates::RelayOnly => RTCIceTransportPolicy::Relay,
            },
            ..Default::default()
        };
        let pc = Arc::new(self.api(candidates).new_peer_connection(config).await?);
        let send = move |tx: &UnboundedSender<LinkInput>, event| {
            let _ = tx.send(LinkInput::Rtc { gen, event });
        };

        let t = tx.clone();
        pc.on_ice_candidate(Box::new(move |c| {
            if let Some(c) = c {
                // The transport policy already gathers nothing else; this is the last check
                // before an address leaves the host.
                if candidates == Candidates::RelayOnly && c.typ != RTCIceCandidateType::Relay {
                    tracing::warn!(typ = %c.typ, "relay-only: local candidate not signaled");
                    return Box::pin(async {});
                }
                match c.to_json() {
                    Ok(mut init) => {
                        if candidates == Candidates::RelayOnly {
                            match relay_candidate(&init.candidate) {
                                Some(line) => init.candidate = line,
                                None => return Box::pin(async {}),
                            }
                        }
                        send(&t, RtcEvent::Candidate(candidate_json(init)))
                    }
                    Err(e) => tracing::warn!("candidate not serializable: {e}"),
                }
            }
            Box::pin(async {})
        }));
        let t = tx.clone();
        pc.on_peer_connection_state_change(Box::new(move |s| {
            let state = match s {
                RTCPeerConnectionState::Connected => ConnState::Connected,
                RTCPeerConnectionState::Disconnected => ConnState::Disconnected,
                RTCPeerConnectionState::Failed => ConnState::Failed,
                RTCPeerConnectionState::Closed => ConnState::Closed,
                _ => ConnState::Other,
            };
            send(&t, RtcEvent::State(state));
            Box::pin(async {})
        }));

        let t = tx.clone();
        pc.sctp()
            .transport()
            .ice_transport()
            .on_selected_candidate_pair_change(Box::new(move |_| {
                send(&t, RtcEvent::PairSelected);
                Box::pin(async {})
            }));

        let r = pc
            .create_data_channel(
                RELIABLE_LABEL,
                Some(RTCDataChannelInit {
                    ordered: Some(true),
                    negotiated: Some(RELIABLE_ID),
                    ..Default::default()
                }),
            )
            .await?;
        let u = pc
            .create_data_channel(
                UNRELIABLE_LABEL,
                Some(RTCDataChannelInit {
                    ordered: Some(false),
                    max_retransmits: Some(0),
                    negotiated: Some(UNRELIABLE_ID),
                    ..Default::default()
                }),
            )
            .await?;
        let drained = Arc::new(tokio::sync::Notify::new());
        r.set_buffered_amount_low_threshold(DC_LOW).await;
        let d = drained.clone();
        r.on_buffered_amount_low(Box::new(move || {
            d.notify_waiters();
            Box::pin(async {})
        }))
        .await;
        for (dc, ch) in [(&r, Channel::Reliable), (&u, Channel::Unreliable)] {
            wire_channel(dc, gen, &tx, &on_frame, move || RtcEvent::Open(ch));
        }
        // The peer's in-band send channel of a version 2 generation (one; any other in-band
        // channel is closed).
        let (t, sink) = (tx.clone(), on_frame.clone());
        let taken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        pc.on_data_channel(Box::new(move |dc: Arc<RTCDataChannel>| {
            use std::sync::atomic::Ordering::SeqCst;
            if dc.label() == INBAND_LABEL && !dc.negotiated() && !taken.swap(true, SeqCst) {
                wire_channel(&dc, gen, &t, &sink, || RtcEvent::PeerInbandOpen);
            } else {
                tracing::debug!(label = dc.label(), "closing an unexpected data channel");
                tokio::spawn(async move {
                    let _ = dc.close().await;
                });
            }
            Box::pin(async {})
        }));
        Ok(Rtc {
            gen,
            candidates,
            pc,
            r,
            u,
            u2: None,
            tx,
            on_frame,
            drained,
            remote_set: false,
            pending: Vec::new(),
            signaled: HashMap::new(),
        })
    }
}

/// The two channels of an open direct path, for sending; cheap to clone.
#[derive(Clone)]
pub(crate) struct DirectTx {
    r: Arc<RTCDataChannel>,
    /// The unreliable channel in use: the in-band one (version 2) or "u".
    u: Arc<RTCDataChannel>,
    /// Signaled when the reliable channel's queue drains below `DC_LOW`.
    drained: Arc<tokio::sync::Notify>,
}

impl DirectTx {
    fn channel(&self, ch: Channel) -> &Arc<RTCDataChannel> {
        match ch {
            Channel::Reliable => &self.r,
            Channel::Unreliable => &self.u,
        }
    }

    /// Bytes `ch` has queued and not yet had acknowledged. webrtc-rs holds a channel's lock for
    /// the whole of a send, so ask only from the one task that sends on it, between sends.
    pub(crate) async fn buffered(&self, ch: Channel) -> usize {
        self.channel(ch).buffered_amount().await
    }

    /// [`DirectTx::buffered`] if it can be told without waiting (`None` while a send holds the
    /// channel).
    pub(crate) fn buffered_now(&self, ch: Channel) -> Option<usize> {
        use futures_util::FutureExt;
        self.channel(ch).buffered_amount().now_or_never()
    }

    /// Wait until the reliable channel's queue drains below `DC_LOW`, or at most `limit`
    /// (webrtc-rs might not deliver every drain event).
    pub(crate) async fn drained(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.drained.notified()).await;
    }

    /// Send on one of the channels. webrtc-sctp numbers a message on its stream before it waits
    /// for room in the association's queue: a send once started must complete, or the stream
    /// gets a hole the peer's in-order delivery waits on for good (unless the PeerConnection is
    /// being closed anyway).
    pub(crate) async fn send(&self, ch: Channel, data: &Bytes) -> Result<(), webrtc::Error> {
        self.channel(ch).send(data).await.map(|_| ())
    }
}

/// One PeerConnection generation of a link.
pub(crate) struct Rtc {
    gen: u32,
    candidates: Candidates,
    pc: Arc<RTCPeerConnection>,
    r: Arc<RTCDataChannel>,
    u: Arc<RTCDataChannel>,
    /// This end's in-band unreliable send channel (version 2).
    u2: Option<Arc<RTCDataChannel>>,
    tx: UnboundedSender<LinkInput>,
    on_frame: FrameSink,
    drained: Arc<tokio::sync::Notify>,
    remote_set: bool,
    pending: Vec<RTCIceCandidateInit>,
    /// Types of the candidates the peer signaled, by address and port.
    signaled: HashMap<(String, u16), CandidateType>,
}

/// A local candidate in the browser's `RTCIceCandidateInit` shape. webrtc-rs leaves `sdpMid`
/// empty; browsers and aiortc drop candidates without a usable mid, so name the one media
/// section (the data channel's, mid "0", index 0) explicitly.
fn candidate_json(init: RTCIceCandidateInit) -> serde_json::Value {
    let mut v = serde_json::json!({
        "candidate": init.candidate,
        "sdpMid": init.sdp_mid.filter(|m| !m.is_empty()).unwrap_or_else(|| "0".into()),
        "sdpMLineIndex": init.sdp_mline_index.unwrap_or(0),
    });
    if let Some(ufrag) = init.username_fragment.filter(|u| !u.is_empty()) {
        v["usernameFragment"] = ufrag.into();
    }
    v
}

/// Address, port and type of an SDP candidate line
/// (`candidate:<foundation> <component> <proto> <priority> <addr> <port> typ <type> ...`).
pub(crate) fn parse_candidate(line: &str) -> Option<((String, u16), CandidateType)> {
    let mut it = line.split_whitespace().skip(4);
    let addr = it.next()?.to_string();
    let port = it.next()?.parse().ok()?;
    if it.next()? != "typ" {
        return None;
    }
    let typ = match it.next()? {
        "host" => CandidateType::Host,
        "srflx" => CandidateType::Srflx,
        "prflx" => CandidateType::Prflx,
        "relay" => CandidateType::Relay,
        _ => return None,
    };
    Some(((addr, port), typ))
}

/// A relay candidate (`candidate:…`, with or without `a=`) as it may leave a relay-only end: its
/// related address (`raddr`/`rport`, this end's own address as the TURN server saw it) becomes
/// `0.0.0.0`/`0`. `None` for a candidate of any other type, or one that does not parse.
pub(crate) fn relay_candidate(line: &str) -> Option<String> {
    if parse_candidate(line)?.1 != CandidateType::Relay {
        return None;
    }
    // `<foundation> <component> <proto> <priority> <addr> <port> typ relay`, then name/value
    // pairs.
    const PAIRS_AT: usize = 8;
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut out: Vec<&str> = words.iter().take(PAIRS_AT).copied().collect();
    for pair in words[PAIRS_AT.min(words.len())..].chunks(2) {
        out.push(pair[0]);
        let value = match pair[0] {
            "raddr" => "0.0.0.0",
            "rport" => "0",
            _ => pair.get(1).copied().unwrap_or_default(),
        };
        if pair.len() == 2 {
            out.push(value);
        }
    }
    Some(out.join(" "))
}

/// The unspecified address of an SDP address type (`IP4` or `IP6`).
fn unspecified(addrtype: &str) -> &'static str {
    if addrtype == "IP6" {
        "::"
    } else {
        "0.0.0.0"
    }
}

/// `sdp` as it may be sent to (or taken from) a peer: for [`Candidates::RelayOnly`], without any
/// `a=candidate` line whose type is not `relay` (unparsable ones included), relay candidates
/// without their related address ([`relay_candidate`]), and the addresses of `c=` and `a=rtcp:`
/// lines unspecified (`0.0.0.0` or `::`). Every other line is kept as it is.
pub(crate) fn filter_sdp(sdp: &str, candidates: Candidates) -> String {
    if candidates == Candidates::All {
        return sdp.to_string();
    }
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        let end = &line[body.len()..];
        if let Some(c) = body.strip_prefix("a=candidate:") {
            if let Some(c) = relay_candidate(c) {
                out.push_str("a=candidate:");
                out.push_str(&c);
                out.push_str(end);
            }
            continue;
        }
        // `c=IN IP4 <addr>` and `a=rtcp:<port> IN IP4 <addr>`: the default candidate's address.
        let words: Vec<&str> = body.split_whitespace().collect();
        let address_at = match words.first() {
            Some(w) if w.starts_with("c=") => Some(2),
            Some(w) if w.starts_with("a=rtcp:") => Some(3),
            _ => None,
        };
        match address_at.filter(|&at| words.len() == at + 1) {
            Some(at) => {
                let mut words = words;
                words[at] = unspecified(words[at - 1]);
                out.push_str(&words.join(" "));
                out.push_str(end);
            }
            None => out.push_str(line),
        }
    }
    out
}

impl Rtc {
    /// Create the offer and set it as the local description; returns its SDP, as it may be
    /// sent.
    pub(crate) async fn offer(&self) -> Result<String, webrtc::Error> {
        let offer = self.pc.create_offer(None).await?;
        let sdp = filter_sdp(&offer.sdp, self.candidates);
        self.pc.set_local_description(offer).await?;
        Ok(sdp)
    }

    /// Apply the peer's offer and answer it; returns the answer's SDP, as it may be sent.
    pub(crate) async fn accept_offer(&mut self, sdp: String) -> Result<String, webrtc::Error> {
        let sdp = filter_sdp(&sdp, self.candidates);
        self.pc
            .set_remote_description(RTCSessionDescription::offer(sdp)?)
            .await?;
        self.remote_set().await?;
        let answer = self.pc.create_answer(None).await?;
        let sdp = filter_sdp(&answer.sdp, self.candidates);
        self.pc.set_local_description(answer).await?;
        Ok(sdp)
    }

    /// Apply the peer's answer.
    pub(crate) async fn accept_answer(&mut self, sdp: String) -> Result<(), webrtc::Error> {
        let sdp = filter_sdp(&sdp, self.candidates);
        self.pc
            .set_remote_description(RTCSessionDescription::answer(sdp)?)
            .await?;
        self.remote_set().await
    }

    async fn remote_set(&mut self) -> Result<(), webrtc::Error> {
        self.remote_set = true;
        for c in std::mem::take(&mut self.pending) {
            self.pc.add_ice_candidate(c).await?;
        }
        Ok(())
    }

    /// Add a remote candidate (queued until the remote description is set).
    pub(crate) async fn add_candidate(
        &mut self,
        candidate: serde_json::Value,
    ) -> Result<(), String> {
        let init: RTCIceCandidateInit =
            serde_json::from_value(candidate).map_err(|e| format!("bad candidate: {e}"))?;
        if init.candidate.is_empty() {
            return Ok(()); // end-of-candidates
        }
        let parsed = parse_candidate(&init.candidate);
        if self.candidates == Candidates::RelayOnly
            && !parsed
                .as_ref()
                .is_some_and(|(_, t)| *t == CandidateType::Relay)
        {
            // A relay-only pair exchanges relay addresses only; a peer that sends another kind
            // breaks the pair's policy, and using it would reveal our relay to that address.
            tracing::debug!(candidate = %init.candidate, "relay-only: remote candidate ignored");
            return Ok(());
        }
        if let Some((key, typ)) = parsed {
            self.signaled.insert(key, typ);
        }
        if self.remote_set {
            self.pc
                .add_ice_candidate(init)
                .await
                .map_err(|e| e.to_string())
        } else {
            self.pending.push(init);
            Ok(())
        }
    }

    /// Version 2: open this end's in-band unreliable send channel, used for unreliable frames
    /// from then on (the link sends nothing directly before [`RtcEvent::InbandOpen`]). Always
    /// without retransmissions: webrtc-rs sends FORWARD-TSN in a packet of its own, so the
    /// peer's `"u2_reliable"` request (PROTOCOL.md §7.6) may be ignored.
    pub(crate) async fn open_inband(&mut self) -> Result<(), webrtc::Error> {
        let dc = self
            .pc
            .create_data_channel(
                INBAND_LABEL,
                Some(RTCDataChannelInit {
                    ordered: Some(false),
                    max_retransmits: Some(0),
                    ..Default::default()
                }),
            )
            .await?;
        wire_channel(&dc, self.gen, &self.tx, &self.on_frame, || {
            RtcEvent::InbandOpen
        });
        self.u2 = Some(dc);
        Ok(())
    }

    /// The sending half, for senders outside the link task.
    pub(crate) fn tx(&self) -> DirectTx {
        DirectTx {
            r: self.r.clone(),
            u: self.u2.clone().unwrap_or_else(|| self.u.clone()),
            drained: self.drained.clone(),
        }
    }

    /// Candidate types of the selected pair, once ICE has selected one.
    ///
    /// A peer's check often arrives before its trickled candidate, so ICE first knows that
    /// address as peer-reflexive; once the candidate is signaled, its signaled type is the true
    /// one (browsers report it the same way).
    pub(crate) async fn selected_pair(&self) -> Option<CandidatePair> {
        let pair = self
            .pc
            .sctp()
            .transport()
            .ice_transport()
            .get_selected_candidate_pair()
            .await?;
        let mut remote = conv(pair.remote.typ);
        if remote == CandidateType::Prflx {
            if let Some(&typ) = self
                .signaled
                .get(&(pair.remote.address.clone(), pair.remote.port))
            {
                remote = typ;
            }
        }
        let addr = |c: &webrtc::ice_transport::ice_candidate::RTCIceCandidate| {
            c.address
                .parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, c.port))
        };
        Some(CandidatePair {
            local_type: conv(pair.local.typ),
            remote_type: remote,
            local: addr(&pair.local)?,
            remote: addr(&pair.remote)?,
        })
    }

    /// Close in the background (closing waits for the association to shut down).
    pub(crate) fn close(self) {
        let pc = self.pc;
        tokio::spawn(async move {
            if let Err(e) = pc.close().await {
                tracing::debug!("closing peer connection: {e}");
            }
        });
    }
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

    #[test]
    fn parses_candidate_lines() {
        assert_eq!(
            parse_candidate("candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host"),
            Some((("127.0.0.1".to_string(), 5000), CandidateType::Host))
        );
        assert_eq!(
            parse_candidate(
                "candidate:2 1 udp 1694498815 203.0.113.5 6000 typ srflx raddr 0.0.0.0 rport 0"
            ),
            Some((("203.0.113.5".to_string(), 6000), CandidateType::Srflx))
        );
        assert_eq!(parse_candidate("garbage"), None);
    }

    #[test]
    fn relay_only_sdp_keeps_relay_candidates_only() {
        let sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n\
                   m=application 50000 UDP/DTLS/SCTP webrtc-datachannel\r\n\
                   c=IN IP4 203.0.113.5\r\na=rtcp:9 IN IP4 203.0.113.5\r\na=mid:0\r\n\
                   a=candidate:1 1 udp 2130706431 192.0.2.1 5000 typ host\r\n\
                   a=candidate:2 1 udp 1694498815 203.0.113.5 6000 typ srflx raddr 0.0.0.0 rport 0\r\n\
                   a=candidate:3 1 udp 16777215 198.51.100.7 7000 typ relay raddr 203.0.113.5 rport 6000 generation 0\r\n\
                   a=candidate:4 1 udp 1 198.51.100.8 7001 typ prflx\r\n\
                   a=candidate:garbage\r\n\
                   a=end-of-candidates\r\n";
        let relay = filter_sdp(sdp, Candidates::RelayOnly);
        assert_eq!(
            relay,
            "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n\
             m=application 50000 UDP/DTLS/SCTP webrtc-datachannel\r\n\
             c=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\na=mid:0\r\n\
             a=candidate:3 1 udp 16777215 198.51.100.7 7000 typ relay raddr 0.0.0.0 rport 0 generation 0\r\n\
             a=end-of-candidates\r\n"
        );
        assert_eq!(filter_sdp(sdp, Candidates::All), sdp);
        // Bare \n line ends, IPv6, a=rtcp without an address.
        assert_eq!(
            filter_sdp(
                "c=IN IP6 2001:db8::1\na=rtcp:9\na=candidate:1 1 udp 1 192.0.2.1 5 typ host\n",
                Candidates::RelayOnly
            ),
            "c=IN IP6 ::\na=rtcp:9\n"
        );
    }

    #[test]
    fn relay_candidates_lose_their_related_address() {
        assert_eq!(
            relay_candidate("candidate:3 1 udp 16777215 198.51.100.7 7000 typ relay raddr 203.0.113.5 rport 6000").as_deref(),
            Some("candidate:3 1 udp 16777215 198.51.100.7 7000 typ relay raddr 0.0.0.0 rport 0")
        );
        assert_eq!(
            relay_candidate("candidate:3 1 udp 16777215 198.51.100.7 7000 typ relay").as_deref(),
            Some("candidate:3 1 udp 16777215 198.51.100.7 7000 typ relay")
        );
        assert_eq!(
            relay_candidate("candidate:1 1 udp 2130706431 192.0.2.1 5000 typ host"),
            None
        );
        assert_eq!(relay_candidate("garbage"), None);
    }
}
