//! One link per co-member: path selection and the delivery guarantee.
//!
//! A link starts on the server path at once and brings up a PeerConnection in the background.
//! Every reliable fragment carries a per-link sequence number; the receiver delivers strictly in
//! order, drops duplicates and acknowledges cumulatively; the sender keeps unacknowledged fragments
//! and sends them again on the server path when the direct path goes away. Moving *up* to the
//! direct path needs no re-send: the server path is itself ordered and reliable, so fragments still
//! on it arrive and the receiver fills the gap from its reorder buffer.
//!
//! The algorithm is [`core::LinkCore`] (sans-IO, `core.rs`). This module is its async layer: one
//! task per link ([`LinkTask`]) owns the PeerConnection and the sends waiting for window, feeds
//! the core what arrives (relay frames, signals, commands from [`LinkHandle`], the clock) and
//! carries out what it asks (frames to the WebSocket, messages to the app, path reports). The
//! core itself sits in [`shared::Hot`] under a lock that the hot paths take too, so that a data
//! channel frame reaches the app, and a send with window credit (claimed from a [`Gate`]) its
//! channel, without a switch to the link task (`shared.rs`).

mod core;
mod parts;
mod rtc;
mod shared;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant as TokioInstant};
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub(crate) use self::core::{
    default_lanes, Delivery, Lane, LaneConfig, FILE_LANE_DEFAULT, LANE_SLOTS, MAX_LANES,
};
use self::core::{CoreConfig, CoreEvent, Gen, LinkCore, LinkVersion, PathId, Route, SendError};
use rtc::FrameSink;
use rtc::{Candidates, Channel, ConnState, Rtc, RtcEvent};
pub(crate) use rtc::{RtcFactory, RtcOptions};
use shared::{Claim, Gate, Hot, SendReply, Shared, Writers};

use crate::protocol::{ClientMsg, DirectPolicy, LinkId, PathKind, PeerId, RelayFrame};
use crate::{CandidatePair, CandidateType, Error, Event, Path, Reliability, Result};

/// Frames from the data channels that may wait for the link task (see `LinkTask::direct`):
/// at most 128 × 16 KiB.
const DIRECT_FRAMES_QUEUED: usize = 128;
/// Longest a new PeerConnection may take to connect before it counts as failed (and the app
/// gets [`Event::DirectFailed`]). ICE on a LAN or through TURN connects in well under a second;
/// pairs that cannot connect (two symmetric NATs without TURN) are told within 10 s.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(crate::CONNECT_TIMEOUT_SECS);
/// First wait before the initiator tries a new PeerConnection after a failure, and the longest
/// for a pair that had a direct path before (it is likely to come back) and for one that never
/// had one (it may never get one; retries are cheap but not free).
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX_HAD_DIRECT: Duration = Duration::from_secs(5);
const RETRY_MAX_NEVER_DIRECT: Duration = Duration::from_secs(60);

/// Inputs to a link task from outside it: the client's session and the PeerConnection.
#[derive(Debug)]
pub(crate) enum LinkInput {
    /// A link-layer frame that came over the server path.
    Relay(Bytes),
    /// Signaling data from the peer.
    Signal(serde_json::Value),
    /// Something the PeerConnection of generation `gen` reported.
    Rtc { gen: u32, event: RtcEvent },
    /// The pair's direct policy is at least this strict from now on (a stricter `MemberInfo`
    /// for the same link, or the server refused a `signal` with `direct_not_allowed`).
    Restrict {
        policy: DirectPolicy,
        /// Tell the app (`Event::DirectFailed`) why, if the link was trying.
        why: Option<String>,
    },
    /// The server path is interrupted (this client's connection to the server is down, or the
    /// peer's session is suspended): nothing is relayed until [`LinkInput::Resync`]; reliable
    /// frames stay unacknowledged and are sent again then.
    PauseRelay,
    /// The server path is back (this session resumed, or the peer's did): send again on it
    /// every reliable frame not acknowledged, and the current ack, unless on the direct path.
    /// Ends a [`LinkInput::Hold`] too.
    Resync,
    /// The server is draining (PROTOCOL.md §3.15): from the first reliable message that would
    /// go on the server path, reliable messages are numbered and kept but not transmitted,
    /// until [`LinkInput::Resync`] (the session resumed after all) or
    /// [`LinkHandle::take_held`] (a new session: they go on the new link to the same user).
    /// Acks and probes still go, so what was sent gets acknowledged. A link on the direct path
    /// goes on sending there: it does not need the server.
    Hold,
    /// The pair no longer shares a group: stop.
    Close,
}

/// Requests of the link's handles.
enum Cmd {
    /// Send a message when it has room in the window (in line for it). A message with credit
    /// from the [`Gate`] goes to the core directly ([`Shared::fast_send`]).
    Send {
        data: Bytes,
        lane: Lane,
        delivery: Delivery,
        reply: Option<SendReply>,
    },
    /// Answer once every reliable message sent before it is acknowledged (on every lane).
    Flush(oneshot::Sender<()>),
    /// Empty the link for a new session ([`LinkCore::take_held`]).
    TakeHeld(HeldReply),
}

fn delivery(reliability: Reliability) -> Delivery {
    match reliability {
        Reliability::Reliable => Delivery::Reliable,
        Reliability::Unreliable => Delivery::Unreliable,
    }
}

/// Counters of one link, for diagnostics and tests. The send counters count transmissions as
/// they are handed on (to the WebSocket writer or a data channel writer), not messages as they
/// are accepted: a fragment accepted while the window's path is busy or held is counted when it
/// goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Reliable fragments sent on the server path (first sends and re-sends).
    pub sent_server: u64,
    /// Reliable fragments sent on the direct path.
    pub sent_direct: u64,
    /// Reliable fragments received on the server path (including duplicates).
    pub recv_server: u64,
    /// Reliable fragments received on the direct path (including duplicates).
    pub recv_direct: u64,
    /// Reliable fragments sent again (after the direct path went away, or the server path came
    /// back after an interruption).
    pub resent: u64,
    /// Duplicate reliable fragments received and dropped.
    pub duplicates: u64,
    /// Times the link moved between the server and direct paths (or to a direct candidate pair
    /// of other types).
    pub path_changes: u64,
    /// Unreliable messages received in parts of which some never arrived (discarded after 1 s,
    /// or to keep at most 256 KiB of parts).
    pub unreliable_incomplete: u64,
    /// Unreliable messages not sent: the direct path's unreliable channel already had 256 KiB
    /// queued (a congested path; such messages are dropped rather than delayed), or the server
    /// path was interrupted.
    pub unreliable_dropped: u64,
    /// Local ICE candidates gathered and signaled, by type (all PeerConnection generations).
    pub candidates_host: u64,
    /// See `candidates_host`.
    pub candidates_srflx: u64,
    /// See `candidates_host`.
    pub candidates_relay: u64,
}

/// What the client reads of a link without asking its task.
#[derive(Debug, Clone, Default)]
pub(crate) struct LinkStatus {
    pub path: Path,
    pub pair: Option<CandidatePair>,
    pub rtt: Option<Duration>,
}

/// What the link task publishes after every step.
#[derive(Debug, Clone, Default)]
struct LinkView {
    status: LinkStatus,
    stats: LinkStats,
    /// [`LinkCore::drained`].
    drained: bool,
    /// [`LinkCore::peer_files`].
    peer_files: Option<bool>,
    /// The link task has ended.
    closed: bool,
}

/// What every link of a client shares.
#[derive(Clone)]
pub(crate) struct LinkCtx {
    pub ws_tx: mpsc::Sender<WsMessage>,
    pub events: mpsc::Sender<Event>,
    pub rtc: Option<Arc<RtcFactory>>,
    pub window: usize,
    pub max_message: usize,
    /// Dead-path rule: longest silence of a direct path before it counts as failed.
    pub dead_path: Duration,
    /// Link protocol version offered to peers.
    pub link_version: u32,
    /// The lanes this client sends on (`ClientConfig::with_lane`).
    pub lanes: [Option<LaneConfig>; MAX_LANES],
    /// The file lane's scheduling (`ClientConfig::with_file_lane`).
    pub file_lane: LaneConfig,
    /// Where file-lane messages go.
    pub files: Arc<crate::files::Files>,
}

impl LinkCtx {
    fn core_cfg(&self) -> CoreConfig {
        CoreConfig {
            window: self.window,
            max_message: self.max_message,
            dead_path: self.dead_path,
            version: LinkVersion(self.link_version),
            lanes: self.lanes,
            file_lane: self.file_lane,
        }
    }
}

/// The client's handle on a running link task.
#[derive(Clone)]
pub(crate) struct LinkHandle {
    pub peer: PeerId,
    pub link_id: LinkId,
    inputs: mpsc::UnboundedSender<LinkInput>,
    cmds: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
    view: watch::Receiver<LinkView>,
    cfg: CoreConfig,
}

impl LinkHandle {
    /// Start a link task. `policy` is the pair's effective direct policy: the strictest of this
    /// client's own and the server's `MemberInfo.direct`.
    pub(crate) fn spawn(
        peer: PeerId,
        link_id: LinkId,
        initiator: bool,
        policy: DirectPolicy,
        ctx: LinkCtx,
    ) -> Self {
        let (inputs, inputs_rx) = mpsc::unbounded_channel();
        let (direct, direct_rx) = mpsc::channel(DIRECT_FRAMES_QUEUED);
        let (cmds, cmds_rx) = mpsc::unbounded_channel();
        let cfg = ctx.core_cfg();
        let core = LinkCore::new(ctx.core_cfg(), Instant::now());
        // What lane 0 may take is lent at once (the whole window with one lane), so that a
        // `try_send` right after the link is made does not depend on when its task first runs.
        let lend = core.lendable();
        let shared = Arc::new(Shared::new(
            Hot::new(core, lend),
            Gate::new(lend),
            ctx.events.clone(),
            peer,
        ));
        let view = shared.view.subscribe();
        let task = LinkTask {
            peer,
            link_id,
            initiator,
            policy,
            shared: shared.clone(),
            inputs: inputs.clone(),
            direct,
            waiting: VecDeque::new(),
            lane_waiting: std::array::from_fn(|_| VecDeque::new()),
            flushes: Vec::new(),
            replies: Vec::new(),
            take_held: None,
            ended: false,
            files_out: VecDeque::new(),
            path_msgs: VecDeque::new(),
            rtc: None,
            gen: 0,
            r_open: false,
            u_open: false,
            u2_open: false,
            peer_u2_open: false,
            version: 1,
            connected: false,
            told_connected: false,
            retry_at: None,
            connect_by: None,
            declined: false,
            backoff: RETRY_MIN,
            had_direct: false,
            ctx,
        };
        tokio::spawn(task.run(inputs_rx, direct_rx, cmds_rx));
        LinkHandle {
            peer,
            link_id,
            inputs,
            cmds,
            shared,
            view,
            cfg,
        }
    }

    fn error(&self, e: SendError) -> Error {
        match e {
            SendError::WouldBlock => Error::WouldBlock(self.peer),
            SendError::TooLarge { size, limit } => Error::MessageTooLarge { size, limit },
            SendError::Ended => Error::UnknownPeer(self.peer),
            SendError::NoLane(lane) => {
                Error::InvalidConfig(format!("lane {lane} is not configured"))
            }
        }
    }

    /// Send on lane 0, waiting for room in the send window. Answers once the link task has
    /// taken the message (numbered it, if reliable) and handed on what it could send.
    pub(crate) async fn send(&self, data: Bytes, reliability: Reliability) -> Result<()> {
        self.send_on(Lane(0), data, delivery(reliability)).await
    }

    /// The window cost of a message, whether its lane is configured, and whether it may claim
    /// credit from the gate (lane 0's: lane 0, and plain unreliable messages, which draw on
    /// lane 0's share).
    fn admit(&self, lane: Lane, len: usize, delivery: Delivery) -> Result<(usize, bool)> {
        let reliability = match delivery {
            Delivery::Reliable => Reliability::Reliable,
            Delivery::Unreliable | Delivery::Sequenced => Reliability::Unreliable,
        };
        let permits = self.cfg.cost(len, reliability).map_err(|e| self.error(e))?;
        let lane0 = lane.0 == 0 || delivery == Delivery::Unreliable;
        // The file lane is the library's (`send_file_msg`); the core checks the peer has it.
        let file = lane.0 == crate::protocol::FILE_LANE && delivery == Delivery::Reliable;
        if !lane0
            && !file
            && self
                .cfg
                .lanes
                .get(lane.index())
                .copied()
                .flatten()
                .is_none()
        {
            return Err(self.error(SendError::NoLane(lane.0)));
        }
        Ok((permits, lane0))
    }

    /// Whether the peer takes file transfers (the file lane, §8.9); waits until its link
    /// version is known.
    pub(crate) async fn peer_files(&self) -> Result<bool> {
        let mut view = self.view.clone();
        let v = view
            .wait_for(|v| v.peer_files.is_some() || v.closed)
            .await
            .map_err(|_| Error::UnknownPeer(self.peer))?;
        match v.peer_files {
            Some(files) => Ok(files),
            None => Err(Error::UnknownPeer(self.peer)),
        }
    }

    /// Largest file bytes per CHUNK on this link: a file message may take at most half the
    /// window (§8.9) and is a reliable message like any other (`max_message`).
    pub(crate) fn file_chunk_max(&self) -> usize {
        // A CHUNK's header and more.
        const HEADER: usize = 64;
        let half = self.cfg.window / 2;
        let fragments = half.div_ceil(crate::protocol::MAX_FRAGMENT_PAYLOAD);
        (half - fragments * self::core::FRAGMENT_OVERHEAD)
            .min(self.cfg.max_message)
            .saturating_sub(HEADER)
            .clamp(1, crate::files::wire::MAX_CHUNK)
    }

    /// Send one file-transfer message (§8.9) on the file lane, waiting for room.
    pub(crate) async fn send_file_msg(&self, data: Bytes) -> Result<()> {
        self.send_on(Lane(crate::protocol::FILE_LANE), data, Delivery::Reliable)
            .await
    }

    /// Queue one small file-transfer message (§8.9) on the file lane without waiting: it
    /// takes its turn for the window in the link task. For the receiving side of a transfer,
    /// whose task the link task may be waiting on (delivering it chunks): waiting here for the
    /// link task would deadlock both.
    pub(crate) fn post_file_msg(&self, data: Bytes) -> Result<()> {
        let lane = Lane(crate::protocol::FILE_LANE);
        // The core would refuse it (and nobody would hear): say so here. (Each end decides
        // the other's version on its own, §8.8.2, so a file may come from a peer this end
        // has decided has no file lane.)
        if self.view.borrow().peer_files != Some(true) {
            return Err(self.error(SendError::NoLane(lane.0)));
        }
        self.queue(lane, data)
    }

    /// A reliable message on `lane` to the link task's line for the lane, without waiting
    /// and without an answer.
    fn queue(&self, lane: Lane, data: Bytes) -> Result<()> {
        self.admit(lane, data.len(), Delivery::Reliable)?;
        self.cmds
            .send(Cmd::Send {
                data,
                lane,
                delivery: Delivery::Reliable,
                reply: None,
            })
            .map_err(|_| Error::UnknownPeer(self.peer))
    }

    /// Send on `lane`, waiting for room in the window (lane 0's credit, or the lane's own
    /// line in the link task).
    pub(crate) async fn send_on(&self, lane: Lane, data: Bytes, delivery: Delivery) -> Result<()> {
        let (permits, lane0) = self.admit(lane, data.len(), delivery)?;
        if lane0 {
            match self.shared.gate.claim(permits) {
                Claim::Granted => {
                    // The core takes it here; the answer waits only for earlier frames still
                    // on their way to a channel.
                    return match self.shared.fast_send(lane, data, delivery, permits, true) {
                        Ok(None) => Ok(()),
                        Ok(Some(rx)) => match rx.await {
                            Ok(r) => r.map_err(|e| self.error(e)),
                            Err(_) => Err(Error::UnknownPeer(self.peer)),
                        },
                        Err(e) => Err(self.error(e)),
                    };
                }
                Claim::Short => {}
                Claim::Closed => return Err(Error::UnknownPeer(self.peer)),
            }
        }
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Send {
                data,
                lane,
                delivery,
                reply: Some(tx),
            })
            .map_err(|_| Error::UnknownPeer(self.peer))?;
        // Dropping this future while the message waits in line withdraws it; once taken it
        // goes, whatever becomes of this future.
        match rx.await {
            Ok(r) => r.map_err(|e| self.error(e)),
            Err(_) => Err(Error::UnknownPeer(self.peer)),
        }
    }

    /// Send on lane 0 without waiting; `WouldBlock` if the window is full (or others wait for
    /// it).
    pub(crate) fn try_send(&self, data: Bytes, reliability: Reliability) -> Result<()> {
        let delivery = delivery(reliability);
        let (permits, _) = self.admit(Lane(0), data.len(), delivery)?;
        match self.shared.gate.claim(permits) {
            Claim::Granted => {}
            Claim::Short => return Err(Error::WouldBlock(self.peer)),
            Claim::Closed => return Err(Error::UnknownPeer(self.peer)),
        }
        // Claimed: the core has room for it. Whether its frames reached their channel is not
        // this call's to wait for.
        match self
            .shared
            .fast_send(Lane(0), data, delivery, permits, false)
        {
            Ok(_) => Ok(()),
            Err(e) => Err(self.error(e)),
        }
    }

    /// A reliable message a drained session held, re-sent on its lane: lane 0 as
    /// [`LinkHandle::try_send`]; the other lanes in their line, without an answer.
    pub(crate) fn resend_held(&self, lane: Lane, data: Bytes) -> Result<()> {
        if lane.0 == 0 {
            return self.try_send(data, Reliability::Reliable);
        }
        self.queue(lane, data)
    }

    pub(crate) fn deliver(&self, input: LinkInput) {
        // A closed task means the link is being torn down; late frames have nowhere to go.
        let _ = self.inputs.send(input);
    }

    /// Wait until every reliable message sent so far is acknowledged by the peer.
    pub(crate) async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Flush(tx))
            .map_err(|_| Error::UnknownPeer(self.peer))?;
        rx.await.map_err(|_| Error::UnknownPeer(self.peer))
    }

    /// Draining (see [`LinkInput::Hold`]) and nothing of this link is in flight through the
    /// server: every reliable frame transmitted before the hold is acknowledged, or the link is
    /// on the direct path and holds nothing.
    pub(crate) fn drained(&self) -> bool {
        self.shared.view_now().drained
    }

    /// A new session replaces this link: take the reliable messages held since
    /// [`LinkInput::Hold`] (never transmitted, so they can go on the next link to the same peer
    /// without a duplicate), oldest first, and count the messages transmitted but not
    /// acknowledged (they may or may not have arrived). A send from now on, or one that raced
    /// this and lost, fails with `UnknownPeer`.
    pub(crate) async fn take_held(&self) -> (Vec<(Lane, Bytes)>, u64) {
        self.shared.gate.close();
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::TakeHeld(tx)).is_err() {
            return (Vec::new(), 0);
        }
        rx.await.unwrap_or_default()
    }

    /// Stop the link: senders waiting on the window get an error, the task closes its
    /// PeerConnection and ends.
    pub(crate) fn close(&self) {
        self.shared.gate.close();
        let _ = self.inputs.send(LinkInput::Close);
    }

    pub(crate) fn status(&self) -> LinkStatus {
        self.shared.view_now().status
    }

    pub(crate) fn stats(&self) -> LinkStats {
        self.shared.view_now().stats
    }
}

/// Signaling payloads exchanged between the two ends of a link (inside `signal.data`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum LinkSignal {
    Offer {
        gen: u32,
        sdp: String,
        /// Link protocol version of the sender; absent from version 1 peers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
        /// Version 2: the sender asks the peer to open its "u2" reliable (unordered), because
        /// webrtc-sctp 0.17 drops whole any packet with a FORWARD-TSN followed by other chunks
        /// (PROTOCOL.md §7.6).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        u2_reliable: Option<bool>,
    },
    Answer {
        gen: u32,
        sdp: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        u2_reliable: Option<bool>,
    },
    Candidate {
        gen: u32,
        #[serde(flatten)]
        candidate: serde_json::Value,
    },
    /// The responder will not make a direct path (direct paths are off on its side).
    Decline { gen: u32 },
}

/// The reliable messages a link held, with their lanes, and how many sent may be lost.
type HeldReply = oneshot::Sender<(Vec<(Lane, Bytes)>, u64)>;

/// A send or a flush waiting in line for the window.
enum Waiter {
    Send {
        data: Bytes,
        lane: Lane,
        delivery: Delivery,
        permits: usize,
        reply: Option<SendReply>,
    },
    Flush(oneshot::Sender<()>),
}

fn tokio_at(at: Instant) -> TokioInstant {
    TokioInstant::from_std(at)
}

/// A data channel frame counted in [`Hot::slow_frames`] and not (yet) in the link task's queue.
struct SlowFrame(Option<std::sync::Weak<Shared>>);

impl SlowFrame {
    /// The frame is in the task's queue: the task uncounts it.
    fn queued(mut self) {
        self.0 = None;
    }
}

impl Drop for SlowFrame {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take().and_then(|s| s.upgrade()) {
            let mut h = shared.lock();
            h.slow_frames = h.slow_frames.saturating_sub(1);
        }
    }
}

/// Own frames still on a channel after `OWN_SEND_WAIT`: a copy takes the server path (the
/// channel's send goes on; acks are cumulative and probes matched by id).
fn own_waits_expired(h: &mut Hot, now: Instant) {
    let (due, rest): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut h.own_waits)
        .into_iter()
        .partition(|w| w.1 <= now);
    h.own_waits = rest;
    for (_, _, t) in due {
        h.core.transmit_abandoned(t, now);
    }
}

struct LinkTask {
    peer: PeerId,
    link_id: LinkId,
    initiator: bool,
    /// The pair's direct policy: `None` makes no PeerConnection and declines offers, `Relay`
    /// makes relay-only ones.
    policy: DirectPolicy,
    ctx: LinkCtx,
    /// The core and what goes with it, shared with the hot paths.
    shared: Arc<Shared>,
    /// Sender of this task's inputs, for the PeerConnection's callbacks.
    inputs: mpsc::UnboundedSender<LinkInput>,
    /// Frames from the data channels that the hot path could not take, with their generation:
    /// bounded, and the channels' read loops wait for room, so a peer that sends faster than
    /// the app takes its messages (or floods unreliable ones, which no window limits) is held
    /// back by SCTP's receive window instead of growing this queue.
    direct: mpsc::Sender<(u32, Bytes)>,
    /// Sends of lane 0 (and plain unreliable ones) and flushes waiting in line for the window,
    /// oldest first.
    waiting: VecDeque<Waiter>,
    /// Sends of the other lanes waiting for window, a line per lane (index 0 unused), so that
    /// a bulk lane waiting for room holds up no other lane.
    lane_waiting: [VecDeque<Waiter>; LANE_SLOTS],
    /// Flushes waiting for every fragment up to their seqs (per lane) to be acknowledged.
    flushes: Vec<([u64; LANE_SLOTS], oneshot::Sender<()>)>,
    /// Answers to sends taken since the last step.
    replies: Vec<(SendReply, Result<(), SendError>)>,
    /// [`LinkHandle::take_held`] asked; answered once no claim is on its way.
    take_held: Option<HeldReply>,
    /// The link was emptied for a new session: it takes no more messages.
    ended: bool,
    /// File-lane messages for the file transfers.
    files_out: VecDeque<Bytes>,
    /// Path reports for the server.
    path_msgs: VecDeque<ClientMsg>,
    // The current PeerConnection generation.
    rtc: Option<Rtc>,
    gen: u32,
    r_open: bool,
    u_open: bool,
    /// This end's in-band unreliable send channel is open (version 2).
    u2_open: bool,
    /// The peer's in-band unreliable send channel is open (version 2).
    peer_u2_open: bool,
    /// Link protocol version of the current generation (the lower of the two ends').
    version: u32,
    connected: bool,
    /// The core was told the generation is connected (ICE connected, with a selected pair).
    told_connected: bool,
    retry_at: Option<TokioInstant>,
    /// When the current PeerConnection counts as failed if it has not connected.
    connect_by: Option<TokioInstant>,
    /// The peer declined direct paths: stay on the server path for good.
    declined: bool,
    backoff: Duration,
    had_direct: bool,
}

impl LinkTask {
    async fn run(
        mut self,
        mut inputs: mpsc::UnboundedReceiver<LinkInput>,
        mut direct: mpsc::Receiver<(u32, Bytes)>,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
    ) {
        if self.initiator {
            self.start_rtc().await;
        }
        self.settle().await;
        let shared = self.shared.clone();
        let far = || TokioInstant::now() + Duration::from_secs(3600);
        // The link broke (a panic under its lock) rather than being closed.
        let mut broke = false;
        loop {
            let wake = {
                let mut h = shared.lock();
                // Set before the task ends only after a panic under the lock (`Shared::lock`).
                if h.closed {
                    broke = true;
                    break;
                }
                h.armed = h.next_timer();
                h.armed
            };
            let retry_at = self.retry_at;
            let connect_by = self.connect_by;
            tokio::select! {
                biased;
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.on_cmd(cmd),
                    // Every handle is gone.
                    None => break,
                },
                input = inputs.recv() => match input {
                    Some(LinkInput::Close) | None => break,
                    Some(input) => self.handle(input).await,
                },
                // After `inputs`: a channel's open (an input) comes before its first frame.
                Some((gen, frame)) = direct.recv() => {
                    let mut h = shared.lock();
                    h.slow_frames -= 1;
                    h.core.handle_frame(PathId::Direct(Gen(gen)), frame, Instant::now());
                }
                // A hot path left something to do.
                _ = shared.wake.notified() => {}
                _ = sleep_until(wake.map_or_else(far, tokio_at)), if wake.is_some() => {
                    let now = Instant::now();
                    let mut h = shared.lock();
                    h.core.handle_timeout(now);
                    own_waits_expired(&mut h, now);
                }
                _ = sleep_until(retry_at.unwrap_or_else(far)), if retry_at.is_some() => {
                    self.retry_at = None;
                    self.start_rtc().await;
                }
                _ = sleep_until(connect_by.unwrap_or_else(far)), if connect_by.is_some() => {
                    self.connect_by = None;
                    self.rtc_failed(&format!("not connected within {CONNECT_TIMEOUT:?}"));
                }
            }
            self.settle().await;
        }
        let (relays, undelivered) = {
            let mut h = shared.lock();
            h.closed = true;
            // A broken link's reliable messages not acknowledged (or never sent) may not have
            // arrived: the app hears how many, as after a new session.
            let undelivered = broke.then(|| {
                let (held, messages) = h.core.take_held();
                held.len() as u64 + messages
            });
            h.writers = None;
            // Sends waiting for their frames to reach a channel fail (`UnknownPeer`).
            h.writing.clear();
            h.answering.clear();
            h.late_answers.clear();
            h.own_waits.clear();
            h.pending_tx.clear();
            // Whoever waits on the view (`LinkHandle::peer_files`) learns the link is gone.
            shared.view.send_replace(h.view());
            (h.relay_out.drain(..).collect::<Vec<Bytes>>(), undelivered)
        };
        // Server-path frames hot-path sends queued just before the close still go.
        for frame in relays {
            self.relay(&frame).await;
        }
        if let Some(messages) = undelivered.filter(|&n| n > 0) {
            let _ = self
                .ctx
                .events
                .send(Event::Undelivered {
                    peer: self.peer,
                    messages,
                })
                .await;
        }
        // Transfers on this link end with it (their messages cannot come any more).
        self.ctx.files.link_gone(self.peer, self.link_id);
        if let Some(rtc) = self.rtc.take() {
            rtc.close();
        }
    }

    // ---- sending ----

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Send {
                data,
                lane,
                delivery,
                reply,
            } => {
                let reliability = match delivery {
                    Delivery::Reliable => Reliability::Reliable,
                    _ => Reliability::Unreliable,
                };
                let Ok(permits) = self.ctx.core_cfg().cost(data.len(), reliability) else {
                    // The handle checked the size with the same configuration.
                    return;
                };
                let waiter = Waiter::Send {
                    data,
                    lane,
                    delivery,
                    permits,
                    reply,
                };
                if lane.0 == 0 || delivery == Delivery::Unreliable {
                    self.waiting.push_back(waiter);
                } else {
                    self.lane_waiting[lane.index()].push_back(waiter);
                }
            }
            Cmd::Flush(reply) => self.waiting.push_back(Waiter::Flush(reply)),
            Cmd::TakeHeld(reply) => self.take_held = Some(reply),
        }
    }

    /// Admit waiting sends in order while the window has room for the oldest: lane 0's line
    /// against lane 0's room less the credit lent, each other lane's against its own room
    /// (which never counts lane 0's unused reserve, where the lent credit is).
    fn serve_waiters(&mut self, h: &mut Hot) {
        // Window the core has free and nobody holds a claim on.
        let free = |h: &Hot| h.core.window_available().saturating_sub(h.lent);
        while let Some(front) = self.waiting.front() {
            match front {
                Waiter::Flush(_) => {
                    let Some(Waiter::Flush(reply)) = self.waiting.pop_front() else {
                        unreachable!()
                    };
                    self.flushes.push((h.core.last_seqs(), reply));
                }
                Waiter::Send { permits, reply, .. } => {
                    let withdrawn = reply.as_ref().is_some_and(|r| r.is_closed());
                    if !withdrawn && *permits > free(h) && !self.ended {
                        break;
                    }
                    let Some(waiter) = self.waiting.pop_front() else {
                        unreachable!()
                    };
                    self.take_waiter(h, waiter, withdrawn);
                }
            }
        }
        // A lane-0 send waits for room: no new file message until it has it (file messages
        // would otherwise take every bit of room that acks free, for as long as transfers
        // last, and a lane-0 message larger than the rest of the window would never fit).
        let lane0_waits = !self.waiting.is_empty();
        for i in 1..LANE_SLOTS {
            if lane0_waits && i == usize::from(crate::protocol::FILE_LANE) && !self.ended {
                continue;
            }
            while let Some(Waiter::Send { permits, reply, .. }) = self.lane_waiting[i].front() {
                let withdrawn = reply.as_ref().is_some_and(|r| r.is_closed());
                // Never the credit lent to lane 0's gate: a lane's share can change (the file
                // lane's is only there while the peer has it).
                let room = h.core.lane_free(Lane(i as u8)).min(free(h));
                if !withdrawn && *permits > room && !self.ended {
                    break;
                }
                let Some(waiter) = self.lane_waiting[i].pop_front() else {
                    unreachable!()
                };
                self.take_waiter(h, waiter, withdrawn);
            }
        }
    }

    fn take_waiter(&mut self, h: &mut Hot, waiter: Waiter, withdrawn: bool) {
        let Waiter::Send {
            data,
            lane,
            delivery,
            reply,
            ..
        } = waiter
        else {
            return;
        };
        if withdrawn {
            return;
        }
        let r = h.core.send_on(lane, data, delivery);
        if let Some(reply) = reply {
            self.replies.push((reply, r));
        }
    }

    /// Someone waits in line for the window (or the link is being emptied).
    fn in_line(&self) -> bool {
        let file_waits = !self.lane_waiting[usize::from(crate::protocol::FILE_LANE)].is_empty();
        !self.waiting.is_empty() || self.take_held.is_some() || file_waits
    }

    /// After every input: admit waiting sends, carry out what the core asks (app events,
    /// frames), answer the handles and publish the link's view.
    async fn settle(&mut self) {
        let shared = self.shared.clone();
        {
            let mut h = shared.lock();
            if self.in_line() {
                // In line for the window (or emptying the link): the handles' credit comes
                // back, and freed window is not lent until the line is empty.
                h.lending = false;
                h.lent -= shared.gate.take_back();
            }
            self.serve_waiters(&mut h);
            if h.lent == 0 {
                if let Some(reply) = self.take_held.take() {
                    let _ = reply.send(h.core.take_held());
                    self.ended = true;
                    // Those in line fail now (`SendError::Ended`).
                    self.serve_waiters(&mut h);
                }
            }
            // Whoever frees window or gives a claim back during this step wakes the task.
            self.set_watch(&mut h);
        }
        loop {
            let upgrading = {
                let mut h = shared.lock();
                self.take_core_events(&mut h);
                h.upgrading
            };
            if let Some(gen) = upgrading {
                self.upgraded(gen).await;
                continue;
            }
            self.deliver_outbox().await;
            while let Some(data) = self.files_out.pop_front() {
                // Awaited: a transfer busy on its disk holds the file lane back.
                self.ctx.files.deliver(self.peer, self.link_id, data).await;
            }
            while let Some(msg) = self.path_msgs.pop_front() {
                self.send_msg(&msg).await;
            }
            let (sent, relays, late) = {
                let mut h = shared.lock();
                h.refresh_buffered();
                let now = Instant::now();
                // Only what this step made counts for another round: frames the hot paths
                // queue meanwhile wake the task, which then takes its inputs first.
                let mut sent = h.pump(now, false);
                sent |= self.pending_out(&mut h, now);
                // The frames queued now, and the answers waiting for them; later ones next
                // round (hot-path senders cannot outrun the WebSocket).
                (sent, h.relay_out.len(), std::mem::take(&mut h.late_answers))
            };
            for _ in 0..relays {
                let Some(frame) = shared.lock().relay_out.pop_front() else {
                    break;
                };
                self.relay(&frame).await;
            }
            if !late.is_empty() {
                let mut h = shared.lock();
                let next = h.next_write;
                h.answering
                    .extend(late.into_iter().map(|reply| (next, reply, Ok(()))));
                h.answer();
            }
            let mut h = shared.lock();
            if !sent && h.outbox.is_empty() && h.core_events.is_empty() && !h.core.has_event() {
                break;
            }
            // Unreliable messages sent free window.
            self.serve_waiters(&mut h);
        }
        let mut h = shared.lock();
        let next = h.next_write;
        h.answering
            .extend(self.replies.drain(..).map(|(reply, r)| (next, reply, r)));
        h.answer();
        let mut pending = Vec::new();
        for (seqs, reply) in self.flushes.drain(..) {
            if h.core.acked_through_all(&seqs) {
                let _ = reply.send(());
            } else if !reply.is_closed() {
                pending.push((seqs, reply));
            }
        }
        self.flushes = pending;
        self.set_watch(&mut h);
        // Not past server-path frames still to relay (as `Hot::lend`).
        if h.lending && h.relay_out.is_empty() {
            // With several lanes, only lane 0's unused reserve is lent (`LinkCore::lendable`).
            let free = h.core.lendable().saturating_sub(h.lent);
            if free > 0 {
                h.lent += free;
                shared.gate.lend(free);
            }
        }
        shared.view.send_replace(h.view());
    }

    /// Tell the hot paths whether they may lend freed window, and whether the task wants to
    /// hear of every frame and send (someone waits for window, an ack or the claims).
    fn set_watch(&self, h: &mut Hot) {
        h.lending = !self.in_line() && !self.ended;
        h.watch = !self.waiting.is_empty()
            || self.lane_waiting.iter().any(|l| !l.is_empty())
            || !self.flushes.is_empty()
            || self.take_held.is_some();
    }

    /// Give the app its events, in order (waiting for room in its queue without the lock, the
    /// event staying first in the outbox so that no hot path overtakes it).
    async fn deliver_outbox(&mut self) {
        let shared = self.shared.clone();
        let mut published = false;
        loop {
            {
                let mut h = shared.lock();
                if h.outbox.is_empty() {
                    return;
                }
                if !published {
                    // What the app hears of (a path change) is readable when it does.
                    shared.view.send_replace(h.view());
                    published = true;
                }
                if h.flush_outbox(&self.ctx.events) {
                    return;
                }
            }
            let Ok(permit) = self.ctx.events.reserve().await else {
                shared.lock().outbox.clear();
                return;
            };
            if let Some(event) = shared.lock().outbox.pop_front() {
                permit.send(event);
            }
        }
    }

    /// Direct frames that met no writers: start the writers of the current generation, or
    /// send them on the server path (the generation is gone; the core hears of it next).
    fn pending_out(&mut self, h: &mut Hot, now: Instant) -> bool {
        let mut any = false;
        while let Some(t) = h.pending_tx.pop_front() {
            any = true;
            if let Route::Direct(gen, _) = t.route {
                if h.writers.as_ref().is_none_or(|w| w.gen != gen) {
                    self.start_writers(h, gen);
                }
            }
            if let Err(t) = h.dispatch(t, now, false) {
                h.core.transmit_abandoned(t, now);
            }
            // Whatever that made (and what queued behind it) goes in order too.
            while let Some(t) = h.core.poll_transmit() {
                h.pending_tx.push_back(t);
            }
        }
        any
    }

    /// Writer tasks for the channels of generation `gen`, if it is the current PeerConnection.
    fn start_writers(&mut self, h: &mut Hot, gen: Gen) {
        let Some(rtc) = self.rtc.as_ref().filter(|_| self.gen == gen.0) else {
            return;
        };
        h.writers = Some(Writers::start(gen, rtc.tx(), &self.shared));
    }

    async fn relay(&self, frame: &[u8]) {
        let buf = RelayFrame {
            peer: self.peer,
            link: self.link_id,
            payload: frame,
        }
        .encode();
        // Fails only when the session is closing, and then the link is going away too.
        let _ = self.ctx.ws_tx.send(WsMessage::Binary(buf.into())).await;
    }

    // ---- what the core says ----

    /// Turn the core's events (those a hot path left first) into app events, path reports and
    /// PeerConnection failures.
    fn take_core_events(&mut self, h: &mut Hot) {
        while h.upgrading.is_none() {
            let Some(event) = h.core_events.pop_front().or_else(|| h.core.poll_event()) else {
                break;
            };
            match event {
                CoreEvent::Deliver { lane, data, .. } if lane.0 == crate::protocol::FILE_LANE => {
                    self.files_out.push_back(data);
                }
                CoreEvent::Deliver {
                    data,
                    reliability,
                    lane,
                } => h.outbox.push_back(Event::Message {
                    lane: lane.0,
                    from: self.peer,
                    data,
                    reliability,
                }),
                CoreEvent::PathChanged(PathId::Direct(gen)) => {
                    // Reported with the pair as ICE has it now ([`LinkTask::upgraded`]); the
                    // events after it wait.
                    h.upgrading = Some(gen);
                    return;
                }
                CoreEvent::PathChanged(PathId::Server) => self.set_path(h, Path::Server),
                CoreEvent::DirectFailed { gen, why } => {
                    // A late verdict on an older PeerConnection says nothing about this one.
                    if gen.0 == self.gen && self.rtc.is_some() {
                        tracing::info!(peer = self.peer, "direct path lost ({why})");
                        self.rtc_failed_locked(h, &why);
                    }
                }
            }
        }
    }

    /// The core moved to generation `gen`: learn the selected pair now (the peer's candidates
    /// may have been signaled since ICE connected, resolving a peer-reflexive type) and report
    /// the path with it. Events after it wait until then.
    async fn upgraded(&mut self, gen: Gen) {
        let current = {
            let h = self.shared.lock();
            gen.0 == self.gen && h.core.path() == PathId::Direct(gen)
        };
        let pair = match &self.rtc {
            Some(rtc) if current => rtc.selected_pair().await,
            _ => None,
        };
        let shared = self.shared.clone();
        let mut h = shared.lock();
        h.upgrading = None;
        if !current || gen.0 != self.gen || h.core.path() != PathId::Direct(gen) {
            // Left again in the same step: the app hears of the failure only.
            return;
        }
        if let Some(pair) = pair {
            h.pair = Some(pair);
        }
        let Some(pair) = h.pair else {
            // The core upgrades only after `direct_connected`, told with a pair.
            tracing::warn!(peer = self.peer, "direct path without a candidate pair");
            return;
        };
        self.backoff = RETRY_MIN;
        self.had_direct = true;
        self.set_path(&mut h, pair.path());
    }

    /// Take `path` and tell the app and the server if it changed.
    fn set_path(&mut self, h: &mut Hot, path: Path) {
        if h.path == path {
            return;
        }
        h.path = path;
        tracing::debug!(peer = self.peer, %path, "path changed");
        h.outbox.push_back(Event::PathChanged {
            peer: self.peer,
            path,
        });
        // Reported to the server too, for the app's backend.
        let (kind, local, remote) = match path {
            Path::Server => (PathKind::Server, None, None),
            Path::Direct { local, remote } => {
                (PathKind::Direct, Some(local.into()), Some(remote.into()))
            }
        };
        self.path_msgs.push_back(ClientMsg::Path {
            peer: self.peer,
            link: self.link_id,
            path: kind,
            local,
            remote,
        });
    }

    // ---- inputs ----

    async fn handle(&mut self, input: LinkInput) {
        let now = Instant::now();
        match input {
            LinkInput::Relay(frame) => {
                self.shared
                    .lock()
                    .core
                    .handle_frame(PathId::Server, frame, now)
            }
            LinkInput::Signal(data) => self.on_signal(data).await,
            LinkInput::Rtc { gen, event } => {
                if gen == self.gen && self.rtc.is_some() {
                    self.on_rtc(event).await
                }
            }
            LinkInput::Restrict { policy, why } => self.restrict(policy, why).await,
            LinkInput::PauseRelay => self.shared.lock().core.pause_server(),
            LinkInput::Resync => self.shared.lock().core.resync_server(),
            LinkInput::Hold => self.shared.lock().core.hold(),
            LinkInput::Close => {}
        }
    }

    /// The factory for this link's PeerConnections: none when its policy forbids direct paths
    /// (or this client has them off).
    fn factory(&self) -> Option<Arc<RtcFactory>> {
        match self.policy {
            DirectPolicy::None => None,
            DirectPolicy::Any | DirectPolicy::Relay => self.ctx.rtc.clone(),
        }
    }

    fn candidate_policy(&self) -> Candidates {
        match self.policy {
            DirectPolicy::Relay => Candidates::RelayOnly,
            DirectPolicy::Any | DirectPolicy::None => Candidates::All,
        }
    }

    /// Tighten the link's policy. A PeerConnection made under the looser one is dropped (it may
    /// be using, or have signaled, addresses the new one forbids); under `relay` the initiator
    /// starts a relay-only one, under `none` nothing more is tried.
    async fn restrict(&mut self, policy: DirectPolicy, why: Option<String>) {
        if policy <= self.policy {
            return;
        }
        tracing::info!(peer = self.peer, %policy, "the pair's direct policy is now stricter");
        self.policy = policy;
        let trying = self.rtc.is_some() || self.retry_at.is_some();
        let shared = self.shared.clone();
        {
            let mut h = shared.lock();
            self.reset_rtc(&mut h);
            self.retry_at = None;
            if let Some(reason) = why.filter(|_| trying) {
                // After the path change the reset caused.
                self.take_core_events(&mut h);
                h.outbox.push_back(Event::DirectFailed {
                    peer: self.peer,
                    reason,
                });
            }
        }
        if self.initiator && !self.declined && self.factory().is_some() {
            self.start_rtc().await;
        }
    }

    // ---- PeerConnection lifecycle ----

    async fn start_rtc(&mut self) {
        let Some(factory) = self.factory() else {
            return;
        };
        {
            let shared = self.shared.clone();
            let mut h = shared.lock();
            self.reset_rtc(&mut h);
            self.gen += 1;
            // Known once the answer arrives.
            self.version = 1;
            h.core.direct_started(Gen(self.gen), Instant::now());
        }
        match factory
            .create(
                self.gen,
                self.candidate_policy(),
                self.inputs.clone(),
                self.frame_sink(self.gen),
            )
            .await
        {
            Ok(rtc) => match rtc.offer().await {
                Ok(sdp) => {
                    self.rtc = Some(rtc);
                    self.connect_by = Some(TokioInstant::now() + CONNECT_TIMEOUT);
                    let gen = self.gen;
                    let version = Some(self.ctx.link_version);
                    let u2_reliable = (self.ctx.link_version >= 2).then_some(true);
                    self.signal(LinkSignal::Offer {
                        gen,
                        sdp,
                        version,
                        u2_reliable,
                    })
                    .await;
                }
                Err(e) => {
                    rtc.close();
                    self.rtc_failed(&format!("creating offer: {e}"));
                }
            },
            Err(e) => self.rtc_failed(&format!("creating peer connection: {e}")),
        }
    }

    /// Frames from the data channels of generation `gen` go to the core in the channel's read
    /// loop ([`Shared::fast_frame`]), or else to this task, in the order the channels deliver
    /// them.
    fn frame_sink(&self, gen: u32) -> FrameSink {
        let direct = self.direct.clone();
        let shared = Arc::downgrade(&self.shared);
        Arc::new(move |frame| {
            let Some(frame) = shared.upgrade().and_then(|s| s.fast_frame(gen, frame)) else {
                return Box::pin(std::future::ready(()));
            };
            // Counted in `Hot::slow_frames`: uncounted again if this is dropped before the frame
            // is queued (a read loop ending), or later frames would all queue.
            let counted = SlowFrame(Some(shared.clone()));
            let direct = direct.clone();
            Box::pin(async move {
                // Fails only when the link task has ended.
                if direct.send((gen, frame)).await.is_ok() {
                    counted.queued();
                }
            })
        })
    }

    /// Drop the current PeerConnection, if any: the core leaves its generation (with the
    /// re-send of §8.5 if it was the path) and its channel writers stop.
    fn reset_rtc(&mut self, h: &mut Hot) {
        if let Some(old) = self.rtc.take() {
            h.core.direct_down(Gen(self.gen), Instant::now());
            old.close();
        }
        h.writers = None;
        // Their frames are dropped with the generation (DATA goes again on the server path).
        h.writing.clear();
        self.r_open = false;
        self.u_open = false;
        self.u2_open = false;
        self.peer_u2_open = false;
        self.connected = false;
        self.told_connected = false;
        h.pair = None;
        self.connect_by = None;
    }

    /// The direct path could not be made (or died for good): stay on the server path and, if we
    /// are the initiator, try again later.
    fn rtc_failed(&mut self, why: &str) {
        let shared = self.shared.clone();
        let mut h = shared.lock();
        self.rtc_failed_locked(&mut h, why);
    }

    fn rtc_failed_locked(&mut self, h: &mut Hot, why: &str) {
        tracing::info!(peer = self.peer, "no direct path: {why}");
        self.reset_rtc(h);
        // The path change (if the link was direct) comes first.
        self.take_core_events(h);
        h.outbox.push_back(Event::DirectFailed {
            peer: self.peer,
            reason: why.to_string(),
        });
        if self.initiator && self.factory().is_some() && !self.declined {
            self.retry_at = Some(TokioInstant::now() + self.backoff);
            let max = if self.had_direct {
                RETRY_MAX_HAD_DIRECT
            } else {
                RETRY_MAX_NEVER_DIRECT
            };
            self.backoff = (self.backoff * 2).min(max);
        }
    }

    async fn signal(&self, s: LinkSignal) {
        let data = match serde_json::to_value(&s) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("signal not serializable: {e}");
                return;
            }
        };
        self.send_msg(&ClientMsg::Signal {
            to: self.peer,
            link: self.link_id,
            data,
        })
        .await;
    }

    /// Send a session message to the server.
    async fn send_msg(&self, msg: &ClientMsg) {
        if let Ok(text) = serde_json::to_string(msg) {
            // Fails only when the session is closing, and then the link is going away too.
            let _ = self.ctx.ws_tx.send(WsMessage::Text(text.into())).await;
        }
    }

    async fn on_signal(&mut self, data: serde_json::Value) {
        let sig: LinkSignal = match serde_json::from_value(data) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(peer = self.peer, "ignoring malformed signal: {e}");
                return;
            }
        };
        match sig {
            LinkSignal::Offer {
                gen, sdp, version, ..
            } => {
                let Some(factory) = self.factory() else {
                    tracing::debug!(
                        peer = self.peer,
                        "no direct path for this pair (policy none); declining the offer"
                    );
                    self.signal(LinkSignal::Decline { gen }).await;
                    return;
                };
                if gen <= self.gen {
                    return; // stale
                }
                // The peer restarted the connection.
                {
                    let shared = self.shared.clone();
                    let mut h = shared.lock();
                    self.reset_rtc(&mut h);
                    self.gen = gen;
                    self.version = version.unwrap_or(1).clamp(1, self.ctx.link_version);
                    h.core.direct_started(Gen(gen), Instant::now());
                }
                let mut rtc = match factory
                    .create(
                        gen,
                        self.candidate_policy(),
                        self.inputs.clone(),
                        self.frame_sink(gen),
                    )
                    .await
                {
                    Ok(r) => r,
                    Err(e) => return self.rtc_failed(&format!("creating peer connection: {e}")),
                };
                match rtc.accept_offer(sdp).await {
                    Ok(answer) => {
                        self.rtc = Some(rtc);
                        self.connect_by = Some(TokioInstant::now() + CONNECT_TIMEOUT);
                        let version = Some(self.ctx.link_version);
                        let u2_reliable = (self.ctx.link_version >= 2).then_some(true);
                        self.signal(LinkSignal::Answer {
                            gen,
                            sdp: answer,
                            version,
                            u2_reliable,
                        })
                        .await;
                        self.open_inband().await;
                    }
                    Err(e) => {
                        rtc.close();
                        self.rtc_failed(&format!("answering offer: {e}"));
                    }
                }
            }
            LinkSignal::Decline { gen } => {
                if gen == self.gen && self.initiator {
                    tracing::info!(peer = self.peer, "peer does not take direct paths");
                    self.declined = true;
                    self.retry_at = None;
                    // Reported like any failed attempt; `declined` stops the retries.
                    self.rtc_failed("the peer does not take direct paths");
                }
            }
            LinkSignal::Answer {
                gen, sdp, version, ..
            } => {
                if gen != self.gen {
                    return;
                }
                if let Some(rtc) = &mut self.rtc {
                    if let Err(e) = rtc.accept_answer(sdp).await {
                        return self.rtc_failed(&format!("applying answer: {e}"));
                    }
                    self.version = version.unwrap_or(1).clamp(1, self.ctx.link_version);
                    self.open_inband().await;
                }
            }
            LinkSignal::Candidate { gen, candidate } => {
                if gen != self.gen {
                    return;
                }
                if let Some(rtc) = &mut self.rtc {
                    if let Err(e) = rtc.add_candidate(candidate).await {
                        tracing::warn!(peer = self.peer, "remote candidate refused: {e}");
                    }
                }
            }
        }
    }

    /// Version 2: open this end's in-band unreliable send channel (each end opens its own,
    /// once its side of the offer/answer is done).
    async fn open_inband(&mut self) {
        if self.version < 2 {
            return;
        }
        let Some(rtc) = &mut self.rtc else { return };
        if let Err(e) = rtc.open_inband().await {
            self.rtc_failed(&format!("opening the unreliable channel: {e}"));
        }
    }

    /// The channels this generation needs are open: "r", "u" and, for version 2, both ends'
    /// "u2".
    fn channels_open(&self) -> bool {
        self.r_open && self.u_open && (self.version < 2 || (self.u2_open && self.peer_u2_open))
    }

    /// A channel opened: once all of this generation's are, the core tells the peer (READY)
    /// and moves to the direct path when everything else is in place.
    fn channels_opened(&mut self) {
        if self.channels_open() {
            self.shared.lock().core.direct_channels_open(
                Gen(self.gen),
                LinkVersion(self.version),
                Instant::now(),
            );
        }
    }

    /// Learn the selected candidate pair: the core hears the generation is connected once ICE
    /// is and a pair is known; a pair of other types under an open path is a path change.
    async fn refresh_pair(&mut self) {
        let Some(rtc) = &self.rtc else { return };
        let Some(pair) = rtc.selected_pair().await else {
            return;
        };
        let gen = Gen(self.gen);
        let shared = self.shared.clone();
        let mut h = shared.lock();
        h.pair = Some(pair);
        if self.connected && !self.told_connected {
            self.told_connected = true;
            h.core.direct_connected(gen, Instant::now());
        }
        if h.core.path() == PathId::Direct(gen) && h.path != pair.path() {
            // ICE switched pairs under an open path: report the new candidate types.
            h.core.direct_pair_changed(gen);
            self.set_path(&mut h, pair.path());
        }
    }

    async fn on_rtc(&mut self, event: RtcEvent) {
        tracing::trace!(peer = self.peer, gen = self.gen, ?event, "rtc event");
        match event {
            RtcEvent::Candidate(candidate) => {
                let line = candidate["candidate"].as_str().unwrap_or_default();
                let i = match rtc::parse_candidate(line).map(|(_, t)| t) {
                    Some(CandidateType::Host) => Some(0),
                    Some(CandidateType::Srflx) => Some(1),
                    Some(CandidateType::Relay) => Some(2),
                    _ => None,
                };
                if let Some(i) = i {
                    self.shared.lock().candidates[i] += 1;
                }
                let gen = self.gen;
                self.signal(LinkSignal::Candidate { gen, candidate }).await;
            }
            RtcEvent::Open(ch) => {
                match ch {
                    Channel::Reliable => self.r_open = true,
                    Channel::Unreliable => self.u_open = true,
                }
                self.channels_opened();
            }
            RtcEvent::InbandOpen => {
                self.u2_open = true;
                self.channels_opened();
            }
            RtcEvent::PeerInbandOpen => {
                if self.version < 2 {
                    return; // not offered: the peer breaks the protocol
                }
                self.peer_u2_open = true;
                self.channels_opened();
            }
            RtcEvent::Closed => self.rtc_failed("data channel closed"),
            RtcEvent::PairSelected => self.refresh_pair().await,
            RtcEvent::State(state) => match state {
                ConnState::Connected => {
                    self.connected = true;
                    self.connect_by = None;
                    self.refresh_pair().await;
                }
                // A PeerConnection that lost its path is not reused: its SCTP association may
                // have backed off its retransmissions for many seconds. A fresh one is quick.
                ConnState::Disconnected | ConnState::Failed | ConnState::Closed => {
                    self.connected = false;
                    let why = format!("ICE {state:?}").to_lowercase();
                    self.rtc_failed(&why);
                }
                ConnState::Other => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::core::{default_lanes, FILE_LANE_DEFAULT};

    /// A link that breaks on a panic under its lock tells the app how many reliable messages
    /// may not have arrived (here: sent on the server path, which nobody acknowledges), and
    /// refuses later sends with a typed error.
    #[tokio::test]
    async fn a_link_broken_by_a_panic_reports_its_undelivered_messages() {
        let (ws_tx, _ws_rx) = mpsc::channel(64);
        let (events, mut events_rx) = mpsc::channel(64);
        let files = crate::files::Files::new(events.clone(), Arc::new(|_| None), None);
        let ctx = LinkCtx {
            ws_tx,
            events,
            rtc: None,
            window: 1 << 20,
            max_message: 1 << 19,
            dead_path: Duration::from_secs(3),
            link_version: crate::protocol::LINK_VERSION,
            lanes: default_lanes(),
            file_lane: FILE_LANE_DEFAULT,
            files,
        };
        let link = LinkHandle::spawn(7, 1, true, DirectPolicy::None, ctx);
        for m in [&b"one"[..], b"two"] {
            link.send(Bytes::from_static(m), Reliability::Reliable)
                .await
                .unwrap();
        }
        let shared = link.shared.clone();
        let panicked = std::thread::spawn(move || {
            let _h = shared.lock();
            panic!("a bug under the lock (this panic is the test)");
        })
        .join();
        assert!(panicked.is_err());
        let undelivered = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match events_rx.recv().await {
                    Some(Event::Undelivered { peer, messages }) => break (peer, messages),
                    Some(_) => continue,
                    None => panic!("the event queue closed"),
                }
            }
        })
        .await
        .expect("no Undelivered event");
        assert_eq!(undelivered, (7, 2));
        let after = link
            .send(Bytes::from_static(b"three"), Reliability::Reliable)
            .await;
        assert!(matches!(after, Err(Error::UnknownPeer(7))), "{after:?}");
    }
}
