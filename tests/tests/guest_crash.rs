//! Crash tests with a real guest: a Linux guest under QEMU (TCG) whose
//! virtio-net device is served by qpnet over vhost-user (two queue pairs),
//! while qpnet's processes are SIGKILLed from outside.
//!
//! `guest_tcp_stream_survives_worker_kills`: the guest runs two iperf3 TCP
//! streams to the host, one after the other (one stream each, 20 s). The
//! first runs undisturbed (the baseline). While the second runs, the worker
//! of the queue pair that carries it (the one whose TX counter moves most in
//! qpnet's shared stats region, re-chosen before every kill, as a TCP
//! retransmission timeout may move the flow to another queue) is SIGKILLed
//! five times, two seconds apart. The stream must survive (iperf3 in the
//! guest reports its result, no reset) and move data after the last kill;
//! both throughputs, their ratio and how long each kill stalled the stream
//! are printed, not asserted.
//!
//! `guest_pings_again_after_primary_kill`: qpnet runs under
//! `scripts/qpnet-supervise`, QEMU connects with `reconnect=1`, and the guest
//! pings the host once a second (`hold`). Once a ping has succeeded, the
//! primary is SIGKILLed (twice, the second time against the restarted one).
//! Each time a new primary must own the instance's lock file and listen on
//! the socket within 1 s, the guest must ping again within 5 s (from the kill
//! to the first successful ping it prints after it), and no worker of the
//! old primary may remain. The test makes itself a child subreaper, so the
//! old workers, orphaned by the kill, become its children: it sees how they
//! ended and reaps them.
//!
//! Both tests create a network namespace holding a multi-queue TAP with
//! 10.77.0.1/24 (and an iperf3 server on it for the first test), run qpnet
//! there, and boot the guest of `scripts/guest/` with `run-guest.sh`. Every
//! process they start leads its own process group and is stopped with it on
//! drop (QEMU, iperf3, qpnet or the supervisor with its primary); the
//! namespace goes with its guard. On failure the serial console, qpnet's log
//! (or the supervisor's) and iperf3's log are printed and kept under
//! /tmp/qpnet-gcrash-<name>/.
//!
//! Needs root, qemu-system-x86, a Debian kernel, busybox-static, iperf3,
//! ethtool, and a built qpnet (`$QPNET_BIN`, else
//! `<workspace>/target/release/qpnet`). Run one test at a time
//! (`--test-threads=1`): each boots a TCG guest on a small machine.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use qpnet_shared::{QueueStats, SharedRegion};
use qpnet_tests::guest::{
    hold_of, ok_result, print_tail, result_of, workspace_dir, Bed, Guest, GuestArgs, ResultLine,
    Spawned, TAP,
};
use qpnet_tests::qpnet::{children_of, command_line, parent_of, qpnet_binary, Qpnet, RUN_DIR};
use qpnet_tests::wait::poll_until;

/// The guest's address (the host's is `qpnet_tests::guest::HOST_CIDR`).
const GUEST_CIDR: &str = "10.77.0.2/24";
const QUEUE_PAIRS: u16 = 2;
/// How often the stats region is read.
const POLL: Duration = Duration::from_millis(20);
/// Bounds QEMU even if this test process dies without drops.
const GUEST_TIMEOUT: Duration = Duration::from_secs(600);

// ---- worker kills under an iperf3 stream --------------------------------

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

// ---- primary kills under the supervisor ---------------------------------

/// Kills of the primary (the second against the restarted one).
const PRIMARY_KILLS: usize = 2;
/// The acceptance limits: a new primary serving the socket, and the guest's
/// first successful ping, counted from the kill.
const PRIMARY_BACK_LIMIT: Duration = Duration::from_secs(1);
const PING_BACK_LIMIT: Duration = Duration::from_secs(5);
/// Measuring goes on past the limits, so a failure reports the real figure.
const MEASURE_DEADLINE: Duration = Duration::from_secs(30);
/// Boot and the first ping of the hold loop.
const HOLD_DEADLINE: Duration = Duration::from_secs(180);
/// How long the old primary's workers may take to die (PR_SET_PDEATHSIG).
const OLD_WORKERS_DEADLINE: Duration = Duration::from_secs(2);

#[test]
fn guest_tcp_stream_survives_worker_kills() {
    let mut bed = match WorkerKillBed::start() {
        Ok(bed) => bed,
        Err(e) => panic!("setting up the worker-kill guest test: {e:#}"),
    };
    if let Err(e) = worker_kill_scenario(&mut bed) {
        bed.print_logs();
        panic!("worker kills under a guest TCP stream: {e:#}");
    }
    bed.bed.finish();
}

#[test]
fn guest_pings_again_after_primary_kill() {
    let mut bed = match PrimaryKillBed::start() {
        Ok(bed) => bed,
        Err(e) => panic!("setting up the primary-kill guest test: {e:#}"),
    };
    if let Err(e) = primary_kill_scenario(&mut bed) {
        bed.print_logs();
        panic!("primary kill under a pinging guest: {e:#}");
    }
    bed.bed.finish();
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
    let guest = start_guest(&mut wb.bed, wb.qpnet.socket(), tests, &extra)?;
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
        let old_pid = worker_of(qpnet, region, qp)?;
        // The next pick window ends one spacing after this kill.
        next_kill = Instant::now() + KILL_SPACING - QUEUE_PICK_WINDOW;
        let (replaced, new_pid, resumed) = kill_and_measure(region, qp, old_pid)
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

/// SIGKILL worker `pid` of queue pair `qp`; return how long after the kill
/// its replacement ran (and its pid), and when the stream's TX bytes had
/// grown by [`FLOWING_BYTES`] past what they were once the old worker was
/// dead (None: not within [`KILL_SPACING`]).
fn kill_and_measure(
    region: &SharedRegion,
    qp: usize,
    pid: u32,
) -> Result<(Duration, u32, Option<Duration>)> {
    let old = ProcessId::of(pid).with_context(|| format!("worker {pid} is already gone"))?;
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL)
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

/// The pid of queue pair `qp`'s worker, checked to be a qpnet worker child
/// of our primary before anything is sent to it.
fn worker_of(qpnet: &Qpnet, region: &SharedRegion, qp: usize) -> Result<u32> {
    let pid = snapshot(region)[qp].pid;
    ensure!(
        pid != 0,
        "queue pair {qp} has no worker in the stats region"
    );
    ensure!(
        parent_of(pid) == Some(qpnet.pid()),
        "pid {pid} of queue pair {qp} is not a child of the primary {}",
        qpnet.pid()
    );
    let cmd = command_line(pid).unwrap_or_default();
    ensure!(
        cmd.contains(&format!("worker --queue-pair {qp} ")),
        "pid {pid} is not the worker of queue pair {qp}: {cmd:?}"
    );
    Ok(pid)
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

// ---- scenario: primary kills --------------------------------------------

/// Test 5's world, in drop order: the guest, the supervisor (with qpnet),
/// the scratch directory and namespace, and last the subreaper setting.
struct PrimaryKillBed {
    guest: Option<Guest>,
    supervisor: Supervisor,
    bed: Bed,
    _reaper: Subreaper,
}

impl PrimaryKillBed {
    fn start() -> Result<PrimaryKillBed> {
        let reaper = Subreaper::enable()?;
        let mut bed = Bed::create("gcrash")?;
        let supervisor = Supervisor::start(&mut bed)?;
        Ok(PrimaryKillBed {
            guest: None,
            supervisor,
            bed,
            _reaper: reaper,
        })
    }

    fn print_logs(&self) {
        self.bed.print_logs();
    }
}

/// What one primary kill did.
struct PrimaryKill {
    old_pid: u32,
    new_pid: u32,
    /// Kill to a new primary holding the lock file and listening.
    primary_back: Duration,
    /// Kill to the first successful ping printed after it (None: none
    /// within [`MEASURE_DEADLINE`]).
    ping_back: Option<Duration>,
    /// Pings lost in between, and the sequence number of the first one
    /// answered again.
    lost: usize,
    ok_seq: u64,
    /// How each of the old primary's workers ended.
    old_workers: Vec<(u32, String)>,
}

fn primary_kill_scenario(pb: &mut PrimaryKillBed) -> Result<()> {
    let started = Instant::now();
    let first = pb.supervisor.wait_primary(None, Duration::from_secs(10))?;
    println!(
        "supervisor {} started primary {first}",
        pb.supervisor.process.pid()
    );
    let extra = ["--reconnect", "1", "--pingwait", "60"];
    let socket = pb.supervisor.socket.clone();
    let guest = start_guest(&mut pb.bed, &socket, "ping,hold", &extra)?;
    let guest = pb.guest.insert(guest);
    let (_, first_ok) =
        guest.wait_line(0, "the first successful hold ping", HOLD_DEADLINE, |l| {
            hold_of(l).is_some_and(|h| h.ok)
        })?;
    println!("guest pinging after {:?}: {first_ok}", started.elapsed());

    let mut kills = Vec::new();
    for k in 1..=PRIMARY_KILLS {
        let kill = kill_primary(&mut pb.supervisor, guest).with_context(|| format!("kill {k}"))?;
        println!("kill {k}: {}", kill.describe());
        ensure!(
            kill.ping_back.is_some(),
            "kill {k}: the guest did not ping again within {MEASURE_DEADLINE:?} ({})",
            kill.describe()
        );
        kills.push(kill);
    }
    for (k, kill) in kills.iter().enumerate() {
        ensure!(
            kill.primary_back <= PRIMARY_BACK_LIMIT,
            "kill {}: the new primary served the socket only {:?} after the kill (limit {PRIMARY_BACK_LIMIT:?})",
            k + 1,
            kill.primary_back
        );
        ensure!(
            kill.ping_back.is_some_and(|t| t <= PING_BACK_LIMIT),
            "kill {}: the guest pinged again only {:?} after the kill (limit {PING_BACK_LIMIT:?})",
            k + 1,
            kill.ping_back
        );
    }
    let last = pb.supervisor.wait_primary(None, Duration::from_secs(1))?;
    ensure!(
        last == kills.last().map(|k| k.new_pid).unwrap_or(first),
        "the primary changed again without a kill: now {last}"
    );
    guest.check_running(0)?;
    println!("scenario took {:?}", started.elapsed());
    Ok(())
}

/// Wait for a successful ping, SIGKILL the primary, and measure its return,
/// the guest's, and the fate of its workers.
fn kill_primary(supervisor: &mut Supervisor, guest: &mut Guest) -> Result<PrimaryKill> {
    // A fresh successful ping: the device is up and steady, and the next
    // ping starts a second later, after the kill.
    let from = guest.lines().len();
    guest.wait_line(
        from,
        "a successful ping before the kill",
        Duration::from_secs(30),
        |l| hold_of(l).is_some_and(|h| h.ok),
    )?;
    let old_pid = supervisor.wait_primary(None, Duration::from_secs(1))?;
    let workers: Vec<ProcessId> = children_of(old_pid)
        .into_iter()
        .filter(|&p| command_line(p).is_some_and(|c| c.contains(" worker ")))
        .filter_map(ProcessId::of)
        .collect();
    ensure!(
        workers.len() == QUEUE_PAIRS as usize,
        "primary {old_pid} has {} workers before the kill, expected {QUEUE_PAIRS}: {workers:?}",
        workers.len()
    );
    let mark = guest.lines().len();
    kill(Pid::from_raw(old_pid as i32), Signal::SIGKILL)
        .with_context(|| format!("SIGKILL to primary {old_pid}"))?;
    let killed_at = Instant::now();

    let new_pid = supervisor.wait_primary(Some(old_pid), MEASURE_DEADLINE)?;
    let primary_back = killed_at.elapsed();
    check_region_pid(&supervisor.name, new_pid)?;
    let old_workers = check_old_workers(old_pid, &workers)?;

    let ping = guest.wait_line(
        mark,
        "a successful ping after the kill",
        MEASURE_DEADLINE.saturating_sub(killed_at.elapsed()),
        |l| hold_of(l).is_some_and(|h| h.ok),
    );
    let (ping_back, end, ok_seq) = match ping {
        Ok((i, line)) => (
            Some(guest.lines()[i].at.saturating_duration_since(killed_at)),
            i,
            hold_of(&line).map(|h| h.seq).unwrap_or_default(),
        ),
        Err(e) => {
            println!("no successful ping after the kill: {e:#}");
            (None, guest.lines().len(), 0)
        }
    };
    let lost = guest.lines()[mark..end]
        .iter()
        .filter(|l| hold_of(&l.text).is_some_and(|h| !h.ok))
        .count();
    Ok(PrimaryKill {
        old_pid,
        new_pid,
        primary_back,
        ping_back,
        lost,
        ok_seq,
        old_workers,
    })
}

impl PrimaryKill {
    fn describe(&self) -> String {
        format!(
            "primary {} -> {} serving (lock file + listening) {:.0} ms after the kill; guest ping {} ({} lost); old workers: {:?}",
            self.old_pid,
            self.new_pid,
            self.primary_back.as_secs_f64() * 1e3,
            match self.ping_back {
                Some(t) => format!("seq={} ok {:.2} s after the kill", self.ok_seq, t.as_secs_f64()),
                None => "never ok again".into(),
            },
            self.lost,
            self.old_workers
        )
    }
}

/// The stats region of the restarted instance names the new primary.
fn check_region_pid(name: &str, pid: u32) -> Result<()> {
    let path = Path::new(RUN_DIR).join(name).join("stats.shm");
    let region = SharedRegion::open_read_only(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let in_region = region.header().primary_pid.load(Ordering::Relaxed);
    ensure!(
        in_region == pid,
        "{} names primary {in_region}, the lock file {pid}",
        path.display()
    );
    Ok(())
}

/// Every worker of the killed primary must be gone: each recorded worker
/// dead (reaped by us, its subreaper, or at least a zombie), and no live
/// process left whose parent is the old primary.
fn check_old_workers(old_primary: u32, workers: &[ProcessId]) -> Result<Vec<(u32, String)>> {
    let mut fates: Vec<Option<String>> = vec![None; workers.len()];
    poll_until(
        "the old primary's workers to die",
        OLD_WORKERS_DEADLINE,
        Duration::from_millis(10),
        || {
            for (w, fate) in workers.iter().zip(fates.iter_mut()) {
                if fate.is_none() {
                    *fate = w.fate();
                }
            }
            let orphans_alive = live_children_of(old_primary);
            Ok((fates.iter().all(Option::is_some) && orphans_alive.is_empty()).then_some(()))
        },
    )
    .with_context(|| {
        format!(
            "workers {workers:?} of primary {old_primary}: {fates:?}; live processes with it as parent: {:?}",
            live_children_of(old_primary)
        )
    })?;
    Ok(workers
        .iter()
        .zip(fates)
        .map(|(w, f)| (w.pid, f.unwrap_or_default()))
        .collect())
}

/// Live (not zombie) processes whose parent is `pid`, from a scan of /proc.
fn live_children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            proc_stat(p).is_some_and(|s| s.ppid == pid && s.state != 'Z' && s.state != 'X')
        })
        .collect()
}

// ---- the supervisor ------------------------------------------------------

/// `scripts/qpnet-supervise` running `qpnet run` in the test namespace.
struct Supervisor {
    process: Spawned,
    name: String,
    socket: PathBuf,
}

impl Supervisor {
    fn start(bed: &mut Bed) -> Result<Supervisor> {
        let name = qpnet_tests::unique_name();
        let socket = bed.dir().join("vhost.sock");
        let log = bed.log_path("supervisor + qpnet", "supervise.log");
        let qp = QUEUE_PAIRS.to_string();
        let process = Spawned::start(
            "qpnet-supervise",
            bed.ns()
                .command(workspace_dir().join("scripts/qpnet-supervise"))
                .arg("--qpnet")
                .arg(qpnet_binary()?)
                .arg("--")
                .arg("--socket")
                .arg(&socket)
                .args(["--tap", TAP, "--queue-pairs", &qp, "--name", &name])
                .env("RUST_BACKTRACE", "1"),
            &log,
            Duration::from_secs(10),
        )?;
        Ok(Supervisor {
            process,
            name,
            socket,
        })
    }

    /// The primary serving the instance now: the pid in its lock file, a
    /// live `qpnet` child of the supervisor, listening on the socket.
    fn serving_primary(&self) -> Option<u32> {
        let lock = Path::new(RUN_DIR).join(&self.name).join("lock");
        let pid: u32 = std::fs::read_to_string(lock).ok()?.trim().parse().ok()?;
        let stat = proc_stat(pid)?;
        (stat.state != 'Z'
            && stat.ppid == self.process.pid()
            && command_line(pid).is_some_and(|c| c.split(' ').nth(1) == Some("run"))
            && listens_on(pid, &self.socket))
        .then_some(pid)
    }

    /// Wait until a primary other than `not` serves; fail early if the
    /// supervisor ended.
    fn wait_primary(&mut self, not: Option<u32>, timeout: Duration) -> Result<u32> {
        poll_until(
            "a qpnet primary holding the lock file and listening on the socket",
            timeout,
            Duration::from_millis(5),
            || {
                if let Some(st) = self.process.exited()? {
                    bail!("qpnet-supervise exited ({st})");
                }
                Ok(self.serving_primary().filter(|&p| Some(p) != not))
            },
        )
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // SIGTERM to the supervisor: it passes it on, the primary stops its
        // workers and removes its runtime files; SIGKILL to the group after.
        self.process.stop();
        let _ = std::fs::remove_dir_all(Path::new(RUN_DIR).join(&self.name));
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Whether `pid` holds a listening unix socket bound to `path`: a line of
/// its namespace's /proc/net/unix with that path and __SO_ACCEPTCON, whose
/// inode is one of its fds.
fn listens_on(pid: u32, path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/unix")) else {
        return false;
    };
    let inodes = listening_inodes(&table, &path.to_string_lossy());
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|l| {
            let l = l.to_string_lossy();
            inodes.iter().any(|i| l == format!("socket:[{i}]"))
        })
    })
}

/// Inodes of the listening sockets bound to `path` in a /proc/net/unix table
/// (`Num RefCount Protocol Flags Type St Inode Path`).
fn listening_inodes(table: &str, path: &str) -> Vec<u64> {
    const SO_ACCEPTCON: u32 = 0x1_0000;
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            (f.get(7) == Some(&path) && flags & SO_ACCEPTCON != 0).then(|| f[6].parse().ok())?
        })
        .collect()
}

/// This process as a child subreaper while it lives: the workers orphaned
/// by a primary's death become our children, so we see how they ended and
/// reap them (this machine's init does not reap). On drop, adopted zombies
/// are reaped and the setting is cleared.
struct Subreaper;

impl Subreaper {
    fn enable() -> Result<Subreaper> {
        nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
        Ok(Subreaper)
    }
}

impl Drop for Subreaper {
    fn drop(&mut self) {
        let me = std::process::id();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for p in entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            {
                if proc_stat(p).is_some_and(|s| s.ppid == me && s.state == 'Z') {
                    let _ = waitpid(Pid::from_raw(p as i32), Some(WaitPidFlag::WNOHANG));
                }
            }
        }
        let _ = nix::sys::prctl::set_child_subreaper(false);
    }
}

/// A process identified by pid and start time (pids are reused).
#[derive(Debug, Clone, Copy)]
struct ProcessId {
    pid: u32,
    start: u64,
}

impl ProcessId {
    fn of(pid: u32) -> Option<ProcessId> {
        Some(ProcessId {
            pid,
            start: proc_stat(pid)?.start,
        })
    }

    /// How it ended, once it has: reaped by us (we are its subreaper), or
    /// seen as a zombie or gone. None while it lives.
    fn fate(&self) -> Option<String> {
        let me = std::process::id();
        match proc_stat(self.pid) {
            Some(s) if s.start == self.start && s.state != 'Z' && s.state != 'X' => None,
            Some(s) if s.start == self.start && s.ppid == me => {
                match waitpid(Pid::from_raw(self.pid as i32), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Signaled(_, sig, _)) => Some(format!("killed by {sig}")),
                    Ok(WaitStatus::Exited(_, code)) => Some(format!("exited {code}")),
                    Ok(_) => None,
                    Err(e) => Some(format!("zombie (waitpid: {e})")),
                }
            }
            Some(s) if s.start == self.start => Some(format!("zombie of {}", s.ppid)),
            _ => Some("gone".into()),
        }
    }
}

/// The fields of /proc/PID/stat the tests use.
struct ProcStat {
    state: char,
    ppid: u32,
    start: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm) ": state ppid pgrp ... starttime is field 22.
    let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
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

// ---- the guest -----------------------------------------------------------

/// Boot the guest against `socket` with the given steps and run-guest.sh
/// options.
fn start_guest(bed: &mut Bed, socket: &Path, tests: &str, extra: &[&str]) -> Result<Guest> {
    let args = GuestArgs {
        queues: QUEUE_PAIRS,
        ip: GUEST_CIDR,
        tests,
        extra,
        timeout: GUEST_TIMEOUT,
    };
    bed.start_guest(socket, "guest", &args)
}

// ---- unit tests of the parsers (no root needed) --------------------------

#[test]
fn serial_lines_are_read() {
    use qpnet_tests::guest::HoldLine;
    let r = ResultLine::parse("QPNET-RESULT iperf-tx ok gbps=0.932 bytes=585760768 retransmits=3")
        .unwrap();
    assert!(r.ok() && !r.failed());
    assert_eq!(r.step, "iperf-tx");
    assert_eq!(r.number("bytes").unwrap(), 585760768);
    assert!((r.float("gbps").unwrap() - 0.932).abs() < 1e-9);
    assert_eq!(r.field("retransmits"), Some("3"));
    let f = ResultLine::parse("[ 9.1] x QPNET-RESULT iperf-tx fail reason=\"reset\"").unwrap();
    assert!(f.failed() && !f.ok());
    let h = ResultLine::parse("QPNET-RESULT hold started peer=10.77.0.1").unwrap();
    assert!(!h.ok() && !h.failed());
    assert!(result_of("QPNET-RESULT ping ok", "iperf-tx").is_none());
    assert!(ok_result("QPNET-RESULT iperf-tx fail reason=x", "iperf-tx").is_err());

    assert_eq!(
        hold_of("QPNET-HOLD seq=12 ok rtt_ms=0.812 t=33.10"),
        Some(HoldLine { seq: 12, ok: true })
    );
    assert_eq!(
        hold_of("QPNET-HOLD seq=13 lost t=35.10"),
        Some(HoldLine { seq: 13, ok: false })
    );
    assert_eq!(hold_of("QPNET-HOLD seq=x ok"), None);
    assert_eq!(hold_of("QPNET-RESULT hold started peer=10.77.0.1"), None);
}

#[test]
fn listening_sockets_are_found_in_proc_net_unix() {
    let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
        0000000000000000: 00000002 00000000 00010000 0001 01 4711 /tmp/x/vhost.sock\n\
        0000000000000000: 00000003 00000000 00000000 0001 03 4712 /tmp/x/vhost.sock\n\
        0000000000000000: 00000002 00000000 00010000 0001 01 4713 /tmp/y.sock\n\
        0000000000000000: 00000003 00000000 00000000 0001 03 4714\n";
    assert_eq!(listening_inodes(table, "/tmp/x/vhost.sock"), vec![4711]);
    assert!(listening_inodes(table, "/tmp/z.sock").is_empty());
}

#[test]
fn our_own_stat_is_read() {
    let me = proc_stat(std::process::id()).unwrap();
    assert!(me.start > 0 && me.ppid > 0);
    assert!("RS".contains(me.state), "state {}", me.state);
    let id = ProcessId::of(std::process::id()).unwrap();
    assert!(id.fate().is_none(), "a live process has no fate yet");
}
