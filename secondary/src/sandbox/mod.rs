//! The worker's privileges and reach, given up at start before it reads
//! anything the guest or the VMM wrote.
//!
//! A worker parses guest-controlled memory, so it keeps nothing it does not
//! need, in this order:
//! 1. the capability bounding set is emptied while it still may be
//!    (`caps`), and the process takes the unprivileged user the primary
//!    names ([`RunAs`], from `qpnet run --worker-user`);
//! 2. it enters namespaces of its own (`namespaces`): a user namespace, a
//!    network namespace with no interface but a down loopback (the TAP
//!    queue fd it gets later still works: an open fd keeps its device),
//!    IPC and UTS;
//! 3. it closes every path (`landlock`: a Landlock ruleset granting no
//!    file-system right; where the kernel has no Landlock, an empty root
//!    in a mount namespace of its own instead), so no file of the host can
//!    be opened, not even `/proc`;
//! 4. every capability is dropped (bounding, ambient, inheritable,
//!    permitted, effective: the full set the new user namespace gave, too),
//!    `no_new_privs` is set and the parent-death signal set again (a change
//!    of credentials clears it; the worker gives up if the primary died in
//!    between);
//! 5. last, the seccomp allow-list (`seccomp`): any other system call kills
//!    the process (`SECCOMP_RET_KILL_PROCESS`), and the primary logs the
//!    call by number and name ([`syscall_name`]).
//!
//! Everything a worker uses afterwards arrives as fds on its control socket
//! (guest memory, the TAP queue, eventfds, the shared region), which work
//! whatever the process's user, root directory or network namespace.

mod caps;
mod landlock;
mod namespaces;
mod seccomp;
mod syscall_names;

pub use caps::{keep_only_capabilities, PRIMARY_CAPABILITIES};
pub use seccomp::kill_unless_allowed as seccomp_kill_unless_allowed;
pub use syscall_names::syscall_name;

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
    /// The Landlock ruleset could not be made or enforced.
    #[error("closing the file system with Landlock")]
    Landlock(#[source] ::landlock::RulesetError),
    /// The seccomp filter could not be built or installed.
    #[error("installing the seccomp filter")]
    Seccomp(#[source] seccompiler::Error),
    /// The primary exited while the worker changed its user (the death
    /// signal that would have told it was cleared by the change).
    #[error("the primary exited while the worker was dropping its privileges")]
    Orphaned,
}

fn call(what: &'static str) -> impl FnOnce(nix::Error) -> SandboxError {
    move |source| SandboxError::Call { what, source }
}

/// Give up every privilege and all reach (see the module documentation);
/// with `run_as`, become that user first.
pub fn enter(run_as: Option<RunAs>) -> Result<Sandboxed, SandboxError> {
    let began = std::time::Instant::now();
    let primary = getppid();
    let root = Uid::effective().is_root();
    match caps::drop_bounding_set() {
        Ok(()) => {}
        // Without CAP_SETPCAP (a worker not started as root) the bounding
        // set cannot shrink here; inside the user namespace below it can.
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
    namespaces::isolate()?;
    let files = if landlock::deny_files().map_err(SandboxError::Landlock)? {
        Files::Landlock
    } else {
        namespaces::empty_root()?;
        Files::EmptyRoot
    };
    caps::clear_all()?;
    nix::sys::prctl::set_no_new_privs().map_err(call("setting no_new_privs"))?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(call("setting the death signal"))?;
    if getppid() != primary {
        return Err(SandboxError::Orphaned);
    }
    let uid = Uid::current().as_raw();
    seccomp::install()?;
    Ok(Sandboxed {
        files,
        uid,
        took: began.elapsed(),
    })
}

/// How a worker's files were closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Files {
    /// A Landlock ruleset granting no file-system right.
    Landlock,
    /// An empty root in a mount namespace of its own (no Landlock).
    EmptyRoot,
}

/// What [`enter`] set up, for the worker's log.
#[derive(Debug, Clone, Copy)]
pub struct Sandboxed {
    /// How files were closed.
    pub files: Files,
    /// The user it runs as.
    pub uid: u32,
    /// How long it took.
    pub took: std::time::Duration,
}

impl fmt::Display for Sandboxed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let files = match self.files {
            Files::Landlock => "files closed by Landlock",
            Files::EmptyRoot => "files closed by an empty root (no Landlock)",
        };
        write!(
            f,
            "sandboxed: uid {}, no capabilities, own user, network, IPC and UTS namespaces, \
             {files}, seccomp allow-list ({:.2} ms)",
            self.uid,
            self.took.as_secs_f64() * 1e3
        )
    }
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
