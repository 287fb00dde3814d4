//! Flow table throughput: `cargo run --release --example flow_bench -p qpnet-shared`.
//!
//! Measures, on a default-size table (65,536 entries) in a region file under
//! /dev/shm, one process alone and then two processes at once (this binary
//! re-executed as a second process on the same region, its own flows):
//!   update   lookup+update of an existing flow (`FlowTable::record`)
//!   hinted   the same with the slot hint a worker's cache keeps
//!   burst    frames through a `FlowCache`: 32-frame bursts over 4 flows,
//!            one flush per burst (figure is frames/s)
//!   lookup   lock-free lookup (`FlowReader::lookup`, what stats does)
//!   insert   a new flow (rounds of 4,096 inserts ...)
//!   delete   ... then their removal
//! Each timed phase lasts `--seconds` (default 1). Not a test: figures
//! depend on the machine and its load.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qpnet_shared::{
    protocol, Direction, FlowCache, FlowKey, FlowTable, FlowUpdate, LockWait, SharedRegion,
};

const ROLE_ENV: &str = "FLOW_BENCH_ROLE";
const PREPOPULATED: u32 = 16_384;
const ROUND: u32 = 4_096;
const PHASES: [&str; 6] = ["update", "hinted", "burst", "lookup", "insert", "delete"];

fn key(process: u32, n: u32) -> FlowKey {
    let [_, b, c, d] = n.to_be_bytes();
    FlowKey::v4(
        protocol::TCP,
        (Ipv4Addr::new(10, 77, process as u8, b), 1024 + u16::from(c)),
        (Ipv4Addr::new(10, 78, 0, d), 443),
    )
}

fn frame() -> FlowUpdate {
    FlowUpdate::frame(Direction::Tx, 1500, 0)
}

/// Per-phase (operations, seconds spent) of one process.
type Figures = [(u64, f64); 6];

/// Run every phase against `region` as process `me`, starting at `start`.
fn run(region: &SharedRegion, me: u32, phase: Duration, start: Instant) -> Figures {
    let t = region
        .flow_table()
        .expect("writable region")
        .with_lock_wait(LockWait::Forever);
    let qp = me as usize;
    for n in 0..PREPOPULATED {
        t.record(&key(me, n), &frame(), qp, 1).unwrap();
    }
    let mut out: Figures = [(0, 0.0); 6];
    let slot = |k: u32| start + (phase + Duration::from_millis(100)) * k;
    wait_until(slot(0));
    out[0] = timed(phase, |i| {
        t.record(&key(me, i % PREPOPULATED), &frame(), qp, 2)
            .unwrap();
    });
    wait_until(slot(1));
    let hints: Vec<_> = (0..PREPOPULATED)
        .map(|n| t.reader().lookup(&key(me, n)).unwrap().unwrap().at)
        .collect();
    out[1] = timed(phase, |i| {
        let n = i % PREPOPULATED;
        t.record_hinted(&key(me, n), Some(hints[n as usize]), &frame(), qp, 3)
            .unwrap();
    });
    wait_until(slot(2));
    let mut cache = FlowCache::new(qp);
    let (bursts, secs) = timed(phase, |i| burst(&mut cache, &t, me, i));
    out[2] = (bursts * 32, secs);
    wait_until(slot(3));
    let reader = t.reader();
    out[3] = timed(phase, |i| {
        reader.lookup(&key(me, i % PREPOPULATED)).unwrap().unwrap();
    });
    wait_until(slot(4));
    let (ins, del) = insert_delete_rounds(&t, me, phase);
    out[4] = ins;
    out[5] = del;
    out
}

fn burst(cache: &mut FlowCache, t: &FlowTable, me: u32, i: u32) {
    for f in 0..32 {
        let k = key(me, (i * 4 + f % 4) % PREPOPULATED);
        cache.note(&k, Direction::Tx, 1500, 0);
    }
    cache.flush(t, 4);
}

/// Alternate rounds of inserting ROUND fresh flows and deleting them until
/// `phase` has passed; returns the (count, seconds) of each kind.
fn insert_delete_rounds(t: &FlowTable, me: u32, phase: Duration) -> ((u64, f64), (u64, f64)) {
    let end = Instant::now() + phase;
    let (mut ins, mut del) = ((0u64, 0f64), (0u64, 0f64));
    while Instant::now() < end {
        let base = PREPOPULATED;
        let s = Instant::now();
        for n in base..base + ROUND {
            t.record(&key(me, n), &frame(), me as usize, 5).unwrap();
        }
        ins.0 += u64::from(ROUND);
        ins.1 += s.elapsed().as_secs_f64();
        let s = Instant::now();
        for n in base..base + ROUND {
            t.remove(&key(me, n)).unwrap().expect("inserted flow");
        }
        del.0 += u64::from(ROUND);
        del.1 += s.elapsed().as_secs_f64();
    }
    (ins, del)
}

/// Call `op(i)` for i = 0, 1, ... until `phase` has passed.
fn timed(phase: Duration, mut op: impl FnMut(u32)) -> (u64, f64) {
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < phase {
        for _ in 0..256 {
            op(n);
            n = n.wrapping_add(1);
        }
    }
    (u64::from(n), start.elapsed().as_secs_f64())
}

fn wait_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

fn print_row(label: &str, figs: &[Figures]) {
    print!("{label:<26}");
    for p in 0..PHASES.len() {
        let rate: f64 = figs.iter().map(|f| f[p].0 as f64 / f[p].1.max(1e-9)).sum();
        print!(" {:>10.2}", rate / 1e6);
    }
    println!();
}

fn encode(f: &Figures) -> String {
    f.iter()
        .map(|(n, s)| format!("{n}:{s}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn decode(line: &str) -> Figures {
    let mut out: Figures = [(0, 0.0); 6];
    for (slot, field) in out.iter_mut().zip(line.split_whitespace()) {
        let (n, s) = field.split_once(':').expect("n:s");
        *slot = (n.parse().expect("count"), s.parse().expect("seconds"));
    }
    out
}

fn child(path: &Path, phase: Duration, start_in: Duration) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("region file");
    let region = SharedRegion::attach_fd(file).expect("attach");
    let figs = run(&region, 1, phase, Instant::now() + start_in);
    println!("{}", encode(&figs));
}

fn main() {
    let seconds: f64 = std::env::args()
        .skip_while(|a| a != "--seconds")
        .nth(1)
        .map(|v| v.parse().expect("--seconds N"))
        .unwrap_or(1.0);
    let phase = Duration::from_secs_f64(seconds);
    if let Ok(path) = std::env::var(ROLE_ENV) {
        let start_in: u64 = std::env::var("FLOW_BENCH_START_MS")
            .unwrap()
            .parse()
            .unwrap();
        child(Path::new(&path), phase, Duration::from_millis(start_in));
        return;
    }
    let path = PathBuf::from(format!("/dev/shm/qpnet-flow-bench-{}", std::process::id()));
    println!("flow table benchmark, {seconds} s per phase, Mops/s (burst: Mframes/s)");
    print!("{:<26}", "");
    for p in PHASES {
        print!(" {p:>10}");
    }
    println!();

    let region = SharedRegion::create(&path, 2).expect("region");
    let one = run(&region, 0, phase, Instant::now());
    print_row("1 process", &[one]);
    drop(region);

    let region = SharedRegion::create(&path, 2).expect("region");
    let start_in = Duration::from_millis(1500);
    let start = Instant::now() + start_in;
    let other = Command::new(std::env::current_exe().expect("own path"))
        .args(["--seconds", &seconds.to_string()])
        .env(ROLE_ENV, &path)
        .env("FLOW_BENCH_START_MS", start_in.as_millis().to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("second process");
    let mine = run(&region, 0, phase, start);
    let out = other.wait_with_output().expect("second process output");
    let theirs = decode(String::from_utf8_lossy(&out.stdout).trim());
    print_row("2 processes (sum)", &[mine, theirs]);
    let c = region.flows().counters();
    println!(
        "table: {} live of {}, {} repairs, {} lock timeouts, {} refused",
        c.live, c.capacity, c.repairs, c.lock_timeouts, c.refused
    );
    drop(region);
    let _ = std::fs::remove_file(&path);
}
