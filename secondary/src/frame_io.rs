//! What the packet path asks of the host side of a queue pair: move one
//! whole frame, virtio-net header first, between guest buffers and the host.
//!
//! The TX and RX queues talk to a [`FrameIo`] and never to a TAP or a socket
//! by name, so a second backend (the socket backend) is a second
//! implementation of this trait, not a fork of the path. Today's one is
//! [`Tap`](crate::tap::Tap): a TAP queue fd with IFF_VNET_HDR, where one
//! `readv`/`writev` is one frame, header included; the socket backend's are
//! [`Datagram`](crate::datagram::Datagram): one datagram is one frame and
//! carries no header, so it skips the header on the way out and writes a
//! zero one on the way in; and [`Stream`](crate::stream::Stream), the same
//! with each frame behind its length on a byte stream. The paths always
//! see frames with the header in front and say how long it is (`header`,
//! from the negotiated features); which one the worker builds, the primary
//! says
//! ([`qpnet_ipc::FrameIoKind`]). An implementation is nonblocking: "no frame
//! waits" and "no room for a frame" are `WouldBlock`, never a stall; the
//! worker's epoll loop waits on [`AsFd::as_fd`] instead.

use std::io;
use std::os::fd::AsFd;

use crate::iovecs::IoVecs;

/// One frame at a time between guest buffers and the host; nonblocking.
pub trait FrameIo: AsFd {
    /// Write one frame gathered from every entry of `frame`: a virtio-net
    /// header of `header` bytes, then the Ethernet frame. Returns the bytes
    /// written; `WouldBlock` when there is no room now, so the frame can be
    /// given back to the ring and sent later.
    fn write_frame(&self, frame: &IoVecs<'_>, header: usize) -> io::Result<usize>;

    /// Read one frame into the entries of `bufs` from entry `from` on, a
    /// virtio-net header of `header` bytes first. Returns the frame's full
    /// length, header included, which is larger than the buffers when the
    /// frame was cut (the caller drops it); `WouldBlock` when no frame
    /// waits.
    fn read_frame(&self, bufs: &IoVecs<'_>, from: usize, header: usize) -> io::Result<usize>;

    /// Read one frame, header first, into a private buffer (the rare bounce
    /// path). Returns its full length, like [`FrameIo::read_frame`].
    fn read_into(&self, buf: &mut [u8], header: usize) -> io::Result<usize>;

    /// Whether a frame waits to be read (no frame is consumed).
    fn has_frame(&self) -> bool;

    /// After an error event: the error the fd holds, taken (cleared), when
    /// the fd survives it (a datagram socket's pending ICMP error); `None`
    /// when the error or hang-up is the fd's end (a TAP's), so the caller
    /// detaches it.
    fn take_error(&self) -> Option<io::Error> {
        None
    }

    /// Whether it has output of its own to finish once the fd is writable
    /// (the rest of a stream frame whose write was cut short).
    fn wants_writable(&self) -> bool {
        false
    }

    /// The fd is writable: finish that output.
    fn on_writable(&self) {}

    /// Whether its connection is over (a stream whose peer closed it or
    /// broke its framing): no more events to watch; writes fail with
    /// `ENOTCONN`, so the TX path drops and counts frames until a new frame
    /// I/O is attached.
    fn ended(&self) -> bool {
        false
    }
}
