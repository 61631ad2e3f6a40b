//! `peermesh-server`: the peermesh signaling and relay server.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use peermesh::protocol::IceServer;
use peermesh_server::{Config, Server};
use tracing_subscriber::EnvFilter;

/// Signaling and relay server for peermesh groups.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "PEERMESH_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// ICE server URL handed to clients (e.g. stun:stun.example.org:3478). Repeatable; the
    /// environment variable takes a comma-separated list.
    #[arg(
        long = "ice-server",
        value_name = "URL",
        env = "PEERMESH_ICE_SERVERS",
        value_delimiter = ',',
        value_parser = parse_ice_url
    )]
    ice_servers: Vec<String>,

    /// Silence (ms) after which a client is dropped. Clients are asked to ping every third of it.
    #[arg(long, default_value_t = 15_000, value_parser = clap::value_parser!(u64).range(100..))]
    heartbeat_timeout_ms: u64,
}

fn parse_ice_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.starts_with("stun:") || s.starts_with("stuns:") {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a stun: URL (TURN servers need credentials and cannot be given here)"
        ))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();

    let args = Args::parse();
    // Install the signal handlers before binding so a signal right after startup is handled.
    let shutdown = shutdown_signal().context("installing signal handlers")?;

    let heartbeat_timeout = Duration::from_millis(args.heartbeat_timeout_ms);
    let config = Config {
        listen: args.listen,
        ice_servers: args
            .ice_servers
            .into_iter()
            .map(|url| IceServer {
                urls: vec![url],
                username: None,
                credential: None,
            })
            .collect(),
        heartbeat_interval: heartbeat_timeout / 3,
        heartbeat_timeout,
        ..Config::default()
    };
    let server = Server::bind(config).await?;
    tracing::info!("listening on {}", server.ws_url());
    server.run(shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// A future that completes on Ctrl-C or SIGTERM.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("received Ctrl-C"),
            _ = terminate.recv() => tracing::info!("received SIGTERM"),
        }
    })
}

/// A future that completes on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
