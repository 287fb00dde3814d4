//! Finding the instance `qpnet stats` reads: its runtime directory, its
//! shared region mapped read-only, and whether a primary still runs it.
//!
//! What it finds decides the exit code: no region, or one left behind by a
//! primary that is gone, is "not running" (3); a region of another layout
//! version, or not a qpnet region, is "unreadable" (4). A region that is
//! being created right now (no magic yet, not sized yet) is given a moment
//! to settle before it is judged unreadable.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use qpnet_shared::{RegionError, SharedRegion};

use super::{EXIT_INCOMPATIBLE, EXIT_NO_INSTANCE};
use crate::cli::StatsArgs;
use crate::runtime;

/// How long a region that is being created (no magic yet, not sized yet)
/// is given before it is judged unreadable.
const SETTLE_TIME: Duration = Duration::from_millis(300);

/// Why there is nothing to print.
pub(super) enum Refusal {
    NotRunning(String),
    Unreadable(String),
}

impl Refusal {
    /// The exit code and the message to print.
    pub(super) fn exit(&self) -> (i32, &str) {
        match self {
            Refusal::NotRunning(m) => (EXIT_NO_INSTANCE, m),
            Refusal::Unreadable(m) => (EXIT_INCOMPATIBLE, m),
        }
    }
}

/// An attached region and the file it came from.
pub(super) struct Instance {
    pub(super) region: SharedRegion,
    /// (device, inode) of the mapped file: a primary restart makes a new one.
    identity: (u64, u64),
}

/// Where the instance of one name lives.
pub(super) struct Target {
    name: String,
    base: PathBuf,
    dir: PathBuf,
    shm: PathBuf,
}

impl Target {
    pub(super) fn new(args: &StatsArgs) -> Target {
        let base = args
            .runtime_dir
            .clone()
            .unwrap_or_else(runtime::default_base);
        let dir = runtime::instance_dir(&base, &args.name);
        let shm = runtime::shm_path(&dir);
        Target {
            name: args.name.clone(),
            base,
            dir,
            shm,
        }
    }

    /// Attach, giving a region that is being created a moment to settle.
    pub(super) fn attach(&self) -> Result<std::result::Result<Instance, Refusal>> {
        let deadline = Instant::now() + SETTLE_TIME;
        loop {
            match self.attach_once()? {
                Err(AttachError::Settling(msg)) if Instant::now() >= deadline => {
                    return Ok(Err(Refusal::Unreadable(msg)));
                }
                Err(AttachError::Settling(_)) => std::thread::sleep(Duration::from_millis(20)),
                Err(AttachError::Refused(r)) => return Ok(Err(r)),
                Ok(i) => return Ok(Ok(i)),
            }
        }
    }

    fn attach_once(&self) -> Result<std::result::Result<Instance, AttachError>> {
        let path = self.shm.display();
        let region = match SharedRegion::open_read_only(&self.shm) {
            Ok(r) => r,
            Err(RegionError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(Err(AttachError::Refused(Refusal::NotRunning(format!(
                    "no qpnet instance {:?} is running: {path} does not exist{}",
                    self.name,
                    self.others()
                )))));
            }
            Err(e @ RegionError::Version { .. }) => {
                return Ok(Err(AttachError::Refused(Refusal::Unreadable(format!(
                    "{path}: {e}; the instance was started by another qpnet build: \
                     use the qpnet binary that runs it"
                )))));
            }
            Err(e @ (RegionError::BadMagic | RegionError::TooSmall { .. })) => {
                return Ok(Err(AttachError::Settling(format!("{path}: {e}"))));
            }
            Err(e @ RegionError::Layout(_)) => {
                return Ok(Err(AttachError::Refused(Refusal::Unreadable(format!(
                    "{path}: {e}"
                )))));
            }
            Err(e) => return Err(e).context("opening the instance's shared region"),
        };
        let primary = region.header().primary_pid.load(Ordering::Relaxed);
        if !primary_running(&self.dir, primary) {
            return Ok(Err(AttachError::Refused(Refusal::NotRunning(format!(
                "no qpnet instance {:?} is running: {path} was left behind (its primary, pid \
                 {primary}, holds no lock on {})",
                self.name,
                self.dir.join("lock").display()
            )))));
        }
        let identity = file_identity(&region)?;
        Ok(Ok(Instance { region, identity }))
    }

    /// "; instances here: a, b" (or none), for the not-found message.
    fn others(&self) -> String {
        let mut names: Vec<String> = std::fs::read_dir(&self.base)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| runtime::shm_path(&e.path()).exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        if names.is_empty() {
            format!(" (no instance under {})", self.base.display())
        } else {
            names.truncate(10);
            format!(
                " (instances under {}: {})",
                self.base.display(),
                names.join(", ")
            )
        }
    }

    /// Whether `inst` is still the live region of this name.
    pub(super) fn still_current(&self, inst: &Instance) -> bool {
        let same_file = std::fs::metadata(&self.shm)
            .map(|m| (m.dev(), m.ino()) == inst.identity)
            .unwrap_or(false);
        same_file
            && primary_running(
                &self.dir,
                inst.region.header().primary_pid.load(Ordering::Relaxed),
            )
    }
}

enum AttachError {
    /// Not (yet) a complete region: maybe being created right now.
    Settling(String),
    Refused(Refusal),
}

fn file_identity(region: &SharedRegion) -> Result<(u64, u64)> {
    let st = nix::sys::stat::fstat(region.fd()).context("fstat of the shared region")?;
    Ok((st.st_dev, st.st_ino))
}

/// Whether a primary holds the instance directory's lock. Read from
/// /proc/locks: trying the lock ourselves could make a primary that starts
/// at that moment fail to get it. Falls back to the pid in the header.
fn primary_running(dir: &Path, header_pid: u32) -> bool {
    let Ok(lock) = std::fs::metadata(dir.join("lock")) else {
        return false;
    };
    match std::fs::read_to_string("/proc/locks") {
        Ok(locks) => runtime::flock_held(&locks, lock.dev(), lock.ino()),
        Err(_) => pid_alive(header_pid),
    }
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    pid != 0
        && matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Ok(()) | Err(nix::errno::Errno::EPERM)
        )
}

#[cfg(test)]
mod tests {
    #[test]
    fn proc_locks_lines_are_read() {
        let dev = nix::sys::stat::makedev(0, 0x1a);
        let text = "1: POSIX  ADVISORY  WRITE 99 00:1a:5 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 00:1a:1234 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 77 00:1a:999 0 EOF\n\
                    3: FLOCK  ADVISORY  READ 4243 00:1a:888 0 EOF\n";
        assert!(crate::runtime::flock_held(text, dev, 1234));
        assert!(!crate::runtime::flock_held(text, dev, 5));
        assert!(!crate::runtime::flock_held(text, dev, 999));
        assert!(!crate::runtime::flock_held(text, dev, 888));
        assert!(!crate::runtime::flock_held(
            text,
            nix::sys::stat::makedev(0, 0x1b),
            1234
        ));
    }
}
