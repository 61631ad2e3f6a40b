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

pub mod config;
mod conn;
mod hub;
mod ice;
pub mod turn;

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

/// Bytes forwarded from other clients (relay frames and `signal`s) that may be queued towards
/// one receiver before senders have to wait.
pub const RELAY_BUDGET_BYTES: usize = 4 * 1024 * 1024;

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
        }
    }
}

/// State shared by every connection of one server.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) ice: ice::IceList,
    pub(crate) hub: hub::Hub,
    /// Becomes `true` when the server shuts down.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Dropped (with the last `Arc<Shared>`) once every session has ended; `run` waits for that.
    _alive: mpsc::Sender<()>,
}

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    config: Config,
    turn: Option<turn::TurnHandle>,
    ice: ice::IceList,
}

impl Server {
    /// Bind the TCP listener (`config.listen` may use port 0).
    pub async fn bind(mut config: Config) -> anyhow::Result<Server> {
        // Clients must ping well within the timeout, whatever was set.
        config.heartbeat_interval = config.heartbeat_interval.min(config.heartbeat_timeout / 3);
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let local_addr = listener.local_addr().context("reading local address")?;
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
        Ok(Server {
            listener,
            local_addr,
            config,
            turn,
            ice,
        })
    }

    /// The embedded STUN/TURN service, when [`TurnMode::Embedded`].
    pub fn turn(&self) -> Option<&turn::TurnHandle> {
        self.turn.as_ref()
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
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
        let shared = Arc::new(Shared {
            hub: hub::Hub::new(),
            config: self.config,
            ice: self.ice,
            shutdown: shutdown_rx,
            _alive: alive_tx,
        });
        let app = Router::new()
            .route("/ws", get(ws_handler))
            .route("/healthz", get(|| async { "ok" }))
            .merge(static_routes())
            .with_state(shared);

        // Small frames (signals, acks, pings) must not wait for Nagle's algorithm: with Linux's
        // delayed acks that costs ~40 ms a round trip (measured: join → first message 42 ms).
        use axum::serve::ListenerExt as _;
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("TCP_NODELAY: {e}");
            }
        });
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                tracing::info!("shutting down");
                let _ = shutdown_tx.send(true);
            })
            .await;
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
        let turn = self.turn.clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(self.run(async move {
            // Completes on an explicit stop and when the handle is dropped.
            let _ = stop_rx.await;
        }));
        ServerHandle {
            local_addr,
            turn,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }
}

/// A server running on a tokio task (see [`Server::spawn`]). Dropping it stops the server.
pub struct ServerHandle {
    local_addr: SocketAddr,
    turn: Option<turn::TurnHandle>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The WebSocket URL clients connect to: `ws://{local_addr}/ws`.
    pub fn ws_url(&self) -> String {
        ws_url(self.local_addr)
    }

    /// The embedded STUN/TURN service, when [`TurnMode::Embedded`].
    pub fn turn(&self) -> Option<&turn::TurnHandle> {
        self.turn.as_ref()
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
) -> Response {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(ice::host_from_header);
    ws.max_message_size(HARD_FRAME_CAP)
        .max_frame_size(HARD_FRAME_CAP)
        .on_upgrade(move |socket| conn::run(socket, shared, host, None))
}
