//! Worker processes: spawning one per queue pair (fork+exec of our own
//! executable with its control socket at fd 3), and talking to it.
//!
//! A worker is started with `PR_SET_PDEATHSIG = SIGKILL`, so it dies with
//! the primary, and with a clean signal mask. Its death is seen through a
//! pidfd (readable when the process exits) or through its control socket
//! closing; either way the primary reaps it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use qpnet_ipc::{Channel, IpcError, Reply, Request, PROTOCOL_VERSION, WORKER_CONTROL_FD};

/// How long a worker may take to answer one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// One running worker process.
pub struct Worker {
    serial: u64,
    queue_pair: u16,
    channel: Channel,
    child: Child,
    pidfd: OwnedFd,
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn set_cloexec(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: F_SETFD on an fd we borrow; no memory is involved.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Mark an fd received from the VMM close-on-exec, so it never leaks into a
/// worker except through an explicit SCM_RIGHTS hand-over.
pub fn make_cloexec(fd: BorrowedFd<'_>) {
    if let Err(e) = set_cloexec(fd) {
        log::warn!("cannot set FD_CLOEXEC on fd {}: {e}", fd.as_raw_fd());
    }
}

impl Worker {
    /// Start the worker of `queue_pair` and complete the hello exchange.
    pub fn spawn(queue_pair: u16) -> Result<Worker> {
        let (ours, theirs) = Channel::pair().context("creating a worker control socket")?;
        let theirs_fd = OwnedFd::from(theirs);
        let child_fd = theirs_fd.as_raw_fd();
        let parent = std::process::id() as libc::pid_t;
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0("qpnet")
            .arg("worker")
            .arg("--queue-pair")
            .arg(queue_pair.to_string())
            .arg("--control-fd")
            .arg(WORKER_CONTROL_FD.to_string())
            .stdin(Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only async-signal-safe functions (dup2, fcntl, prctl,
        // sigprocmask, getppid); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if child_fd == WORKER_CONTROL_FD {
                    if libc::fcntl(child_fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(child_fd, WORKER_CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("primary exited during spawn"));
                }
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the worker of queue pair {queue_pair}"))?;
        drop(theirs_fd);
        let pidfd = pidfd_open(child.id()).context("pidfd_open on a new worker")?;
        static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut worker = Worker {
            serial: NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            queue_pair,
            channel: ours,
            child,
            pidfd,
        };
        match worker.request(
            &Request::Hello {
                version: PROTOCOL_VERSION,
                queue_pair,
            },
            &[],
        )? {
            Reply::Hello { version, .. } if version == PROTOCOL_VERSION => Ok(worker),
            Reply::Hello { version, .. } => {
                bail!("worker speaks control protocol {version}, primary {PROTOCOL_VERSION}")
            }
            other => bail!("worker answered hello with {other:?}"),
        }
    }

    /// A number no other worker of this primary has (pids can be reused).
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A pidfd that becomes readable when the worker exits.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Send a request with fds and wait for its reply.
    pub fn request(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<Reply> {
        match self.channel.call::<_, Reply>(req, fds, REQUEST_TIMEOUT) {
            Ok(r) => Ok(r),
            Err(e @ (IpcError::Closed | IpcError::Timeout(_))) => Err(anyhow!(e).context(format!(
                "worker of queue pair {} (pid {}) did not answer {}",
                self.queue_pair,
                self.pid(),
                req.name()
            ))),
            Err(e) => Err(anyhow!(e)),
        }
    }

    /// Send a request that must be answered with `Reply::Ok`.
    pub fn request_ok(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<()> {
        match self.request(req, fds)? {
            Reply::Ok => Ok(()),
            Reply::Error { message } => Err(anyhow!(
                "worker of queue pair {} refused {}: {message}",
                self.queue_pair,
                req.name()
            )),
            other => Err(anyhow!(
                "worker of queue pair {} answered {} with {other:?}",
                self.queue_pair,
                req.name()
            )),
        }
    }

    /// Ask the worker to exit and reap it (killing it if it does not).
    pub fn shutdown(mut self) {
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

    /// Kill the worker with SIGKILL and reap it (no-op once reaped).
    pub fn kill(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Reap the worker if it has exited; returns how it ended.
    pub fn try_reap(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(describe_exit(status)),
            _ => None,
        }
    }
}

impl Drop for Worker {
    /// A worker handle never outlives its process: dropping it (on any
    /// error path too) kills and reaps the process, so no zombie or stray
    /// worker is left behind.
    fn drop(&mut self) {
        self.kill();
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = nix::sys::signal::Signal::try_from(sig)
            .map(|s| s.as_str())
            .unwrap_or("unknown signal");
        format!(
            "killed by {name}{}",
            if status.core_dumped() {
                " (core dumped)"
            } else {
                ""
            }
        )
    } else {
        format!("exited with status {}", status.code().unwrap_or(-1))
    }
}
