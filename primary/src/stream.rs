//! The stream socket backend: one connection per queue pair, each frame
//! behind its length as a 4-byte big-endian integer, the wire format of
//! QEMU's `-netdev stream` and of passt.
//!
//! - `--stream unix:PATH` / `--stream tcp:HOST:PORT`: queue pair K connects
//!   to PATH.K / PORT+K (PATH / PORT itself with one queue pair);
//!   `--stream-listen` listens there instead and takes one connection per
//!   queue pair (a second one while the first lasts is closed, logged).
//!
//! One connection per queue pair, not one shared by all: a stream is read
//! by exactly one reader, which must know where each frame starts, and a
//! worker is killed at any moment; with one connection per queue pair a
//! worker's death or a torn frame concerns its own connection only, and no
//! write needs a lock shared between processes. Peers that take a single
//! connection (passt, one QEMU `-netdev stream`) get one queue pair.
//!
//! The primary makes every connection (the worker, sandboxed, can neither
//! connect nor accept) and hands it to the queue pair's worker like a TAP
//! queue; it keeps its own copy only to see the connection end (it never
//! reads or writes it). When one ends (the peer closed it, or the worker
//! shut it down on a framing error) the primary makes a new one, with a
//! back-off from [`FIRST_RETRY`] doubling to [`MAX_RETRY`] while the peer is
//! not there, and attaches it to the running worker; meanwhile the worker
//! drops and counts the guest's frames. When a worker dies, its connection
//! goes to the next worker if the worker left it at a frame boundary (see
//! [`qpnet_shared::stream_sync`]); otherwise it is reset (closed, made
//! again), so the peer never reads a torn frame as a length prefix.

mod spec;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::PollFlags;
use nix::sys::socket::{
    accept4, bind, connect, getsockopt, listen, setsockopt, socket, sockopt, AddressFamily,
    Backlog, SockFlag, SockType, SockaddrLike, SockaddrStorage, UnixAddr,
};
use nix::unistd::{setfsgid, setfsuid, Gid, Uid};

pub use spec::{parse_stream, StreamSpec, Target};

/// The first wait before connecting again.
pub const FIRST_RETRY: Duration = Duration::from_millis(50);
/// The longest wait between attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(2);

/// Why the stream sockets could not be set up. Each message names the fix.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// A queue pair's target cannot be formed.
    #[error("{0}")]
    Target(String),
    /// The listening path exists and is not a socket, or is in use.
    #[error("{0} exists: remove it or choose another --stream path")]
    PathExists(String),
    /// A system call failed.
    #[error("{what} {target} failed")]
    Sys {
        /// The operation.
        what: &'static str,
        /// The address or path.
        target: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn sys<'a>(what: &'static str, target: &'a Target) -> impl FnOnce(nix::Error) -> StreamError + 'a {
    move |e| StreamError::Sys {
        what,
        target: target.to_string(),
        source: e.into(),
    }
}

/// One queue pair's connection.
#[derive(Debug)]
struct Link {
    target: Target,
    /// Listening socket (`--stream-listen`).
    listener: Option<OwnedFd>,
    /// The connection, once made.
    conn: Option<OwnedFd>,
    /// A TCP connect under way.
    connecting: Option<OwnedFd>,
    /// When to connect again (connecting side, no connection).
    retry_at: Option<Instant>,
    /// The wait after the next failure.
    backoff: Duration,
    /// Failed attempts since the last connection (for the log).
    failures: u64,
}

/// What to poll for on the fds of the links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// A connection: its end.
    Conn,
    /// A connect under way: its result.
    Connecting,
    /// A listener: a peer connecting.
    Listener,
}

impl Watch {
    /// Whether `p`, polled for [`Watch::flags`], fired. nix cannot name
    /// POLLRDHUP, so its `revents()` is `None` exactly when that bit is set.
    pub fn fired(p: &nix::poll::PollFd<'_>) -> bool {
        p.revents().is_none_or(|r| !r.is_empty())
    }

    /// The poll events.
    pub fn flags(self) -> PollFlags {
        match self {
            // The peer closed its end (nix names no POLLRDHUP).
            Watch::Conn => PollFlags::from_bits_retain(libc::POLLRDHUP),
            Watch::Connecting => PollFlags::POLLOUT,
            Watch::Listener => PollFlags::POLLIN,
        }
    }
}

/// Every queue pair's connection.
#[derive(Debug)]
pub struct StreamLinks {
    spec: StreamSpec,
    listen: bool,
    links: Vec<Link>,
}

impl StreamLinks {
    /// Set up one link per queue pair: listen, or connect now (a peer not
    /// there yet is retried with back-off, not an error).
    pub fn open(spec: &StreamSpec, listen: bool, queue_pairs: u16) -> Result<Self, StreamError> {
        let mut links = Vec::with_capacity(queue_pairs as usize);
        for qp in 0..queue_pairs {
            let target = spec.target(qp, queue_pairs).map_err(StreamError::Target)?;
            let listener = listen.then(|| listen_on(&target)).transpose()?;
            links.push(Link {
                target,
                listener,
                conn: None,
                connecting: None,
                retry_at: (!listen).then(Instant::now),
                backoff: FIRST_RETRY,
                failures: 0,
            });
        }
        let mut s = StreamLinks {
            spec: spec.clone(),
            listen,
            links,
        };
        s.connect_due(Instant::now());
        Ok(s)
    }

    /// What the spec was.
    pub fn spec(&self) -> &StreamSpec {
        &self.spec
    }

    /// Whether qpnet listens.
    pub fn listens(&self) -> bool {
        self.listen
    }

    /// Queue pair `qp`'s connection, if it has one.
    pub fn queue(&self, qp: usize) -> Option<&OwnedFd> {
        self.links.get(qp)?.conn.as_ref()
    }

    /// The fds to poll, with their queue pair and what they wait for.
    pub fn poll_fds(&self) -> Vec<(usize, Watch, BorrowedFd<'_>)> {
        let mut v = Vec::new();
        for (qp, l) in self.links.iter().enumerate() {
            if let Some(c) = &l.conn {
                v.push((qp, Watch::Conn, c.as_fd()));
            }
            if let Some(c) = &l.connecting {
                v.push((qp, Watch::Connecting, c.as_fd()));
            }
            if let Some(c) = &l.listener {
                v.push((qp, Watch::Listener, c.as_fd()));
            }
        }
        v
    }

    /// When the next connect attempt is due.
    pub fn deadline(&self) -> Option<Instant> {
        self.links.iter().filter_map(|l| l.retry_at).min()
    }

    /// Act on what poll reported (`fired`: queue pair, what was watched)
    /// and on attempts that are due; returns the queue pairs that have a
    /// new connection, to attach to their workers.
    pub fn service(&mut self, fired: &[(usize, Watch)]) -> Vec<usize> {
        let mut new = Vec::new();
        for &(qp, watch) in fired {
            let Some(l) = self.links.get_mut(qp) else {
                continue;
            };
            match watch {
                Watch::Conn => {
                    if l.conn.take().is_some() {
                        log::warn!(
                            "queue pair {qp}: the stream connection with {} ended",
                            l.target
                        );
                        l.lost(self.listen);
                    }
                }
                Watch::Connecting => {
                    if l.finish_connect(qp) {
                        new.push(qp);
                    }
                }
                Watch::Listener => {
                    if l.accept(qp) {
                        new.push(qp);
                    }
                }
            }
        }
        new.extend(self.connect_due(Instant::now()));
        new.sort_unstable();
        new.dedup();
        new
    }

    /// The worker of `qp` died leaving its connection out of step (see
    /// [`qpnet_shared::stream_sync`]): close it, so the peer sees it end
    /// rather than a torn frame, and make a new one.
    pub fn reset(&mut self, qp: usize) {
        let Some(l) = self.links.get_mut(qp) else {
            return;
        };
        if let Some(c) = l.conn.take() {
            log::warn!(
                "queue pair {qp}: its worker died between two parts of a frame: resetting the stream connection with {}",
                l.target
            );
            // SAFETY: shutdown(2) on our own socket fd; no memory involved.
            unsafe { libc::shutdown(c.as_raw_fd(), libc::SHUT_RDWR) };
            l.lost(self.listen);
            l.retry_at = (!self.listen).then(Instant::now);
        }
    }

    /// Start the connects that are due; returns the queue pairs connected
    /// at once (unix sockets, or TCP on this host).
    fn connect_due(&mut self, now: Instant) -> Vec<usize> {
        let mut new = Vec::new();
        for (qp, l) in self.links.iter_mut().enumerate() {
            if l.retry_at.is_some_and(|t| t <= now) && l.start_connect(qp) {
                new.push(qp);
            }
        }
        new
    }
}

impl Drop for StreamLinks {
    /// The unix socket files qpnet listened on go with it.
    fn drop(&mut self) {
        for l in &self.links {
            if let (Some(_), Target::Unix(p)) = (&l.listener, &l.target) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

impl Link {
    /// The connection ended: connect again after the first wait (when
    /// connecting), or wait for the peer (when listening).
    fn lost(&mut self, listen: bool) {
        self.backoff = FIRST_RETRY;
        self.failures = 0;
        self.retry_at = (!listen).then(|| Instant::now() + FIRST_RETRY);
    }

    fn connected(&mut self, qp: usize, fd: OwnedFd) {
        if matches!(self.target, Target::Tcp(_)) {
            let _ = setsockopt(&fd, sockopt::TcpNoDelay, &true);
        }
        log::info!(
            "queue pair {qp}: stream connected {} {}{}",
            if self.listener.is_some() {
                "from"
            } else {
                "to"
            },
            self.target,
            if self.failures > 0 {
                format!(" after {} failed attempts", self.failures)
            } else {
                String::new()
            }
        );
        self.conn = Some(fd);
        self.retry_at = None;
        self.backoff = FIRST_RETRY;
        self.failures = 0;
    }

    fn failed(&mut self, qp: usize, e: &dyn std::fmt::Display) {
        self.failures += 1;
        if self.failures.is_power_of_two() {
            log::warn!(
                "queue pair {qp}: connecting the stream to {} failed ({e}; {} attempts); next in {} ms",
                self.target,
                self.failures,
                self.backoff.as_millis()
            );
        }
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_RETRY);
    }

    /// Connect; `true` when connected at once.
    fn start_connect(&mut self, qp: usize) -> bool {
        self.retry_at = None;
        let (family, addr) = match address(&self.target) {
            Ok(a) => a,
            Err(e) => {
                self.failed(qp, &e);
                return false;
            }
        };
        let fd = match socket(
            family,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        ) {
            Ok(fd) => fd,
            Err(e) => {
                self.failed(qp, &e);
                return false;
            }
        };
        let mut result = connect(fd.as_raw_fd(), addr.as_ref());
        if let (Err(nix::errno::Errno::EACCES), Target::Unix(path)) = (result, &self.target) {
            if nix::unistd::Uid::effective().is_root() {
                result = connect_as_owner(&fd, addr.as_ref(), path);
            }
        }
        match result {
            Ok(()) => {
                self.connected(qp, fd);
                true
            }
            Err(nix::errno::Errno::EINPROGRESS) => {
                self.connecting = Some(fd);
                false
            }
            Err(e) => {
                self.failed(qp, &e);
                false
            }
        }
    }

    /// A connect under way reported; `true` when it succeeded.
    fn finish_connect(&mut self, qp: usize) -> bool {
        let Some(fd) = self.connecting.take() else {
            return false;
        };
        match getsockopt(&fd, sockopt::SocketError) {
            Ok(0) => {
                self.connected(qp, fd);
                true
            }
            Ok(e) => {
                self.failed(qp, &std::io::Error::from_raw_os_error(e));
                false
            }
            Err(e) => {
                self.failed(qp, &e);
                false
            }
        }
    }

    /// A peer connects; `true` when it became this queue pair's connection.
    fn accept(&mut self, qp: usize) -> bool {
        let Some(l) = &self.listener else {
            return false;
        };
        let fd = match accept4(
            l.as_raw_fd(),
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        ) {
            // SAFETY: accept4 returned a new fd that nothing else owns.
            Ok(raw) => unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) },
            Err(e) => {
                log::warn!("queue pair {qp}: accepting a stream connection failed: {e}");
                return false;
            }
        };
        if self.conn.is_some() {
            log::warn!(
                "queue pair {qp}: refused a second stream connection on {}: one connection per queue pair",
                self.target
            );
            return false;
        }
        self.connected(qp, fd);
        true
    }
}

/// The socket address of `target`, with its family.
fn address(target: &Target) -> Result<(AddressFamily, Box<dyn SockaddrLike>), nix::Error> {
    Ok(match target {
        Target::Unix(p) => (AddressFamily::Unix, Box::new(UnixAddr::new(p.as_path())?)),
        Target::Tcp(a) => (
            if a.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            },
            Box::new(SockaddrStorage::from(*a)),
        ),
    })
}

/// Connect `fd` to the unix socket at `path` with the file-system
/// identity of the socket file's owner.
///
/// A root primary made its first connections during set-up, with every
/// capability, so a socket of another user that others may not write
/// (passt started as root makes its socket as `nobody`, mode 0755) let it
/// in. Once set up it keeps no CAP_DAC_OVERRIDE, and connecting again after
/// that peer restarted would be refused (EACCES) forever. It keeps
/// CAP_SETUID and CAP_SETGID (for its workers), so for this one call it
/// takes the owner's file-system uid and gid (setfsuid/setfsgid: this
/// thread only, file access checks only): the access to this path it had at
/// set-up, no more. Both are restored before it returns.
fn connect_as_owner(fd: &OwnedFd, addr: &dyn SockaddrLike, path: &Path) -> nix::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EACCES)))?;
    let old_gid = setfsgid(Gid::from_raw(meta.gid()));
    let old_uid = setfsuid(Uid::from_raw(meta.uid()));
    let result = connect(fd.as_raw_fd(), addr);
    setfsuid(old_uid);
    setfsgid(old_gid);
    result
}

/// A listening socket at `target`: a stale unix socket file (nobody
/// accepts on it) is replaced; anything else there is refused.
fn listen_on(target: &Target) -> Result<OwnedFd, StreamError> {
    let (family, addr) = address(target).map_err(sys("address", target))?;
    if let Target::Unix(p) = target {
        if let Ok(meta) = std::fs::symlink_metadata(p) {
            use std::os::unix::fs::FileTypeExt;
            let live = std::os::unix::net::UnixStream::connect(p).is_ok();
            if !meta.file_type().is_socket() || live {
                return Err(StreamError::PathExists(p.display().to_string()));
            }
            let _ = std::fs::remove_file(p);
        }
    }
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(sys("socket", target))?;
    if matches!(target, Target::Tcp(_)) {
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(sys("SO_REUSEADDR", target))?;
    }
    bind(fd.as_raw_fd(), addr.as_ref()).map_err(sys("bind", target))?;
    listen(&fd, Backlog::new(4).unwrap_or(Backlog::MAXCONN)).map_err(sys("listen", target))?;
    Ok(fd)
}

#[cfg(test)]
mod tests;
