//! Shared helpers for the integration tests: a real server on 127.0.0.1 and real clients.
#![allow(dead_code)]

pub mod proxy;

use std::time::Duration;

use peermesh::{Client, ClientConfig, Event, Events, Path, PeerId};
use peermesh_server::{Config, Server, ServerHandle};

pub async fn server() -> ServerHandle {
    server_with(Config::default()).await
}

pub async fn server_with(mut config: Config) -> ServerHandle {
    config.listen = "127.0.0.1:0".parse().unwrap();
    Server::bind(config).await.expect("bind server").spawn()
}

/// A server configuration with the embedded TURN service on loopback, relaying on
/// `relay_ports` between loopback addresses (both clients' relay candidates are on loopback).
pub fn embedded_turn(relay_ports: (u16, u16)) -> Config {
    Config {
        turn: peermesh_server::TurnMode::Embedded(peermesh_server::turn::TurnConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            relay_ports,
            allow_peers: vec!["127.0.0.0/8".parse().unwrap()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A client whose direct paths stay on loopback (the test network rule).
pub async fn client(server: &ServerHandle, name: &str) -> (Client, Events) {
    client_with(server, ClientConfig::new(name).with_loopback_only(true)).await
}

/// The direct backend the tests run on: `PEERMESH_DIRECT_BACKEND` (`webrtc`, the default, or
/// `sansio`, which needs `--features sansio`).
pub fn backend() -> peermesh::DirectBackend {
    match std::env::var("PEERMESH_DIRECT_BACKEND") {
        Ok(name) => name.parse().expect("PEERMESH_DIRECT_BACKEND"),
        Err(_) => peermesh::DirectBackend::default(),
    }
}

pub async fn client_with(server: &ServerHandle, config: ClientConfig) -> (Client, Events) {
    Client::connect(&server.ws_url(), config.with_direct_backend(backend()))
        .await
        .expect("connect")
}

/// Wait up to `secs` for an event matching `pred`, discarding others.
pub async fn wait_for(
    events: &mut Events,
    secs: u64,
    mut pred: impl FnMut(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("event stream ended"),
            Err(_) => panic!("no matching event within {secs} s"),
        }
    }
}

pub async fn wait_joined(events: &mut Events, peer: PeerId) {
    wait_for(
        events,
        5,
        |e| matches!(e, Event::MemberJoined { peer: p, .. } if *p == peer),
    )
    .await;
}

pub async fn wait_direct(events: &mut Events, peer: PeerId) -> Path {
    match wait_for(
        events,
        10,
        |e| matches!(e, Event::PathChanged { peer: p, path: Path::Direct { .. } } if *p == peer),
    )
    .await
    {
        Event::PathChanged { path, .. } => path,
        _ => unreachable!(),
    }
}

/// Next message from `from`, skipping other events.
pub async fn next_message(
    events: &mut Events,
    from: PeerId,
    secs: u64,
) -> (bytes::Bytes, peermesh::Reliability) {
    match wait_for(
        events,
        secs,
        |e| matches!(e, Event::Message { from: f, .. } if *f == from),
    )
    .await
    {
        Event::Message {
            data, reliability, ..
        } => (data, reliability),
        _ => unreachable!(),
    }
}

/// Log to the test output when RUST_LOG is set.
pub fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Two clients made with `config` that join group "g" and wait until each sees a direct path to
/// the other. Returns them with the path each side reported.
pub struct DirectPair {
    pub a: Client,
    pub ae: Events,
    pub b: Client,
    pub be: Events,
    pub a_path: Path,
    pub b_path: Path,
}

pub async fn direct_pair(
    server: &ServerHandle,
    config: impl Fn(&str) -> ClientConfig,
) -> DirectPair {
    let (a, mut ae) = client_with(server, config("a")).await;
    let (b, mut be) = client_with(server, config("b")).await;
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    let a_path = wait_direct(&mut ae, b.peer_id()).await;
    let b_path = wait_direct(&mut be, a.peer_id()).await;
    DirectPair {
        a,
        ae,
        b,
        be,
        a_path,
        b_path,
    }
}

/// Wait up to `secs` until `c`'s path to `peer` is direct (or, with `want_direct` false, the
/// server path); returns how long that took.
pub async fn wait_path(c: &Client, peer: PeerId, want_direct: bool, secs: u64) -> Duration {
    let t = tokio::time::Instant::now();
    loop {
        let direct = matches!(c.path(peer).unwrap(), Path::Direct { .. });
        if direct == want_direct {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "path not {} within {secs} s",
            if want_direct { "direct" } else { "server" }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
