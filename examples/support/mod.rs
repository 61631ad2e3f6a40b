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
