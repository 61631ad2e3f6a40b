//! One WebSocket session: a reader loop (this task) and a writer task.
//!
//! What a client may cost is bounded here: a deadline and a frame/byte budget before `hello`,
//! token-bucket rate limits per session (requests, signals, joins refused with `rate_limited`;
//! relay bytes paced by reading no further), bounded queues towards the client (see `hub.rs`),
//! and close codes for WebSocket protocol violations (1002, 1007).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt as _, SinkExt, StreamExt};
use peermesh::protocol::{
    validate_name, DirectPolicy, ErrorCode, PeerId, RelayFrame, ServerMsg, PROTOCOL_VERSION,
};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

use crate::hub::{
    encode, CloseReason, Failure, Outbound, Outlet, OutletState, FRAME_OVERHEAD, TOO_SLOW,
};
use crate::metrics::SlowQueue;
use crate::request::{self, BadRequest, Request};
use crate::{Rate, Shared, HARD_FRAME_CAP, RELAY_STALL_TIMEOUT};

/// Close codes used by the server.
use peermesh::protocol::close_code::{
    GOING_AWAY as CLOSE_GOING_AWAY, INVALID_PAYLOAD as CLOSE_INVALID_PAYLOAD,
    POLICY_VIOLATION as CLOSE_POLICY, PROTOCOL_ERROR as CLOSE_PROTOCOL, TOO_BIG as CLOSE_TOO_BIG,
};

/// Close reason when the server stops: 1012 (Service Restart) tells clients to reconnect (to
/// this address once the server is back, or another instance behind it) with a new session.
const SHUTTING_DOWN: CloseReason = (
    peermesh::protocol::close_code::SERVICE_RESTART,
    "server restarting",
);

/// How long the writer may take to flush queued frames and the close frame when a session ends.
const WRITER_GRACE: Duration = Duration::from_secs(2);
/// How long an expired heartbeat deadline still waits for a frame that may already be in the
/// socket (see the deadline branch of [`run`]).
const STALL_GRACE: Duration = Duration::from_millis(200);
/// Most frames written before one flush.
const WRITE_BATCH: usize = 64;

/// Why the reader loop ended.
enum Exit {
    /// The client closed or the TCP connection ended.
    ClientGone,
    /// The writer task ended (write error, or the session was killed as too slow).
    WriterGone,
    /// The server closes the session with this code.
    Close(CloseReason),
    /// A frame above the hard cap: close with 1009 without reading any further.
    TooBig,
}

/// What handling one frame asks for.
enum Flow {
    Continue,
    Close(CloseReason),
    /// A relay frame or `signal` waiting for the receiver's budget.
    Forward(PendingForward),
}

struct PendingForward {
    /// `"relay"` or `"signal"`, for error frames.
    request: &'static str,
    to: PeerId,
    link: u32,
    outlet: Outlet,
    msg: Message,
    permits: usize,
}

/// A token bucket (see [`Rate`]). Tokens may go into debt (`take_paced`), which is paid back
/// over time before more is accepted.
struct Bucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: Rate) -> Self {
        Bucket {
            rate,
            tokens: rate.burst.max(1) as f64,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate.per_second as f64)
            .min(self.rate.burst.max(1) as f64);
    }

    /// Take one token if there is one.
    fn try_take(&mut self) -> bool {
        if self.rate.per_second == 0 {
            return true;
        }
        self.refill(Instant::now());
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Take `n` tokens, going into debt if needed; returns how long to wait until the debt is
    /// paid.
    fn take_paced(&mut self, n: usize) -> Option<Duration> {
        if self.rate.per_second == 0 {
            return None;
        }
        self.refill(Instant::now());
        self.tokens -= n as f64;
        (self.tokens < 0.0)
            .then(|| Duration::from_secs_f64(-self.tokens / self.rate.per_second as f64))
    }
}

/// The rate limits that refuse frames (relay bytes are paced instead).
#[derive(Clone, Copy)]
enum Limit {
    Requests,
    Signals,
    Joins,
}

struct Session {
    shared: Arc<Shared>,
    outlet: Outlet,
    peer: Option<PeerId>,
    /// Host (no port) from the HTTP `Host` header, for TURN URLs that follow it.
    host: Option<String>,
    /// The connection's source address (TURN credentials name it).
    client_ip: Option<IpAddr>,
    /// Frames and bytes received before `hello` was accepted.
    hello_frames: u32,
    hello_bytes: usize,
    requests: Bucket,
    signals: Bucket,
    joins: Bucket,
    relay: Bucket,
    /// Stop reading until then (relay rate limit).
    pause: Option<Duration>,
    /// Relay and signal counts not yet added to the shared metrics.
    tally: Tally,
    /// Error answers (see [`REFUSALS`]).
    refusals: Bucket,
    last_refusal_notice: Option<Instant>,
    /// Refused frames, answered or not (see [`ABUSE`]).
    abuse: Bucket,
    /// Over [`ABUSE`]: the session is closed with 1008.
    abusive: bool,
    /// Groups the session's token lets it join (`None`: the server is open).
    allowed_groups: Option<Vec<String>>,
    /// The session's user id (token `sub`), once it said hello on a server with tokens.
    user: Option<String>,
    /// The client sent a close frame.
    client_closed: bool,
}

/// Refused frames (answered or not) one session may send: past this rate the session is closed
/// with 1008 `too many refused frames`. No well-behaved client gets there; frames in flight to
/// a peer that has just left are bounded by the sender's socket buffer.
const ABUSE: Rate = Rate {
    per_second: 200,
    burst: 5000,
};

/// Error answers one session gets at most: a client that keeps sending refused frames (to a
/// peer that is not a co-member, malformed, over a rate limit, ...) is answered up to this rate,
/// then once a second. Generous, so that ordinary races (frames in flight to a peer that just
/// left) are always answered.
const REFUSALS: Rate = Rate {
    per_second: 100,
    burst: 1000,
};

/// Longest error message sent (messages may quote what the client sent).
const MAX_ERROR_MESSAGE: usize = 200;

/// Counts kept per session and added to the shared metrics in batches (every
/// [`TALLY_BATCH`] frames or [`TALLY_DELAY`] after the first): shared counters updated from
/// both cores on every relay frame cost measurable throughput.
#[derive(Default)]
struct Tally {
    frames_in: u64,
    bytes_in: u64,
    frames_out: u64,
    bytes_out: u64,
    signals: u64,
}

const TALLY_BATCH: u64 = 64;
const TALLY_DELAY: Duration = Duration::from_millis(100);

impl Tally {
    fn is_empty(&self) -> bool {
        self.frames_in + self.frames_out + self.signals == 0
    }

    fn full(&self) -> bool {
        self.frames_in + self.frames_out + self.signals >= TALLY_BATCH
    }

    /// Add the counts to the shared metrics and start again.
    fn flush(&mut self, m: &crate::metrics::Metrics) {
        let t = std::mem::take(self);
        if t.frames_in > 0 {
            m.relay_frames_in.inc_by(t.frames_in);
            m.relay_bytes_in.inc_by(t.bytes_in);
        }
        if t.frames_out > 0 {
            m.relay_frames_out.inc_by(t.frames_out);
            m.relay_bytes_out.inc_by(t.bytes_out);
        }
        if t.signals > 0 {
            m.signals.inc_by(t.signals);
        }
    }
}

/// Serve one upgraded WebSocket until it ends.
pub(crate) async fn run(
    socket: WebSocket,
    shared: Arc<Shared>,
    host: Option<String>,
    client_ip: Option<IpAddr>,
) {
    let limits = shared.config.server_limits.clone();
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Semaphore::new(limits.relay_queue_bytes));
    let (kill_tx, kill_rx) = oneshot::channel();
    let state = OutletState::new(limits.outbound_queue_bytes, kill_tx, shared.metrics.clone());
    let mut writer = tokio::spawn(write_loop(sink, rx, budget.clone(), state.clone(), kill_rx));
    let mut shutdown = shared.shutdown.clone();
    let heartbeat_timeout = shared.config.heartbeat_timeout;

    let mut session = Session {
        shared,
        outlet: Outlet { tx, budget, state },
        peer: None,
        host,
        client_ip,
        hello_frames: 0,
        hello_bytes: 0,
        requests: Bucket::new(limits.requests),
        signals: Bucket::new(limits.signals),
        joins: Bucket::new(limits.joins),
        relay: Bucket::new(limits.relay_bytes),
        pause: None,
        tally: Tally::default(),
        refusals: Bucket::new(REFUSALS),
        last_refusal_notice: None,
        abuse: Bucket::new(ABUSE),
        abusive: false,
        allowed_groups: None,
        user: None,
        client_closed: false,
    };
    let tally_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(tally_timer);
    let mut tally_armed = false;
    let mut handled: u32 = 0;
    // Fresh TURN credentials before the old ones expire.
    let refresh_every = session.shared.ice.refresh_every();
    let mut refresh = tokio::time::interval(refresh_every.unwrap_or(Duration::from_secs(3600)));
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await;

    let deadline = tokio::time::sleep_until(Instant::now() + heartbeat_timeout);
    tokio::pin!(deadline);
    let hello_deadline = tokio::time::sleep(limits.hello_timeout);
    tokio::pin!(hello_deadline);

    let exit = 'session: loop {
        let next = tokio::select! {
            biased;
            // (The `Ref` that `wait_for` returns must not live across the awaits below.)
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
                break 'session Exit::Close(SHUTTING_DOWN);
            }
            _ = &mut writer => break 'session Exit::WriterGone,
            () = &mut hello_deadline, if session.peer.is_none() => {
                break 'session Exit::Close((CLOSE_POLICY, "hello timeout"));
            }
            msg = stream.next() => Some(msg),
            () = &mut deadline => {
                // Liveness counts frames read, not time: a frame already waiting in the socket
                // (say the server process was stalled) is read now and counts. After a stall
                // the runtime may fire expired timers before it has polled the sockets, so
                // give the I/O driver a turn and the socket a moment first.
                tokio::task::yield_now().await;
                match timeout(STALL_GRACE, stream.next()).await {
                    Ok(msg) => Some(msg),
                    Err(_) => {
                        tracing::debug!(peer = ?session.peer, "heartbeat timeout");
                        break 'session Exit::Close((CLOSE_GOING_AWAY, "heartbeat timeout"));
                    }
                }
            }
            () = &mut tally_timer, if tally_armed => {
                tally_armed = false;
                session.tally.flush(&session.shared.metrics);
                None
            }
            _ = refresh.tick(), if refresh_every.is_some() => {
                session.send_ice_servers();
                None
            }
        };
        let flow = match next {
            None => Flow::Continue,
            Some(msg) => {
                deadline.as_mut().reset(Instant::now() + heartbeat_timeout);
                match session.on_message(msg) {
                    Ok(flow) => flow,
                    Err(exit) => break 'session exit,
                }
            }
        };
        if session.abusive {
            break 'session Exit::Close((CLOSE_POLICY, "too many refused frames"));
        }
        match flow {
            Flow::Continue => {}
            Flow::Close(reason) => break 'session Exit::Close(reason),
            Flow::Forward(pending) => {
                let PendingForward {
                    request,
                    to,
                    link,
                    outlet,
                    msg,
                    permits,
                } = pending;
                // Wait (without any lock) until the receiver has room; this stops reading from
                // this client, which back-pressures it through TCP.
                let acquired = tokio::select! {
                    r = timeout(
                        RELAY_STALL_TIMEOUT,
                        outlet.budget.clone().acquire_many_owned(permits_u32(permits)),
                    ) => r,
                    _ = shutdown.wait_for(|stop| *stop) => {
                        break 'session Exit::Close(SHUTTING_DOWN);
                    }
                    _ = &mut writer => break 'session Exit::WriterGone,
                };
                // Time spent blocked on the receiver is not the sender's silence.
                deadline.as_mut().reset(Instant::now() + heartbeat_timeout);
                let Some(me) = session.peer else { continue };
                match acquired {
                    Ok(Ok(permit)) => {
                        permit.forget();
                        let bytes = match &msg {
                            Message::Binary(b) => Some(b.len()),
                            _ => None,
                        };
                        match session.shared.hub.forward_deliver(
                            me,
                            to,
                            link,
                            &outlet.budget,
                            msg,
                            permits,
                        ) {
                            Ok(()) => {
                                let t = &mut session.tally;
                                match bytes {
                                    Some(n) => {
                                        t.frames_out += 1;
                                        t.bytes_out += n as u64;
                                    }
                                    None => t.signals += 1,
                                }
                            }
                            Err(failure) => session.reply_error(failure, Some(request)),
                        }
                    }
                    // The receiver is gone; its co-members (including us) hear `member_left`.
                    Ok(Err(_closed)) => {}
                    Err(_elapsed) => session.shared.hub.kill_slow(to, &outlet.budget),
                }
            }
        }
        if session.tally.full() {
            session.tally.flush(&session.shared.metrics);
            tally_armed = false;
        } else if !tally_armed && !session.tally.is_empty() {
            tally_timer.as_mut().reset(Instant::now() + TALLY_DELAY);
            tally_armed = true;
        }
        // A client that keeps the socket always readable would starve the timer branches
        // above (the socket comes first): look at the credential refresh now and then. (The
        // metrics tally flushes itself every `TALLY_BATCH` frames.)
        handled = handled.wrapping_add(1);
        if handled.is_multiple_of(256)
            && refresh_every.is_some()
            && refresh.tick().now_or_never().is_some()
        {
            session.send_ice_servers();
        }
        // Over the relay rate: read nothing more until the debt is paid (TCP back-pressure).
        if let Some(pause) = session.pause.take() {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = shutdown.wait_for(|stop| *stop) => {
                    break 'session Exit::Close(SHUTTING_DOWN);
                }
                _ = &mut writer => break 'session Exit::WriterGone,
            }
            deadline.as_mut().reset(Instant::now() + heartbeat_timeout);
        }
    };

    session.tally.flush(&session.shared.metrics);
    // A write failed because the client is gone: its close frame may still wait in the socket
    // (a client that closes and exits at once, while we were writing to it).
    if matches!(exit, Exit::WriterGone) && !session.client_closed {
        session.client_closed = close_frame_waiting(&mut stream);
    }
    // Tell co-members first, then close the socket.
    if let Some(peer) = session.peer {
        let reason = match &exit {
            Exit::Close(SHUTTING_DOWN) => "shutdown",
            Exit::Close((CLOSE_GOING_AWAY, _)) => "heartbeat timeout",
            Exit::Close(_) | Exit::TooBig => "protocol violation",
            Exit::ClientGone | Exit::WriterGone => "closed",
        };
        // The connection was lost (not closed by either side on purpose): a resumable session
        // waits for its client to come back.
        let lost = match &exit {
            Exit::ClientGone => !session.client_closed,
            Exit::WriterGone => {
                !session.client_closed && session.outlet.state.killed_with().is_none()
            }
            Exit::Close((CLOSE_GOING_AWAY, "heartbeat timeout")) => true,
            Exit::Close(_) | Exit::TooBig => false,
        };
        let budget = session.outlet.budget.clone();
        if !(lost && session.shared.hub.suspend(peer, &budget)) {
            session.shared.hub.unregister(peer, &budget, reason);
        }
        tracing::debug!(peer, "session ended");
    }
    session.outlet.budget.close();
    let Session { outlet, shared, .. } = session;
    let Outlet { tx, state, .. } = outlet;
    let close_code = match &exit {
        Exit::WriterGone => state.killed_with(),
        Exit::ClientGone => None,
        Exit::Close((code, _)) => Some(*code),
        Exit::TooBig => Some(CLOSE_TOO_BIG),
    };
    shared.metrics.closed(close_code);
    match exit {
        Exit::WriterGone => {}
        Exit::ClientGone => {
            drop(tx);
            finish_writer(writer).await;
        }
        Exit::Close(reason) => {
            let _ = tx.send(Outbound::Close(reason));
            drop(tx);
            finish_writer(writer).await;
            // Give the client a moment to answer the close frame (clean close handshake).
            drain(&mut stream, Duration::from_secs(1)).await;
        }
        Exit::TooBig => {
            let _ = tx.send(Outbound::Close((CLOSE_TOO_BIG, "frame too large")));
            drop(tx);
            finish_writer(writer).await;
            // The rest of the oversized frame is still unread; dropping the socket right away
            // could reset the connection before the client sees the close frame.
            let mut shutdown = shutdown.clone();
            let _ = timeout(Duration::from_millis(500), shutdown.wait_for(|s| *s)).await;
        }
    }
}

/// Read and discard what the client still sends, for up to `limit` (bounded in frames too).
async fn drain(stream: &mut SplitStream<WebSocket>, limit: Duration) {
    let _ = timeout(limit, async {
        let mut frames = 0;
        while let Some(Ok(_)) = stream.next().await {
            frames += 1;
            if frames > 64 {
                break;
            }
        }
    })
    .await;
}

async fn finish_writer(mut writer: JoinHandle<()>) {
    if timeout(WRITER_GRACE, &mut writer).await.is_err() {
        writer.abort();
    }
}

fn message_len(msg: &Message) -> usize {
    match msg {
        Message::Text(t) => t.len(),
        Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Close(c) => c.as_ref().map_or(0, |c| 2 + c.reason.len()),
    }
}

fn permits_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Whether a close frame is among the frames already readable (without waiting).
fn close_frame_waiting(stream: &mut SplitStream<WebSocket>) -> bool {
    for _ in 0..64 {
        match stream.next().now_or_never() {
            Some(Some(Ok(Message::Close(_)))) => return true,
            Some(Some(Ok(_))) => {}
            _ => return false,
        }
    }
    false
}

/// How a failed read ends the session: frames above the hard cap close with 1009, WebSocket
/// protocol violations with 1002, invalid UTF-8 in a text frame with 1007; anything else
/// means the client is gone.
fn read_error_exit(e: axum::Error) -> Exit {
    use tungstenite::error::ProtocolError;
    match e.into_inner().downcast::<tungstenite::Error>().map(|b| *b) {
        Ok(tungstenite::Error::Capacity(_)) => Exit::TooBig,
        Ok(tungstenite::Error::Utf8(_)) => Exit::Close((CLOSE_INVALID_PAYLOAD, "invalid UTF-8")),
        Ok(tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
            Exit::ClientGone
        }
        Ok(tungstenite::Error::Protocol(p)) => {
            tracing::debug!("WebSocket protocol violation: {p}");
            Exit::Close((CLOSE_PROTOCOL, "protocol error"))
        }
        _ => Exit::ClientGone,
    }
}

impl Session {
    fn send(&self, msg: &ServerMsg) {
        if let Some(text) = encode(msg) {
            self.outlet.send_text(text);
        }
    }

    /// Fresh TURN credentials (`ice_servers`).
    fn send_ice_servers(&self) {
        if let Some(peer) = self.peer {
            let ice_servers = self.shared.ice.for_peer(
                peer,
                self.user.as_deref(),
                self.host.as_deref(),
                self.client_ip,
            );
            self.send(&ServerMsg::IceServers { ice_servers });
        }
    }

    fn reply_error(&mut self, mut failure: Failure, request: Option<&str>) {
        if let Some(peer) = self.peer {
            tracing::debug!(peer, code = %failure.code, request, "{}", failure.message);
        }
        self.shared.metrics.frame_refused(failure.code);
        // A client whose frames keep being refused gets a bounded number of answers: past the
        // refusal rate, one `rate_limited` a second says so and the rest go unanswered.
        if !self.abuse.try_take() {
            self.abusive = true;
            return;
        }
        if !self.refusals.try_take() {
            let now = Instant::now();
            if self
                .last_refusal_notice
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
            {
                return;
            }
            self.last_refusal_notice = Some(now);
            failure = Failure::new(
                ErrorCode::RateLimited,
                format!(
                    "over {} refused frames per second (burst {}); further refused frames get \
                     no answer for a second",
                    REFUSALS.per_second, REFUSALS.burst
                ),
            );
        }
        // Error messages may quote the input: keep them short.
        if failure.message.len() > MAX_ERROR_MESSAGE {
            let mut end = MAX_ERROR_MESSAGE;
            while !failure.message.is_char_boundary(end) {
                end -= 1;
            }
            failure.message.truncate(end);
            failure.message.push('…');
        }
        self.send(&failure.into_msg(request));
    }

    /// One read from the WebSocket.
    fn on_message(&mut self, msg: Option<Result<Message, axum::Error>>) -> Result<Flow, Exit> {
        let msg = match msg {
            None => return Err(Exit::ClientGone),
            Some(Err(e)) => return Err(read_error_exit(e)),
            Some(Ok(msg)) => msg,
        };
        if self.peer.is_none() {
            // Before `hello`: a small budget of frames and bytes, then the connection is closed.
            let limits = &self.shared.config.server_limits;
            self.hello_frames += 1;
            self.hello_bytes += message_len(&msg);
            if self.hello_frames > limits.hello_max_frames
                || self.hello_bytes > limits.hello_max_bytes
            {
                return Ok(Flow::Close((CLOSE_POLICY, "hello required")));
            }
        }
        Ok(match msg {
            Message::Text(text) => self.on_text(&text),
            Message::Binary(data) => self.on_binary(data),
            // Pings are answered by the WebSocket layer; both count as liveness. After a close
            // frame the next read returns `None` once the reply is flushed.
            Message::Close(_) => {
                self.client_closed = true;
                Flow::Continue
            }
            Message::Ping(_) | Message::Pong(_) => Flow::Continue,
        })
    }

    /// Take a token from `bucket` (one of the session's rate limits) or answer `rate_limited`.
    fn admit(&mut self, which: Limit, request: Option<&str>) -> bool {
        let bucket = match which {
            Limit::Requests => &mut self.requests,
            Limit::Signals => &mut self.signals,
            Limit::Joins => &mut self.joins,
        };
        if bucket.try_take() {
            return true;
        }
        let rate = bucket.rate;
        let what = match which {
            Limit::Requests => "requests",
            Limit::Signals => "signals",
            Limit::Joins => "joins",
        };
        self.error(
            ErrorCode::RateLimited,
            &format!(
                "over {} {what} per second (burst {}); this frame was not handled",
                rate.per_second, rate.burst
            ),
            request,
        );
        false
    }

    fn error(&mut self, code: ErrorCode, message: &str, request: Option<&str>) {
        self.reply_error(Failure::new(code, message), request);
    }

    fn on_text(&mut self, text: &Utf8Bytes) -> Flow {
        let max = self.shared.config.limits.max_frame_bytes;
        if text.len() > max {
            self.error(
                ErrorCode::FrameTooLarge,
                &format!("text frame of {} bytes exceeds {max}", text.len()),
                None,
            );
            return Flow::Continue;
        }
        let msg = match request::parse(text.as_str()) {
            Ok(msg) => msg,
            Err(bad) => {
                if self.admit(Limit::Requests, None) {
                    self.bad_text(bad);
                }
                return Flow::Continue;
            }
        };
        let kind = msg.kind();
        let admitted = match &msg {
            Request::Signal { .. } => self.admit(Limit::Signals, Some(kind)),
            Request::Join { .. } => {
                self.admit(Limit::Requests, Some(kind)) && self.admit(Limit::Joins, Some(kind))
            }
            _ => self.admit(Limit::Requests, Some(kind)),
        };
        if !admitted {
            return Flow::Continue;
        }
        let me = match (&msg, self.peer) {
            (Request::Hello(hello), None) => return self.on_hello(hello),
            (Request::Hello(_), Some(_)) => {
                self.error(ErrorCode::BadFrame, "already said hello", Some(kind));
                return Flow::Continue;
            }
            (_, None) => {
                self.error(
                    ErrorCode::HelloRequired,
                    "the first frame must be hello",
                    Some(kind),
                );
                return Flow::Continue;
            }
            (_, Some(me)) => me,
        };
        let shared = &self.shared;
        let result = match msg {
            Request::Hello(_) => Ok(()),
            Request::Join { group } => match &self.allowed_groups {
                Some(allowed) if !allowed.contains(&group) => Err(Failure::new(
                    ErrorCode::Forbidden,
                    "your token does not allow joining this group",
                )
                .in_group(&group)),
                _ => shared.hub.join(me, &group),
            },
            Request::Leave { group } => shared.hub.leave(me, &group),
            Request::Signal { to, link, data } => return self.on_signal(me, to, link, data),
            Request::Ping { id } => {
                self.send(&ServerMsg::Pong { id });
                Ok(())
            }
            Request::Ack { group, change } => {
                shared.hub.ack(me, &group, change);
                Ok(())
            }
            Request::Path {
                peer,
                link,
                path,
                local,
                remote,
            } => shared.hub.path(me, peer, link, path, local, remote),
            Request::Drained => {
                shared.hub.drained(me);
                Ok(())
            }
        };
        if let Err(failure) = result {
            self.reply_error(failure, Some(kind));
        }
        Flow::Continue
    }

    /// `signal`: forwarded like relay data (it comes from a peer, so it counts against the
    /// receiver's budget rather than growing its queue without bound).
    fn on_signal(&mut self, me: PeerId, to: PeerId, link: u32, data: &RawValue) -> Flow {
        let (outlet, direct) = match self.shared.hub.forward_target(me, to, link, true) {
            Ok(found) => found,
            Err(failure) => {
                self.reply_error(failure, Some("signal"));
                return Flow::Continue;
            }
        };
        let text = if direct == DirectPolicy::Relay {
            // Whatever the client does, a relay pair never gets an address but the relays'.
            let Some(redacted) = request::relay_only(data) else {
                tracing::debug!(peer = me, to, "not forwarding a non-relay candidate");
                return Flow::Continue;
            };
            let data: Box<RawValue> = match RawValue::from_string(redacted) {
                Ok(d) => d,
                Err(_) => return Flow::Continue,
            };
            Utf8Bytes::from(request::forwarded_signal(me, link, &data))
        } else {
            Utf8Bytes::from(request::forwarded_signal(me, link, data))
        };
        let permits =
            (text.len() + FRAME_OVERHEAD).min(self.shared.config.server_limits.relay_queue_bytes);
        Flow::Forward(PendingForward {
            request: "signal",
            to,
            link,
            outlet,
            msg: Message::Text(text),
            permits,
        })
    }

    /// Answer a frame that was not understood: malformed JSON or fields (`bad_frame`), or a
    /// well-formed frame of an unknown type (`unknown_type`).
    fn bad_text(&mut self, bad: BadRequest) {
        match bad {
            BadRequest::InvalidJson(e) => {
                self.error(ErrorCode::BadFrame, &format!("invalid JSON: {e}"), None)
            }
            BadRequest::BadFrame { kind, error } => {
                self.error(ErrorCode::BadFrame, &format!("bad frame: {error}"), kind)
            }
            BadRequest::UnknownType(kind) => self.error(
                ErrorCode::UnknownType,
                &format!("unknown frame type {kind:?}"),
                Some(&kind),
            ),
        }
    }

    fn on_hello(&mut self, hello: &request::Hello) -> Flow {
        let request::Hello {
            version,
            ref name,
            ref token,
            direct,
            resumable,
            ref resume,
        } = *hello;
        let token = token.as_deref();
        if version != PROTOCOL_VERSION {
            self.error(
                ErrorCode::UnsupportedVersion,
                &format!("this server speaks protocol version {PROTOCOL_VERSION}, not {version}"),
                Some("hello"),
            );
            return Flow::Close((CLOSE_PROTOCOL, "unsupported protocol version"));
        }
        // With an auth secret the token decides who this is; the hello's name is not used.
        let (name, user, direct) = match &self.shared.config.auth {
            crate::Auth::Secret(secret) => match crate::auth::verify_token(secret, token) {
                Ok(claims) => {
                    self.allowed_groups = Some(claims.groups);
                    let limit = claims.direct.unwrap_or_default();
                    (claims.name, Some(claims.sub), direct.max(limit))
                }
                Err(e) => {
                    self.error(ErrorCode::Unauthorized, &e.to_string(), Some("hello"));
                    return Flow::Close((CLOSE_POLICY, "unauthorized"));
                }
            },
            _ => {
                if !validate_name(name) {
                    self.error(
                        ErrorCode::InvalidName,
                        "names are 1-64 bytes of UTF-8 without control, format or invisible \
                         characters",
                        Some("hello"),
                    );
                    return Flow::Continue;
                }
                (name.to_owned(), None, direct)
            }
        };
        let outlet = self.outlet.clone();
        let (ice, host, ip) = (&self.shared.ice, self.host.as_deref(), self.client_ip);
        let peer = match resume {
            Some(r) => {
                let resumed = self.shared.hub.resume(
                    &self.shared.config,
                    |peer| ice.for_peer(peer, user.as_deref(), host, ip),
                    r.peer,
                    &r.token,
                    user.as_deref(),
                    outlet,
                );
                if let Err(failure) = resumed {
                    // The client may start a new session with a plain hello.
                    self.reply_error(failure, Some("hello"));
                    return Flow::Continue;
                }
                tracing::info!(peer = r.peer, user, "session resumed");
                r.peer
            }
            None => {
                let peer = self.shared.hub.register(
                    &self.shared.config,
                    |peer| ice.for_peer(peer, user.as_deref(), host, ip),
                    crate::hub::NewSession {
                        name: name.clone(),
                        user: user.clone(),
                        direct,
                        resumable,
                        ip: self.client_ip.map(crate::turn::quota_ip),
                    },
                    outlet,
                );
                tracing::info!(peer, name, user, "client said hello");
                peer
            }
        };
        self.user = user;
        self.peer = Some(peer);
        Flow::Continue
    }

    fn on_binary(&mut self, data: Bytes) -> Flow {
        const REQUEST: Option<&str> = Some("relay");
        let max = self.shared.config.limits.max_frame_bytes;
        if data.len() > max {
            self.error(
                ErrorCode::FrameTooLarge,
                &format!("binary frame of {} bytes exceeds {max}", data.len()),
                REQUEST,
            );
            return Flow::Continue;
        }
        let (to, link) = match RelayFrame::decode(&data) {
            Ok(f) => (f.peer, f.link),
            Err(e) => {
                self.error(ErrorCode::BadFrame, &e.to_string(), REQUEST);
                return Flow::Continue;
            }
        };
        let Some(me) = self.peer else {
            self.error(
                ErrorCode::HelloRequired,
                "the first frame must be hello",
                REQUEST,
            );
            return Flow::Continue;
        };
        self.tally.frames_in += 1;
        self.tally.bytes_in += data.len() as u64;
        let outlet = match self.shared.hub.forward_target(me, to, link, false) {
            Ok((outlet, _)) => outlet,
            Err(failure) => {
                self.reply_error(failure, REQUEST);
                return Flow::Continue;
            }
        };
        // Rewrite the peer field to the sender, in place when the buffer is not shared.
        let mut buf = data
            .try_into_mut()
            .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
        buf[peermesh::protocol::RELAY_PEER_RANGE].copy_from_slice(&me.to_be_bytes());
        let permits =
            (buf.len() + FRAME_OVERHEAD).min(self.shared.config.server_limits.relay_queue_bytes);
        self.pause = self.relay.take_paced(buf.len());
        Flow::Forward(PendingForward {
            request: "relay",
            to,
            link,
            outlet,
            msg: Message::Binary(buf.freeze()),
            permits,
        })
    }
}

/// Write queued frames to the socket until the queue closes, a close is requested or the
/// session is killed.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    budget: Arc<Semaphore>,
    state: Arc<OutletState>,
    kill: oneshot::Receiver<CloseReason>,
) {
    enum Step {
        Killed(CloseReason),
        Next(Option<Outbound>),
        Wrote(Result<bool, axum::Error>),
        Stalled,
    }
    // Resolves only when the hub kills the session; a dropped sender just means "never".
    let kill = async move {
        match kill.await {
            Ok(reason) => reason,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::pin!(kill);
    loop {
        let step = tokio::select! {
            biased;
            reason = &mut kill => Step::Killed(reason),
            m = rx.recv() => Step::Next(m),
        };
        let first = match step {
            Step::Killed(reason) => return close_now(&mut sink, reason).await,
            Step::Next(Some(m)) => m,
            Step::Next(None) | Step::Wrote(_) | Step::Stalled => {
                let _ = timeout(WRITER_GRACE, sink.close()).await;
                return;
            }
        };
        let step = tokio::select! {
            biased;
            reason = &mut kill => Step::Killed(reason),
            r = timeout(RELAY_STALL_TIMEOUT, write_batch(&mut sink, first, &mut rx, &budget, &state)) => match r {
                Ok(r) => Step::Wrote(r),
                Err(_) => Step::Stalled,
            },
        };
        match step {
            Step::Killed(reason) => return close_now(&mut sink, reason).await,
            // The client has not taken a byte for the stall timeout whatever is queued (replies,
            // relayed frames): it does not read. End the session (its close frame could not be
            // written either).
            Step::Stalled => {
                tracing::info!("dropping client: nothing written for {RELAY_STALL_TIMEOUT:?}");
                state.drop_slow(TOO_SLOW, SlowQueue::Relay);
                return;
            }
            Step::Wrote(Ok(true)) => {}
            Step::Wrote(Ok(false) | Err(_)) | Step::Next(_) => return,
        }
    }
}

/// Write `first` and whatever else is queued (up to a batch), then flush. Returns `Ok(false)`
/// once a close frame was sent.
async fn write_batch(
    sink: &mut SplitSink<WebSocket, Message>,
    first: Outbound,
    rx: &mut mpsc::UnboundedReceiver<Outbound>,
    budget: &Semaphore,
    state: &OutletState,
) -> Result<bool, axum::Error> {
    let mut next = Some(first);
    let mut written = 0;
    while let Some(out) = next.take() {
        match out {
            Outbound::Text(text) => {
                let len = text.len();
                let r = sink.feed(Message::Text(text)).await;
                state.written(len);
                r?;
            }
            Outbound::Forward { msg, permits } => {
                let r = sink.feed(msg).await;
                budget.add_permits(permits);
                r?;
            }
            Outbound::Close(reason) => {
                sink.send(close_message(reason)).await?;
                return Ok(false);
            }
        }
        written += 1;
        if written < WRITE_BATCH {
            next = rx.try_recv().ok();
        }
    }
    sink.flush().await?;
    Ok(true)
}

async fn close_now(sink: &mut SplitSink<WebSocket, Message>, reason: CloseReason) {
    let _ = timeout(Duration::from_secs(1), sink.send(close_message(reason))).await;
}

fn close_message((code, reason): CloseReason) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

// The hard cap must leave room for the largest frame a client may legitimately send.
const _: () = assert!(HARD_FRAME_CAP >= 65536 + 64);
