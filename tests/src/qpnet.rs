//! The qpnet binary under test: finding it, running it, watching it.
//!
//! [`Qpnet::start`] runs `qpnet run --socket S --tap T --queue-pairs N --name
//! UNIQUE` inside the test's namespace (`ip netns exec`, which execs qpnet in
//! place, so the child pid is qpnet's), waits (bounded) for its socket, and
//! keeps its stderr in a file so failures can quote it. On drop it stops the
//! primary (SIGTERM, then SIGKILL), reaps it, kills any worker left behind and
//! removes its runtime directory.
//!
//! Workers are the primary's children; [`Qpnet::worker_pids`] lists them from
//! /proc. [`cpu_time`] reads a process's CPU time (all its threads'
//! `schedstat` run time, nanosecond precision; falls back to `stat`
//! utime+stime).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use qpnet_shared::SharedRegion;

use crate::netns::NetNs;
use crate::wait::wait_for;

/// Where `qpnet run --name NAME` keeps its runtime files.
pub const RUN_DIR: &str = "/run/qpnet";

/// The qpnet binary: `$QPNET_BIN`, else the workspace's release build, else
/// its debug build.
pub fn qpnet_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("QPNET_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("QPNET_BIN={} is not a file", p.display());
        }
        return Ok(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("qpnet");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "qpnet binary not found under {}: run `cargo build --release -p qpnet-primary` \
         (or set QPNET_BIN)",
        target.display()
    )
}

/// Run `qpnet ARGS` to completion (not in a namespace) and capture output.
pub fn run_qpnet(args: &[&str]) -> Result<Output> {
    Command::new(qpnet_binary()?)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running qpnet")
}

/// A running qpnet primary.
#[derive(Debug)]
pub struct Qpnet {
    child: Child,
    name: String,
    socket: PathBuf,
    dir: PathBuf,
    stderr_path: PathBuf,
    queue_pairs: u16,
}

impl Qpnet {
    /// Start `qpnet run` in `ns` on TAP `tap` with `queue_pairs` queue pairs;
    /// returns once its vhost-user socket exists.
    pub fn start(ns: &NetNs, tap: &str, queue_pairs: u16) -> Result<Qpnet> {
        Qpnet::start_with(ns, tap, queue_pairs, &[])
    }

    /// [`Qpnet::start`] with extra arguments after the usual ones.
    pub fn start_with(ns: &NetNs, tap: &str, queue_pairs: u16, extra: &[&str]) -> Result<Qpnet> {
        let name = crate::unique_name();
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("vhost.sock");
        let stderr_path = dir.join("qpnet.stderr");
        let stderr = File::create(&stderr_path)?;
        let qp = queue_pairs.to_string();
        let child = ns
            .command(qpnet_binary()?)
            .arg("run")
            .arg("--socket")
            .arg(&socket)
            .args(["--tap", tap, "--queue-pairs", &qp, "--name", &name])
            .args(extra)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(stderr.try_clone()?)
            .stderr(stderr)
            .spawn()
            .context("spawning qpnet")?;
        let mut q = Qpnet {
            child,
            name,
            socket,
            dir,
            stderr_path,
            queue_pairs,
        };
        q.wait_socket(Duration::from_secs(10))?;
        Ok(q)
    }

    fn wait_socket(&mut self, timeout: Duration) -> Result<()> {
        let mut exited = None;
        let socket = self.socket.clone();
        let r = wait_for("the qpnet vhost-user socket", timeout, || {
            if let Ok(Some(st)) = self.child.try_wait() {
                exited = Some(st);
                return true;
            }
            socket.exists()
        });
        if let Some(st) = exited {
            bail!(
                "qpnet exited ({st}) before listening; stderr:\n{}",
                self.stderr()
            );
        }
        r.with_context(|| format!("qpnet stderr:\n{}", self.stderr()))
    }

    /// The vhost-user socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The instance name (`--name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queue pairs it was started with.
    pub fn queue_pairs(&self) -> u16 {
        self.queue_pairs
    }

    /// The primary's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the primary has not exited.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Fail (quoting stderr) unless the primary is still running.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(st) => bail!("qpnet exited ({st}); stderr:\n{}", self.stderr()),
        }
    }

    /// Everything qpnet wrote to stderr (and stdout) so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The primary's live child processes (its workers).
    pub fn worker_pids(&self) -> Vec<u32> {
        children_of(self.pid())
    }

    /// Wait until exactly `n` workers run; return their pids.
    pub fn wait_workers(&mut self, n: usize, timeout: Duration) -> Result<Vec<u32>> {
        let pid = self.pid();
        wait_for(&format!("{n} qpnet workers"), timeout, || {
            children_of(pid).len() == n
        })
        .with_context(|| {
            format!(
                "workers now: {:?}; qpnet stderr:\n{}",
                children_of(pid),
                self.stderr()
            )
        })?;
        Ok(children_of(pid))
    }

    /// The instance's shared stats region (read-only).
    pub fn stats(&self) -> Result<SharedRegion> {
        let path = Path::new(RUN_DIR).join(&self.name).join("stats.shm");
        SharedRegion::open_read_only(&path).with_context(|| format!("opening {}", path.display()))
    }

    /// Run `qpnet stats --name NAME ARGS` and capture its output.
    pub fn stats_command(&self, args: &[&str]) -> Result<Output> {
        let mut all = vec!["stats", "--name", &self.name];
        all.extend_from_slice(args);
        run_qpnet(&all)
    }
}

impl Drop for Qpnet {
    fn drop(&mut self) {
        let workers = self.worker_pids();
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let stopped = wait_for("qpnet to exit", Duration::from_secs(3), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if stopped.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for w in workers {
            if process_name(w).as_deref() == Some("qpnet") {
                let _ = kill(Pid::from_raw(w as i32), Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(Path::new(RUN_DIR).join(&self.name));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Live children of `pid`, from /proc/PID/task/*/children, falling back to
/// a scan of /proc for processes whose parent is `pid`.
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
        kids = scan_for_parent(pid);
    }
    kids.retain(|&k| !is_zombie(k));
    kids.sort_unstable();
    kids.dedup();
    kids
}

fn scan_for_parent(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat_fields(p).and_then(|f| f.get(1).cloned()) == Some(pid.to_string()))
        .collect()
}

/// The fields of /proc/PID/stat after the command name: state, ppid, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn is_zombie(pid: u32) -> bool {
    stat_fields(pid).is_none_or(|f| f.first().map(String::as_str) == Some("Z"))
}

/// The parent pid of `pid`.
pub fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// /proc/PID/comm.
pub fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The command line of `pid`, arguments joined by spaces.
pub fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// CPU time `pid` has used so far (all live threads, user + system).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let mut total_ns: u64 = 0;
    let mut any = false;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
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
    if any {
        return Ok(Duration::from_nanos(total_ns));
    }
    let f = stat_fields(pid).with_context(|| format!("process {pid} is gone"))?;
    // utime and stime are fields 14 and 15 of stat; index 11 and 12 here.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_helpers_see_our_own_children() {
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let me = std::process::id();
        assert!(children_of(me).contains(&child.id()));
        assert_eq!(parent_of(child.id()), Some(me));
        // Right after spawn the new image may not be in place yet.
        wait_for("the child to exec sleep", Duration::from_secs(5), || {
            command_line(child.id()).as_deref() == Some("sleep 5")
        })
        .unwrap();
        assert_eq!(process_name(child.id()).as_deref(), Some("sleep"));
        // A busy process accumulates CPU time.
        let mut busy = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let t0 = cpu_time(busy.id()).unwrap();
        wait_for("CPU time to grow", Duration::from_secs(5), || {
            cpu_time(busy.id()).is_ok_and(|t| t >= t0 + Duration::from_millis(20))
        })
        .unwrap();
        busy.kill().unwrap();
        busy.wait().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!children_of(me).contains(&child.id()));
    }
}
