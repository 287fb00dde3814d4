//! "Workers are exec'd without any fd but their control socket, and hold
//! only what they are handed" (ARCHITECTURE.md), checked on
//! `/proc/WORKER/fd`.
//!
//! What a worker of queue pair Q may hold, precisely:
//! - 0 `/dev/null`; 1 and 2 the very files of the primary's 1 and 2 (its
//!   log); 3 its control socket, the only socket it holds;
//! - of its own making: exactly one epoll instance;
//! - handed over: exactly one TAP queue (`/dev/net/tun`, of the instance's
//!   TAP), at most one shared region (the instance's `stats.shm`), and with
//!   a VMM connected: exactly the kick and call eventfds of Q's two rings
//!   (recognised by their `eventfd-id`, so another queue pair's eventfds
//!   would show), and at most the VMM's guest memory files (by inode);
//! - nothing else: no listening or VMM socket, no signalfd, no pidfd, no
//!   lock file, no other queue pair's TAP queue or eventfd.
//!
//! Checked before any VMM, with a VMM whose rings run, and for a worker
//! started while the VMM is connected (the replacement of a killed one:
//! the moment the primary holds the most fds a worker could inherit).
//! qpnet is started with a clean fd table (see `qpnet_tests::qpnet`).
//!
//! Needs root and `$QPNET_BIN`.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use qpnet_shared::WorkerState;
use qpnet_tests::proc::{own_dev_ino, own_eventfd_id, FdEntry, ProcHandle};
use qpnet_tests::qpnet::Options;
use qpnet_tests::testbed::{Testbed, TAP_NAME};
use qpnet_tests::vmm::{Vmm, VmmConfig};
use qpnet_tests::wait::poll_until;

const QUEUE_PAIRS: u16 = 2;

/// The running worker of queue pair `qp` (waiting for it to run), pinned.
fn worker(bed: &Testbed, qp: usize) -> Result<ProcHandle> {
    poll_until(
        &format!("a running worker of queue pair {qp}"),
        Duration::from_secs(10),
        Duration::from_millis(5),
        || Ok(try_worker(bed, qp).ok()),
    )
}

/// The worker of queue pair `qp`, from the stats region, pinned.
fn try_worker(bed: &Testbed, qp: usize) -> Result<ProcHandle> {
    let region = bed.qpnet.stats()?;
    let q = region.queue(qp).context("queue stats")?;
    let pid = q.pid.load(Ordering::Acquire);
    ensure!(
        pid != 0 && q.worker_state() == Some(WorkerState::Running),
        "queue pair {qp} has no running worker"
    );
    let w = ProcHandle::of(pid)?;
    ensure!(
        w.ppid() == Some(bed.qpnet.pid()),
        "{pid} is not the primary's child"
    );
    Ok(w)
}

/// Check the fds of `w`, the worker of `qp`, against what it may hold
/// (the module documentation); `vmm` is the connected VMM, if any.
fn check_worker_fds(bed: &Testbed, w: &ProcHandle, qp: usize, vmm: Option<&Vmm>) -> Result<()> {
    let fds = w.fds()?;
    let primary = bed.qpnet.primary().fds()?;
    let primary_of = |n: i32| primary.iter().find(|f| f.fd == n).and_then(|f| f.dev_ino);
    let shm = std::fs::File::open(bed.qpnet.runtime_dir().join("stats.shm"))?;
    let shm = own_dev_ino(&shm)?;
    let (ring_ids, memory): (BTreeSet<u64>, Vec<(u64, u64)>) = match vmm {
        Some(v) => (
            [
                v.rx[qp].queue.kick_fd(),
                v.rx[qp].queue.call_fd(),
                v.tx[qp].queue.kick_fd(),
                v.tx[qp].queue.call_fd(),
            ]
            .into_iter()
            .map(|fd| own_eventfd_id(&fd))
            .collect::<Result<_>>()?,
            v.memory()
                .regions()
                .iter()
                .map(|r| own_dev_ino(r.file()))
                .collect::<Result<_>>()?,
        ),
        None => (BTreeSet::new(), Vec::new()),
    };
    let mut problems = Vec::new();
    let mut epolls = 0;
    let mut taps = 0;
    let mut shms = 0;
    let mut eventfds = BTreeSet::new();
    let mut memfds = 0;
    let describe = |f: &FdEntry| format!("fd {} -> {}", f.fd, f.target);
    for f in &fds {
        match f.fd {
            0 if f.target == "/dev/null" => {}
            1 | 2 if f.dev_ino.is_some() && f.dev_ino == primary_of(f.fd) => {}
            3 if f.target.starts_with("socket:[") => {}
            0..=3 => problems.push(format!("{} (not what fds 0-3 must be)", describe(f))),
            _ if f.target == "anon_inode:[eventpoll]" => epolls += 1,
            _ if f.target == "/dev/net/tun" && f.info_field("iff") == Some(TAP_NAME) => taps += 1,
            _ if f.dev_ino == Some(shm) => shms += 1,
            _ if f.target == "anon_inode:[eventfd]" => {
                match f
                    .info_field("eventfd-id")
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    Some(id) if ring_ids.contains(&id) => {
                        eventfds.insert(id);
                    }
                    _ => problems.push(format!(
                        "{}: an eventfd that is not one of queue pair {qp}'s rings",
                        describe(f)
                    )),
                }
            }
            _ if f.dev_ino.is_some_and(|d| memory.contains(&d)) => memfds += 1,
            _ => problems.push(format!("{}: not handed over", describe(f))),
        }
    }
    if epolls != 1 || taps != 1 || shms > 1 || memfds > memory.len() {
        problems.push(format!(
            "{epolls} epoll fds (1 expected), {taps} TAP queues (1), {shms} shared regions \
             (at most 1), {memfds} guest memory fds (at most {})",
            memory.len()
        ));
    }
    if eventfds != ring_ids {
        problems.push(format!(
            "ring eventfds {eventfds:?}, expected queue pair {qp}'s {ring_ids:?}"
        ));
    }
    let listing: Vec<String> = fds.iter().map(describe).collect();
    println!("worker {} of queue pair {qp}: {listing:?}", w.pid());
    ensure!(
        problems.is_empty(),
        "worker {} of queue pair {qp}: {}; all its fds: {listing:?}",
        w.pid(),
        problems.join("; ")
    );
    Ok(())
}

#[test]
fn workers_hold_only_their_control_socket_and_what_they_were_handed() -> Result<()> {
    let mut bed = Testbed::new(QUEUE_PAIRS)?;
    bed.qpnet
        .wait_workers(usize::from(QUEUE_PAIRS), Duration::from_secs(10))?;
    for qp in 0..usize::from(QUEUE_PAIRS) {
        check_worker_fds(&bed, &worker(&bed, qp)?, qp, None).context("before any VMM")?;
    }
    let mut vmm = bed.vmm(VmmConfig {
        queue_pairs: QUEUE_PAIRS,
        ..VmmConfig::default()
    })?;
    bed.tx_round(&mut vmm, 200)?;
    for qp in 0..usize::from(QUEUE_PAIRS) {
        check_worker_fds(&bed, &worker(&bed, qp)?, qp, Some(&vmm))
            .context("with a VMM whose rings run")?;
    }
    // A worker started while the primary holds the VMM's socket, memory
    // and eventfds: its replacement after a kill.
    let old = worker(&bed, 1)?;
    old.signal(Signal::SIGKILL)?;
    let new = poll_until(
        "queue pair 1's worker to be replaced",
        Duration::from_secs(10),
        Duration::from_millis(5),
        || Ok(try_worker(&bed, 1).ok().filter(|w| w.pid() != old.pid())),
    )?;
    bed.frames_through(&mut vmm, &[1], 1000..1200)?;
    check_worker_fds(&bed, &new, 1, Some(&vmm)).context("a worker started with a VMM connected")?;
    drop(vmm);
    bed.finish()
}

/// An fd that qpnet itself inherited without close-on-exec must not reach
/// its workers either: "exec'd without any fd but their control socket".
#[test]
fn workers_do_not_inherit_fds_qpnet_inherited() -> Result<()> {
    let (read_end, _write_end) = nix::unistd::pipe()?;
    // A high number, so it cannot be mistaken for anything qpnet opens.
    // SAFETY: dup2 onto a number this process does not use; we own the
    // result.
    let stray = unsafe { libc::dup2(read_end.as_raw_fd(), 200) };
    ensure!(stray == 200, "dup2 failed");
    // SAFETY: fd 200 was just created by dup2 and nothing else owns it.
    let _stray = unsafe { OwnedFd::from_raw_fd(stray) };
    let mut bed = Testbed::with_options(
        QUEUE_PAIRS,
        &Options {
            inherit_fd: Some(stray),
            ..Options::default()
        },
    )?;
    bed.qpnet
        .wait_workers(usize::from(QUEUE_PAIRS), Duration::from_secs(10))?;
    ensure!(
        bed.qpnet.primary().fds()?.iter().any(|f| f.fd == stray),
        "qpnet did not inherit fd {stray}: the test set-up is wrong"
    );
    for qp in 0..usize::from(QUEUE_PAIRS) {
        let w = worker(&bed, qp)?;
        let leaked: Vec<String> = w
            .fds()?
            .iter()
            .filter(|f| f.fd == stray)
            .map(|f| f.target.clone())
            .collect();
        ensure!(
            leaked.is_empty(),
            "worker {} of queue pair {qp} holds fd {stray} ({leaked:?}), which qpnet inherited",
            w.pid()
        );
    }
    bed.finish()
}
