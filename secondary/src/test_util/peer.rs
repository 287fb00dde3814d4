//! A stand-in for the TAP: a unix `SOCK_DGRAM` socketpair has the same
//! one-message-per-frame boundaries, so one end can be handed to a worker
//! (`AttachFrameIo`) or wrapped as the queue pair's frame I/O, and the test plays
//! the host's network on the other end ([`Peer`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};

/// The test's end of the TAP stand-in.
#[derive(Debug)]
pub struct Peer {
    fd: OwnedFd,
}

impl Peer {
    /// Wrap one end of a [`dgram_fds`] pair.
    pub fn new(fd: OwnedFd) -> Peer {
        Peer { fd }
    }

    /// Receive one frame (one must be waiting).
    ///
    /// # Panics
    /// If none waits.
    pub fn recv_frame(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 128 * 1024];
        let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).expect("a frame");
        buf.truncate(n);
        buf
    }

    /// Wait up to `timeout` for a frame.
    pub fn recv_frame_within(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        while self.is_empty() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Some(self.recv_frame())
    }

    /// Whether no frame waits.
    pub fn is_empty(&self) -> bool {
        let mut b = [0u8; 1];
        recv(
            self.fd.as_raw_fd(),
            &mut b,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK,
        )
        .is_err()
    }

    /// Send one frame towards the worker.
    ///
    /// # Panics
    /// If the socket refuses it (its buffer is full).
    pub fn send_frame(&self, frame: &[u8]) {
        send(self.fd.as_raw_fd(), frame, MsgFlags::MSG_DONTWAIT).expect("send frame");
    }
}

/// A unix datagram socketpair (close-on-exec, blocking until attached).
///
/// # Panics
/// If the socketpair cannot be made.
pub fn dgram_fds() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::Datagram,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair")
}
