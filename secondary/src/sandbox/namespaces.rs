//! The worker's own namespaces, so that a compromised worker reaches no
//! network and no System V object of the host.
//!
//! A new user namespace lets an unprivileged process make the others and
//! gives it, inside, the capabilities to set them up (all dropped right
//! after, `caps::clear_all`). The network namespace has only a loopback,
//! down; the TAP queue fd the worker gets later keeps working, as any open
//! fd keeps its device. IPC and UTS namespaces of its own leave it no
//! System V objects or host name to touch. No PID namespace: the primary
//! and the kernel log know a worker by its one PID.
//!
//! Files are closed by Landlock (`landlock`). Only where the kernel has no
//! Landlock does the worker also take a mount namespace whose root is an
//! empty read-only tmpfs ([`empty_root`]): the tmpfs is mounted on `/tmp`
//! (present on every system, and only in this namespace), made the root
//! with `pivot_root(".", ".")`, and the old root, stacked beneath it, is
//! detached. It costs more: tearing a mount namespace down at exit waits
//! for an RCU grace period, which delays the worker's exit, so its
//! replacement, by up to tens of milliseconds on a loaded machine.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use super::{call, SandboxError};

/// Where the empty root is mounted before it becomes `/`.
const EMPTY_ROOT_AT: &str = "/tmp";

/// Enter the new user, network, IPC and UTS namespaces.
pub(super) fn isolate() -> Result<(), SandboxError> {
    unshare(
        CloneFlags::CLONE_NEWUSER
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS,
    )
    .map_err(call(
        "creating the worker's namespaces (user, network, IPC, UTS): \
         are unprivileged user namespaces allowed (user.max_user_namespaces)?",
    ))
}

/// Enter a mount namespace of its own and make an empty root its `/`
/// (after [`isolate`]: the user namespace gives the right to).
pub(super) fn empty_root() -> Result<(), SandboxError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(call("creating the worker's mount namespace"))?;
    // Nothing mounted here propagates back to the host's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(call("making the worker's mounts private"))?;
    mount(
        Some("qpnet-empty"),
        EMPTY_ROOT_AT,
        Some("tmpfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_NOSUID,
        Some("size=4k,nr_inodes=2,mode=0555"),
    )
    .map_err(call("mounting the worker's empty root"))?;
    nix::unistd::chdir(EMPTY_ROOT_AT).map_err(call("entering the empty root"))?;
    nix::unistd::pivot_root(".", ".").map_err(call("pivot_root to the empty root"))?;
    // The old root now lies beneath the new one, at the same place.
    umount2(".", MntFlags::MNT_DETACH).map_err(call("detaching the old root"))?;
    nix::unistd::chdir("/").map_err(call("entering the new root"))?;
    Ok(())
}
