//! A connected stream socket of this queue pair (TCP or unix
//! `SOCK_STREAM`): the [`FrameIo`] of the stream backend.
//!
//! The primary made the connection (and makes it again when it ends) and
//! sends it like a TAP queue. Each Ethernet frame travels behind its length
//! as a 4-byte big-endian integer, with no virtio-net header: the wire
//! format of QEMU's `-netdev stream` and of passt.
//!
//! A stream, unlike a datagram socket, can be left between frames, and a
//! worker can be killed at any moment; the next worker must never make the
//! peer read a torn frame. So this file keeps the connection at a frame
//! boundary whenever it can and says in shared memory when it cannot
//! ([`qpnet_shared::stream_sync`]); the primary resets a connection its dead
//! worker left out of step and hands over one it left in step:
//! - RX peeks at what the socket holds (`MSG_PEEK`), finds the last whole
//!   frame in it and only then takes exactly those bytes: taking bytes that
//!   are all queued cannot be cut short, so the connection is at a boundary
//!   before and after, and the whole frames staged here are at worst lost
//!   with the worker, like frames in flight. Only when the first frame is
//!   not all there (the peer wrote it in pieces) are its bytes taken and
//!   held, with [`RX_PARTIAL`] set; otherwise the socket would stay readable
//!   and the worker spin. Two calls per batch of frames, not per frame.
//! - TX writes each frame, prefix first, with one `sendmsg`, marked
//!   [`TX_MAY_BE_PARTIAL`] from before the call until it returned whole. A
//!   write cut short (the socket's buffer filled) keeps the rest here and
//!   the mark set; the rest goes out before any other frame, when the socket
//!   has room.
//!
//! A length prefix of 0 or above [`MAX_STREAM_FRAME`] cannot be skipped (the
//! next frame's start is unknown): the connection is shut down, the read
//! reports `EPROTO` (counted as `drop_stream_framing`) and the primary makes
//! a new one. When the peer closed it, or a write finds it broken, the
//! stream has ended: writes fail with `ENOTCONN` (the TX path drops and
//! counts those frames until a new connection is attached), reads find
//! nothing, and the queue pair stops watching the fd.
//!
//! Only calls the worker's seccomp filter allows: `sendmsg`, `recvmsg`,
//! `poll`, `fcntl`, `getsockopt`, `shutdown`.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{getsockopt, sockopt, SockType};
use qpnet_shared::stream_sync::{LENGTH_PREFIX, MAX_STREAM_FRAME, RX_PARTIAL, TX_MAY_BE_PARTIAL};
use qpnet_shared::SharedRegion;

use crate::datagram::{send_iovecs, short_frame, skip_front};
use crate::frame_io::FrameIo;
use crate::iovecs::IoVecs;
use crate::tap::{readable, retry};

/// Bytes staged for RX: room for a batch of frames, and always for the
/// largest one with its prefix.
const STAGE: usize = 2 * (LENGTH_PREFIX + MAX_STREAM_FRAME);

/// Where the worker publishes [`qpnet_shared::stream_sync`] bits: its queue
/// pair's block of the shared region, or a private word (unit tests, a
/// worker not yet given the region).
#[derive(Clone)]
pub enum SyncWord {
    /// A word of our own.
    Private(Arc<AtomicU32>),
    /// `stream_sync` of queue pair `.1` in the shared region.
    Shared(Arc<SharedRegion>, usize),
}

impl SyncWord {
    /// A private word.
    #[cfg(test)]
    pub fn private() -> SyncWord {
        SyncWord::Private(Arc::default())
    }

    fn word(&self) -> &AtomicU32 {
        match self {
            SyncWord::Private(w) => w,
            // StatsHome::use_shared checked the block exists.
            SyncWord::Shared(region, qp) => region.queue(*qp).map_or(&UNUSED, |q| &q.stream_sync),
        }
    }

    /// The bits as published.
    pub fn get(&self) -> u32 {
        self.word().load(Ordering::Acquire)
    }
}

/// Stands in for a block the region does not have (never, see above).
static UNUSED: AtomicU32 = AtomicU32::new(0);

/// RX bytes taken from the socket: whole frames from `start` on, and with
/// [`RX_PARTIAL`] one frame not all there at the end.
#[derive(Debug)]
struct Stage {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Stage {
    /// The frame at `start`: `Ok(Some(len))` when it is all staged,
    /// `Ok(None)` when more bytes are needed, `Err` for a bad prefix.
    fn whole_frame(&self) -> Result<Option<usize>, u32> {
        frame_at(&self.buf[self.start..self.end])
    }
}

/// The frame at the start of `bytes`: its length when all of it is there,
/// `None` when bytes are missing, `Err(prefix)` when its prefix is not a
/// frame length.
fn frame_at(bytes: &[u8]) -> Result<Option<usize>, u32> {
    let Some(prefix) = bytes.first_chunk::<LENGTH_PREFIX>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*prefix);
    if len == 0 || len as usize > MAX_STREAM_FRAME {
        return Err(len);
    }
    let len = len as usize;
    Ok((bytes.len() >= LENGTH_PREFIX + len).then_some(len))
}

/// The length of the whole frames at the start of `bytes`, up to the first
/// one not all there or with a bad prefix.
fn whole_frames(bytes: &[u8]) -> usize {
    let mut at = 0;
    while let Ok(Some(len)) = frame_at(&bytes[at..]) {
        at += LENGTH_PREFIX + len;
    }
    at
}

impl std::fmt::Debug for SyncWord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SyncWord({:#x})", self.get())
    }
}

/// A connected stream socket.
#[derive(Debug)]
pub struct Stream {
    fd: OwnedFd,
    sync: SyncWord,
    /// The bits last published.
    bits: Cell<u32>,
    ended: Cell<bool>,
    stage: RefCell<Stage>,
    /// The rest of a frame whose write was cut short.
    pending: RefCell<Vec<u8>>,
    /// The iovecs of one write (kept for its allocation).
    scratch: RefCell<Vec<libc::iovec>>,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl Stream {
    /// Take the socket, check it is a stream socket and make it
    /// nonblocking; `sync` is where its framing state is published.
    pub fn attach(fd: OwnedFd, sync: SyncWord) -> io::Result<Stream> {
        let kind = getsockopt(&fd, sockopt::SockType).map_err(io::Error::from)?;
        if kind != SockType::Stream {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the socket is {kind:?}, not a stream socket"),
            ));
        }
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
        let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
        fcntl(&fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
        let s = Stream {
            fd,
            sync,
            bits: Cell::new(0),
            ended: Cell::new(false),
            stage: RefCell::new(Stage {
                buf: vec![0; STAGE].into_boxed_slice(),
                start: 0,
                end: 0,
            }),
            pending: RefCell::new(Vec::new()),
            scratch: RefCell::new(Vec::with_capacity(16)),
        };
        // A new connection starts at a boundary.
        s.publish(0);
        Ok(s)
    }

    fn publish(&self, bits: u32) {
        self.bits.set(bits);
        self.sync.word().store(bits, Ordering::Release);
    }

    fn set(&self, bit: u32, on: bool) {
        let bits = if on {
            self.bits.get() | bit
        } else {
            self.bits.get() & !bit
        };
        if bits != self.bits.get() {
            self.publish(bits);
        }
    }

    /// The connection is over (the peer closed it, it broke, or its
    /// framing did): nothing more is read or written on it.
    fn end(&self) {
        self.ended.set(true);
    }

    /// `recvmsg` of up to `len` bytes into the stage at `at`.
    fn recv(&self, stage: &mut Stage, at: usize, len: usize, flags: i32) -> io::Result<usize> {
        let buf = &mut stage.buf[at..at + len];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        retry(|| {
            // SAFETY: an all-zero msghdr is valid (no name, no control).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = 1;
            // SAFETY: the one iovec points at `len` bytes of our stage,
            // borrowed mutably for the call; the kernel writes at most that.
            unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, flags | libc::MSG_DONTWAIT) }
        })
    }

    /// Make the stage hold a whole frame at its start, if the socket has
    /// one: `Ok(len)`, or `WouldBlock`, `ENOTCONN` (the peer closed the
    /// connection) or `EPROTO` (a bad length prefix; the connection is shut
    /// down).
    fn next_frame(&self) -> io::Result<usize> {
        if self.ended.get() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut stage = self.stage.borrow_mut();
        loop {
            match stage.whole_frame() {
                Ok(Some(len)) => return Ok(len),
                Ok(None) => {}
                Err(prefix) => return Err(self.bad_framing(&mut stage, prefix)),
            }
            self.fill(&mut stage)?;
        }
    }

    /// Take more bytes: whole frames (peeked first) at a boundary, or the
    /// missing part of a frame held.
    fn fill(&self, stage: &mut Stage) -> io::Result<()> {
        let held = stage.end - stage.start;
        if held == 0 {
            stage.start = 0;
            stage.end = 0;
            let n = self.recv(stage, 0, STAGE, libc::MSG_PEEK)?;
            if n == 0 {
                return Err(self.closed());
            }
            let whole = whole_frames(&stage.buf[..n]);
            if whole > 0 {
                // All queued (just peeked) and read only here: taken whole.
                stage.end = self.recv(stage, 0, whole, 0)?;
                self.set(RX_PARTIAL, stage.end != whole);
                return Ok(());
            }
            if let Err(prefix) = frame_at(&stage.buf[..n]) {
                return Err(self.bad_framing(stage, prefix));
            }
            // The first frame is not all there: hold its bytes.
            self.set(RX_PARTIAL, true);
            stage.end = self.recv(stage, 0, n, 0)?;
            return Ok(());
        }
        // Part of a frame is held (RX_PARTIAL): take just what it lacks, so
        // the stage ends at a boundary once it is whole.
        if stage.start > 0 {
            stage.buf.copy_within(stage.start..stage.end, 0);
            stage.start = 0;
            stage.end = held;
        }
        let missing = match frame_at(&stage.buf[..held]) {
            Err(prefix) => return Err(self.bad_framing(stage, prefix)),
            Ok(Some(_)) => return Ok(()),
            Ok(None) if held < LENGTH_PREFIX => LENGTH_PREFIX - held,
            Ok(None) => {
                let prefix = stage.buf[..LENGTH_PREFIX].try_into().unwrap_or([0; 4]);
                LENGTH_PREFIX + u32::from_be_bytes(prefix) as usize - held
            }
        };
        let n = self.recv(stage, held, missing, 0)?;
        if n == 0 {
            return Err(self.closed());
        }
        stage.end += n;
        if matches!(stage.whole_frame(), Ok(Some(_))) {
            self.set(RX_PARTIAL, false);
        }
        Ok(())
    }

    /// `e`, or `ENOTCONN` when it ended the connection.
    fn gone_or(&self, e: io::Error) -> io::Error {
        if self.ended.get() {
            errno(libc::ENOTCONN)
        } else {
            e
        }
    }

    fn closed(&self) -> io::Error {
        self.end();
        errno(libc::ENOTCONN)
    }

    /// The peer broke the framing: shut the connection down (the primary
    /// sees it end and makes a new one).
    fn bad_framing(&self, stage: &mut Stage, prefix: u32) -> io::Error {
        // SAFETY: shutdown(2) on our own socket fd; no memory is involved.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
        self.end();
        stage.start = 0;
        stage.end = 0;
        io::Error::new(
            io::ErrorKind::InvalidData,
            BadFraming(format!("length prefix {prefix}: connection reset")),
        )
    }

    /// Deliver the frame at the stage's start (`len` bytes) through
    /// `write` (header bytes, then the frame) and take it off the stage.
    fn take_frame(&self, len: usize, write: impl FnOnce(&[u8])) -> usize {
        let mut stage = self.stage.borrow_mut();
        let from = stage.start + LENGTH_PREFIX;
        write(&stage.buf[from..from + len]);
        stage.start = from + len;
        len
    }

    /// Send `list` with one `sendmsg`; a broken connection ends the
    /// stream.
    fn send(&self, list: &mut [libc::iovec]) -> io::Result<usize> {
        send_iovecs(self.fd.as_fd(), list).inspect_err(|e| {
            if matches!(
                e.raw_os_error(),
                Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
            ) {
                self.end();
            }
        })
    }

    /// Send what is left of a frame cut short; `Ok(true)` once nothing is.
    fn flush_pending(&self) -> io::Result<bool> {
        let mut pending = self.pending.borrow_mut();
        if pending.is_empty() {
            return Ok(true);
        }
        let mut list = [libc::iovec {
            iov_base: pending.as_mut_ptr().cast(),
            iov_len: pending.len(),
        }];
        match self.send(&mut list) {
            Ok(n) => {
                let n = n.min(pending.len());
                pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
        if pending.is_empty() {
            self.set(TX_MAY_BE_PARTIAL, false);
        }
        Ok(pending.is_empty())
    }
}

/// Why a read refused the stream (a bad length prefix), so the RX path can
/// count it as `drop_stream_framing`.
#[derive(Debug)]
pub struct BadFraming(String);

impl std::fmt::Display for BadFraming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadFraming {}

impl BadFraming {
    /// Whether `e` is a framing error of a stream.
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<BadFraming>())
    }
}

impl FrameIo for Stream {
    /// Sends the frame after the header, behind its length.
    fn write_frame(&self, frame: &IoVecs<'_>, header: usize) -> io::Result<usize> {
        if self.ended.get() {
            return Err(errno(libc::ENOTCONN));
        }
        let flushed = self.flush_pending().map_err(|e| self.gone_or(e))?;
        if !flushed {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let total = usize::try_from(frame.total()).unwrap_or(usize::MAX);
        let Some(len) = total.checked_sub(header) else {
            return Err(short_frame());
        };
        if len > MAX_STREAM_FRAME {
            return Err(errno(libc::EMSGSIZE));
        }
        let mut prefix = (len as u32).to_be_bytes();
        let mut list = self.scratch.borrow_mut();
        if !skip_front(frame.as_slice(), header, &mut list) {
            return Err(short_frame());
        }
        list.insert(
            0,
            libc::iovec {
                iov_base: prefix.as_mut_ptr().cast(),
                iov_len: LENGTH_PREFIX,
            },
        );
        self.set(TX_MAY_BE_PARTIAL, true);
        let sent = self.send(&mut list);
        let n = match sent {
            Ok(n) => n,
            Err(e) => {
                // Nothing was written.
                self.set(TX_MAY_BE_PARTIAL, false);
                return Err(self.gone_or(e));
            }
        };
        let whole = LENGTH_PREFIX + len;
        if n >= whole {
            self.set(TX_MAY_BE_PARTIAL, false);
            return Ok(whole);
        }
        // Cut short: keep the rest (the mark stays set until it is out).
        let mut pending = self.pending.borrow_mut();
        pending.clear();
        pending.extend_from_slice(&prefix[n.min(LENGTH_PREFIX)..]);
        let body_from = n.saturating_sub(LENGTH_PREFIX);
        let start = pending.len();
        pending.resize(start + len - body_from, 0);
        frame.read_at(0..frame.len(), header + body_from, &mut pending[start..]);
        Ok(whole)
    }

    /// Zeroes the header, copies the next whole frame after it.
    fn read_frame(&self, bufs: &IoVecs<'_>, from: usize, header: usize) -> io::Result<usize> {
        let len = self.next_frame()?;
        let entries = from.min(bufs.len())..bufs.len();
        let room: usize = bufs.as_slice()[entries.clone()]
            .iter()
            .map(|v| v.iov_len)
            .sum();
        if room < header {
            return Err(short_frame());
        }
        self.take_frame(len, |bytes| {
            if header + bytes.len() <= room {
                bufs.write_at(entries.clone(), 0, &[0; 16][..header.min(16)]);
                bufs.write_at(entries, header, bytes);
            }
        });
        Ok(header + len)
    }

    fn read_into(&self, buf: &mut [u8], header: usize) -> io::Result<usize> {
        if buf.len() < header {
            return Err(short_frame());
        }
        let len = self.next_frame()?;
        self.take_frame(len, |bytes| {
            if header + bytes.len() <= buf.len() {
                buf[..header].fill(0);
                buf[header..header + bytes.len()].copy_from_slice(bytes);
            }
        });
        Ok(header + len)
    }

    fn has_frame(&self) -> bool {
        if self.ended.get() {
            return false;
        }
        matches!(self.stage.borrow().whole_frame(), Ok(Some(_))) || readable(self.fd.as_fd())
    }

    /// A stream socket's error or hang-up is its end: the stream ends (it
    /// stays attached, dropping TX frames, until a new one comes), so
    /// there is no error to take and go on with.
    fn take_error(&self) -> Option<io::Error> {
        self.end();
        None
    }

    fn wants_writable(&self) -> bool {
        !self.ended.get() && !self.pending.borrow().is_empty()
    }

    fn on_writable(&self) {
        if let Err(e) = self.flush_pending() {
            log::warn!("stream: the rest of a frame could not be sent: {e}");
        }
    }

    fn ended(&self) -> bool {
        self.ended.get()
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests;
