//! Crash test with a real guest: a Linux guest under QEMU (TCG) whose
//! virtio-net device is served by qpnet over vhost-user (two queue pairs),
//! while qpnet's workers are SIGKILLed from outside.
//!
//! The guest runs two iperf3 TCP streams to the host, one after the other
//! (one stream each, 20 s). The first runs undisturbed (the baseline).
//! While the second runs, the worker of the queue pair that carries it (the
//! one whose TX counter moves most in qpnet's shared stats region,
//! re-chosen before every kill, as a TCP retransmission timeout may move
//! the flow to another queue) is SIGKILLed five times, two seconds apart.
//! The stream must survive (iperf3 in the guest reports its result, no
//! reset) and move data after the last kill; both throughputs, their ratio
//! and how long each kill stalled the stream are printed, not asserted.
//! Afterwards qpnet must stop cleanly.
//!
//! The test creates a network namespace holding a multi-queue TAP with
//! 10.77.0.1/24 and an iperf3 server on it, runs qpnet there, and boots the
//! guest of `scripts/guest/` with `run-guest.sh`. Every process it starts
//! leads its own process group and is stopped with it on drop; the
//! namespace goes with its guard. On failure the serial console, qpnet's
//! log and iperf3's log are printed and kept under /tmp/qpnet-gcrash-<name>/.
//!
//! Needs root, qemu-system-x86, a Debian kernel, busybox-static, iperf3,
//! ethtool, and `$QPNET_BIN`. Timing-sensitive (a TCG guest on a small
//! machine): the test holds the timing lock, so no other such test runs
//! beside it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::Signal;
use qpnet_shared::{QueueStats, SharedRegion};
use qpnet_tests::guest::{
    ok_result, print_tail, result_of, Bed, Guest, GuestArgs, ResultLine, Spawned, TAP,
};
use qpnet_tests::proc::ProcHandle;
use qpnet_tests::qpnet::Qpnet;
use qpnet_tests::serial::TimingLock;
use qpnet_tests::wait::poll_until;

/// The guest's address (the host's is `qpnet_tests::guest::HOST_CIDR`).
const GUEST_CIDR: &str = "10.77.0.2/24";
const QUEUE_PAIRS: u16 = 2;
/// How often the stats region is read.
const POLL: Duration = Duration::from_millis(20);
/// Bounds QEMU even if this test process dies without drops.
const GUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Seconds of each iperf3 stream.
const STREAM_SECS: u32 = 20;
/// Kills of the worker carrying the stream, and their spacing.
const WORKER_KILLS: usize = 5;
const KILL_SPACING: Duration = Duration::from_secs(2);
/// How long the stream runs undisturbed before the first kill.
const BEFORE_FIRST_KILL: Duration = Duration::from_secs(1);
/// The window over which the busiest TX queue is chosen before a kill.
const QUEUE_PICK_WINDOW: Duration = Duration::from_millis(500);
/// TX bytes that count as "the stream moves" (a few full frames or one TSO
/// frame; ARP and stray frames are far smaller).
const FLOWING_BYTES: u64 = 64 * 1024;
/// Data the stream must move between the last kill and its end: a live
/// stream moves several MB per second even under TCG, so this says "it
/// moved data", not "it was fast".
const DATA_AFTER_KILLS_MIN: u64 = 1 << 20;
/// Boot, first ping and the baseline stream (under TCG on a shared machine;
/// about 60 s when quiet).
const BASELINE_DEADLINE: Duration = Duration::from_secs(240);
/// From the baseline's result to the second stream moving data.
const STREAM_START_DEADLINE: Duration = Duration::from_secs(30);
/// A kill's worker must be replaced within this (qpnet replaces it at once;
/// this only bounds the wait).
const REPLACEMENT_DEADLINE: Duration = Duration::from_secs(10);

#[test]
fn guest_tcp_stream_survives_worker_kills() {
    let _timing = TimingLock::acquire("guest crash test").expect("the timing lock");
    let mut bed = match WorkerKillBed::start() {
        Ok(bed) => bed,
        Err(e) => panic!("setting up the worker-kill guest test: {e:#}"),
    };
    if let Err(e) = worker_kill_scenario(&mut bed) {
        bed.print_logs();
        panic!("worker kills under a guest TCP stream: {e:#}");
    }
    if let Err(e) = bed.finish() {
        panic!("after the worker kills: {e:#}");
    }
}

// ---- scenario: worker kills ---------------------------------------------

/// Test 4's world, in drop order: the guest, qpnet, iperf3, then the
/// scratch directory and the namespace.
struct WorkerKillBed {
    guest: Option<Guest>,
    qpnet: Qpnet,
    _iperf3: Spawned,
    bed: Bed,
}

impl WorkerKillBed {
    fn start() -> Result<WorkerKillBed> {
        let mut bed = Bed::create("gcrash")?;
        let iperf3 = bed.start_iperf3_server()?;
        let qpnet = Qpnet::start(bed.ns(), TAP, QUEUE_PAIRS)?;
        Ok(WorkerKillBed {
            guest: None,
            qpnet,
            _iperf3: iperf3,
            bed,
        })
    }

    fn print_logs(&self) {
        print_tail("qpnet stderr", &self.qpnet.stderr());
        self.bed.print_logs();
    }

    /// Success: the guest is gone, qpnet must stop cleanly (a checked
    /// SIGTERM), then the scratch directory (logs) can go.
    fn finish(self) -> Result<()> {
        let WorkerKillBed {
            guest,
            qpnet,
            _iperf3,
            mut bed,
        } = self;
        drop(guest);
        qpnet.stop()?;
        bed.finish();
        Ok(())
    }
}

/// What one worker kill did.
struct WorkerKill {
    queue_pair: usize,
    old_pid: u32,
    new_pid: u32,
    /// From the kill to the new worker running.
    replaced: Duration,
    /// From the kill to the stream's TX bytes growing by [`FLOWING_BYTES`]
    /// again (None: not within the kill spacing).
    resumed: Option<Duration>,
}

fn worker_kill_scenario(wb: &mut WorkerKillBed) -> Result<()> {
    let started = Instant::now();
    let tests = "ping,iperf-tx,iperf-tx,queues";
    let secs = STREAM_SECS.to_string();
    let extra = ["--secs", &secs, "--streams", "1", "--pingwait", "60"];
    let args = GuestArgs {
        queues: QUEUE_PAIRS,
        ip: GUEST_CIDR,
        tests,
        extra: &extra,
        timeout: GUEST_TIMEOUT,
    };
    let guest = wb.bed.start_guest(wb.qpnet.socket(), "guest", &args)?;
    let guest = wb.guest.insert(guest);
    let region = wb.qpnet.stats()?;

    let (baseline_idx, baseline) = baseline_stream(guest, &region)?;
    let stream_from = baseline_idx + 1;
    wait_stream_flowing(guest, &region, stream_from)?;
    std::thread::sleep(BEFORE_FIRST_KILL);
    let before_kills = snapshot(&region);
    let kills = kill_stream_workers(&wb.qpnet, &region, guest, stream_from)?;
    let last_kill_bytes = total_tx_bytes(&snapshot(&region));
    let last_kill_at = Instant::now();

    let (_, killed) = guest.wait_line(
        stream_from,
        "the iperf3 result of the stream under kills",
        Duration::from_secs(STREAM_SECS as u64 + 60),
        |l| result_of(l, "iperf-tx").is_some(),
    )?;
    let after_kills = snapshot(&region);
    report_worker_kills(&kills, &before_kills, &after_kills);
    let killed = ok_result(&killed, "iperf-tx")
        .context("the TCP stream did not survive the worker kills")?;
    let moved_after = total_tx_bytes(&after_kills).saturating_sub(last_kill_bytes);
    println!(
        "with {WORKER_KILLS} kills: {} ; qpnet TX bytes from the last kill to the result: {moved_after} in {:.1} s",
        killed.line,
        last_kill_at.elapsed().as_secs_f64()
    );
    print_throughput(&baseline, &killed)?;
    ensure!(
        killed.number("bytes")? > 0,
        "the stream under kills moved no data: {}",
        killed.line
    );
    ensure!(
        moved_after >= DATA_AFTER_KILLS_MIN,
        "the stream moved only {moved_after} bytes through qpnet after the last kill (want >= {DATA_AFTER_KILLS_MIN})"
    );

    let status = guest.wait_exit(Duration::from_secs(60))?;
    if let Some(q) = guest.result("queues") {
        println!("guest: {}", q.line);
    }
    ensure!(
        status.success(),
        "run-guest.sh exited with {status} (a guest step failed)"
    );
    wb.qpnet.check_alive()?;
    println!("scenario took {:?}", started.elapsed());
    Ok(())
}

/// Wait for the guest's first ping and its undisturbed stream; return the
/// index of that stream's result line and the result.
fn baseline_stream(guest: &mut Guest, region: &SharedRegion) -> Result<(usize, ResultLine)> {
    let started = Instant::now();
    let (ping_idx, ping) = guest.wait_line(0, "the first ping", BASELINE_DEADLINE, |l| {
        result_of(l, "ping").is_some()
    })?;
    println!("guest: {ping} ({:?} after start)", started.elapsed());
    let before = snapshot(region);
    let (idx, line) = guest.wait_line(
        ping_idx + 1,
        "the baseline iperf3 result",
        BASELINE_DEADLINE.saturating_sub(started.elapsed()),
        |l| result_of(l, "iperf-tx").is_some(),
    )?;
    let baseline = ok_result(&line, "iperf-tx")?;
    println!(
        "baseline (no kills): {} ; qpnet tx_bytes per queue pair during it: {:?}",
        baseline.line,
        tx_bytes_delta(&before, &snapshot(region))
    );
    Ok((idx, baseline))
}

/// Wait until the stream after line `from` has moved
/// [`DATA_AFTER_KILLS_MIN`] bytes through qpnet.
fn wait_stream_flowing(guest: &mut Guest, region: &SharedRegion, from: usize) -> Result<()> {
    let start = total_tx_bytes(&snapshot(region));
    poll_until(
        "the second iperf3 stream to move data",
        STREAM_START_DEADLINE,
        POLL,
        || {
            guest.check_running(from)?;
            let moved = total_tx_bytes(&snapshot(region)).saturating_sub(start);
            Ok((moved >= DATA_AFTER_KILLS_MIN).then_some(()))
        },
    )
}

/// Both streams' throughput and their ratio (reported, not asserted: the
/// machine is shared and TCG throughput varies run to run).
fn print_throughput(baseline: &ResultLine, killed: &ResultLine) -> Result<()> {
    let (base, with_kills) = (baseline.float("gbps")?, killed.float("gbps")?);
    println!(
        "throughput: baseline {base:.3} Gbit/s, with kills {with_kills:.3} Gbit/s, ratio {:.3} ({:.1}% drop); retransmits {} vs {}",
        with_kills / base,
        100.0 * (1.0 - with_kills / base),
        baseline.field("retransmits").unwrap_or("?"),
        killed.field("retransmits").unwrap_or("?"),
    );
    Ok(())
}

/// SIGKILL the worker carrying the stream [`WORKER_KILLS`] times, every
/// [`KILL_SPACING`], and measure each replacement and stall.
fn kill_stream_workers(
    qpnet: &Qpnet,
    region: &SharedRegion,
    guest: &mut Guest,
    stream_from: usize,
) -> Result<Vec<WorkerKill>> {
    let mut kills = Vec::new();
    let mut next_kill = Instant::now();
    for k in 1..=WORKER_KILLS {
        while Instant::now() < next_kill {
            check_stream_running(guest, stream_from, k)?;
            std::thread::sleep(POLL);
        }
        let qp = busiest_tx_queue(region, guest, stream_from, k)
            .with_context(|| format!("before kill {k}"))?;
        let old = worker_of(qpnet, region, qp)?;
        let old_pid = old.pid();
        // The next pick window ends one spacing after this kill.
        next_kill = Instant::now() + KILL_SPACING - QUEUE_PICK_WINDOW;
        let (replaced, new_pid, resumed) = kill_and_measure(region, qp, &old)
            .with_context(|| format!("kill {k} (queue pair {qp}, worker {old_pid})"))?;
        kills.push(WorkerKill {
            queue_pair: qp,
            old_pid,
            new_pid,
            replaced,
            resumed,
        });
    }
    Ok(kills)
}

/// SIGKILL worker `old` of queue pair `qp`; return how long after the kill
/// its replacement ran (and its pid), and when the stream's TX bytes had
/// grown by [`FLOWING_BYTES`] past what they were once the old worker was
/// dead (None: not within [`KILL_SPACING`]).
fn kill_and_measure(
    region: &SharedRegion,
    qp: usize,
    old: &ProcHandle,
) -> Result<(Duration, u32, Option<Duration>)> {
    let pid = old.pid();
    old.signal(Signal::SIGKILL)
        .with_context(|| format!("SIGKILL to worker {pid}"))?;
    let killed_at = Instant::now();
    // Counters it bumped on its way out must not count as the stream
    // moving again: take the reference once it is dead.
    poll_until(
        "the killed worker to die",
        Duration::from_secs(1),
        Duration::from_micros(200),
        || Ok(old.fate().map(drop)),
    )?;
    let bytes_dead = total_tx_bytes(&snapshot(region));
    let (mut replaced, mut resumed) = (None, None);
    while killed_at.elapsed() < REPLACEMENT_DEADLINE
        && (replaced.is_none() || (resumed.is_none() && killed_at.elapsed() < KILL_SPACING))
    {
        let now = snapshot(region);
        let q = &now[qp];
        if replaced.is_none() && q.pid != 0 && q.pid != pid && q.state == "running" {
            replaced = Some((killed_at.elapsed(), q.pid));
        }
        if resumed.is_none() && total_tx_bytes(&now) >= bytes_dead + FLOWING_BYTES {
            resumed = Some(killed_at.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let (replaced, new_pid) = replaced.with_context(|| {
        format!(
            "not replaced within {REPLACEMENT_DEADLINE:?} (state {})",
            snapshot(region)[qp].state
        )
    })?;
    Ok((replaced, new_pid, resumed))
}

/// The queue pair whose TX bytes grow most over [`QUEUE_PICK_WINDOW`],
/// waiting (bounded) until the stream moves at all.
fn busiest_tx_queue(
    region: &SharedRegion,
    guest: &mut Guest,
    stream_from: usize,
    k: usize,
) -> Result<usize> {
    poll_until(
        "the stream to move data before a kill",
        Duration::from_secs(15),
        Duration::ZERO,
        || {
            check_stream_running(guest, stream_from, k)?;
            let a = snapshot(region);
            std::thread::sleep(QUEUE_PICK_WINDOW);
            let d = tx_bytes_delta(&a, &snapshot(region));
            let (qp, bytes) = d
                .iter()
                .copied()
                .enumerate()
                .max_by_key(|&(_, b)| b)
                .unwrap_or((0, 0));
            Ok((bytes >= FLOWING_BYTES).then_some(qp))
        },
    )
}

/// Fail if the stream under kills ended (with its result, or the guest
/// stopped) before kill `k`.
fn check_stream_running(guest: &mut Guest, stream_from: usize, k: usize) -> Result<()> {
    guest.check_running(stream_from)?;
    if let Some(l) = guest.lines()[stream_from..]
        .iter()
        .find_map(|l| result_of(&l.text, "iperf-tx"))
    {
        bail!("the stream ended before kill {k}: {}", l.line);
    }
    Ok(())
}

/// Queue pair `qp`'s worker, pinned and checked to be a qpnet worker child
/// of our primary before anything is sent to it.
fn worker_of(qpnet: &Qpnet, region: &SharedRegion, qp: usize) -> Result<ProcHandle> {
    let pid = snapshot(region)[qp].pid;
    ensure!(
        pid != 0,
        "queue pair {qp} has no worker in the stats region"
    );
    let w = ProcHandle::of(pid).with_context(|| format!("worker {pid} is already gone"))?;
    ensure!(
        w.ppid() == Some(qpnet.pid()),
        "pid {pid} of queue pair {qp} is not a child of the primary {}",
        qpnet.pid()
    );
    let cmd = w.cmdline().unwrap_or_default();
    ensure!(
        cmd.contains(&format!("worker --queue-pair {qp} ")),
        "pid {pid} is not the worker of queue pair {qp}: {cmd:?}"
    );
    Ok(w)
}

fn report_worker_kills(kills: &[WorkerKill], before: &[QueueSnapshot], after: &[QueueSnapshot]) {
    for (k, w) in kills.iter().enumerate() {
        println!(
            "kill {}: queue pair {} worker {} -> {} replaced after {:.1} ms; stream moving again after {}",
            k + 1,
            w.queue_pair,
            w.old_pid,
            w.new_pid,
            w.replaced.as_secs_f64() * 1e3,
            w.resumed
                .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
                .unwrap_or_else(|| format!("more than {KILL_SPACING:?}"))
        );
    }
    for (b, a) in before.iter().zip(after) {
        println!(
            "queue pair {}: restarts {} -> {}, state {}, tx_bytes +{}, rx_frames +{} during the kills",
            b.queue_pair,
            b.restarts,
            a.restarts,
            a.state,
            a.tx_bytes.saturating_sub(b.tx_bytes),
            a.rx_frames.saturating_sub(b.rx_frames)
        );
    }
}

// ---- the stats region ----------------------------------------------------

/// One queue pair's counters and worker, read from the shared region.
#[derive(Debug, Clone)]
struct QueueSnapshot {
    queue_pair: usize,
    tx_bytes: u64,
    rx_frames: u64,
    pid: u32,
    restarts: u64,
    state: &'static str,
}

fn snapshot(region: &SharedRegion) -> Vec<QueueSnapshot> {
    (0..region.queue_pairs())
        .filter_map(|qp| {
            let q = region.queue(qp)?;
            Some(QueueSnapshot {
                queue_pair: qp,
                tx_bytes: QueueStats::get(&q.tx_bytes),
                rx_frames: QueueStats::get(&q.rx_frames),
                pid: q.pid.load(Ordering::Relaxed),
                restarts: QueueStats::get(&q.restarts),
                state: q.worker_state().map(|s| s.name()).unwrap_or("invalid"),
            })
        })
        .collect()
}

fn total_tx_bytes(s: &[QueueSnapshot]) -> u64 {
    s.iter().map(|q| q.tx_bytes).sum()
}

fn tx_bytes_delta(before: &[QueueSnapshot], after: &[QueueSnapshot]) -> Vec<u64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| a.tx_bytes.saturating_sub(b.tx_bytes))
        .collect()
}
