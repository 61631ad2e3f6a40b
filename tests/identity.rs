//! The Rust client against a server that requires tokens: `ClientConfig::with_token`, user ids
//! in events and member lists, typed errors for a bad token and a forbidden join.

use std::time::Duration;

use peermesh::protocol::ErrorCode;
use peermesh_server::auth::{mint_token, Claims};
use peermesh_server::{Auth, Config, Server, ServerHandle};

const SECRET: &str = "test-secret-0123456789";
const WAIT: Duration = Duration::from_secs(5);

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

/// The Rust client: `with_token`, user ids in events and member lists, and a typed error for a
/// bad token.
#[tokio::test]
async fn rust_client_presents_its_token() {
    let server = server().await;
    let url = server.ws_url();
    let cfg = |t: String| {
        peermesh::ClientConfig::new("ignored")
            .with_direct(false)
            .with_token(t)
    };
    let (a, _ea) = peermesh::Client::connect(&url, cfg(token("u-a", "alice", &["g"])))
        .await
        .unwrap();
    let (b, mut eb) = peermesh::Client::connect(&url, cfg(token("u-b", "bob", &["g"])))
        .await
        .unwrap();
    b.join("g").await.unwrap();
    a.join("g").await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, eb.recv())
            .await
            .unwrap()
            .unwrap()
        {
            peermesh::Event::MemberJoined { name, user, .. } => {
                assert_eq!(name, "alice");
                assert_eq!(user.as_deref(), Some("u-a"));
                break;
            }
            _ => continue,
        }
    }
    let members = a.members("g").unwrap();
    assert_eq!(members[0].user.as_deref(), Some("u-b"));
    assert!(matches!(
        a.join("elsewhere").await,
        Err(peermesh::Error::Server {
            code: ErrorCode::Forbidden,
            ..
        })
    ));
    match peermesh::Client::connect(&url, cfg("garbage".into())).await {
        Err(peermesh::Error::Server {
            code: ErrorCode::Unauthorized,
            ..
        }) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }
}

/// The next event that is not about paths.
async fn next(rx: &mut peermesh::Events) -> peermesh::Event {
    loop {
        match tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            peermesh::Event::PathChanged { .. } | peermesh::Event::DirectFailed { .. } => continue,
            other => return other,
        }
    }
}

/// Groups the app's backend manages: a client it adds is told (`GroupJoined`, then
/// `MemberJoined` for each member) without calling `join`, and one it removes sees the members
/// leave and then `GroupLeft`; messages flow between members the backend put together.
#[tokio::test]
async fn the_backend_adds_and_removes_rust_clients() {
    use peermesh::Event;
    use peermesh_server::admin::GroupOptions;
    let server = server().await;
    let url = server.ws_url();
    let admin = server.admin();
    let cfg = |t: String| {
        peermesh::ClientConfig::new("ignored")
            .with_direct(false)
            .with_token(t)
    };
    let (a, mut ea) = peermesh::Client::connect(&url, cfg(token("u-a", "alice", &[])))
        .await
        .unwrap();
    let (b, mut eb) = peermesh::Client::connect(&url, cfg(token("u-b", "bob", &[])))
        .await
        .unwrap();
    admin
        .create_group(
            "match",
            GroupOptions {
                self_join: false,
                ..GroupOptions::default()
            },
        )
        .unwrap();
    admin.add_member("match", "u-a").unwrap();
    admin.add_member("match", "u-b").unwrap();
    assert!(matches!(next(&mut ea).await, Event::GroupJoined { group } if group == "match"));
    assert!(
        matches!(next(&mut ea).await, Event::MemberJoined { user, .. } if user.as_deref() == Some("u-b"))
    );
    assert!(matches!(next(&mut eb).await, Event::GroupJoined { group } if group == "match"));
    let bob_sees = match next(&mut eb).await {
        Event::MemberJoined { peer, user, .. } => {
            assert_eq!(user.as_deref(), Some("u-a"));
            peer
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(b.members("match").unwrap().len(), 1);
    b.send(
        bob_sees,
        b"hello alice".to_vec(),
        peermesh::Reliability::Reliable,
    )
    .await
    .unwrap();
    match next(&mut ea).await {
        Event::Message { data, .. } => assert_eq!(&data[..], b"hello alice"),
        other => panic!("{other:?}"),
    }

    admin.remove_member("match", "u-b").unwrap();
    assert!(matches!(next(&mut eb).await, Event::MemberLeft { peer, .. } if peer == bob_sees));
    assert!(matches!(next(&mut eb).await, Event::GroupLeft { group } if group == "match"));
    assert!(b.members("match").is_err());
    assert!(matches!(next(&mut ea).await, Event::MemberLeft { .. }));
    admin.destroy_group("match").unwrap();
    assert!(matches!(next(&mut ea).await, Event::GroupLeft { group } if group == "match"));
    drop(a);
}
