//! A running `qpnet run` under test: starting it, watching it, and stopping
//! it the way the README says it stops.
//!
//! [`Qpnet::start`] runs `qpnet run --socket S --tap T --queue-pairs N
//! --name UNIQUE` inside the test's namespace (`ip netns exec`, which execs
//! qpnet in place, so the child pid is qpnet's) with a clean descriptor
//! table (0, 1 and 2 only, as a service manager starts a daemon), waits
//! (bounded) until it is up, and keeps its stderr in a file so failures can
//! quote it. [`Options`] adds arguments, environment variables, `--connect`
//! to a socket the test listens on, or a deliberately inherited fd.
//!
//! Stopping is a check, not a clean-up: [`Qpnet::stop`] (SIGTERM) and
//! [`Qpnet::stop_with`] send the signal and then require what the README
//! promises: exit status 0 within [`STOP_LIMIT`], every worker seen during
//! the run gone (reaped by the primary), and the socket (when qpnet listened
//! on it) and the runtime directory `/run/qpnet/NAME/` removed by qpnet
//! itself. Only after checking does the harness remove what was left, and
//! whatever it had to remove is reported as a failure. Dropping a `Qpnet`
//! that was not stopped runs the same check; a failure then panics (unless
//! the thread is already panicking), so no test can end with an unclean
//! shutdown unnoticed.

use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::sync::atomic::AtomicU64;

use qpnet_shared::{QueueStats, SharedRegion};

use crate::binary::{qpnet_binary, run_qpnet};
use crate::netns::NetNs;
use crate::proc::{children_of, ProcHandle};
use crate::stats_json::StatsDoc;
use crate::testbed::tail;
use crate::wait::wait_for;

/// Where `qpnet run --name NAME` keeps its runtime files (as root).
pub const RUN_DIR: &str = "/run/qpnet";

/// How long qpnet may take from SIGTERM/SIGINT to its exit.
pub const STOP_LIMIT: Duration = Duration::from_secs(5);

/// How long qpnet may take to come up.
const START_LIMIT: Duration = Duration::from_secs(10);

/// How to start `qpnet run`, beyond the usual arguments.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// More `qpnet run` arguments, after the usual ones.
    pub extra: Vec<String>,
    /// Environment variables for qpnet (and so its workers).
    pub env: Vec<(String, String)>,
    /// `--connect`: qpnet connects to a VMM listening on this path (the
    /// test's, so qpnet must leave it in place) instead of listening.
    pub connect_to: Option<PathBuf>,
    /// An fd of this process that qpnet inherits at the same number.
    pub inherit_fd: Option<RawFd>,
    /// The host side instead of `--tap TAP` (e.g. `["--udp", "A,B"]`).
    pub host: Option<Vec<String>>,
    /// Run qpnet as this user (through `setpriv`, with no capability), with
    /// its socket and `--runtime-dir` in a directory that user owns.
    pub user: Option<String>,
}

impl Options {
    /// Options with these extra `qpnet run` arguments.
    pub fn args(extra: &[&str]) -> Options {
        Options {
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ..Options::default()
        }
    }

    /// Options with this host side instead of `--tap TAP`.
    pub fn host(args: &[&str]) -> Options {
        Options {
            host: Some(args.iter().map(|s| s.to_string()).collect()),
            ..Options::default()
        }
    }

    /// And run as `user` (unprivileged).
    pub fn as_user(mut self, user: &str) -> Options {
        self.user = Some(user.into());
        self
    }

    /// And this environment variable.
    pub fn with_env(mut self, key: &str, value: &str) -> Options {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// What a checked stop saw.
#[derive(Debug)]
pub struct StopReport {
    /// qpnet's exit status.
    pub status: ExitStatus,
    /// From the signal to the exit.
    pub took: Duration,
    /// Every worker pid seen from the start of the stop.
    pub workers: Vec<u32>,
}

/// A running qpnet primary.
#[derive(Debug)]
pub struct Qpnet {
    child: Child,
    primary: ProcHandle,
    name: String,
    socket: PathBuf,
    owns_socket: bool,
    dir: PathBuf,
    stderr_path: PathBuf,
    queue_pairs: u16,
    /// `--runtime-dir` when not the default.
    run_base: Option<PathBuf>,
    stopped: bool,
}

impl Qpnet {
    /// Start `qpnet run` in `ns` on TAP `tap` with `queue_pairs` queue pairs;
    /// returns once its vhost-user socket exists.
    pub fn start(ns: &NetNs, tap: &str, queue_pairs: u16) -> Result<Qpnet> {
        Qpnet::start_opts(ns, tap, queue_pairs, &Options::default())
    }

    /// [`Qpnet::start`] with extra arguments after the usual ones.
    pub fn start_with(ns: &NetNs, tap: &str, queue_pairs: u16, extra: &[&str]) -> Result<Qpnet> {
        Qpnet::start_opts(ns, tap, queue_pairs, &Options::args(extra))
    }

    /// [`Qpnet::start`] with [`Options`]. With `connect_to` it returns once
    /// qpnet has created its runtime files (it connects later, retrying).
    pub fn start_opts(ns: &NetNs, tap: &str, queue_pairs: u16, opts: &Options) -> Result<Qpnet> {
        let name = crate::unique_name();
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir)?;
        let socket = opts
            .connect_to
            .clone()
            .unwrap_or_else(|| dir.join("vhost.sock"));
        let stderr_path = dir.join("qpnet.stderr");
        let stderr = File::create(&stderr_path)?;
        let qp = queue_pairs.to_string();
        let host = opts
            .host
            .clone()
            .unwrap_or_else(|| vec!["--tap".into(), tap.into()]);
        let run_base = match &opts.user {
            Some(user) => Some(user_owned_dirs(&dir, user)?),
            None => None,
        };
        let mut cmd = match &opts.user {
            Some(user) => {
                let mut c = ns.command("setpriv");
                c.args(["--reuid", user, "--regid", &group_of(user)?])
                    .args(["--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
                    .arg(qpnet_binary()?);
                c
            }
            None => ns.command(qpnet_binary()?),
        };
        cmd.arg("run")
            .arg("--socket")
            .arg(&socket)
            .args(&host)
            .args(["--queue-pairs", &qp, "--name", &name])
            .args(&opts.extra)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(stderr.try_clone()?)
            .stderr(stderr);
        if opts.connect_to.is_some() {
            cmd.arg("--connect");
        }
        if let Some(base) = &run_base {
            cmd.arg("--runtime-dir").arg(base);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let inherit = opts.inherit_fd.unwrap_or(-1);
        // SAFETY: the closure runs between fork and exec and makes only
        // async-signal-safe system calls; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // Every fd this process holds beyond 0-2 (ours are all
                // close-on-exec already; ones the test process inherited
                // from its own parent may not be) closes at exec.
                const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
                if libc::syscall(
                    libc::SYS_close_range,
                    3 as libc::c_uint,
                    libc::c_uint::MAX,
                    CLOSE_RANGE_CLOEXEC,
                ) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if inherit >= 0 && libc::fcntl(inherit, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawning qpnet")?;
        let primary = ProcHandle::of(child.id())?;
        let mut q = Qpnet {
            child,
            primary,
            name,
            socket,
            owns_socket: opts.connect_to.is_none(),
            dir,
            stderr_path,
            queue_pairs,
            run_base,
            stopped: false,
        };
        let up = if q.owns_socket {
            let s = q.socket.clone();
            q.wait_up("its vhost-user socket", move || s.exists())
        } else {
            let shm = q.runtime_dir().join("stats.shm");
            q.wait_up("its shared region", move || shm.exists())
        };
        if let Err(e) = up {
            q.abandon();
            return Err(e);
        }
        Ok(q)
    }

    fn wait_up(&mut self, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
        let mut exited = None;
        let r = wait_for(&format!("qpnet to create {what}"), START_LIMIT, || {
            if let Ok(Some(st)) = self.child.try_wait() {
                exited = Some(st);
                return true;
            }
            ready()
        });
        if let Some(st) = exited {
            bail!(
                "qpnet exited ({st}) before it was up; stderr:\n{}",
                self.stderr()
            );
        }
        r.with_context(|| format!("qpnet stderr:\n{}", self.stderr()))
    }

    /// Stop without checking anything (a start that failed).
    fn abandon(&mut self) {
        self.stopped = true;
        let workers = self.primary.children();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for w in workers {
            let _ = w.signal(Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(self.runtime_dir());
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The vhost-user socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The instance name (`--name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The instance's runtime directory (`/run/qpnet/NAME`, or under the
    /// `--runtime-dir` of an unprivileged run).
    pub fn runtime_dir(&self) -> PathBuf {
        self.run_base
            .as_deref()
            .unwrap_or(Path::new(RUN_DIR))
            .join(&self.name)
    }

    /// Queue pairs it was started with.
    pub fn queue_pairs(&self) -> u16 {
        self.queue_pairs
    }

    /// The primary's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The primary, pinned.
    pub fn primary(&self) -> &ProcHandle {
        &self.primary
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

    /// The primary's live child processes (its workers), by pid.
    pub fn worker_pids(&self) -> Vec<u32> {
        children_of(self.pid())
    }

    /// The primary's live workers, pinned.
    pub fn workers(&self) -> Vec<ProcHandle> {
        self.primary.children()
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
        let path = self.runtime_dir().join("stats.shm");
        SharedRegion::open_read_only(&path).with_context(|| format!("opening {}", path.display()))
    }

    /// Counter `f` of queue pair `qp`, from the shared region.
    pub fn counter(&self, qp: usize, f: impl Fn(&QueueStats) -> &AtomicU64) -> Result<u64> {
        let s = self.stats()?;
        let q = s
            .queue(qp)
            .with_context(|| format!("no stats for queue pair {qp}"))?;
        Ok(QueueStats::get(f(q)))
    }

    /// Wait up to `timeout` until counter `f` (named `what`) of queue pair
    /// `qp` reaches `at_least`.
    pub fn wait_counter(
        &self,
        what: &str,
        qp: usize,
        at_least: u64,
        timeout: Duration,
        f: impl Fn(&QueueStats) -> &AtomicU64,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.counter(qp, &f)?;
            if v >= at_least {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "qp{qp}: {what} is {v}, not >= {at_least}; qpnet stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Run `qpnet stats --name NAME ARGS` and capture its output.
    pub fn stats_command(&self, args: &[&str]) -> Result<Output> {
        let base = self.run_base.as_ref().map(|b| b.display().to_string());
        let mut all = vec!["stats", "--name", &self.name];
        if let Some(base) = &base {
            all.extend_from_slice(&["--runtime-dir", base]);
        }
        all.extend_from_slice(args);
        run_qpnet(&all)
    }

    /// `qpnet stats --name NAME ARGS`, which must exit 0; its stdout.
    pub fn stats_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.stats_command(args)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "qpnet stats {args:?} exited with {}; stderr: {}; stdout: {stdout}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// `qpnet stats --name NAME --json ARGS`, read.
    pub fn stats_json(&self, extra: &[&str]) -> Result<StatsDoc> {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        let text = self.stats_ok(&args)?;
        StatsDoc::parse(&text).with_context(|| format!("qpnet stats --json printed:\n{text}"))
    }

    /// Stop with SIGTERM and check the shutdown (see the module
    /// documentation).
    pub fn stop(self) -> Result<StopReport> {
        self.stop_with(Signal::SIGTERM)
    }

    /// Stop with `sig` and check the shutdown.
    pub fn stop_with(mut self, sig: Signal) -> Result<StopReport> {
        self.stopped = true;
        self.checked_stop(sig)
    }

    fn checked_stop(&mut self, sig: Signal) -> Result<StopReport> {
        let pid = self.pid();
        let mut problems = Vec::new();
        let mut workers = self.primary.children();
        let started = Instant::now();
        let mut status = self.child.try_wait()?;
        if let Some(st) = status {
            problems.push(format!("it had already exited ({st}) before the {sig}"));
        } else {
            kill(Pid::from_raw(pid as i32), sig).with_context(|| format!("{sig} to qpnet"))?;
        }
        while status.is_none() {
            for w in self.primary.children() {
                if !workers
                    .iter()
                    .any(|o| o.pid() == w.pid() && o.start_ticks() == w.start_ticks())
                {
                    workers.push(w);
                }
            }
            status = self.child.try_wait()?;
            if status.is_none() && started.elapsed() > STOP_LIMIT {
                problems.push(format!(
                    "it was still running {STOP_LIMIT:?} after the {sig}"
                ));
                let _ = self.child.kill();
                status = Some(self.child.wait()?);
            }
            if status.is_none() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let status = status.expect("the loop ends with a status");
        let took = started.elapsed();
        if !status.success() && problems.is_empty() {
            problems.push(format!("it exited with {status} after the {sig}, not 0"));
        }
        for w in &workers {
            if !w.is_reaped() {
                problems.push(format!(
                    "worker {} ({}) outlived the primary (state {:?})",
                    w.pid(),
                    w.cmdline().unwrap_or_default(),
                    w.state()
                ));
                let _ = w.signal(Signal::SIGKILL);
            }
        }
        if self.owns_socket && self.socket.exists() {
            problems.push(format!("it left its socket {}", self.socket.display()));
            let _ = std::fs::remove_file(&self.socket);
        }
        if !self.owns_socket && !self.socket.exists() {
            problems.push(format!(
                "it removed {}, the socket of the VMM it connected to",
                self.socket.display()
            ));
        }
        let run = self.runtime_dir();
        if run.exists() {
            let left: Vec<String> = std::fs::read_dir(&run)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            problems.push(format!(
                "it left its runtime directory {} holding {left:?}",
                run.display()
            ));
            let _ = std::fs::remove_dir_all(&run);
        }
        let report = StopReport {
            status,
            took,
            workers: workers.iter().map(ProcHandle::pid).collect(),
        };
        if problems.is_empty() {
            return Ok(report);
        }
        Err(anyhow!(
            "qpnet (pid {pid}) did not stop cleanly on {sig}: {}; its stderr:\n{}",
            problems.join("; "),
            tail(&self.stderr(), 40)
        ))
    }
}

impl Drop for Qpnet {
    fn drop(&mut self) {
        if !std::mem::replace(&mut self.stopped, true) {
            if let Err(e) = self.checked_stop(Signal::SIGTERM) {
                eprintln!("{e:#}");
                if !std::thread::panicking() {
                    let _ = std::fs::remove_dir_all(&self.dir);
                    panic!("{e:#}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Give `dir` (the instance's temp directory, where its socket goes) to
/// `user` and make a runtime base there that `user` owns; returns the base.
fn user_owned_dirs(dir: &Path, user: &str) -> Result<PathBuf> {
    let u = nix::unistd::User::from_name(user)?.with_context(|| format!("no user {user}"))?;
    let base = dir.join("run");
    std::fs::create_dir_all(&base)?;
    for d in [dir, base.as_path()] {
        nix::unistd::chown(d, Some(u.uid), Some(u.gid))
            .with_context(|| format!("chown {} to {user}", d.display()))?;
    }
    Ok(base)
}

/// The numeric primary group of `user`.
fn group_of(user: &str) -> Result<String> {
    let u = nix::unistd::User::from_name(user)?.with_context(|| format!("no user {user}"))?;
    Ok(u.gid.as_raw().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_collect_arguments_and_environment() {
        let o = Options::args(&["--crash-limit", "0"]).with_env("A", "1");
        assert_eq!(o.extra, vec!["--crash-limit", "0"]);
        assert_eq!(o.env, vec![("A".to_string(), "1".to_string())]);
        assert!(o.connect_to.is_none() && o.inherit_fd.is_none());
    }
}
