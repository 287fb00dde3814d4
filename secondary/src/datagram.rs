//! A connected datagram socket of this queue pair (UDP or unix
//! `SOCK_DGRAM`): the [`FrameIo`] of the socket backend.
//!
//! The primary created, bound and connected the socket and sends it like a
//! TAP queue. One datagram is one Ethernet frame with no header in front,
//! the wire format of QEMU's `-netdev dgram`. The paths see frames with the
//! virtio-net header first, so:
//! - on TX the header (already checked by the TX path, see
//!   [`crate::tx_header`]) is skipped and the frame alone is sent with one
//!   `sendmsg`;
//! - on RX the header in the guest's buffers is zeroed (no offload is ever
//!   negotiated on a socket backend; the RX path fills in `num_buffers`) and
//!   the datagram is received after it with one `recvmsg(MSG_TRUNC)`, which
//!   reports the datagram's full length even when the buffers were shorter,
//!   so a cut datagram is dropped and counted, never delivered truncated.
//!
//! Errors the peer causes (gone: `ECONNREFUSED`, `ENOTCONN`, `ENOENT`;
//! frame too large for it: `EMSGSIZE`) come back to the paths as they are;
//! they count them ([`PeerFault`]) and go on.
//!
//! Only calls the worker's seccomp filter allows: `sendmsg`, `recvmsg`,
//! `poll`, `fcntl`, `getsockopt`.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{getsockopt, sockopt, SockType};

use crate::frame_io::FrameIo;
use crate::iovecs::IoVecs;
use crate::tap::{readable, retry};

/// A connected datagram socket.
#[derive(Debug)]
pub struct Datagram {
    fd: OwnedFd,
    /// The iovecs of one call, the header skipped (kept for its allocation).
    scratch: RefCell<Vec<libc::iovec>>,
}

impl Datagram {
    /// Take the socket, check it is a datagram socket and make it
    /// nonblocking.
    pub fn attach(fd: OwnedFd) -> io::Result<Datagram> {
        let kind = getsockopt(&fd, sockopt::SockType).map_err(io::Error::from)?;
        if kind != SockType::Datagram {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the socket is {kind:?}, not a datagram socket"),
            ));
        }
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
        let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
        fcntl(&fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
        Ok(Datagram {
            fd,
            scratch: RefCell::new(Vec::with_capacity(16)),
        })
    }

    /// `recvmsg(MSG_TRUNC)` into `list`: the datagram's full length.
    fn recv(&self, list: &mut [libc::iovec]) -> io::Result<usize> {
        retry(|| {
            // SAFETY: an all-zero msghdr is valid (no name, no control).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = list.as_mut_ptr();
            msg.msg_iovlen = list.len();
            // SAFETY: every iovec points at writable memory of at least its
            // length for the call (guest buffers, see iovecs.rs, or a
            // buffer the caller borrows mutably); the kernel writes at most
            // that much and reads nothing else of ours.
            unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) }
        })
    }
}

/// What the peer did to a frame, from the error of a send or receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerFault {
    /// Nobody receives at the other end (yet, or any more).
    Gone,
    /// The frame is larger than the peer or the path accepts.
    TooLarge,
}

impl PeerFault {
    /// The peer's part in `e`, if it is one.
    pub fn of(e: &io::Error) -> Option<PeerFault> {
        match e.raw_os_error()? {
            libc::ECONNREFUSED | libc::ENOTCONN | libc::ENOENT | libc::EDESTADDRREQ => {
                Some(PeerFault::Gone)
            }
            libc::EMSGSIZE => Some(PeerFault::TooLarge),
            _ => None,
        }
    }
}

/// The entries of `list` after its first `skip` bytes, into `out`. Returns
/// false when the list is shorter than `skip`.
pub(crate) fn skip_front(list: &[libc::iovec], skip: usize, out: &mut Vec<libc::iovec>) -> bool {
    out.clear();
    let mut left = skip;
    for v in list {
        if left >= v.iov_len {
            left -= v.iov_len;
            continue;
        }
        out.push(libc::iovec {
            // Pointer arithmetic only: nothing is dereferenced here.
            iov_base: v.iov_base.cast::<u8>().wrapping_add(left).cast(),
            iov_len: v.iov_len - left,
        });
        left = 0;
    }
    left == 0
}

/// One nonblocking `sendmsg` of `list` (no SIGPIPE), retried when
/// interrupted: the bytes sent.
///
/// Every entry must point into live memory of at least its length for the
/// call (guest memory, see iovecs.rs, the TX path's copy of the header, or
/// the caller's own buffers); the kernel only reads it.
pub(crate) fn send_iovecs(fd: BorrowedFd<'_>, list: &mut [libc::iovec]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: an all-zero msghdr is valid (no name, no control).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = list.as_mut_ptr();
        msg.msg_iovlen = list.len();
        // SAFETY: the entries point at memory the caller keeps live and
        // readable for the call (this function's contract); the kernel only
        // reads it.
        unsafe {
            libc::sendmsg(
                fd.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        }
    })
}

pub(crate) fn short_frame() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "the buffers are shorter than the virtio-net header",
    )
}

impl FrameIo for Datagram {
    /// Sends the frame after the header. Interrupted calls are retried.
    fn write_frame(&self, frame: &IoVecs<'_>, header: usize) -> io::Result<usize> {
        let mut list = self.scratch.borrow_mut();
        if !skip_front(frame.as_slice(), header, &mut list) {
            return Err(short_frame());
        }
        send_iovecs(self.fd.as_fd(), &mut list)
    }

    /// Zeroes the header, receives the datagram after it.
    fn read_frame(&self, bufs: &IoVecs<'_>, from: usize, header: usize) -> io::Result<usize> {
        let entries = from.min(bufs.len())..bufs.len();
        // The header is 10 or 12 bytes (checked by SetFeatures).
        if !bufs.write_at(entries, 0, &[0; 16][..header.min(16)]) {
            return Err(short_frame());
        }
        let mut list = self.scratch.borrow_mut();
        let rest = bufs.as_slice().get(from..).unwrap_or(&[]);
        if !skip_front(rest, header, &mut list) {
            return Err(short_frame());
        }
        Ok(header + self.recv(&mut list)?)
    }

    fn read_into(&self, buf: &mut [u8], header: usize) -> io::Result<usize> {
        let Some((head, rest)) = buf.split_at_mut_checked(header) else {
            return Err(short_frame());
        };
        head.fill(0);
        let mut list = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        Ok(header + self.recv(&mut list)?)
    }

    fn has_frame(&self) -> bool {
        readable(self.fd.as_fd())
    }

    /// SO_ERROR reads and clears the socket's pending error.
    fn take_error(&self) -> Option<io::Error> {
        match getsockopt(&self.fd, sockopt::SocketError) {
            Ok(0) | Err(_) => None,
            Ok(e) => Some(io::Error::from_raw_os_error(e)),
        }
    }
}

impl AsFd for Datagram {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests;
