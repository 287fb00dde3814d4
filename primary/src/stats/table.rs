//! The human table of `qpnet stats`: a header line, the queue pairs'
//! counters and workers, the flow table's figures, flows per queue pair and
//! the largest flows.
//!
//! Lines never get wider than [`TABLE_WIDTH`]: numbers that do not fit
//! their column are scaled to an SI unit ([`fit`]), and a flow key that
//! would go past the edge moves to a line of its own. Out-of-range values
//! read from the region show as such ("invalid", "-"). Only the table
//! rounds; JSON and Prometheus are always exact.

use std::fmt::Write as _;

use super::snapshot::{
    drops, miss_percent, tracked, Snapshot, Values, FLOWS_CREATED, FLOWS_EXPIRED,
    FLOW_AFFINITY_MISSES, FLOW_UNPARSED, FLOW_UNTRACKED, PID_MAX, RX_BYTES, RX_FRAMES,
    RX_NO_BUFFER, TX_BYTES, TX_FRAMES,
};
use super::watch::View;

/// Table lines never get wider than this (flow keys that would go past it
/// move to a line of their own).
const TABLE_WIDTH: usize = 120;

/// One column of a table: its width, and whether its cells keep to the
/// left (else to the right).
#[derive(Clone, Copy)]
struct Col {
    width: usize,
    left: bool,
}

/// A right-aligned column.
const fn right(width: usize) -> Col {
    Col { width, left: false }
}

/// A left-aligned column.
const fn left(width: usize) -> Col {
    Col { width, left: true }
}

/// Columns of the queue table.
const QUEUE_COLS: [Col; 11] = [
    right(3),
    right(7),
    left(10),
    right(4),
    right(6),
    right(12),
    right(14),
    right(12),
    right(14),
    right(8),
    right(8),
];
/// Columns of the per-queue flow table.
const FLOW_QUEUE_COLS: [Col; 9] = [
    right(3),
    right(8),
    right(10),
    right(10),
    right(14),
    right(11),
    right(11),
    right(11),
    right(9),
];
/// Columns of the top flows, before the flow key.
const TOP_FLOW_COLS: [Col; 6] = [
    right(3),
    left(11),
    right(14),
    right(14),
    right(11),
    right(7),
];

/// `cells` padded to their columns, one space apart (no line end).
fn cells_text<S: AsRef<str>>(cols: &[Col], cells: &[S]) -> String {
    let mut line = String::new();
    for (i, (c, cell)) in cols.iter().zip(cells).enumerate() {
        let (cell, w) = (cell.as_ref(), c.width);
        if i > 0 {
            line.push(' ');
        }
        let _ = if c.left {
            write!(line, "{cell:<w$}")
        } else {
            write!(line, "{cell:>w$}")
        };
    }
    line
}

/// Add `cells` as one line.
fn push_row<S: AsRef<str>>(out: &mut String, cols: &[Col], cells: &[S]) {
    let _ = writeln!(out, "{}", cells_text(cols, cells));
}

/// `v` in at most `width` characters: exact when it fits, else scaled to
/// below 1000 of an SI unit (k, M, G, T, P, E) with the most decimals that
/// fit. Only the table does this; JSON and Prometheus are always exact.
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

/// The whole table.
pub(super) fn render_table(v: &View) -> String {
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

fn table_queues(out: &mut String, v: &View) {
    let watching = v.interval_s().is_some();
    let (f, b) = if watching {
        ("_frames/s", "_bytes/s")
    } else {
        ("_frames", "_bytes")
    };
    push_row(
        out,
        &QUEUE_COLS,
        &[
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
    let w = |i: usize| QUEUE_COLS[i].width;
    // Frames and bytes: totals, or rates while watching.
    let traffic = |qp: Option<usize>, values: &Values| -> [String; 4] {
        [TX_FRAMES, TX_BYTES, RX_FRAMES, RX_BYTES]
            .iter()
            .zip(5..9)
            .map(|(&i, col)| {
                if watching {
                    rate_text(v.rate(qp, i), w(col))
                } else {
                    fit(values[i], w(col))
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
        push_row(
            out,
            &QUEUE_COLS,
            &[
                qp.to_string(),
                pid_text(q.pid),
                if state.len() > w(2) {
                    "invalid".into()
                } else {
                    state
                },
                fit(q.restarts, w(3)),
                q.heartbeat_age_ns(now)
                    .map_or_else(|| "-".into(), |a| fit(a / 1_000_000, w(4))),
                tf,
                tb,
                rf,
                rb,
                fit(q.drops(), w(9)),
                fit(q.values[RX_NO_BUFFER], w(10)),
            ],
        );
    }
    let t = &v.cur.totals;
    let [tf, tb, rf, rb] = traffic(None, t);
    push_row(
        out,
        &QUEUE_COLS,
        &[
            "all".into(),
            String::new(),
            String::new(),
            fit(v.cur.restarts(), w(3)),
            String::new(),
            tf,
            tb,
            rf,
            rb,
            fit(drops(t), w(9)),
            fit(t[RX_NO_BUFFER], w(10)),
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

fn table_flow_queues(out: &mut String, s: &Snapshot) {
    let tracking = s.flow_tracking();
    push_row(
        out,
        &FLOW_QUEUE_COLS,
        &[
            "qp",
            "owned",
            "created",
            "expired",
            "tracked_frames",
            "untracked",
            "unparsed",
            "aff_miss",
            "aff_miss%",
        ],
    );
    let w = |i: usize| FLOW_QUEUE_COLS[i].width;
    let row = |out: &mut String, label: String, owned: u64, v: &Values| {
        let tracked = tracked(v);
        push_row(
            out,
            &FLOW_QUEUE_COLS,
            &[
                label,
                fit(owned, w(1)),
                fit(v[FLOWS_CREATED], w(2)),
                fit(v[FLOWS_EXPIRED], w(3)),
                if tracking == Some(false) {
                    "-".to_owned()
                } else {
                    fit(tracked, w(4))
                },
                fit(v[FLOW_UNTRACKED], w(5)),
                fit(v[FLOW_UNPARSED], w(6)),
                fit(v[FLOW_AFFINITY_MISSES], w(7)),
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
    let header = [
        "qp",
        "state",
        "tx_bytes",
        "rx_bytes",
        if watching { "bytes/s" } else { "frames" },
        "idle_s",
    ];
    let _ = writeln!(out, "{}  flow", cells_text(&TOP_FLOW_COLS, &header));
    for f in &s.flows.top {
        let last = if watching {
            rate_text(v.flow_rate(f), 11)
        } else {
            fit(f.tx_frames.saturating_add(f.rx_frames), 11)
        };
        let cells = [
            f.owner.to_string(),
            f.state.name().to_owned(),
            fit(f.tx_bytes, 14),
            fit(f.rx_bytes, 14),
            last,
            seconds_text(s.taken_ns.checked_sub(f.last_seen_ns)),
        ];
        let head = format!("{}  ", cells_text(&TOP_FLOW_COLS, &cells));
        push_line(out, &head, &f.key.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
