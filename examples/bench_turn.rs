//! Loopback benchmark: our embedded TURN service against coturn.
//!
//! ```text
//! cargo run --release --example bench_turn
//! cargo run --release --example bench_turn -- --rounds 10
//! cargo run --release --example bench_turn -- --quick
//! ```
//!
//! Needs `turnserver` (Debian package `coturn`) on the PATH. In one process it runs a peermesh
//! server with the embedded TURN service (`TurnMode::Embedded`), a foreground coturn with REST
//! credentials (`--use-auth-secret`) and a second peermesh server that hands out that coturn
//! (`TurnMode::External`). Each round measures both TURN servers, alternating which goes first:
//!
//! * relay rate, with a load generator written here (the same code for both servers): `--clients`
//!   UDP sockets each Allocate (REST credentials), CreatePermission and ChannelBind to a UDP echo
//!   peer run in this process, then send ChannelData messages of 120 B and 1000 B with at most
//!   `--window` in flight per client; every echoed message counts as one round trip (two relayed
//!   datagrams: client → peer and peer → client). A message not echoed within 50 ms counts as
//!   lost and frees its slot. Also taken: the CPU time of the server (coturn's process; for ours
//!   this process minus the generator's and echo peer's threads) and of the generator, and for
//!   ours the share of relayed datagrams that took its ChannelData fast path. Besides the ratio
//!   of the medians, the summary gives the per-round ratios (each round measures both servers
//!   back to back, under nearly the same background load);
//! * a relay-only pair of peermesh clients (`with_relay_only(true)`): join → `PathChanged {
//!   Direct { relay/relay } }` on both sides, RTT of 32-byte reliable messages, reliable
//!   throughput with 16 KiB messages.
//!
//! Network: loopback only (127.0.0.1); the echo peer, both TURN servers and their relay ports
//! are on loopback. Every loop is bounded in count and time, every step has a time limit and
//! the whole run has one (`--max-seconds`). coturn runs with its own temporary `--db` and
//! `--pidfile` and is killed when the program ends (also on error, time-out, Ctrl-C and SIGTERM);
//! the generator releases its allocations (Refresh with LIFETIME 0) after each measurement.
//!
//! Progress goes to stderr, the table to stdout.

mod support;
use support::*;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context as _, Result};

use clap::Parser;
use peermesh::{CandidateType, ClientConfig, Event, Path};
use peermesh_server::turn::{rest_credentials, TurnConfig, TurnHandle, TurnStats};
use peermesh_server::{Config as ServerConfig, Server, ServerHandle, TurnMode};
use stun::attributes::{
    ATTR_CHANNEL_NUMBER, ATTR_LIFETIME, ATTR_NONCE, ATTR_REALM, ATTR_REQUESTED_TRANSPORT,
    ATTR_USERNAME, ATTR_XOR_PEER_ADDRESS, ATTR_XOR_RELAYED_ADDRESS,
};
use stun::error_code::ErrorCodeAttribute;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    is_message, Getter as _, Message, MessageType, Method, Setter as _, CLASS_REQUEST,
    CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE, METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION,
    METHOD_REFRESH,
};
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;

/// Relay ports of our TURN service and of coturn (disjoint from the ones the tests use).
const OUR_PORTS: (u16, u16) = (52000, 52199);
const COTURN_PORTS: (u16, u16) = (52200, 52399);
/// The one channel number each generator client binds.
const CHANNEL: u16 = 0x4000;
/// STUN request retransmission interval and attempts (setup and release only).
const RTO: Duration = Duration::from_millis(200);
const TRIES: usize = 5;
/// A message not echoed within this time counts as lost.
const LOSS_TIMEOUT: Duration = Duration::from_millis(50);
/// Size of the RTT probe messages and of the throughput messages of the relay-only pair.

#[derive(Parser, Debug)]
#[command(about = "Loopback benchmark: our embedded TURN vs coturn")]
struct Args {
    /// Rounds, each measuring both servers (default 5; 2 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Fast smoke mode: 2 rounds, 40 000 round trips per rate measurement, 50 RTT samples,
    /// 4 MiB transfers.
    #[arg(long)]
    quick: bool,
    /// Generator clients (one allocation and one thread each).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Messages in flight per generator client.
    #[arg(long, default_value_t = 128)]
    window: usize,
    /// Round trips per rate measurement, over all clients (default 200 000; 40 000 with --quick).
    #[arg(long)]
    packets: Option<usize>,
    /// ChannelData payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [120usize, 1000])]
    sizes: Vec<usize>,
    /// Round trips per RTT measurement of the relay-only pair (default 200; 50 with --quick).
    #[arg(long)]
    rtt_samples: Option<usize>,
    /// MiB per throughput transfer of the relay-only pair (default 16; 4 with --quick).
    #[arg(long)]
    mib: Option<usize>,
    /// Skip the relay-only pair through coturn (the pair through ours is always measured).
    #[arg(long)]
    no_coturn_pair: bool,
    /// Time limit of each step, in seconds (a transfer gets one extra second per MiB).
    #[arg(long, default_value_t = 20)]
    step_timeout: u64,
    /// Time limit of the whole run, in seconds.
    #[arg(long, default_value_t = 900)]
    max_seconds: u64,
}

struct Params {
    rounds: usize,
    clients: usize,
    window: usize,
    packets: usize,
    sizes: Vec<usize>,
    rtt_samples: usize,
    warmup: usize,
    bytes: usize,
    coturn_pair: bool,
    step: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Which {
    Ours,
    Coturn,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Ours => "ours",
            Which::Coturn => "coturn",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CPU accounting (Linux /proc)

/// CPU time of the calling thread in ns (`/proc/thread-self/schedstat`), 0 if unavailable.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of process `pid` in seconds (`/proc/<pid>/stat`, 100 Hz ticks), also
/// counting threads that have exited.
fn process_cpu_s(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start with field 3, "state".
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Busy CPU time of the whole machine in seconds (`/proc/stat`: everything but idle and
/// iowait), to see how much other processes took during a measurement.
fn machine_busy_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal
    let busy = f.iter().sum::<u64>() - f.get(3)? - f.get(4)?;
    Some(busy as f64 / 100.0)
}

// ---------------------------------------------------------------------------------------------
// coturn (the command line of interop-tests/src/lib.rs)

use peermesh_interop_tests::Coturn;

// ---------------------------------------------------------------------------------------------
// load generator: a minimal blocking TURN client (UDP, ChannelData)

/// SO_RCVBUF / SO_SNDBUF asked for on the generator's and the echo peer's sockets (the same as
/// our TURN's default): with the kernel default (~208 KiB) a full window of 1000-byte messages
/// overflows the echo peer's receive queue, and the generator would measure its own drops.
const GEN_SOCKET_BUFFER: usize = 4 << 20;

/// A blocking UDP socket on 127.0.0.1 (free port) with [`GEN_SOCKET_BUFFER`] buffers (as far as
/// net.core.rmem_max / wmem_max allow).
fn bind_loopback_udp() -> Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(GEN_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(GEN_SOCKET_BUFFER);
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
    Ok(socket.into())
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

type AddAttrs<'a> = &'a dyn Fn(&mut Message) -> std::result::Result<(), stun::Error>;

struct TurnClient {
    sock: UdpSocket,
    server: SocketAddr,
    username: String,
    password: String,
    realm: String,
    nonce: String,
    /// Set while the allocation lives (released on drop).
    relayed: Option<SocketAddr>,
}

/// What one generator client measured.
struct Flow {
    received: u64,
    lost: u64,
    late: u64,
    started: Instant,
    last: Instant,
    cpu_ns: u64,
    timed_out: bool,
}

impl TurnClient {
    fn new(server: SocketAddr, username: String, password: String) -> Result<TurnClient> {
        let sock = bind_loopback_udp()?;
        sock.set_read_timeout(Some(RTO))?;
        Ok(TurnClient {
            sock,
            server,
            username,
            password,
            realm: String::new(),
            nonce: String::new(),
            relayed: None,
        })
    }

    /// One transaction: send `msg` (retransmitted up to `tries` times) and return the answer
    /// with its transaction id.
    fn transact(&self, msg: &Message, tries: usize) -> Result<Message> {
        let mut buf = [0u8; 2048];
        for _ in 0..tries {
            self.sock.send_to(&msg.raw, self.server)?;
            let until = Instant::now() + RTO;
            while Instant::now() < until {
                let n = match self.sock.recv_from(&mut buf) {
                    Ok((n, from)) if from == self.server => n,
                    Ok(_) => continue,
                    Err(e) if is_timeout(&e) => break,
                    Err(e) => return Err(e.into()),
                };
                if !is_message(&buf[..n]) {
                    continue; // a late ChannelData message
                }
                let mut m = Message::new();
                m.raw = buf[..n].to_vec();
                if m.decode().is_ok() && m.transaction_id == msg.transaction_id {
                    return Ok(m);
                }
            }
        }
        bail!(
            "no answer to {} from {} after {tries} tries",
            msg.typ,
            self.server
        )
    }

    /// An authenticated request (the first attempt without credentials fetches realm and
    /// nonce; 401/438 with a fresh nonce are retried, at most 3 attempts in all).
    fn request(&mut self, method: Method, add: AddAttrs<'_>, tries: usize) -> Result<Message> {
        for _ in 0..3 {
            let mut m = Message::new();
            m.build(&[
                Box::new(stun::agent::TransactionId::new()),
                Box::new(MessageType::new(method, CLASS_REQUEST)),
            ])?;
            add(&mut m)?;
            if !self.nonce.is_empty() {
                TextAttribute::new(ATTR_USERNAME, self.username.clone()).add_to(&mut m)?;
                TextAttribute::new(ATTR_REALM, self.realm.clone()).add_to(&mut m)?;
                TextAttribute::new(ATTR_NONCE, self.nonce.clone()).add_to(&mut m)?;
                MessageIntegrity::new_long_term_integrity(
                    self.username.clone(),
                    self.realm.clone(),
                    self.password.clone(),
                )
                .add_to(&mut m)?;
            }
            FINGERPRINT.add_to(&mut m)?;
            let r = self.transact(&m, tries)?;
            if r.typ.class == CLASS_SUCCESS_RESPONSE {
                return Ok(r);
            }
            let mut ec = ErrorCodeAttribute::default();
            ec.get_from(&r)
                .with_context(|| format!("{method} error response without ERROR-CODE"))?;
            let code = ec.code.0;
            let nonce = TextAttribute::get_from_as(&r, ATTR_NONCE).map(|a| a.text);
            match (code, nonce) {
                (401, Ok(nonce)) if self.nonce.is_empty() => {
                    self.nonce = nonce;
                    self.realm = TextAttribute::get_from_as(&r, ATTR_REALM)
                        .map(|a| a.text)
                        .context("401 without REALM")?;
                }
                (438, Ok(nonce)) => self.nonce = nonce,
                _ => bail!("{method} refused by {}: {ec}", self.server),
            }
        }
        bail!("{method}: no success after 3 attempts")
    }

    fn allocate(&mut self) -> Result<SocketAddr> {
        let r = self.request(
            METHOD_ALLOCATE,
            &|m| {
                // REQUESTED-TRANSPORT: UDP.
                m.add(ATTR_REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
                Ok(())
            },
            TRIES,
        )?;
        let mut relayed = XorMappedAddress::default();
        relayed
            .get_from_as(&r, ATTR_XOR_RELAYED_ADDRESS)
            .context("Allocate success without XOR-RELAYED-ADDRESS")?;
        let relayed = SocketAddr::new(relayed.ip, relayed.port);
        self.relayed = Some(relayed);
        Ok(relayed)
    }

    /// CreatePermission and ChannelBind (channel [`CHANNEL`]) for `peer`.
    fn bind_channel(&mut self, peer: SocketAddr) -> Result<()> {
        let xor_peer = move |m: &mut Message| {
            XorMappedAddress {
                ip: peer.ip(),
                port: peer.port(),
            }
            .add_to_as(m, ATTR_XOR_PEER_ADDRESS)
        };
        self.request(METHOD_CREATE_PERMISSION, &xor_peer, TRIES)?;
        self.request(
            METHOD_CHANNEL_BIND,
            &|m| {
                let [hi, lo] = CHANNEL.to_be_bytes();
                m.add(ATTR_CHANNEL_NUMBER, &[hi, lo, 0, 0]);
                xor_peer(m)
            },
            TRIES,
        )?;
        Ok(())
    }

    /// Refresh with LIFETIME 0 (best effort, one try).
    fn release(&mut self) {
        if self.relayed.take().is_some() {
            let _ = self.sock.set_read_timeout(Some(RTO));
            let _ = self.request(
                METHOD_REFRESH,
                &|m| {
                    m.add(ATTR_LIFETIME, &[0, 0, 0, 0]);
                    Ok(())
                },
                1,
            );
        }
    }

    /// Sends `count` ChannelData messages of `size` bytes, at most `window` unanswered at a
    /// time, and counts the echoes. Starts when `start` opens; ends at `deadline` at the latest.
    /// The socket's read timeout must already be [`LOSS_TIMEOUT`].
    fn flood(
        &self,
        size: usize,
        count: u64,
        window: u64,
        deadline: Instant,
        start: &Barrier,
    ) -> Result<Flow> {
        let mut out = vec![0x5a_u8; 4 + size];
        out[..2].copy_from_slice(&CHANNEL.to_be_bytes());
        out[2..4].copy_from_slice(&(size as u16).to_be_bytes());
        let mut buf = vec![0u8; 4 + size + 64];
        start.wait();
        let cpu0 = thread_cpu_ns();
        let started = Instant::now();
        let mut last = started;
        let (mut sent, mut inflight, mut epoch) = (0u64, 0u64, 0u32);
        let (mut received, mut lost, mut late) = (0u64, 0u64, 0u64);
        let mut timed_out = false;
        let mut result = Ok(());
        while sent < count || inflight > 0 {
            if Instant::now() >= deadline {
                timed_out = true;
                lost += inflight;
                break;
            }
            while inflight < window && sent < count {
                // Payload: epoch (u32) and sequence number (u64), then filler.
                out[4..8].copy_from_slice(&epoch.to_be_bytes());
                out[8..16].copy_from_slice(&sent.to_be_bytes());
                if let Err(e) = self.sock.send_to(&out, self.server) {
                    result = Err(e);
                    break;
                }
                sent += 1;
                inflight += 1;
            }
            if result.is_err() {
                break;
            }
            match self.sock.recv_from(&mut buf) {
                Ok((n, _)) => {
                    let d = &buf[..n];
                    if n < 16
                        || u16::from_be_bytes([d[0], d[1]]) != CHANNEL
                        || usize::from(u16::from_be_bytes([d[2], d[3]])) != size
                        || n < 4 + size
                    {
                        continue; // not one of our echoes (a late STUN answer, say)
                    }
                    if d[4..8] != epoch.to_be_bytes() {
                        late += 1; // already counted as lost
                        continue;
                    }
                    received += 1;
                    inflight -= 1;
                    last = Instant::now();
                }
                Err(e) if is_timeout(&e) => {
                    // Nothing for LOSS_TIMEOUT: whatever is in flight is lost.
                    lost += inflight;
                    inflight = 0;
                    epoch += 1;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let cpu_ns = thread_cpu_ns().saturating_sub(cpu0);
        result.context("generator socket")?;
        Ok(Flow {
            received,
            lost,
            late,
            started,
            last,
            cpu_ns,
            timed_out,
        })
    }
}

impl Drop for TurnClient {
    fn drop(&mut self) {
        self.release();
    }
}

/// UDP echo peer: sends every datagram back to where it came from until `stop` is set or
/// `limit` has passed. Returns (datagrams echoed, CPU ns).
fn echo_peer(sock: UdpSocket, stop: Arc<AtomicBool>, limit: Duration) -> (u64, u64) {
    let cpu0 = thread_cpu_ns();
    let deadline = Instant::now() + limit;
    let _ = sock.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = [0u8; 2048];
    let mut echoed = 0u64;
    let mut n_loops = 0u32;
    loop {
        n_loops = n_loops.wrapping_add(1);
        if n_loops.is_multiple_of(1024)
            && (stop.load(Ordering::Relaxed) || Instant::now() >= deadline)
        {
            break;
        }
        match sock.recv_from(&mut buf) {
            Ok((n, src)) => {
                if sock.send_to(&buf[..n], src).is_ok() {
                    echoed += 1;
                }
            }
            Err(_) => {
                if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                    break;
                }
            }
        }
    }
    (echoed, thread_cpu_ns().saturating_sub(cpu0))
}

/// Sets the flag when dropped (stops the echo peer on every exit path).
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

struct GenSpec {
    server: SocketAddr,
    /// The server's process (coturn), or `None` for this process.
    server_pid: Option<u32>,
    credentials: Vec<(String, String)>,
    size: usize,
    per_client: u64,
    window: u64,
    limit: Duration,
}

/// What one rate measurement gave.
#[derive(Clone, Default)]
struct GenRun {
    round_trips: u64,
    lost: u64,
    late: u64,
    secs: f64,
    size: usize,
    /// CPU seconds of the TURN server during the measurement.
    server_cpu: f64,
    /// CPU seconds of the generator clients and the echo peer.
    gen_cpu: f64,
    /// CPU seconds of everything else on the machine (other processes).
    other_cpu: f64,
    timed_out: bool,
    /// Ours only: the share of the datagrams our TURN relayed (both directions) that took its
    /// ChannelData fast path.
    fast_share: Option<f64>,
}

impl GenRun {
    fn rate(&self) -> f64 {
        self.round_trips as f64 / self.secs
    }
    fn mbit(&self) -> f64 {
        (self.round_trips * self.size as u64 * 2 * 8) as f64 / self.secs / 1e6
    }
    fn cpu_us_per_rt(&self) -> f64 {
        self.server_cpu * 1e6 / self.round_trips.max(1) as f64
    }
}

/// One rate measurement (blocking; run it on a blocking thread).
fn generate(spec: GenSpec) -> Result<GenRun> {
    let deadline = Instant::now() + spec.limit;
    let echo_sock = bind_loopback_udp()?;
    let echo_addr = echo_sock.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_guard = SetOnDrop(stop.clone());
    let echo = std::thread::spawn({
        let stop = stop.clone();
        let limit = spec.limit + Duration::from_secs(2);
        move || echo_peer(echo_sock, stop, limit)
    });

    let mut clients = Vec::with_capacity(spec.credentials.len());
    for (i, (user, pass)) in spec.credentials.into_iter().enumerate() {
        let mut c = TurnClient::new(spec.server, user, pass)?;
        c.allocate()
            .with_context(|| format!("client {i}: Allocate"))?;
        c.bind_channel(echo_addr)
            .with_context(|| format!("client {i}: CreatePermission/ChannelBind"))?;
        c.sock.set_read_timeout(Some(LOSS_TIMEOUT))?;
        clients.push(c);
    }

    let pid = spec.server_pid.unwrap_or_else(std::process::id);
    let start = Barrier::new(clients.len() + 1);
    let (flows, cpu0, cpu1) = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter()
            .map(|c| {
                let start = &start;
                s.spawn(move || c.flood(spec.size, spec.per_client, spec.window, deadline, start))
            })
            .collect();
        let cpu0 = (process_cpu_s(pid), machine_busy_s());
        start.wait();
        let flows: Vec<Result<Flow>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("generator thread panicked")))
            })
            .collect();
        (flows, cpu0, (process_cpu_s(pid), machine_busy_s()))
    });
    drop(stop_guard);
    let (echoed, echo_cpu_ns) = echo.join().map_err(|_| anyhow!("echo thread panicked"))?;
    drop(clients); // releases the allocations
    let flows = flows.into_iter().collect::<Result<Vec<_>>>()?;

    let received: u64 = flows.iter().map(|f| f.received).sum();
    ensure!(
        received > 0,
        "no echo came back through {} (echo peer saw {echoed})",
        spec.server
    );
    let first = flows
        .iter()
        .map(|f| f.started)
        .min()
        .unwrap_or_else(Instant::now);
    let last = flows
        .iter()
        .map(|f| f.last)
        .max()
        .unwrap_or_else(Instant::now);
    let gen_cpu = (flows.iter().map(|f| f.cpu_ns).sum::<u64>() + echo_cpu_ns) as f64 / 1e9;
    let delta = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => b - a,
        _ => f64::NAN,
    };
    let proc_cpu = delta(cpu0.0, cpu1.0);
    let machine_cpu = delta(cpu0.1, cpu1.1);
    let server_cpu = if spec.server_pid.is_some() {
        proc_cpu
    } else {
        // Our TURN runs in this process, next to the generator.
        (proc_cpu - gen_cpu).max(0.0)
    };
    Ok(GenRun {
        other_cpu: (machine_cpu - server_cpu - gen_cpu).max(0.0),
        round_trips: received,
        lost: flows.iter().map(|f| f.lost).sum(),
        late: flows.iter().map(|f| f.late).sum(),
        secs: last.duration_since(first).as_secs_f64().max(1e-6),
        size: spec.size,
        server_cpu,
        gen_cpu,
        timed_out: flows.iter().any(|f| f.timed_out),
        fast_share: None,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The TURN server a measurement runs against.
struct Target<'a> {
    which: Which,
    addr: SocketAddr,
    pid: Option<u32>,
    ours: Option<&'a TurnHandle>,
    coturn_secret: &'a str,
}

impl Target<'_> {
    fn credentials(&self, user: &str) -> (String, String) {
        match self.ours {
            Some(t) => t.credentials(user, Duration::from_secs(3600)),
            None => rest_credentials(self.coturn_secret, user, unix_now() + 3600),
        }
    }
}

async fn rate_run(
    t: &Target<'_>,
    tag: &str,
    size: usize,
    packets: usize,
    p: &Params,
) -> Result<GenRun> {
    let credentials = (0..p.clients)
        .map(|c| t.credentials(&format!("bench-{tag}-{size}-c{c}")))
        .collect();
    let spec = GenSpec {
        server: t.addr,
        server_pid: t.pid,
        credentials,
        size,
        per_client: (packets / p.clients).max(1) as u64,
        window: p.window as u64,
        limit: p.step,
    };
    let before = t.ours.map(|h| h.stats());
    let limit = p.step + Duration::from_secs(5);
    let mut run = step(
        &format!("{} relay rate, {size} B", t.which.name()),
        limit,
        async {
            tokio::task::spawn_blocking(move || generate(spec))
                .await
                .context("generator task")?
        },
    )
    .await?;
    if let (Some(h), Some(before)) = (t.ours, before) {
        let after = h.stats();
        let to_peer = after.relayed_to_peer_packets - before.relayed_to_peer_packets;
        let to_client = after.relayed_to_client_packets - before.relayed_to_client_packets;
        run.fast_share = Some(fast_share(&before, &after));
        if to_client < run.round_trips {
            eprintln!(
                "  note: our TURN counted {to_client} datagrams to clients but the generator \
                 got {} echoes ({to_peer} to peers)",
                run.round_trips
            );
        }
    }
    Ok(run)
}

/// The share of the datagrams relayed between two stats snapshots that took the fast path.
fn fast_share(before: &TurnStats, after: &TurnStats) -> f64 {
    let all = (after.relayed_to_peer_packets + after.relayed_to_client_packets)
        - (before.relayed_to_peer_packets + before.relayed_to_client_packets);
    let fast = (after.fast_path_to_peer_packets + after.fast_path_to_client_packets)
        - (before.fast_path_to_peer_packets + before.fast_path_to_client_packets);
    fast as f64 / all.max(1) as f64
}

// ---------------------------------------------------------------------------------------------
// relay-only peermesh pair

/// What one relay-only pair run measured.
struct PairRun {
    direct_b: f64,
    direct_both: f64,
    rtt: Vec<f64>,
    mbps: f64,
}

const RELAY: Path = Path::Direct {
    local: CandidateType::Relay,
    remote: CandidateType::Relay,
};

async fn pair_run(url: &str, label: &str, p: &Params) -> Result<PairRun> {
    let cfg = |name: &str| {
        ClientConfig::new(name)
            .with_loopback_only(true)
            .with_relay_only(true)
    };
    let (a, mut ea) = connect(url, cfg("turn-a"), "A", p.step).await?;
    let (b, mut eb) = connect(url, cfg("turn-b"), "B", p.step).await?;
    let (a_id, b_id) = (a.peer_id(), b.peer_id());
    let group = format!("bench-turn-{label}");
    step("A joins", p.step, async { Ok(a.join(&group).await?) }).await?;

    // ---- join → relay/relay direct path on both sides ----
    let t0 = Instant::now();
    step("B joins", p.step, async { Ok(b.join(&group).await?) }).await?;
    let (mut a_direct, mut b_direct) = (None, None);
    let deadline = tokio::time::Instant::now() + p.step;
    while a_direct.is_none() || b_direct.is_none() {
        let (on_a, ev) = tokio::select! {
            ev = ea.recv() => (true, ev),
            ev = eb.recv() => (false, ev),
            _ = tokio::time::sleep_until(deadline) => {
                let mut missing = Vec::new();
                if b_direct.is_none() { missing.push("B sees the relay path"); }
                if a_direct.is_none() { missing.push("A sees the relay path"); }
                bail!("step `{}` timed out after {:?}", missing.join(", "), p.step);
            }
        };
        let now = t0.elapsed();
        match ev.ok_or_else(|| anyhow!("event stream of {} ended", if on_a { "A" } else { "B" }))? {
            Event::PathChanged {
                peer,
                path: path @ Path::Direct { .. },
            } => {
                let (mine, other) = if on_a {
                    (&mut a_direct, b_id)
                } else {
                    (&mut b_direct, a_id)
                };
                if peer == other {
                    ensure!(path == RELAY, "the direct path is {path}, not relay/relay");
                    mine.get_or_insert(now);
                }
            }
            Event::Disconnected { reason } => bail!("disconnected: {reason}"),
            _ => {}
        }
    }
    let (a_direct, b_direct) = (a_direct.unwrap_or_default(), b_direct.unwrap_or_default());

    // ---- RTT (B pings, A echoes), then throughput A → B ----
    ensure!(b.path(a_id)? == RELAY, "B is not on the relay path");
    let (rtt, mbps) = rtt_and_throughput(
        &a,
        a_id,
        ea,
        &b,
        b_id,
        &mut eb,
        "relay-path",
        p.warmup,
        p.rtt_samples,
        p.bytes,
        p.step,
    )
    .await?;

    a.close().await;
    b.close().await;
    Ok(PairRun {
        direct_b: ms(b_direct),
        direct_both: ms(a_direct.max(b_direct)),
        rtt,
        mbps,
    })
}

// ---------------------------------------------------------------------------------------------
// statistics and output

/// All measurements of one TURN server.
#[derive(Default)]
struct Results {
    /// Per payload size (index into `Params::sizes`).
    rates: Vec<Vec<GenRun>>,
    pairs: Vec<PairRun>,
}

async fn start_server(turn: TurnMode) -> Result<ServerHandle> {
    Ok(Server::bind(ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        turn,
        ..Default::default()
    })
    .await?
    .spawn())
}

async fn run(args: Args) -> Result<()> {
    let p = Params {
        rounds: args.rounds.unwrap_or(if args.quick { 2 } else { 5 }).max(1),
        clients: args.clients.clamp(1, 64),
        window: args.window.clamp(1, 4096),
        packets: args
            .packets
            .unwrap_or(if args.quick { 40_000 } else { 200_000 })
            .max(1),
        sizes: args.sizes.clone(),
        rtt_samples: args
            .rtt_samples
            .unwrap_or(if args.quick { 50 } else { 200 })
            .max(1),
        warmup: if args.quick { 5 } else { 10 },
        bytes: args.mib.unwrap_or(if args.quick { 4 } else { 16 }).max(1) << 20,
        coturn_pair: !args.no_coturn_pair,
        step: Duration::from_secs(args.step_timeout.max(1)),
    };
    ensure!(
        p.sizes.iter().all(|&s| (16..=1400).contains(&s)),
        "--sizes must be between 16 and 1400 bytes"
    );
    if p.rounds < 5 && !args.quick {
        eprintln!("note: {} rounds; the brief asks for at least 5", p.rounds);
    }
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());

    // ---- servers ----
    let ours_server = step(
        "start peermesh server with embedded TURN",
        p.step,
        start_server(TurnMode::Embedded(TurnConfig {
            listen: "127.0.0.1:0".parse()?,
            relay_ports: OUR_PORTS,
            // The echo peer and the clients' relay candidates are loopback addresses.
            allow_peers: vec!["127.0.0.0/8".parse()?],
            ..Default::default()
        })),
    )
    .await?;
    let ours = ours_server
        .turn()
        .ok_or_else(|| anyhow!("the server has no embedded TURN"))?
        .clone();
    let coturn =
        tokio::task::spawn_blocking(|| Coturn::try_start(COTURN_PORTS).map_err(anyhow::Error::msg))
            .await
            .context("coturn start task")??;
    let coturn_server = if p.coturn_pair {
        Some(
            step(
                "start peermesh server with coturn",
                p.step,
                start_server(TurnMode::External {
                    urls: vec![format!("turn:{}?transport=udp", coturn.addr)],
                    secret: coturn.secret.clone(),
                }),
            )
            .await?,
        )
    } else {
        None
    };
    eprintln!(
        "our TURN on {} (relay ports {}-{}), coturn on {} pid {} (relay ports {}-{}); {} rounds",
        ours.local_addr(),
        OUR_PORTS.0,
        OUR_PORTS.1,
        coturn.addr,
        coturn.pid(),
        COTURN_PORTS.0,
        COTURN_PORTS.1,
        p.rounds
    );

    let target = |which: Which| match which {
        Which::Ours => Target {
            which,
            addr: ours.local_addr(),
            pid: None,
            ours: Some(&ours),
            coturn_secret: "",
        },
        Which::Coturn => Target {
            which,
            addr: coturn.addr,
            pid: Some(coturn.pid()),
            ours: None,
            coturn_secret: &coturn.secret,
        },
    };

    // ---- warm-up (not recorded): one short rate run per server and size ----
    for which in [Which::Ours, Which::Coturn] {
        for &size in &p.sizes {
            let r = rate_run(&target(which), "warmup", size, p.packets / 5, &p)
                .await
                .with_context(|| format!("warm-up, {}", which.name()))?;
            eprintln!(
                "warm-up {:>6} {size:>4} B: {:.1}k round trips/s",
                which.name(),
                r.rate() / 1e3
            );
        }
    }

    let started = Instant::now();
    let mut res = [Results::default(), Results::default()];
    for r in &mut res {
        r.rates = vec![Vec::new(); p.sizes.len()];
    }
    for round in 0..p.rounds {
        let order = if round % 2 == 0 {
            [Which::Ours, Which::Coturn]
        } else {
            [Which::Coturn, Which::Ours]
        };
        for which in order {
            let t = target(which);
            let mut line = format!("round {:>2}/{} {:>6}:", round + 1, p.rounds, which.name());
            for (si, &size) in p.sizes.iter().enumerate() {
                let r = rate_run(&t, &format!("r{round}"), size, p.packets, &p)
                    .await
                    .with_context(|| format!("round {}: {} relay rate", round + 1, which.name()))?;
                line.push_str(&format!(
                    " {size} B {:.1}k rt/s {:.0} Mbit/s (lost {}, late {}, server {:.2} cores, \
                     gen {:.2} cores, others {:.2} cores{}{}) |",
                    r.rate() / 1e3,
                    r.mbit(),
                    r.lost,
                    r.late,
                    r.server_cpu / r.secs,
                    r.gen_cpu / r.secs,
                    r.other_cpu / r.secs,
                    r.fast_share
                        .map(|f| format!(", fast path {:.1} %", 100.0 * f))
                        .unwrap_or_default(),
                    if r.timed_out { ", TIMED OUT" } else { "" }
                ));
                res[which as usize].rates[si].push(r);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let url = match which {
                Which::Ours => Some(ours_server.ws_url()),
                Which::Coturn => coturn_server.as_ref().map(|s| s.ws_url()),
            };
            if let Some(url) = url {
                let label = format!("{}-{round}", which.name());
                let before = (which == Which::Ours).then(|| ours.stats());
                let pr = pair_run(&url, &label, &p).await.with_context(|| {
                    format!("round {}: {} relay-only pair", round + 1, which.name())
                })?;
                line.push_str(&format!(
                    " pair join→relay {:.1} ms (both {:.1}), RTT {:.3} ms, {:.1} MB/s{}",
                    pr.direct_b,
                    pr.direct_both,
                    stat(&pr.rtt).map_or(f64::NAN, |s| s.median),
                    pr.mbps,
                    before
                        .map(|b| format!(
                            " (fast path {:.1} %)",
                            100.0 * fast_share(&b, &ours.stats())
                        ))
                        .unwrap_or_default()
                ));
                res[which as usize].pairs.push(pr);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            eprintln!("{line}");
        }
    }
    let elapsed = started.elapsed();

    // ---- table ----
    let [ro, rc] = &res;
    let rates = |r: &Results, si: usize, f: fn(&GenRun) -> f64| {
        stat(&r.rates[si].iter().map(f).collect::<Vec<_>>())
    };
    let pairs =
        |r: &Results, f: fn(&PairRun) -> f64| stat(&r.pairs.iter().map(f).collect::<Vec<_>>());
    let pooled_rtt = |r: &Results| {
        stat(
            &r.pairs
                .iter()
                .flat_map(|x| &x.rtt)
                .copied()
                .collect::<Vec<_>>(),
        )
    };
    let cores = |runs: &[GenRun], f: fn(&GenRun) -> f64| {
        let secs: f64 = runs.iter().map(|r| r.secs).sum();
        runs.iter().map(f).sum::<f64>() / secs
    };

    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "our embedded TURN (turn 0.17) vs coturn on loopback: {} rounds (alternating which server \
         goes first), nproc {nproc}, {:.1} s total",
        p.rounds,
        elapsed.as_secs_f64()
    ));
    line(format!(
        "relay rate: Rust generator in this process, {} clients (one UDP socket, allocation and \
         thread each), ChannelData, ≤ {} messages in flight per client, {} round trips per \
         measurement, one in-process UDP echo peer; a round trip = 2 relayed datagrams; Mbit/s = \
         payload bytes × 2 directions × 8 / s; 'server CPU' = coturn's process, or this process \
         minus the generator and echo threads for ours. Pair: relay-only peermesh clients, {} × \
         {PING_SIZE} B reliable round trips per round (after {} warm-up; pooled), {} MiB of {} KiB \
         reliable messages per round. Median/p95 over the {} rounds unless pooled.",
        p.clients,
        p.window,
        p.packets,
        p.rtt_samples,
        p.warmup,
        p.bytes >> 20,
        CHUNK >> 10,
        p.rounds
    ));
    line(String::new());
    line("| figure | ours median | p95 | coturn median | p95 | ratio ours/coturn |".into());
    line("|---|---:|---:|---:|---:|---:|".into());
    for (si, &size) in p.sizes.iter().enumerate() {
        line(row(
            &format!("relay {size} B: k round trips/s (higher is better)"),
            rates(ro, si, |r| r.rate() / 1e3),
            rates(rc, si, |r| r.rate() / 1e3),
            1,
        ));
        line(row(
            &format!("relay {size} B: k relayed datagrams/s"),
            rates(ro, si, |r| 2.0 * r.rate() / 1e3),
            rates(rc, si, |r| 2.0 * r.rate() / 1e3),
            1,
        ));
        line(row(
            &format!("relay {size} B: Mbit/s (payload, both directions)"),
            rates(ro, si, GenRun::mbit),
            rates(rc, si, GenRun::mbit),
            1,
        ));
        line(row(
            &format!("relay {size} B: server CPU µs per round trip (lower is better)"),
            rates(ro, si, GenRun::cpu_us_per_rt),
            rates(rc, si, GenRun::cpu_us_per_rt),
            2,
        ));
    }
    line(row(
        "relay-only pair: join → relay/relay, B's view (ms)",
        pairs(ro, |r| r.direct_b),
        pairs(rc, |r| r.direct_b),
        1,
    ));
    line(row(
        "relay-only pair: join → relay/relay, both sides (ms)",
        pairs(ro, |r| r.direct_both),
        pairs(rc, |r| r.direct_both),
        1,
    ));
    line(row(
        &format!("relay-only pair: RTT {PING_SIZE} B reliable (ms, pooled)"),
        pooled_rtt(ro),
        pooled_rtt(rc),
        3,
    ));
    line(row(
        "relay-only pair: throughput, 16 KiB msgs (MB/s)",
        pairs(ro, |r| r.mbps),
        pairs(rc, |r| r.mbps),
        1,
    ));
    line(String::new());

    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    for (si, &size) in p.sizes.iter().enumerate() {
        if let (Some(o), Some(c)) = (rates(ro, si, GenRun::rate), rates(rc, si, GenRun::rate)) {
            let r = o.median / c.median;
            line(format!(
                "goal relay rate ours/coturn ≥ 1.0 at {size} B: {r:.2} ({:.1}k vs {:.1}k round \
                 trips/s) — {}",
                o.median / 1e3,
                c.median / 1e3,
                verdict(r >= 1.0)
            ));
        }
        // Each round measures both servers back to back, so a round's ratio compares them under
        // nearly the same background load.
        let paired: Vec<f64> = ro.rates[si]
            .iter()
            .zip(&rc.rates[si])
            .map(|(o, c)| o.rate() / c.rate())
            .collect();
        let cpu: Vec<f64> = ro.rates[si]
            .iter()
            .zip(&rc.rates[si])
            .map(|(o, c)| o.cpu_us_per_rt() / c.cpu_us_per_rt())
            .collect();
        if let (Some(r), Some(c)) = (range(&paired), range(&cpu)) {
            line(format!(
                "  per-round ratios at {size} B: rate ours/coturn median {:.2} (min {:.2}, max \
                 {:.2}); server CPU per round trip ours/coturn median {:.2} (min {:.2}, max {:.2})",
                r.0, r.1, r.2, c.0, c.1, c.2
            ));
        }
    }
    if let Some(d) = pairs(ro, |r| r.direct_both) {
        line(format!(
            "goal join → relay/relay < 100 ms (ours, both sides): median {:.1} ms, p95 {:.1} ms — {}",
            d.median,
            d.p95,
            verdict(d.median < 100.0)
        ));
    }
    if let Some(r) = pooled_rtt(ro) {
        line(format!(
            "goal relay-path RTT < 1 ms (ours): median {:.3} ms, p95 {:.3} ms — {}",
            r.median,
            r.p95,
            verdict(r.median < 1.0)
        ));
    }
    // Is the generator the bottleneck?
    for (which, r) in [(Which::Ours, ro), (Which::Coturn, rc)] {
        let all: Vec<GenRun> = r.rates.iter().flatten().cloned().collect();
        let (server, gen, other) = (
            cores(&all, |g| g.server_cpu),
            cores(&all, |g| g.gen_cpu),
            cores(&all, |g| g.other_cpu),
        );
        let lost: u64 = all.iter().map(|g| g.lost).sum();
        let sent: u64 = all.iter().map(|g| g.round_trips + g.lost).sum();
        let timeouts = all.iter().filter(|g| g.timed_out).count();
        line(format!(
            "load with {}: server {server:.2} cores, generator + echo peer {gen:.2} cores, \
             together {:.2} of {nproc}; other processes {other:.2} cores; lost {lost} of {sent} \
             ({:.3} %){}",
            which.name(),
            server + gen,
            100.0 * lost as f64 / sent.max(1) as f64,
            if timeouts > 0 {
                format!("; {timeouts} measurement(s) hit the step time limit")
            } else {
                String::new()
            }
        ));
    }
    line(
        "(when server + generator + other processes ≈ nproc the machine is CPU-bound: the \
         generator takes CPU from the server and the round-trip rates measure both; compare \
         'server CPU µs per round trip' for the servers' efficiency. 'late' = echoes that came \
         after the generator had waited 50 ms and written them off as lost: a stall, not a drop)"
            .into(),
    );
    print!("{out}");

    // ---- teardown: clients first, then servers, coturn last (its guard) ----
    for (name, s) in [("ours", Some(ours_server)), ("coturn", coturn_server)] {
        if let Some(s) = s {
            if tokio::time::timeout(Duration::from_secs(5), s.shutdown())
                .await
                .is_err()
            {
                eprintln!("peermesh server ({name}) did not shut down within 5 s");
            }
        }
    }
    if tokio::time::timeout(Duration::from_secs(5), ours.shutdown())
        .await
        .is_err()
    {
        eprintln!("our TURN did not shut down within 5 s");
    }
    drop(coturn);
    Ok(())
}

/// (median, min, max) of the finite values.
fn range(values: &[f64]) -> Option<(f64, f64, f64)> {
    let median = stat(values)?.median;
    let finite = values.iter().copied().filter(|x| x.is_finite());
    let min = finite.clone().fold(f64::INFINITY, f64::min);
    let max = finite.fold(f64::NEG_INFINITY, f64::max);
    Some((median, min, max))
}

async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // webrtc-rs warns about every normal teardown; keep its errors only.
                "warn,webrtc=error,webrtc_ice=error,webrtc_sctp=error,webrtc_dtls=error,\
                     webrtc_data=error,webrtc_srtp=error,webrtc_util=error,webrtc_mdns=error,\
                     turn=error"
                    .into()
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let limit = Duration::from_secs(args.max_seconds.max(10));
    // Dropping `run` (time limit, signal) drops the coturn guard, which kills coturn.
    let code = tokio::select! {
        r = tokio::time::timeout(limit, run(args)) => match r {
            Ok(Ok(())) => 0,
            Ok(Err(e)) => {
                eprintln!("bench_turn: {e:#}");
                1
            }
            Err(_) => {
                eprintln!("bench_turn: the whole run took longer than {limit:?}");
                1
            }
        },
        _ = terminated() => {
            eprintln!("bench_turn: interrupted");
            130
        }
    };
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // Background teardown (PeerConnections closing) must not keep the process alive.
    std::process::exit(code);
}
