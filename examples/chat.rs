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
//! received <file name> from <name> (<bytes> bytes, sha256 <hex>)
//! sent <file name> to <name>
//! ```
//!
//! `/send <name> <path>` sends a file to a member; files offered by others are accepted into
//! `--download-dir` (default: the current directory) under a safe name that overwrites nothing,
//! and a partial file left there by an interrupted transfer is continued when the same file is
//! sent again. Progress bars go to stderr.
//!
//! When the connection to the server drops, the chat reconnects by itself (direct paths keep
//! working meanwhile) and lines typed in between are sent once the session is back; if the
//! server restarted, it joins the group again, and lines that may not have arrived are reported
//! on stderr.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Parser;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use peermesh::{Client, ClientConfig, Event, PeerId, Reliability, TransferId};
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
    /// Where files sent to this member go (accepted automatically).
    #[arg(long, default_value = ".")]
    download_dir: PathBuf,
}

/// What the chat knows while it runs: members' names and the progress bars of files.
struct Chat {
    client: Client,
    names: HashMap<PeerId, String>,
    download_dir: PathBuf,
    bars: MultiProgress,
    receiving: HashMap<(PeerId, TransferId), ProgressBar>,
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

    let mut chat = Chat {
        client: client.clone(),
        names: HashMap::new(),
        download_dir: args.download_dir,
        bars: MultiProgress::new(),
        receiving: HashMap::new(),
    };
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            line = stdin.next_line(), if stdin_open => match line? {
                Some(line) if line.starts_with("/send ") || line == "/send" => chat.send_file(&line),
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
                Some(event) => chat.event(event),
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

fn name_of(names: &HashMap<PeerId, String>, peer: PeerId) -> String {
    names
        .get(&peer)
        .cloned()
        .unwrap_or_else(|| format!("#{peer}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn bar(bars: &MultiProgress, total: u64, label: String) -> ProgressBar {
    let bar = bars.add(ProgressBar::new(total));
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(label);
    bar
}

impl Chat {
    /// `/send <name> <path>`: send the file in the background, with a progress bar.
    fn send_file(&self, line: &str) {
        let mut words = line.splitn(3, ' ').skip(1);
        let (Some(to), Some(path)) = (words.next(), words.next()) else {
            eprintln!("usage: /send <name> <path>");
            return;
        };
        let path = PathBuf::from(path.trim());
        let Some(peer) = self
            .names
            .iter()
            .find(|(_, n)| n.as_str() == to)
            .map(|(p, _)| *p)
        else {
            eprintln!("not sent: nobody called {to} is here");
            return;
        };
        let (client, bars, to) = (self.client.clone(), self.bars.clone(), to.to_string());
        tokio::spawn(async move {
            let file = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let transfer = match client.send_file(peer, &path).await {
                Ok(t) => t,
                Err(e) => return eprintln!("not sent {} to {to}: {e}", path.display()),
            };
            let mut progress = transfer.progress();
            let bar = bar(&bars, progress.borrow().total, format!("{file} to {to}"));
            let outcome = transfer.outcome();
            tokio::pin!(outcome);
            let result = loop {
                tokio::select! {
                    r = &mut outcome => break r,
                    changed = progress.changed() => {
                        if changed.is_ok() {
                            bar.set_position(progress.borrow().done);
                        }
                    }
                }
            };
            bar.finish_and_clear();
            match result {
                Ok(_) => println!("sent {file} to {to}"),
                Err(e) => eprintln!("not sent {file} to {to}: {e}"),
            }
        });
    }

    fn event(&mut self, event: Event) {
        let (client, names) = (&self.client, &mut self.names);
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
            Event::FileOffered(offer) => {
                let label = format!("{} from {}", offer.name, name_of(names, offer.from));
                let bar = bar(&self.bars, offer.size, label);
                self.receiving.insert((offer.from, offer.transfer), bar);
                offer.accept_into(&self.download_dir);
            }
            Event::FileProgress {
                transfer,
                peer,
                done,
                ..
            } => {
                if let Some(bar) = self.receiving.get(&(peer, transfer)) {
                    bar.set_position(done);
                }
            }
            Event::FileReceived(f) => {
                if let Some(bar) = self.receiving.remove(&(f.from, f.transfer)) {
                    bar.finish_and_clear();
                }
                println!(
                    "received {} from {} ({} bytes, sha256 {})",
                    f.name,
                    name_of(names, f.from),
                    f.size,
                    hex(&f.sha256)
                );
            }
            Event::FileFailed {
                transfer,
                peer,
                error,
            } => {
                if let Some(bar) = self.receiving.remove(&(peer, transfer)) {
                    bar.abandon();
                }
                eprintln!("file from {} failed: {error}", name_of(names, peer));
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
}
