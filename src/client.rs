//! The client: one WebSocket session to the server, groups, and one link per co-member.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::link::{LinkCtx, LinkHandle, LinkInput, LinkStats, RtcFactory, RtcOptions};
use crate::protocol::{
    validate_group, validate_name, ClientMsg, DirectPolicy, ErrorCode, IceServer, MemberInfo,
    PeerId, RelayFrame, ServerMsg, PROTOCOL_VERSION,
};
use crate::{CandidatePair, Error, Event, Path, Result};

/// Capacity of the event stream; a link waits when the app falls this far behind.
const EVENT_QUEUE: usize = 4096;
/// Capacity of the outgoing WebSocket queue.
const WS_QUEUE: usize = 1024;

/// How a [`Client`] behaves. Build with [`ClientConfig::new`] and the `with_*` methods.
#[derive(Clone)]
pub struct ClientConfig {
    name: String,
    direct: DirectPolicy,
    loopback_only: bool,
    ip_filter: Option<Arc<dyn Fn(IpAddr) -> bool + Send + Sync>>,
    udp_ports: Option<(u16, u16)>,
    send_window: usize,
    max_message_size: usize,
    connect_timeout: Duration,
    request_timeout: Duration,
    dead_path_timeout: Duration,
    link_version: u32,
    token: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("name", &self.name)
            .field("direct", &self.direct)
            .field("loopback_only", &self.loopback_only)
            .field("send_window", &self.send_window)
            .field("max_message_size", &self.max_message_size)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// Defaults: direct paths on (all ICE candidate types), 8 MiB send window per link, 8 MiB
    /// largest reliable message, 10 s connect timeout.
    pub fn new(name: impl Into<String>) -> Self {
        ClientConfig {
            name: name.into(),
            direct: DirectPolicy::Any,
            loopback_only: false,
            ip_filter: None,
            udp_ports: None,
            send_window: 8 << 20,
            max_message_size: 8 << 20,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            dead_path_timeout: Duration::from_secs(3),
            link_version: crate::protocol::LINK_VERSION,
            token: None,
        }
    }

    /// The identity token (a JWT minted by the app's backend) sent in `hello`; servers run with
    /// an auth secret require one, and take the display name and user id from it.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// This client's own limit on direct paths, sent to the server in `hello`. Each pair's
    /// policy is the strictest of this, the peer's, the group's and the tokens' (the server
    /// tells both ends; [`Event::MemberJoined`] and [`Member`] carry the result):
    ///
    /// * [`DirectPolicy::Any`] (the default): direct paths over any ICE candidates;
    /// * [`DirectPolicy::Relay`]: TURN relay candidates only (`iceTransportPolicy: relay`), and
    ///   neither end ever sends a host, server reflexive or peer reflexive address, so peers
    ///   never learn this client's addresses;
    /// * [`DirectPolicy::None`]: never a direct path; every message goes through the server, and
    ///   no address is exchanged at all.
    pub fn with_direct_policy(mut self, policy: DirectPolicy) -> Self {
        self.direct = policy;
        self
    }

    /// Shorthand for [`ClientConfig::with_direct_policy`]: `false` is [`DirectPolicy::None`];
    /// `true` turns `None` back into [`DirectPolicy::Any`] and leaves `Relay` as it is.
    pub fn with_direct(mut self, direct: bool) -> Self {
        match (direct, self.direct) {
            (false, _) => self.direct = DirectPolicy::None,
            (true, DirectPolicy::None) => self.direct = DirectPolicy::Any,
            (true, _) => {}
        }
        self
    }

    /// Shorthand for [`ClientConfig::with_direct_policy`]: `true` is [`DirectPolicy::Relay`];
    /// `false` turns `Relay` back into [`DirectPolicy::Any`] and leaves `None` as it is.
    pub fn with_relay_only(mut self, relay_only: bool) -> Self {
        match (relay_only, self.direct) {
            (true, _) => self.direct = DirectPolicy::Relay,
            (false, DirectPolicy::Relay) => self.direct = DirectPolicy::Any,
            (false, _) => {}
        }
        self
    }

    /// `true`: gather host candidates on loopback addresses only (local development and tests
    /// on one machine).
    pub fn with_loopback_only(mut self, loopback_only: bool) -> Self {
        self.loopback_only = loopback_only;
        self
    }

    /// Gather host candidates only on addresses for which `filter` returns true.
    pub fn with_ip_filter(
        mut self,
        filter: impl Fn(IpAddr) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.ip_filter = Some(Arc::new(filter));
        self
    }

    /// Use only local UDP ports `min..=max` for direct paths (for firewalls that open a range).
    pub fn with_udp_ports(mut self, min: u16, max: u16) -> Self {
        self.udp_ports = Some((min, max));
        self
    }

    /// Bytes of reliable data per link that may be sent but not yet acknowledged (64 KiB to
    /// 16 MiB; each fragment also costs 64 bytes of it); `send` waits and `try_send` fails with
    /// [`Error::WouldBlock`] beyond it. Also caps the message size. The peer's reorder buffer is
    /// sized for a 16 MiB window.
    pub fn with_send_window(mut self, bytes: usize) -> Self {
        self.send_window = bytes.clamp(64 << 10, 16 << 20);
        self.max_message_size = self.max_message_size.min(self.send_window);
        self
    }

    /// Largest reliable message (bytes, at most the send window).
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes.min(self.send_window);
        self
    }

    /// How long `connect` waits for the server.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a direct path may stay silent (no frame of any kind from the peer) before the
    /// link treats it as dead, falls back to the server path and re-sends what is
    /// unacknowledged, whatever ICE reports (default 3 s, at least 1 s; both ends probe every
    /// second, so a live path is never silent that long). `docs/PROTOCOL.md` §8.7.
    pub fn with_dead_path_timeout(mut self, timeout: Duration) -> Self {
        self.dead_path_timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// Speak an older link protocol version (1 or 2) on direct paths, to test interoperation
    /// with older peers.
    #[doc(hidden)]
    pub fn with_link_version(mut self, version: u32) -> Self {
        self.link_version = version.clamp(1, crate::protocol::LINK_VERSION);
        self
    }

    fn rtc_options(&self) -> RtcOptions {
        let ip_filter = match (&self.ip_filter, self.loopback_only) {
            (Some(f), true) => {
                let f = f.clone();
                Some(Arc::new(move |ip: IpAddr| ip.is_loopback() && f(ip)) as _)
            }
            (None, true) => Some(Arc::new(|ip: IpAddr| ip.is_loopback()) as _),
            (f, false) => f.clone(),
        };
        RtcOptions {
            include_loopback: self.loopback_only,
            ip_filter,
            udp_ports: self.udp_ports,
        }
    }
}

/// A group member as returned by [`Client::join`] and [`Client::members`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member's peer id.
    pub peer: PeerId,
    /// Its display name.
    pub name: String,
    /// Its user id (the `sub` of its token) when the server requires tokens.
    pub user: Option<String>,
    /// Which direct paths this client and the member may use (see [`Event::MemberJoined`]).
    pub direct: DirectPolicy,
}

/// The stream of [`Event`]s of a client. Read it steadily: when it falls 4096 events behind,
/// links stop delivering (and, through the send windows, their senders slow down).
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("queued", &self.rx.len())
            .finish()
    }
}

impl Events {
    /// The next event; `None` once the client is closed and every event was read.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Stream for Events {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

enum Cmd {
    Join(String, oneshot::Sender<Result<Vec<Member>>>),
    Leave(String, oneshot::Sender<Result<()>>),
    Close,
}

#[derive(Default)]
struct Shared {
    links: HashMap<PeerId, LinkEntry>,
    /// Per group: each member.
    groups: HashMap<String, BTreeMap<PeerId, Member>>,
    closed: bool,
}

struct LinkEntry {
    handle: LinkHandle,
    name: String,
    groups: HashSet<String>,
    /// The pair's effective direct policy, as the link applies it.
    direct: DirectPolicy,
}

impl Drop for LinkEntry {
    fn drop(&mut self) {
        self.handle.close();
    }
}

struct Inner {
    peer: PeerId,
    ice_servers: Arc<Mutex<Vec<IceServer>>>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Mutex<Shared>>,
    request_timeout: Duration,
}

/// A connection to a peermesh server: join groups, message co-members.
///
/// Cheap to clone; all clones share one session. Dropping every clone (or [`Client::close`])
/// ends the session.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.inner.peer)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.cmd_tx.send(Cmd::Close);
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Client {
    /// Connect to the server at `url` (`ws://host:port/ws`) and say hello.
    pub async fn connect(url: &str, config: ClientConfig) -> Result<(Client, Events)> {
        if !(url.starts_with("ws://") || url.starts_with("wss://")) {
            return Err(Error::InvalidUrl(url.to_string()));
        }
        if !validate_name(&config.name) {
            return Err(Error::InvalidName(config.name.clone()));
        }
        if let Some((min, max)) = config.udp_ports {
            if min == 0 || min > max {
                return Err(Error::InvalidConfig(format!(
                    "UDP port range {min}-{max}: need 0 < min <= max"
                )));
            }
        }
        let timeout = config.connect_timeout;
        tokio::time::timeout(timeout, Self::handshake(url, config))
            .await
            .map_err(|_| Error::Timeout)?
    }

    async fn handshake(url: &str, config: ClientConfig) -> Result<(Client, Events)> {
        // No Nagle: small frames would wait for the server's delayed ack (~40 ms).
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
            .await
            .map_err(connect_error)?;
        let hello = ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            name: config.name.clone(),
            token: config.token.clone(),
            direct: config.direct,
            resumable: false,
            resume: None,
        };
        ws.send(WsMessage::Text(to_json(&hello).into()))
            .await
            .map_err(|e| Error::Connect(e.to_string()))?;
        let welcome = loop {
            match ws.next().await {
                Some(Ok(WsMessage::Text(t))) => match serde_json::from_str::<ServerMsg>(&t) {
                    Ok(m @ ServerMsg::Welcome { .. }) => break m,
                    Ok(ServerMsg::Error { code, message, .. }) => {
                        return Err(Error::Server { code, message })
                    }
                    Ok(_) => continue,
                    Err(e) => return Err(Error::Connect(format!("bad welcome: {e}"))),
                },
                Some(Ok(WsMessage::Close(_))) | None => {
                    return Err(Error::Connect("server closed the connection".into()))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(Error::Connect(e.to_string())),
            }
        };
        let ServerMsg::Welcome {
            version,
            peer,
            ice_servers,
            heartbeat_interval_ms,
            ..
        } = welcome
        else {
            unreachable!("loop breaks only on welcome")
        };
        if version != PROTOCOL_VERSION {
            return Err(Error::VersionMismatch {
                server: version,
                client: PROTOCOL_VERSION,
            });
        }

        let (sink, stream) = ws.split();
        let (ws_tx, ws_rx) = mpsc::channel(WS_QUEUE);
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let rtc = match config.direct {
            DirectPolicy::Any | DirectPolicy::Relay => Some(Arc::new(
                RtcFactory::new(&config.rtc_options(), &ice_servers)
                    .map_err(Error::InvalidConfig)?,
            )),
            DirectPolicy::None => None,
        };
        let ctx = LinkCtx {
            ws_tx: ws_tx.clone(),
            events: events_tx.clone(),
            rtc,
            window: config.send_window,
            max_message: config.max_message_size,
            dead_path: config.dead_path_timeout,
            link_version: config.link_version,
        };
        tokio::spawn(write_loop(sink, ws_rx));
        let ice_servers = Arc::new(Mutex::new(ice_servers));
        let session = Session {
            ctx,
            ice_servers: ice_servers.clone(),
            shared: shared.clone(),
            direct: config.direct,
            pending_joins: HashMap::new(),
            pending_leaves: HashMap::new(),
            next_ping: 1,
        };
        let heartbeat = Duration::from_millis(heartbeat_interval_ms.clamp(100, 60_000));
        tokio::spawn(session.run(stream, cmd_rx, heartbeat));
        let inner = Inner {
            peer,
            ice_servers,
            cmd_tx,
            shared,
            request_timeout: config.request_timeout,
        };
        Ok((
            Client {
                inner: Arc::new(inner),
            },
            Events { rx: events_rx },
        ))
    }

    /// This client's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer
    }

    /// The ICE servers in use: from the server's `welcome`, replaced whenever the server sends
    /// fresh TURN credentials.
    pub fn ice_servers(&self) -> Vec<IceServer> {
        self.inner
            .ice_servers
            .lock()
            .expect("ice servers lock")
            .clone()
    }

    /// Join a group (created on first join). Returns its other members; a
    /// [`Event::MemberJoined`] is also emitted for each of them, before this returns.
    pub async fn join(&self, group: &str) -> Result<Vec<Member>> {
        if !validate_group(group) {
            return Err(Error::InvalidGroup(group.to_string()));
        }
        self.request(|tx| Cmd::Join(group.to_string(), tx)).await
    }

    /// Leave a group. Links to peers that share no other group with this client close; a
    /// [`Event::MemberLeft`] is emitted for each member of the group.
    pub async fn leave(&self, group: &str) -> Result<()> {
        self.request(|tx| Cmd::Leave(group.to_string(), tx)).await
    }

    async fn request<T>(&self, cmd: impl FnOnce(oneshot::Sender<Result<T>>) -> Cmd) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.inner.cmd_tx.send(cmd(tx)).map_err(|_| Error::Closed)?;
        match tokio::time::timeout(self.inner.request_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Send to a co-member. Reliable messages (up to the configured maximum, 8 MiB by default)
    /// arrive complete, in order and once, whatever path changes happen; this waits while the
    /// link's send window is full. Unreliable messages (up to 16 KiB) go on the current path,
    /// best effort.
    pub async fn send(
        &self,
        peer: PeerId,
        data: impl Into<Bytes>,
        reliability: Reliability,
    ) -> Result<()> {
        let handle = self.link(peer)?;
        handle.send(data.into(), reliability).await
    }

    /// Like [`Client::send`], but fails with [`Error::WouldBlock`] instead of waiting.
    pub fn try_send(
        &self,
        peer: PeerId,
        data: impl Into<Bytes>,
        reliability: Reliability,
    ) -> Result<()> {
        self.link(peer)?.try_send(data.into(), reliability)
    }

    fn link(&self, peer: PeerId) -> Result<LinkHandle> {
        let shared = self.lock();
        if shared.closed {
            return Err(Error::Closed);
        }
        shared
            .links
            .get(&peer)
            .map(|e| e.handle.clone())
            .ok_or(Error::UnknownPeer(peer))
    }

    /// Wait until every reliable message sent so far has been acknowledged by its peer (for
    /// example before [`Client::close`]). Links that close meanwhile are skipped.
    pub async fn flush(&self) -> Result<()> {
        let links: Vec<LinkHandle> = self
            .lock()
            .links
            .values()
            .map(|e| e.handle.clone())
            .collect();
        for link in links {
            match link.flush().await {
                Err(Error::UnknownPeer(_)) | Ok(()) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Send to every other member of `group`.
    pub async fn broadcast(
        &self,
        group: &str,
        data: impl Into<Bytes>,
        reliability: Reliability,
    ) -> Result<()> {
        let data = data.into();
        let peers: Vec<PeerId> = {
            let shared = self.lock();
            let members = shared
                .groups
                .get(group)
                .ok_or_else(|| Error::NotMember(group.to_string()))?;
            members.keys().copied().collect()
        };
        for peer in peers {
            match self.send(peer, data.clone(), reliability).await {
                // The member left meanwhile: it is no longer part of the broadcast.
                Err(Error::UnknownPeer(_)) => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// The current members of a group this client is in (without this client).
    pub fn members(&self, group: &str) -> Result<Vec<Member>> {
        let shared = self.lock();
        let members = shared
            .groups
            .get(group)
            .ok_or_else(|| Error::NotMember(group.to_string()))?;
        Ok(members.values().cloned().collect())
    }

    /// A co-member's display name.
    pub fn name_of(&self, peer: PeerId) -> Option<String> {
        self.lock().links.get(&peer).map(|e| e.name.clone())
    }

    /// The path messages to `peer` take now.
    pub fn path(&self, peer: PeerId) -> Result<Path> {
        self.with_link(peer, |h| h.status().path)
    }

    /// Smoothed round-trip time to `peer` on the current path, once measured (probed every
    /// second).
    pub fn rtt(&self, peer: PeerId) -> Result<Option<Duration>> {
        self.with_link(peer, |h| h.status().rtt)
    }

    /// The addresses of the direct path to `peer`, while the link is on it.
    pub fn candidate_pair(&self, peer: PeerId) -> Result<Option<CandidatePair>> {
        self.with_link(peer, |h| h.status().pair)
    }

    /// Counters of the link to `peer`.
    pub fn link_stats(&self, peer: PeerId) -> Result<LinkStats> {
        self.with_link(peer, |h| h.stats())
    }

    fn with_link<T>(&self, peer: PeerId, f: impl FnOnce(&LinkHandle) -> T) -> Result<T> {
        let shared = self.lock();
        shared
            .links
            .get(&peer)
            .map(|e| f(&e.handle))
            .ok_or(Error::UnknownPeer(peer))
    }

    /// Leave every group and close the session. Reliable messages not yet acknowledged by their
    /// peers are abandoned.
    pub async fn close(&self) {
        let _ = self.inner.cmd_tx.send(Cmd::Close);
        // Wait (briefly) until the session has torn down.
        for _ in 0..100 {
            if self.lock().closed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.inner.shared.lock().expect("client state lock")
    }
}

/// A failed WebSocket handshake: a 503 (the server is at a connection limit) is
/// [`Error::ServerBusy`], anything else [`Error::Connect`].
fn connect_error(e: tokio_tungstenite::tungstenite::Error) -> Error {
    use tokio_tungstenite::tungstenite::http::{header::RETRY_AFTER, StatusCode};
    match e {
        tokio_tungstenite::tungstenite::Error::Http(resp)
            if resp.status() == StatusCode::SERVICE_UNAVAILABLE =>
        {
            let retry_after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            Error::ServerBusy { retry_after }
        }
        e => Error::Connect(e.to_string()),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("protocol messages always serialize")
}

async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WsStream, WsMessage>,
    mut rx: mpsc::Receiver<WsMessage>,
) {
    while let Some(msg) = rx.recv().await {
        let close = matches!(msg, WsMessage::Close(_));
        if let Err(e) = sink.feed(msg).await {
            tracing::debug!("websocket write failed: {e}");
            break;
        }
        // Batch whatever is already queued into one flush.
        while let Ok(more) = rx.try_recv() {
            if sink.feed(more).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() || close {
            break;
        }
    }
    let _ = sink.close().await;
}

struct Session {
    ctx: LinkCtx,
    ice_servers: Arc<Mutex<Vec<IceServer>>>,
    shared: Arc<Mutex<Shared>>,
    /// This client's own direct policy.
    direct: DirectPolicy,
    pending_joins: HashMap<String, oneshot::Sender<Result<Vec<Member>>>>,
    pending_leaves: HashMap<String, oneshot::Sender<Result<()>>>,
    next_ping: u64,
}

impl Session {
    async fn run(
        mut self,
        mut stream: futures_util::stream::SplitStream<WsStream>,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        heartbeat: Duration,
    ) {
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reason = loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(Ok(WsMessage::Text(t))) => self.on_text(&t).await,
                    Some(Ok(WsMessage::Binary(b))) => self.on_binary(b),
                    Some(Ok(WsMessage::Close(frame))) => {
                        break format!("server closed the session: {frame:?}")
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break format!("connection lost: {e}"),
                    None => break "connection lost".to_string(),
                },
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Join(group, tx)) => {
                        if self.pending_joins.contains_key(&group) {
                            let _ = tx.send(Err(Error::Server {
                                code: ErrorCode::AlreadyMember,
                                message: format!("a join of {group:?} is already under way"),
                            }));
                        } else {
                            self.send(&ClientMsg::Join { group: group.clone() }).await;
                            self.pending_joins.insert(group, tx);
                        }
                    }
                    Some(Cmd::Leave(group, tx)) => {
                        if !self.lock().groups.contains_key(&group) {
                            let _ = tx.send(Err(Error::NotMember(group)));
                        } else {
                            self.send(&ClientMsg::Leave { group: group.clone() }).await;
                            self.pending_leaves.insert(group, tx);
                        }
                    }
                    Some(Cmd::Close) | None => {
                        let _ = self.ctx.ws_tx.send(WsMessage::Close(None)).await;
                        break String::new();
                    }
                },
                _ = tick.tick() => {
                    let id = self.next_ping;
                    self.next_ping += 1;
                    self.send(&ClientMsg::Ping { id }).await;
                }
            }
        };
        let links: Vec<LinkEntry> = {
            let mut shared = self.lock();
            shared.closed = true;
            shared.groups.clear();
            shared.links.drain().map(|(_, e)| e).collect()
        };
        drop(links);
        if !reason.is_empty() {
            tracing::warn!("{reason}");
            let _ = self.ctx.events.send(Event::Disconnected { reason }).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().expect("client state lock")
    }

    async fn send(&self, msg: &ClientMsg) {
        let _ = self
            .ctx
            .ws_tx
            .send(WsMessage::Text(to_json(msg).into()))
            .await;
    }

    async fn emit(&self, event: Event) {
        let _ = self.ctx.events.send(event).await;
    }

    fn on_binary(&self, buf: Bytes) {
        let frame = match RelayFrame::decode(&buf) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("dropping bad relay frame from server: {e}");
                return;
            }
        };
        let shared = self.lock();
        match shared.links.get(&frame.peer) {
            Some(e) if e.handle.link_id == frame.link => {
                e.handle
                    .deliver(LinkInput::Relay(buf.slice_ref(frame.payload)));
            }
            _ => tracing::debug!(peer = frame.peer, "relay frame for a closed link dropped"),
        }
    }

    async fn on_text(&mut self, text: &str) {
        let msg: ServerMsg = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("ignoring unparsable server frame: {e}");
                return;
            }
        };
        match msg {
            ServerMsg::Joined {
                group,
                members,
                change,
            } => {
                self.lock().groups.insert(group.clone(), BTreeMap::new());
                self.emit(Event::GroupJoined {
                    group: group.clone(),
                })
                .await;
                let mut list = Vec::with_capacity(members.len());
                for m in members {
                    list.push(self.add_member(&group, m).await);
                }
                if let Some(tx) = self.pending_joins.remove(&group) {
                    let _ = tx.send(Ok(list));
                }
                self.ack(group, change).await;
            }
            ServerMsg::MemberJoined {
                group,
                member,
                change,
            } => {
                self.add_member(&group, member).await;
                self.ack(group, change).await;
            }
            ServerMsg::MemberLeft {
                group,
                peer,
                change,
            } => {
                self.remove_member(&group, peer).await;
                self.ack(group, change).await;
            }
            ServerMsg::Left { group, change } => {
                let peers: Vec<PeerId> = self
                    .lock()
                    .groups
                    .get(&group)
                    .map(|m| m.keys().copied().collect())
                    .unwrap_or_default();
                for peer in peers {
                    self.remove_member(&group, peer).await;
                }
                self.lock().groups.remove(&group);
                self.emit(Event::GroupLeft {
                    group: group.clone(),
                })
                .await;
                if let Some(tx) = self.pending_leaves.remove(&group) {
                    let _ = tx.send(Ok(()));
                }
                self.ack(group, change).await;
            }
            ServerMsg::Signal { from, link, data } => {
                let shared = self.lock();
                match shared.links.get(&from) {
                    Some(e) if e.handle.link_id == link => {
                        e.handle.deliver(LinkInput::Signal(data))
                    }
                    _ => tracing::debug!(peer = from, "signal for a closed link dropped"),
                }
            }
            ServerMsg::IceServers { ice_servers } => {
                if let Some(rtc) = &self.ctx.rtc {
                    rtc.set_ice_servers(&ice_servers);
                }
                *self.ice_servers.lock().expect("ice servers lock") = ice_servers;
            }
            ServerMsg::Pong { .. }
            | ServerMsg::Welcome { .. }
            | ServerMsg::MemberSuspended { .. }
            | ServerMsg::MemberResumed { .. } => {}
            ServerMsg::Error {
                code,
                message,
                request,
                group,
                peer,
            } => {
                let err = || Error::Server {
                    code,
                    message: message.clone(),
                };
                let pending = match (request.as_deref(), &group) {
                    (Some("join"), Some(g)) => self
                        .pending_joins
                        .remove(g)
                        .map(|tx| tx.send(Err(err())).is_ok()),
                    (Some("leave"), Some(g)) => self
                        .pending_leaves
                        .remove(g)
                        .map(|tx| tx.send(Err(err())).is_ok()),
                    _ => None,
                };
                if pending.is_some() {
                    return;
                }
                // A frame to a peer that has just left (we have not seen its member_left yet)
                // is refused; that peer is gone and so is what we sent it.
                let departed = code == ErrorCode::NotCoMember
                    && matches!(request.as_deref(), Some("relay" | "signal"))
                    && peer.is_some_and(|p| !self.lock().links.contains_key(&p));
                // Reports for the server's records: a refusal (a link that has just ended or
                // been replaced, a group just left, an older server that does not know them)
                // changes nothing for the app.
                let report = matches!(request.as_deref(), Some("ack" | "path"));
                // The server does not let this pair exchange signals: no direct path, for good.
                let not_allowed = peer.filter(|_| {
                    code == ErrorCode::DirectNotAllowed && request.as_deref() == Some("signal")
                });
                if departed {
                    tracing::debug!(?peer, "frame to a departed peer refused");
                } else if report {
                    tracing::debug!(?request, ?peer, "report refused: {code}: {message}");
                } else if let Some(peer) = not_allowed {
                    tracing::debug!(peer, "signal refused: {message}");
                    if let Some(e) = self.lock().links.get(&peer) {
                        e.handle.deliver(LinkInput::Restrict {
                            policy: DirectPolicy::None,
                            why: Some(
                                "the server does not allow a direct path to this peer".into(),
                            ),
                        });
                    }
                } else {
                    tracing::warn!(?request, ?peer, "server error {code}: {message}");
                    self.emit(Event::ServerError { code, message }).await;
                }
            }
        }
    }

    /// Record a member and make (or keep) its link; returns it as the app sees it.
    async fn add_member(&mut self, group: &str, m: MemberInfo) -> Member {
        let wanted = self.direct.max(m.direct);
        let (member, stale) = {
            let mut shared = self.lock();
            let stale = match shared.links.get(&m.peer) {
                Some(e) if e.handle.link_id != m.link => shared.links.remove(&m.peer),
                _ => None,
            };
            let ctx = self.ctx.clone();
            let entry = shared.links.entry(m.peer).or_insert_with(|| LinkEntry {
                handle: LinkHandle::spawn(m.peer, m.link, m.initiator, wanted, ctx),
                name: m.name.clone(),
                groups: HashSet::new(),
                direct: wanted,
            });
            entry.groups.insert(group.to_string());
            // The pair shares another group already; the server computes the pair's policy
            // when it makes the link, so this is only ever the same, but a stricter one wins.
            if wanted > entry.direct {
                entry.direct = wanted;
                entry.handle.deliver(LinkInput::Restrict {
                    policy: wanted,
                    why: None,
                });
            }
            let member = Member {
                peer: m.peer,
                name: m.name,
                user: m.user,
                direct: entry.direct,
            };
            shared
                .groups
                .entry(group.to_string())
                .or_default()
                .insert(m.peer, member.clone());
            (member, stale)
        };
        drop(stale);
        self.emit(Event::MemberJoined {
            group: group.to_string(),
            peer: member.peer,
            name: member.name.clone(),
            user: member.user.clone(),
            direct: member.direct,
        })
        .await;
        member
    }

    /// Tell the server a membership change is processed (its events are queued to the app).
    async fn ack(&self, group: String, change: Option<u64>) {
        if let Some(change) = change {
            self.send(&ClientMsg::Ack { group, change }).await;
        }
    }

    async fn remove_member(&mut self, group: &str, peer: PeerId) {
        let (name, gone) = {
            let mut shared = self.lock();
            let name = shared
                .groups
                .get_mut(group)
                .and_then(|g| g.remove(&peer))
                .map(|m| m.name);
            let gone = match shared.links.get_mut(&peer) {
                Some(e) => {
                    e.groups.remove(group);
                    if e.groups.is_empty() {
                        shared.links.remove(&peer)
                    } else {
                        None
                    }
                }
                None => None,
            };
            (name, gone)
        };
        drop(gone);
        if let Some(name) = name {
            self.emit(Event::MemberLeft {
                group: group.to_string(),
                peer,
                name,
            })
            .await;
        }
    }
}

/// How a message is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reliability {
    /// Complete, in order, exactly once, across path changes.
    Reliable,
    /// Best effort on the current path: may be lost or arrive out of order; at most 16 KiB.
    Unreliable,
}
