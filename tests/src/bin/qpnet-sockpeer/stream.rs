//! Stream peers (unix `SOCK_STREAM`): frames behind a 4-byte big-endian
//! length, qpnet's `--stream` format. We listen; qpnet connects (again, if a
//! connection ends). The sink reads large chunks and walks the prefixes;
//! the source writes `batch` prefixed frames per `send`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::counters::{wait_for_go, Counters};
use crate::dgram::{remove_stale, wait_writable};
use crate::frames::{frame, set_flow};

const PREFIX: usize = 4;
const MAX_FRAME: usize = 65_535;
/// The sink's read size.
const CHUNK: usize = 256 << 10;

pub fn listen(path: &Path) -> Result<OwnedFd> {
    remove_stale(path)?;
    let l = UnixListener::bind(path).with_context(|| format!("listen {}", path.display()))?;
    Ok(OwnedFd::from(l))
}

fn accept(listener: &OwnedFd) -> Result<OwnedFd> {
    loop {
        // SAFETY: no address is asked for.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: accept4 returned a new fd that nothing else owns.
            return Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e).context("accept");
        }
    }
}

/// Where the reader is in the byte stream.
#[derive(Debug, Default)]
struct Parser {
    prefix: [u8; PREFIX],
    have: usize,
    /// Bytes of the current frame still to come.
    left: usize,
}

impl Parser {
    /// Walks `data`; returns the frames completed and their bytes, or the
    /// bad length that broke the framing.
    fn feed(&mut self, mut data: &[u8]) -> Result<(u64, u64), u32> {
        let (mut frames, mut bytes) = (0, 0);
        while !data.is_empty() {
            if self.left > 0 {
                let take = self.left.min(data.len());
                self.left -= take;
                data = &data[take..];
                if self.left == 0 {
                    frames += 1;
                }
                continue;
            }
            let take = (PREFIX - self.have).min(data.len());
            self.prefix[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have == PREFIX {
                self.have = 0;
                let len = u32::from_be_bytes(self.prefix);
                if len == 0 || len as usize > MAX_FRAME {
                    return Err(len);
                }
                self.left = len as usize;
                bytes += u64::from(len);
            }
        }
        Ok((frames, bytes))
    }
}

/// Counts whole frames on each connection qpnet makes, one after another;
/// after a read of less than half a chunk, sleeps `coalesce` so that the
/// next read takes many frames.
pub fn sink(listener: OwnedFd, c: &Counters, coalesce: Duration) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let conn = accept(&listener)?;
        let mut parser = Parser::default();
        loop {
            // SAFETY: `buf` is writable for its length during the call.
            let n = unsafe { libc::read(conn.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                break;
            }
            if n < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ECONNRESET) => break,
                    _ => return Err(io::Error::last_os_error()).context("read"),
                }
            }
            let n = usize::try_from(n).expect("n > 0");
            match parser.feed(&buf[..n]) {
                Ok((frames, bytes)) => c.add(frames, bytes),
                Err(len) => bail!("qpnet sent a frame length of {len}"),
            }
            if n < CHUNK / 2 && !coalesce.is_zero() {
                std::thread::sleep(coalesce);
            }
        }
        c.errors.fetch_add(1, Relaxed);
    }
}

/// Sends `batch` prefixed frames of `size` bytes per `send`, from SIGUSR2
/// on, on each connection qpnet makes; waits in `poll` while the socket is
/// full (counted as waits).
pub fn source(listener: OwnedFd, c: &Counters, batch: usize, size: usize) -> Result<()> {
    let one = frame(size);
    let len = u32::try_from(size).expect("size <= 1514").to_be_bytes();
    let wire = PREFIX + size;
    let mut buf = Vec::with_capacity(batch * wire);
    for _ in 0..batch {
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&one);
    }
    wait_for_go();
    let mut flow = 0u8;
    loop {
        let conn = accept(&listener)?;
        'conn: loop {
            for f in buf.chunks_exact_mut(wire) {
                set_flow(&mut f[PREFIX..], flow);
                flow = flow.wrapping_add(1);
            }
            let mut off = 0;
            while off < buf.len() {
                let rest = &buf[off..];
                // SAFETY: `rest` is readable for its length during the call.
                let n = unsafe {
                    libc::send(
                        conn.as_raw_fd(),
                        rest.as_ptr().cast(),
                        rest.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if n >= 0 {
                    let before = off / wire;
                    off += usize::try_from(n).expect("n >= 0");
                    let done = (off / wire - before) as u64;
                    c.add(done, done * size as u64);
                    continue;
                }
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) => {
                        c.waits.fetch_add(1, Relaxed);
                        wait_writable(conn.as_raw_fd());
                    }
                    Some(libc::EINTR) => {}
                    Some(libc::EPIPE | libc::ECONNRESET) => break 'conn,
                    _ => return Err(io::Error::last_os_error()).context("send"),
                }
            }
        }
        c.errors.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_counted_across_any_cut() {
        let mut wire = Vec::new();
        for size in [60usize, 1514, 64] {
            wire.extend_from_slice(&(size as u32).to_be_bytes());
            wire.extend(std::iter::repeat_n(7u8, size));
        }
        for cut in [1, 2, 3, 5, 63, 64, 100, 1000] {
            let mut p = Parser::default();
            let (mut frames, mut bytes) = (0, 0);
            for chunk in wire.chunks(cut) {
                let (f, b) = p.feed(chunk).unwrap();
                frames += f;
                bytes += b;
            }
            assert_eq!((frames, bytes), (3, 60 + 1514 + 64), "cut {cut}");
        }
        let mut p = Parser::default();
        assert_eq!(p.feed(&[0, 0, 0, 0]), Err(0));
        assert_eq!(Parser::default().feed(&[0, 1, 0, 0]), Err(65_536));
    }
}
