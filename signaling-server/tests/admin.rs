//! Server-managed groups (issue "Server-managed groups", parts 2–4): the admin API over real
//! HTTP on the admin listener, what clients see of the backend's changes, acknowledgements and
//! the event stream, and the pair policy the server computes. Real server, real sockets on
//! 127.0.0.1; the clients speak the protocol by hand so every frame is checked.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::http::{request, Answer, Events};
use common::raw_ws::*;
use peermesh::protocol::{close_code, DirectPolicy, ErrorCode, ServerMsg};
use peermesh_server::admin::{GroupOptions, ServerEvent};
use peermesh_server::auth::{mint_token, Claims};
use peermesh_server::{Auth, Config, Server, ServerHandle};
use serde_json::json;

const SECRET: &str = "test-secret-0123456789";
const ADMIN: &str = "admin-secret-abcdef";

async fn server_with(config: Config) -> ServerHandle {
    Server::bind(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        auth: Auth::Secret(SECRET.into()),
        admin_secret: Some(ADMIN.into()),
        ..config
    })
    .await
    .expect("bind")
    .spawn()
}

async fn server() -> ServerHandle {
    server_with(Config::default()).await
}

fn token(sub: &str, groups: &[&str], direct: Option<DirectPolicy>) -> String {
    let mut claims = Claims::new(
        sub,
        sub,
        groups.iter().map(|g| g.to_string()).collect(),
        Duration::from_secs(600),
    );
    claims.direct = direct;
    mint_token(SECRET, &claims).unwrap()
}

/// An admin API request with the right bearer secret.
async fn api(admin: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Answer {
    request(admin, method, path, Some(ADMIN), body).await
}

fn admin_addr(s: &ServerHandle) -> SocketAddr {
    s.admin_addr().expect("admin listener")
}

#[tokio::test]
async fn the_admin_api_needs_the_bearer_secret() {
    let server = server().await;
    let admin = admin_addr(&server);
    for bearer in [None, Some("wrong"), Some("admin-secret-abcdeF")] {
        for (method, path) in [
            ("GET", "/v1/groups"),
            ("PUT", "/v1/groups/g"),
            ("DELETE", "/v1/sessions/alice"),
            ("GET", "/v1/events"),
        ] {
            let a = request(admin, method, path, bearer, None).await;
            assert_eq!(a.status, 401, "{method} {path} with {bearer:?}: {a:?}");
            assert_eq!(a.json()["error"], "unauthorized");
        }
    }
    assert!(server.admin().groups().is_empty(), "nothing was created");
    let a = api(admin, "GET", "/v1/groups", None).await;
    assert_eq!((a.status, a.json()), (200, json!({"groups": []})));
    // Metrics and health stay open (the listener is loopback-only by default).
    assert_eq!(
        request(admin, "GET", "/healthz", None, None).await.status,
        200
    );

    // A server without an admin secret answers 401 to everything, whatever the bearer.
    let open = Server::bind(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    })
    .await
    .unwrap()
    .spawn();
    let a = request(admin_addr(&open), "GET", "/v1/groups", Some(ADMIN), None).await;
    assert_eq!(a.status, 401);
    assert!(a.json()["message"]
        .as_str()
        .unwrap()
        .contains("--admin-secret"));
}

/// The backend creates a group clients may not join by themselves, adds and removes members and
/// destroys it; clients see `joined`, `member_joined`, `member_left`, `left` with change numbers.
#[tokio::test]
async fn backend_managed_groups_as_clients_see_them() {
    let server = server().await;
    let (url, admin) = (server.ws_url(), admin_addr(&server));
    let (mut alice, alice_peer) = welcomed(&url, &token("alice", &["match"], None)).await;
    let (mut bob, bob_peer) = welcomed(&url, &token("bob", &[], None)).await;
    let (_carol, _) = welcomed(&url, &token("carol", &[], None)).await;

    let a = api(
        admin,
        "PUT",
        "/v1/groups/match",
        Some(r#"{"max_members":2,"self_join":false}"#),
    )
    .await;
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(
        a.json()["options"],
        json!({"max_members": 2, "direct": "any", "self_join": false})
    );
    // Bad options and names are refused with a reason.
    let bad = api(
        admin,
        "PUT",
        "/v1/groups/x",
        Some(r#"{"max_members":"two"}"#),
    )
    .await;
    assert_eq!(bad.error(), (422, "invalid_options".to_string()));
    let bad = api(admin, "PUT", "/v1/groups/x", Some(r#"{"colour":1}"#)).await;
    assert_eq!(bad.status, 422, "{bad:?}");
    let bad = api(admin, "PUT", "/v1/groups/no%20spaces", None).await;
    assert_eq!(bad.error(), (422, "invalid_group".to_string()));

    // Its token lists the group, but only the backend adds members.
    assert_eq!(join(&mut alice, "match").await, Err(ErrorCode::Forbidden));

    let a = api(admin, "PUT", "/v1/groups/match/members/alice", None).await;
    assert_eq!(a.status, 200, "{a:?}");
    match next_msg(&mut alice).await {
        ServerMsg::Joined {
            group,
            members,
            change,
        } => {
            assert_eq!(
                (group.as_str(), members.len(), change),
                ("match", 0, Some(1))
            );
        }
        other => panic!("{other:?}"),
    }
    api(admin, "PUT", "/v1/groups/match/members/bob", None).await;
    match next_msg(&mut bob).await {
        ServerMsg::Joined {
            members, change, ..
        } => {
            assert_eq!(change, Some(2));
            assert_eq!(members.len(), 1);
            assert_eq!(members[0].peer, alice_peer);
            assert_eq!(members[0].user.as_deref(), Some("alice"));
            assert!(members[0].initiator, "the added member makes the offers");
        }
        other => panic!("{other:?}"),
    }
    match next_msg(&mut alice).await {
        ServerMsg::MemberJoined { member, change, .. } => {
            assert_eq!((member.peer, change), (bob_peer, Some(2)));
            assert!(!member.initiator);
        }
        other => panic!("{other:?}"),
    }
    // Full, unknown users, no session, already a member.
    let full = api(admin, "PUT", "/v1/groups/match/members/carol", None).await;
    assert_eq!(full.error(), (409, "group_full".to_string()));
    let gone = api(admin, "PUT", "/v1/groups/match/members/dave", None).await;
    assert_eq!(gone.error(), (404, "no_such_session".to_string()));
    let again = api(admin, "PUT", "/v1/groups/match/members/bob", None).await;
    assert_eq!(again.error(), (409, "already_member".to_string()));
    let nogroup = api(admin, "PUT", "/v1/groups/nope/members/bob", None).await;
    assert_eq!(nogroup.error(), (404, "no_such_group".to_string()));

    // Listing.
    let list = api(admin, "GET", "/v1/groups", None).await.json();
    assert_eq!(list["groups"][0]["name"], "match");
    assert_eq!(list["groups"][0]["members"], 2);
    let one = api(admin, "GET", "/v1/groups/match", None).await.json();
    assert_eq!(one["change"], 2);
    let users: Vec<&str> = one["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["alice", "bob"]);

    // Removing bob: he gets `left`, alice `member_left`, both with change 3.
    let a = api(admin, "DELETE", "/v1/groups/match/members/bob", None).await;
    assert_eq!(a.status, 204, "{a:?}");
    match next_msg(&mut bob).await {
        ServerMsg::Left { group, change } => {
            assert_eq!((group.as_str(), change), ("match", Some(3)))
        }
        other => panic!("{other:?}"),
    }
    match next_msg(&mut alice).await {
        ServerMsg::MemberLeft { peer, change, .. } => {
            assert_eq!((peer, change), (bob_peer, Some(3)))
        }
        other => panic!("{other:?}"),
    }
    let a = api(admin, "DELETE", "/v1/groups/match/members/bob", None).await;
    assert_eq!(a.error(), (404, "not_member".to_string()));

    // The group stays when empty until destroyed; destroying sends `left` to every member.
    api(admin, "DELETE", "/v1/groups/match/members/alice", None).await;
    assert!(matches!(next_msg(&mut alice).await, ServerMsg::Left { .. }));
    assert!(
        server.admin().group("match").is_some(),
        "an empty managed group stays"
    );
    api(admin, "PUT", "/v1/groups/match/members/alice", None).await;
    api(admin, "PUT", "/v1/groups/match/members/bob", None).await;
    assert!(matches!(
        next_msg(&mut alice).await,
        ServerMsg::Joined { .. }
    ));
    assert!(matches!(
        next_msg(&mut alice).await,
        ServerMsg::MemberJoined { .. }
    ));
    assert!(matches!(next_msg(&mut bob).await, ServerMsg::Joined { .. }));
    let a = api(admin, "DELETE", "/v1/groups/match", None).await;
    assert_eq!(a.status, 204);
    for ws in [&mut alice, &mut bob] {
        match next_msg(ws).await {
            ServerMsg::Left { group, change } => {
                assert_eq!((group.as_str(), change), ("match", Some(7)))
            }
            other => panic!("{other:?}"),
        }
        // Nothing else (no member_left for a destroyed group).
        assert!(maybe_next(ws, Duration::from_millis(200)).await.is_none());
    }
    let a = api(admin, "GET", "/v1/groups/match", None).await;
    assert_eq!(a.status, 404);

    // Kicking a session closes it with 4002.
    let a = api(admin, "DELETE", "/v1/sessions/alice", None).await;
    assert_eq!(a.status, 204);
    loop {
        match next(&mut alice).await {
            Seen::Close(code, reason) => {
                assert_eq!(code, Some(close_code::KICKED));
                assert_eq!(reason, "removed by the server");
                break;
            }
            Seen::Msg(_) => continue,
            Seen::End => panic!("closed without a close frame"),
        }
    }
    let a = api(admin, "DELETE", "/v1/sessions/alice", None).await;
    assert_eq!(a.status, 404);
}

/// Every member acknowledges a change → `change_acked` on `/v1/events`; a member that does not
/// → `change_ack_timed_out` naming it. Sessions and memberships are on the stream too.
#[tokio::test]
async fn acknowledgements_and_the_event_stream() {
    let server = server_with(Config {
        ack_timeout: Duration::from_millis(500),
        ..Config::default()
    })
    .await;
    let (url, admin) = (server.ws_url(), admin_addr(&server));
    let mut events = Events::open(admin, "/v1/events", ADMIN).await;
    let mut in_process = server.admin().events();

    let (mut alice, alice_peer) = welcomed(&url, &token("alice", &["room"], None)).await;
    let (mut bob, bob_peer) = welcomed(&url, &token("bob", &["room"], None)).await;
    let e = events
        .until("session_connected", |d| d["user"] == "bob")
        .await;
    assert_eq!(e["peer"], bob_peer);

    join(&mut alice, "room").await.unwrap();
    join(&mut bob, "room").await.unwrap();
    let e = events.until("member_joined", |d| d["user"] == "bob").await;
    assert_eq!(
        (e["group"].clone(), e["change"].clone()),
        (json!("room"), json!(2))
    );
    assert!(matches!(
        next_msg(&mut alice).await,
        ServerMsg::MemberJoined {
            change: Some(2),
            ..
        }
    ));

    // Bob acknowledges change 2; alice has not yet: no change_acked.
    send(
        &mut bob,
        json!({"type": "ack", "group": "room", "change": 2}),
    )
    .await;
    send(
        &mut alice,
        json!({"type": "ack", "group": "room", "change": 1}),
    )
    .await;
    // Acks that match nothing are ignored (no answer, nothing published).
    send(
        &mut bob,
        json!({"type": "ack", "group": "room", "change": 99}),
    )
    .await;
    send(
        &mut bob,
        json!({"type": "ack", "group": "elsewhere", "change": 1}),
    )
    .await;
    assert!(maybe_next(&mut bob, Duration::from_millis(200))
        .await
        .is_none());
    let e = events.until("change_acked", |_| true).await;
    assert_eq!(
        e,
        json!({"type": "change_acked", "group": "room", "change": 1})
    );
    send(
        &mut alice,
        json!({"type": "ack", "group": "room", "change": 2}),
    )
    .await;
    let e = events.until("change_acked", |_| true).await;
    assert_eq!(
        e,
        json!({"type": "change_acked", "group": "room", "change": 2})
    );

    // Bob leaves and acknowledges his `left`; alice never acknowledges her `member_left`.
    send(&mut bob, json!({"type": "leave", "group": "room"})).await;
    assert!(matches!(
        next_msg(&mut bob).await,
        ServerMsg::Left {
            change: Some(3),
            ..
        }
    ));
    send(
        &mut bob,
        json!({"type": "ack", "group": "room", "change": 3}),
    )
    .await;
    let e = events.until("change_ack_timed_out", |_| true).await;
    assert_eq!(e["change"], 3);
    assert_eq!(e["missing"], json!([alice_peer]));

    // A member that disconnects no longer counts: change 4 (bob back) is acknowledged by bob,
    // then alice goes away without acknowledging it.
    join(&mut bob, "room").await.unwrap();
    send(
        &mut bob,
        json!({"type": "ack", "group": "room", "change": 4}),
    )
    .await;
    drop(alice);
    let e = events.until("change_acked", |d| d["change"] == 4).await;
    assert_eq!(e["group"], "room");
    let e = events.until("session_disconnected", |_| true).await;
    assert_eq!(
        (e["user"].clone(), e["reason"].clone()),
        (json!("alice"), json!("closed"))
    );

    // The in-process stream saw the same events, in order.
    let mut kinds = Vec::new();
    while let Ok(e) = in_process.try_recv() {
        kinds.push(e);
    }
    assert!(kinds.contains(&ServerEvent::ChangeAcked {
        group: "room".into(),
        change: 2
    }));
    let first = kinds
        .iter()
        .position(|e| matches!(e, ServerEvent::SessionConnected { .. }));
    assert_eq!(first, Some(0), "{kinds:?}");

    // An open event stream does not hold up the server's shutdown: the stream ends.
    tokio::time::timeout(Duration::from_secs(8), server.shutdown())
        .await
        .expect("shutdown with an event stream open");
    // (Events published while the sessions closed may come first.)
    assert!(events.ends_within(Duration::from_secs(3)).await);
}

/// The pair policy (strictest of group option, both tokens' `direct`, both hellos' `direct`) is
/// what both ends get in MemberInfo.direct, and a `none` pair's signals are refused and never
/// reach the other end.
#[tokio::test]
async fn the_pair_policy_is_the_strictest_and_none_gets_no_signal() {
    use DirectPolicy::{Any, None as Off, Relay};
    let server = server().await;
    let url = server.ws_url();
    let admin = server.admin();
    let levels = [Any, Relay, Off];
    let mut case = 0;
    for group_policy in levels {
        for token_direct in [Option::None, Some(Relay), Some(Off)] {
            for hello_direct in levels {
                case += 1;
                let group = format!("g{case}");
                admin
                    .create_group(
                        &group,
                        GroupOptions {
                            direct: group_policy,
                            ..GroupOptions::default()
                        },
                    )
                    .unwrap();
                let (a_user, b_user) = (format!("a{case}"), format!("b{case}"));
                let (mut a, a_peer) = welcomed_with(
                    &url,
                    Some(&token(&a_user, &[&group], token_direct)),
                    json!({}),
                )
                .await;
                let (mut b, b_peer) = welcomed_with(
                    &url,
                    Some(&token(&b_user, &[&group], None)),
                    json!({"direct": hello_direct}),
                )
                .await;
                join(&mut a, &group).await.unwrap();
                let members = join(&mut b, &group).await.unwrap();
                let want = group_policy
                    .max(token_direct.unwrap_or(Any))
                    .max(hello_direct);
                let label =
                    format!("group {group_policy}, token {token_direct:?}, hello {hello_direct}");
                assert_eq!(members[0].direct, want, "{label}");
                let link = members[0].link;
                match next_msg(&mut a).await {
                    ServerMsg::MemberJoined { member, .. } => {
                        assert_eq!(member.direct, want, "{label}")
                    }
                    other => panic!("{label}: {other:?}"),
                }
                // b is the initiator: it offers.
                let offer = json!({"type": "signal", "to": a_peer, "link": link,
                    "data": {"kind": "offer", "gen": 1, "sdp": "v=0\r\n"}});
                send(&mut b, offer).await;
                if want == Off {
                    match next_msg(&mut b).await {
                        ServerMsg::Error {
                            code,
                            peer,
                            request,
                            ..
                        } => {
                            assert_eq!(code, ErrorCode::DirectNotAllowed, "{label}");
                            assert_eq!((peer, request.as_deref()), (Some(a_peer), Some("signal")));
                        }
                        other => panic!("{label}: {other:?}"),
                    }
                    assert!(
                        maybe_next(&mut a, Duration::from_millis(100))
                            .await
                            .is_none(),
                        "{label}: the none pair got something"
                    );
                } else {
                    match next_msg(&mut a).await {
                        ServerMsg::Signal { from, .. } => assert_eq!(from, b_peer),
                        other => panic!("{label}: {other:?}"),
                    }
                }
                if want == Relay {
                    // Whatever b's client sends, a gets no address of b's but the relay's.
                    for c in [
                        "candidate:1 1 udp 2130706431 198.51.100.7 5000 typ host",
                        "candidate:2 1 udp 1694498815 203.0.113.9 5001 typ srflx raddr 198.51.100.7 rport 5000",
                        "candidate:3 1 udp 1 198.51.100.7 5002 typ prflx",
                        "candidate:4 1 udp 16777215 192.0.2.1 60000 typ relay raddr 203.0.113.9 rport 5001",
                    ] {
                        send(&mut b, json!({"type": "signal", "to": a_peer, "link": link,
                            "data": {"kind": "candidate", "gen": 1, "candidate": c}})).await;
                    }
                    match next_msg(&mut a).await {
                        ServerMsg::Signal { data, .. } => assert_eq!(
                            data["candidate"],
                            "candidate:4 1 udp 16777215 192.0.2.1 60000 typ relay raddr 0.0.0.0 rport 0",
                            "{label}"
                        ),
                        other => panic!("{label}: {other:?}"),
                    }
                }
                // Relay frames flow whatever the policy.
                let mut frame = vec![0x01];
                frame.extend_from_slice(&a_peer.to_be_bytes());
                frame.extend_from_slice(&link.to_be_bytes());
                frame.extend_from_slice(b"hi");
                futures_util::SinkExt::send(
                    &mut b,
                    tokio_tungstenite::tungstenite::Message::Binary(frame.into()),
                )
                .await
                .unwrap();
                let got = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut a))
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                assert!(got.is_binary(), "{label}: {got:?}");
            }
        }
    }
    assert_eq!(case, 27);
}

/// A server where only the backend makes groups: a join of an unknown group gets
/// `no_such_group`, of a backend group with the default options works.
#[tokio::test]
async fn clients_may_be_kept_from_creating_groups() {
    let server = server_with(Config {
        client_groups: false,
        ..Config::default()
    })
    .await;
    let (mut alice, _) =
        welcomed(&server.ws_url(), &token("alice", &["lobby", "made"], None)).await;
    assert_eq!(join(&mut alice, "lobby").await, Err(ErrorCode::NoSuchGroup));
    server
        .admin()
        .create_group("made", GroupOptions::default())
        .unwrap();
    assert_eq!(join(&mut alice, "made").await, Ok(vec![]));
}

#[tokio::test]
async fn group_options_are_checked() {
    let server = server().await;
    let admin = server.admin();
    let too_many = GroupOptions {
        max_members: Some(10_000),
        ..GroupOptions::default()
    };
    assert!(admin.create_group("g", too_many).is_err());
    assert!(admin
        .create_group("bad name", GroupOptions::default())
        .is_err());
    assert_eq!(admin.create_group("g", GroupOptions::default()), Ok(true));
    assert_eq!(admin.create_group("g", GroupOptions::default()), Ok(false));
}
