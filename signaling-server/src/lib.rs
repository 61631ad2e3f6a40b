//! The peermesh signaling and relay server.
//!
//! One WebSocket per client at `GET /ws`. Clients say `hello`, join named groups, exchange
//! signaling data with co-members and relay binary link frames through the server until a direct
//! WebRTC path is up. The wire protocol is defined in [`peermesh::protocol`].
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use peermesh_server::{Config, Server};
//! let server = Server::bind(Config::default()).await?;
//! println!("{}", server.ws_url());
//! server.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod admin;
pub mod auth;
pub mod config;
mod conn;
mod hub;
mod ice;
mod metrics;
mod net;
mod request;
pub mod turn;

pub use admin::Admin;
pub use auth::Auth;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use peermesh::protocol::{IceServer, Limits};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Hard cap on one WebSocket message or frame (bytes). Anything larger closes the socket with
/// close code 1009; frames above [`Limits::max_frame_bytes`] but below this cap only get an
/// `error` frame with code `frame_too_large`.
pub const HARD_FRAME_CAP: usize = 1024 * 1024;

/// Default of [`ServerLimits::relay_queue_bytes`].
pub const RELAY_BUDGET_BYTES: usize = 4 * 1024 * 1024;

/// WebSocket read buffer per connection (tungstenite's default is 128 KiB, allocated up front
/// and zero-filled on each read). Most frames are far smaller, a larger frame grows the buffer
/// while it is read, and a busy connection reads its socket 64 KiB at a time through
/// [`net::ElasticReader`], so this small buffer costs no system calls.
const WS_READ_BUFFER: usize = 8 * 1024;
/// Outgoing frames gathered before a write to the socket (grown only as needed).
const WS_WRITE_BUFFER: usize = 128 * 1024;

/// How long a receiver's relay budget may stay exhausted before the receiver is dropped as too
/// slow (close code 1013).
pub const RELAY_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for open WebSocket sessions to close before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port). Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// ICE servers handed to clients in `welcome`. Default none.
    pub ice_servers: Vec<IceServer>,
    /// How often clients should ping (announced in `welcome`). Default 5 s; never more than a
    /// third of `heartbeat_timeout`.
    pub heartbeat_interval: Duration,
    /// Silence after which a client is dropped. Default 15 s.
    pub heartbeat_timeout: Duration,
    /// Limits enforced and announced in `welcome`.
    pub limits: Limits,
    /// Where clients get STUN/TURN from. Default [`TurnMode::Disabled`] for the library (the
    /// `peermesh-server` binary's default configuration runs the embedded service).
    pub turn: TurnMode,
    /// Lifetime of the TURN credentials minted for each client; clients get fresh ones every
    /// half of it. Default 1 hour.
    pub turn_credential_ttl: Duration,
    /// What one connection or client may cost the server (connection limits, timeouts, queue
    /// bounds, rate limits).
    pub server_limits: ServerLimits,
    /// Admin listener (Prometheus `/metrics`, `/healthz`); keep it on loopback or a private
    /// network. Default `None` for the library (the binary's default is `127.0.0.1:8081`).
    pub admin_listen: Option<SocketAddr>,
    /// How clients are identified: tokens signed with a secret, or open (loopback only unless
    /// given explicitly). Default [`Auth::OpenOnLoopback`].
    pub auth: Auth,
    /// Bearer secret of the admin API (`/v1/...` on the admin listener); without it every
    /// admin API request gets 401. Default `None`.
    pub admin_secret: Option<String>,
    /// Whether a client's `join` of a group that does not exist creates it (`false`: only the
    /// app's backend creates groups; such a join gets `no_such_group`). Default `true`.
    pub client_groups: bool,
    /// How long a membership change waits for every member's `ack` before the backend is told
    /// who did not acknowledge it. Default 30 s.
    pub ack_timeout: Duration,
    /// How long the session of a resumable client whose connection dropped is kept (suspended:
    /// groups and links stay, co-members see `member_suspended`) for it to resume. Default
    /// 30 s.
    pub resume_grace: Duration,
    /// On shutdown (SIGTERM), how long the server waits for its sessions to drain (every
    /// client's reliable messages acknowledged, new ones held for the next server) before it
    /// closes them. Default 10 s.
    pub drain_timeout: Duration,
    /// On shutdown, where clients should reconnect (another instance: `ws://` or `wss://`);
    /// `None`: the same URL, once a server is back there. Default `None`.
    pub reconnect_url: Option<String>,
}

/// A token-bucket rate: `per_second` on average, up to `burst` at once. `per_second == 0` means
/// unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Sustained rate.
    pub per_second: u64,
    /// Bucket size (at least 1).
    pub burst: u64,
}

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate {
        per_second: 0,
        burst: 1,
    };
}

/// What one connection or client may cost the server. Every field has a safe default for a
/// public deployment; see `docs/OPERATIONS.md`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerLimits {
    /// Open TCP connections (HTTP and WebSocket) in total. Default 10 000; lowered at startup
    /// when the file-descriptor limit cannot hold that many (see `reserved_fds`).
    pub max_connections: usize,
    /// Open TCP connections from one source IP address. Default 64.
    pub max_connections_per_ip: usize,
    /// Listen backlog of the signaling socket (the kernel caps it at `net.core.somaxconn`).
    /// Default 4096.
    pub listen_backlog: u32,
    /// File descriptors kept free for the admin listener, TURN's own sockets, logging and the
    /// like when connections and TURN allocations are sized to the descriptor limit. Default 64.
    pub reserved_fds: usize,
    /// A request's line and headers must arrive within this (also the longest an HTTP
    /// connection may wait idle for its next request). Default 5 s.
    pub header_read_timeout: Duration,
    /// A connection that has not upgraded to a WebSocket within this is closed. Default 30 s.
    pub upgrade_timeout: Duration,
    /// A WebSocket that has not said `hello` within this is closed (1008). Default 10 s.
    pub hello_timeout: Duration,
    /// Frames a client may send before its `hello` is accepted (the `hello` included); one more
    /// closes the connection (1008). Default 4.
    pub hello_max_frames: u32,
    /// Bytes a client may send before its `hello` is accepted. Default 16 KiB.
    pub hello_max_bytes: usize,
    /// Bytes of replies and events (JSON frames from the server itself) that may wait towards
    /// one client; a client that lets more pile up is not reading and is closed (1008).
    /// Default 256 KiB.
    pub outbound_queue_bytes: usize,
    /// Bytes forwarded from other clients (relay frames and signals) that may wait towards one
    /// receiver; senders then wait, and a receiver that stays full for 10 s is closed (1013).
    /// Default 4 MiB.
    pub relay_queue_bytes: usize,
    /// JSON requests other than `signal` (`hello`, `join`, `leave`, `ping`, bad frames) per
    /// second; over it a request gets `rate_limited`. Default 20/s, burst 50.
    pub requests: Rate,
    /// `signal` frames per second; over it a signal gets `rate_limited`. Default 200/s, burst
    /// 1000.
    pub signals: Rate,
    /// `join` requests per second (they also count as requests). Default 5/s, burst 32.
    pub joins: Rate,
    /// Relay bytes per second one client may send. The server stops reading from a client over
    /// it until it is back under (TCP back-pressure) rather than dropping reliable data.
    /// Default 32 MiB/s, burst 8 MiB.
    pub relay_bytes: Rate,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 10_000,
            max_connections_per_ip: 64,
            listen_backlog: 4096,
            reserved_fds: 64,
            header_read_timeout: Duration::from_secs(5),
            upgrade_timeout: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(10),
            hello_max_frames: 4,
            hello_max_bytes: 16 * 1024,
            outbound_queue_bytes: 256 * 1024,
            relay_queue_bytes: RELAY_BUDGET_BYTES,
            requests: Rate {
                per_second: 20,
                burst: 50,
            },
            signals: Rate {
                per_second: 200,
                burst: 1000,
            },
            joins: Rate {
                per_second: 5,
                burst: 32,
            },
            relay_bytes: Rate {
                per_second: 32 * 1024 * 1024,
                burst: 8 * 1024 * 1024,
            },
        }
    }
}

/// Where clients get STUN/TURN from.
#[derive(Clone, Default)]
pub enum TurnMode {
    /// No TURN service: clients get only [`Config::ice_servers`].
    #[default]
    Disabled,
    /// Run the embedded STUN/TURN service and hand it to clients with minted credentials.
    Embedded(turn::TurnConfig),
    /// An external TURN server using coturn's REST scheme (`use-auth-secret`): clients get
    /// `urls` (plus the matching `stun:` URLs) with credentials minted from `secret`.
    External {
        /// `turn:host:port` URLs.
        urls: Vec<String>,
        /// The shared secret (coturn's `static-auth-secret`).
        secret: String,
    },
}

impl std::fmt::Debug for TurnMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TurnMode::Disabled => f.write_str("Disabled"),
            TurnMode::Embedded(c) => f
                .debug_struct("Embedded")
                .field("listen", &c.listen)
                .field("public_ip", &c.public_ip)
                .field("relay_ports", &c.relay_ports)
                .finish_non_exhaustive(),
            TurnMode::External { urls, .. } => f
                .debug_struct("External")
                .field("urls", urls)
                .finish_non_exhaustive(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            ice_servers: Vec::new(),
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(15),
            limits: Limits {
                max_frame_bytes: 65536 + 64,
                max_groups_per_client: 32,
                max_members_per_group: 64,
            },
            turn: TurnMode::Disabled,
            turn_credential_ttl: Duration::from_secs(3600),
            server_limits: ServerLimits::default(),
            admin_listen: None,
            auth: Auth::OpenOnLoopback,
            admin_secret: None,
            client_groups: true,
            ack_timeout: Duration::from_secs(30),
            resume_grace: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            reconnect_url: None,
        }
    }
}

/// State shared by every connection of one server.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) ice: ice::IceList,
    pub(crate) hub: Arc<hub::Hub>,
    pub(crate) metrics: Arc<metrics::Metrics>,
    /// Becomes `true` when the server shuts down.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Dropped (with the last `Arc<Shared>`) once every session has ended; `run` waits for that.
    _alive: mpsc::Sender<()>,
}

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    admin: Option<(TcpListener, SocketAddr)>,
    config: Config,
    turn: Option<turn::TurnHandle>,
    ice: ice::IceList,
    hub: Arc<hub::Hub>,
}

impl Server {
    /// Bind the TCP listener (`config.listen` may use port 0).
    pub async fn bind(mut config: Config) -> anyhow::Result<Server> {
        if config.auth == Auth::OpenOnLoopback && !config.listen.ip().is_loopback() {
            anyhow::bail!(
                "refusing to listen on {} without an auth secret: an open server lets anyone \
                 join any group under any name. Give --auth-secret (PEERMESH_AUTH_SECRET), or \
                 --auth open to run open anyway",
                config.listen
            );
        }
        if matches!(&config.auth, Auth::Secret(s) if s.is_empty()) {
            anyhow::bail!("the auth secret is empty");
        }
        // Clients must ping well within the timeout, whatever was set.
        config.heartbeat_interval = config.heartbeat_interval.min(config.heartbeat_timeout / 3);
        fit_to_fd_limit(&mut config);
        let listener = net::bind(config.listen, config.server_limits.listen_backlog)
            .with_context(|| format!("binding {}", config.listen))?;
        let local_addr = listener.local_addr().context("reading local address")?;
        let admin = match config.admin_listen {
            None => None,
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the admin listener {addr}"))?;
                let a = l.local_addr().context("reading the admin address")?;
                Some((l, a))
            }
        };
        let mut ice = ice::IceList {
            extra: config.ice_servers.clone(),
            turn: None,
        };
        let turn = match &config.turn {
            TurnMode::Disabled => None,
            TurnMode::Embedded(tc) => {
                let handle = turn::TurnServer::start(tc.clone())
                    .await
                    .context("starting the embedded STUN/TURN service")?;
                let addr = handle.local_addr();
                let host = ice::IceList::host_of(tc.public_ip.unwrap_or(addr.ip()));
                ice.turn = Some(ice::TurnAdvert {
                    urls: ice::IceList::urls_for(&host, addr.port()),
                    secret: tc.secret.clone(),
                    ttl: config.turn_credential_ttl,
                });
                Some(handle)
            }
            TurnMode::External { urls, secret } => {
                // coturn answers STUN on its TURN ports: offer the matching stun: URLs too.
                let mut all: Vec<String> = urls
                    .iter()
                    .filter_map(|u| u.strip_prefix("turn:"))
                    .map(|rest| format!("stun:{}", rest.split('?').next().unwrap_or(rest)))
                    .collect();
                all.extend(urls.iter().cloned());
                ice.turn = Some(ice::TurnAdvert {
                    urls: all,
                    secret: secret.clone(),
                    ttl: config.turn_credential_ttl,
                });
                None
            }
        };
        if matches!(&config.admin_secret, Some(s) if s.is_empty()) {
            anyhow::bail!("the admin secret is empty");
        }
        let hub = Arc::new(hub::Hub::new(&config));
        Ok(Server {
            listener,
            local_addr,
            admin,
            config,
            turn,
            ice,
            hub,
        })
    }

    /// The embedded STUN/TURN service, when [`TurnMode::Embedded`].
    pub fn turn(&self) -> Option<&turn::TurnHandle> {
        self.turn.as_ref()
    }

    /// The app's backend's handle: server-managed groups, sessions and events (see
    /// [`admin`]).
    pub fn admin(&self) -> Admin {
        Admin {
            hub: self.hub.clone(),
        }
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's address (`/metrics`, `/healthz`), when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, a)| *a)
    }

    /// The configuration in force (after fitting limits to the file-descriptor limit).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The WebSocket URL clients connect to: `ws://{local_addr}/ws`.
    pub fn ws_url(&self) -> String {
        ws_url(self.local_addr)
    }

    /// Serve until `shutdown` completes, then close every session (close code 1001) and return.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
        let turn = self.turn.clone();
        let metrics = Arc::new(metrics::Metrics::new());
        let limits = self.config.server_limits.clone();
        let (drain_timeout, reconnect_url) =
            (self.config.drain_timeout, self.config.reconnect_url.clone());
        let shared_hub = self.hub.clone();
        let shared = Arc::new(Shared {
            hub: self.hub.clone(),
            config: self.config,
            ice: self.ice,
            metrics: metrics.clone(),
            shutdown: shutdown_rx.clone(),
            _alive: alive_tx,
        });
        let app = Router::new()
            .route("/ws", get(ws_handler))
            .route("/healthz", get(|| async { "ok" }))
            .merge(static_routes())
            .with_state(shared.clone());
        let limiter = net::ConnLimiter::new(
            limits.max_connections,
            limits.max_connections_per_ip,
            metrics.clone(),
        );
        let front = net::FrontConfig {
            // Refusals in flight hold descriptors beyond `max_connections`: keep them within
            // half of the reserve.
            max_refusals_in_flight: (limits.reserved_fds / 2).max(1),
            header_read_timeout: limits.header_read_timeout,
            upgrade_timeout: limits.upgrade_timeout,
        };
        let mut tasks = tokio::task::JoinSet::new();
        if let Some((admin_listener, _)) = self.admin {
            let admin = admin_router(shared.clone(), turn.clone(), shutdown_rx.clone());
            let mut stop = shutdown_rx.clone();
            tasks.spawn(async move {
                let r = axum::serve(admin_listener, admin)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = r {
                    tracing::warn!("admin listener: {e}");
                }
            });
        }
        tasks.spawn(housekeeping(shared.clone(), shutdown_rx.clone()));
        drop(shared);
        let serving = net::serve(
            self.listener,
            app,
            limiter,
            front,
            metrics,
            shutdown_rx.clone(),
        );
        tokio::select! {
            () = serving => {}
            () = shutdown => {}
        }
        // The listener is closed now (`serving` is gone): drain, then close every session.
        if !drain_timeout.is_zero() {
            let mut left = shared_hub.drain(reconnect_url.as_deref(), drain_timeout);
            let waiting = *left.borrow();
            tracing::info!(sessions = waiting, "draining");
            let started = std::time::Instant::now();
            let drained = tokio::time::timeout(drain_timeout, async {
                let _ = left.wait_for(|n| *n == 0).await;
            })
            .await;
            match drained {
                Ok(()) => tracing::info!("drained in {:?}", started.elapsed()),
                Err(_) => tracing::warn!(
                    sessions = *left.borrow(),
                    "sessions not drained within {drain_timeout:?}"
                ),
            }
        }
        tracing::info!("shutting down");
        shared_hub.stop();
        let _ = shutdown_tx.send(true);
        while tasks.join_next().await.is_some() {}
        let result: anyhow::Result<()> = Ok(());
        // Every session holds the `Shared` (and so the `alive` sender); `recv` returns `None` once
        // the last one has closed.
        if tokio::time::timeout(SHUTDOWN_GRACE, alive_rx.recv())
            .await
            .is_err()
        {
            tracing::warn!("some sessions did not close within {SHUTDOWN_GRACE:?}");
        }
        if let Some(turn) = turn {
            turn.shutdown().await;
        }
        result.context("serving")
    }

    /// Run the server on a tokio task. Stop it with [`ServerHandle::shutdown`] or by dropping
    /// the handle.
    pub fn spawn(self) -> ServerHandle {
        let local_addr = self.local_addr;
        let admin_addr = self.admin_addr();
        let turn = self.turn.clone();
        let admin = self.admin();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(self.run(async move {
            // Completes on an explicit stop and when the handle is dropped.
            let _ = stop_rx.await;
        }));
        ServerHandle {
            local_addr,
            admin_addr,
            turn,
            admin,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }
}

/// A server running on a tokio task (see [`Server::spawn`]). Dropping it stops the server.
pub struct ServerHandle {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    turn: Option<turn::TurnHandle>,
    admin: Admin,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's address (`/metrics`, `/healthz`), when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The WebSocket URL clients connect to: `ws://{local_addr}/ws`.
    pub fn ws_url(&self) -> String {
        ws_url(self.local_addr)
    }

    /// The embedded STUN/TURN service, when [`TurnMode::Embedded`].
    pub fn turn(&self) -> Option<&turn::TurnHandle> {
        self.turn.as_ref()
    }

    /// The app's backend's handle (see [`Server::admin`]).
    pub fn admin(&self) -> Admin {
        self.admin.clone()
    }

    /// Stop the server gracefully and wait until it has stopped.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("server stopped with an error: {e:#}"),
                Err(e) => tracing::warn!("server task failed: {e}"),
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/ws")
}

/// The browser client (`/peermesh.js`, its TypeScript declarations) and the demo page (`/`),
/// compiled into the binary: (path, content type, bytes).
pub const STATIC_FILES: &[(&str, &str, &[u8])] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_bytes!("../static/index.html"),
    ),
    (
        "/index.html",
        "text/html; charset=utf-8",
        include_bytes!("../static/index.html"),
    ),
    (
        "/peermesh.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../static/peermesh.js"),
    ),
    (
        "/peermesh.d.ts",
        "application/typescript; charset=utf-8",
        include_bytes!("../static/peermesh.d.ts"),
    ),
    (
        "/demo.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../static/demo.js"),
    ),
    (
        "/demo.css",
        "text/css; charset=utf-8",
        include_bytes!("../static/demo.css"),
    ),
];

fn static_routes() -> Router<Arc<Shared>> {
    use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
    STATIC_FILES
        .iter()
        .fold(Router::new(), |router, &(path, content_type, body)| {
            router.route(
                path,
                get(move || async move {
                    (
                        [(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")],
                        body,
                    )
                }),
            )
        })
}

async fn ws_handler(
    ws: WebSocketUpgrade,
    headers: axum::http::HeaderMap,
    State(shared): State<Arc<Shared>>,
    conn_info: Option<axum::Extension<net::ConnInfo>>,
) -> Response {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(ice::host_from_header);
    let (ip, slot) = match conn_info {
        Some(axum::Extension(info)) => (Some(info.remote.ip()), Some(info.slot)),
        None => (None, None),
    };
    ws.max_message_size(HARD_FRAME_CAP)
        .max_frame_size(HARD_FRAME_CAP)
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            conn::run(socket, shared, host, ip).await;
            // The connection counts against the limits until the session has ended.
            drop(slot);
        })
}

/// The admin listener's routes: Prometheus metrics, a health check and the admin API.
fn admin_router(
    shared: Arc<Shared>,
    turn: Option<turn::TurnHandle>,
    shutdown: watch::Receiver<bool>,
) -> Router {
    use axum::http::header::CONTENT_TYPE;
    let api = admin::router(
        Admin {
            hub: shared.hub.clone(),
        },
        shared.config.admin_secret.clone(),
        shutdown,
    );
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let shared = shared.clone();
                let turn = turn.clone();
                async move {
                    let text = shared
                        .metrics
                        .render(shared.hub.snapshot(), turn.as_ref().map(|t| t.stats()));
                    (
                        [(
                            CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
        .merge(api)
}

/// Periodic work: give freed memory back to the system after sessions have ended.
async fn housekeeping(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ended = shared.hub.sessions_ended();
    let mut last_trim = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        shared.hub.expire_acks();
        shared.hub.expire_suspended();
        let ended = shared.hub.sessions_ended();
        // At most every 2 s however many clients come and go, and off the runtime's workers
        // (on a large heap the trim walks every arena under its lock).
        if ended != last_ended && last_trim.elapsed() >= Duration::from_secs(2) {
            last_ended = ended;
            last_trim = tokio::time::Instant::now();
            let _ = tokio::task::spawn_blocking(trim_heap).await;
        }
    }
}

/// Return free heap memory to the system (glibc keeps freed memory in its arenas otherwise, so
/// RSS would stay at its peak after many clients leave).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Lower `max_connections` and the embedded TURN's `total_quota` (one relay socket each) so
/// that, together with `reserved_fds`, they fit the process's file-descriptor limit (raised to
/// its hard limit first). Running out of descriptors would lock out new clients without an
/// answer and make TURN allocations fail.
fn fit_to_fd_limit(config: &mut Config) {
    let Some(limit) = raise_nofile_limit() else {
        return;
    };
    let limits = &mut config.server_limits;
    let available = limit.saturating_sub(limits.reserved_fds as u64) as usize;
    let turn_quota = match &mut config.turn {
        TurnMode::Embedded(tc) => Some(&mut tc.total_quota),
        _ => None,
    };
    let wanted = limits
        .max_connections
        .saturating_add(turn_quota.as_deref().copied().unwrap_or(0));
    if wanted <= available {
        return;
    }
    // Connections get three quarters of what is there, TURN allocations the rest.
    match turn_quota {
        Some(quota) => {
            let turn_share = (*quota).min(available / 4);
            let conn_share = limits.max_connections.min(available - turn_share);
            tracing::warn!(
                nofile = limit,
                "file-descriptor limit too low for max_connections = {} and turn.total_quota = {}: using {conn_share} and {turn_share}",
                limits.max_connections,
                *quota
            );
            *quota = turn_share.max(1);
            limits.max_connections = conn_share.max(1);
        }
        None => {
            tracing::warn!(
                nofile = limit,
                "file-descriptor limit too low for max_connections = {}: using {available}",
                limits.max_connections
            );
            limits.max_connections = available.max(1);
        }
    }
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force.
fn raise_nofile_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return None;
            }
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim.rlim_cur = lim.rlim_max;
                }
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
        Some(lim.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    None
}
