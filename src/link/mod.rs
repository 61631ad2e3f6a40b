//! One link per co-member: path selection and the delivery guarantee.
//!
//! A link starts on the server path at once and brings up a PeerConnection in the background.
//! Every reliable fragment carries a per-link sequence number; the receiver delivers strictly in
//! order, drops duplicates and acknowledges cumulatively; the sender keeps unacknowledged fragments
//! and sends them again on the server path when the direct path goes away. Moving *up* to the
//! direct path needs no re-send: the server path is itself ordered and reliable, so fragments still
//! on it arrive and the receiver fills the gap from its reorder buffer.

// The sans-IO delivery algorithm; the link task adopts it next (until then only its tests use it).
#[cfg_attr(not(test), allow(dead_code))]
mod core;
mod parts;
mod rtc;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{sleep_until, Instant as TokioInstant};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use rtc::FrameSink;
use rtc::{Candidates, Channel, ConnState, DirectTx, Rtc, RtcEvent};
pub(crate) use rtc::{RtcFactory, RtcOptions};

use crate::protocol::{
    ClientMsg, DirectPolicy, LinkFrame, LinkId, PathKind, PeerId, RelayFrame,
    MAX_DIRECT_UNRELIABLE_FRAME, MAX_FRAGMENT_PAYLOAD, MAX_UNRELIABLE_PAYLOAD,
};
use crate::{CandidatePair, CandidateType, Error, Event, Path, Reliability, Result};

/// Send an ack after this many fragments even if the ack timer has not fired.
const ACK_EVERY: u64 = 32;
/// Longest a received fragment waits for its ack.
const ACK_DELAY: Duration = Duration::from_millis(5);
/// Longest the link's own frames (acks, probes) wait for room on the direct path before they
/// take the server path.
const OWN_SEND_WAIT: Duration = Duration::from_millis(100);
/// Window cost of a fragment beyond its bytes.
const FRAGMENT_OVERHEAD: usize = 64;
/// Largest send window of a reference sender (`ClientConfig::with_send_window` and peermesh.js
/// clamp to it). A peer within it never has more than this many fragment bytes + 64 per
/// fragment unacknowledged, nor a reliable message longer than this: the receiver bounds its
/// reorder buffer and the message being reassembled by it, so a misbehaving peer cannot make it
/// hold more.
const MAX_PEER_WINDOW: usize = 16 << 20;
/// Most fragments held for reordering: what a 16 MiB window can have in flight.
const MAX_REORDER: usize = MAX_PEER_WINDOW / FRAGMENT_OVERHEAD;
/// Longest a new PeerConnection may take to connect before it counts as failed (and the app
/// gets [`Event::DirectFailed`]). ICE on a LAN or through TURN connects in well under a second;
/// pairs that cannot connect (two symmetric NATs without TURN) are told within 10 s.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(crate::CONNECT_TIMEOUT_SECS);
/// RTT probe interval.
const PING_EVERY: Duration = Duration::from_secs(1);
/// First wait before the initiator tries a new PeerConnection after a failure, and the longest
/// for a pair that had a direct path before (it is likely to come back) and for one that never
/// had one (it may never get one; retries are cheap but not free).
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX_HAD_DIRECT: Duration = Duration::from_secs(5);
const RETRY_MAX_NEVER_DIRECT: Duration = Duration::from_secs(60);

/// Inputs to a link task.
#[derive(Debug)]
pub(crate) enum LinkInput {
    /// A link-layer frame that came over the server path.
    Relay(Bytes),
    /// Signaling data from the peer.
    Signal(serde_json::Value),
    /// Something the PeerConnection of generation `gen` reported.
    Rtc { gen: u32, event: RtcEvent },
    /// Sending on the direct path of PeerConnection generation `gen` failed.
    DirectFailed { gen: u32, why: String },
    /// Something was delivered that is not acknowledged yet: ack within `ACK_DELAY`.
    AckSoon,
    /// An RTT probe answer arrived.
    Pong(u64),
    /// The peer's channels of this generation are open.
    Ready(u32),
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

/// Sending state, shared by the app's tasks (which send from their own task, so a message
/// costs no hop through the link task) and the link task (which acks, switches paths and
/// re-sends). Sequence numbers are assigned and frames recorded under this lock; the sends
/// themselves happen after it is released.
struct SendState {
    next_seq: u64,
    unacked: VecDeque<Unacked>,
    /// Where new frames go: the direct path's channels, or the server path when `None`. Set and
    /// cleared by the link task together with its path.
    direct: Option<DirectTx>,
    sent_server: u64,
    sent_direct: u64,
    resent: u64,
    /// Number of the next unreliable message split into parts.
    next_part_msg: u32,
    /// The server is draining (see [`LinkInput::Hold`]).
    draining: bool,
    /// Held: the first sequence number not transmitted.
    held_from: Option<u64>,
    /// [`LinkHandle::take_held`] emptied the link: a send that raced it fails.
    taken: bool,
}

/// Frames ready to transmit, with the path chosen for them.
struct Prepared {
    frames: Vec<Bytes>,
    direct: Option<DirectTx>,
    /// For an unreliable message: the window permits to give back once it is sent.
    unreliable_permits: Option<u32>,
}

/// What a link's handles and its task share.
struct LinkShared {
    peer: PeerId,
    link_id: LinkId,
    ws_tx: mpsc::Sender<WsMessage>,
    /// Control input to the link task.
    ctl: mpsc::UnboundedSender<LinkInput>,
    window: Semaphore,
    /// Total permits of `window`.
    window_size: usize,
    send: Mutex<SendState>,
    events: mpsc::Sender<Event>,
    /// Receiving state. An async lock, held while delivering events, so the two paths' frames
    /// (handled by the link task and by the data channel's read loop) are delivered in order.
    recv: tokio::sync::Mutex<RecvState>,
    /// Unreliable messages arriving in parts.
    parts: Mutex<parts::Parts>,
    /// Generation of the PeerConnection a frame last arrived on, and when (dead-path rule).
    direct_rx: Mutex<Option<(u32, Instant)>>,
    /// The server path is interrupted: relay nothing (see [`LinkInput::PauseRelay`]).
    relay_paused: AtomicBool,
    counters: Counters,
}

/// Counters updated where the events happen (data channel read loop, link task); read by
/// [`LinkHandle::status`]. The send counters live in [`SendState`], under its lock.
#[derive(Default)]
struct Counters {
    unreliable_dropped: AtomicU64,
    recv_server: AtomicU64,
    recv_direct: AtomicU64,
    duplicates: AtomicU64,
    path_changes: AtomicU64,
    candidates_host: AtomicU64,
    candidates_srflx: AtomicU64,
    candidates_relay: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Receiving state of a link.
#[derive(Default)]
struct RecvState {
    /// Highest sequence number delivered in order.
    delivered: u64,
    /// Highest sequence number acknowledged to the peer.
    acked_sent: u64,
    /// An ack must go out even if nothing new was delivered (a duplicate arrived: the sender
    /// is re-sending, so our last ack may have been lost).
    ack_due: bool,
    /// The link task has been asked to ack soon.
    ack_asked: bool,
    reorder: BTreeMap<u64, (bool, Bytes)>,
    /// Sum over `reorder` of fragment length + `FRAGMENT_OVERHEAD` (at most `MAX_PEER_WINDOW`).
    reorder_bytes: usize,
    partial: BytesMut,
    /// The message being received grew past `MAX_PEER_WINDOW` bytes: its fragments up to FIN are
    /// dropped.
    discarding: bool,
}

impl RecvState {
    /// Hold an early fragment until the gap before it fills; `false` (not held) if the reorder
    /// buffer is full, in fragments or in bytes.
    fn hold(&mut self, seq: u64, fin: bool, payload: Bytes) -> bool {
        let cost = payload.len() + FRAGMENT_OVERHEAD;
        if self.reorder.len() >= MAX_REORDER || self.reorder_bytes + cost > MAX_PEER_WINDOW {
            return false;
        }
        self.reorder_bytes += cost;
        self.reorder.insert(seq, (fin, payload));
        true
    }

    /// Take the held fragment that comes next in order, if it is there.
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
    /// reassembled: the whole message if this was its last fragment. A message longer than
    /// `MAX_PEER_WINDOW` (no reference sender sends one) is dropped, with its fragments up to
    /// FIN, rather than buffered without bound.
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
        if self.partial.is_empty() {
            if !fin {
                self.partial.extend_from_slice(&payload);
                return Reassembled::Partial;
            }
            return Reassembled::Message(payload);
        }
        self.partial.extend_from_slice(&payload);
        if !fin {
            return Reassembled::Partial;
        }
        Reassembled::Message(std::mem::take(&mut self.partial).freeze())
    }
}

/// What one in-order fragment completed.
#[derive(Debug, PartialEq)]
enum Reassembled {
    /// Nothing yet (or the rest of a dropped message).
    Partial,
    /// A whole message.
    Message(Bytes),
    /// The message grew too long and is being dropped.
    TooLarge,
}

impl LinkShared {
    /// Handle a link-layer frame from either path. Data is delivered here; probes and READY go
    /// to the link task.
    async fn receive(&self, frame: Bytes, direct: bool) {
        let decoded = match LinkFrame::decode(&frame) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(peer = self.peer, "dropping bad link frame: {e}");
                return;
            }
        };
        match decoded {
            LinkFrame::Data { seq, fin, bytes } => {
                bump(if direct {
                    &self.counters.recv_direct
                } else {
                    &self.counters.recv_server
                });
                let payload = frame.slice_ref(bytes);
                self.on_data(seq, fin, payload).await;
            }
            LinkFrame::Ack { seq } => self.on_ack(seq),
            LinkFrame::Unreliable { bytes } => {
                let data = frame.slice_ref(bytes);
                self.emit(Event::Message {
                    from: self.peer,
                    data,
                    reliability: Reliability::Unreliable,
                })
                .await;
            }
            LinkFrame::UnreliablePart {
                msg,
                index,
                count,
                bytes,
            } => {
                let part = frame.slice_ref(bytes);
                let whole = self.parts.lock().expect("link parts lock").push(
                    Instant::now(),
                    msg,
                    index,
                    count,
                    part,
                );
                match whole {
                    Ok(Some(data)) => {
                        self.emit(Event::Message {
                            from: self.peer,
                            data,
                            reliability: Reliability::Unreliable,
                        })
                        .await
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(peer = self.peer, "dropping unreliable part: {e}"),
                }
            }
            LinkFrame::Ping { id } => {
                // Answer on the path the probe came by, if we are on it too.
                let pong = Bytes::from(LinkFrame::Pong { id }.encode());
                let direct = if direct {
                    self.lock_send().direct.clone()
                } else {
                    None
                };
                self.transmit(direct.as_ref(), Channel::Unreliable, pong, true)
                    .await;
            }
            LinkFrame::Pong { id } => {
                let _ = self.ctl.send(LinkInput::Pong(id));
            }
            LinkFrame::Ready { gen } => {
                let _ = self.ctl.send(LinkInput::Ready(gen));
            }
        }
    }

    async fn on_data(&self, seq: u64, fin: bool, payload: Bytes) {
        let mut guard = self.recv.lock().await;
        let r = &mut *guard;
        if seq <= r.delivered || r.reorder.contains_key(&seq) {
            bump(&self.counters.duplicates);
            // The sender may be re-sending because our ack was lost with the path: ack again.
            r.ack_due = true;
        } else if seq != r.delivered + 1 {
            if !r.hold(seq, fin, payload) {
                // A sender within its window never gets this far ahead.
                tracing::warn!(
                    peer = self.peer,
                    seq,
                    "reorder buffer full; fragment dropped"
                );
            }
            return;
        } else {
            self.accept(r, fin, payload).await;
            while let Some((fin, payload)) = r.take_next() {
                self.accept(r, fin, payload).await;
            }
        }
        if r.delivered - r.acked_sent >= ACK_EVERY {
            let ack = Self::take_ack(r);
            drop(guard);
            if let Some(ack) = ack {
                self.send_frame(ack).await;
            }
        } else if !r.ack_asked {
            r.ack_asked = true;
            let _ = self.ctl.send(LinkInput::AckSoon);
        }
    }

    async fn accept(&self, r: &mut RecvState, fin: bool, payload: Bytes) {
        let data = match r.reassemble(fin, payload) {
            Reassembled::Partial => return,
            Reassembled::TooLarge => {
                tracing::warn!(
                    peer = self.peer,
                    "reliable message longer than {MAX_PEER_WINDOW} bytes; dropped"
                );
                return;
            }
            Reassembled::Message(data) => data,
        };
        self.emit(Event::Message {
            from: self.peer,
            data,
            reliability: Reliability::Reliable,
        })
        .await;
    }

    /// The ack to send now, if one is owed; records it as sent.
    fn take_ack(r: &mut RecvState) -> Option<Bytes> {
        r.ack_asked = false;
        if r.acked_sent == r.delivered && !r.ack_due {
            return None;
        }
        r.ack_due = false;
        r.acked_sent = r.delivered;
        Some(Bytes::from(LinkFrame::Ack { seq: r.delivered }.encode()))
    }

    /// Send the ack owed, if any, on the current path.
    async fn send_ack(&self) {
        let ack = Self::take_ack(&mut *self.recv.lock().await);
        if let Some(ack) = ack {
            self.send_frame(ack).await;
        }
    }

    /// Send a frame of the link's own (ack, probe) on the current path.
    async fn send_frame(&self, frame: Bytes) {
        let direct = self.lock_send().direct.clone();
        let ch = if frame.first() == Some(&crate::protocol::link_kind::ACK) {
            Channel::Reliable
        } else {
            Channel::Unreliable
        };
        self.transmit(direct.as_ref(), ch, frame, true).await;
    }

    fn on_ack(&self, seq: u64) {
        let mut released = 0usize;
        {
            let mut st = self.lock_send();
            while let Some(front) = st.unacked.front() {
                if front.seq > seq {
                    break;
                }
                released += front.permits as usize;
                st.unacked.pop_front();
            }
        }
        if released > 0 {
            self.window.add_permits(released);
        }
    }

    async fn emit(&self, event: Event) {
        // The app dropped its event stream: nobody is listening any more.
        let _ = self.events.send(event).await;
    }

    fn lock_send(&self) -> std::sync::MutexGuard<'_, SendState> {
        self.send.lock().expect("link send lock")
    }

    /// Assign sequence numbers and record the fragments (no waiting). `UnknownPeer` once the
    /// link was emptied by [`LinkHandle::take_held`] (its session ended).
    fn prepare(&self, data: Bytes, reliable: bool, permits: u32) -> Result<Prepared> {
        let mut st = self.lock_send();
        if st.taken {
            return Err(Error::UnknownPeer(self.peer));
        }
        if !reliable {
            let split = st.direct.as_ref().is_some_and(|d| d.split);
            let frames = if split && 1 + data.len() > MAX_DIRECT_UNRELIABLE_FRAME {
                // One SCTP chunk per frame: a lost part leaves nothing in the peer's SCTP
                // reassembly queue (PROTOCOL.md §7.6).
                let msg = st.next_part_msg;
                st.next_part_msg = msg.wrapping_add(1);
                let pieces = parts::split(&data);
                let count = pieces.len() as u16;
                pieces
                    .iter()
                    .enumerate()
                    .map(|(index, bytes)| {
                        Bytes::from(
                            LinkFrame::UnreliablePart {
                                msg,
                                index: index as u16,
                                count,
                                bytes,
                            }
                            .encode(),
                        )
                    })
                    .collect()
            } else {
                vec![Bytes::from(LinkFrame::Unreliable { bytes: &data }.encode())]
            };
            return Ok(Prepared {
                frames,
                direct: st.direct.clone(),
                unreliable_permits: Some(permits),
            });
        }
        if st.draining && st.direct.is_none() && st.held_from.is_none() {
            st.held_from = Some(st.next_seq);
        }
        let mut frames = Vec::with_capacity(data.len() / MAX_FRAGMENT_PAYLOAD + 1);
        let mut rest = data;
        loop {
            let chunk = rest.split_to(rest.len().min(MAX_FRAGMENT_PAYLOAD));
            let fin = rest.is_empty();
            let seq = st.next_seq;
            st.next_seq += 1;
            let frame = Bytes::from(
                LinkFrame::Data {
                    seq,
                    fin,
                    bytes: &chunk,
                }
                .encode(),
            );
            st.unacked.push_back(Unacked {
                seq,
                frame: frame.clone(),
                permits: fragment_permits(chunk.len()),
                fin,
            });
            frames.push(frame);
            if fin {
                break;
            }
        }
        if st.held_from.is_some() {
            // Recorded above; transmitted on `Resync` or taken by `take_held`.
            return Ok(Prepared {
                frames: Vec::new(),
                direct: None,
                unreliable_permits: None,
            });
        }
        let n = frames.len() as u64;
        match st.direct {
            Some(_) => st.sent_direct += n,
            None => st.sent_server += n,
        }
        Ok(Prepared {
            frames,
            direct: st.direct.clone(),
            unreliable_permits: None,
        })
    }

    /// Transmit prepared frames on the path chosen when they were prepared.
    async fn transmit_prepared(&self, p: Prepared) {
        if let Some(permits) = p.unreliable_permits {
            let congested = p.direct.as_ref().filter(|d| d.split).is_some_and(|d| {
                // Unknown (another send holds the channel for a moment): send, and wait.
                d.unreliable_queued_now()
                    .is_some_and(|q| q > rtc::UNRELIABLE_QUEUE_MAX)
            });
            if congested {
                // Dropped whole, like a datagram at a full socket buffer (see
                // `UNRELIABLE_QUEUE_MAX`); counted in `LinkStats::unreliable_dropped`.
                bump(&self.counters.unreliable_dropped);
                self.window.add_permits(permits as usize);
                return;
            }
            for frame in p.frames {
                self.transmit(p.direct.as_ref(), Channel::Unreliable, frame, false)
                    .await;
            }
            self.window.add_permits(permits as usize);
            return;
        }
        for frame in p.frames {
            // What SCTP has queued is part of what we have not had acknowledged, so its queue
            // can only be over the high mark when that is; only then ask the channel (which
            // takes webrtc-rs's locks).
            let unacked = self.window_size - self.window.available_permits();
            if let Some(d) = p.direct.as_ref().filter(|_| unacked > rtc::DC_HIGH) {
                let current = || self.lock_send().direct.as_ref().is_some_and(|c| c.same(d));
                if !d.wait_for_room(current).await {
                    // The direct path went away: its downgrade re-sends every unacknowledged
                    // fragment, these included, on the server path.
                    return;
                }
            }
            self.transmit(p.direct.as_ref(), Channel::Reliable, frame, false)
                .await;
        }
    }

    /// Send one frame on the direct path if given, else on the server path.
    ///
    /// webrtc-sctp blocks a send while its association's pending queue (128 KiB) is full, which
    /// is what happens when the path dies: the congestion window closes. So a direct send never
    /// waits unbounded: app data (`own == false`) gives up once the direct path is no longer the
    /// link's path (the downgrade re-sends every unacknowledged fragment on the server path); the
    /// link's own frames (acks, probes) wait at most `OWN_SEND_WAIT` and then (also) take the
    /// server path ([`LinkShared::transmit_own_direct`]), so the link task and the channel's read
    /// loop never stall on a dead path. A failed send is reported to the link task, which moves
    /// to the server path.
    async fn transmit(&self, direct: Option<&DirectTx>, ch: Channel, frame: Bytes, own: bool) {
        if let Some(d) = direct.filter(|_| own) {
            if !self.transmit_own_direct(d, ch, frame.clone()).await {
                self.relay(&frame).await;
            }
            return;
        }
        if let Some(d) = direct {
            // Giving up on this send (dropping it) is only safe because it happens when the
            // channels are no longer the link's path: their PeerConnection is being closed.
            let send = d.send(ch, &frame);
            tokio::pin!(send);
            let sent = loop {
                tokio::select! {
                    // Polled first: a send that completes at once never arms the timer.
                    biased;
                    result = &mut send => break Some(result),
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {
                        if !self.lock_send().direct.as_ref().is_some_and(|c| c.same(d)) {
                            break None;
                        }
                    }
                }
            };
            match sent {
                Some(Ok(())) => return,
                Some(Err(e)) => {
                    let _ = self.ctl.send(LinkInput::DirectFailed {
                        gen: d.gen,
                        why: format!("data channel send: {e}"),
                    });
                    if ch == Channel::Reliable {
                        return;
                    }
                }
                // Reliable data is covered by the downgrade's re-send; unreliable data takes
                // the server path below.
                None if ch == Channel::Reliable => return,
                None => {}
            }
        }
        self.relay(&frame).await;
    }

    /// Send one of the link's own frames (ack, probe) on the direct path; `false` if it has to
    /// (also) go on the server path.
    ///
    /// A channel send, once started, is never dropped: webrtc-sctp numbers a message on its
    /// stream before it waits for room in the association's queue, so a dropped send leaves a
    /// hole in the stream's sequence that the peer's in-order delivery waits on for good. So an
    /// own frame goes on the server path instead when the channels' queues are well filled or
    /// another send holds a channel (a busy or dead path), and a send that does not finish at once completes on a task of
    /// its own while a copy goes on the server path after `OWN_SEND_WAIT` (acks are cumulative
    /// and probes are matched by id, so a duplicate is harmless).
    async fn transmit_own_direct(&self, d: &DirectTx, ch: Channel, frame: Bytes) -> bool {
        match d.queued_now() {
            Some(queued) if queued + frame.len() <= rtc::OWN_QUEUE_MAX => {}
            _ => return false,
        }
        let mut send = Box::pin(d.send_owned(ch, frame));
        let result = match futures_util::FutureExt::now_or_never(&mut send) {
            Some(result) => result,
            None => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    let _ = tx.send(send.await);
                });
                match tokio::time::timeout(OWN_SEND_WAIT, rx).await {
                    Ok(Ok(result)) => result,
                    // Still queued (or the task ended): the copy on the server path decides.
                    _ => return false,
                }
            }
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                let _ = self.ctl.send(LinkInput::DirectFailed {
                    gen: d.gen,
                    why: format!("data channel send: {e}"),
                });
                false
            }
        }
    }

    async fn relay(&self, frame: &[u8]) {
        if self.relay_paused.load(Ordering::Relaxed) {
            // Reliable frames stay unacknowledged and go again on `Resync`; acks are sent
            // again then; an unreliable message is lost, as on any interrupted path.
            if frame.first() == Some(&crate::protocol::link_kind::UNRELIABLE)
                || frame.first() == Some(&crate::protocol::link_kind::UNRELIABLE_PART)
            {
                bump(&self.counters.unreliable_dropped);
            }
            return;
        }
        let buf = RelayFrame {
            peer: self.peer,
            link: self.link_id,
            payload: frame,
        }
        .encode();
        // Fails only when the session is closing, and then the link is going away too.
        let _ = self.ws_tx.send(WsMessage::Binary(buf.into())).await;
    }
}

/// Counters of one link, for diagnostics and tests.
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
    /// Reliable fragments sent again after the direct path went away.
    pub resent: u64,
    /// Duplicate reliable fragments received and dropped.
    pub duplicates: u64,
    /// Times the link moved between the server and direct paths.
    pub path_changes: u64,
    /// Unreliable messages received in parts of which some never arrived (discarded after 1 s,
    /// or to keep at most 256 KiB of parts).
    pub unreliable_incomplete: u64,
    /// Unreliable messages not sent because the direct path's unreliable channel already had
    /// 256 KiB queued (a congested path; such messages are dropped rather than delayed).
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
}

/// The client's handle on a running link task.
#[derive(Clone)]
pub(crate) struct LinkHandle {
    pub peer: PeerId,
    pub link_id: LinkId,
    shared: Arc<LinkShared>,
    window_size: u32,
    max_message: usize,
    status: Arc<Mutex<LinkStatus>>,
    runtime: tokio::runtime::Handle,
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
        let (tx, rx) = mpsc::unbounded_channel();
        let status = Arc::new(Mutex::new(LinkStatus::default()));
        let shared = Arc::new(LinkShared {
            peer,
            link_id,
            ws_tx: ctx.ws_tx.clone(),
            ctl: tx,
            window: Semaphore::new(ctx.window),
            window_size: ctx.window,
            send: Mutex::new(SendState {
                next_seq: 1,
                unacked: VecDeque::new(),
                direct: None,
                sent_server: 0,
                sent_direct: 0,
                resent: 0,
                next_part_msg: 1,
                draining: false,
                held_from: None,
                taken: false,
            }),
            events: ctx.events.clone(),
            recv: tokio::sync::Mutex::new(RecvState::default()),
            parts: Mutex::new(parts::Parts::default()),
            direct_rx: Mutex::new(None),
            relay_paused: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let handle = LinkHandle {
            peer,
            link_id,
            shared: shared.clone(),
            window_size: ctx.window as u32,
            max_message: ctx.max_message,
            status: status.clone(),
            runtime: tokio::runtime::Handle::current(),
        };
        let task = LinkTask {
            peer,
            link_id,
            initiator,
            policy,
            ctx,
            shared,
            status,
            ack_deadline: None,
            path: Path::Server,
            pair: None,
            rtc: None,
            gen: 0,
            r_open: false,
            u_open: false,
            u2_open: false,
            peer_u2_open: false,
            version: 1,
            direct_since: None,
            connected: false,
            peer_ready: 0,
            retry_at: None,
            connect_by: None,
            declined: false,
            backoff: RETRY_MIN,
            had_direct: false,
            next_ping: 1,
            pings: VecDeque::new(),
            rtt: None,
        };
        tokio::spawn(task.run(rx));
        handle
    }

    /// Send, waiting for room in the send window.
    pub(crate) async fn send(&self, data: Bytes, reliability: Reliability) -> Result<()> {
        let (reliable, permits) = self.check(&data, reliability)?;
        self.shared
            .window
            .acquire_many(permits)
            .await
            .map_err(|_| Error::UnknownPeer(self.peer))?
            .forget();
        // Sequence numbers are taken now; the transmission runs on its own task so that a caller
        // who drops this future half-way (a timeout, a select) cannot leave fragments numbered
        // but never sent, a hole the peer would wait on for good.
        let prepared = self.shared.prepare(data, reliable, permits)?;
        let shared = self.shared.clone();
        let _ = self
            .runtime
            .spawn(async move { shared.transmit_prepared(prepared).await })
            .await;
        Ok(())
    }

    /// Send without waiting; `WouldBlock` if the window is full.
    pub(crate) fn try_send(&self, data: Bytes, reliability: Reliability) -> Result<()> {
        let (reliable, permits) = self.check(&data, reliability)?;
        match self.shared.window.try_acquire_many(permits) {
            Ok(p) => p.forget(),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                return Err(Error::WouldBlock(self.peer))
            }
            Err(tokio::sync::TryAcquireError::Closed) => return Err(Error::UnknownPeer(self.peer)),
        }
        // Sequence numbers are taken now, in call order; the transmission runs on its own task
        // (it may wait for the data channel to drain).
        let prepared = self.shared.prepare(data, reliable, permits)?;
        let shared = self.shared.clone();
        self.runtime
            .spawn(async move { shared.transmit_prepared(prepared).await });
        Ok(())
    }

    /// Whether the message is reliable, and its window cost; `MessageTooLarge` if it can never
    /// be sent.
    fn check(&self, data: &Bytes, reliability: Reliability) -> Result<(bool, u32)> {
        let (reliable, limit) = match reliability {
            Reliability::Reliable => (true, self.max_message),
            Reliability::Unreliable => (false, MAX_UNRELIABLE_PAYLOAD),
        };
        let permits = permits_for(data.len());
        if data.len() > limit || permits > self.window_size as usize {
            // The largest payload that fits both the limit and the window.
            let fragments = (self.window_size as usize).div_ceil(MAX_FRAGMENT_PAYLOAD);
            let fits = (self.window_size as usize).saturating_sub(fragments * FRAGMENT_OVERHEAD);
            return Err(Error::MessageTooLarge {
                size: data.len(),
                limit: limit.min(fits),
            });
        }
        Ok((reliable, permits as u32))
    }

    pub(crate) fn deliver(&self, input: LinkInput) {
        // A closed task means the link is being torn down; late frames have nowhere to go.
        let _ = self.shared.ctl.send(input);
    }

    /// Wait until every reliable message sent so far is acknowledged by the peer.
    pub(crate) async fn flush(&self) -> Result<()> {
        let all = self.window_size;
        self.shared
            .window
            .acquire_many(all)
            .await
            .map(drop)
            .map_err(|_| Error::UnknownPeer(self.peer))
    }

    /// Draining (see [`LinkInput::Hold`]) and nothing of this link is in flight through the
    /// server: every reliable frame transmitted before the hold is acknowledged, or the link is
    /// on the direct path and holds nothing.
    pub(crate) fn drained(&self) -> bool {
        let st = self.shared.lock_send();
        if !st.draining {
            return false;
        }
        match st.held_from {
            Some(held) => st.unacked.front().is_none_or(|u| u.seq >= held),
            None => st.direct.is_some() || st.unacked.is_empty(),
        }
    }

    /// A new session replaces this link: take the reliable messages held since
    /// [`LinkInput::Hold`] (never transmitted, so they can go on the next link to the same peer
    /// without a duplicate), oldest first, and count the messages transmitted but not
    /// acknowledged (they may or may not have arrived).
    pub(crate) fn take_held(&self) -> (Vec<Bytes>, u64) {
        let mut st = self.shared.lock_send();
        st.taken = true;
        let held = st.held_from.unwrap_or(u64::MAX);
        let unacked = std::mem::take(&mut st.unacked);
        drop(st);
        let mut messages = Vec::new();
        let mut current: Vec<u8> = Vec::new();
        let mut undelivered = 0;
        for u in unacked {
            if u.seq < held {
                undelivered += u64::from(u.fin);
                continue;
            }
            if let Ok(LinkFrame::Data { bytes, fin, .. }) = LinkFrame::decode(&u.frame) {
                current.extend_from_slice(bytes);
                if fin {
                    messages.push(Bytes::from(std::mem::take(&mut current)));
                }
            }
        }
        (messages, undelivered)
    }

    /// Stop the link: senders waiting on the window get an error, the task closes its
    /// PeerConnection and ends.
    pub(crate) fn close(&self) {
        self.shared.window.close();
        let _ = self.shared.ctl.send(LinkInput::Close);
    }

    pub(crate) fn status(&self) -> LinkStatus {
        self.status.lock().expect("link status lock").clone()
    }

    pub(crate) fn stats(&self) -> LinkStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let send = self.shared.lock_send();
        LinkStats {
            sent_server: send.sent_server,
            sent_direct: send.sent_direct,
            recv_server: get(&c.recv_server),
            recv_direct: get(&c.recv_direct),
            resent: send.resent,
            duplicates: get(&c.duplicates),
            path_changes: get(&c.path_changes),
            unreliable_dropped: get(&c.unreliable_dropped),
            unreliable_incomplete: {
                let mut parts = self.shared.parts.lock().expect("link parts lock");
                parts.expire(Instant::now());
                parts.discarded
            },
            candidates_host: get(&c.candidates_host),
            candidates_srflx: get(&c.candidates_srflx),
            candidates_relay: get(&c.candidates_relay),
        }
    }
}

/// Window cost of one fragment: its bytes plus a fixed overhead, so that a window of W bytes
/// holds at most W / 64 fragments in flight however small the messages (and the receiver's
/// reorder buffer, capped at `MAX_REORDER`, can take them all).
fn fragment_permits(len: usize) -> u32 {
    (len + FRAGMENT_OVERHEAD) as u32
}

/// Window cost of a message of `len` bytes (one fragment per started 16 KiB, at least one).
fn permits_for(len: usize) -> usize {
    let fragments = len.div_ceil(MAX_FRAGMENT_PAYLOAD).max(1);
    len + fragments * FRAGMENT_OVERHEAD
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

struct Unacked {
    seq: u64,
    frame: Bytes,
    permits: u32,
    /// The last fragment of its message.
    fin: bool,
}

struct LinkTask {
    peer: PeerId,
    link_id: LinkId,
    initiator: bool,
    /// The pair's direct policy: `None` makes no PeerConnection and declines offers, `Relay`
    /// makes relay-only ones.
    policy: DirectPolicy,
    ctx: LinkCtx,
    shared: Arc<LinkShared>,
    status: Arc<Mutex<LinkStatus>>,
    /// When the owed ack goes out.
    ack_deadline: Option<TokioInstant>,
    // Path.
    path: Path,
    pair: Option<CandidatePair>,
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
    /// When the link last moved onto the direct path (dead-path rule).
    direct_since: Option<Instant>,
    connected: bool,
    /// Highest generation whose channels the peer reported open.
    peer_ready: u32,
    retry_at: Option<TokioInstant>,
    /// When the current PeerConnection counts as failed if it has not connected.
    connect_by: Option<TokioInstant>,
    /// The peer declined direct paths: stay on the server path for good.
    declined: bool,
    backoff: Duration,
    had_direct: bool,
    // RTT.
    next_ping: u64,
    pings: VecDeque<(u64, Instant)>,
    rtt: Option<Duration>,
}

impl LinkTask {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<LinkInput>) {
        if self.initiator {
            self.start_rtc().await;
        }
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let far = || TokioInstant::now() + Duration::from_secs(3600);
        loop {
            let ack_at = self.ack_deadline.unwrap_or_else(far);
            let retry_at = self.retry_at.unwrap_or_else(far);
            let connect_by = self.connect_by.unwrap_or_else(far);
            let dead_at = self.dead_path_deadline();
            tokio::select! {
                biased;
                input = rx.recv() => match input {
                    Some(LinkInput::Close) | None => break,
                    Some(input) => self.handle(input).await,
                },
                _ = sleep_until(ack_at), if self.ack_deadline.is_some() => {
                    self.ack_deadline = None;
                    self.shared.send_ack().await;
                }
                _ = sleep_until(retry_at), if self.retry_at.is_some() => {
                    self.retry_at = None;
                    self.start_rtc().await;
                }
                _ = sleep_until(connect_by), if self.connect_by.is_some() => {
                    self.connect_by = None;
                    self.rtc_failed(&format!("not connected within {CONNECT_TIMEOUT:?}")).await;
                }
                _ = ping.tick() => self.send_ping().await,
                _ = sleep_until(dead_at.unwrap_or_else(far)), if dead_at.is_some() => {
                    // Re-checked: a frame may have arrived since the deadline was computed.
                    if self.dead_path_deadline().is_some_and(|at| at <= TokioInstant::now()) {
                        let why = format!(
                            "nothing received on the direct path for {:?}",
                            self.ctx.dead_path
                        );
                        self.downgrade(&why).await;
                        self.rtc_failed(&why).await;
                    }
                }
            }
        }
        if let Some(rtc) = self.rtc.take() {
            rtc.close();
        }
    }

    /// Dead-path rule (PROTOCOL.md §8.7): while direct, the path has failed when nothing has
    /// arrived on the current generation's channels for `dead_path` since the later of the
    /// upgrade and the last frame. Both ends probe every second, so a live path is never
    /// silent that long, whatever ICE reports.
    fn dead_path_deadline(&self) -> Option<TokioInstant> {
        let since = self.direct_since?;
        let last = match *self.shared.direct_rx.lock().expect("direct rx lock") {
            Some((gen, at)) if gen == self.gen => at.max(since),
            _ => since,
        };
        Some(TokioInstant::from_std(last + self.ctx.dead_path))
    }

    fn publish(&self) {
        let mut s = self.status.lock().expect("link status lock");
        s.path = self.path;
        s.pair = self.pair;
        s.rtt = self.rtt;
    }

    async fn handle(&mut self, input: LinkInput) {
        match input {
            LinkInput::Relay(frame) => self.shared.receive(frame, false).await,
            LinkInput::AckSoon => {
                if self.ack_deadline.is_none() {
                    self.ack_deadline = Some(TokioInstant::now() + ACK_DELAY);
                }
            }
            LinkInput::Pong(id) => {
                if let Some(pos) = self.pings.iter().position(|(p, _)| *p == id) {
                    let sample = self.pings[pos].1.elapsed();
                    self.pings.drain(..=pos);
                    self.rtt = Some(match self.rtt {
                        None => sample,
                        Some(old) => (old * 7 + sample) / 8,
                    });
                    self.publish();
                }
            }
            LinkInput::Ready(gen) => {
                self.peer_ready = self.peer_ready.max(gen);
                self.maybe_upgrade().await;
            }
            LinkInput::Signal(data) => self.on_signal(data).await,
            LinkInput::Rtc { gen, event } => {
                if gen == self.gen && self.rtc.is_some() {
                    self.on_rtc(event).await
                }
            }
            LinkInput::DirectFailed { gen, why } => {
                // A late report from an older PeerConnection says nothing about this one.
                if gen == self.gen {
                    self.downgrade(&why).await;
                    if self.rtc.is_some() {
                        self.rtc_failed(&why).await;
                    }
                }
            }
            LinkInput::Restrict { policy, why } => self.restrict(policy, why).await,
            LinkInput::PauseRelay => self.shared.relay_paused.store(true, Ordering::Relaxed),
            LinkInput::Resync => {
                self.shared.relay_paused.store(false, Ordering::Relaxed);
                let held = {
                    let mut st = self.shared.lock_send();
                    st.draining = false;
                    st.held_from.take()
                };
                if !self.direct_up() {
                    self.resend_on_server(false).await;
                } else if let Some(held) = held {
                    // Held messages never went: send them now on the direct path.
                    let (frames, direct) = {
                        let st = self.shared.lock_send();
                        let frames: Vec<Bytes> = st
                            .unacked
                            .iter()
                            .filter(|u| u.seq >= held)
                            .map(|u| u.frame.clone())
                            .collect();
                        (frames, st.direct.clone())
                    };
                    for f in frames {
                        self.shared
                            .transmit(direct.as_ref(), Channel::Reliable, f, false)
                            .await;
                    }
                }
            }
            LinkInput::Hold => self.shared.lock_send().draining = true,
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

    fn candidates(&self) -> Candidates {
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
        let trying = self.rtc.is_some() || self.retry_at.is_some() || self.direct_up();
        self.downgrade("direct policy tightened").await;
        self.reset_rtc();
        self.retry_at = None;
        if let Some(reason) = why.filter(|_| trying) {
            self.shared
                .emit(Event::DirectFailed {
                    peer: self.peer,
                    reason,
                })
                .await;
        }
        if self.initiator && !self.declined && self.factory().is_some() {
            self.start_rtc().await;
        }
    }

    // ---- sending ----

    fn direct_up(&self) -> bool {
        matches!(self.path, Path::Direct { .. })
    }

    /// Send a frame of the link's own (ack, probe) on the current path.
    async fn transmit(&mut self, frame: Bytes, ch: Channel) {
        let direct = self.shared.lock_send().direct.clone();
        self.shared.transmit(direct.as_ref(), ch, frame, true).await;
    }

    async fn relay(&self, frame: &[u8]) {
        self.shared.relay(frame).await;
    }

    async fn send_ping(&mut self) {
        let id = self.next_ping;
        self.next_ping += 1;
        if self.pings.len() >= 8 {
            self.pings.pop_front();
        }
        self.pings.push_back((id, Instant::now()));
        let frame = Bytes::from(LinkFrame::Ping { id }.encode());
        self.transmit(frame, Channel::Unreliable).await;
    }

    // ---- receiving ----

    // ---- path ----

    /// Take `path` (with `self.pair` already set for it) and publish; tell the app if the path
    /// changed.
    async fn set_path(&mut self, path: Path) {
        if self.path == path {
            // The pair may have changed under the same candidate types.
            self.publish();
            return;
        }
        self.path = path;
        bump(&self.shared.counters.path_changes);
        // RTT samples of one path say nothing about the other.
        self.rtt = None;
        self.pings.clear();
        self.publish();
        tracing::debug!(peer = self.peer, %path, "path changed");
        self.shared
            .emit(Event::PathChanged {
                peer: self.peer,
                path,
            })
            .await;
        // Reported to the server too, for the app's backend.
        let (kind, local, remote) = match path {
            Path::Server => (PathKind::Server, None, None),
            Path::Direct { local, remote } => {
                (PathKind::Direct, Some(local.into()), Some(remote.into()))
            }
        };
        self.send_msg(&ClientMsg::Path {
            peer: self.peer,
            link: self.link_id,
            path: kind,
            local,
            remote,
        })
        .await;
    }

    /// The channels this generation needs are open: "r", "u" and, for version 2, both ends'
    /// "u2".
    fn channels_open(&self) -> bool {
        self.r_open && self.u_open && (self.version < 2 || (self.u2_open && self.peer_u2_open))
    }

    async fn maybe_upgrade(&mut self) {
        if self.direct_up()
            || !(self.channels_open() && self.connected && self.peer_ready >= self.gen)
        {
            return;
        }
        let Some(rtc) = &self.rtc else { return };
        let Some(pair) = rtc.selected_pair().await else {
            return;
        };
        self.backoff = RETRY_MIN;
        self.had_direct = true;
        self.pair = Some(pair);
        self.shared.lock_send().direct = Some(rtc.tx());
        self.direct_since = Some(Instant::now());
        self.set_path(pair.path()).await;
        self.send_ping().await;
    }

    async fn downgrade(&mut self, why: &str) {
        if !self.direct_up() {
            return;
        }
        tracing::info!(
            peer = self.peer,
            "direct path lost ({why}); back to the server path"
        );
        self.direct_since = None;
        self.set_path(Path::Server).await;
        // Everything not acknowledged may have died with the direct path.
        self.resend_on_server(true).await;
    }

    /// Send every unacknowledged reliable frame again on the server path, then the current ack
    /// (frames and acks may have been lost with a path: the direct one, or the session's
    /// connection). The peer discards what it already has.
    ///
    /// `leave_direct`: also stop using the direct path, in the same critical section, so new
    /// frames go on the server path from the moment the re-sent ones are taken.
    async fn resend_on_server(&mut self, leave_direct: bool) {
        let frames: Vec<Bytes> = {
            let mut st = self.shared.lock_send();
            if leave_direct {
                st.direct = None;
            }
            let held = st.held_from.unwrap_or(u64::MAX);
            let frames: Vec<Bytes> = st
                .unacked
                .iter()
                .filter(|u| u.seq < held)
                .map(|u| u.frame.clone())
                .collect();
            st.resent += frames.len() as u64;
            st.sent_server += frames.len() as u64;
            frames
        };
        for f in frames {
            self.relay(&f).await;
        }
        // Acks we sent on the direct path may be gone too: send the current one again.
        let ack = {
            let mut r = self.shared.recv.lock().await;
            r.ack_due = r.delivered > 0;
            LinkShared::take_ack(&mut r)
        };
        if let Some(ack) = ack {
            self.relay(&ack).await;
        }
    }

    async fn start_rtc(&mut self) {
        let Some(factory) = self.factory() else {
            return;
        };
        self.reset_rtc();
        self.gen += 1;
        // Known once the answer arrives.
        self.version = 1;
        match factory
            .create(
                self.gen,
                self.candidates(),
                self.shared.ctl.clone(),
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
                    self.rtc_failed(&format!("creating offer: {e}")).await;
                }
            },
            Err(e) => {
                self.rtc_failed(&format!("creating peer connection: {e}"))
                    .await
            }
        }
    }

    /// Incoming direct-path frames of generation `gen` are handled in the data channel's read
    /// loop (no hop through this task), and their arrival is noted for the dead-path rule. A
    /// weak reference: the channel's handler must not keep the link alive.
    fn frame_sink(&self, gen: u32) -> FrameSink {
        let shared: Weak<LinkShared> = Arc::downgrade(&self.shared);
        Arc::new(move |frame| {
            let shared = shared.clone();
            Box::pin(async move {
                if let Some(shared) = shared.upgrade() {
                    *shared.direct_rx.lock().expect("direct rx lock") = Some((gen, Instant::now()));
                    shared.receive(frame, true).await;
                }
            })
        })
    }

    fn reset_rtc(&mut self) {
        if let Some(old) = self.rtc.take() {
            old.close();
        }
        self.r_open = false;
        self.u_open = false;
        self.u2_open = false;
        self.peer_u2_open = false;
        self.connected = false;
        self.connect_by = None;
    }

    /// The direct path could not be made (or died for good): stay on the server path and, if we
    /// are the initiator, try again later.
    async fn rtc_failed(&mut self, why: &str) {
        tracing::info!(peer = self.peer, "no direct path: {why}");
        self.reset_rtc();
        self.shared
            .emit(Event::DirectFailed {
                peer: self.peer,
                reason: why.to_string(),
            })
            .await;
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
                self.downgrade("peer restarted the connection").await;
                self.reset_rtc();
                self.gen = gen;
                self.version = version.unwrap_or(1).clamp(1, self.ctx.link_version);
                let mut rtc = match factory
                    .create(
                        gen,
                        self.candidates(),
                        self.shared.ctl.clone(),
                        self.frame_sink(gen),
                    )
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        return self
                            .rtc_failed(&format!("creating peer connection: {e}"))
                            .await
                    }
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
                        self.rtc_failed(&format!("answering offer: {e}")).await;
                    }
                }
            }
            LinkSignal::Decline { gen } => {
                if gen == self.gen && self.initiator {
                    tracing::info!(peer = self.peer, "peer does not take direct paths");
                    self.declined = true;
                    self.retry_at = None;
                    // Reported like any failed attempt; `declined` stops the retries.
                    self.rtc_failed("the peer does not take direct paths").await;
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
                        return self.rtc_failed(&format!("applying answer: {e}")).await;
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
            self.rtc_failed(&format!("opening the unreliable channel: {e}"))
                .await;
        }
    }

    /// A channel opened: tell the peer once all of this generation's are (READY), and move to
    /// the direct path if everything else is in place.
    async fn channels_opened(&mut self, was_open: bool) {
        if !was_open && self.channels_open() {
            let ready = LinkFrame::Ready { gen: self.gen }.encode();
            self.relay(&ready).await;
        }
        self.maybe_upgrade().await;
    }

    async fn on_rtc(&mut self, event: RtcEvent) {
        tracing::trace!(peer = self.peer, gen = self.gen, ?event, "rtc event");
        match event {
            RtcEvent::Candidate(candidate) => {
                let line = candidate["candidate"].as_str().unwrap_or_default();
                match rtc::parse_candidate(line).map(|(_, t)| t) {
                    Some(CandidateType::Host) => bump(&self.shared.counters.candidates_host),
                    Some(CandidateType::Srflx) => bump(&self.shared.counters.candidates_srflx),
                    Some(CandidateType::Relay) => bump(&self.shared.counters.candidates_relay),
                    _ => {}
                }
                let gen = self.gen;
                self.signal(LinkSignal::Candidate { gen, candidate }).await;
            }
            RtcEvent::Open(ch) => {
                let was_open = self.channels_open();
                match ch {
                    Channel::Reliable => self.r_open = true,
                    Channel::Unreliable => self.u_open = true,
                }
                self.channels_opened(was_open).await;
            }
            RtcEvent::InbandOpen => {
                let was_open = self.channels_open();
                self.u2_open = true;
                self.channels_opened(was_open).await;
            }
            RtcEvent::PeerInbandOpen => {
                if self.version < 2 {
                    return; // not offered: the peer breaks the protocol
                }
                let was_open = self.channels_open();
                self.peer_u2_open = true;
                self.channels_opened(was_open).await;
            }
            RtcEvent::Closed => {
                self.downgrade("data channel closed").await;
                self.rtc_failed("data channel closed").await;
            }
            RtcEvent::PairSelected => {
                if !self.direct_up() {
                    return self.maybe_upgrade().await;
                }
                // ICE switched pairs under an open path: report the new candidate types.
                if let Some(rtc) = &self.rtc {
                    if let Some(pair) = rtc.selected_pair().await {
                        self.pair = Some(pair);
                        self.set_path(pair.path()).await;
                    }
                }
            }
            RtcEvent::State(state) => match state {
                ConnState::Connected => {
                    self.connected = true;
                    self.connect_by = None;
                    self.maybe_upgrade().await;
                }
                // A PeerConnection that lost its path is not reused: its SCTP association may
                // have backed off its retransmissions for many seconds. A fresh one is quick.
                ConnState::Disconnected | ConnState::Failed | ConnState::Closed => {
                    self.connected = false;
                    let why = format!("ICE {state:?}").to_lowercase();
                    self.downgrade(&why).await;
                    self.rtc_failed(&why).await;
                }
                ConnState::Other => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The receiving half of `LinkShared::on_data` without its async parts (acks, events): the
    /// messages and drops that `seq` completes.
    fn feed(r: &mut RecvState, seq: u64, fin: bool, payload: Bytes) -> Vec<Reassembled> {
        let mut out = Vec::new();
        if seq <= r.delivered || r.reorder.contains_key(&seq) {
            return out;
        }
        if seq != r.delivered + 1 {
            r.hold(seq, fin, payload);
            return out;
        }
        out.push(r.reassemble(fin, payload));
        while let Some((fin, payload)) = r.take_next() {
            out.push(r.reassemble(fin, payload));
        }
        out.retain(|x| *x != Reassembled::Partial);
        out
    }

    fn check_bounds(r: &RecvState) {
        let held: usize = r
            .reorder
            .values()
            .map(|(_, p)| p.len() + FRAGMENT_OVERHEAD)
            .sum();
        assert_eq!(held, r.reorder_bytes);
        assert!(r.reorder_bytes <= MAX_PEER_WINDOW);
        assert!(r.reorder.len() <= MAX_REORDER);
        assert!(r.partial.len() <= MAX_PEER_WINDOW);
    }

    /// One shared buffer that test payloads are slices of (no allocation per fragment).
    fn big() -> Bytes {
        Bytes::from((0..(1usize << 20)).map(|i| i as u8).collect::<Vec<u8>>())
    }

    #[test]
    fn fragments_without_fin_are_bounded() {
        let big = big();
        let mut r = RecvState::default();
        let mut seq = 0;
        let mut too_large = 0;
        // 20 MiB of fragments without FIN: the first 16 MiB are kept, then the message is dropped.
        for _ in 0..(20 << 20) / MAX_FRAGMENT_PAYLOAD {
            seq += 1;
            for out in feed(&mut r, seq, false, big.slice(..MAX_FRAGMENT_PAYLOAD)) {
                assert_eq!(out, Reassembled::TooLarge);
                too_large += 1;
            }
            check_bounds(&r);
        }
        assert_eq!(too_large, 1);
        assert!(r.discarding && r.partial.is_empty());
        // Its FIN ends the dropped message; the next message arrives whole.
        seq += 1;
        assert_eq!(feed(&mut r, seq, true, big.slice(..10)), vec![]);
        seq += 1;
        assert_eq!(
            feed(&mut r, seq, true, big.slice(..2)),
            vec![Reassembled::Message(big.slice(..2))]
        );
        assert_eq!(r.delivered, seq);
    }

    #[test]
    fn largest_message_is_delivered() {
        let big = big();
        let mut r = RecvState::default();
        let n = MAX_PEER_WINDOW / MAX_FRAGMENT_PAYLOAD;
        let mut got = Vec::new();
        for seq in 1..=n as u64 {
            got.extend(feed(
                &mut r,
                seq,
                seq == n as u64,
                big.slice(..MAX_FRAGMENT_PAYLOAD),
            ));
        }
        match &got[..] {
            [Reassembled::Message(m)] => assert_eq!(m.len(), MAX_PEER_WINDOW),
            other => panic!("{} results", other.len()),
        }
        // One byte more is too large.
        let mut r = RecvState::default();
        feed(&mut r, 1, false, big.slice(..1));
        let mut got = Vec::new();
        for seq in 2..=n as u64 + 1 {
            got.extend(feed(
                &mut r,
                seq,
                seq == n as u64 + 1,
                big.slice(..MAX_FRAGMENT_PAYLOAD),
            ));
        }
        assert_eq!(got, vec![Reassembled::TooLarge]);
        assert!(!r.discarding && r.partial.is_empty());
    }

    #[test]
    fn reorder_buffer_is_bounded_in_bytes() {
        let big = big();
        let mut r = RecvState::default();
        // Fragments far larger than a reference sender's: the byte cap stops them long before
        // the fragment cap.
        let len = 64 << 10;
        let mut held = 0;
        for seq in 2..2000 {
            feed(&mut r, seq, true, big.slice(..len));
            check_bounds(&r);
            held = r.reorder.len();
        }
        assert_eq!(held, MAX_PEER_WINDOW / (len + FRAGMENT_OVERHEAD));
        // Filling the gap delivers everything held, in order, and empties the buffer.
        let got = feed(&mut r, 1, true, big.slice(..1));
        assert_eq!(got.len(), held + 1);
        assert!(r.reorder.is_empty());
        assert_eq!(r.reorder_bytes, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Arbitrary DATA fragments (duplicates, gaps, huge payloads, no FIN) never panic and
        /// never push the receiver past its bounds.
        #[test]
        fn arbitrary_fragments_stay_bounded(
            frames in prop::collection::vec((0u64..400, any::<bool>(), 0usize..(128 << 10)), 0..400),
        ) {
            let big = big();
            let mut r = RecvState::default();
            for (ahead, fin, len) in frames {
                let seq = r.delivered.saturating_add(ahead);
                for out in feed(&mut r, seq, fin, big.slice(..len.min(big.len()))) {
                    if let Reassembled::Message(m) = out {
                        prop_assert!(m.len() <= MAX_PEER_WINDOW);
                    }
                }
                check_bounds(&r);
            }
        }

        /// Messages cut into fragments and delivered in any order come out whole and in order.
        #[test]
        fn shuffled_fragments_reassemble(
            sizes in prop::collection::vec(0usize..50_000, 1..8),
            order in Just((0..64usize).collect::<Vec<_>>()).prop_shuffle(),
        ) {
            let big = big();
            let mut frames = Vec::new();
            let mut at = 0;
            for &size in &sizes {
                let msg = big.slice(at..at + size);
                at += size;
                let mut rest = msg;
                loop {
                    let chunk = rest.split_to(rest.len().min(MAX_FRAGMENT_PAYLOAD));
                    frames.push((frames.len() as u64 + 1, rest.is_empty(), chunk));
                    if rest.is_empty() {
                        break;
                    }
                }
            }
            // Shuffle by the first frames.len() indices of `order` that are in range.
            let idx: Vec<usize> = order.into_iter().filter(|&i| i < frames.len()).collect();
            prop_assume!(idx.len() == frames.len());
            let mut r = RecvState::default();
            let mut got = Vec::new();
            for i in idx {
                let (seq, fin, chunk) = frames[i].clone();
                got.extend(feed(&mut r, seq, fin, chunk));
                check_bounds(&r);
            }
            let mut at = 0;
            let want: Vec<Reassembled> = sizes
                .iter()
                .map(|&size| {
                    at += size;
                    Reassembled::Message(big.slice(at - size..at))
                })
                .collect();
            prop_assert_eq!(got, want);
            prop_assert!(r.reorder.is_empty() && r.partial.is_empty());
        }
    }
}
