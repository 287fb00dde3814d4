//! One end of a control socket: framing, encoding and fd passing.
//!
//! A `SOCK_SEQPACKET` socket keeps message boundaries, so one `sendmsg` is one
//! message. Receiving uses a buffer one byte larger than the largest message
//! and checks `MSG_TRUNC`/`MSG_CTRUNC`, so a truncated message or a cut-off fd
//! list is an error instead of silently lost data (fds that did arrive are
//! closed when the error drops them).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest encoded message accepted in either direction.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;
/// Largest number of fds one message may carry.
pub const MAX_FDS: usize = 16;

/// Why a control-socket operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// The peer closed its end (it exited or was killed).
    #[error("control socket closed by the peer")]
    Closed,
    /// No message arrived within the allowed time.
    #[error("no reply on the control socket within {0:?}")]
    Timeout(Duration),
    /// A system call on the socket failed.
    #[error("control socket {op} failed")]
    Io {
        /// The operation (send, recv, poll, socketpair).
        op: &'static str,
        /// The error number.
        #[source]
        source: nix::Error,
    },
    /// The message or its fd list did not fit the receive buffers.
    #[error("control message truncated (data or fds did not fit)")]
    Truncated,
    /// More fds than [`MAX_FDS`] were to be sent.
    #[error("{0} fds in one message, at most {MAX_FDS} allowed")]
    TooManyFds(usize),
    /// The fd is not a `SOCK_SEQPACKET` socket.
    #[error("fd {0} is not a SOCK_SEQPACKET socket")]
    NotSeqPacket(RawFd),
    /// A message could not be encoded (or is larger than [`MAX_MESSAGE_SIZE`]).
    #[error("cannot encode control message: {0}")]
    Encode(String),
    /// Bytes received are not a valid message.
    #[error("cannot decode control message: {0}")]
    Decode(String),
}

/// One end of a control socket.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

fn codec() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Fixint,
    bincode::config::Limit<MAX_MESSAGE_SIZE>,
> {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<MAX_MESSAGE_SIZE>()
}

/// Encode one message as [`Channel::send`] puts it on the wire.
pub fn encode_message<T: Serialize>(msg: &T) -> Result<Vec<u8>, IpcError> {
    bincode::serde::encode_to_vec(msg, codec()).map_err(|e| IpcError::Encode(e.to_string()))
}

/// Decode one message from the bytes of one received datagram, as
/// [`Channel::recv`] does: the bytes must hold exactly one message (trailing
/// bytes are an error). Never panics, whatever the bytes.
pub fn decode_message<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, IpcError> {
    let (msg, used) = bincode::serde::decode_from_slice(bytes, codec())
        .map_err(|e| IpcError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(IpcError::Decode(format!(
            "{} trailing bytes after the message",
            bytes.len() - used
        )));
    }
    Ok(msg)
}

/// The body of the `ipc_decode` fuzz target (`fuzz/`), also replayed over
/// the kept corpus by `tests/tests/fuzz_replay.rs`: `bytes` decoded as a
/// [`Request`](crate::Request) and as a [`Reply`](crate::Reply); whatever
/// decodes must re-encode, and decode back to the same message. Panics only
/// when that property fails.
pub fn fuzz_ipc_decode(bytes: &[u8]) {
    fn round_trip<T>(bytes: &[u8])
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        if let Ok(msg) = decode_message::<T>(bytes) {
            let again = encode_message(&msg).expect("a decoded message re-encodes");
            let back: T = decode_message(&again).expect("a re-encoded message decodes");
            assert_eq!(back, msg, "decode(encode(msg)) != msg");
        }
    }
    round_trip::<crate::Request>(bytes);
    round_trip::<crate::Reply>(bytes);
}

impl Channel {
    /// A connected pair of control sockets, both close-on-exec.
    pub fn pair() -> Result<(Channel, Channel), IpcError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|source| IpcError::Io {
            op: "socketpair",
            source,
        })?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Wrap an fd that must be a `SOCK_SEQPACKET` socket (checked).
    pub fn from_fd(fd: OwnedFd) -> Result<Channel, IpcError> {
        match getsockopt(&fd, sockopt::SockType) {
            Ok(SockType::SeqPacket) => Ok(Channel { fd }),
            _ => Err(IpcError::NotSeqPacket(fd.as_raw_fd())),
        }
    }

    /// Send one message with `fds` attached.
    pub fn send<T: Serialize>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        if fds.len() > MAX_FDS {
            return Err(IpcError::TooManyFds(fds.len()));
        }
        let bytes = encode_message(msg)?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsgs = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
        let iov = [IoSlice::new(&bytes)];
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EPIPE) | Err(nix::Error::ECONNRESET) => {
                    return Err(IpcError::Closed)
                }
                Err(source) => return Err(IpcError::Io { op: "send", source }),
            }
        }
    }

    /// Receive one message and the fds that came with it (all close-on-exec).
    /// Blocks until a message arrives or the peer closes.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>), IpcError> {
        let mut buf = vec![0u8; MAX_MESSAGE_SIZE + 1];
        let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (len, fds) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for cmsg in cmsgs {
                            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                                for fd in raw {
                                    // SAFETY: the kernel just installed this fd
                                    // in our table for us; nothing else owns it.
                                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                                }
                            }
                        }
                    }
                    if msg
                        .flags
                        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
                    {
                        return Err(IpcError::Truncated);
                    }
                    break (msg.bytes, fds);
                }
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::ECONNRESET) => return Err(IpcError::Closed),
                Err(source) => return Err(IpcError::Io { op: "recv", source }),
            }
        };
        if len == 0 {
            return Err(IpcError::Closed);
        }
        if len > MAX_MESSAGE_SIZE {
            return Err(IpcError::Truncated);
        }
        Ok((decode_message(&buf[..len])?, fds))
    }

    /// Like [`Channel::recv`], but gives up after `timeout`.
    pub fn recv_timeout<T: DeserializeOwned>(
        &self,
        timeout: Duration,
    ) -> Result<(T, Vec<OwnedFd>), IpcError> {
        let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut pfd = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(
                &mut pfd,
                PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => return Err(IpcError::Timeout(timeout)),
                Ok(_) => return self.recv(),
                Err(nix::Error::EINTR) => continue,
                Err(source) => return Err(IpcError::Io { op: "poll", source }),
            }
        }
    }

    /// Send a request and wait up to `timeout` for its reply.
    pub fn call<Q: Serialize, A: DeserializeOwned>(
        &self,
        request: &Q,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<A, IpcError> {
        self.send(request, fds)?;
        let (reply, _fds) = self.recv_timeout(timeout)?;
        Ok(reply)
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Channel> for OwnedFd {
    fn from(c: Channel) -> OwnedFd {
        c.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Reply, Request, RingKind};
    use std::io::{Read, Seek, Write};

    #[test]
    fn request_round_trips_with_fds() {
        let (a, b) = Channel::pair().unwrap();
        let mut f = std::fs::File::from(
            nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::empty()).unwrap(),
        );
        f.write_all(b"hello").unwrap();
        a.send(&Request::StopRing { kind: RingKind::Tx }, &[f.as_fd()])
            .unwrap();
        let (req, fds): (Request, _) = b.recv().unwrap();
        assert_eq!(req, Request::StopRing { kind: RingKind::Tx });
        assert_eq!(fds.len(), 1);
        let flags = nix::fcntl::fcntl(&fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc_fd_cloexec(), 0, "received fd must be CLOEXEC");
        let mut g = std::fs::File::from(fds.into_iter().next().unwrap());
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
    }

    fn libc_fd_cloexec() -> i32 {
        nix::fcntl::FdFlag::FD_CLOEXEC.bits()
    }

    #[test]
    fn closed_peer_is_reported() {
        let (a, b) = Channel::pair().unwrap();
        drop(b);
        assert!(matches!(a.recv::<Reply>(), Err(IpcError::Closed)));
        assert!(matches!(a.send(&Reply::Ok, &[]), Err(IpcError::Closed)));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let (a, b) = Channel::pair().unwrap();
        nix::sys::socket::send(a.as_raw_fd(), &[0xff; 7], MsgFlags::empty()).unwrap();
        assert!(matches!(b.recv::<Request>(), Err(IpcError::Decode(_))));
    }

    #[test]
    fn oversized_message_is_truncation() {
        let (a, b) = Channel::pair().unwrap();
        let big = vec![0u8; MAX_MESSAGE_SIZE + 100];
        nix::sys::socket::setsockopt(&a.fd, sockopt::SndBuf, &(1 << 20)).unwrap();
        nix::sys::socket::send(a.as_raw_fd(), &big, MsgFlags::empty()).unwrap();
        assert!(matches!(b.recv::<Request>(), Err(IpcError::Truncated)));
    }

    #[test]
    fn too_many_fds_refused() {
        let (a, _b) = Channel::pair().unwrap();
        let fds: Vec<BorrowedFd<'_>> = (0..MAX_FDS + 1).map(|_| a.as_fd()).collect();
        assert!(matches!(
            a.send(&Reply::Ok, &fds),
            Err(IpcError::TooManyFds(_))
        ));
    }

    #[test]
    fn timeout_is_reported() {
        let (a, _b) = Channel::pair().unwrap();
        assert!(matches!(
            a.recv_timeout::<Reply>(Duration::from_millis(20)),
            Err(IpcError::Timeout(_))
        ));
    }

    #[test]
    fn not_seqpacket_refused() {
        let (s, _t) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            Channel::from_fd(OwnedFd::from(s)),
            Err(IpcError::NotSeqPacket(_))
        ));
    }
}
