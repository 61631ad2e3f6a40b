//! The link state its hot paths share: the core and what goes with each of its calls, under one
//! lock, so that a frame from a data channel reaches the app, and a send with credit reaches
//! the channel's writer, without a switch to the link task (see `docs/notes/link-fast-path.md`).
//!
//! Three kinds of party take the lock, each briefly and never across an `await`:
//! - the link task, for everything (signaling, PeerConnections, waiters, timers, files);
//! - the data channels' read loops ([`Shared::fast_frame`]) and the handles' sends with credit
//!   ([`Shared::fast_send`]): the hot paths;
//! - the channel writers, to report a frame handed on ([`Shared::written`]).
//!
//! The hot paths keep the task's order: they deliver to the app only while the task has no
//! event of its own waiting ([`Hot::quiet`]), take a frame only while no earlier one waits for
//! the task, and leave to the task (waking it) everything else they meet.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::core::{
    Buffered, CoreEvent, Delivery, Gen, Lane, LinkCore, PathId, Route, SendError, Transmit,
};
use super::rtc::{Channel, DirectTx, RtcError, OWN_QUEUE_MAX};
use super::{LinkStats, LinkStatus, LinkView};
use crate::protocol::{link_kind, PeerId};
use crate::{CandidatePair, Event, Path};

/// Longest the link's own frames (acks, probes) wait on a data channel before a copy takes the
/// server path ([`LinkCore::transmit_abandoned`]).
pub(super) const OWN_SEND_WAIT: Duration = Duration::from_millis(100);
/// How often an idle channel writer reports its channel's queue while it drains.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// Largest frame a hot path sends itself (under the lock): a small message's send is quick,
/// a bulk one's (16 KiB: a dozen SCTP chunks) would hold up the other parties for longer than
/// the switch to the writer costs.
const INLINE_MAX: usize = 2048;
/// Longest an idle writer waits to read its channel's queue (see `write_channel`).
const BUFFERED_WAIT: Duration = Duration::from_millis(2);

/// A data channel send started in a hot path that could not complete at once: its writer
/// completes it (a send once started must complete, [`DirectTx::send`]).
type StartedSend = Pin<Box<dyn Future<Output = Result<(), RtcError>> + Send>>;

/// A frame for a writer: its id, the frame, and its send if a hot path started it.
type Job = (u64, Transmit, Option<StartedSend>);

/// Where a `send` learns whether the link took its message.
pub(super) type SendReply = oneshot::Sender<Result<(), SendError>>;

/// Send-window credit the link task lends its handles, so that a send with room in the window
/// is admitted without waiting for the task (and `try_send` can answer at once). The task (or a
/// hot path, while nobody waits in line) lends what the core has free, takes it back when
/// someone waits, and counts what it lent ([`Hot::lent`]); a claim is given back to the core
/// with its message ([`Shared::fast_send`]), which then has room for it. Closed by
/// `LinkHandle::take_held` and `LinkHandle::close`: claims fail from then on.
pub(super) struct Gate(AtomicU64);

const GATE_CLOSED: u64 = 1 << 63;

pub(super) enum Claim {
    Granted,
    Short,
    Closed,
}

impl Gate {
    pub(super) fn new(permits: usize) -> Self {
        Gate(AtomicU64::new(permits as u64))
    }

    pub(super) fn claim(&self, permits: usize) -> Claim {
        let permits = permits as u64;
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            if cur & GATE_CLOSED != 0 {
                return Claim::Closed;
            }
            if cur < permits {
                return Claim::Short;
            }
            match self.0.compare_exchange_weak(
                cur,
                cur - permits,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Claim::Granted,
                Err(now) => cur = now,
            }
        }
    }

    pub(super) fn lend(&self, permits: usize) {
        self.0.fetch_add(permits as u64, Ordering::AcqRel);
    }

    /// Take back all credit not claimed.
    pub(super) fn take_back(&self) -> usize {
        (self.0.fetch_and(GATE_CLOSED, Ordering::AcqRel) & !GATE_CLOSED) as usize
    }

    pub(super) fn close(&self) {
        self.0.fetch_or(GATE_CLOSED, Ordering::AcqRel);
    }
}

/// The writer tasks of one generation's two channels.
pub(super) struct Writers {
    pub gen: Gen,
    pub tx: DirectTx,
    /// Indexed by [`ch_index`].
    frames: [mpsc::UnboundedSender<Job>; 2],
    /// Tells an idle writer that a hot path's send left bytes queued on its channel: it then
    /// reports the queue as it drains, as after its own sends.
    kick: [std::sync::Arc<Notify>; 2],
    /// Bytes handed to each writer and not yet to its channel.
    pub queued: [usize; 2],
    /// What each channel last reported queued.
    pub buffered: [usize; 2],
    /// Dropped when the generation ends: the writers stop, even in the middle of a send (its
    /// PeerConnection is being closed, so no hole in a stream matters any more).
    _stop: watch::Sender<()>,
}

impl Writers {
    /// Start the writer tasks of generation `gen`'s channels.
    pub(super) fn start(gen: Gen, tx: DirectTx, shared: &std::sync::Arc<Shared>) -> Self {
        let (stop, stop_rx) = watch::channel(());
        let spawn = |ch| {
            let (frames, frames_rx) = mpsc::unbounded_channel();
            let kick = std::sync::Arc::new(Notify::new());
            tokio::spawn(write_channel(
                gen,
                ch,
                tx.clone(),
                frames_rx,
                kick.clone(),
                std::sync::Arc::downgrade(shared),
                stop_rx.clone(),
            ));
            (frames, kick)
        };
        let (r, u) = (spawn(Channel::Reliable), spawn(Channel::Unreliable));
        Writers {
            gen,
            tx,
            frames: [r.0, u.0],
            kick: [r.1, u.1],
            queued: [0; 2],
            buffered: [0; 2],
            _stop: stop,
        }
    }

    /// Channel `i` reports `bytes` queued: the estimate the core is to hear.
    pub(super) fn set_buffered(&mut self, i: usize, bytes: usize) -> Buffered {
        self.buffered[i] = bytes;
        self.estimate()
    }

    pub(super) fn estimate(&self) -> Buffered {
        Buffered {
            reliable: self.queued[0] + self.buffered[0],
            unreliable: self.queued[1] + self.buffered[1],
        }
    }
}

fn ch_index(ch: Channel) -> usize {
    match ch {
        Channel::Reliable => 0,
        Channel::Unreliable => 1,
    }
}

/// Hand frames to one data channel, in order, one send at a time, and report each result and
/// the channel's queue. A send once started is never dropped while its generation lives
/// ([`DirectTx::send`]); a channel whose queue is full makes only its writer wait, never the
/// link.
async fn write_channel(
    gen: Gen,
    ch: Channel,
    tx: DirectTx,
    mut frames: mpsc::UnboundedReceiver<Job>,
    kick: std::sync::Arc<Notify>,
    shared: std::sync::Weak<Shared>,
    mut stop: watch::Receiver<()>,
) {
    let mut last = 0usize;
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.changed() => return,
            f = frames.recv() => f,
            // A hot path's send left bytes queued: report them as they drain.
            _ = kick.notified() => {
                last = last.max(1);
                continue;
            }
            // Idle with bytes queued: tell the link as the queue drains (it holds DATA back
            // above `DC_HIGH`, and its own frames above `OWN_QUEUE_MAX`).
            _ = async {
                match ch {
                    Channel::Reliable => tx.drained(DRAIN_POLL).await,
                    Channel::Unreliable => tokio::time::sleep(DRAIN_POLL).await,
                }
            }, if last > 0 => {
                // Not waiting for it without a limit: a hot path may have started a send that
                // holds the channel's lock and waits in this writer's queue (webrtc-rs takes
                // the same lock for both), and this writer is the one to complete it.
                let Ok(buffered) = tokio::time::timeout(BUFFERED_WAIT, tx.buffered(ch)).await
                else {
                    continue;
                };
                if buffered != last {
                    last = buffered;
                    let Some(shared) = shared.upgrade() else { return };
                    shared.written(gen, ch, None, buffered);
                }
                continue;
            }
        };
        let Some((id, t, started)) = next else { return };
        let result = {
            let send = async {
                match started {
                    Some(send) => send.await,
                    None => tx.send(ch, &t.frame).await,
                }
            };
            tokio::pin!(send);
            tokio::select! {
                biased;
                r = &mut send => r,
                _ = stop.changed() => return,
            }
        };
        let buffered = tx.buffered(ch).await;
        last = buffered;
        let len = t.frame.len();
        let failed = result.err().map(|e| (t, format!("data channel send: {e}")));
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.written(gen, ch, Some(Written { id, len, failed }), buffered);
    }
}

/// A frame a writer handed to its channel: its id, length, and the error if the send failed.
struct Written {
    id: u64,
    len: usize,
    failed: Option<(Transmit, String)>,
}

/// The link's own frames: an ACK (of any lane), PING or PONG that waits too long on a channel
/// also goes on the server path.
fn is_own(frame: &[u8]) -> bool {
    matches!(
        frame.first(),
        Some(&link_kind::ACK)
            | Some(&link_kind::ACK_LANE)
            | Some(&link_kind::PING)
            | Some(&link_kind::PONG)
    )
}

/// The state under the lock.
pub(super) struct Hot {
    /// The delivery algorithm: sequence numbers, window, acks, reorder, path, timers.
    pub core: LinkCore,
    /// Window lent to the handles: the [`Gate`]'s credit and claims not yet given back.
    pub lent: usize,
    /// Nobody waits in line for the window: freed window may be lent at once.
    pub lending: bool,
    /// The task wants to hear of every frame and send (it has waiters, flushes or a
    /// `take_held` to serve).
    pub watch: bool,
    /// The link task has ended: the hot paths take nothing more.
    pub closed: bool,
    pub writers: Option<Writers>,
    /// App frames (DATA, unreliable) handed to a writer and not yet on their channel.
    pub writing: BTreeSet<u64>,
    /// Own frames handed to a writer: id, when a copy goes on the server path instead, frame.
    pub own_waits: VecDeque<(u64, Instant, Transmit)>,
    pub next_write: u64,
    /// Answers sent once every app frame handed to a writer before them (ids below the first)
    /// is on its channel: `send` returns when its frames are with the WebRTC stack, as a
    /// caller pacing its sends expects.
    pub answering: VecDeque<(u64, SendReply, Result<(), SendError>)>,
    /// Direct frames for a generation without writers (yet): the task starts them, or the
    /// frames take the server path. Later direct frames queue behind them.
    pub pending_tx: VecDeque<Transmit>,
    /// Server-path frames, in order, for the task to send.
    pub relay_out: VecDeque<Bytes>,
    /// Answers to hot-path sends whose frames wait in [`Hot::relay_out`] or
    /// [`Hot::pending_tx`]: the task answers them once it has handed those on.
    pub late_answers: Vec<SendReply>,
    /// Core events taken by a hot path for the task, in order, before the core's next ones.
    pub core_events: VecDeque<CoreEvent>,
    /// Events for the app, in order, not yet in its queue.
    pub outbox: VecDeque<Event>,
    /// The core moved to this direct generation and the task is reporting it: events after it
    /// wait ([`super::LinkTask::upgraded`]).
    pub upgrading: Option<Gen>,
    /// Data channel frames queued for the task (a hot path could not take them): later ones
    /// queue behind them.
    pub slow_frames: usize,
    /// When the task's timer is set (the core's next timeout, or an own frame's wait).
    pub armed: Option<Instant>,
    /// Path, as published.
    pub path: Path,
    pub pair: Option<CandidatePair>,
    /// Local candidates signaled: host, srflx, relay.
    pub candidates: [u64; 3],
}

impl Hot {
    pub(super) fn new(core: LinkCore, lent: usize) -> Self {
        Hot {
            core,
            lent,
            lending: true,
            watch: false,
            closed: false,
            writers: None,
            writing: BTreeSet::new(),
            own_waits: VecDeque::new(),
            next_write: 0,
            answering: VecDeque::new(),
            pending_tx: VecDeque::new(),
            relay_out: VecDeque::new(),
            late_answers: Vec::new(),
            core_events: VecDeque::new(),
            outbox: VecDeque::new(),
            upgrading: None,
            slow_frames: 0,
            armed: None,
            path: Path::Server,
            pair: None,
            candidates: [0; 3],
        }
    }

    /// No event of the task's waits to reach the app before one a hot path would deliver.
    fn quiet(&self) -> bool {
        self.outbox.is_empty() && self.core_events.is_empty() && self.upgrading.is_none()
    }

    /// When the task must next wake for a timer.
    pub(super) fn next_timer(&self) -> Option<Instant> {
        let own = self.own_waits.iter().map(|w| w.1).min();
        match (self.core.poll_timeout(), own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Hand every frame the core has on: direct ones to their channel's writer (or, `inline`,
    /// onto an idle channel at once), server ones to [`Hot::relay_out`]. Returns whether there
    /// was any.
    pub(super) fn pump(&mut self, now: Instant, inline: bool) -> bool {
        // Over a queue limit the core holds back or drops what it has: it decides on a fresh
        // figure where one can be read, whoever sends (an app's send can come long after the
        // last report, while the channel drained).
        if self.writers.as_ref().is_some_and(|w| {
            let e = w.estimate();
            e.reliable + e.unreliable > OWN_QUEUE_MAX
        }) {
            self.refresh_buffered();
        }
        let mut any = false;
        while let Some(t) = self.core.poll_transmit() {
            any = true;
            match t.route {
                Route::Server => self.relay_out.push_back(t.frame),
                Route::Direct(..) if !self.pending_tx.is_empty() => self.pending_tx.push_back(t),
                Route::Direct(..) => {
                    if let Err(t) = self.dispatch(t, now, inline) {
                        self.pending_tx.push_back(t);
                    }
                }
            }
        }
        any
    }

    /// Tell the core what the channels have queued now, where that can be read without waiting
    /// (an idle channel): the writers' last reports may be older than the peer's last SACK.
    pub(super) fn refresh_buffered(&mut self) {
        let Some(w) = &mut self.writers else { return };
        let mut fresh = None;
        for ch in [Channel::Reliable, Channel::Unreliable] {
            let i = ch_index(ch);
            if w.queued[i] == 0 {
                if let Some(b) = w.tx.buffered_now(ch).filter(|&b| b != w.buffered[i]) {
                    fresh = Some(w.set_buffered(i, b));
                }
            }
        }
        if let Some(estimate) = fresh {
            self.core.direct_buffered(w.gen, estimate);
        }
    }

    /// Hand one direct frame to the writer of its channel (`inline`: send it here if the writer
    /// is idle); gives it back if its generation has no writers. The link task does not send
    /// inline: a bulk lane's sends would then take turns with its other work instead of
    /// running next to it in the writer.
    pub(super) fn dispatch(
        &mut self,
        t: Transmit,
        now: Instant,
        inline: bool,
    ) -> Result<(), Transmit> {
        let Route::Direct(gen, ch) = t.route else {
            self.relay_out.push_back(t.frame);
            return Ok(());
        };
        let Some(w) = self.writers.as_mut().filter(|w| w.gen == gen) else {
            return Err(t);
        };
        let i = ch_index(ch);
        let mut started = None;
        if inline && w.queued[i] == 0 && t.frame.len() <= INLINE_MAX {
            // The writer is idle: send here, and hand the send to the writer only if it has
            // to wait (the writer then completes it before any later frame).
            let (tx, frame) = (w.tx.clone(), t.frame.clone());
            let mut send: StartedSend = Box::pin(async move { tx.send(ch, &frame).await });
            match send.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(r) => {
                    let b = w.tx.buffered_now(ch).unwrap_or(w.buffered[i]);
                    let queued = w.set_buffered(i, b);
                    // Above the least of the core's queue limits, the core holds something
                    // back until it hears the queue drained.
                    if b > 0 && queued.reliable + queued.unreliable > OWN_QUEUE_MAX {
                        w.kick[i].notify_one();
                    }
                    self.core.direct_buffered(gen, queued);
                    if let Err(e) = r {
                        self.core
                            .transmit_failed(t, &format!("data channel send: {e}"), now);
                    }
                    return Ok(());
                }
                Poll::Pending => started = Some(send),
            }
        }
        let id = self.next_write;
        let len = t.frame.len();
        let own = is_own(&t.frame).then(|| t.clone());
        if w.frames[i].send((id, t, started)).is_err() {
            // The writer stopped: its generation is ending.
            return Ok(());
        }
        self.next_write += 1;
        w.queued[i] += len;
        let buffered = w.estimate();
        self.core.direct_buffered(gen, buffered);
        match own {
            Some(t) => self.own_waits.push_back((id, now + OWN_SEND_WAIT, t)),
            None => {
                self.writing.insert(id);
            }
        }
        Ok(())
    }

    /// Answer the sends whose frames are all on their channels.
    pub(super) fn answer(&mut self) {
        while let Some((upto, ..)) = self.answering.front() {
            if self.writing.first().is_some_and(|id| id < upto) {
                break;
            }
            let Some((_, reply, r)) = self.answering.pop_front() else {
                break;
            };
            let _ = reply.send(r);
        }
    }

    /// Lend the handles the window the core has free, when nobody waits in line for it.
    fn lend(&mut self, gate: &Gate) {
        // Not while server-path frames wait for the task: unreliable ones give their window
        // back once taken from the core, and a sender must not outrun the WebSocket.
        if !self.lending || self.closed || !self.relay_out.is_empty() {
            return;
        }
        // With several lanes, only lane 0's unused reserve is lent (`LinkCore::lendable`).
        let free = self.core.lendable().saturating_sub(self.lent);
        if free > 0 {
            self.lent += free;
            gate.lend(free);
        }
    }

    /// Give the app the core's messages at once while nothing of the task's comes before
    /// them; anything else (and whatever follows it) is left for the task.
    fn deliver(&mut self, events: &mpsc::Sender<Event>, peer: PeerId) {
        while self.quiet() {
            let Some(event) = self.core.poll_event() else {
                return;
            };
            match event {
                CoreEvent::Deliver {
                    lane,
                    data,
                    reliability,
                } if lane.0 != crate::protocol::FILE_LANE => {
                    self.outbox.push_back(Event::Message {
                        lane: lane.0,
                        from: peer,
                        data,
                        reliability,
                    });
                    self.flush_outbox(events);
                }
                other => self.core_events.push_back(other),
            }
        }
    }

    /// Move the outbox's events into the app's queue, in order, while it has room. Returns
    /// whether the outbox is empty.
    pub(super) fn flush_outbox(&mut self, events: &mpsc::Sender<Event>) -> bool {
        while let Some(event) = self.outbox.pop_front() {
            match events.try_send(event) {
                // The app dropped its event stream: nobody is listening any more.
                Ok(()) | Err(TrySendError::Closed(_)) => {}
                Err(TrySendError::Full(event)) => {
                    self.outbox.push_front(event);
                    return false;
                }
            }
        }
        true
    }

    /// Whether the task has to run after a hot path's step.
    fn task_needed(&self) -> bool {
        if self.watch
            || !self.quiet()
            || self.core.has_event()
            || !self.relay_out.is_empty()
            || !self.pending_tx.is_empty()
        {
            return true;
        }
        match (self.next_timer(), self.armed) {
            (Some(t), Some(armed)) => t < armed,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// What the handles read of the link.
    pub(super) fn view(&self) -> LinkView {
        let c = self.core.stats();
        let direct = matches!(self.path, Path::Direct { .. });
        LinkView {
            status: LinkStatus {
                path: self.path,
                pair: self.pair.filter(|_| direct),
                rtt: self.core.rtt(),
            },
            stats: LinkStats {
                sent_server: c.sent_server,
                sent_direct: c.sent_direct,
                recv_server: c.recv_server,
                recv_direct: c.recv_direct,
                resent: c.resent,
                duplicates: c.duplicates,
                path_changes: c.path_changes,
                unreliable_incomplete: c.unreliable_incomplete,
                unreliable_dropped: c.unreliable_dropped,
                candidates_host: self.candidates[0],
                candidates_srflx: self.candidates[1],
                candidates_relay: self.candidates[2],
            },
            drained: self.core.drained(),
            peer_files: self.core.peer_files(),
            closed: self.closed,
        }
    }
}

/// What the link task, its handles, its read loops and its writers share.
pub(super) struct Shared {
    hot: Mutex<Hot>,
    pub gate: Gate,
    /// Wakes the link task (a hot path left it something to do).
    pub wake: Notify,
    pub view: watch::Sender<LinkView>,
    /// The client's event queue.
    events: mpsc::Sender<Event>,
    peer: PeerId,
}

impl Shared {
    pub(super) fn new(hot: Hot, gate: Gate, events: mpsc::Sender<Event>, peer: PeerId) -> Self {
        let (view, _) = watch::channel(hot.view());
        Shared {
            hot: Mutex::new(hot),
            gate,
            wake: Notify::new(),
            view,
            events,
            peer,
        }
    }

    /// The link's view as it is now.
    pub(super) fn view_now(&self) -> LinkView {
        self.lock().view()
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Hot> {
        self.hot.lock().unwrap_or_else(|poisoned| {
            // A panic under the lock may have left the state half-updated: rather than go on
            // with it (and maybe lose or repeat a message), the link ends. The hot paths take
            // nothing more, and the task stops at its next turn.
            let mut h = poisoned.into_inner();
            if !h.closed {
                tracing::error!(peer = %self.peer, "a panic under the link's lock: the link ends");
                h.closed = true;
                self.wake.notify_one();
            }
            h
        })
    }

    /// The end of every hot path's step: lend freed window, publish, wake the task if it has
    /// something to do.
    fn after(&self, h: &mut Hot) {
        h.lend(&self.gate);
        // The handles read the rest of the view under the lock (`Shared::view_now`); only a
        // change some handle may be waiting for is published here.
        if h.core.peer_files() != self.view.borrow().peer_files {
            self.view.send_replace(h.view());
        }
        if h.task_needed() {
            self.wake.notify_one();
        }
    }

    /// A frame from a data channel of generation `gen`, taken here if nothing comes before it;
    /// otherwise given back, to queue for the task (counted in [`Hot::slow_frames`]).
    pub(super) fn fast_frame(&self, gen: u32, frame: Bytes) -> Option<Bytes> {
        let mut h = self.lock();
        if h.closed {
            return None;
        }
        if h.slow_frames > 0 || !h.quiet() || h.core.has_event() {
            h.slow_frames += 1;
            return Some(frame);
        }
        let now = Instant::now();
        h.core.handle_frame(PathId::Direct(Gen(gen)), frame, now);
        h.deliver(&self.events, self.peer);
        h.pump(now, true);
        self.after(&mut h);
        None
    }

    /// A send whose window cost `permits` was claimed from the gate: the core takes it now.
    /// `Ok(None)` when its frames (and every app frame before them) are on their channels, or
    /// nobody waits for that (`answer` false: `try_send`); otherwise where the answer comes
    /// once they are.
    pub(super) fn fast_send(
        &self,
        lane: Lane,
        data: Bytes,
        delivery: Delivery,
        permits: usize,
        answer: bool,
    ) -> Result<Option<oneshot::Receiver<Result<(), SendError>>>, SendError> {
        let mut h = self.lock();
        h.lent -= permits;
        if h.closed {
            return Err(SendError::Ended);
        }
        let r = h.core.send_on(lane, data, delivery);
        debug_assert!(r != Err(SendError::WouldBlock), "a claim had no room");
        h.pump(Instant::now(), true);
        let answer = match r {
            Err(e) => Err(e),
            Ok(()) if !answer => Ok(None),
            Ok(()) if !h.relay_out.is_empty() || !h.pending_tx.is_empty() => {
                // Frames the task hands on: it answers once it has.
                let (tx, rx) = oneshot::channel();
                h.late_answers.push(tx);
                Ok(Some(rx))
            }
            Ok(()) if h.writing.is_empty() => Ok(None),
            Ok(()) => {
                let (tx, rx) = oneshot::channel();
                let upto = h.next_write;
                h.answering.push_back((upto, tx, Ok(())));
                Ok(Some(rx))
            }
        };
        self.after(&mut h);
        answer
    }

    /// A writer of generation `gen` handed frame `(id, len, failed)` to channel `ch` (or,
    /// without a frame, saw its queue drain), which now has `buffered` bytes queued.
    fn written(&self, gen: Gen, ch: Channel, frame: Option<Written>, buffered: usize) {
        let mut h = self.lock();
        let now = Instant::now();
        let i = ch_index(ch);
        if let Some(Written { id, len, failed }) = frame {
            h.own_waits.retain(|w| w.0 != id);
            h.writing.remove(&id);
            if let Some(w) = h.writers.as_mut().filter(|w| w.gen == gen) {
                w.queued[i] -= len;
            }
            if let Some((t, why)) = failed {
                h.core.transmit_failed(t, &why, now);
            }
        }
        if let Some(w) = h.writers.as_mut().filter(|w| w.gen == gen) {
            let estimate = w.set_buffered(i, buffered);
            h.core.direct_buffered(gen, estimate);
        }
        h.answer();
        if !h.closed {
            h.pump(now, true);
        }
        self.after(&mut h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::core::{default_lanes, CoreConfig, LinkVersion, FILE_LANE_DEFAULT};
    use std::sync::Arc;

    fn shared() -> (Arc<Shared>, mpsc::Receiver<Event>) {
        let cfg = CoreConfig {
            window: 1 << 20,
            max_message: 1 << 19,
            dead_path: Duration::from_secs(3),
            version: LinkVersion(2),
            lanes: default_lanes(),
            file_lane: FILE_LANE_DEFAULT,
        };
        let (events, rx) = mpsc::channel(16);
        let hot = Hot::new(LinkCore::new(cfg, Instant::now()), 0);
        (Arc::new(Shared::new(hot, Gate::new(0), events, 7)), rx)
    }

    /// A panic under the lock may leave the state half-updated: the link ends instead of going
    /// on with it. A send is refused, and the task is woken to stop.
    #[tokio::test]
    async fn a_panic_under_the_lock_ends_the_link() {
        let (shared, _events) = shared();
        assert!(!shared.lock().closed);
        let s = shared.clone();
        let panicked = std::thread::spawn(move || {
            let _h = s.lock();
            panic!("a bug under the lock (this panic is the test)");
        })
        .join();
        assert!(panicked.is_err());
        assert!(shared.lock().closed, "the link goes on after a panic");
        tokio::time::timeout(Duration::from_secs(1), shared.wake.notified())
            .await
            .expect("the link task is not woken to stop");
        let sent = shared.fast_send(
            Lane(0),
            Bytes::from_static(b"x"),
            Delivery::Reliable,
            0,
            true,
        );
        assert!(matches!(sent, Err(SendError::Ended)), "{sent:?}");
    }
}
