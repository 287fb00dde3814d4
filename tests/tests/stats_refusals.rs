//! `qpnet stats` when there is nothing it can print: it must say so
//! clearly, with exit codes scripts can use, and never panic.
//!
//! No instance (exit 3), a region left behind by a dead primary (exit 3), a
//! region of another layout version or garbage (exit 4), a region it may
//! not read (exit 1, an I/O error), bad arguments (exit 2); a corrupted
//! region whose lock is held is printed in every format without a panic,
//! impossible states shown as invalid.
//!
//! Needs root and `$QPNET_BIN`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use qpnet_shared::{QueueStats, RegionHeader, SharedRegion, LAYOUT_VERSION, MAGIC};
use qpnet_tests::binary::{ensure_exit, qpnet_binary, run_bounded, run_qpnet};
use qpnet_tests::prometheus;
use qpnet_tests::stats_json::StatsDoc;
use qpnet_tests::unique_name;

/// Exit codes of `qpnet stats`.
const EXIT_IO_ERROR: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_NO_INSTANCE: i32 = 3;
const EXIT_INCOMPATIBLE: i32 = 4;
/// The widest a table line may be.
const TABLE_WIDTH: usize = 120;

/// `qpnet stats ARGS` with a bound on its run time.
fn stats_bounded(args: &[&str]) -> Result<Output> {
    run_bounded(
        Command::new(qpnet_binary()?).arg("stats").args(args),
        Duration::from_secs(10),
    )
}

/// A runtime directory of the test's own, removed on drop.
struct RuntimeBase(PathBuf);

impl RuntimeBase {
    fn new() -> Result<RuntimeBase> {
        let p = std::env::temp_dir().join(format!("{}-run", unique_name()));
        std::fs::create_dir_all(&p)?;
        Ok(RuntimeBase(p))
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 temp dir")
    }

    /// The instance directory `name`, created.
    fn instance(&self, name: &str) -> Result<PathBuf> {
        let d = self.0.join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }
}

impl Drop for RuntimeBase {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn stats_without_a_running_instance_exits_3_and_says_so() -> Result<()> {
    let name = unique_name();
    for extra in [&[][..], &["--json"], &["--prometheus"], &["--watch", "0.1"]] {
        let mut args = vec!["--name", name.as_str()];
        args.extend_from_slice(extra);
        let out = stats_bounded(&args)?;
        ensure_exit(
            &format!("stats {args:?}"),
            &out,
            EXIT_NO_INSTANCE,
            &["no qpnet instance", &name, "is running", "does not exist"],
        )?;
    }
    let base = RuntimeBase::new()?;
    let out = stats_bounded(&["--name", &name, "--runtime-dir", base.arg()])?;
    ensure_exit(
        "an empty --runtime-dir",
        &out,
        EXIT_NO_INSTANCE,
        &[&name, base.arg()],
    )?;
    // A region left behind by a primary that was killed: valid, but nobody
    // holds the instance lock. Shown as not running, never as live figures.
    let dir = base.instance(&name)?;
    let region = SharedRegion::create(&dir.join("stats.shm"), 2)?;
    let out = stats_bounded(&["--name", &name, "--runtime-dir", base.arg()])?;
    ensure_exit(
        "a region without a primary",
        &out,
        EXIT_NO_INSTANCE,
        &["no qpnet instance", "left behind", "holds no lock"],
    )?;
    std::fs::write(dir.join("lock"), "1\n")?;
    let out = stats_bounded(&["--name", &name, "--runtime-dir", base.arg(), "--json"])?;
    ensure_exit(
        "a region whose lock nobody holds",
        &out,
        EXIT_NO_INSTANCE,
        &["left behind"],
    )?;
    drop(region);
    Ok(())
}

/// A region file of layout `version`: just enough header for a reader to
/// see the magic and the version.
fn fake_region(path: &Path, version: u32) -> Result<()> {
    let mut bytes = vec![0u8; 4096];
    bytes[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    bytes[8..12].copy_from_slice(&version.to_le_bytes());
    bytes[12..16].copy_from_slice(&192u32.to_le_bytes());
    bytes[16..20].copy_from_slice(&192u32.to_le_bytes());
    bytes[20..24].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(path, bytes)?;
    Ok(())
}

#[test]
fn stats_on_a_region_it_cannot_read_exits_4_and_says_why() -> Result<()> {
    let base = RuntimeBase::new()?;
    let name = "other-build";
    let shm = base.instance(name)?.join("stats.shm");
    let other = LAYOUT_VERSION + 1;
    for version in [LAYOUT_VERSION - 1, other] {
        fake_region(&shm, version)?;
        for extra in [&[][..], &["--json"], &["--prometheus"]] {
            let mut args = vec!["--name", name, "--runtime-dir", base.arg()];
            args.extend_from_slice(extra);
            let out = stats_bounded(&args)?;
            ensure_exit(
                &format!("layout version {version}"),
                &out,
                EXIT_INCOMPATIBLE,
                &[
                    &format!("layout version {version}"),
                    &format!("reads version {LAYOUT_VERSION}"),
                ],
            )?;
        }
    }
    let mut garbage = vec![0u8; 8192];
    let mut x: u32 = 0x1234_5678;
    for b in garbage.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(&shm, &garbage)?;
    let out = stats_bounded(&["--name", name, "--runtime-dir", base.arg()])?;
    ensure_exit(
        "a garbage region",
        &out,
        EXIT_INCOMPATIBLE,
        &["not a qpnet shared region"],
    )?;
    std::fs::write(&shm, b"")?;
    let out = stats_bounded(&["--name", name, "--runtime-dir", base.arg(), "--json"])?;
    ensure_exit("an empty region file", &out, EXIT_INCOMPATIBLE, &["bytes"])?;
    Ok(())
}

/// Garbage over everything a reader must not trust (queue blocks, header
/// counters, the whole flow table), with a valid identity and geometry and
/// the instance lock held: `qpnet stats` prints, in every format, without a
/// panic, and shows impossible states as invalid rather than as a state.
#[test]
fn stats_on_a_corrupted_region_prints_without_crashing() -> Result<()> {
    use std::os::unix::fs::FileExt;
    let base = RuntimeBase::new()?;
    let name = "corrupt";
    let dir = base.instance(name)?;
    let shm = dir.join("stats.shm");
    let region = SharedRegion::create_with(&shm, 4, 4096)?;
    let lock = std::fs::File::create(dir.join("lock"))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .context("locking the fake instance")?;
    let file = std::fs::OpenOptions::new().write(true).open(&shm)?;
    let len = file.metadata()?.len();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    // Header: keep magic, version, sizes, queue pairs (0..24) and the flow
    // geometry (64..128); garble the rest.
    file.write_all_at(&noise(40), 24)?;
    file.write_all_at(&noise(64), 128)?;
    file.write_all_at(&noise(len as usize - 192), 192)?;
    // One state far out of range, for certain: queue pair 0's `state`.
    let state_at = std::mem::size_of::<RegionHeader>() + std::mem::offset_of!(QueueStats, state);
    file.write_all_at(&0xdead_beefu32.to_le_bytes(), state_at as u64)?;
    for extra in [&[][..], &["--json", "--top", "1000"], &["--prometheus"]] {
        let mut args = vec!["--name", name, "--runtime-dir", base.arg()];
        args.extend_from_slice(extra);
        let out = stats_bounded(&args)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() && !stderr.contains("panicked"),
            "stats {extra:?} on a corrupted region: {}; stderr: {stderr}",
            out.status
        );
        match extra.first() {
            Some(&"--json") => {
                let doc = StatsDoc::parse(&stdout)?;
                ensure!(doc.queues.len() == 4, "{} queues", doc.queues.len());
                ensure!(
                    stdout.contains("\"invalid(3735928559)\""),
                    "an out-of-range state is not shown as invalid:\n{stdout}"
                );
            }
            Some(_) => {
                prometheus::check(&stdout)?;
            }
            None => {
                println!("{stdout}");
                for line in stdout.lines() {
                    ensure!(line.chars().count() <= TABLE_WIDTH, "wide line {line:?}");
                }
            }
        }
    }
    drop(region);
    Ok(())
}

#[test]
fn stats_arguments_are_checked() -> Result<()> {
    for (args, needle) in [
        (&["--watch", "0"][..], "between"),
        (&["--watch=-1"], "between"),
        (&["--watch", "NaN"], "between"),
        (&["--watch", "0.5", "--prometheus"], "--prometheus"),
    ] {
        let out = stats_bounded(args)?;
        ensure_exit(&format!("stats {args:?}"), &out, EXIT_USAGE, &[needle])?;
    }
    let out = run_qpnet(&["stats", "--json", "--prometheus"])?;
    ensure!(
        out.status.code() == Some(EXIT_USAGE),
        "--json --prometheus accepted"
    );
    let out = run_qpnet(&["stats", "--name", "../etc"])?;
    ensure!(!out.status.success(), "a name with a slash accepted");
    Ok(())
}

/// A region `qpnet stats` is not allowed to read (as `nobody`, on a file
/// of mode 000) is an I/O error: exit 1, saying why, never exit 0 with
/// nothing, never a panic.
#[test]
fn stats_on_a_region_it_may_not_read_exits_1_and_says_why() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let base = RuntimeBase::new()?;
    let name = "unreadable";
    let dir = base.instance(name)?;
    let shm = dir.join("stats.shm");
    let region = SharedRegion::create(&shm, 2)?;
    std::fs::set_permissions(&shm, std::fs::Permissions::from_mode(0o000))?;
    for extra in [&[][..], &["--json"], &["--prometheus"]] {
        let out = run_bounded(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(qpnet_binary()?)
                .args(["stats", "--name", name, "--runtime-dir", base.arg()])
                .args(extra),
            Duration::from_secs(10),
        )?;
        ensure_exit(
            &format!("stats {extra:?} of a region it may not read"),
            &out,
            EXIT_IO_ERROR,
            &["Permission denied"],
        )?;
    }
    drop(region);
    Ok(())
}
