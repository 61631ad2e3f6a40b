//! Direct-path benchmark through the WAN emulator (issue 16): peermesh's two direct-path
//! backends (`webrtc` 0.17, `sansio` on `rtc` 0.21) and libdatachannel (node-datachannel) as the
//! outside baseline, in one run, alternating webrtc, sansio, ndc, webrtc, sansio, ndc, …
//!
//! ```text
//! cargo build --release -p peermesh-interop-tests --features sansio --bins
//! cargo run --release --example bench_wan -- --runs 3      # as root; --quick for a smoke run
//! ```
//!
//! Needs root (network namespaces, TAP devices), node with `interop-tests/setup/ndc.sh` run,
//! and the lab's programs built in release next to this example (`bench_peer` with the `sansio`
//! feature, `nat_server`, `nat_probe`, `wan_link`; `--bins DIR` to take them from elsewhere).
//!
//! Setup: one [`Lab::wan_pair`]: namespaces A (198.18.200.1) and B (198.18.200.2) joined by
//! `wan_link`. The peermesh server runs in A on 198.18.200.1, so A's signaling stays in A and
//! B's crosses the emulated link (as the ndc pair's signaling does: its offerer listens in A).
//! Each scenario sets both directions of the link (one-way delay = RTT/2, loss per direction,
//! no rate limit, different loss seeds per direction and run), then runs each backend once:
//!
//! * peermesh: a `bench_peer` in B joins the group, then one in A; A reports join → direct
//!   (ms from its `join` call to `PathChanged { Direct }`), then drives: reliable RTT (64 B
//!   ping-pong), reliable bulk A → B (16 KiB messages, first send until B says it has every
//!   byte), unreliable one-way latency A → B (200 B every 5 ms, CLOCK_MONOTONIC in the
//!   message). Host candidates only on the pair's address.
//! * ndc: `interop-tests/ndc/ndc_peer.mjs`, offerer in A and answerer in B: open (PeerConnection
//!   created → "r" open, with the SDP exchange over the link), RTT, bulk, unreliable — the same
//!   sizes and counts.
//!
//! CPU per MB: utime+stime (`/proc/<pid>/stat`) of both peer processes over the bulk transfer.
//! The ndc processes are only visible once reaped, so their figure is (CPU of the bulk pair −
//! CPU of the RTT pair, which did the same startup and open) / MB, from this process's
//! `cutime+cstime`. The emulator's CPU over the transfer is printed separately, with its share of
//! the transfer's wall time: near 100 % means the row measures the emulator.
//!
//! The loopback scenario runs both peers in namespace A on 127.0.0.1 (no emulator).
//!
//! The TURN scenario (`turn`): relay-only throughput and RTT through our TURN. A second
//! peermesh server runs in namespace A on 127.0.0.1 with its embedded STUN/TURN service
//! (127.0.0.1:3478, relay ports 50500-50599, peers in 127.0.0.0/8 allowed); both `bench_peer`s
//! run there with `--relay-only`, so the direct path is relay/relay through that service (the
//! step fails unless both peers report `path=relay/relay`). webrtc and sansio only, with the
//! loopback scenario's sizes; the ndc column is n/a.
//!
//! Direct-path figures only: an RTT or bulk step during which peermesh sent anything on the
//! server path is left out of the medians (and listed under the table); a cell then shows how
//! many runs it has, e.g. `(2/3)`.
//!
//! Medians over the runs; ratios are between columns of the same run set. No speed figure is an
//! assertion. Every step is bounded in time; a failed step is counted and the run continues. The
//! lab removes its namespaces and processes on exit, error or Ctrl-C.
//!
//! The WAN pair has no TURN server: relay-only is measured on loopback only (see also
//! `examples/bench_turn.rs` for the webrtc backend's relay).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path as FsPath, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Parser;
use peermesh_interop_tests::nat::{Lab, Line, Proc, Programs, WanPair, TURN_PORT, WS_PORT};
use peermesh_interop_tests::ndc::{run_pair_with, NdcFigures, NdcOptions, NdcTest};
use peermesh_interop_tests::wan::Impairment;

#[derive(Parser, Debug)]
#[command(about = "Direct path through the WAN emulator: webrtc vs sansio vs libdatachannel")]
struct Args {
    /// Runs (each runs every scenario with every backend, alternating).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Smaller transfers and fewer samples (smoke run).
    #[arg(long)]
    quick: bool,
    /// Only these scenarios (comma-separated: lo, turn, 20, 20l, 50, 50l, 100, 100l).
    #[arg(long)]
    only: Option<String>,
    /// Directory of bench_peer, nat_server, nat_probe, wan_link (default: next to this example).
    #[arg(long)]
    bins: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Backend {
    Webrtc,
    Sansio,
    Ndc,
}

const BACKENDS: [Backend; 3] = [Backend::Webrtc, Backend::Sansio, Backend::Ndc];

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Webrtc => "webrtc",
            Backend::Sansio => "sansio",
            Backend::Ndc => "ndc",
        }
    }
}

#[derive(Clone, Debug)]
struct Scenario {
    key: &'static str,
    /// `None`: loopback in namespace A.
    rtt_ms: Option<u64>,
    loss_pct: f64,
    /// Relay-only peers through the embedded TURN of the loopback server (loopback only).
    turn: bool,
}

impl Scenario {
    fn title(&self) -> String {
        match self.rtt_ms {
            None if self.turn => {
                "relay-only through our TURN (127.0.0.1, embedded TURN, relay/relay)".into()
            }
            None => "loopback (127.0.0.1 in one namespace, no emulator)".into(),
            Some(r) => format!("{r} ms RTT, {} % loss each way", self.loss_pct),
        }
    }
}

fn scenarios() -> Vec<Scenario> {
    let mut v = vec![
        Scenario {
            key: "lo",
            rtt_ms: None,
            loss_pct: 0.0,
            turn: false,
        },
        Scenario {
            key: "turn",
            rtt_ms: None,
            loss_pct: 0.0,
            turn: true,
        },
    ];
    for (rtt, k0, k1) in [(20, "20", "20l"), (50, "50", "50l"), (100, "100", "100l")] {
        v.push(Scenario {
            key: k0,
            rtt_ms: Some(rtt),
            loss_pct: 0.0,
            turn: false,
        });
        v.push(Scenario {
            key: k1,
            rtt_ms: Some(rtt),
            loss_pct: 1.0,
            turn: false,
        });
    }
    v
}

/// Sizes and counts of one scenario (the same for every backend).
#[derive(Clone, Copy, Debug)]
struct Params {
    rtt_samples: u32,
    bulk_mib: u32,
    unrel_count: u32,
    unrel_every_ms: u32,
    unrel_size: u32,
}

fn params(sc: &Scenario, quick: bool) -> Params {
    let (rtt_samples, bulk_mib) = match (sc.rtt_ms, sc.loss_pct > 0.0) {
        (None, _) => (if quick { 50 } else { 200 }, if quick { 8 } else { 32 }),
        (Some(_), false) => (if quick { 10 } else { 30 }, if quick { 4 } else { 16 }),
        (Some(_), true) => (if quick { 10 } else { 30 }, if quick { 2 } else { 4 }),
    };
    Params {
        rtt_samples,
        bulk_mib,
        unrel_count: if quick { 100 } else { 300 },
        unrel_every_ms: 5,
        unrel_size: 200,
    }
}

/// What one backend measured in one scenario and run; `None` where it did not get that far.
#[derive(Default, Debug, Clone)]
struct Sample {
    open_ms: Option<f64>,
    rtt_ms: Option<f64>,
    mb_per_s: Option<f64>,
    cpu_ms_per_mb: Option<f64>,
    emu_ms_per_mb: Option<f64>,
    emu_busy_pct: Option<f64>,
    unrel_p50: Option<f64>,
    unrel_p99: Option<f64>,
    unrel_delivered_pct: Option<f64>,
    notes: Vec<String>,
}

/// Where the two peers of a scenario run.
struct Place<'a> {
    a_ns: &'a str,
    b_ns: &'a str,
    a_ip: Ipv4Addr,
    b_ip: Ipv4Addr,
}

// ---------------------------------------------------------------------------------------------
// CPU accounting.

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Fields of `/proc/<pid>/stat` after the command name: (utime+stime, cutime+cstime) in ticks.
fn proc_ticks(pid: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|w| w.parse().unwrap_or(0))
        .collect();
    // rest[0] is field 3 (state): utime 14, stime 15, cutime 16, cstime 17.
    Some((f.get(11)? + f.get(12)?, f.get(13)? + f.get(14)?))
}

/// A peermesh server (`nat_server`) in namespace `ns` with `args` besides the bench's common
/// ones (long heartbeat, no admin API), once it has printed `ready`; its log is `<name>.log`.
async fn start_server(
    lab: &Lab,
    ns: &str,
    bins: &FsPath,
    name: &str,
    args: &[&str],
    ready: &str,
) -> Result<Proc> {
    let args: Vec<String> = ["--heartbeat-timeout-ms", "15000", "--admin-listen", "off"]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect();
    let proc = lab
        .start_program(
            ns,
            &bins.join("nat_server"),
            &args,
            name,
            Some(&format!("{name}.log")),
        )
        .map_err(|e| anyhow!(e))?;
    proc.wait_line(|l| l.raw.contains(ready), Duration::from_secs(20))
        .await
        .ok_or_else(|| anyhow!("{name} did not start: {}", proc.dump()))?;
    Ok(proc)
}

fn cpu_of(proc: &Proc) -> Option<u64> {
    proc_ticks(&proc.id()?.to_string()).map(|t| t.0)
}

fn children_cpu() -> u64 {
    proc_ticks("self").map_or(0, |t| t.1)
}

// ---------------------------------------------------------------------------------------------
// peermesh through bench_peer.

fn kv_str<'a>(line: &'a Line, key: &str) -> Option<&'a str> {
    line.rest
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn kv(line: &Line, key: &str) -> Option<f64> {
    kv_str(line, key).and_then(|v| v.parse().ok())
}

/// A relay-only step counts only on a relay/relay path (`path=` of bench_peer's `direct` line).
fn check_relay(proc: &Proc, direct: &Line) -> Result<()> {
    match kv_str(direct, "path") {
        Some("relay/relay") => Ok(()),
        other => bail!(
            "{}: relay-only but the direct path is {other:?}, not relay/relay: {}",
            proc.name(),
            direct.rest
        ),
    }
}

async fn wait_kind(proc: &Proc, since: Instant, kind: &str, limit: Duration) -> Result<Line> {
    let line = proc
        .wait_line_after(since, |l| l.kind == kind || l.kind == "error", limit)
        .await
        .ok_or_else(|| anyhow!("{}: no `{kind}` line within {limit:?}", proc.name()))?;
    if line.kind == "error" {
        bail!("{}: {}", proc.name(), line.rest);
    }
    Ok(line)
}

#[allow(clippy::too_many_arguments)]
async fn peermesh_sample(
    lab: &Lab,
    wan: &mut WanPair,
    bins: &FsPath,
    place: &Place<'_>,
    server: &str,
    backend: Backend,
    group: &str,
    p: Params,
    emulated: bool,
    relay_only: bool,
    tck: f64,
    s: &mut Sample,
) -> Result<()> {
    let peer_bin = bins.join("bench_peer");
    let args = |name: &str, ip: Ipv4Addr| -> Vec<String> {
        let mut v: Vec<String> = [
            "--server",
            server,
            "--group",
            group,
            "--name",
            name,
            "--backend",
            backend.name(),
            "--ice-ip",
            &ip.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if relay_only {
            v.push("--relay-only".into());
        }
        v
    };
    let t = Instant::now();
    let mut b = lab
        .start_program(
            place.b_ns,
            &peer_bin,
            &args("rx", place.b_ip),
            "rx",
            Some(&format!("{group}-rx.log")),
        )
        .map_err(|e| anyhow!(e))?;
    let result = async {
        wait_kind(&b, t, "joined", Duration::from_secs(20)).await?;
        let mut a = lab
            .start_program(
                place.a_ns,
                &peer_bin,
                &args("tx", place.a_ip),
                "tx",
                Some(&format!("{group}-tx.log")),
            )
            .map_err(|e| anyhow!(e))?;
        let r = async {
            let direct = wait_kind(&a, t, "direct", Duration::from_secs(30)).await?;
            let b_direct = wait_kind(&b, t, "direct", Duration::from_secs(10)).await?;
            if relay_only {
                check_relay(&a, &direct)?;
                check_relay(&b, &b_direct)?;
            }
            s.open_ms = kv(&direct, "join_ms");

            let since = Instant::now();
            a.command(&format!("rtt {} 64", p.rtt_samples))
                .await
                .map_err(|e| anyhow!(e))?;
            let l = wait_kind(&a, since, "rtt", Duration::from_secs(90)).await?;
            // A figure taken partly on the server path is not a direct-path figure: left out.
            if kv(&l, "server_frags") == Some(0.0) {
                s.rtt_ms = kv(&l, "p50_ms");
            } else {
                s.notes
                    .push(format!("rtt left out (server path used): {}", l.rest));
            }

            let cpu0 = (cpu_of(&a), cpu_of(&b));
            let emu0 = if emulated {
                Some(wan.stats().await.map_err(|e| anyhow!(e))?.cpu)
            } else {
                None
            };
            let since = Instant::now();
            a.command(&format!("bulk {}", p.bulk_mib))
                .await
                .map_err(|e| anyhow!(e))?;
            let l = wait_kind(&a, since, "bulk", Duration::from_secs(125)).await?;
            let cpu1 = (cpu_of(&a), cpu_of(&b));
            let emu1 = if emulated {
                Some(wan.stats().await.map_err(|e| anyhow!(e))?.cpu)
            } else {
                None
            };
            let direct_only = kv(&l, "server_frags") == Some(0.0);
            if !direct_only {
                s.notes
                    .push(format!("bulk left out (server path used): {}", l.rest));
            }
            let mb = kv(&l, "bytes").unwrap_or(0.0) / 1e6;
            let secs = kv(&l, "secs").unwrap_or(f64::NAN);
            s.mb_per_s = kv(&l, "mb_per_s").filter(|_| direct_only);
            if let ((Some(a0), Some(b0)), (Some(a1), Some(b1)), true) = (cpu0, cpu1, direct_only) {
                let ms = (a1 + b1 - a0 - b0) as f64 / tck * 1e3;
                s.cpu_ms_per_mb = Some(ms / mb);
            }
            if let (Some(e0), Some(e1), true) = (emu0, emu1, direct_only) {
                let ms = (e1 - e0).as_secs_f64() * 1e3;
                s.emu_ms_per_mb = Some(ms / mb);
                s.emu_busy_pct = Some(ms / (secs * 1e3) * 100.0);
            }

            let since = Instant::now();
            a.command(&format!(
                "unrel {} {} {}",
                p.unrel_count, p.unrel_every_ms, p.unrel_size
            ))
            .await
            .map_err(|e| anyhow!(e))?;
            let l = wait_kind(&b, since, "unrel", Duration::from_secs(60)).await?;
            s.unrel_p50 = kv(&l, "p50_ms").filter(|x| x.is_finite());
            s.unrel_p99 = kv(&l, "p99_ms").filter(|x| x.is_finite());
            if let (Some(d), Some(n)) = (kv(&l, "delivered"), kv(&l, "sent")) {
                s.unrel_delivered_pct = Some(d / n * 100.0);
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if r.is_err() {
            eprintln!("{}", a.dump());
        }
        a.stop().await;
        r
    }
    .await;
    if result.is_err() {
        eprintln!("{}", b.dump());
    }
    let _ = b.command("quit").await;
    b.stop().await;
    result
}

// ---------------------------------------------------------------------------------------------
// libdatachannel.

async fn ndc_sample(
    wan: &mut WanPair,
    place: &Place<'_>,
    p: Params,
    emulated: bool,
    tck: f64,
    s: &mut Sample,
) -> Result<()> {
    let opts = NdcOptions {
        timeout: Duration::from_secs(120),
        ..NdcOptions::default()
    };
    let (a_ip, b_ip) = (IpAddr::V4(place.a_ip), IpAddr::V4(place.b_ip));
    let pair = |test| run_pair_with(test, Some(place.a_ns), Some(place.b_ns), a_ip, b_ip, &opts);

    let c0 = children_cpu();
    let rtt = pair(NdcTest::Rtt {
        count: p.rtt_samples,
        size: 64,
    })
    .await
    .context("ndc rtt")?;
    let base_ticks = children_cpu().saturating_sub(c0);
    s.open_ms = Some(rtt.open_ms);
    if let NdcFigures::Rtt(r) = &rtt.figures {
        s.rtt_ms = Some(r.median_ms);
    }

    let emu0 = if emulated {
        Some(wan.stats().await.map_err(|e| anyhow!(e))?.cpu)
    } else {
        None
    };
    let c0 = children_cpu();
    let bulk = pair(NdcTest::Bulk {
        mib: p.bulk_mib,
        msg_size: 16384,
    })
    .await
    .context("ndc bulk")?;
    let bulk_ticks = children_cpu().saturating_sub(c0);
    let emu1 = if emulated {
        Some(wan.stats().await.map_err(|e| anyhow!(e))?.cpu)
    } else {
        None
    };
    if let NdcFigures::Bulk(b) = &bulk.figures {
        let mb = b.bytes_received as f64 / 1e6;
        s.mb_per_s = Some(b.mb_per_s);
        s.cpu_ms_per_mb = Some(bulk_ticks.saturating_sub(base_ticks) as f64 / tck * 1e3 / mb);
        if let (Some(e0), Some(e1)) = (emu0, emu1) {
            // The emulator also carried the pair's startup and open: small next to the transfer.
            let ms = (e1 - e0).as_secs_f64() * 1e3;
            s.emu_ms_per_mb = Some(ms / mb);
            s.emu_busy_pct = Some(ms / (b.secs * 1e3) * 100.0);
        }
    }

    let unrel = pair(NdcTest::Unreliable {
        count: p.unrel_count,
        interval_ms: p.unrel_every_ms,
        size: p.unrel_size,
    })
    .await
    .context("ndc unreliable")?;
    if let NdcFigures::Unreliable(u) = &unrel.figures {
        s.unrel_p50 = u.p50_ms;
        s.unrel_p99 = u.p99_ms;
        s.unrel_delivered_pct = Some(u.delivered as f64 / u.sent.max(1) as f64 * 100.0);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The table.

fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn cell(v: Option<f64>, prec: usize, got: usize, runs: usize) -> String {
    let mut s = match v {
        Some(x) => format!("{x:.prec$}"),
        None => "n/a".into(),
    };
    if got < runs && v.is_some() {
        s.push_str(&format!(" ({got}/{runs})"));
    }
    s
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".into(),
    }
}

type Figure = (&'static str, usize, fn(&Sample) -> Option<f64>);

const FIGURES: [Figure; 9] = [
    ("connect ms (pm join→direct; ndc open)", 1, |s| s.open_ms),
    ("RTT p50 ms (64 B reliable)", 2, |s| s.rtt_ms),
    ("reliable MB/s (16 KiB msgs)", 2, |s| s.mb_per_s),
    ("peer CPU ms per MB (both)", 1, |s| s.cpu_ms_per_mb),
    ("emulator CPU ms per MB", 1, |s| s.emu_ms_per_mb),
    ("emulator busy % of transfer", 0, |s| s.emu_busy_pct),
    ("unreliable p50 ms (one-way)", 2, |s| s.unrel_p50),
    ("unreliable p99 ms (one-way)", 2, |s| s.unrel_p99),
    ("unreliable delivered %", 1, |s| s.unrel_delivered_pct),
];

fn print_table(
    scs: &[Scenario],
    configs: &HashMap<&'static str, String>,
    results: &HashMap<(&'static str, Backend), Vec<Sample>>,
    runs: usize,
) {
    println!(
        "\n{:<40} {:>13} {:>13} {:>13} {:>8} {:>8} {:>8}",
        "figure (median of runs)", "webrtc", "sansio", "ndc", "sio/wrtc", "wrtc/ndc", "sio/ndc"
    );
    for sc in scs {
        println!("== {} ==", sc.title());
        if let Some(c) = configs.get(sc.key) {
            println!("   emulator: {c}");
        }
        for (name, prec, get) in FIGURES {
            if sc.rtt_ms.is_none() && name.starts_with("emulator") {
                continue;
            }
            let med = |b: Backend| {
                let v: Vec<f64> = results
                    .get(&(sc.key, b))
                    .map(|ss| ss.iter().filter_map(get).collect())
                    .unwrap_or_default();
                (median(&v), v.len())
            };
            let (w, wn) = med(Backend::Webrtc);
            let (s, sn) = med(Backend::Sansio);
            let (n, nn) = med(Backend::Ndc);
            println!(
                "{:<40} {:>13} {:>13} {:>13} {:>8} {:>8} {:>8}",
                name,
                cell(w, prec, wn, runs),
                cell(s, prec, sn, runs),
                cell(n, prec, nn, runs),
                ratio(s, w),
                ratio(w, n),
                ratio(s, n),
            );
        }
    }
    if scs.iter().any(|sc| sc.turn) {
        println!("relay-only through TURN: webrtc and sansio only (ndc: n/a); loopback only");
    }
}

// ---------------------------------------------------------------------------------------------

async fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let bins = match &args.bins {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(FsPath::parent)
            .ok_or_else(|| anyhow!("no directory above this example"))?
            .to_path_buf(),
    };
    for name in ["bench_peer", "nat_server", "nat_probe", "wan_link"] {
        if !bins.join(name).is_file() {
            bail!(
                "{} is missing: cargo build --release -p peermesh-interop-tests --features \
                 sansio --bins",
                bins.join(name).display()
            );
        }
    }
    let mut scs = scenarios();
    if let Some(only) = &args.only {
        let keys: Vec<&str> = only.split(',').map(str::trim).collect();
        scs.retain(|s| keys.contains(&s.key));
    }
    let tck = clk_tck();
    let programs = Programs::new(
        bins.join("nat_server"),
        bins.join("bench_peer"),
        bins.join("nat_probe"),
    )
    .with_wan_link(bins.join("wan_link"));
    let mut lab = Lab::new(programs).map_err(|e| anyhow!("building the lab (root?): {e}"))?;
    let mut wan = lab
        .wan_pair(Impairment::default(), Impairment::default())
        .await
        .map_err(|e| anyhow!(e))?;
    let (a_ns, b_ns) = (wan.a_ns.clone(), wan.b_ns.clone());
    let (a_ip, b_ip) = (wan.a_ip, wan.b_ip);

    // The server in A, on A's end of the link.
    let ws = format!("{a_ip}:{WS_PORT}");
    let server = start_server(
        &lab,
        &a_ns,
        &bins,
        "server",
        &["--listen", &ws, "--no-turn"],
        "listening on",
    )
    .await?;
    let url = format!("ws://{ws}/ws");

    // For the TURN scenario: a second server in A on loopback, with its embedded STUN/TURN.
    let turn_server = if scs.iter().any(|sc| sc.turn) {
        let ws = format!("127.0.0.1:{}", WS_PORT + 1);
        let turn = format!("127.0.0.1:{TURN_PORT}");
        let ts = start_server(
            &lab,
            &a_ns,
            &bins,
            "turn-server",
            &[
                "--listen",
                &ws,
                "--turn-listen",
                &turn,
                "--turn-relay-ports",
                "50500-50599",
                "--turn-allow-peer",
                "127.0.0.0/8",
            ],
            "STUN/TURN on udp",
        )
        .await?;
        Some((ts, format!("ws://{ws}/ws")))
    } else {
        None
    };

    let mut configs: HashMap<&'static str, String> = HashMap::new();
    let mut results: HashMap<(&'static str, Backend), Vec<Sample>> = HashMap::new();
    let mut failures: Vec<String> = Vec::new();
    for run in 0..args.runs {
        for sc in &scs {
            let p = params(sc, args.quick);
            let emulated = sc.rtt_ms.is_some();
            let place = if emulated {
                Place {
                    a_ns: &a_ns,
                    b_ns: &b_ns,
                    a_ip,
                    b_ip,
                }
            } else {
                Place {
                    a_ns: &a_ns,
                    b_ns: &a_ns,
                    a_ip: Ipv4Addr::LOCALHOST,
                    b_ip: Ipv4Addr::LOCALHOST,
                }
            };
            if let Some(rtt) = sc.rtt_ms {
                let imp = |seed: u64| Impairment {
                    delay: Duration::from_millis(rtt / 2),
                    loss: sc.loss_pct / 100.0,
                    seed,
                    ..Impairment::default()
                };
                let seed = 1000 + run as u64 * 2;
                let ab = wan
                    .set_impairment("ab", &imp(seed))
                    .await
                    .map_err(|e| anyhow!(e))?;
                let ba = wan
                    .set_impairment("ba", &imp(seed + 1))
                    .await
                    .map_err(|e| anyhow!(e))?;
                configs.insert(sc.key, format!("{ab} | {ba} (seeds vary per run)"));
            }
            for backend in BACKENDS {
                if sc.turn && backend == Backend::Ndc {
                    continue;
                }
                let server_url = match (&turn_server, sc.turn) {
                    (Some((_, u)), true) => u.as_str(),
                    _ => url.as_str(),
                };
                let t = Instant::now();
                let group = format!("r{run}-{}-{}", sc.key, backend.name());
                let mut s = Sample::default();
                let bound = Duration::from_secs(420);
                let r = tokio::time::timeout(bound, async {
                    match backend {
                        Backend::Ndc => {
                            ndc_sample(&mut wan, &place, p, emulated, tck, &mut s).await
                        }
                        _ => {
                            peermesh_sample(
                                &lab, &mut wan, &bins, &place, server_url, backend, &group, p,
                                emulated, sc.turn, tck, &mut s,
                            )
                            .await
                        }
                    }
                })
                .await
                .unwrap_or_else(|_| Err(anyhow!("ran past {bound:?}")));
                if let Err(e) = &r {
                    failures.push(format!(
                        "run {} {} {}: {e:#}",
                        run + 1,
                        sc.key,
                        backend.name()
                    ));
                }
                for n in &s.notes {
                    failures.push(format!(
                        "run {} {} {}: note {n}",
                        run + 1,
                        sc.key,
                        backend.name()
                    ));
                }
                eprintln!(
                    "[{:>5.0} s] run {} {:<5} {:<6} {:.1} s: open {:?} rtt {:?} MB/s {:?} cpu/MB {:?} \
                     emu/MB {:?} unrel p50 {:?} {}",
                    started.elapsed().as_secs_f64(),
                    run + 1,
                    sc.key,
                    backend.name(),
                    t.elapsed().as_secs_f64(),
                    s.open_ms,
                    s.rtt_ms,
                    s.mb_per_s,
                    s.cpu_ms_per_mb.map(|x| x.round()),
                    s.emu_ms_per_mb.map(|x| x.round()),
                    s.unrel_p50,
                    if r.is_ok() { "ok" } else { "FAILED" }
                );
                results.entry((sc.key, backend)).or_default().push(s);
            }
        }
    }

    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "bench_wan: {} runs{} alternating webrtc, sansio, ndc; nproc {nproc}; took {:.0} s",
        args.runs,
        if args.quick { " (--quick)" } else { "" },
        started.elapsed().as_secs_f64()
    );
    for sc in &scs {
        let p = params(sc, args.quick);
        println!(
            "  {:<5} RTT {} x 64 B, bulk {} MiB, unreliable {} x {} B every {} ms",
            sc.key, p.rtt_samples, p.bulk_mib, p.unrel_count, p.unrel_size, p.unrel_every_ms
        );
    }
    print_table(&scs, &configs, &results, args.runs);
    if !failures.is_empty() {
        println!("failures and notes ({}):", failures.len());
        for f in &failures {
            println!("  {f}");
        }
    }
    if let Some((ts, _)) = turn_server {
        ts.stop().await;
    }
    server.stop().await;
    wan.stop().await;
    lab.shutdown().map_err(|e| anyhow!(e))?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("bench_wan: {e:#}");
        std::process::exit(1);
    }
}
