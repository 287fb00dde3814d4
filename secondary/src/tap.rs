//! The TAP queue fd of this queue pair: the [`FrameIo`] of a TAP.
//!
//! The primary opened the TAP (IFF_MULTI_QUEUE, IFF_VNET_HDR) and sends one
//! queue fd. One read or write is one frame, virtio-net header first, so the
//! worker moves frames straight between guest buffers and the kernel. The fd
//! is switched to O_NONBLOCK: an empty queue is `WouldBlock`, never a stall.
//! Any fd with datagram semantics works the same way (tests use a unix
//! `SOCK_DGRAM` socketpair).
//!
//! `readv`/`writev` are called through libc rather than nix: nix's wrappers
//! take `IoSlice`s, which are Rust references into guest memory that the
//! guest may change at any time; our iovecs are raw pointers on purpose.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::frame_io::FrameIo;
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
}

impl FrameIo for Tap {
    /// The TAP takes the header as it is (the primary set its length to
    /// `header`). Interrupted calls are retried.
    fn write_frame(&self, frame: &IoVecs<'_>, _header: usize) -> io::Result<usize> {
        let list = frame.as_slice();
        retry(|| {
            // SAFETY: every iovec points into live guest memory of at least
            // its length for as long as `frame` exists (see iovecs.rs); the
            // kernel only reads it.
            unsafe {
                libc::writev(
                    self.fd.as_raw_fd(),
                    list.as_ptr(),
                    list.len() as libc::c_int,
                )
            }
        })
    }

    /// The TAP writes the header itself. It reports a frame's full length
    /// even when the buffers were too short for it. Interrupted calls are
    /// retried.
    fn read_frame(&self, bufs: &IoVecs<'_>, from: usize, _header: usize) -> io::Result<usize> {
        let list = bufs.as_slice().get(from..).unwrap_or(&[]);
        retry(|| {
            // SAFETY: every iovec points into live, writable guest memory of
            // at least its length for as long as `bufs` exists (see
            // iovecs.rs); the kernel writes at most that much into each.
            unsafe {
                libc::readv(
                    self.fd.as_raw_fd(),
                    list.as_ptr(),
                    list.len() as libc::c_int,
                )
            }
        })
    }

    fn read_into(&self, buf: &mut [u8], _header: usize) -> io::Result<usize> {
        loop {
            match nix::unistd::read(&self.fd, buf) {
                Err(Errno::EINTR) => continue,
                r => return r.map_err(io::Error::from),
            }
        }
    }

    fn has_frame(&self) -> bool {
        readable(self.fd.as_fd())
    }
}

/// Whether `fd` is readable now: a poll with zero timeout.
pub(crate) fn readable(fd: BorrowedFd<'_>) -> bool {
    let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut pfd, PollTimeout::ZERO), Ok(n) if n > 0)
        && pfd[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
}

/// Run a raw `readv`/`writev` (or `recvmsg`/`sendmsg`) until it is not
/// interrupted.
pub(crate) fn retry(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
