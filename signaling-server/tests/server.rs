//! End-to-end tests of the signaling server over real WebSockets on 127.0.0.1.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use peermesh::protocol::{
    close_code, ErrorCode, Limits, MemberInfo, PeerId, RelayFrame, ServerMsg, PROTOCOL_VERSION,
};
use peermesh_server::{Config, Rate, Server, ServerHandle, ServerLimits};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const RECV_TIMEOUT: Duration = Duration::from_secs(5);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    }
}

async fn start(config: Config) -> ServerHandle {
    Server::bind(config).await.expect("bind").spawn()
}

/// What the server sent, as seen by a raw client.
#[derive(Debug)]
enum Incoming {
    Msg(ServerMsg),
    Binary(Vec<u8>),
    Close(Option<u16>),
    /// The stream ended or failed without a close frame.
    End,
}

/// A raw WebSocket client speaking the protocol by hand.
struct Client {
    ws: Ws,
    peer: PeerId,
}

impl Client {
    async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        Client { ws, peer: 0 }
    }

    /// Connect and say hello; returns the client with its peer id set.
    async fn hello(url: &str, name: &str) -> Client {
        let mut c = Client::connect(url).await;
        c.send_json(json!({"type": "hello", "version": PROTOCOL_VERSION, "name": name}))
            .await;
        match c.recv().await {
            ServerMsg::Welcome { peer, .. } => c.peer = peer,
            other => panic!("expected welcome, got {other:?}"),
        }
        c
    }

    async fn send_json(&mut self, v: Value) {
        self.send_text(v.to_string()).await;
    }

    async fn send_text(&mut self, s: String) {
        self.ws.send(Message::text(s)).await.expect("send text");
    }

    async fn send_binary(&mut self, b: Vec<u8>) {
        self.ws.send(Message::binary(b)).await.expect("send binary");
    }

    /// Next frame of any kind (5 s timeout), skipping WebSocket pings/pongs.
    async fn recv_any(&mut self) -> Incoming {
        let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            return match next {
                None | Some(Err(_)) => Incoming::End,
                Some(Ok(Message::Text(t))) => Incoming::Msg(
                    serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("bad server frame {t}: {e}")),
                ),
                Some(Ok(Message::Binary(b))) => Incoming::Binary(b.to_vec()),
                Some(Ok(Message::Close(f))) => Incoming::Close(f.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
            };
        }
    }

    /// Next JSON frame, skipping `pong`s.
    async fn recv(&mut self) -> ServerMsg {
        loop {
            match self.recv_any().await {
                Incoming::Msg(ServerMsg::Pong { .. }) => continue,
                Incoming::Msg(m) => return m,
                other => panic!("expected a JSON frame, got {other:?}"),
            }
        }
    }

    async fn recv_binary(&mut self) -> Vec<u8> {
        match self.recv_any().await {
            Incoming::Binary(b) => b,
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }

    /// Expect an `error` frame with `code`; returns `(request, group, peer)`.
    async fn expect_error(
        &mut self,
        code: ErrorCode,
    ) -> (Option<String>, Option<String>, Option<PeerId>) {
        match self.recv().await {
            ServerMsg::Error {
                code: got,
                request,
                group,
                peer,
                message,
            } => {
                assert_eq!(got, code, "unexpected error code ({message})");
                (request, group, peer)
            }
            other => panic!("expected error {code}, got {other:?}"),
        }
    }

    async fn join(&mut self, group: &str) -> Vec<MemberInfo> {
        self.send_json(json!({"type": "join", "group": group}))
            .await;
        match self.recv().await {
            ServerMsg::Joined {
                group: g, members, ..
            } if g == group => members,
            other => panic!("expected joined {group}, got {other:?}"),
        }
    }

    async fn expect_member_joined(&mut self, group: &str) -> MemberInfo {
        match self.recv().await {
            ServerMsg::MemberJoined {
                group: g, member, ..
            } if g == group => member,
            other => panic!("expected member_joined {group}, got {other:?}"),
        }
    }

    async fn expect_member_left(&mut self, group: &str, peer: PeerId) {
        match self.recv().await {
            ServerMsg::MemberLeft {
                group: g, peer: p, ..
            } if g == group && p == peer => {}
            other => panic!("expected member_left {group} {peer}, got {other:?}"),
        }
    }

    /// Round-trip a `ping` to prove the session is alive and everything before it was handled.
    async fn ping(&mut self, id: u64) {
        self.send_json(json!({"type": "ping", "id": id})).await;
        match self.recv_any().await {
            Incoming::Msg(ServerMsg::Pong { id: got }) if got == id => {}
            other => panic!("expected pong {id}, got {other:?}"),
        }
    }

    /// Expect the server to close the socket, returning the close code if a close frame came.
    async fn expect_closed(&mut self) -> Option<u16> {
        loop {
            match self.recv_any().await {
                Incoming::Close(code) => return code,
                Incoming::End => return None,
                // (A stopping server drains first; this client does not take part.)
                Incoming::Msg(ServerMsg::Pong { .. } | ServerMsg::Drain { .. }) => continue,
                other => panic!("expected the socket to close, got {other:?}"),
            }
        }
    }
}

/// Join `a` then `b` to `group`; returns (link id, member info seen by a, seen by b).
async fn pair_up(a: &mut Client, b: &mut Client, group: &str) -> (u32, MemberInfo, MemberInfo) {
    a.join(group).await;
    let members = b.join(group).await;
    let b_sees = members
        .into_iter()
        .find(|m| m.peer == a.peer)
        .expect("a in joined members");
    let a_sees = a.expect_member_joined(group).await;
    assert_eq!(a_sees.peer, b.peer);
    assert_eq!(a_sees.link, b_sees.link);
    (a_sees.link, a_sees, b_sees)
}

fn relay(peer: PeerId, link: u32, payload: &[u8]) -> Vec<u8> {
    RelayFrame {
        peer,
        link,
        payload,
    }
    .encode()
}

#[tokio::test]
async fn hello_welcome_and_hello_errors() {
    let mut config = test_config();
    config.ice_servers = vec![peermesh::protocol::IceServer {
        urls: vec!["stun:127.0.0.1:3478".into()],
        ..Default::default()
    }];
    let server = start(config).await;
    let url = server.ws_url();
    assert_eq!(url, format!("ws://{}/ws", server.local_addr()));

    let mut a = Client::connect(&url).await;
    a.send_json(json!({"type": "hello", "version": 1, "name": "alice"}))
        .await;
    let (peer_a, limits) = match a.recv().await {
        ServerMsg::Welcome {
            version,
            peer,
            ice_servers,
            heartbeat_interval_ms,
            heartbeat_timeout_ms,
            limits,
            resume_token,
            resume_grace_ms,
            resumed,
            groups,
        } => {
            // Not resumable unless the hello says so.
            assert_eq!(
                (resume_token, resume_grace_ms, resumed, groups),
                (None, None, false, None)
            );
            assert_eq!(version, PROTOCOL_VERSION);
            assert_eq!(version, 1);
            assert_ne!(peer, 0);
            assert_eq!(ice_servers.len(), 1);
            assert_eq!(ice_servers[0].urls, vec!["stun:127.0.0.1:3478".to_string()]);
            assert_eq!(heartbeat_interval_ms, 5_000);
            assert_eq!(heartbeat_timeout_ms, 15_000);
            (peer, limits)
        }
        other => panic!("expected welcome, got {other:?}"),
    };
    assert_eq!(
        limits,
        Limits {
            max_frame_bytes: 65536 + 64,
            max_groups_per_client: 32,
            max_members_per_group: 64
        }
    );
    let b = Client::hello(&url, "bob").await;
    assert_ne!(b.peer, peer_a);
    assert_ne!(b.peer, 0);

    // A second hello is a bad frame; the session stays up.
    a.send_json(json!({"type": "hello", "version": 1, "name": "alice"}))
        .await;
    let (request, _, _) = a.expect_error(ErrorCode::BadFrame).await;
    assert_eq!(request.as_deref(), Some("hello"));
    a.ping(1).await;

    // Frames before hello.
    let mut c = Client::connect(&url).await;
    c.send_json(json!({"type": "join", "group": "g"})).await;
    let (request, _, _) = c.expect_error(ErrorCode::HelloRequired).await;
    assert_eq!(request.as_deref(), Some("join"));
    c.send_json(json!({"type": "ping", "id": 5})).await;
    c.expect_error(ErrorCode::HelloRequired).await;
    c.send_binary(relay(peer_a, 1, b"x")).await;
    let (request, _, _) = c.expect_error(ErrorCode::HelloRequired).await;
    assert_eq!(request.as_deref(), Some("relay"));

    // The fourth frame before hello (the default budget) may still be the hello.
    c.send_json(json!({"type": "hello", "version": 1, "name": "carol"}))
        .await;
    match c.recv().await {
        ServerMsg::Welcome { peer, .. } => {
            assert_ne!(peer, peer_a);
            assert_ne!(peer, b.peer);
        }
        other => panic!("expected welcome, got {other:?}"),
    }

    // Invalid names keep the session up; a valid retry works.
    let mut e = Client::connect(&url).await;
    e.send_json(json!({"type": "hello", "version": 1, "name": ""}))
        .await;
    let (request, _, _) = e.expect_error(ErrorCode::InvalidName).await;
    assert_eq!(request.as_deref(), Some("hello"));
    e.send_json(json!({"type": "hello", "version": 1, "name": "bad\u{7}name"}))
        .await;
    e.expect_error(ErrorCode::InvalidName).await;
    e.send_json(json!({"type": "hello", "version": 1, "name": "x".repeat(65)}))
        .await;
    e.expect_error(ErrorCode::InvalidName).await;
    e.send_json(json!({"type": "hello", "version": 1, "name": "erin"}))
        .await;
    assert!(matches!(e.recv().await, ServerMsg::Welcome { .. }));

    // Names that could pass for another: bidi override, zero-width space, BOM.
    let mut f = Client::connect(&url).await;
    for name in ["eci\u{202E}la", "al\u{200B}ice", "\u{FEFF}bob"] {
        f.send_json(json!({"type": "hello", "version": 1, "name": name}))
            .await;
        f.expect_error(ErrorCode::InvalidName).await;
    }
    f.send_json(json!({"type": "hello", "version": 1, "name": "Zoë 🎮 李"}))
        .await;
    assert!(matches!(f.recv().await, ServerMsg::Welcome { .. }));

    // Wrong version: error, then close with 1002.
    let mut d = Client::connect(&url).await;
    d.send_json(json!({"type": "hello", "version": 2, "name": "dave"}))
        .await;
    let (request, _, _) = d.expect_error(ErrorCode::UnsupportedVersion).await;
    assert_eq!(request.as_deref(), Some("hello"));
    assert_eq!(d.expect_closed().await, Some(1002));

    server.shutdown().await;
}

#[tokio::test]
async fn join_links_and_leave() {
    let server = start(test_config()).await;
    let url = server.ws_url();
    let mut a = Client::hello(&url, "alice").await;
    let mut b = Client::hello(&url, "bob").await;
    let mut c = Client::hello(&url, "carol").await;

    // First member sees nobody.
    assert!(a.join("room").await.is_empty());

    // b joins: b is the initiator of the new a-b link.
    let members = b.join("room").await;
    assert_eq!(members.len(), 1);
    let b_sees_a = &members[0];
    assert_eq!(b_sees_a.peer, a.peer);
    assert_eq!(b_sees_a.name, "alice");
    assert!(b_sees_a.initiator, "the joiner initiates new links");
    let a_sees_b = a.expect_member_joined("room").await;
    assert_eq!(a_sees_b.peer, b.peer);
    assert_eq!(a_sees_b.name, "bob");
    assert!(!a_sees_b.initiator);
    assert_eq!(a_sees_b.link, b_sees_a.link);
    let link_ab = a_sees_b.link;
    assert_ne!(link_ab, 0);

    // c joins: two new links, both initiated by c.
    let members = c.join("room").await;
    assert_eq!(
        members.iter().map(|m| m.peer).collect::<Vec<_>>(),
        vec![a.peer, b.peer]
    );
    assert!(members.iter().all(|m| m.initiator));
    let a_sees_c = a.expect_member_joined("room").await;
    let b_sees_c = b.expect_member_joined("room").await;
    assert_eq!(a_sees_c.peer, c.peer);
    assert_eq!(b_sees_c.peer, c.peer);
    assert_eq!(a_sees_c.name, "carol");
    assert!(!a_sees_c.initiator && !b_sees_c.initiator);
    assert_eq!(a_sees_c.link, members[0].link);
    assert_eq!(b_sees_c.link, members[1].link);
    let links = [link_ab, a_sees_c.link, b_sees_c.link];
    assert!(links[0] != links[1] && links[1] != links[2] && links[0] != links[2]);

    // A second group shared by a and b: same link, same initiator (b), seen from a's side now.
    assert!(b.join("side").await.is_empty());
    let members = a.join("side").await;
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].peer, b.peer);
    assert_eq!(members[0].link, link_ab);
    assert!(
        !members[0].initiator,
        "a joined second but b stays initiator"
    );
    let b_sees_a2 = b.expect_member_joined("side").await;
    assert_eq!(b_sees_a2.link, link_ab);
    assert!(b_sees_a2.initiator);

    // Leaving one of two shared groups keeps the link.
    a.send_json(json!({"type": "leave", "group": "side"})).await;
    match a.recv().await {
        ServerMsg::Left { group, .. } => assert_eq!(group, "side"),
        other => panic!("expected left, got {other:?}"),
    }
    b.expect_member_left("side", a.peer).await;
    let sig = json!({"type": "signal", "to": b.peer, "link": link_ab, "data": 1});
    a.send_json(sig).await;
    match b.recv().await {
        ServerMsg::Signal { from, link, .. } => {
            assert_eq!(from, a.peer);
            assert_eq!(link, link_ab);
        }
        other => panic!("expected signal, got {other:?}"),
    }

    // Leaving the last shared group removes the link; re-sharing gets a new id.
    a.send_json(json!({"type": "leave", "group": "room"})).await;
    match a.recv().await {
        ServerMsg::Left { group, .. } => assert_eq!(group, "room"),
        other => panic!("expected left, got {other:?}"),
    }
    b.expect_member_left("room", a.peer).await;
    c.expect_member_left("room", a.peer).await;
    let members = a.join("room").await;
    assert_eq!(members.len(), 2);
    for m in &members {
        assert!(m.initiator);
        assert!(!links.contains(&m.link), "re-shared pair got a new link id");
    }
    let b_sees = b.expect_member_joined("room").await;
    let c_sees = c.expect_member_joined("room").await;
    assert_eq!(b_sees.link, members[0].link);
    assert_eq!(c_sees.link, members[1].link);
    assert!(!b_sees.initiator && !c_sees.initiator);

    // The old link id is now stale.
    a.send_json(json!({"type": "signal", "to": b.peer, "link": link_ab, "data": {}}))
        .await;
    let (request, _, peer) = a.expect_error(ErrorCode::StaleLink).await;
    assert_eq!(request.as_deref(), Some("signal"));
    assert_eq!(peer, Some(b.peer));

    server.shutdown().await;
}

#[tokio::test]
async fn signal_and_relay_forwarding() {
    let server = start(test_config()).await;
    let url = server.ws_url();
    let mut a = Client::hello(&url, "alice").await;
    let mut b = Client::hello(&url, "bob").await;
    let (link, _, _) = pair_up(&mut a, &mut b, "g").await;

    let data = json!({"sdp": {"type": "offer", "sdp": "v=0\r\n"}, "n": [1, 2.5, null, true]});
    b.send_json(json!({"type": "signal", "to": a.peer, "link": link, "data": data}))
        .await;
    match a.recv().await {
        ServerMsg::Signal {
            from,
            link: l,
            data: got,
        } => {
            assert_eq!(from, b.peer);
            assert_eq!(l, link);
            assert_eq!(got, data);
        }
        other => panic!("expected signal, got {other:?}"),
    }

    // Relay: byte-exact, with the peer field rewritten to the sender.
    let payload: Vec<u8> = (0..=255u8).cycle().take(60_000).collect();
    a.send_binary(relay(b.peer, link, &payload)).await;
    let got = b.recv_binary().await;
    assert_eq!(got, relay(a.peer, link, &payload));
    let decoded = RelayFrame::decode(&got).unwrap();
    assert_eq!(decoded.peer, a.peer);
    assert_eq!(decoded.link, link);
    assert_eq!(decoded.payload, &payload[..]);

    // An empty payload is fine too.
    b.send_binary(relay(a.peer, link, b"")).await;
    assert_eq!(a.recv_binary().await, relay(b.peer, link, b""));

    // Ordering per sender→receiver is kept.
    for i in 0..500u32 {
        a.send_binary(relay(b.peer, link, &i.to_be_bytes())).await;
    }
    for i in 0..500u32 {
        let got = b.recv_binary().await;
        assert_eq!(RelayFrame::decode(&got).unwrap().payload, &i.to_be_bytes());
    }

    server.shutdown().await;
}

#[tokio::test]
async fn isolation_and_stale_link() {
    let server = start(test_config()).await;
    let url = server.ws_url();
    let mut a = Client::hello(&url, "alice").await;
    let mut b = Client::hello(&url, "bob").await;
    let mut c = Client::hello(&url, "carol").await;
    let (link, _, _) = pair_up(&mut a, &mut b, "ab").await;
    assert!(c.join("other").await.is_empty());

    // c shares no group with a: refused, whatever link id it guesses.
    c.send_json(json!({"type": "signal", "to": a.peer, "link": link, "data": "hi"}))
        .await;
    let (request, _, peer) = c.expect_error(ErrorCode::NotCoMember).await;
    assert_eq!(request.as_deref(), Some("signal"));
    assert_eq!(peer, Some(a.peer));
    c.send_binary(relay(a.peer, link, b"sneaky")).await;
    let (request, _, peer) = c.expect_error(ErrorCode::NotCoMember).await;
    assert_eq!(request.as_deref(), Some("relay"));
    assert_eq!(peer, Some(a.peer));
    // Unknown peers and oneself look the same as non-co-members.
    c.send_json(json!({"type": "signal", "to": 999_999, "link": 1, "data": null}))
        .await;
    let (_, _, peer) = c.expect_error(ErrorCode::NotCoMember).await;
    assert_eq!(peer, Some(999_999));
    c.send_binary(relay(c.peer, 1, b"me")).await;
    c.expect_error(ErrorCode::NotCoMember).await;
    c.ping(7).await;

    // Stale link ids.
    a.send_json(json!({"type": "signal", "to": b.peer, "link": link + 100, "data": 1}))
        .await;
    let (request, _, peer) = a.expect_error(ErrorCode::StaleLink).await;
    assert_eq!(request.as_deref(), Some("signal"));
    assert_eq!(peer, Some(b.peer));
    a.send_binary(relay(b.peer, link + 100, b"old")).await;
    let (request, _, peer) = a.expect_error(ErrorCode::StaleLink).await;
    assert_eq!(request.as_deref(), Some("relay"));
    assert_eq!(peer, Some(b.peer));

    // Nothing leaked to a or b; the pair still works.
    a.send_binary(relay(b.peer, link, b"ok")).await;
    assert_eq!(b.recv_binary().await, relay(a.peer, link, b"ok"));
    a.ping(8).await;

    server.shutdown().await;
}

#[tokio::test]
async fn bad_input_errors() {
    let mut config = test_config();
    config.limits.max_groups_per_client = 2;
    config.limits.max_members_per_group = 2;
    let server = start(config).await;
    let url = server.ws_url();
    let mut x = Client::hello(&url, "mallory").await;

    x.send_text("{not json".into()).await;
    let (request, _, _) = x.expect_error(ErrorCode::BadFrame).await;
    assert_eq!(request, None);
    x.send_text("[1,2,3]".into()).await;
    x.expect_error(ErrorCode::BadFrame).await;
    x.send_json(json!({"type": "nope"})).await;
    let (request, _, _) = x.expect_error(ErrorCode::UnknownType).await;
    assert_eq!(request.as_deref(), Some("nope"));
    x.send_json(json!({"type": "join"})).await;
    let (request, _, _) = x.expect_error(ErrorCode::BadFrame).await;
    assert_eq!(request.as_deref(), Some("join"));
    x.send_json(json!({"type": "join", "group": 5})).await;
    x.expect_error(ErrorCode::BadFrame).await;
    x.send_json(json!({"type": "signal", "to": -1, "link": 1, "data": 0}))
        .await;
    x.expect_error(ErrorCode::BadFrame).await;
    x.send_json(json!({"type": 17})).await;
    x.expect_error(ErrorCode::BadFrame).await;
    // Deeply nested JSON must not crash anything.
    x.send_text("[".repeat(60_000)).await;
    x.expect_error(ErrorCode::BadFrame).await;

    // Binary frames.
    x.send_binary(vec![1, 2, 3]).await;
    let (request, _, _) = x.expect_error(ErrorCode::BadFrame).await;
    assert_eq!(request.as_deref(), Some("relay"));
    x.send_binary(vec![0x7f; 20]).await;
    x.expect_error(ErrorCode::BadFrame).await;
    x.send_binary(Vec::new()).await;
    x.expect_error(ErrorCode::BadFrame).await;

    // Over max_frame_bytes but under the hard cap: error, session stays up.
    let big = json!({"type": "signal", "to": 1, "link": 1, "data": "x".repeat(100 * 1024)});
    x.send_json(big).await;
    x.expect_error(ErrorCode::FrameTooLarge).await;
    x.send_binary(relay(1, 1, &vec![0u8; 100 * 1024])).await;
    let (request, _, _) = x.expect_error(ErrorCode::FrameTooLarge).await;
    assert_eq!(request.as_deref(), Some("relay"));
    x.ping(1).await;

    // Group errors.
    for bad in ["", "has space", "ünïcode", "a/b", &"g".repeat(65)] {
        x.send_json(json!({"type": "join", "group": bad})).await;
        let (request, group, _) = x.expect_error(ErrorCode::InvalidGroup).await;
        assert_eq!(request.as_deref(), Some("join"));
        assert_eq!(group.as_deref(), Some(bad));
    }
    assert!(x.join("one").await.is_empty());
    x.send_json(json!({"type": "join", "group": "one"})).await;
    let (_, group, _) = x.expect_error(ErrorCode::AlreadyMember).await;
    assert_eq!(group.as_deref(), Some("one"));
    x.send_json(json!({"type": "leave", "group": "unknown"}))
        .await;
    let (request, group, _) = x.expect_error(ErrorCode::NotMember).await;
    assert_eq!(request.as_deref(), Some("leave"));
    assert_eq!(group.as_deref(), Some("unknown"));
    assert!(x.join("two").await.is_empty());
    x.send_json(json!({"type": "join", "group": "three"})).await;
    let (_, group, _) = x.expect_error(ErrorCode::TooManyGroups).await;
    assert_eq!(group.as_deref(), Some("three"));

    // group_full with max_members_per_group = 2.
    let mut y = Client::hello(&url, "y").await;
    let mut z = Client::hello(&url, "z").await;
    assert_eq!(y.join("one").await.len(), 1);
    x.expect_member_joined("one").await;
    z.send_json(json!({"type": "join", "group": "one"})).await;
    let (request, group, _) = z.expect_error(ErrorCode::GroupFull).await;
    assert_eq!(request.as_deref(), Some("join"));
    assert_eq!(group.as_deref(), Some("one"));
    z.ping(2).await;
    x.ping(3).await;

    // A well-behaved pair is unaffected by all of the above.
    let mut a = Client::hello(&url, "alice").await;
    let mut b = Client::hello(&url, "bob").await;
    let (link, _, _) = pair_up(&mut a, &mut b, "fine").await;
    a.send_binary(relay(b.peer, link, b"still fine")).await;
    assert_eq!(b.recv_binary().await, relay(a.peer, link, b"still fine"));
    b.send_json(json!({"type": "signal", "to": a.peer, "link": link, "data": "hi"}))
        .await;
    assert!(matches!(a.recv().await, ServerMsg::Signal { from, .. } if from == b.peer));

    server.shutdown().await;
}

#[tokio::test]
async fn frame_above_hard_cap_closes_with_1009() {
    let server = start(test_config()).await;
    let url = server.ws_url();
    let mut a = Client::hello(&url, "alice").await;
    let mut b = Client::hello(&url, "bob").await;
    let (_link, _, _) = pair_up(&mut a, &mut b, "g").await;

    // Write the oversized frame from a separate task while reading the close frame.
    let (mut sink, mut stream) = a.ws.split();
    let writer = tokio::spawn(async move {
        let _ = sink
            .send(Message::binary(vec![
                0u8;
                peermesh_server::HARD_FRAME_CAP + 1024
            ]))
            .await;
        sink
    });
    let code = tokio::time::timeout(RECV_TIMEOUT, async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| f.code),
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return None,
            }
        }
    })
    .await
    .expect("server closes the socket");
    assert_eq!(code, Some(CloseCode::Size));
    let _ = writer.await;

    // The co-member is told and keeps working.
    b.expect_member_left("g", a.peer).await;
    b.ping(1).await;

    server.shutdown().await;
}

#[tokio::test]
async fn member_left_after_clean_close() {
    let server = start(test_config()).await;
    let url = server.ws_url();
    let mut a = Client::hello(&url, "alice").await;
    let mut b = Client::hello(&url, "bob").await;
    pair_up(&mut a, &mut b, "g1").await;
    pair_up(&mut a, &mut b, "g2").await;

    let start = Instant::now();
    a.ws.close(None).await.expect("close");
    let mut left = Vec::new();
    for _ in 0..2 {
        match b.recv().await {
            ServerMsg::MemberLeft { group, peer, .. } => {
                assert_eq!(peer, a.peer);
                left.push(group);
            }
            other => panic!("expected member_left, got {other:?}"),
        }
    }
    left.sort();
    assert_eq!(left, ["g1", "g2"]);
    assert!(start.elapsed() < Duration::from_secs(2));

    // TCP EOF without a close frame is just as quick.
    let mut c = Client::hello(&url, "carol").await;
    assert_eq!(c.join("g1").await.len(), 1);
    b.expect_member_joined("g1").await;
    let c_peer = c.peer;
    let start = Instant::now();
    drop(c);
    b.expect_member_left("g1", c_peer).await;
    assert!(start.elapsed() < Duration::from_secs(2));

    server.shutdown().await;
}

#[tokio::test]
async fn heartbeat_timeout_drops_silent_client() {
    let mut config = test_config();
    config.heartbeat_timeout = Duration::from_secs(1);
    config.heartbeat_interval = Duration::from_millis(300);
    let server = start(config).await;
    let url = server.ws_url();
    let mut a = Client::hello(&url, "alice").await;
    let mut silent = Client::hello(&url, "silent").await;
    assert!(silent.join("g").await.is_empty());
    let start = Instant::now();
    assert_eq!(a.join("g").await.len(), 1);

    // a keeps pinging (so it stays alive); `silent` neither reads nor writes but stays open.
    let deadline = start + Duration::from_secs(3);
    loop {
        assert!(
            Instant::now() < deadline,
            "silent client not dropped in 3 s"
        );
        a.send_json(json!({"type": "ping", "id": 1})).await;
        let next = tokio::time::timeout(Duration::from_millis(300), a.recv()).await;
        match next {
            Ok(ServerMsg::MemberLeft { group, peer, .. }) => {
                assert_eq!(group, "g");
                assert_eq!(peer, silent.peer);
                break;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => continue,
        }
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "dropped too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "dropped too late: {elapsed:?}"
    );
    // a is still fine after all that pinging.
    a.ping(99).await;
    drop(silent);

    server.shutdown().await;
}

#[tokio::test]
async fn slow_receiver_is_dropped() {
    let mut config = test_config();
    config.heartbeat_timeout = Duration::from_secs(120);
    let server = start(config).await;
    let url = server.ws_url();
    let mut a = Client::hello(&url, "fast").await;
    let mut b = Client::hello(&url, "slow").await;
    let (link, _, _) = pair_up(&mut a, &mut b, "g").await;

    // a floods b, which never reads. Once b's TCP buffers and relay budget are full, a's
    // frames are not read either (back-pressure), and after 10 s b is dropped as too slow.
    let b_peer = b.peer;
    let payload = vec![7u8; 60_000];
    let (mut sink, mut stream) = a.ws.split();
    let flood = tokio::spawn(async move {
        let frame = relay(b_peer, link, &payload);
        for _ in 0..2_000 {
            if sink.send(Message::binary(frame.clone())).await.is_err() {
                break;
            }
        }
        sink
    });
    let started = Instant::now();
    let left = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Text(t))) => {
                    let msg: ServerMsg = serde_json::from_str(t.as_str()).unwrap();
                    match msg {
                        ServerMsg::MemberLeft { group, peer, .. } => return (group, peer),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                Some(Ok(_)) => continue,
                other => panic!("stream ended: {other:?}"),
            }
        }
    })
    .await
    .expect("slow receiver dropped");
    assert_eq!(left, ("g".to_string(), b_peer));
    assert!(started.elapsed() >= Duration::from_secs(10));

    // The sender's session is intact: the rest of its flood is answered with not_co_member
    // errors (b is gone; past 1000 answers, one rate_limited notice a second stands for the
    // rest), then a ping round-trips.
    let sink = flood.await.unwrap();
    let mut a = Client {
        ws: sink.reunite(stream).unwrap(),
        peer: a.peer,
    };
    a.send_json(json!({"type": "ping", "id": 42})).await;
    loop {
        match a.recv_any().await {
            Incoming::Msg(ServerMsg::Pong { id: 42 }) => break,
            Incoming::Msg(ServerMsg::Error { code, .. }) => assert!(
                matches!(code, ErrorCode::NotCoMember | ErrorCode::RateLimited),
                "{code}"
            ),
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(b);

    server.shutdown().await;
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test]
async fn binary_serves_and_stops_on_sigterm() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_peermesh-server"))
        .args([
            "--listen",
            &addr,
            "--ice-server",
            "stun:127.0.0.1:3478",
            "--turn-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn server binary");
    // Killed and reaped however the test ends.
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = line_tx.send(line);
        }
    });

    // Wait for /healthz.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(resp) = http_get(&addr, "/healthz").await {
            assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
            assert!(resp.ends_with("ok"), "{resp}");
            break;
        }
        assert!(Instant::now() < deadline, "server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expected = format!("listening on ws://{addr}/ws");
    let logged = std::iter::from_fn(|| line_rx.recv_timeout(Duration::from_secs(5)).ok())
        .any(|line| line.contains(&expected));
    assert!(logged, "startup log line missing");
    let index = http_get(&addr, "/").await.unwrap();
    assert!(index.contains("peermesh-server"), "{index}");

    // A session with the ICE server from the command line.
    let mut c = Client::connect(&format!("ws://{addr}/ws")).await;
    c.send_json(json!({"type": "hello", "version": 1, "name": "cli"}))
        .await;
    match c.recv().await {
        ServerMsg::Welcome { ice_servers, .. } => {
            // The extra STUN server, then the embedded service's STUN and TURN (credentials).
            assert_eq!(ice_servers.len(), 3, "{ice_servers:?}");
            assert_eq!(ice_servers[0].urls, vec!["stun:127.0.0.1:3478".to_string()]);
            assert!(ice_servers[1].urls[0].starts_with("stun:127.0.0.1:"));
            assert!(ice_servers[2].urls[0].starts_with("turn:127.0.0.1:"));
            assert!(ice_servers[2].username.is_some() && ice_servers[2].credential.is_some());
        }
        other => panic!("expected welcome, got {other:?}"),
    }

    // SIGTERM: the open session is closed with 1012 (reconnect later) and the process exits 0.
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    assert_eq!(c.expect_closed().await, Some(close_code::SERVICE_RESTART));
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.0.kill();
            panic!("server did not exit within 5 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}");
}

/// A child process that is killed and reaped when dropped (also when a test panics).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A test server with some [`ServerLimits`] changed and the admin listener on.
async fn start_limited(change: impl FnOnce(&mut ServerLimits)) -> ServerHandle {
    let mut config = test_config();
    config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    change(&mut config.server_limits);
    start(config).await
}

#[tokio::test]
async fn frames_before_hello_are_bounded() {
    let server = start_limited(|l| l.hello_timeout = Duration::from_millis(500)).await;
    let url = server.ws_url();
    let peer = Client::hello(&url, "alice").await.peer;

    // Four frames (the default budget) are answered; the fifth closes with 1008.
    let mut c = Client::connect(&url).await;
    for _ in 0..4 {
        c.send_binary(relay(peer, 1, b"")).await;
        c.expect_error(ErrorCode::HelloRequired).await;
    }
    c.send_binary(relay(peer, 1, b"")).await;
    assert_eq!(c.expect_closed().await, Some(1008));

    // Bytes count too: one frame over the 16 KiB budget.
    let mut c = Client::connect(&url).await;
    c.send_text(format!("{{\"type\":\"{}\"}}", "x".repeat(17 * 1024)))
        .await;
    assert_eq!(c.expect_closed().await, Some(1008));

    // Saying nothing: closed at the hello deadline.
    let mut c = Client::connect(&url).await;
    let started = Instant::now();
    assert_eq!(c.expect_closed().await, Some(1008));
    assert!(started.elapsed() >= Duration::from_millis(400));
    server.shutdown().await;
}

#[tokio::test]
async fn request_signal_and_join_rates_answer_rate_limited() {
    let server = start_limited(|l| {
        l.requests = Rate {
            per_second: 1,
            burst: 5,
        };
        l.signals = Rate {
            per_second: 1,
            burst: 3,
        };
        l.joins = Rate {
            per_second: 1,
            burst: 2,
        };
    })
    .await;
    let url = server.ws_url();
    // The hello took one request token: four pings pass, the fifth is refused.
    let mut a = Client::hello(&url, "alice").await;
    for id in 0..4 {
        a.ping(id).await;
    }
    a.send_json(json!({"type": "ping", "id": 9})).await;
    let (request, _, _) = a.expect_error(ErrorCode::RateLimited).await;
    assert_eq!(request.as_deref(), Some("ping"));

    // Joins: two, then rate_limited (the session has request tokens again after a wait).
    let mut b = Client::hello(&url, "bob").await;
    let mut c = Client::hello(&url, "carol").await;
    b.join("g1").await;
    let (link, _, _) = pair_up(&mut b, &mut c, "g2").await;
    b.send_json(json!({"type": "join", "group": "g3"})).await;
    let (request, _, _) = b.expect_error(ErrorCode::RateLimited).await;
    assert_eq!(request.as_deref(), Some("join"));

    // Signals: three reach carol, the fourth is refused and never forwarded.
    for n in 0..4 {
        b.send_json(json!({"type": "signal", "to": c.peer, "link": link, "data": {"n": n}}))
            .await;
    }
    let (request, _, peer) = b.expect_error(ErrorCode::RateLimited).await;
    assert_eq!((request.as_deref(), peer), (Some("signal"), None));
    for n in 0..3 {
        match c.recv().await {
            ServerMsg::Signal { data, .. } => assert_eq!(data["n"], n),
            other => panic!("expected signal {n}, got {other:?}"),
        }
    }
    c.ping(1).await;
    server.shutdown().await;
}

#[tokio::test]
async fn relay_over_its_rate_is_paced_not_dropped() {
    const FRAMES: usize = 40;
    const SIZE: usize = 10_000;
    let server = start_limited(|l| {
        l.relay_bytes = Rate {
            per_second: 100_000,
            burst: 100_000,
        }
    })
    .await;
    let url = server.ws_url();
    let mut a = Client::hello(&url, "alice").await;
    let mut b = Client::hello(&url, "bob").await;
    let (link, _, _) = pair_up(&mut a, &mut b, "g").await;
    let started = Instant::now();
    for i in 0..FRAMES {
        a.send_binary(relay(b.peer, link, &[i as u8; SIZE])).await;
    }
    // 400 kB at 100 kB/s with a 100 kB burst: every frame arrives, in order, and the last
    // ones only after the sender has been held back for about three seconds.
    for i in 0..FRAMES {
        let frame = tokio::time::timeout(Duration::from_secs(10), b.recv_binary())
            .await
            .expect("paced frame");
        let f = RelayFrame::decode(&frame).unwrap();
        assert_eq!(
            (f.peer, f.payload.len(), f.payload[0]),
            (a.peer, SIZE, i as u8)
        );
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    a.ping(1).await;
    server.shutdown().await;
}

/// A WebSocket handshake from source address `from` to `server`.
async fn connect_from(
    from: &str,
    server: std::net::SocketAddr,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let tcp = socket.connect(server).await.unwrap();
    let url = format!("ws://{server}/ws");
    tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp))
        .await
        .map(|(ws, _)| ws)
}

/// The HTTP status of a refused WebSocket handshake from `from`.
async fn refused_status(from: &str, server: std::net::SocketAddr) -> u16 {
    match connect_from(from, server).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, got a session"),
    }
}

#[tokio::test]
async fn connection_limits_answer_503() {
    let server = start_limited(|l| {
        l.max_connections = 3;
        l.max_connections_per_ip = 2;
    })
    .await;
    let url = server.ws_url();
    let addr = server.local_addr();
    let a = Client::hello(&url, "a").await;
    let _b = Client::hello(&url, "b").await;
    assert_eq!(refused_status("127.0.0.1", addr).await, 503);
    // Another source address has its own allowance, up to the total.
    let _c = connect_from("127.0.0.2", addr).await.unwrap();
    assert_eq!(refused_status("127.0.0.2", addr).await, 503);
    // A place frees up when a session ends.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match connect_from("127.0.0.1", addr).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("no place after a session ended: {e}"),
        }
    }
    let admin = server.admin_addr().unwrap().to_string();
    let metrics = http_get(&admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("peermesh_connections_refused_total{reason=\"max_connections_per_ip\"} 1"),
        "{metrics}"
    );
    // (the retries above may have been refused too while the session was ending)
    assert!(
        metrics.contains("peermesh_connections_refused_total{reason=\"max_connections\"}"),
        "{metrics}"
    );
    server.shutdown().await;
}

/// Open a WebSocket by hand (so that broken frames can be sent) and return the socket.
async fn raw_websocket(addr: std::net::SocketAddr) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Read server frames until a close frame; its status code (`None`: no code or no close).
async fn raw_close_code(s: &mut TcpStream) -> Option<u16> {
    use tokio::io::AsyncReadExt;
    let read = async {
        loop {
            let b0 = s.read_u8().await.ok()?;
            let len = match s.read_u8().await.ok()? & 0x7f {
                126 => u64::from(s.read_u16().await.ok()?),
                127 => s.read_u64().await.ok()?,
                n => u64::from(n),
            };
            let mut payload = vec![0; len as usize];
            s.read_exact(&mut payload).await.ok()?;
            if b0 & 0x0f == 0x8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    };
    tokio::time::timeout(RECV_TIMEOUT, read)
        .await
        .expect("close in time")
}

#[tokio::test]
async fn websocket_protocol_violations_close_with_1002_and_1007() {
    use tokio::io::AsyncWriteExt;
    let server = start(test_config()).await;
    // (what, raw frame from the client, expected close code). A zero mask key leaves the
    // payload as written.
    let cases: [(&str, &[u8], u16); 5] = [
        ("unmasked frame", &[0x81, 0x02, b'h', b'i'], 1002),
        ("reserved bit", &[0xc1, 0x82, 0, 0, 0, 0, b'h', b'i'], 1002),
        ("unknown opcode", &[0x83, 0x80, 0, 0, 0, 0], 1002),
        ("fragmented ping", &[0x09, 0x80, 0, 0, 0, 0], 1002),
        ("invalid UTF-8", &[0x81, 0x82, 0, 0, 0, 0, 0xff, 0xfe], 1007),
    ];
    for (what, frame, code) in cases {
        let mut s = raw_websocket(server.local_addr()).await;
        s.write_all(frame).await.unwrap();
        assert_eq!(raw_close_code(&mut s).await, Some(code), "{what}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn admin_listener_serves_metrics_and_health() {
    let server = start_limited(|_| {}).await;
    let url = server.ws_url();
    let admin = server.admin_addr().unwrap().to_string();
    assert!(http_get(&admin, "/healthz").await.unwrap().ends_with("ok"));
    let mut a = Client::hello(&url, "alice").await;
    let mut b = Client::hello(&url, "bob").await;
    let (link, _, _) = pair_up(&mut a, &mut b, "g").await;
    a.send_binary(relay(b.peer, link, b"12345")).await;
    b.recv_binary().await;
    a.send_json(json!({"type": "nope"})).await;
    a.expect_error(ErrorCode::UnknownType).await;
    let mut c = Client::connect(&url).await;
    c.send_binary(vec![0xff; 3]).await;
    c.expect_error(ErrorCode::BadFrame).await;
    drop(c);
    let expected = [
        "peermesh_sessions 2",
        "peermesh_groups 1",
        "peermesh_members 2",
        "peermesh_relay_frames_received_total 1",
        "peermesh_relay_bytes_received_total 14",
        "peermesh_relay_frames_sent_total 1",
        "peermesh_frames_refused_total{code=\"unknown_type\"} 1",
        "peermesh_frames_refused_total{code=\"bad_frame\"} 1",
        "peermesh_session_closes_total{code=\"client\"} 1",
        "peermesh_connections 2",
    ];
    // (Sessions add their relay counts in batches, at the latest 100 ms after a frame.)
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = http_get(&admin, "/metrics").await.unwrap();
        let missing: Vec<_> = expected.iter().filter(|l| !metrics.contains(*l)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing:?} missing from\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !http_get(&url.replace("ws://", "").replace("/ws", ""), "/metrics")
            .await
            .unwrap()
            .contains("peermesh_sessions")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn refused_frames_get_bounded_answers_then_a_close() {
    let server = start(test_config()).await;
    let url = server.ws_url();
    let mut a = Client::hello(&url, "alice").await;
    // Relay frames to oneself are refused (not_co_member). The first 1000 refusals are
    // answered, then at most 100 a second plus one `rate_limited` notice a second.
    let me = a.peer;
    let frame = relay(me, 1, b"");
    let started = Instant::now();
    for _ in 0..1500 {
        a.ws.feed(Message::binary(frame.clone())).await.unwrap();
    }
    a.ws.flush().await.unwrap();
    a.send_json(json!({"type": "ping", "id": 7})).await;
    let (mut refused, mut limited) = (0u32, 0u32);
    loop {
        match a.recv_any().await {
            Incoming::Msg(ServerMsg::Error {
                code: ErrorCode::NotCoMember,
                ..
            }) => refused += 1,
            Incoming::Msg(ServerMsg::Error {
                code: ErrorCode::RateLimited,
                ..
            }) => limited += 1,
            Incoming::Msg(ServerMsg::Pong { id: 7 }) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert!(refused >= 1000, "{refused} answers");
    assert!(
        f64::from(refused) <= 1000.0 + 100.0 * secs + 1.0,
        "{refused} answers in {secs:.2} s"
    );
    assert!(
        (1..=1 + secs as u32).contains(&limited),
        "{limited} notices"
    );
    // A client that goes on sending refused frames is closed (1008).
    for _ in 0..6000 {
        if a.ws.feed(Message::binary(frame.clone())).await.is_err() {
            break;
        }
    }
    let _ = a.ws.flush().await;
    loop {
        match a.recv_any().await {
            Incoming::Msg(_) => continue,
            Incoming::Close(code) => {
                assert_eq!(code, Some(1008));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    server.shutdown().await;
}
