//! `qpnet stats` while things move: it keeps working while a worker dies
//! and restarts under load, and `--watch` shows rates while traffic flows.
//!
//! - a worker killed under load while `qpnet stats` runs in a tight loop
//!   (JSON and table, alternately): every run succeeds with a sane document,
//!   the other queue pair is untouched, the restart is counted once;
//! - `--watch 0.2` prints frames with nonzero rates while traffic flows, in
//!   JSON (one document per line) and as a table.
//!
//! `bench_stats_watch_overhead` (ignored: a benchmark, not a test) measures
//! what `qpnet stats --watch 0.1` costs the data path.
//!
//! Needs root and `$QPNET_BIN`.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::Signal;
use qpnet_tests::binary::qpnet_binary;
use qpnet_tests::crash::{run_load, LoadConfig, StampedTap};
use qpnet_tests::frames::mixed_len;
use qpnet_tests::proc::ProcHandle;
use qpnet_tests::qpnet::Qpnet;
use qpnet_tests::stats_json::StatsDoc;
use qpnet_tests::testbed::{Testbed, TAP_NAME};
use qpnet_tests::vmm::{Vmm, VmmConfig};
use qpnet_tests::wait::poll_until;

/// The widest a table line may be.
const TABLE_WIDTH: usize = 120;

/// One `qpnet stats --json` run during the restart test.
struct Observation {
    at: Duration,
    states: Vec<String>,
    pids: Vec<u32>,
    restarts: Vec<u64>,
}

/// Run `qpnet stats` (JSON and table, alternately) until `stop`; every run
/// must succeed with a complete, sane document.
fn stats_loop(q: &Qpnet, queue_pairs: usize, stop: &AtomicBool) -> Result<Vec<Observation>> {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut n = 0u32;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        if n.is_multiple_of(4) {
            let table = q.stats_ok(&[])?;
            check_table_shape(&table, queue_pairs)?;
            continue;
        }
        let doc = q.stats_json(&[])?;
        ensure!(
            doc.queues.len() == queue_pairs,
            "{} queues in {}",
            doc.queues.len(),
            doc.brief()
        );
        let mut obs = Observation {
            at: start.elapsed(),
            states: Vec::new(),
            pids: Vec::new(),
            restarts: Vec::new(),
        };
        for q in &doc.queues {
            ensure!(
                ["running", "starting", "restarting"].contains(&q.state.as_str()),
                "worker state {:?} while a worker restarts: {q:?}",
                q.state
            );
            obs.states.push(q.state.clone());
            obs.pids.push(q.pid.context("an impossible pid")?);
            obs.restarts.push(q.restarts);
        }
        seen.push(obs);
    }
    Ok(seen)
}

/// The table has its header and one row per queue pair, whatever state.
fn check_table_shape(text: &str, queue_pairs: usize) -> Result<()> {
    for line in text.lines() {
        ensure!(line.chars().count() <= TABLE_WIDTH, "wide line {line:?}");
    }
    let rows = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("qp "))
        .skip(1)
        .take(queue_pairs)
        .filter(|l| {
            l.split_whitespace()
                .next()
                .and_then(|w| w.parse::<usize>().ok())
                .is_some()
        })
        .count();
    ensure!(rows == queue_pairs, "{rows} queue rows in:\n{text}");
    Ok(())
}

#[test]
fn stats_while_a_worker_restarts_under_load_stays_sane() -> Result<()> {
    const QPS: usize = 2;
    const VICTIM: usize = 1;
    let mut bed = Testbed::new(QPS as u16)?;
    let mut vmm = bed.vmm(VmmConfig {
        queue_pairs: QPS as u16,
        event_idx: true,
        ..VmmConfig::default()
    })?;
    let stamped = StampedTap::open(&bed.ns, TAP_NAME)?;
    let before = bed.qpnet.stats_json(&[])?;
    let old_pid = before.queue(VICTIM)?.worker_pid()?;
    let other_pid = before.queue(0)?.worker_pid()?;
    let victim = ProcHandle::of(old_pid)?;
    let qpnet = &bed.qpnet;
    let cfg = LoadConfig::default();
    let r = run_load(&mut vmm, &bed.tap, &stamped, &cfg, |view| {
        view.wait_flowing(&[0, 1], 200, Duration::from_secs(20))?;
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| -> Result<Vec<Observation>> {
            let looper = s.spawn(|| stats_loop(qpnet, QPS, &stop));
            std::thread::sleep(Duration::from_millis(200));
            victim.signal(Signal::SIGKILL)?;
            let restarted = poll_until(
                "the killed worker to be replaced",
                Duration::from_secs(15),
                Duration::from_millis(20),
                || {
                    let region = qpnet.stats()?;
                    let q = region.queue(VICTIM).context("queue")?;
                    let pid = q.pid.load(Ordering::Relaxed);
                    let running = q.worker_state() == Some(qpnet_shared::WorkerState::Running);
                    Ok((running && pid != 0 && pid != old_pid).then_some(()))
                },
            );
            // Keep looking a little after the restart, under load.
            std::thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::Release);
            let seen = looper
                .join()
                .map_err(|_| anyhow::anyhow!("stats loop panicked"))?;
            restarted?;
            seen
        })
    });
    let (seen, _records) = bed.explain(r)?;
    ensure!(seen.len() >= 5, "only {} stats runs completed", seen.len());
    let mut last_restarts = 0;
    let mut not_running = 0;
    for o in &seen {
        ensure!(
            o.restarts[VICTIM] >= last_restarts && o.restarts[VICTIM] <= 1,
            "restarts went {last_restarts} -> {} at {:?}",
            o.restarts[VICTIM],
            o.at
        );
        last_restarts = o.restarts[VICTIM];
        ensure!(
            o.states[0] == "running" && o.pids[0] == other_pid && o.restarts[0] == 0,
            "the other queue pair changed: {:?} {:?} {:?}",
            o.states,
            o.pids,
            o.restarts
        );
        if o.states[VICTIM] != "running" {
            not_running += 1;
        }
    }
    let after = bed.qpnet.stats_json(&[])?;
    let v = after.queue(VICTIM)?;
    ensure!(
        v.restarts == 1 && v.state == "running" && v.worker_pid()? != old_pid,
        "after the restart: {v:?}"
    );
    println!(
        "{} stats runs during the restart; {not_running} saw the victim not running",
        seen.len()
    );
    bed.finish()
}

/// Read what a `--watch` child printed until it was killed.
fn watch_output(mut child: Child, run_for: Duration) -> Result<String> {
    std::thread::sleep(run_for);
    let _ = child.kill();
    let mut text = String::new();
    child
        .stdout
        .take()
        .context("watch stdout")?
        .read_to_string(&mut text)?;
    let status = child.wait()?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    ensure!(
        status.code().is_none(),
        "qpnet stats --watch ended by itself ({status}); stderr: {err}"
    );
    Ok(text)
}

fn spawn_watch(q: &Qpnet, args: &[&str]) -> Result<Child> {
    Ok(Command::new(qpnet_binary()?)
        .args(["stats", "--name", q.name()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

#[test]
fn watch_prints_rates_while_traffic_flows() -> Result<()> {
    let mut bed = Testbed::new(2)?;
    let mut vmm = bed.vmm(VmmConfig {
        queue_pairs: 2,
        event_idx: true,
        ..VmmConfig::default()
    })?;
    let stamped = StampedTap::open(&bed.ns, TAP_NAME)?;
    let qpnet = &bed.qpnet;
    let cfg = LoadConfig::default();
    let r = run_load(&mut vmm, &bed.tap, &stamped, &cfg, |view| {
        view.wait_flowing(&[0, 1], 100, Duration::from_secs(20))?;
        let json = watch_output(
            spawn_watch(qpnet, &["--watch", "0.2", "--json"])?,
            Duration::from_millis(1_100),
        )?;
        let table = watch_output(
            spawn_watch(qpnet, &["--watch", "0.2"])?,
            Duration::from_millis(700),
        )?;
        Ok((json, table))
    });
    let ((json_text, table), _records) = bed.explain(r)?;
    let frames = StatsDoc::parse_watch(&json_text)
        .with_context(|| format!("--watch --json printed:\n{json_text}"))?;
    let mut with_rates = 0;
    for f in &frames {
        let rates = f.rates.as_ref().context("a watch frame without rates")?;
        let dt = rates.interval_s;
        ensure!((0.1..1.0).contains(&dt), "interval {dt} s for --watch 0.2");
        if rates.total("tx_frames_per_s") > 0.0 && rates.total("rx_frames_per_s") > 0.0 {
            with_rates += 1;
        }
        for q in &f.queues {
            ensure!(q.rates.is_some(), "a queue without rates: {q:?}");
        }
    }
    ensure!(
        with_rates >= 2,
        "{} frames in 1.1 s, {with_rates} with nonzero TX and RX rates:\n{json_text}",
        frames.len()
    );
    ensure!(
        table.contains("rates per second") && table.contains("tx_frames/s"),
        "the watch table shows no rates:\n{table}"
    );
    for line in table.lines() {
        ensure!(line.chars().count() <= TABLE_WIDTH, "wide line {line:?}");
    }
    println!(
        "--watch 0.2: {} JSON frames in 1.1 s, {with_rates} with rates",
        frames.len()
    );
    bed.finish()
}

/// One measured run of the benchmark.
#[derive(Debug, Clone, Copy)]
struct BenchRun {
    frames_per_s: f64,
    worker_ns_per_frame: f64,
    stats_cpu_percent: f64,
}

fn bench_once(bed: &mut Testbed, vmm: &mut Vmm, watch: bool, frames: u32) -> Result<BenchRun> {
    let mut stats = if watch {
        Some(
            Command::new(qpnet_binary()?)
                .args(["stats", "--name", bed.qpnet.name(), "--watch", "0.1"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        )
    } else {
        None
    };
    std::thread::sleep(Duration::from_millis(300));
    let workers = bed.qpnet.workers();
    let cpu = |ps: &[ProcHandle]| -> Result<Duration> { ps.iter().map(|p| p.cpu_time()).sum() };
    let stats_proc: Vec<ProcHandle> = stats
        .iter()
        .map(|c| ProcHandle::of(c.id()))
        .collect::<Result<_>>()?;
    let (w0, s0) = (cpu(&workers)?, cpu(&stats_proc)?);
    let t0 = Instant::now();
    let qps = vmm.tx.len();
    bed.tx_round(vmm, frames / qps as u32)?;
    bed.rx_round(vmm, frames, 32, mixed_len)?;
    let elapsed = t0.elapsed();
    let (w1, s1) = (cpu(&workers)?, cpu(&stats_proc)?);
    if let Some(s) = stats.as_mut() {
        let _ = s.kill();
        let _ = s.wait();
    }
    let moved = 2.0 * f64::from(frames);
    Ok(BenchRun {
        frames_per_s: moved / elapsed.as_secs_f64(),
        worker_ns_per_frame: (w1 - w0).as_nanos() as f64 / moved,
        stats_cpu_percent: (s1 - s0).as_secs_f64() * 100.0 / elapsed.as_secs_f64(),
    })
}

/// What `qpnet stats --watch 0.1` costs the data path: the test VMM's
/// forwarding rate and the workers' CPU per frame, with and without it
/// running. Runs come in pairs (order alternated) so slow spells of a
/// shared machine hit both sides; the figure is the median of the pairs'
/// ratios, with its quartiles. A benchmark, not a pass/fail test: `cargo
/// test --release -p qpnet-tests --test stats_watch -- --ignored --nocapture
/// bench`.
#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_stats_watch_overhead() -> Result<()> {
    const PAIRS: usize = 15;
    const FRAMES: u32 = 30_000;
    let mut bed = Testbed::new(2)?;
    let mut vmm = bed.vmm(VmmConfig {
        queue_pairs: 2,
        event_idx: true,
        ..VmmConfig::default()
    })?;
    bench_once(&mut bed, &mut vmm, false, 4_000)?;
    let (mut rate, mut cpu, mut stats_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..PAIRS {
        let mut pair = [None, None];
        for watch in if i % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            let r = bench_once(&mut bed, &mut vmm, watch, FRAMES)?;
            println!("pair {i} watch={watch}: {r:?}");
            pair[usize::from(watch)] = Some(r);
        }
        let [Some(without), Some(with)] = pair else {
            bail!("pair {i} incomplete");
        };
        rate.push(with.frames_per_s / without.frames_per_s);
        cpu.push(with.worker_ns_per_frame / without.worker_ns_per_frame);
        stats_cpu.push(with.stats_cpu_percent);
    }
    let pct = |v: &[f64]| {
        let q = quartiles(v.to_vec());
        format!(
            "{:+.2}% (quartiles {:+.2}% .. {:+.2}%)",
            (q[1] - 1.0) * 100.0,
            (q[0] - 1.0) * 100.0,
            (q[2] - 1.0) * 100.0
        )
    };
    println!(
        "BENCH stats --watch 0.1 vs none, {PAIRS} paired runs of {FRAMES} TX + {FRAMES} RX \
         frames on 2 queue pairs: forwarding rate {}, worker CPU per frame {}; the stats \
         process used {:.2}% of one CPU (median)",
        pct(&rate),
        pct(&cpu),
        quartiles(stats_cpu)[1]
    );
    bed.finish()
}

/// First quartile, median, third quartile.
fn quartiles(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    let at = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
    [at(0.25), at(0.5), at(0.75)]
}
