//! Workers give up their privileges before they read anything the guest
//! wrote: started by a root qpnet they run as `nobody` (or
//! `--worker-user`), with no capability in any set (the bounding set
//! emptied), no_new_privs, a seccomp filter, namespaces of their own (a
//! network namespace with only a loopback) and no file (Landlock), and
//! they still move frames; a replacement worker is sandboxed the same
//! way. The primary itself keeps only the
//! capabilities it needs to start and signal them.
//!
//! Needs root and `$QPNET_BIN`.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use qpnet_shared::WorkerState;
use qpnet_tests::crash::bed::worker_of;
use qpnet_tests::frames::mixed_len;
use qpnet_tests::proc::ProcHandle;
use qpnet_tests::qpnet::Options;
use qpnet_tests::testbed::Testbed;
use qpnet_tests::traffic::{rx_traffic, tx_frame, tx_round, Strays};
use qpnet_tests::vmm::VmmConfig;
use qpnet_tests::wait::wait_for;

const TIMEOUT: Duration = Duration::from_secs(10);

/// The fields of `/proc/PID/status` a sandboxed worker must show.
fn check_sandboxed(pid: u32, uid: u32, gid: u32) -> Result<()> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let v = field(cap)?;
        ensure!(
            v.chars().all(|c| c == '0'),
            "worker {pid}: {cap} is {v}, not empty"
        );
    }
    ensure!(
        field("NoNewPrivs")? == "1",
        "worker {pid}: NoNewPrivs is not set"
    );
    ensure!(
        // The primary's filter, inherited through exec, and its own.
        field("Seccomp")? == "2" && field("Seccomp_filters")? == "2",
        "worker {pid}: Seccomp {} with {} filter(s), want 2 (filter mode) with 2",
        field("Seccomp")?,
        field("Seccomp_filters")?
    );
    let all = |id: u32| format!("{id} {id} {id} {id}");
    ensure!(
        field("Uid")? == all(uid),
        "worker {pid}: Uid {} (want {uid} everywhere)",
        field("Uid")?
    );
    ensure!(
        field("Gid")? == all(gid),
        "worker {pid}: Gid {} (want {gid} everywhere)",
        field("Gid")?
    );
    ensure!(
        field("Groups")?.is_empty(),
        "worker {pid}: supplementary groups {}",
        field("Groups")?
    );
    Ok(())
}

/// The worker's user, network, IPC and UTS namespaces are its own (its
/// network namespace has no interface but `lo`), and its files are closed:
/// by Landlock, as its log says (`landlock.rs`'s unit test shows what that
/// denies), or where the kernel has none by an empty root.
fn check_isolated(pid: u32, primary: u32, log: &str) -> Result<()> {
    let link = |p: u32, ns: &str| {
        std::fs::read_link(format!("/proc/{p}/ns/{ns}"))
            .with_context(|| format!("reading /proc/{p}/ns/{ns}"))
    };
    for ns in ["user", "net", "ipc", "uts"] {
        let (w, p) = (link(pid, ns)?, link(primary, ns)?);
        ensure!(
            w != p,
            "worker {pid} shares the primary's {ns} namespace ({w:?})"
        );
    }
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .with_context(|| format!("reading /proc/{pid}/net/dev"))?;
    let ifaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    ensure!(
        ifaces == ["lo"],
        "worker {pid}: its network namespace has {ifaces:?}, want only lo"
    );
    let said = format!("worker {pid} sandboxed: ");
    let line = log
        .lines()
        .find(|l| l.contains(&said))
        .with_context(|| format!("no {said:?} line in the log"))?;
    if line.contains("files closed by Landlock") {
        return Ok(());
    }
    ensure!(
        line.contains("files closed by an empty root"),
        "worker {pid}: its files are not closed: {line}"
    );
    ensure!(
        link(pid, "mnt")? != link(primary, "mnt")?,
        "worker {pid} shares the primary's mount namespace"
    );
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .with_context(|| format!("listing /proc/{pid}/root"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    ensure!(
        root.is_empty(),
        "worker {pid}: its root directory holds {root:?}"
    );
    Ok(())
}

fn user(name: &str) -> Result<(u32, u32)> {
    let u = nix::unistd::User::from_name(name)?.with_context(|| {
        format!("this machine has no user {name:?} (Debian has nobody and daemon)")
    })?;
    Ok((u.uid.as_raw(), u.gid.as_raw()))
}

/// The pids of both workers once each has answered the primary's hello
/// (stats state `running`): a worker gives up its privileges before it
/// reads its control socket, so from then on it must be sandboxed.
fn ready_workers(bed: &Testbed, not: &[u32]) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    wait_for("both workers running", TIMEOUT, || {
        pids = (0..2)
            .filter_map(|q| worker_of(bed, q).ok())
            .filter(|(pid, state, _)| *pid != 0 && *state == Some(WorkerState::Running))
            .map(|(pid, _, _)| pid)
            .filter(|pid| !not.contains(pid))
            .collect();
        pids.len() == 2
    })?;
    Ok(pids)
}

/// The primary, once set up, holds exactly `PRIMARY_CAPABILITIES` and
/// runs under a seccomp filter.
fn check_primary(pid: u32) -> Result<()> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let want = format!("{:016x}", qpnet_secondary::PRIMARY_CAPABILITIES);
    for cap in ["CapPrm", "CapEff", "CapBnd"] {
        let v = status
            .lines()
            .find_map(|l| l.strip_prefix(cap)?.strip_prefix(':'))
            .map(str::trim)
            .with_context(|| format!("no {cap} in the primary's status"))?;
        ensure!(v == want, "primary {pid}: {cap} {v}, expected {want}");
    }
    let seccomp = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(str::trim);
    ensure!(
        seccomp == Some("2"),
        "primary {pid}: Seccomp {seccomp:?}, want 2 (its own filter)"
    );
    Ok(())
}

/// Every worker of `bed` sandboxed as `(uid, gid)`, and frames flow.
fn check_bed(bed: &mut Testbed, (uid, gid): (u32, u32)) -> Result<()> {
    let pids = ready_workers(bed, &[])?;
    check_primary(bed.qpnet.pid())?;
    for &pid in &pids {
        check_sandboxed(pid, uid, gid)?;
        check_isolated(pid, bed.qpnet.pid(), &bed.qpnet.stderr())?;
    }
    let mut vmm = bed.vmm(VmmConfig {
        queue_pairs: 2,
        ..VmmConfig::default()
    })?;
    tx_round(&mut vmm, &bed.tap, &[0, 1], 0..20, Strays::Refused, TIMEOUT)?;
    // A replacement is sandboxed too, and takes over the rings.
    let old = ProcHandle::of(pids[0])?;
    old.signal(Signal::SIGKILL)?;
    for pid in ready_workers(bed, &pids[..1])? {
        check_sandboxed(pid, uid, gid)?;
        check_isolated(pid, bed.qpnet.pid(), &bed.qpnet.stderr())?;
    }
    tx_round(
        &mut vmm,
        &bed.tap,
        &[0, 1],
        20..40,
        Strays::Ignored,
        TIMEOUT,
    )?;
    drop(vmm);
    Ok(())
}

#[test]
fn workers_of_a_root_qpnet_run_as_nobody_without_capabilities() -> Result<()> {
    let mut bed = Testbed::new(2)?;
    let r = check_bed(&mut bed, user("nobody")?);
    bed.explain(r)?;
    bed.finish()
}

#[test]
fn worker_user_names_the_workers_user() -> Result<()> {
    let mut bed = Testbed::with_options(2, &Options::args(&["--worker-user", "daemon"]))?;
    let r = check_bed(&mut bed, user("daemon")?);
    bed.explain(r)?;
    bed.finish()
}

/// A worker that makes a call outside its seccomp allow-list (the
/// test-only hook `forbidden-call-once`, at its first TX kick) is killed by
/// the kernel; the primary logs the call by number and name, and replaces
/// the worker like any crashed one; the replacement is sandboxed and
/// takes over both rings.
#[test]
fn a_forbidden_system_call_kills_the_worker_which_is_logged_and_replaced() -> Result<()> {
    let dir = tempfile_dir("forbidden-call")?;
    let marker = dir.join("armed");
    let spec = format!("forbidden-call-once:1:{}", marker.display());
    let mut bed = Testbed::with_options(
        2,
        &Options::default().with_env("QPNET_TEST_WORKER_FAULT", &spec),
    )?;
    let r = forbidden_call(&mut bed, &marker);
    let _ = std::fs::remove_dir_all(&dir);
    bed.explain(r)?;
    bed.finish()
}

fn forbidden_call(bed: &mut Testbed, marker: &std::path::Path) -> Result<()> {
    let pids = ready_workers(bed, &[])?;
    ensure!(
        marker.exists(),
        "no worker armed the hook ({} missing)",
        marker.display()
    );
    let (first, _, _) = worker_of(bed, 1)?;
    let mut vmm = bed.vmm(VmmConfig {
        queue_pairs: 2,
        ..VmmConfig::default()
    })?;
    tx_round(&mut vmm, &bed.tap, &[0], 0..20, Strays::Refused, TIMEOUT)?;
    // The kick that fires the hook; the frame waits for the replacement.
    ensure!(vmm.tx[1].try_push(&tx_frame(1, 0))?, "TX ring 1 full");
    vmm.tx[1].flush();
    let line = format!(
        "its seccomp filter refused system call {} (socket)",
        libc::SYS_socket
    );
    wait_for("the seccomp kill in the primary's log", TIMEOUT, || {
        bed.qpnet.stderr().contains(&line)
    })
    .with_context(|| format!("primary's log:\n{}", bed.qpnet.stderr()))?;
    let log = bed.qpnet.stderr();
    let killed = log
        .lines()
        .find(|l| l.contains(&line))
        .context("the kill's log line")?;
    ensure!(
        killed.contains(&first.to_string()) && killed.contains("SIGSYS"),
        "the kill's line names neither worker {first} nor SIGSYS: {killed}"
    );
    let now = ready_workers(bed, &[first])?;
    ensure!(
        now.len() == 2 && !now.contains(&first),
        "worker {first} not replaced: {now:?}"
    );
    for &pid in &now {
        check_sandboxed(pid, user("nobody")?.0, user("nobody")?.1)?;
        check_isolated(pid, bed.qpnet.pid(), &bed.qpnet.stderr())?;
    }
    ensure!(
        pids.contains(&now[0]) || pids.contains(&now[1]),
        "qp0's worker was replaced too"
    );
    // Both rings of queue pair 1 resumed: TX (the frame that fired the
    // hook, then a round) and RX.
    tx_round(&mut vmm, &bed.tap, &[0, 1], 1..41, Strays::Ignored, TIMEOUT)?;
    let rx = rx_traffic(&mut vmm, &bed.tap, 400, 16, mixed_len, TIMEOUT)?;
    ensure!(
        rx.per_queue.get(1).copied().unwrap_or(0) > 0,
        "no RX on queue pair 1: {rx:?}"
    );
    drop(vmm);
    Ok(())
}

/// A fresh directory of this test's own under the system's temporary one.
fn tempfile_dir(name: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("qpnet-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
