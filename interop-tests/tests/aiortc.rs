//! A third-party peer against our stack: `interop-tests/aiortc/peer.py` (Python, aiortc +
//! websockets, written from docs/PROTOCOL.md alone) and a native client in one group of the real
//! server. Both directions, reliable (in order across the server → direct switch) and
//! unreliable, with the aiortc peer as WebRTC initiator and as responder.
//!
//! Needs the venv made by `interop-tests/setup/python.sh` (run by `interop-tests/run-all.sh`),
//! or a Python with aiortc and websockets in `PEERMESH_AIORTC_PYTHON`.
//!
//! Network: the native client gathers loopback candidates only, and peer.py runs with
//! `--loopback-only` (aiortc's host candidates on 127.0.0.1 only, non-loopback remote candidates
//! ignored); the server hands out no STUN/TURN servers. All traffic stays on 127.0.0.1.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use peermesh::{Client, ClientConfig, Event, Events, Path, PeerId, Reliability};
use peermesh_server::{Config, Server, ServerHandle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout_at, Instant};

/// Reliable messages each way from the moment of join (paced, so they span the path switch).
const EARLY: usize = 200;
/// Reliable messages each way once both ends are direct.
const LATE: usize = 50;
/// Pause between two paced sends.
const PACE: Duration = Duration::from_millis(10);
/// Liveness limit for each wait.
const WAIT: Duration = Duration::from_secs(30);

const NATIVE: &str = "rust";
const PY: &str = "py";

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PEERMESH_AIORTC_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("aiortc/.venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run interop-tests/setup/python.sh (or set PEERMESH_AIORTC_PYTHON)",
        venv.display()
    );
    venv
}

/// peer.py as a child process, driven through its stdin/stdout lines.
struct PyPeer {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
    /// `msg` texts from the native peer, in arrival order.
    reliable: Vec<String>,
    /// `umsg` texts from the native peer.
    unreliable: Vec<String>,
    /// The last `path` line's value for the native peer.
    path: Option<String>,
}

impl PyPeer {
    async fn spawn(server: &ServerHandle) -> PyPeer {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("aiortc/peer.py");
        let mut child = Command::new(python())
            .arg(script)
            .args(["--server", &server.ws_url(), "--name", PY, "--group", "g"])
            .args(["--loopback-only", "--verbose"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start peer.py");
        let stdin = child.stdin.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                eprintln!("[peer.py out] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                eprintln!("{line}");
            }
        });
        PyPeer {
            child,
            stdin,
            lines,
            reliable: Vec::new(),
            unreliable: Vec::new(),
            path: None,
        }
    }

    async fn command(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to peer.py");
    }

    /// Note what a line says about messages, paths and failures.
    fn record(&mut self, line: &str) {
        if let Some(text) = line.strip_prefix(&format!("msg {NATIVE} ")) {
            self.reliable.push(text.to_string());
        } else if let Some(text) = line.strip_prefix(&format!("umsg {NATIVE} ")) {
            self.unreliable.push(text.to_string());
        } else if let Some(path) = line.strip_prefix(&format!("path {NATIVE} ")) {
            self.path = Some(path.to_string());
        } else if line.starts_with("closed ") || line.starts_with("error ") {
            panic!("peer.py: {line}");
        }
    }

    /// Read lines until one satisfies `done` (which also sees the recorded state); panics after
    /// `WAIT`.
    async fn until(&mut self, what: &str, mut done: impl FnMut(&PyPeer, &str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let line = match timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => line,
                Ok(None) => panic!("peer.py exited while waiting for {what}"),
                Err(_) => panic!("peer.py: no {what} within {WAIT:?}"),
            };
            self.record(&line);
            if done(self, &line) {
                return line;
            }
        }
    }

    /// Record the lines that arrive within `time`.
    async fn drain(&mut self, time: Duration) {
        let deadline = Instant::now() + time;
        while let Ok(Some(line)) = timeout_at(deadline, self.lines.recv()).await {
            self.record(&line);
        }
    }

    /// Counters from a `stats` line.
    async fn stats(&mut self) -> std::collections::HashMap<String, u64> {
        self.command(&format!("stats {NATIVE}")).await;
        let line = self
            .until("stats", |_, l| l.starts_with(&format!("stats {NATIVE} ")))
            .await;
        line.split(' ')
            .skip(2)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(0)))
            .collect()
    }

    async fn quit(mut self) {
        self.command("quit").await;
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        assert!(
            matches!(status, Ok(Ok(s)) if s.success()),
            "peer.py did not exit cleanly: {status:?}"
        );
    }
}

/// The native client and what it has received from the aiortc peer.
struct Native {
    client: Client,
    events: Events,
    py: Option<PeerId>,
    reliable: Vec<String>,
    unreliable: Vec<String>,
}

impl Native {
    /// Note what an event says about the aiortc peer.
    fn record(&mut self, event: Event) {
        match event {
            Event::MemberJoined { peer, name, .. } if name == PY => self.py = Some(peer),
            Event::Message {
                from,
                data,
                reliability,
            } if Some(from) == self.py => {
                let text = String::from_utf8(data.to_vec()).expect("UTF-8 from peer.py");
                match reliability {
                    Reliability::Reliable => self.reliable.push(text),
                    Reliability::Unreliable => self.unreliable.push(text),
                }
            }
            Event::PathChanged { peer, path } => eprintln!("native: path to {peer}: {path}"),
            Event::DirectFailed { peer, reason } => {
                eprintln!("native: direct to {peer} failed: {reason}")
            }
            Event::ServerError { code, message } => {
                panic!("native: server error {code:?}: {message}")
            }
            Event::Disconnected { reason } => panic!("native: disconnected: {reason}"),
            _ => {}
        }
    }

    /// Read events until `done` holds; panics after `WAIT`.
    async fn until(&mut self, what: &str, mut done: impl FnMut(&Native) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            match timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) => self.record(e),
                Ok(None) => panic!("native events ended while waiting for {what}"),
                Err(_) => panic!("native: no {what} within {WAIT:?}"),
            }
        }
    }

    /// Record the events that arrive within `time`.
    async fn drain(&mut self, time: Duration) {
        let deadline = Instant::now() + time;
        while let Ok(Some(e)) = timeout_at(deadline, self.events.recv()).await {
            self.record(e);
        }
    }

    fn py(&self) -> PeerId {
        self.py.expect("aiortc peer joined")
    }

    fn path(&self) -> Path {
        self.client
            .path(self.py())
            .expect("link to the aiortc peer")
    }
}

fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix} {i:04}")).collect()
}

/// Both peers in group "g" (`py_first`: the aiortc peer joins first, so the native client is
/// the initiator), then messages both ways across the switch to the direct path.
async fn exchange(py_first: bool) {
    let server = Server::bind(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .await
    .expect("bind server")
    .spawn();
    let connect_native = || async {
        let (client, events) = Client::connect(
            &server.ws_url(),
            ClientConfig::new(NATIVE).with_loopback_only(true),
        )
        .await
        .expect("native connect");
        Native {
            client,
            events,
            py: None,
            reliable: Vec::new(),
            unreliable: Vec::new(),
        }
    };

    let (mut native, mut py) = if py_first {
        let mut py = PyPeer::spawn(&server).await;
        py.until("group", |_, l| l == "group g").await;
        let native = connect_native().await;
        native.client.join("g").await.expect("native join");
        (native, py)
    } else {
        let native = connect_native().await;
        native.client.join("g").await.expect("native join");
        (native, PyPeer::spawn(&server).await)
    };
    native.until("the aiortc peer", |n| n.py.is_some()).await;
    py.until("the native peer", |_, l| {
        l.starts_with(&format!("joined {NATIVE} "))
    })
    .await;
    let py_id = native.py();

    // From the moment of join: paced reliable messages both ways, while the direct path is
    // being set up.
    let to_py = numbered("native", 0..EARLY);
    let to_native = numbered("aiortc", 0..EARLY);
    {
        let client = &native.client;
        let native_sends = async {
            for m in &to_py {
                client
                    .send(py_id, m.clone(), Reliability::Reliable)
                    .await
                    .expect("native send");
                sleep(PACE).await;
            }
        };
        let py_sends = async {
            for m in &to_native {
                py.command(&format!("send {NATIVE} {m}")).await;
                sleep(PACE).await;
            }
        };
        tokio::join!(native_sends, py_sends);
    }

    // Both ends reach the direct path.
    native
        .until("a direct path", |n| matches!(n.path(), Path::Direct { .. }))
        .await;
    py.until("a direct path", |p, _| {
        p.path.as_deref().is_some_and(|s| s.starts_with("direct "))
    })
    .await;

    // More reliable messages, now on the direct path.
    let late_to_py = numbered("native-late", 0..LATE);
    let late_to_native = numbered("aiortc-late", 0..LATE);
    for (to_p, to_n) in late_to_py.iter().zip(&late_to_native) {
        native
            .client
            .send(py_id, to_p.clone(), Reliability::Reliable)
            .await
            .expect("native send");
        py.command(&format!("send {NATIVE} {to_n}")).await;
    }

    let expect_py: Vec<String> = to_py.iter().chain(&late_to_py).cloned().collect();
    let expect_native: Vec<String> = to_native.iter().chain(&late_to_native).cloned().collect();
    py.until("every reliable message", |p, _| {
        p.reliable.len() >= expect_py.len()
    })
    .await;
    native
        .until("every reliable message", |n| {
            n.reliable.len() >= expect_native.len()
        })
        .await;
    assert_eq!(py.reliable, expect_py, "aiortc peer: reliable stream");
    assert_eq!(
        native.reliable, expect_native,
        "native peer: reliable stream"
    );

    // Unreliable both ways (best effort: retried until one arrives each way).
    for i in 0..50 {
        native
            .client
            .send(py_id, format!("native-u {i}"), Reliability::Unreliable)
            .await
            .expect("native unreliable send");
        py.command(&format!("usend {NATIVE} aiortc-u {i}")).await;
        native.drain(Duration::from_millis(100)).await;
        py.drain(Duration::from_millis(100)).await;
        if !native.unreliable.is_empty() && !py.unreliable.is_empty() {
            break;
        }
    }
    assert!(
        native.unreliable.iter().all(|m| m.starts_with("aiortc-u "))
            && !native.unreliable.is_empty(),
        "native peer: unreliable messages {:?}",
        native.unreliable
    );
    assert!(
        py.unreliable.iter().all(|m| m.starts_with("native-u ")) && !py.unreliable.is_empty(),
        "aiortc peer: unreliable messages {:?}",
        py.unreliable
    );

    // Direct at the end on both sides, and the bytes really took both paths.
    let path = native.path();
    assert!(matches!(path, Path::Direct { .. }), "native path {path}");
    py.command(&format!("path {NATIVE}")).await;
    let line = py
        .until("its path", |_, l| l.starts_with(&format!("path {NATIVE} ")))
        .await;
    assert!(line.contains(" direct "), "aiortc peer path: {line}");

    let stats = native.client.link_stats(py_id).unwrap();
    eprintln!("native link stats: {stats:?}");
    assert!(stats.sent_server > 0 && stats.sent_direct > 0, "{stats:?}");
    assert!(stats.recv_server > 0 && stats.recv_direct > 0, "{stats:?}");
    let py_stats = py.stats().await;
    eprintln!("aiortc link stats: {py_stats:?}");
    for key in ["sent_server", "sent_direct", "recv_server", "recv_direct"] {
        assert!(
            py_stats.get(key).copied().unwrap_or(0) > 0,
            "aiortc {key}: {py_stats:?}"
        );
    }

    py.quit().await;
    native.client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_peer_as_initiator() {
    exchange(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_peer_as_responder() {
    exchange(true).await;
}
