//! Datagram peers (UDP, unix `SOCK_DGRAM`): one frame per datagram, moved
//! `batch` at a time with `recvmmsg` / `sendmmsg`.

use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{connect, setsockopt, sockopt, UnixAddr};

use crate::counters::{wait_for_go, Counters};
use crate::frames::{frame, set_flow};
use crate::spec::Endpoint;

/// Room for one received datagram (a frame is at most 1514 bytes).
const SLOT: usize = 2048;
/// The sink's receive buffer: large, so that a sink that waits for its CPU
/// for a moment does not drop what qpnet sent (capped by net.core.rmem_max).
const SINK_RCVBUF: usize = 4 << 20;
/// How long a source waits for qpnet's unix socket to be bound.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A queue pair's datagram socket, bound where qpnet sends.
pub struct Opened(OwnedFd);

pub fn open(ep: &Endpoint) -> Result<Opened> {
    Ok(Opened(match ep {
        Endpoint::Udp { bind, .. } => {
            OwnedFd::from(UdpSocket::bind(bind).with_context(|| format!("bind {bind}"))?)
        }
        Endpoint::UnixDgram { bind, .. } => {
            remove_stale(bind)?;
            let s = UnixDatagram::bind(bind).with_context(|| format!("bind {}", bind.display()))?;
            OwnedFd::from(s)
        }
        Endpoint::Stream { .. } => bail!("not a datagram endpoint"),
    }))
}

/// A socket file left at `path` by an earlier run.
pub fn remove_stale(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
        }
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => Ok(()),
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Connects a unix datagram socket to qpnet's path; false while it is not
/// bound yet.
fn connect_unix(fd: &OwnedFd, path: &Path) -> Result<bool> {
    let addr = UnixAddr::new(path).context("unix path")?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("connect {}", path.display())),
    }
}

/// Headers for `n` slots starting at `base`, each `len` long.
fn headers(iov: &mut [libc::iovec], base: *mut u8, len: usize) -> Vec<libc::mmsghdr> {
    iov.iter_mut()
        .enumerate()
        .map(|(i, v)| {
            *v = libc::iovec {
                iov_base: base.wrapping_add(i * len).cast(),
                iov_len: len,
            };
            // SAFETY: an all-zero mmsghdr is valid (no name, no control).
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect()
}

/// Receives and counts datagrams until the process ends; after a call that
/// found less than `batch`, sleeps `coalesce` (frames collect meanwhile:
/// fewer calls and wake-ups per frame). A unix sink connects back to qpnet's
/// socket once it is bound, as a peer that also sends would (a datagram to a
/// socket connected elsewhere is refused).
pub fn sink(
    s: Opened,
    ep: &Endpoint,
    c: &Counters,
    batch: usize,
    coalesce: Duration,
) -> Result<()> {
    let fd = s.0;
    // Best effort: the default buffer is enough to run, only less tolerant.
    let _ = setsockopt(&fd, sockopt::RcvBuf, &SINK_RCVBUF);
    // Wakes up now and then to finish connecting back.
    set_timeout(&fd, Duration::from_millis(100))?;
    let mut back = match ep {
        Endpoint::UnixDgram { qpnet, .. } => Some(qpnet.clone()),
        _ => None,
    };
    let mut buf = vec![0u8; batch * SLOT];
    let mut iov = vec![
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0
        };
        batch
    ];
    let mut hdrs = headers(&mut iov, buf.as_mut_ptr(), SLOT);
    let count = u32::try_from(batch).expect("batch <= 1024");
    loop {
        if let Some(path) = &back {
            if connect_unix(&fd, path)? {
                back = None;
            }
        }
        // SAFETY: every header points at one iovec of `iov`, which points at
        // SLOT bytes of `buf`; all outlive the call, nothing else uses them.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                count,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            match errno() {
                libc::EAGAIN | libc::EINTR => continue,
                libc::ECONNREFUSED => {
                    c.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                e => return Err(io::Error::from_raw_os_error(e)).context("recvmmsg"),
            }
        }
        let n = usize::try_from(n).expect("n >= 0");
        let bytes: u64 = hdrs[..n].iter().map(|h| u64::from(h.msg_len)).sum();
        c.add(n as u64, bytes);
        if n < batch && !coalesce.is_zero() {
            std::thread::sleep(coalesce);
        }
    }
}

/// SO_RCVTIMEO: a blocking receive returns EAGAIN after `t`.
pub fn set_timeout(fd: &OwnedFd, t: Duration) -> Result<()> {
    let tv = nix::sys::time::TimeVal::new(
        t.as_secs() as libc::time_t,
        t.subsec_micros() as libc::suseconds_t,
    );
    setsockopt(&fd.as_fd(), sockopt::ReceiveTimeout, &tv).context("SO_RCVTIMEO")
}

/// Waits (at most 100 ms) until `fd` can take more.
pub fn wait_writable(fd: RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call.
    unsafe { libc::poll(&mut p, 1, 100) };
}

/// Sends frames of `size` bytes, `batch` per `sendmmsg`, as fast as qpnet
/// takes them, from SIGUSR2 on: nonblocking, waiting in `poll` while
/// qpnet's side is full (counted as waits).
pub fn source(s: Opened, ep: &Endpoint, c: &Counters, batch: usize, size: usize) -> Result<()> {
    let fd = s.0;
    match ep {
        Endpoint::Udp { qpnet, .. } => {
            UdpSocket::from(fd.try_clone()?)
                .connect(qpnet)
                .context("connect")?;
        }
        Endpoint::UnixDgram { qpnet, .. } => {
            let deadline = Instant::now() + CONNECT_TIMEOUT;
            while !connect_unix(&fd, qpnet)? {
                if Instant::now() > deadline {
                    bail!("{} not bound within {CONNECT_TIMEOUT:?}", qpnet.display());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Endpoint::Stream { .. } => bail!("not a datagram endpoint"),
    }
    wait_for_go();
    let one = frame(size);
    let mut buf: Vec<u8> = one.iter().copied().cycle().take(batch * size).collect();
    let mut iov = vec![
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0
        };
        batch
    ];
    let mut flow = 0u8;
    loop {
        for f in buf.chunks_exact_mut(size) {
            set_flow(f, flow);
            flow = flow.wrapping_add(1);
        }
        let mut hdrs = headers(&mut iov, buf.as_mut_ptr(), size);
        let mut off = 0;
        while off < batch {
            let left = u32::try_from(batch - off).expect("batch <= 1024");
            // SAFETY: the headers point at iovecs of `iov` pointing at
            // `size` bytes of `buf` each; the kernel only reads them.
            let n = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    hdrs[off..].as_mut_ptr(),
                    left,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                let n = usize::try_from(n).expect("n > 0");
                off += n;
                c.add(n as u64, (n * size) as u64);
                continue;
            }
            match errno() {
                libc::EAGAIN => {
                    c.waits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    wait_writable(fd.as_raw_fd());
                }
                libc::EINTR => {}
                libc::ECONNREFUSED | libc::ENOTCONN | libc::ENOENT => {
                    c.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                    off = batch;
                }
                e => return Err(io::Error::from_raw_os_error(e)).context("sendmmsg"),
            }
        }
    }
}
