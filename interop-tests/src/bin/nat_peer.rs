//! A peermesh group member for the NAT lab (`src/nat.rs`), run inside a lab namespace.
//!
//! `nat_peer --server ws://HOST:PORT/ws --group G --name N --count C --interval-ms I`
//!
//! Joins `G`, and to every member that joins sends `C` reliable messages (the big-endian
//! sequence numbers 1..=C, padded to 64 bytes), one every `I` ms. It checks that the messages it
//! receives arrive complete, in order and once. Everything it sees goes to stdout, one line each,
//! prefixed with milliseconds since start:
//!
//! ```text
//! <ms> ready <peer-id>
//! <ms> joined <name>
//! <ms> path <name> server | <ms> path <name> direct <local>/<remote> <local-addr> <remote-addr>
//! <ms> nodirect <name> <reason>
//! <ms> first <name> recv_server=<n>      (the first message; how many came by the server path)
//! <ms> done <name> <count>               (all messages received, in order)
//! <ms> sent <name> <count>               (all messages sent and acknowledged)
//! <ms> error <text>
//! ```
//!
//! Commands on stdin: `status` prints `<ms> status <name> <path> <stats...>` for each peer;
//! `quit` (or end of input) closes the client and exits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peermesh::{Client, ClientConfig, DirectBackend, Event, PeerId, Reliability};
use tokio::io::AsyncBufReadExt;

const PAYLOAD: usize = 64;

struct Args {
    server: String,
    group: String,
    name: String,
    count: u64,
    interval: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut server = None;
    let mut group = None;
    let mut name = None;
    let mut count = 2000u64;
    let mut interval = Duration::from_millis(5);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--server" => server = Some(value()?),
            "--group" => group = Some(value()?),
            "--name" => name = Some(value()?),
            "--count" => count = value()?.parse().map_err(|e| format!("--count: {e}"))?,
            "--interval-ms" => {
                interval = Duration::from_millis(
                    value()?
                        .parse()
                        .map_err(|e| format!("--interval-ms: {e}"))?,
                )
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        server: server.ok_or("--server is required")?,
        group: group.ok_or("--group is required")?,
        name: name.ok_or("--name is required")?,
        count,
        interval,
    })
}

/// Host candidates only on the lab's addresses (documentation and benchmarking ranges).
fn lab_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || (o[0], o[1], o[2]) == (203, 0, 113)
                || (o[0], o[1], o[2]) == (198, 51, 100)
                || (o[0], o[1], o[2]) == (192, 0, 2)
        }
        IpAddr::V6(_) => false,
    }
}

struct Out {
    start: Instant,
}

impl Out {
    fn line(&self, text: impl std::fmt::Display) {
        println!("{} {text}", self.start.elapsed().as_millis());
    }
}

fn path_line(client: &Client, peer: PeerId) -> String {
    match (client.path(peer), client.candidate_pair(peer)) {
        (Ok(path @ peermesh::Path::Direct { .. }), Ok(Some(pair))) => {
            format!("{path} {} {}", pair.local, pair.remote)
        }
        (Ok(path), _) => path.to_string(),
        (Err(e), _) => format!("unknown ({e})"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nat_peer: {e}");
            std::process::exit(2);
        }
    };
    let out = Arc::new(Out {
        start: Instant::now(),
    });
    // The direct-path backend from PEERMESH_DIRECT_BACKEND (the lab passes its environment on);
    // stderr is the peer's log.
    let backend = match std::env::var("PEERMESH_DIRECT_BACKEND") {
        Ok(name) => match name.parse::<DirectBackend>() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("nat_peer: PEERMESH_DIRECT_BACKEND: {e}");
                std::process::exit(2);
            }
        },
        Err(_) => DirectBackend::default(),
    };
    eprintln!("nat_peer: direct backend {backend}");
    let config = ClientConfig::new(args.name.clone())
        .with_ip_filter(lab_address)
        .with_direct_backend(backend);
    let (client, mut events) = match Client::connect(&args.server, config).await {
        Ok(c) => c,
        Err(e) => {
            out.line(format!("error connect: {e}"));
            std::process::exit(1);
        }
    };
    out.line(format!("ready {}", client.peer_id()));
    let names: Arc<Mutex<HashMap<PeerId, String>>> = Arc::default();
    // Next message expected from each peer.
    let expected: Arc<Mutex<HashMap<PeerId, u64>>> = Arc::default();

    // Commands from the lab.
    let (quit_tx, mut quit_rx) = tokio::sync::mpsc::channel::<()>(1);
    {
        let client = client.clone();
        let out = out.clone();
        let names = names.clone();
        let expected = expected.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match line.trim() {
                    "status" => {
                        let peers: Vec<(PeerId, String)> = names
                            .lock()
                            .unwrap()
                            .iter()
                            .map(|(p, n)| (*p, n.clone()))
                            .collect();
                        for (peer, name) in peers {
                            let stats = client
                                .link_stats(peer)
                                .map(|s| format!("{s:?}"))
                                .unwrap_or_else(|e| e.to_string());
                            let received = expected.lock().unwrap().get(&peer).map_or(0, |n| n - 1);
                            out.line(format!(
                                "status {name} {} | received={received} {stats}",
                                path_line(&client, peer)
                            ));
                        }
                        out.line("status-end");
                    }
                    "quit" => break,
                    other => out.line(format!("error unknown command {other:?}")),
                }
            }
            let _ = quit_tx.send(()).await;
        });
    }

    if let Err(e) = client.join(&args.group).await {
        out.line(format!("error join: {e}"));
        std::process::exit(1);
    }

    loop {
        let event = tokio::select! {
            e = events.recv() => match e {
                Some(e) => e,
                None => break,
            },
            _ = quit_rx.recv() => break,
        };
        match event {
            Event::MemberJoined { peer, name, .. } => {
                names.lock().unwrap().insert(peer, name.clone());
                out.line(format!("joined {name}"));
                let client = client.clone();
                let out = out.clone();
                let (count, interval) = (args.count, args.interval);
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(interval);
                    for seq in 1..=count {
                        tick.tick().await;
                        let mut msg = vec![0u8; PAYLOAD];
                        msg[..8].copy_from_slice(&seq.to_be_bytes());
                        if let Err(e) = client.send(peer, msg, Reliability::Reliable).await {
                            out.line(format!("error send {name} {seq}: {e}"));
                            return;
                        }
                    }
                    match client.flush().await {
                        Ok(()) => out.line(format!("sent {name} {count}")),
                        Err(e) => out.line(format!("error flush {name}: {e}")),
                    }
                });
            }
            Event::MemberLeft { peer, name, .. } => {
                names.lock().unwrap().remove(&peer);
                out.line(format!("left {name}"));
            }
            Event::PathChanged { peer, .. } => {
                let name = client.name_of(peer).unwrap_or_else(|| peer.to_string());
                out.line(format!("path {name} {}", path_line(&client, peer)));
            }
            Event::DirectFailed { peer, reason } => {
                let name = client.name_of(peer).unwrap_or_else(|| peer.to_string());
                out.line(format!("nodirect {name} {reason}"));
            }
            Event::Message {
                from,
                data,
                reliability: Reliability::Reliable,
                ..
            } => {
                let name = client.name_of(from).unwrap_or_else(|| from.to_string());
                let mut expected = expected.lock().unwrap();
                let next = expected.entry(from).or_insert(1);
                let seq = (data.len() == PAYLOAD)
                    .then(|| u64::from_be_bytes(data[..8].try_into().unwrap()));
                if seq != Some(*next) {
                    out.line(format!(
                        "error from {name}: expected message {next}, got {seq:?} ({} bytes)",
                        data.len()
                    ));
                    continue;
                }
                if *next == 1 {
                    let recv_server = client.link_stats(from).map(|s| s.recv_server).unwrap_or(0);
                    out.line(format!("first {name} recv_server={recv_server}"));
                }
                if *next == args.count {
                    out.line(format!("done {name} {}", args.count));
                }
                *next += 1;
            }
            Event::Message { .. } => {}
            Event::Disconnected { reason } => {
                out.line(format!("error disconnected: {reason}"));
                break;
            }
            other => out.line(format!("event {other:?}")),
        }
    }
    client.close().await;
}
