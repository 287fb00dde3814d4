//! `qpnet stats`: map an instance's shared region read-only and print its
//! per-queue counters and worker state. Never takes a lock a worker waits
//! on: every field is an atomic.
//!
//! Exit codes: 0 printed, 3 no such instance running, 4 the region has a
//! layout this qpnet does not read.

use std::sync::atomic::Ordering;

use anyhow::Result;
use qpnet_shared::{QueueStats, RegionError, SharedRegion, WorkerState};
use serde_json::json;

use crate::cli::StatsArgs;
use crate::runtime;

/// Exit code when no instance of that name runs.
pub const EXIT_NO_INSTANCE: i32 = 3;
/// Exit code when the region's layout is not ours.
pub const EXIT_INCOMPATIBLE: i32 = 4;

const COUNTERS: [&str; 13] = [
    "tx_frames",
    "tx_bytes",
    "rx_frames",
    "rx_bytes",
    "drop_too_large",
    "drop_bad_descriptor",
    "drop_runt",
    "drop_tap_error",
    "rx_no_buffer",
    "tx_kicks",
    "rx_kicks",
    "interrupts",
    "batches",
];

fn counters(q: &QueueStats) -> [u64; 13] {
    [
        &q.tx_frames,
        &q.tx_bytes,
        &q.rx_frames,
        &q.rx_bytes,
        &q.drop_too_large,
        &q.drop_bad_descriptor,
        &q.drop_runt,
        &q.drop_tap_error,
        &q.rx_no_buffer,
        &q.tx_kicks,
        &q.rx_kicks,
        &q.interrupts,
        &q.batches,
    ]
    .map(QueueStats::get)
}

fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Print the stats; returns the process exit code.
pub fn stats(args: StatsArgs) -> Result<i32> {
    runtime::validate_name(&args.name)?;
    let base = args
        .runtime_dir
        .clone()
        .unwrap_or_else(runtime::default_base);
    let path = runtime::shm_path(&runtime::instance_dir(&base, &args.name));
    let region = match SharedRegion::open_read_only(&path) {
        Ok(r) => r,
        Err(RegionError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "qpnet stats: no qpnet instance {:?} is running ({} does not exist)",
                args.name,
                path.display()
            );
            return Ok(EXIT_NO_INSTANCE);
        }
        Err(e @ (RegionError::Version { .. } | RegionError::Layout(_) | RegionError::BadMagic)) => {
            eprintln!("qpnet stats: {}: {e}", path.display());
            return Ok(EXIT_INCOMPATIBLE);
        }
        Err(e) => return Err(e.into()),
    };
    let h = region.header();
    let now = now_ns();
    let mut queues = Vec::new();
    let mut totals = [0u64; 13];
    for qp in 0..region.queue_pairs() {
        let q = region.queue(qp).expect("qp < queue_pairs");
        let c = counters(q);
        for (t, v) in totals.iter_mut().zip(c) {
            *t += v;
        }
        let hb = QueueStats::get(&q.heartbeat_ns);
        queues.push((
            qp,
            q,
            c,
            (hb != 0 && now >= hb).then(|| (now - hb) / 1_000_000),
        ));
    }
    if args.json {
        let qs: Vec<_> = queues
            .iter()
            .map(|(qp, q, c, age)| {
                let mut o = serde_json::Map::new();
                o.insert("queue_pair".into(), json!(qp));
                for (k, v) in COUNTERS.iter().zip(c) {
                    o.insert((*k).into(), json!(v));
                }
                o.insert("pid".into(), json!(q.pid.load(Ordering::Relaxed)));
                o.insert(
                    "state".into(),
                    json!(q.worker_state().map(|s| s.name()).unwrap_or("invalid")),
                );
                o.insert("restarts".into(), json!(QueueStats::get(&q.restarts)));
                o.insert("heartbeat_age_ms".into(), json!(age));
                serde_json::Value::Object(o)
            })
            .collect();
        let mut t = serde_json::Map::new();
        for (k, v) in COUNTERS.iter().zip(totals) {
            t.insert((*k).into(), json!(v));
        }
        let out = json!({
            "name": args.name,
            "primary_pid": h.primary_pid.load(Ordering::Relaxed),
            "vmm_connected": h.vmm_connected.load(Ordering::Relaxed) != 0,
            "vmm_connections": h.vmm_connections.load(Ordering::Relaxed),
            "queue_pairs": region.queue_pairs(),
            "queues": qs,
            "totals": t,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    println!(
        "qpnet {:?}: primary pid {}, VMM {}, {} queue pair(s)",
        args.name,
        h.primary_pid.load(Ordering::Relaxed),
        if h.vmm_connected.load(Ordering::Relaxed) != 0 {
            "connected"
        } else {
            "not connected"
        },
        region.queue_pairs()
    );
    println!(
        "{:>3} {:>8} {:>10} {:>12} {:>14} {:>12} {:>14} {:>8} {:>8} {:>9}",
        "qp",
        "pid",
        "state",
        "tx_frames",
        "tx_bytes",
        "rx_frames",
        "rx_bytes",
        "drops",
        "restarts",
        "hb_age_ms"
    );
    for (qp, q, c, age) in &queues {
        println!(
            "{:>3} {:>8} {:>10} {:>12} {:>14} {:>12} {:>14} {:>8} {:>8} {:>9}",
            qp,
            q.pid.load(Ordering::Relaxed),
            q.worker_state().unwrap_or(WorkerState::Absent).name(),
            c[0],
            c[1],
            c[2],
            c[3],
            c[4] + c[5] + c[6] + c[7],
            QueueStats::get(&q.restarts),
            age.map(|a| a.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    println!(
        "{:>3} {:>8} {:>10} {:>12} {:>14} {:>12} {:>14} {:>8}",
        "all",
        "",
        "",
        totals[0],
        totals[1],
        totals[2],
        totals[3],
        totals[4] + totals[5] + totals[6] + totals[7]
    );
    Ok(0)
}
