//! A VMM that leaves our replies unread cannot freeze the primary.
//!
//! The vhost crate sends each reply with a loop that retries `EAGAIN`, so
//! the socket's write timeout alone cannot stop it: a VMM that never reads
//! would keep the primary inside `sendmsg` for as long as it keeps the
//! connection open, serving no signal, no dead worker and no watchdog. The
//! guard is a small thread that watches the connection's unread bytes
//! (`SIOCOUTQ`: sent by us, not yet read by the VMM). When they stay above
//! zero without going down for [`UNREAD_LIMIT`], it shuts the socket down;
//! the blocked `sendmsg` then fails, the request ends with an error, and the
//! primary drops the connection and waits for the next VMM. A VMM that
//! reads its replies, however slowly it sends requests, never trips it; nor
//! does a long request (one that waits on a worker), since nothing unread
//! is pending then.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{shutdown, Shutdown};

/// How long a reply may stay unread before the connection is closed.
pub const UNREAD_LIMIT: Duration = Duration::from_secs(2);
/// How often the guard looks.
const TICK: Duration = Duration::from_millis(100);

/// Watches one VMM connection; stops when dropped.
pub struct ReplyGuard {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Bytes we sent on `fd` that the peer has not read yet.
fn unread(fd: &OwnedFd) -> Option<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int into `n`, which lives for
    // the call; `fd` is an open socket.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    (r == 0).then_some(n)
}

impl ReplyGuard {
    /// Guard the connection `fd` (a duplicate of the VMM socket).
    pub fn watch(fd: OwnedFd) -> std::io::Result<ReplyGuard> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vmm-reply-guard".into())
            .spawn(move || guard(fd, &flag))?;
        Ok(ReplyGuard {
            stop,
            thread: Some(thread),
        })
    }
}

fn guard(fd: OwnedFd, stop: &AtomicBool) {
    // Since when replies have been waiting unread without any being read.
    let mut stuck: Option<(Instant, i32)> = None;
    while !stop.load(Ordering::Acquire) {
        std::thread::park_timeout(TICK);
        let Some(n) = unread(&fd) else { return };
        stuck = match stuck {
            _ if n == 0 => None,
            Some((since, before)) if n >= before => Some((since, n)),
            _ => Some((Instant::now(), n)),
        };
        if let Some((since, n)) = stuck {
            if since.elapsed() >= UNREAD_LIMIT {
                log::warn!(
                    "closing the VMM connection: {n} bytes of replies left unread for {:?}",
                    UNREAD_LIMIT
                );
                let _ = shutdown(fd.as_raw_fd(), Shutdown::Both);
                return;
            }
        }
    }
}

impl Drop for ReplyGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn unread_replies_close_the_connection_read_ones_do_not() {
        let (ours, mut vmm) = UnixStream::pair().unwrap();
        let guard = ReplyGuard::watch(OwnedFd::from(ours.try_clone().unwrap())).unwrap();
        // Read promptly: never closed.
        for _ in 0..5 {
            (&ours).write_all(b"reply").unwrap();
            let mut b = [0u8; 5];
            vmm.read_exact(&mut b).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
        assert!((&ours).write_all(b"x").is_ok());
        let mut b = [0u8; 1];
        vmm.read_exact(&mut b).unwrap();
        // Left unread: shut down after the limit (plus a tick or two),
        // seen on the VMM's side without reading a byte.
        (&ours).write_all(b"unread").unwrap();
        let t = Instant::now();
        let hung_up = loop {
            let mut pfd = libc::pollfd {
                fd: vmm.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 50) };
            if pfd.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0 {
                break Some(t.elapsed());
            }
            if t.elapsed() > Duration::from_secs(5) {
                break None;
            }
        };
        let took = hung_up.expect("an unread reply never closed the connection");
        assert!(
            took >= UNREAD_LIMIT - TICK && took <= UNREAD_LIMIT + 4 * TICK,
            "{took:?}"
        );
        let mut rest = Vec::new();
        vmm.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"unread");
        drop(guard);
    }
}
