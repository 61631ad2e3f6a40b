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
    _child: Child,
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
            _child: child,
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

    // Closing stdin ends a chat; the others print `left`.
    drop(carol.stdin);
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
