//! Crash test with a real guest and the supervisor: qpnet runs under
//! `scripts/qpnet-supervise`, QEMU (TCG) connects with `reconnect=1`, and
//! the guest pings the host once a second (`hold`). Once a ping has
//! succeeded, the primary is SIGKILLed (twice, the second time against the
//! restarted one). Each time a new primary must own the instance's lock
//! file and listen on the socket within 1 s, the guest must ping again
//! within 5 s (from the kill to the first successful ping it prints after
//! it), and no worker of the old primary may remain. The test makes itself
//! a child subreaper, so the old workers, orphaned by the kill, become its
//! children: it sees how they ended and reaps them. At the end SIGTERM to
//! the supervisor must stop everything cleanly (`qpnet_tests::supervise`).
//!
//! The test creates a network namespace holding a multi-queue TAP with
//! 10.77.0.1/24, runs the supervisor there, and boots the guest of
//! `scripts/guest/` with `run-guest.sh`. On failure the serial console and
//! the supervisor's log are printed and kept under /tmp/qpnet-gcrash-<name>/.
//!
//! Needs root, qemu-system-x86, a Debian kernel, busybox-static, iperf3,
//! ethtool, and `$QPNET_BIN`. Timing-sensitive (a TCG guest against 1 s and
//! 5 s limits): the test holds the timing lock, so no other such test runs
//! beside it.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use qpnet_shared::SharedRegion;
use qpnet_tests::guest::{hold_of, Bed, Guest, GuestArgs, TAP};
use qpnet_tests::proc::{live_children_by_scan, ProcHandle, Subreaper};
use qpnet_tests::qpnet::RUN_DIR;
use qpnet_tests::serial::TimingLock;
use qpnet_tests::supervise::Supervisor;
use qpnet_tests::wait::poll_until;

/// The guest's address (the host's is `qpnet_tests::guest::HOST_CIDR`).
const GUEST_CIDR: &str = "10.77.0.2/24";
const QUEUE_PAIRS: u16 = 2;
/// Bounds QEMU even if this test process dies without drops.
const GUEST_TIMEOUT: Duration = Duration::from_secs(600);

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
fn guest_pings_again_after_primary_kill() {
    let _timing = TimingLock::acquire("guest crash test").expect("the timing lock");
    let mut bed = match PrimaryKillBed::start() {
        Ok(bed) => bed,
        Err(e) => panic!("setting up the primary-kill guest test: {e:#}"),
    };
    if let Err(e) = primary_kill_scenario(&mut bed) {
        bed.print_logs();
        panic!("primary kill under a pinging guest: {e:#}");
    }
    if let Err(e) = bed.finish() {
        panic!("after the primary kills: {e:#}");
    }
}

// ---- scenario: primary kills --------------------------------------------

/// The test's world, in drop order: the guest, the supervisor (with
/// qpnet), the scratch directory and namespace, and last the subreaper
/// setting.
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
        let log = bed.log_path("supervisor + qpnet", "supervise.log");
        let supervisor = Supervisor::start(bed.ns(), bed.dir(), &log, TAP, QUEUE_PAIRS)?;
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

    /// Success: the guest is gone, the supervisor must stop cleanly (a
    /// checked SIGTERM: it and qpnet exit 0, nothing left), then the
    /// scratch directory (logs) can go.
    fn finish(self) -> Result<()> {
        let PrimaryKillBed {
            guest,
            supervisor,
            mut bed,
            _reaper,
        } = self;
        drop(guest);
        supervisor.stop()?;
        bed.finish();
        Ok(())
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
    let first = pb
        .supervisor
        .wait_primary(None, Duration::from_secs(10))?
        .pid();
    println!("supervisor {} started primary {first}", pb.supervisor.pid());
    let extra = ["--reconnect", "1", "--pingwait", "60"];
    let socket = pb.supervisor.socket().to_owned();
    let args = GuestArgs {
        queues: QUEUE_PAIRS,
        ip: GUEST_CIDR,
        tests: "ping,hold",
        extra: &extra,
        timeout: GUEST_TIMEOUT,
    };
    let guest = pb.bed.start_guest(&socket, "guest", &args)?;
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
    let last = pb
        .supervisor
        .wait_primary(None, Duration::from_secs(1))?
        .pid();
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
    let old = supervisor.wait_primary(None, Duration::from_secs(1))?;
    let old_pid = old.pid();
    let workers: Vec<ProcHandle> = old
        .children()
        .into_iter()
        .filter(|w| w.cmdline().is_some_and(|c| c.contains(" worker ")))
        .collect();
    ensure!(
        workers.len() == QUEUE_PAIRS as usize,
        "primary {old_pid} has {} workers before the kill, expected {QUEUE_PAIRS}: {workers:?}",
        workers.len()
    );
    let mark = guest.lines().len();
    old.signal(Signal::SIGKILL)
        .with_context(|| format!("SIGKILL to primary {old_pid}"))?;
    let killed_at = Instant::now();

    let new_pid = supervisor
        .wait_primary(Some(old_pid), MEASURE_DEADLINE)?
        .pid();
    let primary_back = killed_at.elapsed();
    check_region_pid(supervisor.name(), new_pid)?;
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
fn check_old_workers(old_primary: u32, workers: &[ProcHandle]) -> Result<Vec<(u32, String)>> {
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
            let orphans_alive = live_children_by_scan(old_primary);
            Ok((fates.iter().all(Option::is_some) && orphans_alive.is_empty()).then_some(()))
        },
    )
    .with_context(|| {
        format!(
            "workers {workers:?} of primary {old_primary}: {fates:?}; live processes with it as parent: {:?}",
            live_children_by_scan(old_primary)
        )
    })?;
    Ok(workers
        .iter()
        .zip(fates)
        .map(|(w, f)| (w.pid(), f.unwrap_or_default()))
        .collect())
}
