//! The qpnet binary under test, and running it to completion.
//!
//! The suite tests the binary it is told to test: `$QPNET_BIN`, which
//! `scripts/test.sh` exports right after `cargo build --release`. Without it
//! every test that needs qpnet fails and says how to set it; there is no
//! search of `target/` that could pick up whatever build happens to lie
//! there (a debug build, another branch's build, last week's). The binary is
//! also checked to be newer than every source file it was built from, by
//! cargo's own list of them (the `qpnet.d` dep-info file cargo writes next
//! to the binary): a binary older than its sources is a stale build and is
//! refused. A binary without that file (installed elsewhere) is taken as
//! named. The check runs once per test process.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};

/// The qpnet binary named by `$QPNET_BIN`, checked to exist and to be no
/// older than its sources.
pub fn qpnet_binary() -> Result<PathBuf> {
    static CHECKED: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| check_binary().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn check_binary() -> Result<PathBuf> {
    let Some(p) = std::env::var_os("QPNET_BIN") else {
        bail!(
            "QPNET_BIN is not set: the tests run the qpnet binary it names and no other. \
             Build and point at it: `cargo build --release && \
             QPNET_BIN=$PWD/target/release/qpnet cargo test --release -p qpnet-tests` \
             (with CARGO_TARGET_DIR, the binary is under that directory), or run \
             scripts/test.sh, which does both"
        );
    };
    let bin = PathBuf::from(p);
    let meta = std::fs::metadata(&bin)
        .with_context(|| format!("QPNET_BIN={}: no such file", bin.display()))?;
    if !meta.is_file() {
        bail!("QPNET_BIN={} is not a file", bin.display());
    }
    let built = meta.modified().context("the binary's modification time")?;
    let dep_info = bin.with_extension("d");
    if let Ok(text) = std::fs::read_to_string(&dep_info) {
        let newer = sources_newer_than(&text, built);
        if !newer.is_empty() {
            bail!(
                "QPNET_BIN={} is older than {} of its source files (first: {}): a stale \
                 build; run `cargo build --release` first",
                bin.display(),
                newer.len(),
                newer[0].display()
            );
        }
    }
    Ok(bin)
}

/// The sources listed in a cargo dep-info text (`target: src1 src2 ...`,
/// spaces in names escaped as `\ `) that were modified after `built`, or
/// that no longer exist.
pub fn sources_newer_than(dep_info: &str, built: SystemTime) -> Vec<PathBuf> {
    let Some(first) = dep_info.lines().next() else {
        return Vec::new();
    };
    // The target path ends at the first ": " that is not escaped.
    let Some(deps) = first.split_once(": ").map(|(_, d)| d) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    let mut cur = String::new();
    let mut chars = deps.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&' ') => {
                cur.push(' ');
                chars.next();
            }
            ' ' => {
                if !cur.is_empty() {
                    files.push(PathBuf::from(std::mem::take(&mut cur)));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        files.push(PathBuf::from(cur));
    }
    files
        .into_iter()
        .filter(|f| {
            std::fs::metadata(f)
                .and_then(|m| m.modified())
                .map_or(true, |t| t > built)
        })
        .collect()
}

/// Run `qpnet ARGS` to completion (not in a namespace) and capture output.
pub fn run_qpnet(args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(qpnet_binary()?);
    cmd.args(args);
    run_bounded(&mut cmd, Duration::from_secs(30))
}

/// Run `cmd` to completion with stdin closed and its output captured,
/// killing it (and failing, with its stderr) after `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    // Read the pipes while waiting, so a chatty command cannot block on them.
    let out = child.stdout.take().context("stdout pipe")?;
    let err = child.stderr.take().context("stderr pipe")?;
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let (out_t, err_t) = (read(Box::new(out)), read(Box::new(err)));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{cmd:?} still running after {timeout:?}; stderr:\n{}",
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// A refusal as scripts see it: the command exited with `code`, printed
/// nothing on stdout, its stderr holds every one of `needles`, and it did
/// not panic.
pub fn ensure_exit(what: &str, out: &Output, code: i32, needles: &[&str]) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(code) {
        bail!(
            "{what}: exit {:?}, expected {code}; stderr: {stderr}",
            out.status.code()
        );
    }
    if !out.stdout.is_empty() {
        bail!(
            "{what}: printed on stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    for n in needles {
        if !stderr.contains(n) {
            bail!("{what}: stderr lacks {n:?}: {stderr}");
        }
    }
    if stderr.contains("panicked") {
        bail!("{what}: panicked: {stderr}");
    }
    Ok(())
}

/// The workspace root (the tests crate's parent directory).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dep_info_sources_newer_than_the_build_are_named() {
        let dir = std::env::temp_dir().join(crate::unique_name());
        std::fs::create_dir_all(&dir).unwrap();
        let old = dir.join("old.rs");
        let spaced = dir.join("with space.rs");
        std::fs::write(&old, "").unwrap();
        std::fs::write(&spaced, "").unwrap();
        let text = format!(
            "{}/qpnet: {} {} {}/gone.rs\n\n{}:\n",
            dir.display(),
            old.display(),
            spaced.display().to_string().replace(' ', "\\ "),
            dir.display(),
            old.display()
        );
        let future = SystemTime::now() + Duration::from_secs(3600);
        let past = SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(
            sources_newer_than(&text, future),
            vec![dir.join("gone.rs")],
            "only the missing file counts against a fresh build"
        );
        let stale = sources_newer_than(&text, past);
        assert_eq!(stale, vec![old, spaced, dir.join("gone.rs")]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_command_is_bounded_and_its_output_kept() {
        let out = run_bounded(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        let t = Instant::now();
        let e = run_bounded(
            Command::new("sh").args(["-c", "echo slow >&2; exec sleep 30"]),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(format!("{e:#}").contains("slow"), "{e:#}");
    }
}
