//! Crash isolation: workers killed (SIGKILL) or wedged (SIGSTOP) from
//! outside while a test VMM keeps all four queue pairs busy.
//!
//! Every scenario runs [`run_load`]: paced, sequence-numbered TX frames on
//! all four TX queues (arrivals stamped by the kernel on the TAP), paced
//! UDP frames into the TAP for the four RX queues, and a controller that
//! sends real signals to worker pids with kill(2). The [`analyze`] verdict
//! then holds each kill to the acceptance: its queue pair forwards
//! again within 100 ms, the other three never stall for more than 10 ms,
//! no descriptor leaks, no corruption, and the only frames duplicated (TX)
//! or lost (RX) are those in flight at the kill.
//!
//! Timing-sensitive: the tests of this binary run one at a time (a static
//! lock). Needs root and the release binary (`cargo build --release -p
//! qpnet-primary`). `recovery_benchmark` (ignored) prints the recovery-time
//! distribution over 1,000 kills without timing assertions.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use qpnet_shared::{QueueStats, WorkerState};
use qpnet_tests::crash_traffic::{
    analyze, monotonic_ns, ms, realtime_ns, run_load, runq_wait_ns, summarize, unwrap_index,
    Analysis, KillEvent, KillOutcome, LoadConfig, LoadView, Records, StampedTap,
};
use qpnet_tests::qpnet::{parent_of, run_qpnet};
use qpnet_tests::testbed::{Testbed, TAP_NAME};
use qpnet_tests::traffic::{send_tx, TapCollector};
use qpnet_tests::vmm::{Vmm, VmmConfig};
use qpnet_tests::wait::{poll_until, wait_for};

/// Queue pairs of every scenario.
const QPS: u16 = 4;
/// The limit from a kill to the queue pair forwarding again.
const RECOVERY_LIMIT_NS: u64 = 100_000_000;
/// The limit on a stall of the queue pairs not killed.
const OTHERS_STALL_LIMIT_NS: u64 = 10_000_000;
/// The limit for replacing a wedged worker (watchdog 1 s).
const WEDGED_LIMIT_NS: u64 = 2_000_000_000;
/// How long after a kill the other queue pairs are watched.
const KILL_WINDOW_NS: u64 = 100_000_000;
/// RX frames a dead worker can have read and not yet published: qpnet
/// publishes the used index after the frame that brings 64 completed chains
/// (ring.rs PUBLISH_EVERY), so at most 63 completed frames + 1 being read.
const RX_IN_FLIGHT_MAX: u64 = 64;
/// A worker killed sooner than this after its start is a quick crash for
/// the primary (supervisor.rs QUICK_LIFETIME is 1 s; margin added).
const QUICK_LIFETIME: Duration = Duration::from_millis(1100);
/// Consecutive quick crashes the primary restarts without back-off.
const QUICK_CRASHES_BEFORE_BACKOFF: u32 = 3;
/// `qpnet run`'s default --crash-limit.
const DEFAULT_CRASH_LIMIT: u64 = 5;

static SERIAL: Mutex<()> = Mutex::new(());

/// One scenario at a time: they measure milliseconds.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A testbed of four queue pairs whose TAP queues can hold the RX frames
/// of a worker that is down for a while (default 500 per queue).
fn crash_bed(extra: &[&str]) -> Result<Testbed> {
    let bed = Testbed::with_args(QPS, extra)?;
    bed.ns
        .ip(&["link", "set", "dev", TAP_NAME, "txqueuelen", "20000"])?;
    Ok(bed)
}

fn vmm_config() -> VmmConfig {
    VmmConfig {
        queue_pairs: QPS,
        event_idx: true,
        rx_buf_size: 2048,
        ..VmmConfig::default()
    }
}

/// Small deterministic PRNG (xorshift64*), seeded from QPNET_CRASH_SEED or
/// the clock; the seed is printed so a run can be replayed.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("QPNET_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| realtime_ns() | 1);
        eprintln!("kill schedule seed: QPNET_CRASH_SEED={seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ---- workers -------------------------------------------------------------

/// The worker pid and state of queue pair `q`, from the shared region.
fn worker_of(bed: &Testbed, q: usize) -> Result<(u32, Option<WorkerState>, u64)> {
    let stats = bed.qpnet.stats()?;
    let s = stats.queue(q).context("queue stats")?;
    Ok((
        s.pid.load(Ordering::Relaxed),
        s.worker_state(),
        QueueStats::get(&s.restarts),
    ))
}

/// The running worker of `q` (a child of the primary).
fn running_worker(bed: &Testbed, q: usize) -> Result<u32> {
    let (pid, state, _) = worker_of(bed, q)?;
    ensure!(
        pid != 0 && state == Some(WorkerState::Running),
        "queue pair {q} has no running worker (pid {pid}, state {state:?})"
    );
    ensure!(
        parent_of(pid) == Some(bed.qpnet.pid()),
        "pid {pid} of queue pair {q} is not a child of the primary {}",
        bed.qpnet.pid()
    );
    Ok(pid)
}

/// Wait for a running worker of `q` other than `old`; returns it and when it
/// was seen (realtime ns).
fn wait_replaced(bed: &Testbed, q: usize, old: u32, timeout: Duration) -> Result<(u32, u64)> {
    let stats = bed.qpnet.stats()?;
    let s = stats.queue(q).context("queue stats")?;
    let r = poll_until(
        &format!("a new worker for queue pair {q} (old pid {old})"),
        timeout,
        Duration::from_micros(100),
        || {
            let pid = s.pid.load(Ordering::Acquire);
            let running = s.worker_state() == Some(WorkerState::Running);
            Ok((pid != 0 && pid != old && running).then(|| (pid, realtime_ns())))
        },
    );
    r.with_context(|| {
        format!(
            "qpnet stderr:\n{}",
            qpnet_tests::testbed::tail(&bed.qpnet.stderr(), 30)
        )
    })
}

/// The state letter of /proc/PID/stat (`None`: no such process).
fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..].chars().next()
}

/// Send `sig` to the worker of `q` with kill(2) and note the TX ring
/// around it: the used index just before, the avail index once the signal
/// took effect (dead, or stopped).
fn signal_worker(bed: &Testbed, view: &LoadView<'_>, q: usize, sig: Signal) -> Result<KillEvent> {
    let pid = running_worker(bed, q)?;
    signal_pid(view, q, pid, sig)
}

/// [`signal_worker`] for a known pid, without checking it first.
fn signal_pid(view: &LoadView<'_>, q: usize, pid: u32, sig: Signal) -> Result<KillEvent> {
    let ring = view.tx_ring(q);
    let used = ring.used_idx();
    let used_before = unwrap_index(used, view.pushed(q));
    let at_ns = realtime_ns();
    kill(Pid::from_raw(pid as i32), sig).with_context(|| format!("kill({pid}, {sig})"))?;
    let took_effect = |st: Option<char>| match sig {
        Signal::SIGSTOP => st == Some('T'),
        _ => matches!(st, None | Some('Z') | Some('X')),
    };
    poll_until(
        &format!("{sig} to take effect on worker {pid}"),
        Duration::from_secs(2),
        Duration::from_micros(100),
        || Ok(took_effect(proc_state(pid)).then_some(())),
    )?;
    let effective_ns = realtime_ns();
    let first_new_seq = view.pushed(q);
    let avail_after = unwrap_index(ring.avail_idx(), view.pushed(q));
    Ok(KillEvent {
        queue: q,
        pid,
        signal: sig.as_str(),
        at_ns,
        effective_ns,
        first_new_seq,
        used_before,
        avail_after,
        replaced_ns: None,
        runq_wait_ns: None,
        others_runq_wait_ns: Vec::new(),
    })
}

// ---- the primary's resources -----------------------------------------------

fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

// ---- reports -----------------------------------------------------------------

/// How many values, their median, 99th percentile and maximum.
type Summary = (usize, u64, u64, u64);

/// Print the distribution table of a run; return its lines too.
fn report(title: &str, a: &Analysis, kills: &[KillEvent]) -> String {
    let col = |f: &dyn Fn(&KillOutcome) -> Option<u64>| {
        let v: Vec<u64> = a.kills.iter().filter_map(f).collect();
        let (m, p99, max) = summarize(&v);
        (v.len(), m, p99, max)
    };
    let mut out = format!(
        "{title}: {} kills\n{:<48} {:>6} {:>9} {:>9} {:>9}\n",
        kills.len(),
        "metric (ms)",
        "n",
        "median",
        "p99",
        "max"
    );
    let rows: [(&str, Summary); 6] = [
        (
            "recovery: kill -> first new TX frame on the TAP",
            col(&|k| k.recovery_ns),
        ),
        ("replacement pid seen in the stats", col(&|k| k.replaced_ns)),
        (
            "of which primary + new worker waited for a CPU",
            col(&|k| k.runq_wait_ns),
        ),
        (
            "RX recovery: kill -> first new RX frame reaped",
            col(&|k| k.rx_recovery_ns),
        ),
        (
            "other queue pairs' worst stall, 100 ms after",
            col(&|k| Some(k.others_stall_ns)),
        ),
        (
            "same, 50 ms before the kill (baseline)",
            col(&|k| Some(k.others_stall_before_ns)),
        ),
    ];
    for (name, (n, m, p99, max)) in rows.into_iter().filter(|(_, (n, ..))| *n > 0) {
        out += &format!(
            "{name:<48} {n:>6} {:>9} {:>9} {:>9}\n",
            ms(m),
            ms(p99),
            ms(max)
        );
    }
    let inflight: Vec<u64> = a.kills.iter().map(|k| k.tx_in_flight).collect();
    let (im, ip, imax) = summarize(&inflight);
    let rx_lost: Vec<u64> = a.kills.iter().map(|k| k.rx_lost).collect();
    let (_, rp, rmax) = summarize(&rx_lost);
    out += &format!(
        "TX chains in flight at a kill: median {im}, p99 {ip}, max {imax}; TX duplicates {} \
         ({} distinct TX frames)\nRX frames lost {} (p99 {rp}, max {rmax} per kill) of {} \
         received\nworst stall of any queue pair away from kills: {} ms\n",
        a.tx_dups,
        a.tx_frames,
        a.rx_lost,
        a.rx_frames,
        ms(a.quiet_stall_ns),
    );
    let over_rec = a
        .kills
        .iter()
        .filter(|k| k.recovery_ns.is_none_or(|r| r > RECOVERY_LIMIT_NS))
        .count();
    let over_stall = a
        .kills
        .iter()
        .filter(|k| k.others_stall_ns > OTHERS_STALL_LIMIT_NS)
        .count();
    out += &format!(
        "kills over the 100 ms recovery limit: {over_rec}; kills with another queue pair \
         stalled > 10 ms: {over_stall}\n"
    );
    let mut slow: Vec<(usize, &KillOutcome)> = a.kills.iter().enumerate().collect();
    slow.sort_by_key(|(_, k)| std::cmp::Reverse(k.recovery_ns.unwrap_or(u64::MAX)));
    for (i, k) in slow.iter().take(5) {
        out += &format!(
            "  slow kill {i}: recovery {} ms, of which waiting for a CPU {} ms\n",
            k.recovery_ns.map_or("never".into(), ms),
            k.runq_wait_ns.map_or("?".into(), ms)
        );
    }
    eprintln!("{out}");
    out
}

/// The per-kill acceptance of the issue, for every kill.
fn check_kills(a: &Analysis, kills: &[KillEvent], recovery_limit_ns: u64) -> Result<()> {
    let mut failures = Vec::new();
    let mut excused = Vec::new();
    if !a.problems.is_empty() {
        failures.push(format!("broken invariants: {:#?}", a.problems));
    }
    for (k, (o, ev)) in a.kills.iter().zip(kills).enumerate() {
        let what = format!(
            "kill {k} ({} of queue pair {} pid {})",
            ev.signal, ev.queue, ev.pid
        );
        match o.recovery_ns {
            None => failures.push(format!("{what}: its queue pair never forwarded again")),
            Some(r) if r > recovery_limit_ns => failures.push(format!(
                "{what}: forwarded again after {} ms (limit {} ms)",
                ms(r),
                ms(recovery_limit_ns)
            )),
            _ => {}
        }
        if o.others_stall_ns > OTHERS_STALL_LIMIT_NS {
            let line = format!(
                "{what}: queue pair {} stalled {} ms (limit 10 ms)",
                o.others_stall_queue,
                ms(o.others_stall_ns)
            );
            // A 2-core machine stalls a queue pair for longer than 10 ms now
            // and then with no kill at all. Such a stall after a kill is
            // excused when its worker spent the excess runnable but waiting
            // for a CPU (schedstat), or, for at most 1% of the kills, when
            // the same run saw at least as long a stall away from every
            // kill. A pause that recovery itself caused leaves the worker
            // idle, not waiting for a CPU, and fails.
            let cpu_wait = ev
                .others_runq_wait_ns
                .get(o.others_stall_queue)
                .copied()
                .unwrap_or(0);
            if o.others_stall_ns <= OTHERS_STALL_LIMIT_NS + cpu_wait {
                // The worker was runnable but not given a CPU for the rest:
                // the machine stalled it, not qpnet.
                println!(
                    "not qpnet: {line}, of which its worker waited {} ms for a CPU",
                    ms(cpu_wait)
                );
            } else if o.others_stall_ns <= a.quiet_stall_ns {
                excused.push(line);
            } else {
                failures.push(line);
            }
        }
        if o.rx_lost > RX_IN_FLIGHT_MAX {
            failures.push(format!(
                "{what}: {} RX frames lost, more than can be in flight ({RX_IN_FLIGHT_MAX})",
                o.rx_lost
            ));
        }
    }
    for line in &excused {
        println!(
            "within the machine's own noise ({} ms away from kills): {line}",
            ms(a.quiet_stall_ns)
        );
    }
    if excused.len() * 100 > kills.len().max(100) {
        failures.push(format!(
            "{} kills stalled another queue pair > 10 ms: more than 1% of {} kills",
            excused.len(),
            kills.len()
        ));
    }
    if failures.is_empty() {
        return Ok(());
    }
    let n = failures.len();
    failures.truncate(25);
    let before: Vec<u64> = a.kills.iter().map(|k| k.others_stall_before_ns).collect();
    let (_, before_p99, before_max) = summarize(&before);
    bail!(
        "{n} failures, first {}:\n{}\n(for comparison, the machine's own noise: worst stall \
         away from every kill {} ms; the other queue pairs' worst stall in the 50 ms before \
         a kill: p99 {} ms, max {} ms)",
        failures.len(),
        failures.join("\n"),
        ms(a.quiet_stall_ns),
        ms(before_p99),
        ms(before_max)
    )
}

// ---- scenarios ----------------------------------------------------------------

/// Connect a VMM to `bed` and open the stamping socket.
fn connect(bed: &mut Testbed, config: VmmConfig) -> Result<(Vmm, StampedTap)> {
    let stamped = StampedTap::open(&bed.ns, TAP_NAME)?;
    let vmm = bed.vmm(config)?;
    bed.qpnet
        .wait_workers(usize::from(QPS), Duration::from_secs(10))?;
    Ok((vmm, stamped))
}

/// All four queue pairs forward: wait for 200 more frames on each TX queue.
fn wait_all_flowing(view: &LoadView<'_>) -> Result<()> {
    let all: Vec<usize> = (0..usize::from(QPS)).collect();
    view.wait_flowing(&all, 200, Duration::from_secs(15))
}

/// Run the load on `bed` with `control`, then analyze.
fn under_load(
    bed: &mut Testbed,
    window_ns: u64,
    control: impl FnOnce(&Testbed, &LoadView<'_>) -> Result<Vec<KillEvent>>,
) -> Result<(Vec<KillEvent>, Records, Analysis)> {
    under_load_with(
        bed,
        (vmm_config(), LoadConfig::default()),
        window_ns,
        control,
    )
}

/// [`under_load`] with a VMM configured by `config.0` and the load `config.1`.
fn under_load_with(
    bed: &mut Testbed,
    (config, load): (VmmConfig, LoadConfig),
    window_ns: u64,
    control: impl FnOnce(&Testbed, &LoadView<'_>) -> Result<Vec<KillEvent>>,
) -> Result<(Vec<KillEvent>, Records, Analysis)> {
    let (mut vmm, stamped) = connect(bed, config)?;
    let bed_ref: &Testbed = bed;
    let r = run_load(&mut vmm, &bed_ref.tap, &stamped, &load, |view| {
        control(bed_ref, view)
    });
    let (kills, records) = bed.explain(r)?;
    let analysis = analyze(&records, &kills, window_ns);
    Ok((kills, records, analysis))
}

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
    bed.qpnet.check_alive()
}

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
        let primary_wait = runq_wait_ns(bed.qpnet.pid());
        let others: Vec<Option<(u32, u64)>> = (0..n)
            .map(|o| {
                let pid = worker_of(bed, o)
                    .ok()
                    .map(|(pid, _, _)| pid)
                    .filter(|&p| p != 0)?;
                (o != q).then_some((pid, runq_wait_ns(pid)?))
            })
            .collect();
        let mut ev = signal_worker(bed, view, q, Signal::SIGKILL)?;
        quick[q] = if young { quick[q] + 1 } else { 0 };
        let (new_pid, seen) = wait_replaced(bed, q, ev.pid, Duration::from_secs(5))?;
        seen_at[q] = Instant::now();
        ev.replaced_ns = Some(seen);
        ev.runq_wait_ns = match (primary_wait, runq_wait_ns(bed.qpnet.pid())) {
            (Some(before), Some(after)) => {
                runq_wait_ns(new_pid).map(|w| w + after.saturating_sub(before))
            }
            _ => None,
        };
        // The next kill only once this one is over, so that no kill's window
        // holds another kill's recovery.
        view.wait_forwarded(q, ev.first_new_seq, Duration::from_secs(5))?;
        // The other workers' CPU waits over the 100 ms stall window.
        let window_end = ev.at_ns + 100_000_000;
        let now_ns = realtime_ns();
        if now_ns < window_end {
            std::thread::sleep(Duration::from_nanos(window_end - now_ns));
        }
        ev.others_runq_wait_ns = others
            .iter()
            .map(|o| {
                o.and_then(|(pid, before)| runq_wait_ns(pid).map(|a| a.saturating_sub(before)))
                    .unwrap_or(0)
            })
            .collect();
        events.push(ev);
        if events.len() % 100 == 0 {
            eprintln!("{} kills in {:?}", events.len(), started.elapsed());
        }
    }
    wait_all_flowing(view)?;
    std::thread::sleep(Duration::from_millis(200));
    Ok(events)
}

/// The primary's fds and RSS.
#[derive(Debug, Clone, Copy)]
struct PrimaryUse {
    fds: usize,
    rss_kib: u64,
}

fn primary_use(bed: &Testbed) -> Result<PrimaryUse> {
    Ok(PrimaryUse {
        fds: fd_count(bed.qpnet.pid())?,
        rss_kib: rss_kib(bed.qpnet.pid())?,
    })
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
    let mut bed = crash_bed(&["--crash-limit", "0"])?;
    let (kills, a, before, after) = thousand_kills(&mut bed)?;
    report("1000 SIGKILLs under load", &a, &kills);
    eprintln!("primary before: {before:?}, after: {after:?}");
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
    bed.qpnet.check_alive()
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
    ensure!(
        a.problems.is_empty(),
        "broken invariants: {:#?}",
        a.problems
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
    bed.qpnet.check_alive()
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
    bed.qpnet.check_alive()
}

/// Issue acceptance 3: a worker stopped while its TX ring has traffic is
/// found by the watchdog and replaced within 2 s; the others go on.
#[test]
fn a_wedged_worker_with_work_is_replaced_within_two_seconds() -> Result<()> {
    let _serial = serial();
    let mut bed = crash_bed(&[])?;
    let (kills, _records, a) = under_load(&mut bed, WEDGED_LIMIT_NS + 500_000_000, |bed, view| {
        wait_all_flowing(view)?;
        std::thread::sleep(Duration::from_millis(300));
        let mut ev = signal_worker(bed, view, 1, Signal::SIGSTOP)?;
        let r = wait_replaced(bed, 1, ev.pid, Duration::from_secs(5));
        if r.is_err() {
            let _ = kill(Pid::from_raw(ev.pid as i32), Signal::SIGKILL);
        }
        ev.replaced_ns = Some(r?.1);
        wait_for(
            &format!("the wedged worker {} to be killed", ev.pid),
            Duration::from_secs(2),
            || matches!(proc_state(ev.pid), None | Some('Z') | Some('X')),
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
    bed.qpnet.check_alive()
}

/// Send `per_queue` frames (from `first`) through the TX queues `qps`;
/// every one must arrive once, intact.
fn frames_through(bed: &mut Testbed, vmm: &mut Vmm, qps: &[usize], first: u32) -> Result<()> {
    let per_queue = 500;
    let collector = TapCollector::start(&bed.tap)?;
    let seqs = first..first + per_queue;
    let r = send_tx(vmm, qps, seqs.clone(), &collector, Duration::from_secs(30))
        .and_then(|_| {
            collector.wait_received(
                u64::from(per_queue) * qps.len() as u64,
                Duration::from_secs(30),
            )
        })
        .and_then(|_| {
            let expected: Vec<_> = qps.iter().map(|&q| (q as u16, seqs.clone())).collect();
            collector.check_expected(&expected)
        });
    collector.finish()?;
    bed.explain(r)
}

/// Issue acceptance 3, second half: a stopped worker with nothing to do is
/// not killed; once continued it forwards again.
#[test]
fn a_stopped_worker_without_work_is_left_alone() -> Result<()> {
    let _serial = serial();
    let mut bed = crash_bed(&[])?;
    let mut vmm = bed.vmm(vmm_config())?;
    let all: Vec<usize> = (0..usize::from(QPS)).collect();
    frames_through(&mut bed, &mut vmm, &all, 0)?;
    ensure!(vmm.tx.iter().all(|t| t.in_flight() == 0), "TX not idle");
    let pid = running_worker(&bed, 2)?;
    let (_, _, restarts) = worker_of(&bed, 2)?;
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP)?;
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    let state = proc_state(pid);
    let (now_pid, now_state, now_restarts) = worker_of(&bed, 2)?;
    kill(Pid::from_raw(pid as i32), Signal::SIGCONT)?;
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
    frames_through(&mut bed, &mut vmm, &all, 1000)?;
    ensure!(
        running_worker(&bed, 2)? == pid,
        "the continued worker was replaced"
    );
    bed.qpnet.check_alive()
}

/// One queue pair's fields in `qpnet stats --json` output: (state, restarts).
fn stats_json_queue(json: &str, qp: usize) -> Option<(String, u64)> {
    let start = json.find(&format!("\"queue_pair\": {qp},"))?;
    let obj = &json[start..start + json[start..].find('}')?];
    let field = |key: &str| -> Option<String> {
        let at = obj.find(&format!("\"{key}\": "))? + key.len() + 4;
        let v = obj[at..].split([',', '\n']).next()?.trim();
        Some(v.trim_matches('"').to_owned())
    };
    Some((field("state")?, field("restarts")?.parse().ok()?))
}

fn qpnet_stats_json(bed: &Testbed) -> Result<String> {
    let out = bed.qpnet.stats_command(&["--json"])?;
    ensure!(
        out.status.success(),
        "qpnet stats --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Wait until `qpnet stats --json` shows queue pair `qp` failed with at
/// least `restarts` restarts; returns its restarts.
fn wait_failed(bed: &Testbed, qp: usize, restarts: u64) -> Result<u64> {
    let r = poll_until(
        &format!("queue pair {qp} failed after {restarts} restarts"),
        Duration::from_secs(15),
        Duration::from_millis(50),
        || {
            let json = qpnet_stats_json(bed)?;
            Ok(stats_json_queue(&json, qp)
                .and_then(|(state, n)| (state == "failed" && n >= restarts).then_some(n)))
        },
    );
    r.with_context(|| {
        format!(
            "stats now: {:?}; qpnet stderr:\n{}",
            qpnet_stats_json(bed)
                .ok()
                .and_then(|j| stats_json_queue(&j, qp)),
            qpnet_tests::testbed::tail(&bed.qpnet.stderr(), 30)
        )
    })
}

/// Issue acceptance 6: a crash loop from the start marks its queue pair
/// failed; `qpnet retry` and a VMM (re)connection try again; a VMM can
/// connect and the other queue pairs forward.
#[test]
fn a_crash_loop_at_start_fails_its_queue_pair_and_the_others_keep_forwarding() -> Result<()> {
    let _serial = serial();
    // The variable reaches qpnet (and its workers) through the environment
    // `qpnet run` inherits; this binary's tests run one at a time and no
    // other thread reads the environment meanwhile.
    std::env::set_var("QPNET_TEST_WORKER_FAULT", "crash-on-start:1");
    let bed = crash_bed(&[]);
    std::env::remove_var("QPNET_TEST_WORKER_FAULT");
    let mut bed = bed?;
    // K = crash limit + 1: the worker was started K times and died K times.
    let k = DEFAULT_CRASH_LIMIT + 1;
    let first = wait_failed(&bed, 1, k)?;
    ensure!(
        first == k,
        "queue pair 1 failed after {first} restarts, {k} expected"
    );
    let json = qpnet_stats_json(&bed)?;
    for q in [0, 2, 3] {
        let (state, restarts) = stats_json_queue(&json, q).context("queue in stats")?;
        ensure!(
            state == "running" && restarts == 0,
            "queue pair {q}: {state}, {restarts} restarts"
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
        frames_through(&mut bed, &mut vmm, &others, 0)?;
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
    frames_through(&mut bed, &mut vmm, &others, 1000)?;
    bed.qpnet.check_alive()
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
    ensure!(
        last_outcome[0].others_stall_ns <= OTHERS_STALL_LIMIT_NS,
        "queue pair {} stalled {} ms when queue pair 1 failed",
        last_outcome[0].others_stall_queue,
        ms(last_outcome[0].others_stall_ns)
    );
    let (_, state, restarts) = worker_of(&bed, 1)?;
    ensure!(
        state == Some(WorkerState::Running) && restarts == k,
        "after retry: state {state:?}, restarts {restarts}"
    );
    bed.qpnet.check_alive()
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
        let mut pid = running_worker(bed, 1)?;
        for _ in 0..12 {
            // No check between seeing the pid and the kill: the kill should
            // land while the primary is still handing over the rings.
            let mut ev = signal_pid(view, 1, pid, Signal::SIGKILL)?;
            // The back-off grows to 1 s: wait long enough.
            let (new_pid, seen) = wait_replaced(bed, 1, pid, Duration::from_secs(5))?;
            ev.replaced_ns = Some(seen);
            events.push(ev);
            pid = new_pid;
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
    bed.qpnet.check_alive()
}

/// `a` restricted to the kills in `range` (problems kept).
fn a_subset(a: &Analysis, range: std::ops::Range<usize>) -> Analysis {
    Analysis {
        kills: a.kills[range].to_vec(),
        problems: a.problems.clone(),
        ..Analysis::default()
    }
}
