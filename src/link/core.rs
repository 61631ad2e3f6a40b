//! The link's delivery algorithm as a sans-IO state machine (`docs/PROTOCOL.md` §8).
//!
//! [`LinkCore`] owns everything a link decides: sequence numbers, fragmentation and reassembly,
//! the send window, acks and the ack timer, the reorder buffer, the path (server, or direct
//! generation `g`), the re-send on a downgrade or a resync, RTT probes, the dead-path rule and the
//! unreliable messages (whole, or in one-chunk parts in a version 2 generation). It never touches
//! a socket, a lock or the clock: time comes in as `now`, and everything it wants done comes out
//! of [`LinkCore::poll_transmit`] (frames, each with its route), [`LinkCore::poll_event`] (what
//! the app or the async layer must learn) and [`LinkCore::poll_timeout`] (when to call
//! [`LinkCore::handle_timeout`]). `&mut self` everywhere: one owner, the link task.
//!
//! What stays outside: the PeerConnection, ICE, signaling, candidate types and the WebSocket.
//! The core only learns "generation `g` started / has its channels open / is connected / is
//! down", and says on which path and channel each frame goes.
//!
//! Back-pressure: the async layer drains `poll_transmit` as fast as it can hand frames on. The
//! core itself holds back application DATA for the direct path while the reliable channel has
//! more than `DC_HIGH` queued ([`LinkCore::direct_buffered`]), routes its own frames (ACK, PING,
//! PONG) to the server path when the channels are busy, and drops unreliable messages at a
//! congested version 2 channel, so the async layer never has to wait before a direct send nor
//! withdraw DATA. A direct transmit it could not hand to the stack goes back through
//! [`LinkCore::transmit_abandoned`] / [`LinkCore::transmit_failed`].
//!
//! Per-stream state (the reliable send and receive streams) sits in [`SendStream`] and
//! [`RecvStream`] so that lanes (several ordered streams per link) are a map of them.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::parts::{self, Parts};
use super::rtc::{DC_HIGH, OWN_QUEUE_MAX, UNRELIABLE_QUEUE_MAX};
use super::{
    fragment_permits, permits_for, ACK_DELAY, ACK_EVERY, FRAGMENT_OVERHEAD, MAX_PEER_WINDOW,
    MAX_REORDER, PING_EVERY,
};
use crate::protocol::{
    link_kind, LinkFrame, MAX_DIRECT_UNRELIABLE_FRAME, MAX_FRAGMENT_PAYLOAD,
    MAX_UNRELIABLE_PAYLOAD,
};
use crate::Reliability;

/// Outstanding PINGs remembered for RTT samples (§8.6).
const MAX_PINGS: usize = 8;

/// A PeerConnection generation of the link (§7.4); the first is 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct Gen(pub u32);

/// Link protocol version of a generation (§7.6): the lower of the two ends'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct LinkVersion(pub u32);

impl LinkVersion {
    /// Version 2 splits long unreliable messages into one-chunk parts on the direct path.
    fn splits_unreliable(self) -> bool {
        self.0 >= 2
    }
}

/// Where a frame arrived from, and where the link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum PathId {
    /// The relay path through the server (ordered, reliable while the session is connected).
    Server,
    /// The data channels of PeerConnection generation `Gen`.
    Direct(Gen),
}

/// Which data channel of a generation: "r", or the unreliable one in use ("u" in version 1,
/// this end's "u2" in version 2; the async layer knows which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channel {
    Reliable,
    Unreliable,
}

/// Where one frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// As the payload of a relay frame on the WebSocket.
    Server,
    /// As one message on a data channel of generation `Gen`.
    Direct(Gen, Channel),
}

/// A frame to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transmit {
    pub route: Route,
    pub frame: Bytes,
}

/// What the app or the async layer must learn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CoreEvent {
    /// A message from the peer: reliable ones complete and in order, each once.
    Deliver {
        data: Bytes,
        reliability: Reliability,
    },
    /// The link moved to this path (report it, with the candidate pair when direct).
    PathChanged(PathId),
    /// The core judged generation `gen` failed (dead-path rule, a failed or refused send) and
    /// left it: close its PeerConnection, tell the app, and (initiator) retry after the back-off,
    /// as for any failure the async layer sees itself.
    DirectFailed { gen: Gen, why: String },
}

/// Why a send was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SendError {
    /// The send window has no room for the message now; it will after acks.
    #[error("the send window is full")]
    WouldBlock,
    /// The message can never be sent: longer than `limit` (the largest that fits both the
    /// message limit and the window).
    #[error("message of {size} bytes is longer than {limit}")]
    TooLarge { size: usize, limit: usize },
}

/// Configuration of one link.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CoreConfig {
    /// Send window in bytes, each fragment counted with `FRAGMENT_OVERHEAD` more.
    pub window: usize,
    /// Largest reliable message.
    pub max_message: usize,
    /// Dead-path rule (§8.7): longest silence of the direct path.
    pub dead_path: Duration,
}

/// Bytes the data channels of a generation have queued and not had acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Buffered {
    pub reliable: usize,
    pub unreliable: usize,
}

/// Counters of one link core (the candidate counters of `LinkStats` stay in the async layer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CoreStats {
    /// Reliable fragments transmitted on the server path (first sends and re-sends).
    pub sent_server: u64,
    /// Reliable fragments transmitted on the direct path.
    pub sent_direct: u64,
    /// Reliable fragments received on the server path (including duplicates).
    pub recv_server: u64,
    /// Reliable fragments received on the direct path (including duplicates).
    pub recv_direct: u64,
    /// Reliable fragments transmitted again (after a downgrade or a resync).
    pub resent: u64,
    /// Duplicate reliable fragments received and dropped.
    pub duplicates: u64,
    /// Times the link moved between paths (or to another candidate pair while direct).
    pub path_changes: u64,
    /// Unreliable messages in parts of which some never arrived.
    pub unreliable_incomplete: u64,
    /// Unreliable messages not sent: congested channel, or the server path interrupted.
    pub unreliable_dropped: u64,
    /// Frames that did not decode, and unreliable parts refused.
    pub bad_frames: u64,
    /// Early fragments dropped at a full reorder buffer (a peer beyond its window).
    pub reorder_full: u64,
    /// Reliable messages dropped for growing past `MAX_PEER_WINDOW`.
    pub too_large: u64,
}

/// A fragment sent (or about to be) and not acknowledged.
#[derive(Debug)]
struct Unacked {
    seq: u64,
    frame: Bytes,
    permits: usize,
    /// The last fragment of its message.
    fin: bool,
    /// The path of its last transmission; `None` until it is transmitted.
    via: Option<PathId>,
}

/// Sending side of one reliable stream.
#[derive(Debug)]
struct SendStream {
    next_seq: u64,
    /// In seq order, contiguous: the fragment with `seq` is at `seq - front.seq`.
    unacked: VecDeque<Unacked>,
    /// Sum of `unacked` permits.
    unacked_permits: usize,
    /// Seq of the next fragment to transmit on the link's path. Everything unacknowledged below
    /// it has been transmitted; a downgrade or a resync on the server path moves it back to the
    /// oldest unacknowledged fragment, which is the re-send of §8.5.
    next_tx: u64,
    /// Fragments to transmit again on the server path while the link stays direct: those last
    /// sent there before a server-path interruption (see [`LinkCore::resync_server`]).
    server_resend: VecDeque<u64>,
}

impl SendStream {
    fn new() -> Self {
        SendStream {
            next_seq: 1,
            unacked: VecDeque::new(),
            unacked_permits: 0,
            next_tx: 1,
            server_resend: VecDeque::new(),
        }
    }

    /// Number the fragments of `data` and record them (transmitted later, from `next_tx`).
    fn push_message(&mut self, data: Bytes) {
        let mut rest = data;
        loop {
            let chunk = rest.split_to(rest.len().min(MAX_FRAGMENT_PAYLOAD));
            let fin = rest.is_empty();
            let seq = self.next_seq;
            self.next_seq += 1;
            let frame = Bytes::from(
                LinkFrame::Data {
                    seq,
                    fin,
                    bytes: &chunk,
                }
                .encode(),
            );
            let permits = fragment_permits(chunk.len()) as usize;
            self.unacked_permits += permits;
            self.unacked.push_back(Unacked {
                seq,
                frame,
                permits,
                fin,
                via: None,
            });
            if fin {
                break;
            }
        }
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut Unacked> {
        let front = self.unacked.front()?.seq;
        let i = usize::try_from(seq.checked_sub(front)?).ok()?;
        self.unacked.get_mut(i)
    }

    /// Cumulative ack: release everything up to `seq`.
    fn on_ack(&mut self, seq: u64) {
        while let Some(front) = self.unacked.front() {
            if front.seq > seq {
                break;
            }
            self.unacked_permits -= front.permits;
            self.unacked.pop_front();
        }
        // Acked fragments need no (re-)transmission.
        let first = self.unacked.front().map_or(self.next_seq, |u| u.seq);
        self.next_tx = self.next_tx.max(first);
    }

    /// Transmit every unacknowledged fragment again, from the oldest.
    fn rewind(&mut self) {
        self.next_tx = self.unacked.front().map_or(self.next_seq, |u| u.seq);
        self.server_resend.clear();
    }
}

/// Receiving side of one reliable stream (§8.4 receiver).
#[derive(Debug, Default)]
struct RecvStream {
    /// Highest seq delivered in order.
    delivered: u64,
    /// Highest seq acknowledged to the peer.
    acked_sent: u64,
    /// An ack must go out even if nothing new was delivered (a duplicate arrived).
    ack_due: bool,
    /// When the owed ack goes out (`ACK_DELAY` after the first unacknowledged delivery).
    ack_at: Option<Instant>,
    /// An ack goes out at the next `poll_transmit`.
    ack_now: bool,
    reorder: BTreeMap<u64, (bool, Bytes)>,
    /// Sum over `reorder` of fragment length + `FRAGMENT_OVERHEAD`.
    reorder_bytes: usize,
    partial: BytesMut,
    /// The message being received grew past `MAX_PEER_WINDOW`: its fragments up to FIN are
    /// dropped.
    discarding: bool,
}

/// What a fragment did to the receiving stream.
enum Received {
    Duplicate,
    Held,
    ReorderFull,
    /// In order: these messages completed (possibly none), and this many were dropped as too
    /// large.
    Accepted { messages: Vec<Bytes>, too_large: u64 },
}

impl RecvStream {
    fn on_data(&mut self, seq: u64, fin: bool, payload: Bytes) -> Received {
        if seq <= self.delivered || self.reorder.contains_key(&seq) {
            // The sender may be re-sending because our ack was lost with a path: ack again.
            self.ack_due = true;
            return Received::Duplicate;
        }
        if seq != self.delivered + 1 {
            let cost = payload.len() + FRAGMENT_OVERHEAD;
            if self.reorder.len() >= MAX_REORDER || self.reorder_bytes + cost > MAX_PEER_WINDOW {
                // A sender within its window never gets this far ahead.
                return Received::ReorderFull;
            }
            self.reorder_bytes += cost;
            self.reorder.insert(seq, (fin, payload));
            return Received::Held;
        }
        let mut messages = Vec::new();
        let mut too_large = 0;
        let mut next = Some((fin, payload));
        while let Some((fin, payload)) = next {
            match self.reassemble(fin, payload) {
                Reassembled::Partial => {}
                Reassembled::Message(m) => messages.push(m),
                Reassembled::TooLarge => too_large += 1,
            }
            next = self.take_next();
        }
        Received::Accepted {
            messages,
            too_large,
        }
    }

    fn take_next(&mut self) -> Option<(bool, Bytes)> {
        let entry = self.reorder.first_entry()?;
        if *entry.key() != self.delivered + 1 {
            return None;
        }
        let (fin, payload) = entry.remove();
        self.reorder_bytes -= payload.len() + FRAGMENT_OVERHEAD;
        Some((fin, payload))
    }

    /// Count the next in-order fragment as delivered and add it to the message being
    /// reassembled. A message longer than `MAX_PEER_WINDOW` (no reference sender sends one) is
    /// dropped with its fragments up to FIN rather than buffered without bound.
    fn reassemble(&mut self, fin: bool, payload: Bytes) -> Reassembled {
        self.delivered += 1;
        if self.discarding {
            self.discarding = !fin;
            return Reassembled::Partial;
        }
        if self.partial.len() + payload.len() > MAX_PEER_WINDOW {
            self.partial = BytesMut::new();
            self.discarding = !fin;
            return Reassembled::TooLarge;
        }
        if self.partial.is_empty() && fin {
            // A one-fragment message: no copy.
            return Reassembled::Message(payload);
        }
        self.partial.extend_from_slice(&payload);
        if !fin {
            return Reassembled::Partial;
        }
        Reassembled::Message(std::mem::take(&mut self.partial).freeze())
    }

    /// After a delivery or a duplicate: ack at once every `ACK_EVERY` fragments, else within
    /// `ACK_DELAY`.
    fn schedule_ack(&mut self, now: Instant) {
        if self.delivered - self.acked_sent >= ACK_EVERY {
            self.ack_now = true;
            self.ack_at = None;
        } else if self.ack_at.is_none() {
            self.ack_at = Some(now + ACK_DELAY);
        }
    }

    /// The ack to send now, if one is owed; records it as sent.
    fn take_ack(&mut self) -> Option<u64> {
        self.ack_now = false;
        if self.acked_sent == self.delivered && !self.ack_due {
            return None;
        }
        self.ack_due = false;
        self.acked_sent = self.delivered;
        Some(self.delivered)
    }

    /// Send the current ack again (it may have been lost with a path), if anything was
    /// delivered.
    fn reack(&mut self) {
        self.ack_due = self.delivered > 0;
        self.ack_now = true;
        self.ack_at = None;
    }
}

enum Reassembled {
    Partial,
    Message(Bytes),
    TooLarge,
}

/// State of the newest PeerConnection generation.
#[derive(Debug)]
struct DirectPath {
    gen: Gen,
    version: LinkVersion,
    state: DirectState,
    buffered: Buffered,
}

#[derive(Debug, PartialEq, Eq)]
enum DirectState {
    /// Being set up: the link moves to it once both hold and the peer's READY has come.
    Opening { channels_open: bool, connected: bool },
    /// The link's path.
    Up {
        /// When a frame last arrived on its channels, or the upgrade if none since.
        last_rx: Instant,
    },
    /// Down or failed: nothing more happens on this generation.
    Down,
}

/// Whether the server path carries frames now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerPath {
    Connected,
    /// The session's connection is down or the peer's session suspended (§3.14): nothing is
    /// relayed until `resync_server`.
    Paused,
}

/// The link's delivery algorithm; see the module docs.
pub(crate) struct LinkCore {
    cfg: CoreConfig,
    send: SendStream,
    recv: RecvStream,
    server: ServerPath,
    /// The newest generation, if one was started.
    direct: Option<DirectPath>,
    /// Highest generation the peer reported READY for (never reset).
    peer_ready: Gen,
    /// READY to send (on the server path) for this generation.
    ready_due: Option<Gen>,
    /// Unreliable messages waiting for `poll_transmit`, with their window cost.
    unreliable: VecDeque<(Bytes, usize)>,
    /// Sum of the window cost in `unreliable`.
    unreliable_permits: usize,
    /// Frames of one split message already routed.
    routed: VecDeque<Transmit>,
    /// Frames handed back by the async layer that go on the server path.
    fallback: VecDeque<Bytes>,
    next_part_msg: u32,
    parts: Parts,
    // RTT probes (§8.6).
    next_ping: u64,
    next_ping_at: Instant,
    pings: VecDeque<(u64, Instant)>,
    pings_due: VecDeque<u64>,
    /// PONG ids to send, with the path their PING came on.
    pongs_due: VecDeque<(u64, PathId)>,
    rtt: Option<Duration>,
    events: VecDeque<CoreEvent>,
    stats: CoreStats,
}

impl LinkCore {
    pub(crate) fn new(cfg: CoreConfig, now: Instant) -> Self {
        LinkCore {
            cfg,
            send: SendStream::new(),
            recv: RecvStream::default(),
            server: ServerPath::Connected,
            direct: None,
            peer_ready: Gen(0),
            ready_due: None,
            unreliable: VecDeque::new(),
            unreliable_permits: 0,
            routed: VecDeque::new(),
            fallback: VecDeque::new(),
            next_part_msg: 1,
            parts: Parts::default(),
            next_ping: 1,
            // The first probe goes at once (§8.6).
            next_ping_at: now,
            pings: VecDeque::new(),
            pings_due: VecDeque::new(),
            pongs_due: VecDeque::new(),
            rtt: None,
            events: VecDeque::new(),
            stats: CoreStats::default(),
        }
    }

    // ---- queries ----

    /// The link's path.
    pub(crate) fn path(&self) -> PathId {
        match &self.direct {
            Some(d) if matches!(d.state, DirectState::Up { .. }) => PathId::Direct(d.gen),
            _ => PathId::Server,
        }
    }

    /// Bytes of window free now (what a message of `n` bytes needs: `permits_for(n)`).
    pub(crate) fn window_available(&self) -> usize {
        self.cfg.window.saturating_sub(self.in_flight())
    }

    fn in_flight(&self) -> usize {
        self.send.unacked_permits + self.unreliable_permits
    }

    pub(crate) fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    pub(crate) fn stats(&self) -> CoreStats {
        CoreStats {
            unreliable_incomplete: self.parts.discarded,
            ..self.stats
        }
    }

    /// Reliable messages sent and not (completely) acknowledged.
    pub(crate) fn unacked_messages(&self) -> u64 {
        self.send.unacked.iter().filter(|u| u.fin).count() as u64
    }

    // ---- input ----

    /// Take a message to send. Reliable ones are numbered now, in call order.
    pub(crate) fn send(&mut self, data: Bytes, reliability: Reliability) -> Result<(), SendError> {
        let limit = match reliability {
            Reliability::Reliable => self.cfg.max_message,
            Reliability::Unreliable => MAX_UNRELIABLE_PAYLOAD,
        };
        let permits = permits_for(data.len());
        if data.len() > limit || permits > self.cfg.window {
            // The largest payload that fits both the limit and the window.
            let fragments = self.cfg.window.div_ceil(MAX_FRAGMENT_PAYLOAD);
            let fits = self
                .cfg
                .window
                .saturating_sub(fragments * FRAGMENT_OVERHEAD);
            return Err(SendError::TooLarge {
                size: data.len(),
                limit: limit.min(fits),
            });
        }
        if permits > self.window_available() {
            return Err(SendError::WouldBlock);
        }
        match reliability {
            Reliability::Reliable => self.send.push_message(data),
            Reliability::Unreliable => {
                // Costs window while it waits to be transmitted, as in the reference client.
                self.unreliable_permits += permits;
                self.unreliable.push_back((data, permits));
            }
        }
        Ok(())
    }

    /// A link frame arrived on `from`. Frames that do not decode are counted and dropped.
    pub(crate) fn handle_frame(&mut self, from: PathId, frame: Bytes, now: Instant) {
        if let (PathId::Direct(gen), Some(d)) = (from, &mut self.direct) {
            // Dead-path rule: any frame on the current generation's channels counts.
            if let DirectState::Up { last_rx } = &mut d.state {
                if d.gen == gen {
                    *last_rx = now;
                }
            }
        }
        let decoded = match LinkFrame::decode(&frame) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("dropping bad link frame: {e}");
                self.stats.bad_frames += 1;
                return;
            }
        };
        match decoded {
            LinkFrame::Data { seq, fin, bytes } => {
                match from {
                    PathId::Server => self.stats.recv_server += 1,
                    PathId::Direct(_) => self.stats.recv_direct += 1,
                }
                let payload = frame.slice_ref(bytes);
                self.on_data(seq, fin, payload, now);
            }
            LinkFrame::Ack { seq } => self.send.on_ack(seq),
            LinkFrame::Unreliable { bytes } => self.events.push_back(CoreEvent::Deliver {
                data: frame.slice_ref(bytes),
                reliability: Reliability::Unreliable,
            }),
            LinkFrame::UnreliablePart {
                msg,
                index,
                count,
                bytes,
            } => {
                let part = frame.slice_ref(bytes);
                match self.parts.push(now, msg, index, count, part) {
                    Ok(Some(data)) => self.events.push_back(CoreEvent::Deliver {
                        data,
                        reliability: Reliability::Unreliable,
                    }),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!("dropping unreliable part: {e}");
                        self.stats.bad_frames += 1;
                    }
                }
            }
            LinkFrame::Ping { id } => self.pongs_due.push_back((id, from)),
            LinkFrame::Pong { id } => {
                if let Some(pos) = self.pings.iter().position(|(p, _)| *p == id) {
                    let sample = now.saturating_duration_since(self.pings[pos].1);
                    self.pings.drain(..=pos);
                    self.rtt = Some(match self.rtt {
                        None => sample,
                        Some(old) => (old * 7 + sample) / 8,
                    });
                }
            }
            LinkFrame::Ready { gen } => {
                self.peer_ready = self.peer_ready.max(Gen(gen));
                self.maybe_upgrade(now);
            }
        }
    }

    fn on_data(&mut self, seq: u64, fin: bool, payload: Bytes, now: Instant) {
        match self.recv.on_data(seq, fin, payload) {
            Received::Duplicate => self.stats.duplicates += 1,
            Received::Held => return,
            Received::ReorderFull => {
                tracing::warn!(seq, "reorder buffer full; fragment dropped");
                self.stats.reorder_full += 1;
                return;
            }
            Received::Accepted {
                messages,
                too_large,
            } => {
                if too_large > 0 {
                    tracing::warn!("reliable message longer than {MAX_PEER_WINDOW} bytes; dropped");
                    self.stats.too_large += too_large;
                }
                self.events
                    .extend(messages.into_iter().map(|data| CoreEvent::Deliver {
                        data,
                        reliability: Reliability::Reliable,
                    }));
            }
        }
        self.recv.schedule_ack(now);
    }

    /// The newest generation, made current if `gen` is newer than it; `None` for an older
    /// one (a late report says nothing about the current PeerConnection).
    fn adopt(&mut self, gen: Gen, now: Instant) -> Option<&mut DirectPath> {
        let newer = self.direct.as_ref().is_none_or(|d| gen > d.gen);
        if newer {
            // A newer generation replaces the old one; leaving it is no failure (§8.5).
            self.downgrade(now);
            self.direct = Some(DirectPath {
                gen,
                version: LinkVersion(1),
                state: DirectState::Opening {
                    channels_open: false,
                    connected: false,
                },
                buffered: Buffered::default(),
            });
        }
        self.direct.as_mut().filter(|d| d.gen == gen)
    }

    /// A PeerConnection of generation `gen` is being made (offer sent or accepted); any older
    /// one is finished (the link leaves it if it was on it).
    pub(crate) fn direct_started(&mut self, gen: Gen, now: Instant) {
        self.adopt(gen, now);
    }

    /// Every channel generation `gen` needs is open at this end ("r", "u", and in version 2
    /// both "u2"): tell the peer (READY, on the server path) and move to it if all else holds.
    pub(crate) fn direct_channels_open(&mut self, gen: Gen, version: LinkVersion, now: Instant) {
        let Some(d) = self.adopt(gen, now) else {
            return;
        };
        if let DirectState::Opening { channels_open, .. } = &mut d.state {
            if !*channels_open {
                *channels_open = true;
                d.version = version;
                self.ready_due = Some(gen);
            }
        }
        self.maybe_upgrade(now);
    }

    /// Generation `gen` is connected (ICE, with a selected pair the async layer can report).
    pub(crate) fn direct_connected(&mut self, gen: Gen, now: Instant) {
        let Some(d) = self.adopt(gen, now) else {
            return;
        };
        if let DirectState::Opening { connected, .. } = &mut d.state {
            *connected = true;
        }
        self.maybe_upgrade(now);
    }

    /// ICE chose another candidate pair for the direct path: RTT samples start over (§8.6).
    pub(crate) fn direct_pair_changed(&mut self, gen: Gen) {
        if self.path() == PathId::Direct(gen) {
            self.stats.path_changes += 1;
            self.reset_rtt();
        }
    }

    /// Generation `gen` is down (ICE, a channel closed, the policy tightened): leave it, with
    /// the re-send of §8.5. The async layer, which saw the failure, reports it itself.
    pub(crate) fn direct_down(&mut self, gen: Gen, now: Instant) {
        if self.direct.as_ref().is_some_and(|d| d.gen == gen) {
            self.downgrade(now);
            if let Some(d) = &mut self.direct {
                d.state = DirectState::Down;
            }
        }
    }

    /// What the channels of `gen` have queued (report after sends and on drain events).
    pub(crate) fn direct_buffered(&mut self, gen: Gen, buffered: Buffered) {
        if let Some(d) = self.direct.as_mut().filter(|d| d.gen == gen) {
            d.buffered = buffered;
        }
    }

    /// The async layer did not hand a direct transmit to the stack (its channels were busy),
    /// or an ACK / PING / PONG did not complete within `OWN_SEND_WAIT`: it goes on the server
    /// path instead (a copy: acks are cumulative, probes matched by id). DATA is only ever
    /// dropped with its generation (the downgrade re-sends it); DATA handed back while its
    /// generation is still the path would leave a gap, so that generation counts as failed.
    pub(crate) fn transmit_abandoned(&mut self, t: Transmit, now: Instant) {
        self.hand_back(t, "a reliable frame could not be sent on the data channel", now);
    }

    /// A direct send failed: the generation has failed (§8.5), and the frame goes on the server
    /// path unless it is DATA (re-sent by the downgrade).
    pub(crate) fn transmit_failed(&mut self, t: Transmit, why: &str, now: Instant) {
        if let Route::Direct(gen, _) = t.route {
            self.fail(gen, why, now);
        }
        self.hand_back(t, why, now);
    }

    fn hand_back(&mut self, t: Transmit, why: &str, now: Instant) {
        let Route::Direct(gen, _) = t.route else {
            return;
        };
        if t.frame.first() == Some(&link_kind::DATA) {
            self.fail(gen, why, now);
        } else {
            self.fallback.push_back(t.frame);
        }
    }

    /// The server path is interrupted (`LinkInput::PauseRelay`): nothing is relayed until
    /// [`LinkCore::resync_server`]; reliable frames stay unacknowledged.
    pub(crate) fn pause_server(&mut self) {
        self.server = ServerPath::Paused;
    }

    /// The server path is back (`LinkInput::Resync`): frames in flight when it broke may be
    /// lost (§3.14). On the server path every unacknowledged fragment and the ack go again.
    /// While direct, the fragments last sent on the server path go again there (the reference
    /// client re-sends nothing while direct, which loses fragments sent on the server path just
    /// before an upgrade if the cut took them). A READY of the current generation goes again
    /// too: one lost in the cut would keep the peer off the direct path for good.
    pub(crate) fn resync_server(&mut self) {
        self.server = ServerPath::Connected;
        match self.path() {
            PathId::Server => {
                self.send.rewind();
                self.recv.reack();
            }
            PathId::Direct(_) => {
                let stream = &mut self.send;
                stream.server_resend = stream
                    .unacked
                    .iter()
                    .filter(|u| u.via == Some(PathId::Server) && u.seq < stream.next_tx)
                    .map(|u| u.seq)
                    .collect();
            }
        }
        if let Some(d) = &self.direct {
            let open = match d.state {
                DirectState::Opening { channels_open, .. } => channels_open,
                DirectState::Up { .. } => true,
                DirectState::Down => false,
            };
            if open {
                self.ready_due = Some(d.gen);
            }
        }
    }

    /// Run the timers due at `now`: the ack timer, the probe interval, the dead-path rule.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.recv.ack_at.is_some_and(|at| at <= now) {
            self.recv.ack_at = None;
            self.recv.ack_now = true;
        }
        if self.next_ping_at <= now {
            self.next_ping_at = now + PING_EVERY;
            self.queue_ping(now);
        }
        if let Some(at) = self.dead_path_deadline() {
            if at <= now {
                let gen = self.direct.as_ref().map_or(Gen(0), |d| d.gen);
                let why = format!(
                    "nothing received on the direct path for {:?}",
                    self.cfg.dead_path
                );
                self.fail(gen, &why, now);
            }
        }
        self.parts.expire(now);
    }

    // ---- output ----

    /// When [`LinkCore::handle_timeout`] must run next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        [
            self.recv.ack_at,
            Some(self.next_ping_at),
            self.dead_path_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub(crate) fn poll_event(&mut self) -> Option<CoreEvent> {
        self.events.pop_front()
    }

    /// The next frame to send. The link's own frames come first (they are small and unblock
    /// the peer), then unreliable messages, then DATA.
    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(gen) = self.ready_due {
            if self.server == ServerPath::Connected {
                self.ready_due = None;
                return Some(Transmit {
                    route: Route::Server,
                    frame: Bytes::from(LinkFrame::Ready { gen: gen.0 }.encode()),
                });
            }
        }
        while let Some(frame) = self.fallback.pop_front() {
            if let Some(t) = self.relay(frame) {
                return Some(t);
            }
        }
        if self.recv.ack_now {
            if let Some(seq) = self.recv.take_ack() {
                let frame = Bytes::from(LinkFrame::Ack { seq }.encode());
                if let Some(t) = self.route_own(frame, Channel::Reliable, self.path()) {
                    return Some(t);
                }
            }
        }
        while let Some((id, from)) = self.pongs_due.pop_front() {
            // Answered directly only if it came directly and this end is direct too (§7.5).
            let on = match from {
                PathId::Direct(_) => self.path(),
                PathId::Server => PathId::Server,
            };
            let frame = Bytes::from(LinkFrame::Pong { id }.encode());
            if let Some(t) = self.route_own(frame, Channel::Unreliable, on) {
                return Some(t);
            }
        }
        while let Some(id) = self.pings_due.pop_front() {
            let frame = Bytes::from(LinkFrame::Ping { id }.encode());
            if let Some(t) = self.route_own(frame, Channel::Unreliable, self.path()) {
                return Some(t);
            }
        }
        if let Some(t) = self.poll_server_resend() {
            return Some(t);
        }
        if let Some(t) = self.poll_unreliable() {
            return Some(t);
        }
        self.poll_data()
    }

    fn poll_server_resend(&mut self) -> Option<Transmit> {
        if self.server == ServerPath::Paused {
            return None;
        }
        while let Some(seq) = self.send.server_resend.pop_front() {
            // Acked meanwhile: nothing to do.
            if let Some(u) = self.send.get_mut(seq) {
                u.via = Some(PathId::Server);
                let frame = u.frame.clone();
                self.stats.resent += 1;
                self.stats.sent_server += 1;
                return Some(Transmit {
                    route: Route::Server,
                    frame,
                });
            }
        }
        None
    }

    fn poll_unreliable(&mut self) -> Option<Transmit> {
        loop {
            if let Some(t) = self.routed.pop_front() {
                return Some(t);
            }
            let (data, permits) = self.unreliable.pop_front()?;
            self.unreliable_permits -= permits;
            match self.path() {
                PathId::Server => {
                    let frame = Bytes::from(LinkFrame::Unreliable { bytes: &data }.encode());
                    if let Some(t) = self.relay(frame) {
                        return Some(t);
                    }
                }
                PathId::Direct(gen) => {
                    let d = self.direct.as_ref().expect("direct path is up");
                    let route = Route::Direct(gen, Channel::Unreliable);
                    if !d.version.splits_unreliable() {
                        let frame = Bytes::from(LinkFrame::Unreliable { bytes: &data }.encode());
                        return Some(Transmit { route, frame });
                    }
                    if d.buffered.unreliable > UNRELIABLE_QUEUE_MAX {
                        // Dropped whole, like a datagram at a full socket buffer: unreliable
                        // data queued without bound would starve "r" (§7.6).
                        self.stats.unreliable_dropped += 1;
                        continue;
                    }
                    if 1 + data.len() <= MAX_DIRECT_UNRELIABLE_FRAME {
                        let frame = Bytes::from(LinkFrame::Unreliable { bytes: &data }.encode());
                        return Some(Transmit { route, frame });
                    }
                    // One SCTP chunk per frame: a lost part leaves nothing in the peer's SCTP
                    // reassembly queue (§7.6).
                    let msg = self.next_part_msg;
                    self.next_part_msg = msg.wrapping_add(1);
                    let pieces = parts::split(&data);
                    let count = pieces.len() as u16;
                    self.routed
                        .extend(pieces.iter().enumerate().map(|(index, bytes)| Transmit {
                            route,
                            frame: Bytes::from(
                                LinkFrame::UnreliablePart {
                                    msg,
                                    index: index as u16,
                                    count,
                                    bytes,
                                }
                                .encode(),
                            ),
                        }));
                }
            }
        }
    }

    fn poll_data(&mut self) -> Option<Transmit> {
        let path = self.path();
        let route = match path {
            PathId::Server if self.server == ServerPath::Paused => return None,
            PathId::Server => Route::Server,
            PathId::Direct(gen) => {
                let d = self.direct.as_ref().expect("direct path is up");
                if d.buffered.reliable > DC_HIGH {
                    // Local flow control: wait for "r" to drain (the async layer reports it).
                    return None;
                }
                Route::Direct(gen, Channel::Reliable)
            }
        };
        let seq = self.send.next_tx;
        let u = self.send.get_mut(seq)?;
        if u.via.is_some() {
            self.stats.resent += 1;
        }
        u.via = Some(path);
        let frame = u.frame.clone();
        self.send.next_tx += 1;
        match path {
            PathId::Server => self.stats.sent_server += 1,
            PathId::Direct(_) => self.stats.sent_direct += 1,
        }
        Some(Transmit { route, frame })
    }

    /// A frame for the server path, or `None` (dropped) while it is interrupted: reliable
    /// frames go again on resync, acks are sent again then, unreliable ones are lost.
    fn relay(&mut self, frame: Bytes) -> Option<Transmit> {
        if self.server == ServerPath::Paused {
            if matches!(
                frame.first(),
                Some(&link_kind::UNRELIABLE) | Some(&link_kind::UNRELIABLE_PART)
            ) {
                self.stats.unreliable_dropped += 1;
            }
            return None;
        }
        Some(Transmit {
            route: Route::Server,
            frame,
        })
    }

    /// Route one of the link's own frames (ACK, PING, PONG) on `on`: the server path when the
    /// direct channels are busy (§8.5, `OWN_QUEUE_MAX`).
    fn route_own(&mut self, frame: Bytes, ch: Channel, on: PathId) -> Option<Transmit> {
        if let (PathId::Direct(gen), Some(d)) = (on, &self.direct) {
            let queued = d.buffered.reliable + d.buffered.unreliable;
            if queued + frame.len() <= OWN_QUEUE_MAX {
                return Some(Transmit {
                    route: Route::Direct(gen, ch),
                    frame,
                });
            }
        }
        self.relay(frame)
    }

    // ---- path ----

    fn dead_path_deadline(&self) -> Option<Instant> {
        match self.direct.as_ref()?.state {
            DirectState::Up { last_rx } => Some(last_rx + self.cfg.dead_path),
            _ => None,
        }
    }

    fn maybe_upgrade(&mut self, now: Instant) {
        let Some(d) = &mut self.direct else { return };
        let ready = d.state
            == DirectState::Opening {
                channels_open: true,
                connected: true,
            };
        if !ready || self.peer_ready < d.gen {
            return;
        }
        d.state = DirectState::Up { last_rx: now };
        let gen = d.gen;
        self.stats.path_changes += 1;
        self.reset_rtt();
        self.events.push_back(CoreEvent::PathChanged(PathId::Direct(gen)));
        // A first sample of the new path at once (§8.5).
        self.queue_ping(now);
    }

    /// Leave the direct path, if on it: everything unacknowledged and the ack go again on the
    /// server path (§8.5).
    fn downgrade(&mut self, _now: Instant) {
        let Some(d) = &mut self.direct else { return };
        if !matches!(d.state, DirectState::Up { .. }) {
            return;
        }
        d.state = DirectState::Down;
        self.stats.path_changes += 1;
        self.reset_rtt();
        self.events.push_back(CoreEvent::PathChanged(PathId::Server));
        self.send.rewind();
        self.recv.reack();
    }

    /// The core judged `gen` failed: leave it and tell the async layer.
    fn fail(&mut self, gen: Gen, why: &str, now: Instant) {
        let Some(d) = self.direct.as_ref().filter(|d| d.gen == gen) else {
            return;
        };
        if d.state == DirectState::Down {
            return;
        }
        self.downgrade(now);
        if let Some(d) = &mut self.direct {
            d.state = DirectState::Down;
        }
        self.events.push_back(CoreEvent::DirectFailed {
            gen,
            why: why.to_string(),
        });
    }

    fn reset_rtt(&mut self) {
        // Samples of one path say nothing about the other (§8.6).
        self.rtt = None;
        self.pings.clear();
        self.pings_due.clear();
    }

    fn queue_ping(&mut self, now: Instant) {
        let id = self.next_ping;
        self.next_ping += 1;
        if self.pings.len() >= MAX_PINGS {
            self.pings.pop_front();
        }
        self.pings.push_back((id, now));
        self.pings_due.push_back(id);
    }
}
