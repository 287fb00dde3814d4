//! The TAP queue fd of this queue pair: nonblocking `readv`/`writev`.
//!
//! The primary opened the TAP (IFF_MULTI_QUEUE, IFF_VNET_HDR) and sends one
//! queue fd. One read or write is one frame, virtio-net header first, so the
//! worker moves frames straight between guest buffers and the kernel. The fd
//! is switched to O_NONBLOCK: an empty queue is `WouldBlock`, never a stall.
//! Any fd with datagram semantics works the same way (tests use a unix
//! `SOCK_DGRAM` socketpair).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::iovecs::IoVecs;

/// A TAP queue.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
}

impl Tap {
    /// Take the queue fd and make it nonblocking.
    pub fn attach(fd: OwnedFd) -> io::Result<Tap> {
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
        let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
        fcntl(&fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
        Ok(Tap { fd })
    }

    /// Write one frame gathered from `iov`. `WouldBlock` when the queue is
    /// full; interrupted calls are retried.
    pub fn write_frame(&self, iov: &IoVecs) -> io::Result<usize> {
        let list = iov.as_slice();
        loop {
            // SAFETY: every iovec points into live guest memory of at least
            // its length (built from the current map for this frame); the
            // kernel only reads it.
            let n = unsafe {
                libc::writev(
                    self.fd.as_raw_fd(),
                    list.as_ptr(),
                    list.len() as libc::c_int,
                )
            };
            if let Some(n) = Self::result(n)? {
                return Ok(n);
            }
        }
    }

    /// Read one frame into `iov[from..]`. Returns the frame's length, which
    /// a TAP reports in full even when the buffers were too short for it.
    /// `WouldBlock` when no frame waits.
    pub fn read_frame(&self, iov: &IoVecs, from: usize) -> io::Result<usize> {
        let list = iov.as_slice().get(from..).unwrap_or(&[]);
        loop {
            // SAFETY: every iovec points into live, writable guest memory of
            // at least its length (built from the current map this batch).
            let n = unsafe {
                libc::readv(
                    self.fd.as_raw_fd(),
                    list.as_ptr(),
                    list.len() as libc::c_int,
                )
            };
            if let Some(n) = Self::result(n)? {
                return Ok(n);
            }
        }
    }

    /// Read one frame into a private buffer (the rare bounce path).
    /// Returns the frame's full length, like [`Tap::read_frame`].
    pub fn read_into(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is a valid, writable slice of `buf.len()` bytes.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if let Some(n) = Self::result(n)? {
                return Ok(n);
            }
        }
    }

    /// Whether a frame is waiting (a poll with zero timeout).
    pub fn has_frame(&self) -> bool {
        let mut pfd = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut pfd, PollTimeout::ZERO), Ok(n) if n > 0)
            && pfd[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLIN))
    }

    /// `Some(n)` on success, `None` to retry after EINTR, the error otherwise.
    fn result(n: isize) -> io::Result<Option<usize>> {
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            Ok(None)
        } else {
            Err(err)
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
