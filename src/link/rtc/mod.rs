//! The direct path: one PeerConnection per link generation, with two pre-negotiated data
//! channels, and (link protocol version 2) an in-band unreliable one.
//!
//! This directory is the only place that names webrtc-rs types; everything above it speaks in
//! [`RtcEvent`], [`Channel`], [`CandidateType`](crate::CandidateType) and [`RtcError`], so a
//! backend is one file here:
//! - `v017`: the `webrtc` 0.17 crate (async, its own I/O), [`DirectBackend::Webrtc`];
//! - `sansio`: webrtc-rs's Sans-I/O core (`rtc` 0.21) and our own I/O loop,
//!   [`DirectBackend::SansIo`] (cargo feature `sansio`).
//!
//! The types the link uses ([`RtcFactory`], [`Rtc`], [`DirectTx`]) are enums over the
//! backends; each method forwards to the backend's own.
//!
//! `sdp` holds what every backend shares: candidate lines and SDP filtering, as plain strings.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc::UnboundedSender;

use super::LinkInput;
use crate::protocol::IceServer;
use crate::{CandidatePair, DirectBackend};

#[cfg(feature = "sansio")]
mod sansio;
mod sdp;
mod v017;

pub(crate) use sdp::parse_candidate;

/// Forward a method call to the backend in use.
macro_rules! each {
    ($value:expr, $x:ident => $body:expr) => {
        match $value {
            Self::Webrtc($x) => $body,
            #[cfg(feature = "sansio")]
            Self::SansIo($x) => $body,
        }
    };
}

/// Builds PeerConnections for one client, on the backend its options name.
pub(crate) enum RtcFactory {
    Webrtc(Box<v017::RtcFactory>),
    #[cfg(feature = "sansio")]
    SansIo(sansio::RtcFactory),
}

impl RtcFactory {
    /// A factory on `opts.backend`; an error names a bad option, or a backend this build lacks.
    pub(crate) fn new(opts: &RtcOptions, ice_servers: &[IceServer]) -> Result<Self, String> {
        match opts.backend {
            DirectBackend::Webrtc => Ok(RtcFactory::Webrtc(Box::new(v017::RtcFactory::new(
                opts,
                ice_servers,
            )?))),
            #[cfg(feature = "sansio")]
            DirectBackend::SansIo => Ok(RtcFactory::SansIo(sansio::RtcFactory::new(
                opts,
                ice_servers,
            )?)),
            #[allow(unreachable_patterns)]
            other => Err(format!(
                "direct backend {other} is not in this build (cargo feature \"{}\")",
                other.name()
            )),
        }
    }

    /// Use these ICE servers for PeerConnections created from now on.
    pub(crate) fn set_ice_servers(&self, ice_servers: &[IceServer]) {
        each!(self, f => f.set_ice_servers(ice_servers))
    }

    /// A new PeerConnection of generation `gen` whose events go to `tx` and whose incoming
    /// messages go to `on_frame`, one at a time, in the order the channels deliver them.
    pub(crate) async fn create(
        &self,
        gen: u32,
        candidates: Candidates,
        tx: UnboundedSender<LinkInput>,
        on_frame: FrameSink,
    ) -> Result<Rtc, RtcError> {
        match self {
            RtcFactory::Webrtc(f) => {
                Ok(Rtc::Webrtc(f.create(gen, candidates, tx, on_frame).await?))
            }
            #[cfg(feature = "sansio")]
            RtcFactory::SansIo(f) => {
                Ok(Rtc::SansIo(f.create(gen, candidates, tx, on_frame).await?))
            }
        }
    }
}

/// One PeerConnection generation of a link.
pub(crate) enum Rtc {
    Webrtc(v017::Rtc),
    #[cfg(feature = "sansio")]
    SansIo(sansio::Rtc),
}

impl Rtc {
    /// Create the offer and set it as the local description; returns its SDP, as it may be
    /// sent.
    pub(crate) async fn offer(&self) -> Result<String, RtcError> {
        each!(self, r => r.offer().await)
    }

    /// Apply the peer's offer and answer it; returns the answer's SDP, as it may be sent.
    pub(crate) async fn accept_offer(&mut self, sdp: String) -> Result<String, RtcError> {
        each!(self, r => r.accept_offer(sdp).await)
    }

    /// Apply the peer's answer.
    pub(crate) async fn accept_answer(&mut self, sdp: String) -> Result<(), RtcError> {
        each!(self, r => r.accept_answer(sdp).await)
    }

    /// Add a remote candidate (queued until the remote description is set).
    pub(crate) async fn add_candidate(
        &mut self,
        candidate: serde_json::Value,
    ) -> Result<(), RtcError> {
        each!(self, r => r.add_candidate(candidate).await)
    }

    /// Version 2: open this end's in-band unreliable send channel, used for unreliable frames
    /// from then on (the link sends nothing directly before [`RtcEvent::InbandOpen`]).
    pub(crate) async fn open_inband(&mut self) -> Result<(), RtcError> {
        each!(self, r => r.open_inband().await)
    }

    /// The sending half, for senders outside the link task.
    pub(crate) fn tx(&self) -> DirectTx {
        match self {
            Rtc::Webrtc(r) => DirectTx::Webrtc(r.tx()),
            #[cfg(feature = "sansio")]
            Rtc::SansIo(r) => DirectTx::SansIo(r.tx()),
        }
    }

    /// Candidate types of the selected pair, once ICE has selected one (a prflx remote that
    /// the peer signaled has its signaled type).
    pub(crate) async fn selected_pair(&self) -> Option<CandidatePair> {
        each!(self, r => r.selected_pair().await)
    }

    /// Close in the background.
    pub(crate) fn close(self) {
        each!(self, r => r.close())
    }
}

/// The channels of an open direct path, for sending; cheap to clone.
#[derive(Clone)]
pub(crate) enum DirectTx {
    Webrtc(v017::DirectTx),
    #[cfg(feature = "sansio")]
    SansIo(sansio::DirectTx),
}

impl DirectTx {
    /// Bytes `ch` has queued and not yet had acknowledged. Ask only from the one task that
    /// sends on it, between sends.
    pub(crate) async fn buffered(&self, ch: Channel) -> usize {
        each!(self, t => t.buffered(ch).await)
    }

    /// [`DirectTx::buffered`] if it can be told without waiting.
    pub(crate) fn buffered_now(&self, ch: Channel) -> Option<usize> {
        each!(self, t => t.buffered_now(ch))
    }

    /// Wait until the reliable channel's queue drains below `DC_LOW`, or at most `limit`.
    pub(crate) async fn drained(&self, limit: Duration) {
        each!(self, t => t.drained(limit).await)
    }

    /// Send on one of the channels. A send once started must complete, or the stream may get
    /// a hole the peer's in-order delivery waits on for good (unless the PeerConnection is
    /// being closed anyway).
    pub(crate) async fn send(&self, ch: Channel, data: &Bytes) -> Result<(), RtcError> {
        each!(self, t => t.send(ch, data).await)
    }
}

/// App data waits while more than this is queued in the reliable channel, and resumes when it
/// drains below the low mark. Our send window (8 MiB) would otherwise all sit in SCTP's queue,
/// which slows webrtc-rs's SCTP and delays acks and probes queued behind it.
pub(crate) const DC_HIGH: usize = 1 << 20;
const DC_LOW: usize = 512 << 10;
/// Most bytes the two channels may have queued for the link's own frames (acks, probes) to go
/// on the direct path; above it they take the server path. Half of webrtc-sctp's 128 KiB
/// pending queue, so that such a send (almost) never has to wait for room.
pub(crate) const OWN_QUEUE_MAX: usize = 64 << 10;
/// Most bytes the unreliable channel in use ("u2", or version 1's "u") may have queued (sent and
/// not yet acknowledged) for another unreliable message to be handed to it; beyond that the
/// message is dropped, as at a full UDP socket buffer (Linux's default is 208 KiB). SCTP stacks
/// send every queued unordered chunk before any ordered one, so an unbounded unreliable queue on
/// a congested path would starve the reliable channel. (Version 1's "u" is ordered on the
/// default backend, queued in turn with "r"; the sansio backend applies its options.)
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

/// Where a PeerConnection's incoming messages go.
pub(crate) type FrameSink = Arc<
    dyn Fn(Bytes) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync,
>;

/// Options for the direct path that apply to every link of a client. Whether a link's
/// PeerConnections are relay-only is the link's choice ([`RtcFactory::create`]).
#[derive(Clone, Default)]
pub(crate) struct RtcOptions {
    pub backend: DirectBackend,
    pub include_loopback: bool,
    pub ip_filter: Option<Arc<dyn Fn(IpAddr) -> bool + Send + Sync>>,
    pub udp_ports: Option<(u16, u16)>,
}

/// The ICE settings of every backend, each set through its own API.
pub(crate) struct IceTuning {
    /// No traffic for this long: ICE "disconnected" (the link falls back to the server path).
    pub disconnected: Duration,
    /// ... and "failed".
    pub failed: Duration,
    /// Keepalive interval.
    pub keepalive: Duration,
    /// How long a pair of each local candidate type waits for a better one before it is
    /// accepted: host, peer reflexive, server reflexive, relay.
    pub host_wait: Duration,
    pub prflx_wait: Duration,
    pub srflx_wait: Duration,
    pub relay_wait: Duration,
}

impl IceTuning {
    pub(crate) fn new(candidates: Candidates) -> Self {
        IceTuning {
            // Fall back fast, so the link returns to the server path quickly when the direct
            // path dies.
            disconnected: Duration::from_secs(3),
            failed: Duration::from_secs(8),
            keepalive: Duration::from_millis(500),
            host_wait: Duration::ZERO,
            // A peer's host candidate is often first learnt from its check (prflx) because the
            // check overtakes the trickled candidate; waiting for something better (1 s by
            // default) only delays the direct path.
            prflx_wait: Duration::ZERO,
            srflx_wait: Duration::from_millis(100),
            relay_wait: match candidates {
                // webrtc-rs waits 2 s before accepting a relay pair by default; 500 ms still
                // lets a host or srflx pair win when there is one.
                Candidates::All => Duration::from_millis(500),
                // A relay-only PeerConnection has nothing better to wait for.
                Candidates::RelayOnly => Duration::ZERO,
            },
        }
    }
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

/// A failure of the WebRTC stack (creating a PeerConnection, applying a description or a
/// candidate, sending on a channel), whatever the backend; its source is the backend's own error.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub(crate) struct RtcError {
    context: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl RtcError {
    pub(crate) fn new(
        context: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        RtcError {
            context,
            source: source.into(),
        }
    }
}
