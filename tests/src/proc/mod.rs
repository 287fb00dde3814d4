//! Reading processes from `/proc`, safely against pid reuse.
//!
//! A pid names a process only while that process exists: once it is reaped,
//! the kernel may give the number to a new process, and a test that reads
//! `/proc/PID/...` or sends a signal to PID later may be talking to a
//! stranger. [`ProcHandle`] pins one process: it remembers the process's
//! start time and holds its `/proc/PID` directory open. Every read goes
//! through that open directory (as `/proc/self/fd/N/...`), and procfs
//! answers lookups under a directory whose process is gone with an error,
//! even if the pid has been reused since; a handle whose recorded start time
//! does not match the process it opened refuses to be made. Signals go
//! through a pidfd opened while the process was still known to be the same
//! one ([`ProcHandle::signal`]), so they cannot reach another process either.
//!
//! Plain scans of all processes (children of a pid, members of a process
//! group) read [`stat`] by pid; callers that keep what they found turn it
//! into handles ([`ProcHandle::children`]).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The fields of `/proc/PID/stat` the tests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// State letter: R, S, D, T, t, Z, X, ...
    pub state: char,
    /// Parent pid.
    pub ppid: u32,
    /// Process group.
    pub pgrp: u32,
    /// User CPU time, in clock ticks.
    pub utime_ticks: u64,
    /// System CPU time, in clock ticks.
    pub stime_ticks: u64,
    /// Start time after boot, in clock ticks: with the pid, the process's
    /// identity.
    pub start_ticks: u64,
}

impl Stat {
    /// Parse the text of a `stat` file. The command name (in parentheses)
    /// may hold spaces and parentheses itself: the fields start after the
    /// last ')'.
    pub fn parse(text: &str) -> Option<Stat> {
        let rest = text.get(text.rfind(')')? + 2..)?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(Stat {
            state: f.first()?.chars().next()?,
            ppid: f.get(1)?.parse().ok()?,
            pgrp: f.get(2)?.parse().ok()?,
            utime_ticks: f.get(11)?.parse().ok()?,
            stime_ticks: f.get(12)?.parse().ok()?,
            start_ticks: f.get(19)?.parse().ok()?,
        })
    }

    /// A zombie (exited, not reaped) or dead process.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// `/proc/PID/stat` of whatever process has `pid` now (no reuse protection:
/// for scans; keep a [`ProcHandle`] for anything found).
pub fn stat(pid: u32) -> Option<Stat> {
    Stat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every pid in `/proc`.
pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// Live (not zombie) children of `pid`: `/proc/PID/task/*/children`, or a
/// scan of every process's parent where those files do not exist. Sorted.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    let mut have_children_files = false;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                have_children_files = true;
                kids.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    if !have_children_files {
        kids = all_pids()
            .into_iter()
            .filter(|&p| stat(p).is_some_and(|s| s.ppid == pid))
            .collect();
    }
    kids.retain(|&k| stat(k).is_some_and(|s| !s.is_dead()));
    kids.sort_unstable();
    kids.dedup();
    kids
}

/// Live (not zombie) processes whose parent is `pid`, by a scan of every
/// process (also finds children a dead parent no longer lists).
pub fn live_children_by_scan(pid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&p| stat(p).is_some_and(|s| s.ppid == pid && !s.is_dead()))
        .collect()
}

/// Live (not zombie) members of process group `pgrp`.
pub fn process_group_members(pgrp: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&p| stat(p).is_some_and(|s| s.pgrp == pgrp && !s.is_dead()))
        .collect()
}

/// The parent pid of whatever process has `pid` now.
pub fn parent_of(pid: u32) -> Option<u32> {
    Some(stat(pid)?.ppid)
}

/// One open file descriptor of a process.
#[derive(Debug, Clone)]
pub struct FdEntry {
    /// The descriptor number.
    pub fd: i32,
    /// What `/proc/PID/fd/N` links to: a path, `socket:[INODE]`,
    /// `anon_inode:[eventfd]`, `/memfd:NAME (deleted)`, ...
    pub target: String,
    /// `/proc/PID/fdinfo/N` (flags, and per kind: `iff:` of a TAP queue,
    /// `eventfd-id:` of an eventfd, ...).
    pub info: String,
    /// Device and inode of the open file (what `stat` through the link
    /// says), to tell two files with the same name apart.
    pub dev_ino: Option<(u64, u64)>,
}

impl FdEntry {
    /// The value of `key:` in the fdinfo, trimmed.
    pub fn info_field(&self, key: &str) -> Option<&str> {
        self.info.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim())
        })
    }
}

/// The `eventfd-id` of one of this process's own eventfds (kernel 6.0+
/// prints it in fdinfo): to recognise the same eventfd in another process.
pub fn own_eventfd_id(fd: &impl AsRawFd) -> Result<u64> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let info = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("eventfd-id:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("{path} has no eventfd-id (kernel older than 6.0?): {info}"))
}

/// Device and inode of one of this process's own open files.
pub fn own_dev_ino(file: &File) -> Result<(u64, u64)> {
    let m = file.metadata().context("fstat")?;
    Ok((m.dev(), m.ino()))
}

/// One process, pinned: see the module documentation.
#[derive(Debug)]
pub struct ProcHandle {
    pid: u32,
    start_ticks: u64,
    dir: File,
}

impl ProcHandle {
    /// The process that has `pid` now (it may be a zombie).
    pub fn of(pid: u32) -> Result<ProcHandle> {
        let dir =
            File::open(format!("/proc/{pid}")).with_context(|| format!("no process {pid}"))?;
        let mut h = ProcHandle {
            pid,
            start_ticks: 0,
            dir,
        };
        h.start_ticks = h
            .stat()
            .with_context(|| format!("process {pid} is gone"))?
            .start_ticks;
        Ok(h)
    }

    /// The process with `pid` that started at `start_ticks`; fails if the
    /// pid now belongs to another process (or to none).
    pub fn with_start(pid: u32, start_ticks: u64) -> Result<ProcHandle> {
        let h = ProcHandle::of(pid)?;
        if h.start_ticks != start_ticks {
            bail!(
                "pid {pid} now names another process (started at tick {}, not {start_ticks})",
                h.start_ticks
            );
        }
        Ok(h)
    }

    /// This process itself.
    pub fn me() -> Result<ProcHandle> {
        ProcHandle::of(std::process::id())
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When it started (clock ticks after boot).
    pub fn start_ticks(&self) -> u64 {
        self.start_ticks
    }

    /// A path inside this process's `/proc` directory, through the open
    /// directory (so it never resolves to another process).
    fn path(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{rel}", self.dir.as_raw_fd()))
    }

    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.path(rel)).ok()
    }

    /// Its stat; `None` once it is gone (reaped).
    pub fn stat(&self) -> Option<Stat> {
        let s = Stat::parse(&self.read("stat")?)?;
        // The open directory already pins the process; the start time is
        // checked too, so a handle can never read another process.
        (self.start_ticks == 0 || s.start_ticks == self.start_ticks).then_some(s)
    }

    /// Its state letter; `None` once it is gone.
    pub fn state(&self) -> Option<char> {
        self.stat().map(|s| s.state)
    }

    /// Running (or sleeping, stopped...): not a zombie and not gone.
    pub fn is_alive(&self) -> bool {
        self.stat().is_some_and(|s| !s.is_dead())
    }

    /// Exited: a zombie, or gone altogether.
    pub fn has_exited(&self) -> bool {
        !self.is_alive()
    }

    /// Gone altogether: exited and reaped by its parent.
    pub fn is_reaped(&self) -> bool {
        self.stat().is_none()
    }

    /// Its parent's pid.
    pub fn ppid(&self) -> Option<u32> {
        self.stat().map(|s| s.ppid)
    }

    /// Its command name (`comm`).
    pub fn comm(&self) -> Option<String> {
        self.read("comm").map(|s| s.trim().to_owned())
    }

    /// Its command line, arguments joined by spaces.
    pub fn cmdline(&self) -> Option<String> {
        let raw = std::fs::read(self.path("cmdline")).ok()?;
        Some(
            raw.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" "),
        )
    }

    /// The value of `key:` in `/proc/PID/status`, trimmed.
    pub fn status_field(&self, key: &str) -> Option<String> {
        self.read("status")?.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k == key).then(|| v.trim().to_owned())
        })
    }

    /// Resident set size in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> Result<u64> {
        self.status_field("VmRSS")
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no VmRSS for process {}", self.pid))
    }

    /// Its open file descriptors, in fd order.
    pub fn fds(&self) -> Result<Vec<FdEntry>> {
        let dir = self.path("fd");
        let entries = std::fs::read_dir(&dir)
            .with_context(|| format!("listing the fds of process {} (gone?)", self.pid))?;
        let mut fds = Vec::new();
        for e in entries.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            // An fd closed between the listing and the reads is skipped.
            let Ok(target) = std::fs::read_link(e.path()) else {
                continue;
            };
            let info = self.read(&format!("fdinfo/{fd}")).unwrap_or_default();
            let dev_ino = std::fs::metadata(e.path()).ok().map(|m| (m.dev(), m.ino()));
            fds.push(FdEntry {
                fd,
                target: target.to_string_lossy().into_owned(),
                info,
                dev_ino,
            });
        }
        fds.sort_by_key(|f| f.fd);
        if self.is_reaped() {
            bail!("process {} ended while its fds were read", self.pid);
        }
        Ok(fds)
    }

    /// How many fds it has open.
    pub fn fd_count(&self) -> Result<usize> {
        Ok(self.fds()?.len())
    }

    /// CPU time used so far by all its live threads (user + system), from
    /// their `schedstat` run time (nanoseconds), else from `stat`.
    pub fn cpu_time(&self) -> Result<Duration> {
        let mut total_ns: u64 = 0;
        let mut any = false;
        if let Ok(tasks) = std::fs::read_dir(self.path("task")) {
            for t in tasks.flatten() {
                if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                    if let Some(ns) = s
                        .split_whitespace()
                        .next()
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        total_ns += ns;
                        any = true;
                    }
                }
            }
        }
        if any && !self.is_reaped() {
            return Ok(Duration::from_nanos(total_ns));
        }
        let s = self
            .stat()
            .with_context(|| format!("process {} is gone", self.pid))?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100)
            .max(1) as u64;
        Ok(Duration::from_nanos(
            (s.utime_ticks + s.stime_ticks) * 1_000_000_000 / hz,
        ))
    }

    /// Nanoseconds its main thread has spent runnable but waiting for a
    /// CPU (`schedstat`, second field).
    pub fn runq_wait_ns(&self) -> Option<u64> {
        self.read("schedstat")?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Its live children, each pinned and checked to still have this
    /// process as its parent.
    pub fn children(&self) -> Vec<ProcHandle> {
        children_of(self.pid)
            .into_iter()
            .filter_map(|c| ProcHandle::of(c).ok())
            .filter(|c| c.ppid() == Some(self.pid) && !self.is_reaped())
            .collect()
    }

    /// Whether it holds a listening unix socket bound to `path`: a line of
    /// its network namespace's `/proc/net/unix` with that path and
    /// `__SO_ACCEPTCON`, whose inode is one of its fds.
    pub fn listens_on(&self, path: &Path) -> bool {
        let Some(table) = self.read("net/unix") else {
            return false;
        };
        let inodes = listening_inodes(&table, &path.to_string_lossy());
        if inodes.is_empty() {
            return false;
        }
        self.fds().is_ok_and(|fds| {
            fds.iter()
                .any(|f| inodes.iter().any(|i| f.target == format!("socket:[{i}]")))
        })
    }

    /// Send `sig`, through a pidfd opened while the process was verified to
    /// be this one: it can never reach a process that reused the pid.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let pidfd = self.pidfd()?;
        // SAFETY: pidfd_send_signal takes an fd we own, a signal number, a
        // null siginfo (meaning: as kill(2) would) and flags 0.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                sig as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("{sig} to process {}", self.pid));
        }
        Ok(())
    }

    /// A pidfd of this very process.
    fn pidfd(&self) -> Result<OwnedFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pidfd_open({}): the process is gone", self.pid));
        }
        // SAFETY: the kernel returned a new fd that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // The pidfd names whatever process had the pid when it was opened.
        // This process still exists now (a zombie included), and a pid is
        // not reused while its process exists: so it named this one.
        if self.stat().is_none() {
            bail!("process {} is gone", self.pid);
        }
        Ok(pidfd)
    }

    /// How it ended, once it has: reaped now by us (we are its parent or
    /// subreaper), a zombie of someone else, or gone. `None` while it lives.
    pub fn fate(&self) -> Option<String> {
        let me = std::process::id();
        match self.stat() {
            Some(s) if !s.is_dead() => None,
            Some(s) if s.ppid == me => {
                match waitpid(Pid::from_raw(self.pid as i32), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Signaled(_, sig, _)) => Some(format!("killed by {sig}")),
                    Ok(WaitStatus::Exited(_, code)) => Some(format!("exited {code}")),
                    Ok(_) => None,
                    Err(e) => Some(format!("zombie (waitpid: {e})")),
                }
            }
            Some(s) => Some(format!("zombie of {}", s.ppid)),
            None => Some("gone".into()),
        }
    }
}

/// Inodes of the listening sockets bound to `path` in a `/proc/net/unix`
/// table (`Num RefCount Protocol Flags Type St Inode Path`).
pub fn listening_inodes(table: &str, path: &str) -> Vec<u64> {
    const SO_ACCEPTCON: u32 = 0x1_0000;
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            (f.get(7) == Some(&path) && flags & SO_ACCEPTCON != 0).then(|| f[6].parse().ok())?
        })
        .collect()
}

/// This process as a child subreaper while the guard lives: processes
/// orphaned by the death of one of our descendants (a killed primary's
/// workers) become our children, so a test sees how they ended and reaps
/// them (this machine's init does not reap). On drop, adopted zombies are
/// reaped and the setting is cleared.
pub struct Subreaper;

impl Subreaper {
    /// Become a child subreaper.
    pub fn enable() -> Result<Subreaper> {
        nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
        Ok(Subreaper)
    }
}

impl Drop for Subreaper {
    fn drop(&mut self) {
        let me = std::process::id();
        for p in all_pids() {
            if stat(p).is_some_and(|s| s.ppid == me && s.state == 'Z') {
                let _ = waitpid(Pid::from_raw(p as i32), Some(WaitPidFlag::WNOHANG));
            }
        }
        let _ = nix::sys::prctl::set_child_subreaper(false);
    }
}

#[cfg(test)]
mod tests;
