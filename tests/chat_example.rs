//! The chat example as a user runs it: three processes, one server, lines in and out.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// `target/<profile>/examples/chat`: a full `cargo test` builds it; a filtered run
/// (`--test chat_example`) does not, so build it then.
fn chat_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir
        .join("examples")
        .join(format!("chat{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo.args(["build", "--example", "chat"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        assert!(
            cargo.status().unwrap().success(),
            "building the chat example failed"
        );
    }
    bin
}

struct Chat {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    seen: Vec<String>,
}

impl Chat {
    fn start(url: &str, name: &str) -> Chat {
        Chat::start_with(url, name, &[])
    }

    fn start_with(url: &str, name: &str, extra: &[&str]) -> Chat {
        let mut child = Command::new(chat_binary())
            .args([
                "--server",
                url,
                "--group",
                "lobby",
                "--name",
                name,
                "--loopback-only",
            ])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("run the chat example (built by cargo test)");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Chat {
            child,
            stdin,
            lines,
            seen: Vec::new(),
        }
    }

    async fn say(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Wait until `line` has been printed (it may have been printed already).
    async fn expect(&mut self, line: &str) {
        if self.seen.iter().any(|l| l == line) {
            return;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match tokio::time::timeout_at(deadline, self.lines.next_line()).await {
                Ok(Ok(Some(l))) => {
                    let hit = l == line;
                    self.seen.push(l);
                    if hit {
                        return;
                    }
                }
                Ok(_) => panic!("chat exited before printing {line:?}; saw {:?}", self.seen),
                Err(_) => panic!("no {line:?} within 15 s; saw {:?}", self.seen),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_chat_processes_talk_and_go_direct() {
    let server = common::server().await;
    let url = server.ws_url();
    let mut alice = Chat::start(&url, "alice");
    alice.expect_nothing_yet().await;
    let mut bob = Chat::start(&url, "bob");
    alice.expect("joined bob").await;
    // Typed the instant carol joins: delivered through the server, no waiting for ICE.
    let mut carol = Chat::start(&url, "carol");
    carol.say("early bird").await;
    for c in [&mut alice, &mut bob] {
        c.expect("joined carol").await;
        c.expect("carol: early bird").await;
    }
    carol.expect("joined alice").await;
    carol.expect("joined bob").await;

    // Every pair ends on a direct host/host path, as printed.
    alice.expect("path bob direct host/host").await;
    alice.expect("path carol direct host/host").await;
    bob.expect("path alice direct host/host").await;
    bob.expect("path carol direct host/host").await;
    carol.expect("path alice direct host/host").await;
    carol.expect("path bob direct host/host").await;

    alice.say("hello from alice").await;
    bob.expect("alice: hello from alice").await;
    carol.expect("alice: hello from alice").await;
    bob.say("hi all").await;
    alice.expect("bob: hi all").await;
    carol.expect("bob: hi all").await;

    // Closing stdin ends a chat (it exits within its flush and close bounds, 5 s + 2 s); the
    // others print `left`.
    drop(carol.stdin);
    let t = tokio::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(15), carol.child.wait())
        .await
        .expect("carol's chat did not exit within 15 s of its stdin closing")
        .unwrap();
    assert!(status.success(), "carol's chat: {status}");
    eprintln!("carol exited {:?} after its stdin closed", t.elapsed());
    alice.expect("left carol").await;
    bob.expect("left carol").await;
}

impl Chat {
    /// Give the first process a moment to join before the next one starts.
    async fn expect_nothing_yet(&mut self) {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_chats_report_a_relay_path() {
    use peermesh_server::turn::TurnConfig;
    use peermesh_server::{Config, TurnMode};
    let server = common::server_with(Config {
        turn: TurnMode::Embedded(TurnConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            relay_ports: (50500, 50599),
            allow_peers: vec!["127.0.0.0/8".parse().unwrap()],
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let url = server.ws_url();
    let mut alice = Chat::start_with(&url, "alice", &["--relay-only"]);
    alice.expect_nothing_yet().await;
    let mut bob = Chat::start_with(&url, "bob", &["--relay-only"]);
    alice.expect("joined bob").await;
    alice.expect("path bob direct relay/relay").await;
    bob.expect("path alice direct relay/relay").await;
    bob.say("through the relay").await;
    alice.expect("bob: through the relay").await;
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peermesh-chat-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `len` bytes of a pattern in `path`; returns their SHA-256 in hex.
fn write_file(path: &std::path::Path, len: usize) -> String {
    use sha2::Digest;
    let data: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
    std::fs::write(path, &data).unwrap();
    sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_puts_a_file_in_the_peers_download_dir() {
    let server = common::server().await;
    let url = server.ws_url();
    let dir = temp_dir("send");
    let (out, inbox) = (dir.join("out"), dir.join("in"));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&inbox).unwrap();
    let src = out.join("report.pdf");
    let sha = write_file(&src, (3 << 20) + 99);
    let mut alice = Chat::start(&url, "alice");
    alice.expect_nothing_yet().await;
    let mut bob = Chat::start_with(&url, "bob", &["--download-dir", inbox.to_str().unwrap()]);
    alice.expect("joined bob").await;
    bob.expect("joined alice").await;
    alice
        .say(&format!("/send bob {}", src.to_str().unwrap()))
        .await;
    bob.expect(&format!(
        "received report.pdf from alice ({} bytes, sha256 {sha})",
        (3 << 20) + 99
    ))
    .await;
    alice.expect("sent report.pdf to bob").await;
    assert_eq!(
        std::fs::read(inbox.join("report.pdf")).unwrap(),
        std::fs::read(&src).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The receiving chat process is killed (SIGKILL) mid-transfer and started again on the same
/// download directory: the same file sent again continues from the offset it had verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_receiver_continues_the_file_after_a_restart() {
    use peermesh::{ClientConfig, Event, FileError};
    let server = common::server_with(peermesh_server::Config {
        // The killed process's session is given up after 1 s (not the default 30 s).
        resume_grace: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let url = server.ws_url();
    let dir = temp_dir("kill");
    let inbox = dir.join("in");
    std::fs::create_dir_all(&inbox).unwrap();
    let src = dir.join("video.bin");
    let size: u64 = 32 << 20;
    let sha = write_file(&src, size as usize);
    let args = ["--download-dir", inbox.to_str().unwrap()];
    let (bob, mut bob_events) =
        common::client_with(&server, ClientConfig::new("bob").with_loopback_only(true)).await;
    bob.join("lobby").await.unwrap();
    let mut alice = Chat::start_with(&url, "alice", &args);
    alice.expect("joined bob").await;
    let alice_id = match common::wait_for(&mut bob_events, 30, |e| {
        matches!(e, Event::MemberJoined { .. })
    })
    .await
    {
        Event::MemberJoined { peer, .. } => peer,
        _ => unreachable!(),
    };
    let transfer = bob.send_file(alice_id, &src).await.unwrap();
    // Killed once the receiver has persisted 8 MiB (its state file says so).
    // `.video.bin.<hash>.peermesh-part.json`
    let state_file = || {
        std::fs::read_dir(&inbox).ok()?.find_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            (name.starts_with(".video.bin.") && name.ends_with(".peermesh-part.json"))
                .then(|| inbox.join(name))
        })
    };
    let verified_in_state = || -> u64 {
        state_file()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["verified"].as_u64())
            .unwrap_or(0)
    };
    let t = tokio::time::Instant::now();
    while verified_in_state() < 8 << 20 {
        assert!(t.elapsed() < Duration::from_secs(60), "no 8 MiB verified");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    alice.child.start_kill().unwrap();
    alice.child.wait().await.unwrap();
    match tokio::time::timeout(Duration::from_secs(30), transfer.outcome())
        .await
        .expect("the transfer ends once the killed receiver is gone")
    {
        Err(FileError::PeerGone(_)) => {}
        other => panic!("{other:?}"),
    }
    let verified = verified_in_state();
    assert!(verified >= 8 << 20, "{verified}");
    assert!(verified < size, "{verified}");
    assert!(!inbox.join("video.bin").exists());

    // Started again: the same file continues where the verified part ends.
    let mut alice = Chat::start_with(&url, "alice", &args);
    alice.expect("joined bob").await;
    let alice_id = match common::wait_for(&mut bob_events, 30, |e| {
        matches!(e, Event::MemberJoined { .. })
    })
    .await
    {
        Event::MemberJoined { peer, .. } => peer,
        _ => unreachable!(),
    };
    let transfer = bob.send_file(alice_id, &src).await.unwrap();
    let sent = tokio::time::timeout(Duration::from_secs(120), transfer.outcome())
        .await
        .unwrap()
        .unwrap();
    eprintln!(
        "killed after {} MiB verified; {} MiB sent the second time",
        verified >> 20,
        (size - sent.resumed_from) >> 20
    );
    assert_eq!(
        sent.resumed_from, verified,
        "resumed from the verified offset"
    );
    alice
        .expect(&format!(
            "received video.bin from bob ({size} bytes, sha256 {sha})"
        ))
        .await;
    assert_eq!(
        std::fs::read(inbox.join("video.bin")).unwrap(),
        std::fs::read(&src).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The sending chat process is killed (SIGKILL) mid-transfer and started again: `/send` of the
/// same file continues from what the receiver verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sender_continues_the_file_after_a_restart() {
    use peermesh::{ClientConfig, Event};
    let server = common::server_with(peermesh_server::Config {
        resume_grace: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let url = server.ws_url();
    let dir = temp_dir("kill-sender");
    let inbox = dir.join("in");
    std::fs::create_dir_all(&inbox).unwrap();
    let src = dir.join("backup.tar");
    let size: u64 = 32 << 20;
    let sha = write_file(&src, size as usize);
    let (bob, mut bob_events) =
        common::client_with(&server, ClientConfig::new("bob").with_loopback_only(true)).await;
    bob.join("lobby").await.unwrap();
    let send_line = format!("/send bob {}", src.to_str().unwrap());

    let mut alice = Chat::start(&url, "alice");
    alice.expect("joined bob").await;
    alice.say(&send_line).await;
    let Event::FileOffered(offer) =
        common::wait_for(&mut bob_events, 30, |e| matches!(e, Event::FileOffered(_))).await
    else {
        unreachable!()
    };
    offer.accept_into(&inbox);
    common::wait_for(
        &mut bob_events,
        60,
        |e| matches!(e, Event::FileProgress { done, .. } if *done >= 8 << 20),
    )
    .await;
    alice.child.start_kill().unwrap();
    alice.child.wait().await.unwrap();
    common::wait_for(&mut bob_events, 30, |e| {
        matches!(e, Event::FileFailed { .. })
    })
    .await;

    let mut alice = Chat::start(&url, "alice");
    alice.expect("joined bob").await;
    alice.say(&send_line).await;
    let Event::FileOffered(offer) =
        common::wait_for(&mut bob_events, 30, |e| matches!(e, Event::FileOffered(_))).await
    else {
        unreachable!()
    };
    offer.accept_into(&inbox);
    let received = match common::wait_for(&mut bob_events, 120, |e| {
        matches!(e, Event::FileReceived(_) | Event::FileFailed { .. })
    })
    .await
    {
        Event::FileReceived(f) => f,
        other => panic!("{other:?}"),
    };
    alice.expect("sent backup.tar to bob").await;
    eprintln!(
        "sender killed; {} MiB kept, {} MiB sent the second time",
        received.resumed_from >> 20,
        (size - received.resumed_from) >> 20
    );
    assert!(
        received.resumed_from >= 8 << 20,
        "{}",
        received.resumed_from
    );
    let hex: String = received.sha256.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, sha);
    assert_eq!(
        std::fs::read(received.path.as_ref().unwrap()).unwrap(),
        std::fs::read(&src).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
