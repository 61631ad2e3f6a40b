//! Group chat on peermesh.
//!
//! ```text
//! cargo run --release --example chat -- --server ws://127.0.0.1:8080/ws --group lobby --name alice
//! ```
//!
//! Each line typed on stdin is sent reliably to every other member of the group. stdout shows
//! one line per event:
//!
//! ```text
//! joined <name>
//! left <name>
//! path <name> server
//! path <name> direct <local-candidate-type>/<remote-candidate-type>
//! <name>: <text>
//! reconnecting (attempt <n>)
//! reconnected
//! rejoined <group>
//! ```
//!
//! When the connection to the server drops, the chat reconnects by itself (direct paths keep
//! working meanwhile) and lines typed in between are sent once the session is back; if the
//! server restarted, it joins the group again, and lines that may not have arrived are reported
//! on stderr.

use std::collections::HashMap;

use clap::Parser;
use peermesh::{Client, ClientConfig, Event, PeerId, Reliability};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser, Debug)]
#[command(about = "Group chat over peermesh")]
struct Args {
    /// Signaling server URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    server: String,
    /// Group to join.
    #[arg(long, default_value = "lobby")]
    group: String,
    /// Display name.
    #[arg(long)]
    name: String,
    /// Never use a direct path: every message goes through the server.
    #[arg(long)]
    no_direct: bool,
    /// Direct paths through TURN relays only (peers never see this host's addresses).
    #[arg(long)]
    relay_only: bool,
    /// Gather ICE host candidates on loopback only (everything on one machine).
    #[arg(long)]
    loopback_only: bool,
    /// Identity token from the app's backend (servers run with --auth-secret require one;
    /// `peermesh-server token --sub NAME --groups GROUP` prints one). Env PEERMESH_TOKEN.
    #[arg(long, env = "PEERMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = ClientConfig::new(&args.name)
        .with_direct(!args.no_direct)
        .with_relay_only(args.relay_only)
        .with_loopback_only(args.loopback_only);
    if let Some(token) = args.token {
        config = config.with_token(token);
    }
    let (client, mut events) = Client::connect(&args.server, config).await?;
    client.join(&args.group).await?;

    let mut names: HashMap<PeerId, String> = HashMap::new();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            line = stdin.next_line(), if stdin_open => match line? {
                Some(line) => {
                    // Never exit over one line: say it was not sent (e.g. between a server
                    // restart and the rejoin) and go on.
                    if let Err(e) = client.broadcast(&args.group, line.clone(), Reliability::Reliable).await {
                        eprintln!("not sent ({e}): {line}");
                    }
                }
                None => stdin_open = false,
            },
            event = events.recv() => match event {
                Some(event) => print_event(&client, &mut names, event),
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
        if !stdin_open {
            break;
        }
    }
    // Deliver what was typed before leaving (bounded: a peer may be gone).
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), client.flush()).await;
    client.close().await;
    Ok(())
}

fn print_event(client: &Client, names: &mut HashMap<PeerId, String>, event: Event) {
    let name_of = |names: &HashMap<PeerId, String>, peer: PeerId| {
        names
            .get(&peer)
            .cloned()
            .unwrap_or_else(|| format!("#{peer}"))
    };
    match event {
        Event::MemberJoined { peer, name, .. } => {
            println!("joined {name}");
            if let Ok(path) = client.path(peer) {
                println!("path {name} {path}");
            }
            names.insert(peer, name);
        }
        Event::MemberLeft { peer, name, .. } => {
            names.remove(&peer);
            println!("left {name}");
        }
        Event::PathChanged { peer, path } => println!("path {} {path}", name_of(names, peer)),
        Event::DirectFailed { peer, reason } => {
            println!("no direct path to {}: {reason}", name_of(names, peer))
        }
        Event::Message { from, data, .. } => {
            println!(
                "{}: {}",
                name_of(names, from),
                String::from_utf8_lossy(&data)
            )
        }
        Event::Reconnecting { attempt, .. } => println!("reconnecting (attempt {attempt})"),
        Event::Reconnected { .. } => println!("reconnected"),
        Event::Rejoined { group } => println!("rejoined {group}"),
        Event::Undelivered { peer, messages } => eprintln!(
            "{messages} message(s) to {} may not have arrived (the server restarted)",
            name_of(names, peer)
        ),
        Event::ServerError { code, message } => eprintln!("server error {code}: {message}"),
        Event::Disconnected { reason } => eprintln!("disconnected: {reason}"),
        other => eprintln!("{other:?}"),
    }
}
