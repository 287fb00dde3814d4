//! An AF_PACKET socket on the TAP netdev: the far end of qpnet's data path.
//!
//! qpnet holds the TAP's queue fds. What it writes there (frames from the
//! guest's TX rings) is *received* by the TAP netdev, and a packet socket bound
//! to that netdev sees it: [`TapSocket::recv_timeout`]. What the packet socket
//! *sends* on the netdev is queued by the tun driver to one of the queue fds
//! (chosen by flow hash), where qpnet reads it into the guest's RX rings:
//! [`TapSocket::send`].
//!
//! The socket receives only frames of one ethertype (tests use the local
//! experimental 0x88B5) and ignores its own outgoing frames, so nothing the
//! kernel emits on its own is mistaken for test traffic. It is created on a
//! thread inside the test's namespace and stays there.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::NetNs;

/// `PACKET_IGNORE_OUTGOING` (linux/if_packet.h): do not loop our own
/// transmissions back to us.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// Socket buffers large enough that a burst of test frames never overflows
/// them (the traffic helpers also keep a bounded window in flight).
const SOCKET_BUFFER_BYTES: libc::c_int = 64 << 20;

/// A raw packet socket bound to one interface, receiving one ethertype.
#[derive(Debug)]
pub struct TapSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl TapSocket {
    /// Open a packet socket on `ifname` inside `ns`, receiving frames of
    /// `ethertype` only.
    pub fn open(ns: &NetNs, ifname: &str, ethertype: u16) -> Result<TapSocket> {
        let name = ifname.to_owned();
        ns.run(move || {
            let ifindex = nix::net::if_::if_nametoindex(name.as_str())
                .with_context(|| format!("no interface {name} in the namespace"))?
                as i32;
            let fd = open_packet_socket(ethertype)?;
            bind_to_interface(&fd, ifindex, ethertype)?;
            set_int_option(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)?;
            set_int_option(
                &fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                SOCKET_BUFFER_BYTES,
            )?;
            set_int_option(
                &fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                SOCKET_BUFFER_BYTES,
            )?;
            Ok(TapSocket { fd, ifindex })
        })
    }

    /// Transmit `frame` (a whole Ethernet frame) on the TAP netdev. The tun
    /// driver queues it to one of the TAP's queue fds, i.e. to qpnet's RX path.
    /// The frame's own ethertype is given to the kernel so that the tun
    /// driver's flow hash (and so its queue choice) sees the real protocol.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        if frame.len() < 14 {
            bail!("frame of {} bytes has no Ethernet header", frame.len());
        }
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let addr = link_address(self.ifindex, ethertype);
        loop {
            // SAFETY: `frame` and `addr` are valid for the lengths given; the
            // kernel only reads them.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                if n as usize != frame.len() {
                    bail!("sent {n} of {} bytes", frame.len());
                }
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                // The device queue is momentarily full: back off a little.
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) => {
                    std::thread::sleep(Duration::from_micros(200))
                }
                _ => return Err(err).context("sendto on the TAP packet socket"),
            }
        }
    }

    /// The next frame the TAP netdev received, or `None` after `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        if !wait_readable(self.fd.as_raw_fd(), timeout)? {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock || err.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(err).context("recv on the TAP packet socket");
        }
        buf.truncate(n as usize);
        Ok(Some(buf))
    }

    /// A second handle on the same socket (for a receiving thread).
    pub fn try_clone(&self) -> Result<TapSocket> {
        Ok(TapSocket {
            fd: self.fd.try_clone().context("dup packet socket")?,
            ifindex: self.ifindex,
        })
    }

    /// Discard every frame already queued on the socket.
    pub fn drain(&self) -> Result<usize> {
        let mut n = 0;
        while self.recv_timeout(Duration::ZERO)?.is_some() {
            n += 1;
        }
        Ok(n)
    }
}

fn open_packet_socket(ethertype: u16) -> Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ethertype.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket(AF_PACKET) (needs CAP_NET_RAW)");
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn link_address(ifindex: i32, ethertype: u16) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ethertype.to_be();
    addr.sll_ifindex = ifindex;
    addr
}

fn bind_to_interface(fd: &OwnedFd, ifindex: i32, ethertype: u16) -> Result<()> {
    let addr = link_address(ifindex, ethertype);
    // SAFETY: `addr` is a valid sockaddr_ll for the length given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("bind(AF_PACKET) to the TAP");
    }
    Ok(())
}

/// setsockopt with an int value.
pub(crate) fn set_int_option(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> Result<()> {
    // SAFETY: `value` is a valid c_int for the length given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("setsockopt(level {level}, option {name})"));
    }
    Ok(())
}

/// poll(2) one fd for input; true when readable before `timeout`.
pub(crate) fn wait_readable(fd: RawFd, timeout: Duration) -> Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err).context("poll");
    }
    Ok(rc > 0)
}

/// Test-only: the queue fds of a multi-queue TAP opened by the test itself,
/// standing in for qpnet when checking the socket without qpnet.
#[cfg(test)]
pub(crate) mod tun_queue {
    use super::*;

    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

    /// Open one queue of the multi-queue TAP `name` (no vnet header);
    /// must be called on a thread inside the TAP's namespace.
    pub fn open(name: &str) -> Result<OwnedFd> {
        // SAFETY: open(2) of a fixed path; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("open /dev/net/tun");
        }
        // SAFETY: fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ifreq is plain old data; all-zero is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE;
        // SAFETY: TUNSETIFF reads and writes one ifreq we own.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut ifr) };
        if rc < 0 {
            return Err(io::Error::last_os_error()).context("TUNSETIFF");
        }
        Ok(fd)
    }

    /// Read one frame from a (non-blocking) queue fd, waiting up to `timeout`.
    pub fn read(fd: &OwnedFd, timeout: Duration) -> Result<Option<Vec<u8>>> {
        if !wait_readable(fd.as_raw_fd(), timeout)? {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error()).context("read tun queue");
        }
        buf.truncate(n as usize);
        Ok(Some(buf))
    }

    /// Write one frame to a queue fd.
    pub fn write(fd: &OwnedFd, frame: &[u8]) -> Result<()> {
        // SAFETY: `frame` is readable for its length.
        let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error()).context("write tun queue");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::{build, verify, FrameId, FrameKind, FrameSpec, ETHERTYPE_TEST};

    #[test]
    fn packet_socket_sees_tap_writes_and_feeds_tap_queues() {
        let ns = NetNs::new().unwrap();
        ns.add_tap("qptap0", None).unwrap();
        let queues = ns
            .run(|| {
                (0..4)
                    .map(|_| tun_queue::open("qptap0"))
                    .collect::<Result<Vec<_>>>()
            })
            .unwrap();
        let sock = TapSocket::open(&ns, "qptap0", ETHERTYPE_TEST).unwrap();

        // Written into a queue fd -> received by the netdev -> seen by the socket.
        let spec = FrameSpec {
            id: FrameId { queue: 3, seq: 7 },
            len: 1514,
            kind: FrameKind::Experimental,
        };
        tun_queue::write(&queues[2], &build(&spec)).unwrap();
        let got = sock
            .recv_timeout(Duration::from_secs(2))
            .unwrap()
            .expect("frame");
        assert_eq!(verify(&got).unwrap(), spec.id);

        // Sent by the socket -> queued to one of the queue fds, spread by flow hash.
        let mut per_queue = [0usize; 4];
        for seq in 0..64u32 {
            let spec = FrameSpec {
                id: FrameId { queue: 0, seq },
                len: 200,
                kind: FrameKind::Udp { flow: seq as u16 },
            };
            sock.send(&build(&spec)).unwrap();
        }
        let mut seen = 0;
        while seen < 64 {
            let mut progress = false;
            for (i, q) in queues.iter().enumerate() {
                if let Some(frame) = tun_queue::read(q, Duration::from_millis(50)).unwrap() {
                    verify(&frame).unwrap();
                    per_queue[i] += 1;
                    seen += 1;
                    progress = true;
                }
            }
            assert!(progress, "frames stopped after {seen}: {per_queue:?}");
        }
        assert!(
            per_queue.iter().filter(|&&n| n > 0).count() >= 2,
            "UDP flows did not spread over the TAP queues: {per_queue:?}"
        );
        // The socket ignores its own transmissions.
        assert!(sock
            .recv_timeout(Duration::from_millis(50))
            .unwrap()
            .is_none());
    }
}
