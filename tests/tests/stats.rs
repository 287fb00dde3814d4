//! `qpnet stats` against real instances: what it prints must be what the
//! test moved, exactly, in every format; it must say clearly (with exit
//! codes scripts can use) when there is nothing to read; and it must keep
//! working while workers die and restart under load.
//!
//! - four queue pairs under test-VMM traffic: `--json` per-queue counters,
//!   flows and flow table equal what was sent and received; the table fits
//!   120 columns; `--prometheus` is valid exposition format and agrees;
//! - no instance (exit 3), a region left behind by a dead primary (exit 3),
//!   a region of another layout version or garbage (exit 4), bad arguments
//!   (exit 2);
//! - a worker killed under load while `qpnet stats` runs in a tight loop:
//!   every run succeeds with a sane document, the restart is counted;
//! - `--watch 0.2` prints frames with nonzero rates while traffic flows.
//!
//! `bench_stats_watch_overhead` (ignored: a benchmark, not a test) measures
//! what `qpnet stats --watch 0.1` costs the data path.
//!
//! Needs root and the release binary (`cargo build --release -p
//! qpnet-primary`, or `$QPNET_BIN`).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use qpnet_shared::{SharedRegion, LAYOUT_VERSION, MAGIC};
use qpnet_tests::crash_traffic::{run_load, LoadConfig, StampedTap};
use qpnet_tests::frames::mixed_len;
use qpnet_tests::json::{self, num, Brief};
use qpnet_tests::qpnet::{cpu_time, qpnet_binary, run_qpnet, Qpnet};
use qpnet_tests::testbed::{Testbed, TAP_NAME};
use qpnet_tests::traffic::{rx_traffic, send_tx, RxReport, TapCollector};
use qpnet_tests::vmm::{Vmm, VmmConfig};
use qpnet_tests::wait::poll_until;

const TIMEOUT: Duration = Duration::from_secs(60);
/// Exit codes of `qpnet stats`.
const EXIT_USAGE: i32 = 2;
const EXIT_NO_INSTANCE: i32 = 3;
const EXIT_INCOMPATIBLE: i32 = 4;
/// The widest a table line may be.
const TABLE_WIDTH: usize = 120;

/// RX frames of the fixed-length round, their length and their flows.
const RX_COUNT: u32 = 3_200;
const RX_LEN: usize = 1_000;
const RX_FLOWS: u16 = 32;
/// The UDP ports of the RX test frames (see `qpnet_tests::frames`).
const RX_GUEST_PORT: u16 = 5555;
const RX_REMOTE_PORT_BASE: u16 = 40_000;

fn rx_fixed_len(_seq: u32) -> usize {
    RX_LEN
}

/// `qpnet stats --name NAME ARGS`, checked to exit 0; its stdout.
fn stats_ok(q: &Qpnet, args: &[&str]) -> Result<String> {
    let out = q.stats_command(args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "qpnet stats {args:?} exited with {}; stderr: {}; stdout: {stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// `qpnet stats --json` as a document.
fn stats_json(q: &Qpnet, extra: &[&str]) -> Result<json::Value> {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let text = stats_ok(q, &args)?;
    json::parse(&text).with_context(|| format!("qpnet stats --json printed:\n{text}"))
}

fn queues(doc: &json::Value) -> Result<&[json::Value]> {
    json::array(doc, "queues")
}

/// Wait until the workers have published `rx_total` RX frames in all (the
/// last batch's counters land a moment after its frames).
fn settled_stats(q: &Qpnet, tx_total: u64, rx_total: u64, extra: &[&str]) -> Result<json::Value> {
    poll_until(
        &format!("stats to show {tx_total} TX and {rx_total} RX frames"),
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            let doc = stats_json(q, extra)?;
            let totals = doc.get("totals").context("no totals")?;
            let done =
                num(totals, "tx_frames")? >= tx_total && num(totals, "rx_frames")? >= rx_total;
            Ok(done.then_some(doc))
        },
    )
}

/// Send `per_queue` test frames on every TX queue, all checked on the TAP.
fn tx_round(bed: &mut Testbed, vmm: &mut Vmm, per_queue: u32) -> Result<()> {
    let qps: Vec<usize> = (0..vmm.tx.len()).collect();
    let collector = TapCollector::start(&bed.tap)?;
    let r = send_tx(vmm, &qps, 0..per_queue, &collector, TIMEOUT)
        .and_then(|()| collector.wait_received(u64::from(per_queue) * qps.len() as u64, TIMEOUT))
        .and_then(|()| {
            let expected: Vec<_> = qps.iter().map(|&q| (q as u16, 0..per_queue)).collect();
            collector.check(&expected)
        });
    collector.finish()?;
    bed.explain(r)
}

/// RX frames of one round, refusing kernel frames (they would make exact
/// counts impossible; the test namespace has IPv6 off to prevent them).
fn rx_round(
    bed: &mut Testbed,
    vmm: &mut Vmm,
    count: u32,
    len_of: fn(u32) -> usize,
) -> Result<RxReport> {
    let r = rx_traffic(vmm, &bed.tap, count, RX_FLOWS, len_of, TIMEOUT);
    let report = bed.explain(r)?;
    ensure!(
        report.foreign == 0 && report.stale == 0,
        "frames the test did not send reached the guest: {report:?}"
    );
    Ok(report)
}

/// Per queue pair: TX frames and bytes exactly as sent.
fn check_tx_counts(doc: &json::Value, per_queue: u32) -> Result<()> {
    let bytes: u64 = (0..per_queue).map(|s| mixed_len(s) as u64).sum();
    for q in queues(doc)? {
        let qp = num(q, "queue_pair")?;
        ensure!(
            (num(q, "tx_frames")?, num(q, "tx_bytes")?) == (u64::from(per_queue), bytes),
            "queue pair {qp}: stats say {} TX frames / {} bytes, the test sent {per_queue} / {bytes}",
            num(q, "tx_frames")?,
            num(q, "tx_bytes")?
        );
        for d in [
            "drops",
            "drop_runt",
            "drop_bad_descriptor",
            "drop_tap_error",
        ] {
            ensure!(num(q, d)? == 0, "queue pair {qp}: {d} = {}", num(q, d)?);
        }
    }
    Ok(())
}

/// Per queue pair: RX frames as the VMM received them; bytes too when
/// `len` (all frames of that length) is given; totals add up.
fn check_rx_counts(doc: &json::Value, per_queue: &[u64], len: Option<usize>) -> Result<()> {
    let qs = queues(doc)?;
    ensure!(qs.len() == per_queue.len(), "{} queues listed", qs.len());
    for (q, &want) in qs.iter().zip(per_queue) {
        let qp = num(q, "queue_pair")?;
        ensure!(
            num(q, "rx_frames")? == want,
            "queue pair {qp}: stats say {} RX frames, the VMM received {want} on it",
            num(q, "rx_frames")?
        );
        if let Some(len) = len {
            ensure!(
                num(q, "rx_bytes")? == want * len as u64,
                "queue pair {qp}: stats say {} RX bytes, the VMM received {want} frames of {len}",
                num(q, "rx_bytes")?
            );
        }
    }
    let totals = doc.get("totals").context("no totals")?;
    for key in ["tx_frames", "tx_bytes", "rx_frames", "rx_bytes"] {
        let sum: u64 = qs.iter().map(|q| num(q, key)).sum::<Result<u64>>()?;
        ensure!(num(totals, key)? == sum, "totals.{key} is not the sum");
    }
    Ok(())
}

/// The flow table after the fixed-length RX round: one flow per RX test
/// flow, each with exactly its frames and bytes, owned by the queue pair
/// the TAP delivered it on; TX test frames (not IP) counted as unparsed.
fn check_flows(doc: &json::Value, tx_frames: u64, rx_per_queue: &[u64]) -> Result<()> {
    ensure!(
        doc.get("flow_tracking").and_then(json::Value::as_bool) == Some(true),
        "flow tracking is not on: {}",
        doc.get("flow_tracking")
            .map_or("absent".into(), |v| v.brief())
    );
    let flows = doc
        .get("flows")
        .and_then(json::Value::as_array)
        .context("no \"flows\" array")?;
    ensure!(
        flows.len() == usize::from(RX_FLOWS),
        "{} flows listed, the test sent {RX_FLOWS}: {}",
        flows.len(),
        doc.get("flows").map(|v| v.brief()).unwrap_or_default()
    );
    let per_flow = u64::from(RX_COUNT / u32::from(RX_FLOWS));
    let mut ports = BTreeSet::new();
    let mut owned = vec![0u64; rx_per_queue.len()];
    for f in flows {
        let text = f.get("flow").and_then(json::Value::as_str).unwrap_or("?");
        let port = num(f, "remote_port")?;
        ensure!(
            f.get("protocol").and_then(json::Value::as_str) == Some("udp")
                && f.get("guest_addr").and_then(json::Value::as_str) == Some("10.77.0.2")
                && f.get("remote_addr").and_then(json::Value::as_str) == Some("10.77.0.1")
                && num(f, "guest_port")? == u64::from(RX_GUEST_PORT)
                && (u64::from(RX_REMOTE_PORT_BASE)..u64::from(RX_REMOTE_PORT_BASE + RX_FLOWS))
                    .contains(&port),
            "unexpected flow {text}"
        );
        ensure!(
            text == format!("udp 10.77.0.2:{RX_GUEST_PORT} <-> 10.77.0.1:{port}"),
            "flow printed as {text:?}"
        );
        ports.insert(port);
        ensure!(
            (
                num(f, "rx_frames")?,
                num(f, "rx_bytes")?,
                num(f, "tx_frames")?
            ) == (per_flow, per_flow * RX_LEN as u64, 0),
            "flow {text}: {} RX frames / {} bytes / {} TX frames; the test sent {per_flow} \
             frames of {RX_LEN} bytes",
            num(f, "rx_frames")?,
            num(f, "rx_bytes")?,
            num(f, "tx_frames")?
        );
        let owner = num(f, "owner")? as usize;
        *owned.get_mut(owner).context("owner out of range")? += 1;
    }
    ensure!(ports.len() == usize::from(RX_FLOWS), "flows repeated");
    let table = doc.get("flow_table").context("no flow_table")?;
    ensure!(
        num(table, "used")? == u64::from(RX_FLOWS) && num(table, "created")? == u64::from(RX_FLOWS),
        "flow table: {}",
        table.brief()
    );
    ensure!(num(table, "capacity")? >= 64, "{}", table.brief());
    for key in ["refused", "repairs", "lock_failures", "scrubbed"] {
        ensure!(num(table, key)? == 0, "flow table {key}: {}", table.brief());
    }
    let totals = doc.get("totals").context("no totals")?;
    let rx_total: u64 = rx_per_queue.iter().sum();
    ensure!(
        num(totals, "flows_created")? == u64::from(RX_FLOWS)
            && num(totals, "flow_unparsed_frames")? == tx_frames
            && num(totals, "flow_untracked_frames")? == 0
            && num(totals, "tracked_frames")? == rx_total
            && num(totals, "flow_affinity_misses")? == 0,
        "flow counters do not match the traffic (created {RX_FLOWS}, unparsed {tx_frames}, \
         tracked {rx_total}, no misses expected): {}",
        totals.brief()
    );
    for (q, &n) in queues(doc)?.iter().zip(&owned) {
        ensure!(
            num(q, "flows_owned")? == n && num(q, "flows_created")? == n,
            "queue pair {}: owns {} flows and created {}, the flow list says {n}",
            num(q, "queue_pair")?,
            num(q, "flows_owned")?,
            num(q, "flows_created")?
        );
    }
    Ok(())
}

/// Every line of the table fits; the queue rows are there.
fn check_table(text: &str, queue_pairs: usize) -> Result<()> {
    for line in text.lines() {
        ensure!(
            line.chars().count() <= TABLE_WIDTH,
            "table line wider than {TABLE_WIDTH}: {line:?}"
        );
    }
    let rows = text
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("running"))
        .count();
    ensure!(rows == queue_pairs, "{rows} running queue rows in:\n{text}");
    Ok(())
}

/// The Prometheus samples agree with the JSON document.
fn check_prometheus_agrees(text: &str, doc: &json::Value) -> Result<()> {
    let samples = prometheus::check(text).with_context(|| format!("exposition:\n{text}"))?;
    let value = |metric: &str, qp: Option<u64>| -> Result<f64> {
        samples
            .iter()
            .find(|s| {
                s.name == metric
                    && qp.is_none_or(|qp| {
                        s.labels
                            .iter()
                            .any(|(k, v)| k == "queue_pair" && *v == qp.to_string())
                    })
            })
            .map(|s| s.value)
            .with_context(|| format!("no sample {metric} for queue pair {qp:?}"))
    };
    for q in queues(doc)? {
        let qp = num(q, "queue_pair")?;
        for key in [
            "tx_frames",
            "tx_bytes",
            "rx_frames",
            "rx_bytes",
            "flow_unparsed_frames",
        ] {
            let v = value(&format!("qpnet_queue_{key}_total"), Some(qp))?;
            ensure!(
                v == num(q, key)? as f64,
                "queue pair {qp}: prometheus {key} {v}, JSON {}",
                num(q, key)?
            );
        }
        ensure!(value("qpnet_worker_restarts_total", Some(qp))? == 0.0);
        let running = samples.iter().any(|s| {
            s.name == "qpnet_worker_state"
                && s.value == 1.0
                && s.labels.contains(&("queue_pair".into(), qp.to_string()))
                && s.labels.contains(&("state".into(), "running".into()))
        });
        ensure!(running, "queue pair {qp} not shown running");
    }
    let table = doc.get("flow_table").context("no flow_table")?;
    ensure!(value("qpnet_flow_table_capacity", None)? == num(table, "capacity")? as f64);
    ensure!(value("qpnet_flow_table_used", None)? == num(table, "used")? as f64);
    ensure!(value("qpnet_flow_table_repairs_total", None)? == num(table, "repairs")? as f64);
    Ok(())
}

#[test]
fn four_queue_pairs_stats_count_exactly_what_the_test_moved() -> Result<()> {
    const TX_PER_QUEUE: u32 = 3_000;
    let mut bed = Testbed::new(4)?;
    let mut vmm = bed.vmm(VmmConfig {
        queue_pairs: 4,
        event_idx: true,
        ..VmmConfig::default()
    })?;
    tx_round(&mut bed, &mut vmm, TX_PER_QUEUE)?;
    let fixed = rx_round(&mut bed, &mut vmm, RX_COUNT, rx_fixed_len)?;
    ensure!(
        fixed.per_queue.iter().filter(|&&n| n > 0).count() >= 2,
        "RX flows should spread over several queues: {:?}",
        fixed.per_queue
    );
    let tx_total = u64::from(TX_PER_QUEUE) * 4;
    let doc = settled_stats(&bed.qpnet, tx_total, u64::from(RX_COUNT), &["--top", "100"])?;
    check_tx_counts(&doc, TX_PER_QUEUE)?;
    check_rx_counts(&doc, &fixed.per_queue, Some(RX_LEN))?;
    check_flows(&doc, tx_total, &fixed.per_queue)?;
    for (q, st) in queues(&doc)?.iter().zip(0..) {
        ensure!(
            q.get("state").and_then(json::Value::as_str) == Some("running")
                && num(q, "pid")? != 0
                && num(q, "restarts")? == 0,
            "queue pair {st}: {}",
            q.brief()
        );
        let age = num(q, "heartbeat_age_ms")?;
        ensure!(age < 5_000, "queue pair {st}: heartbeat {age} ms old");
    }
    let table = stats_ok(&bed.qpnet, &["--top", "5"])?;
    println!("{table}");
    check_table(&table, 4)?;
    ensure!(
        table.contains(&format!("udp 10.77.0.2:{RX_GUEST_PORT} <-> 10.77.0.1:")),
        "the table lists no test flow:\n{table}"
    );
    let prom = stats_ok(&bed.qpnet, &["--prometheus"])?;
    check_prometheus_agrees(&prom, &doc)?;

    // A second RX round of mixed lengths: frames per queue and total bytes
    // still exact.
    let mixed = rx_round(&mut bed, &mut vmm, 2_000, mixed_len)?;
    let per_queue: Vec<u64> = fixed
        .per_queue
        .iter()
        .zip(&mixed.per_queue)
        .map(|(a, b)| a + b)
        .collect();
    let rx_total: u64 = per_queue.iter().sum();
    let doc = settled_stats(&bed.qpnet, tx_total, rx_total, &[])?;
    check_rx_counts(&doc, &per_queue, None)?;
    let bytes =
        u64::from(RX_COUNT) * RX_LEN as u64 + (0..2_000).map(|s| mixed_len(s) as u64).sum::<u64>();
    let totals = doc.get("totals").context("no totals")?;
    ensure!(
        num(totals, "rx_bytes")? == bytes,
        "total RX bytes {} != {bytes} sent",
        num(totals, "rx_bytes")?
    );
    let flows = doc
        .get("flows")
        .and_then(json::Value::as_array)
        .context("no flows")?;
    ensure!(
        flows.len() == 10,
        "--top defaults to 10 flows, {} listed",
        flows.len()
    );
    bed.qpnet.check_alive()
}

/// `qpnet stats ARGS` with a bound on its run time.
fn stats_bounded(args: &[&str]) -> Result<Output> {
    let mut child = Command::new(qpnet_binary()?)
        .arg("stats")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "qpnet stats {args:?} still running after 10 s; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child.wait_with_output()?)
}

/// It exited with `code`, printed nothing on stdout, and stderr has every
/// one of `needles`.
fn ensure_refused(what: &str, out: &Output, code: i32, needles: &[&str]) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(code),
        "{what}: exit {:?}, expected {code}; stderr: {stderr}",
        out.status.code()
    );
    ensure!(
        out.stdout.is_empty(),
        "{what}: printed on stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for n in needles {
        ensure!(stderr.contains(n), "{what}: stderr lacks {n:?}: {stderr}");
    }
    ensure!(!stderr.contains("panicked"), "{what}: panicked: {stderr}");
    Ok(())
}

/// A runtime directory of the test's own, removed on drop.
struct RuntimeBase(PathBuf);

impl RuntimeBase {
    fn new() -> Result<RuntimeBase> {
        let p = std::env::temp_dir().join(format!("{}-run", qpnet_tests::unique_name()));
        std::fs::create_dir_all(&p)?;
        Ok(RuntimeBase(p))
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 temp dir")
    }

    /// The instance directory `name`, created.
    fn instance(&self, name: &str) -> Result<PathBuf> {
        let d = self.0.join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }
}

impl Drop for RuntimeBase {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn stats_without_a_running_instance_exits_3_and_says_so() -> Result<()> {
    let name = qpnet_tests::unique_name();
    for extra in [&[][..], &["--json"], &["--prometheus"], &["--watch", "0.1"]] {
        let mut args = vec!["--name", name.as_str()];
        args.extend_from_slice(extra);
        let out = stats_bounded(&args)?;
        ensure_refused(
            &format!("stats {args:?}"),
            &out,
            EXIT_NO_INSTANCE,
            &["no qpnet instance", &name, "is running", "does not exist"],
        )?;
    }
    let base = RuntimeBase::new()?;
    let out = stats_bounded(&["--name", &name, "--runtime-dir", base.arg()])?;
    ensure_refused(
        "an empty --runtime-dir",
        &out,
        EXIT_NO_INSTANCE,
        &[&name, base.arg()],
    )?;
    // A region left behind by a primary that was killed: valid, but nobody
    // holds the instance lock. Shown as not running, never as live figures.
    let dir = base.instance(&name)?;
    let region = SharedRegion::create(&dir.join("stats.shm"), 2)?;
    let out = stats_bounded(&["--name", &name, "--runtime-dir", base.arg()])?;
    ensure_refused(
        "a region without a primary",
        &out,
        EXIT_NO_INSTANCE,
        &["no qpnet instance", "left behind", "holds no lock"],
    )?;
    std::fs::write(dir.join("lock"), "1\n")?;
    let out = stats_bounded(&["--name", &name, "--runtime-dir", base.arg(), "--json"])?;
    ensure_refused(
        "a region whose lock nobody holds",
        &out,
        EXIT_NO_INSTANCE,
        &["left behind"],
    )?;
    drop(region);
    Ok(())
}

/// A region file of layout `version`: just enough header for a reader to
/// see the magic and the version.
fn fake_region(path: &Path, version: u32) -> Result<()> {
    let mut bytes = vec![0u8; 4096];
    bytes[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    bytes[8..12].copy_from_slice(&version.to_le_bytes());
    bytes[12..16].copy_from_slice(&192u32.to_le_bytes());
    bytes[16..20].copy_from_slice(&192u32.to_le_bytes());
    bytes[20..24].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(path, bytes)?;
    Ok(())
}

#[test]
fn stats_on_a_region_it_cannot_read_exits_4_and_says_why() -> Result<()> {
    let base = RuntimeBase::new()?;
    let name = "other-build";
    let shm = base.instance(name)?.join("stats.shm");
    let other = LAYOUT_VERSION + 1;
    for version in [LAYOUT_VERSION - 1, other] {
        fake_region(&shm, version)?;
        for extra in [&[][..], &["--json"], &["--prometheus"]] {
            let mut args = vec!["--name", name, "--runtime-dir", base.arg()];
            args.extend_from_slice(extra);
            let out = stats_bounded(&args)?;
            ensure_refused(
                &format!("layout version {version}"),
                &out,
                EXIT_INCOMPATIBLE,
                &[
                    &format!("layout version {version}"),
                    &format!("reads version {LAYOUT_VERSION}"),
                ],
            )?;
        }
    }
    let mut garbage = vec![0u8; 8192];
    let mut x: u32 = 0x1234_5678;
    for b in garbage.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(&shm, &garbage)?;
    let out = stats_bounded(&["--name", name, "--runtime-dir", base.arg()])?;
    ensure_refused(
        "a garbage region",
        &out,
        EXIT_INCOMPATIBLE,
        &["not a qpnet shared region"],
    )?;
    std::fs::write(&shm, b"")?;
    let out = stats_bounded(&["--name", name, "--runtime-dir", base.arg(), "--json"])?;
    ensure_refused("an empty region file", &out, EXIT_INCOMPATIBLE, &["bytes"])?;
    Ok(())
}

/// Garbage over everything a reader must not trust (queue blocks, header
/// counters, the whole flow table), with a valid identity and geometry and
/// the instance lock held: `qpnet stats` prints, in every format, without a
/// panic, and shows impossible states as invalid rather than as a state.
#[test]
fn stats_on_a_corrupted_region_prints_without_crashing() -> Result<()> {
    use std::os::unix::fs::FileExt;
    let base = RuntimeBase::new()?;
    let name = "corrupt";
    let dir = base.instance(name)?;
    let shm = dir.join("stats.shm");
    let region = SharedRegion::create_with(&shm, 4, 4096)?;
    let lock = std::fs::File::create(dir.join("lock"))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .context("locking the fake instance")?;
    let file = std::fs::OpenOptions::new().write(true).open(&shm)?;
    let len = file.metadata()?.len();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    // Header: keep magic, version, sizes, queue pairs (0..24) and the flow
    // geometry (64..128); garble the rest.
    file.write_all_at(&noise(40), 24)?;
    file.write_all_at(&noise(64), 128)?;
    file.write_all_at(&noise(len as usize - 192), 192)?;
    // One state far out of range, for certain.
    file.write_all_at(&0xdead_beefu32.to_le_bytes(), 192 + 124)?;
    for extra in [&[][..], &["--json", "--top", "1000"], &["--prometheus"]] {
        let mut args = vec!["--name", name, "--runtime-dir", base.arg()];
        args.extend_from_slice(extra);
        let out = stats_bounded(&args)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() && !stderr.contains("panicked"),
            "stats {extra:?} on a corrupted region: {}; stderr: {stderr}",
            out.status
        );
        match extra.first() {
            Some(&"--json") => {
                let doc = json::parse(&stdout)?;
                ensure!(queues(&doc)?.len() == 4);
                ensure!(
                    stdout.contains("\"invalid(3735928559)\""),
                    "an out-of-range state is not shown as invalid:\n{stdout}"
                );
            }
            Some(_) => {
                prometheus::check(&stdout)?;
            }
            None => {
                println!("{stdout}");
                for line in stdout.lines() {
                    ensure!(line.chars().count() <= TABLE_WIDTH, "wide line {line:?}");
                }
            }
        }
    }
    drop(region);
    Ok(())
}

#[test]
fn stats_arguments_are_checked() -> Result<()> {
    for (args, needle) in [
        (&["--watch", "0"][..], "between"),
        (&["--watch=-1"], "between"),
        (&["--watch", "NaN"], "between"),
        (&["--watch", "0.5", "--prometheus"], "--prometheus"),
    ] {
        let out = stats_bounded(args)?;
        ensure_refused(&format!("stats {args:?}"), &out, EXIT_USAGE, &[needle])?;
    }
    let out = run_qpnet(&["stats", "--json", "--prometheus"])?;
    ensure!(
        out.status.code() == Some(EXIT_USAGE),
        "--json --prometheus accepted"
    );
    let out = run_qpnet(&["stats", "--name", "../etc"])?;
    ensure!(!out.status.success(), "a name with a slash accepted");
    Ok(())
}

/// One `qpnet stats --json` run during the restart test.
struct Observation {
    at: Duration,
    states: Vec<String>,
    pids: Vec<u64>,
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
            let table = stats_ok(q, &[])?;
            check_table_shape(&table, queue_pairs)?;
            continue;
        }
        let doc = stats_json(q, &[])?;
        let qs = queues(&doc)?;
        ensure!(
            qs.len() == queue_pairs,
            "{} queues in {}",
            qs.len(),
            doc.brief()
        );
        let mut obs = Observation {
            at: start.elapsed(),
            states: Vec::new(),
            pids: Vec::new(),
            restarts: Vec::new(),
        };
        for q in qs {
            let state = q.get("state").and_then(json::Value::as_str).unwrap_or("?");
            ensure!(
                ["running", "starting", "restarting"].contains(&state),
                "worker state {state:?} while a worker restarts: {}",
                q.brief()
            );
            obs.states.push(state.to_owned());
            obs.pids.push(num(q, "pid")?);
            obs.restarts.push(num(q, "restarts")?);
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
    let before = stats_json(&bed.qpnet, &[])?;
    let old_pid = num(&queues(&before)?[VICTIM], "pid")?;
    let other_pid = num(&queues(&before)?[0], "pid")?;
    let qpnet = &bed.qpnet;
    let cfg = LoadConfig::default();
    let r = run_load(&mut vmm, &bed.tap, &stamped, &cfg, |view| {
        view.wait_flowing(&[0, 1], 200, Duration::from_secs(20))?;
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| -> Result<Vec<Observation>> {
            let looper = s.spawn(|| stats_loop(qpnet, QPS, &stop));
            std::thread::sleep(Duration::from_millis(200));
            kill(Pid::from_raw(old_pid as i32), Signal::SIGKILL)?;
            let restarted = poll_until(
                "the killed worker to be replaced",
                Duration::from_secs(15),
                Duration::from_millis(20),
                || {
                    let region = qpnet.stats()?;
                    let q = region.queue(VICTIM).context("queue")?;
                    let pid = q.pid.load(Ordering::Relaxed);
                    let running = q.worker_state() == Some(qpnet_shared::WorkerState::Running);
                    Ok((running && pid != 0 && u64::from(pid) != old_pid).then_some(()))
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
    let after = stats_json(&bed.qpnet, &[])?;
    let v = &queues(&after)?[VICTIM];
    ensure!(
        num(v, "restarts")? == 1
            && v.get("state").and_then(json::Value::as_str) == Some("running")
            && num(v, "pid")? != old_pid,
        "after the restart: {}",
        v.brief()
    );
    println!(
        "{} stats runs during the restart; {not_running} saw the victim not running",
        seen.len()
    );
    bed.qpnet.check_alive()
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
    let frames: Vec<json::Value> = json_text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(json::parse)
        .collect::<Result<_>>()
        .with_context(|| format!("--watch --json printed:\n{json_text}"))?;
    let mut with_rates = 0;
    for f in &frames {
        let rates = f.get("rates").context("a watch frame without rates")?;
        let dt = rates
            .get("interval_s")
            .and_then(json::Value::as_f64)
            .context("no interval_s")?;
        ensure!((0.1..1.0).contains(&dt), "interval {dt} s for --watch 0.2");
        let totals = rates.get("totals").context("no rate totals")?;
        let rate = |k: &str| totals.get(k).and_then(json::Value::as_f64).unwrap_or(0.0);
        if rate("tx_frames_per_s") > 0.0 && rate("rx_frames_per_s") > 0.0 {
            with_rates += 1;
        }
        ensure!(f.get("flow_table").is_some() && f.get("flows").is_some());
        for q in queues(f)? {
            ensure!(
                q.get("rates").is_some(),
                "a queue without rates: {}",
                q.brief()
            );
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
    Ok(())
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
    let workers = bed.qpnet.worker_pids();
    let cpu = |pids: &[u32]| -> Result<Duration> { pids.iter().map(|&p| cpu_time(p)).sum() };
    let stats_pid: Vec<u32> = stats.iter().map(Child::id).collect();
    let (w0, s0) = (cpu(&workers)?, cpu(&stats_pid)?);
    let t0 = Instant::now();
    let qps = vmm.tx.len();
    tx_round(bed, vmm, frames / qps as u32)?;
    rx_round(bed, vmm, frames, mixed_len)?;
    let elapsed = t0.elapsed();
    let (w1, s1) = (cpu(&workers)?, cpu(&stats_pid)?);
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
/// test --release -p qpnet-tests --test stats -- --ignored --nocapture
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
    bed.qpnet.check_alive()
}

/// First quartile, median, third quartile.
fn quartiles(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    let at = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
    [at(0.25), at(0.5), at(0.75)]
}

/// A checker for the Prometheus text exposition format (0.0.4): comment
/// lines, metric and label names, label value escapes, numeric values,
/// one HELP and TYPE per family before its samples, families contiguous.
mod prometheus {
    use std::collections::HashSet;

    use anyhow::{bail, ensure, Context, Result};

    /// One sample line.
    #[derive(Debug)]
    pub struct Sample {
        pub name: String,
        pub labels: Vec<(String, String)>,
        pub value: f64,
    }

    fn is_metric_name(s: &str) -> bool {
        let mut c = s.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    }

    fn is_label_name(s: &str) -> bool {
        let mut c = s.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
    }

    fn parse_value(s: &str) -> Result<f64> {
        match s {
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            _ => {
                ensure!(
                    s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)),
                    "value {s:?} is not a number"
                );
                s.parse().with_context(|| format!("value {s:?}"))
            }
        }
    }

    /// Parse `{a="x",b="y"}` at the start of `s`; return labels and rest.
    fn parse_labels(s: &str) -> Result<(Vec<(String, String)>, &str)> {
        let mut labels = Vec::new();
        let mut rest = s.strip_prefix('{').context("labels must start with {")?;
        loop {
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix('}') {
                return Ok((labels, r));
            }
            let eq = rest.find('=').context("label without '='")?;
            let name = rest[..eq].trim();
            ensure!(is_label_name(name), "bad label name {name:?}");
            ensure!(
                !labels.iter().any(|(k, _)| k == name),
                "label {name} repeated"
            );
            rest = rest[eq + 1..]
                .trim_start()
                .strip_prefix('"')
                .context("label value must be quoted")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    None => bail!("unterminated label value"),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => bail!("bad escape {other:?} in label value"),
                    },
                    Some((_, '\n')) => bail!("newline in label value"),
                    Some((_, c)) => value.push(c),
                }
            };
            labels.push((name.to_owned(), value));
            rest = rest[end + 1..].trim_start();
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else {
                ensure!(rest.starts_with('}'), "expected ',' or '}}' after a label");
            }
        }
    }

    fn parse_sample(line: &str) -> Result<Sample> {
        let name_end = line
            .find(|c: char| c == '{' || c.is_ascii_whitespace())
            .context("sample without a value")?;
        let name = &line[..name_end];
        ensure!(is_metric_name(name), "bad metric name {name:?}");
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..])?
        } else {
            (Vec::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().context("no value")?)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .with_context(|| format!("bad timestamp {ts:?}"))?;
        }
        ensure!(fields.next().is_none(), "trailing fields");
        Ok(Sample {
            name: name.to_owned(),
            labels,
            value,
        })
    }

    /// The family a sample belongs to (histogram/summary suffixes folded).
    fn family_of<'a>(name: &'a str, typed: &HashSet<String>) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if typed.contains(base) {
                    return base;
                }
            }
        }
        name
    }

    /// Check a whole exposition; return its samples.
    pub fn check(text: &str) -> Result<Vec<Sample>> {
        ensure!(
            text.ends_with('\n'),
            "the exposition must end with a newline"
        );
        let mut helped = HashSet::new();
        let mut typed: HashSet<String> = HashSet::new();
        let mut finished: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        let mut series = HashSet::new();
        let mut samples = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let at = || format!("line {}: {line:?}", n + 1);
            if line.trim().is_empty() {
                continue;
            }
            if let Some(c) = line.strip_prefix('#') {
                let words: Vec<&str> = c.trim_start().splitn(3, ' ').collect();
                match words.first().copied() {
                    Some("HELP") => {
                        let name = words.get(1).with_context(at)?;
                        ensure!(is_metric_name(name), "{}: bad name", at());
                        ensure!(helped.insert(name.to_string()), "{}: HELP twice", at());
                    }
                    Some("TYPE") => {
                        let name = words.get(1).with_context(at)?;
                        let kind = words.get(2).with_context(at)?;
                        ensure!(is_metric_name(name), "{}: bad name", at());
                        ensure!(
                            ["counter", "gauge", "histogram", "summary", "untyped"].contains(kind),
                            "{}: unknown type",
                            at()
                        );
                        ensure!(
                            !samples.iter().any(|s: &Sample| s.name == *name),
                            "{}: TYPE after samples",
                            at()
                        );
                        ensure!(typed.insert(name.to_string()), "{}: TYPE twice", at());
                    }
                    _ => {}
                }
                continue;
            }
            let s = parse_sample(line).with_context(at)?;
            let family = family_of(&s.name, &typed).to_owned();
            if current.as_deref() != Some(family.as_str()) {
                ensure!(
                    !finished.contains(&family),
                    "{}: samples of {family} are not together",
                    at()
                );
                if let Some(prev) = current.replace(family.clone()) {
                    finished.insert(prev);
                }
            }
            let mut key: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            key.sort();
            ensure!(
                series.insert((s.name.clone(), key)),
                "{}: the same series twice",
                at()
            );
            samples.push(s);
        }
        ensure!(!samples.is_empty(), "no samples");
        Ok(samples)
    }

    #[test]
    fn the_checker_accepts_good_and_refuses_bad_expositions() {
        let good = "# HELP a_total Things.\n# TYPE a_total counter\n\
                    a_total{q=\"0\",n=\"x\\\"y\\\\z\\n\"} 12\na_total{q=\"1\",n=\"\"} 1.5e3\n\
                    # TYPE g gauge\ng -Inf\ng{x=\"1\"} NaN 1700000000000\n";
        let s = check(good).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].labels[1].1, "x\"y\\z\n");
        for bad in [
            "1a 3\n",
            "a{1b=\"x\"} 3\n",
            "a{b=x} 3\n",
            "a{b=\"x\\q\"} 3\n",
            "a 3 4 5\n",
            "a three\n",
            "a 3",
            "# TYPE a counter\n# TYPE a counter\na 1\n",
            "a 1\n# TYPE a counter\n",
            "a 1\nb 1\na{x=\"1\"} 2\n",
            "a 1\na 2\n",
            "# TYPE a countr\na 1\n",
            "a{b=\"1\",b=\"2\"} 1\n",
        ] {
            assert!(check(bad).is_err(), "accepted {bad:?}");
        }
    }
}
