//! The direct path on the `webrtc` 0.17 crate: async, with its own sockets, gathering and
//! tasks. One [`RTCPeerConnection`] per [`Rtc`].

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

use super::sdp::{candidate_json, filter_sdp, parse_candidate, refused_remote, relay_candidate};
use super::LinkInput;
use super::{
    Candidates, Channel, ConnState, FrameSink, IceTuning, RtcError, RtcEvent, RtcOptions, DC_LOW,
    INBAND_LABEL, RELIABLE_ID, RELIABLE_LABEL, UNRELIABLE_ID, UNRELIABLE_LABEL,
};
use crate::protocol::IceServer;
use crate::{CandidatePair, CandidateType};

impl From<webrtc::Error> for RtcError {
    fn from(e: webrtc::Error) -> Self {
        RtcError::new("webrtc 0.17", e)
    }
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
        // The relay wait is each API's own (`RtcFactory::api`).
        let ice = IceTuning::new(Candidates::All);
        s.set_ice_timeouts(
            Some(ice.disconnected),
            Some(ice.failed),
            Some(ice.keepalive),
        );
        s.set_host_acceptance_min_wait(Some(ice.host_wait));
        s.set_prflx_acceptance_min_wait(Some(ice.prflx_wait));
        s.set_srflx_acceptance_min_wait(Some(ice.srflx_wait));
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
        let cell = match candidates {
            Candidates::All => &self.api_all,
            Candidates::RelayOnly => &self.api_relay,
        };
        let wait = IceTuning::new(candidates).relay_wait;
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
    ) -> Result<Rtc, RtcError> {
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
                        send(
                            &t,
                            RtcEvent::Candidate(candidate_json(
                                init.candidate,
                                init.sdp_mid,
                                init.sdp_mline_index,
                                init.username_fragment,
                            )),
                        )
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
    pub(crate) async fn send(&self, ch: Channel, data: &Bytes) -> Result<(), RtcError> {
        self.channel(ch).send(data).await?;
        Ok(())
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

impl Rtc {
    /// Create the offer and set it as the local description; returns its SDP, as it may be
    /// sent.
    pub(crate) async fn offer(&self) -> Result<String, RtcError> {
        let offer = self.pc.create_offer(None).await?;
        let sdp = filter_sdp(&offer.sdp, self.candidates);
        self.pc.set_local_description(offer).await?;
        Ok(sdp)
    }

    /// Apply the peer's offer and answer it; returns the answer's SDP, as it may be sent.
    pub(crate) async fn accept_offer(&mut self, sdp: String) -> Result<String, RtcError> {
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
    pub(crate) async fn accept_answer(&mut self, sdp: String) -> Result<(), RtcError> {
        let sdp = filter_sdp(&sdp, self.candidates);
        self.pc
            .set_remote_description(RTCSessionDescription::answer(sdp)?)
            .await?;
        self.remote_set().await
    }

    async fn remote_set(&mut self) -> Result<(), RtcError> {
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
    ) -> Result<(), RtcError> {
        let init: RTCIceCandidateInit =
            serde_json::from_value(candidate).map_err(|e| RtcError::new("bad candidate", e))?;
        if init.candidate.is_empty() {
            return Ok(()); // end-of-candidates
        }
        let parsed = parse_candidate(&init.candidate);
        if refused_remote(self.candidates, parsed.as_ref()) {
            tracing::debug!(candidate = %init.candidate, "relay-only: remote candidate ignored");
            return Ok(());
        }
        if let Some((key, typ)) = parsed {
            self.signaled.insert(key, typ);
        }
        if self.remote_set {
            Ok(self.pc.add_ice_candidate(init).await?)
        } else {
            self.pending.push(init);
            Ok(())
        }
    }

    /// Version 2: open this end's in-band unreliable send channel, used for unreliable frames
    /// from then on (the link sends nothing directly before [`RtcEvent::InbandOpen`]). Always
    /// without retransmissions: webrtc-rs sends FORWARD-TSN in a packet of its own, so the
    /// peer's `"u2_reliable"` request (PROTOCOL.md §7.6) may be ignored.
    pub(crate) async fn open_inband(&mut self) -> Result<(), RtcError> {
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
