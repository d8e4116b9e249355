//! Batched UDP receive and send (`recvmmsg`/`sendmmsg`, Linux): up to
//! [`BATCH`] datagrams per system call, as Knot and gdnsd do. Under load
//! most of a query's cost is the kernel's; one call per batch instead of
//! two per query removes the per-call entry, descriptor lookup and socket
//! locking from all but one query of each batch.
//!
//! Most of the crate's `unsafe` lives here (the rest in `crate::sched`):
//! filling the kernel's message headers with pointers into buffers this
//! module owns, and reading back the socket addresses the kernel wrote.
//! The buffers are allocated once per socket and reused; a call never
//! allocates.

use std::io;
use std::mem::{MaybeUninit, size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Datagrams per system call. Knot's default is 10, gdnsd's 16; more
/// gains little (the fixed cost is already spread) and keeps a slow batch
/// from holding early queries back.
pub const BATCH: usize = 32;
/// Largest datagram read: longer ones are cut to this and then fail to
/// parse (FORMERR), as before batching.
pub const SLOT: usize = 4096;

/// Receive buffers and the sources of the datagrams in them.
pub struct RecvBatch {
    buf: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: [usize; BATCH],
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            buf: vec![0; BATCH * SLOT],
            // SAFETY: sockaddr_storage is plain old data; all zeroes is valid.
            addrs: vec![unsafe { zeroed() }; BATCH],
            lens: [0; BATCH],
        }
    }
}

impl RecvBatch {
    /// Receives up to [`BATCH`] datagrams: with `wait`, waits for the
    /// first (up to the socket's read timeout) and takes what else is
    /// queued; without, `WouldBlock` when there is none.
    pub fn recv(&mut self, fd: RawFd, wait: bool) -> io::Result<usize> {
        let mut iovecs: [MaybeUninit<libc::iovec>; BATCH] = [MaybeUninit::uninit(); BATCH];
        // SAFETY: mmsghdr is plain old data; every field used is set below.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for (i, (chunk, addr)) in self
            .buf
            .chunks_exact_mut(SLOT)
            .zip(self.addrs.iter_mut())
            .enumerate()
        {
            let iov = iovecs[i].write(libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: SLOT,
            });
            let h = &mut headers[i].msg_hdr;
            h.msg_name = (addr as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = iov;
            h.msg_iovlen = 1;
        }
        // SAFETY: every header points at a live buffer of the length it
        // states (SLOT bytes of `buf`, one sockaddr_storage of `addrs`),
        // owned by `self` and not otherwise borrowed during the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                if wait {
                    libc::MSG_WAITFORONE
                } else {
                    libc::MSG_DONTWAIT
                },
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (len, h) in self.lens.iter_mut().zip(&headers).take(n) {
            *len = (h.msg_len as usize).min(SLOT);
        }
        Ok(n)
    }

    /// Datagram `i` of the last receive and its source (`None`: a family
    /// other than IPv4/IPv6, which never happens on our sockets).
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        let packet = &self.buf[i * SLOT..i * SLOT + self.lens[i]];
        (packet, socket_addr(&self.addrs[i]))
    }
}

/// Reads a socket address the kernel wrote.
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which
            // is smaller than sockaddr_storage and no more aligned.
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Replies waiting to be sent, each with its destination.
pub struct SendBatch {
    /// One reply buffer per slot, reused (capacity kept between batches).
    pub out: Vec<Vec<u8>>,
    dests: Vec<libc::sockaddr_storage>,
    dest_lens: [libc::socklen_t; BATCH],
    len: usize,
}

impl Default for SendBatch {
    fn default() -> Self {
        Self {
            out: (0..BATCH).map(|_| Vec::with_capacity(SLOT)).collect(),
            // SAFETY: sockaddr_storage is plain old data; all zeroes is valid.
            dests: vec![unsafe { zeroed() }; BATCH],
            dest_lens: [0; BATCH],
            len: 0,
        }
    }
}

impl SendBatch {
    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The buffer of the next reply; [`Self::push`] keeps it.
    pub fn next_buffer(&mut self) -> &mut Vec<u8> {
        &mut self.out[self.len]
    }

    /// Keeps the reply written into [`Self::next_buffer`], for `dest`.
    pub fn push(&mut self, dest: SocketAddr) {
        let i = self.len;
        self.dest_lens[i] = write_addr(&mut self.dests[i], dest);
        self.len += 1;
    }

    /// Sends replies `from..` (waiting for room on a blocking socket); the
    /// number sent (at least one), or the error of reply `from`.
    pub fn send(&mut self, fd: RawFd, from: usize) -> io::Result<usize> {
        let count = self.len - from;
        let mut iovecs: [MaybeUninit<libc::iovec>; BATCH] = [MaybeUninit::uninit(); BATCH];
        // SAFETY: mmsghdr is plain old data; every field used is set below.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for (k, i) in (from..self.len).enumerate() {
            let out = &self.out[i];
            let iov = iovecs[k].write(libc::iovec {
                iov_base: out.as_ptr() as *mut libc::c_void,
                iov_len: out.len(),
            });
            let h = &mut headers[k].msg_hdr;
            h.msg_name = (&mut self.dests[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = self.dest_lens[i];
            h.msg_iov = iov;
            h.msg_iovlen = 1;
        }
        // SAFETY: every header points at a live reply buffer and address
        // owned by `self`, of the lengths stated; the kernel only reads them.
        let n = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), count as libc::c_uint, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((n as usize).max(1))
    }
}

/// Writes `addr` as the kernel wants it; returns its length.
fn write_addr(storage: &mut libc::sockaddr_storage, addr: SocketAddr) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_in fits in sockaddr_storage, no more aligned.
            let s = unsafe {
                &mut *(storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = a.port().to_be();
            s.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            s.sin_zero = [0; 8];
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let s = unsafe {
                &mut *(storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = a.port().to_be();
            s.sin6_flowinfo = a.flowinfo();
            s.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            s.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn addresses_survive_the_round_trip_through_the_kernel_layout() {
        for addr in [
            "192.0.2.7:5353".parse::<SocketAddr>().unwrap(),
            "[2001:db8::1]:53".parse().unwrap(),
            "[::ffff:10.0.0.1]:1".parse().unwrap(),
        ] {
            // SAFETY: plain old data.
            let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
            write_addr(&mut storage, addr);
            assert_eq!(socket_addr(&storage), Some(addr));
        }
    }

    #[test]
    fn a_batch_is_received_and_answered_to_each_sender() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        let clients: Vec<_> = (0..5)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for (i, c) in clients.iter().enumerate() {
            c.send_to(&[i as u8; 3], to).unwrap();
        }
        let mut recv = RecvBatch::default();
        let mut send = SendBatch::default();
        let mut got = 0;
        // Loopback delivery is synchronous: the five are queued already.
        while got < 5 {
            let n = recv.recv(server.as_raw_fd(), true).unwrap();
            for i in 0..n {
                let (packet, src) = recv.get(i);
                let out = send.next_buffer();
                out.clear();
                out.extend_from_slice(packet);
                out.push(0xff);
                send.push(src.unwrap());
            }
            got += n;
        }
        let mut from = 0;
        while from < send.len() {
            from += send.send(server.as_raw_fd(), from).unwrap();
        }
        for (i, c) in clients.iter().enumerate() {
            let mut buf = [0u8; 16];
            let (len, src) = c.recv_from(&mut buf).unwrap();
            assert_eq!(src, to);
            assert_eq!(&buf[..len], &[i as u8, i as u8, i as u8, 0xff]);
        }
        // Nothing left: WouldBlock, not a wait.
        server.set_nonblocking(true).unwrap();
        let e = recv.recv(server.as_raw_fd(), false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
