//! What the packet path asks of the host side of a queue pair: move one
//! whole frame, virtio-net header first, between guest buffers and the host.
//!
//! The TX and RX queues talk to a [`FrameIo`] and never to a TAP or a socket
//! by name, so a second backend (the socket backend) is a second
//! implementation of this trait, not a fork of the path. Today's one is
//! [`Tap`](crate::tap::Tap): a TAP queue fd with IFF_VNET_HDR, where one
//! `readv`/`writev` is one frame. An implementation is nonblocking: "no frame
//! waits" and "no room for a frame" are `WouldBlock`, never a stall; the
//! worker's epoll loop waits on [`AsFd::as_fd`] instead.

use std::io;
use std::os::fd::AsFd;

use crate::iovecs::IoVecs;

/// One frame at a time between guest buffers and the host; nonblocking.
pub trait FrameIo: AsFd {
    /// Write one frame gathered from every entry of `frame` (header first).
    /// Returns the bytes written; `WouldBlock` when there is no room now, so
    /// the frame can be given back to the ring and sent later.
    fn write_frame(&self, frame: &IoVecs<'_>) -> io::Result<usize>;

    /// Read one frame into the entries of `bufs` from entry `from` on.
    /// Returns the frame's full length, which is larger than the buffers
    /// when the frame was cut (the caller drops it); `WouldBlock` when no
    /// frame waits.
    fn read_frame(&self, bufs: &IoVecs<'_>, from: usize) -> io::Result<usize>;

    /// Read one frame into a private buffer (the rare bounce path). Returns
    /// its full length, like [`FrameIo::read_frame`].
    fn read_into(&self, buf: &mut [u8]) -> io::Result<usize>;

    /// Whether a frame waits to be read (no frame is consumed).
    fn has_frame(&self) -> bool;
}
