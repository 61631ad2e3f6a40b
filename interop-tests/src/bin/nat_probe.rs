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

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("respond") if args.len() == 5 => respond(&args[1..]),
        Some("probe") if args.len() == 5 => probe(&args[1..]),
        _ => Err("usage: nat_probe respond A B PORT ALT_PORT | probe A B PORT TCP_ADDR".into()),
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
