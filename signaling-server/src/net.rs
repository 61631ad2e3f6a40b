//! The TCP front: our own accept loop in front of axum, so that a public server can bound what
//! connections cost before any request is parsed.
//!
//! * Connections are counted in total and per source IP ([`ConnLimiter`]); one over either limit
//!   gets `HTTP/1.1 503 Service Unavailable` with `Retry-After` and is closed, never silence.
//! * A file descriptor is kept in reserve: when `accept` fails with "too many open files" the
//!   reserve is released for one moment to accept the waiting client, answer it 503 and close it,
//!   so a client never hangs in the backlog without an answer and the log is not flooded.
//! * HTTP/1.1 only (hyper), with a header-read timeout (slowloris) and a whole-connection
//!   deadline until the WebSocket upgrade (a client that never upgrades is closed).
//! * The listen backlog is set explicitly (tokio's default is 1024; bursts of connects need more).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::ServiceExt as _;

use crate::metrics::{Metrics, RefusedReason};

/// Limits of the TCP front (see [`crate::ServerLimits`] for the documented defaults).
#[derive(Debug, Clone)]
pub(crate) struct FrontConfig {
    /// Refused connections answered on a task of their own at once (each holds a descriptor
    /// for up to a second); past this many the 503 is written without waiting.
    pub(crate) max_refusals_in_flight: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) upgrade_timeout: Duration,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `max_connections` reached.
    Total,
    /// `max_connections_per_ip` reached for this source.
    PerIp,
}

/// Counts open connections, in total and per source IP.
pub(crate) struct ConnLimiter {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    metrics: Arc<Metrics>,
}

/// One admitted connection; dropping it (the last clone, which a WebSocket session holds until
/// it ends) frees its place.
pub(crate) struct ConnSlot {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

impl ConnLimiter {
    pub(crate) fn new(max_total: usize, max_per_ip: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(ConnLimiter {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// Admit a connection from `ip`, or say which limit it is over. IPv6 sources count per
    /// /64 (one subscriber's prefix), IPv4-mapped ones as their IPv4 address.
    pub(crate) fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Refusal> {
        let ip = crate::turn::quota_ip(ip);
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            return Err(Refusal::Total);
        }
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(Refusal::PerIp);
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        self.metrics.connections.inc();
        Ok(ConnSlot {
            limiter: self.clone(),
            ip,
        })
    }

    /// Open connections now.
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let l = &self.limiter;
        let mut per_ip = l.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        l.total.fetch_sub(1, Ordering::Relaxed);
        l.metrics.connections.dec();
    }
}

/// What the router sees of the connection a request came on (a request extension).
#[derive(Clone)]
pub(crate) struct ConnInfo {
    pub(crate) remote: SocketAddr,
    /// The WebSocket session keeps this so the connection keeps counting until the session ends.
    pub(crate) slot: Arc<ConnSlot>,
}

/// Bind a TCP listener with an explicit backlog (and `SO_REUSEADDR`, as tokio does).
pub(crate) fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The response for a refused connection.
fn refusal_response(reason: &str) -> String {
    let body = format!("{reason}\n");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Answer a refused connection with 503 and close it. The client's request is read (and thrown
/// away) for up to a second so that closing does not reset the connection before the client
/// has read the answer.
async fn refuse(
    mut tcp: TcpStream,
    reason: &'static str,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    use tokio::io::AsyncReadExt as _;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(refusal_response(reason).as_bytes()).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut left: usize = 16 * 1024;
        while left > 0 {
            let n = tcp.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        io::Result::Ok(())
    })
    .await;
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// The reserve descriptor released when `accept` runs out of file descriptors.
fn open_reserve() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Accept connections until `shutdown` turns true, serving each with `router`.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limiter: Arc<ConnLimiter>,
    config: FrontConfig,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut reserve = open_reserve();
    let refusals = Arc::new(tokio::sync::Semaphore::new(
        config.max_refusals_in_flight.max(1),
    ));
    let mut last_fd_warning: Option<Instant> = None;
    let mut fd_refusals_since_warning = 0u64;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((tcp, remote)) => {
                // Small frames (signals, acks, pings) must not wait for Nagle's algorithm: with
                // Linux's delayed acks that costs ~40 ms a round trip.
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!("TCP_NODELAY: {e}");
                }
                match limiter.try_acquire(remote.ip()) {
                    Ok(slot) => {
                        tokio::spawn(serve_conn(
                            tcp,
                            remote,
                            Arc::new(slot),
                            router.clone(),
                            config.clone(),
                            shutdown.clone(),
                        ));
                    }
                    Err(refusal) => {
                        let (reason, text) = match refusal {
                            Refusal::Total => (RefusedReason::MaxConnections, "server full"),
                            Refusal::PerIp => (
                                RefusedReason::MaxConnectionsPerIp,
                                "too many connections from this address",
                            ),
                        };
                        metrics.refused(reason);
                        tracing::debug!(%remote, ?refusal, "connection refused");
                        match refusals.clone().try_acquire_owned() {
                            Ok(permit) => {
                                tokio::spawn(refuse(tcp, text, permit));
                            }
                            Err(_) => {
                                let _ = tcp.try_write(refusal_response(text).as_bytes());
                            }
                        }
                    }
                }
            }
            Err(e) if is_fd_exhaustion(&e) => {
                metrics.refused(RefusedReason::FileDescriptors);
                fd_refusals_since_warning += 1;
                // Free the reserve, take the waiting client and tell it, then hold the reserve
                // again. Without a reserve (it could not be reopened) back off briefly.
                if reserve.take().is_some() {
                    if let Ok((tcp, _)) = listener.accept().await {
                        let _ =
                            tcp.try_write(refusal_response("server out of resources").as_bytes());
                        drop(tcp);
                    }
                    reserve = open_reserve();
                } else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    reserve = open_reserve();
                }
                if last_fd_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!(
                        refused = fd_refusals_since_warning,
                        "out of file descriptors: refusing connections (raise the nofile limit \
                         or lower limits.max_connections)"
                    );
                    last_fd_warning = Some(Instant::now());
                    fd_refusals_since_warning = 0;
                }
            }
            Err(e) => {
                // ECONNABORTED and friends: the client gave up; nothing to do.
                tracing::debug!("accept: {e}");
            }
        }
    }
}

/// Serve one connection: HTTP/1.1 with upgrades, until it ends, is upgraded, or runs past the
/// upgrade deadline.
async fn serve_conn(
    tcp: TcpStream,
    remote: SocketAddr,
    slot: Arc<ConnSlot>,
    router: Router,
    config: FrontConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let info = ConnInfo { remote, slot };
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(info.clone());
        router.clone().oneshot(req.map(Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(ElasticReader::new(tcp)), service)
        .with_upgrades();
    tokio::pin!(conn);
    let deadline = tokio::time::sleep(config.upgrade_timeout);
    tokio::pin!(deadline);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%remote, "connection: {e}");
            }
        }
        () = &mut deadline => tracing::debug!(%remote, "closing a connection that never upgraded"),
        _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_counts_total_and_per_ip() {
        let l = ConnLimiter::new(3, 2, Arc::new(Metrics::new()));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = l.try_acquire(a).unwrap();
        let _s2 = l.try_acquire(a).unwrap();
        assert_eq!(l.try_acquire(a).err(), Some(Refusal::PerIp));
        let _s3 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(b).err(), Some(Refusal::Total));
        drop(s1);
        assert_eq!(l.open(), 2);
        assert!(l.try_acquire(a).is_ok());
    }

    #[test]
    fn ipv6_sources_count_per_64_and_mapped_ones_as_ipv4() {
        let l = ConnLimiter::new(10, 1, Arc::new(Metrics::new()));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _s = l.try_acquire(a).unwrap();
        assert_eq!(l.try_acquire(same_64).err(), Some(Refusal::PerIp));
        assert!(l.try_acquire(other_64).is_ok());
        let _v4 = l.try_acquire("192.0.2.7".parse().unwrap()).unwrap();
        assert_eq!(
            l.try_acquire("::ffff:192.0.2.7".parse().unwrap()).err(),
            Some(Refusal::PerIp)
        );
    }

    #[test]
    fn refusal_is_a_complete_http_response() {
        let r = refusal_response("server full");
        assert!(r.starts_with("HTTP/1.1 503 "));
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
}

/// How much a busy connection reads from its socket at once (see [`ElasticReader`]).
const BUSY_READ: usize = 64 * 1024;

/// A socket reader whose buffer exists only while the connection is busy.
///
/// The WebSocket layer reads in small steps (its buffer is small so that idle sessions cost
/// little). While reads come back small they go straight to the socket. Once a read fills the
/// caller's whole buffer (more is probably waiting), the socket is read [`BUSY_READ`] bytes at a
/// time into a buffer of our own and handed out from there: one system call per 64 KiB instead
/// of one per small step. When a socket read no longer fills that buffer, it is freed again once
/// drained.
pub(crate) struct ElasticReader<T> {
    inner: T,
    /// Present while busy.
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    /// The last socket read filled the buffer it was given.
    busy: bool,
}

impl<T> ElasticReader<T> {
    pub(crate) fn new(inner: T) -> Self {
        ElasticReader {
            inner,
            buf: None,
            start: 0,
            end: 0,
            busy: false,
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ElasticReader<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        dst: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if let Some(buf) = &this.buf {
                if this.start < this.end {
                    let n = (this.end - this.start).min(dst.remaining());
                    dst.put_slice(&buf[this.start..this.start + n]);
                    this.start += n;
                    return Poll::Ready(Ok(()));
                }
                if !this.busy {
                    // Drained and the socket was not keeping up with us: idle again.
                    this.buf = None;
                    continue;
                }
                let buf = this.buf.as_mut().expect("checked above");
                let mut rb = tokio::io::ReadBuf::new(buf);
                match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        this.busy = n == BUSY_READ;
                        (this.start, this.end) = (0, n);
                        if n == 0 {
                            this.buf = None;
                            return Poll::Ready(Ok(()));
                        }
                    }
                    other => return other,
                }
            } else {
                let before = dst.filled().len();
                let wanted = dst.remaining();
                let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, dst);
                if matches!(r, Poll::Ready(Ok(())))
                    && wanted > 0
                    && wanted < BUSY_READ
                    && dst.filled().len() - before == wanted
                {
                    this.buf = Some(vec![0; BUSY_READ].into_boxed_slice());
                    (this.start, this.end, this.busy) = (0, 0, true);
                }
                return r;
            }
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ElasticReader<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod elastic_tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    /// Whatever the pattern of writes and read sizes, the bytes come out exactly once and in
    /// order, and the buffer is gone once the reader has caught up.
    #[tokio::test]
    async fn hands_out_every_byte_once_in_order_and_frees_its_buffer() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut r = ElasticReader::new(rx);
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                for chunk in data.chunks(70_001) {
                    tx.write_all(chunk).await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut got = Vec::new();
        let mut step = [0u8; 4096];
        let mut saw_buffer = false;
        while got.len() < data.len() {
            let n = r.read(&mut step[..(got.len() % 4000) + 96]).await.unwrap();
            assert!(n > 0);
            saw_buffer |= r.buf.is_some();
            got.extend_from_slice(&step[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got, data);
        assert!(saw_buffer, "a busy stream is read through the buffer");
        // The writer is gone: the end of the stream frees the buffer.
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert!(r.buf.is_none());
    }
}
