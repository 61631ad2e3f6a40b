//! Helpers for tests against real outside peers (coturn, stock STUN/TURN clients,
//! libdatachannel, ...).
//! The tests themselves are in `tests/`.

pub mod nat;
pub mod ndc;
pub mod wan;

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The direct-path backend named by `PEERMESH_DIRECT_BACKEND` (`webrtc` or `sansio`), or the
/// default when it is unset; panics on another name. `sansio` needs the `peermesh/sansio`
/// feature (`--features peermesh/sansio`), or clients refuse to connect.
pub fn direct_backend() -> peermesh::DirectBackend {
    match std::env::var("PEERMESH_DIRECT_BACKEND") {
        Ok(name) => name
            .parse()
            .unwrap_or_else(|e| panic!("PEERMESH_DIRECT_BACKEND={name}: {e}")),
        Err(_) => peermesh::DirectBackend::default(),
    }
}

/// `ClientConfig::new(name)` on the [`direct_backend`] the environment names.
pub fn client_config(name: impl Into<String>) -> peermesh::ClientConfig {
    peermesh::ClientConfig::new(name).with_direct_backend(direct_backend())
}

/// A free UDP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("bind a UDP port on loopback")
}

/// Send STUN Binding requests to `addr` until one is answered (or `timeout` passes).
pub fn wait_for_stun(addr: SocketAddr, timeout: Duration) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    sock.set_read_timeout(Some(Duration::from_millis(100))).ok();
    // Binding request: type 0x0001, length 0, magic cookie, 12-byte transaction id.
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    req.extend_from_slice(b"peermeshtest");
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let _ = sock.send_to(&req, addr);
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if n >= 20 && buf[0] == 0x01 && buf[1] == 0x01 {
                return true;
            }
        }
    }
    false
}

/// A coturn `turnserver` on 127.0.0.1 in the foreground, REST credentials (`use-auth-secret`),
/// loopback peers allowed. Killed (and its files removed) on drop.
pub struct Coturn {
    child: Child,
    dir: PathBuf,
    /// Listening address (UDP).
    pub addr: SocketAddr,
    /// The static auth secret.
    pub secret: String,
}

impl Coturn {
    /// Start coturn with relay ports `min..=max`; panics if it cannot (for tests).
    pub fn start(relay_ports: (u16, u16)) -> Coturn {
        Coturn::try_start(relay_ports).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start coturn with relay ports `min..=max`.
    pub fn try_start(relay_ports: (u16, u16)) -> Result<Coturn, String> {
        let port = free_udp_port();
        let dir =
            std::env::temp_dir().join(format!("peermesh-coturn-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let secret = format!("secret-{port}");
        let child = Command::new("turnserver")
            .args([
                "-n",
                "--listening-ip=127.0.0.1",
                "--relay-ip=127.0.0.1",
                &format!("--listening-port={port}"),
                &format!("--min-port={}", relay_ports.0),
                &format!("--max-port={}", relay_ports.1),
                "--no-tls",
                "--no-dtls",
                "--no-cli",
                "--use-auth-secret",
                &format!("--static-auth-secret={secret}"),
                "--realm=test.local",
                "--fingerprint",
                "--allow-loopback-peers",
                &format!("--db={}", dir.join("turndb.sqlite").display()),
                &format!("--pidfile={}", dir.join("turn.pid").display()),
                "--log-file=stdout",
                "--simple-log",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!("starting turnserver (Debian package coturn): {e}"));
            }
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let coturn = Coturn {
            child,
            dir,
            addr,
            secret,
        };
        // On failure `coturn` is dropped here, which kills the process.
        if !wait_for_stun(addr, Duration::from_secs(10)) {
            return Err(format!("coturn did not answer STUN on {addr} within 10 s"));
        }
        Ok(coturn)
    }

    /// Process id of the turnserver.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `turn:` URL of this server.
    pub fn turn_url(&self) -> String {
        format!("turn:{}?transport=udp", self.addr)
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An nft table of a test's own with one filter chain on the root namespace's input hook
/// (priority -10, policy accept), deleted on drop (also when the test fails). Loopback traffic
/// passes the input hook once per packet. Needs root and nft (package nftables).
pub struct NftTable(String);

impl NftTable {
    /// A table named after `tag` (and the process and `unique`, so tests never share one)
    /// whose input chain holds `rules`, one nft rule per entry.
    pub fn new(tag: &str, unique: u16, rules: &[String]) -> NftTable {
        let table = format!("peermesh_{tag}_{}_{unique}", std::process::id());
        let mut text = format!(
            "table inet {table} {{\n  chain input {{\n    type filter hook input priority -10; policy accept;\n"
        );
        for r in rules {
            text.push_str("    ");
            text.push_str(r);
            text.push('\n');
        }
        text.push_str("  }\n}\n");
        let ok = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .expect("piped stdin")
                    .write_all(text.as_bytes())?;
                c.wait()
            })
            .expect("nft (package nftables) must be installed; run the tests as root")
            .success();
        assert!(ok, "nft refused the rules:\n{text}");
        NftTable(table)
    }

    /// The table's name (family `inet`).
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Packets its rules with a `counter` have matched so far (the datagrams a loss rule
    /// dropped).
    pub fn dropped(&self) -> u64 {
        let out = Command::new("nft")
            .args(["list", "table", "inet", &self.0])
            .output()
            .expect("nft");
        nft_counted(&String::from_utf8_lossy(&out.stdout))
    }

    /// Randomly drops `percent` % of the UDP packets to and from local ports `lo..=hi` (each
    /// packet once, also when both ends are in the range): loss on the direct paths of clients
    /// that use that range (`ClientConfig::with_udp_ports`), nothing else.
    pub fn udp_loss(tag: &str, (lo, hi): (u16, u16), percent: u32) -> NftTable {
        NftTable::new(
            tag,
            lo,
            &[
                format!("udp dport {lo}-{hi} numgen random mod 100 < {percent} counter drop"),
                format!(
                    "udp sport {lo}-{hi} udp dport != {lo}-{hi} numgen random mod 100 < {percent} \
                     counter drop"
                ),
            ],
        )
    }

    /// Drops every UDP packet from ports `from` to ports `to` that is not STUN (the STUN magic
    /// cookie 0x2112A442 is not at payload offset 4): the DTLS/SCTP traffic of a direct path
    /// dies in one direction while ICE consent checks still pass both ways.
    pub fn one_way_non_stun(tag: &str, from: (u16, u16), to: (u16, u16)) -> NftTable {
        NftTable::new(
            tag,
            from.0,
            &[format!(
                "udp sport {}-{} udp dport {}-{} @th,96,32 != 0x2112a442 drop",
                from.0, from.1, to.0, to.1
            )],
        )
    }
}

/// The sum of the `counter … packets N` of an `nft list` output.
pub fn nft_counted(listing: &str) -> u64 {
    let words: Vec<&str> = listing.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "packets")
        .map(|w| w[1].parse::<u64>().unwrap_or(0))
        .sum()
}

/// Drops all UDP from and to a local port range on the root namespace's input hook while alive
/// (an nft table of its own, deleted on drop), to cut a direct path whose sockets use that range
/// (`ClientConfig::with_udp_ports`). Needs root and nft (package nftables).
pub struct UdpCut(#[allow(dead_code)] NftTable);

impl UdpCut {
    /// Cuts ports `lo..=hi`; `tag` keeps tables of different tests apart.
    pub fn new(tag: &str, (lo, hi): (u16, u16)) -> UdpCut {
        UdpCut(NftTable::new(
            tag,
            lo,
            &[
                format!("udp dport {lo}-{hi} drop"),
                format!("udp sport {lo}-{hi} drop"),
            ],
        ))
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .status();
    }
}

/// Send `data` reliably to the member of `group` named `to`, whatever its peer id: after a new
/// session (a server restart) the member has a new one, and a send to the old id gets
/// `UnknownPeer`; such a send goes again, to the new id, once the member is back. Gives up
/// (panics) after 60 s.
pub async fn send_to_member(c: &peermesh::Client, group: &str, to: &str, data: Vec<u8>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no member {to:?} of {group:?} to send to within 60 s"
        );
        // (Not in the group for a moment: between a new session and its rejoin.)
        let peer = c
            .members(group)
            .ok()
            .and_then(|m| m.into_iter().find(|m| m.name == to))
            .map(|m| m.peer);
        if let Some(peer) = peer {
            match c
                .send(peer, data.clone(), peermesh::Reliability::Reliable)
                .await
            {
                Ok(()) => return,
                Err(peermesh::Error::UnknownPeer(_)) => {}
                Err(e) => panic!("send to {to}: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
