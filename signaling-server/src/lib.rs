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

mod conn;
mod hub;

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
    /// How often clients should ping (announced in `welcome`). Default 5 s.
    pub heartbeat_interval: Duration,
    /// Silence after which a client is dropped. Default 15 s.
    pub heartbeat_timeout: Duration,
    /// Limits enforced and announced in `welcome`.
    pub limits: Limits,
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
        }
    }
}

/// State shared by every connection of one server.
pub(crate) struct Shared {
    pub(crate) config: Config,
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
}

impl Server {
    /// Bind the TCP listener (`config.listen` may use port 0).
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let local_addr = listener.local_addr().context("reading local address")?;
        Ok(Server {
            listener,
            local_addr,
            config,
        })
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
        let shared = Arc::new(Shared {
            hub: hub::Hub::new(),
            config: self.config,
            shutdown: shutdown_rx,
            _alive: alive_tx,
        });
        let app = Router::new()
            .route("/ws", get(ws_handler))
            .route("/healthz", get(|| async { "ok" }))
            .route("/", get(index))
            .with_state(shared);

        let result = axum::serve(self.listener, app)
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
        result.context("serving")
    }

    /// Run the server on a tokio task. Stop it with [`ServerHandle::shutdown`] or by dropping
    /// the handle.
    pub fn spawn(self) -> ServerHandle {
        let local_addr = self.local_addr;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(self.run(async move {
            // Completes on an explicit stop and when the handle is dropped.
            let _ = stop_rx.await;
        }));
        ServerHandle {
            local_addr,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }
}

/// A server running on a tokio task (see [`Server::spawn`]). Dropping it stops the server.
pub struct ServerHandle {
    local_addr: SocketAddr,
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

async fn index() -> String {
    format!(
        "peermesh-server {}\nWebSocket endpoint: /ws (protocol v{})\nHealth check: /healthz\n",
        env!("CARGO_PKG_VERSION"),
        peermesh::protocol::PROTOCOL_VERSION
    )
}

async fn ws_handler(ws: WebSocketUpgrade, State(shared): State<Arc<Shared>>) -> Response {
    ws.max_message_size(HARD_FRAME_CAP)
        .max_frame_size(HARD_FRAME_CAP)
        .on_upgrade(move |socket| conn::run(socket, shared))
}
