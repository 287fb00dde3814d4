//! The datagram socket backend: one connected datagram socket per queue
//! pair, one Ethernet frame per datagram with no header in front, the wire
//! format of QEMU's `-netdev dgram`.
//!
//! - `--udp LOCAL_IP:PORT,REMOTE_IP:PORT`: queue pair K binds LOCAL_IP at
//!   PORT+K and sends to REMOTE_IP at PORT+K (IPv4 or IPv6, `[::1]:PORT`).
//! - `--unix-dgram LOCAL_PATH,REMOTE_PATH`: queue pair K binds LOCAL_PATH.K
//!   and sends to REMOTE_PATH.K when there is more than one queue pair; a
//!   single queue pair uses the paths as given.
//! - With `--single-peer` ([`Remotes::Single`]) every queue pair sends to
//!   REMOTE as given (REMOTE_IP:PORT, REMOTE_PATH) and only the local side
//!   moves with K: for a peer with one unconnected socket, such as one QEMU
//!   `-netdev dgram`, which receives from every queue pair but sends to
//!   queue pair 0's address only.
//!
//! The primary creates, binds and connects every socket (nonblocking,
//! CLOEXEC) before any worker starts, and hands each to its worker like a
//! TAP queue. Connecting makes the kernel deliver only the peer's datagrams
//! and lets the sandboxed worker send with no address (it has no file
//! system and its own network namespace; a connected socket keeps working
//! there). Creating sockets needs no capability.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage, UnixAddr,
};

/// Where the sockets of a datagram backend go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DgramSpec {
    /// UDP: local and remote address of queue pair 0.
    Udp {
        /// Bound address of queue pair 0.
        local: SocketAddr,
        /// Connected address of queue pair 0.
        remote: SocketAddr,
    },
    /// Unix datagram sockets: the two paths.
    Unix {
        /// The path bound.
        local: PathBuf,
        /// The path connected to.
        remote: PathBuf,
    },
}

/// Where queue pair K's socket sends: the remote side's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Remotes {
    /// Queue pair K sends to REMOTE PORT+K (REMOTE_PATH.K): the peer has one
    /// socket per queue pair.
    #[default]
    PerQueuePair,
    /// Every queue pair sends to REMOTE as given: the peer has one socket
    /// (`--single-peer`). What the peer sends goes to queue pair 0's
    /// address, so it reaches the guest on RX queue 0 only; the guest's TX
    /// leaves through every queue pair.
    Single,
}

/// Why a spec or a socket was refused. Each message names the fix.
#[derive(Debug, thiserror::Error)]
pub enum DgramError {
    /// PORT+K does not fit in 16 bits.
    #[error("UDP port {port} + queue pair {qp} is above 65535: choose lower ports")]
    PortRange {
        /// The base port.
        port: u16,
        /// The queue pair.
        qp: u16,
    },
    /// The local path exists and is not a socket.
    #[error("{0} exists and is not a socket: remove it or choose another --unix-dgram path")]
    NotASocket(PathBuf),
    /// A live process is bound to the local path.
    #[error("{0} is in use: a running process is bound to it; stop it or choose another --unix-dgram path")]
    InUse(PathBuf),
    /// Nobody is bound to the remote path.
    #[error("nobody is bound to {0}: start the peer first (qpnet connects its socket to the peer's path)")]
    NoPeer(PathBuf),
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

/// Parse the text of `--udp`: `LOCAL_IP:PORT,REMOTE_IP:PORT`.
pub fn parse_udp(s: &str) -> Result<DgramSpec, String> {
    let usage = "expected LOCAL_IP:PORT,REMOTE_IP:PORT, e.g. 127.0.0.1:5000,127.0.0.1:6000 or [::1]:5000,[::1]:6000";
    let (l, r) = s
        .split_once(',')
        .ok_or_else(|| format!("--udp {s:?}: {usage}"))?;
    let addr = |part: &str, which: &str| {
        part.trim().parse::<SocketAddr>().map_err(|_| {
            format!("--udp {s:?}: the {which} address {part:?} is not IP:PORT; {usage}")
        })
    };
    let (local, remote) = (addr(l, "local")?, addr(r, "remote")?);
    if local.is_ipv4() != remote.is_ipv4() {
        return Err(format!(
            "--udp {s:?}: the local and remote addresses must both be IPv4 or both IPv6"
        ));
    }
    if remote.port() == 0 || remote.ip().is_unspecified() {
        return Err(format!(
            "--udp {s:?}: the remote address needs a host and a port other than 0"
        ));
    }
    if local.port() == 0 {
        return Err(format!(
            "--udp {s:?}: the local port must not be 0 (queue pair K uses PORT+K)"
        ));
    }
    Ok(DgramSpec::Udp { local, remote })
}

/// Parse the text of `--unix-dgram`: `LOCAL_PATH,REMOTE_PATH`.
pub fn parse_unix(s: &str) -> Result<DgramSpec, String> {
    let usage = "expected LOCAL_PATH,REMOTE_PATH, e.g. /tmp/vm.sock,/tmp/switch.sock";
    let (l, r) = s
        .split_once(',')
        .ok_or_else(|| format!("--unix-dgram {s:?}: {usage}"))?;
    if l.is_empty() || r.is_empty() {
        return Err(format!(
            "--unix-dgram {s:?}: both paths are needed; {usage}"
        ));
    }
    if l == r {
        return Err(format!(
            "--unix-dgram {s:?}: the local and remote paths must differ"
        ));
    }
    // sun_path holds 108 bytes with the NUL; ".K" adds up to 3.
    for p in [l, r] {
        if p.len() + 3 >= 108 {
            return Err(format!(
                "--unix-dgram {s:?}: {p:?} is too long for a unix socket path (at most 104 bytes)"
            ));
        }
    }
    Ok(DgramSpec::Unix {
        local: PathBuf::from(l),
        remote: PathBuf::from(r),
    })
}

impl DgramSpec {
    /// Queue pair `qp`'s (local, remote) UDP addresses: PORT+`qp` on both,
    /// or on the local side only with [`Remotes::Single`].
    pub fn udp_addrs(
        local: SocketAddr,
        remote: SocketAddr,
        qp: u16,
        remotes: Remotes,
    ) -> Result<(SocketAddr, SocketAddr), DgramError> {
        let shift = |mut a: SocketAddr| {
            let port = a
                .port()
                .checked_add(qp)
                .ok_or(DgramError::PortRange { port: a.port(), qp })?;
            a.set_port(port);
            Ok::<_, DgramError>(a)
        };
        let remote = match remotes {
            Remotes::PerQueuePair => shift(remote)?,
            Remotes::Single => remote,
        };
        Ok((shift(local)?, remote))
    }

    /// Queue pair `qp`'s (local, remote) paths: `.qp` appended to both when
    /// there are `queue_pairs > 1` (to the local one only with
    /// [`Remotes::Single`]).
    pub fn unix_paths(
        local: &Path,
        remote: &Path,
        qp: u16,
        queue_pairs: u16,
        remotes: Remotes,
    ) -> (PathBuf, PathBuf) {
        if queue_pairs <= 1 {
            return (local.to_path_buf(), remote.to_path_buf());
        }
        let suffixed = |p: &Path| {
            let mut s = p.as_os_str().to_owned();
            s.push(format!(".{qp}"));
            PathBuf::from(s)
        };
        let remote = match remotes {
            Remotes::PerQueuePair => suffixed(remote),
            Remotes::Single => remote.to_path_buf(),
        };
        (suffixed(local), remote)
    }

    /// The QEMU `-netdev dgram` options of a peer of queue pair `qp`: its
    /// local address is our remote one and the other way round. With
    /// [`Remotes::Single`], the peer of queue pair 0 is the peer of all.
    pub fn qemu_peer(
        &self,
        qp: u16,
        queue_pairs: u16,
        remotes: Remotes,
    ) -> Result<String, DgramError> {
        Ok(match self {
            DgramSpec::Udp { local, remote } => {
                let (l, r) = DgramSpec::udp_addrs(*local, *remote, qp, remotes)?;
                format!(
                    "-netdev dgram,id=peer{qp},local.type=inet,local.host={},local.port={},remote.type=inet,remote.host={},remote.port={}",
                    r.ip(),
                    r.port(),
                    l.ip(),
                    l.port()
                )
            }
            DgramSpec::Unix { local, remote } => {
                let (l, r) = DgramSpec::unix_paths(local, remote, qp, queue_pairs, remotes);
                format!(
                    "-netdev dgram,id=peer{qp},local.type=unix,local.path={},remote.type=unix,remote.path={}",
                    r.display(),
                    l.display()
                )
            }
        })
    }

    /// A one-line description, for the log.
    pub fn describe(&self, queue_pairs: u16, remotes: Remotes) -> String {
        match (self, remotes) {
            (DgramSpec::Udp { local, remote }, Remotes::PerQueuePair) => {
                format!("UDP {local} -> {remote} (port +K for queue pair K of {queue_pairs})")
            }
            (DgramSpec::Udp { local, remote }, Remotes::Single) => format!(
                "UDP {local} -> {remote} (local port +K for queue pair K of {queue_pairs}, \
                 one peer socket for all)"
            ),
            (DgramSpec::Unix { local, remote }, Remotes::Single) if queue_pairs > 1 => format!(
                "unix datagram {}.K -> {} (K < {queue_pairs}, one peer socket for all)",
                local.display(),
                remote.display()
            ),
            (DgramSpec::Unix { local, remote }, _) if queue_pairs > 1 => format!(
                "unix datagram {}.K -> {}.K (K < {queue_pairs})",
                local.display(),
                remote.display()
            ),
            (DgramSpec::Unix { local, remote }, _) => {
                format!("unix datagram {} -> {}", local.display(), remote.display())
            }
        }
    }
}

/// The sockets of a datagram backend, one per queue pair, and the unix
/// paths bound (removed on drop).
#[derive(Debug)]
pub struct DgramSockets {
    sockets: Vec<OwnedFd>,
    bound_paths: Vec<PathBuf>,
    /// Unix sockets: each queue pair's remote path and how it is revived.
    unix_peers: Vec<UnixPeer>,
    /// When `revive` looks next.
    next_look: Instant,
}

/// A unix datagram socket's peer, which can go away and come back on the
/// same path (a restarted QEMU): the socket must then be connected again.
#[derive(Debug)]
struct UnixPeer {
    remote: PathBuf,
    /// `peer_unreachable` as last seen.
    seen: u64,
    /// When to connect again (the peer is gone).
    retry_at: Option<Instant>,
    backoff: Duration,
}

/// How often the primary looks for unix datagram peers that went away.
pub const PEER_LOOK: Duration = Duration::from_millis(250);
/// The longest wait between two connects to a peer that is not back.
const MAX_PEER_RETRY: Duration = Duration::from_secs(2);

impl DgramSockets {
    /// Create, bind and connect one socket per queue pair.
    pub fn open(
        spec: &DgramSpec,
        queue_pairs: u16,
        remotes: Remotes,
    ) -> Result<DgramSockets, DgramError> {
        let mut out = DgramSockets {
            sockets: Vec::with_capacity(queue_pairs as usize),
            bound_paths: Vec::new(),
            unix_peers: Vec::new(),
            next_look: Instant::now() + PEER_LOOK,
        };
        for qp in 0..queue_pairs {
            let fd = match spec {
                DgramSpec::Udp { local, remote } => {
                    let (l, r) = DgramSpec::udp_addrs(*local, *remote, qp, remotes)?;
                    open_udp(l, r)?
                }
                DgramSpec::Unix { local, remote } => {
                    let (l, r) = DgramSpec::unix_paths(local, remote, qp, queue_pairs, remotes);
                    let fd = open_unix(&l, &r, &mut out.bound_paths)?;
                    out.unix_peers.push(UnixPeer {
                        remote: r,
                        seen: 0,
                        retry_at: None,
                        backoff: PEER_LOOK,
                    });
                    fd
                }
            };
            out.sockets.push(fd);
        }
        Ok(out)
    }

    /// When [`DgramSockets::revive`] wants to run next (unix sockets only).
    pub fn deadline(&self) -> Option<Instant> {
        (!self.unix_peers.is_empty()).then_some(self.next_look)
    }

    /// Connect unix sockets whose peer went away to their remote path
    /// again, so a peer restarted there (a new socket on the same path) is
    /// reached: a socket stays connected to the dead one otherwise.
    /// `unreachable(qp)` is queue pair `qp`'s `peer_unreachable` counter;
    /// when it moved, connects are tried with a back-off from 250 ms to
    /// 2 s until one works. Runs at most every [`PEER_LOOK`].
    pub fn revive(&mut self, unreachable: impl Fn(usize) -> u64) {
        let now = Instant::now();
        if self.unix_peers.is_empty() || now < self.next_look {
            return;
        }
        self.next_look = now + PEER_LOOK;
        for (qp, (peer, fd)) in self.unix_peers.iter_mut().zip(&self.sockets).enumerate() {
            let v = unreachable(qp);
            if v > peer.seen {
                peer.seen = v;
                peer.retry_at.get_or_insert(now);
            }
            if peer.retry_at.is_none_or(|t| t > now) {
                continue;
            }
            let addr = match UnixAddr::new(peer.remote.as_path()) {
                Ok(a) => a,
                Err(_) => continue,
            };
            match connect(fd.as_raw_fd(), &addr) {
                Ok(()) => {
                    log::info!(
                        "queue pair {qp}: connected again to the unix datagram peer {}",
                        peer.remote.display()
                    );
                    peer.retry_at = None;
                    peer.backoff = PEER_LOOK;
                }
                Err(_) => {
                    peer.retry_at = Some(now + peer.backoff);
                    peer.backoff = (peer.backoff * 2).min(MAX_PEER_RETRY);
                }
            }
        }
    }

    /// The socket of queue pair `qp`.
    pub fn queue(&self, qp: usize) -> Option<&OwnedFd> {
        self.sockets.get(qp)
    }
}

impl Drop for DgramSockets {
    fn drop(&mut self) {
        for p in &self.bound_paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn sys(
    what: &'static str,
    target: impl std::fmt::Display,
) -> impl FnOnce(nix::Error) -> DgramError {
    let target = target.to_string();
    move |e| DgramError::Sys {
        what,
        target,
        source: e.into(),
    }
}

fn flags() -> SockFlag {
    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK
}

fn open_udp(local: SocketAddr, remote: SocketAddr) -> Result<OwnedFd, DgramError> {
    let family = if local.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Datagram, flags(), None).map_err(sys("socket for", local))?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(local)).map_err(sys("binding UDP", local))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(remote))
        .map_err(sys("connecting UDP to", remote))?;
    Ok(fd)
}

/// Bind `local` (a stale socket file there is removed first; one a live
/// process is bound to is refused), then connect to `remote`, which must
/// be bound already: start the peer (e.g. QEMU with `-netdev dgram`) first.
fn open_unix(local: &Path, remote: &Path, bound: &mut Vec<PathBuf>) -> Result<OwnedFd, DgramError> {
    clear_stale(local)?;
    let fd = socket(AddressFamily::Unix, SockType::Datagram, flags(), None)
        .map_err(sys("socket for", local.display()))?;
    let raw = fd.as_raw_fd();
    let addr = UnixAddr::new(local).map_err(sys("unix address", local.display()))?;
    bind(raw, &addr).map_err(sys("binding", local.display()))?;
    bound.push(local.to_path_buf());
    let peer = UnixAddr::new(remote).map_err(sys("unix address", remote.display()))?;
    connect(raw, &peer).map_err(|e| match e {
        nix::Error::ENOENT | nix::Error::ECONNREFUSED => DgramError::NoPeer(remote.to_path_buf()),
        e => sys("connecting to", remote.display())(e),
    })?;
    Ok(fd)
}

/// A live process bound to `path` accepts a connect (or refuses it with
/// EPERM when its socket is connected to another peer); a stale socket file
/// refuses it with ECONNREFUSED and is removed.
fn clear_stale(path: &Path) -> Result<(), DgramError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(DgramError::Sys {
                what: "checking",
                target: path.display().to_string(),
                source: e,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(DgramError::NotASocket(path.to_path_buf()));
    }
    let probe = UnixDatagram::unbound().map_err(|e| DgramError::Sys {
        what: "socket for probing",
        target: path.display().to_string(),
        source: e,
    })?;
    match probe.connect(path) {
        // A socket connected to another peer refuses ours (EPERM): live too.
        Ok(()) => return Err(DgramError::InUse(path.to_path_buf())),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            return Err(DgramError::InUse(path.to_path_buf()))
        }
        Err(_) => {}
    }
    std::fs::remove_file(path).map_err(|e| DgramError::Sys {
        what: "removing the stale socket",
        target: path.display().to_string(),
        source: e,
    })
}

#[cfg(test)]
mod tests;
