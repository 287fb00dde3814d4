//! `qpnet stats` against a real instance under test-VMM traffic: what it
//! prints must be what the test moved, exactly, in every format.
//!
//! Four queue pairs: `--json` per-queue counters, totals, flows and the
//! flow table equal what was sent and received; the table fits 120 columns
//! and lists the queue pairs and flows; `--prometheus` is valid exposition
//! format and agrees with the JSON document; a second RX round of mixed
//! lengths keeps frames and bytes exact; `--top` defaults to 10 flows.
//!
//! Needs root and `$QPNET_BIN`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use qpnet_tests::frames::{mixed_len, UDP_PORT};
use qpnet_tests::prometheus;
use qpnet_tests::qpnet::Qpnet;
use qpnet_tests::stats_json::StatsDoc;
use qpnet_tests::testbed::Testbed;
use qpnet_tests::vmm::VmmConfig;
use qpnet_tests::wait::poll_until;

/// The widest a table line may be.
const TABLE_WIDTH: usize = 120;
/// RX frames of the fixed-length round, their length and their flows.
const RX_COUNT: u32 = 3_200;
const RX_LEN: usize = 1_000;
const RX_FLOWS: u16 = 32;
/// The remote UDP ports of the RX test frames (see `qpnet_tests::frames`).
const RX_REMOTE_PORT_BASE: u16 = 40_000;

fn rx_fixed_len(_seq: u32) -> usize {
    RX_LEN
}

/// Wait until the workers have published `tx_total` TX and `rx_total` RX
/// frames in all (the last batch's counters land a moment after its
/// frames).
fn settled_stats(q: &Qpnet, tx_total: u64, rx_total: u64, extra: &[&str]) -> Result<StatsDoc> {
    poll_until(
        &format!("stats to show {tx_total} TX and {rx_total} RX frames"),
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            let doc = q.stats_json(extra)?;
            let done = doc.totals.tx_frames >= tx_total && doc.totals.rx_frames >= rx_total;
            Ok(done.then_some(doc))
        },
    )
}

/// Per queue pair: TX frames and bytes exactly as sent, no drops.
fn check_tx_counts(doc: &StatsDoc, per_queue: u32) -> Result<()> {
    let bytes: u64 = (0..per_queue).map(|s| mixed_len(s) as u64).sum();
    for q in &doc.queues {
        let qp = q.queue_pair;
        ensure!(
            (q.tx_frames, q.tx_bytes) == (u64::from(per_queue), bytes),
            "queue pair {qp}: stats say {} TX frames / {} bytes, the test sent {per_queue} / {bytes}",
            q.tx_frames,
            q.tx_bytes
        );
        for d in [
            "drops",
            "drop_runt",
            "drop_bad_descriptor",
            "drop_tap_error",
        ] {
            ensure!(
                q.counter(d)? == 0,
                "queue pair {qp}: {d} = {}",
                q.counter(d)?
            );
        }
    }
    Ok(())
}

/// Per queue pair: RX frames as the VMM received them; bytes too when
/// `len` (all frames of that length) is given; totals add up.
fn check_rx_counts(doc: &StatsDoc, per_queue: &[u64], len: Option<usize>) -> Result<()> {
    ensure!(
        doc.queues.len() == per_queue.len(),
        "{} queues listed",
        doc.queues.len()
    );
    for (q, &want) in doc.queues.iter().zip(per_queue) {
        let qp = q.queue_pair;
        ensure!(
            q.rx_frames == want,
            "queue pair {qp}: stats say {} RX frames, the VMM received {want} on it",
            q.rx_frames
        );
        if let Some(len) = len {
            ensure!(
                q.rx_bytes == want * len as u64,
                "queue pair {qp}: stats say {} RX bytes, the VMM received {want} frames of {len}",
                q.rx_bytes
            );
        }
    }
    for key in ["tx_frames", "tx_bytes", "rx_frames", "rx_bytes"] {
        ensure!(
            doc.totals.counter(key)? == doc.sum(key)?,
            "totals.{key} is not the sum"
        );
    }
    Ok(())
}

/// The flow table after the fixed-length RX round: one flow per RX test
/// flow, each with exactly its frames and bytes, owned by the queue pair
/// the TAP delivered it on; TX test frames (not IP) counted as unparsed.
fn check_flows(doc: &StatsDoc, tx_frames: u64, rx_per_queue: &[u64]) -> Result<()> {
    ensure!(
        doc.flow_tracking == Some(true),
        "flow tracking is not on: {:?}",
        doc.flow_tracking
    );
    ensure!(
        doc.flows.len() == usize::from(RX_FLOWS),
        "{} flows listed, the test sent {RX_FLOWS}: {}",
        doc.flows.len(),
        doc.brief()
    );
    let per_flow = u64::from(RX_COUNT / u32::from(RX_FLOWS));
    let mut ports = BTreeSet::new();
    let mut owned = vec![0u64; rx_per_queue.len()];
    let remote_ports = RX_REMOTE_PORT_BASE..RX_REMOTE_PORT_BASE + RX_FLOWS;
    for f in &doc.flows {
        let port = f.remote_port;
        ensure!(
            f.protocol == "udp"
                && f.guest_addr == "10.77.0.2"
                && f.remote_addr == "10.77.0.1"
                && f.guest_port == UDP_PORT
                && remote_ports.contains(&port),
            "unexpected flow {}",
            f.flow
        );
        ensure!(
            f.flow == format!("udp 10.77.0.2:{UDP_PORT} <-> 10.77.0.1:{port}"),
            "flow printed as {:?}",
            f.flow
        );
        ports.insert(port);
        ensure!(
            (f.rx_frames, f.rx_bytes, f.tx_frames) == (per_flow, per_flow * RX_LEN as u64, 0),
            "flow {}: {} RX frames / {} bytes / {} TX frames; the test sent {per_flow} \
             frames of {RX_LEN} bytes",
            f.flow,
            f.rx_frames,
            f.rx_bytes,
            f.tx_frames
        );
        *owned.get_mut(f.owner).context("owner out of range")? += 1;
    }
    ensure!(ports.len() == usize::from(RX_FLOWS), "flows repeated");
    let table = &doc.flow_table;
    ensure!(
        table.used == u64::from(RX_FLOWS) && table.created == u64::from(RX_FLOWS),
        "flow table: {:?}",
        table
    );
    ensure!(table.capacity >= 64, "{table:?}");
    for key in ["refused", "repairs", "lock_failures", "scrubbed"] {
        ensure!(table.figure(key)? == 0, "flow table {key}: {table:?}");
    }
    let totals = &doc.totals;
    let rx_total: u64 = rx_per_queue.iter().sum();
    ensure!(
        totals.counter("flows_created")? == u64::from(RX_FLOWS)
            && totals.counter("flow_unparsed_frames")? == tx_frames
            && totals.counter("flow_untracked_frames")? == 0
            && totals.counter("tracked_frames")? == rx_total
            && totals.counter("flow_affinity_misses")? == 0,
        "flow counters do not match the traffic (created {RX_FLOWS}, unparsed {tx_frames}, \
         tracked {rx_total}, no misses expected): {totals:?}"
    );
    for (q, &n) in doc.queues.iter().zip(&owned) {
        ensure!(
            q.flows_owned == n && q.counter("flows_created")? == n,
            "queue pair {}: owns {} flows and created {}, the flow list says {n}",
            q.queue_pair,
            q.flows_owned,
            q.counter("flows_created")?
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
fn check_prometheus_agrees(text: &str, doc: &StatsDoc) -> Result<()> {
    let samples = prometheus::check(text).with_context(|| format!("exposition:\n{text}"))?;
    let value = |metric: &str, qp: Option<usize>| -> Result<f64> {
        samples
            .iter()
            .find(|s| {
                s.name == metric && qp.is_none_or(|qp| s.has_label("queue_pair", &qp.to_string()))
            })
            .map(|s| s.value)
            .with_context(|| format!("no sample {metric} for queue pair {qp:?}"))
    };
    for q in &doc.queues {
        let qp = q.queue_pair;
        for key in [
            "tx_frames",
            "tx_bytes",
            "rx_frames",
            "rx_bytes",
            "flow_unparsed_frames",
        ] {
            let v = value(&format!("qpnet_queue_{key}_total"), Some(qp))?;
            ensure!(
                v == q.counter(key)? as f64,
                "queue pair {qp}: prometheus {key} {v}, JSON {}",
                q.counter(key)?
            );
        }
        ensure!(value("qpnet_worker_restarts_total", Some(qp))? == 0.0);
        let running = samples.iter().any(|s| {
            s.name == "qpnet_worker_state"
                && s.value == 1.0
                && s.has_label("queue_pair", &qp.to_string())
                && s.has_label("state", "running")
        });
        ensure!(running, "queue pair {qp} not shown running");
    }
    let table = &doc.flow_table;
    ensure!(value("qpnet_flow_table_capacity", None)? == table.capacity as f64);
    ensure!(value("qpnet_flow_table_used", None)? == table.used as f64);
    ensure!(value("qpnet_flow_table_repairs_total", None)? == table.repairs as f64);
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
    bed.tx_round(&mut vmm, TX_PER_QUEUE)?;
    let fixed = bed.rx_round(&mut vmm, RX_COUNT, RX_FLOWS, rx_fixed_len)?;
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
    for q in &doc.queues {
        ensure!(
            q.state == "running" && q.worker_pid().is_ok() && q.restarts == 0,
            "queue pair {}: {q:?}",
            q.queue_pair
        );
        let age = q
            .heartbeat_age_ms
            .with_context(|| format!("queue pair {}: no heartbeat", q.queue_pair))?;
        ensure!(
            age < 5_000,
            "queue pair {}: heartbeat {age} ms old",
            q.queue_pair
        );
    }
    let table = bed.qpnet.stats_ok(&["--top", "5"])?;
    println!("{table}");
    check_table(&table, 4)?;
    ensure!(
        table.contains(&format!("udp 10.77.0.2:{UDP_PORT} <-> 10.77.0.1:")),
        "the table lists no test flow:\n{table}"
    );
    let prom = bed.qpnet.stats_ok(&["--prometheus"])?;
    check_prometheus_agrees(&prom, &doc)?;

    // A second RX round of mixed lengths: frames per queue and total bytes
    // still exact.
    let mixed = bed.rx_round(&mut vmm, 2_000, RX_FLOWS, mixed_len)?;
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
    ensure!(
        doc.totals.rx_bytes == bytes,
        "total RX bytes {} != {bytes} sent",
        doc.totals.rx_bytes
    );
    ensure!(
        doc.flows.len() == 10,
        "--top defaults to 10 flows, {} listed",
        doc.flows.len()
    );
    bed.finish()
}
