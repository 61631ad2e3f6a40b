//! Sessions that survive the server process (issue "Sessions that survive"): the server binary
//! (`nat_server`, the `peermesh-server` library with the binary's configuration path) killed
//! with SIGKILL mid-stream and restarted, drained with SIGTERM and restarted, stopped with
//! SIGSTOP past the heartbeat timeout, and cut off silently by nft. Real processes, real sockets
//! on 127.0.0.1; the server is ended by its PID and the nft table deleted, even on failure.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use peermesh::{Client, ClientConfig, Event, Events, Path, PeerId, Reconnect, Reliability};
use peermesh_interop_tests::client_config;
use tokio::time::Instant;

/// A server process on a fixed loopback port.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

impl ServerProcess {
    async fn start(addr: SocketAddr, heartbeat_timeout_ms: u64) -> ServerProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_nat_server"))
            .args([
                "--listen",
                &addr.to_string(),
                "--no-turn",
                "--admin-listen",
                "off",
                "--heartbeat-timeout-ms",
                &heartbeat_timeout_ms.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start nat_server");
        let server = ServerProcess { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "server not listening on {addr}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig}");
    }

    /// SIGKILL, and reap it.
    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // A stopped process would not die of SIGTERM; SIGKILL always works.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound and released: the server binds it next).
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn config(name: &str, direct: bool) -> ClientConfig {
    client_config(name)
        .with_loopback_only(true)
        .with_direct(direct)
        .with_reconnect(Some(Reconnect {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
            max_attempts: None,
        }))
}

fn numbered(from: &str, n: u32) -> Vec<u8> {
    format!("{from} {n:06}").into_bytes()
}

/// Receive from every peer in `want` (peer → (its name, count)) its numbered messages, in
/// order and once each; returns the other events seen and when the last message came.
async fn receive_streams(
    events: &mut Events,
    want: &HashMap<PeerId, (String, u32)>,
) -> (Vec<Event>, Instant) {
    let mut next: HashMap<PeerId, u32> = want.keys().map(|p| (*p, 0)).collect();
    let mut others = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while next.iter().any(|(p, n)| *n < want[p].1) {
        let e = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("streams incomplete: {next:?}"))
            .expect("event stream");
        match e {
            Event::Message {
                from,
                data,
                reliability: Reliability::Reliable,
                ..
            } if want.contains_key(&from) => {
                let n = next.get_mut(&from).unwrap();
                assert_eq!(
                    data,
                    numbered(&want[&from].0, *n),
                    "from {from}: out of order or twice"
                );
                *n += 1;
            }
            other => others.push(other),
        }
    }
    (others, Instant::now())
}

async fn wait_event(events: &mut Events, secs: u64, what: &str, pred: impl Fn(&Event) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(e)) if pred(&e) => return,
            Ok(Some(_)) => {}
            _ => panic!("no {what} within {secs} s"),
        }
    }
}

/// Clients "a" and "b" in group "g", on the server path.
async fn server_path_pair(server: &ServerProcess) -> ((Client, Events), (Client, Events)) {
    let mut pair = Vec::new();
    for name in ["a", "b"] {
        let (c, e) = Client::connect(&server.url(), config(name, false))
            .await
            .unwrap();
        c.join("g").await.unwrap();
        pair.push((c, e));
    }
    let b = pair.pop().unwrap();
    (pair.pop().unwrap(), b)
}

/// Three clients on direct paths; the server is killed with SIGKILL while 5000 numbered
/// messages flow each way between every pair: all arrive, once and in order, during the outage.
/// The server restarts on the same address: all three are members again within 5 s, and a
/// fourth client that joins sees all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_server_mid_stream_then_restart() {
    const N: u32 = 5000;
    let addr = free_addr();
    let server = ServerProcess::start(addr, 15_000).await;
    let names = ["a", "b", "c"];
    let mut clients = Vec::new();
    for name in names {
        let (c, e) = Client::connect(&server.url(), config(name, true))
            .await
            .unwrap();
        c.join("g").await.unwrap();
        clients.push((c, e));
    }
    let ids: Vec<PeerId> = clients.iter().map(|(c, _)| c.peer_id()).collect();
    // Every pair direct.
    for (i, (c, _)) in clients.iter().enumerate() {
        for (j, id) in ids.iter().enumerate() {
            if i == j {
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while !matches!(c.path(*id), Ok(Path::Direct { .. })) {
                assert!(Instant::now() < deadline, "{} to {id} not direct", names[i]);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let mut senders = Vec::new();
    for (i, (c, _)) in clients.iter().enumerate() {
        let c = c.clone();
        let to: Vec<PeerId> = ids.iter().copied().filter(|p| *p != ids[i]).collect();
        let name = names[i];
        senders.push(tokio::spawn(async move {
            for n in 0..N {
                for p in &to {
                    c.send(*p, numbered(name, n), Reliability::Reliable)
                        .await
                        .unwrap();
                }
                if n % 200 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed_at = Instant::now();
    server.kill9();

    let mut receivers = Vec::new();
    for (i, (_, e)) in clients.iter_mut().enumerate() {
        let want: HashMap<PeerId, (String, u32)> = ids
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, p)| (*p, (names[j].to_string(), N)))
            .collect();
        receivers.push(async move { receive_streams(e, &want).await });
    }
    let seen = futures_util::future::join_all(receivers).await;
    for s in senders {
        s.await.unwrap();
    }
    eprintln!(
        "{} messages each way between 3 pairs, all delivered {:?} after the kill",
        N,
        killed_at.elapsed()
    );
    for (i, (others, last)) in seen.iter().enumerate() {
        assert!(
            !others.iter().any(|e| matches!(e, Event::MemberLeft { .. })),
            "{}: {others:?}",
            names[i]
        );
        // Messages kept arriving while there was no server, over the direct paths.
        assert!(
            *last > killed_at,
            "{}: all arrived before the kill",
            names[i]
        );
        for (j, id) in ids.iter().enumerate() {
            if i != j {
                let path = clients[i].0.path(*id).unwrap();
                assert!(
                    matches!(path, Path::Direct { .. }),
                    "{} to {id}: {path}",
                    names[i]
                );
            }
        }
    }

    let restarted = ServerProcess::start(addr, 15_000).await;
    let back = Instant::now();
    for (c, e) in clients.iter_mut() {
        wait_event(
            e,
            10,
            "rejoined",
            |e| matches!(e, Event::Rejoined { group } if group == "g"),
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.members("g").map(|m| m.len()).unwrap_or(0) < 2 {
            assert!(Instant::now() < deadline, "members: {:?}", c.members("g"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let rejoined = back.elapsed();
    eprintln!("all three members again {rejoined:?} after the restart");
    assert!(rejoined < Duration::from_secs(5), "{rejoined:?}");
    let (d, _de) = Client::connect(&restarted.url(), config("d", false))
        .await
        .unwrap();
    let mut seen: Vec<String> = d
        .join("g")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    seen.sort();
    assert_eq!(seen, ["a", "b", "c"]);
}

/// The server is stopped (SIGSTOP) for longer than the heartbeat timeout while two clients
/// stream on the server path, then continued: the clients resume their sessions (same peer
/// ids, nobody leaves) and every message arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_past_the_heartbeat_timeout_then_sigcont_resumes() {
    streams_resume_across(Interruption::Stop).await;
}

/// The signaling TCP connections are cut silently for 10 s (nft drops every packet to and from
/// the server's port: no FIN, no RST), within the resume grace but far past the heartbeat
/// timeout, while two clients stream on the server path: both resume their sessions, nobody
/// leaves, and every message arrives once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nft_cut_within_the_grace_resumes() {
    streams_resume_across(Interruption::NftCut).await;
}

/// How the server becomes unreachable for a while.
#[derive(Clone, Copy, Debug)]
enum Interruption {
    /// SIGSTOP for 4 s, then SIGCONT.
    Stop,
    /// nft drops the server port's packets for 10 s.
    NftCut,
}

/// Two clients stream 1000 numbered messages each way on the server path while the server is
/// unreachable for longer than the heartbeat timeout (2 s) and shorter than the resume grace:
/// the sessions resume (same peer ids, nobody leaves) and every message arrives once, in order.
async fn streams_resume_across(how: Interruption) {
    const N: u32 = 1000;
    let server = ServerProcess::start(free_addr(), 2_000).await;
    let ((a, mut ae), (b, mut be)) = server_path_pair(&server).await;
    let (ia, ib) = (a.peer_id(), b.peer_id());
    wait_event(&mut ae, 5, "b joining", |e| {
        matches!(e, Event::MemberJoined { .. })
    })
    .await;
    wait_event(&mut be, 5, "a's member list", |e| {
        matches!(e, Event::MemberJoined { .. })
    })
    .await;
    let sender = |c: Client, to: PeerId, name: &'static str| {
        tokio::spawn(async move {
            for n in 0..N {
                c.send(to, numbered(name, n), Reliability::Reliable)
                    .await
                    .unwrap();
                if n % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
    };
    let (sa, sb) = (sender(a.clone(), ib, "a"), sender(b.clone(), ia, "b"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    match how {
        Interruption::Stop => {
            server.signal("-STOP");
            tokio::time::sleep(Duration::from_secs(4)).await;
            server.signal("-CONT");
        }
        Interruption::NftCut => {
            let port = server.addr.port();
            let cut = peermesh_interop_tests::NftTable::new(
                "sigcut",
                port,
                &[
                    format!("tcp dport {port} counter drop"),
                    format!("tcp sport {port} counter drop"),
                ],
            );
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert!(cut.dropped() > 0, "the cut dropped nothing");
            drop(cut);
        }
    }
    let back = Instant::now();
    let want_a: HashMap<PeerId, (String, u32)> = [(ib, ("b".to_string(), N))].into();
    let want_b: HashMap<PeerId, (String, u32)> = [(ia, ("a".to_string(), N))].into();
    let ((seen_a, _), (seen_b, _)) = tokio::join!(
        receive_streams(&mut ae, &want_a),
        receive_streams(&mut be, &want_b)
    );
    sa.await.unwrap();
    sb.await.unwrap();
    eprintln!(
        "{how:?}: both streams complete {:?} after the server was reachable again",
        back.elapsed()
    );
    assert_eq!((a.peer_id(), b.peer_id()), (ia, ib), "same sessions");
    for e in seen_a.iter().chain(&seen_b) {
        assert!(
            !matches!(
                e,
                Event::MemberLeft { .. } | Event::Rejoined { .. } | Event::Disconnected { .. }
            ),
            "{e:?}"
        );
    }
    let resumed = seen_a
        .iter()
        .chain(&seen_b)
        .filter(|e| matches!(e, Event::Reconnected { resumed: true, .. }))
        .count();
    assert!(resumed >= 1, "{seen_a:?} {seen_b:?}");
    a.close().await;
    b.close().await;
}

/// Receive from the members named in `want` (name → count) their numbered messages, in order
/// and once each, whatever peer ids they have (a new session gives new ones); returns the other
/// events seen.
async fn receive_by_name(events: &mut Events, want: &HashMap<String, u32>) -> Vec<Event> {
    let mut names: HashMap<PeerId, String> = HashMap::new();
    let mut next: HashMap<String, u32> = want.keys().map(|n| (n.clone(), 0)).collect();
    let mut others = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while next.iter().any(|(name, n)| *n < want[name]) {
        let e = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("streams incomplete: {next:?}"))
            .expect("event stream");
        match e {
            Event::MemberJoined { peer, name, .. } => {
                names.insert(peer, name);
            }
            Event::Message {
                from,
                data,
                reliability: Reliability::Reliable,
                ..
            } => {
                let name = names.get(&from).expect("a message from a known member");
                let n = next.get_mut(name).unwrap();
                assert_eq!(
                    data,
                    numbered(name, *n),
                    "from {name}: out of order or twice"
                );
                *n += 1;
            }
            other => others.push(other),
        }
    }
    others
}

/// Send `n` numbered messages to the member named `to` of "g", across new sessions.
async fn send_by_name(c: Client, to: &'static str, from: &'static str, n: u32) {
    for i in 0..n {
        peermesh_interop_tests::send_to_member(&c, "g", to, numbered(from, i)).await;
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A rolling restart: while two clients stream on the server path, the server gets SIGTERM; it
/// drains (every message sent is acknowledged, new ones are held) and exits; a new server starts
/// on the same address; the clients start new sessions there and every message arrives once
/// and in order, none reported undelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_then_restart_loses_nothing() {
    const N: u32 = 3000;
    let addr = free_addr();
    let mut server = ServerProcess::start(addr, 15_000).await;
    let ((a, mut ae), (b, mut be)) = server_path_pair(&server).await;
    let sa = tokio::spawn(send_by_name(a.clone(), "b", "a", N));
    let sb = tokio::spawn(send_by_name(b.clone(), "a", "b", N));
    let want_a: HashMap<String, u32> = [("b".to_string(), N)].into();
    let want_b: HashMap<String, u32> = [("a".to_string(), N)].into();
    let receiving = tokio::spawn(async move {
        let (seen_a, seen_b) = tokio::join!(
            receive_by_name(&mut ae, &want_a),
            receive_by_name(&mut be, &want_b)
        );
        (seen_a, seen_b)
    });

    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !sa.is_finished() && !sb.is_finished(),
        "the streams ended before the restart"
    );
    let term = Instant::now();
    server.signal("-TERM");
    let status = tokio::task::spawn_blocking(move || {
        let status = server.child.wait().expect("wait for the server");
        (status, server)
    });
    let (status, server) = status.await.unwrap();
    let drained = term.elapsed();
    assert!(status.success(), "server exit: {status}");
    drop(server);
    eprintln!("server drained and exited {drained:?} after SIGTERM");

    let restarted = ServerProcess::start(addr, 15_000).await;
    let back = Instant::now();
    let (seen_a, seen_b) = receiving.await.unwrap();
    sa.await.unwrap();
    sb.await.unwrap();
    eprintln!(
        "both streams of {N} complete {:?} after the new server started",
        back.elapsed()
    );
    for (name, seen) in [("a", &seen_a), ("b", &seen_b)] {
        assert!(
            !seen.iter().any(|e| matches!(e, Event::Undelivered { .. })),
            "{name}: {seen:?}"
        );
        assert!(
            seen.iter()
                .any(|e| matches!(e, Event::Reconnected { resumed: false, .. })),
            "{name}: no new session: {seen:?}"
        );
    }
    drop(restarted);
}
