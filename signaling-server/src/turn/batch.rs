//! Receiving and sending several datagrams per system call.
//!
//! Relaying costs two receives and two sends per datagram and round trip, and on a virtual
//! machine the system-call entry and exit are a large part of each. [`RecvBatch`] fills up to
//! its capacity of slots with one `recvmmsg(2)` call and [`send_batch`] sends several datagrams
//! to one destination with one `sendmmsg(2)` call (64-bit little-endian Linux, where the
//! `msghdr` layout below is the C library's); elsewhere they go one per call through tokio.
//!
//! The FFI is declared here because the crate does not depend on `libc`; it is limited to
//! these two calls with `MSG_DONTWAIT`, on buffers borrowed for the call, with the results
//! bounds-checked.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Most datagrams one [`RecvBatch::fill`] takes.
pub(crate) const MAX_BATCH: usize = 32;

/// Received datagrams in fixed-size slots, consumed front to back.
pub(crate) struct RecvBatch {
    buf: Vec<u8>,
    /// Bytes per slot, including `headroom`.
    slot: usize,
    /// Bytes kept free in front of each datagram (for a ChannelData header).
    headroom: usize,
    capacity: usize,
    /// (length, source, truncated) of each filled slot; `None` for an unusable source address.
    got: Vec<Option<(usize, SocketAddr, bool)>>,
    next: usize,
}

impl RecvBatch {
    /// `capacity` slots (at most [`MAX_BATCH`]) for datagrams of up to `max_datagram` bytes,
    /// each with `headroom` free bytes in front.
    pub(crate) fn new(capacity: usize, max_datagram: usize, headroom: usize) -> Self {
        let capacity = capacity.clamp(1, MAX_BATCH);
        let slot = headroom + max_datagram;
        RecvBatch {
            buf: vec![0u8; capacity * slot],
            slot,
            headroom,
            capacity,
            got: Vec::with_capacity(capacity),
            next: 0,
        }
    }

    /// The next received datagram: `(slot index, length, source, truncated)`.
    pub(crate) fn pop(&mut self) -> Option<(usize, usize, SocketAddr, bool)> {
        while self.next < self.got.len() {
            let i = self.next;
            self.next += 1;
            if let Some((n, src, trunc)) = self.got[i] {
                return Some((i, n, src, trunc));
            }
        }
        None
    }

    /// Slot `i`: the headroom followed by the datagram (`len` bytes).
    pub(crate) fn frame_mut(&mut self, i: usize, len: usize) -> &mut [u8] {
        let start = i * self.slot;
        &mut self.buf[start..start + self.headroom + len]
    }

    /// Slot `i`: the headroom followed by the datagram (`len` bytes).
    pub(crate) fn frame(&self, i: usize, len: usize) -> &[u8] {
        let start = i * self.slot;
        &self.buf[start..start + self.headroom + len]
    }

    /// The datagram in slot `i`.
    pub(crate) fn data(&self, i: usize, len: usize) -> &[u8] {
        let start = i * self.slot + self.headroom;
        &self.buf[start..start + len]
    }

    /// Receives what is queued on `socket` (at least one datagram) without waiting, replacing
    /// the batch's contents. `WouldBlock` when nothing is queued (tokio's readiness is cleared,
    /// so `socket.readable()` then waits for more).
    pub(crate) fn fill(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.got.clear();
        self.next = 0;
        socket.try_io(Interest::READABLE, || sys::recv_batch(self, socket))
    }

    /// One datagram per call (the portable way).
    #[allow(dead_code)]
    fn fill_one(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let (start, end) = (self.headroom, self.slot);
        let cap = end - start;
        let (n, src) = socket.try_recv_from(&mut self.buf[start..end])?;
        // tokio does not say whether the datagram was cut; a full slot may have been.
        self.got.push(Some((n.min(cap), src, n >= cap)));
        Ok(1)
    }
}

/// Sends `frames` (at most [`MAX_BATCH`]) to `dst` without waiting, with as few system calls as
/// possible (one `sendmmsg(2)` where available). Returns how many were sent, in order;
/// `WouldBlock` if the send buffer had room for none.
pub(crate) fn send_batch(
    socket: &UdpSocket,
    frames: &[&[u8]],
    dst: SocketAddr,
) -> io::Result<usize> {
    if frames.is_empty() {
        return Ok(0);
    }
    socket.try_io(Interest::WRITABLE, || sys::send_batch(socket, frames, dst))
}

/// [`send_batch`] one datagram per call.
#[allow(dead_code)]
fn send_one_by_one(socket: &UdpSocket, frames: &[&[u8]], dst: SocketAddr) -> io::Result<usize> {
    let mut sent = 0;
    for f in frames {
        match socket.try_send_to(f, dst) {
            Ok(_) => sent += 1,
            Err(e) if sent > 0 && e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

fn addr_v4(port: u16, octets: [u8; 4]) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(octets), port))
}

fn addr_v6(port: u16, octets: [u8; 16], flowinfo: u32, scope_id: u32) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from(octets),
        port,
        flowinfo,
        scope_id,
    ))
}

#[cfg(all(
    target_os = "linux",
    target_pointer_width = "64",
    target_endian = "little"
))]
mod sys {
    use std::ffi::{c_int, c_uint, c_void};
    use std::io;
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;
    use std::ptr;

    use tokio::net::UdpSocket;

    use super::{addr_v4, addr_v6, RecvBatch, MAX_BATCH};

    /// `struct iovec`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct IoVec {
        base: *mut c_void,
        len: usize,
    }

    /// `struct msghdr` of glibc on 64-bit Linux (musl's, with its padding words, has the same
    /// little-endian layout).
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct MsgHdr {
        name: *mut c_void,
        namelen: u32,
        iov: *mut IoVec,
        iovlen: usize,
        control: *mut c_void,
        controllen: usize,
        flags: c_int,
    }

    /// `struct mmsghdr`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct MMsgHdr {
        hdr: MsgHdr,
        len: c_uint,
    }

    /// `struct sockaddr_storage`.
    #[repr(C, align(8))]
    #[derive(Clone, Copy)]
    struct SockAddrStorage([u8; 128]);

    const MSG_TRUNC: c_int = 0x20;
    const MSG_DONTWAIT: c_int = 0x40;
    const AF_INET: u16 = 2;
    const AF_INET6: u16 = 10;

    extern "C" {
        fn sendmmsg(fd: c_int, msgvec: *mut MMsgHdr, vlen: c_uint, flags: c_int) -> c_int;
        fn recvmmsg(
            fd: c_int,
            msgvec: *mut MMsgHdr,
            vlen: c_uint,
            flags: c_int,
            timeout: *mut c_void,
        ) -> c_int;
    }

    const NO_IOV: IoVec = IoVec {
        base: ptr::null_mut(),
        len: 0,
    };
    const NO_HDR: MMsgHdr = MMsgHdr {
        hdr: MsgHdr {
            name: ptr::null_mut(),
            namelen: 0,
            iov: ptr::null_mut(),
            iovlen: 0,
            control: ptr::null_mut(),
            controllen: 0,
            flags: 0,
        },
        len: 0,
    };

    /// `dst` as a `sockaddr_in` / `sockaddr_in6`, and its length.
    fn encode(dst: SocketAddr) -> (SockAddrStorage, u32) {
        let mut s = SockAddrStorage([0; 128]);
        let b = &mut s.0;
        match dst {
            SocketAddr::V4(a) => {
                b[0..2].copy_from_slice(&AF_INET.to_ne_bytes());
                b[2..4].copy_from_slice(&a.port().to_be_bytes());
                b[4..8].copy_from_slice(&a.ip().octets());
                (s, 16)
            }
            SocketAddr::V6(a) => {
                b[0..2].copy_from_slice(&AF_INET6.to_ne_bytes());
                b[2..4].copy_from_slice(&a.port().to_be_bytes());
                b[4..8].copy_from_slice(&a.flowinfo().to_ne_bytes());
                b[8..24].copy_from_slice(&a.ip().octets());
                b[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
                (s, 28)
            }
        }
    }

    pub(super) fn send_batch(
        socket: &UdpSocket,
        frames: &[&[u8]],
        dst: SocketAddr,
    ) -> io::Result<usize> {
        let count = frames.len().min(MAX_BATCH);
        let (mut name, namelen) = encode(dst);
        let mut iovs = [NO_IOV; MAX_BATCH];
        let mut hdrs = [NO_HDR; MAX_BATCH];
        let iov_ptr = iovs.as_mut_ptr();
        let name_ptr: *mut c_void = name.0.as_mut_ptr().cast();
        for (i, (h, f)) in hdrs.iter_mut().zip(frames).enumerate().take(count) {
            // SAFETY: `i < count <= MAX_BATCH`, within `iovs`.
            unsafe {
                *iov_ptr.add(i) = IoVec {
                    base: f.as_ptr().cast_mut().cast(),
                    len: f.len(),
                };
                h.hdr.iov = iov_ptr.add(i);
            }
            h.hdr.name = name_ptr;
            h.hdr.namelen = namelen;
            h.hdr.iovlen = 1;
        }
        // SAFETY: each header points at a live iovec of this frame describing a live slice
        // (the kernel only reads from it) and at the encoded destination. MSG_DONTWAIT:
        // never blocks.
        let r = unsafe {
            sendmmsg(
                socket.as_raw_fd(),
                hdrs.as_mut_ptr(),
                count as c_uint,
                MSG_DONTWAIT,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((r as usize).min(count))
    }

    pub(super) fn recv_batch(b: &mut RecvBatch, socket: &UdpSocket) -> io::Result<usize> {
        let count = b.capacity.min(MAX_BATCH);
        let room = b.slot - b.headroom;
        assert!(b.buf.len() >= count * b.slot);
        let mut iovs = [NO_IOV; MAX_BATCH];
        let mut names = [SockAddrStorage([0; 128]); MAX_BATCH];
        let mut hdrs = [NO_HDR; MAX_BATCH];
        let base = b.buf.as_mut_ptr();
        let iov_ptr = iovs.as_mut_ptr();
        let name_ptr = names.as_mut_ptr();
        for (i, h) in hdrs.iter_mut().enumerate().take(count) {
            // SAFETY: slot `i` lies within `b.buf` (asserted above), and `i < MAX_BATCH` for
            // the three local arrays.
            unsafe {
                *iov_ptr.add(i) = IoVec {
                    base: base.add(i * b.slot + b.headroom).cast(),
                    len: room,
                };
                h.hdr.name = name_ptr.add(i).cast();
                h.hdr.iov = iov_ptr.add(i);
            }
            h.hdr.namelen = 128;
            h.hdr.iovlen = 1;
        }
        // SAFETY: every header points at a live iovec and sockaddr_storage of this frame and
        // at `room` writable bytes of `b.buf`; the kernel writes at most that much into each
        // and fills in `len`, `namelen` and `flags`. MSG_DONTWAIT: never blocks.
        let r = unsafe {
            recvmmsg(
                socket.as_raw_fd(),
                hdrs.as_mut_ptr(),
                count as c_uint,
                MSG_DONTWAIT,
                ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = (r as usize).min(count);
        for (h, name) in hdrs.iter().zip(names.iter()).take(r) {
            let n = (h.len as usize).min(room);
            let trunc = h.hdr.flags & MSG_TRUNC != 0;
            let s = &name.0;
            let family = u16::from_ne_bytes([s[0], s[1]]);
            let port = u16::from_be_bytes([s[2], s[3]]);
            let src = match (family, h.hdr.namelen) {
                (AF_INET, l) if l >= 16 => Some(addr_v4(port, [s[4], s[5], s[6], s[7]])),
                (AF_INET6, l) if l >= 28 => {
                    let mut ip = [0u8; 16];
                    ip.copy_from_slice(&s[8..24]);
                    // As the standard library reads it (tokio's addresses match ours).
                    let flow = u32::from_ne_bytes([s[4], s[5], s[6], s[7]]);
                    let scope = u32::from_ne_bytes([s[24], s[25], s[26], s[27]]);
                    Some(addr_v6(port, ip, flow, scope))
                }
                _ => None,
            };
            b.got.push(src.map(|src| (n, src, trunc)));
        }
        Ok(r)
    }
}

#[cfg(not(all(
    target_os = "linux",
    target_pointer_width = "64",
    target_endian = "little"
)))]
mod sys {
    use std::io;

    use tokio::net::UdpSocket;

    use super::RecvBatch;

    pub(super) fn recv_batch(b: &mut RecvBatch, socket: &UdpSocket) -> io::Result<usize> {
        b.fill_one(socket)
    }

    pub(super) fn send_batch(
        socket: &UdpSocket,
        frames: &[&[u8]],
        dst: std::net::SocketAddr,
    ) -> io::Result<usize> {
        super::send_one_by_one(socket, frames, dst)
    }
}
