//! The worker's privileges, given up at start before it reads anything the
//! guest or the VMM wrote.
//!
//! A worker parses guest-controlled memory, so it keeps nothing it does not
//! need: the capability bounding set is emptied (while it still may), the
//! process takes the unprivileged user the primary names ([`RunAs`], from
//! `qpnet run --worker-user`), ambient, inheritable, permitted and
//! effective capabilities are cleared, and `no_new_privs` is set, so no
//! later exec could gain any. Everything a worker uses afterwards arrives
//! as fds on its control socket (guest memory, the TAP queue, eventfds, the
//! shared region), which work whatever the process's user.
//!
//! A change of user clears the parent-death signal, so it is set again, and
//! the worker gives up if the primary died in between.

use std::fmt;
use std::str::FromStr;

use nix::sys::signal::Signal;
use nix::unistd::{getppid, Gid, Uid};

/// The user and group a worker runs as: `UID:GID` on its command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Group id (the only group: supplementary groups are dropped).
    pub gid: u32,
}

impl fmt::Display for RunAs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

impl FromStr for RunAs {
    type Err = String;

    fn from_str(s: &str) -> Result<RunAs, String> {
        let (u, g) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not UID:GID"))?;
        let id = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{v:?} in {s:?} is not a numeric id"))
        };
        Ok(RunAs {
            uid: id(u)?,
            gid: id(g)?,
        })
    }
}

/// A step of giving up privileges that failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A system call refused.
    #[error("{what}")]
    Call {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The primary exited while the worker changed its user (the death
    /// signal that would have told it was cleared by the change).
    #[error("the primary exited while the worker was dropping its privileges")]
    Orphaned,
}

fn call(what: &'static str) -> impl FnOnce(nix::Error) -> SandboxError {
    move |source| SandboxError::Call { what, source }
}

/// `prctl` with integer arguments; `Err` with errno on -1.
fn prctl(option: libc::c_int, arg: libc::c_ulong) -> nix::Result<()> {
    // SAFETY: the options used here (PR_CAPBSET_DROP, PR_CAP_AMBIENT) take
    // integer arguments only and touch no memory of ours.
    let r = unsafe {
        libc::prctl(
            option,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    nix::errno::Errno::result(r).map(drop)
}

/// Drop every capability whose bit is not in `keep` from the bounding
/// set, up to the last one the kernel knows.
fn limit_bounding_set(keep: u64) -> nix::Result<()> {
    for cap in 0..64u64 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        match prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINVAL) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn drop_bounding_set() -> nix::Result<()> {
    limit_bounding_set(0)
}

/// `capset` header and data (`<linux/capability.h>`, version 3: two
/// 32-bit words per set).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Set the effective and permitted sets of this thread to `keep` and the
/// inheritable set to nothing (call it before other threads exist: the
/// sets are per thread).
fn set_capabilities(keep: u64) -> nix::Result<()> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let word = |w: u32| CapData {
        effective: (keep >> (32 * w)) as u32,
        permitted: (keep >> (32 * w)) as u32,
        inheritable: 0,
    };
    let data = [word(0), word(1)];
    // SAFETY: capset reads one header and two data structs of the layout
    // above, which live on our stack for the call; pid 0 is this thread.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    nix::errno::Errno::result(r).map(drop)
}

/// What the primary keeps once it is set up (TAP queues open, socket
/// bound, runtime directory made), as `1 << CAP_*` bits: CAP_SETUID,
/// CAP_SETGID and CAP_SETPCAP so that each worker it starts can change its
/// user and empty its bounding set, and CAP_KILL to signal workers that no
/// longer run as its user. Nothing else: the TAP's later settings
/// (TUNSETOFFLOAD, TUNSETVNETHDRSZ) need no capability on an open queue.
pub const PRIMARY_CAPABILITIES: u64 =
    (1 << CAP_KILL) | (1 << CAP_SETGID) | (1 << CAP_SETUID) | (1 << CAP_SETPCAP);

// Capability numbers (`<linux/capability.h>`).
const CAP_KILL: u32 = 5;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;

/// Keep only the capabilities whose bits are in `keep` (`1 << CAP_*`), in
/// the bounding, effective and permitted sets; inheritable and ambient
/// emptied. For the primary once it is set up (its workers, exec'd as
/// root, then start with at most these). Does nothing when not root.
pub fn keep_only_capabilities(keep: u64) -> Result<(), SandboxError> {
    if !Uid::effective().is_root() {
        return Ok(());
    }
    limit_bounding_set(keep).map_err(call("limiting the capability bounding set"))?;
    match prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    ) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(call("clearing the ambient capabilities")(e)),
    }
    set_capabilities(keep).map_err(call("limiting the capability sets"))
}

/// Give up every privilege (see the module documentation); with `run_as`,
/// become that user first.
pub fn enter(run_as: Option<RunAs>) -> Result<(), SandboxError> {
    let primary = getppid();
    let root = Uid::effective().is_root();
    match drop_bounding_set() {
        Ok(()) => {}
        // Without CAP_SETPCAP (a worker not started as root) the bounding
        // set cannot shrink; no_new_privs below still means no exec can
        // gain anything from it.
        Err(nix::errno::Errno::EPERM) if !root => {}
        Err(e) => return Err(call("emptying the capability bounding set")(e)),
    }
    if let Some(r) = run_as {
        nix::unistd::setgroups(&[]).map_err(call("dropping supplementary groups"))?;
        let g = Gid::from_raw(r.gid);
        nix::unistd::setresgid(g, g, g).map_err(call("setresgid"))?;
        let u = Uid::from_raw(r.uid);
        nix::unistd::setresuid(u, u, u).map_err(call("setresuid"))?;
    }
    match prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    ) {
        // Kernels before 4.3 have no ambient set to clear.
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(call("clearing the ambient capabilities")(e)),
    }
    set_capabilities(0).map_err(call("clearing the capability sets"))?;
    nix::sys::prctl::set_no_new_privs().map_err(call("setting no_new_privs"))?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(call("setting the death signal"))?;
    if getppid() != primary {
        return Err(SandboxError::Orphaned);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_as_reads_and_writes_uid_colon_gid() {
        let r: RunAs = "65534:65534".parse().unwrap();
        assert_eq!(
            r,
            RunAs {
                uid: 65534,
                gid: 65534
            }
        );
        assert_eq!(r.to_string(), "65534:65534");
        for bad in ["65534", "a:1", "1:", ":1", "1:2:3", "-1:0"] {
            assert!(bad.parse::<RunAs>().is_err(), "{bad:?} accepted");
        }
    }
}
