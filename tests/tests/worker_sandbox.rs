//! Workers give up their privileges before they read anything the guest
//! wrote: started by a root qpnet they run as `nobody` (or
//! `--worker-user`), with no capability in any set (the bounding set
//! emptied) and no_new_privs, and they still move frames; a replacement
//! worker is sandboxed the same way. The primary itself keeps only the
//! capabilities it needs to start and signal them.
//!
//! Needs root and `$QPNET_BIN`.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use qpnet_shared::WorkerState;
use qpnet_tests::crash::bed::worker_of;
use qpnet_tests::proc::ProcHandle;
use qpnet_tests::qpnet::Options;
use qpnet_tests::testbed::Testbed;
use qpnet_tests::traffic::{tx_round, Strays};
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

/// The primary, once set up, holds exactly `PRIMARY_CAPABILITIES`.
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
    Ok(())
}

/// Every worker of `bed` sandboxed as `(uid, gid)`, and frames flow.
fn check_bed(bed: &mut Testbed, (uid, gid): (u32, u32)) -> Result<()> {
    let pids = ready_workers(bed, &[])?;
    check_primary(bed.qpnet.pid())?;
    for &pid in &pids {
        check_sandboxed(pid, uid, gid)?;
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
