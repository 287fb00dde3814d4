//! qpnet's command line: mistakes get a clear error that names the fix and a
//! nonzero exit; help exists for every subcommand.
//!
//! Commands that could touch the network run inside a test namespace, so a
//! check that fails to refuse cannot create anything on the host.
//!
//! Needs root (to create namespaces and to drop to `nobody`) and the release
//! binary (`cargo build --release -p qpnet-primary`).

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use qpnet_tests::netns::NetNs;
use qpnet_tests::qpnet::{qpnet_binary, run_qpnet};
use qpnet_tests::testbed::{Testbed, TAP_NAME};

/// Run `cmd` to completion, killing it (and failing) after `timeout`.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "{cmd:?} still running after {timeout:?} (it should have refused); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child.wait_with_output()?)
}

/// The command failed (nonzero exit) and its stderr contains one of `any`.
fn ensure_refused(what: &str, out: &Output, any: &[&str]) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "{what}: exited successfully; stderr:\n{stderr}"
    );
    ensure!(
        any.iter().any(|s| stderr.contains(s)),
        "{what}: stderr should contain one of {any:?}, got:\n{stderr}"
    );
    Ok(())
}

/// `qpnet run ARGS` inside `ns`, bounded.
fn run_in(ns: &NetNs, args: &[&str]) -> Result<Output> {
    let mut cmd = ns.command(qpnet_binary()?);
    cmd.arg("run").args(args);
    run_bounded(&mut cmd, Duration::from_secs(15))
}

fn temp_socket() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}.sock", qpnet_tests::unique_name()))
}

#[test]
fn tap_name_too_long_is_refused() -> Result<()> {
    let ns = NetNs::new()?;
    let sock = temp_socket();
    let out = run_in(
        &ns,
        &[
            "--socket",
            sock.to_str().unwrap(),
            "--tap",
            "qpnet-tap-name-16",
            "--queue-pairs",
            "1",
            "--name",
            &qpnet_tests::unique_name(),
        ],
    )?;
    ensure_refused("a 17-character TAP name", &out, &["too long"])?;
    let links = ns.ip(&["-o", "link", "show"])?;
    ensure!(
        !links.contains("qpnet-tap"),
        "a TAP was created anyway: {links}"
    );
    ensure!(!sock.exists(), "the socket was created anyway");
    Ok(())
}

#[test]
fn socket_in_use_by_a_running_instance_is_refused() -> Result<()> {
    let bed = Testbed::new(1)?;
    let other = NetNs::new()?;
    other.add_tap(TAP_NAME, None)?;
    let socket = bed.qpnet.socket().to_str().unwrap().to_owned();
    let out = run_in(
        &other,
        &[
            "--socket",
            &socket,
            "--tap",
            TAP_NAME,
            "--queue-pairs",
            "1",
            "--name",
            &qpnet_tests::unique_name(),
        ],
    )?;
    ensure_refused("a socket path another qpnet listens on", &out, &["in use"])?;
    ensure!(
        bed.qpnet.socket().exists(),
        "the running instance's socket was removed"
    );
    // The first instance is unaffected.
    let mut bed = bed;
    bed.check_serving(20)
}

#[test]
fn instance_name_in_use_is_refused() -> Result<()> {
    let bed = Testbed::new(1)?;
    let other = NetNs::new()?;
    other.add_tap(TAP_NAME, None)?;
    let sock = temp_socket();
    let out = run_in(
        &other,
        &[
            "--socket",
            sock.to_str().unwrap(),
            "--tap",
            TAP_NAME,
            "--queue-pairs",
            "1",
            "--name",
            bed.qpnet.name(),
        ],
    )?;
    ensure_refused(
        "an instance name already running",
        &out,
        &["already running"],
    )?;
    let mut bed = bed;
    bed.check_serving(20)
}

#[test]
fn queue_pairs_outside_1_to_16_are_refused() -> Result<()> {
    let ns = NetNs::new()?;
    let sock = temp_socket();
    for n in ["0", "17", "-1", "many"] {
        let out = run_in(
            &ns,
            &[
                "--socket",
                sock.to_str().unwrap(),
                "--tap",
                TAP_NAME,
                &format!("--queue-pairs={n}"),
                "--name",
                &qpnet_tests::unique_name(),
            ],
        )?;
        ensure_refused(
            &format!("--queue-pairs {n}"),
            &out,
            &["1..=16", "between 1 and 16"],
        )?;
    }
    Ok(())
}

#[test]
fn unknown_flag_and_missing_arguments_are_refused() -> Result<()> {
    let out = run_qpnet(&[
        "run",
        "--socket",
        "/nonexistent/s",
        "--tap",
        "x",
        "--frobnicate",
    ])?;
    ensure_refused("an unknown flag", &out, &["--frobnicate"])?;
    let out = run_qpnet(&["run", "--tap", "x"])?;
    ensure_refused("no --socket", &out, &["--socket"])?;
    let out = run_qpnet(&["launch"])?;
    ensure_refused("an unknown subcommand", &out, &["launch"])?;
    let out = run_qpnet(&[
        "run",
        "--socket",
        "/nonexistent/s",
        "--tap",
        "x",
        "--mac",
        "01:02:03:04:05:06",
    ])?;
    ensure_refused("a multicast MAC", &out, &["multicast"])?;
    Ok(())
}

#[test]
fn running_without_cap_net_admin_is_refused() -> Result<()> {
    let ns = NetNs::new()?;
    ns.add_tap(TAP_NAME, None)?;
    let dir = std::env::temp_dir().join(qpnet_tests::unique_name());
    std::fs::create_dir_all(&dir)?;
    // World-writable, so `nobody` could create its socket here: the refusal
    // must come from the capability check, not from file permissions.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let sock = dir.join("s");
    let mut cmd = ns.command("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(qpnet_binary()?)
        .args([
            "run",
            "--socket",
            sock.to_str().unwrap(),
            "--tap",
            TAP_NAME,
            "--queue-pairs",
            "1",
        ])
        .args(["--name", &qpnet_tests::unique_name()]);
    let out = run_bounded(&mut cmd, Duration::from_secs(15));
    let _ = std::fs::remove_dir_all(&dir);
    ensure_refused("running as nobody", &out?, &["CAP_NET_ADMIN"])
}

#[test]
fn help_exists_for_every_subcommand() -> Result<()> {
    let cases: [(&[&str], &[&str]); 3] = [
        (&["--help"], &["run", "stats"]),
        (
            &["run", "--help"],
            &["--socket", "--tap", "--queue-pairs", "--connect", "--name"],
        ),
        (&["stats", "--help"], &["--name", "--json"]),
    ];
    for (args, words) in cases {
        let out = run_qpnet(args)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "qpnet {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for w in words {
            ensure!(
                stdout.contains(w),
                "qpnet {args:?} does not mention {w}:\n{stdout}"
            );
        }
    }
    Ok(())
}

#[test]
fn stats_prints_counters_and_refuses_unknown_instances() -> Result<()> {
    let bed = Testbed::new(2)?;
    let out = bed.qpnet.stats_command(&["--json"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "qpnet stats --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for key in [
        "tx_frames",
        "rx_frames",
        "drop_bad_descriptor",
        "drop_runt",
        "pid",
    ] {
        ensure!(
            stdout.contains(&format!("\"{key}\"")),
            "stats JSON lacks {key}:\n{stdout}"
        );
    }
    let table = bed.qpnet.stats_command(&[])?;
    ensure!(table.status.success(), "qpnet stats failed");
    let missing = qpnet_tests::unique_name();
    let out = run_qpnet(&["stats", "--name", &missing])?;
    ensure_refused("stats of an instance that does not run", &out, &[&missing])?;
    Ok(())
}
