//! Several processes insert, update, look up and delete in one table at
//! once; afterwards every entry and counter is accounted for.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use super::{attach, env, spawn_child, temp_path};
use crate::flow::testing::{key, tx, Rng};
use crate::{Direction, FlowCache, FlowKey, FlowSnapshot, LockWait, Recorded, SharedRegion};

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

/// Bytes are always 100 per frame: a torn read shows as a mismatch.
fn torn(s: &FlowSnapshot) -> bool {
    s.tx_bytes != s.tx_frames * 100 || s.rx_bytes != s.rx_frames * 100
}

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

pub(super) fn stress_child() {
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
