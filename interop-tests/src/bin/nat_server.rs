//! The peermesh server for the NAT lab (`src/nat.rs`): the `peermesh-server` library with the
//! same configuration path as the `peermesh-server` binary (built-in defaults, then these flags,
//! resolved by `FileConfig::resolve`), built by cargo together with the lab's tests so it is
//! never stale. Flags (a subset of `peermesh-server`'s, same names and meaning):
//! `--listen ADDR --turn-listen ADDR --turn-relay-ports A-B --turn-allow-peer CIDR --no-turn
//! --ice-server URL --heartbeat-timeout-ms MS`. Runs until SIGTERM/SIGINT or end of stdin.

use peermesh_server::config::FileConfig;
use peermesh_server::Server;
use tokio::io::AsyncReadExt;

fn config() -> Result<FileConfig, String> {
    let mut top = FileConfig::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--no-turn" {
            top.turn.mode = Some("off".into());
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--listen" => top.listen = Some(value.parse().map_err(|e| bad(&e))?),
            "--turn-listen" => top.turn.listen = Some(value.parse().map_err(|e| bad(&e))?),
            "--turn-relay-ports" => top.turn.relay_ports = Some(value),
            "--turn-allow-peer" => top
                .turn
                .allow_peers
                .get_or_insert_with(Vec::new)
                .push(value),
            "--ice-server" => top.ice_servers.get_or_insert_with(Vec::new).push(value),
            "--admin-listen" => top.admin_listen = Some(value),
            "--heartbeat-timeout-ms" => {
                top.heartbeat_timeout_ms = Some(value.parse().map_err(|e| bad(&e))?)
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    // The lab's addresses are not loopback: run open on purpose (a test network).
    top.auth.mode = Some("open".into());
    let mut config = FileConfig::defaults();
    config.overlay(top);
    Ok(config)
}

#[tokio::main]
async fn main() {
    let file = match config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nat_server: {e}");
            std::process::exit(2);
        }
    };
    let config = match file.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nat_server: invalid configuration: {e:#}");
            std::process::exit(2);
        }
    };
    let server = match Server::bind(config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nat_server: {e:#}");
            std::process::exit(1);
        }
    };
    println!("listening on {}", server.ws_url());
    if let Some(turn) = server.turn() {
        println!("STUN/TURN on udp {}", turn.local_addr());
    }
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        let eof = async move { while !matches!(stdin.read(&mut buf).await, Ok(0) | Err(_)) {} };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = eof => {}
        }
    };
    if let Err(e) = server.run(shutdown).await {
        eprintln!("nat_server: {e:#}");
        std::process::exit(1);
    }
}
