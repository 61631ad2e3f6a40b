//! One peermesh client for `examples/bench_wan.rs` (issue 16), run inside a lab namespace. It
//! joins a group with exactly one other member and, on commands, measures the direct path to it.
//!
//! `bench_peer --server ws://HOST:PORT/ws --group G --name N [--backend webrtc|sansio]
//! [--ice-ip IP] [--relay-only]`
//!
//! `--ice-ip` keeps host candidates to that address (`127.0.0.1`: loopback only); without it,
//! the lab's addresses. `--relay-only`: relay candidates only (the server's TURN service), so a
//! direct path is relay/relay. `--backend sansio` needs this crate's `sansio` feature.
//!
//! Output, one line each, prefixed with milliseconds since start:
//!
//! ```text
//! <ms> ready                                   connected to the server
//! <ms> joined                                  join returned
//! <ms> direct join_ms=<ms> path=<type>/<type> pair=<local>/<remote>
//!                                              first direct path (ms from the join call;
//!                                              candidate types, e.g. host/host, relay/relay)
//! <ms> rtt n=<n> p50_ms=<x> p99_ms=<x> server_frags=<n>
//! <ms> bulk bytes=<n> secs=<x> mb_per_s=<x> server_frags=<n>
//! <ms> unrel sent=<n> delivered=<n> p50_ms=<x> p99_ms=<x>   (printed by the receiver)
//! <ms> error <text>
//! ```
//!
//! Commands on stdin (to the sender): `rtt <n> <size>` (reliable ping-pong, the peer echoes),
//! `bulk <mib>` (16 KiB reliable messages, timed from the first send until the peer says it has
//! every byte), `unrel <n> <interval_ms> <size>` (unreliable messages carrying CLOCK_MONOTONIC;
//! the receiver prints one-way latencies; both processes read the same clock), `quit`.
//! `server_frags` counts fragments sent on the server path during the step (0 on a steady
//! direct path).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peermesh::{Client, ClientConfig, DirectBackend, Event, Path, PeerId, Reliability};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch};

const CHUNK: usize = 16 * 1024;

// First byte of every message.
const PING: u8 = b'P';
const PONG: u8 = b'p';
const BULK_HEAD: u8 = b'H';
const BULK_DATA: u8 = b'D';
const BULK_ACK: u8 = b'K';
const UNREL: u8 = b'U';
const UNREL_END: u8 = b'E';

struct Out {
    start: Instant,
}

impl Out {
    fn line(&self, text: impl std::fmt::Display) {
        println!("{} {text}", self.start.elapsed().as_millis());
    }
}

/// CLOCK_MONOTONIC in ns: one clock for every process of the machine, whatever its namespace.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
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

struct Args {
    server: String,
    group: String,
    name: String,
    backend: DirectBackend,
    ice_ip: Option<IpAddr>,
    relay_only: bool,
}

fn parse_args() -> Result<Args, String> {
    let (mut server, mut group, mut name) = (None, None, None);
    let mut backend = DirectBackend::Webrtc;
    let mut ice_ip = None;
    let mut relay_only = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--relay-only" {
            relay_only = true;
            continue;
        }
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--server" => server = Some(value()?),
            "--group" => group = Some(value()?),
            "--name" => name = Some(value()?),
            "--backend" => backend = value()?.parse().map_err(|e| format!("--backend: {e:?}"))?,
            "--ice-ip" => ice_ip = Some(value()?.parse().map_err(|e| format!("--ice-ip: {e}"))?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if backend == DirectBackend::SansIo && !cfg!(feature = "sansio") {
        return Err("--backend sansio: built without the `sansio` feature \
                    (cargo build -p peermesh-interop-tests --features sansio)"
            .into());
    }
    Ok(Args {
        server: server.ok_or("--server is required")?,
        group: group.ok_or("--group is required")?,
        name: name.ok_or("--name is required")?,
        backend,
        ice_ip,
        relay_only,
    })
}

/// What the event loop hands to the command task.
enum Reply {
    Pong(Vec<u8>),
    BulkAck,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench_peer: {e}");
            println!("0 error {e}");
            std::process::exit(2);
        }
    };
    let out = Arc::new(Out {
        start: Instant::now(),
    });
    let mut config = ClientConfig::new(args.name.clone())
        .with_direct_backend(args.backend)
        .with_relay_only(args.relay_only);
    config = match args.ice_ip {
        Some(ip) if ip.is_loopback() => config.with_loopback_only(true),
        Some(ip) => config.with_ip_filter(move |a| a == ip),
        None => config.with_ip_filter(lab_address),
    };
    let (client, mut events) = match Client::connect(&args.server, config).await {
        Ok(c) => c,
        Err(e) => {
            out.line(format!("error connect: {e}"));
            std::process::exit(1);
        }
    };
    out.line("ready");

    // The other member, once known.
    let (peer_tx, peer_rx) = watch::channel::<Option<PeerId>>(None);
    let (reply_tx, reply_rx) = mpsc::unbounded_channel::<Reply>();
    let (quit_tx, mut quit_rx) = mpsc::channel::<()>(1);
    tokio::spawn(commands(
        client.clone(),
        out.clone(),
        peer_rx,
        reply_rx,
        quit_tx,
    ));

    let joined_at = Instant::now();
    match client.join(&args.group).await {
        Ok(members) => {
            if let Some(m) = members.iter().find(|m| m.peer != client.peer_id()) {
                let _ = peer_tx.send(Some(m.peer));
            }
        }
        Err(e) => {
            out.line(format!("error join: {e}"));
            std::process::exit(1);
        }
    }
    out.line("joined");

    let mut direct_seen = false;
    // Bulk receiver: bytes still expected.
    let mut bulk_left: Option<u64> = None;
    // Unreliable receiver: one-way latencies (ms) so far.
    let mut unrel_lat: Vec<f64> = Vec::new();
    loop {
        let event = tokio::select! {
            e = events.recv() => match e {
                Some(e) => e,
                None => break,
            },
            _ = quit_rx.recv() => break,
        };
        match event {
            Event::MemberJoined { peer, .. } => {
                let _ = peer_tx.send(Some(peer));
            }
            Event::PathChanged { peer, path } => {
                if let (Path::Direct { local, remote }, false) = (path, direct_seen) {
                    direct_seen = true;
                    let pair = client
                        .candidate_pair(peer)
                        .ok()
                        .flatten()
                        .map(|p| format!("{}/{}", p.local, p.remote))
                        .unwrap_or_default();
                    out.line(format!(
                        "direct join_ms={:.2} path={}/{} pair={pair}",
                        joined_at.elapsed().as_secs_f64() * 1e3,
                        local.as_str(),
                        remote.as_str()
                    ));
                } else {
                    out.line(format!("path {path}"));
                }
            }
            Event::DirectFailed { reason, .. } => out.line(format!("nodirect {reason}")),
            Event::Message {
                from,
                data,
                reliability,
                ..
            } => {
                let Some(&tag) = data.first() else { continue };
                match tag {
                    PING => {
                        let mut echo = data.to_vec();
                        echo[0] = PONG;
                        if let Err(e) = client.send(from, echo, Reliability::Reliable).await {
                            out.line(format!("error echo: {e}"));
                        }
                    }
                    PONG => {
                        let _ = reply_tx.send(Reply::Pong(data.to_vec()));
                    }
                    BULK_HEAD if data.len() >= 9 => {
                        let total = u64::from_be_bytes(data[1..9].try_into().expect("8 bytes"));
                        bulk_left = Some(total);
                    }
                    BULK_DATA => {
                        if let Some(left) = bulk_left.as_mut() {
                            *left = left.saturating_sub(data.len() as u64);
                            if *left == 0 {
                                bulk_left = None;
                                if let Err(e) = client
                                    .send(from, vec![BULK_ACK], Reliability::Reliable)
                                    .await
                                {
                                    out.line(format!("error bulk ack: {e}"));
                                }
                            }
                        }
                    }
                    BULK_ACK => {
                        let _ = reply_tx.send(Reply::BulkAck);
                    }
                    UNREL if data.len() >= 13 && reliability == Reliability::Unreliable => {
                        let sent = u64::from_be_bytes(data[5..13].try_into().expect("8 bytes"));
                        unrel_lat.push(mono_ns().saturating_sub(sent) as f64 / 1e6);
                    }
                    UNREL_END if data.len() >= 5 => {
                        let sent = u32::from_be_bytes(data[1..5].try_into().expect("4 bytes"));
                        let mut lat = std::mem::take(&mut unrel_lat);
                        let delivered = lat.len();
                        let p50 = quantile(&mut lat, 0.5);
                        let p99 = quantile(&mut lat, 0.99);
                        out.line(format!(
                            "unrel sent={sent} delivered={delivered} p50_ms={p50:.3} \
                             p99_ms={p99:.3}"
                        ));
                    }
                    _ => {}
                }
            }
            Event::Disconnected { reason } => {
                out.line(format!("error disconnected: {reason}"));
                break;
            }
            _ => {}
        }
    }
    client.close().await;
}

fn server_frags(client: &Client, peer: PeerId) -> u64 {
    client.link_stats(peer).map(|s| s.sent_server).unwrap_or(0)
}

/// Runs the commands read from stdin, one at a time, each bounded in time.
async fn commands(
    client: Client,
    out: Arc<Out>,
    peer: watch::Receiver<Option<PeerId>>,
    mut replies: mpsc::UnboundedReceiver<Reply>,
    quit: mpsc::Sender<()>,
) {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"quit") {
            break;
        }
        let Some(to) = *peer.borrow() else {
            out.line("error no peer yet");
            continue;
        };
        let num = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
        // Whatever is left from an earlier, failed step.
        while replies.try_recv().is_ok() {}
        let before = server_frags(&client, to);
        let result = match (words.first().copied(), num(1), num(2), num(3)) {
            (Some("rtt"), Some(n), Some(size), _) => {
                tokio::time::timeout(
                    Duration::from_secs(120),
                    rtt(&client, to, &mut replies, n, size as usize),
                )
                .await
            }
            (Some("bulk"), Some(mib), _, _) => {
                tokio::time::timeout(
                    Duration::from_secs(120),
                    bulk(&client, to, &mut replies, mib << 20),
                )
                .await
            }
            (Some("unrel"), Some(n), Some(every), Some(size)) => {
                tokio::time::timeout(
                    Duration::from_secs(120),
                    unrel(&client, to, n, every, size as usize),
                )
                .await
            }
            _ => {
                out.line(format!("error unknown command {line:?}"));
                continue;
            }
        };
        let frags = server_frags(&client, to) - before;
        match result {
            Ok(Ok(text)) => out.line(format!("{text} server_frags={frags}")),
            Ok(Err(e)) => out.line(format!("error {}: {e}", words[0])),
            Err(_) => out.line(format!("error {}: timed out after 120 s", words[0])),
        }
    }
    let _ = quit.send(()).await;
}

async fn rtt(
    client: &Client,
    to: PeerId,
    replies: &mut mpsc::UnboundedReceiver<Reply>,
    n: u64,
    size: usize,
) -> Result<String, String> {
    let mut rtts = Vec::with_capacity(n as usize);
    // Two warm-up round trips first.
    for k in 0..n + 2 {
        let mut msg = vec![0u8; size.max(9)];
        msg[0] = PING;
        msg[1..9].copy_from_slice(&k.to_be_bytes());
        let t = Instant::now();
        client
            .send(to, msg.clone(), Reliability::Reliable)
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match replies.recv().await {
                Some(Reply::Pong(data)) if data[1..] == msg[1..] => break,
                Some(_) => continue,
                None => return Err("event loop ended".into()),
            }
        }
        if k >= 2 {
            rtts.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let p50 = quantile(&mut rtts, 0.5);
    let p99 = quantile(&mut rtts, 0.99);
    Ok(format!("rtt n={n} p50_ms={p50:.3} p99_ms={p99:.3}"))
}

async fn bulk(
    client: &Client,
    to: PeerId,
    replies: &mut mpsc::UnboundedReceiver<Reply>,
    bytes: u64,
) -> Result<String, String> {
    let count = bytes / CHUNK as u64;
    let total = count * CHUNK as u64;
    let mut head = vec![BULK_HEAD];
    head.extend_from_slice(&total.to_be_bytes());
    let mut chunk = vec![0x5a; CHUNK];
    chunk[0] = BULK_DATA;
    let chunk = bytes::Bytes::from(chunk);
    let t = Instant::now();
    client
        .send(to, head, Reliability::Reliable)
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..count {
        client
            .send(to, chunk.clone(), Reliability::Reliable)
            .await
            .map_err(|e| e.to_string())?;
    }
    loop {
        match replies.recv().await {
            Some(Reply::BulkAck) => break,
            Some(_) => continue,
            None => return Err("event loop ended".into()),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(format!(
        "bulk bytes={total} secs={secs:.4} mb_per_s={:.3}",
        total as f64 / 1e6 / secs
    ))
}

async fn unrel(
    client: &Client,
    to: PeerId,
    n: u64,
    every_ms: u64,
    size: usize,
) -> Result<String, String> {
    let mut tick = tokio::time::interval(Duration::from_millis(every_ms.max(1)));
    let mut refused = 0u32;
    for k in 0..n {
        tick.tick().await;
        let mut msg = vec![0u8; size.max(13)];
        msg[0] = UNREL;
        msg[1..5].copy_from_slice(&(k as u32).to_be_bytes());
        msg[5..13].copy_from_slice(&mono_ns().to_be_bytes());
        if client.try_send(to, msg, Reliability::Unreliable).is_err() {
            refused += 1;
        }
    }
    let sent = n as u32;
    // Let the stragglers arrive, then tell the receiver to report.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut end = vec![UNREL_END];
    end.extend_from_slice(&sent.to_be_bytes());
    client
        .send(to, end, Reliability::Reliable)
        .await
        .map_err(|e| e.to_string())?;
    Ok(format!("unrel-sent n={sent} refused={refused}"))
}
