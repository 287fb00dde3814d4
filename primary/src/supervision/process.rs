//! Worker processes: the real [`WorkerLink`]. A worker is started with
//! fork+exec of the primary's own binary, its control socket at fd 3.
//!
//! The binary is resolved once, when the primary starts (`/proc/self/exe`
//! read as a path), and exec'd by that path, so the kernel names the worker
//! after it: its comm is `qpnet` like the primary's, and `pgrep -x qpnet`
//! lists the primary and every worker. argv[0] is `qpnet`, so `ps` shows
//! `qpnet worker --queue-pair N`. Should the file at that path stop being
//! the binary the primary runs (replaced or deleted by an upgrade), workers
//! are exec'd through `/proc/self/exe` instead: a worker always runs the
//! primary's own code, whose control protocol it speaks.
//!
//! Between fork and exec nothing allocates: std's `Command` prepares the
//! program, arguments and environment in the parent, and after fork makes
//! only system calls (dup2 of stdio, `signal(SIGPIPE)`) before our
//! `pre_exec` closure, whose calls are all async-signal-safe system calls:
//! the control socket moved to fd 3 (dup2, or fcntl to clear its
//! close-on-exec), every fd above 3 made close-on-exec (close_range), so a
//! worker starts with fds 0-3 only, `PR_SET_PDEATHSIG = SIGKILL` so the worker dies with the
//! primary, a check that the primary did not die during the fork, and an
//! empty signal mask (std keeps the parent's, and the primary blocks the
//! signals its signalfd reads). Its errors are plain errno values; std
//! sends the errno to the parent and `_exit`s.
//!
//! The worker's death is seen through a pidfd (readable when the process
//! exits) or through its control socket closing; either way the primary
//! reaps it. Dropping a [`Process`] kills and reaps it, so no worker
//! outlives its handle.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::unistd::{dup2_raw, getppid, Pid};
use qpnet_ipc::{Channel, Reply, Request, WORKER_CONTROL_FD};
use qpnet_secondary::RunAs;

use super::link::{Launch, LaunchError, LinkError, WorkerLink};

/// How long a worker may take to answer one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// What always names the running binary, even once its file is gone.
const SELF_EXE: &str = "/proc/self/exe";

/// The primary's binary, resolved once at start.
pub struct WorkerBinary {
    path: PathBuf,
    /// (device, inode) of the running binary.
    id: (u64, u64),
    warned: AtomicBool,
}

impl WorkerBinary {
    /// Resolve `/proc/self/exe` to the path of the running binary.
    pub fn resolve() -> Result<WorkerBinary> {
        let path = std::fs::read_link(SELF_EXE).context("reading /proc/self/exe")?;
        let meta = std::fs::metadata(SELF_EXE).context("stat of /proc/self/exe")?;
        Ok(WorkerBinary {
            path,
            id: (meta.dev(), meta.ino()),
            warned: AtomicBool::new(false),
        })
    }

    /// The path to exec: the resolved one while it still is this binary.
    fn program(&self) -> &Path {
        let same = std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if same {
            return &self.path;
        }
        if !self.warned.swap(true, Ordering::Relaxed) {
            log::warn!(
                "{} is no longer the running binary: workers are started through {SELF_EXE}",
                self.path.display()
            );
        }
        Path::new(SELF_EXE)
    }
}

/// Starts worker processes.
pub struct ProcessLauncher {
    binary: WorkerBinary,
    run_as: Option<RunAs>,
}

impl ProcessLauncher {
    /// A launcher exec'ing `binary`, whose workers become `run_as` (when
    /// given) as they give up their privileges.
    pub fn new(binary: WorkerBinary, run_as: Option<RunAs>) -> ProcessLauncher {
        ProcessLauncher { binary, run_as }
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, touches no memory of ours,
    // and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Runs in the child between fork and exec: only async-signal-safe system
/// calls, no allocation (errors are errno values).
fn prepare_child(control: BorrowedFd<'_>, primary: Pid) -> std::io::Result<()> {
    if control.as_raw_fd() == WORKER_CONTROL_FD {
        fcntl(control, FcntlArg::F_SETFD(FdFlag::empty()))?;
    } else {
        // SAFETY: fd 3 in this child is ours to replace (anything there
        // was close-on-exec); it stays open, unowned, into the exec.
        let _ = unsafe { dup2_raw(control, WORKER_CONTROL_FD) }?.into_raw_fd();
    }
    // Everything above fd 3 is close-on-exec from here: fds the primary
    // itself inherited without CLOEXEC (from its parent's shell, say) never
    // reach a worker. Marked, not closed, so std's exec-error pipe (already
    // close-on-exec) still reports a failed exec.
    // SAFETY: close_range only changes fd flags in this (child) process; it
    // touches no memory and is async-signal-safe (a plain system call).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (WORKER_CONTROL_FD + 1) as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    if getppid() != primary {
        // The primary exited during the fork: the death signal would never come.
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
    Ok(())
}

impl Launch for ProcessLauncher {
    fn launch(&self, queue_pair: u16) -> Result<Box<dyn WorkerLink>, LaunchError> {
        let (ours, theirs) = Channel::pair().map_err(|e| LaunchError::Socket(queue_pair, e))?;
        let theirs = OwnedFd::from(theirs);
        let control = theirs.as_raw_fd();
        let primary = Pid::this();
        let mut cmd = Command::new(self.binary.program());
        cmd.arg0("qpnet")
            .arg("worker")
            .arg("--queue-pair")
            .arg(queue_pair.to_string())
            .arg("--control-fd")
            .arg(WORKER_CONTROL_FD.to_string())
            .stdin(Stdio::null());
        if let Some(r) = self.run_as {
            cmd.arg("--run-as").arg(r.to_string());
        }
        // SAFETY: the closure runs in the child between fork and exec, where
        // only async-signal-safe calls are allowed: prepare_child makes
        // system calls only and allocates nothing. `control` stays open in
        // the child until exec (it is `theirs`, dropped in the parent only
        // after spawn returns).
        unsafe {
            cmd.pre_exec(move || prepare_child(BorrowedFd::borrow_raw(control), primary));
        }
        let mut child = cmd.spawn().map_err(|e| LaunchError::Spawn(queue_pair, e))?;
        drop(theirs);
        let pidfd = match pidfd_open(child.id()) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LaunchError::Pidfd(queue_pair, e));
            }
        };
        Ok(Box::new(Process {
            queue_pair,
            channel: ours,
            child,
            pidfd,
        }))
    }
}

/// One running worker process.
pub struct Process {
    queue_pair: u16,
    channel: Channel,
    child: Child,
    pidfd: OwnedFd,
}

impl WorkerLink for Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    fn request(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<Reply, LinkError> {
        self.channel
            .call::<_, Reply>(req, fds, REQUEST_TIMEOUT)
            .map_err(|source| LinkError {
                queue_pair: self.queue_pair,
                pid: self.child.id(),
                request: req.name(),
                source,
            })
    }

    fn try_reap(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(describe_exit(status, self.child.id())),
            _ => None,
        }
    }

    fn kill(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn shutdown(&mut self) {
        let _ = self
            .channel
            .call::<_, Reply>(&Request::Shutdown, &[], Duration::from_millis(500));
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }
}

impl Drop for Process {
    /// A worker handle never outlives its process: dropping it (on any
    /// error path too) kills and reaps the process, so no zombie or stray
    /// worker is left behind.
    fn drop(&mut self) {
        self.kill();
    }
}

fn describe_exit(status: std::process::ExitStatus, pid: u32) -> String {
    use std::os::unix::process::ExitStatusExt;
    let Some(sig) = status.signal() else {
        return format!("exited with status {}", status.code().unwrap_or(-1));
    };
    let name = nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str())
        .unwrap_or("unknown signal");
    let core = if status.core_dumped() {
        " (core dumped)"
    } else {
        ""
    };
    if sig != libc::SIGSYS {
        return format!("killed by {name}{core}");
    }
    let call = match crate::kernel_log::forbidden_call(pid) {
        Some(nr) => format!(
            "system call {nr} ({})",
            qpnet_secondary::syscall_name(nr).unwrap_or("unknown")
        ),
        None => "a system call (no audit record of it in /dev/kmsg: see the audit log)".into(),
    };
    format!("killed by {name}{core}: its seccomp filter refused {call}")
}
