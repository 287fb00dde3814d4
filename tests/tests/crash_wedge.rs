//! Crash isolation, SIGSTOP: a wedged worker (stopped while its queue pair
//! has work) is found by the watchdog and replaced within 2 s while the
//! other queue pairs go on under load; a stopped worker with nothing to do
//! is left alone and forwards again once continued (see
//! `qpnet_tests::crash`).
//!
//! Timing-sensitive: every test takes the timing lock. Needs root and
//! `$QPNET_BIN`.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use nix::sys::signal::Signal;
use qpnet_shared::QueueStats;
use qpnet_tests::crash::bed::{
    crash_bed, running_worker, serial, signal_pid, under_load, vmm_config, wait_all_flowing,
    wait_replaced, worker_of, QPS,
};
use qpnet_tests::crash::verdict::{check_kills, report, KILL_WINDOW_NS, WEDGED_LIMIT_NS};
use qpnet_tests::crash::{monotonic_ns, ms};
use qpnet_tests::wait::wait_for;

/// Issue acceptance 3: a worker stopped while its TX ring has traffic is
/// found by the watchdog and replaced within 2 s; the others go on.
#[test]
fn a_wedged_worker_with_work_is_replaced_within_two_seconds() -> Result<()> {
    let _serial = serial();
    let mut bed = crash_bed(&[])?;
    // The others are held to their stall limit for 100 ms after the SIGSTOP
    // and around the watchdog's kill and the replacement.
    let (kills, _records, a) = under_load(&mut bed, KILL_WINDOW_NS, |bed, view| {
        wait_all_flowing(view)?;
        std::thread::sleep(Duration::from_millis(300));
        let worker = running_worker(bed, 1)?;
        let mut ev = signal_pid(view, 1, &worker, Signal::SIGSTOP)?;
        let r = wait_replaced(bed, 1, ev.pid, Duration::from_secs(5));
        if r.is_err() {
            let _ = worker.signal(Signal::SIGKILL);
        }
        ev.replaced_ns = Some(r?.1);
        wait_for(
            &format!("the wedged worker {} to be killed", ev.pid),
            Duration::from_secs(2),
            || worker.has_exited(),
        )?;
        wait_all_flowing(view)?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(vec![ev])
    })?;
    report("one SIGSTOP under load (watchdog 1 s)", &a, &kills);
    let o = &a.kills[0];
    let replaced = o.replaced_ns.unwrap_or(u64::MAX);
    ensure!(
        replaced <= WEDGED_LIMIT_NS,
        "the wedged worker was replaced after {} ms (limit 2000 ms)",
        ms(replaced)
    );
    check_kills(&a, &kills, WEDGED_LIMIT_NS)?;
    ensure!(
        bed.qpnet.stderr().contains("wedged"),
        "qpnet did not log the worker as wedged"
    );
    bed.qpnet
        .wait_workers(usize::from(QPS), Duration::from_secs(5))?;
    bed.finish()
}

/// Issue acceptance 3, second half: a stopped worker with nothing to do is
/// not killed; once continued it forwards again.
#[test]
fn a_stopped_worker_without_work_is_left_alone() -> Result<()> {
    let _serial = serial();
    let mut bed = crash_bed(&[])?;
    let mut vmm = bed.vmm(vmm_config())?;
    let all: Vec<usize> = (0..usize::from(QPS)).collect();
    bed.frames_through(&mut vmm, &all, 0..500)?;
    ensure!(vmm.tx.iter().all(|t| t.in_flight() == 0), "TX not idle");
    let worker = running_worker(&bed, 2)?;
    let pid = worker.pid();
    let (_, _, restarts) = worker_of(&bed, 2)?;
    worker.signal(Signal::SIGSTOP)?;
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    let state = worker.state();
    let (now_pid, now_state, now_restarts) = worker_of(&bed, 2)?;
    worker.signal(Signal::SIGCONT)?;
    ensure!(
        state == Some('T') && now_pid == pid && now_restarts == restarts,
        "after {:?} stopped with no work: process state {state:?}, stats pid {now_pid} \
         (was {pid}), state {now_state:?}, restarts {now_restarts} (was {restarts})",
        stopped.elapsed()
    );
    // Continued: its heartbeat is fresh again before the guest sends more.
    wait_for(
        "the continued worker's heartbeat",
        Duration::from_secs(2),
        || {
            bed.qpnet.stats().is_ok_and(|s| {
                s.queue(2).is_some_and(|q| {
                    monotonic_ns().saturating_sub(QueueStats::get(&q.heartbeat_ns)) < 200_000_000
                })
            })
        },
    )?;
    bed.frames_through(&mut vmm, &all, 1000..1500)?;
    let now = running_worker(&bed, 2)?;
    ensure!(
        now.pid() == pid && now.start_ticks() == worker.start_ticks(),
        "the continued worker was replaced"
    );
    bed.finish()
}
