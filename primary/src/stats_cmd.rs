//! `qpnet stats`: attach to a running instance's shared region read-only and
//! print its per-queue counters, worker state, flow table figures and top
//! flows, as a table, JSON (`--json`) or the Prometheus text exposition
//! format (`--prometheus`), once or every `--watch SECS` with rates.
//!
//! It never takes a lock and never writes to the region: counters and worker
//! state are atomics, flows are copied through their per-entry seqlocks
//! ([`qpnet_shared::FlowReader`]), so a worker is never made to wait and a
//! worker killed at any instant cannot stall it. What it reads is untrusted
//! (another build, a dying process, corruption): out-of-range values are
//! shown as such ("invalid(7)", "-"), never as something plausible.
//!
//! Exit codes, for scripts: 0 printed; 1 error (I/O, permission); 2 bad
//! arguments; 3 no such instance is running (no region, or one left behind
//! by a primary that is gone); 4 the region cannot be read by this qpnet
//! (another layout version, or not a qpnet region).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use qpnet_shared::{
    monotonic_ns, FlowKey, FlowSnapshot, FlowTableCounters, QueueStats, RegionError, SharedRegion,
    WorkerState, LAYOUT_VERSION,
};
use serde_json::{json, Map, Value};

use crate::cli::StatsArgs;
use crate::runtime;

/// Exit code for arguments that make no sense (as clap's).
pub const EXIT_USAGE: i32 = 2;
/// Exit code when no instance of that name runs.
pub const EXIT_NO_INSTANCE: i32 = 3;
/// Exit code when the region's layout is not ours.
pub const EXIT_INCOMPATIBLE: i32 = 4;

/// Table lines never get wider than this (flow keys that would go past it
/// move to a line of their own).
const TABLE_WIDTH: usize = 120;
/// Shortest and longest `--watch` interval.
const WATCH_MIN: f64 = 0.01;
const WATCH_MAX: f64 = 86_400.0;
/// How long a region that is being created (no magic yet, not sized yet)
/// is given before it is judged unreadable.
const SETTLE_TIME: Duration = Duration::from_millis(300);
/// Flows remembered between `--watch` frames for per-flow rates.
const RATE_BASIS_MAX: usize = 1 << 17;

/// One per-queue counter: its name (JSON key, Prometheus metric stem), its
/// help text and where it lives.
struct Counter {
    name: &'static str,
    help: &'static str,
    field: fn(&QueueStats) -> &AtomicU64,
}

macro_rules! counters {
    ($($field:ident: $help:literal,)*) => {
        const COUNTERS: [Counter; [$(stringify!($field)),*].len()] = [$(Counter {
            name: stringify!($field),
            help: $help,
            field: |q: &QueueStats| &q.$field,
        }),*];
    };
}

counters! {
    tx_frames: "Frames taken from the TX ring and written to the TAP.",
    tx_bytes: "Bytes of TX frames (without the virtio-net header).",
    rx_frames: "Frames read from the TAP and put in the RX ring.",
    rx_bytes: "Bytes of RX frames (without the virtio-net header).",
    drop_too_large: "RX frames cut short: the guest's buffers were too small.",
    drop_bad_descriptor: "Chains refused because a descriptor was invalid.",
    drop_runt: "TX chains shorter than the virtio-net header.",
    drop_tap_error: "Frames the TAP refused on write.",
    rx_no_buffer: "Times the TAP had frames while the RX ring had no buffer.",
    tx_kicks: "Kicks received on the TX ring.",
    rx_kicks: "Kicks received on the RX ring.",
    interrupts: "Interrupts sent to the guest.",
    batches: "Wake-ups that moved at least one frame.",
    flows_created: "Flows this queue pair's worker created in the flow table.",
    flows_expired: "Flows this queue pair's worker expired.",
    flow_untracked_frames: "Frames forwarded without flow tracking (table full or busy).",
    flow_unparsed_frames: "Frames with no flow key (not IP, or malformed headers).",
    flow_affinity_misses: "Frames seen on this queue pair whose flow another queue pair owns.",
}

const N_COUNTERS: usize = COUNTERS.len();
const TX_FRAMES: usize = 0;
const TX_BYTES: usize = 1;
const RX_FRAMES: usize = 2;
const RX_BYTES: usize = 3;
const DROPS: [usize; 4] = [4, 5, 6, 7];
const RX_NO_BUFFER: usize = 8;
const FLOWS_CREATED: usize = 13;
const FLOWS_EXPIRED: usize = 14;
const FLOW_UNTRACKED: usize = 15;
const FLOW_UNPARSED: usize = 16;
const FLOW_AFFINITY_MISSES: usize = 17;

/// What one queue pair looked like at one instant.
struct QueueSnap {
    values: [u64; N_COUNTERS],
    pid: u32,
    state: u32,
    restarts: u64,
    heartbeat_ns: u64,
    /// Live flows in the table owned by this queue pair.
    flows_owned: u64,
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

    fn drops(&self) -> u64 {
        sum(DROPS.iter().map(|&i| self.values[i]))
    }

    fn state_name(&self) -> String {
        state_name(self.state)
    }

    fn heartbeat_age_ns(&self, now_ns: u64) -> Option<u64> {
        (self.heartbeat_ns != 0 && self.heartbeat_ns <= now_ns).then(|| now_ns - self.heartbeat_ns)
    }
}

fn sum(values: impl Iterator<Item = u64>) -> u64 {
    values.fold(0, u64::saturating_add)
}

/// Frames the flow table counted in a flow: every frame a worker moves is
/// counted in a flow, as unparsed or as untracked (exact once traffic
/// stops; approximate while it flows, as they are published at different
/// moments).
fn tracked(v: &[u64; N_COUNTERS]) -> u64 {
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
fn miss_percent(misses: u64, tracked: u64, tracking: Option<bool>) -> Option<f64> {
    (tracking == Some(true) && tracked > 0 && misses <= tracked)
        .then(|| misses as f64 * 100.0 / tracked as f64)
}

/// The flows of one scan of the table.
#[derive(Default)]
struct FlowListing {
    /// The largest flows by bytes (both ways), largest first.
    top: Vec<FlowSnapshot>,
    /// Valid flows seen.
    seen: u64,
    /// Entries skipped because a writer held them throughout.
    skipped_busy: usize,
    /// Entries skipped because they did not validate.
    skipped_invalid: usize,
    /// Bytes per flow, for the next `--watch` frame's per-flow rates.
    basis: HashMap<FlowKey, u64>,
}

fn flow_bytes(f: &FlowSnapshot) -> u64 {
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
struct Snapshot {
    taken_ns: u64,
    generation: u64,
    /// What the primary published about flow tracking (0: not said).
    tracking: u32,
    primary_pid: u32,
    vmm_connected: bool,
    vmm_connections: u64,
    queues: Vec<QueueSnap>,
    totals: [u64; N_COUNTERS],
    table: FlowTableCounters,
    flows: FlowListing,
}

impl Snapshot {
    fn take(region: &SharedRegion, top: usize, keep_basis: bool) -> Snapshot {
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

    /// Whether flow tracking is on: as the primary published it, else
    /// inferred: `Some(false)` when frames moved and the table heard of none
    /// of them, `None` before any frame moved.
    fn flow_tracking(&self) -> Option<bool> {
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

    fn fill_percent(&self) -> Option<f64> {
        (self.table.capacity > 0 && self.table.live <= self.table.capacity)
            .then(|| self.table.live as f64 * 100.0 / self.table.capacity as f64)
    }
}

/// A snapshot and, in `--watch`, the one before it (for rates).
struct View<'a> {
    name: &'a str,
    cur: &'a Snapshot,
    prev: Option<&'a Snapshot>,
}

impl View<'_> {
    /// The previous snapshot if rates against it mean something (same
    /// primary generation and shape, time went forward).
    fn rate_base(&self) -> Option<(&Snapshot, f64)> {
        let prev = self.prev?;
        let dt = self.cur.taken_ns.checked_sub(prev.taken_ns)? as f64 / 1e9;
        (dt > 0.0
            && prev.generation == self.cur.generation
            && prev.queues.len() == self.cur.queues.len())
        .then_some((prev, dt))
    }

    fn interval_s(&self) -> Option<f64> {
        self.rate_base().map(|(_, dt)| dt)
    }

    /// Per-second rate of counter `i` of queue pair `qp` (`None` for the
    /// totals), or `None` when there is no base or the counter went back.
    fn rate(&self, qp: Option<usize>, i: usize) -> Option<f64> {
        let (prev, dt) = self.rate_base()?;
        let (now, before) = match qp {
            Some(qp) => (self.cur.queues[qp].values[i], prev.queues[qp].values[i]),
            None => (self.cur.totals[i], prev.totals[i]),
        };
        now.checked_sub(before).map(|d| d as f64 / dt)
    }

    /// Bytes per second of one flow: against its bytes in the previous
    /// frame, or all its bytes if it started since; otherwise unknown.
    fn flow_rate(&self, f: &FlowSnapshot) -> Option<f64> {
        let (prev, dt) = self.rate_base()?;
        let before = match prev.flows.basis.get(&f.key) {
            Some(&b) => b,
            None if f.first_seen_ns >= prev.taken_ns => 0,
            None => return None,
        };
        flow_bytes(f).checked_sub(before).map(|d| d as f64 / dt)
    }
}

// ---------------------------------------------------------------------------
// Table.

/// Largest pid Linux hands out (PID_MAX_LIMIT); a bigger one is garbage.
const PID_MAX: u32 = 4 << 20;

/// `v` in at most `width` characters: exact when it fits, else scaled to
/// below 1000 of an SI unit (k, M, G, T, P, E) with the most decimals that
/// fit. Only
/// the table does this; JSON and Prometheus are always exact.
fn fit(v: u64, width: usize) -> String {
    let exact = v.to_string();
    if exact.len() <= width {
        return exact;
    }
    for (scale, unit) in [
        (1e3, 'k'),
        (1e6, 'M'),
        (1e9, 'G'),
        (1e12, 'T'),
        (1e15, 'P'),
        (1e18, 'E'),
    ] {
        let x = v as f64 / scale;
        if x >= 999.5 && unit != 'E' {
            continue;
        }
        for decimals in [2, 1, 0] {
            let s = format!("{x:.decimals$}{unit}");
            if s.len() <= width {
                return s;
            }
        }
    }
    exact
}

/// [`fit`] for the many counters in sentences (exact up to 10 digits).
fn n(v: u64) -> String {
    fit(v, 10)
}

fn pid_text(pid: u32) -> String {
    match pid {
        0 => "-".into(),
        p if p > PID_MAX => "invalid".into(),
        p => p.to_string(),
    }
}

fn pid_json(pid: u32) -> Value {
    if pid > PID_MAX {
        Value::Null
    } else {
        json!(pid)
    }
}

fn rate_text(r: Option<f64>, width: usize) -> String {
    r.map_or_else(|| "-".to_owned(), |r| fit(r.round() as u64, width))
}

fn percent_text(p: Option<f64>) -> String {
    p.map_or_else(|| "-".to_owned(), |p| format!("{p:.2}%"))
}

/// Seconds with one decimal, or scaled when that would not fit 7 columns.
fn seconds_text(ns: Option<u64>) -> String {
    match ns {
        None => "-".into(),
        Some(ns) if ns < 100_000 * 1_000_000_000 => format!("{:.1}", ns as f64 / 1e9),
        Some(ns) => fit(ns / 1_000_000_000, 7),
    }
}

/// Add `head` and `tail` as one line, or as two when one would be wider
/// than [`TABLE_WIDTH`].
fn push_line(out: &mut String, head: &str, tail: &str) {
    if head.chars().count() + tail.chars().count() <= TABLE_WIDTH {
        let _ = writeln!(out, "{head}{tail}");
    } else {
        let _ = writeln!(out, "{}", head.trim_end());
        let _ = writeln!(out, "  {}", tail.trim_start());
    }
}

fn render_table(v: &View) -> String {
    let mut out = String::new();
    let s = v.cur;
    push_line(
        &mut out,
        &format!("qpnet {:?}: ", v.name),
        &format!(
            "primary pid {}, VMM {} ({} connection(s) so far), {} queue pair(s)",
            pid_text(s.primary_pid),
            if s.vmm_connected {
                "connected"
            } else {
                "not connected"
            },
            n(s.vmm_connections),
            s.queues.len()
        ),
    );
    if let Some(dt) = v.interval_s() {
        let _ = writeln!(out, "rates per second over the last {dt:.2} s");
    }
    table_queues(&mut out, v);
    table_flow_summary(&mut out, v.cur);
    table_flow_queues(&mut out, v.cur);
    table_top_flows(&mut out, v);
    out
}

/// Column widths of the queue table.
const QW: [usize; 11] = [3, 7, 10, 4, 6, 12, 14, 12, 14, 8, 8];

fn queue_row(out: &mut String, cells: [String; 11]) {
    let _ = writeln!(
        out,
        "{:>w0$} {:>w1$} {:<w2$} {:>w3$} {:>w4$} {:>w5$} {:>w6$} {:>w7$} {:>w8$} {:>w9$} {:>w10$}",
        cells[0],
        cells[1],
        cells[2],
        cells[3],
        cells[4],
        cells[5],
        cells[6],
        cells[7],
        cells[8],
        cells[9],
        cells[10],
        w0 = QW[0],
        w1 = QW[1],
        w2 = QW[2],
        w3 = QW[3],
        w4 = QW[4],
        w5 = QW[5],
        w6 = QW[6],
        w7 = QW[7],
        w8 = QW[8],
        w9 = QW[9],
        w10 = QW[10],
    );
}

fn table_queues(out: &mut String, v: &View) {
    let watching = v.interval_s().is_some();
    let (f, b) = if watching {
        ("_frames/s", "_bytes/s")
    } else {
        ("_frames", "_bytes")
    };
    queue_row(
        out,
        [
            "qp".into(),
            "pid".into(),
            "state".into(),
            "rst".into(),
            "hb_ms".into(),
            format!("tx{f}"),
            format!("tx{b}"),
            format!("rx{f}"),
            format!("rx{b}"),
            "drops".into(),
            "no_buf".into(),
        ],
    );
    // Frames and bytes: totals, or rates while watching.
    let traffic = |qp: Option<usize>, values: &[u64; N_COUNTERS]| -> [String; 4] {
        [TX_FRAMES, TX_BYTES, RX_FRAMES, RX_BYTES]
            .iter()
            .zip(&QW[5..9])
            .map(|(&i, &w)| {
                if watching {
                    rate_text(v.rate(qp, i), w)
                } else {
                    fit(values[i], w)
                }
            })
            .collect::<Vec<_>>()
            .try_into()
            .unwrap_or_default()
    };
    let now = v.cur.taken_ns;
    for (qp, q) in v.cur.queues.iter().enumerate() {
        let [tf, tb, rf, rb] = traffic(Some(qp), &q.values);
        let state = q.state_name();
        queue_row(
            out,
            [
                qp.to_string(),
                pid_text(q.pid),
                if state.len() > QW[2] {
                    "invalid".into()
                } else {
                    state
                },
                fit(q.restarts, QW[3]),
                q.heartbeat_age_ns(now)
                    .map_or_else(|| "-".into(), |a| fit(a / 1_000_000, QW[4])),
                tf,
                tb,
                rf,
                rb,
                fit(q.drops(), QW[9]),
                fit(q.values[RX_NO_BUFFER], QW[10]),
            ],
        );
    }
    let t = &v.cur.totals;
    let [tf, tb, rf, rb] = traffic(None, t);
    queue_row(
        out,
        [
            "all".into(),
            String::new(),
            String::new(),
            fit(sum(v.cur.queues.iter().map(|q| q.restarts)), QW[3]),
            String::new(),
            tf,
            tb,
            rf,
            rb,
            fit(sum(DROPS.iter().map(|&i| t[i])), QW[9]),
            fit(t[RX_NO_BUFFER], QW[10]),
        ],
    );
}

fn table_flow_summary(out: &mut String, s: &Snapshot) {
    let tc = &s.table;
    let _ = writeln!(
        out,
        "flow table: {} of {} entries used ({}), tracking {}",
        n(tc.live as u64),
        n(tc.capacity as u64),
        percent_text(s.fill_percent()),
        match s.flow_tracking() {
            Some(true) => "on",
            Some(false) => "off",
            None => "unknown (no traffic yet)",
        },
    );
    let _ = writeln!(
        out,
        "  created {}, removed {}, refused (full) {}, repairs {}, lock timeouts {}",
        n(tc.created),
        n(tc.removed),
        n(tc.refused),
        n(tc.repairs),
        n(tc.lock_timeouts),
    );
    let _ = writeln!(
        out,
        "  lock failures {}, scrubbed {}, owner gone {}, busy/invalid in this scan {}/{}",
        n(tc.lock_failures),
        n(tc.scrubbed),
        n(tc.owner_gone_removed),
        n(s.flows.skipped_busy as u64),
        n(s.flows.skipped_invalid as u64),
    );
}

/// Column widths of the per-queue flow table.
const FW: [usize; 9] = [3, 8, 10, 10, 14, 11, 11, 11, 9];

fn flow_queue_row(out: &mut String, c: [String; 9]) {
    let _ = writeln!(
        out,
        "{:>w0$} {:>w1$} {:>w2$} {:>w3$} {:>w4$} {:>w5$} {:>w6$} {:>w7$} {:>w8$}",
        c[0],
        c[1],
        c[2],
        c[3],
        c[4],
        c[5],
        c[6],
        c[7],
        c[8],
        w0 = FW[0],
        w1 = FW[1],
        w2 = FW[2],
        w3 = FW[3],
        w4 = FW[4],
        w5 = FW[5],
        w6 = FW[6],
        w7 = FW[7],
        w8 = FW[8],
    );
}

fn table_flow_queues(out: &mut String, s: &Snapshot) {
    let tracking = s.flow_tracking();
    flow_queue_row(
        out,
        [
            "qp",
            "owned",
            "created",
            "expired",
            "tracked_frames",
            "untracked",
            "unparsed",
            "aff_miss",
            "aff_miss%",
        ]
        .map(String::from),
    );
    let row = |out: &mut String, label: String, owned: u64, v: &[u64; N_COUNTERS]| {
        let tracked = tracked(v);
        flow_queue_row(
            out,
            [
                label,
                fit(owned, FW[1]),
                fit(v[FLOWS_CREATED], FW[2]),
                fit(v[FLOWS_EXPIRED], FW[3]),
                if tracking == Some(false) {
                    "-".to_owned()
                } else {
                    fit(tracked, FW[4])
                },
                fit(v[FLOW_UNTRACKED], FW[5]),
                fit(v[FLOW_UNPARSED], FW[6]),
                fit(v[FLOW_AFFINITY_MISSES], FW[7]),
                percent_text(miss_percent(v[FLOW_AFFINITY_MISSES], tracked, tracking)),
            ],
        );
    };
    for (qp, q) in s.queues.iter().enumerate() {
        row(out, qp.to_string(), q.flows_owned, &q.values);
    }
    row(out, "all".into(), s.flows.seen, &s.totals);
}

fn table_top_flows(out: &mut String, v: &View) {
    let s = v.cur;
    if s.flows.top.is_empty() {
        return;
    }
    let watching = v.interval_s().is_some();
    let _ = writeln!(
        out,
        "top {} flow(s) by bytes, of {} (qp: owner queue pair; idle_s: since last seen):",
        s.flows.top.len(),
        n(s.flows.seen)
    );
    let _ = writeln!(
        out,
        "{:>3} {:<11} {:>14} {:>14} {:>11} {:>7}  flow",
        "qp",
        "state",
        "tx_bytes",
        "rx_bytes",
        if watching { "bytes/s" } else { "frames" },
        "idle_s"
    );
    for f in &s.flows.top {
        let last = if watching {
            rate_text(v.flow_rate(f), 11)
        } else {
            fit(f.tx_frames.saturating_add(f.rx_frames), 11)
        };
        let head = format!(
            "{:>3} {:<11} {:>14} {:>14} {:>11} {:>7}  ",
            f.owner,
            f.state.name(),
            fit(f.tx_bytes, 14),
            fit(f.rx_bytes, 14),
            last,
            seconds_text(s.taken_ns.checked_sub(f.last_seen_ns))
        );
        push_line(out, &head, &f.key.to_string());
    }
}

// ---------------------------------------------------------------------------
// JSON.

fn counters_json(values: &[u64; N_COUNTERS], o: &mut Map<String, Value>) {
    for (c, v) in COUNTERS.iter().zip(values) {
        o.insert(c.name.into(), json!(v));
    }
}

fn affinity_json(values: &[u64; N_COUNTERS], tracking: Option<bool>, o: &mut Map<String, Value>) {
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

fn render_json(v: &View) -> Value {
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
    totals.insert(
        "drops".into(),
        json!(sum(DROPS.iter().map(|&i| s.totals[i]))),
    );
    totals.insert(
        "restarts".into(),
        json!(sum(s.queues.iter().map(|q| q.restarts))),
    );
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

// ---------------------------------------------------------------------------
// Prometheus text exposition format (version 0.0.4).

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

    fn sample(&mut self, metric: &str, labels: &[(&str, String)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{metric}{{{}", self.name_label);
        for (k, v) in labels {
            let _ = write!(self.out, ",{k}=\"{}\"", escape_label(v));
        }
        let _ = writeln!(self.out, "}} {value}");
    }

    /// A family with one sample.
    fn single(&mut self, metric: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(metric, kind, help);
        self.sample(metric, &[], value);
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

fn render_prometheus(v: &View) -> String {
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
    let qp_label = |qp: usize| [("queue_pair", qp.to_string())];
    for (i, c) in COUNTERS.iter().enumerate() {
        let metric = format!("qpnet_queue_{}_total", c.name);
        e.family(&metric, "counter", c.help);
        for (qp, q) in s.queues.iter().enumerate() {
            e.sample(&metric, &qp_label(qp), q.values[i]);
        }
    }
    e.family(
        "qpnet_worker_restarts_total",
        "counter",
        "Times the queue pair's worker was restarted.",
    );
    for (qp, q) in s.queues.iter().enumerate() {
        e.sample("qpnet_worker_restarts_total", &qp_label(qp), q.restarts);
    }
    e.family(
        "qpnet_worker_pid",
        "gauge",
        "Process id of the queue pair's worker (0: none; absent when invalid).",
    );
    for (qp, q) in s.queues.iter().enumerate() {
        if q.pid <= PID_MAX {
            e.sample("qpnet_worker_pid", &qp_label(qp), q.pid);
        }
    }
    prometheus_worker_state(&mut e, s);
    e.family(
        "qpnet_worker_heartbeat_age_seconds",
        "gauge",
        "Time since the worker's last loop turn (absent when unknown).",
    );
    for (qp, q) in s.queues.iter().enumerate() {
        if let Some(age) = q.heartbeat_age_ns(s.taken_ns) {
            e.sample(
                "qpnet_worker_heartbeat_age_seconds",
                &qp_label(qp),
                age as f64 / 1e9,
            );
        }
    }
    e.family(
        "qpnet_queue_flows_owned",
        "gauge",
        "Live flows owned by the queue pair.",
    );
    for (qp, q) in s.queues.iter().enumerate() {
        e.sample("qpnet_queue_flows_owned", &qp_label(qp), q.flows_owned);
    }
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

// ---------------------------------------------------------------------------
// Finding the instance.

/// Why there is nothing to print.
enum Refusal {
    NotRunning(String),
    Unreadable(String),
}

impl Refusal {
    fn exit(&self) -> (i32, &str) {
        match self {
            Refusal::NotRunning(m) => (EXIT_NO_INSTANCE, m),
            Refusal::Unreadable(m) => (EXIT_INCOMPATIBLE, m),
        }
    }
}

/// An attached region and the file it came from.
struct Instance {
    region: SharedRegion,
    /// (device, inode) of the mapped file: a primary restart makes a new one.
    identity: (u64, u64),
}

struct Target {
    name: String,
    base: PathBuf,
    dir: PathBuf,
    shm: PathBuf,
}

impl Target {
    fn new(args: &StatsArgs) -> Target {
        let base = args
            .runtime_dir
            .clone()
            .unwrap_or_else(runtime::default_base);
        let dir = runtime::instance_dir(&base, &args.name);
        let shm = runtime::shm_path(&dir);
        Target {
            name: args.name.clone(),
            base,
            dir,
            shm,
        }
    }

    /// Attach, giving a region that is being created a moment to settle.
    fn attach(&self) -> Result<std::result::Result<Instance, Refusal>> {
        let deadline = Instant::now() + SETTLE_TIME;
        loop {
            match self.attach_once()? {
                Err(AttachError::Settling(msg)) if Instant::now() >= deadline => {
                    return Ok(Err(Refusal::Unreadable(msg)));
                }
                Err(AttachError::Settling(_)) => std::thread::sleep(Duration::from_millis(20)),
                Err(AttachError::Refused(r)) => return Ok(Err(r)),
                Ok(i) => return Ok(Ok(i)),
            }
        }
    }

    fn attach_once(&self) -> Result<std::result::Result<Instance, AttachError>> {
        let path = self.shm.display();
        let region = match SharedRegion::open_read_only(&self.shm) {
            Ok(r) => r,
            Err(RegionError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(Err(AttachError::Refused(Refusal::NotRunning(format!(
                    "no qpnet instance {:?} is running: {path} does not exist{}",
                    self.name,
                    self.others()
                )))));
            }
            Err(e @ RegionError::Version { .. }) => {
                return Ok(Err(AttachError::Refused(Refusal::Unreadable(format!(
                    "{path}: {e}; the instance was started by another qpnet build: \
                     use the qpnet binary that runs it"
                )))));
            }
            Err(e @ (RegionError::BadMagic | RegionError::TooSmall { .. })) => {
                return Ok(Err(AttachError::Settling(format!("{path}: {e}"))));
            }
            Err(e @ RegionError::Layout(_)) => {
                return Ok(Err(AttachError::Refused(Refusal::Unreadable(format!(
                    "{path}: {e}"
                )))));
            }
            Err(e) => return Err(e).context("opening the instance's shared region"),
        };
        let primary = region.header().primary_pid.load(Ordering::Relaxed);
        if !primary_running(&self.dir, primary) {
            return Ok(Err(AttachError::Refused(Refusal::NotRunning(format!(
                "no qpnet instance {:?} is running: {path} was left behind (its primary, pid \
                 {primary}, holds no lock on {})",
                self.name,
                self.dir.join("lock").display()
            )))));
        }
        let identity = file_identity(&region)?;
        Ok(Ok(Instance { region, identity }))
    }

    /// "; instances here: a, b" (or none), for the not-found message.
    fn others(&self) -> String {
        let mut names: Vec<String> = std::fs::read_dir(&self.base)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| runtime::shm_path(&e.path()).exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        if names.is_empty() {
            format!(" (no instance under {})", self.base.display())
        } else {
            names.truncate(10);
            format!(
                " (instances under {}: {})",
                self.base.display(),
                names.join(", ")
            )
        }
    }

    /// Whether `inst` is still the live region of this name.
    fn still_current(&self, inst: &Instance) -> bool {
        let same_file = std::fs::metadata(&self.shm)
            .map(|m| (m.dev(), m.ino()) == inst.identity)
            .unwrap_or(false);
        same_file
            && primary_running(
                &self.dir,
                inst.region.header().primary_pid.load(Ordering::Relaxed),
            )
    }
}

enum AttachError {
    /// Not (yet) a complete region: maybe being created right now.
    Settling(String),
    Refused(Refusal),
}

fn file_identity(region: &SharedRegion) -> Result<(u64, u64)> {
    let st = nix::sys::stat::fstat(region.fd()).context("fstat of the shared region")?;
    Ok((st.st_dev, st.st_ino))
}

/// Whether a primary holds the instance directory's lock. Read from
/// /proc/locks: trying the lock ourselves could make a primary that starts
/// at that moment fail to get it. Falls back to the pid in the header.
fn primary_running(dir: &Path, header_pid: u32) -> bool {
    let Ok(lock) = std::fs::metadata(dir.join("lock")) else {
        return false;
    };
    match std::fs::read_to_string("/proc/locks") {
        Ok(locks) => crate::runtime::flock_held(&locks, lock.dev(), lock.ino()),
        Err(_) => pid_alive(header_pid),
    }
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    pid != 0
        && matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Ok(()) | Err(nix::errno::Errno::EPERM)
        )
}

// ---------------------------------------------------------------------------
// The command.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Table,
    Json,
    Prometheus,
}

impl Format {
    fn of(args: &StatsArgs) -> Format {
        if args.json {
            Format::Json
        } else if args.prometheus {
            Format::Prometheus
        } else {
            Format::Table
        }
    }
}

/// Check `--watch`; `Err` holds the message.
fn watch_interval(args: &StatsArgs) -> std::result::Result<Option<Duration>, String> {
    let Some(secs) = args.watch else {
        return Ok(None);
    };
    if args.prometheus {
        return Err(
            "--watch does not go with --prometheus: Prometheus scrapes and computes \
                    rates itself"
                .into(),
        );
    }
    if !(WATCH_MIN..=WATCH_MAX).contains(&secs) {
        return Err(format!(
            "--watch {secs}: the interval must be between {WATCH_MIN} and {WATCH_MAX} seconds"
        ));
    }
    Ok(Some(Duration::from_secs_f64(secs)))
}

fn render(format: Format, v: &View, watching: bool) -> Result<String> {
    Ok(match format {
        Format::Table => render_table(v),
        Format::Prometheus => render_prometheus(v),
        // One document per line while watching (NDJSON), pretty otherwise.
        Format::Json if watching => serde_json::to_string(&render_json(v))? + "\n",
        Format::Json => serde_json::to_string_pretty(&render_json(v))? + "\n",
    })
}

/// Write `text` to stdout; `false` when the reader went away (a closed
/// pipe ends the command quietly).
fn emit(text: &str) -> Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

/// Print the stats; returns the process exit code.
pub fn stats(args: StatsArgs) -> Result<i32> {
    runtime::validate_name(&args.name)?;
    let interval = match watch_interval(&args) {
        Ok(i) => i,
        Err(msg) => {
            eprintln!("qpnet stats: {msg}");
            return Ok(EXIT_USAGE);
        }
    };
    let target = Target::new(&args);
    let inst = match target.attach()? {
        Ok(i) => i,
        Err(r) => {
            let (code, msg) = r.exit();
            eprintln!("qpnet stats: {msg}");
            return Ok(code);
        }
    };
    let format = Format::of(&args);
    match interval {
        None => {
            let snap = Snapshot::take(&inst.region, args.top, false);
            let view = View {
                name: &args.name,
                cur: &snap,
                prev: None,
            };
            emit(&render(format, &view, false)?)?;
            Ok(0)
        }
        Some(every) => watch(&args, &target, inst, format, every),
    }
}

/// Print a frame every `every`, with rates against the previous one, until
/// interrupted. Follows the instance across primary restarts; says so on
/// stderr while it is gone.
fn watch(
    args: &StatsArgs,
    target: &Target,
    first: Instance,
    format: Format,
    every: Duration,
) -> Result<i32> {
    let clear = format == Format::Table && std::io::stdout().is_terminal();
    let mut inst = Some(first);
    let mut prev = inst
        .as_ref()
        .map(|i| Snapshot::take(&i.region, args.top, true));
    let start = Instant::now();
    let mut tick: u32 = 0;
    loop {
        tick = next_tick(start, every, tick);
        sleep_until(start + every * tick);
        if inst.as_ref().is_some_and(|i| !target.still_current(i)) {
            inst = None;
            prev = None;
            eprintln!(
                "qpnet stats: instance {:?} stopped; waiting for it to come back",
                args.name
            );
        }
        if inst.is_none() {
            inst = target.attach()?.ok();
            if inst.is_none() {
                continue;
            }
        }
        let Some(i) = inst.as_ref() else { continue };
        let snap = Snapshot::take(&i.region, args.top, true);
        let view = View {
            name: &args.name,
            cur: &snap,
            prev: prev.as_ref(),
        };
        let mut text = render(format, &view, true)?;
        if clear {
            text.insert_str(0, "\x1b[H\x1b[2J");
        } else if format == Format::Table {
            text.push('\n');
        }
        if view.prev.is_some() && !emit(&text)? {
            return Ok(0);
        }
        prev = Some(snap);
    }
}

/// The next tick number: one more, or the first still ahead of us after a
/// stall (never a burst of catch-up frames).
fn next_tick(start: Instant, every: Duration, tick: u32) -> u32 {
    let behind = (start.elapsed().as_secs_f64() / every.as_secs_f64()) as u32;
    (tick + 1).max(behind.saturating_add(1))
}

fn sleep_until(when: Instant) {
    let now = Instant::now();
    if when > now {
        std::thread::sleep(when - now);
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
        assert_eq!(
            DROPS.map(at),
            [
                "drop_too_large",
                "drop_bad_descriptor",
                "drop_runt",
                "drop_tap_error"
            ]
        );
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

    #[test]
    fn proc_locks_lines_are_read() {
        let dev = nix::sys::stat::makedev(0, 0x1a);
        let text = "1: POSIX  ADVISORY  WRITE 99 00:1a:5 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 00:1a:1234 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 77 00:1a:999 0 EOF\n\
                    3: FLOCK  ADVISORY  READ 4243 00:1a:888 0 EOF\n";
        assert!(crate::runtime::flock_held(text, dev, 1234));
        assert!(!crate::runtime::flock_held(text, dev, 5));
        assert!(!crate::runtime::flock_held(text, dev, 999));
        assert!(!crate::runtime::flock_held(text, dev, 888));
        assert!(!crate::runtime::flock_held(
            text,
            nix::sys::stat::makedev(0, 0x1b),
            1234
        ));
    }

    #[test]
    fn numbers_fit_their_columns() {
        assert_eq!(fit(12_345, 5), "12345");
        assert_eq!(fit(123_456, 5), "123k");
        assert_eq!(fit(1_234_567, 6), "1.23M");
        assert_eq!(fit(1_234_567, 4), "1.2M");
        assert_eq!(fit(999_600, 4), "1.0M");
        assert_eq!(fit(u64::MAX, 4), "18E");
        assert_eq!(fit(u64::MAX, 6), "18.45E");
        assert_eq!(fit(u64::MAX, 20), u64::MAX.to_string());
        assert_eq!(fit(999_999, 4), "1.0M");
        for w in 4..=20 {
            for v in [0, 9, 10_000, 999_999, 1 << 40, u64::MAX / 3, u64::MAX] {
                assert!(fit(v, w).len() <= w, "{v} in {w}: {}", fit(v, w));
            }
        }
        assert_eq!(pid_text(0), "-");
        assert_eq!(pid_text(PID_MAX + 1), "invalid");
        assert_eq!(seconds_text(Some(1_500_000_000)), "1.5");
        assert!(seconds_text(Some(u64::MAX)).len() <= 7);
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("x\\y\nz\""), "x\\\\y\\nz\"");
    }

    #[test]
    fn ticks_skip_ahead_after_a_stall() {
        let every = Duration::from_millis(10);
        let start = Instant::now() - Duration::from_millis(55);
        assert_eq!(next_tick(start, every, 1), 6);
        assert_eq!(next_tick(Instant::now(), every, 3), 4);
    }
}
