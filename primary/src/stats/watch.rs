//! `--watch SECS`: a frame every interval with per-second rates against the
//! frame before, following the instance across primary restarts; and the
//! [`View`] every renderer prints from (a snapshot and, while watching, the
//! one before it).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Result;
use qpnet_shared::FlowSnapshot;

use super::instance::{Instance, Target};
use super::snapshot::{flow_bytes, Snapshot};
use super::{emit, render, Format};
use crate::cli::StatsArgs;

/// Shortest and longest `--watch` interval.
const WATCH_MIN: f64 = 0.01;
const WATCH_MAX: f64 = 86_400.0;

/// A snapshot and, in `--watch`, the one before it (for rates).
pub(super) struct View<'a> {
    pub(super) name: &'a str,
    pub(super) cur: &'a Snapshot,
    pub(super) prev: Option<&'a Snapshot>,
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

    /// Seconds since the previous frame, when rates are shown.
    pub(super) fn interval_s(&self) -> Option<f64> {
        self.rate_base().map(|(_, dt)| dt)
    }

    /// Per-second rate of counter `i` of queue pair `qp` (`None` for the
    /// totals), or `None` when there is no base or the counter went back.
    pub(super) fn rate(&self, qp: Option<usize>, i: usize) -> Option<f64> {
        let (prev, dt) = self.rate_base()?;
        let (now, before) = match qp {
            Some(qp) => (self.cur.queues[qp].values[i], prev.queues[qp].values[i]),
            None => (self.cur.totals[i], prev.totals[i]),
        };
        now.checked_sub(before).map(|d| d as f64 / dt)
    }

    /// Bytes per second of one flow: against its bytes in the previous
    /// frame, or all its bytes if it started since; otherwise unknown.
    pub(super) fn flow_rate(&self, f: &FlowSnapshot) -> Option<f64> {
        let (prev, dt) = self.rate_base()?;
        let before = match prev.flows.basis.get(&f.key) {
            Some(&b) => b,
            None if f.first_seen_ns >= prev.taken_ns => 0,
            None => return None,
        };
        flow_bytes(f).checked_sub(before).map(|d| d as f64 / dt)
    }
}

/// Check `--watch`; `Err` holds the message.
pub(super) fn watch_interval(args: &StatsArgs) -> std::result::Result<Option<Duration>, String> {
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

/// Print a frame every `every`, with rates against the previous one, until
/// interrupted. Follows the instance across primary restarts; says so on
/// stderr while it is gone.
pub(super) fn watch(
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
    fn ticks_skip_ahead_after_a_stall() {
        let every = Duration::from_millis(10);
        let start = Instant::now() - Duration::from_millis(55);
        assert_eq!(next_tick(start, every, 1), 6);
        assert_eq!(next_tick(Instant::now(), every, 3), 4);
    }
}
