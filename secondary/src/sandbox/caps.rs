//! Capabilities: the bounding, ambient, inheritable, permitted and
//! effective sets, emptied for a worker and cut down to
//! [`PRIMARY_CAPABILITIES`] for the primary once it is set up.

use nix::unistd::Uid;

use super::{call, SandboxError};

/// `prctl` with integer arguments; `Err` with errno on -1.
pub(super) fn prctl(option: libc::c_int, arg: libc::c_ulong) -> nix::Result<()> {
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

pub(super) fn drop_bounding_set() -> nix::Result<()> {
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
pub(super) fn set_capabilities(keep: u64) -> nix::Result<()> {
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

/// Drop every capability this process holds: the bounding set (which a
/// new user namespace fills again), ambient, inheritable, permitted and
/// effective.
pub(super) fn clear_all() -> Result<(), SandboxError> {
    drop_bounding_set().map_err(call("emptying the capability bounding set"))?;
    match prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    ) {
        // Kernels before 4.3 have no ambient set to clear.
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(call("clearing the ambient capabilities")(e)),
    }
    set_capabilities(0).map_err(call("clearing the capability sets"))
}
