//! UDP sockets with enlarged kernel buffers.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

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
