//! Direct policies (`ClientConfig::with_direct_policy`), membership acks and path reports,
//! against the real server (with its embedded TURN where relay candidates are needed) on
//! 127.0.0.1.
//!
//! Where a test must see exactly what a client sends, the other end is a raw WebSocket peer that
//! speaks the JSON protocol by hand ([`Raw`]), or a recording WebSocket relay sits between the
//! client and the server ([`Recorder`]): real sockets both ways, every frame passed on unchanged.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use peermesh::protocol::PROTOCOL_VERSION;
use peermesh::{CandidateType, ClientConfig, DirectPolicy, Event, Path};
use peermesh_server::ServerHandle;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Liveness bound for anything a test waits for.
const WAIT: Duration = Duration::from_secs(10);
/// How long a test watches for frames that must not come.
const QUIET: Duration = Duration::from_secs(3);

fn config(name: &str, policy: DirectPolicy) -> ClientConfig {
    ClientConfig::new(name)
        .with_direct_backend(common::backend())
        .with_loopback_only(true)
        .with_direct_policy(policy)
}

/// A raw WebSocket peer speaking the JSON protocol by hand.
struct Raw {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    peer: u32,
}

impl Raw {
    /// Connect and say hello (without `direct`: a peer that says nothing about its policy).
    async fn hello(server: &ServerHandle, name: &str) -> Raw {
        let (ws, _) = tokio_tungstenite::connect_async(server.ws_url())
            .await
            .expect("connect");
        let mut raw = Raw { ws, peer: 0 };
        raw.send(json!({"type": "hello", "version": PROTOCOL_VERSION, "name": name}))
            .await;
        let welcome = raw.expect("welcome", |m| m["type"] == "welcome").await;
        raw.peer = welcome["peer"].as_u64().unwrap() as u32;
        raw
    }

    async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    /// The next JSON frame before `deadline` (relay frames and pongs skipped); `None` if none.
    async fn next_until(&mut self, deadline: Instant) -> Option<Value> {
        loop {
            match timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["type"] != "pong" {
                        return Some(v);
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!("raw peer: connection ended: {other:?}"),
            }
        }
    }

    /// The next JSON frame matching `pred` within `WAIT`, others skipped.
    async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.next_until(deadline).await {
                Some(v) if pred(&v) => return v,
                Some(_) => {}
                None => panic!("raw peer: no {what} within {WAIT:?}"),
            }
        }
    }

    /// Join `group`; returns the `joined` frame.
    async fn join(&mut self, group: &str) -> Value {
        self.send(json!({"type": "join", "group": group})).await;
        self.expect("joined", |m| m["type"] == "joined").await
    }

    /// Every frame until `deadline`.
    async fn collect_until(&mut self, deadline: Instant) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(v) = self.next_until(deadline).await {
            out.push(v);
        }
        out
    }

    /// The `signal`s from `from` until there are `done(signals)` and then one more quiet second,
    /// or `WAIT` has passed.
    async fn signals_from(&mut self, from: u32, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let end = Instant::now() + WAIT;
        let mut signals = Vec::new();
        let mut settle: Option<Instant> = None;
        loop {
            let deadline = settle.unwrap_or(end).min(end);
            match self.next_until(deadline).await {
                Some(v) if v["type"] == "signal" && v["from"] == from => signals.push(v),
                Some(_) => {}
                None => return signals,
            }
            if settle.is_none() && done(&signals) {
                settle = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }
}

fn kind(signal: &Value) -> &str {
    signal["data"]["kind"].as_str().unwrap_or_default()
}

/// The type of an SDP candidate (`candidate:… typ <type> …`, with or without `a=`).
fn candidate_type(line: &str) -> Option<&str> {
    let mut it = line.split_whitespace();
    it.find(|w| *w == "typ")?;
    it.next()
}

/// A relay candidate that reveals no address but the relay's: `typ relay`, and its related
/// address (the sender's own, as TURN saw it), if given, `0.0.0.0`/`0`.
fn assert_relay_candidate(line: &str, what: &str) {
    assert_eq!(candidate_type(line), Some("relay"), "{what}: {line}");
    let words: Vec<&str> = line.split_whitespace().collect();
    for (key, unspecified) in [("raddr", "0.0.0.0"), ("rport", "0")] {
        if let Some(at) = words.iter().position(|w| *w == key) {
            assert_eq!(words.get(at + 1), Some(&unspecified), "{what}: {line}");
        }
    }
}

/// The `a=candidate` lines of an SDP.
fn sdp_candidates(sdp: &str) -> Vec<&str> {
    sdp.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("a=candidate:"))
        .collect()
}

/// Everything a relay-only end signaled (as it sent it, or as the peer receives it after the
/// server's own enforcement of the same rules, §3.13): the offer or answer has no `a=candidate` line of another type and no address in `c=`, and every trickled
/// candidate is `typ relay` (at least one was trickled); no relay candidate has a related
/// address.
fn assert_relay_only(signals: &[Value], sdp_kind: &str) {
    let sdp = signals
        .iter()
        .find(|s| kind(s) == sdp_kind)
        .unwrap_or_else(|| panic!("no {sdp_kind} in {signals:#?}"))["data"]["sdp"]
        .as_str()
        .unwrap()
        .to_string();
    for line in sdp_candidates(&sdp) {
        assert_relay_candidate(line, &format!("in the {sdp_kind}"));
    }
    for line in sdp.lines().filter(|l| l.starts_with("c=")) {
        assert!(
            line.ends_with(" 0.0.0.0") || line.ends_with(" ::"),
            "{line}"
        );
    }
    let trickled: Vec<&str> = signals
        .iter()
        .filter(|s| kind(s) == "candidate")
        .map(|s| s["data"]["candidate"].as_str().unwrap())
        .collect();
    assert!(!trickled.is_empty(), "no candidate trickled: {signals:#?}");
    for c in &trickled {
        assert_relay_candidate(c, "trickled");
    }
}

/// A syntactically complete data channel offer from a peer that will never connect, with a host
/// candidate in it (at the discard port of 127.0.0.1, so nothing listens there anyway).
fn raw_offer_sdp() -> String {
    let fingerprint = (0..32)
        .map(|i| format!("{i:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    [
        "v=0",
        "o=- 1 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        &format!("a=fingerprint:sha-256 {fingerprint}"),
        "a=group:BUNDLE 0",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 0.0.0.0",
        "a=setup:actpass",
        "a=mid:0",
        "a=sendrecv",
        "a=sctp-port:5000",
        "a=ice-ufrag:rawpeerufrag0001",
        "a=ice-pwd:rawpeerpassword00000000000000001",
        "a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host",
        "",
    ]
    .join("\r\n")
}

/// A relay-only client that makes the offer sends only relay candidates, in its offer and
/// trickled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_initiator_signals_relay_candidates_only() {
    init_log();
    let server = server_with(embedded_turn((51000, 51099))).await;
    let mut raw = Raw::hello(&server, "raw").await;
    raw.join("g").await;
    // The joiner is the initiator.
    // Through a recorder: what c itself sends, before the server's own enforcement.
    let rec = Recorder::start(&server).await;
    let (c, _ce) = peermesh::Client::connect(&rec.url, config("c", DirectPolicy::Relay))
        .await
        .expect("connect through the recorder");
    c.join("g").await.unwrap();
    let member = raw
        .expect("member_joined", |m| m["type"] == "member_joined")
        .await;
    assert_eq!(member["member"]["initiator"], json!(false));
    let link = member["member"]["link"].clone();
    let signals = raw
        .signals_from(c.peer_id(), |s| {
            s.iter().any(|s| kind(s) == "offer") && s.iter().any(|s| kind(s) == "candidate")
        })
        .await;
    assert!(signals.iter().all(|s| s["link"] == link), "{signals:#?}");
    assert_relay_only(&signals, "offer");
    assert_relay_only(&rec.sent("signal"), "offer");
}

/// A relay-only client that answers sends only relay candidates, in its answer and trickled,
/// whatever the offer held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_responder_signals_relay_candidates_only() {
    init_log();
    let server = server_with(embedded_turn((51100, 51199))).await;
    // Through a recorder: what c itself sends, before the server's own enforcement.
    let rec = Recorder::start(&server).await;
    let (c, _ce) = peermesh::Client::connect(&rec.url, config("c", DirectPolicy::Relay))
        .await
        .expect("connect through the recorder");
    c.join("g").await.unwrap();
    let mut raw = Raw::hello(&server, "raw").await;
    let joined = raw.join("g").await;
    let member = &joined["members"][0];
    assert_eq!(member["initiator"], json!(true));
    let link = member["link"].clone();
    let offer = json!({"gen": 1, "kind": "offer", "sdp": raw_offer_sdp(), "version": 2});
    raw.send(json!({"type": "signal", "to": c.peer_id(), "link": link, "data": offer}))
        .await;
    // A trickled host candidate too: a relay-only end ignores it.
    let host = json!({"gen": 1, "kind": "candidate", "sdpMid": "0", "sdpMLineIndex": 0,
        "candidate": "candidate:2 1 udp 2130706431 127.0.0.1 7 typ host"});
    raw.send(json!({"type": "signal", "to": c.peer_id(), "link": link, "data": host}))
        .await;
    let signals = raw
        .signals_from(c.peer_id(), |s| {
            s.iter().any(|s| kind(s) == "answer") && s.iter().any(|s| kind(s) == "candidate")
        })
        .await;
    assert_relay_only(&signals, "answer");
    assert_relay_only(&rec.sent("signal"), "answer");
}

/// A client with direct paths off (`none`) never signals, and nothing is signaled to it: its
/// `hello` says `none`, so the server makes every pair with it `none` (`MemberInfo.direct`, both
/// ends) and refuses an offer to it with `direct_not_allowed`. (That is also why its `decline`
/// of an offer cannot be seen through this server; peermesh.js's is checked in unit.mjs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_client_never_signals_and_gets_no_offer() {
    init_log();
    let server = server().await;
    let mut before = Raw::hello(&server, "before").await;
    before.join("g").await;
    let (c, _ce) = client_with(&server, config("c", DirectPolicy::None)).await;
    // c joins after `before`: c is the initiator of that link.
    c.join("g").await.unwrap();
    let joined = before
        .expect("member_joined", |m| m["type"] == "member_joined")
        .await;
    assert_eq!(joined["member"]["initiator"], json!(false));
    assert_eq!(joined["member"]["direct"], json!("none"));
    let mut after = Raw::hello(&server, "after").await;
    let joined = after.join("g").await;
    // `after` is the initiator of its link with c: it offers.
    let member = joined["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["peer"] == c.peer_id())
        .unwrap()
        .clone();
    assert_eq!(member["initiator"], json!(true));
    assert_eq!(member["direct"], json!("none"));
    let offer = json!({"gen": 1, "kind": "offer", "sdp": raw_offer_sdp(), "version": 2});
    after
        .send(json!({"type": "signal", "to": c.peer_id(), "link": member["link"], "data": offer}))
        .await;
    let seen = after.collect_until(Instant::now() + QUIET).await;
    assert!(
        seen.iter().any(|m| m["type"] == "error"
            && m["code"] == "direct_not_allowed"
            && m["request"] == "signal"
            && m["peer"] == c.peer_id()),
        "{seen:#?}"
    );
    let signaled = |frames: &[Value]| {
        frames
            .iter()
            .any(|m| m["type"] == "signal" && m["from"] == c.peer_id())
    };
    assert!(!signaled(&seen), "{seen:#?}");
    // As the initiator, c never offered either.
    let seen = before.collect_until(Instant::now()).await;
    assert!(!signaled(&seen), "{seen:#?}");
}

/// A raw responder that declines: the initiator reports it once, stays on the server path and
/// never offers again (for peers that say nothing of their policy in `hello`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_offer_is_reported_once_and_never_repeated() {
    init_log();
    let server = server().await;
    let mut raw = Raw::hello(&server, "raw").await;
    raw.join("g").await;
    let (c, mut ce) = client_with(&server, config("c", DirectPolicy::Any)).await;
    c.join("g").await.unwrap();
    let offer = raw
        .expect("an offer", |m| {
            m["type"] == "signal" && m["data"]["kind"] == "offer"
        })
        .await;
    let decline = json!({"gen": offer["data"]["gen"], "kind": "decline"});
    raw.send(json!({"type": "signal", "to": c.peer_id(), "link": offer["link"], "data": decline}))
        .await;
    match wait_for(&mut ce, 10, |e| matches!(e, Event::DirectFailed { .. })).await {
        Event::DirectFailed { peer, reason } => {
            assert_eq!(peer, raw.peer);
            assert!(reason.contains("does not take direct"), "{reason}");
        }
        _ => unreachable!(),
    }
    let seen = raw.collect_until(Instant::now() + QUIET).await;
    assert!(
        !seen
            .iter()
            .any(|m| m["type"] == "signal" && m["data"]["kind"] == "offer"),
        "offered again: {seen:#?}"
    );
    assert_eq!(c.path(raw.peer).unwrap(), Path::Server);
    let again = tokio::time::timeout(Duration::from_millis(100), async {
        while let Some(e) = ce.recv().await {
            if matches!(e, Event::DirectFailed { .. }) {
                return;
            }
        }
    })
    .await;
    assert!(again.is_err(), "reported twice");
}

/// One member configured `relay` makes the pair relay-only at both ends (the server tells the
/// other end in `MemberInfo.direct`): both end on a TURN-relayed direct path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_member_makes_the_pair_relay_relay() {
    init_log();
    let server = server_with(embedded_turn((51200, 51299))).await;
    let (a, mut ae) = client_with(&server, config("a", DirectPolicy::Relay)).await;
    let (b, mut be) = client_with(&server, config("b", DirectPolicy::Any)).await;
    a.join("g").await.unwrap();
    let members = b.join("g").await.unwrap();
    assert_eq!(members[0].direct, DirectPolicy::Relay);
    for (events, peer) in [(&mut ae, b.peer_id()), (&mut be, a.peer_id())] {
        match wait_for(
            events,
            5,
            |e| matches!(e, Event::MemberJoined { peer: p, .. } if *p == peer),
        )
        .await
        {
            Event::MemberJoined { direct, .. } => assert_eq!(direct, DirectPolicy::Relay),
            _ => unreachable!(),
        }
    }
    assert_eq!(a.members("g").unwrap()[0].direct, DirectPolicy::Relay);
    let relay = Path::Direct {
        local: CandidateType::Relay,
        remote: CandidateType::Relay,
    };
    assert_eq!(wait_direct(&mut ae, b.peer_id()).await, relay);
    assert_eq!(wait_direct(&mut be, a.peer_id()).await, relay);
}

/// Which way a recorded frame went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// A WebSocket relay on 127.0.0.1 between one client and the server that passes every frame on
/// unchanged and records the JSON ones.
struct Recorder {
    url: String,
    frames: Arc<Mutex<Vec<(Dir, Value)>>>,
}

impl Recorder {
    async fn start(server: &ServerHandle) -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let upstream = server.ws_url();
        let log = frames.clone();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let client = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let (server, _) = tokio_tungstenite::connect_async(upstream).await.unwrap();
            let (mut client_tx, mut client_rx) = client.split();
            let (mut server_tx, mut server_rx) = server.split();
            let record = |dir: Dir, m: &Message| {
                if let Message::Text(t) = m {
                    if let Ok(v) = serde_json::from_str(t.as_str()) {
                        log.lock().unwrap().push((dir, v));
                    }
                }
            };
            let up = async {
                while let Some(Ok(m)) = client_rx.next().await {
                    record(Dir::Up, &m);
                    if server_tx.send(m).await.is_err() {
                        break;
                    }
                }
                let _ = server_tx.close().await;
            };
            let down = async {
                while let Some(Ok(m)) = server_rx.next().await {
                    record(Dir::Down, &m);
                    if client_tx.send(m).await.is_err() {
                        break;
                    }
                }
                let _ = client_tx.close().await;
            };
            tokio::join!(up, down);
        });
        Recorder {
            url: format!("ws://{addr}/ws"),
            frames,
        }
    }

    fn frames(&self) -> Vec<(Dir, Value)> {
        self.frames.lock().unwrap().clone()
    }

    /// The frames of `kind` the client sent.
    fn sent(&self, kind: &str) -> Vec<Value> {
        self.frames()
            .into_iter()
            .filter(|(d, v)| *d == Dir::Up && v["type"] == kind)
            .map(|(_, v)| v)
            .collect()
    }

    /// Wait until a frame going `dir` matches `pred`; returns it.
    async fn wait(&self, what: &str, dir: Dir, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((_, v)) = self
                .frames()
                .into_iter()
                .find(|(d, v)| *d == dir && pred(v))
            {
                return v;
            }
            assert!(Instant::now() < deadline, "no {what}: {:#?}", self.frames());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The client acknowledges every membership change the server numbers, once its events are
/// queued, with the group and number of that change; `hello` carries its own policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_are_acknowledged() {
    init_log();
    let server = server().await;
    let rec = Recorder::start(&server).await;
    let mut r1 = Raw::hello(&server, "r1").await;
    r1.join("g").await;
    let (c, mut ce) = peermesh::Client::connect(&rec.url, config("c", DirectPolicy::None))
        .await
        .expect("connect through the recorder");
    let hello = rec.frames()[0].1.clone();
    assert_eq!(
        (hello["type"].clone(), hello["direct"].clone()),
        (json!("hello"), json!("none"))
    );
    c.join("g").await.unwrap(); // joined
    let mut r2 = Raw::hello(&server, "r2").await;
    r2.join("g").await; // member_joined
    wait_joined(&mut ce, r2.peer).await;
    r1.send(json!({"type": "leave", "group": "g"})).await; // member_left
    drop(r2); // member_left when the server sees the close
    for _ in 0..2 {
        wait_for(&mut ce, 10, |e| matches!(e, Event::MemberLeft { .. })).await;
    }
    c.leave("g").await.unwrap(); // left
    let changes = ["joined", "member_joined", "member_left", "left"];
    let numbered = |frames: &[(Dir, Value)]| -> Vec<(usize, Value)> {
        frames
            .iter()
            .enumerate()
            .filter(|(_, (d, v))| {
                *d == Dir::Down
                    && changes.contains(&v["type"].as_str().unwrap_or_default())
                    && v["change"].is_u64()
            })
            .map(|(i, (_, v))| (i, v.clone()))
            .collect()
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let frames = rec.frames();
        let expected = numbered(&frames);
        let acks: Vec<(usize, &Value)> = frames
            .iter()
            .enumerate()
            .filter(|(_, (d, v))| *d == Dir::Up && v["type"] == "ack")
            .map(|(i, (_, v))| (i, v))
            .collect();
        let missing: Vec<&Value> = expected
            .iter()
            .filter(|(at, v)| {
                !acks
                    .iter()
                    .any(|(i, a)| i > at && a["group"] == v["group"] && a["change"] == v["change"])
            })
            .map(|(_, v)| v)
            .collect();
        if expected.len() >= 5 && missing.is_empty() {
            // Each ack answers one numbered frame: nothing else is acknowledged.
            assert_eq!(acks.len(), expected.len(), "{frames:#?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} numbered membership frames (want 5: joined, member_joined, 2 member_left, left), \
             not acknowledged: {missing:#?}\n{frames:#?}",
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.close().await;
}

/// Each path change of a link goes to the server as a `path` frame for that link, with the
/// candidate types of a direct path; the server answers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_changes_are_reported_to_the_server() {
    init_log();
    let server = server().await;
    let rec = Recorder::start(&server).await;
    let (a, mut ae) = peermesh::Client::connect(&rec.url, config("a", DirectPolicy::Any))
        .await
        .expect("connect through the recorder");
    let hello = rec.frames()[0].1.clone();
    assert_eq!(hello["type"], "hello");
    assert!(hello.get("direct").is_none(), "any is not sent: {hello}");
    let (b, _be) = client(&server, "b").await;
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    let ib = b.peer_id();
    let member = rec
        .wait("member_joined", Dir::Down, |v| v["type"] == "member_joined")
        .await;
    let link = member["member"]["link"].clone();
    let Path::Direct { local, remote } = wait_direct(&mut ae, ib).await else {
        unreachable!()
    };
    let report = rec
        .wait("a path report", Dir::Up, |v| v["type"] == "path")
        .await;
    assert_eq!(
        report,
        json!({"type": "path", "peer": ib, "link": link, "path": "direct",
            "local": local.as_str(), "remote": remote.as_str()})
    );
    // Nothing comes back for it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let errors: Vec<Value> = rec
        .frames()
        .into_iter()
        .filter(|(d, v)| *d == Dir::Down && v["type"] == "error")
        .map(|(_, v)| v)
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    a.close().await;
    b.close().await;
}

/// Groups the app's backend makes with a policy: in a `relay` group two clients with the
/// default policy end on a TURN-relayed direct path, and the backend sees both acknowledge every
/// membership change and report the path; in a `none` group they never leave the server path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_groups_impose_their_policy() {
    use peermesh_server::admin::{GroupOptions, ServerEvent};
    init_log();
    let server = server_with(embedded_turn((51300, 51399))).await;
    let admin = server.admin();
    let mut backend = admin.events();
    for (group, direct) in [("r", DirectPolicy::Relay), ("n", DirectPolicy::None)] {
        let options = GroupOptions {
            direct,
            ..Default::default()
        };
        admin.create_group(group, options).unwrap();
    }
    let (a, mut ae) = client_with(&server, config("a", DirectPolicy::Any)).await;
    let (b, mut be) = client_with(&server, config("b", DirectPolicy::Any)).await;
    a.join("r").await.unwrap();
    assert_eq!(b.join("r").await.unwrap()[0].direct, DirectPolicy::Relay);
    let relay = Path::Direct {
        local: CandidateType::Relay,
        remote: CandidateType::Relay,
    };
    assert_eq!(wait_direct(&mut ae, b.peer_id()).await, relay);
    assert_eq!(wait_direct(&mut be, a.peer_id()).await, relay);
    // Both joins acknowledged by every member told of them, both paths reported.
    let (mut acked, mut reported) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + WAIT;
    while acked.len() < 2 || reported.len() < 2 {
        match timeout_at(deadline, backend.recv()).await {
            Ok(Ok(ServerEvent::ChangeAcked { group, change })) if group == "r" => {
                acked.push(change)
            }
            Ok(Ok(ServerEvent::ChangeAckTimedOut { group, change, .. })) => {
                panic!("change {change} of {group} not acknowledged")
            }
            Ok(Ok(ServerEvent::Path {
                peer,
                path,
                local,
                remote,
                ..
            })) => reported.push((peer, path, local, remote)),
            Ok(Ok(_)) => {}
            other => panic!("backend events: {other:?}; acked {acked:?}, paths {reported:?}"),
        }
    }
    acked.sort();
    assert_eq!(acked, vec![1, 2]);
    reported.sort_by_key(|r| r.0);
    use peermesh::protocol::{PathKind, WireCandidateType};
    let direct_relay = (
        PathKind::Direct,
        Some(WireCandidateType::Relay),
        Some(WireCandidateType::Relay),
    );
    assert_eq!(
        reported,
        vec![
            (a.peer_id(), direct_relay.0, direct_relay.1, direct_relay.2),
            (b.peer_id(), direct_relay.0, direct_relay.1, direct_relay.2),
        ]
    );

    // A `none` group: two other clients stay on the server path, and nothing is even tried.
    let (c, mut ce) = client_with(&server, config("c", DirectPolicy::Any)).await;
    let (d, _de) = client_with(&server, config("d", DirectPolicy::Any)).await;
    c.join("n").await.unwrap();
    assert_eq!(d.join("n").await.unwrap()[0].direct, DirectPolicy::None);
    let tried = tokio::time::timeout(QUIET, async {
        while let Some(e) = ce.recv().await {
            if matches!(e, Event::PathChanged { .. } | Event::DirectFailed { .. }) {
                return e;
            }
        }
        std::future::pending().await
    })
    .await;
    assert!(tried.is_err(), "{tried:?}");
    assert_eq!(c.path(d.peer_id()).unwrap(), Path::Server);
}
