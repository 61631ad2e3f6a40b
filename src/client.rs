//! The client: one WebSocket session to the server, groups, and one link per co-member.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::files::Files;
use crate::link::{
    default_lanes, Delivery, Lane, LaneConfig, LinkCtx, LinkHandle, LinkInput, LinkStats,
    RtcFactory, RtcOptions, FILE_LANE_DEFAULT, MAX_LANES,
};
use crate::protocol::{
    validate_group, validate_name, ClientMsg, DirectPolicy, ErrorCode, IceServer, LinkId,
    MemberInfo, PeerId, RelayFrame, Resume, ServerMsg, PROTOCOL_VERSION,
};
use crate::{CandidatePair, Error, Event, FileTransfer, Path, Result};

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
    lanes: [Option<LaneConfig>; MAX_LANES],
    file_lane: LaneConfig,
    max_file_size: Option<u64>,
    token: Option<String>,
    reconnect: Option<Reconnect>,
    direct_backend: DirectBackend,
}

/// Which WebRTC implementation carries direct paths (see [`ClientConfig::with_direct_backend`]).
/// Both speak the same protocol: peers using different backends interoperate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[non_exhaustive]
pub enum DirectBackend {
    /// webrtc-rs's async `webrtc` crate (0.17), with its own sockets and tasks. The default.
    #[default]
    Webrtc,
    /// webrtc-rs's Sans-I/O core (the `rtc` crate, 0.21), driven by peermesh's own I/O loop.
    /// Needs the `sansio` cargo feature; opt-in while it is being measured (issue 16).
    SansIo,
}

impl DirectBackend {
    /// The name [`FromStr`](std::str::FromStr) takes: `webrtc` or `sansio`.
    pub fn name(self) -> &'static str {
        match self {
            DirectBackend::Webrtc => "webrtc",
            DirectBackend::SansIo => "sansio",
        }
    }

    /// Whether this build has the backend (the `sansio` feature for [`DirectBackend::SansIo`]).
    pub fn is_available(self) -> bool {
        match self {
            DirectBackend::Webrtc => true,
            DirectBackend::SansIo => cfg!(feature = "sansio"),
        }
    }
}

impl std::fmt::Display for DirectBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DirectBackend {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "webrtc" => Ok(DirectBackend::Webrtc),
            "sansio" => Ok(DirectBackend::SansIo),
            _ => Err(Error::InvalidConfig(format!(
                "unknown direct backend {s:?} (expected \"webrtc\" or \"sansio\")"
            ))),
        }
    }
}

/// How a client reconnects after its connection to the server drops (see
/// [`ClientConfig::with_reconnect`]): exponential back-off from `initial_delay` to `max_delay`,
/// each delay drawn at random between half and all of it (jitter), so clients that lost the
/// same server do not all come back at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    /// Delay before the first attempt. Default 250 ms.
    pub initial_delay: Duration,
    /// Longest delay between attempts. Default 10 s.
    pub max_delay: Duration,
    /// Give up after this many attempts (then [`Event::Disconnected`]). Default `None`: never.
    pub max_attempts: Option<u32>,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            initial_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(10),
            max_attempts: None,
        }
    }
}

impl Reconnect {
    /// The delay before attempt `attempt` (from 1), with jitter.
    fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .initial_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max_delay);
        base.mul_f64(rand::random_range(0.5..=1.0))
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("name", &self.name)
            .field("direct", &self.direct)
            .field("loopback_only", &self.loopback_only)
            .field("send_window", &self.send_window)
            .field("max_message_size", &self.max_message_size)
            .field("direct_backend", &self.direct_backend)
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
            lanes: default_lanes(),
            file_lane: FILE_LANE_DEFAULT,
            max_file_size: None,
            token: None,
            reconnect: Some(Reconnect::default()),
            direct_backend: DirectBackend::default(),
        }
    }

    /// Carry direct paths on this WebRTC implementation (default [`DirectBackend::Webrtc`]).
    /// [`Client::connect`] fails with [`Error::InvalidConfig`] for a backend this build does not
    /// have ([`DirectBackend::is_available`]).
    pub fn with_direct_backend(mut self, backend: DirectBackend) -> Self {
        self.direct_backend = backend;
        self
    }

    /// How to reconnect when the connection to the server drops; `None`: do not (the session
    /// ends with [`Event::Disconnected`], as does every link). Default: [`Reconnect::default`].
    ///
    /// While reconnecting, links on a direct path keep working; reliable messages to peers on
    /// the server path wait (the send window applies) and go once the session is back. Within
    /// the server's resume grace the same session goes on ([`Event::Reconnected`] with
    /// `resumed`): same peer id, groups and links, nothing lost or duplicated. Otherwise (the
    /// server restarted, the grace ran out) a new session starts, joins the same groups again
    /// ([`Event::Rejoined`]) and reports reliable messages that may not have arrived
    /// ([`Event::Undelivered`]).
    pub fn with_reconnect(mut self, reconnect: Option<Reconnect>) -> Self {
        self.reconnect = reconnect;
        self
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

    /// Send on `lane` (1 to 7; 0 is always there) as well as lane 0, with this `priority`
    /// (lower goes first: no lane of a higher number sends reliable data while one of a lower
    /// number has some ready) and `weight` (share among lanes of the same priority, at least 1).
    /// Lane 0 can be given a priority and weight too. Each reliable lane is an ordered stream
    /// of its own: a bulk transfer on one lane does not hold up another (`docs/PROTOCOL.md`
    /// §8.8). Lanes share the send window, each keeping a reserve of window / (2 × lanes), so a
    /// lane's largest message is at least half the window. A lane above 7 is ignored. Default:
    /// lane 0 only, priority 0, weight 1.
    pub fn with_lane(mut self, lane: u8, priority: u8, weight: u16) -> Self {
        if let Some(slot) = self.lanes.get_mut(usize::from(lane)) {
            *slot = Some(LaneConfig {
                priority,
                weight: weight.max(1),
            });
        }
        self
    }

    /// Schedule file transfers (the file lane, `docs/PROTOCOL.md` §8.9) with this `priority`
    /// and `weight` against the lanes of [`ClientConfig::with_lane`]. Default: priority 1,
    /// weight 1 — below the app's lanes at their default priority 0, so chat goes first.
    pub fn with_file_lane(mut self, priority: u8, weight: u16) -> Self {
        self.file_lane = LaneConfig {
            priority,
            weight: weight.max(1),
        };
        self
    }

    /// Refuse file offers larger than `bytes` (the sender's transfer ends with `too_large`;
    /// this side gets [`Event::FileFailed`] instead of [`Event::FileOffered`]). Default: no
    /// limit (every offer is the app's to accept or reject).
    pub fn with_max_file_size(mut self, bytes: u64) -> Self {
        self.max_file_size = Some(bytes);
        self
    }

    /// Speak an older link protocol version (1 or 2: no lanes, no VERSION frame; 1: no in-band
    /// unreliable channel either), to test interoperation with older peers.
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
            backend: self.direct_backend,
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
    /// The session task is done: after [`Client::close`], its close frame was written (or the
    /// writer gave up), so the server knows the session ended on purpose.
    ended: bool,
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
    /// This client's peer id (a new session after a server restart gets a new one).
    peer: Arc<AtomicU32>,
    ice_servers: Arc<Mutex<Vec<IceServer>>>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Mutex<Shared>>,
    request_timeout: Duration,
    files: Arc<Files>,
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
            .field("peer", &self.peer_id())
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
        let (ws, welcome) = say_hello(url, &config, None).await?;
        let Welcome {
            peer,
            ice_servers,
            heartbeat_interval_ms,
            heartbeat_timeout_ms,
            resume_token,
            ..
        } = welcome;

        let (sink, stream) = ws.split();
        let (ws_tx, ws_rx) = mpsc::channel(WS_QUEUE);
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let links = Arc::downgrade(&shared);
        let files = Files::new(
            events_tx.clone(),
            Arc::new(move |peer| {
                let shared = links.upgrade()?;
                let s = shared.lock().ok()?;
                s.links.get(&peer).map(|e| e.handle.clone())
            }),
            config.max_file_size,
        );
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
            lanes: config.lanes,
            file_lane: config.file_lane,
            files: files.clone(),
        };
        let writer = Writer::spawn(sink, ws_rx);
        let ice_servers = Arc::new(Mutex::new(ice_servers));
        let peer = Arc::new(AtomicU32::new(peer));
        let session = Session {
            ctx,
            ice_servers: ice_servers.clone(),
            shared: shared.clone(),
            direct: config.direct,
            pending_joins: HashMap::new(),
            pending_leaves: HashMap::new(),
            next_ping: 1,
            url: url.to_owned(),
            config: config.clone(),
            peer: peer.clone(),
            resume_token,
            heartbeat: heartbeat_of(heartbeat_interval_ms, heartbeat_timeout_ms),
            resyncing: HashSet::new(),
            rejoining: HashSet::new(),
            draining: Drain::No,
            carried: Vec::new(),
        };
        tokio::spawn(session.run(stream, cmd_rx, writer));
        let inner = Inner {
            peer,
            ice_servers,
            cmd_tx,
            shared,
            request_timeout: config.request_timeout,
            files,
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
        self.inner.peer.load(Ordering::Relaxed)
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

    /// Send on a lane configured with [`ClientConfig::with_lane`] (0 is [`Client::send`]):
    /// reliable messages arrive once and in order per lane, and a bulk transfer on another lane
    /// does not hold them up; unreliable ones have no lane. A peer without lanes gets every
    /// lane on lane 0 (still in order per lane). Waits for room in the lane's share of the
    /// window; [`Error::InvalidConfig`] for a lane not configured.
    pub async fn send_on(
        &self,
        peer: PeerId,
        lane: u8,
        data: impl Into<Bytes>,
        reliability: Reliability,
    ) -> Result<()> {
        let delivery = match reliability {
            Reliability::Reliable => Delivery::Reliable,
            Reliability::Unreliable => Delivery::Unreliable,
        };
        self.link(peer)?
            .send_on(app_lane(lane)?, data.into(), delivery)
            .await
    }

    /// Send a *sequenced* unreliable message on `lane` (at most 16 KiB): best effort, and the
    /// peer drops one older than the newest it delivered on that lane — for state updates. A
    /// peer without lanes gets it as a plain unreliable message.
    pub async fn send_sequenced(
        &self,
        peer: PeerId,
        lane: u8,
        data: impl Into<Bytes>,
    ) -> Result<()> {
        self.link(peer)?
            .send_on(app_lane(lane)?, data.into(), Delivery::Sequenced)
            .await
    }

    /// Send the file at `path` to `peer` on the link's file lane (`docs/PROTOCOL.md` §8.9):
    /// the peer gets [`Event::FileOffered`]; the returned transfer has its progress, a
    /// cancel, and its outcome. Streamed in chunks of 256 KiB, each with its SHA-256, and the
    /// whole file's SHA-256 checked at the end (hashed once before the offer, so that the
    /// receiver can continue a partial file of it). [`Error::File`] with
    /// [`FileError::Unsupported`] for a peer whose client has no file transfers.
    ///
    /// [`FileError::Unsupported`]: crate::FileError::Unsupported
    pub async fn send_file(
        &self,
        peer: PeerId,
        path: impl AsRef<std::path::Path>,
    ) -> Result<FileTransfer> {
        self.link(peer)?;
        Ok(self.inner.files.send_path(peer, path.as_ref()).await?)
    }

    /// Send `size` bytes read from `reader` to `peer` as a file called `name`, like
    /// [`Client::send_file`] but streamed as it is read: its SHA-256 is computed on the way
    /// and checked by the receiver at the end, so such a transfer cannot be resumed. A reader
    /// that ends before `size` bytes fails the transfer ([`FileError::Io`]); bytes after `size`
    /// are not read.
    ///
    /// [`FileError::Io`]: crate::FileError::Io
    pub async fn send_reader(
        &self,
        peer: PeerId,
        name: &str,
        size: u64,
        reader: impl tokio::io::AsyncRead + Send + Unpin + 'static,
    ) -> Result<FileTransfer> {
        self.link(peer)?;
        Ok(self
            .inner
            .files
            .send_reader(peer, name, size, Box::new(reader))
            .await?)
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
        // Wait (briefly) until the session has torn down and its close frame is written: a
        // process that exits right after `close` must not leave the server believing the
        // connection was lost (it would keep the session for its resume grace).
        // The session bounds this itself (CLOSE_WRITE); this is a safety net.
        for _ in 0..1000 {
            if self.lock().ended {
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

/// An app's lane: 0 to 7 (the file lane is the library's).
fn app_lane(lane: u8) -> Result<Lane> {
    if usize::from(lane) >= MAX_LANES {
        return Err(Error::InvalidConfig(format!(
            "lane {lane} is not configured (lanes are 0 to {})",
            MAX_LANES - 1
        )));
    }
    Ok(Lane(lane))
}

/// The task that writes the session's outgoing queue to the current WebSocket. On a
/// reconnect it is stopped and hands the queue back, so what links queued meanwhile goes on
/// the next connection.
struct Writer {
    task: tokio::task::JoinHandle<mpsc::Receiver<WsMessage>>,
    stop: oneshot::Sender<()>,
}

impl Writer {
    fn spawn(
        sink: futures_util::stream::SplitSink<WsStream, WsMessage>,
        rx: mpsc::Receiver<WsMessage>,
    ) -> Writer {
        let (stop, stopped) = oneshot::channel();
        Writer {
            task: tokio::spawn(write_loop(sink, rx, stopped)),
            stop,
        }
    }

    /// Stop writing; the queue (what was not written yet) comes back.
    async fn stop(self) -> Option<mpsc::Receiver<WsMessage>> {
        let _ = self.stop.send(());
        self.task.await.ok()
    }
}

async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WsStream, WsMessage>,
    mut rx: mpsc::Receiver<WsMessage>,
    stop: oneshot::Receiver<()>,
) -> mpsc::Receiver<WsMessage> {
    // Stopped only when asked; a dropped `Writer` lets the loop run to its end.
    let stop = async {
        if stop.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(stop);
    loop {
        let msg = tokio::select! {
            biased;
            _ = &mut stop => return rx,
            msg = rx.recv() => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        let close = matches!(msg, WsMessage::Close(_));
        let wrote = async {
            sink.feed(msg).await?;
            // Batch whatever is already queued into one flush.
            while let Ok(more) = rx.try_recv() {
                sink.feed(more).await?;
            }
            sink.flush().await
        };
        let wrote = tokio::select! {
            biased;
            _ = &mut stop => return rx,
            r = wrote => r,
        };
        if let Err(e) = wrote {
            tracing::debug!("websocket write failed: {e}");
            // The session notices the loss on its read side; wait to be stopped.
            stop.await;
            return rx;
        }
        if close {
            break;
        }
    }
    let _ = sink.close().await;
    rx
}

/// What a `welcome` says that the session keeps.
struct Welcome {
    peer: PeerId,
    ice_servers: Vec<IceServer>,
    heartbeat_interval_ms: u64,
    heartbeat_timeout_ms: u64,
    resume_token: Option<String>,
    resumed: bool,
    groups: Vec<String>,
}

/// The ping interval and the silence after which the connection counts as dead.
fn heartbeat_of(interval_ms: u64, timeout_ms: u64) -> (Duration, Duration) {
    let interval = Duration::from_millis(interval_ms.clamp(100, 60_000));
    let timeout = Duration::from_millis(timeout_ms.max(3 * interval_ms.clamp(100, 60_000)));
    (interval, timeout)
}

/// Open a WebSocket to `url` and say hello (resumable), resuming `resume` if given: a refused
/// resume falls back to a new session on the same connection.
async fn say_hello(
    url: &str,
    config: &ClientConfig,
    resume: Option<Resume>,
) -> Result<(WsStream, Welcome)> {
    // No Nagle: small frames would wait for the server's delayed ack (~40 ms).
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .map_err(connect_error)?;
    let mut resume = resume;
    loop {
        let hello = ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            name: config.name.clone(),
            token: config.token.clone(),
            direct: config.direct,
            resumable: config.reconnect.is_some(),
            resume: resume.take(),
        };
        let resuming = matches!(
            &hello,
            ClientMsg::Hello {
                resume: Some(_),
                ..
            }
        );
        ws.send(WsMessage::Text(to_json(&hello).into()))
            .await
            .map_err(|e| Error::Connect(e.to_string()))?;
        let welcome = loop {
            match ws.next().await {
                Some(Ok(WsMessage::Text(t))) => match serde_json::from_str::<ServerMsg>(&t) {
                    Ok(m @ ServerMsg::Welcome { .. }) => break m,
                    Ok(ServerMsg::Error {
                        code: ErrorCode::ResumeFailed,
                        message,
                        ..
                    }) if resuming => {
                        tracing::info!("resume refused ({message}): starting a new session");
                        break ServerMsg::Pong { id: 0 };
                    }
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
            heartbeat_timeout_ms,
            resume_token,
            resumed,
            groups,
            ..
        } = welcome
        else {
            // The resume was refused: say a plain hello.
            continue;
        };
        if version != PROTOCOL_VERSION {
            return Err(Error::VersionMismatch {
                server: version,
                client: PROTOCOL_VERSION,
            });
        }
        return Ok((
            ws,
            Welcome {
                peer,
                ice_servers,
                heartbeat_interval_ms,
                heartbeat_timeout_ms,
                resume_token,
                resumed,
                groups: groups.unwrap_or_default(),
            },
        ));
    }
}

/// What a close frame from the server means: reconnect, or the session is over for good.
fn closed_by_server(frame: Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> End {
    use crate::protocol::close_code;
    let (code, why) = match &frame {
        Some(f) => (u16::from(f.code), f.reason.to_string()),
        None => (0, String::new()),
    };
    let reason = format!("server closed the session: {code} {why}");
    match code {
        // Restarting, heartbeat timeout, too slow, or no code at all: come back.
        close_code::SERVICE_RESTART
        | close_code::GOING_AWAY
        | close_code::TRY_AGAIN_LATER
        | 0
        | 1006 => End::Lost(reason),
        // Replaced, kicked, resumed elsewhere, refused, protocol violations: done.
        _ => End::Fatal(reason),
    }
}

/// How long the session waits for its close frame to be written after [`Client::close`].
const CLOSE_WRITE: Duration = Duration::from_secs(2);
/// How often a draining client checks whether its links have everything acknowledged.
const DRAIN_CHECK: Duration = Duration::from_millis(10);

/// How serving one connection ended.
enum End {
    /// The app closed the client.
    ByApp,
    /// The connection was lost or the server asked to reconnect: try again if configured.
    Lost(String),
    /// The server ended the session for good (replaced, kicked, refused).
    Fatal(String),
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
    url: String,
    config: ClientConfig,
    peer: Arc<AtomicU32>,
    /// The secret that resumes this session (the server keeps it for a while when the
    /// connection drops).
    resume_token: Option<String>,
    /// Ping interval, and the silence after which the connection counts as dead.
    heartbeat: (Duration, Duration),
    /// Groups whose next `joined` (after a resume) reconciles what the client knew rather
    /// than announcing the group.
    resyncing: HashSet<String>,
    /// Groups the client joins again by itself after a new session.
    rejoining: HashSet<String>,
    /// The server is draining (PROTOCOL.md §3.15): links hold new reliable messages; `drained`
    /// goes once every link has had everything it sent acknowledged.
    draining: Drain,
    /// Reliable messages held by the links of an ended session, waiting for a link to the same
    /// user in the new one.
    carried: Vec<Carried>,
}

/// Where a drain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    No,
    /// Links hold; `drained` not sent yet.
    Holding,
    /// `drained` sent; waiting for the server to close.
    Answered,
}

/// How long held messages wait for a link to the same user after a new session.
const CARRY_WAIT: Duration = Duration::from_secs(30);

/// Reliable messages for a peer of an ended session that were never transmitted (held while the
/// server drained): they go first on the next link to the same user.
struct Carried {
    /// The old peer id (for `Event::Undelivered` if nobody comes).
    peer: PeerId,
    /// The peer's user id, or its name when the server has no identities.
    user: Option<String>,
    name: String,
    /// With their lanes.
    messages: Vec<(Lane, Bytes)>,
    until: tokio::time::Instant,
}

impl Carried {
    fn matches(&self, m: &MemberInfo) -> bool {
        match (&self.user, &m.user) {
            (Some(a), Some(b)) => a == b,
            (None, None) => self.name == m.name,
            _ => false,
        }
    }
}

type WsReader = futures_util::stream::SplitStream<WsStream>;

impl Session {
    async fn run(
        mut self,
        mut stream: WsReader,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        writer: Writer,
    ) {
        let mut writer = Some(writer);
        // Why the session ended (empty: the app closed it), and the connection if it is open.
        let (reason, stream) = loop {
            let reason = match self.serve(&mut stream, &mut cmds).await {
                End::ByApp => break (String::new(), Some(stream)),
                End::Fatal(reason) => break (reason, None),
                End::Lost(reason) => reason,
            };
            let Some(policy) = self.config.reconnect else {
                break (reason, None);
            };
            tracing::info!("{reason}: reconnecting");
            // Close this connection now (the server waits for that after its close frame).
            drop(stream);
            // Nothing goes on the server path until the session is back (links keep their
            // unacknowledged frames and send them again then).
            self.each_link(|| LinkInput::PauseRelay);
            let stopped = match writer.take() {
                Some(w) => w.stop().await,
                None => None,
            };
            let Some(queue) = stopped else {
                break (reason, None);
            };
            match self.reconnect(&policy, &mut cmds, &reason).await {
                Ok((ws, welcome)) => {
                    let (sink, read) = ws.split();
                    stream = read;
                    let queue = self.reconnected(welcome, queue).await;
                    writer = Some(Writer::spawn(sink, queue));
                    self.after_reconnect().await;
                }
                Err(reason) => break (reason, None),
            }
        };
        let links: Vec<LinkEntry> = {
            let mut shared = self.lock();
            shared.closed = true;
            shared.groups.clear();
            shared.links.drain().map(|(_, e)| e).collect()
        };
        drop(links);
        // After `close`: `close` returns once the server has answered our close frame (the
        // closing handshake; bounded, the socket may be stuck), before anything that could wait
        // for the app. The server answers only after reading ours, so it knows the session
        // ended on purpose even if this process exits at once. Otherwise the writer goes on by
        // itself until its queue ends.
        match (writer, stream) {
            (Some(w), Some(mut stream)) if reason.is_empty() => {
                // Once answered, the writer is done (or its last flush failed because the
                // connection is over, which leaves it waiting to be stopped).
                let answer = async {
                    while let Some(Ok(m)) = stream.next().await {
                        if m.is_close() {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(CLOSE_WRITE, answer).await;
                let _ = w.stop.send(());
            }
            (w, _) => drop(w),
        }
        self.lock().ended = true;
        for c in std::mem::take(&mut self.carried) {
            self.emit(Event::Undelivered {
                peer: c.peer,
                messages: c.messages.len() as u64,
            })
            .await;
        }
        if !reason.is_empty() {
            tracing::warn!("{reason}");
            let _ = self.ctx.events.send(Event::Disconnected { reason }).await;
        }
    }

    /// Serve one connection until it ends.
    async fn serve(
        &mut self,
        stream: &mut WsReader,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    ) -> End {
        let (interval, dead_after) = self.heartbeat;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = tokio::time::Instant::now();
        let mut drain_tick = tokio::time::interval(DRAIN_CHECK);
        loop {
            tokio::select! {
                _ = drain_tick.tick(), if self.draining == Drain::Holding => {
                    let drained = self.lock().links.values().all(|e| e.handle.drained());
                    if drained {
                        self.draining = Drain::Answered;
                        self.send(&ClientMsg::Drained).await;
                    }
                }
                msg = stream.next() => {
                    heard = tokio::time::Instant::now();
                    match msg {
                        Some(Ok(WsMessage::Text(t))) => self.on_text(&t).await,
                        Some(Ok(WsMessage::Binary(b))) => self.on_binary(b),
                        Some(Ok(WsMessage::Close(frame))) => return closed_by_server(frame),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return End::Lost(format!("connection lost: {e}")),
                        None => return End::Lost("connection lost".to_string()),
                    }
                }
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
                        return End::ByApp;
                    }
                },
                _ = tick.tick() => {
                    self.expire_carried().await;
                    // Dead WebSocket detection: the server answers every ping at once.
                    if heard.elapsed() > dead_after {
                        return End::Lost(format!(
                            "no answer from the server for {:.1} s",
                            heard.elapsed().as_secs_f64()
                        ));
                    }
                    let id = self.next_ping;
                    self.next_ping += 1;
                    self.send(&ClientMsg::Ping { id }).await;
                }
            }
        }
    }

    /// Try to connect again, with back-off, until it works, the policy gives up, the server
    /// refuses for good, or the app closes the client.
    async fn reconnect(
        &mut self,
        policy: &Reconnect,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
        reason: &str,
    ) -> std::result::Result<(WsStream, Welcome), String> {
        // Requests made while disconnected fail at once (the app may try again later).
        let refuse = |cmd: Cmd| match cmd {
            Cmd::Join(_, tx) => {
                let _ = tx.send(Err(Error::Connect("reconnecting to the server".into())));
                false
            }
            Cmd::Leave(_, tx) => {
                let _ = tx.send(Err(Error::Connect("reconnecting to the server".into())));
                false
            }
            Cmd::Close => true,
        };
        for attempt in 1u32.. {
            if policy.max_attempts.is_some_and(|max| attempt > max) {
                return Err(format!("{reason}; gave up after {} attempts", attempt - 1));
            }
            let delay = policy.delay(attempt);
            self.emit(Event::Reconnecting { attempt, delay }).await;
            let wait = tokio::time::sleep(delay);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    cmd = cmds.recv() => match cmd {
                        Some(cmd) => if refuse(cmd) { return Err(String::new()) },
                        None => return Err(String::new()),
                    },
                }
            }
            let resume = self.resume_token.clone().map(|token| Resume {
                peer: self.peer.load(Ordering::Relaxed),
                token,
            });
            let hello = say_hello(&self.url, &self.config, resume);
            let connected = tokio::select! {
                r = tokio::time::timeout(self.config.connect_timeout, hello) => r,
                cmd = cmds.recv() => {
                    match cmd {
                        Some(cmd) => {
                            if refuse(cmd) {
                                return Err(String::new());
                            }
                            continue;
                        }
                        None => return Err(String::new()),
                    }
                }
            };
            match connected {
                Ok(Ok(done)) => return Ok(done),
                Ok(Err(Error::Server { code, message }))
                    if matches!(
                        code,
                        ErrorCode::Unauthorized | ErrorCode::UnsupportedVersion
                    ) =>
                {
                    return Err(format!(
                        "reconnecting: the server refused: {code}: {message}"
                    ));
                }
                Ok(Err(e)) => tracing::debug!(attempt, "reconnect failed: {e}"),
                Err(_) => tracing::debug!(attempt, "reconnect timed out"),
            }
        }
        Err(reason.to_owned())
    }

    /// The connection is back: adopt the welcome. Returns the outgoing queue to write on it
    /// (emptied of stale frames when a new session started).
    async fn reconnected(
        &mut self,
        welcome: Welcome,
        mut queue: mpsc::Receiver<WsMessage>,
    ) -> mpsc::Receiver<WsMessage> {
        let Welcome {
            peer,
            ice_servers,
            heartbeat_interval_ms,
            heartbeat_timeout_ms,
            resume_token,
            resumed,
            groups,
        } = welcome;
        self.heartbeat = heartbeat_of(heartbeat_interval_ms, heartbeat_timeout_ms);
        self.resume_token = resume_token;
        if let Some(rtc) = &self.ctx.rtc {
            rtc.set_ice_servers(&ice_servers);
        }
        *self.ice_servers.lock().expect("ice servers lock") = ice_servers;
        let known: Vec<String> = self.lock().groups.keys().cloned().collect();
        // A drain ends with the connection (a resume's `Resync` ends the links' hold).
        self.draining = Drain::No;
        if resumed {
            // Groups left meanwhile (the backend removed this client): as if `left` came.
            for group in known.iter().filter(|g| !groups.contains(g)) {
                self.forget_group(group).await;
            }
            self.resyncing = groups.into_iter().collect();
            self.emit(Event::Reconnected {
                peer,
                resumed: true,
            })
            .await;
            return queue;
        }
        // A new session: the old peer id, links and link ids are gone. What was queued for the
        // server belonged to them.
        while queue.try_recv().is_ok() {}
        self.peer.store(peer, Ordering::Relaxed);
        self.emit(Event::Reconnected {
            peer,
            resumed: false,
        })
        .await;
        let (links, users) = {
            let mut shared = self.lock();
            let users: HashMap<PeerId, Option<String>> = shared
                .groups
                .values()
                .flat_map(|g| g.values())
                .map(|m| (m.peer, m.user.clone()))
                .collect();
            let links: Vec<(PeerId, LinkEntry)> = shared.links.drain().collect();
            (links, users)
        };
        let until = tokio::time::Instant::now() + CARRY_WAIT;
        for (peer, entry) in &links {
            // Held messages (a drain) were never transmitted: they go on the next link to the
            // same user. The others may or may not have arrived.
            let (held, messages) = entry.handle.take_held().await;
            if messages > 0 {
                self.emit(Event::Undelivered {
                    peer: *peer,
                    messages,
                })
                .await;
            }
            if !held.is_empty() {
                self.carried.push(Carried {
                    peer: *peer,
                    user: users.get(peer).cloned().flatten(),
                    name: entry.name.clone(),
                    messages: held,
                    until,
                });
            }
        }
        drop(links);
        for group in &known {
            self.forget_members(group).await;
        }
        self.lock().groups.clear();
        self.rejoining = known.into_iter().collect();
        queue
    }

    /// After the writer runs again: links send again what may have been lost; a new session
    /// joins its groups again.
    async fn after_reconnect(&mut self) {
        if self.rejoining.is_empty() {
            self.each_link(|| LinkInput::Resync);
            return;
        }
        let groups: Vec<String> = self.rejoining.iter().cloned().collect();
        for group in groups {
            self.send(&ClientMsg::Join { group }).await;
        }
    }

    /// Held messages whose user did not come back in time: tell the app.
    async fn expire_carried(&mut self) {
        let now = tokio::time::Instant::now();
        let (expired, kept): (Vec<Carried>, Vec<Carried>) = std::mem::take(&mut self.carried)
            .into_iter()
            .partition(|c| c.until <= now);
        self.carried = kept;
        for c in expired {
            self.emit(Event::Undelivered {
                peer: c.peer,
                messages: c.messages.len() as u64,
            })
            .await;
        }
    }

    fn each_link(&self, input: impl Fn() -> LinkInput) {
        for e in self.lock().links.values() {
            e.handle.deliver(input());
        }
    }

    /// Every member of `group` leaves (`MemberLeft`), the links that no other group holds end.
    async fn forget_members(&mut self, group: &str) {
        let peers: Vec<PeerId> = self
            .lock()
            .groups
            .get(group)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        for peer in peers {
            self.remove_member(group, peer).await;
        }
    }

    /// This client is no longer in `group`.
    async fn forget_group(&mut self, group: &str) {
        self.forget_members(group).await;
        self.lock().groups.remove(group);
        self.emit(Event::GroupLeft {
            group: group.to_owned(),
        })
        .await;
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
            } if self.resyncing.remove(&group) => {
                // After a resume: the members now, against what the client knew.
                let known: HashMap<PeerId, LinkId> = {
                    let shared = self.lock();
                    let links = &shared.links;
                    shared
                        .groups
                        .get(&group)
                        .map(|g| {
                            g.keys()
                                .filter_map(|p| links.get(p).map(|e| (*p, e.handle.link_id)))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                let listed: HashSet<PeerId> = members.iter().map(|m| m.peer).collect();
                for peer in known.keys().filter(|p| !listed.contains(p)) {
                    self.remove_member(&group, *peer).await;
                }
                self.lock().groups.entry(group.clone()).or_default();
                for m in members {
                    if known.get(&m.peer) != Some(&m.link) {
                        self.add_member(&group, m).await;
                    }
                }
                self.ack(group, change).await;
            }
            ServerMsg::Joined {
                group,
                members,
                change,
            } => {
                self.lock().groups.insert(group.clone(), BTreeMap::new());
                let event = if self.rejoining.remove(&group) {
                    Event::Rejoined {
                        group: group.clone(),
                    }
                } else {
                    Event::GroupJoined {
                        group: group.clone(),
                    }
                };
                self.emit(event).await;
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
            ServerMsg::Drain { reconnect_url, .. } => {
                // Only a client that reconnects holds its messages for the next server; one
                // that does not keeps sending until the connection ends.
                if self.config.reconnect.is_some() && self.draining == Drain::No {
                    tracing::info!("the server is draining");
                    if let Some(url) = reconnect_url {
                        self.url = url;
                    }
                    self.draining = Drain::Holding;
                    self.each_link(|| LinkInput::Hold);
                }
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
                self.forget_group(&group).await;
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
            ServerMsg::MemberSuspended { peer } => {
                if let Some(e) = self.lock().links.get(&peer) {
                    e.handle.deliver(LinkInput::PauseRelay);
                }
            }
            ServerMsg::MemberResumed { peer } => {
                if let Some(e) = self.lock().links.get(&peer) {
                    e.handle.deliver(LinkInput::Resync);
                }
            }
            ServerMsg::Pong { .. } | ServerMsg::Welcome { .. } => {}
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
                // A group this client joins again by itself after a new session: it is gone.
                if let (Some("join"), Some(g)) = (request.as_deref(), &group) {
                    if self.rejoining.remove(g) {
                        tracing::warn!(group = g, "could not join again: {code}: {message}");
                        self.emit(Event::GroupLeft { group: g.clone() }).await;
                        self.emit(Event::ServerError { code, message }).await;
                        return;
                    }
                }
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
                // Frames in flight to a peer whose session was just suspended: its link waits
                // for `member_resumed` and sends them again then.
                let suspended = code == ErrorCode::PeerSuspended;
                // Reports for the server's records: a refusal (a link that has just ended or
                // been replaced, a group just left, an older server that does not know them)
                // changes nothing for the app.
                let report = matches!(request.as_deref(), Some("ack" | "path"));
                // The server does not let this pair exchange signals: no direct path, for good.
                let not_allowed = peer.filter(|_| {
                    code == ErrorCode::DirectNotAllowed && request.as_deref() == Some("signal")
                });
                if departed || suspended {
                    tracing::debug!(?peer, "frame refused: {code}");
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
            // (The field, not `self.lock()`: `self.carried` is borrowed below too.)
            let mut shared = self.shared.lock().expect("client state lock");
            let stale = match shared.links.get(&m.peer) {
                Some(e) if e.handle.link_id != m.link => shared.links.remove(&m.peer),
                _ => None,
            };
            let ctx = self.ctx.clone();
            let carried = &mut self.carried;
            let holding = self.draining != Drain::No;
            let entry = shared.links.entry(m.peer).or_insert_with(|| {
                let handle = LinkHandle::spawn(m.peer, m.link, m.initiator, wanted, ctx);
                // What an ended session held for this user goes first (before the app hears of
                // the member and can send anything itself).
                if let Some(i) = carried.iter().position(|c| c.matches(&m)) {
                    for (lane, msg) in carried.swap_remove(i).messages {
                        if let Err(e) = handle.resend_held(lane, msg) {
                            tracing::warn!(peer = m.peer, "a held message was not re-sent: {e}");
                        }
                    }
                }
                if holding {
                    handle.deliver(LinkInput::Hold);
                }
                LinkEntry {
                    handle,
                    name: m.name.clone(),
                    groups: HashSet::new(),
                    direct: wanted,
                }
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
