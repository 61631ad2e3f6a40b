//! Helpers shared by the benchmark programs (`bench.rs`, `bench_turn.rs`).
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use bytes::Bytes;
use peermesh::{Client, ClientConfig, Event, Events, PeerId, Reliability};
use tokio::task::JoinHandle;

/// Size of an RTT probe (bytes).
pub const PING_SIZE: usize = 32;

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Run `fut` with a time limit; errors name the step.
pub async fn step<T>(
    name: &str,
    limit: Duration,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.with_context(|| format!("step `{name}` failed")),
        Err(_) => bail!("step `{name}` timed out after {limit:?}"),
    }
}

pub async fn connect(
    url: &str,
    config: ClientConfig,
    who: &str,
    limit: Duration,
) -> Result<(Client, Events)> {
    step(&format!("connect {who}"), limit, async {
        Ok(Client::connect(url, config).await?)
    })
    .await
}

/// Echo every reliable message back to its sender until the event stream ends.
pub fn spawn_echo(client: Client, mut events: Events) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let Event::Message {
                from,
                data,
                reliability: Reliability::Reliable,
                ..
            } = ev
            {
                if client
                    .send(from, data, Reliability::Reliable)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    })
}

pub fn probe(n: usize) -> Bytes {
    let mut buf = vec![0u8; PING_SIZE];
    buf[..8].copy_from_slice(&(n as u64).to_le_bytes());
    Bytes::from(buf)
}

/// Ping-pong `warmup + samples` reliable probes to `peer` (which echoes them); returns the last
/// `samples` round-trip times in ms. A path change during the step is an error.
pub async fn ping_pong(
    client: &Client,
    peer: PeerId,
    events: &mut Events,
    warmup: usize,
    samples: usize,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(samples);
    for n in 0..warmup + samples {
        let payload = probe(n);
        let t = Instant::now();
        client
            .send(peer, payload.clone(), Reliability::Reliable)
            .await?;
        loop {
            match events
                .recv()
                .await
                .ok_or_else(|| anyhow!("event stream ended"))?
            {
                Event::Message { from, data, .. } if from == peer => {
                    ensure!(data == payload, "echo {n} does not match the probe");
                    break;
                }
                Event::PathChanged { peer: q, path } if q == peer => {
                    bail!("path changed to {path} during the RTT step")
                }
                Event::Disconnected { reason } => bail!("disconnected: {reason}"),
                _ => {}
            }
        }
        let rtt = ms(t.elapsed());
        if n >= warmup {
            out.push(rtt);
        }
    }
    Ok(out)
}

/// Bytes per message in the throughput step.
pub const CHUNK: usize = 16 * 1024;

/// `bytes` (rounded down to whole 16 KiB messages) of reliable messages from `a` to `b_id`,
/// received on `eb`; returns MB/s. A path change during the transfer is an error.
#[allow(clippy::too_many_arguments)]
pub async fn transfer(
    a: &Client,
    a_id: PeerId,
    b_id: PeerId,
    eb: &mut Events,
    bytes: usize,
    name: &str,
    limit: Duration,
    step_limit: Duration,
) -> Result<f64> {
    let msg = Bytes::from(vec![0x5a; CHUNK]);
    let count = bytes / CHUNK;
    let total = count * CHUNK;
    let t = Instant::now();
    let sender = {
        let a = a.clone();
        tokio::spawn(async move {
            for _ in 0..count {
                a.send(b_id, msg.clone(), Reliability::Reliable).await?;
            }
            Ok::<_, peermesh::Error>(())
        })
    };
    let mut got = 0usize;
    let received = step(name, limit, async {
        while got < total {
            match eb
                .recv()
                .await
                .ok_or_else(|| anyhow!("B's event stream ended"))?
            {
                Event::Message { from, data, .. } if from == a_id => got += data.len(),
                Event::PathChanged { peer, path } if peer == a_id => {
                    bail!("B's path to A changed to {path} during the transfer")
                }
                Event::Disconnected { reason } => bail!("disconnected: {reason}"),
                _ => {}
            }
        }
        Ok(())
    })
    .await;
    let secs = t.elapsed().as_secs_f64();
    if received.is_err() {
        sender.abort();
    }
    received?;
    step("throughput sender finishes", step_limit, async {
        Ok(sender.await.context("sender task")??)
    })
    .await?;
    Ok(total as f64 / 1e6 / secs)
}

/// Median and 95th percentile (nearest rank).
#[derive(Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub p95: f64,
}

pub fn stat(values: &[f64]) -> Option<Stat> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let rank = ((0.95 * n as f64).ceil() as usize).clamp(1, n);
    Some(Stat {
        median,
        p95: v[rank - 1],
    })
}

/// A table row: figure, then median/p95 of `a` and of `b`, then the ratio of the medians a/b.
pub fn row(figure: &str, a: Option<Stat>, b: Option<Stat>, prec: usize) -> String {
    let f = |x: Option<f64>| x.map_or_else(|| "–".to_string(), |x| format!("{x:.prec$}"));
    let ratio = match (a, b) {
        (Some(a), Some(b)) if b.median > 0.0 => format!("{:.2}", a.median / b.median),
        _ => "–".to_string(),
    };
    format!(
        "| {figure} | {} | {} | {} | {} | {ratio} |",
        f(a.map(|s| s.median)),
        f(a.map(|s| s.p95)),
        f(b.map(|s| s.median)),
        f(b.map(|s| s.p95)),
    )
}

/// Time limit for moving `bytes` through the throughput step: `step` plus a second per MiB.
pub fn transfer_limit(step_limit: Duration, bytes: usize) -> Duration {
    step_limit + Duration::from_secs((bytes >> 20) as u64)
}

/// The two measured steps of a pair run, on whatever path the pair is on (`path` names it in
/// errors): RTT (B pings, A's event loop echoes) then throughput A → B. Consumes A's events for
/// the echo task, which is stopped before returning. Returns (RTT samples in ms, MB/s).
#[allow(clippy::too_many_arguments)]
pub async fn rtt_and_throughput(
    a: &Client,
    a_id: PeerId,
    ea: Events,
    b: &Client,
    b_id: PeerId,
    eb: &mut Events,
    path: &str,
    warmup: usize,
    rtt_samples: usize,
    bytes: usize,
    step_limit: Duration,
) -> Result<(Vec<f64>, f64)> {
    let echo = spawn_echo(a.clone(), ea);
    let result = async {
        let rtt = step(
            &format!("{path} RTT"),
            step_limit,
            ping_pong(b, a_id, eb, warmup, rtt_samples),
        )
        .await?;
        let mbps = transfer(
            a,
            a_id,
            b_id,
            eb,
            bytes,
            &format!("{path} throughput"),
            transfer_limit(step_limit, bytes),
            step_limit,
        )
        .await?;
        Ok((rtt, mbps))
    }
    .await;
    echo.abort();
    result
}
