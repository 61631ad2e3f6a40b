//! libdatachannel (node-datachannel) as an outside baseline for benchmarks: runs the two peers
//! of `interop-tests/ndc/ndc_peer.mjs` (installed by `interop-tests/setup/ndc.sh`), on loopback
//! or each in a network namespace, and returns what they measured.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use peermesh_interop_tests::ndc::{run_pair, NdcFigures, NdcTest};
//! let ip = std::net::IpAddr::from([127, 0, 0, 1]);
//! let res = run_pair(NdcTest::Bulk { mib: 64, msg_size: 16384 }, None, None, ip, ip).await?;
//! if let NdcFigures::Bulk(b) = &res.figures {
//!     println!("libdatachannel: {:.1} MB/s, open {:.1} ms", b.mb_per_s, res.open_ms);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The offerer listens for the signaling connection on `offer_ip` (any free port) and the
//! answerer connects from `answer_ip`; each binds ICE to its own address (host candidates only,
//! no STUN/TURN). Both processes exit on their own within the timeout; the harness kills them
//! (by PID, the ones it started) if they have not, and when its future is dropped.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// What the pair measures (the offerer's flags; the answerer learns them over signaling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NdcTest {
    /// Time from PeerConnection creation to "r" open on the offerer.
    Open,
    /// `count` ping-pongs of `size` bytes on "r" (ordered, reliable).
    Rtt { count: u32, size: u32 },
    /// `mib` MiB in messages of `msg_size` bytes on "r", with back-pressure.
    Bulk { mib: u32, msg_size: u32 },
    /// `count` messages of `size` bytes on "u" (unordered, maxRetransmits 0), one every
    /// `interval_ms`: one-way latency as the receiver sees it.
    Unreliable {
        count: u32,
        interval_ms: u32,
        size: u32,
    },
}

impl NdcTest {
    /// The name `ndc_peer.mjs --test` takes (and its result lines carry).
    pub fn name(&self) -> &'static str {
        match self {
            NdcTest::Open => "open",
            NdcTest::Rtt { .. } => "rtt",
            NdcTest::Bulk { .. } => "bulk",
            NdcTest::Unreliable { .. } => "unreliable",
        }
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec!["--test".to_string(), self.name().to_string()];
        let mut push = |k: &str, v: u32| {
            a.push(format!("--{k}"));
            a.push(v.to_string());
        };
        match *self {
            NdcTest::Open => {}
            NdcTest::Rtt { count, size } => {
                push("count", count);
                push("size", size);
            }
            NdcTest::Bulk { mib, msg_size } => {
                push("mib", mib);
                push("msg-size", msg_size);
            }
            NdcTest::Unreliable {
                count,
                interval_ms,
                size,
            } => {
                push("count", count);
                push("interval-ms", interval_ms);
                push("size", size);
            }
        }
        a
    }
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct NdcResult {
    /// Offerer: PeerConnection creation to "r" open, ms (every test reports it).
    pub open_ms: f64,
    /// The test's own figures.
    pub figures: NdcFigures,
}

/// The figures of one test.
#[derive(Debug, Clone, PartialEq)]
pub enum NdcFigures {
    Open,
    Rtt(RttFigures),
    Bulk(BulkFigures),
    Unreliable(UnreliableFigures),
}

/// Ping-pong round trips on "r", measured by the offerer.
#[derive(Debug, Clone, PartialEq)]
pub struct RttFigures {
    pub count: u64,
    pub size: u64,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

/// Bulk transfer on "r": from the offerer's first send to the answerer's report that it has
/// every byte.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkFigures {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub msg_size: u64,
    pub secs: f64,
    /// 10^6 bytes per second.
    pub mb_per_s: f64,
}

/// One-way latency on "u" as the answerer saw it (both processes read the same clock,
/// CLOCK_MONOTONIC, through node's `process.hrtime`). Percentiles are `None` when nothing arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct UnreliableFigures {
    pub sent: u64,
    pub delivered: u64,
    pub out_of_order: u64,
    pub size: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// Knobs beyond [`run_pair`]'s arguments.
#[derive(Debug, Clone)]
pub struct NdcOptions {
    /// Each process's own bound (`--timeout-s`); the harness waits a few seconds more, then
    /// kills them.
    pub timeout: Duration,
    /// ICE UDP ports of both peers (libdatachannel's `portRangeBegin`/`portRangeEnd`).
    pub port_range: Option<(u16, u16)>,
    /// libdatachannel's log level (`Verbose` … `Fatal`; default `Warning`), logged to stderr.
    pub log_level: Option<String>,
}

impl Default for NdcOptions {
    fn default() -> Self {
        NdcOptions {
            timeout: Duration::from_secs(60),
            port_range: None,
            log_level: None,
        }
    }
}

/// The folder of `ndc_peer.mjs` and its `node_modules` (`PEERMESH_NDC_DIR`, else
/// `interop-tests/ndc` of this source tree).
pub fn ndc_dir() -> PathBuf {
    std::env::var_os("PEERMESH_NDC_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ndc"))
}

/// Run `test` between two fresh node-datachannel peers; a namespace of `None` runs that peer
/// in this process's namespace. Default [`NdcOptions`] (60 s bound).
pub async fn run_pair(
    test: NdcTest,
    offer_ns: Option<&str>,
    answer_ns: Option<&str>,
    offer_ip: IpAddr,
    answer_ip: IpAddr,
) -> anyhow::Result<NdcResult> {
    run_pair_with(
        test,
        offer_ns,
        answer_ns,
        offer_ip,
        answer_ip,
        &NdcOptions::default(),
    )
    .await
}

/// [`run_pair`] with options.
pub async fn run_pair_with(
    test: NdcTest,
    offer_ns: Option<&str>,
    answer_ns: Option<&str>,
    offer_ip: IpAddr,
    answer_ip: IpAddr,
    opts: &NdcOptions,
) -> anyhow::Result<NdcResult> {
    let dir = ndc_dir();
    if !dir.join("node_modules/node-datachannel").is_dir() {
        bail!(
            "node-datachannel is not installed in {}: run interop-tests/setup/ndc.sh",
            dir.display()
        );
    }
    let timeout_s = opts.timeout.as_secs().max(1);
    let mut common = vec!["--timeout-s".to_string(), timeout_s.to_string()];
    if let Some((lo, hi)) = opts.port_range {
        common.extend(["--port-range".into(), format!("{lo}-{hi}")]);
    }
    if let Some(level) = &opts.log_level {
        common.extend(["--log-level".into(), level.clone()]);
    }
    let (lines_tx, mut lines) = mpsc::unbounded_channel();

    let mut offer_args = vec![
        "--role".to_string(),
        "offer".into(),
        "--ip".into(),
        offer_ip.to_string(),
        "--signal-listen".into(),
        SocketAddr::new(offer_ip, 0).to_string(),
    ];
    offer_args.extend(test.args());
    offer_args.extend(common.iter().cloned());
    let mut offer = NdcProc::start(Role::Offer, offer_ns, &offer_args, lines_tx.clone())?;
    let mut answer: Option<NdcProc> = None;

    // Everything below is bounded by the processes' own timeout and a little more.
    let overall = opts.timeout + Duration::from_secs(5);
    let run = async {
        // The offerer says where it listens; only then does the answerer start.
        let signal = loop {
            let (role, line) = lines.recv().await.expect("a sender is held here");
            let Some(line) = line else {
                bail!(
                    "ndc offerer ended before it listened:\n{}",
                    offer.stderr_tail()
                );
            };
            if role != Role::Offer {
                continue;
            }
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["event"] == "listening" {
                    break v["addr"]
                        .as_str()
                        .ok_or_else(|| anyhow!("listening line without addr: {line}"))?
                        .to_string();
                }
            }
        };
        let mut answer_args = vec![
            "--role".to_string(),
            "answer".into(),
            "--ip".into(),
            answer_ip.to_string(),
            "--signal".into(),
            signal,
        ];
        answer_args.extend(common.iter().cloned());
        let answer = answer.insert(NdcProc::start(
            Role::Answer,
            answer_ns,
            &answer_args,
            lines_tx.clone(),
        )?);

        // Both print their results and exit on their own; stdout ends when they do.
        let mut results: Vec<(Role, Value)> = Vec::new();
        let mut open = 2;
        while open > 0 {
            let (role, line) = lines.recv().await.expect("a sender is held here");
            let Some(line) = line else {
                open -= 1;
                continue;
            };
            if line.starts_with("{\"result\":") {
                let v: Value = serde_json::from_str(&line)
                    .with_context(|| format!("ndc {role:?} result line: {line}"))?;
                results.push((role, v));
            }
        }
        let offer_status = offer.child.wait().await?;
        let answer_status = answer.child.wait().await?;
        if !offer_status.success() || !answer_status.success() {
            bail!(
                "ndc peers failed (offerer {offer_status}, answerer {answer_status}); \
                 offerer said:\n{}\nanswerer said:\n{}",
                offer.stderr_tail(),
                answer.stderr_tail()
            );
        }
        parse_results(test, &results)
    };
    match tokio::time::timeout(overall, run).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!(
            "ndc pair ran past {} s (the processes are killed); offerer said:\n{}\nanswerer \
             said:\n{}",
            overall.as_secs(),
            offer.stderr_tail(),
            answer
                .as_ref()
                .map(NdcProc::stderr_tail)
                .unwrap_or_default()
        )),
    }
    // `offer` and `answer` are killed on drop if still running.
}

fn parse_results(test: NdcTest, results: &[(Role, Value)]) -> anyhow::Result<NdcResult> {
    let find = |name: &str, role: Role| {
        results
            .iter()
            .find(|(r, v)| *r == role && v["result"] == name && v.get("relayed_by").is_none())
            .map(|(_, v)| v)
            .ok_or_else(|| anyhow!("no {name:?} result from the {role:?} side: {results:?}"))
    };
    let f = |v: &Value, k: &str| {
        v[k].as_f64()
            .ok_or_else(|| anyhow!("result without number {k}: {v}"))
    };
    let u = |v: &Value, k: &str| {
        v[k].as_u64()
            .ok_or_else(|| anyhow!("result without count {k}: {v}"))
    };
    let open_ms = f(find("open", Role::Offer)?, "open_ms")?;
    let figures = match test {
        NdcTest::Open => NdcFigures::Open,
        NdcTest::Rtt { .. } => {
            let v = find("rtt", Role::Offer)?;
            NdcFigures::Rtt(RttFigures {
                count: u(v, "count")?,
                size: u(v, "size")?,
                median_ms: f(v, "median_ms")?,
                p99_ms: f(v, "p99_ms")?,
                min_ms: f(v, "min_ms")?,
                max_ms: f(v, "max_ms")?,
            })
        }
        NdcTest::Bulk { .. } => {
            let v = find("bulk", Role::Offer)?;
            NdcFigures::Bulk(BulkFigures {
                bytes_sent: u(v, "bytes_sent")?,
                bytes_received: u(v, "bytes_received")?,
                msg_size: u(v, "msg_size")?,
                secs: f(v, "secs")?,
                mb_per_s: f(v, "mb_per_s")?,
            })
        }
        NdcTest::Unreliable { .. } => {
            let v = find("unreliable", Role::Answer)?;
            NdcFigures::Unreliable(UnreliableFigures {
                sent: u(v, "sent")?,
                delivered: u(v, "delivered")?,
                out_of_order: u(v, "out_of_order")?,
                size: u(v, "size")?,
                p50_ms: v["p50_ms"].as_f64(),
                p99_ms: v["p99_ms"].as_f64(),
                max_ms: v["max_ms"].as_f64(),
            })
        }
    };
    Ok(NdcResult { open_ms, figures })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Offer,
    Answer,
}

/// One `node ndc_peer.mjs` process: its stdout lines go to the run's channel, its stderr to
/// ours (the script prefixes them) and to a short tail for error messages. Killed on drop.
struct NdcProc {
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl NdcProc {
    fn start(
        role: Role,
        ns: Option<&str>,
        args: &[String],
        lines: mpsc::UnboundedSender<(Role, Option<String>)>,
    ) -> anyhow::Result<NdcProc> {
        let dir = ndc_dir();
        let script = dir.join("ndc_peer.mjs");
        let mut cmd = match ns {
            // `ip netns exec` execs node in the namespace: the PID is node's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "node"]);
                c
            }
            None => Command::new("node"),
        };
        cmd.arg(&script)
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting node {} ({role:?})", script.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = r.next_line().await {
                let _ = lines.send((role, Some(line)));
            }
            // End of stdout: the process exited (or closed it).
            let _ = lines.send((role, None));
        });
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail2 = tail.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = r.next_line().await {
                eprintln!("{line}");
                let mut t = tail2.lock().expect("tail lock");
                if t.len() == 40 {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        Ok(NdcProc { child, tail })
    }

    fn stderr_tail(&self) -> String {
        let t = self.tail.lock().expect("tail lock");
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for NdcProc {
    fn drop(&mut self) {
        // Only this child, by its PID (a no-op once it has been waited for).
        let _ = self.child.start_kill();
    }
}
