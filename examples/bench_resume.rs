//! Loopback benchmark: how fast sessions come back (issue "Sessions that survive").
//!
//! ```text
//! cargo run --release --example bench_resume
//! cargo run --release --example bench_resume -- --rounds 10 --clients 20
//! ```
//!
//! Each round, in one process, against a peermesh server (the library) on 127.0.0.1, every
//! figure next to a baseline measured in the same round:
//!
//! * **resume after a reset**: one client's TCP connection is closed under it (a proxy in this
//!   process drops both sockets: no WebSocket close frame) while two clients stream 1000
//!   reliable messages each way on the server path; time from the reset to
//!   `Reconnected { resumed: true }`, against a fresh `Client::connect` (hello → welcome);
//! * **resume after a silent cut**: the proxy stops forwarding and closes nothing; time from the
//!   cut to the resume, against the heartbeat timeout (1 s here) that detection has to wait for;
//! * **frames re-sent per resume** (the resumed client's `LinkStats::resent`), and the time until
//!   both streams are complete;
//! * **restart → rejoined**: `--clients` clients in one group, the server shut down and bound
//!   again on the same address; time from the new bind until every client has `Rejoined` and
//!   sees every other member, against the same clients connecting and joining afresh.
//!
//! Network: loopback only. Every step has a time limit; the run as a whole has `--max-seconds`.
//! Progress goes to stderr, the table to stdout.

mod support;
use support::*;

#[path = "../tests/common/proxy.rs"]
mod proxy;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use peermesh::{Client, ClientConfig, Event, Events, PeerId, Reconnect, Reliability};
use peermesh_server::{Config, Server, ServerHandle};

#[derive(Parser, Debug)]
#[command(about = "How fast peermesh sessions come back after a cut or a server restart")]
struct Args {
    /// Rounds (figures are medians and 95th percentiles over them).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Clients in the restart scenario.
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Give up after this long.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
}

const LIMIT: Duration = Duration::from_secs(30);
const STREAM: u32 = 1000;

fn config(name: &str) -> ClientConfig {
    ClientConfig::new(name)
        .with_direct(false)
        .with_reconnect(Some(Reconnect {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(200),
            max_attempts: None,
        }))
}

async fn server_on(listen: &str) -> Result<ServerHandle> {
    Ok(Server::bind(Config {
        listen: listen.parse()?,
        heartbeat_timeout: Duration::from_secs(1),
        ..Config::default()
    })
    .await?
    .spawn())
}

async fn wait_for(
    events: &mut Events,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Result<Instant> {
    step(what, LIMIT, async {
        while let Some(e) = events.recv().await {
            if pred(&e) {
                return Ok(Instant::now());
            }
        }
        bail!("event stream ended")
    })
    .await
}

/// Receive `STREAM` numbered messages from `from`, in order; returns when the session was
/// last resumed (`Reconnected { resumed: true }`), if it was.
async fn drain(events: &mut Events, from: PeerId) -> Result<Option<Instant>> {
    step("stream", LIMIT, async {
        let (mut next, mut resumed) = (0u32, None);
        while next < STREAM {
            match events.recv().await {
                Some(Event::Message { from: f, data, .. }) if f == from => {
                    if data.as_ref() != next.to_be_bytes() {
                        bail!("message {next} out of order");
                    }
                    next += 1;
                }
                Some(Event::Reconnected { resumed: true, .. }) => resumed = Some(Instant::now()),
                Some(Event::Reconnected { .. }) => bail!("a new session, not a resume"),
                Some(_) => {}
                None => bail!("event stream ended"),
            }
        }
        Ok(resumed)
    })
    .await
}

struct Cut {
    resumed_ms: f64,
    complete_ms: f64,
    resent: f64,
    baseline_ms: f64,
}

/// One pair, `a` behind the proxy; `silent` cuts, else resets; returns the figures.
async fn cut_round(silent: bool) -> Result<Cut> {
    let server = server_on("127.0.0.1:0").await?;
    let proxy = proxy::Proxy::start("127.0.0.1:0".parse()?, server.local_addr()).await;
    let t = Instant::now();
    let (a, mut ae) = connect(&proxy.url(), config("a"), "a", LIMIT).await?;
    let baseline_ms = ms(t.elapsed());
    let (b, mut be) = connect(&server.ws_url(), config("b"), "b", LIMIT).await?;
    a.join("g").await?;
    b.join("g").await?;
    let (ia, ib) = (a.peer_id(), b.peer_id());
    wait_for(&mut ae, "b joins", |e| {
        matches!(e, Event::MemberJoined { .. })
    })
    .await?;
    wait_for(&mut be, "a is there", |e| {
        matches!(e, Event::MemberJoined { .. })
    })
    .await?;
    let send = |c: Client, to: PeerId| {
        tokio::spawn(async move {
            for n in 0..STREAM {
                c.send(to, n.to_be_bytes().to_vec(), Reliability::Reliable)
                    .await?;
                if n % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            Ok::<_, peermesh::Error>(())
        })
    };
    let (sa, sb) = (send(a.clone(), ib), send(b.clone(), ia));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut = Instant::now();
    if silent {
        proxy.cut();
    } else {
        proxy.reset();
    }
    let (da, db) = tokio::join!(drain(&mut ae, ib), drain(&mut be, ia));
    db?;
    let resumed = match da? {
        Some(t) => t,
        // The streams may finish first: the resume still has to come.
        None => {
            wait_for(&mut ae, "resumed", |e| {
                matches!(e, Event::Reconnected { resumed: true, .. })
            })
            .await?
        }
    };
    sa.await??;
    sb.await??;
    let complete_ms = ms(cut.elapsed());
    let resent = a.link_stats(ib)?.resent as f64;
    a.close().await;
    b.close().await;
    server.shutdown().await;
    Ok(Cut {
        resumed_ms: ms(resumed - cut),
        complete_ms,
        resent,
        baseline_ms,
    })
}

/// `n` clients in one group; the server restarts; returns (restart → all rejoined, baseline:
/// all connect and join afresh), in ms.
async fn restart_round(n: usize) -> Result<(f64, f64)> {
    let server = server_on("127.0.0.1:0").await?;
    let addr = server.local_addr();
    let t = Instant::now();
    let mut clients = Vec::new();
    for i in 0..n {
        let (c, e) = connect(&server.ws_url(), config(&format!("c{i}")), "client", LIMIT).await?;
        c.join("g").await?;
        clients.push((c, e));
    }
    let baseline = ms(t.elapsed());
    server.shutdown().await;
    let again = server_on(&addr.to_string()).await?;
    let back = Instant::now();
    for (c, e) in clients.iter_mut() {
        wait_for(e, "rejoined", |e| matches!(e, Event::Rejoined { .. })).await?;
        step("all members", LIMIT, async {
            while c.members("g").map(|m| m.len()).unwrap_or(0) < n - 1 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(())
        })
        .await?;
    }
    let rejoined = ms(back.elapsed());
    for (c, _) in &clients {
        c.close().await;
    }
    again.shutdown().await;
    Ok((rejoined, baseline))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let run = async {
        let (mut reset, mut silent, mut restart) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=args.rounds {
            eprintln!("round {round}/{}", args.rounds);
            reset.push(cut_round(false).await?);
            silent.push(cut_round(true).await?);
            restart.push(restart_round(args.clients).await?);
        }
        Ok::<_, anyhow::Error>((reset, silent, restart))
    };
    let (reset, silent, restart) =
        match tokio::time::timeout(Duration::from_secs(args.max_seconds), run).await {
            Ok(r) => r?,
            Err(_) => bail!("gave up after {} s", args.max_seconds),
        };
    let col = |v: &[Cut], f: fn(&Cut) -> f64| stat(&v.iter().map(f).collect::<Vec<_>>());
    let heartbeat = stat(&[1000.0]);
    println!(
        "| figure ({} rounds) | median | p95 | baseline median | baseline p95 | ratio |",
        args.rounds
    );
    println!("|---|---|---|---|---|---|");
    let rows = [
        (
            "resume after a reset, ms (baseline: connect)".to_string(),
            col(&reset, |c| c.resumed_ms),
            col(&reset, |c| c.baseline_ms),
            1,
        ),
        (
            "resume after a silent cut, ms (baseline: heartbeat timeout)".to_string(),
            col(&silent, |c| c.resumed_ms),
            heartbeat,
            1,
        ),
        (
            "streams complete after a reset, ms (baseline: connect)".to_string(),
            col(&reset, |c| c.complete_ms),
            col(&reset, |c| c.baseline_ms),
            1,
        ),
        (
            "frames re-sent per resume (reset / silent cut)".to_string(),
            col(&reset, |c| c.resent),
            col(&silent, |c| c.resent),
            0,
        ),
        (
            format!(
                "restart → {} clients rejoined, ms (baseline: they connect and join)",
                args.clients
            ),
            stat(&restart.iter().map(|r| r.0).collect::<Vec<_>>()),
            stat(&restart.iter().map(|r| r.1).collect::<Vec<_>>()),
            1,
        ),
    ];
    for (figure, a, b, prec) in rows {
        println!("{}", row(&figure, a, b, prec));
    }
    Ok(())
}
