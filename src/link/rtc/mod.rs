//! The direct path: one PeerConnection per link generation, with two pre-negotiated data
//! channels, and (link protocol version 2) an in-band unreliable one.
//!
//! This directory is the only place that names webrtc-rs types; everything above it speaks in
//! [`RtcEvent`], [`Channel`], [`CandidateType`](crate::CandidateType) and [`RtcError`], so a
//! backend is one file here:
//! - `v017`: the `webrtc` 0.17 crate (async, its own I/O).
//!
//! `sdp` holds what every backend shares: candidate lines and SDP filtering, as plain strings.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;

mod sdp;
mod v017;

pub(crate) use sdp::parse_candidate;
pub(crate) use v017::{DirectTx, Rtc, RtcFactory};

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
