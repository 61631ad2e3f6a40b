//! Attack and fault tests against the real `peermesh-server` binary.
//!
//! Every test runs its own server process ([`ServerProc`]): `--listen` and `--admin-listen` on
//! free loopback ports plus the test's flags, ready once `/healthz` on the admin port answers,
//! killed by PID and reaped when the test ends, also when it panics.
//!
//! Attack tests assert two things besides their own: the server's resident memory grows by at
//! most a bound while the attack runs ([`Rss`]: the peak, VmHWM, after resetting it, against
//! VmRSS before), and a witness pair of clients in another group keeps exchanging relay frames
//! through the server during the attack, each round trip within a timeout ([`Witness`]).
//!
//! All traffic stays on 127.0.0.0/8. Tests that open many connections spread them over source
//! addresses 127.0.1.x ([`spread_source`]) to stay under the per-IP connection limit. Every loop
//! is bounded in count and time. Figures (RSS, timings) are printed; see them with
//! `cargo test -p peermesh-server --test abuse -- --nocapture`. Set `ABUSE_SERVER_LOG` (e.g. to
//! `debug`) to see the servers' logs.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{self, SplitStream};
use futures_util::{SinkExt, StreamExt};
use peermesh::protocol::{IceServer, LinkId, PeerId, RelayFrame, ServerMsg, PROTOCOL_VERSION};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

mod common;

type Ws = WebSocketStream<TcpStream>;

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Connect, hello, join and other setup steps (generous: debug builds on a busy machine).
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// One HTTP request/response on loopback.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections per source address when spreading (the server's default per-IP limit is 64).
const PER_SOURCE: usize = 32;
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

// ---------------------------------------------------------------------------------------------
// The server process

/// A `peermesh-server` child process, killed and reaped when dropped (also on panic).
struct ServerProc {
    child: Child,
    /// Signaling listener (WebSocket at /ws).
    ws: SocketAddr,
    /// Admin listener (/healthz, /metrics).
    admin: SocketAddr,
}

impl ServerProc {
    /// Start the binary with `flags` (plus `--no-turn` unless `--turn-listen` is among them, so
    /// that parallel tests do not compete for the default TURN port).
    async fn start(flags: &[&str]) -> ServerProc {
        ServerProc::launch(None, flags).await
    }

    /// Like [`ServerProc::start`], under `prlimit --nofile=N:N` when `nofile` is set (prlimit
    /// sets its own limit and execs the server, so the PID is the server's).
    async fn launch(nofile: Option<u64>, flags: &[&str]) -> ServerProc {
        const ATTEMPTS: usize = 3;
        let binary = env!("CARGO_BIN_EXE_peermesh-server");
        let log = std::env::var("ABUSE_SERVER_LOG").ok();
        for attempt in 1..=ATTEMPTS {
            let ws = SocketAddr::from((LOCALHOST, free_port()));
            let admin = SocketAddr::from((LOCALHOST, free_port()));
            let mut cmd = match nofile {
                Some(n) => {
                    let mut c = Command::new("prlimit");
                    c.arg(format!("--nofile={n}:{n}")).arg("--").arg(binary);
                    c
                }
                None => Command::new(binary),
            };
            cmd.arg("--listen")
                .arg(ws.to_string())
                .arg("--admin-listen")
                .arg(admin.to_string());
            if !flags.contains(&"--turn-listen") {
                cmd.arg("--no-turn");
            }
            cmd.args(flags)
                .env("RUST_LOG", log.as_deref().unwrap_or("error"))
                .stdin(Stdio::null())
                .stdout(if log.is_some() {
                    Stdio::inherit()
                } else {
                    Stdio::null()
                });
            let child = cmd.spawn().expect("spawn the server binary");
            let mut server = ServerProc { child, ws, admin };
            if server.wait_ready().await {
                return server;
            }
            // Dropping kills it; a port may have been taken meanwhile: try others.
            eprintln!("server start attempt {attempt} failed");
        }
        panic!("the server did not start in {ATTEMPTS} attempts");
    }

    /// Wait until `/healthz` on the admin port answers 200; `false` if the process exited or
    /// did not answer in time.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if !self.alive() {
                return false;
            }
            if http_status(LOCALHOST, self.admin, "/healthz").await == Some(200) {
                return true;
            }
            sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Send `signal` to the server process.
    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) with the PID of our own child process; no memory is involved.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
    }

    fn rss_bytes(&self) -> u64 {
        self.status_kib("VmRSS") * KIB
    }

    /// Scrape `/metrics` and return the value of `series` (a name with labels, exactly as
    /// printed), 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        let text = http_get(LOCALHOST, self.admin, "/metrics")
            .await
            .expect("scrape /metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().expect("metric value"))
    }

    /// Sessions the server closed with `code`, so far.
    async fn closes_with(&self, code: u16) -> f64 {
        self.metric(&format!("peermesh_session_closes_total{{code=\"{code}\"}}"))
            .await
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        // SIGKILL also ends a stopped (SIGSTOP) process.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind((LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A UDP port that was free a moment ago.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind((LOCALHOST, 0))
        .and_then(|s| s.local_addr())
        .expect("bind a free UDP port")
        .port()
}

// ---------------------------------------------------------------------------------------------
// Memory

/// Resident memory of the server from a starting point: the peak (VmHWM, reset at the start
/// through /proc/PID/clear_refs) against VmRSS at the start.
struct Rss {
    before: u64,
}

impl Rss {
    fn mark(server: &ServerProc) -> Rss {
        // "5" resets the peak RSS (Linux 4.0+). Without it the peak since start still bounds
        // the growth from above.
        let _ = std::fs::write(format!("/proc/{}/clear_refs", server.pid()), "5");
        Rss {
            before: server.rss_bytes(),
        }
    }

    /// Peak growth so far.
    fn growth(&self, server: &ServerProc) -> u64 {
        (server.status_kib("VmHWM") * KIB).saturating_sub(self.before)
    }

    /// Assert the peak growth stayed under `bound`, printing the figures.
    fn assert_growth_below(&self, server: &ServerProc, what: &str, bound: u64) {
        let growth = self.growth(server);
        println!(
            "{what}: RSS before {:.1} MiB, peak growth {:.1} MiB (bound {} MiB)",
            mib(self.before),
            mib(growth),
            bound / MIB
        );
        assert!(
            growth < bound,
            "{what}: RSS grew by {:.1} MiB (bound {} MiB)",
            mib(growth),
            bound / MIB
        );
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

// ---------------------------------------------------------------------------------------------
// TCP and HTTP

/// Source address for the `i`th of many connections: 127.0.1.1, 127.0.1.2, ... with
/// [`PER_SOURCE`] connections each.
fn spread_source(i: usize) -> Ipv4Addr {
    let k = i / PER_SOURCE;
    let (hi, lo) = (k / 250, k % 250);
    assert!(hi < 250, "too many source addresses");
    Ipv4Addr::new(127, 0, 1 + hi as u8, 1 + lo as u8)
}

/// A TCP connection from `from` (port chosen by the system) to `to`.
async fn tcp_connect(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    socket.connect(to).await
}

/// `GET path` (Connection: close) from `from`; the whole response, within [`HTTP_TIMEOUT`].
async fn http_get(from: Ipv4Addr, to: SocketAddr, path: &str) -> std::io::Result<String> {
    let exchange = async {
        let mut tcp = tcp_connect(from, to).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tcp.read_to_end(&mut response).await?;
        Ok(String::from_utf8_lossy(&response).into_owned())
    };
    timeout(HTTP_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// The status code of `GET path`, if a response came.
async fn http_status(from: Ipv4Addr, to: SocketAddr, path: &str) -> Option<u16> {
    let response = http_get(from, to, path).await.ok()?;
    response.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Open a connection from `from`, write `bytes` one at a time every `pause` (nothing if empty)
/// and return how long after connecting the server closed it (EOF or error on read); `None`
/// if it was still open after `limit` (or the connect failed).
async fn time_to_close(
    from: Ipv4Addr,
    to: SocketAddr,
    bytes: &[u8],
    pause: Duration,
    limit: Duration,
) -> Option<Duration> {
    let mut tcp = timeout(limit, tcp_connect(from, to)).await.ok()?.ok()?;
    let start = Instant::now();
    let (mut rd, mut wr) = tcp.split();
    let closed = async {
        let mut buf = [0u8; 1024];
        for _ in 0..1024 {
            if matches!(rd.read(&mut buf).await, Ok(0) | Err(_)) {
                break;
            }
        }
    };
    let trickle = async {
        for b in bytes {
            if wr.write_all(std::slice::from_ref(b)).await.is_err() {
                break;
            }
            sleep(pause).await;
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        () = closed => Some(start.elapsed()),
        () = trickle => None,
        () = sleep(limit) => None,
    }
}

/// Counters of the `TcpExt` section of /proc/net/netstat.
fn tcp_ext(names: &[&str]) -> Vec<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").expect("read /proc/net/netstat");
    let mut rows = text.lines().filter_map(|l| l.strip_prefix("TcpExt:"));
    let (keys, values) = (
        rows.next().expect("TcpExt names"),
        rows.next().expect("values"),
    );
    let table: Vec<(&str, u64)> = keys
        .split_whitespace()
        .zip(
            values
                .split_whitespace()
                .map(|v| v.parse().expect("counter")),
        )
        .collect();
    names
        .iter()
        .map(|n| {
            table
                .iter()
                .find(|(k, _)| k == n)
                .expect("counter present")
                .1
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// WebSocket clients

/// Run a setup step within [`SETUP_TIMEOUT`].
async fn within<T>(what: &str, step: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    timeout(SETUP_TIMEOUT, step)
        .await
        .unwrap_or_else(|_| Err(format!("{what}: no answer within {SETUP_TIMEOUT:?}")))
}

/// A WebSocket to `server` from source address `from` (the handshake only).
async fn ws_connect(server: SocketAddr, from: Ipv4Addr) -> Result<Ws, tungstenite::Error> {
    let tcp = tcp_connect(from, server).await?;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{server}/ws"), tcp).await?;
    Ok(ws)
}

fn relay(peer: PeerId, link: LinkId, payload: &[u8]) -> Message {
    Message::binary(
        RelayFrame {
            peer,
            link,
            payload,
        }
        .encode(),
    )
}

/// A frame from the server as the tests care about it.
enum Incoming {
    Msg(ServerMsg),
    Relay(Vec<u8>),
}

/// A raw client that has said hello.
struct Client {
    ws: Ws,
    peer: PeerId,
    ice_servers: Vec<IceServer>,
}

impl Client {
    /// Connect from `from` and say hello as `name`.
    async fn hello(server: SocketAddr, from: Ipv4Addr, name: &str) -> Result<Client, String> {
        within("hello", async {
            let ws = ws_connect(server, from)
                .await
                .map_err(|e| format!("connect from {from}: {e}"))?;
            let mut c = Client {
                ws,
                peer: 0,
                ice_servers: Vec::new(),
            };
            c.send_json(json!({"type": "hello", "version": PROTOCOL_VERSION, "name": name}))
                .await?;
            match c.recv_msg().await? {
                ServerMsg::Welcome {
                    peer, ice_servers, ..
                } => {
                    c.peer = peer;
                    c.ice_servers = ice_servers;
                    Ok(c)
                }
                other => Err(format!("expected welcome, got {other:?}")),
            }
        })
        .await
    }

    async fn send(&mut self, m: Message) -> Result<(), String> {
        self.ws.send(m).await.map_err(|e| format!("send: {e}"))
    }

    async fn send_json(&mut self, v: Value) -> Result<(), String> {
        self.send(Message::text(v.to_string())).await
    }

    /// The next frame (no timeout); a close or the end of the connection is an error.
    async fn next(&mut self) -> Result<Incoming, String> {
        next_frame(&mut self.ws).await
    }

    /// The next JSON frame, skipping `pong` and `ice_servers`.
    async fn recv_msg(&mut self) -> Result<ServerMsg, String> {
        loop {
            match self.next().await? {
                Incoming::Msg(ServerMsg::Pong { .. } | ServerMsg::IceServers { .. }) => {}
                Incoming::Msg(m) => return Ok(m),
                Incoming::Relay(_) => return Err("unexpected relay frame".into()),
            }
        }
    }

    /// The next relay frame, skipping `pong` and `ice_servers`.
    async fn recv_relay(&mut self) -> Result<Vec<u8>, String> {
        loop {
            match self.next().await? {
                Incoming::Relay(b) => return Ok(b),
                Incoming::Msg(ServerMsg::Pong { .. } | ServerMsg::IceServers { .. }) => {}
                Incoming::Msg(m) => return Err(format!("expected a relay frame, got {m:?}")),
            }
        }
    }

    async fn join(&mut self, group: &str) -> Result<Vec<peermesh::protocol::MemberInfo>, String> {
        within("join", async {
            self.send_json(json!({"type": "join", "group": group}))
                .await?;
            match self.recv_msg().await? {
                ServerMsg::Joined { members, .. } => Ok(members),
                other => Err(format!("expected joined, got {other:?}")),
            }
        })
        .await
    }
}

/// The next data frame from any WebSocket (pings and pongs skipped, at most a bounded number).
async fn next_frame<S>(ws: &mut S) -> Result<Incoming, String>
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    for _ in 0..1024 {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .map(Incoming::Msg)
                    .map_err(|e| format!("bad server frame {t}: {e}"))
            }
            Some(Ok(Message::Binary(b))) => return Ok(Incoming::Relay(b.to_vec())),
            Some(Ok(Message::Close(f))) => return Err(format!("closed by the server: {f:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("connection ended".into()),
        }
    }
    Err("only pings and pongs".into())
}

/// Two clients from 127.0.0.1 that said hello and joined `group`, and their link id.
async fn pair_in_group(server: SocketAddr, group: &str) -> (Client, Client, LinkId) {
    let (name_a, name_b) = (format!("{group}-a"), format!("{group}-b"));
    let mut a = Client::hello(server, LOCALHOST, &name_a)
        .await
        .expect("first pair member");
    let mut b = Client::hello(server, LOCALHOST, &name_b)
        .await
        .expect("second pair member");
    a.join(group).await.expect("first join");
    let members = b.join(group).await.expect("second join");
    let link = members
        .iter()
        .find(|m| m.peer == a.peer)
        .expect("the first member is listed")
        .link;
    match within("member_joined", a.recv_msg()).await {
        Ok(ServerMsg::MemberJoined { member, .. }) if member.peer == b.peer => {}
        other => panic!("expected member_joined, got {other:?}"),
    }
    (a, b, link)
}

// ---------------------------------------------------------------------------------------------
// The witness

/// A pair of clients in group "witness" doing relay round trips through the server in the
/// background: a → b, b echoes → a, each round trip within [`Witness::ROUND_TRIP_TIMEOUT`].
struct Witness {
    rounds: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    /// What the first client got in `welcome`.
    ice_servers: Vec<IceServer>,
}

impl Witness {
    const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(2);
    const PAUSE: Duration = Duration::from_millis(50);
    const MAX_ROUNDS: u64 = 5_000;
    /// Round trips required during an attack window.
    const MIN_ROUNDS: u64 = 3;
    /// Attack windows are stretched to at least this long so that round trips can happen.
    const MIN_WINDOW: Duration = Duration::from_secs(1);

    /// Connect the pair and start the round trips once the first one succeeded.
    async fn start(server: &ServerProc) -> Witness {
        let (mut a, mut b, link) = pair_in_group(server.ws, "witness").await;
        within(
            "first witness round trip",
            round_trip(&mut a, &mut b, link, 0),
        )
        .await
        .expect("the witness pair works");
        let rounds = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let ice_servers = a.ice_servers.clone();
        let task = tokio::spawn({
            let (rounds, failure, stop) = (rounds.clone(), failure.clone(), stop.clone());
            async move {
                for n in 1..=Witness::MAX_ROUNDS {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let started = Instant::now();
                    let result = timeout(
                        Witness::ROUND_TRIP_TIMEOUT,
                        round_trip(&mut a, &mut b, link, n),
                    )
                    .await;
                    let error = match result {
                        Ok(Ok(())) => {
                            rounds.fetch_add(1, Ordering::Relaxed);
                            sleep(Witness::PAUSE).await;
                            continue;
                        }
                        Ok(Err(e)) => e,
                        Err(_) => format!("no echo within {:?}", Witness::ROUND_TRIP_TIMEOUT),
                    };
                    let after = started.elapsed();
                    *failure.lock().unwrap() = Some(format!("round trip {n} ({after:?}): {error}"));
                    break;
                }
            }
        });
        Witness {
            rounds,
            failure,
            stop,
            task,
            ice_servers,
        }
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    fn assert_no_failure(&self) {
        if let Some(f) = self.failure.lock().unwrap().as_ref() {
            panic!("witness failed: {f}");
        }
    }

    /// Run `attack` (stretched to [`Witness::MIN_WINDOW`]) and assert that the witness made
    /// round trips meanwhile and none failed.
    async fn during<T>(&self, what: &str, attack: impl Future<Output = T>) -> T {
        let (start, before) = (Instant::now(), self.rounds());
        let out = attack.await;
        sleep(Witness::MIN_WINDOW.saturating_sub(start.elapsed())).await;
        let made = self.rounds() - before;
        println!(
            "{what}: witness made {made} round trips in {:?}",
            start.elapsed()
        );
        self.assert_no_failure();
        assert!(
            made >= Witness::MIN_ROUNDS,
            "{what}: the witness made only {made} round trips"
        );
        out
    }

    /// Stop the round trips (closing the pair); asserts none failed.
    async fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("witness stops")
            .expect("witness task");
        self.assert_no_failure();
    }
}

/// One relay round trip a → b → a carrying `n`.
async fn round_trip(a: &mut Client, b: &mut Client, link: LinkId, n: u64) -> Result<(), String> {
    let payload = n.to_be_bytes();
    a.send(relay(b.peer, link, &payload)).await?;
    let got = b.recv_relay().await?;
    let expected = RelayFrame {
        peer: a.peer,
        link,
        payload: &payload,
    }
    .encode();
    if got != expected {
        return Err(format!("b got {got:?}, expected {expected:?}"));
    }
    b.send(relay(a.peer, link, &payload)).await?;
    let back = a.recv_relay().await?;
    match RelayFrame::decode(&back) {
        Ok(f) if f.peer == b.peer && f.link == link && f.payload == payload => Ok(()),
        other => Err(format!("a got {other:?} back")),
    }
}

/// A server under attack: the process, a witness pair on it and its RSS from just before the
/// attack.
struct Arena {
    server: ServerProc,
    witness: Witness,
    rss: Rss,
}

impl Arena {
    async fn start(flags: &[&str]) -> Arena {
        Arena::launch(None, flags).await
    }

    /// See [`ServerProc::launch`].
    async fn launch(nofile: Option<u64>, flags: &[&str]) -> Arena {
        let server = ServerProc::launch(nofile, flags).await;
        let witness = Witness::start(&server).await;
        let rss = Rss::mark(&server);
        Arena {
            server,
            witness,
            rss,
        }
    }

    /// After the attack: the RSS grew by less than `rss_bound` and the witness never failed.
    /// Returns the server for further checks (dropping it kills it).
    async fn finish(self, what: &str, rss_bound: u64) -> ServerProc {
        self.rss.assert_growth_below(&self.server, what, rss_bound);
        self.witness.finish().await;
        self.server
    }
}

// ---------------------------------------------------------------------------------------------
// Attackers

/// What a flooding client saw.
#[derive(Debug)]
struct Flood {
    sent: u64,
    /// When a send failed or the server's close frame was read, after the flood started.
    closed_after: Option<Duration>,
    /// The server's close code (only when replies were read).
    close_code: Option<u16>,
}

/// Send `frame` as fast as the connection takes it until a send fails (the server closed the
/// connection), the server's close frame is read (`read_replies`), `limit` passes or 200 000
/// frames are sent. Without `read_replies` the client never reads anything.
async fn flood(ws: Ws, frame: Message, read_replies: bool, limit: Duration) -> Flood {
    const MAX_FRAMES: u64 = 200_000;
    let start = Instant::now();
    let deadline = start + limit;
    let (mut sink, stream) = ws.split();
    // The read half is either read by a task or kept here unread (the connection stays open).
    let (reader, _unread) = if read_replies {
        (Some(tokio::spawn(read_close_code(stream))), None)
    } else {
        (None, Some(stream))
    };
    let mut flood = Flood {
        sent: 0,
        closed_after: None,
        close_code: None,
    };
    while flood.sent < MAX_FRAMES {
        match timeout_at(deadline, sink.send(frame.clone())).await {
            Ok(Ok(())) => flood.sent += 1,
            Ok(Err(_)) => {
                flood.closed_after = Some(start.elapsed());
                break;
            }
            Err(_) => break,
        }
        if reader.as_ref().is_some_and(|r| r.is_finished()) {
            flood.closed_after = Some(start.elapsed());
            break;
        }
    }
    if let Some(reader) = reader {
        if let Ok(Ok(code)) = timeout(Duration::from_secs(3), reader).await {
            flood.close_code = code;
            flood.closed_after.get_or_insert(start.elapsed());
        }
    }
    flood
}

/// Read until the server's close frame (its code) or the end of the connection (`None`).
async fn read_close_code(mut stream: SplitStream<Ws>) -> Option<u16> {
    for _ in 0..1_000_000 {
        match stream.next().await? {
            Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Run `attack` on `n` tasks at once (`attack(i)` for i in 0..n); the results in order of `i`.
async fn run_concurrently<T, F>(n: usize, attack: impl Fn(usize) -> F) -> Vec<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let mut set = JoinSet::new();
    for i in 0..n {
        let task = attack(i);
        set.spawn(async move { (i, task.await) });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        out.push(r.expect("attack task"));
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, t)| t).collect()
}

/// A text frame of `len` bytes with a type the server does not know. With `long_type` the type
/// itself is the padding (the `unknown_type` reply quotes at most 64 characters of it);
/// otherwise the padding is another field.
fn unknown_type_frame(len: usize, long_type: bool) -> Message {
    let (head, tail) = if long_type {
        (r#"{"type":""#, r#""}"#)
    } else {
        (r#"{"type":"no_such_type","pad":""#, r#""}"#)
    };
    let pad = "x".repeat(len - head.len() - tail.len());
    Message::text(format!("{head}{pad}{tail}"))
}

// ---------------------------------------------------------------------------------------------
// 1. Error replies a client does not read

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_error_replies_close_the_client() {
    let arena = Arena::start(&[]).await;
    let closes_before = arena.server.closes_with(1008).await + arena.server.closes_with(1013).await;

    // Two clients say hello, then never read and send 60 KB frames of an unknown type as fast
    // as they can: every frame is refused. The answers are short (the echoed type is cut to 64
    // characters) and, past 1000 of them, limited to 100 a second and then one a second; after
    // 1000 more refused frames without an answer the server closes the client (1008), as it
    // would if its queue of answers overflowed (1008) or nothing could be written for 10 s
    // (1013). Neither costs the server memory meanwhile.
    let ws_addr = arena.server.ws;
    let limit = Duration::from_secs(16);
    let floods = arena
        .witness
        .during(
            "unread replies",
            run_concurrently(2, move |i| async move {
                let attacker = Client::hello(ws_addr, LOCALHOST, "flooder")
                    .await
                    .expect("attacker hello");
                let frame = unknown_type_frame(60_000, i == 0);
                flood(attacker.ws, frame, false, limit).await
            }),
        )
        .await;
    println!("unread replies: {floods:?}");
    for (i, f) in floods.iter().enumerate() {
        assert!(
            f.closed_after.is_some(),
            "flooder {i} is not closed within {limit:?}"
        );
    }
    assert_eq!(
        arena.server.closes_with(1008).await + arena.server.closes_with(1013).await - closes_before,
        2.0,
        "closed with 1008 or 1013"
    );
    arena.finish("unread replies", 64 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_before_hello_close_with_1008() {
    let arena = Arena::start(&[]).await;
    let closes_before = arena.server.closes_with(1008).await;

    // No hello, 60 KB frames: past hello_max_bytes (16 KiB) with the first one. This client
    // reads, so it sees the close code.
    let ws = ws_connect(arena.server.ws, LOCALHOST)
        .await
        .expect("connect");
    let limit = Duration::from_secs(5);
    let f = arena
        .witness
        .during(
            "frames before hello",
            flood(ws, unknown_type_frame(60_000, true), true, limit),
        )
        .await;
    println!("frames before hello: {f:?}");
    let closed = f.closed_after.expect("closed");
    assert!(
        closed < Duration::from_secs(2),
        "closed only after {closed:?}"
    );
    if let Some(code) = f.close_code {
        assert_eq!(code, 1008);
    }
    assert_eq!(arena.server.closes_with(1008).await - closes_before, 1.0);
    arena.finish("frames before hello", 32 * MIB).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Small relay frames before hello from clients that never read

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_frames_before_hello_close_quickly() {
    const ATTACKERS: usize = 20;
    let arena = Arena::start(&[]).await;
    let closes_before = arena.server.closes_with(1008).await;

    // 9-byte relay frames (a header with no payload) as fast as possible, never reading: past
    // hello_max_frames (4) with the fifth.
    let ws_addr = arena.server.ws;
    let floods = arena
        .witness
        .during(
            "relay frames before hello",
            run_concurrently(ATTACKERS, move |_| async move {
                let ws = ws_connect(ws_addr, LOCALHOST).await.expect("connect");
                flood(ws, relay(1, 1, &[]), false, Duration::from_secs(5)).await
            }),
        )
        .await;
    let slowest = floods
        .iter()
        .map(|f| f.closed_after.expect("every attacker is closed"))
        .max()
        .unwrap();
    let most_sent = floods.iter().map(|f| f.sent).max().unwrap();
    println!("relay frames before hello: slowest close {slowest:?}, most frames sent {most_sent}");
    assert!(
        slowest < Duration::from_secs(2),
        "slowest close {slowest:?}"
    );
    let closed = arena.server.closes_with(1008).await - closes_before;
    assert_eq!(closed, ATTACKERS as f64, "sessions closed with 1008");
    arena.finish("relay frames before hello", 16 * MIB).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Idle sessions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_cost_little_and_memory_returns() {
    const SESSIONS: usize = 2_000;
    // Sessions stay idle while they are opened and measured.
    let arena = Arena::start(&["--heartbeat-timeout-ms", "120000"]).await;
    let server = &arena.server;
    let baseline = arena.rss.before;

    let ws_addr = server.ws;
    let started = Instant::now();
    let sessions: Vec<Client> = arena
        .witness
        .during("opening idle sessions", async {
            stream::iter(0..SESSIONS)
                .map(|i| Client::hello(ws_addr, spread_source(i), "idle"))
                .buffer_unordered(64)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()
                .expect("every idle session says hello")
        })
        .await;
    let opened_in = started.elapsed();
    sleep(Duration::from_millis(500)).await;
    let open_rss = server.rss_bytes();
    let per_session = open_rss.saturating_sub(baseline) / SESSIONS as u64;
    println!(
        "idle sessions: {SESSIONS} opened in {opened_in:?}; RSS {:.1} -> {:.1} MiB, {:.1} KiB \
         per session, peak growth {:.1} MiB",
        mib(baseline),
        mib(open_rss),
        per_session as f64 / KIB as f64,
        mib(arena.rss.growth(server))
    );
    assert_eq!(
        server.metric("peermesh_sessions").await,
        SESSIONS as f64 + 2.0
    );
    assert!(
        per_session < 64 * KIB,
        "{per_session} bytes of RSS per idle session"
    );

    // Close them all: the server trims its heap within a second or two after sessions have ended.
    drop(sessions);
    let closed_at = Instant::now();
    let (mut rss_now, mut left) = (server.rss_bytes(), f64::NAN);
    while closed_at.elapsed() < Duration::from_secs(15) {
        left = server.metric("peermesh_sessions").await;
        rss_now = server.rss_bytes();
        if rss_now <= 2 * baseline && left == 2.0 {
            break;
        }
        sleep(Duration::from_millis(250)).await;
    }
    println!(
        "idle sessions: RSS {:.1} MiB {:?} after closing (baseline {:.1} MiB)",
        mib(rss_now),
        closed_at.elapsed(),
        mib(baseline)
    );
    assert_eq!(left, 2.0, "sessions left besides the witness pair");
    assert!(
        rss_now <= 2 * baseline,
        "RSS {:.1} MiB 15 s after closing, baseline {:.1} MiB",
        mib(rss_now),
        mib(baseline)
    );
    arena.finish("idle sessions", 128 * MIB).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Slowloris and idle TCP connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_idle_connections_are_closed() {
    const EACH: usize = 200;
    let arena = Arena::start(&[
        "--header-read-timeout-ms",
        "1000",
        "--upgrade-timeout-ms",
        "3000",
    ])
    .await;

    // The first EACH send a request one byte per 300 ms, the others send nothing.
    let ws_addr = arena.server.ws;
    let limit = Duration::from_secs(5);
    let request: &'static [u8] =
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\r\n";
    let closes = arena
        .witness
        .during(
            "slowloris",
            run_concurrently(2 * EACH, move |i| {
                let bytes = if i < EACH { request } else { &[] };
                let pause = Duration::from_millis(300);
                time_to_close(spread_source(i), ws_addr, bytes, pause, limit)
            }),
        )
        .await;
    let (slow, silent) = closes.split_at(EACH);
    for (what, times) in [("slow", slow), ("silent", silent)] {
        let open = times.iter().filter(|t| t.is_none()).count();
        let slowest = times.iter().flatten().max();
        println!("slowloris: {what} connections closed, slowest after {slowest:?}; {open} open");
        assert_eq!(open, 0, "{what} connections still open after {limit:?}");
        // The header-read timeout (1 s) closed them, not the upgrade deadline (3 s).
        assert!(
            slowest.is_some_and(|t| *t < Duration::from_millis(2500)),
            "{what}: slowest close after {slowest:?}"
        );
    }
    arena.finish("slowloris", 32 * MIB).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Out of file descriptors

/// Allocate on the TURN service at `server` with the credentials a session got in `welcome`,
/// then release it; returns the relayed address.
async fn allocate_and_release(server: SocketAddr, ice: &[IceServer]) -> SocketAddr {
    use common::turn_client::{assert_success, relayed_addr, RawClient};
    let turn = ice
        .iter()
        .find(|s| s.urls.iter().any(|u| u.starts_with("turn:")))
        .expect("a turn: server in welcome");
    let mut client = RawClient::new(
        server,
        turn.username.as_deref().expect("TURN username"),
        turn.credential.as_deref().expect("TURN credential"),
    )
    .await;
    let allocated = client.allocate().await;
    assert_success(&allocated, "Allocate");
    assert_success(&client.refresh(0).await, "Refresh with lifetime 0");
    relayed_addr(&allocated)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_still_answers() {
    const IDLE: usize = 400;
    assert!(
        Command::new("prlimit").arg("--version").output().is_ok(),
        "this test needs prlimit (util-linux)"
    );
    let turn = SocketAddr::from((LOCALHOST, free_udp_port()));
    let turn_listen = turn.to_string();
    let mut arena = Arena::launch(
        Some(300),
        &[
            "--header-read-timeout-ms",
            "60000",
            "--upgrade-timeout-ms",
            "60000",
            "--max-connections-per-ip",
            "100000",
            "--turn-listen",
            &turn_listen,
            "--turn-allow-peer",
            "127.0.0.0/8",
        ],
    )
    .await;
    let refused_before = arena
        .server
        .metric("peermesh_connections_refused_total{reason=\"max_connections\"}")
        .await;

    let ws_addr = arena.server.ws;
    let idle = arena
        .witness
        .during("out of descriptors", async {
            let idle: Vec<TcpStream> = run_concurrently(IDLE, move |_| async move {
                timeout(SETUP_TIMEOUT, tcp_connect(LOCALHOST, ws_addr)).await
            })
            .await
            .into_iter()
            .map(|r| r.expect("connect in time").expect("connect"))
            .collect();
            // Refused connections hold a descriptor for up to a second while they are answered.
            sleep(Duration::from_millis(1500)).await;

            assert!(arena.server.alive(), "the server died");
            assert_eq!(
                http_status(LOCALHOST, arena.server.admin, "/healthz").await,
                Some(200),
                "admin /healthz"
            );
            let started = Instant::now();
            match timeout(SETUP_TIMEOUT, ws_connect(ws_addr, LOCALHOST)).await {
                Ok(Err(tungstenite::Error::Http(response))) => {
                    assert_eq!(response.status().as_u16(), 503, "{response:?}")
                }
                Ok(Err(e)) => panic!("a new client got {e} instead of HTTP 503"),
                Ok(Ok(_)) => panic!("a new client got in with every descriptor taken"),
                Err(_) => panic!("a new client got no answer within {SETUP_TIMEOUT:?}"),
            }
            println!("out of descriptors: refusal after {:?}", started.elapsed());

            // TURN still allocates, with the credentials a session was handed.
            let relayed = allocate_and_release(turn, &arena.witness.ice_servers).await;
            println!("out of descriptors: TURN relayed address {relayed}");
            idle
        })
        .await;
    let refused = arena
        .server
        .metric("peermesh_connections_refused_total{reason=\"max_connections\"}")
        .await
        - refused_before;
    let fd_refused = arena
        .server
        .metric("peermesh_connections_refused_total{reason=\"file_descriptors\"}")
        .await;
    println!("out of descriptors: {refused} refused as server full, {fd_refused} for descriptors");
    // The limits fitted to the descriptor limit refuse clients before `accept` itself fails.
    assert!(refused > 0.0, "nobody was refused as server full");
    assert_eq!(fd_refused, 0.0, "accept ran out of descriptors");
    let server = arena.finish("out of descriptors", 32 * MIB).await;

    // Once the idle connections are gone, new clients get in again.
    drop(idle);
    let ws_addr = server.ws;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::hello(ws_addr, LOCALHOST, "after").await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                println!("out of descriptors: not yet: {e}");
                sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no new client got in after the idle connections closed: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Connect burst

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_burst_gets_answers_without_backlog_drops() {
    const CONNECTS: usize = 1_000;
    const COUNTERS: [&str; 2] = ["ListenOverflows", "ListenDrops"];
    let arena = Arena::start(&[]).await;
    let before = tcp_ext(&COUNTERS);

    let ws_addr = arena.server.ws;
    let started = Instant::now();
    let answers = arena
        .witness
        .during(
            "connect burst",
            run_concurrently(CONNECTS, move |i| async move {
                let status = http_status(spread_source(i), ws_addr, "/healthz").await;
                (status, Instant::now())
            }),
        )
        .await;
    let after = tcp_ext(&COUNTERS);
    let ok = answers.iter().filter(|(s, _)| *s == Some(200)).count();
    let full = answers.iter().filter(|(s, _)| *s == Some(503)).count();
    let last = answers.iter().map(|(_, t)| *t).max().unwrap() - started;
    println!(
        "connect burst: {ok} x 200, {full} x 503 within {last:?}; {COUNTERS:?} {before:?} -> \
         {after:?}"
    );
    assert_eq!(ok + full, CONNECTS, "every connection gets an HTTP answer");
    assert!(last < Duration::from_secs(5), "last answer after {last:?}");
    assert_eq!(before, after, "the listen backlog overflowed");
    arena.finish("connect burst", 48 * MIB).await;
}

// ---------------------------------------------------------------------------------------------
// 7. The server process stalls

/// What one chattering client saw.
#[derive(Debug, Default)]
struct Chatter {
    /// Relay frames received, with when.
    relays: Vec<Instant>,
    /// A close frame, read error or end of the connection, and when.
    ended: Option<(Instant, String)>,
}

/// Every second send a `ping` and a relay frame to `to`, and read everything, until `until`.
async fn chatter(c: Client, to: PeerId, link: LinkId, until: Instant) -> (Chatter, Ws) {
    let (mut sink, mut stream) = c.ws.split();
    let writer = async {
        for id in 0..60u64 {
            if Instant::now() >= until {
                break;
            }
            let ping = Message::text(json!({"type": "ping", "id": id}).to_string());
            if sink.send(ping).await.is_err() || sink.send(relay(to, link, b"hi")).await.is_err() {
                break;
            }
            sleep(Duration::from_secs(1)).await;
        }
        std::future::pending::<()>().await
    };
    let reader = async {
        let mut seen = Chatter::default();
        for _ in 0..10_000 {
            match timeout_at(until, next_frame(&mut stream)).await {
                Err(_) => break,
                Ok(Ok(Incoming::Relay(_))) => seen.relays.push(Instant::now()),
                Ok(Ok(Incoming::Msg(ServerMsg::Pong { .. }))) => {}
                Ok(Ok(Incoming::Msg(m))) => {
                    seen.ended = Some((Instant::now(), format!("unexpected {m:?}")));
                    break;
                }
                Ok(Err(e)) => {
                    seen.ended = Some((Instant::now(), e));
                    break;
                }
            }
        }
        seen
    };
    let seen = tokio::select! {
        seen = reader => seen,
        () = writer => unreachable!("the writer never ends"),
    };
    // The connection is handed back so that it outlives the other client's chatter.
    (seen, sink.reunite(stream).expect("halves of one socket"))
}

/// Two clients chatter (ping and relay every second) while the server is stopped (SIGSTOP) for
/// `stall`, longer or shorter than its 3 s heartbeat timeout: frames that waited in the socket
/// count as liveness, so neither is closed and both receive relay frames afterwards.
async fn survive_stall(stall: Duration) {
    let server = ServerProc::start(&["--heartbeat-timeout-ms", "3000"]).await;
    let (a, b, link) = pair_in_group(server.ws, "stall").await;
    let (a_peer, b_peer) = (a.peer, b.peer);
    // Stop half a second after a round of pings, when the server has read them.
    let before = Duration::from_millis(2500);
    let after = Duration::from_secs(5);
    let until = Instant::now() + before + stall + after;
    let a = tokio::spawn(chatter(a, b_peer, link, until));
    let b = tokio::spawn(chatter(b, a_peer, link, until));

    sleep(before).await;
    server.signal(libc::SIGSTOP);
    sleep(stall).await;
    server.signal(libc::SIGCONT);
    let resumed = Instant::now();

    let (a, b) = (a.await.expect("chatter a"), b.await.expect("chatter b"));
    for (name, seen) in [("a", a.0), ("b", b.0)] {
        let later = seen.relays.iter().filter(|t| **t > resumed).count();
        let ended = seen
            .ended
            .map(|(t, e)| format!("{:?} after resuming: {e}", t - resumed));
        println!(
            "stall {stall:?}: {name} got {} relay frames, {later} after resuming; ended: {ended:?}",
            seen.relays.len(),
        );
        assert_eq!(
            ended, None,
            "{name} lost its session over a {stall:?} stall"
        );
        assert!(later >= 3, "{name} got {later} relay frames after resuming");
    }
}

// Longer than the timeout: the pings sent during the stall wait in the sockets and count once
// read. (At SIGCONT the runtime fires the expired timers before its I/O driver has seen those
// frames; the server gives the driver a turn before it decides.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_longer_than_heartbeat_timeout_keeps_sessions() {
    survive_stall(Duration::from_millis(4500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_shorter_than_heartbeat_timeout_keeps_sessions() {
    survive_stall(Duration::from_secs(2)).await;
}

// ---------------------------------------------------------------------------------------------
// 8. Tiny relay frames to a receiver that never reads

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_relay_frames_to_a_receiver_that_never_reads() {
    let arena = Arena::start(&[]).await;
    let (a, b, link) = pair_in_group(arena.server.ws, "tiny").await;
    let b_peer = b.peer;
    // b never reads but keeps its session alive with WebSocket pings. a sends it empty relay
    // frames (9 bytes each: a queue counted in payload bytes alone would hold ~460 000 of
    // them, ~40 MB of server memory, for good). The server counts each queued frame with its
    // overhead, stops reading from a once b's queue is full, and drops b after 10 s without
    // progress: a hears b leave.
    let (mut b_sink, _b_unread) = b.ws.split();
    let keepalive = tokio::spawn(async move {
        for _ in 0..40 {
            if b_sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                break;
            }
            sleep(Duration::from_secs(1)).await;
        }
    });
    let (mut a_sink, mut a_stream) = a.ws.split();
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        let frame = relay(b_peer, link, b"");
        tokio::spawn(async move {
            let mut sent = 0u64;
            while sent < 600_000 && !stop.load(Ordering::Relaxed) {
                match timeout(Duration::from_millis(200), a_sink.feed(frame.clone())).await {
                    Ok(Ok(())) => sent += 1,
                    Ok(Err(_)) => break,
                    Err(_) => continue, // held back: the server reads no more from a
                }
            }
            sent
        })
    };
    let started = Instant::now();
    let left = arena
        .witness
        .during("tiny frames", async {
            timeout(Duration::from_secs(30), async {
                loop {
                    match next_frame(&mut a_stream).await {
                        Ok(Incoming::Msg(ServerMsg::MemberLeft { peer, .. })) if peer == b_peer => {
                            return started.elapsed()
                        }
                        Ok(_) => {}
                        Err(e) => panic!("a: {e}"),
                    }
                }
            })
            .await
        })
        .await
        .expect("b dropped within 30 s");
    stop.store(true, Ordering::Relaxed);
    let sent = flood.await.expect("flood task");
    keepalive.abort();
    println!("tiny frames: b dropped after {left:?}, a sent {sent} frames");
    assert!(
        arena.server.closes_with(1013).await >= 1.0,
        "b closed with 1013"
    );
    arena.finish("tiny frames", 32 * MIB).await;
}
