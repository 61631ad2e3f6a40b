//! UDP sockets with enlarged kernel buffers.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::batch::{self, RecvBatch};
use super::LOG;

/// A bound, non-blocking UDP socket registered with tokio.
pub(crate) struct BoundUdp {
    pub(crate) socket: UdpSocket,
    /// SO_RCVBUF / SO_SNDBUF as granted by the kernel (Linux reports twice the request, capped
    /// by net.core.rmem_max / wmem_max unless privileged).
    pub(crate) rcvbuf: usize,
    pub(crate) sndbuf: usize,
}

/// Creates a UDP socket for `addr`, asks for `buffer_bytes` of SO_RCVBUF and SO_SNDBUF, binds it
/// and hands it to tokio. Must be called inside a tokio runtime.
pub(crate) fn bind_udp(addr: SocketAddr, buffer_bytes: usize) -> io::Result<BoundUdp> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if buffer_bytes > 0 {
        // Failures here are not fatal: the kernel default still works, only slower.
        let _ = socket.set_recv_buffer_size(buffer_bytes);
        let _ = socket.set_send_buffer_size(buffer_bytes);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let rcvbuf = socket.recv_buffer_size().unwrap_or(0);
    let sndbuf = socket.send_buffer_size().unwrap_or(0);
    let socket = UdpSocket::from_std(socket.into())?;
    Ok(BoundUdp {
        socket,
        rcvbuf,
        sndbuf,
    })
}

/// A UDP socket the turn crate reads in a loop. `shut` closes it for good (and releases the
/// port once in-flight operations end); until then receive errors are logged and retried,
/// because the turn crate ends its read loop — and silently drops allocations — on any error.
pub(crate) struct ClosableUdp {
    socket: RwLock<Option<Arc<UdpSocket>>>,
    closed: CancellationToken,
    /// For logs: what this socket is ("listener", "relay 127.0.0.1:50000").
    what: String,
}

impl ClosableUdp {
    pub(crate) fn new(socket: UdpSocket, what: String) -> Self {
        ClosableUdp {
            socket: RwLock::new(Some(Arc::new(socket))),
            closed: CancellationToken::new(),
            what,
        }
    }

    /// The socket, unless shut.
    pub(crate) fn get(&self) -> webrtc_util::Result<Arc<UdpSocket>> {
        self.socket
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(webrtc_util::Error::ErrUseClosedNetworkConn)
    }

    /// Close for good: pending and later receives fail.
    pub(crate) fn shut(&self) {
        self.closed.cancel();
        self.socket
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// Completes once the socket is shut.
    pub(crate) fn closed(&self) -> WaitForCancellationFuture<'_> {
        self.closed.cancelled()
    }

    /// Runs `recv` (a receive loop on this socket) until it ends or the socket is shut.
    pub(crate) async fn until_closed<T>(
        &self,
        recv: impl std::future::Future<Output = T>,
    ) -> webrtc_util::Result<T> {
        tokio::select! {
            biased;
            r = recv => Ok(r),
            _ = self.closed() => Err(webrtc_util::Error::ErrUseClosedNetworkConn),
        }
    }

    /// Refills `batch` from `socket` (this socket, from [`ClosableUdp::get`]), waiting until
    /// something arrives. Receive errors are logged and retried; callers race this with
    /// [`ClosableUdp::closed`]. Yields to other tasks now and then (tokio's budget), since a
    /// busy socket would otherwise never make this wait.
    pub(crate) async fn refill(&self, socket: &UdpSocket, batch: &mut RecvBatch) {
        loop {
            match batch.fill(socket) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = socket.readable().await {
                        tracing::debug!(target: LOG, socket = %self.what, "waiting to read: {e}");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(target: LOG, socket = %self.what, "receive error: {e}");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        tokio::task::coop::consume_budget().await;
    }

    /// Sends one datagram without waiting: `WouldBlock` when the send buffer is full (or
    /// tokio has not seen the socket writable yet).
    pub(crate) fn try_send_to(&self, buf: &[u8], target: SocketAddr) -> io::Result<usize> {
        match &*self.socket.read().unwrap_or_else(|e| e.into_inner()) {
            Some(s) => s.try_send_to(buf, target),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("{} is closed", self.what),
            )),
        }
    }

    /// Sends `frames` to `target` without waiting (see [`batch::send_batch`]): how many went.
    pub(crate) fn try_send_batch(&self, frames: &[&[u8]], target: SocketAddr) -> io::Result<usize> {
        match &*self.socket.read().unwrap_or_else(|e| e.into_inner()) {
            Some(s) => batch::send_batch(s, frames, target),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("{} is closed", self.what),
            )),
        }
    }

    /// Sends one datagram: at once if there is room, else once there is.
    pub(crate) async fn send_to(&self, buf: &[u8], target: SocketAddr) -> io::Result<usize> {
        match self.try_send_to(buf, target) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let socket = self.get().map_err(|e| io::Error::other(e.to_string()))?;
                socket.send_to(buf, target).await
            }
            r => r,
        }
    }
}
