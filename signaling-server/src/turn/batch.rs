//! Receiving and sending several datagrams per system call.
//!
//! Relaying costs two receives and two sends per datagram and round trip, and on a virtual
//! machine the system-call entry and exit are a large part of each. [`RecvBatch`] fills up to
//! its capacity of slots with one `recvmmsg(2)` call and [`send_batch`] sends several datagrams
//! to one destination with one `sendmmsg(2)` call (Linux, through `libc`); elsewhere they go one
//! per call through tokio.
//!
//! The `unsafe` is limited to these two calls with `MSG_DONTWAIT`, on buffers borrowed for the
//! call, and to reading the socket addresses they fill in; results are bounds-checked.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Mutex;

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

/// Where a socket's [`RecvBatch`] waits between receive calls, with the datagrams not yet
/// handed out (the turn crate asks for one datagram per call).
pub(crate) struct BatchSlot {
    batch: Mutex<Option<RecvBatch>>,
    /// (capacity, max_datagram, headroom) of a new batch.
    shape: (usize, usize, usize),
}

impl BatchSlot {
    /// An empty slot; the first [`BatchSlot::take`] makes a `RecvBatch::new(capacity,
    /// max_datagram, headroom)`.
    pub(crate) fn new(capacity: usize, max_datagram: usize, headroom: usize) -> Self {
        BatchSlot {
            batch: Mutex::new(None),
            shape: (capacity, max_datagram, headroom),
        }
    }

    /// The parked batch, or a new empty one.
    pub(crate) fn take(&self) -> RecvBatch {
        let (capacity, max_datagram, headroom) = self.shape;
        self.batch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| RecvBatch::new(capacity, max_datagram, headroom))
    }

    /// Parks `batch` for the next receive call.
    pub(crate) fn put(&self, batch: RecvBatch) {
        *self.batch.lock().unwrap_or_else(|e| e.into_inner()) = Some(batch);
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

#[cfg(target_os = "linux")]
mod sys {
    use std::io;
    use std::mem;
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;
    use std::ptr;

    use libc::{c_uint, c_void, iovec, mmsghdr, sockaddr_storage, socklen_t};
    use tokio::net::UdpSocket;

    use super::{addr_v4, addr_v6, RecvBatch, MAX_BATCH};

    const STORAGE_LEN: socklen_t = mem::size_of::<sockaddr_storage>() as socklen_t;

    fn no_iov() -> iovec {
        iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        }
    }

    fn no_hdr() -> mmsghdr {
        // SAFETY: all-zero is a valid `mmsghdr` (null pointers, zero lengths and flags).
        unsafe { mem::zeroed() }
    }

    fn no_storage() -> sockaddr_storage {
        // SAFETY: all-zero is a valid `sockaddr_storage` (family AF_UNSPEC).
        unsafe { mem::zeroed() }
    }

    /// Points `h` at one buffer (`len` bytes at `base`, described by `iov`) and at a socket
    /// address (`namelen` bytes at `name`). Only pointers are stored here; the callers keep
    /// what they point at alive across the system call.
    fn point(
        h: &mut mmsghdr,
        iov: &mut iovec,
        base: *mut c_void,
        len: usize,
        name: *mut c_void,
        namelen: socklen_t,
    ) {
        *iov = iovec {
            iov_base: base,
            iov_len: len,
        };
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
        h.msg_hdr.msg_name = name;
        h.msg_hdr.msg_namelen = namelen;
    }

    /// `dst` as a `sockaddr_in` / `sockaddr_in6` in a `sockaddr_storage`, and its length.
    fn encode(dst: SocketAddr) -> (sockaddr_storage, socklen_t) {
        let mut storage = no_storage();
        match dst {
            SocketAddr::V4(a) => {
                // SAFETY: `sockaddr_storage` is large and aligned enough for any socket address.
                let sin = unsafe {
                    &mut *(&mut storage as *mut sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                (storage, mem::size_of::<libc::sockaddr_in>() as socklen_t)
            }
            SocketAddr::V6(a) => {
                // SAFETY: as above.
                let sin6 = unsafe {
                    &mut *(&mut storage as *mut sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_flowinfo = a.flowinfo();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                sin6.sin6_scope_id = a.scope_id();
                (storage, mem::size_of::<libc::sockaddr_in6>() as socklen_t)
            }
        }
    }

    /// The address the kernel wrote into `storage` (`len` bytes), if IPv4 or IPv6.
    fn decode(storage: &sockaddr_storage, len: socklen_t) -> Option<SocketAddr> {
        let len = len as usize;
        match storage.ss_family as libc::c_int {
            libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
                // SAFETY: the family says the storage holds a `sockaddr_in`.
                let sin =
                    unsafe { &*(storage as *const sockaddr_storage).cast::<libc::sockaddr_in>() };
                Some(addr_v4(
                    u16::from_be(sin.sin_port),
                    sin.sin_addr.s_addr.to_ne_bytes(),
                ))
            }
            libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
                // SAFETY: the family says the storage holds a `sockaddr_in6`.
                let sin6 =
                    unsafe { &*(storage as *const sockaddr_storage).cast::<libc::sockaddr_in6>() };
                Some(addr_v6(
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_addr.s6_addr,
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                ))
            }
            _ => None,
        }
    }

    pub(super) fn send_batch(
        socket: &UdpSocket,
        frames: &[&[u8]],
        dst: SocketAddr,
    ) -> io::Result<usize> {
        let count = frames.len().min(MAX_BATCH);
        let (mut name, namelen) = encode(dst);
        let mut iovs: [iovec; MAX_BATCH] = std::array::from_fn(|_| no_iov());
        let mut hdrs: [mmsghdr; MAX_BATCH] = std::array::from_fn(|_| no_hdr());
        let name_ptr: *mut c_void = (&mut name as *mut sockaddr_storage).cast();
        for ((h, iov), f) in hdrs.iter_mut().zip(iovs.iter_mut()).zip(frames).take(count) {
            point(
                h,
                iov,
                f.as_ptr().cast_mut().cast(),
                f.len(),
                name_ptr,
                namelen,
            );
        }
        // SAFETY: each of the first `count` headers points at a live iovec of this frame that
        // describes a live slice (the kernel only reads from it) and at the encoded
        // destination. MSG_DONTWAIT: never blocks.
        let r = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                hdrs.as_mut_ptr(),
                count as c_uint,
                libc::MSG_DONTWAIT,
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
        let mut iovs: [iovec; MAX_BATCH] = std::array::from_fn(|_| no_iov());
        let mut names: [sockaddr_storage; MAX_BATCH] = std::array::from_fn(|_| no_storage());
        let mut hdrs: [mmsghdr; MAX_BATCH] = std::array::from_fn(|_| no_hdr());
        let (slot, headroom) = (b.slot, b.headroom);
        for (i, ((h, iov), name)) in hdrs
            .iter_mut()
            .zip(iovs.iter_mut())
            .zip(names.iter_mut())
            .enumerate()
            .take(count)
        {
            let base = b.buf[i * slot + headroom..].as_mut_ptr().cast();
            let name = (name as *mut sockaddr_storage).cast();
            point(h, iov, base, room, name, STORAGE_LEN);
        }
        // SAFETY: each of the first `count` headers points at a live iovec and
        // sockaddr_storage of this frame and at `room` writable bytes of `b.buf` (slot `i`
        // lies within it, asserted above); the kernel writes at most that much into each and
        // fills in `msg_len`, `msg_namelen` and `msg_flags`. MSG_DONTWAIT: never blocks.
        let r = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                hdrs.as_mut_ptr(),
                count as c_uint,
                libc::MSG_DONTWAIT,
                ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = (r as usize).min(count);
        for (h, name) in hdrs.iter().zip(names.iter()).take(r) {
            let n = (h.msg_len as usize).min(room);
            let trunc = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let src = decode(name, h.msg_hdr.msg_namelen);
            b.got.push(src.map(|src| (n, src, trunc)));
        }
        Ok(r)
    }
}

#[cfg(not(target_os = "linux"))]
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
