//! `qpnet stats --json`: one document with every counter exact, the flow
//! table's figures and the top flows; with `--watch`, per-second rates too.
//! Values that cannot be right (a pid past PID_MAX, a percentage of
//! nothing) are `null`, never something plausible.

use serde_json::{json, Map, Value};

use super::snapshot::{
    drops, miss_percent, tracked, QueueSnap, Values, COUNTERS, FLOW_AFFINITY_MISSES, PID_MAX,
};
use super::watch::View;
use qpnet_shared::{FlowSnapshot, LAYOUT_VERSION};

fn pid_json(pid: u32) -> Value {
    if pid > PID_MAX {
        Value::Null
    } else {
        json!(pid)
    }
}

fn counters_json(values: &Values, o: &mut Map<String, Value>) {
    for (c, v) in COUNTERS.iter().zip(values) {
        o.insert(c.name.into(), json!(v));
    }
}

fn affinity_json(values: &Values, tracking: Option<bool>, o: &mut Map<String, Value>) {
    let tracked = tracked(values);
    o.insert(
        "tracked_frames".into(),
        json!((tracking != Some(false)).then_some(tracked)),
    );
    o.insert(
        "flow_affinity_miss_percent".into(),
        json!(miss_percent(
            values[FLOW_AFFINITY_MISSES],
            tracked,
            tracking
        )),
    );
}

fn rates_json(v: &View, qp: Option<usize>) -> Value {
    let mut o = Map::new();
    for (i, c) in COUNTERS.iter().enumerate() {
        o.insert(format!("{}_per_s", c.name), json!(v.rate(qp, i)));
    }
    Value::Object(o)
}

fn queue_json(v: &View, qp: usize, q: &QueueSnap, tracking: Option<bool>) -> Value {
    let mut o = Map::new();
    o.insert("queue_pair".into(), json!(qp));
    o.insert("pid".into(), pid_json(q.pid));
    o.insert("state".into(), json!(q.state_name()));
    o.insert("restarts".into(), json!(q.restarts));
    o.insert(
        "heartbeat_age_ms".into(),
        json!(q.heartbeat_age_ns(v.cur.taken_ns).map(|a| a / 1_000_000)),
    );
    counters_json(&q.values, &mut o);
    o.insert("drops".into(), json!(q.drops()));
    o.insert("flows_owned".into(), json!(q.flows_owned));
    affinity_json(&q.values, tracking, &mut o);
    if v.interval_s().is_some() {
        o.insert("rates".into(), rates_json(v, Some(qp)));
    }
    Value::Object(o)
}

fn flow_json(v: &View, f: &FlowSnapshot) -> Value {
    let now = v.cur.taken_ns;
    let mut o = json!({
        "flow": f.key.to_string(),
        "protocol": f.key.protocol_name(),
        "protocol_number": f.key.protocol,
        "guest_addr": f.key.guest_ip().to_string(),
        "guest_port": f.key.guest_port,
        "remote_addr": f.key.remote_ip().to_string(),
        "remote_port": f.key.remote_port,
        "vlan": f.key.vlan,
        "owner": f.owner,
        "state": f.state.name(),
        "tx_frames": f.tx_frames,
        "tx_bytes": f.tx_bytes,
        "rx_frames": f.rx_frames,
        "rx_bytes": f.rx_bytes,
        "tcp_flags_tx": f.tcp_flags_tx,
        "tcp_flags_rx": f.tcp_flags_rx,
        "age_ms": now.checked_sub(f.first_seen_ns).map(|d| d / 1_000_000),
        "idle_ms": now.checked_sub(f.last_seen_ns).map(|d| d / 1_000_000),
    });
    if v.interval_s().is_some() {
        o["bytes_per_s"] = json!(v.flow_rate(f));
    }
    o
}

/// The whole document.
pub(super) fn render_json(v: &View) -> Value {
    let s = v.cur;
    let tracking = s.flow_tracking();
    let queues: Vec<Value> = s
        .queues
        .iter()
        .enumerate()
        .map(|(qp, q)| queue_json(v, qp, q, tracking))
        .collect();
    let mut totals = Map::new();
    counters_json(&s.totals, &mut totals);
    totals.insert("drops".into(), json!(drops(&s.totals)));
    totals.insert("restarts".into(), json!(s.restarts()));
    affinity_json(&s.totals, tracking, &mut totals);
    let tc = &s.table;
    let mut doc = json!({
        "name": v.name,
        "layout_version": LAYOUT_VERSION,
        "primary_pid": pid_json(s.primary_pid),
        "generation": s.generation,
        "vmm_connected": s.vmm_connected,
        "vmm_connections": s.vmm_connections,
        "queue_pairs": s.queues.len(),
        "flow_tracking": tracking,
        "queues": queues,
        "totals": totals,
        "flow_table": {
            "capacity": tc.capacity,
            "used": tc.live,
            "fill_percent": s.fill_percent(),
            "flows_listed": s.flows.seen,
            "created": tc.created,
            "removed": tc.removed,
            "refused": tc.refused,
            "repairs": tc.repairs,
            "lock_timeouts": tc.lock_timeouts,
            "lock_failures": tc.lock_failures,
            "scrubbed": tc.scrubbed,
            "owner_gone_removed": tc.owner_gone_removed,
            "skipped_busy": s.flows.skipped_busy,
            "skipped_invalid": s.flows.skipped_invalid,
        },
        "flows": s.flows.top.iter().map(|f| flow_json(v, f)).collect::<Vec<_>>(),
    });
    if let Some(dt) = v.interval_s() {
        doc["rates"] = json!({ "interval_s": dt, "totals": rates_json(v, None) });
    }
    doc
}
