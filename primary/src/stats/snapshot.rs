//! Reading the shared region into a plain [`Snapshot`]: per-queue counters
//! and worker state, the flow table's figures and its largest flows.
//!
//! It never takes a lock and never writes to the region: counters and worker
//! state are atomics, flows are copied through their per-entry seqlocks
//! ([`qpnet_shared::FlowReader`]), so a worker is never made to wait and a
//! worker killed at any instant cannot stall it. Values are kept as read:
//! the renderers decide how an out-of-range one is shown.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use qpnet_shared::{
    monotonic_ns, CounterId, FlowKey, FlowSnapshot, FlowTableCounters, QueueStats, SharedRegion,
    WorkerState,
};

/// Flows remembered between `--watch` frames for per-flow rates.
const RATE_BASIS_MAX: usize = 1 << 17;

/// Largest pid Linux hands out (PID_MAX_LIMIT); a bigger one is garbage.
pub(super) const PID_MAX: u32 = 4 << 20;

/// The per-queue counters, declared once in `qpnet_shared` (names, help
/// texts, fields), in layout order.
pub(super) use qpnet_shared::QUEUE_COUNTERS as COUNTERS;

pub(super) const N_COUNTERS: usize = COUNTERS.len();
pub(super) const TX_FRAMES: usize = CounterId::tx_frames as usize;
pub(super) const TX_BYTES: usize = CounterId::tx_bytes as usize;
pub(super) const RX_FRAMES: usize = CounterId::rx_frames as usize;
pub(super) const RX_BYTES: usize = CounterId::rx_bytes as usize;
pub(super) const RX_NO_BUFFER: usize = CounterId::rx_no_buffer as usize;
pub(super) const FLOWS_CREATED: usize = CounterId::flows_created as usize;
pub(super) const FLOWS_EXPIRED: usize = CounterId::flows_expired as usize;
pub(super) const FLOW_UNTRACKED: usize = CounterId::flow_untracked_frames as usize;
pub(super) const FLOW_UNPARSED: usize = CounterId::flow_unparsed_frames as usize;
pub(super) const FLOW_AFFINITY_MISSES: usize = CounterId::flow_affinity_misses as usize;

/// Counter values of one queue pair, or their totals.
pub(super) type Values = [u64; N_COUNTERS];

/// What one queue pair looked like at one instant.
pub(super) struct QueueSnap {
    pub(super) values: Values,
    pub(super) pid: u32,
    pub(super) state: u32,
    pub(super) restarts: u64,
    heartbeat_ns: u64,
    /// Live flows in the table owned by this queue pair.
    pub(super) flows_owned: u64,
}

impl QueueSnap {
    fn read(q: &QueueStats) -> QueueSnap {
        QueueSnap {
            values: COUNTERS.each_ref().map(|c| QueueStats::get((c.field)(q))),
            pid: q.pid.load(Ordering::Relaxed),
            state: q.state.load(Ordering::Acquire),
            restarts: QueueStats::get(&q.restarts),
            heartbeat_ns: QueueStats::get(&q.heartbeat_ns),
            flows_owned: 0,
        }
    }

    pub(super) fn drops(&self) -> u64 {
        drops(&self.values)
    }

    pub(super) fn state_name(&self) -> String {
        state_name(self.state)
    }

    pub(super) fn heartbeat_age_ns(&self, now_ns: u64) -> Option<u64> {
        (self.heartbeat_ns != 0 && self.heartbeat_ns <= now_ns).then(|| now_ns - self.heartbeat_ns)
    }
}

fn sum(values: impl Iterator<Item = u64>) -> u64 {
    values.fold(0, u64::saturating_add)
}

/// All drop counters of `v` together.
pub(super) fn drops(v: &Values) -> u64 {
    sum(COUNTERS
        .iter()
        .zip(v)
        .filter(|(c, _)| c.is_drop())
        .map(|(_, &n)| n))
}

/// Frames the flow table counted in a flow: every frame a worker moves is
/// counted in a flow, as unparsed or as untracked (exact once traffic
/// stops; approximate while it flows, as they are published at different
/// moments).
pub(super) fn tracked(v: &Values) -> u64 {
    v[TX_FRAMES]
        .saturating_add(v[RX_FRAMES])
        .saturating_sub(v[FLOW_UNTRACKED])
        .saturating_sub(v[FLOW_UNPARSED])
}

fn state_name(raw: u32) -> String {
    match WorkerState::from_u32(raw) {
        Some(s) => s.name().to_owned(),
        None => format!("invalid({raw})"),
    }
}

/// Affinity misses as a percentage of tracked frames; `None` when it means
/// nothing (tracking off, nothing tracked, or counts that do not add up).
pub(super) fn miss_percent(misses: u64, tracked: u64, tracking: Option<bool>) -> Option<f64> {
    (tracking == Some(true) && tracked > 0 && misses <= tracked)
        .then(|| misses as f64 * 100.0 / tracked as f64)
}

/// The flows of one scan of the table.
#[derive(Default)]
pub(super) struct FlowListing {
    /// The largest flows by bytes (both ways), largest first.
    pub(super) top: Vec<FlowSnapshot>,
    /// Valid flows seen.
    pub(super) seen: u64,
    /// Entries skipped because a writer held them throughout.
    pub(super) skipped_busy: usize,
    /// Entries skipped because they did not validate.
    pub(super) skipped_invalid: usize,
    /// Bytes per flow, for the next `--watch` frame's per-flow rates.
    pub(super) basis: HashMap<FlowKey, u64>,
}

pub(super) fn flow_bytes(f: &FlowSnapshot) -> u64 {
    f.tx_bytes.saturating_add(f.rx_bytes)
}

/// Largest first; ties in a stable order.
fn sort_flows(v: &mut [FlowSnapshot]) {
    v.sort_unstable_by(|a, b| {
        flow_bytes(b)
            .cmp(&flow_bytes(a))
            .then_with(|| a.key.to_words().cmp(&b.key.to_words()))
    });
}

impl FlowListing {
    /// Scan the table without locks; count flows per owner into `queues`.
    fn scan(region: &SharedRegion, top: usize, keep_basis: bool, queues: &mut [QueueSnap]) -> Self {
        let mut out = FlowListing::default();
        let mut iter = region.flows().iter();
        let keep = top.max(1).saturating_mul(4).saturating_add(64);
        for flow in iter.by_ref() {
            out.seen += 1;
            if let Some(q) = queues.get_mut(usize::from(flow.owner)) {
                q.flows_owned += 1;
            }
            if keep_basis && out.basis.len() < RATE_BASIS_MAX {
                out.basis.insert(flow.key, flow_bytes(&flow));
            }
            if top > 0 {
                out.top.push(flow);
                if out.top.len() >= keep {
                    sort_flows(&mut out.top);
                    out.top.truncate(top);
                }
            }
        }
        sort_flows(&mut out.top);
        out.top.truncate(top);
        out.skipped_busy = iter.skipped_busy;
        out.skipped_invalid = iter.skipped_invalid;
        out
    }
}

/// Everything `qpnet stats` prints, read at one instant (field by field:
/// counters are not a consistent set while traffic flows).
pub(super) struct Snapshot {
    pub(super) taken_ns: u64,
    pub(super) generation: u64,
    /// What the primary published about flow tracking (0: not said).
    tracking: u32,
    pub(super) primary_pid: u32,
    pub(super) vmm_connected: bool,
    pub(super) vmm_connections: u64,
    pub(super) queues: Vec<QueueSnap>,
    pub(super) totals: Values,
    pub(super) table: FlowTableCounters,
    pub(super) flows: FlowListing,
}

impl Snapshot {
    /// Read `region`, listing its `top` largest flows; `keep_basis` keeps
    /// every flow's bytes for the next frame's per-flow rates.
    pub(super) fn take(region: &SharedRegion, top: usize, keep_basis: bool) -> Snapshot {
        let h = region.header();
        let mut queues: Vec<QueueSnap> = (0..region.queue_pairs())
            .filter_map(|qp| region.queue(qp))
            .map(QueueSnap::read)
            .collect();
        let table = region.flows().counters();
        let flows = FlowListing::scan(region, top, keep_basis, &mut queues);
        let totals = std::array::from_fn(|i| sum(queues.iter().map(|q| q.values[i])));
        Snapshot {
            taken_ns: monotonic_ns(),
            generation: h.generation.load(Ordering::Relaxed),
            tracking: h.flow.tracking.load(Ordering::Relaxed),
            primary_pid: h.primary_pid.load(Ordering::Relaxed),
            vmm_connected: h.vmm_connected.load(Ordering::Relaxed) != 0,
            vmm_connections: h.vmm_connections.load(Ordering::Relaxed),
            queues,
            totals,
            table,
            flows,
        }
    }

    /// Worker restarts of all queue pairs together.
    pub(super) fn restarts(&self) -> u64 {
        sum(self.queues.iter().map(|q| q.restarts))
    }

    /// Whether flow tracking is on: as the primary published it, else
    /// inferred: `Some(false)` when frames moved and the table heard of none
    /// of them, `None` before any frame moved.
    pub(super) fn flow_tracking(&self) -> Option<bool> {
        match self.tracking {
            qpnet_shared::TRACKING_ON => return Some(true),
            qpnet_shared::TRACKING_OFF => return Some(false),
            _ => {}
        }
        let t = &self.totals;
        let evidence = [
            FLOWS_CREATED,
            FLOW_UNTRACKED,
            FLOW_UNPARSED,
            FLOW_AFFINITY_MISSES,
        ]
        .iter()
        .any(|&i| t[i] > 0)
            || self.table.created > 0
            || self.table.live > 0;
        if evidence {
            Some(true)
        } else if t[TX_FRAMES] > 0 || t[RX_FRAMES] > 0 {
            Some(false)
        } else {
            None
        }
    }

    pub(super) fn fill_percent(&self) -> Option<f64> {
        (self.table.capacity > 0 && self.table.live <= self.table.capacity)
            .then(|| self.table.live as f64 * 100.0 / self.table.capacity as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_indices_match_their_names() {
        let at = |i: usize| COUNTERS[i].name;
        assert_eq!(at(TX_FRAMES), "tx_frames");
        assert_eq!(at(TX_BYTES), "tx_bytes");
        assert_eq!(at(RX_FRAMES), "rx_frames");
        assert_eq!(at(RX_BYTES), "rx_bytes");
        let mut v = [0u64; N_COUNTERS];
        for (i, c) in COUNTERS.iter().enumerate() {
            v[i] = if c.name.starts_with("drop_") { 1 } else { 100 };
        }
        assert_eq!(drops(&v), 12, "the twelve drop_* counters");
        assert_eq!(at(RX_NO_BUFFER), "rx_no_buffer");
        assert_eq!(at(FLOWS_CREATED), "flows_created");
        assert_eq!(at(FLOWS_EXPIRED), "flows_expired");
        assert_eq!(at(FLOW_UNTRACKED), "flow_untracked_frames");
        assert_eq!(at(FLOW_UNPARSED), "flow_unparsed_frames");
        assert_eq!(at(FLOW_AFFINITY_MISSES), "flow_affinity_misses");
        let q = QueueStats::default();
        QueueStats::add(&q.flow_affinity_misses, 7);
        QueueStats::add(&q.tx_bytes, 3);
        let snap = QueueSnap::read(&q);
        assert_eq!(
            (snap.values[FLOW_AFFINITY_MISSES], snap.values[TX_BYTES]),
            (7, 3)
        );
    }

    #[test]
    fn affinity_percent_only_when_it_means_something() {
        assert_eq!(miss_percent(1, 200, Some(true)), Some(0.5));
        assert_eq!(miss_percent(0, 0, Some(true)), None);
        assert_eq!(miss_percent(5, 4, Some(true)), None);
        assert_eq!(miss_percent(0, 10, Some(false)), None);
        assert_eq!(miss_percent(0, 10, None), None);
        assert_eq!(state_name(2), "running");
        assert_eq!(state_name(77), "invalid(77)");
    }
}
