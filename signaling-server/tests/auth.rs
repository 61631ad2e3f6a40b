//! Identity (issue "Server-managed groups", part 1): tokens in `hello`, `unauthorized`,
//! `forbidden`, one live session per user, user ids in member events, and the open server's
//! loopback-only default. Real server, real WebSockets on 127.0.0.1.

use std::time::Duration;

mod common;

use common::raw_ws::*;
use peermesh::protocol::{close_code, ErrorCode, ServerMsg};
use peermesh_server::auth::{mint_token, verify_token, Claims};
use peermesh_server::{Auth, Config, Server, ServerHandle};
use serde_json::json;

const SECRET: &str = "test-secret-0123456789";
async fn server() -> ServerHandle {
    Server::bind(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        auth: Auth::Secret(SECRET.into()),
        ..Config::default()
    })
    .await
    .expect("bind")
    .spawn()
}

fn token(sub: &str, name: &str, groups: &[&str]) -> String {
    let claims = Claims::new(
        sub,
        name,
        groups.iter().map(|g| g.to_string()).collect(),
        Duration::from_secs(600),
    );
    mint_token(SECRET, &claims).unwrap()
}

#[tokio::test]
async fn hello_without_a_valid_token_is_unauthorized_and_closed() {
    let server = server().await;
    let url = server.ws_url();
    let mut expired = Claims::new("u", "alice", vec![], Duration::from_secs(60));
    expired.exp = 1_000_000;
    let other_secret = mint_token(
        "another-secret",
        &Claims::new("u", "alice", vec![], Duration::from_secs(60)),
    )
    .unwrap();
    let cases: [(&str, Option<String>); 4] = [
        ("missing", None),
        ("malformed", Some("not-a-jwt".into())),
        ("badly signed", Some(other_secret)),
        ("expired", Some(mint_token(SECRET, &expired).unwrap())),
    ];
    for (what, t) in cases {
        let (mut ws, first) = hello(&url, t.as_deref()).await;
        match first {
            Seen::Msg(ServerMsg::Error { code, .. }) => {
                assert_eq!(code, ErrorCode::Unauthorized, "{what}")
            }
            other => panic!("{what}: expected an unauthorized error, got {other:?}"),
        }
        match next(&mut ws).await {
            Seen::Close(code, reason) => {
                assert_eq!(code, Some(close_code::POLICY_VIOLATION), "{what}");
                assert_eq!(reason, "unauthorized", "{what}");
            }
            other => panic!("{what}: expected a close, got {other:?}"),
        }
    }
    // A valid token gets in.
    let (_ws, peer) = welcomed(&url, &token("u-1", "alice", &[])).await;
    assert!(peer > 0);
}

#[tokio::test]
async fn joins_are_limited_to_the_tokens_groups() {
    let server = server().await;
    let url = server.ws_url();
    let (mut ws, _) = welcomed(&url, &token("u-1", "alice", &["lobby"])).await;
    assert_eq!(join(&mut ws, "lobby").await, Ok(vec![]));
    assert_eq!(join(&mut ws, "vip").await, Err(ErrorCode::Forbidden));
    // The session goes on.
    send(&mut ws, json!({"type": "ping", "id": 7})).await;
    match next(&mut ws).await {
        Seen::Msg(ServerMsg::Pong { id: 7 }) => {}
        other => panic!("{other:?}"),
    }
}

/// The attack from the issue: a second client calling itself "alice" cannot join without a
/// token for the group, and when the backend does let another user in, member events tell the
/// two apart by user id whatever the display names.
#[tokio::test]
async fn a_second_alice_is_told_apart_by_user_id() {
    let server = server().await;
    let url = server.ws_url();
    let (mut alice, alice_peer) = welcomed(&url, &token("u-alice", "alice", &["lobby"])).await;
    let (mut bob, _) = welcomed(&url, &token("u-bob", "bob", &["lobby"])).await;
    join(&mut alice, "lobby").await.unwrap();
    let members = join(&mut bob, "lobby").await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].peer, alice_peer);
    assert_eq!(members[0].user.as_deref(), Some("u-alice"));

    // No token for the group: forbidden, and nobody learns of it.
    let (mut mallory, _) = welcomed(&url, &token("u-mallory", "alice", &[])).await;
    assert_eq!(join(&mut mallory, "lobby").await, Err(ErrorCode::Forbidden));
    // The backend lets another user named "alice" in: bob sees a different user id.
    let (mut other, other_peer) = welcomed(&url, &token("u-other", "alice", &["lobby"])).await;
    join(&mut other, "lobby").await.unwrap();
    loop {
        match next(&mut bob).await {
            Seen::Msg(ServerMsg::MemberJoined { member, .. }) => {
                assert_eq!(member.peer, other_peer);
                assert_eq!(member.name, "alice");
                assert_eq!(member.user.as_deref(), Some("u-other"));
                break;
            }
            Seen::Msg(_) => continue,
            other => panic!("{other:?}"),
        }
    }
}

/// One live session per user: a newer session replaces the older, which is closed with 4001;
/// its co-members see the old peer leave and the new one join.
#[tokio::test]
async fn a_users_newer_session_replaces_the_older() {
    let server = server().await;
    let url = server.ws_url();
    let (mut first, first_peer) = welcomed(&url, &token("u-1", "alice", &["g"])).await;
    let (mut bob, _) = welcomed(&url, &token("u-2", "bob", &["g"])).await;
    join(&mut first, "g").await.unwrap();
    join(&mut bob, "g").await.unwrap();

    let (mut second, second_peer) = welcomed(&url, &token("u-1", "alice", &["g"])).await;
    assert_ne!(first_peer, second_peer);
    loop {
        match next(&mut first).await {
            Seen::Close(code, reason) => {
                assert_eq!(code, Some(close_code::REPLACED));
                assert_eq!(reason, "replaced by a newer session");
                break;
            }
            Seen::Msg(_) => continue,
            Seen::End => panic!("closed without a close frame"),
        }
    }
    match next(&mut bob).await {
        Seen::Msg(ServerMsg::MemberLeft { peer, .. }) => assert_eq!(peer, first_peer),
        other => panic!("{other:?}"),
    }
    join(&mut second, "g").await.unwrap();
    match next(&mut bob).await {
        Seen::Msg(ServerMsg::MemberJoined { member, .. }) => {
            assert_eq!(member.peer, second_peer);
            assert_eq!(member.user.as_deref(), Some("u-1"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_open_server_listens_on_loopback_only_unless_told() {
    let any: std::net::SocketAddr = "0.0.0.0:0".parse().unwrap();
    let refused = Server::bind(Config {
        listen: any,
        ..Config::default()
    })
    .await;
    let err = refused.err().expect("an open server on 0.0.0.0 is refused");
    assert!(err.to_string().contains("--auth open"), "{err}");
    // Binding is all this does: no traffic leaves the machine.
    let ok = Server::bind(Config {
        listen: any,
        auth: Auth::Open,
        admin_listen: None,
        ..Config::default()
    })
    .await;
    assert!(ok.is_ok());
}

#[test]
fn the_token_command_prints_a_token_the_server_accepts() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_peermesh-server"))
        .args([
            "token",
            "--sub",
            "alice",
            "--groups",
            "lobby,game",
            "--ttl",
            "1h",
        ])
        .env("PEERMESH_AUTH_SECRET", SECRET)
        .env("PEERMESH_ADMIN_LISTEN", "off")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let t = String::from_utf8(out.stdout).unwrap();
    let claims = verify_token(SECRET, Some(t.trim())).unwrap();
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.name, "alice");
    assert_eq!(claims.groups, ["lobby", "game"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 3500..=now + 3700).contains(&claims.exp),
        "{}",
        claims.exp
    );
    // Without a secret it says what is missing.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_peermesh-server"))
        .args(["token", "--sub", "alice"])
        .env_remove("PEERMESH_AUTH_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth secret"));
}

/// TURN credentials are minted per identity: the REST username carries the user id, and the
/// per-user quota counts every session of that user together (a replaced session's
/// allocations still count), while another user is unaffected.
#[tokio::test]
async fn turn_credentials_and_quotas_are_per_identity() {
    use common::turn_client::{assert_success, error_code, RawClient};
    use peermesh_server::turn::TurnConfig;
    use peermesh_server::TurnMode;
    let server = Server::bind(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        auth: Auth::Secret(SECRET.into()),
        turn: TurnMode::Embedded(TurnConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            user_quota: 2,
            recv_buffer_bytes: 1 << 20,
            ..TurnConfig::default()
        }),
        ..Config::default()
    })
    .await
    .expect("bind")
    .spawn();
    let turn_addr = server.turn().expect("embedded TURN").local_addr();
    let url = server.ws_url();
    async fn turn_credentials(url: &str, token: &str) -> (Ws, String, String) {
        match hello(url, Some(token)).await {
            (ws, Seen::Msg(ServerMsg::Welcome { ice_servers, .. })) => {
                let t = ice_servers
                    .into_iter()
                    .find(|s| s.username.is_some())
                    .expect("a TURN entry");
                (ws, t.username.unwrap(), t.credential.unwrap())
            }
            (_, other) => panic!("{other:?}"),
        }
    }
    let (_first, user, pass) =
        turn_credentials(&url, &token("alice@example.org", "alice", &[])).await;
    assert!(
        user.ends_with(":u.alice%40example.org@127.0.0.1"),
        "the username names the user id: {user}"
    );
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = RawClient::new(turn_addr, &user, &pass).await;
        assert_success(&c.allocate().await, "within the user's quota");
        held.push(c);
    }
    // A newer session of the same user gets its own credentials, counted under the same
    // identity: refused (486).
    let (_second, user2, pass2) =
        turn_credentials(&url, &token("alice@example.org", "alice", &[])).await;
    assert_ne!(user2, "");
    let mut c = RawClient::new(turn_addr, &user2, &pass2).await;
    assert_eq!(error_code(&c.allocate().await), Some(486));
    // Another user is not affected.
    let (_bob, user3, pass3) = turn_credentials(&url, &token("bob", "bob", &[])).await;
    let mut c = RawClient::new(turn_addr, &user3, &pass3).await;
    assert_success(&c.allocate().await, "another identity");
}
