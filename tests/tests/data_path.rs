//! qpnet's data path, end to end, through a real TAP in a test namespace.
//!
//! A test VMM (vhost-user front end, memfd guest memory, split-ring driver)
//! drives a real `qpnet run`; an AF_PACKET socket on the TAP sees what qpnet
//! writes and injects what it must read. Every frame is checked byte for
//! byte and accounted for: nothing lost, nothing duplicated.
//!
//! Needs root and `$QPNET_BIN`.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use qpnet_shared::QueueStats;
use qpnet_tests::frames::{mixed_len, MAX_FRAME};
use qpnet_tests::proc::ProcHandle;
use qpnet_tests::testbed::Testbed;
use qpnet_tests::traffic::{rx_traffic, send_tx, tx_frame, TapCollector};
use qpnet_tests::vmm::{Vmm, VmmConfig};

const TIMEOUT: Duration = Duration::from_secs(60);
const TX_FRAMES_PER_QUEUE: u32 = 10_000;

#[test]
fn one_queue_pair_moves_frames_both_ways_byte_exact() -> Result<()> {
    let mut bed = Testbed::new(1)?;
    let mut vmm = bed.vmm(VmmConfig::default())?;
    bed.tx_round(&mut vmm, TX_FRAMES_PER_QUEUE)?;

    // 256-byte RX buffers + MRG_RXBUF: a 1514-byte frame needs 6 of them.
    let r = rx_traffic(&mut vmm, &bed.tap, 2_000, 16, mixed_len, TIMEOUT);
    let report = bed.explain(r)?;
    ensure!(
        report.multi_buffer_frames > 0 && report.max_buffers >= 6,
        "large frames must span several 256-byte buffers: {report:?}"
    );
    let stats = bed.qpnet.stats()?;
    let q = stats.queue(0).context("queue 0 stats")?;
    ensure!(
        QueueStats::get(&q.tx_frames) == u64::from(TX_FRAMES_PER_QUEUE),
        "stats tx_frames {} != {TX_FRAMES_PER_QUEUE} sent",
        QueueStats::get(&q.tx_frames)
    );
    ensure!(
        QueueStats::get(&q.rx_frames) >= 2_000,
        "stats rx_frames {} < 2000 received",
        QueueStats::get(&q.rx_frames)
    );
    bed.finish()
}

#[test]
fn rx_without_mergeable_buffers_uses_one_buffer_per_frame() -> Result<()> {
    let mut bed = Testbed::new(1)?;
    let mut vmm = bed.vmm(VmmConfig {
        mrg_rxbuf: false,
        rx_buf_size: 2048,
        two_regions: false,
        split_tx_header: false,
        ..VmmConfig::default()
    })?;
    let r = rx_traffic(&mut vmm, &bed.tap, 1_000, 8, mixed_len, TIMEOUT);
    let report = bed.explain(r)?;
    ensure!(report.max_buffers == 1, "{report:?}");
    bed.tx_round(&mut vmm, 1_000)?;
    bed.finish()
}

/// Four queue pairs: every TX queue delivers, RX spreads over the queues,
/// each queue pair has its own worker process (named `qpnet`, so `pgrep -x
/// qpnet` finds them), and the primary stays idle while the workers forward.
#[test]
fn four_queue_pairs_each_have_a_worker_and_the_primary_stays_idle() -> Result<()> {
    let mut bed = Testbed::new(4)?;
    let mut vmm = bed.vmm(VmmConfig {
        queue_pairs: 4,
        event_idx: true,
        ..VmmConfig::default()
    })?;
    let primary = bed.qpnet.pid();
    let workers = bed.qpnet.wait_workers(4, Duration::from_secs(10))?;
    let worker_procs: Vec<ProcHandle> = workers
        .iter()
        .map(|&w| ProcHandle::of(w))
        .collect::<Result<_>>()?;
    let distinct: BTreeSet<u32> = workers.iter().copied().collect();
    ensure!(
        distinct.len() == 4,
        "4 distinct workers expected: {workers:?}"
    );
    let stats = bed.qpnet.stats()?;
    for qp in 0..4 {
        let pid = stats
            .queue(qp)
            .context("queue stats")?
            .pid
            .load(Ordering::Relaxed);
        ensure!(
            workers.contains(&pid),
            "queue pair {qp} reports worker pid {pid}, not one of the primary's children {workers:?}"
        );
        let w = ProcHandle::of(pid)?;
        ensure!(
            w.ppid() == Some(primary),
            "worker {pid} is not the primary's child"
        );
        let cmd = w.cmdline().unwrap_or_default();
        ensure!(
            cmd.contains("worker") && cmd.contains(&format!("--queue-pair {qp}")),
            "worker {pid} of queue pair {qp} runs {cmd:?}"
        );
    }

    // Workers are `qpnet` to the system too (their comm, not `exe`):
    // `pgrep -x qpnet` lists this instance's primary and all four workers.
    let out = std::process::Command::new("pgrep")
        .args(["-x", "qpnet"])
        .output()
        .context("running pgrep (procps)")?;
    let listed: BTreeSet<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    for pid in workers.iter().chain([&primary]) {
        ensure!(
            listed.contains(pid),
            "pgrep -x qpnet lists {listed:?}, not qpnet process {pid} (primary {primary}, \
             workers {workers:?})"
        );
    }
    let primary_proc = bed.qpnet.primary();
    let primary_before = primary_proc.cpu_time()?;
    let workers_before: Vec<Duration> = worker_procs
        .iter()
        .map(ProcHandle::cpu_time)
        .collect::<Result<_>>()?;

    bed.tx_round(&mut vmm, TX_FRAMES_PER_QUEUE)?;
    let r = rx_traffic(&mut vmm, &bed.tap, 4_000, 64, mixed_len, TIMEOUT);
    let report = bed.explain(r)?;

    let primary_used = bed.qpnet.primary().cpu_time()? - primary_before;
    let worker_used: Vec<Duration> = worker_procs
        .iter()
        .zip(&workers_before)
        .map(|(w, before)| Ok(w.cpu_time()? - *before))
        .collect::<Result<_>>()?;
    let total: Duration = worker_used.iter().sum();
    eprintln!(
        "cpu during traffic: primary {primary_used:?}, workers {worker_used:?}; rx per queue {:?}",
        report.per_queue
    );
    ensure!(
        worker_used.iter().all(|d| !d.is_zero()),
        "every worker must have done work: {worker_used:?}"
    );
    ensure!(
        primary_used.as_secs_f64() < 0.05 * total.as_secs_f64(),
        "primary used {primary_used:?} while the workers used {total:?} (limit 5%)"
    );
    ensure!(
        report.per_queue.iter().filter(|&&n| n > 0).count() >= 2,
        "64 UDP flows must spread over the RX queues: {:?}",
        report.per_queue
    );
    ensure!(report.multi_buffer_frames > 0, "{report:?}");
    for qp in 0..4 {
        let q = stats.queue(qp).context("queue stats")?;
        ensure!(
            QueueStats::get(&q.tx_frames) == u64::from(TX_FRAMES_PER_QUEUE),
            "queue pair {qp}: stats tx_frames {}",
            QueueStats::get(&q.tx_frames)
        );
    }
    ensure!(
        bed.qpnet.worker_pids() == workers,
        "workers changed during traffic: {workers:?} -> {:?}",
        bed.qpnet.worker_pids()
    );
    bed.finish()
}

/// GET_VRING_BASE stops a TX ring where it is; restarting it at that base
/// resumes with nothing lost and nothing sent twice.
#[test]
fn tx_ring_stopped_and_restarted_loses_and_repeats_nothing() -> Result<()> {
    let mut bed = Testbed::new(1)?;
    let mut vmm = bed.vmm(VmmConfig::default())?;
    let collector = TapCollector::start(&bed.tap)?;
    let r = stop_restart_scenario(&mut vmm, &collector);
    collector.finish()?;
    bed.explain(r)?;
    bed.finish()
}

fn stop_restart_scenario(vmm: &mut Vmm, collector: &TapCollector) -> Result<()> {
    const VRING: u32 = 1;
    // 1. 500 frames, all completed: the worker is idle.
    send_tx(vmm, &[0], 0..500, collector, TIMEOUT)?;
    // 2. 100 more made available but not kicked, then stop the ring.
    for seq in 500..600 {
        ensure!(vmm.tx[0].try_push(&tx_frame(0, seq))?, "ring full");
    }
    vmm.tx[0].queue.publish();
    let base = vmm.stop_ring(VRING)?;
    let used = vmm.tx[0].queue.used_idx();
    ensure!(
        base == u32::from(used),
        "GET_VRING_BASE returned {base} but the used index is {used}: the ring did not stop where it completed"
    );
    ensure!((500..=600).contains(&base), "base {base} outside 500..=600");
    // A kick on a stopped ring moves nothing (a negative, so a bounded wait).
    vmm.tx[0].queue.kick();
    std::thread::sleep(Duration::from_millis(100));
    ensure!(
        vmm.tx[0].queue.used_idx() == used,
        "the stopped ring moved: used {} -> {}",
        used,
        vmm.tx[0].queue.used_idx()
    );
    // 3. Restart at that base; the pending frames go out.
    vmm.start_ring(VRING, base as u16)?;
    vmm.tx[0].flush();
    vmm.tx[0].wait_idle(TIMEOUT)?;

    // 4. Stop and restart under load, several times.
    let mut next = 600u32;
    let mut stopped_mid_ring = 0;
    for _ in 0..8 {
        while vmm.tx[0].try_push(&tx_frame(0, next))? {
            next += 1;
        }
        vmm.tx[0].flush();
        let base = vmm.stop_ring(VRING)?;
        let used = vmm.tx[0].queue.used_idx();
        let avail = vmm.tx[0].queue.avail_idx();
        ensure!(
            base == u32::from(used),
            "under load, GET_VRING_BASE returned {base} but the used index is {used}"
        );
        ensure!(
            avail.wrapping_sub(used) <= vmm.config().queue_size,
            "base {base} beyond avail {avail}"
        );
        if used != avail {
            stopped_mid_ring += 1;
        }
        vmm.start_ring(VRING, base as u16)?;
        vmm.tx[0].flush();
        send_tx(vmm, &[0], next..next + 500, collector, TIMEOUT)?;
        next += 500;
    }
    eprintln!("stopped with chains pending {stopped_mid_ring} of 8 times");
    collector.wait_received(u64::from(next), TIMEOUT)?;
    collector.check(&[(0, 0..next)])
}

/// The VMM goes away (cleanly, and with frames in flight); the next VMM
/// connection to the same qpnet works.
#[test]
fn a_new_vmm_connection_works_after_the_previous_one_left() -> Result<()> {
    let mut bed = Testbed::new(2)?;
    let config = VmmConfig {
        queue_pairs: 2,
        ..VmmConfig::default()
    };
    let workers = bed.qpnet.wait_workers(2, Duration::from_secs(10))?;
    {
        let mut vmm = bed.vmm(config.clone())?;
        bed.tx_round(&mut vmm, 1_000)?;
        let r = rx_traffic(&mut vmm, &bed.tap, 500, 8, mixed_len, TIMEOUT);
        bed.explain(r)?;
    }
    {
        // Leave with TX frames in flight and RX buffers posted.
        let mut vmm = bed.vmm(config.clone())?;
        for qp in 0..2 {
            for seq in 0..100 {
                let frame = tx_frame(qp as u16 + 10, seq);
                if !vmm.tx[qp].try_push(&frame)? {
                    break;
                }
            }
            vmm.tx[qp].flush();
        }
    }
    let mut vmm = bed.vmm(config)?;
    bed.tap.drain()?;
    bed.tx_round(&mut vmm, 1_000)?;
    let r = rx_traffic(&mut vmm, &bed.tap, 500, 8, |_| MAX_FRAME, TIMEOUT);
    bed.explain(r)?;
    let connections = bed
        .qpnet
        .stats()?
        .header()
        .vmm_connections
        .load(Ordering::Relaxed);
    ensure!(
        connections == 3,
        "stats count {connections} VMM connections, 3 made"
    );
    let now = bed.qpnet.worker_pids();
    ensure!(
        now.len() == 2,
        "2 workers expected after reconnects: {workers:?} -> {now:?}"
    );
    bed.finish()
}

/// Watches one ring's used index from a thread of its own, as a guest
/// driver polling its ring would, and records every value it sees.
struct UsedIndexWatcher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<u16>>>,
}

impl UsedIndexWatcher {
    fn start(ring: qpnet_secondary::test_util::RingProbe) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut last = ring.used_idx();
            let mut idle = 0u32;
            while !flag.load(Ordering::Relaxed) {
                let now = ring.used_idx();
                if now != last {
                    seen.push(now);
                    last = now;
                    idle = 0;
                } else {
                    idle += 1;
                    if idle.is_multiple_of(256) {
                        // Share the two CPUs with the worker and the sender.
                        std::thread::yield_now();
                    }
                    std::hint::spin_loop();
                }
            }
            seen
        });
        UsedIndexWatcher {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Result<Vec<u16>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .context("watcher already finished")?
            .join()
            .map_err(|_| anyhow::anyhow!("the used-index watcher panicked"))
    }
}

/// Issue 13: the RX used index is only ever published at a frame boundary.
/// Small mergeable buffers make most frames span several of them, so frames
/// straddle every multiple of 64 used entries (qpnet's mid-batch publish
/// point); a watcher thread polls the used index all the while, and every
/// value it saw must be the end of a whole frame (the running sum of the
/// frames' num_buffers), as must every index the driver itself stopped at.
#[test]
fn rx_used_index_is_published_only_at_frame_boundaries() -> Result<()> {
    const FRAMES: u32 = 100_000;
    let mut bed = Testbed::new(1)?;
    let mut vmm = bed.vmm(VmmConfig {
        event_idx: true,
        rx_buf_size: 256,
        ..VmmConfig::default()
    })?;
    vmm.rx[0].record_frame_ends();
    let watcher = UsedIndexWatcher::start(vmm.rx[0].queue.probe());
    let r = rx_traffic(
        &mut vmm,
        &bed.tap,
        FRAMES,
        16,
        mixed_len,
        Duration::from_secs(300),
    );
    let seen = watcher.finish()?;
    let report = bed.explain(r)?;
    let ends = vmm.rx[0].take_frame_ends();
    let boundaries: BTreeSet<u64> = ends.iter().copied().collect();
    // Frames whose buffers cross a multiple of 64 used entries.
    let straddling = ends
        .windows(2)
        .filter(|w| w[0] / 64 != (w[1] - 1) / 64)
        .count();
    // Unwrap the 16-bit indices the watcher saw (each step is < ring size).
    // Entries past the last frame the driver reaped (a frame the kernel
    // sent into the TAP just as the run ended) cannot be judged: their
    // frame's end is unknown, so they are left out, not counted as inside.
    let last_end = ends.last().copied().unwrap_or(0);
    let mut at = 0u64;
    let mut inside = Vec::new();
    for &v in &seen {
        at += u64::from(v.wrapping_sub(at as u16));
        if at <= last_end && !boundaries.contains(&at) {
            inside.push(at);
        }
    }
    eprintln!(
        "{} frames over {} used entries, {straddling} straddling a multiple of 64; the watcher \
         saw {} used-index values, {} inside a frame; the driver stopped inside a frame {} times",
        ends.len() - 1,
        ends.last().copied().unwrap_or(0),
        seen.len(),
        inside.len(),
        report.used_index_inside_frame
    );
    ensure!(
        ends.len() > FRAMES as usize && report.max_buffers >= 6,
        "expected {FRAMES} frames of up to 6 buffers: {report:?}"
    );
    ensure!(
        straddling > 1_000,
        "only {straddling} frames straddled a multiple of 64 used entries"
    );
    ensure!(
        seen.len() > 200,
        "the watcher saw only {} used-index values",
        seen.len()
    );
    ensure!(
        inside.is_empty(),
        "the used index was published inside a frame {} times, first at used entries {:?}",
        inside.len(),
        &inside[..inside.len().min(10)]
    );
    bed.finish()
}
