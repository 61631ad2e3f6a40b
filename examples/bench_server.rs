//! Load benchmark of the signaling server binary (`peermesh-server`), run as a child process.
//!
//! ```text
//! cargo build --release -p peermesh-server
//! cargo run --release --example bench_server
//! cargo run --release --example bench_server -- --quick
//! cargo run --release --example bench_server -- --server-bin /path/to/peermesh-server
//! ```
//!
//! Starts the server binary (default `target/release/peermesh-server` of this workspace) with
//! `--listen 127.0.0.1:PORT --no-turn` on a free port, waits until `GET /healthz` answers 200,
//! and drives it with raw WebSocket clients (tokio-tungstenite, speaking `src/protocol.rs`
//! directly; no peermesh `Client`, no link layer). Every client says `hello` and then sends
//! `{"type":"ping","id":N}` every `heartbeat_interval_ms` from `welcome`. Phases, in order:
//!
//! 1. **Idle sessions.** Server RSS (`VmRSS` of `/proc/PID/status`) and CPU (`utime + stime` of
//!    `/proc/PID/stat`) with 0, then `--idle-small` (1 000), then `--idle-large` (10 000)
//!    sessions that only said `hello` and send heartbeats. RSS per session = (RSS with N −
//!    RSS at start) / N.
//! 2. **Join fan-out** with the `--idle-large` sessions, in groups of 8: the members of a group
//!    join one after another (the next `join` is sent once the previous one's `joined` and all
//!    its `member_joined` have arrived); `--fanout-parallel` groups are filled at a time.
//!    Fan-out latency = from just before the joiner writes `join` to its WebSocket until a
//!    co-member (that joined earlier) has read the `member_joined` naming the joiner; one sample
//!    per (joiner, earlier member), so 28 per group of 8. Join latency = from the same instant
//!    until the joiner has read its `joined`.
//!    Then all sessions close (close frame), the bench waits until the server's open fd count is
//!    back to its start value, and reads RSS again ("after they left").
//! 3. **Connect+join rate**: `--rate-sessions` sessions, at most `--connect-parallel` in
//!    setup at a time, each: TCP connect, WebSocket upgrade, `hello` → `welcome`, `join` (groups
//!    of 8) → `joined`. Rate = sessions / time from the first connect to the last `joined`.
//! 4. **Relay throughput**: `--pairs` pairs (A, B) in their own group of two; every A sends
//!    relay frames with a 1 KiB payload to its B as fast as TCP back-pressure lets it, every B
//!    reads all the time. Frames/s = relay frames read by all Bs in a `--relay-secs` window
//!    (after a warm-up) / window; MB/s = those frames × payload bytes / 1e6 / window (the 9-byte
//!    relay header not counted). Then the same with one pair and 16 KiB payloads.
//! 5. **Relay latency**: one pair, 1 KiB payloads at a fixed `--latency-rate` (2 000 frames/s);
//!    latency = from just before A writes a frame until B has read it (the payload carries the
//!    send instant); warm-up frames are not counted.
//!
//! Client sockets are bound to many loopback source addresses (127.0.1.1, 127.0.1.2, …,
//! `--per-ip` sessions per address, never reused within a run) so that a per-source-IP
//! connection limit in the server is not hit and ephemeral ports do not run out. All traffic
//! stays on 127.0.0.0/8. Every phase has a time limit, the whole run has one (`--max-seconds`),
//! and the server is killed by PID when the program ends (also on error, time-out, Ctrl-C and
//! SIGTERM). The server's own log goes to a file in the temp dir (its path is printed).
//!
//! Progress goes to stderr; the table and the definitions go to stdout.

mod support;
use support::{ms, step};

use std::fs::File;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use bytes::Bytes;
use clap::Parser;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, SinkExt as _, StreamExt as _};
use peermesh::protocol::{ClientMsg, PeerId, RelayFrame, ServerMsg, PROTOCOL_VERSION};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{client_async_with_config, WebSocketStream};

type Ws = WebSocketStream<TcpStream>;
type WsSink = SplitSink<Ws, Message>;
type WsStream = SplitStream<Ws>;

/// Members per group in the fan-out and connect+join phases.
const GROUP_SIZE: usize = 8;
/// Time the server gets after a change (sessions added or gone) before RSS/CPU are read.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(about = "Load benchmark of the peermesh signaling server binary")]
struct Args {
    /// Server binary (default: target/release/peermesh-server of this workspace).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Fast smoke run: small counts, short windows.
    #[arg(long)]
    quick: bool,
    /// First idle session count (default 1000; 100 with --quick).
    #[arg(long)]
    idle_small: Option<usize>,
    /// Second idle session count, also used for the fan-out (default 10000; 1000 with --quick).
    #[arg(long)]
    idle_large: Option<usize>,
    /// Seconds over which idle CPU is measured (default 5; 2 with --quick).
    #[arg(long)]
    idle_secs: Option<u64>,
    /// Groups filled at the same time in the fan-out phase.
    #[arg(long, default_value_t = 4)]
    fanout_parallel: usize,
    /// Sessions in the connect+join rate phase (default 2000; 200 with --quick).
    #[arg(long)]
    rate_sessions: Option<usize>,
    /// Most sessions in setup (connect, upgrade, hello, join) at the same time.
    #[arg(long, default_value_t = 64)]
    connect_parallel: usize,
    /// Sender/receiver pairs in the 1 KiB relay throughput phase (default 100; 20 with --quick).
    #[arg(long)]
    pairs: Option<usize>,
    /// Measurement window of each relay throughput phase, in seconds (default 5; 2 with --quick).
    #[arg(long)]
    relay_secs: Option<u64>,
    /// Frames per second in the relay latency phase.
    #[arg(long, default_value_t = 2000)]
    latency_rate: u64,
    /// Measurement window of the relay latency phase, in seconds (default 5; 2 with --quick).
    #[arg(long)]
    latency_secs: Option<u64>,
    /// Sessions per loopback source address.
    #[arg(long, default_value_t = 50)]
    per_ip: usize,
    /// Time limit of each phase, in seconds.
    #[arg(long, default_value_t = 120)]
    step_timeout: u64,
    /// Time limit of the whole run, in seconds.
    #[arg(long, default_value_t = 900)]
    max_seconds: u64,
    /// Extra argument for the server (repeatable), e.g. `--server-arg=--relay-bytes-per-s=0`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

struct Params {
    server_bin: PathBuf,
    server_args: Vec<String>,
    idle_small: usize,
    idle_large: usize,
    idle: Duration,
    fanout_parallel: usize,
    rate_sessions: usize,
    connect_parallel: usize,
    pairs: usize,
    relay_window: Duration,
    relay_warmup: Duration,
    latency_rate: u64,
    latency_window: Duration,
    latency_warmup: Duration,
    per_ip: usize,
    step: Duration,
}

impl Params {
    fn new(a: &Args) -> Result<Self> {
        let q = a.quick;
        let pick =
            |v: Option<usize>, full: usize, quick: usize| v.unwrap_or(if q { quick } else { full });
        let secs = |v: Option<u64>, full: u64, quick: u64| {
            Duration::from_secs(v.unwrap_or(if q { quick } else { full }))
        };
        let server_bin = match &a.server_bin {
            Some(p) => p.clone(),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/peermesh-server"),
        };
        let p = Params {
            server_bin,
            server_args: a.server_args.clone(),
            idle_small: pick(a.idle_small, 1000, 100),
            idle_large: pick(a.idle_large, 10_000, 1000),
            idle: secs(a.idle_secs, 5, 2),
            fanout_parallel: a.fanout_parallel.max(1),
            rate_sessions: pick(a.rate_sessions, 2000, 200),
            connect_parallel: a.connect_parallel.max(1),
            pairs: pick(a.pairs, 100, 20),
            relay_window: secs(a.relay_secs, 5, 2),
            relay_warmup: Duration::from_secs(1),
            latency_rate: a.latency_rate.clamp(1, 100_000),
            latency_window: secs(a.latency_secs, 5, 2),
            latency_warmup: Duration::from_millis(500),
            per_ip: a.per_ip.max(1),
            step: Duration::from_secs(a.step_timeout.max(1)),
        };
        ensure!(
            p.idle_small >= 1 && p.idle_large > p.idle_small,
            "need 1 <= --idle-small < --idle-large"
        );
        ensure!(
            p.pairs >= 1 && p.rate_sessions >= 1,
            "counts must be at least 1"
        );
        Ok(p)
    }
}

// ---------------------------------------------------------------------------------------------
// The server process and what /proc says about it

struct ServerProc {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        // SIGKILL to this PID (std's Child::kill), then reap it.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl ServerProc {
    async fn start(bin: &Path, extra: &[String]) -> Result<Self> {
        ensure!(
            bin.is_file(),
            "server binary {} not found; build it with `cargo build --release -p peermesh-server` \
             or pass --server-bin",
            bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("pick a free port")?
            .port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let log =
            std::env::temp_dir().join(format!("bench_server-{}-{port}.log", std::process::id()));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--listen")
            .arg(addr.to_string())
            .arg("--no-turn")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // The server's own defaults, whatever this shell has set.
        cmd.env_remove("RUST_LOG");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PEERMESH_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut server = ServerProc {
            pid: child.id(),
            child,
            addr,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            server.check_alive()?;
            if healthz(addr).await.unwrap_or(false) {
                return Ok(server);
            }
            ensure!(
                Instant::now() < deadline,
                "server did not answer /healthz within 20 s (log: {})",
                server.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "server exited ({status}); last log lines:\n{}",
                log_tail(&self.log, 20)
            );
        }
        Ok(())
    }

    fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS in /proc/{}/status", self.pid))
    }

    fn cpu(&self) -> Result<CpuSample> {
        proc_cpu(&self.pid.to_string())
    }

    fn fds(&self) -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.pid))?.count())
    }

    /// Waits until the server has at most `fds` open descriptors (sessions gone); returns
    /// whether it got there within `limit`.
    async fn wait_fds(&mut self, fds: usize, limit: Duration) -> Result<bool> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            if self.fds()? <= fds {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Server CPU use (% of one core) over `d`.
    async fn cpu_over(&self, d: Duration) -> Result<f64> {
        let a = self.cpu()?;
        tokio::time::sleep(d).await;
        let b = self.cpu()?;
        Ok(cpu_pct(a, b))
    }
}

/// utime + stime of `/proc/<pid>/stat` (`pid` may be `self`).
fn proc_cpu(pid: &str) -> Result<CpuSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces): state is
    // field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    ensure!(f.len() > 12, "short /proc/{pid}/stat");
    Ok(CpuSample {
        ticks: f[11].parse::<u64>()? + f[12].parse::<u64>()?,
        at: Instant::now(),
    })
}

#[derive(Clone, Copy)]
struct CpuSample {
    ticks: u64,
    at: Instant,
}

fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t: &f64| t > 0.0)
            .unwrap_or(100.0)
    })
}

fn cpu_pct(a: CpuSample, b: CpuSample) -> f64 {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let cpu = b.ticks.saturating_sub(a.ticks) as f64 / clk_tck();
    if secs > 0.0 {
        cpu / secs * 100.0
    } else {
        0.0
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn healthz(addr: SocketAddr) -> Result<bool> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, anyhow::Error>(buf.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .unwrap_or(Ok(false))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Soft limit on open files of this process (the server inherits it).
fn nofile_limit() -> Option<(u64, String)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let f: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    Some((f.first()?.parse().ok()?, f.get(1)?.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Raw protocol clients

/// Loopback source addresses: `per_ip` sessions on 127.0.1.1, then 127.0.1.2, … (never reused).
struct Sources {
    next: AtomicUsize,
    per_ip: usize,
}

impl Sources {
    fn take(&self) -> Ipv4Addr {
        let k = self.next.fetch_add(1, Ordering::Relaxed) / self.per_ip;
        Ipv4Addr::new(127, 0, (1 + (k / 250) % 250) as u8, (1 + k % 250) as u8)
    }
}

struct Ctx {
    server: SocketAddr,
    sources: Sources,
}

/// Small read buffers for the many idle sessions (the bench's own memory, not the server's).
fn small_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096)
}

async fn connect_ws(ctx: &Ctx, config: WebSocketConfig) -> Result<Ws> {
    let src = ctx.sources.take();
    let sock = TcpSocket::new_v4()?;
    sock.set_nodelay(true)?;
    sock.bind(SocketAddr::from((src, 0)))
        .with_context(|| format!("bind {src}"))?;
    let tcp = sock
        .connect(ctx.server)
        .await
        .with_context(|| format!("TCP connect from {src}"))?;
    let (ws, _) = client_async_with_config(format!("ws://{}/ws", ctx.server), tcp, Some(config))
        .await
        .with_context(|| format!("WebSocket upgrade from {src}"))?;
    Ok(ws)
}

async fn send_json<S>(sink: &mut S, msg: &ClientMsg) -> Result<()>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    sink.send(Message::text(serde_json::to_string(msg)?))
        .await?;
    Ok(())
}

fn close_reason(f: Option<CloseFrame>) -> String {
    f.map_or_else(
        || "no close code".into(),
        |f| format!("{} {}", u16::from(f.code), f.reason),
    )
}

/// Next JSON message from the server (binary frames and unknown types skipped).
async fn next_server_msg(ws: &mut Ws) -> Result<ServerMsg> {
    loop {
        match ws.next().await {
            None => bail!("connection closed"),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Message::Text(t))) => {
                if let Ok(m) = serde_json::from_str::<ServerMsg>(&t) {
                    return Ok(m);
                }
            }
            Some(Ok(Message::Close(f))) => {
                bail!("server closed the session: {}", close_reason(f))
            }
            Some(Ok(_)) => {}
        }
    }
}

struct Welcome {
    peer: PeerId,
    heartbeat: Duration,
}

async fn hello(ws: &mut Ws, name: &str) -> Result<Welcome> {
    let msg = ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        name: name.into(),
        token: None,
        direct: Default::default(),
        resumable: false,
        resume: None,
    };
    send_json(ws, &msg).await?;
    loop {
        match next_server_msg(ws).await? {
            ServerMsg::Welcome {
                peer,
                heartbeat_interval_ms,
                ..
            } => {
                return Ok(Welcome {
                    peer,
                    heartbeat: Duration::from_millis(heartbeat_interval_ms.clamp(100, 60_000)),
                })
            }
            ServerMsg::Error { code, message, .. } => bail!("hello refused: {code}: {message}"),
            _ => {}
        }
    }
}

async fn join(ws: &mut Ws, group: &str) -> Result<Vec<peermesh::protocol::MemberInfo>> {
    send_json(
        ws,
        &ClientMsg::Join {
            group: group.into(),
        },
    )
    .await?;
    loop {
        match next_server_msg(ws).await? {
            ServerMsg::Joined {
                group: g, members, ..
            } if g == group => return Ok(members),
            ServerMsg::Error { code, message, .. } => {
                bail!("join {group} refused: {code}: {message}")
            }
            _ => {}
        }
    }
}

/// Sends a close frame, then reads until the server's answer ends the connection.
async fn close_ws(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        if ws.close(None).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Control sessions (idle, fan-out, connect+join): one task each

enum Cmd {
    Join(String),
    Close,
}

enum Ev {
    /// The answer to this session's `join`: when the join was written, when `joined` was read.
    Joined {
        sent: Instant,
        at: Instant,
    },
    /// A `member_joined` naming `peer`, read at `at`.
    MemberJoined {
        peer: PeerId,
        at: Instant,
    },
    Error(String),
}

struct Session {
    peer: PeerId,
    cmd: mpsc::UnboundedSender<Cmd>,
    ev: mpsc::UnboundedReceiver<Ev>,
    task: JoinHandle<Result<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Session {
    async fn next_ev(&mut self, limit: Duration) -> Result<Ev> {
        match tokio::time::timeout(limit, self.ev.recv()).await {
            Ok(Some(ev)) => Ok(ev),
            Ok(None) => match (&mut self.task).await {
                Ok(Err(e)) => Err(e.context(format!("session of peer {}", self.peer))),
                _ => bail!("session of peer {} ended", self.peer),
            },
            Err(_) => bail!("peer {}: no event within {limit:?}", self.peer),
        }
    }
}

async fn session_loop(
    mut ws: Ws,
    heartbeat: Duration,
    mut cmd: mpsc::UnboundedReceiver<Cmd>,
    ev: mpsc::UnboundedSender<Ev>,
) -> Result<()> {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping_id = 0u64;
    let mut join_sent = None;
    loop {
        tokio::select! {
            msg = ws.next() => {
                let at = Instant::now();
                match msg {
                    None => bail!("connection closed by the server"),
                    Some(Err(e)) => return Err(e).context("session read"),
                    Some(Ok(Message::Close(f))) => {
                        bail!("server closed the session: {}", close_reason(f))
                    }
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMsg>(&t) {
                        Ok(ServerMsg::Joined { .. }) => {
                            if let Some(sent) = join_sent.take() {
                                let _ = ev.send(Ev::Joined { sent, at });
                            }
                        }
                        Ok(ServerMsg::MemberJoined { member, .. }) => {
                            let _ = ev.send(Ev::MemberJoined { peer: member.peer, at });
                        }
                        Ok(ServerMsg::Error { code, message, .. }) => {
                            let _ = ev.send(Ev::Error(format!("{code}: {message}")));
                        }
                        _ => {}
                    },
                    Some(Ok(_)) => {}
                }
            }
            _ = ping.tick() => {
                ping_id += 1;
                send_json(&mut ws, &ClientMsg::Ping { id: ping_id }).await?;
            }
            c = cmd.recv() => match c {
                Some(Cmd::Join(group)) => {
                    join_sent = Some(Instant::now());
                    send_json(&mut ws, &ClientMsg::Join { group }).await?;
                }
                Some(Cmd::Close) | None => {
                    close_ws(ws).await;
                    return Ok(());
                }
            },
        }
    }
}

/// Opens `n` sessions (connect, upgrade, hello, and with `groups` a join of group
/// `<prefix>g<i / GROUP_SIZE>`), at most `parallel` in setup at once. Returns them and the time
/// from the first connect until the last one was ready.
async fn open_sessions(
    ctx: &Arc<Ctx>,
    n: usize,
    prefix: &str,
    groups: bool,
    parallel: usize,
) -> Result<(Vec<Session>, Duration)> {
    let sem = Arc::new(Semaphore::new(parallel));
    let t0 = Instant::now();
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (ctx, sem) = (ctx.clone(), sem.clone());
        let name = format!("{prefix}{i}");
        let group = groups.then(|| format!("{prefix}g{}", i / GROUP_SIZE));
        let task = tokio::spawn(async move {
            let setup = async {
                let _permit = sem.acquire().await?;
                let mut ws = connect_ws(&ctx, small_config()).await?;
                let w = hello(&mut ws, &name).await?;
                if let Some(g) = &group {
                    join(&mut ws, g).await?;
                }
                Ok::<_, anyhow::Error>((ws, w))
            };
            match setup.await {
                Ok((ws, w)) => {
                    let _ = ready_tx.send(Ok(w.peer));
                    session_loop(ws, w.heartbeat, cmd_rx, ev_tx).await
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!("{e:#}")));
                    Err(e)
                }
            }
        });
        pending.push((
            ready_rx,
            Session {
                peer: 0,
                cmd: cmd_tx,
                ev: ev_rx,
                task,
            },
        ));
    }
    let mut sessions = Vec::with_capacity(n);
    for (i, (ready, mut s)) in pending.into_iter().enumerate() {
        s.peer = ready
            .await
            .map_err(|_| anyhow!("session {i} setup task died"))?
            .with_context(|| format!("session {i} of {n}"))?;
        sessions.push(s);
    }
    Ok((sessions, t0.elapsed()))
}

/// Sessions whose task has ended (dropped by the server or failed), with the first error.
async fn dead_sessions(sessions: &mut [Session]) -> (usize, Option<String>) {
    let mut dead = 0;
    let mut first = None;
    for s in sessions.iter_mut().filter(|s| s.task.is_finished()) {
        dead += 1;
        if first.is_none() {
            first = Some(match (&mut s.task).await {
                Ok(Ok(())) => format!("peer {}: ended", s.peer),
                Ok(Err(e)) => format!("peer {}: {e:#}", s.peer),
                Err(e) => format!("peer {}: {e}", s.peer),
            });
        }
    }
    (dead, first)
}

async fn ensure_alive(sessions: &mut [Session], phase: &str) -> Result<()> {
    let (dead, first) = dead_sessions(sessions).await;
    ensure!(
        dead == 0,
        "{dead} of {} sessions ended during {phase}; first: {}",
        sessions.len(),
        first.unwrap_or_default()
    );
    Ok(())
}

/// Closes every session (close frame each) and waits for their tasks.
async fn close_all(mut sessions: Vec<Session>) {
    for s in &sessions {
        let _ = s.cmd.send(Cmd::Close);
    }
    for s in &mut sessions {
        let _ = (&mut s.task).await;
    }
}

/// Members join one after another; returns (fan-out samples, join samples) in ms.
async fn fanout_group(
    members: &mut [Session],
    group: &str,
    limit: Duration,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut fan = Vec::new();
    let mut joined = Vec::new();
    for k in 0..members.len() {
        let joiner = members[k].peer;
        members[k]
            .cmd
            .send(Cmd::Join(group.to_string()))
            .map_err(|_| anyhow!("session of peer {joiner} is gone"))?;
        let sent = loop {
            match members[k].next_ev(limit).await? {
                Ev::Joined { sent, at } => {
                    joined.push(ms(at.duration_since(sent)));
                    break sent;
                }
                Ev::Error(e) => bail!("peer {joiner} joining {group}: {e}"),
                Ev::MemberJoined { .. } => {}
            }
        };
        for m in &mut members[..k] {
            loop {
                match m.next_ev(limit).await? {
                    Ev::MemberJoined { peer, at } if peer == joiner => {
                        fan.push(ms(at.saturating_duration_since(sent)));
                        break;
                    }
                    Ev::Error(e) => bail!("peer {} in {group}: {e}", m.peer),
                    _ => {}
                }
            }
        }
    }
    Ok((fan, joined))
}

/// Fills groups of `GROUP_SIZE` from `sessions`, `parallel` groups at a time.
async fn fanout(
    sessions: Vec<Session>,
    parallel: usize,
    limit: Duration,
) -> Result<(Vec<f64>, Vec<f64>, Vec<Session>)> {
    let sem = Arc::new(Semaphore::new(parallel));
    let mut it = sessions.into_iter();
    let mut tasks = Vec::new();
    for g in 0.. {
        let mut members: Vec<Session> = it.by_ref().take(GROUP_SIZE).collect();
        if members.is_empty() {
            break;
        }
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let r = async {
                let _permit = sem.acquire().await?;
                fanout_group(&mut members, &format!("fan{g}"), limit).await
            }
            .await;
            (r, members)
        }));
    }
    let (mut fan, mut joined, mut back) = (Vec::new(), Vec::new(), Vec::new());
    let mut first_err = None;
    for t in tasks {
        let (r, members) = t.await.context("fan-out group task")?;
        back.extend(members);
        match r {
            Ok((f, j)) => {
                fan.extend(f);
                joined.extend(j);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok((fan, joined, back))
}

// ---------------------------------------------------------------------------------------------
// Relay pairs

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

struct Pair {
    /// A's peer id (the source B sees), B's peer id (A's destination), their link.
    a_peer: PeerId,
    b_peer: PeerId,
    link: u32,
    a: Ws,
    b: Ws,
    heartbeat: Duration,
}

async fn open_pair(ctx: &Ctx, group: &str) -> Result<Pair> {
    let mut a = connect_ws(ctx, WebSocketConfig::default()).await?;
    let wa = hello(&mut a, "relay-a").await?;
    let mut b = connect_ws(ctx, WebSocketConfig::default()).await?;
    let wb = hello(&mut b, "relay-b").await?;
    join(&mut a, group).await?;
    let members = join(&mut b, group).await?;
    let m = members
        .iter()
        .find(|m| m.peer == wa.peer)
        .ok_or_else(|| anyhow!("A is not among the members B's join returned"))?;
    Ok(Pair {
        a_peer: wa.peer,
        b_peer: wb.peer,
        link: m.link,
        a,
        b,
        heartbeat: wa.heartbeat.min(wb.heartbeat),
    })
}

/// Counters shared by the tasks of a relay phase.
#[derive(Default)]
struct RelayShared {
    /// Senders stop (and close their sessions).
    stop: AtomicBool,
    /// Receivers stop (set once the senders are done, so no frame is in flight to a closed
    /// receiver).
    done: AtomicBool,
    /// Relay frames read by receivers.
    frames: AtomicU64,
    /// Frames with an unexpected source, link or length.
    bad: AtomicU64,
    /// `error` frames or unexpected closes seen by any client.
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl RelayShared {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let (stop, done) = (
            self.stop.load(Ordering::Relaxed),
            self.done.load(Ordering::Relaxed),
        );
        self.first_error.lock().unwrap().get_or_insert(format!(
            "{what} (at {:?}, stop {stop}, done {done})",
            epoch().elapsed()
        ));
    }
}

/// Reads everything a sender (A) gets: pongs, member events, errors.
async fn drain_sender_side(mut stream: WsStream, shared: Arc<RelayShared>) {
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Text(t)) => {
                if let Ok(ServerMsg::Error { code, message, .. }) = serde_json::from_str(&t) {
                    shared.error(format!("sender got error {code}: {message}"));
                }
            }
            Ok(Message::Close(f)) if !shared.stop.load(Ordering::Relaxed) => {
                shared.error(format!("sender closed by server: {}", close_reason(f)))
            }
            Ok(_) => {}
            Err(e) => {
                if !shared.stop.load(Ordering::Relaxed) {
                    shared.error(format!("sender read: {e}"));
                }
                break;
            }
        }
    }
}

/// Sends `frame` as fast as back-pressure allows until `stop`, with a heartbeat ping; then
/// closes. Returns the frames sent.
async fn blast(
    mut sink: WsSink,
    frame: Bytes,
    shared: Arc<RelayShared>,
    heartbeat: Duration,
) -> Result<u64> {
    let mut sent = 0u64;
    let mut next_ping = Instant::now() + heartbeat;
    let mut ping_id = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        sink.feed(Message::Binary(frame.clone())).await?;
        sent += 1;
        if sent.is_multiple_of(64) && Instant::now() >= next_ping {
            ping_id += 1;
            let ping = serde_json::to_string(&ClientMsg::Ping { id: ping_id })?;
            sink.feed(Message::text(ping)).await?;
            next_ping += heartbeat;
        }
    }
    sink.close().await?;
    Ok(sent)
}

/// Heartbeat for a receiver (B) until `done`; then closes B's side.
async fn receiver_pings(mut sink: WsSink, shared: Arc<RelayShared>, heartbeat: Duration) {
    let mut next_ping = Instant::now() + heartbeat;
    let mut ping_id = 0;
    while !shared.done.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if Instant::now() >= next_ping {
            ping_id += 1;
            if send_json(&mut sink, &ClientMsg::Ping { id: ping_id })
                .await
                .is_err()
            {
                return;
            }
            next_ping += heartbeat;
        }
    }
    let _ = sink.close().await;
}

/// What a receiver checks and records.
struct Expect {
    from: PeerId,
    link: u32,
    len: usize,
}

/// Reads relay frames (counting them; with `latencies`, recording send→read latency of frames
/// whose sequence number is at least `skip`) until the connection ends or `count` frames came.
async fn receive(
    mut stream: WsStream,
    shared: Arc<RelayShared>,
    expect: Expect,
    mut latencies: Option<(&mut Vec<f64>, u64)>,
    count: Option<u64>,
) {
    let mut got = 0u64;
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Binary(b)) => {
                let now = Instant::now();
                match RelayFrame::decode(&b) {
                    Ok(f) if f.peer == expect.from && f.link == expect.link => {
                        if b.len() != expect.len {
                            shared.bad.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some((lat, skip)) = latencies.as_mut() {
                            if f.payload.len() >= 16 {
                                let t = u64::from_be_bytes(f.payload[..8].try_into().unwrap());
                                let seq = u64::from_be_bytes(f.payload[8..16].try_into().unwrap());
                                if seq >= *skip {
                                    let sent = epoch() + Duration::from_nanos(t);
                                    lat.push(ms(now.saturating_duration_since(sent)));
                                }
                            }
                        }
                    }
                    _ => {
                        shared.bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
                shared.frames.fetch_add(1, Ordering::Relaxed);
                got += 1;
                if count.is_some_and(|c| got >= c) {
                    return;
                }
            }
            Ok(Message::Text(t)) => {
                if let Ok(ServerMsg::Error { code, message, .. }) = serde_json::from_str(&t) {
                    shared.error(format!("receiver got error {code}: {message}"));
                }
            }
            Ok(Message::Close(f)) => {
                if !shared.done.load(Ordering::Relaxed) {
                    shared.error(format!("receiver closed by server: {}", close_reason(f)));
                }
            }
            Ok(_) => {}
            Err(e) => {
                if !shared.done.load(Ordering::Relaxed) {
                    shared.error(format!("receiver read: {e}"));
                }
                return;
            }
        }
    }
}

struct Throughput {
    frames_per_s: f64,
    mb_per_s: f64,
    server_cpu: f64,
    bench_cpu: f64,
}

/// `pairs` pairs blast `payload`-byte relay frames A → B for warm-up + window.
async fn relay_throughput(
    ctx: &Ctx,
    server: &ServerProc,
    tag: &str,
    pairs: usize,
    payload: usize,
    warmup: Duration,
    window: Duration,
) -> Result<Throughput> {
    let shared = Arc::new(RelayShared::default());
    let mut opened = Vec::with_capacity(pairs);
    for i in 0..pairs {
        opened.push(open_pair(ctx, &format!("{tag}{i}")).await?);
    }
    let mut senders = Vec::new();
    let mut drains = Vec::new();
    let mut others = Vec::new();
    let body = vec![0x5au8; payload];
    for p in opened {
        let frame = Bytes::from(
            RelayFrame {
                peer: p.b_peer,
                link: p.link,
                payload: &body,
            }
            .encode(),
        );
        let expect = Expect {
            from: p.a_peer,
            link: p.link,
            len: frame.len(),
        };
        let (a_sink, a_stream) = p.a.split();
        let (b_sink, b_stream) = p.b.split();
        senders.push(tokio::spawn(blast(
            a_sink,
            frame,
            shared.clone(),
            p.heartbeat,
        )));
        drains.push(tokio::spawn(drain_sender_side(a_stream, shared.clone())));
        others.push(tokio::spawn(receiver_pings(
            b_sink,
            shared.clone(),
            p.heartbeat,
        )));
        let sh = shared.clone();
        others.push(tokio::spawn(async move {
            receive(b_stream, sh, expect, None, None).await
        }));
    }
    let stopper = StopOnDrop(shared.clone());
    tokio::time::sleep(warmup).await;
    let (f0, c0, b0, t0) = (
        shared.frames.load(Ordering::Relaxed),
        server.cpu()?,
        proc_cpu("self")?,
        Instant::now(),
    );
    tokio::time::sleep(window).await;
    let (f1, c1, b1, t1) = (
        shared.frames.load(Ordering::Relaxed),
        server.cpu()?,
        proc_cpu("self")?,
        Instant::now(),
    );
    shared.stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.await.context("sender task")?.context("sender")?;
    }
    // Receivers close only once the server has answered every sender's close, i.e. has handled
    // all its frames (else frames still queued in the server would meet a closed receiver).
    wind_down(drains, "senders").await;
    drop(stopper);
    wind_down(others, "receivers").await;
    check_relay(&shared)?;
    let secs = t1.duration_since(t0).as_secs_f64();
    let frames = (f1 - f0) as f64;
    ensure!(frames > 0.0, "no relay frame arrived in the window");
    Ok(Throughput {
        frames_per_s: frames / secs,
        mb_per_s: frames * payload as f64 / 1e6 / secs,
        server_cpu: cpu_pct(c0, c1),
        bench_cpu: cpu_pct(b0, b1),
    })
}

/// Waits (bounded) for the tasks of one side of a relay phase to end.
async fn wind_down(tasks: Vec<JoinHandle<()>>, who: &str) {
    let all = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .is_err()
    {
        eprintln!("  note: some relay {who} did not close within 20 s");
    }
}

/// Stops senders and receivers when dropped (end of a phase, or an error on the way).
struct StopOnDrop(Arc<RelayShared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
        self.0.done.store(true, Ordering::Relaxed);
    }
}

fn check_relay(shared: &RelayShared) -> Result<()> {
    let bad = shared.bad.load(Ordering::Relaxed);
    let errors = shared.errors.load(Ordering::Relaxed);
    ensure!(
        bad == 0,
        "{bad} relay frames with wrong source, link or length"
    );
    ensure!(
        errors == 0,
        "{errors} errors; first: {}",
        shared
            .first_error
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_default()
    );
    Ok(())
}

struct Latency {
    samples: Vec<f64>,
    rate: f64,
}

/// One pair, `payload`-byte frames at `rate` frames/s; latency of the frames after warm-up.
async fn relay_latency(
    ctx: &Ctx,
    payload: usize,
    rate: u64,
    warmup: Duration,
    window: Duration,
) -> Result<Latency> {
    let shared = Arc::new(RelayShared::default());
    let p = open_pair(ctx, "lat").await?;
    let skip = (warmup.as_secs_f64() * rate as f64) as u64;
    let total = skip + (window.as_secs_f64() * rate as f64) as u64;
    let expect = Expect {
        from: p.a_peer,
        link: p.link,
        len: payload.max(16) + 9,
    };
    let (mut a_sink, a_stream) = p.a.split();
    let (b_sink, b_stream) = p.b.split();
    let stopper = StopOnDrop(shared.clone());
    let drain = tokio::spawn(drain_sender_side(a_stream, shared.clone()));
    let pings = tokio::spawn(receiver_pings(b_sink, shared.clone(), p.heartbeat));
    let sh = shared.clone();
    let recv = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(total as usize);
        receive(b_stream, sh, expect, Some((&mut lat, skip)), Some(total)).await;
        lat
    });
    let (b_peer, link, heartbeat) = (p.b_peer, p.link, p.heartbeat);
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let mut body = vec![0x5au8; payload.max(16)];
    let start = Instant::now();
    let mut next_ping = start + heartbeat;
    let mut ping_id = 0;
    for seq in 0..total {
        let due = start + period.mul_f64(seq as f64);
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        let now = Instant::now();
        if now >= next_ping {
            ping_id += 1;
            send_json(&mut a_sink, &ClientMsg::Ping { id: ping_id }).await?;
            next_ping += heartbeat;
        }
        let now = Instant::now();
        body[..8].copy_from_slice(&(now.duration_since(epoch()).as_nanos() as u64).to_be_bytes());
        body[8..16].copy_from_slice(&seq.to_be_bytes());
        let frame = RelayFrame {
            peer: b_peer,
            link,
            payload: &body,
        }
        .encode();
        a_sink.send(Message::Binary(frame.into())).await?;
    }
    let sent_secs = start.elapsed().as_secs_f64();
    let lat = tokio::time::timeout(Duration::from_secs(10), recv)
        .await
        .map_err(|_| anyhow!("not every latency frame arrived within 10 s"))?
        .context("receiver task")?;
    shared.stop.store(true, Ordering::Relaxed);
    let _ = a_sink.close().await;
    wind_down(vec![drain], "senders").await;
    drop(stopper);
    wind_down(vec![pings], "receivers").await;
    check_relay(&shared)?;
    ensure!(
        lat.len() as u64 == total - skip,
        "got {} of {} latency samples",
        lat.len(),
        total - skip
    );
    Ok(Latency {
        samples: lat,
        rate: total as f64 / sent_secs,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

/// Nearest-rank percentile (`p` in 0..=100).
fn pct(values: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[derive(Default)]
struct Report {
    header: Vec<String>,
    rows: Vec<(String, String)>,
}

type SharedReport = Arc<Mutex<Report>>;

fn row(report: &SharedReport, metric: impl Into<String>, value: impl Into<String>) {
    let (metric, value) = (metric.into(), value.into());
    eprintln!("  {metric}: {value}");
    report.lock().unwrap().rows.push((metric, value));
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

const DEFINITIONS: &str = "\
Definitions:
* RSS = VmRSS of /proc/PID/status of the server process; per session = (RSS with N sessions - RSS at start) / N.
* Idle session = connected, said hello, sends {\"type\":\"ping\"} every heartbeat_interval_ms; in no group.
* Idle CPU = (utime+stime) delta of /proc/PID/stat over the window / wall time, in % of one core.
* Fan-out latency = from just before the joiner writes `join` until an earlier member of the group has read the
  `member_joined` naming the joiner (one sample per joiner and earlier member: 28 per group of 8). Join latency = same
  start until the joiner has read `joined`. Members of a group join one at a time (next join after the previous join's
  `joined` and all its `member_joined` arrived); the other idle sessions stay connected meanwhile.
* RSS after they left = after every session closed and the server's fd count was back at its start value, + settle.
* Connect+join rate = sessions / time from the first TCP connect to the last `joined` (each: connect, WebSocket
  upgrade, hello -> welcome, join -> joined; groups of 8).
* Relay throughput = relay frames read by the receivers in the window / window; MB/s = frames x payload bytes / 1e6 / s
  (9-byte relay header not counted). Senders write as fast as TCP back-pressure allows; receivers read all the time.
* Relay latency = from just before the sender writes a frame until the receiver has read it (fixed send rate).
* CPU figures are in % of one core (100 % = one core busy); 1 clock tick (10 ms) over a 5 s window is 0.2 %.
  \"bench\" is this load generator's own process.
* Percentiles are nearest-rank. Client and server share this machine's cores.";

fn print_report(report: &Report, complete: bool) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out);
    for h in &report.header {
        let _ = writeln!(out, "{h}");
    }
    if !complete {
        let _ = writeln!(
            out,
            "INCOMPLETE RUN: the rows below are what was measured before it stopped"
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "| metric | value |");
    let _ = writeln!(out, "|---|---|");
    for (m, v) in &report.rows {
        let _ = writeln!(out, "| {m} | {v} |");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "{DEFINITIONS}");
}

// ---------------------------------------------------------------------------------------------
// The run

async fn run(p: Params, report: SharedReport) -> Result<()> {
    let need = p.idle_large.max(p.rate_sessions).max(2 * p.pairs) as u64 + 256;
    if let Some((soft, hard)) = nofile_limit() {
        ensure!(
            soft >= need,
            "open-file limit {soft} (hard {hard}) is below the {need} this run needs (the server \
             inherits it too); raise it with `ulimit -n` or use smaller counts"
        );
    }
    epoch();
    let load_start = loadavg();
    eprintln!("starting {}", p.server_bin.display());
    let mut server = ServerProc::start(&p.server_bin, &p.server_args).await?;
    let ctx = Arc::new(Ctx {
        server: server.addr,
        sources: Sources {
            next: AtomicUsize::new(0),
            per_ip: p.per_ip,
        },
    });
    {
        let mut r = report.lock().unwrap();
        r.header.push(format!(
            "server: {} (pid {}), run as `--listen {} --no-turn{}`, log level: its default, log: {}",
            p.server_bin.display(),
            server.pid,
            server.addr,
            p.server_args.iter().map(|a| format!(" {a}")).collect::<String>(),
            server.log.display()
        ));
        r.header.push(format!(
            "settings: idle {} / {} sessions, idle window {} s, fan-out groups of {GROUP_SIZE} ({} \
             at a time), connect+join {} sessions ({} in setup at a time), relay {} pairs, window \
             {} s, latency {} frames/s for {} s, {} sessions per loopback source address",
            p.idle_small,
            p.idle_large,
            p.idle.as_secs(),
            p.fanout_parallel,
            p.rate_sessions,
            p.connect_parallel,
            p.pairs,
            p.relay_window.as_secs(),
            p.latency_rate,
            p.latency_window.as_secs(),
            p.per_ip
        ));
    }

    // ---- idle sessions ----
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds0 = server.fds()?;
    let rss0 = server.rss_kib()?;
    eprintln!("idle CPU with 0 sessions");
    let cpu0 = server.cpu_over(p.idle).await?;
    row(&report, "server RSS at start", mib(rss0));
    row(
        &report,
        "idle CPU, 0 sessions",
        format!("{cpu0:.2} % of a core"),
    );

    let mut sessions = Vec::new();
    for (n, label) in [(p.idle_small, "small"), (p.idle_large, "large")] {
        let add = n - sessions.len();
        eprintln!("opening {add} idle sessions (total {n})");
        let (more, took) = step(
            &format!("open {add} idle sessions"),
            p.step,
            open_sessions(
                &ctx,
                add,
                &format!("idle-{label}-"),
                false,
                p.connect_parallel,
            ),
        )
        .await?;
        sessions.extend(more);
        row(
            &report,
            format!("connect+hello rate ({add} sessions, idle phase)"),
            format!("{:.0} sessions/s", add as f64 / took.as_secs_f64()),
        );
        tokio::time::sleep(SETTLE).await;
        server.check_alive()?;
        let cpu = server.cpu_over(p.idle).await?;
        let rss = server.rss_kib()?;
        ensure_alive(&mut sessions, "the idle phase").await?;
        row(
            &report,
            format!("server RSS with {n} idle sessions"),
            format!("{} ({:.2}x start)", mib(rss), rss as f64 / rss0 as f64),
        );
        row(
            &report,
            format!("RSS per idle session ({n})"),
            format!("{:.1} KiB", rss.saturating_sub(rss0) as f64 / n as f64),
        );
        row(
            &report,
            format!("idle CPU, {n} sessions"),
            format!("{cpu:.2} % of a core"),
        );
    }

    // ---- join fan-out ----
    eprintln!(
        "fan-out: {} sessions join groups of {GROUP_SIZE}",
        sessions.len()
    );
    let n = sessions.len();
    let (fan, joined, back) = step(
        "join fan-out",
        p.step,
        fanout(sessions, p.fanout_parallel, p.step),
    )
    .await?;
    sessions = back;
    ensure_alive(&mut sessions, "the fan-out phase").await?;
    row(
        &report,
        format!(
            "join fan-out p50 / p99 ({n} sessions, groups of {GROUP_SIZE}, {} samples)",
            fan.len()
        ),
        format!("{:.3} / {:.3} ms", pct(&fan, 50.0), pct(&fan, 99.0)),
    );
    row(
        &report,
        format!("join -> joined p50 / p99 ({} samples)", joined.len()),
        format!("{:.3} / {:.3} ms", pct(&joined, 50.0), pct(&joined, 99.0)),
    );
    tokio::time::sleep(SETTLE).await;
    let rss_groups = server.rss_kib()?;
    row(
        &report,
        format!("server RSS with {n} sessions in groups of {GROUP_SIZE}"),
        format!(
            "{} ({:.1} KiB per session over start)",
            mib(rss_groups),
            rss_groups.saturating_sub(rss0) as f64 / n as f64
        ),
    );
    eprintln!("closing {n} sessions");
    step("close the sessions", p.step, async {
        close_all(sessions).await;
        Ok(())
    })
    .await?;
    let gone = server.wait_fds(fds0, Duration::from_secs(30)).await?;
    tokio::time::sleep(SETTLE).await;
    let rss_after = server.rss_kib()?;
    row(
        &report,
        format!("server RSS after all {n} left"),
        format!(
            "{} ({:.2}x start){}",
            mib(rss_after),
            rss_after as f64 / rss0 as f64,
            if gone {
                String::new()
            } else {
                format!(", server still had {} fds (start {fds0})", server.fds()?)
            }
        ),
    );

    // ---- connect+join rate ----
    eprintln!("connect+join: {} sessions", p.rate_sessions);
    let (rate_sessions, took) = step(
        "connect+join",
        p.step,
        open_sessions(&ctx, p.rate_sessions, "rate-", true, p.connect_parallel),
    )
    .await?;
    row(
        &report,
        format!(
            "connect+hello+join rate ({} sessions, {} in setup at a time)",
            p.rate_sessions, p.connect_parallel
        ),
        format!(
            "{:.0} sessions/s",
            p.rate_sessions as f64 / took.as_secs_f64()
        ),
    );
    step("close the sessions", p.step, async {
        close_all(rate_sessions).await;
        Ok(())
    })
    .await?;
    if !server.wait_fds(fds0, Duration::from_secs(30)).await? {
        eprintln!("  note: server fd count still above its start value");
    }

    // ---- relay ----
    server.check_alive()?;
    eprintln!("relay: {} pairs, 1 KiB frames", p.pairs);
    let t = step(
        "relay throughput, 1 KiB",
        p.step,
        relay_throughput(
            &ctx,
            &server,
            "tp1k-",
            p.pairs,
            1024,
            p.relay_warmup,
            p.relay_window,
        ),
    )
    .await?;
    row(
        &report,
        format!("relay {} pairs, 1 KiB payload", p.pairs),
        format!(
            "{:.0} frames/s, {:.1} MB/s (CPU: server {:.0} %, bench {:.0} %)",
            t.frames_per_s, t.mb_per_s, t.server_cpu, t.bench_cpu
        ),
    );
    server.wait_fds(fds0, Duration::from_secs(10)).await?;
    eprintln!("relay: 1 pair, 16 KiB frames");
    let t = step(
        "relay throughput, 16 KiB",
        p.step,
        relay_throughput(
            &ctx,
            &server,
            "tp16k-",
            1,
            16 * 1024,
            p.relay_warmup,
            p.relay_window,
        ),
    )
    .await?;
    row(
        &report,
        "relay 1 pair, 16 KiB payload",
        format!(
            "{:.0} frames/s, {:.1} MB/s (CPU: server {:.0} %, bench {:.0} %)",
            t.frames_per_s, t.mb_per_s, t.server_cpu, t.bench_cpu
        ),
    );
    server.wait_fds(fds0, Duration::from_secs(10)).await?;
    eprintln!(
        "relay latency: 1 pair, 1 KiB frames at {} frames/s",
        p.latency_rate
    );
    let l = step(
        "relay latency",
        p.step,
        relay_latency(
            &ctx,
            1024,
            p.latency_rate,
            p.latency_warmup,
            p.latency_window,
        ),
    )
    .await?;
    row(
        &report,
        format!(
            "relay latency p50 / p99 (1 pair, 1 KiB, {:.0} frames/s, {} samples)",
            l.rate,
            l.samples.len()
        ),
        format!(
            "{:.3} / {:.3} ms",
            pct(&l.samples, 50.0),
            pct(&l.samples, 99.0)
        ),
    );
    server.check_alive()?;
    let mut r = report.lock().unwrap();
    r.header.push(format!(
        "machine: {} cores, load average {load_start} at start, {} at end",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    ));
    Ok(())
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let p = match Params::new(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench_server: {e:#}");
            std::process::exit(2);
        }
    };
    let report = SharedReport::default();
    let limit = Duration::from_secs(args.max_seconds.max(1));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    // Dropping `run` (error, time limit, signal) drops the server guard, which kills the server.
    let ok = tokio::select! {
        r = tokio::time::timeout(limit, run(p, report.clone())) => match r {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                eprintln!("bench_server: {e:#}");
                false
            }
            Err(_) => {
                eprintln!("bench_server: the whole run took longer than {limit:?}");
                false
            }
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!("bench_server: interrupted");
            false
        }
        _ = term.recv() => {
            eprintln!("bench_server: terminated");
            false
        }
    };
    print_report(&report.lock().unwrap(), ok);
    std::process::exit(if ok { 0 } else { 1 });
}
