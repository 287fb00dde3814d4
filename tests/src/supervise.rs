//! qpnet under its supervisor, `scripts/qpnet-supervise`, as a test runs it.
//!
//! [`Supervisor::start`] runs the script in the test's namespace (it leads
//! its own process group) with `--qpnet $QPNET_BIN -- RUN-OPTIONS`, its
//! output (and so qpnet's) in a log file. [`Supervisor::serving_primary`] names the primary serving the
//! instance now: the pid in its lock file, a live `qpnet run` child of the
//! supervisor, listening on the socket.
//!
//! Stopping is checked as for a bare qpnet ([`crate::qpnet`]):
//! [`Supervisor::stop`] sends SIGTERM to the supervisor and requires that
//! it exits 0 within [`STOP_LIMIT`], that its log says the primary exited
//! with status 0, that the primary and every worker are gone, that the
//! socket and the runtime directory were removed by qpnet, and that nothing
//! of the supervisor's process group is left. Dropping a supervisor that
//! was not stopped runs the same check and panics on failure (unless the
//! thread is already panicking).

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use nix::sys::signal::Signal;

use crate::binary::{qpnet_binary, workspace_dir};
use crate::guest::{read_lossy, Spawned};
use crate::netns::NetNs;
use crate::proc::{process_group_members, ProcHandle};
use crate::qpnet::RUN_DIR;
use crate::testbed::tail;
use crate::wait::poll_until;

/// How long the supervisor may take from SIGTERM to its exit (qpnet itself
/// gets [`crate::qpnet::STOP_LIMIT`] of it).
pub const STOP_LIMIT: Duration = Duration::from_secs(8);

/// `scripts/qpnet-supervise` running `qpnet run` in a test namespace.
pub struct Supervisor {
    process: Spawned,
    name: String,
    socket: PathBuf,
    log: PathBuf,
    stopped: bool,
}

impl Supervisor {
    /// Start the supervisor in `ns`: qpnet on TAP `tap` with `queue_pairs`,
    /// its socket in `dir`, everything the supervisor and qpnet print in
    /// `log`.
    pub fn start(
        ns: &NetNs,
        dir: &Path,
        log: &Path,
        tap: &str,
        queue_pairs: u16,
    ) -> Result<Supervisor> {
        let name = crate::unique_name();
        let socket = dir.join("vhost.sock");
        let qp = queue_pairs.to_string();
        let process = Spawned::start(
            "qpnet-supervise",
            ns.command(workspace_dir().join("scripts/qpnet-supervise"))
                .arg("--qpnet")
                .arg(qpnet_binary()?)
                .arg("--")
                .arg("--socket")
                .arg(&socket)
                .args(["--tap", tap, "--queue-pairs", &qp, "--name", &name])
                .env("RUST_BACKTRACE", "1"),
            log,
            Duration::from_secs(10),
        )?;
        Ok(Supervisor {
            process,
            name,
            socket,
            log: log.to_owned(),
            stopped: false,
        })
    }

    /// The supervisor's pid (the leader of its process group).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The instance name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the supervisor and qpnet logged so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// The primary serving the instance now: the pid in its lock file, a
    /// live `qpnet run` child of the supervisor, listening on the socket.
    pub fn serving_primary(&self) -> Option<ProcHandle> {
        let lock = Path::new(RUN_DIR).join(&self.name).join("lock");
        let pid: u32 = std::fs::read_to_string(lock).ok()?.trim().parse().ok()?;
        let p = ProcHandle::of(pid).ok()?;
        (p.is_alive()
            && p.ppid() == Some(self.process.pid())
            && p.cmdline()
                .is_some_and(|c| c.split(' ').nth(1) == Some("run"))
            && p.listens_on(&self.socket))
        .then_some(p)
    }

    /// Wait until a primary other than `not` serves; fail early if the
    /// supervisor ended.
    pub fn wait_primary(&mut self, not: Option<u32>, timeout: Duration) -> Result<ProcHandle> {
        poll_until(
            "a qpnet primary holding the lock file and listening on the socket",
            timeout,
            Duration::from_millis(5),
            || {
                if let Some(st) = self.process.exited()? {
                    bail!("qpnet-supervise exited ({st})");
                }
                Ok(self.serving_primary().filter(|p| Some(p.pid()) != not))
            },
        )
    }

    /// SIGTERM to the supervisor, and the checks of the module
    /// documentation; returns the supervisor's exit status.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.stopped = true;
        self.checked_stop()
    }

    fn checked_stop(&mut self) -> Result<ExitStatus> {
        let mut problems = Vec::new();
        let primary = self.serving_primary();
        // The primary's children are its workers and, under this script,
        // the subshell that logs its output (bash forks the process
        // substitution `>(emit)` before it execs qpnet): workers only.
        let workers: Vec<ProcHandle> = primary
            .as_ref()
            .map(ProcHandle::children)
            .unwrap_or_default()
            .into_iter()
            .filter(|w| w.cmdline().is_some_and(|c| c.contains(" worker ")))
            .collect();
        if primary.is_some() && workers.is_empty() {
            problems.push("the primary had no workers when it was stopped".to_string());
        }
        if primary.is_none() {
            problems.push("no primary was serving when it was stopped".to_string());
        }
        let pgrp = self.process.pid();
        let started = Instant::now();
        let status = match self.process.exited()? {
            Some(st) => {
                problems.push(format!("the supervisor had already exited ({st})"));
                Some(st)
            }
            None => {
                self.process.signal(Signal::SIGTERM)?;
                poll_until(
                    "the supervisor to exit",
                    STOP_LIMIT,
                    Duration::from_millis(5),
                    || self.process.exited(),
                )
                .ok()
            }
        };
        match status {
            None => problems.push(format!(
                "the supervisor still ran {STOP_LIMIT:?} after SIGTERM"
            )),
            Some(st) if !st.success() => {
                problems.push(format!("the supervisor exited with {st}, not 0"))
            }
            Some(_) => {}
        }
        let log = self.log();
        if !log.contains("stopped (qpnet exited with status 0)") {
            problems.push("its log does not say qpnet exited with status 0".to_string());
        }
        if let Some(p) = &primary {
            if !p.is_reaped() {
                problems.push(format!(
                    "the primary {} is still there ({:?})",
                    p.pid(),
                    p.state()
                ));
            }
        }
        for w in &workers {
            if !w.is_reaped() {
                problems.push(format!(
                    "worker {} outlived the primary ({:?})",
                    w.pid(),
                    w.state()
                ));
            }
        }
        // The log tee of the script ends when qpnet's output does.
        let left = poll_until(
            "the supervisor's process group to empty",
            Duration::from_secs(2),
            Duration::from_millis(10),
            || Ok(process_group_members(pgrp).is_empty().then_some(())),
        );
        if left.is_err() {
            problems.push(format!(
                "processes of its group left: {:?}",
                process_group_members(pgrp)
            ));
        }
        if self.socket.exists() {
            problems.push(format!("the socket {} was left", self.socket.display()));
            let _ = std::fs::remove_file(&self.socket);
        }
        let run = Path::new(RUN_DIR).join(&self.name);
        if run.exists() {
            problems.push(format!("the runtime directory {} was left", run.display()));
            let _ = std::fs::remove_dir_all(&run);
        }
        // Whatever is left of the group goes now.
        self.process.stop();
        let took = started.elapsed();
        match (status, problems.is_empty()) {
            (Some(st), true) => Ok(st),
            _ => Err(anyhow!(
                "qpnet-supervise (pid {pgrp}) did not stop cleanly on SIGTERM ({took:?}): {}; \
                 its log:\n{}",
                problems.join("; "),
                tail(&log, 40)
            )),
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        if let Err(e) = self.checked_stop() {
            eprintln!("{e:#}");
            if !std::thread::panicking() {
                panic!("{e:#}");
            }
        }
    }
}
