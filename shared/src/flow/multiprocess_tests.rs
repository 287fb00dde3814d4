//! Flow table tests with real processes: a concurrent stress test and the
//! killed-lock-holder test.
//!
//! Children are this test binary itself, re-executed to run only
//! [`child_process_entry`] with `QPNET_FLOW_TEST_ROLE` naming their role;
//! they attach to the parent's region file like a worker would and report
//! through a result file. In a normal test run that entry finds no role and
//! returns at once.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::flow::testing::{key, Rng};
use crate::test_hooks::{arm, CrashAction, CrashPoint};
use crate::{
    Direction, FlowCache, FlowKey, FlowSnapshot, FlowTable, FlowUpdate, LockWait, Recorded,
    SharedRegion,
};

const ROLE_ENV: &str = "QPNET_FLOW_TEST_ROLE";
const CHILD_TEST: &str = "flow::multiprocess_tests::child_process_entry";

/// Key spaces: shared keys (updated by everyone, never deleted), contested
/// keys (inserted and deleted by everyone), and one private space per child.
const SHARED: u32 = 64;
const CONTESTED: u32 = 32;
const OWN: u32 = 200;

fn shared_key(j: u32) -> FlowKey {
    key(j)
}
fn contested_key(j: u32) -> FlowKey {
    key(100_000 + j)
}
fn own_key(child: u32, j: u32) -> FlowKey {
    key(200_000 + child * 1000 + j)
}

fn tx(frames: u64) -> FlowUpdate {
    FlowUpdate {
        tx_frames: frames,
        tx_bytes: frames * 100,
        ..FlowUpdate::default()
    }
}

/// Bytes are always 100 per frame: a torn read shows as a mismatch.
fn torn(s: &FlowSnapshot) -> bool {
    s.tx_bytes != s.tx_frames * 100 || s.rx_bytes != s.rx_frames * 100
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("child needs {name}"))
}

fn attach(path: &str) -> SharedRegion {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    SharedRegion::attach_fd(file).unwrap()
}

fn spawn_child(role: &str, vars: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        CHILD_TEST,
        "--test-threads=1",
        "--nocapture",
        "-q",
    ])
    .env(ROLE_ENV, role)
    .stdout(Stdio::null());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.spawn().expect("re-executing the test binary")
}

/// A crash-test child, SIGKILLed and reaped on drop unless already reaped,
/// so a failing test never leaves a stopped process holding a lock (and
/// the test's output pipe) behind.
struct Reaper {
    pid: Pid,
    reaped: bool,
}

impl Reaper {
    /// Take over `child`; it is reaped with waitpid (WUNTRACED sees a stop,
    /// which std's Child cannot), never with Child::wait.
    fn new(child: Child) -> Reaper {
        Reaper {
            pid: Pid::from_raw(child.id() as i32),
            reaped: false,
        }
    }

    fn wait(&mut self, flags: Option<WaitPidFlag>) -> WaitStatus {
        let status = waitpid(self.pid, flags).unwrap();
        if !matches!(status, WaitStatus::Stopped(..)) {
            self.reaped = true;
        }
        status
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = waitpid(self.pid, None);
        }
    }
}

/// Entry point of child processes; a no-op in the parent's test run.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    match role.as_str() {
        "stress" => stress_child(),
        "crash" => crash_child(),
        other => panic!("unknown child role {other}"),
    }
    // End the process here, before libtest reports this test: the child's
    // results are already written and flushed.
    std::process::exit(0);
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("qpnet-mp-{}-{name}", std::process::id()))
}

// ---- stress ----------------------------------------------------------------

#[derive(Default)]
struct StressResult {
    shared_frames: HashMap<u32, u64>,
    shared_created: u64,
    contested: HashMap<u32, (u64, u64)>,
    own: HashMap<u32, u64>,
    ops: u64,
    lookups: u64,
    violations: Vec<String>,
}

fn stress_child() {
    let region = attach(&env("QPNET_REGION"));
    let t = region
        .flow_table()
        .unwrap()
        .with_lock_wait(LockWait::Forever);
    let me: u32 = env("QPNET_CHILD").parse().unwrap();
    let deadline = Instant::now() + Duration::from_millis(env("QPNET_MS").parse().unwrap());
    let mut rng = Rng(0x51ed_270b_2f5e_0f21 ^ ((u64::from(me) + 1) * 0x9e37_79b9));
    let mut res = StressResult::default();
    let mut cache = FlowCache::new(me as usize);
    while Instant::now() < deadline {
        for _ in 0..64 {
            res.ops += 1;
            let r = rng.below(100);
            let j = rng.next() as u32;
            let f = 1 + rng.below(4);
            if r < 20 {
                // Shared flows through the table directly.
                let j = j % SHARED;
                match t.record(&shared_key(j), &tx(f), me as usize, 1).unwrap() {
                    Recorded::Created { .. } => res.shared_created += 1,
                    Recorded::Updated { .. } => {}
                    Recorded::Full => bad(&mut res, "shared flow refused".into()),
                }
                *res.shared_frames.entry(j).or_default() += f;
            } else if r < 35 {
                // Shared flows through a worker cache: a burst, one flush.
                let j = j % SHARED;
                for _ in 0..f {
                    cache.note(&shared_key(j), Direction::Tx, 100, 0);
                }
                let rep = cache.flush(&t, 1);
                res.shared_created += rep.flows_created;
                if rep.untracked_frames != 0 {
                    bad(&mut res, format!("cache untracked {rep:?}"));
                }
                *res.shared_frames.entry(j).or_default() += f;
            } else if r < 55 {
                let j = j % CONTESTED;
                let e = res.contested.entry(j).or_default();
                if rng.next().is_multiple_of(2) {
                    match t.record(&contested_key(j), &tx(1), me as usize, 1).unwrap() {
                        Recorded::Created { .. } => e.0 += 1,
                        Recorded::Updated { .. } => {}
                        Recorded::Full => bad(&mut res, "contested flow refused".into()),
                    }
                } else if t.remove(&contested_key(j)).unwrap().is_some() {
                    e.1 += 1;
                }
            } else if r < 80 {
                let j = j % OWN;
                let k = own_key(me, j);
                match res.own.get(&j).copied() {
                    None => match t.record(&k, &tx(f), me as usize, 1).unwrap() {
                        Recorded::Created { .. } => {
                            res.own.insert(j, f);
                        }
                        other => bad(&mut res, format!("own insert {j}: {other:?}")),
                    },
                    Some(n) if rng.next().is_multiple_of(3) => match t.remove(&k).unwrap() {
                        Some(s) if s.tx_frames == n && !torn(&s) => {
                            res.own.remove(&j);
                        }
                        other => bad(&mut res, format!("own remove {j}: {other:?} want {n}")),
                    },
                    Some(n) => match t.record(&k, &tx(f), me as usize, 1).unwrap() {
                        Recorded::Updated { .. } => {
                            res.own.insert(j, n + f);
                        }
                        other => bad(&mut res, format!("own update {j}: {other:?}")),
                    },
                }
            } else {
                res.lookups += 1;
                let j = j % OWN;
                match t.reader().lookup(&own_key(me, j)) {
                    Ok(found) => {
                        let got = found.map(|s| (s.tx_frames, torn(&s)));
                        let want = res.own.get(&j).map(|&n| (n, false));
                        if got != want {
                            bad(&mut res, format!("own lookup {j}: {got:?} want {want:?}"));
                        }
                    }
                    Err(_busy) => {}
                }
                if let Ok(Some(s)) = t.reader().lookup(&shared_key(j % SHARED)) {
                    if torn(&s) {
                        bad(&mut res, format!("torn shared read {s:?}"));
                    }
                }
            }
        }
        if res.ops % 4096 < 64 {
            let torn_seen = t.reader().iter().filter(torn).count();
            if torn_seen != 0 {
                bad(&mut res, format!("{torn_seen} torn entries in a scan"));
            }
        }
    }
    write_stress_result(&res, &env("QPNET_RESULT"));
}

fn bad(res: &mut StressResult, what: String) {
    if res.violations.len() < 20 {
        res.violations.push(what);
    }
}

fn write_stress_result(res: &StressResult, path: &str) {
    let mut out = String::new();
    for (j, n) in &res.shared_frames {
        out += &format!("shared {j} {n}\n");
    }
    for (j, (c, r)) in &res.contested {
        out += &format!("contested {j} {c} {r}\n");
    }
    for (j, n) in &res.own {
        out += &format!("own {j} {n}\n");
    }
    out += &format!("shared_created {}\nops {}\n", res.shared_created, res.ops);
    out += &format!("lookups {}\n", res.lookups);
    for v in &res.violations {
        out += &format!("violation {v}\n");
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(out.as_bytes()).unwrap();
    f.sync_all().unwrap();
}

fn read_stress_result(path: &Path) -> StressResult {
    let text = std::fs::read_to_string(path).unwrap();
    let mut res = StressResult::default();
    for line in text.lines() {
        let f: Vec<&str> = line.splitn(4, ' ').collect();
        let n = |i: usize| f[i].parse::<u64>().unwrap();
        match f[0] {
            "shared" => {
                res.shared_frames.insert(n(1) as u32, n(2));
            }
            "contested" => {
                res.contested.insert(n(1) as u32, (n(2), n(3)));
            }
            "own" => {
                res.own.insert(n(1) as u32, n(2));
            }
            "shared_created" => res.shared_created = n(1),
            "ops" => res.ops = n(1),
            "lookups" => res.lookups = n(1),
            "violation" => res.violations.push(line.to_string()),
            other => panic!("bad result line {other}"),
        }
    }
    res
}

/// N processes insert, update, look up and delete concurrently; afterwards
/// no entry is lost or duplicated and every counter adds up.
#[test]
fn stress_many_processes_keep_every_invariant() {
    const CHILDREN: u32 = 4;
    let ms: u64 = std::env::var("QPNET_STRESS_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let path = temp_path("stress.shm");
    let region = SharedRegion::create_with(&path, 4, 4096).unwrap();
    let children: Vec<(Child, PathBuf)> = (0..CHILDREN)
        .map(|c| {
            let result = temp_path(&format!("stress-{c}.txt"));
            let child = spawn_child(
                "stress",
                &[
                    ("QPNET_REGION", path.display().to_string()),
                    ("QPNET_CHILD", c.to_string()),
                    ("QPNET_MS", ms.to_string()),
                    ("QPNET_RESULT", result.display().to_string()),
                ],
            );
            (child, result)
        })
        .collect();
    let mut results = Vec::new();
    for (mut child, result) in children {
        let status = child.wait().unwrap();
        assert!(status.success(), "stress child failed: {status}");
        results.push(read_stress_result(&result));
        std::fs::remove_file(result).unwrap();
    }
    let t = region
        .flow_table()
        .unwrap()
        .with_lock_wait(LockWait::Forever);
    let r = t.reader();
    for (c, res) in results.iter().enumerate() {
        assert!(res.violations.is_empty(), "child {c}: {:?}", res.violations);
        assert!(res.ops > 1000 && res.lookups > 100, "child {c} barely ran");
    }
    // Shared flows: created exactly once each, every frame counted.
    let mut live = 0;
    let mut created = 0;
    for j in 0..SHARED {
        let want: u64 = results.iter().filter_map(|r| r.shared_frames.get(&j)).sum();
        match r.lookup(&shared_key(j)).unwrap() {
            Some(s) => {
                assert_eq!((s.tx_frames, s.tx_bytes), (want, want * 100), "shared {j}");
                live += 1;
            }
            None => assert_eq!(want, 0, "shared flow {j} lost"),
        }
    }
    created += results.iter().map(|r| r.shared_created).sum::<u64>();
    assert_eq!(created, live, "shared flows created more than once");
    // Contested flows: present exactly when created - removed is 1.
    for j in 0..CONTESTED {
        let (c, d) = results
            .iter()
            .filter_map(|r| r.contested.get(&j))
            .fold((0, 0), |(c, d), (c2, d2)| (c + c2, d + d2));
        let present = r.lookup(&contested_key(j)).unwrap().is_some();
        assert_eq!(
            c - d,
            u64::from(present),
            "contested {j}: {c} created, {d} removed"
        );
        live += u64::from(present);
        created += c;
    }
    // Private flows: exactly each child's model.
    for (c, res) in results.iter().enumerate() {
        for j in 0..OWN {
            let got = r
                .lookup(&own_key(c as u32, j))
                .unwrap()
                .map(|s| s.tx_frames);
            assert_eq!(got, res.own.get(&j).copied(), "child {c} own flow {j}");
        }
        live += res.own.len() as u64;
    }
    let audit = t.audit().unwrap();
    assert!(audit.is_clean(), "{audit:?}");
    assert_eq!(audit.live as u64, live, "entries nobody accounts for");
    assert_eq!(r.iter().count() as u64, live);
    let counters = r.counters();
    assert_eq!((counters.repairs, counters.refused), (0, 0));
    assert!(created <= counters.created);
    let ops: u64 = results.iter().map(|r| r.ops).sum();
    eprintln!(
        "stress: {CHILDREN} processes, {ms} ms, {ops} operations, {live} flows left, \
         {} created, {} removed",
        counters.created, counters.removed
    );
    std::fs::remove_file(path).unwrap();
}

// ---- killed lock holder ---------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

fn point_name(p: CrashPoint) -> &'static str {
    match p {
        CrashPoint::IntentWritten => "intent",
        CrashPoint::InsertHalfWritten => "insert-half",
        CrashPoint::UpdateHalfWritten => "update-half",
        CrashPoint::DeleteTagCleared => "delete-tag",
        CrashPoint::CommittedBeforeUnlock => "committed",
    }
}

fn point_by_name(name: &str) -> CrashPoint {
    [
        CrashPoint::IntentWritten,
        CrashPoint::InsertHalfWritten,
        CrashPoint::UpdateHalfWritten,
        CrashPoint::DeleteTagCleared,
        CrashPoint::CommittedBeforeUnlock,
    ]
    .into_iter()
    .find(|p| point_name(*p) == name)
    .unwrap()
}

fn crash_child() {
    let region = attach(&env("QPNET_REGION"));
    let t = region
        .flow_table()
        .unwrap()
        .with_lock_wait(LockWait::Forever);
    let k = key(env("QPNET_KEY").parse().unwrap());
    let action = match env("QPNET_ACTION").as_str() {
        "stop" => CrashAction::Stop,
        _ => CrashAction::Kill,
    };
    arm(point_by_name(&env("QPNET_POINT")), action);
    match env("QPNET_OP").as_str() {
        "insert" | "update" => {
            let _ = t.record(&k, &tx(1), 1, 7);
        }
        _ => {
            let _ = t.remove(&k);
        }
    }
    // The crash point was not reached: the parent sees exit code 3.
    std::process::exit(3);
}

/// What one crash round does: the operation, where it dies, how.
struct Round {
    op: Op,
    point: CrashPoint,
    action: CrashAction,
    key: u32,
}

fn rounds(n: usize) -> Vec<Round> {
    let plan = [
        (Op::Insert, CrashPoint::IntentWritten),
        (Op::Insert, CrashPoint::InsertHalfWritten),
        (Op::Update, CrashPoint::UpdateHalfWritten),
        (Op::Delete, CrashPoint::DeleteTagCleared),
        (Op::Update, CrashPoint::IntentWritten),
        (Op::Insert, CrashPoint::CommittedBeforeUnlock),
        (Op::Delete, CrashPoint::IntentWritten),
        (Op::Update, CrashPoint::CommittedBeforeUnlock),
        (Op::Delete, CrashPoint::CommittedBeforeUnlock),
        (Op::Update, CrashPoint::UpdateHalfWritten),
    ];
    (0..n)
        .map(|i| {
            let (op, point) = plan[i % plan.len()];
            Round {
                op,
                point,
                // Every fifth round the holder dies on its own (SIGKILL at the
                // point); otherwise it stops there and a waiter lines up first.
                action: if i % 5 == 4 {
                    CrashAction::Kill
                } else {
                    CrashAction::Stop
                },
                key: match op {
                    Op::Insert => 10_000 + i as u32,
                    _ => (i % 64) as u32,
                },
            }
        })
        .collect()
}

/// A process SIGKILLed inside a stripe's critical section, its write half
/// done, never blocks the others: a waiter proceeds within 100 ms, the
/// stripe is rolled back or kept whole, and the repair is counted in the
/// header. 100 rounds over every crash point.
#[test]
fn killed_lock_holder_never_blocks_the_others() {
    let path = temp_path("crash.shm");
    let region = SharedRegion::create_with(&path, 4, 256).unwrap();
    let t = region
        .flow_table()
        .unwrap()
        .with_lock_wait(LockWait::Forever);
    for j in 0..64 {
        t.record(&key(j), &tx(1), 0, 1).unwrap();
    }
    let mut worst = Duration::ZERO;
    for (i, round) in rounds(100).iter().enumerate() {
        let k = key(round.key);
        if round.op != Op::Insert && t.reader().lookup(&k).unwrap().is_none() {
            t.record(&k, &tx(1), 0, 1).unwrap();
        }
        let before = t.reader().lookup(&k).unwrap();
        let repairs_before = t.reader().counters().repairs;
        let held = held_stripes(&t, round, &k, before.as_ref());
        // A bystander flow in the first held stripe, not the round's key.
        let (bystander, bystander_at) = (0..64)
            .filter(|&j| j != round.key)
            .find_map(|j| {
                let s = t.reader().lookup(&key(j)).unwrap()?;
                (s.at.stripe as usize == held[0]).then_some((key(j), s.at))
            })
            .expect("every stripe of a 4-stripe table holds some of 64 flows");
        let bystander_frames = t.reader().lookup(&bystander).unwrap().unwrap().tx_frames;

        let mut child = Reaper::new(spawn_child(
            "crash",
            &[
                ("QPNET_REGION", path.display().to_string()),
                ("QPNET_KEY", round.key.to_string()),
                ("QPNET_OP", round.op.name().to_string()),
                ("QPNET_POINT", point_name(round.point).to_string()),
                (
                    "QPNET_ACTION",
                    if round.action == CrashAction::Stop {
                        "stop"
                    } else {
                        "kill"
                    }
                    .to_string(),
                ),
            ],
        ));
        let waited = Instant::now();
        let latency = match round.action {
            CrashAction::Stop => {
                match child.wait(Some(WaitPidFlag::WUNTRACED)) {
                    WaitStatus::Stopped(_, Signal::SIGSTOP) => {}
                    other => panic!("round {i}: child did not stop at its crash point: {other:?}"),
                }
                other_stripes_proceed(&t, &held, round.key);
                waiter_after_kill(&t, &mut child, &bystander, bystander_at)
            }
            CrashAction::Kill => {
                match child.wait(None) {
                    WaitStatus::Signaled(_, Signal::SIGKILL, _) => {}
                    other => panic!("round {i}: child did not die at its crash point: {other:?}"),
                }
                let start = Instant::now();
                t.record_hinted(&bystander, Some(bystander_at), &tx(1), 0, 1)
                    .unwrap();
                start.elapsed()
            }
        };
        assert!(
            latency < Duration::from_millis(100),
            "round {i}: others blocked {latency:?} by a dead holder"
        );
        assert!(waited.elapsed() < Duration::from_secs(20));
        worst = worst.max(latency);
        assert_eq!(
            t.reader().counters().repairs,
            repairs_before + 1,
            "round {i}: the waiter's stripe repaired once"
        );
        // Locking everything repairs any second stripe the child held.
        let audit = t.audit().unwrap();
        assert!(audit.is_clean(), "round {i} {:?}: {audit:?}", round.point);
        assert_eq!(
            t.reader().counters().repairs,
            repairs_before + held.len() as u64,
            "round {i}: one repair per held stripe"
        );
        let after = t.reader().lookup(&k).unwrap();
        check_outcome(i, round, before, after);
        let b = t.reader().lookup(&bystander).unwrap().unwrap();
        assert_eq!(
            b.tx_frames,
            bystander_frames + 1,
            "round {i}: bystander update"
        );
    }
    eprintln!("crash: 100 rounds, worst wait for a dead holder's stripe {worst:?}");
    std::fs::remove_file(path).unwrap();
}

/// Stripes the child holds at its crash point: the entry's stripe for an
/// update or delete, both candidate stripes for an insert.
fn held_stripes(
    t: &FlowTable,
    round: &Round,
    k: &FlowKey,
    before: Option<&FlowSnapshot>,
) -> Vec<usize> {
    match (round.op, before) {
        (Op::Insert, _) => {
            let h = t.reader().hash(k);
            let mask = t.reader().stripe_count() - 1;
            let (a, b) = (h as usize & mask, (h >> 32) as usize & mask);
            if a == b {
                vec![a]
            } else {
                vec![a.min(b), a.max(b)]
            }
        }
        (_, Some(s)) => vec![s.at.stripe as usize],
        (_, None) => panic!("update/delete of an absent flow"),
    }
}

/// While the holder is stopped, flows of stripes it does not hold are
/// updated at once.
fn other_stripes_proceed(t: &FlowTable, held: &[usize], skip: u32) {
    let free: Vec<(FlowKey, crate::SlotRef)> = (0..64)
        .filter(|&j| j != skip)
        .filter_map(|j| {
            let s = t.reader().lookup(&key(j)).unwrap()?;
            (!held.contains(&(s.at.stripe as usize))).then_some((key(j), s.at))
        })
        .take(4)
        .collect();
    let start = Instant::now();
    for (k, at) in &free {
        let before = t.reader().lookup(k).unwrap().unwrap().tx_frames;
        t.record_hinted(k, Some(*at), &tx(1), 0, 1).unwrap();
        assert_eq!(t.reader().lookup(k).unwrap().unwrap().tx_frames, before + 1);
    }
    assert!(start.elapsed() < Duration::from_millis(100));
}

/// With the holder stopped inside its critical section, start a waiter on
/// its stripe, make sure it is blocked, SIGKILL the holder and time how
/// long the waiter still waits.
fn waiter_after_kill(
    t: &FlowTable,
    child: &mut Reaper,
    bystander: &FlowKey,
    at: crate::SlotRef,
) -> Duration {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            t.record_hinted(bystander, Some(at), &tx(1), 0, 1).unwrap();
            done.store(true, Ordering::SeqCst);
            Instant::now()
        });
        std::thread::sleep(Duration::from_millis(15));
        assert!(!done.load(Ordering::SeqCst), "waiter got a held lock");
        let killed = Instant::now();
        kill(child.pid, Signal::SIGKILL).unwrap();
        let finished = waiter.join().unwrap();
        match child.wait(None) {
            WaitStatus::Signaled(_, Signal::SIGKILL, _) => {}
            other => panic!("child not killed: {other:?}"),
        }
        finished.saturating_duration_since(killed)
    })
}

/// Rolled back whole, or (the intent already retired) kept whole.
fn check_outcome(
    i: usize,
    round: &Round,
    before: Option<FlowSnapshot>,
    after: Option<FlowSnapshot>,
) {
    if round.point != CrashPoint::CommittedBeforeUnlock {
        assert_eq!(
            after, before,
            "round {i} {:?}: not rolled back",
            round.point
        );
        return;
    }
    match round.op {
        Op::Insert => {
            let a = after.expect("committed insert kept");
            assert_eq!((a.tx_frames, a.owner), (1, 1), "round {i}");
        }
        Op::Update => {
            let (a, b) = (after.unwrap(), before.unwrap());
            assert_eq!(a.tx_frames, b.tx_frames + 1, "round {i}");
        }
        Op::Delete => assert_eq!(after, None, "round {i}"),
    }
}

// ---- stopped (not dead) lock holder ---------------------------------------

/// A holder that is stopped rather than dead keeps its lock; a worker's
/// flush then loses at most one bounded wait: flows of that stripe go
/// untracked (counted), every other flow is recorded.
#[test]
fn stopped_holder_costs_a_flush_one_bounded_wait() {
    let path = temp_path("stopped.shm");
    let region = SharedRegion::create_with(&path, 4, 1024).unwrap();
    let t = region.flow_table().unwrap();
    for j in 0..64 {
        t.record(&key(j), &tx(1), 0, 1).unwrap();
    }
    let victim = t.reader().lookup(&key(0)).unwrap().unwrap().at.stripe;
    let in_victim: Vec<u32> = (0..64)
        .filter(|&j| t.reader().lookup(&key(j)).unwrap().unwrap().at.stripe == victim)
        .collect();
    let mut child = Reaper::new(spawn_child(
        "crash",
        &[
            ("QPNET_REGION", path.display().to_string()),
            ("QPNET_KEY", "0".to_string()),
            ("QPNET_OP", "update".to_string()),
            (
                "QPNET_POINT",
                point_name(CrashPoint::UpdateHalfWritten).to_string(),
            ),
            ("QPNET_ACTION", "stop".to_string()),
        ],
    ));
    match child.wait(Some(WaitPidFlag::WUNTRACED)) {
        WaitStatus::Stopped(_, Signal::SIGSTOP) => {}
        other => panic!("child did not stop: {other:?}"),
    }
    let mut cache = FlowCache::new(0);
    for j in 0..64 {
        cache.note(&key(j), Direction::Tx, 100, 0);
    }
    let start = Instant::now();
    let report = cache.flush(&t, 2);
    let took = start.elapsed();
    kill(child.pid, Signal::SIGKILL).unwrap();
    child.wait(None);
    assert_eq!(
        report.untracked_frames,
        in_victim.len() as u64,
        "{report:?}"
    );
    assert_eq!(report.flows_updated, 64 - in_victim.len() as u64);
    assert!(took < Duration::from_millis(200), "flush stalled {took:?}");
    let c = t.reader().counters();
    assert!(c.lock_timeouts >= 1);
    // The next flush after the kill repairs the stripe and records it all.
    let report = {
        for j in 0..64 {
            cache.note(&key(j), Direction::Tx, 100, 0);
        }
        cache.flush(&t, 3)
    };
    assert_eq!((report.untracked_frames, report.flows_updated), (0, 64));
    assert_eq!(t.reader().counters().repairs, 1);
    assert!(t.audit().unwrap().is_clean());
    std::fs::remove_file(path).unwrap();
}
