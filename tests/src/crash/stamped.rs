//! A packet socket on the TAP that stamps each frame with the kernel's
//! receive time (`SO_TIMESTAMPNS`), so an arrival time in the crash tests is
//! when qpnet's `writev` reached the TAP, not when the test got round to
//! reading it.

use std::io::IoSliceMut;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};

use crate::frames::ETHERTYPE_TEST;
use crate::netns::NetNs;
use crate::tap_io::{set_int_option, wait_readable};

/// `PACKET_IGNORE_OUTGOING` (linux/if_packet.h).
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// Receive buffer of the stamping socket.
const SOCKET_BUFFER_BYTES: libc::c_int = 64 << 20;

/// A packet socket on the TAP netdev that receives test frames (ethertype
/// 0x88B5) with the kernel's receive timestamp.
#[derive(Debug)]
pub struct StampedTap {
    fd: OwnedFd,
}

impl StampedTap {
    /// Open it on `ifname` inside `ns`.
    pub fn open(ns: &NetNs, ifname: &str) -> Result<StampedTap> {
        let name = ifname.to_owned();
        ns.run(move || {
            let ifindex = nix::net::if_::if_nametoindex(name.as_str())
                .with_context(|| format!("no interface {name} in the namespace"))?;
            // SAFETY: plain socket(2); the result is checked before use.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(ETHERTYPE_TEST.to_be()),
                )
            };
            if raw < 0 {
                return Err(std::io::Error::last_os_error())
                    .context("socket(AF_PACKET) (needs CAP_NET_RAW)");
            }
            // SAFETY: a fresh descriptor nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = ETHERTYPE_TEST.to_be();
            addr.sll_ifindex = ifindex as i32;
            // SAFETY: `addr` is a valid sockaddr_ll for the length given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error()).context("bind(AF_PACKET)");
            }
            set_int_option(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)?;
            set_int_option(
                &fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                SOCKET_BUFFER_BYTES,
            )?;
            setsockopt(&fd, sockopt::ReceiveTimestampns, &true).context("SO_TIMESTAMPNS")?;
            Ok(StampedTap { fd })
        })
    }

    /// The next frame (into `buf`) and its kernel receive time, or `None`
    /// after `timeout`.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> Result<Option<(usize, u64)>> {
        if !wait_readable(self.fd.as_raw_fd(), timeout)? {
            return Ok(None);
        }
        let mut iov = [IoSliceMut::new(buf)];
        let mut space = nix::cmsg_space!(nix::sys::time::TimeSpec);
        let msg = match recvmsg::<()>(
            self.fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Ok(None),
            Err(e) => return Err(e).context("recvmsg on the stamping socket"),
        };
        let mut stamp = None;
        for c in msg.cmsgs().context("control messages")? {
            if let ControlMessageOwned::ScmTimestampns(ts) = c {
                stamp = Some(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64);
            }
        }
        let stamp = stamp.ok_or_else(|| anyhow!("a frame came without its timestamp"))?;
        Ok(Some((msg.bytes, stamp)))
    }
}
