//! The one reader of `qpnet stats --json`: typed documents instead of JSON
//! picked apart by hand in each test.
//!
//! [`StatsDoc`] is a whole document: the instance, one [`QueueDoc`] per
//! queue pair, the [`TotalsDoc`], the [`FlowTableDoc`] and the listed
//! [`FlowDoc`]s, and with `--watch` the [`RatesDoc`]. Fields every test
//! reads are typed members (a document without them does not parse, and
//! says which is missing); the other per-queue and total counters are read
//! by name with [`QueueDoc::counter`] / [`TotalsDoc::counter`], which fail
//! naming the counter and showing the document. Each document keeps its
//! JSON ([`StatsDoc::raw`], [`brief`]) so a failed check can quote it.
//!
//! [`Qpnet::stats_json`](crate::qpnet::Qpnet::stats_json) runs the command
//! and parses its output; [`StatsDoc::parse_watch`] reads the NDJSON frames
//! of `--watch --json`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Deserialize;
pub use serde_json::Value;

/// Longest rendering [`brief`] gives before it cuts.
const BRIEF_MAX_CHARS: usize = 2_000;

/// A short rendering of a JSON value for error messages: compact, cut after
/// [`BRIEF_MAX_CHARS`] characters.
pub fn brief(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > BRIEF_MAX_CHARS {
        format!("{}...", s.chars().take(BRIEF_MAX_CHARS).collect::<String>())
    } else {
        s
    }
}

/// Counters read by name: a number, or a failure that says which.
fn counter_in(other: &BTreeMap<String, Value>, what: &str, name: &str) -> Result<u64> {
    other
        .get(name)
        .and_then(Value::as_u64)
        .with_context(|| format!("{what} has no numeric counter {name:?}"))
}

/// One `qpnet stats --json` document.
#[derive(Debug, Clone, Deserialize)]
pub struct StatsDoc {
    /// The instance name.
    pub name: String,
    /// The primary's pid (`None`: the region holds an impossible one).
    pub primary_pid: Option<u32>,
    /// Whether a VMM is connected now.
    pub vmm_connected: bool,
    /// VMM connections since the primary started.
    pub vmm_connections: u64,
    /// Queue pairs of the instance.
    pub queue_pairs: usize,
    /// Whether flows are tracked (`None`: the region does not say).
    pub flow_tracking: Option<bool>,
    /// One entry per queue pair, in order.
    pub queues: Vec<QueueDoc>,
    /// Sums over the queue pairs.
    pub totals: TotalsDoc,
    /// The flow table's figures.
    pub flow_table: FlowTableDoc,
    /// The largest flows (`--top N` of them).
    pub flows: Vec<FlowDoc>,
    /// Rates per second (with `--watch` only).
    pub rates: Option<RatesDoc>,
    /// The document as printed.
    #[serde(skip)]
    pub raw: Value,
}

/// One queue pair.
#[derive(Debug, Clone, Deserialize)]
pub struct QueueDoc {
    /// Its number.
    pub queue_pair: usize,
    /// Its worker's pid (0: none; `None`: an impossible value).
    pub pid: Option<u32>,
    /// Its worker's state: "running", "starting", "restarting", "failed",
    /// ... or "invalid(N)".
    pub state: String,
    /// Worker restarts so far.
    pub restarts: u64,
    /// Age of the worker's last heartbeat (`None`: none yet).
    pub heartbeat_age_ms: Option<u64>,
    /// Guest -> TAP frames and bytes.
    pub tx_frames: u64,
    /// Guest -> TAP bytes.
    pub tx_bytes: u64,
    /// TAP -> guest frames.
    pub rx_frames: u64,
    /// TAP -> guest bytes.
    pub rx_bytes: u64,
    /// Frames dropped, all causes.
    pub drops: u64,
    /// Live flows this queue pair owns.
    pub flows_owned: u64,
    /// Rates per second (with `--watch` only).
    pub rates: Option<BTreeMap<String, Option<f64>>>,
    /// Every other member (the remaining counters), by name.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl QueueDoc {
    /// The counter `name` of this queue pair.
    pub fn counter(&self, name: &str) -> Result<u64> {
        match name {
            "tx_frames" => Ok(self.tx_frames),
            "tx_bytes" => Ok(self.tx_bytes),
            "rx_frames" => Ok(self.rx_frames),
            "rx_bytes" => Ok(self.rx_bytes),
            "drops" => Ok(self.drops),
            "restarts" => Ok(self.restarts),
            "flows_owned" => Ok(self.flows_owned),
            _ => counter_in(
                &self.other,
                &format!("queue pair {}", self.queue_pair),
                name,
            ),
        }
    }

    /// Its worker's pid, which must be a real one (not 0, not impossible).
    pub fn worker_pid(&self) -> Result<u32> {
        self.pid.filter(|&p| p != 0).with_context(|| {
            format!(
                "queue pair {} has no worker pid (pid {:?}, state {})",
                self.queue_pair, self.pid, self.state
            )
        })
    }
}

/// The sums over all queue pairs.
#[derive(Debug, Clone, Deserialize)]
pub struct TotalsDoc {
    /// Guest -> TAP frames.
    pub tx_frames: u64,
    /// Guest -> TAP bytes.
    pub tx_bytes: u64,
    /// TAP -> guest frames.
    pub rx_frames: u64,
    /// TAP -> guest bytes.
    pub rx_bytes: u64,
    /// Frames dropped, all causes.
    pub drops: u64,
    /// Worker restarts.
    pub restarts: u64,
    /// Frames whose flow was recorded (`None` with tracking off).
    pub tracked_frames: Option<u64>,
    /// Every other member (the remaining counters), by name.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl TotalsDoc {
    /// The total of counter `name`.
    pub fn counter(&self, name: &str) -> Result<u64> {
        match name {
            "tx_frames" => Ok(self.tx_frames),
            "tx_bytes" => Ok(self.tx_bytes),
            "rx_frames" => Ok(self.rx_frames),
            "rx_bytes" => Ok(self.rx_bytes),
            "drops" => Ok(self.drops),
            "restarts" => Ok(self.restarts),
            "tracked_frames" => self
                .tracked_frames
                .context("tracked_frames is null (flow tracking off)"),
            _ => counter_in(&self.other, "totals", name),
        }
    }
}

/// The flow table's figures.
#[derive(Debug, Clone, Deserialize)]
pub struct FlowTableDoc {
    /// Entries it can hold.
    pub capacity: u64,
    /// Entries in use.
    pub used: u64,
    /// Flows created since start.
    pub created: u64,
    /// Flows removed since start.
    pub removed: u64,
    /// Flows refused (table full).
    pub refused: u64,
    /// Stripes repaired after a crash inside their lock.
    pub repairs: u64,
    /// Every other member, by name.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl FlowTableDoc {
    /// The figure `name` (`lock_failures`, `scrubbed`, ...).
    pub fn figure(&self, name: &str) -> Result<u64> {
        match name {
            "capacity" => Ok(self.capacity),
            "used" => Ok(self.used),
            "created" => Ok(self.created),
            "removed" => Ok(self.removed),
            "refused" => Ok(self.refused),
            "repairs" => Ok(self.repairs),
            _ => counter_in(&self.other, "flow_table", name),
        }
    }
}

/// One flow of the list.
#[derive(Debug, Clone, Deserialize)]
pub struct FlowDoc {
    /// As printed: `udp 10.77.0.2:5555 <-> 10.77.0.1:40001`.
    pub flow: String,
    /// "tcp", "udp", "icmp", ...
    pub protocol: String,
    /// The guest's address.
    pub guest_addr: String,
    /// The guest's port.
    pub guest_port: u16,
    /// The remote address.
    pub remote_addr: String,
    /// The remote port.
    pub remote_port: u16,
    /// The queue pair that owns it.
    pub owner: usize,
    /// Its state.
    pub state: String,
    /// Guest -> TAP frames.
    pub tx_frames: u64,
    /// Guest -> TAP bytes.
    pub tx_bytes: u64,
    /// TAP -> guest frames.
    pub rx_frames: u64,
    /// TAP -> guest bytes.
    pub rx_bytes: u64,
}

/// Rates of a `--watch` frame.
#[derive(Debug, Clone, Deserialize)]
pub struct RatesDoc {
    /// Seconds since the previous frame.
    pub interval_s: f64,
    /// Per-second rates of the totals (`tx_frames_per_s`, ...; `None`
    /// where a counter went backwards).
    pub totals: BTreeMap<String, Option<f64>>,
}

impl RatesDoc {
    /// The total rate `name` (0 where absent or null).
    pub fn total(&self, name: &str) -> f64 {
        self.totals.get(name).copied().flatten().unwrap_or(0.0)
    }
}

impl StatsDoc {
    /// Parse one document (surrounding whitespace allowed, nothing after).
    pub fn parse(text: &str) -> Result<StatsDoc> {
        let raw: Value = serde_json::from_str(text).context("parsing qpnet stats JSON")?;
        let mut doc: StatsDoc = serde_json::from_value(raw.clone())
            .with_context(|| format!("reading a qpnet stats document: {}", brief(&raw)))?;
        doc.raw = raw;
        Ok(doc)
    }

    /// The documents of `--watch --json` output: one per non-empty line.
    pub fn parse_watch(text: &str) -> Result<Vec<StatsDoc>> {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(StatsDoc::parse)
            .collect()
    }

    /// Queue pair `qp`.
    pub fn queue(&self, qp: usize) -> Result<&QueueDoc> {
        self.queues
            .get(qp)
            .filter(|q| q.queue_pair == qp)
            .with_context(|| format!("no queue pair {qp} in {}", self.brief()))
    }

    /// A short rendering of the whole document.
    pub fn brief(&self) -> String {
        brief(&self.raw)
    }

    /// The per-queue sum of counter `name` (to check a total against).
    pub fn sum(&self, name: &str) -> Result<u64> {
        self.queues.iter().map(|q| q.counter(name)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{
      "name": "x", "layout_version": 9, "primary_pid": 12, "generation": 1,
      "vmm_connected": true, "vmm_connections": 2, "queue_pairs": 2, "flow_tracking": true,
      "queues": [
        {"queue_pair": 0, "pid": 41, "state": "running", "restarts": 0, "heartbeat_age_ms": 3,
         "tx_frames": 5, "tx_bytes": 300, "rx_frames": 7, "rx_bytes": 700, "drop_runt": 1,
         "drops": 1, "flows_owned": 1, "tracked_frames": 12, "flow_affinity_miss_percent": null},
        {"queue_pair": 1, "pid": null, "state": "a\"b\\c", "restarts": 3, "heartbeat_age_ms": null,
         "tx_frames": 0, "tx_bytes": 0, "rx_frames": 18446744073709551615, "rx_bytes": 0,
         "drop_runt": 0, "drops": 0, "flows_owned": 0, "tracked_frames": 0,
         "flow_affinity_miss_percent": 1.5}
      ],
      "totals": {"tx_frames": 5, "tx_bytes": 300, "rx_frames": 8, "rx_bytes": 700, "drops": 1,
                 "restarts": 3, "tracked_frames": 12, "flows_created": 1,
                 "flow_affinity_miss_percent": 0.0},
      "flow_table": {"capacity": 64, "used": 1, "created": 1, "removed": 0, "refused": 0,
                     "repairs": 0, "scrubbed": 0, "fill_percent": 1.5},
      "flows": [{"flow": "udp 10.77.0.2:5555 <-> 10.77.0.1:40000", "protocol": "udp",
                 "protocol_number": 17, "guest_addr": "10.77.0.2", "guest_port": 5555,
                 "remote_addr": "10.77.0.1", "remote_port": 40000, "vlan": 0, "owner": 0,
                 "state": "active", "tx_frames": 0, "tx_bytes": 0, "rx_frames": 7,
                 "rx_bytes": 700, "age_ms": 1, "idle_ms": null}]
    }"#;

    #[test]
    fn documents_are_read_and_misses_say_where() {
        let doc = StatsDoc::parse(DOC).unwrap();
        assert_eq!((doc.name.as_str(), doc.queue_pairs), ("x", 2));
        assert!(doc.vmm_connected && doc.flow_tracking == Some(true));
        let q0 = doc.queue(0).unwrap();
        assert_eq!((q0.tx_frames, q0.rx_frames, q0.pid), (5, 7, Some(41)));
        assert_eq!(q0.counter("drop_runt").unwrap(), 1);
        assert_eq!(q0.worker_pid().unwrap(), 41);
        let q1 = doc.queue(1).unwrap();
        assert_eq!(q1.rx_frames, u64::MAX);
        assert_eq!(q1.state, "a\"b\\c");
        assert!(q1.worker_pid().is_err());
        assert!(doc.queue(2).is_err());
        let e = format!("{:#}", q0.counter("nope").unwrap_err());
        assert!(e.contains("\"nope\"") && e.contains("queue pair 0"), "{e}");
        // flow_affinity_miss_percent is a float: not a counter.
        assert!(q1.counter("flow_affinity_miss_percent").is_err());
        assert_eq!(doc.totals.counter("flows_created").unwrap(), 1);
        assert_eq!(doc.sum("tx_bytes").unwrap(), 300);
        assert_eq!(doc.flow_table.figure("scrubbed").unwrap(), 0);
        assert_eq!(doc.flows[0].remote_port, 40000);
        assert!(doc.rates.is_none());
        assert!(doc.brief().contains("\"name\":\"x\""));
        // Missing members are named.
        let e = format!("{:#}", StatsDoc::parse(r#"{"name": "x"}"#).unwrap_err());
        assert!(e.contains("missing field"), "{e}");
        assert!(StatsDoc::parse(&format!("{DOC} x")).is_err());
        let long = Value::String("z".repeat(3_000));
        assert_eq!(brief(&long).chars().count(), BRIEF_MAX_CHARS + 3);
    }

    #[test]
    fn watch_frames_are_read_with_their_rates() {
        let mut frame: Value = serde_json::from_str(DOC).unwrap();
        frame["rates"] = serde_json::json!({
            "interval_s": 0.2, "totals": {"tx_frames_per_s": 10.0, "rx_frames_per_s": null}
        });
        let text = format!("{frame}\n\n{frame}\n");
        let frames = StatsDoc::parse_watch(&text).unwrap();
        assert_eq!(frames.len(), 2);
        let r = frames[1].rates.as_ref().unwrap();
        assert_eq!((r.interval_s, r.total("tx_frames_per_s")), (0.2, 10.0));
        assert_eq!(r.total("rx_frames_per_s"), 0.0);
    }
}
