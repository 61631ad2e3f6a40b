//! NAT behaviour probe for the NAT lab (`src/nat.rs`): a tiny UDP responder that runs in the
//! server's namespace on two public addresses, and a prober that runs in a peer's namespace and
//! reports how the routers between them map and filter.
//!
//! `nat_probe respond A B PORT ALT_PORT` — answers `map` on A:PORT and B:PORT with the sender's
//! address as seen (`mapped IP:PORT`); answers `filter` on A:PORT not from there but from
//! A:ALT_PORT (`altport`) and B:ALT_PORT (`altaddr`), i.e. from a port and an address the prober
//! never sent to.
//!
//! `nat_probe probe A B PORT TCP_ADDR` — prints one line:
//! `local=IP mapped_a=IP:PORT|none mapped_b=IP:PORT|none mapping=none|eim|edm|blocked
//!  filter=eif|adf|apdf|blocked hairpin=on|off tcp=ok|fail`.
//!
//! For the WAN link emulator (`src/wan.rs`, `Lab::wan_pair`):
//!
//! `nat_probe echo IP PORT` — a UDP echo server: echoes ping probes, counts burst datagrams and
//! answers a burst's end request with what arrived (count, bytes, first-to-last time). Prints
//! `echoing` once bound.
//!
//! `nat_probe ping IP PORT COUNT INTERVAL_MS SIZE` — sends COUNT probes `{seq, t_send}` of SIZE
//! bytes every INTERVAL_MS, waits for the stragglers, and prints one line: `ping sent=N
//! received=N reordered=N dup=N rtt_min_us=… rtt_p50_us=… rtt_p99_us=… rtt_max_us=…`.
//!
//! `nat_probe burst IP PORT TOTAL_BYTES SIZE` — sends TOTAL_BYTES in SIZE-byte datagrams as fast
//! as the socket takes them, then asks the echo server what arrived and prints `burst sent=N
//! send_errors=N send_us=… received=N received_bytes=N span_us=… rate_bps=…`, where rate_bps is
//! the rate at which the frames arrived at the server, counted on the wire (payload + UDP, IPv4
//! and Ethernet headers, as the emulator's rate limit counts them), from the first to the last
//! (by the kernel's receive timestamps).

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("respond") if args.len() == 5 => respond(&args[1..]),
        Some("probe") if args.len() == 5 => probe(&args[1..]),
        Some("echo") if args.len() == 3 => echo(&args[1..]),
        Some("ping") if args.len() == 6 => ping(&args[1..]),
        Some("burst") if args.len() == 5 => burst(&args[1..]),
        _ => Err(
            "usage: nat_probe respond A B PORT ALT_PORT | probe A B PORT TCP_ADDR \
                  | echo IP PORT | ping IP PORT COUNT INTERVAL_MS SIZE \
                  | burst IP PORT TOTAL_BYTES SIZE"
                .into(),
        ),
    };
    if let Err(e) = result {
        eprintln!("nat_probe: {e}");
        std::process::exit(1);
    }
}

fn parse<T: std::str::FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| format!("{s:?}: {e}"))
}

fn respond(args: &[String]) -> Result<(), String> {
    let a: Ipv4Addr = parse(&args[0])?;
    let b: Ipv4Addr = parse(&args[1])?;
    let port: u16 = parse(&args[2])?;
    let alt: u16 = parse(&args[3])?;
    let bind = |ip: Ipv4Addr, port: u16| {
        UdpSocket::bind((ip, port)).map_err(|e| format!("binding {ip}:{port}: {e}"))
    };
    let alt_port = bind(a, alt)?;
    let alt_addr = bind(b, alt)?;
    let main_b = bind(b, port)?;
    let main_a = bind(a, port)?;
    let spawn = |sock: UdpSocket, filter: Option<(UdpSocket, UdpSocket)>| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                match (&buf[..n], &filter) {
                    (b"map", _) => {
                        let _ = sock.send_to(format!("mapped {from}").as_bytes(), from);
                    }
                    (b"filter", Some((alt_port, alt_addr))) => {
                        let _ = alt_port.send_to(b"altport", from);
                        let _ = alt_addr.send_to(b"altaddr", from);
                    }
                    _ => {}
                }
            }
        })
    };
    spawn(main_b, None);
    let t = spawn(main_a, Some((alt_port, alt_addr)));
    println!("responding");
    let _ = std::io::stdout().flush();
    let _ = t.join();
    Ok(())
}

fn socket(local: Ipv4Addr) -> Result<UdpSocket, String> {
    let s = UdpSocket::bind((local, 0)).map_err(|e| format!("binding {local}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    Ok(s)
}

/// Send `msg` to `to` up to `tries` times (waiting `wait` after each) until something arrives;
/// return what arrived.
fn exchange(
    s: &UdpSocket,
    to: SocketAddr,
    msg: &[u8],
    tries: u32,
    wait: Duration,
) -> Vec<(String, SocketAddr)> {
    let mut got = Vec::new();
    for _ in 0..tries {
        let _ = s.send_to(msg, to);
        let until = Instant::now() + wait;
        let mut buf = [0u8; 1500];
        while Instant::now() < until {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                got.push((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
            }
        }
        if !got.is_empty() {
            break;
        }
    }
    got
}

fn mapped(s: &UdpSocket, to: SocketAddr) -> Option<SocketAddr> {
    exchange(s, to, b"map", 5, Duration::from_millis(200))
        .iter()
        .find_map(|(m, _)| m.strip_prefix("mapped ")?.parse().ok())
}

/// The IPv4 address this namespace uses to reach `to`.
fn local_ip(to: SocketAddr) -> Result<Ipv4Addr, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.connect(to)
        .map_err(|e| format!("no route to {to}: {e}"))?;
    match s.local_addr().map_err(|e| e.to_string())?.ip() {
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(v6) => Err(format!("IPv6 local address {v6}")),
    }
}

fn probe(args: &[String]) -> Result<(), String> {
    let a: Ipv4Addr = parse(&args[0])?;
    let b: Ipv4Addr = parse(&args[1])?;
    let port: u16 = parse(&args[2])?;
    let tcp: SocketAddr = parse(&args[3])?;
    let to_a = SocketAddr::from((a, port));
    let to_b = SocketAddr::from((b, port));
    let local = local_ip(to_a)?;

    // Mapping: one socket, two server addresses; three sockets so a random port that repeats by
    // chance does not pass for endpoint-independent mapping.
    let mut first = (None, None);
    let mut mappings = Vec::new();
    for i in 0..3 {
        let s = socket(local)?;
        let ma = mapped(&s, to_a);
        if ma.is_none() {
            mappings = vec!["blocked"];
            break;
        }
        let mb = mapped(&s, to_b);
        if i == 0 {
            first = (ma, mb);
        }
        let own = s.local_addr().map_err(|e| e.to_string())?;
        mappings.push(match (ma, mb) {
            (Some(ma), Some(mb)) if ma == own && mb == own => "none",
            (Some(ma), Some(mb)) if ma == mb => "eim",
            (Some(_), Some(_)) => "edm",
            _ => "blocked",
        });
    }
    let mapping = if mappings.iter().all(|m| *m == mappings[0]) {
        mappings[0]
    } else if mappings.contains(&"edm") {
        "edm"
    } else {
        "inconsistent"
    };

    // Filtering: a fresh socket that sent only to A:PORT; what comes back from elsewhere?
    let s = socket(local)?;
    let got = exchange(&s, to_a, b"filter", 2, Duration::from_millis(250));
    let altport = got.iter().any(|(m, _)| m == "altport");
    let altaddr = got.iter().any(|(m, _)| m == "altaddr");
    let reachable = mappings[0] != "blocked" && mapped(&s, to_a).is_some();
    let filter = match (reachable, altport, altaddr) {
        (false, _, _) => "blocked",
        (true, true, true) => "eif",
        (true, true, false) => "adf",
        (true, false, false) => "apdf",
        (true, false, true) => "odd",
    };

    // Hairpin: can another socket here reach our mapped address?
    let hairpin = match first.0 {
        Some(m) if m.ip() != IpAddr::V4(local) => {
            let x = socket(local)?;
            let y = socket(local)?;
            match mapped(&x, to_a) {
                Some(mx) => {
                    exchange(&y, mx, b"hairpin", 2, Duration::from_millis(100));
                    let mut buf = [0u8; 64];
                    let mut seen = false;
                    for _ in 0..6 {
                        if let Ok((n, _)) = x.recv_from(&mut buf) {
                            seen |= &buf[..n] == b"hairpin";
                        }
                    }
                    if seen {
                        "on"
                    } else {
                        "off"
                    }
                }
                None => "unknown",
            }
        }
        _ => "none",
    };

    let tcp_ok = TcpStream::connect_timeout(&tcp, Duration::from_secs(2)).is_ok();
    let show = |m: Option<SocketAddr>| m.map_or("none".to_string(), |m| m.to_string());
    println!(
        "local={local} mapped_a={} mapped_b={} mapping={mapping} filter={filter} hairpin={hairpin} tcp={}",
        show(first.0),
        show(first.1),
        if tcp_ok { "ok" } else { "fail" }
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// WAN link probes.

/// Bytes a UDP datagram's payload carries on the wire of a TAP: Ethernet (14), IPv4 (20) and
/// UDP (8) headers.
const WIRE_OVERHEAD: u64 = 42;

/// A bigger receive buffer (as root, past `rmem_max`), so a burst is not lost in the socket.
fn big_rcvbuf(s: &UdpSocket) {
    use std::os::fd::AsRawFd as _;
    let size: libc::c_int = 8 << 20;
    // SAFETY: setsockopt on an open socket with a pointer to a c_int and its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// `SIOCGSTAMPNS` (linux/sockios.h, 64-bit time): when the last datagram read from a socket
/// arrived, as the kernel stamped it (not in the libc crate).
const SIOCGSTAMPNS: libc::Ioctl = 0x8907;

/// When the datagram just read from `s` entered this namespace's network stack, in ns of the
/// real-time clock: the kernel's stamp (taken when `wan_link` wrote the frame to the TAP, free of
/// this thread's wake-up delays), or now if there is none.
fn arrival_ns(s: &UdpSocket) -> u128 {
    use std::os::fd::AsRawFd as _;
    // SAFETY: timespec is plain data; all zeroes is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: SIOCGSTAMPNS writes one timespec, which `ts` is, for an open socket.
    let ok = unsafe { libc::ioctl(s.as_raw_fd(), SIOCGSTAMPNS, &mut ts as *mut libc::timespec) };
    if ok == 0 {
        ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    }
}

fn echo(args: &[String]) -> Result<(), String> {
    let ip: Ipv4Addr = parse(&args[0])?;
    let port: u16 = parse(&args[1])?;
    let s = UdpSocket::bind((ip, port)).map_err(|e| format!("binding {ip}:{port}: {e}"))?;
    big_rcvbuf(&s);
    // The first SIOCGSTAMPNS turns the kernel's receive timestamps on (it fails: nothing read).
    let _ = arrival_ns(&s);
    println!("echoing");
    let _ = std::io::stdout().flush();
    // The burst being counted: (id, datagrams, payload bytes, first arrival, last arrival (ns,
    // kernel stamps), wire bytes after the first).
    let mut current: Option<(u32, u64, u64, u128, u128, u64)> = None;
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, from)) = s.recv_from(&mut buf) else {
            continue;
        };
        let id = || u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes"));
        match buf[..n].first().copied() {
            Some(b'P') => {
                let _ = s.send_to(&buf[..n], from);
            }
            Some(b'B') if n >= 5 => {
                let now = arrival_ns(&s);
                match &mut current {
                    Some((cur, count, bytes, _, last, wire)) if *cur == id() => {
                        *count += 1;
                        *bytes += n as u64;
                        *last = now;
                        *wire += n as u64 + WIRE_OVERHEAD;
                    }
                    _ => current = Some((id(), 1, n as u64, now, now, 0)),
                }
            }
            Some(b'E') if n >= 5 => {
                let answer = match current {
                    Some((cur, count, bytes, first, last, wire)) if cur == id() => format!(
                        "R received={count} received_bytes={bytes} span_us={} wire_after_first={wire}",
                        (last - first) / 1000
                    ),
                    _ => "R received=0 received_bytes=0 span_us=0 wire_after_first=0".into(),
                };
                let _ = s.send_to(answer.as_bytes(), from);
            }
            _ => {}
        }
    }
}

/// A socket in this namespace connected to `to`.
fn connected(to: SocketAddr) -> Result<UdpSocket, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.connect(to).map_err(|e| format!("connect {to}: {e}"))?;
    big_rcvbuf(&s);
    Ok(s)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// What a ping run has received so far.
struct Echoes {
    start: Instant,
    rtts_us: Vec<u64>,
    seen: Vec<bool>,
    reordered: u64,
    dup: u64,
    highest: Option<u32>,
}

impl Echoes {
    /// Take in echoes until `until`, or until `want` have arrived.
    fn receive_until(&mut self, s: &UdpSocket, until: Instant, want: Option<usize>) {
        let mut buf = vec![0u8; 65536];
        while Instant::now() < until && want.is_none_or(|w| self.rtts_us.len() < w) {
            let left = until.saturating_duration_since(Instant::now());
            let _ = s.set_read_timeout(Some(left.max(Duration::from_micros(100))));
            let Ok(n) = s.recv(&mut buf) else {
                continue;
            };
            let now = self.start.elapsed().as_nanos() as u64;
            if n < 13 || buf[0] != b'P' {
                continue;
            }
            let seq = u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes"));
            let t_send = u64::from_be_bytes(buf[5..13].try_into().expect("8 bytes"));
            let Some(slot) = self.seen.get_mut(seq as usize) else {
                continue;
            };
            if *slot {
                self.dup += 1;
                continue;
            }
            *slot = true;
            self.rtts_us.push(now.saturating_sub(t_send) / 1000);
            match self.highest {
                Some(h) if seq < h => self.reordered += 1,
                _ => self.highest = Some(seq),
            }
        }
    }
}

fn ping(args: &[String]) -> Result<(), String> {
    let ip: Ipv4Addr = parse(&args[0])?;
    let port: u16 = parse(&args[1])?;
    let count: u32 = parse(&args[2])?;
    let interval = Duration::from_secs_f64(parse::<f64>(&args[3])? / 1e3);
    let size: usize = parse::<usize>(&args[4])?.max(13);
    let s = connected(SocketAddr::from((ip, port)))?;
    let start = Instant::now();
    let mut echoes = Echoes {
        start,
        rtts_us: Vec::new(),
        seen: vec![false; count as usize],
        reordered: 0,
        dup: 0,
        highest: None,
    };
    let mut sent = 0usize;
    let mut msg = vec![0u8; size];
    msg[0] = b'P';
    for seq in 0..count {
        echoes.receive_until(&s, start + interval * seq, None);
        msg[1..5].copy_from_slice(&seq.to_be_bytes());
        let t_send = start.elapsed().as_nanos() as u64;
        msg[5..13].copy_from_slice(&t_send.to_be_bytes());
        if s.send(&msg).is_ok() {
            sent += 1;
        }
    }
    // Stragglers: up to a second plus twice the slowest round trip so far.
    let slowest = Duration::from_micros(echoes.rtts_us.iter().copied().max().unwrap_or(0));
    echoes.receive_until(
        &s,
        Instant::now() + Duration::from_secs(1) + slowest * 2,
        Some(sent),
    );
    let mut rtts = echoes.rtts_us;
    rtts.sort_unstable();
    println!(
        "ping sent={sent} received={} reordered={} dup={} rtt_min_us={} rtt_p50_us={} \
         rtt_p99_us={} rtt_max_us={}",
        rtts.len(),
        echoes.reordered,
        echoes.dup,
        rtts.first().copied().unwrap_or(0),
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.99),
        rtts.last().copied().unwrap_or(0),
    );
    Ok(())
}

fn burst(args: &[String]) -> Result<(), String> {
    let ip: Ipv4Addr = parse(&args[0])?;
    let port: u16 = parse(&args[1])?;
    let total: u64 = parse(&args[2])?;
    let size: usize = parse::<usize>(&args[3])?.clamp(9, 65000);
    let s = connected(SocketAddr::from((ip, port)))?;
    let id: u32 = std::process::id();
    let mut msg = vec![0u8; size];
    msg[0] = b'B';
    msg[1..5].copy_from_slice(&id.to_be_bytes());
    let count = total.div_ceil(size as u64);
    let (mut sent, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    for seq in 0..count {
        msg[5..9].copy_from_slice(&(seq as u32).to_be_bytes());
        match s.send(&msg) {
            Ok(_) => sent += 1,
            Err(_) => errors += 1,
        }
    }
    let send_us = start.elapsed().as_micros();
    // Ask what arrived; the request queues behind the burst (the link keeps order), and is
    // repeated in case the link's queue dropped it.
    let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
    let mut end = [0u8; 5];
    end[0] = b'E';
    end[1..5].copy_from_slice(&id.to_be_bytes());
    let mut buf = [0u8; 1500];
    let mut answer = None;
    for _ in 0..40 {
        let _ = s.send(&end);
        if let Ok(n) = s.recv(&mut buf) {
            if buf[..n].starts_with(b"R ") {
                answer = Some(String::from_utf8_lossy(&buf[2..n]).into_owned());
                break;
            }
        }
    }
    let answer = answer.ok_or("no answer to the burst's end request")?;
    let field = |k: &str| -> u64 {
        answer
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
            .unwrap_or(0)
    };
    let span_us = field("span_us");
    let rate_bps = (field("wire_after_first") * 8 * 1_000_000)
        .checked_div(span_us)
        .unwrap_or(0);
    println!(
        "burst sent={sent} send_errors={errors} send_us={send_us} received={} received_bytes={} \
         span_us={span_us} rate_bps={rate_bps}",
        field("received"),
        field("received_bytes"),
    );
    Ok(())
}
