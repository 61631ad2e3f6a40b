//! A third-party peer against our stack: `interop-tests/aiortc/peer.py` (Python, aiortc +
//! websockets, written from docs/PROTOCOL.md alone) and a native client in one group of the real
//! server. Both directions, reliable (in order across the server → direct switch) and
//! unreliable, with the aiortc peer as WebRTC initiator and as responder; and a direct path cut
//! with nft mid-stream (fallback to the server path and back, nothing lost). Link protocol
//! version 2 (docs/PROTOCOL.md §7.6): max-size unreliable messages both ways, a version 1
//! peer.py (`--link-version 1`) against the native client, and max-size unreliable messages
//! under 5 % random UDP loss followed by reliable ones.
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

use peermesh::{Client, Event, Events, Path, PeerId, Reliability};
use peermesh_interop_tests::{client_config, NftTable, UdpCut};
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
    /// `link_version`: peer.py's `--link-version` (2 is its default).
    async fn spawn(server: &ServerHandle, direct: bool, link_version: u32) -> PyPeer {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("aiortc/peer.py");
        let mut child = Command::new(python())
            .arg(script)
            .args(["--server", &server.ws_url(), "--name", PY, "--group", "g"])
            .args(["--loopback-only", "--verbose"])
            .args(["--link-version", &link_version.to_string()])
            .args(if direct {
                &[][..]
            } else {
                &["--no-direct"][..]
            })
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
                match line.char_indices().nth(200) {
                    Some((cut, _)) => eprintln!("[peer.py out] {}…", &line[..cut]),
                    None => eprintln!("[peer.py out] {line}"),
                }
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
    /// When each reliable message from the aiortc peer arrived.
    reliable_at: Vec<Instant>,
    /// `DirectFailed` events seen.
    direct_failed: usize,
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
                ..
            } if Some(from) == self.py => {
                let text = String::from_utf8(data.to_vec()).expect("UTF-8 from peer.py");
                match reliability {
                    Reliability::Reliable => {
                        self.reliable.push(text);
                        self.reliable_at.push(Instant::now());
                    }
                    Reliability::Unreliable => self.unreliable.push(text),
                }
            }
            Event::PathChanged { peer, path } => eprintln!("native: path to {peer}: {path}"),
            Event::DirectFailed { peer, reason } => {
                eprintln!("native: direct to {peer} failed: {reason}");
                self.direct_failed += 1;
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

/// Numbered messages; every 25th is large (three DATA fragments).
fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range
        .map(|i| {
            if i % 25 == 7 {
                format!("{prefix} {i:04} {}", "x".repeat(40_000))
            } else {
                format!("{prefix} {i:04}")
            }
        })
        .collect()
}

/// A server, the native client and the aiortc peer in group "g". `py_first`: the aiortc peer
/// joins first, so the native client is the WebRTC initiator; otherwise the aiortc peer is.
struct Setup {
    _server: ServerHandle,
    native: Native,
    py: PyPeer,
    py_id: PeerId,
    /// Everything sent reliably so far, each way.
    sent_to_py: Vec<String>,
    sent_to_native: Vec<String>,
}

impl Setup {
    /// Have the aiortc peer send `count` unreliable messages of `size` bytes, one every `ms`,
    /// and wait until they have left its data channel (the native side keeps reading).
    async fn usend_many(&mut self, count: usize, size: usize, ms: u64) {
        self.py
            .command(&format!("usend_many {NATIVE} {count} {size} {ms}"))
            .await;
        let (native, py) = (&mut self.native, &mut self.py);
        let done = async {
            py.until("usent", |_, l| l.starts_with(&format!("usent {NATIVE} ")))
                .await;
        };
        tokio::select! {
            _ = done => {}
            _ = native.drain(WAIT) => panic!("aiortc peer: usend_many did not finish"),
        }
    }

    async fn new(py_first: bool, native_ports: Option<(u16, u16)>) -> Setup {
        Setup::with(py_first, native_ports, true, true, 2).await
    }

    /// `native_direct` / `py_direct`: whether each end allows direct paths; `py_version`: the
    /// link protocol version peer.py speaks.
    async fn with(
        py_first: bool,
        native_ports: Option<(u16, u16)>,
        native_direct: bool,
        py_direct: bool,
        py_version: u32,
    ) -> Setup {
        let server = Server::bind(Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        })
        .await
        .expect("bind server")
        .spawn();
        let connect_native = || async {
            let mut config = client_config(NATIVE)
                .with_loopback_only(true)
                .with_direct(native_direct);
            if let Some((lo, hi)) = native_ports {
                config = config.with_udp_ports(lo, hi);
            }
            let (client, events) = Client::connect(&server.ws_url(), config)
                .await
                .expect("native connect");
            Native {
                client,
                events,
                py: None,
                reliable: Vec::new(),
                unreliable: Vec::new(),
                reliable_at: Vec::new(),
                direct_failed: 0,
            }
        };
        let (mut native, mut py) = if py_first {
            let mut py = PyPeer::spawn(&server, py_direct, py_version).await;
            py.until("group", |_, l| l == "group g").await;
            let native = connect_native().await;
            native.client.join("g").await.expect("native join");
            (native, py)
        } else {
            let native = connect_native().await;
            native.client.join("g").await.expect("native join");
            (native, PyPeer::spawn(&server, py_direct, py_version).await)
        };
        native.until("the aiortc peer", |n| n.py.is_some()).await;
        py.until("the native peer", |_, l| {
            l.starts_with(&format!("joined {NATIVE} "))
        })
        .await;
        let py_id = native.py();
        Setup {
            _server: server,
            native,
            py,
            py_id,
            sent_to_py: Vec::new(),
            sent_to_native: Vec::new(),
        }
    }

    /// Reliable messages both ways at once, each side paced by `pace`.
    async fn send_both(&mut self, to_py: Vec<String>, to_native: Vec<String>, pace: Duration) {
        let (client, py, py_id) = (&self.native.client, &mut self.py, self.py_id);
        let native_sends = async {
            for m in &to_py {
                client
                    .send(py_id, m.clone(), Reliability::Reliable)
                    .await
                    .expect("native send");
                sleep(pace).await;
            }
        };
        let py_sends = async {
            for m in &to_native {
                py.command(&format!("send {NATIVE} {m}")).await;
                sleep(pace).await;
            }
        };
        tokio::join!(native_sends, py_sends);
        self.sent_to_py.extend(to_py);
        self.sent_to_native.extend(to_native);
    }

    /// Both ends on the direct path (`true`) or on the server path.
    async fn wait_paths(&mut self, direct: bool) {
        let what = if direct {
            "a direct path"
        } else {
            "the server path"
        };
        self.native
            .until(what, |n| matches!(n.path(), Path::Direct { .. }) == direct)
            .await;
        self.py
            .until(what, |p, _| {
                p.path
                    .as_deref()
                    .is_some_and(|s| s.starts_with("direct ") == direct)
            })
            .await;
    }

    /// Everything sent reliably has arrived, complete, in order and once, on both sides.
    async fn check_reliable(&mut self) {
        let (to_py, to_native) = (self.sent_to_py.len(), self.sent_to_native.len());
        self.py
            .until("every reliable message", |p, _| p.reliable.len() >= to_py)
            .await;
        self.native
            .until("every reliable message", |n| n.reliable.len() >= to_native)
            .await;
        // Let late duplicates show up, if any.
        self.py.drain(Duration::from_millis(200)).await;
        self.native.drain(Duration::from_millis(200)).await;
        assert!(
            self.py.reliable == self.sent_to_py,
            "aiortc peer: reliable stream differs (got {}, sent {})",
            self.py.reliable.len(),
            self.sent_to_py.len()
        );
        assert!(
            self.native.reliable == self.sent_to_native,
            "native peer: reliable stream differs (got {}, sent {})",
            self.native.reliable.len(),
            self.sent_to_native.len()
        );
    }

    /// Unreliable messages both ways, retried until one arrives each way.
    async fn check_unreliable(&mut self) {
        for i in 0..50 {
            self.native
                .client
                .send(self.py_id, format!("native-u {i}"), Reliability::Unreliable)
                .await
                .expect("native unreliable send");
            self.py
                .command(&format!("usend {NATIVE} aiortc-u {i}"))
                .await;
            self.native.drain(Duration::from_millis(100)).await;
            self.py.drain(Duration::from_millis(100)).await;
            if !self.native.unreliable.is_empty() && !self.py.unreliable.is_empty() {
                break;
            }
        }
        let (n, p) = (&self.native.unreliable, &self.py.unreliable);
        assert!(
            !n.is_empty() && n.iter().all(|m| m.starts_with("aiortc-u ")),
            "native peer: unreliable messages {n:?}"
        );
        assert!(
            !p.is_empty() && p.iter().all(|m| m.starts_with("native-u ")),
            "aiortc peer: unreliable messages {p:?}"
        );
    }

    /// Max-size (16384-byte) unreliable messages both ways on the direct path, retried until
    /// one arrives each way, intact: whole UNRELIABLE frames in a v1 generation, UNRELIABLE_PART
    /// frames in a v2 one (a v1 peer drops those as unknown frames).
    async fn check_max_size_unreliable(&mut self) {
        let (mut to_py, mut to_native) = (None, None);
        for i in 0..50 {
            let n = format!("native-big {i} {}", "n".repeat(16384 - 12));
            let n = n[..16384].to_string();
            let a = format!("aiortc-big {i} {}", "a".repeat(16384 - 12));
            let a = a[..16384].to_string();
            self.native
                .client
                .send(self.py_id, n.clone(), Reliability::Unreliable)
                .await
                .expect("native unreliable send");
            self.py.command(&format!("usend {NATIVE} {a}")).await;
            self.native.drain(Duration::from_millis(100)).await;
            self.py.drain(Duration::from_millis(100)).await;
            to_native = to_native.or_else(|| {
                self.native
                    .unreliable
                    .iter()
                    .find(|m| m.starts_with("aiortc-big "))
                    .cloned()
            });
            to_py = to_py.or_else(|| {
                self.py
                    .unreliable
                    .iter()
                    .find(|m| m.starts_with("native-big "))
                    .cloned()
            });
            if to_py.is_some() && to_native.is_some() {
                break;
            }
        }
        let intact = |m: &Option<String>, fill: char| {
            m.as_ref().is_some_and(|m| {
                m.len() == 16384
                    && m.split(' ')
                        .nth(2)
                        .is_some_and(|f| f.chars().all(|c| c == fill))
            })
        };
        assert!(
            intact(&to_native, 'a'),
            "no max-size unreliable message reached the native peer"
        );
        assert!(
            intact(&to_py, 'n'),
            "no max-size unreliable message reached the aiortc peer"
        );
        self.native.unreliable.clear();
        self.py.unreliable.clear();
    }

    /// Both ends say the path is direct now.
    async fn check_direct_now(&mut self) {
        let path = self.native.path();
        assert!(matches!(path, Path::Direct { .. }), "native path {path}");
        self.py.command(&format!("path {NATIVE}")).await;
        let line = self
            .py
            .until("its path", |_, l| l.starts_with(&format!("path {NATIVE} ")))
            .await;
        assert!(line.contains(" direct "), "aiortc peer path: {line}");
    }

    async fn finish(self) {
        self.py.quit().await;
        self.native.client.close().await;
    }
}

/// Messages both ways from the moment of join, across the server → direct switch, then on the
/// direct path; unreliable both ways; both paths really used. `py_version`: the link protocol
/// version peer.py speaks (the generation's version is the lower of the two ends').
async fn exchange(py_first: bool, py_version: u32) {
    let mut t = Setup::with(py_first, None, true, true, py_version).await;
    // Paced from the moment of join, while the direct path is being set up.
    t.send_both(
        numbered("native", 0..EARLY),
        numbered("aiortc", 0..EARLY),
        PACE,
    )
    .await;
    t.wait_paths(true).await;
    // More, now on the direct path.
    t.send_both(
        numbered("native-late", 0..LATE),
        numbered("aiortc-late", 0..LATE),
        Duration::ZERO,
    )
    .await;
    t.check_reliable().await;
    t.check_unreliable().await;
    t.check_direct_now().await;

    let stats = t.native.client.link_stats(t.py_id).unwrap();
    eprintln!("native link stats: {stats:?}");
    assert!(stats.sent_server > 0 && stats.sent_direct > 0, "{stats:?}");
    assert!(stats.recv_server > 0 && stats.recv_direct > 0, "{stats:?}");
    let py_stats = t.py.stats().await;
    eprintln!("aiortc link stats: {py_stats:?}");
    for key in ["sent_server", "sent_direct", "recv_server", "recv_direct"] {
        assert!(
            py_stats.get(key).copied().unwrap_or(0) > 0,
            "aiortc {key}: {py_stats:?}"
        );
    }
    assert_eq!(
        py_stats.get("version"),
        Some(&(py_version as u64)),
        "{py_stats:?}"
    );
    t.check_max_size_unreliable().await;
    t.finish().await;
}

/// The direct path is cut (nft) mid-stream: both ends fall back to the server path, re-send
/// what the dead path swallowed, and return to a new direct generation once the cut is lifted;
/// nothing is lost, duplicated or reordered.
async fn cut_and_restore(py_first: bool, native_ports: (u16, u16)) {
    let mut t = Setup::new(py_first, Some(native_ports)).await;
    t.wait_paths(true).await;
    let pair = t.native.client.candidate_pair(t.py_id).unwrap();
    let pair = pair.expect("direct pair");
    assert!(
        (native_ports.0..=native_ports.1).contains(&pair.local.port()),
        "{pair:?}"
    );
    t.send_both(
        numbered("n-direct", 0..50),
        numbered("a-direct", 0..50),
        PACE,
    )
    .await;

    let cut = UdpCut::new("aiortc", native_ports);
    // Into the dying direct path, then on the server path once each end notices.
    t.send_both(numbered("n-cut", 0..150), numbered("a-cut", 0..150), PACE)
        .await;
    t.wait_paths(false).await;
    t.send_both(
        numbered("n-server", 0..50),
        numbered("a-server", 0..50),
        PACE,
    )
    .await;
    t.check_reliable().await;

    drop(cut);
    t.wait_paths(true).await;
    t.send_both(numbered("n-back", 0..50), numbered("a-back", 0..50), PACE)
        .await;
    t.check_reliable().await;
    t.check_direct_now().await;

    let stats = t.native.client.link_stats(t.py_id).unwrap();
    eprintln!("native link stats: {stats:?}");
    assert!(stats.path_changes >= 3, "{stats:?}");
    let py_stats = t.py.stats().await;
    eprintln!("aiortc link stats: {py_stats:?}");
    assert!(py_stats["path_changes"] >= 3, "{py_stats:?}");
    assert!(py_stats["gen"] >= 2, "{py_stats:?}");
    t.finish().await;
}

/// One end takes no direct paths, and everything flows on the server path. The aiortc peer
/// declines: the native initiator stops after its first offer. The native client does not take
/// them (`with_direct(false)`, which its hello tells the server): the pair's policy is `none`,
/// so the aiortc initiator never offers at all (docs/PROTOCOL.md §3.13).
async fn declined(py_declines: bool) {
    // The decliner joins first, so the other end is the initiator.
    let mut t = Setup::with(py_declines, None, py_declines, !py_declines, 2).await;
    if py_declines {
        t.py.until("a declined offer", |_, l| {
            l == format!("declining {NATIVE} 1")
        })
        .await;
        t.native.until("the decline", |n| n.direct_failed > 0).await;
    } else {
        t.py.until("no direct path", |_, l| l == format!("declined {NATIVE}"))
            .await;
    }
    t.send_both(
        numbered("native", 0..50),
        numbered("aiortc", 0..50),
        Duration::ZERO,
    )
    .await;
    t.check_reliable().await;
    t.check_unreliable().await;
    let path = t.native.path();
    assert_eq!(path, Path::Server);
    assert!(t.py.path.is_none(), "aiortc peer path {:?}", t.py.path);
    let py_stats = t.py.stats().await;
    assert_eq!(py_stats["gen"], 0, "{py_stats:?}");
    assert!(!py_stats.contains_key("sent_direct"), "{py_stats:?}");
    t.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_peer_as_initiator() {
    exchange(false, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_peer_as_responder() {
    exchange(true, 2).await;
}

/// Old and new: a link protocol version 1 peer (`peer.py --link-version 1`) and the native
/// client interoperate as version 1, both ways round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_link_v1_initiator() {
    exchange(false, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_link_v1_responder() {
    exchange(true, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_initiator_survives_a_cut_direct_path() {
    cut_and_restore(false, (54100, 54199)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_responder_survives_a_cut_direct_path() {
    cut_and_restore(true, (54200, 54299)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_peer_declines_direct_paths() {
    declined(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_initiator_of_a_none_pair_never_offers() {
    declined(false).await;
}

/// Link protocol v2 under loss: with 5 % of the direct path's UDP dropped at random, the aiortc
/// peer sends max-size (16384-byte) unreliable messages to the native peer, then reliable ones.
/// Every reliable message arrives, in order, the first within 2 s of being sent: no unreliable
/// fragment left behind by a loss may hold the receiver's SCTP window (docs/PROTOCOL.md §7.6).
/// The link keeps working after the loss stops. The native client asks for a reliable "u2"
/// (`"u2_reliable"`), which the aiortc peer ignores, as §7.6 allows a stack that never bundles a
/// FORWARD-TSN with other chunks: its "u2" is truly unreliable, so parts are lost, and the
/// native end discards the incomplete messages; the nft rules count what they drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_max_size_unreliable_under_loss_then_reliable() {
    const PORTS: (u16, u16) = (54300, 54399);
    const UNRELIABLE: usize = 150;
    const RELIABLE: usize = 50;
    let mut t = Setup::new(false, Some(PORTS)).await;
    t.wait_paths(true).await;
    let py_stats = t.py.stats().await;
    assert_eq!(py_stats.get("version"), Some(&2), "{py_stats:?}");
    assert_eq!(py_stats.get("u2_reliable"), Some(&1), "{py_stats:?}");

    let before = t.native.client.link_stats(t.py_id).unwrap();
    let failed_before = t.native.direct_failed;
    // Input hook only: a drop on the output hook would fail the sender's sendto (EPERM), which
    // webrtc-sctp takes for a dead association.
    let loss = NftTable::udp_loss("aiortc_loss", PORTS, 5);
    let started = Instant::now();
    t.usend_many(UNRELIABLE, 16384, 10).await;
    eprintln!("unreliable sent in {:?}", started.elapsed());

    // Then reliable messages, still under loss.
    let to_native = numbered("after-loss", 0..RELIABLE);
    let sent_at = Instant::now();
    t.send_both(Vec::new(), to_native, PACE).await;
    t.native
        .until("the first reliable message", |n| !n.reliable.is_empty())
        .await;
    let first = t.native.reliable_at[0] - sent_at;
    let want = t.sent_to_native.len();
    t.native
        .until("every reliable message", |n| n.reliable.len() >= want)
        .await;
    t.native.drain(Duration::from_millis(200)).await;
    assert!(
        t.native.reliable == t.sent_to_native,
        "native peer: reliable stream differs (got {}, sent {})",
        t.native.reliable.len(),
        want
    );
    let unreliable = std::mem::take(&mut t.native.unreliable);
    let stats = t.native.client.link_stats(t.py_id).unwrap();
    let dropped = loss.dropped();
    eprintln!(
        "under loss: first reliable after {first:?}, {} of {UNRELIABLE} unreliable arrived, \
         {dropped} datagrams dropped, {} direct failures, native {stats:?}",
        unreliable.len(),
        t.native.direct_failed
    );
    assert!(
        first < Duration::from_secs(2),
        "the first reliable message took {first:?}"
    );
    assert!(!unreliable.is_empty(), "no unreliable message arrived");
    // The loss was real, and nothing was retransmitted for the unreliable messages: 16 parts
    // each at 5 % loss, so about half of them cannot be whole.
    assert!(dropped > 0, "no datagram dropped");
    assert!(
        unreliable.len() < UNRELIABLE,
        "every unreliable message arrived under loss: retransmitted?"
    );
    for m in &unreliable {
        let (i, pad) = m.split_once(' ').expect("numbered");
        assert!(
            m.len() == 16384 && i.parse::<usize>().is_ok() && pad.bytes().all(|b| b == b'x'),
            "unreliable message corrupted: {} bytes, {:?}",
            m.len(),
            &m[..m.len().min(20)]
        );
    }
    // All of it on the direct path, which survived the loss.
    assert_eq!(
        t.native.direct_failed, failed_before,
        "the direct path failed"
    );
    assert!(matches!(t.native.path(), Path::Direct { .. }));
    assert!(
        stats.recv_direct - before.recv_direct >= RELIABLE as u64,
        "reliable messages not received directly: {stats:?}"
    );

    // The loss stops: the link works, direct, both ways.
    drop(loss);
    t.native
        .until("a direct path", |n| matches!(n.path(), Path::Direct { .. }))
        .await;
    let deadline = Instant::now() + WAIT;
    loop {
        // Asked, not waited for: the path may never have changed.
        t.py.command(&format!("path {NATIVE}")).await;
        let line =
            t.py.until("its path", |_, l| l.starts_with(&format!("path {NATIVE} ")))
                .await;
        if line.contains(" direct ") {
            break;
        }
        assert!(Instant::now() < deadline, "aiortc peer: no direct path");
        sleep(Duration::from_millis(200)).await;
    }
    t.send_both(numbered("n-clear", 0..20), numbered("a-clear", 0..20), PACE)
        .await;
    t.check_reliable().await;
    t.check_unreliable().await;
    t.check_direct_now().await;
    let py_stats = t.py.stats().await;
    eprintln!("aiortc link stats: {py_stats:?}");
    assert!(
        py_stats.get("unreliable_split").copied().unwrap_or(0) >= UNRELIABLE as u64,
        "{py_stats:?}"
    );
    // The messages that lost a part were discarded (1 s after their first part), none held.
    let stats = t.native.client.link_stats(t.py_id).unwrap();
    assert!(
        stats.unreliable_incomplete > before.unreliable_incomplete,
        "no incomplete unreliable message discarded: {stats:?}"
    );
    t.finish().await;
}

/// A peer that breaks version 2's rules cannot stall us for good: a link protocol version 1 peer
/// (`peer.py --link-version 1`) sends max-size unreliable messages on the pre-negotiated `"u"`,
/// truly unreliable and in many SCTP chunks each, under 5 % loss. webrtc-sctp 0.17 never purges
/// the fragments such a lost message leaves (docs/PROTOCOL.md §7.3), so the native end's receive
/// window can run out and the association stall while ICE stays connected. The dead-path rule
/// (§8.7) must turn that into a reset: every reliable message sent afterwards still arrives, in
/// order, and once the loss stops the link is direct again and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_v1_peer_breaking_the_rule_cannot_stall_the_native_end() {
    const PORTS: (u16, u16) = (54600, 54699);
    const UNRELIABLE: usize = 300;
    const RELIABLE: usize = 50;
    let mut t = Setup::with(false, Some(PORTS), true, true, 1).await;
    t.wait_paths(true).await;
    let failed_before = t.native.direct_failed;
    let loss = NftTable::udp_loss("aiortc_v1_loss", PORTS, 5);
    t.usend_many(UNRELIABLE, 16384, 5).await;
    let to_native = numbered("v1-after-loss", 0..RELIABLE);
    let sent_at = Instant::now();
    t.send_both(Vec::new(), to_native, PACE).await;
    let want = t.sent_to_native.len();
    t.native
        .until("every reliable message", |n| n.reliable.len() >= want)
        .await;
    let all_in = sent_at.elapsed();
    t.native.drain(Duration::from_millis(200)).await;
    assert!(
        t.native.reliable == t.sent_to_native,
        "native peer: reliable stream differs (got {}, sent {})",
        t.native.reliable.len(),
        want
    );
    let unreliable = std::mem::take(&mut t.native.unreliable);
    let resets = t.native.direct_failed - failed_before;
    eprintln!(
        "v1 rule-breaker under loss: {} of {UNRELIABLE} unreliable arrived, {} datagrams \
         dropped; every reliable message in {all_in:?}; direct path reset {resets} time(s)",
        unreliable.len(),
        loss.dropped(),
    );

    drop(loss);
    t.native
        .until("a direct path", |n| matches!(n.path(), Path::Direct { .. }))
        .await;
    t.send_both(
        numbered("n-v1-clear", 0..20),
        numbered("a-v1-clear", 0..20),
        PACE,
    )
    .await;
    t.check_reliable().await;
    t.check_direct_now().await;
    t.finish().await;
}
