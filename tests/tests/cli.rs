//! qpnet's command line: mistakes get a clear error that names the fix and
//! the exit code the README promises (2 for usage errors, found before
//! anything is touched; 1 for errors while setting up or running), and
//! leave nothing behind; help exists for every subcommand.
//!
//! Commands that could touch the network run inside a test namespace, so a
//! check that fails to refuse cannot create anything on the host.
//!
//! Needs root (to create namespaces and to drop to `nobody`) and
//! `$QPNET_BIN`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use qpnet_tests::binary::{ensure_exit, qpnet_binary, run_bounded, run_qpnet};
use qpnet_tests::netns::{run_checked, NetNs};
use qpnet_tests::qpnet::RUN_DIR;
use qpnet_tests::testbed::{Testbed, TAP_NAME};
use qpnet_tests::unique_name;

/// Exit code of a usage error (clap's, and `qpnet stats`').
const EXIT_USAGE: i32 = 2;
/// Exit code of an error while setting up or running.
const EXIT_ERROR: i32 = 1;
/// Exit code of `qpnet retry` (and `qpnet stats`) without such an instance.
const EXIT_NO_INSTANCE: i32 = 3;

/// `qpnet run ARGS` inside `ns`, bounded.
fn run_in(ns: &NetNs, args: &[&str]) -> Result<Output> {
    let mut cmd = ns.command(qpnet_binary()?);
    cmd.arg("run").args(args);
    run_bounded(&mut cmd, Duration::from_secs(15))
}

fn temp_socket() -> PathBuf {
    std::env::temp_dir().join(format!("{}.sock", unique_name()))
}

/// Nothing of instance `name` is left in the runtime directory.
fn ensure_no_runtime_dir(what: &str, name: &str) -> Result<()> {
    let dir = Path::new(RUN_DIR).join(name);
    ensure!(
        !dir.exists(),
        "{what}: qpnet left its runtime directory {}",
        dir.display()
    );
    Ok(())
}

#[test]
fn tap_name_too_long_is_refused() -> Result<()> {
    let ns = NetNs::new()?;
    let sock = temp_socket();
    let name = unique_name();
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
            &name,
        ],
    )?;
    ensure_exit(
        "a 17-character TAP name",
        &out,
        EXIT_ERROR,
        &["too long", "15 bytes"],
    )?;
    let links = ns.ip(&["-o", "link", "show"])?;
    ensure!(
        !links.contains("qpnet-tap"),
        "a TAP was created anyway: {links}"
    );
    ensure!(!sock.exists(), "the socket was created anyway");
    ensure_no_runtime_dir("a 17-character TAP name", &name)
}

#[test]
fn socket_in_use_by_a_running_instance_is_refused() -> Result<()> {
    let mut bed = Testbed::new(1)?;
    let other = NetNs::new()?;
    other.add_tap(TAP_NAME, None)?;
    let socket = bed.qpnet.socket().to_str().unwrap().to_owned();
    let name = unique_name();
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
            &name,
        ],
    )?;
    ensure_exit(
        "a socket path another qpnet listens on",
        &out,
        EXIT_ERROR,
        &["in use", "--socket"],
    )?;
    ensure!(
        bed.qpnet.socket().exists(),
        "the running instance's socket was removed"
    );
    ensure_no_runtime_dir("a socket in use", &name)?;
    // The first instance is unaffected.
    bed.check_serving(20)?;
    bed.finish()
}

#[test]
fn instance_name_in_use_is_refused() -> Result<()> {
    let mut bed = Testbed::new(1)?;
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
    ensure_exit(
        "an instance name already running",
        &out,
        EXIT_ERROR,
        &["already running", "--name"],
    )?;
    ensure!(!sock.exists(), "the second instance created its socket");
    bed.check_serving(20)?;
    bed.finish()
}

#[test]
fn queue_pairs_outside_1_to_16_are_refused() -> Result<()> {
    let ns = NetNs::new()?;
    let sock = temp_socket();
    for n in ["0", "17", "-1", "many"] {
        let name = unique_name();
        let out = run_in(
            &ns,
            &[
                "--socket",
                sock.to_str().unwrap(),
                "--tap",
                TAP_NAME,
                &format!("--queue-pairs={n}"),
                "--name",
                &name,
            ],
        )?;
        ensure_exit(
            &format!("--queue-pairs {n}"),
            &out,
            EXIT_USAGE,
            &["1..=16", "between 1 and 16"],
        )?;
        ensure_no_runtime_dir(&format!("--queue-pairs {n}"), &name)?;
    }
    let links = ns.ip(&["-o", "link", "show"])?;
    ensure!(!links.contains(TAP_NAME), "a TAP was created: {links}");
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
    ensure_exit("an unknown flag", &out, EXIT_USAGE, &["--frobnicate"])?;
    let out = run_qpnet(&["run", "--tap", "x"])?;
    ensure_exit("no --socket", &out, EXIT_USAGE, &["--socket"])?;
    let out = run_qpnet(&["launch"])?;
    ensure_exit("an unknown subcommand", &out, EXIT_USAGE, &["launch"])?;
    let out = run_qpnet(&[
        "run",
        "--socket",
        "/nonexistent/s",
        "--tap",
        "x",
        "--mac",
        "01:02:03:04:05:06",
    ])?;
    ensure_exit("a multicast MAC", &out, EXIT_USAGE, &["multicast"])?;
    Ok(())
}

/// Errors found while setting up (after the arguments were accepted) exit
/// with 1, say what to do, and leave nothing behind: no runtime directory,
/// no TAP that qpnet created for the attempt, an existing TAP untouched.
/// `qpnet run ... FLAG VALUE` exits 1 saying `needle`, and leaves no TAP,
/// no socket and no runtime directory behind.
fn refused_at_start(ns: &NetNs, flag: &str, value: &str, needle: &str) -> Result<()> {
    let name = unique_name();
    let socket = temp_socket().to_string_lossy().into_owned();
    let what = format!("{flag} {value}");
    let out = run_in(
        ns,
        &[
            "--socket", &socket, "--tap", "qpnew0", "--name", &name, flag, value,
        ],
    )?;
    ensure_exit(&what, &out, EXIT_ERROR, &[needle])?;
    ensure_no_runtime_dir(&what, &name)?;
    let links = ns.ip(&["-o", "link", "show"])?;
    ensure!(
        !links.contains("qpnew0"),
        "{what}: a TAP was created: {links}"
    );
    ensure!(
        !Path::new(&socket).exists(),
        "{what}: the socket was created"
    );
    Ok(())
}

#[test]
fn run_time_errors_exit_1_and_leave_nothing_behind() -> Result<()> {
    let ns = NetNs::new()?;
    // A single-queue TAP: qpnet needs a multi-queue one.
    ns.ip(&["tuntap", "add", "dev", "qpsq0", "mode", "tap"])?;
    // A multi-queue TAP without vnet headers: attaching would switch the
    // device's flag under its other users.
    ns.ip(&[
        "tuntap",
        "add",
        "dev",
        "qpnovh0",
        "mode",
        "tap",
        "multi_queue",
    ])?;
    let novh_flags = || run_checked(ns.command("cat").arg("/sys/class/net/qpnovh0/tun_flags"));
    let novh_before = novh_flags()?;
    let file = std::env::temp_dir().join(unique_name());
    std::fs::write(&file, b"not a socket")?;
    let cases: [(&str, String, &str, &[&str]); 4] = [
        (
            "a socket in a directory that does not exist (TAP created for it)",
            format!("/nonexistent-{}/vhost.sock", unique_name()),
            "qpnew0",
            &["listening on", "No such file or directory"],
        ),
        (
            "a socket path that is a regular file",
            file.to_string_lossy().into_owned(),
            "qpnew0",
            &["is not a socket", "remove it or choose another --socket"],
        ),
        (
            "an existing TAP that is not multi-queue",
            temp_socket().to_string_lossy().into_owned(),
            "qpsq0",
            &["not a multi-queue TAP", "ip tuntap add dev qpsq0"],
        ),
        (
            "an existing multi-queue TAP without vnet headers",
            temp_socket().to_string_lossy().into_owned(),
            "qpnovh0",
            &[
                "not a multi-queue TAP with vnet headers",
                "ip tuntap add dev qpnovh0",
            ],
        ),
    ];
    for (what, socket, tap, needles) in cases {
        let name = unique_name();
        let out = run_in(
            &ns,
            &[
                "--socket",
                &socket,
                "--tap",
                tap,
                "--queue-pairs",
                "2",
                "--name",
                &name,
            ],
        )?;
        ensure_exit(what, &out, EXIT_ERROR, needles)?;
        ensure_no_runtime_dir(what, &name)?;
        let links = ns.ip(&["-o", "link", "show"])?;
        ensure!(
            !links.contains("qpnew0"),
            "{what}: the TAP qpnet created is still there: {links}"
        );
        ensure!(
            links.contains("qpsq0"),
            "{what}: the existing TAP is gone: {links}"
        );
    }
    let novh_after = novh_flags()?;
    ensure!(
        novh_after == novh_before,
        "the TAP without vnet headers was changed: tun_flags {novh_before:?} -> {novh_after:?}"
    );
    // Names that do not exist: refused before anything is made.
    for (flag, value, needle) in [
        ("--worker-user", "qpnet-no-such-user", "no such user"),
        ("--socket-group", "qpnet-no-such-group", "no such group"),
    ] {
        refused_at_start(&ns, flag, value, &format!("{flag} {value}: {needle}"))?;
    }
    ensure!(
        std::fs::read(&file)? == b"not a socket",
        "the regular file at the socket path was changed"
    );
    std::fs::remove_file(&file)?;
    // `qpnet retry` of an instance that does not run: exit 3, saying so.
    let missing = unique_name();
    let out = run_qpnet(&["retry", "--name", &missing])?;
    ensure_exit(
        "qpnet retry of an instance that does not run",
        &out,
        EXIT_NO_INSTANCE,
        &["no qpnet instance", &missing],
    )
}

#[test]
fn running_without_cap_net_admin_is_refused() -> Result<()> {
    let ns = NetNs::new()?;
    ns.add_tap(TAP_NAME, None)?;
    let dir = std::env::temp_dir().join(unique_name());
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
        .args(["--name", &unique_name()]);
    let out = run_bounded(&mut cmd, Duration::from_secs(15));
    let _ = std::fs::remove_dir_all(&dir);
    ensure_exit(
        "running as nobody",
        &out?,
        EXIT_ERROR,
        &["CAP_NET_ADMIN", "root"],
    )
}

#[test]
fn help_exists_for_every_subcommand() -> Result<()> {
    let cases: [(&[&str], &[&str]); 8] = [
        (&["--help"], &["run", "stats", "retry"]),
        (
            &["run", "--help"],
            &[
                "--socket",
                "--tap",
                "--udp",
                "--unix-dgram",
                "--stream",
                "--stream-listen",
                "needs CAP_NET_ADMIN",
                "need no privilege",
                "--queue-pairs",
                "--connect",
                "--name",
            ],
        ),
        (&["stats", "--help"], &["--name", "--json", "--prometheus"]),
        (&["retry", "--help"], &["--name", "--runtime-dir", "retry"]),
        (&["help", "run"], &["--socket", "--connect"]),
        (&["help", "stats"], &["--json"]),
        (&["help", "retry"], &["--name", "failed"]),
        (&["help"], &["run", "stats", "retry"]),
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
    // Both workers past their hello (a worker that just started has no pid
    // in the stats yet).
    let mut doc = bed.qpnet.stats_json(&[])?;
    qpnet_tests::wait::wait_for(
        "both workers in the stats",
        Duration::from_secs(10),
        || match bed.qpnet.stats_json(&[]) {
            Ok(d) => {
                doc = d;
                doc.queues.iter().all(|q| q.worker_pid().is_ok())
            }
            Err(_) => false,
        },
    )
    .with_context(|| format!("stats now: {}", doc.brief()))?;
    ensure!(
        doc.name == bed.qpnet.name() && doc.queues.len() == 2,
        "stats of instance {} with 2 queue pairs: {}",
        bed.qpnet.name(),
        doc.brief()
    );
    for q in &doc.queues {
        q.worker_pid()?;
        for key in ["tx_frames", "rx_frames", "drop_bad_descriptor", "drop_runt"] {
            q.counter(key)?;
        }
    }
    bed.qpnet.stats_ok(&[])?;
    let missing = unique_name();
    let out = run_qpnet(&["stats", "--name", &missing])?;
    ensure_exit(
        "stats of an instance that does not run",
        &out,
        EXIT_NO_INSTANCE,
        &[&missing],
    )?;
    bed.finish()
}

/// `qpnet run` takes exactly one host side: none, two, or a malformed
/// `--udp` / `--unix-dgram` is a usage error that names the options; a unix
/// peer that is not there is refused before anything is served.
#[test]
fn host_side_mistakes_are_refused() -> Result<()> {
    let ns = NetNs::new()?;
    let sock = temp_socket();
    let name = unique_name();
    let base = [
        "--socket",
        sock.to_str().unwrap(),
        "--queue-pairs",
        "1",
        "--name",
        &name,
    ];
    let with = |extra: &[&str]| -> Result<Output> {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        run_in(&ns, &args)
    };
    let out = with(&[])?;
    ensure_exit(
        "no --tap, --udp, --unix-dgram or --stream",
        &out,
        EXIT_USAGE,
        &["--tap", "--udp", "--unix-dgram", "--stream"],
    )?;
    let out = with(&["--tap", TAP_NAME, "--udp", "127.0.0.1:5000,127.0.0.1:6000"])?;
    ensure_exit(
        "--tap and --udp together",
        &out,
        EXIT_USAGE,
        &["--tap", "--udp", "cannot be used with"],
    )?;
    let out = with(&["--tap", TAP_NAME, "--single-peer"])?;
    ensure_exit(
        "--single-peer with a TAP",
        &out,
        EXIT_USAGE,
        &["--single-peer", "--tap", "cannot be used with"],
    )?;
    let out = with(&["--udp", "127.0.0.1:5000"])?;
    ensure_exit(
        "--udp without a remote address",
        &out,
        EXIT_USAGE,
        &["--udp", "LOCAL_IP:PORT,REMOTE_IP:PORT"],
    )?;
    let out = with(&["--udp", "127.0.0.1:5000,[::1]:6000"])?;
    ensure_exit(
        "--udp mixing IPv4 and IPv6",
        &out,
        EXIT_USAGE,
        &["must both be IPv4 or both IPv6"],
    )?;
    let out = with(&["--udp", "localhost:5000,127.0.0.1:6000"])?;
    ensure_exit(
        "--udp with a host name",
        &out,
        EXIT_USAGE,
        &["is not IP:PORT"],
    )?;
    let dir = std::env::temp_dir().join(unique_name());
    std::fs::create_dir_all(&dir)?;
    let spec = format!("{},{}", dir.join("a").display(), dir.join("b").display());
    let out = with(&["--unix-dgram", &spec])?;
    let _ = std::fs::remove_dir_all(&dir);
    ensure_exit(
        "--unix-dgram to a path nobody is bound to",
        &out,
        EXIT_ERROR,
        &["nobody is bound to", "start the peer first"],
    )?;
    for (bad, needle) in [
        ("udp:127.0.0.1:5000", "expected unix:PATH or tcp:HOST:PORT"),
        ("tcp:127.0.0.1", "expected unix:PATH or tcp:HOST:PORT"),
        ("tcp:127.0.0.1:0", "the port must not be 0"),
        ("unix:", "the path is empty"),
    ] {
        let out = with(&["--stream", bad])?;
        ensure_exit(&format!("--stream {bad}"), &out, EXIT_USAGE, &[needle])?;
    }
    let out = with(&["--stream-listen", "--tap", TAP_NAME])?;
    ensure_exit(
        "--stream-listen without --stream",
        &out,
        EXIT_USAGE,
        &["--stream-listen", "--stream"],
    )?;
    let out = with(&["--stream", "unix:/tmp/x", "--single-peer"])?;
    ensure_exit(
        "--single-peer with --stream",
        &out,
        EXIT_USAGE,
        &["--single-peer", "cannot be used with"],
    )?;
    let out = with(&["--tap", TAP_NAME, "--stream", "unix:/tmp/x"])?;
    ensure_exit(
        "--tap and --stream together",
        &out,
        EXIT_USAGE,
        &["cannot be used with"],
    )?;
    // Listening where a file (not a socket) is: refused, the file kept.
    let file = std::env::temp_dir().join(format!("{}.file", unique_name()));
    std::fs::write(&file, b"keep")?;
    let spec = format!("unix:{}", file.display());
    let out = with(&["--stream", &spec, "--stream-listen"])?;
    let kept = std::fs::read(&file).ok();
    let _ = std::fs::remove_file(&file);
    ensure_exit(
        "--stream-listen on a plain file",
        &out,
        EXIT_ERROR,
        &["exists: remove it or choose another --stream path"],
    )?;
    ensure!(
        kept.as_deref() == Some(&b"keep"[..]),
        "the file was touched"
    );
    ensure!(!sock.exists(), "the socket was created anyway");
    ensure_no_runtime_dir("host side mistakes", &name)
}
