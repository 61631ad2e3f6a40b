//! A TCP proxy for tests that cut a connection silently (shared with the browser tests, which
//! include this file by path).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy to the server whose connections can be cut silently: from the cut on, nothing
/// is forwarded either way (what is read is dropped), and nothing is closed, like a network
/// that stops carrying packets. Connections made after the cut work.
pub struct Proxy {
    addr: SocketAddr,
    cuts: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    /// New connections are closed at once (the server is unreachable).
    blocked: Arc<AtomicBool>,
    /// The forwarding tasks of every connection (aborting one drops its sockets).
    pipes: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy listening on `bind` (port 0: any) that forwards to `upstream`.
    pub async fn start(bind: SocketAddr, upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cuts: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let blocked = Arc::new(AtomicBool::new(false));
        let list = cuts.clone();
        let refuse = blocked.clone();
        let pipes: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let tasks = pipes.clone();
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                if refuse.load(Ordering::Relaxed) {
                    drop(down);
                    continue;
                }
                let Ok(up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let cut = Arc::new(AtomicBool::new(false));
                list.lock().unwrap().push(cut.clone());
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                let one = tokio::spawn(pipe(dr, uw, cut.clone())).abort_handle();
                let other = tokio::spawn(pipe(ur, dw, cut)).abort_handle();
                tasks.lock().unwrap().extend([one, other]);
            }
        });
        Proxy {
            addr,
            cuts,
            blocked,
            pipes,
            task,
        }
    }

    /// The WebSocket URL of the server through the proxy.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// While `true`, new connections are closed at once, as if the server were unreachable.
    pub fn block(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::Relaxed);
    }

    /// Close every connection made so far, both sides, without a WebSocket close frame (a
    /// reset network path).
    pub fn reset(&self) {
        for t in self.pipes.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Cut every connection made so far.
    pub fn cut(&self) {
        for c in self.cuts.lock().unwrap().iter() {
            c.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.reset();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.load(Ordering::Relaxed) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // After a cut, keep the other side open (a silent cut never closes anything).
    if cut.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
}
