//! The embedded STUN/TURN service against stock clients (coturn's `turnutils_*`, the classic
//! `stun` client) and a raw STUN client, all on real UDP sockets on 127.0.0.1.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use peermesh_server::turn::{
    is_denied_peer, rest_credentials, session_user, TurnConfig, TurnHandle, TurnServer, TurnStats,
};
use stun::agent::TransactionId;
use stun::attributes::*;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;
use tokio::process::Command;
use turn::proto::chandata::ChannelData;
use turn::proto::channum::ChannelNumber;
use turn::proto::data::Data;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::PROTO_UDP;

mod common;
use common::turn_client::*;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "peermesh_server::turn=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A username unique to this test process and call.
fn unique_user(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn loopback_config() -> TurnConfig {
    TurnConfig {
        listen: SocketAddr::new(LOCALHOST, 0),
        recv_buffer_bytes: 1 << 20,
        ..TurnConfig::default()
    }
}

/// [`loopback_config`] that lets clients relay to peers on 127.0.0.0/8.
fn open_config() -> TurnConfig {
    TurnConfig {
        allow_peers: vec!["127.0.0.0/8".parse().unwrap()],
        ..loopback_config()
    }
}

async fn start(config: TurnConfig) -> TurnHandle {
    init_tracing();
    TurnServer::start(config).await.expect("start TURN")
}

/// Credentials for a fresh user (see [`unique_user`]), valid for ten minutes.
fn credentials(turn: &TurnHandle, tag: &str) -> (String, String) {
    turn.credentials(&unique_user(tag), Duration::from_secs(600))
}

/// A UDP port that was free a moment ago.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a stock client to completion (killed if it takes longer than `limit`).
async fn run_tool(cmd: &str, args: &[String], limit: Duration) -> (Option<i32>, String) {
    let child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd}: {e}"));
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{cmd} {args:?} did not finish within {limit:?}"))
        .expect("waiting for tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

async fn wait_for<F: Fn(&TurnStats) -> bool>(turn: &TurnHandle, what: &str, f: F) -> TurnStats {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let st = turn.stats();
        if f(&st) {
            return st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stun_binding_with_stock_clients() {
    let turn = start(loopback_config()).await;
    let port = turn.local_addr().port().to_string();

    // coturn's turnutils_stunclient picks its own port (this version has no option for it):
    // the reflexive address must be 127.0.0.1 with a real, non-server port.
    let (code, out) = run_tool(
        "turnutils_stunclient",
        &s(&["-p", &port, "127.0.0.1"]),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(code, Some(0), "turnutils_stunclient:\n{out}");
    let mapped = out
        .lines()
        .find_map(|l| l.split("UDP reflexive addr: ").nth(1))
        .unwrap_or_else(|| panic!("no reflexive address in:\n{out}"))
        .trim();
    let mapped: SocketAddr = mapped.parse().expect("reflexive address");
    assert_eq!(mapped.ip(), LOCALHOST, "{out}");
    assert_ne!(mapped.port(), 0);
    assert_ne!(mapped.port(), turn.local_addr().port());

    // The classic RFC 3489 client (package stun-client): `-p` is its *source* port, the server
    // port goes with the host. Test 1 is a plain Binding request.
    let src = free_udp_port();
    let server = format!("127.0.0.1:{port}");
    let (code, out) = run_tool(
        "stun",
        &s(&[&server, "1", "-v", "-p", &src.to_string()]),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(code, Some(0), "stun:\n{out}");
    assert!(
        out.contains(&format!("MappedAddress = 127.0.0.1:{src}")),
        "stun output:\n{out}"
    );

    // Our own client: XOR-MAPPED-ADDRESS, unauthenticated.
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let mut m = Message::new();
    m.build(&[
        Box::new(TransactionId::new()) as Box<dyn Setter>,
        Box::new(BINDING_REQUEST),
    ])
    .unwrap();
    sock.send_to(&m.raw, turn.local_addr()).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .expect("binding response")
        .unwrap();
    let mut r = Message::new();
    r.raw = buf[..n].to_vec();
    r.decode().unwrap();
    let mut xor = XorMappedAddress::default();
    xor.get_from(&r).unwrap();
    assert_eq!(
        SocketAddr::new(xor.ip, xor.port),
        sock.local_addr().unwrap()
    );
    turn.shutdown().await;
}

/// A `turnutils_peer` echo server on 127.0.0.1 (killed on drop).
fn spawn_peer() -> (tokio::process::Child, u16) {
    let port = free_udp_port();
    let child = Command::new("turnutils_peer")
        .args(s(&["-L", "127.0.0.1", "-p", &port.to_string()]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning turnutils_peer");
    (child, port)
}

/// [`spawn_peer`], given a moment to bind its port.
async fn spawn_ready_peer() -> (tokio::process::Child, u16) {
    let peer = spawn_peer();
    tokio::time::sleep(Duration::from_millis(200)).await;
    peer
}

#[tokio::test]
async fn uclient_relays_through_channel_to_turnutils_peer() {
    let secret = "uclient-secret";
    let turn = start(TurnConfig {
        secret: secret.into(),
        ..open_config()
    })
    .await;
    let (_peer, peer_port) = spawn_ready_peer().await;
    let user = unique_user("uclient");
    let (username, password) = turn.credentials(&user, Duration::from_secs(600));
    let port = turn.local_addr().port().to_string();
    let (code, out) = run_tool(
        "turnutils_uclient",
        &s(&[
            "-u",
            &username,
            "-w",
            &password,
            "-p",
            &port,
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port.to_string(),
            "-n",
            "20",
            "-l",
            "120",
            "-c",
            "127.0.0.1",
        ]),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, Some(0), "uclient:\n{out}");
    assert!(
        out.contains("tot_send_msgs=20, tot_recv_msgs=20"),
        "uclient summary:\n{out}"
    );
    assert!(
        out.contains("tot_send_bytes ~ 2400, tot_recv_bytes ~ 2400"),
        "{out}"
    );
    assert!(out.contains("Total lost packets 0 (0.000000%)"), "{out}");
    let st = turn.stats();
    assert!(st.allocations_total >= 1, "{st:?}");
    assert!(st.relayed_to_peer_packets >= 20, "{st:?}");
    assert!(st.relayed_to_peer_bytes >= 2400, "{st:?}");
    assert!(st.relayed_to_client_packets >= 20, "{st:?}");
    assert!(st.relayed_to_client_bytes >= 2400, "{st:?}");
    assert_eq!(st.refused_peer, 0, "{st:?}");
    assert_eq!(st.refused_auth, 0, "{st:?}");
    turn.shutdown().await;
    assert_eq!(turn.stats().allocations, 0);
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn uclient_wrong_password_and_expired_credentials_get_401() {
    let secret = "bad-cred-secret";
    let turn = start(TurnConfig {
        secret: secret.into(),
        ..loopback_config()
    })
    .await;
    let port = turn.local_addr().port().to_string();
    let (username, _) = credentials(&turn, "wrongpw");
    let expired = rest_credentials(secret, &unique_user("expired"), now_unix() - 60);
    for (what, username, password) in [
        ("wrong password", username, "not-the-password".to_string()),
        ("expired", expired.0, expired.1),
    ] {
        let before = turn.stats().refused_auth;
        let (code, out) = run_tool(
            "turnutils_uclient",
            &s(&[
                "-u",
                &username,
                "-w",
                &password,
                "-p",
                &port,
                "-n",
                "1",
                "-c",
                "-e",
                "127.0.0.1",
                "127.0.0.1",
            ]),
            Duration::from_secs(60),
        )
        .await;
        assert_ne!(code, Some(0), "{what}: uclient succeeded:\n{out}");
        assert!(
            out.contains("Cannot complete Allocation"),
            "{what}: unexpected uclient output:\n{out}"
        );
        let st = turn.stats();
        assert!(st.refused_auth > before, "{what}: {st:?}");
        assert_eq!(st.allocations_total, 0, "{what}: {st:?}");
    }
    turn.shutdown().await;
}

fn lifetime_secs(m: &Message) -> u64 {
    let mut l = Lifetime::default();
    l.get_from(m).expect("LIFETIME");
    l.0.as_secs()
}

async fn nothing_arrives(sock: &UdpSocket, limit: Duration) -> bool {
    let mut buf = [0u8; 2048];
    tokio::time::timeout(limit, sock.recv_from(&mut buf))
        .await
        .is_err()
}

#[tokio::test]
async fn raw_client_credentials_forms_and_401() {
    let secret = "raw-auth-secret";
    let turn = start(TurnConfig {
        secret: secret.into(),
        ..loopback_config()
    })
    .await;
    let server = turn.local_addr();
    let future = now_unix() + 600;

    // Accepted forms: expiry:user (as handed out), user:expiry, bare expiry.
    let user = unique_user("forms");
    for username in [
        format!("{future}:{user}"),
        format!("{user}:{future}"),
        format!("{future}"),
    ] {
        let password = peermesh_password(secret, &username);
        let mut c = RawClient::new(server, &username, &password).await;
        let r = c.allocate().await;
        assert_success(&r, &username);
        assert_eq!(relayed_addr(&r).ip(), LOCALHOST);
        let mut xor = XorMappedAddress::default();
        xor.get_from(&r).unwrap();
        assert_eq!(
            SocketAddr::new(xor.ip, xor.port),
            c.sock.local_addr().unwrap()
        );
        assert_success(&c.refresh(0).await, "refresh 0");
    }
    wait_for(&turn, "allocations freed", |s| s.allocations == 0).await;

    // Refused: wrong password, expired, malformed (no number), wrong realm.
    let (username, _) = rest_credentials(secret, &unique_user("bad"), future);
    let expired = rest_credentials(secret, &unique_user("old"), now_unix() - 1);
    let malformed = unique_user("nonumber");
    let malformed_pw = peermesh_password(secret, &malformed);
    for (what, username, password) in [
        ("wrong password", username.as_str(), "nope"),
        ("expired", expired.0.as_str(), expired.1.as_str()),
        ("malformed", malformed.as_str(), malformed_pw.as_str()),
    ] {
        let mut c = RawClient::new(server, username, password).await;
        let r = c.allocate().await;
        assert_eq!(error_code(&r), Some(401), "{what}: {r}");
        assert!(TextAttribute::get_from_as(&r, ATTR_NONCE).is_ok());
        assert_eq!(
            TextAttribute::get_from_as(&r, ATTR_REALM).unwrap().text,
            turn.realm()
        );
    }
    let (username, password) = rest_credentials(secret, &unique_user("realm"), future);
    let mut c = RawClient::new(server, &username, &password).await;
    c.realm = "elsewhere".into();
    c.nonce = "x".into();
    let r = c
        .request(METHOD_ALLOCATE, || {
            vec![Box::new(RequestedTransport {
                protocol: PROTO_UDP,
            })]
        })
        .await
        .unwrap();
    assert!(matches!(error_code(&r), Some(401 | 438)), "{r}");

    let st = turn.stats();
    assert!(st.refused_auth >= 3, "{st:?}");
    assert_eq!(st.allocations_total, 3, "{st:?}");
    assert_eq!(st.allocations, 0, "{st:?}");
    turn.shutdown().await;
}

/// The coturn REST password, computed independently of the server (HMAC-SHA1 via `ring`).
fn peermesh_password(secret: &str, username: &str) -> String {
    use base64::Engine as _;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    base64::prelude::BASE64_STANDARD.encode(ring::hmac::sign(&key, username.as_bytes()).as_ref())
}

#[tokio::test]
async fn rest_credentials_match_coturn_scheme() {
    let (u, p) = rest_credentials("north", "alice", 1_700_000_000);
    assert_eq!(u, "1700000000:alice");
    assert_eq!(p, peermesh_password("north", "1700000000:alice"));
    assert_eq!(p.len(), 28);
}

#[tokio::test]
async fn user_quota_gives_486_and_frees_on_refresh_0() {
    let turn = start(TurnConfig {
        user_quota: 1,
        ..loopback_config()
    })
    .await;
    let server = turn.local_addr();
    let user = unique_user("quota");
    let (username, password) = turn.credentials(&user, Duration::from_secs(600));

    let mut a = RawClient::new(server, &username, &password).await;
    assert_success(&a.allocate().await, "first allocation");
    let mut b = RawClient::new(server, &username, &password).await;
    let r = b.allocate().await;
    assert_eq!(error_code(&r), Some(486), "{r}");
    // The 486 carries MESSAGE-INTEGRITY made with the same long-term key.
    b.key()
        .check(&mut r.clone())
        .expect("486 MESSAGE-INTEGRITY");
    // A user part with different expiry is the same user.
    let (username2, password2) = turn.credentials(&user, Duration::from_secs(900));
    let mut c = RawClient::new(server, &username2, &password2).await;
    assert_eq!(error_code(&c.allocate().await), Some(486));
    // Another user is not affected.
    let (other, other_pw) = credentials(&turn, "quota-other");
    let mut d = RawClient::new(server, &other, &other_pw).await;
    assert_success(&d.allocate().await, "other user");

    let st = turn.stats();
    assert_eq!(st.refused_user_quota, 2, "{st:?}");
    assert_eq!(st.allocations, 2, "{st:?}");

    // Releasing the first allocation frees the slot.
    assert_success(&a.refresh(0).await, "refresh 0");
    wait_for(&turn, "quota freed", |s| s.allocations == 1).await;
    assert_success(&b.allocate().await, "after release");
    let st = turn.stats();
    assert_eq!(st.allocations, 2, "{st:?}");
    assert_eq!(st.allocations_total, 3, "{st:?}");
    turn.shutdown().await;
    assert_eq!(turn.stats().allocations, 0);
}

#[tokio::test]
async fn total_quota_gives_486() {
    let turn = start(TurnConfig {
        total_quota: 1,
        ..loopback_config()
    })
    .await;
    let server = turn.local_addr();
    let (u1, p1) = credentials(&turn, "total-a");
    let (u2, p2) = credentials(&turn, "total-b");
    let mut a = RawClient::new(server, &u1, &p1).await;
    assert_success(&a.allocate().await, "first");
    let mut b = RawClient::new(server, &u2, &p2).await;
    assert_eq!(error_code(&b.allocate().await), Some(486));
    assert_eq!(turn.stats().refused_total_quota, 1);
    // A retransmitted/duplicate Allocate on a live 5-tuple is not a quota matter (437).
    assert_eq!(error_code(&a.allocate().await), Some(437));
    turn.shutdown().await;
}

#[tokio::test]
async fn uclient_two_clients_over_user_quota_one() {
    let turn = start(TurnConfig {
        user_quota: 1,
        ..open_config()
    })
    .await;
    let (_peer, peer_port) = spawn_ready_peer().await;
    let (username, password) = credentials(&turn, "uc-quota");
    let (code, out) = run_tool(
        "turnutils_uclient",
        &s(&[
            "-u",
            &username,
            "-w",
            &password,
            "-p",
            &turn.local_addr().port().to_string(),
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port.to_string(),
            "-m",
            "2",
            "-n",
            "2",
            "-c",
            "127.0.0.1",
        ]),
        Duration::from_secs(60),
    )
    .await;
    let st = turn.stats();
    assert!(
        st.refused_user_quota >= 1,
        "{st:?}\nuclient {code:?}:\n{out}"
    );
    assert_eq!(st.allocations_total, 1, "{st:?}\nuclient {code:?}:\n{out}");
    turn.shutdown().await;
}

#[tokio::test]
async fn lifetimes_are_clamped() {
    let turn = start(loopback_config()).await;
    let server = turn.local_addr();
    let (u, p) = credentials(&turn, "life");
    for (asked, granted) in [
        (Some(5000), 3599),
        (Some(3600), 3599),
        (Some(60), 600),
        (Some(1200), 1200),
        (None, 600),
    ] {
        let mut c = RawClient::new(server, &u, &p).await;
        let r = c.allocate_with(asked).await;
        assert_success(&r, "allocate");
        assert_eq!(lifetime_secs(&r), granted, "asked {asked:?}");
        let r = c.refresh(100_000).await;
        assert_success(&r, "refresh");
        assert_eq!(lifetime_secs(&r), 3599);
        let r = c.refresh(1).await;
        assert_eq!(lifetime_secs(&r), 600);
        assert_success(&c.refresh(0).await, "refresh 0");
        // Refreshing a deleted allocation is a mismatch.
        assert_eq!(error_code(&c.refresh(600).await), Some(437));
    }
    wait_for(&turn, "all released", |s| s.allocations == 0).await;
    turn.shutdown().await;
}
mod policy {
    use super::*;
    use ipnet::IpNet;

    fn denied(s: &str) -> bool {
        is_denied_peer(s.parse().unwrap(), &[])
    }

    #[test]
    fn default_policy() {
        for s in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "10.1.2.3",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            // IPv4-translated (RFC 2765)
            "::ffff:0:127.0.0.1",
            "::ffff:0:10.0.0.1",
            "::ffff:0:169.254.169.254",
            // IPv4-compatible (deprecated)
            "::127.0.0.1",
            "::10.0.0.1",
            "::192.168.0.1",
            "::0.0.0.2",
            // NAT64 well-known prefix (RFC 6052)
            "64:ff9b::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::169.254.169.254",
            "64:ff9b::100.64.0.1",
            "64:ff9b::224.0.0.1",
            // 6to4 (RFC 3056): IPv4 in bits 16..48
            "2002:7f00:1::1",
            "2002:a00:1::",
            "2002:a9fe:a9fe:1:2:3:4:5",
            "2002:c0a8:101::1",
            // local-use NAT64 (RFC 8215), Teredo (RFC 4380): denied outright
            "64:ff9b:1::a00:1",
            "64:ff9b:1:2::8.8.8.8",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:0:ffff:ffff:ffff:ffff:ffff:ffff",
            // site-local (deprecated), discard-only
            "fec0::1",
            "100::1",
        ] {
            assert!(denied(s), "{s} should be denied");
        }
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "198.19.255.255",
            "2001:db8::1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "::ffff:203.0.113.5",
            "::ffff:0:8.8.8.8",
            "::8.8.8.8",
            "64:ff9b::8.8.8.8",
            "64:ff9b::203.0.113.5",
            "2002:808:808::1",
            "2002:cb00:7105::1",
            "2001:1::1",
            "2001:db8:0:1::1",
            "64:ff9b:2::1",
        ] {
            assert!(!denied(s), "{s} should be allowed");
        }
    }

    #[test]
    fn allow_list_overrides() {
        let allow: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert!(!is_denied_peer("127.0.0.1".parse().unwrap(), &allow));
        assert!(!is_denied_peer("::ffff:127.0.0.1".parse().unwrap(), &allow));
        assert!(!is_denied_peer("fd00::5".parse().unwrap(), &allow));
        assert!(is_denied_peer("10.0.0.1".parse().unwrap(), &allow));
        assert!(is_denied_peer("fc00::1".parse().unwrap(), &allow));
        // Embedded IPv4 addresses are matched against the allow list too ...
        for s in [
            "::ffff:0:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::127.0.0.1",
            "2002:7f00:1::1",
        ] {
            assert!(!is_denied_peer(s.parse().unwrap(), &allow), "{s}");
        }
        for s in [
            "::ffff:0:10.0.0.1",
            "::10.0.0.1",
            "64:ff9b::10.0.0.1",
            "2002:a00:1::1",
        ] {
            assert!(is_denied_peer(s.parse().unwrap(), &allow), "{s}");
        }
        // ... and the address as given.
        let allow: Vec<IpNet> = vec![
            "64:ff9b::/96".parse().unwrap(),
            "2001::/32".parse().unwrap(),
            "64:ff9b:1::/48".parse().unwrap(),
        ];
        for s in ["64:ff9b::10.0.0.1", "2001::1", "64:ff9b:1::a00:1"] {
            assert!(!is_denied_peer(s.parse().unwrap(), &allow), "{s}");
        }
        assert!(is_denied_peer("::ffff:10.0.0.1".parse().unwrap(), &allow));
        // `::` and `::1` are not IPv4-compatible addresses: 0.0.0.0/8 does not exempt them.
        let allow: Vec<IpNet> = vec!["0.0.0.0/8".parse().unwrap()];
        assert!(is_denied_peer("::".parse().unwrap(), &allow));
        assert!(is_denied_peer("::1".parse().unwrap(), &allow));
        assert!(!is_denied_peer("::0.0.0.2".parse().unwrap(), &allow));
    }
}

#[tokio::test]
async fn denied_peer_gets_403_and_no_relayed_bytes() {
    // Default policy: loopback peers are denied.
    let turn = start(loopback_config()).await;
    let server = turn.local_addr();
    let peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (u, p) = credentials(&turn, "denied");
    let mut c = RawClient::new(server, &u, &p).await;
    let r = c.allocate().await;
    assert_success(&r, "allocate");
    let relay = relayed_addr(&r);

    let r = c.create_permission(peer_addr).await;
    assert_eq!(error_code(&r), Some(403), "{r}");
    c.key()
        .check(&mut r.clone())
        .expect("403 MESSAGE-INTEGRITY");
    // One denied address among allowed ones spoils the whole request.
    let r = c
        .request(METHOD_CREATE_PERMISSION, || {
            vec![
                Box::new(PeerAddress {
                    ip: "203.0.113.7".parse().unwrap(),
                    port: 9,
                }),
                Box::new(PeerAddress {
                    ip: "169.254.169.254".parse().unwrap(),
                    port: 80,
                }),
            ]
        })
        .await
        .unwrap();
    assert_eq!(error_code(&r), Some(403), "{r}");
    let r = c.channel_bind(0x4000, peer_addr).await;
    assert_eq!(error_code(&r), Some(403), "{r}");
    let mapped_v6: SocketAddr = format!("[::ffff:127.0.0.1]:{}", peer_addr.port())
        .parse()
        .unwrap();
    let r = c.create_permission(mapped_v6).await;
    assert!(matches!(error_code(&r), Some(403 | 443)), "{r}");
    let after_requests = turn.stats().refused_peer;
    assert!(after_requests >= 4, "{:?}", turn.stats());

    // Send indications to the denied peer are dropped (and counted).
    for i in 0..5u8 {
        c.send_indication(peer_addr, &[i; 100]).await;
    }
    c.send_channel_data(0x4000, &[7; 100]).await;
    assert!(nothing_arrives(&peer, Duration::from_millis(500)).await);
    let st = wait_for(&turn, "send indications counted", |s| {
        s.refused_peer >= after_requests + 5
    })
    .await;
    assert_eq!(st.relayed_to_peer_packets, 0, "{st:?}");
    assert_eq!(st.relayed_to_peer_bytes, 0, "{st:?}");

    // The relay socket itself drops what a denied peer sends to it.
    for _ in 0..3 {
        peer.send_to(b"hello from a denied peer", relay)
            .await
            .unwrap();
    }
    assert!(c.recv(Duration::from_millis(500)).await.is_none());
    let st = wait_for(&turn, "relay drops counted", |s| {
        s.refused_peer >= after_requests + 8
    })
    .await;
    assert_eq!(st.relayed_to_client_packets, 0, "{st:?}");
    turn.shutdown().await;
}

#[tokio::test]
async fn allowed_peer_relays_both_ways_with_raw_client() {
    let turn = start(open_config()).await;
    let server = turn.local_addr();
    let peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (u, p) = credentials(&turn, "allowed");
    let mut c = RawClient::new(server, &u, &p).await;
    let r = c.allocate().await;
    assert_success(&r, "allocate");
    let relay = relayed_addr(&r);

    // Send indication → peer; peer → Data indication.
    assert_success(&c.create_permission(peer_addr).await, "permission");
    c.send_indication(peer_addr, b"ping-by-send").await;
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(Duration::from_secs(2), peer.recv_from(&mut buf))
        .await
        .expect("peer got nothing")
        .unwrap();
    assert_eq!(&buf[..n], b"ping-by-send");
    assert_eq!(from, relay);
    peer.send_to(b"pong-by-data", relay).await.unwrap();
    let raw = c
        .recv(Duration::from_secs(2))
        .await
        .expect("data indication");
    let mut m = Message::new();
    m.raw = raw;
    m.decode().unwrap();
    let mut d = Data::default();
    d.get_from(&m).unwrap();
    assert_eq!(d.0, b"pong-by-data");

    // Channel → peer; peer → ChannelData.
    assert_success(&c.channel_bind(0x4001, peer_addr).await, "channel bind");
    c.send_channel_data(0x4001, b"ping-by-channel").await;
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), peer.recv_from(&mut buf))
        .await
        .expect("peer got no channel data")
        .unwrap();
    assert_eq!(&buf[..n], b"ping-by-channel");
    peer.send_to(b"pong-by-channel", relay).await.unwrap();
    let raw = c.recv(Duration::from_secs(2)).await.expect("channel data");
    let mut cd = ChannelData {
        raw,
        ..Default::default()
    };
    cd.decode().unwrap();
    assert_eq!(cd.number, ChannelNumber(0x4001));
    assert_eq!(cd.data, b"pong-by-channel");

    let st = turn.stats();
    assert_eq!(st.relayed_to_peer_packets, 2, "{st:?}");
    assert_eq!(st.relayed_to_peer_bytes, (12 + 15) as u64, "{st:?}");
    assert_eq!(st.relayed_to_client_packets, 2, "{st:?}");
    assert_eq!(st.relayed_to_client_bytes, (12 + 15) as u64, "{st:?}");
    assert_eq!(st.refused_peer, 0, "{st:?}");
    turn.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_listener_allocations_and_relays() {
    let turn = start(loopback_config()).await;
    let server = turn.local_addr();
    let (u, p) = credentials(&turn, "shutdown");
    let mut relays = Vec::new();
    for _ in 0..3 {
        let mut c = RawClient::new(server, &u, &p).await;
        relays.push(relayed_addr(&c.allocate().await));
    }
    assert_eq!(turn.stats().allocations, 3);
    let clone = turn.clone();
    turn.shutdown().await;
    clone.shutdown().await; // idempotent
    assert_eq!(turn.stats().allocations, 0);
    // Every port is free again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::net::UdpSocket::bind(server).expect("listener port released");
    for r in relays {
        std::net::UdpSocket::bind(r).expect("relay port released");
    }
}

#[tokio::test]
async fn relay_ports_stay_in_range() {
    let base = 40000 + (std::process::id() % 2000) as u16 * 4;
    let turn = start(TurnConfig {
        relay_ports: (base, base + 1),
        ..loopback_config()
    })
    .await;
    let server = turn.local_addr();
    let (u, p) = credentials(&turn, "range");
    let mut ok = 0;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = RawClient::new(server, &u, &p).await;
        let r = c.allocate().await;
        if r.typ.class == CLASS_SUCCESS_RESPONSE {
            let port = relayed_addr(&r).port();
            assert!((base..=base + 1).contains(&port), "{port}");
            ok += 1;
        } else {
            // Range exhausted: the turn crate answers 508 Insufficient Capacity.
            assert_eq!(error_code(&r), Some(508), "{r}");
        }
        clients.push(c);
    }
    assert!((1..=2).contains(&ok), "{ok}");
    turn.shutdown().await;
}

/// A PeerConnection keeps the credentials it started with: once they expire, its allocation
/// must still be refreshable (and its permissions and channels renewable), while a new
/// allocation with them is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_credentials_still_renew_their_own_allocation() {
    let secret = "renew-secret";
    let turn = start(TurnConfig {
        secret: secret.into(),
        ..open_config()
    })
    .await;
    let server = turn.local_addr();
    let (username, password) = rest_credentials(secret, &unique_user("renew"), now_unix() + 2);
    let mut c = RawClient::new(server, &username, &password).await;
    assert_success(&c.allocate().await, "allocate while valid");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_success(&c.refresh(600).await, "refresh with expired credentials");
    let peer: SocketAddr = (LOCALHOST, 9).into();
    assert_success(
        &c.create_permission(peer).await,
        "permission with expired credentials",
    );
    assert_success(
        &c.channel_bind(0x4001, peer).await,
        "channel with expired credentials",
    );

    // Another 5-tuple with the same expired credentials gets nothing.
    let mut other = RawClient::new(server, &username, &password).await;
    let r = other.allocate().await;
    assert_eq!(
        error_code(&r),
        Some(401),
        "new allocation with expired credentials"
    );
    assert_success(&c.refresh(0).await, "release");
}

// ---------------------------------------------------------------------------------------------
// The ChannelData fast path (our relay, bypassing the turn crate's datapath)

/// The next datagram on `sock` within `limit`, with its source.
async fn recv_on(sock: &UdpSocket, limit: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 70_000];
    match tokio::time::timeout(limit, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
        _ => None,
    }
}

/// Splits a ChannelData message: (channel number, payload), checking the length field against
/// the datagram (our server sends no padding over UDP).
fn channel_data(raw: &[u8]) -> (u16, Vec<u8>) {
    assert!(raw.len() >= 4, "short ChannelData {raw:?}");
    assert_eq!(raw[0] & 0xC0, 0x40, "not ChannelData: {raw:?}");
    let len = usize::from(u16::from_be_bytes([raw[2], raw[3]]));
    assert_eq!(raw.len(), 4 + len, "ChannelData length field vs datagram");
    (u16::from_be_bytes([raw[0], raw[1]]), raw[4..].to_vec())
}

/// A raw client with an allocation and `channel` bound to a fresh loopback peer socket.
async fn client_with_channel(
    turn: &TurnHandle,
    tag: &str,
    channel: u16,
) -> (RawClient, UdpSocket, SocketAddr) {
    let peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let (u, p) = credentials(turn, tag);
    let mut c = RawClient::new(turn.local_addr(), &u, &p).await;
    let r = c.allocate().await;
    assert_success(&r, "allocate");
    let relay = relayed_addr(&r);
    let peer_addr = peer.local_addr().unwrap();
    assert_success(&c.channel_bind(channel, peer_addr).await, "channel bind");
    (c, peer, relay)
}

#[tokio::test]
async fn uclient_channel_traffic_takes_the_fast_path_with_and_without_padding() {
    let secret = "fast-uclient-secret";
    let turn = start(TurnConfig {
        secret: secret.into(),
        ..open_config()
    })
    .await;
    let (_peer, peer_port) = spawn_ready_peer().await;
    let port = turn.local_addr().port().to_string();
    // -D: pad every ChannelData to a multiple of four (as pjnath does); 121 B needs 3 bytes.
    for (extra, len, n) in [(None, 120u64, 50u64), (Some("-D"), 121, 30)] {
        let before = turn.stats();
        let (username, password) = credentials(&turn, "fast-uc");
        let mut args = s(&[
            "-u",
            &username,
            "-w",
            &password,
            "-p",
            &port,
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port.to_string(),
            "-n",
            &n.to_string(),
            "-l",
            &len.to_string(),
            "-c",
        ]);
        args.extend(extra.map(String::from));
        args.push("127.0.0.1".into());
        let (code, out) = run_tool("turnutils_uclient", &args, Duration::from_secs(60)).await;
        assert_eq!(code, Some(0), "uclient {extra:?}:\n{out}");
        assert!(
            out.contains(&format!("tot_send_msgs={n}, tot_recv_msgs={n}")),
            "uclient {extra:?} summary:\n{out}"
        );
        assert!(
            out.contains(&format!(
                "tot_send_bytes ~ {}, tot_recv_bytes ~ {}",
                n * len,
                n * len
            )),
            "{extra:?}: {out}"
        );
        assert!(out.contains("Total lost packets 0 (0.000000%)"), "{out}");
        let st = turn.stats();
        let to_peer = st.fast_path_to_peer_packets - before.fast_path_to_peer_packets;
        let to_client = st.fast_path_to_client_packets - before.fast_path_to_client_packets;
        assert!(to_peer >= n, "{extra:?}: {to_peer} fast to peer: {st:?}");
        assert!(
            to_client >= n,
            "{extra:?}: {to_client} fast to client: {st:?}"
        );
        // Every relayed datagram in this run took the fast path.
        assert_eq!(
            st.relayed_to_peer_packets - before.relayed_to_peer_packets,
            to_peer,
            "{st:?}"
        );
        assert_eq!(
            st.relayed_to_client_packets - before.relayed_to_client_packets,
            to_client,
            "{st:?}"
        );
    }
    assert_eq!(turn.stats().refused_peer, 0);
    turn.shutdown().await;
}

#[tokio::test]
async fn fast_path_relays_exact_payloads_both_ways() {
    let turn = start(open_config()).await;
    let (c, peer, relay) = client_with_channel(&turn, "fast-exact", 0x4abc).await;
    let sizes = [0usize, 1, 3, 4, 5, 120, 1000, 1400];

    // Client → peer, including padded ChannelData (padding must not reach the peer).
    for &n in &sizes {
        let payload: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
        c.send_channel_data(0x4abc, &payload).await; // the turn crate's encoder pads
        let (got, from) = recv_on(&peer, Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("peer got no {n}-byte payload"));
        assert_eq!(got, payload, "{n} bytes client → peer");
        assert_eq!(from, relay);
    }
    // Padding beyond the next multiple of four is tolerated too; a datagram shorter than its
    // length field is discarded.
    let mut raw = vec![0x4a, 0xbc, 0, 2, b'o', b'k', 0, 0, 0, 0, 0, 0];
    c.sock.send_to(&raw, turn.local_addr()).await.unwrap();
    assert_eq!(
        recv_on(&peer, Duration::from_secs(2)).await.unwrap().0,
        b"ok"
    );
    raw[3] = 200;
    c.sock.send_to(&raw, turn.local_addr()).await.unwrap();
    assert!(nothing_arrives(&peer, Duration::from_millis(300)).await);

    // Peer → client: ChannelData with exactly the payload, no padding.
    for &n in &sizes {
        let payload: Vec<u8> = (0..n).map(|i| (i * 3 + n) as u8).collect();
        peer.send_to(&payload, relay).await.unwrap();
        let raw = c
            .recv(Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("client got no {n}-byte payload"));
        let (number, got) = channel_data(&raw);
        assert_eq!(number, 0x4abc);
        assert_eq!(got, payload, "{n} bytes peer → client");
    }

    let st = turn.stats();
    let total: u64 = sizes.iter().map(|&n| n as u64).sum();
    assert_eq!(
        st.fast_path_to_peer_packets,
        sizes.len() as u64 + 1,
        "{st:?}"
    );
    assert_eq!(st.relayed_to_peer_packets, sizes.len() as u64 + 1, "{st:?}");
    assert_eq!(st.relayed_to_peer_bytes, total + 2, "{st:?}");
    assert_eq!(st.fast_path_to_client_packets, sizes.len() as u64, "{st:?}");
    assert_eq!(st.relayed_to_client_packets, sizes.len() as u64, "{st:?}");
    assert_eq!(st.relayed_to_client_bytes, total, "{st:?}");
    turn.shutdown().await;
}

#[tokio::test]
async fn fast_path_only_serves_the_bound_channel_peer_and_client() {
    let turn = start(open_config()).await;
    let (mut c, peer, relay) = client_with_channel(&turn, "fast-scope", 0x4001).await;

    // An unbound channel number relays nothing.
    c.send_channel_data(0x4002, b"unbound channel").await;
    assert!(nothing_arrives(&peer, Duration::from_millis(300)).await);

    // Another 5-tuple (even with the same credentials) cannot use this allocation's channel.
    let intruder = RawClient::new(turn.local_addr(), &c.username, &c.password).await;
    intruder.send_channel_data(0x4001, b"not my channel").await;
    assert!(nothing_arrives(&peer, Duration::from_millis(300)).await);
    assert!(intruder.recv(Duration::from_millis(100)).await.is_none());

    // A second peer socket on the same IP: the permission (per IP) lets it through, but it has
    // no channel, so it arrives as a Data indication (the turn crate's path).
    let other = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    other.send_to(b"from another port", relay).await.unwrap();
    let raw = c
        .recv(Duration::from_secs(2))
        .await
        .expect("data indication");
    let mut m = Message::new();
    m.raw = raw;
    m.decode().expect("a STUN Data indication, not ChannelData");
    let mut d = Data::default();
    d.get_from(&m).unwrap();
    assert_eq!(d.0, b"from another port");
    let mut from = PeerAddress::default();
    from.get_from(&m).unwrap();
    assert_eq!(
        SocketAddr::new(from.ip, from.port),
        other.local_addr().unwrap()
    );

    // A peer without any permission (another IP) gets nothing through.
    let stranger = UdpSocket::bind((Ipv4Addr::new(127, 0, 0, 2), 0))
        .await
        .unwrap();
    stranger.send_to(b"no permission", relay).await.unwrap();
    assert!(c.recv(Duration::from_millis(300)).await.is_none());

    // The bound peer still takes the fast path both ways.
    c.send_channel_data(0x4001, b"bound").await;
    assert_eq!(
        recv_on(&peer, Duration::from_secs(2)).await.unwrap().0,
        b"bound"
    );
    peer.send_to(b"back", relay).await.unwrap();
    let (n, got) = channel_data(&c.recv(Duration::from_secs(2)).await.unwrap());
    assert_eq!((n, got.as_slice()), (0x4001, &b"back"[..]));
    let st = turn.stats();
    assert_eq!(st.fast_path_to_peer_packets, 1, "{st:?}");
    assert_eq!(st.fast_path_to_client_packets, 1, "{st:?}");
    assert_eq!(st.relayed_to_peer_packets, 1, "{st:?}");
    assert_eq!(st.relayed_to_client_packets, 2, "{st:?}");

    // Rebinding the channel to another peer is refused (RFC 8656 §12.2) and changes nothing.
    let r = c.channel_bind(0x4001, other.local_addr().unwrap()).await;
    assert_eq!(error_code(&r), Some(400), "{r}");
    c.send_channel_data(0x4001, b"still the first peer").await;
    assert_eq!(
        recv_on(&peer, Duration::from_secs(2)).await.unwrap().0,
        b"still the first peer"
    );
    assert!(nothing_arrives(&other, Duration::from_millis(200)).await);
    assert_success(&c.refresh(0).await, "release");
    turn.shutdown().await;
}

#[tokio::test]
async fn channel_to_denied_peer_never_takes_the_fast_path() {
    // Default policy: loopback peers are denied.
    let turn = start(loopback_config()).await;
    let peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (u, p) = credentials(&turn, "fast-denied");
    let mut c = RawClient::new(turn.local_addr(), &u, &p).await;
    let relay = relayed_addr(&c.allocate().await);
    let r = c.channel_bind(0x4000, peer_addr).await;
    assert_eq!(error_code(&r), Some(403), "{r}");
    for _ in 0..5 {
        c.send_channel_data(0x4000, b"to a denied peer").await;
    }
    assert!(nothing_arrives(&peer, Duration::from_millis(500)).await);
    peer.send_to(b"from a denied peer", relay).await.unwrap();
    assert!(c.recv(Duration::from_millis(300)).await.is_none());
    let st = turn.stats();
    assert_eq!(st.fast_path_to_peer_packets, 0, "{st:?}");
    assert_eq!(st.fast_path_to_client_packets, 0, "{st:?}");
    assert_eq!(st.relayed_to_peer_packets, 0, "{st:?}");
    assert_eq!(st.relayed_to_client_packets, 0, "{st:?}");
    turn.shutdown().await;
}

#[tokio::test]
async fn expired_and_released_channels_stop_the_fast_path() {
    let turn = start(TurnConfig {
        channel_lifetime: Duration::from_secs(2),
        ..open_config()
    })
    .await;
    let (mut c, peer, relay) = client_with_channel(&turn, "fast-expiry", 0x4100).await;
    let peer_addr = peer.local_addr().unwrap();
    c.send_channel_data(0x4100, b"live").await;
    assert_eq!(
        recv_on(&peer, Duration::from_secs(2)).await.unwrap().0,
        b"live"
    );
    assert_eq!(turn.stats().fast_path_to_peer_packets, 1);

    // The binding expires (the permission, 300 s, does not).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.send_channel_data(0x4100, b"expired").await;
    assert!(nothing_arrives(&peer, Duration::from_millis(500)).await);
    peer.send_to(b"after expiry", relay).await.unwrap();
    let raw = c
        .recv(Duration::from_secs(2))
        .await
        .expect("data indication");
    assert_eq!(
        raw[0] & 0xC0,
        0,
        "expected a Data indication after the channel expired, got {raw:?}"
    );
    let mut m = Message::new();
    m.raw = raw;
    m.decode().unwrap();
    let mut d = Data::default();
    d.get_from(&m).unwrap();
    assert_eq!(d.0, b"after expiry");
    let st = turn.stats();
    assert_eq!(st.fast_path_to_peer_packets, 1, "{st:?}");
    assert_eq!(st.fast_path_to_client_packets, 0, "{st:?}");

    // Binding again revives it.
    assert_success(&c.channel_bind(0x4100, peer_addr).await, "rebind");
    c.send_channel_data(0x4100, b"rebound").await;
    assert_eq!(
        recv_on(&peer, Duration::from_secs(2)).await.unwrap().0,
        b"rebound"
    );
    peer.send_to(b"rebound back", relay).await.unwrap();
    let (n, got) = channel_data(&c.recv(Duration::from_secs(2)).await.unwrap());
    assert_eq!((n, got.as_slice()), (0x4100, &b"rebound back"[..]));
    let st = turn.stats();
    assert_eq!(st.fast_path_to_peer_packets, 2, "{st:?}");
    assert_eq!(st.fast_path_to_client_packets, 1, "{st:?}");

    // Releasing the allocation ends relaying in both directions at once.
    assert_success(&c.refresh(0).await, "release");
    c.send_channel_data(0x4100, b"released").await;
    assert!(nothing_arrives(&peer, Duration::from_millis(500)).await);
    // The relay port may already be closed; a send error is fine, a delivery is not.
    let _ = peer.send_to(b"to a released relay", relay).await;
    assert!(c.recv(Duration::from_millis(500)).await.is_none());
    let st = wait_for(&turn, "released", |s| s.allocations == 0).await;
    assert_eq!(st.fast_path_to_peer_packets, 2, "{st:?}");
    assert_eq!(st.fast_path_to_client_packets, 1, "{st:?}");
    turn.shutdown().await;
}

/// Many datagrams in flight through several allocations at once: nothing lost, duplicated or
/// misdelivered, all of it on the fast path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_under_load_delivers_everything_to_the_right_client() {
    let turn = start(open_config()).await;
    const CLIENTS: usize = 3;
    const MSGS: u32 = 2000;
    const WINDOW: u32 = 16;
    let echo = std::sync::Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap());
    let echo_addr = echo.local_addr().unwrap();
    let echo_task = tokio::spawn({
        let echo = echo.clone();
        async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        }
    });
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _echo_guard = AbortOnDrop(echo_task);

    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (u, p) = credentials(&turn, "fast-load");
        let mut c = RawClient::new(turn.local_addr(), &u, &p).await;
        assert_success(&c.allocate().await, "allocate");
        let channel = 0x4000 + i as u16;
        assert_success(&c.channel_bind(channel, echo_addr).await, "channel bind");
        tasks.push(tokio::spawn(async move {
            // Payload: client index and sequence number; echoes must come back in order (one
            // path, loopback) and only to their own client.
            let (mut sent, mut next) = (0u32, 0u32);
            while next < MSGS {
                while sent < MSGS && sent - next < WINDOW {
                    let mut payload = vec![i as u8; 100];
                    payload[1..5].copy_from_slice(&sent.to_be_bytes());
                    c.send_channel_data(channel, &payload).await;
                    sent += 1;
                }
                let raw = c
                    .recv(Duration::from_secs(20))
                    .await
                    .unwrap_or_else(|| panic!("client {i}: echo {next} missing"));
                let (n, got) = channel_data(&raw);
                assert_eq!(n, channel, "client {i}");
                assert_eq!(got[0], i as u8, "client {i} got another client's echo");
                let seq = u32::from_be_bytes([got[1], got[2], got[3], got[4]]);
                assert_eq!(seq, next, "client {i}: out of order or lost");
                next += 1;
            }
            assert_success(&c.refresh(0).await, "release");
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("load test timed out")
            .expect("client task");
    }
    let st = turn.stats();
    let total = CLIENTS as u64 * u64::from(MSGS);
    assert_eq!(st.fast_path_to_peer_packets, total, "{st:?}");
    assert_eq!(st.fast_path_to_client_packets, total, "{st:?}");
    assert_eq!(st.relayed_to_peer_packets, total, "{st:?}");
    assert_eq!(st.relayed_to_client_packets, total, "{st:?}");
    turn.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Issue 10: malformed peer addresses, IPv4-embedding IPv6 peers, address families, per-source
// quotas, live permission / channel gauges.

/// An attribute with exactly the given value bytes (for malformed ones).
struct RawAttr(AttrType, Vec<u8>);

impl Setter for RawAttr {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        m.add(self.0, &self.1);
        Ok(())
    }
}

fn peer_attr(peer: SocketAddr) -> Box<dyn Setter> {
    Box::new(PeerAddress {
        ip: peer.ip(),
        port: peer.port(),
    })
}

fn udp_transport() -> Box<dyn Setter> {
    Box::new(RequestedTransport {
        protocol: PROTO_UDP,
    })
}

/// XOR-PEER-ADDRESS values the guard must refuse: `(what, value)`. The truncated ones are what
/// `stun` would decode as 127.0.0.0, 10.0.0.0, 169.254.0.0, 0.0.0.0, fe80:: and fc00::.
fn malformed_peer_values() -> Vec<(&'static str, Vec<u8>)> {
    // Port 9 XOR 0x2112; address bytes XOR the magic cookie (0x2112a442).
    let port = (9u16 ^ 0x2112).to_be_bytes();
    let v = |family: [u8; 2], rest: &[u8]| {
        let mut out = vec![family[0], family[1], port[0], port[1]];
        out.extend_from_slice(rest);
        out
    };
    vec![
        ("truncated IPv4 127.0.0.0", v([0, 1], &[127 ^ 0x21])),
        ("truncated IPv4 10.0.0.0", v([0, 1], &[10 ^ 0x21])),
        (
            "truncated IPv4 169.254.0.0",
            v([0, 1], &[169 ^ 0x21, 254 ^ 0x12]),
        ),
        ("truncated IPv4 0.0.0.0", v([0, 1], &[0x21])),
        (
            "truncated IPv6 fe80::",
            v([0, 2], &[0xfe ^ 0x21, 0x80 ^ 0x12]),
        ),
        ("truncated IPv6 fc00::", v([0, 2], &[0xfc ^ 0x21])),
        ("IPv4 with 3 address bytes", v([0, 1], &[0x5e, 0x12, 0xa4])),
        (
            "IPv4 with 5 address bytes",
            v([0, 1], &[0x2a, 0x12, 0xa4, 0x43, 0]),
        ),
        ("IPv4 family, IPv6 length", v([0, 1], &[0x2a; 16])),
        (
            "IPv6 family, IPv4 length",
            v([0, 2], &[0x2a, 0x12, 0xa4, 0x43]),
        ),
        ("IPv6 with 17 address bytes", v([0, 2], &[0x2a; 17])),
        ("no address", v([0, 1], &[])),
        ("unknown family 3", v([0, 3], &[0x2a, 0x12, 0xa4, 0x43])),
        ("family 0", v([0, 0], &[0x2a, 0x12, 0xa4, 0x43])),
        (
            "non-zero reserved byte",
            v([1, 1], &[0x2a, 0x12, 0xa4, 0x43]),
        ),
        ("empty value", Vec::new()),
        ("two bytes", vec![0, 1]),
    ]
}

#[tokio::test]
async fn malformed_peer_addresses_get_400() {
    // 127.0.0.0/8 allowed: a garbage address decoding to 127.0.0.0 would otherwise be granted.
    let turn = start(open_config()).await;
    let server = turn.local_addr();
    let (u, p) = credentials(&turn, "malformed");
    let mut c = RawClient::new(server, &u, &p).await;
    assert_success(&c.allocate().await, "allocate");
    let good: SocketAddr = "203.0.113.7:9".parse().unwrap();

    let values = malformed_peer_values();
    let mut expected = 0;
    for (what, value) in &values {
        let r = c
            .request(METHOD_CREATE_PERMISSION, || {
                vec![Box::new(RawAttr(ATTR_XOR_PEER_ADDRESS, value.clone()))]
            })
            .await
            .unwrap();
        assert_eq!(error_code(&r), Some(400), "CreatePermission, {what}: {r}");
        c.key()
            .check(&mut r.clone())
            .expect("400 MESSAGE-INTEGRITY");
        // One malformed address among good ones spoils the request.
        let r = c
            .request(METHOD_CREATE_PERMISSION, || {
                vec![
                    peer_attr(good),
                    Box::new(RawAttr(ATTR_XOR_PEER_ADDRESS, value.clone())),
                ]
            })
            .await
            .unwrap();
        assert_eq!(
            error_code(&r),
            Some(400),
            "CreatePermission +good, {what}: {r}"
        );
        let r = c
            .request(METHOD_CHANNEL_BIND, || {
                vec![
                    Box::new(ChannelNumber(0x4000)),
                    Box::new(RawAttr(ATTR_XOR_PEER_ADDRESS, value.clone())),
                ]
            })
            .await
            .unwrap();
        assert_eq!(error_code(&r), Some(400), "ChannelBind, {what}: {r}");
        expected += 3;
    }
    // No XOR-PEER-ADDRESS at all.
    let r = c.request(METHOD_CREATE_PERMISSION, Vec::new).await.unwrap();
    assert_eq!(
        error_code(&r),
        Some(400),
        "CreatePermission without peer: {r}"
    );
    let r = c
        .request(METHOD_CHANNEL_BIND, || {
            vec![Box::new(ChannelNumber(0x4000))]
        })
        .await
        .unwrap();
    assert_eq!(error_code(&r), Some(400), "ChannelBind without peer: {r}");
    expected += 2;
    let st = turn.stats();
    assert_eq!(st.refused_malformed, expected, "{st:?}");
    assert_eq!(st.permissions, 0, "{st:?}");
    assert_eq!(st.channel_bindings, 0, "{st:?}");

    // Send indications with a malformed (or no) peer address are dropped and counted.
    for (_, value) in &values {
        let m = c.build(
            METHOD_SEND,
            CLASS_INDICATION,
            vec![
                Box::new(RawAttr(ATTR_XOR_PEER_ADDRESS, value.clone())),
                Box::new(Data(b"x".to_vec())),
            ],
            false,
        );
        c.sock.send_to(&m.raw, server).await.unwrap();
    }
    let m = c.build(
        METHOD_SEND,
        CLASS_INDICATION,
        vec![Box::new(Data(b"x".to_vec()))],
        false,
    );
    c.sock.send_to(&m.raw, server).await.unwrap();
    expected += values.len() as u64 + 1;
    // So is what is neither STUN nor ChannelData.
    c.sock
        .send_to(b"\x80\x00junk-not-stun", server)
        .await
        .unwrap();
    c.sock.send_to(&[0u8; 24], server).await.unwrap();
    expected += 2;
    let st = wait_for(&turn, "malformed datagrams counted", |s| {
        s.refused_malformed >= expected
    })
    .await;
    assert_eq!(st.refused_malformed, expected, "{st:?}");
    assert_eq!(st.relayed_to_peer_packets, 0, "{st:?}");
    assert_eq!(st.refused_peer, 0, "{st:?}");

    // The allocation still works.
    assert_success(&c.refresh(600).await, "refresh");
    assert_success(&c.refresh(0).await, "refresh 0");
    turn.shutdown().await;
}

/// IPv6 peers that embed a denied IPv4 address, local-use NAT64 and Teredo.
const DENIED_EMBEDDED: &[&str] = &[
    "::ffff:127.0.0.1",
    "::ffff:0:10.0.0.1",
    "::169.254.169.254",
    "64:ff9b::127.0.0.1",
    "64:ff9b::10.1.2.3",
    "64:ff9b::169.254.169.254",
    "2002:7f00:1::1",
    "2002:c0a8:101::1",
    "64:ff9b:1::a00:1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
];

/// Asserts that CreatePermission and ChannelBind towards each of `peers` get 403.
async fn assert_peers_forbidden(c: &mut RawClient, peers: &[&str]) {
    for s in peers {
        let peer = SocketAddr::new(s.parse().unwrap(), 3478);
        let r = c.create_permission(peer).await;
        assert_eq!(error_code(&r), Some(403), "CreatePermission {s}: {r}");
        c.key()
            .check(&mut r.clone())
            .expect("403 MESSAGE-INTEGRITY");
        let r = c.channel_bind(0x4002, peer).await;
        assert_eq!(error_code(&r), Some(403), "ChannelBind {s}: {r}");
    }
}

#[tokio::test]
async fn ipv6_peers_embedding_denied_ipv4_get_403() {
    let turn = start(loopback_config()).await;
    let (u, p) = credentials(&turn, "embedded");
    let mut c = RawClient::new(turn.local_addr(), &u, &p).await;
    assert_success(&c.allocate().await, "allocate");
    assert_peers_forbidden(&mut c, DENIED_EMBEDDED).await;
    let st = turn.stats();
    assert_eq!(st.refused_peer, 2 * DENIED_EMBEDDED.len() as u64, "{st:?}");
    assert_eq!(st.permissions, 0, "{st:?}");
    assert_success(&c.refresh(0).await, "refresh 0");
    turn.shutdown().await;
}

#[tokio::test]
async fn requested_address_family_the_relay_lacks_gets_440() {
    let turn = start(loopback_config()).await;
    let server = turn.local_addr();
    let (u, p) = credentials(&turn, "family4");
    let family = |f: u8| -> Box<dyn Setter> {
        Box::new(RawAttr(ATTR_REQUESTED_ADDRESS_FAMILY, vec![f, 0, 0, 0]))
    };
    for (what, f, want) in [("IPv6", 2u8, 440), ("unknown", 7, 440)] {
        let mut c = RawClient::new(server, &u, &p).await;
        let r = c
            .request(METHOD_ALLOCATE, || vec![udp_transport(), family(f)])
            .await
            .unwrap();
        assert_eq!(error_code(&r), Some(want), "{what}: {r}");
        c.key()
            .check(&mut r.clone())
            .expect("440 MESSAGE-INTEGRITY");
    }
    // A REQUESTED-ADDRESS-FAMILY that is not 4 bytes long is malformed.
    let mut c = RawClient::new(server, &u, &p).await;
    let r = c
        .request(METHOD_ALLOCATE, || {
            vec![
                udp_transport(),
                Box::new(RawAttr(ATTR_REQUESTED_ADDRESS_FAMILY, vec![1, 0])),
            ]
        })
        .await
        .unwrap();
    assert_eq!(error_code(&r), Some(400), "{r}");
    // Asking for IPv4 explicitly is fine.
    let r = c
        .request(METHOD_ALLOCATE, || vec![udp_transport(), family(1)])
        .await
        .unwrap();
    assert_success(&r, "IPv4 requested");
    assert_eq!(relayed_addr(&r).ip(), LOCALHOST);
    let st = turn.stats();
    assert_eq!(st.allocations_total, 1, "{st:?}");
    assert_eq!(st.refused_malformed, 1, "{st:?}");
    assert_success(&c.refresh(0).await, "refresh 0");
    turn.shutdown().await;
}

/// Whether this machine has IPv6 loopback.
fn have_ipv6_loopback() -> bool {
    std::net::UdpSocket::bind((std::net::Ipv6Addr::LOCALHOST, 0)).is_ok()
}

#[tokio::test]
async fn ipv6_only_listener_answers_440_and_applies_the_policy() {
    if !have_ipv6_loopback() {
        eprintln!("skipped: no IPv6 loopback");
        return;
    }
    let v6_local = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);
    let turn = start(TurnConfig {
        listen: SocketAddr::new(v6_local, 0),
        ..loopback_config()
    })
    .await;
    let server = turn.local_addr();
    let (u, p) = credentials(&turn, "family6");

    // RFC 6156: no REQUESTED-ADDRESS-FAMILY means IPv4, which this relay does not have.
    let mut c = RawClient::new_on(v6_local, server, &u, &p).await;
    let r = c.allocate().await;
    assert_eq!(error_code(&r), Some(440), "{r}");
    c.key()
        .check(&mut r.clone())
        .expect("440 MESSAGE-INTEGRITY");
    let r = c
        .request(METHOD_ALLOCATE, || {
            vec![
                udp_transport(),
                Box::new(RawAttr(ATTR_REQUESTED_ADDRESS_FAMILY, vec![1, 0, 0, 0])),
            ]
        })
        .await
        .unwrap();
    assert_eq!(error_code(&r), Some(440), "{r}");

    // IPv6 requested: granted, on ::1.
    let r = c
        .request(METHOD_ALLOCATE, || {
            vec![
                udp_transport(),
                Box::new(RawAttr(ATTR_REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0])),
            ]
        })
        .await
        .unwrap();
    assert_success(&r, "IPv6 allocation");
    assert_eq!(relayed_addr(&r).ip(), v6_local);

    // Same-family peers: the turn crate would grant these; the policy must not.
    assert_peers_forbidden(&mut c, DENIED_EMBEDDED).await;
    assert_peers_forbidden(&mut c, &["::1", "fe80::1", "fd00::1"]).await;
    // Embedded public IPv4 addresses and ordinary global ones are fine (permissions only:
    // nothing is sent to them).
    for s in ["64:ff9b::203.0.113.5", "2002:cb00:7105::1", "2001:db8::1"] {
        let peer = SocketAddr::new(s.parse().unwrap(), 3478);
        assert_success(&c.create_permission(peer).await, s);
    }
    let st = turn.stats();
    assert_eq!(st.allocations_total, 1, "{st:?}");
    assert_eq!(st.permissions, 3, "{st:?}");
    assert_success(&c.refresh(0).await, "refresh 0");
    wait_for(&turn, "released", |s| s.allocations == 0).await;
    turn.shutdown().await;
}

#[tokio::test]
async fn ip_quota_caps_one_source_and_one_signaling_address() {
    const QUOTA: usize = 4;
    let turn = start(TurnConfig {
        ip_quota: QUOTA,
        ..loopback_config()
    })
    .await;
    let server = turn.local_addr();
    let ttl = Duration::from_secs(600);
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let base = std::process::id() * 1000;

    // One client at 127.0.0.1 with many signaling sessions' credentials (peerN@127.0.0.1):
    // only QUOTA allocations, whatever the number of users.
    let mut held = Vec::new();
    for n in 0..QUOTA as u32 {
        let (u, p) = turn.credentials(&session_user(base + n, Some(LOCALHOST)), ttl);
        let mut c = RawClient::new(server, &u, &p).await;
        assert_success(&c.allocate().await, "within the quota");
        held.push(c);
    }
    for n in 0..3 {
        let user = session_user(base + 100 + n, Some(LOCALHOST));
        let (u, p) = turn.credentials(&user, ttl);
        let mut c = RawClient::new(server, &u, &p).await;
        let r = c.allocate().await;
        assert_eq!(error_code(&r), Some(486), "{user}: {r}");
        c.key()
            .check(&mut r.clone())
            .expect("486 MESSAGE-INTEGRITY");
    }
    // Credentials without an address in the user part are capped by the UDP source alone.
    let (u, p) = credentials(&turn, "no-ip");
    let mut c = RawClient::new(server, &u, &p).await;
    assert_eq!(error_code(&c.allocate().await), Some(486));
    let st = turn.stats();
    assert_eq!(st.refused_ip_quota, 4, "{st:?}");
    assert_eq!(st.refused_user_quota, 0, "{st:?}");
    assert_eq!(st.allocations, QUOTA as u64, "{st:?}");

    // Another identity from another source still gets one.
    let other_ip = ip("127.0.0.2");
    let (u, p) = turn.credentials(&session_user(base + 200, Some(other_ip)), ttl);
    let mut other = RawClient::new_on(other_ip, server, &u, &p).await;
    assert_success(&other.allocate().await, "other identity");

    // The address in the user part counts on its own: credentials minted for a signaling
    // session from 203.0.113.9 are capped even when used from distinct UDP sources.
    let signaling_ip = ip("203.0.113.9");
    for k in 0..QUOTA as u32 {
        let (u, p) = turn.credentials(&session_user(base + 300 + k, Some(signaling_ip)), ttl);
        let src = ip(&format!("127.0.1.{}", k + 1));
        let mut c = RawClient::new_on(src, server, &u, &p).await;
        assert_success(&c.allocate().await, "user-part address within the quota");
        held.push(c);
    }
    let (u, p) = turn.credentials(&session_user(base + 400, Some(signaling_ip)), ttl);
    let mut c = RawClient::new_on(ip("127.0.1.100"), server, &u, &p).await;
    assert_eq!(error_code(&c.allocate().await), Some(486));
    let st = turn.stats();
    assert_eq!(st.refused_ip_quota, 5, "{st:?}");
    assert_eq!(st.allocations, 2 * QUOTA as u64 + 1, "{st:?}");

    // Releasing one allocation of 127.0.0.1 frees a slot for it.
    assert_success(&held[0].refresh(0).await, "refresh 0");
    wait_for(&turn, "slot freed", |s| s.allocations == 2 * QUOTA as u64).await;
    let (u, p) = turn.credentials(&session_user(base + 500, Some(LOCALHOST)), ttl);
    let mut c = RawClient::new(server, &u, &p).await;
    assert_success(&c.allocate().await, "after release");
    turn.shutdown().await;
    assert_eq!(turn.stats().allocations, 0);
}

#[tokio::test]
async fn stats_count_live_permissions_and_channel_bindings() {
    let turn = start(open_config()).await;
    let server = turn.local_addr();
    // Peers are only named, never sent to.
    let peer_a: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let peer_b: SocketAddr = "127.0.0.2:9".parse().unwrap();
    let (u, p) = credentials(&turn, "gauges");
    let mut c1 = RawClient::new(server, &u, &p).await;
    let mut c2 = RawClient::new(server, &u, &p).await;
    assert_success(&c1.allocate().await, "allocate 1");
    assert_success(&c2.allocate().await, "allocate 2");

    assert_success(&c1.create_permission(peer_a).await, "permission");
    let st = turn.stats();
    assert_eq!((st.permissions, st.channel_bindings), (1, 0), "{st:?}");
    // A ChannelBind also installs the permission of its peer (same IP: no new permission).
    assert_success(&c1.channel_bind(0x4000, peer_a).await, "bind a");
    assert_success(&c1.channel_bind(0x4001, peer_b).await, "bind b");
    assert_success(&c2.channel_bind(0x4000, peer_b).await, "bind c2");
    let st = turn.stats();
    assert_eq!((st.permissions, st.channel_bindings), (3, 3), "{st:?}");

    assert_success(&c1.refresh(0).await, "refresh 0");
    let st = wait_for(&turn, "c1 released", |s| s.allocations == 1).await;
    assert_eq!((st.permissions, st.channel_bindings), (1, 1), "{st:?}");
    assert_success(&c2.refresh(0).await, "refresh 0");
    let st = wait_for(&turn, "c2 released", |s| s.allocations == 0).await;
    assert_eq!((st.permissions, st.channel_bindings), (0, 0), "{st:?}");
    turn.shutdown().await;
}
