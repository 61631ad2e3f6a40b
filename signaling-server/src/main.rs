//! `peermesh-server`: signaling, relay and STUN/TURN for peermesh groups.
//!
//! Configuration layers, lowest first: the built-in defaults (`peermesh-server.toml`), a
//! `--config` file, environment variables and flags. `peermesh-server print-config` shows the
//! result.

use std::io::IsTerminal as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use peermesh_server::auth::{mint_token, Claims};
use peermesh_server::config::FileConfig;
use peermesh_server::turn::TurnServer;
use peermesh_server::{Server, TurnMode};
use tracing_subscriber::EnvFilter;

/// Signaling, relay and STUN/TURN server for peermesh groups.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// TOML configuration file (keys as in `print-config`; absent keys keep their defaults).
    #[arg(long, env = "PEERMESH_CONFIG", global = true)]
    config: Option<PathBuf>,

    /// Signaling address (WebSocket at /ws). Default 127.0.0.1:8080.
    #[arg(long, env = "PEERMESH_LISTEN", global = true)]
    listen: Option<SocketAddr>,

    /// Extra STUN server URL handed to clients (stun:host:port). Repeatable; the environment
    /// variable takes a comma-separated list.
    #[arg(
        long = "ice-server",
        value_name = "URL",
        env = "PEERMESH_ICE_SERVERS",
        value_delimiter = ',',
        global = true
    )]
    ice_servers: Vec<String>,

    /// Silence (ms) after which a client is dropped; clients ping every third of it.
    #[arg(long, global = true)]
    heartbeat_timeout_ms: Option<u64>,

    /// Admin listener (Prometheus /metrics, /healthz), IP:PORT or "off". Default 127.0.0.1:8081.
    #[arg(long, env = "PEERMESH_ADMIN_LISTEN", global = true)]
    admin_listen: Option<String>,

    /// Bearer secret of the admin API (/v1/groups, /v1/sessions, /v1/events on the admin
    /// listener); without it the admin API answers 401.
    #[arg(
        long,
        env = "PEERMESH_ADMIN_SECRET",
        global = true,
        hide_env_values = true
    )]
    admin_secret: Option<String>,

    /// On shutdown (SIGTERM), where clients should reconnect (ws:// or wss:// URL of another
    /// instance); default: this server's URL, once it is back.
    #[arg(long, env = "PEERMESH_RECONNECT_URL", global = true)]
    reconnect_url: Option<String>,

    /// Identity: every hello must carry a JWT signed HS256 with this secret by the app's
    /// backend (see `token`), and joins are limited to the token's groups.
    #[arg(
        long,
        env = "PEERMESH_AUTH_SECRET",
        global = true,
        hide_env_values = true
    )]
    auth_secret: Option<String>,

    /// "open": run without tokens even on a non-loopback address (anyone may join any group
    /// under any name). Without it and without --auth-secret the server listens on loopback only.
    #[arg(long, value_name = "MODE", global = true, value_parser = ["open"], conflicts_with = "auth_secret")]
    auth: Option<String>,

    /// `[limits]` keys as flags.
    #[command(flatten)]
    limits: peermesh_server::config::LimitsFile,

    /// Do not run or hand out any TURN service.
    #[arg(long, global = true, conflicts_with_all = ["turn_urls"])]
    no_turn: bool,

    /// UDP address of the embedded STUN/TURN service. Default: signaling IP, port 3478.
    #[arg(long, global = true)]
    turn_listen: Option<SocketAddr>,

    /// Public IP of this host behind 1:1 NAT (cloud VM): put in relay candidates and client URLs.
    #[arg(long, global = true)]
    turn_public_ip: Option<IpAddr>,

    /// Local IP relay sockets bind to. Default: the TURN listen IP.
    #[arg(long, global = true)]
    turn_relay_ip: Option<IpAddr>,

    /// UDP port range for relay sockets, A-B. Default 49152-65535.
    #[arg(long, global = true, value_name = "A-B")]
    turn_relay_ports: Option<String>,

    /// Realm of the TURN credentials. Default "peermesh".
    #[arg(long, global = true)]
    turn_realm: Option<String>,

    /// Shared secret for REST credentials (coturn's static-auth-secret). Default: random.
    #[arg(
        long,
        env = "PEERMESH_TURN_SECRET",
        global = true,
        hide_env_values = true
    )]
    turn_secret: Option<String>,

    /// Use this external TURN server (e.g. coturn with use-auth-secret) instead of the embedded
    /// one; needs --turn-secret. Repeatable.
    #[arg(long = "turn-url", value_name = "URL", global = true)]
    turn_urls: Vec<String>,

    /// Lifetime of the TURN credentials minted per client, in seconds. Default 3600.
    #[arg(long, global = true)]
    turn_credential_ttl_s: Option<u64>,

    /// Live TURN allocations per user. Default 16.
    #[arg(long, global = true)]
    turn_user_quota: Option<usize>,

    /// Live TURN allocations per source address (the UDP source, and the signaling session's
    /// address named in the credentials). Default 64.
    #[arg(long, env = "PEERMESH_TURN_IP_QUOTA", global = true)]
    turn_ip_quota: Option<usize>,

    /// Live TURN allocations in total. Default 2048.
    #[arg(long, global = true)]
    turn_total_quota: Option<usize>,

    /// Peer range TURN may relay to although the default policy refuses it (loopback, private,
    /// link-local, CGNAT, multicast). Repeatable, e.g. 127.0.0.0/8.
    #[arg(long = "turn-allow-peer", value_name = "CIDR", global = true)]
    turn_allow_peers: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run signaling and, unless switched off, the embedded STUN/TURN service (the default).
    Serve,
    /// Run only the STUN/TURN service (a TURN-only box; signaling servers elsewhere use it with
    /// --turn-url and the same --turn-secret).
    Turn,
    /// Print the effective configuration as TOML and exit.
    PrintConfig,
    /// Print a token for a user, signed with the auth secret (--auth-secret or
    /// PEERMESH_AUTH_SECRET), as the app's backend would mint it.
    Token {
        /// User id (stable; one live session per user).
        #[arg(long)]
        sub: String,
        /// Display name (default: the user id).
        #[arg(long)]
        name: Option<String>,
        /// Groups the user may join by itself (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Lifetime, e.g. 3600s, 90m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
        /// The device's own limit on direct connections.
        #[arg(long, value_parser = ["any", "relay", "none"])]
        direct: Option<String>,
    },
}

/// `90s`, `15m`, `1h`, `7d` (a bare number is seconds).
fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 90s, 15m, 1h, 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

impl Args {
    /// The configuration: built-in defaults < --config file < environment and flags.
    fn file_config(&self) -> anyhow::Result<FileConfig> {
        let mut config = FileConfig::defaults();
        if let Some(path) = &self.config {
            config.overlay(FileConfig::load(path)?);
        }
        let mut top = FileConfig {
            listen: self.listen,
            ice_servers: (!self.ice_servers.is_empty()).then(|| self.ice_servers.clone()),
            heartbeat_timeout_ms: self.heartbeat_timeout_ms,
            admin_listen: self.admin_listen.clone(),
            admin_secret: self.admin_secret.clone(),
            reconnect_url: self.reconnect_url.clone(),
            limits: self.limits.clone(),
            ..Default::default()
        };
        let t = &mut top.turn;
        if self.no_turn {
            t.mode = Some("off".into());
        } else if !self.turn_urls.is_empty() {
            t.mode = Some("external".into());
            t.urls = Some(self.turn_urls.clone());
        }
        t.listen = self.turn_listen;
        t.public_ip = self.turn_public_ip;
        t.relay_ip = self.turn_relay_ip;
        t.relay_ports = self.turn_relay_ports.clone();
        t.realm = self.turn_realm.clone();
        t.secret = self.turn_secret.clone();
        t.credential_ttl_s = self.turn_credential_ttl_s;
        t.user_quota = self.turn_user_quota;
        t.ip_quota = self.turn_ip_quota;
        t.total_quota = self.turn_total_quota;
        if !self.turn_allow_peers.is_empty() {
            t.allow_peers = Some(self.turn_allow_peers.clone());
        }
        top.auth.secret = self.auth_secret.clone();
        top.auth.mode = self.auth.clone();
        config.overlay(top);
        Ok(config)
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
    let file_config = args.file_config()?;
    let config = file_config.resolve().context("invalid configuration")?;
    // Install the signal handlers before binding so a signal right after startup is handled.
    let shutdown = shutdown_signal().context("installing signal handlers")?;

    match args.command.unwrap_or(Command::Serve) {
        Command::PrintConfig => print!("{}", file_config.to_toml()),
        Command::Token {
            sub,
            name,
            groups,
            ttl,
            direct,
        } => {
            let peermesh_server::Auth::Secret(secret) = &config.auth else {
                anyhow::bail!(
                    "`token` needs the auth secret: --auth-secret or PEERMESH_AUTH_SECRET"
                );
            };
            let mut claims = Claims::new(sub.clone(), name.unwrap_or(sub), groups, ttl);
            claims.direct = direct
                .map(|d| serde_json::from_value(serde_json::Value::String(d)))
                .transpose()?;
            println!("{}", mint_token(secret, &claims)?);
        }
        Command::Serve => {
            let server = Server::bind(config).await?;
            tracing::info!("listening on {}", server.ws_url());
            if let Some(admin) = server.admin_addr() {
                tracing::info!("admin (metrics, health) on http://{admin}");
            }
            if let Some(turn) = server.turn() {
                tracing::info!("STUN/TURN on udp {}", turn.local_addr());
            }
            server.run(shutdown).await?;
            tracing::info!("stopped");
        }
        Command::Turn => {
            let TurnMode::Embedded(turn_config) = config.turn else {
                anyhow::bail!("`turn` runs the embedded TURN service: do not combine it with --no-turn or --turn-url");
            };
            let turn = TurnServer::start(turn_config)
                .await
                .context("starting the STUN/TURN service")?;
            tracing::info!("STUN/TURN on udp {}", turn.local_addr());
            shutdown.await;
            turn.shutdown().await;
            tracing::info!("stopped");
        }
    }
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
