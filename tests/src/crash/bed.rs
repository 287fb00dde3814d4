//! The crash tests' bed: four queue pairs under [`run_load`], their workers
//! found in the stats region, pinned ([`ProcHandle`]) and signalled with a
//! note of where their TX ring stood ([`signal_worker`]).
//!
//! Every crash test binary holds the [`TimingLock`] while it runs
//! ([`serial`]): they measure milliseconds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use nix::sys::signal::Signal;
use qpnet_shared::{QueueStats, WorkerState};

use super::cpu_wait::sample_until;
use super::{analyze, realtime_ns, run_load, unwrap_index};
use super::{Analysis, KillEvent, LoadConfig, LoadView, Records, StampedTap};
use crate::proc::ProcHandle;
use crate::qpnet::Options;
use crate::serial::TimingLock;
use crate::testbed::{tail, Testbed, TAP_NAME};
use crate::vmm::{Vmm, VmmConfig};
use crate::wait::poll_until;

/// Queue pairs of every scenario.
pub const QPS: u16 = 4;
/// A worker killed sooner than this after its start is a quick crash for
/// the primary (supervisor.rs QUICK_LIFETIME is 1 s; margin added).
pub const QUICK_LIFETIME: Duration = Duration::from_millis(1100);
/// Consecutive quick crashes the primary restarts without back-off.
pub const QUICK_CRASHES_BEFORE_BACKOFF: u32 = 3;
/// `qpnet run`'s default --crash-limit.
pub const DEFAULT_CRASH_LIMIT: u64 = 5;

/// One scenario at a time, in this process and across processes.
pub fn serial() -> TimingLock {
    TimingLock::acquire("crash test").expect("the timing lock")
}

/// A testbed of four queue pairs whose TAP queues can hold the RX frames
/// of a worker that is down for a while (default 500 per queue).
pub fn crash_bed(extra: &[&str]) -> Result<Testbed> {
    crash_bed_with(&Options::args(extra))
}

/// [`crash_bed`] with qpnet started with `opts`.
pub fn crash_bed_with(opts: &Options) -> Result<Testbed> {
    let bed = Testbed::with_options(QPS, opts)?;
    bed.ns
        .ip(&["link", "set", "dev", TAP_NAME, "txqueuelen", "20000"])?;
    Ok(bed)
}

/// The test VMM of the crash scenarios.
pub fn vmm_config() -> VmmConfig {
    VmmConfig {
        queue_pairs: QPS,
        event_idx: true,
        rx_buf_size: 2048,
        ..VmmConfig::default()
    }
}

/// Small deterministic PRNG (xorshift64*), seeded from QPNET_CRASH_SEED or
/// the clock; the seed is printed so a run can be replayed.
pub struct Rng(u64);

impl Rng {
    /// Seeded from QPNET_CRASH_SEED, else the clock.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Rng {
        let seed = std::env::var("QPNET_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| realtime_ns() | 1);
        eprintln!("kill schedule seed: QPNET_CRASH_SEED={seed}");
        Rng(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

// ---- workers -------------------------------------------------------------

/// The worker pid and state of queue pair `q`, from the shared region.
pub fn worker_of(bed: &Testbed, q: usize) -> Result<(u32, Option<WorkerState>, u64)> {
    let stats = bed.qpnet.stats()?;
    let s = stats.queue(q).context("queue stats")?;
    Ok((
        s.pid.load(Ordering::Relaxed),
        s.worker_state(),
        QueueStats::get(&s.restarts),
    ))
}

/// The running worker of `q` (a child of the primary), pinned.
pub fn running_worker(bed: &Testbed, q: usize) -> Result<ProcHandle> {
    let (pid, state, _) = worker_of(bed, q)?;
    ensure!(
        pid != 0 && state == Some(WorkerState::Running),
        "queue pair {q} has no running worker (pid {pid}, state {state:?})"
    );
    let w = ProcHandle::of(pid).with_context(|| format!("the worker of queue pair {q}"))?;
    ensure!(
        w.ppid() == Some(bed.qpnet.pid()),
        "pid {pid} of queue pair {q} is not a child of the primary {}",
        bed.qpnet.pid()
    );
    Ok(w)
}

/// Wait for a running worker of `q` other than `old`; returns it and when it
/// was seen (realtime ns).
pub fn wait_replaced(bed: &Testbed, q: usize, old: u32, timeout: Duration) -> Result<(u32, u64)> {
    let stats = bed.qpnet.stats()?;
    let s = stats.queue(q).context("queue stats")?;
    let r = poll_until(
        &format!("a new worker for queue pair {q} (old pid {old})"),
        timeout,
        // Not faster: the poll competes for the 2 CPUs with the recovery
        // it waits for (the replacement time is reported, not judged).
        Duration::from_millis(1),
        || {
            let pid = s.pid.load(Ordering::Acquire);
            let running = s.worker_state() == Some(WorkerState::Running);
            Ok((pid != 0 && pid != old && running).then(|| (pid, realtime_ns())))
        },
    );
    r.with_context(|| format!("qpnet stderr:\n{}", tail(&bed.qpnet.stderr(), 30)))
}

/// Send `sig` to the worker of `q` and note the TX ring around it: the used
/// index just before, the avail index once the signal took effect (dead, or
/// stopped).
pub fn signal_worker(
    bed: &Testbed,
    view: &LoadView<'_>,
    q: usize,
    sig: Signal,
) -> Result<KillEvent> {
    let w = running_worker(bed, q)?;
    signal_pid(view, q, &w, sig)
}

/// [`signal_worker`] for a known worker, without checking it first.
pub fn signal_pid(
    view: &LoadView<'_>,
    q: usize,
    worker: &ProcHandle,
    sig: Signal,
) -> Result<KillEvent> {
    let pid = worker.pid();
    let ring = view.tx_ring(q);
    let used = ring.used_idx();
    let used_before = unwrap_index(used, view.pushed(q));
    let at_ns = realtime_ns();
    worker
        .signal(sig)
        .with_context(|| format!("kill({pid}, {sig})"))?;
    let took_effect = |st: Option<char>| match sig {
        Signal::SIGSTOP => st == Some('T'),
        _ => matches!(st, None | Some('Z') | Some('X')),
    };
    // The dying worker needs a CPU to act on the signal: on a starved
    // machine that has taken over 2 s (the slow kill is then judged by the
    // verdict's noise rules like any other).
    poll_until(
        &format!("{sig} to take effect on worker {pid}"),
        Duration::from_secs(10),
        Duration::from_micros(100),
        || Ok(took_effect(worker.state()).then_some(())),
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
    })
}

/// Wait until `qpnet stats --json` shows queue pair `qp` failed with at
/// least `restarts` restarts; returns its restarts.
pub fn wait_failed(bed: &Testbed, qp: usize, restarts: u64) -> Result<u64> {
    let state = |bed: &Testbed| -> Result<(String, u64)> {
        let doc = bed.qpnet.stats_json(&[])?;
        let q = doc.queue(qp)?;
        Ok((q.state.clone(), q.restarts))
    };
    let r = poll_until(
        &format!("queue pair {qp} failed after {restarts} restarts"),
        Duration::from_secs(15),
        Duration::from_millis(50),
        || {
            let (s, n) = state(bed)?;
            Ok((s == "failed" && n >= restarts).then_some(n))
        },
    );
    r.with_context(|| {
        format!(
            "stats now: {:?}; qpnet stderr:\n{}",
            state(bed).ok(),
            tail(&bed.qpnet.stderr(), 30)
        )
    })
}

// ---- the primary's resources -----------------------------------------------

/// The primary's fds and RSS.
#[derive(Debug, Clone, Copy)]
pub struct PrimaryUse {
    /// Open fds.
    pub fds: usize,
    /// Resident set size.
    pub rss_kib: u64,
}

/// What the primary of `bed` holds now.
pub fn primary_use(bed: &Testbed) -> Result<PrimaryUse> {
    let p = bed.qpnet.primary();
    Ok(PrimaryUse {
        fds: p.fd_count()?,
        rss_kib: p.rss_kib()?,
    })
}

// ---- scenarios ----------------------------------------------------------------

/// Connect a VMM to `bed` and open the stamping socket.
pub fn connect(bed: &mut Testbed, config: VmmConfig) -> Result<(Vmm, StampedTap)> {
    let stamped = StampedTap::open(&bed.ns, TAP_NAME)?;
    let vmm = bed.vmm(config)?;
    bed.qpnet
        .wait_workers(usize::from(QPS), Duration::from_secs(10))?;
    Ok((vmm, stamped))
}

/// All four queue pairs forward: wait for 200 more frames on each TX queue.
pub fn wait_all_flowing(view: &LoadView<'_>) -> Result<()> {
    let all: Vec<usize> = (0..usize::from(QPS)).collect();
    view.wait_flowing(&all, 200, Duration::from_secs(15))
}

/// Run the load on `bed` with `control`, then analyze.
pub fn under_load(
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
pub fn under_load_with(
    bed: &mut Testbed,
    (config, load): (VmmConfig, LoadConfig),
    window_ns: u64,
    control: impl FnOnce(&Testbed, &LoadView<'_>) -> Result<Vec<KillEvent>>,
) -> Result<(Vec<KillEvent>, Records, Analysis)> {
    let (mut vmm, stamped) = connect(bed, config)?;
    let bed_ref: &Testbed = bed;
    let primary = bed.qpnet.primary().pid();
    let r = run_load(&mut vmm, &bed_ref.tap, &stamped, &load, |view| {
        let threads = view.threads()?;
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let sampler = s.spawn(|| sample_until(primary, threads, &stop));
            let r = control(bed_ref, view);
            stop.store(true, Ordering::Release);
            let waits = sampler
                .join()
                .map_err(|_| anyhow!("the CPU-wait sampler panicked"))?;
            Ok((r?, waits?))
        })
    });
    let ((kills, cpu), mut records) = bed.explain(r)?;
    records.cpu = cpu;
    let analysis = analyze(&records, &kills, window_ns);
    Ok((kills, records, analysis))
}
