//! File-transfer benchmark: `Client::send_file` against plain reliable messages on the same
//! link, in the same run, on the direct path, the server path and through TURN.
//!
//! ```text
//! cargo run --release --example bench_files -- --runs 3
//! cargo run --release --example bench_files -- --quick
//! ```
//!
//! Runs a peermesh server in-process (with its embedded TURN service on loopback) and, for
//! each run and path, a fresh pair of clients that first moves `--mib` MiB as 16 KiB reliable
//! messages from A to B (the baseline), then a file of the same size from A's temporary
//! directory into B's (`send_file` → `accept_into`). Figures:
//!
//! * messages: MB/s from the first send until B has every byte;
//! * file: MB/s from B's `FileOffered` until B's `FileReceived` (streaming: chunks, their
//!   hashes, writing, VERIFIED, the whole-file check);
//! * file incl. hashing: MB/s from `send_file` until its outcome (the sender hashes the whole
//!   file before it offers it, so that a receiver can resume).
//!
//! Paths: direct (host candidates on loopback), server (`with_direct(false)`: relayed by the
//! signaling server, under its default relay rate limit of 32 MiB/s per session), TURN
//! (`with_relay_only(true)`: a direct WebRTC path through the embedded TURN relay). A path
//! change during a transfer is an error. Network: loopback only.
//!
//! Progress goes to stderr, the table to stdout. Every step has a time limit; a step that runs
//! out of time is named and the program exits with status 1.

mod support;
use support::*;

use std::path::{Path as FsPath, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Parser;
use peermesh::{Client, ClientConfig, Event, Events, Path, PeerId};
use peermesh_server::{Config as ServerConfig, Server};

#[derive(Parser, Debug)]
#[command(about = "File transfer vs reliable messages, per path")]
struct Args {
    /// Number of runs (default 3; 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Fast smoke mode: 1 run of 32 MiB.
    #[arg(long)]
    quick: bool,
    /// MiB per transfer (default 256; 32 with --quick).
    #[arg(long)]
    mib: Option<usize>,
    /// Time limit of each step, in seconds (a transfer gets one extra second per MiB).
    #[arg(long, default_value_t = 20)]
    step_timeout: u64,
}

/// The three paths, in table order.
const PATHS: [&str; 3] = ["direct", "server", "TURN"];

/// What one run on one path measured (MB/s).
struct Run {
    messages: f64,
    file: f64,
    file_with_hash: f64,
}

fn config(path: &str, name: &str) -> ClientConfig {
    let c = ClientConfig::new(name).with_loopback_only(true);
    match path {
        "server" => c.with_direct(false),
        "TURN" => c.with_relay_only(true),
        _ => c,
    }
}

/// Wait until `c` reports the wanted kind of path to `peer`.
async fn wait_path(c: &Client, peer: PeerId, path: &str, limit: Duration) -> Result<()> {
    step(&format!("the pair is on the {path} path"), limit, async {
        loop {
            // Not a co-member yet: the join's news has not reached this client.
            let ok = match (path, c.path(peer)) {
                ("server", Ok(Path::Server)) => true,
                ("direct", Ok(Path::Direct { .. })) => true,
                ("TURN", Ok(p @ Path::Direct { .. })) => p.to_string().contains("relay"),
                _ => false,
            };
            if ok {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Send `src` from `a` to `b`, received into `inbox`; returns (offer → received, send_file →
/// outcome) in seconds.
async fn file_transfer(
    a: &Client,
    a_id: PeerId,
    b_id: PeerId,
    eb: &mut Events,
    src: &FsPath,
    inbox: &FsPath,
    limit: Duration,
) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let transfer = a.send_file(b_id, src).await?;
    let outcome = tokio::spawn(transfer.outcome());
    let (offered, received) = step("file transfer", limit, async {
        let mut offered = None;
        loop {
            match eb
                .recv()
                .await
                .ok_or_else(|| anyhow!("B's event stream ended"))?
            {
                Event::FileOffered(offer) if offer.from == a_id => {
                    offered = Some(Instant::now());
                    offer.accept_into(inbox);
                }
                Event::FileReceived(f) => {
                    let offered = offered.ok_or_else(|| anyhow!("received before offered"))?;
                    if let Some(p) = &f.path {
                        let _ = std::fs::remove_file(p);
                    }
                    return Ok((offered, Instant::now()));
                }
                Event::FileFailed { error, .. } => bail!("B: {error}"),
                Event::PathChanged { peer, path } if peer == a_id => {
                    bail!("B's path to A changed to {path} during the transfer")
                }
                Event::Disconnected { reason } => bail!("disconnected: {reason}"),
                _ => {}
            }
        }
    })
    .await?;
    step("the sender's outcome", limit, async {
        Ok(outcome.await.context("outcome task")??)
    })
    .await?;
    Ok((
        (received - offered).as_secs_f64(),
        t0.elapsed().as_secs_f64(),
    ))
}

async fn run_path(
    url: &str,
    path: &str,
    i: usize,
    src: &FsPath,
    inbox: &FsPath,
    bytes: usize,
    step_limit: Duration,
) -> Result<Run> {
    let (a, mut ea) = connect(url, config(path, "files-a"), "A", step_limit).await?;
    let (b, mut eb) = connect(url, config(path, "files-b"), "B", step_limit).await?;
    let (a_id, b_id) = (a.peer_id(), b.peer_id());
    let group = format!("bench-files-{path}-{i}");
    step("A joins", step_limit, async { Ok(a.join(&group).await?) }).await?;
    step("B joins", step_limit, async { Ok(b.join(&group).await?) }).await?;
    wait_path(&a, b_id, path, step_limit).await?;
    wait_path(&b, a_id, path, step_limit).await?;
    // B's events up to here (joins, path changes) are read before the transfers begin.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), eb.recv()).await {}
    // A's events are not needed; keep its queue drained.
    let drain = tokio::spawn(async move { while ea.recv().await.is_some() {} });
    let limit = transfer_limit(step_limit, bytes);
    let messages = transfer(
        &a,
        a_id,
        b_id,
        &mut eb,
        bytes,
        "reliable messages",
        limit,
        step_limit,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (file_secs, with_hash_secs) =
        file_transfer(&a, a_id, b_id, &mut eb, src, inbox, limit).await?;
    a.close().await;
    b.close().await;
    drain.abort();
    Ok(Run {
        messages,
        file: bytes as f64 / 1e6 / file_secs,
        file_with_hash: bytes as f64 / 1e6 / with_hash_secs,
    })
}

async fn run(args: Args) -> Result<()> {
    let runs = args.runs.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let bytes = args.mib.unwrap_or(if args.quick { 32 } else { 256 }).max(1) << 20;
    let step_limit = Duration::from_secs(args.step_timeout.max(1));
    let server = Server::bind(ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        turn: peermesh_server::TurnMode::Embedded(peermesh_server::turn::TurnConfig {
            listen: "127.0.0.1:0".parse()?,
            relay_ports: (50700, 50799),
            allow_peers: vec!["127.0.0.0/8".parse()?],
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?
    .spawn();
    let url = server.ws_url();

    let dir: PathBuf =
        std::env::temp_dir().join(format!("peermesh-bench-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let inbox = dir.join("in");
    std::fs::create_dir_all(&inbox)?;
    let src = dir.join("bench.bin");
    let data: Vec<u8> = (0..bytes).map(|i| (i * 131 % 251) as u8).collect();
    std::fs::write(&src, &data)?;
    drop(data);
    eprintln!(
        "server at {url}; {runs} run(s) of {} MiB per path",
        bytes >> 20
    );

    let result = async {
        let mut results: [Vec<Run>; 3] = Default::default();
        for i in 0..runs {
            // Rotate which path goes first, so every path sees the same machine noise.
            for k in (0..3).map(|k| (k + i) % 3) {
                let path = PATHS[k];
                let r = run_path(&url, path, i, &src, &inbox, bytes, step_limit)
                    .await
                    .with_context(|| format!("run {}: {path} path", i + 1))?;
                eprintln!(
                    "run {}/{runs} {path}: messages {:.1} MB/s, file {:.1} MB/s ({:.1} with \
                     hashing)",
                    i + 1,
                    r.messages,
                    r.file,
                    r.file_with_hash
                );
                results[k].push(r);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok::<_, anyhow::Error>(results)
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let results = result?;

    println!(
        "File transfer of {} MiB vs reliable 16 KiB messages of the same size on the same link \
         (median of {runs} run(s), MB/s; ratio = file / messages; goal >= 0.90)\n",
        bytes >> 20
    );
    println!(
        "| path | messages | file (offer → received) | ratio | file incl. hashing | ratio | \
         ratio per run (min–max) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (k, path) in PATHS.iter().enumerate() {
        let med = |f: fn(&Run) -> f64| {
            stat(&results[k].iter().map(f).collect::<Vec<_>>()).map_or(f64::NAN, |s| s.median)
        };
        let (m, f, h) = (
            med(|r| r.messages),
            med(|r| r.file),
            med(|r| r.file_with_hash),
        );
        let per_run: Vec<f64> = results[k].iter().map(|r| r.file / r.messages).collect();
        let (lo, hi) = per_run.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), r| {
            (lo.min(*r), hi.max(*r))
        });
        println!(
            "| {path} | {m:.1} | {f:.1} | {:.2} | {h:.1} | {:.2} | {lo:.2}–{hi:.2} |",
            f / m,
            h / m
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()).await {
        eprintln!("bench_files: {e:#}");
        std::process::exit(1);
    }
}
