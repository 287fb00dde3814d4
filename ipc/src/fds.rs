//! The fds that travel beside control messages: how many each request
//! carries, and what kind they must be, checked in one place.
//!
//! A vhost-user VMM hands the primary eventfds (kick, call, error) and memory
//! fds; the primary passes them on to workers. Both sides check them with the
//! functions here: the primary when the VMM sends them (so a bad fd is refused
//! before any state changes), the worker when it receives them (so a worker
//! never trusts its peer to have done it). A count that differs from
//! [`Request::fds_expected`] refuses the whole message; its fds are closed
//! when the caller drops them, at once.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use crate::{Request, RingConfig};

/// Why the fds beside a message were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FdError {
    /// The request carries another number of fds than it needs.
    #[error("{request} carries {got} fds, it needs {expected}")]
    Count {
        /// The request's name.
        request: &'static str,
        /// Fds the request needs.
        expected: usize,
        /// Fds that came with it.
        got: usize,
    },
    /// The fd of `AttachFrameIo{kind: Datagram | Stream}` is not a socket.
    #[error("the socket frame I/O fd is not a socket ({0})")]
    NotSocket(String),
    /// An fd that must be an eventfd is something else.
    #[error("the {which} fd is not an eventfd ({target})")]
    NotEventfd {
        /// Which fd ("kick", "call", "error").
        which: &'static str,
        /// What `/proc/self/fd` says it is.
        target: String,
    },
}

impl Request {
    /// A short name, for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::SetFeatures { .. } => "set-features",
            Request::SetMemTable { .. } => "set-mem-table",
            Request::AttachFrameIo { .. } => "attach-frame-io",
            Request::AttachShared { .. } => "attach-shared",
            Request::StartRing(_) => "start-ring",
            Request::StopRing { .. } => "stop-ring",
            Request::Shutdown => "shutdown",
        }
    }

    /// How many fds travel beside this request: one per memory region for
    /// SetMemTable, the frame I/O fd or the shared region for AttachFrameIo /
    /// AttachShared, the ring's eventfds for StartRing
    /// ([`RingConfig::fd_names`]), none otherwise.
    pub fn fds_expected(&self) -> usize {
        match self {
            Request::SetMemTable { regions } => regions.len(),
            Request::AttachFrameIo { .. } | Request::AttachShared { .. } => 1,
            Request::StartRing(cfg) => cfg.fd_names().count(),
            Request::Hello { .. }
            | Request::SetFeatures { .. }
            | Request::StopRing { .. }
            | Request::Shutdown => 0,
        }
    }

    /// Check the fds that came with this request: their number, for
    /// StartRing that each of them (kick, call, error) is an
    /// anonymous-inode fd ([`check_anon_inode`]; the primary has made sure
    /// they are eventfds), and for `AttachFrameIo{kind: Datagram | Stream}` that
    /// the fd is a socket (the worker checks its type when it takes
    /// it). A TAP queue is not checked by kind: tests stand in for it with a
    /// socketpair.
    pub fn check_fds<F: AsFd>(&self, fds: &[F]) -> Result<(), FdError> {
        let expected = self.fds_expected();
        if fds.len() != expected {
            return Err(FdError::Count {
                request: self.name(),
                expected,
                got: fds.len(),
            });
        }
        match self {
            Request::StartRing(cfg) => {
                for (fd, which) in fds.iter().zip(cfg.fd_names()) {
                    check_anon_inode(which, fd.as_fd())?;
                }
            }
            Request::AttachFrameIo {
                kind: crate::FrameIoKind::Datagram | crate::FrameIoKind::Stream,
            } => {
                for fd in fds {
                    check_socket(fd.as_fd())?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The eventfds beside a StartRing, by role.
#[derive(Debug)]
pub struct RingFds<F> {
    /// The kick eventfd (always there).
    pub kick: F,
    /// The call eventfd, when `has_call`.
    pub call: Option<F>,
    /// The error eventfd (SET_VRING_ERR), when `has_err`.
    pub err: Option<F>,
}

impl RingConfig {
    /// The eventfds beside a StartRing, in the order they travel: `"kick"`,
    /// then `"call"` when `has_call`, then `"error"` when `has_err`.
    pub fn fd_names(&self) -> impl Iterator<Item = &'static str> {
        [
            ("kick", true),
            ("call", self.has_call),
            ("error", self.has_err),
        ]
        .into_iter()
        .filter_map(|(name, present)| present.then_some(name))
    }

    /// Name the fds of a StartRing by role, in the order of
    /// [`RingConfig::fd_names`]; `None` when fewer came than it names (the
    /// count is [`Request::check_fds`]'s to refuse).
    pub fn split_fds<F>(&self, fds: Vec<F>) -> Option<RingFds<F>> {
        let mut fds = fds.into_iter();
        let kick = fds.next()?;
        let mut next_if = |present: bool| {
            if present {
                fds.next().map(Some)
            } else {
                Some(None)
            }
        };
        let call = next_if(self.has_call)?;
        let err = next_if(self.has_err)?;
        Some(RingFds { kick, call, err })
    }
}

/// Refuse an fd that is not an anonymous-inode fd (no file type in its
/// mode: an eventfd, never a file, memfd, socket, pipe or device), with
/// `fstat` alone: what a sandboxed worker can check of the ring fds it
/// gets, having no file system. The primary, which takes them from the VMM,
/// narrows them to eventfds first ([`check_eventfd`]).
pub fn check_anon_inode(which: &'static str, fd: BorrowedFd<'_>) -> Result<(), FdError> {
    let mode = match nix::sys::stat::fstat(fd) {
        Ok(st) => st.st_mode,
        Err(e) => {
            return Err(FdError::NotEventfd {
                which,
                target: format!("fstat: {e}"),
            })
        }
    };
    if mode & nix::sys::stat::SFlag::S_IFMT.bits() != 0 {
        return Err(FdError::NotEventfd {
            which,
            target: format!("not an anonymous inode (mode {mode:o})"),
        });
    }
    Ok(())
}

/// Refuse an fd that is not a socket (`fstat` alone, as a sandboxed worker
/// can).
pub fn check_socket(fd: BorrowedFd<'_>) -> Result<(), FdError> {
    let mode = nix::sys::stat::fstat(fd)
        .map_err(|e| FdError::NotSocket(format!("fstat: {e}")))?
        .st_mode;
    let kind = mode & nix::sys::stat::SFlag::S_IFMT.bits();
    if kind != nix::sys::stat::SFlag::S_IFSOCK.bits() {
        return Err(FdError::NotSocket(format!("mode {mode:o}")));
    }
    Ok(())
}

/// Refuse an fd that is not an eventfd: an anonymous inode whose name in
/// `/proc/self/fd` is `anon_inode:[eventfd]` (the primary's check of the
/// fds a VMM sends).
pub fn check_eventfd(which: &'static str, fd: BorrowedFd<'_>) -> Result<(), FdError> {
    check_anon_inode(which, fd)?;
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    match std::fs::read_link(&link) {
        Ok(t) if t.as_os_str() == "anon_inode:[eventfd]" => Ok(()),
        Ok(t) => Err(FdError::NotEventfd {
            which,
            target: t.to_string_lossy().into_owned(),
        }),
        Err(e) => Err(FdError::NotEventfd {
            which,
            target: format!("readlink {link}: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RingConfig, RingKind};
    use std::os::fd::OwnedFd;

    fn eventfd() -> OwnedFd {
        nix::sys::eventfd::EventFd::new().unwrap().into()
    }

    fn start(has_call: bool) -> Request {
        start_with(has_call, false)
    }

    fn start_with(has_call: bool, has_err: bool) -> Request {
        Request::StartRing(RingConfig {
            kind: RingKind::Rx,
            size: 256,
            desc_table: 0,
            avail_ring: 0x1000,
            used_ring: 0x2000,
            next_avail: 0,
            has_call,
            has_err,
            signal_on_start: false,
        })
    }

    #[test]
    fn counts_are_checked_per_request() {
        assert!(start(true).check_fds(&[eventfd(), eventfd()]).is_ok());
        assert_eq!(
            start(true).check_fds(&[eventfd()]),
            Err(FdError::Count {
                request: "start-ring",
                expected: 2,
                got: 1
            })
        );
        assert!(Request::Shutdown.check_fds(&[eventfd()]).is_err());
        assert!(Request::Shutdown.check_fds::<OwnedFd>(&[]).is_ok());
        let dgram = Request::AttachFrameIo {
            kind: crate::FrameIoKind::Datagram,
        };
        assert_eq!(dgram.fds_expected(), 1);
        assert!(matches!(
            dgram.check_fds(&[eventfd()]),
            Err(FdError::NotSocket(_))
        ));
        let (a, _b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Datagram,
            None,
            nix::sys::socket::SockFlag::empty(),
        )
        .unwrap();
        assert!(dgram.check_fds(&[a]).is_ok());
    }

    #[test]
    fn the_error_eventfd_comes_last_and_is_counted() {
        assert_eq!(start_with(true, true).fds_expected(), 3);
        assert_eq!(start_with(false, true).fds_expected(), 2);
        let Request::StartRing(cfg) = start_with(false, true) else {
            unreachable!()
        };
        assert_eq!(cfg.fd_names().collect::<Vec<_>>(), ["kick", "error"]);
        assert!(start_with(true, true)
            .check_fds(&[eventfd(), eventfd(), eventfd()])
            .is_ok());
        assert!(matches!(
            start_with(true, true).check_fds(&[eventfd(), eventfd()]),
            Err(FdError::Count {
                expected: 3,
                got: 2,
                ..
            })
        ));
        let Request::StartRing(both) = start_with(true, true) else {
            unreachable!()
        };
        let fds = both.split_fds(vec![1, 2, 3]).unwrap();
        assert_eq!((fds.kick, fds.call, fds.err), (1, Some(2), Some(3)));
        let fds = cfg.split_fds(vec![1, 2]).unwrap();
        assert_eq!((fds.kick, fds.call, fds.err), (1, None, Some(2)));
        assert!(cfg.split_fds(vec![1]).is_none());
        let (pipe, _w) = nix::unistd::pipe().unwrap();
        assert!(matches!(
            start_with(false, true).check_fds(&[eventfd(), pipe]),
            Err(FdError::NotEventfd { which: "error", .. })
        ));
    }

    #[test]
    fn ring_fds_must_be_eventfds() {
        let (pipe, _w) = nix::unistd::pipe().unwrap();
        match start(true).check_fds(&[eventfd(), pipe]) {
            Err(FdError::NotEventfd {
                which: "call",
                target,
            }) => {
                assert!(target.starts_with("not an anonymous inode"), "{target}")
            }
            other => panic!("{other:?}"),
        }
        // Another anonymous-inode fd passes the worker's fstat check; the
        // primary, which takes the fds from the VMM, tells it apart by its
        // name in /proc.
        let epoll =
            nix::sys::epoll::Epoll::new(nix::sys::epoll::EpollCreateFlags::empty()).unwrap();
        assert!(check_eventfd("call", eventfd().as_fd()).is_ok());
        match check_eventfd("call", epoll.0.as_fd()) {
            Err(FdError::NotEventfd {
                which: "call",
                target,
            }) => assert_eq!(target, "anon_inode:[eventpoll]"),
            other => panic!("{other:?}"),
        }
    }
}
