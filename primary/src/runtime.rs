//! The instance's runtime directory (`/run/qpnet/NAME/` as root): an
//! exclusive lock that makes a second instance of the same name fail early,
//! the pid file and the shared region's file. Removed on clean exit.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};

/// The default runtime base directory: /run/qpnet as root, else
/// $XDG_RUNTIME_DIR/qpnet, else /tmp/qpnet-UID.
pub fn default_base() -> PathBuf {
    let uid = nix::unistd::geteuid().as_raw();
    if uid == 0 {
        return PathBuf::from("/run/qpnet");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("qpnet"),
        None => PathBuf::from(format!("/tmp/qpnet-{uid}")),
    }
}

/// Check an instance name: 1..=64 of [A-Za-z0-9_.-], not starting with '.'.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if !ok {
        bail!("instance name {name:?} is not valid: use 1 to 64 letters, digits, '_', '-' or '.', not starting with '.'");
    }
    Ok(())
}

/// The directory of instance `name` under `base`.
pub fn instance_dir(base: &Path, name: &str) -> PathBuf {
    base.join(name)
}

/// The shared region file of an instance directory.
pub fn shm_path(dir: &Path) -> PathBuf {
    dir.join("stats.shm")
}

/// The pid of the primary holding instance directory `dir`, if one runs
/// (its lock is held). Reads /proc/locks rather than trying the lock: a
/// primary starting at that moment must not find it taken by us.
pub fn running_pid(dir: &Path) -> Result<i32> {
    let path = dir.join("lock");
    let meta =
        std::fs::metadata(&path).with_context(|| format!("{} does not exist", path.display()))?;
    let locks = std::fs::read_to_string("/proc/locks").context("reading /proc/locks")?;
    if !flock_held(&locks, meta.dev(), meta.ino()) {
        bail!("{} is not held by a running qpnet", path.display());
    }
    let pid = std::fs::read_to_string(&path)?;
    pid.trim()
        .parse()
        .with_context(|| format!("{} holds no pid", path.display()))
}

/// Does a /proc/locks text show an exclusive flock on (dev, ino)?
/// Lines read "1: FLOCK  ADVISORY  WRITE 4242 00:1a:1234 0 EOF"; waiters
/// have "->" after the number and hold nothing.
pub fn flock_held(locks: &str, dev: u64, ino: u64) -> bool {
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    locks.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() >= 6 && f[1] == "FLOCK" && f[3] == "WRITE" && f[5] == want
    })
}

/// A locked runtime directory; removed on drop.
pub struct RuntimeDir {
    dir: PathBuf,
    /// Held for the primary's life; the kernel releases it when the
    /// process ends, however it ends.
    _lock: Flock<File>,
}

impl RuntimeDir {
    /// Create and lock the directory of instance `name`; fails clearly if
    /// another process holds it.
    pub fn acquire(base: &Path, name: &str) -> Result<RuntimeDir> {
        let dir = instance_dir(base, name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating runtime directory {}", dir.display()))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(dir.join("lock"))
            .with_context(|| format!("opening {}/lock", dir.display()))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, _)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                bail!(
                    "qpnet instance {name:?} is already running (pid {}): stop it, or give this one another --name",
                    pid.trim()
                );
            }
        };
        lock.set_len(0)?;
        lock.rewind()?;
        writeln!(lock, "{}", std::process::id())?;
        Ok(RuntimeDir { dir, _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(shm_path(&self.dir));
        let _ = std::fs::remove_file(self.dir.join("lock"));
        let _ = std::fs::remove_dir(&self.dir);
    }
}
