//! Crash isolation, crash loops: a worker that crashes at every start marks
//! its queue pair failed while the others keep forwarding (`qpnet retry`
//! and a VMM reconnection try it again); a worker killed in a loop under
//! load is failed after the crash limit and `qpnet retry` brings it back
//! where its rings stopped; a worker killed again and again while the
//! primary hands it its rings leaves no ring behind (see
//! `qpnet_tests::crash`).
//!
//! Timing-sensitive: every test takes the timing lock. Needs root and
//! `$QPNET_BIN`.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use qpnet_shared::WorkerState;
use qpnet_tests::binary::run_qpnet;
use qpnet_tests::crash::bed::{
    crash_bed, crash_bed_with, running_worker, serial, signal_pid, signal_worker, under_load,
    vmm_config, wait_all_flowing, wait_failed, wait_replaced, worker_of, DEFAULT_CRASH_LIMIT,
};
use qpnet_tests::crash::verdict::{
    a_subset, check_kills, check_others, report, KILL_WINDOW_NS, RECOVERY_LIMIT_NS,
};
use qpnet_tests::proc::ProcHandle;
use qpnet_tests::qpnet::Options;
use qpnet_tests::wait::wait_for;

/// Issue acceptance 6: a crash loop from the start marks its queue pair
/// failed; `qpnet retry` and a VMM (re)connection try again; a VMM can
/// connect and the other queue pairs forward.
#[test]
fn a_crash_loop_at_start_fails_its_queue_pair_and_the_others_keep_forwarding() -> Result<()> {
    let _serial = serial();
    // The variable is set for qpnet alone (its workers inherit it).
    let mut bed = crash_bed_with(
        &Options::default().with_env("QPNET_TEST_WORKER_FAULT", "crash-on-start:1"),
    )?;
    // K = crash limit + 1: the worker was started K times and died K times.
    let k = DEFAULT_CRASH_LIMIT + 1;
    let first = wait_failed(&bed, 1, k)?;
    ensure!(
        first == k,
        "queue pair 1 failed after {first} restarts, {k} expected"
    );
    // Each failed start says how the worker ended (it aborted).
    let log = bed.qpnet.stderr();
    let starts = log
        .lines()
        .filter(|l| l.contains("queue pair 1: worker") && l.contains("could not start"))
        .count();
    let told = log
        .lines()
        .filter(|l| l.contains("could not start") && l.contains("the worker was killed by SIGABRT"))
        .count();
    ensure!(
        starts > 0 && told == starts,
        "{told} of {starts} failed starts say the worker was killed by SIGABRT:\n{log}"
    );
    let doc = bed.qpnet.stats_json(&[])?;
    for q in [0, 2, 3] {
        let s = doc.queue(q)?;
        ensure!(
            s.state == "running" && s.restarts == 0,
            "queue pair {q}: {}, {} restarts",
            s.state,
            s.restarts
        );
    }
    let out = run_qpnet(&["retry", "--name", bed.qpnet.name()])?;
    ensure!(
        out.status.success(),
        "qpnet retry failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after_retry = wait_failed(&bed, 1, first + k)?;
    eprintln!("qpnet retry: restarts {first} -> {after_retry}");
    let others = [0usize, 2, 3];
    let first_vmm = bed.vmm(vmm_config()).and_then(|mut vmm| {
        bed.frames_through(&mut vmm, &others, 0..500)?;
        Ok(vmm)
    });
    let connected = first_vmm.map(drop);
    // That VMM is gone (it left, or qpnet refused it): the next VMM gets a
    // fresh try at queue pair 1.
    let after_reconnect = wait_failed(&bed, 1, after_retry + k)?;
    eprintln!("VMM reconnect: restarts {after_retry} -> {after_reconnect}");
    connected.context("a VMM must be able to connect while queue pair 1 is failed")?;
    let mut vmm = bed
        .vmm(vmm_config())
        .context("a VMM must be able to reconnect while queue pair 1 is failed")?;
    bed.frames_through(&mut vmm, &others, 1000..1500)?;
    bed.finish()
}

/// Issue acceptance 6 with a VMM attached: queue pair 1's worker killed in
/// a loop (6 deaths within the 10 s window, default limit 5) is marked
/// failed while the other three keep forwarding under load; `qpnet retry`
/// starts it again and its rings resume where they stopped.
#[test]
fn a_queue_pair_killed_in_a_loop_is_failed_and_retry_brings_it_back() -> Result<()> {
    let _serial = serial();
    let mut bed = crash_bed(&[])?;
    let k = DEFAULT_CRASH_LIMIT + 1;
    let (kills, _records, a) = under_load(&mut bed, KILL_WINDOW_NS, |bed, view| {
        wait_all_flowing(view)?;
        let mut events = Vec::new();
        for i in 0..k {
            let mut ev = signal_worker(bed, view, 1, Signal::SIGKILL)?;
            if i + 1 < k {
                ev.replaced_ns = Some(wait_replaced(bed, 1, ev.pid, Duration::from_secs(5))?.1);
                // Killed again only once it runs its rings (see
                // a_worker_killed_while_taking_over_its_rings_leaves_no_ring_behind).
                view.wait_flowing(&[1], 5, Duration::from_secs(5))?;
            }
            events.push(ev);
        }
        let restarts = wait_failed(bed, 1, k)?;
        ensure!(
            restarts == k,
            "failed after {restarts} restarts, {k} expected"
        );
        // Failed, and the others go on.
        view.wait_flowing(&[0, 2, 3], 500, Duration::from_secs(15))?;
        let out = run_qpnet(&["retry", "--name", bed.qpnet.name()])?;
        ensure!(
            out.status.success(),
            "qpnet retry failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let last = events.last_mut().context("no kill")?;
        last.replaced_ns = Some(wait_replaced(bed, 1, last.pid, Duration::from_secs(5))?.1);
        wait_all_flowing(view)?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(events)
    })?;
    report(
        "queue pair 1 killed into failure, then qpnet retry",
        &a,
        &kills,
    );
    let (looped, last) = kills.split_at(kills.len() - 1);
    let last_outcome = &a.kills[looped.len()..];
    check_kills(&a_subset(&a, 0..looped.len()), looped, RECOVERY_LIMIT_NS)?;
    ensure!(
        last_outcome[0].recovery_ns.is_some(),
        "queue pair 1 never forwarded again after qpnet retry ({:?})",
        last[0]
    );
    // The others, when queue pair 1 failed and when it came back: the same
    // stall rule as for every kill.
    check_others(&a_subset(&a, looped.len()..kills.len()), last)
        .context("the other queue pairs when queue pair 1 failed")?;
    let (_, state, restarts) = worker_of(&bed, 1)?;
    ensure!(
        state == Some(WorkerState::Running) && restarts == k,
        "after retry: state {state:?}, restarts {restarts}"
    );
    bed.finish()
}

/// A worker killed right after it is started, while the primary hands it
/// its rings, again and again until the primary backs off: every ring must
/// still reach a later worker. (A ring whose StartRing was cut by the death
/// must stay owed to the next worker, also when that one starts only after
/// a back-off.)
#[test]
fn a_worker_killed_while_taking_over_its_rings_leaves_no_ring_behind() -> Result<()> {
    let _serial = serial();
    let mut bed = crash_bed(&["--crash-limit", "0"])?;
    let r = under_load(&mut bed, KILL_WINDOW_NS, |bed, view| {
        wait_all_flowing(view)?;
        let mut events = Vec::new();
        let mut worker = running_worker(bed, 1)?;
        for _ in 0..12 {
            // No check between seeing the pid and the kill (only pinning
            // it): the kill should land while the primary is still handing
            // over the rings.
            let mut ev = signal_pid(view, 1, &worker, Signal::SIGKILL)?;
            // The back-off grows to 1 s: wait long enough.
            let (new_pid, seen) = wait_replaced(bed, 1, worker.pid(), Duration::from_secs(5))?;
            ev.replaced_ns = Some(seen);
            events.push(ev);
            worker = ProcHandle::of(new_pid)?;
        }
        let rx_before = view.rx_received(1);
        view.wait_flowing(&[1], 200, Duration::from_secs(5))
            .context("queue pair 1's TX ring was not resumed after the kills")?;
        wait_for("RX frames on queue pair 1", Duration::from_secs(5), || {
            view.rx_received(1) >= rx_before + 20
        })
        .context("queue pair 1's RX ring was not resumed after the kills")?;
        wait_all_flowing(view)?;
        Ok(events)
    });
    let (kills, _records, a) = r?;
    report("queue pair 1 killed during ring hand-over", &a, &kills);
    ensure!(
        a.problems.is_empty(),
        "broken invariants: {:#?}",
        a.problems
    );
    ensure!(
        a.kills.iter().all(|k| k.recovery_ns.is_some()),
        "queue pair 1 stopped forwarding after a kill"
    );
    bed.finish()
}

/// A failed queue pair's TAP queue is taken out of the TAP's choice: frames
/// for the guest of every flow reach it through the queue pairs that are
/// served, none is left in a queue nobody reads; `qpnet retry` puts the
/// queue back (and the crash loop takes it out again).
#[test]
fn a_failed_queue_pairs_flows_reach_the_guest_through_the_others() -> Result<()> {
    let _serial = serial();
    let mut bed = crash_bed_with(
        &Options::default().with_env("QPNET_TEST_WORKER_FAULT", "crash-on-start:1"),
    )?;
    let k = DEFAULT_CRASH_LIMIT + 1;
    let first = wait_failed(&bed, 1, k)?;
    let out = run_qpnet(&["retry", "--name", bed.qpnet.name()])?;
    ensure!(out.status.success(), "qpnet retry failed");
    wait_failed(&bed, 1, first + k)?;
    let log = bed.qpnet.stderr();
    ensure!(
        log.contains("queue pair 1: its TAP queue is out of the TAP's choice")
            && log.contains("queue pair 1: its TAP queue is in the TAP's choice again"),
        "the TAP queue of queue pair 1 was not taken out and put back:\n{log}"
    );
    let mut vmm = bed.vmm(vmm_config())?;
    // 256 flows: the TAP would hash about a quarter of them to queue pair 1.
    let report = bed.rx_round(&mut vmm, 2048, 256, |_| 200)?;
    ensure!(
        report.per_queue[1] == 0,
        "frames reached the failed queue pair: {report:?}"
    );
    eprintln!(
        "RX per queue pair with queue pair 1 failed: {:?}",
        report.per_queue
    );
    bed.finish()
}
