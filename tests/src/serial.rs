//! One timing-sensitive test at a time, enforced in code.
//!
//! Tests that hold qpnet to millisecond bounds (the crash tests) or boot a
//! TCG guest against second bounds (the guest tests) measure the machine as
//! much as qpnet when another such test runs beside them: two TCG guests on
//! two CPUs race each other against 1 s and 5 s limits. They take a
//! [`TimingLock`] first. It is two locks: a static mutex for the test
//! threads of one binary (`cargo test` runs a binary's tests in parallel),
//! and an exclusive `flock` on [`LOCK_PATH`] for other test processes (two
//! `cargo test` runs, or two worktrees, on one machine). Both are released
//! when the guard drops, the `flock` also when the process dies.

use std::fs::{File, OpenOptions};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};

/// The lock file every timing-sensitive test process locks.
pub const LOCK_PATH: &str = "/tmp/qpnet-timing-tests.lock";

static IN_PROCESS: Mutex<()> = Mutex::new(());

/// Held while a timing-sensitive test runs.
pub struct TimingLock {
    _file: Flock<File>,
    _thread: MutexGuard<'static, ()>,
}

impl TimingLock {
    /// Wait until no other timing-sensitive test runs, in this process or
    /// any other; say so on stderr when the wait is long.
    pub fn acquire(what: &str) -> Result<TimingLock> {
        TimingLock::acquire_at(LOCK_PATH, what)
    }

    /// [`TimingLock::acquire`] with another lock file (for its own test).
    pub fn acquire_at(path: &str, what: &str) -> Result<TimingLock> {
        let started = Instant::now();
        let thread = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening {path}"))?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((file, _busy)) => {
                eprintln!(
                    "{what}: waiting for another timing-sensitive test process \
                     (it holds {path})"
                );
                Flock::lock(file, FlockArg::LockExclusive)
                    .map_err(|(_, e)| e)
                    .with_context(|| format!("locking {path}"))?
            }
        };
        let waited = started.elapsed();
        if waited.as_secs() >= 1 {
            eprintln!("{what}: waited {waited:?} for the timing lock");
        }
        Ok(TimingLock {
            _file: file,
            _thread: thread,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// `flock -n PATH true` in another process: 0 if it got the lock.
    fn other_process_can_lock(path: &str) -> bool {
        Command::new("flock")
            .args(["-n", path, "true"])
            .status()
            .expect("running flock(1) (util-linux)")
            .success()
    }

    #[test]
    fn the_lock_excludes_other_processes_until_dropped() {
        let path = std::env::temp_dir().join(format!("{}.lock", crate::unique_name()));
        let path = path.to_str().unwrap().to_owned();
        let held = TimingLock::acquire_at(&path, "unit test").unwrap();
        assert!(
            !other_process_can_lock(&path),
            "another process took the lock while it was held"
        );
        // A second test thread of this process waits for the first.
        let p2 = path.clone();
        let waiter = std::thread::spawn(move || {
            let t = Instant::now();
            let _second = TimingLock::acquire_at(&p2, "unit test, second thread").unwrap();
            t.elapsed()
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(held);
        let waited = waiter.join().unwrap();
        assert!(
            waited >= std::time::Duration::from_millis(150),
            "the second thread got the lock after {waited:?}, while the first held it"
        );
        assert!(
            other_process_can_lock(&path),
            "the lock stayed taken after drop"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
