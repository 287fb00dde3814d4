//! The TAP device: one multi-queue TAP per instance, one queue fd per queue
//! pair. The primary opens every queue (it alone holds CAP_NET_ADMIN), owns
//! the device-wide settings (vnet header size, offloads, link state) and
//! hands each fd to its worker.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_NAME_LEN: usize = 15;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

/// Why the TAP could not be set up. Each message names the fix.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is not a valid interface name.
    #[error("TAP name {0:?} is not valid: {1}")]
    BadName(String, &'static str),
    /// /dev/net/tun is missing.
    #[error("cannot open /dev/net/tun ({0}): load the tun module (modprobe tun) or run where /dev/net/tun exists")]
    NoTunDevice(#[source] std::io::Error),
    /// Not allowed to create or attach.
    #[error("not permitted to open TAP {0:?}: qpnet run needs CAP_NET_ADMIN (run it as root), and an existing TAP must be owned by this user")]
    NotPermitted(String),
    /// The TAP exists with incompatible flags.
    #[error("TAP {0:?} exists but is not a multi-queue TAP with vnet headers: delete it (ip link del {0}) or create it with `ip tuntap add dev {0} mode tap multi_queue vnet_hdr`")]
    Incompatible(String),
    /// A queue is busy.
    #[error("TAP {0:?} has no free queue: another process holds its queues")]
    Busy(String),
    /// Any other ioctl failure.
    #[error("{what} on TAP {name:?} failed")]
    Ioctl {
        /// The operation.
        what: &'static str,
        /// The interface.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A multi-queue TAP with one fd per queue pair.
pub struct Tap {
    name: String,
    queues: Vec<OwnedFd>,
    /// `[qp]`: taken out of the TAP's choice (its queue pair failed).
    detached: Vec<Cell<bool>>,
    created: bool,
}

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[repr(C)]
struct IfReqInt {
    name: [u8; libc::IFNAMSIZ],
    value: libc::c_int,
    _pad: [u8; 20],
}

// The kernel reads and writes a whole `struct ifreq` (40 bytes on Linux)
// through the pointers the ioctls below get: both shapes must be that big.
const _: () = assert!(std::mem::size_of::<IfReqFlags>() == 40);
const _: () = assert!(std::mem::size_of::<IfReqInt>() == 40);

/// Check `name` is a name Linux accepts for an interface.
pub fn validate_name(name: &str) -> Result<(), TapError> {
    let bad = |why| Err(TapError::BadName(name.to_string(), why));
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("too long: interface names have at most 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are not interface names");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return bad("must not contain '/', ':', NUL or white space");
    }
    Ok(())
}

fn ifname(name: &str) -> [u8; libc::IFNAMSIZ] {
    let mut n = [0u8; libc::IFNAMSIZ];
    n[..name.len()].copy_from_slice(name.as_bytes());
    n
}

impl Tap {
    /// Create the TAP `name` (or attach to an existing multi-queue one) and
    /// open `queues` queue fds with vnet headers of `header_len` bytes.
    pub fn open(name: &str, queues: usize) -> Result<Tap, TapError> {
        validate_name(name)?;
        let dev = Path::new("/sys/class/net").join(name);
        let existed = dev.exists();
        if existed {
            check_existing(name, &dev)?;
        }
        let mut fds = Vec::with_capacity(queues);
        for _ in 0..queues {
            fds.push(open_queue(name)?);
        }
        let tap = Tap {
            name: name.to_string(),
            detached: fds.iter().map(|_| Cell::new(false)).collect(),
            queues: fds,
            created: !existed,
        };
        tap.set_header_len(12)?;
        tap.set_link_up()?;
        Ok(tap)
    }

    /// A TAP that is nothing but its queue fds, for tests of what workers
    /// are handed (its settings fail: `name` names no interface).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn from_queues(name: &str, queues: Vec<OwnedFd>) -> Tap {
        Tap {
            name: name.to_string(),
            detached: queues.iter().map(|_| Cell::new(false)).collect(),
            queues,
            created: false,
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether qpnet created the interface (it disappears when qpnet exits).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The fd of queue `qp`.
    pub fn queue(&self, qp: usize) -> Option<&OwnedFd> {
        self.queues.get(qp)
    }

    /// Take queue `qp` out of the TAP's choice (`attached` false) or put it
    /// back (TUNSETQUEUE with IFF_DETACH_QUEUE / IFF_ATTACH_QUEUE): the TAP
    /// steers frames for the guest only to attached queues, so a failed
    /// queue pair's frames go to the others instead of waiting in a queue
    /// nobody reads. Detaching drops the frames that queue held. Returns
    /// whether anything changed.
    pub fn set_queue_attached(&self, qp: usize, attached: bool) -> Result<bool, TapError> {
        let (Some(q), Some(detached)) = (self.queues.get(qp), self.detached.get(qp)) else {
            return Ok(false);
        };
        if detached.get() != attached {
            return Ok(false);
        }
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: if attached {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            _pad: [0; 22],
        };
        // SAFETY: TUNSETQUEUE reads the ifreq we own (its flags).
        let r = unsafe { libc::ioctl(q.as_raw_fd(), TUNSETQUEUE, &mut req) };
        self.check(r, "TUNSETQUEUE")?;
        detached.set(!attached);
        Ok(true)
    }

    /// Set the vnet header length (10 or 12) on every queue.
    pub fn set_header_len(&self, len: u32) -> Result<(), TapError> {
        let v: libc::c_int = len as libc::c_int;
        for q in &self.queues {
            // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer,
            // which points at a live local.
            let r = unsafe { libc::ioctl(q.as_raw_fd(), TUNSETVNETHDRSZ, &v) };
            self.check(r, "TUNSETVNETHDRSZ")?;
        }
        Ok(())
    }

    /// Set the offloads the guest accepts (TUN_F_* flags), device-wide.
    pub fn set_offloads(&self, flags: u32) -> Result<(), TapError> {
        if let Some(q) = self.queues.first() {
            // SAFETY: TUNSETOFFLOAD takes the flags by value.
            let r = unsafe { libc::ioctl(q.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
            self.check(r, "TUNSETOFFLOAD")?;
        }
        Ok(())
    }

    /// The interface MTU.
    pub fn mtu(&self) -> Result<u32, TapError> {
        let sock = control_socket(&self.name)?;
        let mut req = IfReqInt {
            name: ifname(&self.name),
            value: 0,
            _pad: [0; 20],
        };
        // SAFETY: SIOCGIFMTU writes an int into the ifreq we own.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) };
        self.check(r, "SIOCGIFMTU")?;
        Ok(req.value.max(68) as u32)
    }

    fn set_link_up(&self) -> Result<(), TapError> {
        let sock = control_socket(&self.name)?;
        let mut req = IfReqFlags {
            name: ifname(&self.name),
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: SIOCGIFFLAGS fills the flags of the ifreq we own.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
        self.check(r, "SIOCGIFFLAGS")?;
        if req.flags & libc::IFF_UP as libc::c_short == 0 {
            req.flags |= libc::IFF_UP as libc::c_short;
            // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
            let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
            self.check(r, "SIOCSIFFLAGS (link up)")?;
        }
        Ok(())
    }

    fn check(&self, r: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if r < 0 {
            return Err(TapError::Ioctl {
                what,
                name: self.name.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// An existing TAP must already have vnet headers (and be multi-queue):
/// attaching with IFF_VNET_HDR would switch the device's flag for every
/// other user of it, so such a TAP is refused rather than changed.
fn check_existing(name: &str, dev: &Path) -> Result<(), TapError> {
    let Ok(text) = std::fs::read_to_string(dev.join("tun_flags")) else {
        // Not a tun device at all: TUNSETIFF refuses it below.
        return Ok(());
    };
    let flags = i64::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap_or(0);
    let needed = i64::from(IFF_VNET_HDR | IFF_MULTI_QUEUE);
    if flags & needed != needed {
        return Err(TapError::Incompatible(name.to_string()));
    }
    Ok(())
}

fn open_queue(name: &str) -> Result<OwnedFd, TapError> {
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(TapError::NoTunDevice)?;
    let mut req = IfReqFlags {
        name: ifname(name),
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE,
        _pad: [0; 22],
    };
    // SAFETY: TUNSETIFF reads the ifreq and writes the interface's name back
    // into it, so it gets a pointer to a live, exclusively borrowed local of
    // the full `struct ifreq` size (40 bytes); the fd is a freshly opened tun
    // fd.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => TapError::NotPermitted(name.to_string()),
            Some(libc::EINVAL) => TapError::Incompatible(name.to_string()),
            Some(libc::EBUSY) => TapError::Busy(name.to_string()),
            _ => TapError::Ioctl {
                what: "TUNSETIFF",
                name: name.to_string(),
                source: e,
            },
        });
    }
    Ok(OwnedFd::from(file))
}

fn control_socket(name: &str) -> Result<OwnedFd, TapError> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| TapError::Ioctl {
        what: "socket",
        name: name.to_string(),
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("tap0").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a-very-long-tap-name").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name("with space").is_err());
    }
}
