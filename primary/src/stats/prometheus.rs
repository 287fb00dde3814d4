//! `qpnet stats --prometheus`: the Prometheus text exposition format
//! (version 0.0.4), every metric labelled with the instance name. Samples
//! whose value cannot be right (an invalid pid, an unknown heartbeat) are
//! left out rather than shown as something plausible.

use std::fmt::{Display, Write as _};

use qpnet_shared::WorkerState;

use super::snapshot::{QueueSnap, Snapshot, COUNTERS, PID_MAX};
use super::watch::View;

/// Writes metric families: HELP and TYPE once, then the samples.
struct Exposition {
    out: String,
    name_label: String,
}

impl Exposition {
    fn new(instance: &str) -> Exposition {
        Exposition {
            out: String::new(),
            name_label: format!("name=\"{}\"", escape_label(instance)),
        }
    }

    fn family(&mut self, metric: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {metric} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {metric} {kind}");
    }

    fn sample(&mut self, metric: &str, labels: &[(&str, String)], value: impl Display) {
        let _ = write!(self.out, "{metric}{{{}", self.name_label);
        for (k, v) in labels {
            let _ = write!(self.out, ",{k}=\"{}\"", escape_label(v));
        }
        let _ = writeln!(self.out, "}} {value}");
    }

    /// A family with one sample.
    fn single(&mut self, metric: &str, kind: &str, help: &str, value: impl Display) {
        self.family(metric, kind, help);
        self.sample(metric, &[], value);
    }

    /// A family with one sample per queue pair, labelled `queue_pair`;
    /// queue pairs for which `value` is `None` have none.
    fn per_queue<T: Display>(
        &mut self,
        metric: &str,
        kind: &str,
        help: &str,
        queues: &[QueueSnap],
        value: impl Fn(&QueueSnap) -> Option<T>,
    ) {
        self.family(metric, kind, help);
        for (qp, q) in queues.iter().enumerate() {
            if let Some(v) = value(q) {
                self.sample(metric, &[("queue_pair", qp.to_string())], v);
            }
        }
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The whole exposition.
pub(super) fn render_prometheus(v: &View) -> String {
    let s = v.cur;
    let mut e = Exposition::new(v.name);
    e.family("qpnet_primary_pid", "gauge", "Process id of the primary.");
    if s.primary_pid <= PID_MAX {
        e.sample("qpnet_primary_pid", &[], s.primary_pid);
    }
    e.single(
        "qpnet_vmm_connected",
        "gauge",
        "1 while a VMM is connected.",
        u8::from(s.vmm_connected),
    );
    e.single(
        "qpnet_vmm_connections_total",
        "counter",
        "VMM connections served.",
        s.vmm_connections,
    );
    e.single(
        "qpnet_queue_pairs",
        "gauge",
        "Queue pairs of the device.",
        s.queues.len(),
    );
    for (i, c) in COUNTERS.iter().enumerate() {
        let metric = format!("qpnet_queue_{}_total", c.name);
        e.per_queue(&metric, "counter", c.help, &s.queues, |q| Some(q.values[i]));
    }
    e.per_queue(
        "qpnet_worker_restarts_total",
        "counter",
        "Times the queue pair's worker was restarted.",
        &s.queues,
        |q| Some(q.restarts),
    );
    e.per_queue(
        "qpnet_worker_pid",
        "gauge",
        "Process id of the queue pair's worker (0: none; absent when invalid).",
        &s.queues,
        |q| (q.pid <= PID_MAX).then_some(q.pid),
    );
    prometheus_worker_state(&mut e, s);
    e.per_queue(
        "qpnet_worker_heartbeat_age_seconds",
        "gauge",
        "Time since the worker's last loop turn (absent when unknown).",
        &s.queues,
        |q| q.heartbeat_age_ns(s.taken_ns).map(|age| age as f64 / 1e9),
    );
    e.per_queue(
        "qpnet_queue_flows_owned",
        "gauge",
        "Live flows owned by the queue pair.",
        &s.queues,
        |q| Some(q.flows_owned),
    );
    prometheus_flow_table(&mut e, s);
    e.out
}

fn prometheus_worker_state(e: &mut Exposition, s: &Snapshot) {
    const STATES: [WorkerState; 6] = [
        WorkerState::Absent,
        WorkerState::Starting,
        WorkerState::Running,
        WorkerState::Restarting,
        WorkerState::Failed,
        WorkerState::Stopped,
    ];
    e.family(
        "qpnet_worker_state",
        "gauge",
        "1 for the state the queue pair's worker is in.",
    );
    for (qp, q) in s.queues.iter().enumerate() {
        for st in STATES {
            let labels = [
                ("queue_pair", qp.to_string()),
                ("state", st.name().to_owned()),
            ];
            e.sample(
                "qpnet_worker_state",
                &labels,
                u8::from(q.state == st as u32),
            );
        }
    }
}

fn prometheus_flow_table(e: &mut Exposition, s: &Snapshot) {
    let tc = &s.table;
    e.single(
        "qpnet_flow_table_capacity",
        "gauge",
        "Entries the flow table holds.",
        tc.capacity,
    );
    e.single("qpnet_flow_table_used", "gauge", "Entries in use.", tc.live);
    let counters: [(&str, &str, u64); 8] = [
        ("created", "Flow entries created.", tc.created),
        ("removed", "Flow entries removed.", tc.removed),
        (
            "refused",
            "New flows refused: the table was full.",
            tc.refused,
        ),
        (
            "repairs",
            "Stripes repaired after their lock holder died.",
            tc.repairs,
        ),
        (
            "lock_timeouts",
            "Lock waits that hit their bound.",
            tc.lock_timeouts,
        ),
        (
            "lock_failures",
            "Lock attempts that failed outright.",
            tc.lock_failures,
        ),
        ("scrubbed", "Invalid entries freed.", tc.scrubbed),
        (
            "owner_gone_removed",
            "Flows removed because their queue pair is gone.",
            tc.owner_gone_removed,
        ),
    ];
    for (stem, help, value) in counters {
        e.single(
            &format!("qpnet_flow_table_{stem}_total"),
            "counter",
            help,
            value,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("x\\y\nz\""), "x\\\\y\\nz\"");
    }
}
