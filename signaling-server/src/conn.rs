//! One WebSocket session: a reader loop (this task) and a writer task.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::{Bytes, BytesMut};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use peermesh::protocol::{
    validate_name, ClientMsg, ErrorCode, PeerId, RelayFrame, ServerMsg, PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

use crate::hub::{encode, CloseReason, Failure, Outbound, Outlet};
use crate::{Shared, HARD_FRAME_CAP, RELAY_BUDGET_BYTES, RELAY_STALL_TIMEOUT};

/// Close codes used by the server.
use peermesh::protocol::close_code::{
    GOING_AWAY as CLOSE_GOING_AWAY, PROTOCOL_ERROR as CLOSE_PROTOCOL, TOO_BIG as CLOSE_TOO_BIG,
};

/// How long the writer may take to flush queued frames and the close frame when a session ends.
const WRITER_GRACE: Duration = Duration::from_secs(2);
/// Most frames written before one flush.
const WRITE_BATCH: usize = 64;

/// Client frame types known to this server (anything else is `unknown_type`).
const KNOWN_TYPES: [&str; 5] = ["hello", "join", "leave", "signal", "ping"];

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

struct Session {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Outbound>,
    budget: Arc<Semaphore>,
    /// Handed to the hub on a successful `hello`.
    kill: Option<oneshot::Sender<CloseReason>>,
    peer: Option<PeerId>,
    /// Host (no port) from the HTTP `Host` header, for TURN URLs that follow it.
    host: Option<String>,
    /// The connection's source address (TURN credentials name it).
    client_ip: Option<IpAddr>,
}

/// Serve one upgraded WebSocket until it ends.
pub(crate) async fn run(
    socket: WebSocket,
    shared: Arc<Shared>,
    host: Option<String>,
    client_ip: Option<IpAddr>,
) {
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Semaphore::new(RELAY_BUDGET_BYTES));
    let (kill_tx, kill_rx) = oneshot::channel();
    let mut writer = tokio::spawn(write_loop(sink, rx, budget.clone(), kill_rx));
    let mut shutdown = shared.shutdown.clone();
    let heartbeat_timeout = shared.config.heartbeat_timeout;

    let mut session = Session {
        shared,
        tx,
        budget,
        kill: Some(kill_tx),
        peer: None,
        host,
        client_ip,
    };
    // Fresh TURN credentials before the old ones expire.
    let refresh_every = session.shared.ice.refresh_every();
    let mut refresh = tokio::time::interval(refresh_every.unwrap_or(Duration::from_secs(3600)));
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await;

    let deadline = tokio::time::sleep_until(Instant::now() + heartbeat_timeout);
    tokio::pin!(deadline);

    let exit = 'session: loop {
        let flow = tokio::select! {
            msg = stream.next() => {
                deadline.as_mut().reset(Instant::now() + heartbeat_timeout);
                match msg {
                    None => break 'session Exit::ClientGone,
                    Some(Err(e)) => {
                        if is_capacity_error(e) {
                            break 'session Exit::TooBig;
                        }
                        break 'session Exit::ClientGone;
                    }
                    Some(Ok(Message::Text(text))) => session.on_text(&text),
                    Some(Ok(Message::Binary(data))) => session.on_binary(data),
                    // Pings are answered by the WebSocket layer; both count as liveness. After a
                    // close frame the next read returns `None` once the reply is flushed.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_))) => {
                        Flow::Continue
                    }
                }
            }
            () = &mut deadline => {
                tracing::debug!(peer = ?session.peer, "heartbeat timeout");
                break 'session Exit::Close((CLOSE_GOING_AWAY, "heartbeat timeout"));
            }
            _ = shutdown.wait_for(|stop| *stop) => {
                break 'session Exit::Close((CLOSE_GOING_AWAY, "server shutting down"));
            }
            _ = &mut writer => break 'session Exit::WriterGone,
            _ = refresh.tick(), if refresh_every.is_some() => {
                if let Some(peer) = session.peer {
                    let ice_servers = session
                        .shared
                        .ice
                        .for_peer(peer, session.host.as_deref(), session.client_ip);
                    session.send(&ServerMsg::IceServers { ice_servers });
                }
                Flow::Continue
            }
        };
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
                        break 'session Exit::Close((CLOSE_GOING_AWAY, "server shutting down"));
                    }
                    _ = &mut writer => break 'session Exit::WriterGone,
                };
                // Time spent blocked on the receiver is not the sender's silence.
                deadline.as_mut().reset(Instant::now() + heartbeat_timeout);
                let Some(me) = session.peer else { continue };
                match acquired {
                    Ok(Ok(permit)) => {
                        permit.forget();
                        if let Err(failure) = session.shared.hub.forward_deliver(
                            me,
                            to,
                            link,
                            &outlet.budget,
                            msg,
                            permits,
                        ) {
                            session.reply_error(failure, Some(request));
                        }
                    }
                    // The receiver is gone; its co-members (including us) hear `member_left`.
                    Ok(Err(_closed)) => {}
                    Err(_elapsed) => session.shared.hub.kill_slow(to, &outlet.budget),
                }
            }
        }
    };

    // Tell co-members first, then close the socket.
    if let Some(peer) = session.peer {
        session.shared.hub.unregister(peer);
        tracing::debug!(peer, "session ended");
    }
    session.budget.close();
    let Session { tx, .. } = session;
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
            let _ = timeout(Duration::from_secs(1), async {
                while let Some(Ok(_)) = stream.next().await {}
            })
            .await;
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

async fn finish_writer(mut writer: JoinHandle<()>) {
    if timeout(WRITER_GRACE, &mut writer).await.is_err() {
        writer.abort();
    }
}

fn permits_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn is_capacity_error(e: axum::Error) -> bool {
    matches!(
        e.into_inner().downcast::<tungstenite::Error>().map(|b| *b),
        Ok(tungstenite::Error::Capacity(_))
    )
}

impl Session {
    fn send(&self, msg: &ServerMsg) {
        if let Some(text) = encode(msg) {
            let _ = self.tx.send(Outbound::Text(text));
        }
    }

    fn reply_error(&self, failure: Failure, request: Option<&str>) {
        if let Some(peer) = self.peer {
            tracing::debug!(peer, code = %failure.code, request, "{}", failure.message);
        }
        self.send(&failure.into_msg(request));
    }

    fn error(&self, code: ErrorCode, message: &str, request: Option<&str>) {
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
        let msg = match serde_json::from_str::<ClientMsg>(text.as_str()) {
            Ok(msg) => msg,
            Err(e) => {
                self.classify_bad_text(text.as_str(), &e);
                return Flow::Continue;
            }
        };
        let request = match &msg {
            ClientMsg::Hello { .. } => "hello",
            ClientMsg::Join { .. } => "join",
            ClientMsg::Leave { .. } => "leave",
            ClientMsg::Signal { .. } => "signal",
            ClientMsg::Ping { .. } => "ping",
        };
        let me = match (&msg, self.peer) {
            (ClientMsg::Hello { version, name }, None) => return self.on_hello(*version, name),
            (ClientMsg::Hello { .. }, Some(_)) => {
                self.error(ErrorCode::BadFrame, "already said hello", Some(request));
                return Flow::Continue;
            }
            (_, None) => {
                self.error(
                    ErrorCode::HelloRequired,
                    "the first frame must be hello",
                    Some(request),
                );
                return Flow::Continue;
            }
            (_, Some(me)) => me,
        };
        let shared = &self.shared;
        let result = match msg {
            ClientMsg::Hello { .. } => Ok(()),
            ClientMsg::Join { group } => shared.hub.join(&shared.config, me, &group),
            ClientMsg::Leave { group } => shared.hub.leave(me, &group),
            ClientMsg::Signal { to, link, data } => return self.on_signal(me, to, link, data),
            ClientMsg::Ping { id } => {
                self.send(&ServerMsg::Pong { id });
                Ok(())
            }
        };
        if let Err(failure) = result {
            self.reply_error(failure, Some(request));
        }
        Flow::Continue
    }

    /// `signal`: forwarded like relay data (it comes from a peer, so it counts against the
    /// receiver's budget rather than growing its queue without bound).
    fn on_signal(&self, me: PeerId, to: PeerId, link: u32, data: serde_json::Value) -> Flow {
        let outlet = match self.shared.hub.forward_target(me, to, link) {
            Ok(outlet) => outlet,
            Err(failure) => {
                self.reply_error(failure, Some("signal"));
                return Flow::Continue;
            }
        };
        let Some(text) = encode(&ServerMsg::Signal {
            from: me,
            link,
            data,
        }) else {
            self.error(ErrorCode::Internal, "cannot encode signal", Some("signal"));
            return Flow::Continue;
        };
        let permits = text.len().min(RELAY_BUDGET_BYTES);
        Flow::Forward(PendingForward {
            request: "signal",
            to,
            link,
            outlet,
            msg: Message::Text(text),
            permits,
        })
    }

    /// Tell malformed JSON (`bad_frame`) from a well-formed frame of an unknown type
    /// (`unknown_type`).
    fn classify_bad_text(&self, text: &str, err: &serde_json::Error) {
        let value = match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => v,
            Err(e) => {
                self.error(ErrorCode::BadFrame, &format!("invalid JSON: {e}"), None);
                return;
            }
        };
        match value.get("type").and_then(serde_json::Value::as_str) {
            Some(ty) if !KNOWN_TYPES.contains(&ty) => self.error(
                ErrorCode::UnknownType,
                &format!("unknown frame type {ty:?}"),
                Some(ty),
            ),
            ty => self.error(ErrorCode::BadFrame, &format!("bad frame: {err}"), ty),
        }
    }

    fn on_hello(&mut self, version: u32, name: &str) -> Flow {
        if version != PROTOCOL_VERSION {
            self.error(
                ErrorCode::UnsupportedVersion,
                &format!("this server speaks protocol version {PROTOCOL_VERSION}, not {version}"),
                Some("hello"),
            );
            return Flow::Close((CLOSE_PROTOCOL, "unsupported protocol version"));
        }
        if !validate_name(name) {
            self.error(
                ErrorCode::InvalidName,
                "names are 1-64 bytes without control characters",
                Some("hello"),
            );
            return Flow::Continue;
        }
        let Some(kill) = self.kill.take() else {
            // Unreachable: `kill` is only taken here, once.
            self.error(
                ErrorCode::Internal,
                "session already registered",
                Some("hello"),
            );
            return Flow::Continue;
        };
        let outlet = Outlet {
            tx: self.tx.clone(),
            budget: self.budget.clone(),
        };
        let (ice, host, ip) = (&self.shared.ice, self.host.as_deref(), self.client_ip);
        let peer = self.shared.hub.register(
            &self.shared.config,
            |peer| ice.for_peer(peer, host, ip),
            name.to_owned(),
            outlet,
            kill,
        );
        tracing::info!(peer, name, "client said hello");
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
        let outlet = match self.shared.hub.forward_target(me, to, link) {
            Ok(outlet) => outlet,
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
        let permits = buf.len().min(RELAY_BUDGET_BYTES);
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
    kill: oneshot::Receiver<CloseReason>,
) {
    enum Step {
        Killed(CloseReason),
        Next(Option<Outbound>),
        Wrote(Result<bool, axum::Error>),
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
            Step::Next(None) | Step::Wrote(_) => {
                let _ = timeout(WRITER_GRACE, sink.close()).await;
                return;
            }
        };
        let step = tokio::select! {
            biased;
            reason = &mut kill => Step::Killed(reason),
            r = write_batch(&mut sink, first, &mut rx, &budget) => Step::Wrote(r),
        };
        match step {
            Step::Killed(reason) => return close_now(&mut sink, reason).await,
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
) -> Result<bool, axum::Error> {
    let mut next = Some(first);
    let mut written = 0;
    while let Some(out) = next.take() {
        match out {
            Outbound::Text(text) => sink.feed(Message::Text(text)).await?,
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
