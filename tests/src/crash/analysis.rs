//! What a load run says about each kill ([`analyze`]):
//! - recovery: from the kill to the arrival of the first frame of that
//!   queue pair that was published after the signal took effect (so it can
//!   only have been sent by the new worker);
//! - the other queue pairs' worst *service stall* around it: the longest
//!   time one of them had a frame waiting and delivered nothing (for each
//!   arrival, from max(previous arrival, this frame's publication) to this
//!   arrival). Pauses of the test's own generator are not stalls;
//! - duplicates: a frame may arrive twice only if its chain was in flight
//!   at the kill (made available, used index not yet published:
//!   `used_before..avail_after` of that kill); TX never loses a frame;
//! - RX ([`super::rx_accounting`]): frames may be lost only if the dead
//!   worker can have held them; never duplicated, never corrupted.
//!
//! Stalls are measured in [`super::stalls`], TX and RX alike; each worst
//! stall carries the CPU wait sampled inside it ([`super::cpu_wait`]).

use super::records::{Arrival, Records};
use super::rx_accounting as rx;
use super::stalls::{worst_stall, Direction, QueueStalls, Stall};

/// What the report counts as a long stall (the limit).
pub const LONG_STALL_NS: u64 = 10_000_000;
/// How long before the replacement was seen a late replacement's window
/// opens (the watchdog's kill comes a little before).
const REPLACEMENT_LEAD_NS: u64 = 50_000_000;
/// Length of the stretch before each kill whose stalls serve as baseline.
pub const BASELINE_NS: u64 = 50_000_000;

/// A signal the test sent to a worker.
#[derive(Debug, Clone)]
pub struct KillEvent {
    /// The queue pair.
    pub queue: usize,
    /// The worker's pid.
    pub pid: u32,
    /// "SIGKILL" or "SIGSTOP".
    pub signal: &'static str,
    /// Just before kill(2) (realtime ns).
    pub at_ns: u64,
    /// When the test saw the signal in effect (process dead or stopped):
    /// frames published after this can only go through a new worker.
    pub effective_ns: u64,
    /// TX used index (unwrapped) read just before kill(2).
    pub used_before: u64,
    /// TX avail index (unwrapped) read once the signal had taken effect.
    pub avail_after: u64,
    /// [`LoadView::pushed`] then: this frame and later ones can only go
    /// through a new worker.
    pub first_new_seq: u64,
    /// When the test saw the replacement's pid in the stats (realtime ns).
    pub replaced_ns: Option<u64>,
    /// Time the primary and the new worker spent runnable but waiting for a
    /// CPU between the kill and the replacement being seen (schedstat): how
    /// much of the recovery the machine's load took.
    pub runq_wait_ns: Option<u64>,
}

#[cfg(test)]
impl KillEvent {
    /// A SIGKILL of queue pair `queue` at `at_ns` that took effect 1 ns
    /// later, with empty TX rings (unit tests).
    pub(crate) fn at(queue: usize, at_ns: u64) -> KillEvent {
        KillEvent {
            queue,
            pid: 1,
            signal: "SIGKILL",
            at_ns,
            effective_ns: at_ns + 1,
            used_before: 0,
            avail_after: 0,
            first_new_seq: 0,
            replaced_ns: None,
            runq_wait_ns: None,
        }
    }
}

/// A queue pair's worst stall in a kill's window, and the CPU wait of its
/// worker and the driver thread inside that stall.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorstStall {
    /// Its length (0: none).
    pub ns: u64,
    /// Which queue pair stalled.
    pub queue: usize,
    /// CPU wait of that queue pair's worker plus the load's driver thread
    /// during the stall itself ([`super::cpu_wait::CpuWaits::during`]).
    pub cpu_wait_ns: u64,
}

/// The long stalls of a run away from its kills.
#[derive(Debug, Clone, Default)]
pub struct AwayStalls {
    /// Each stall over [`LONG_STALL_NS`] that ended outside every kill's
    /// window, with the CPU wait inside it.
    pub long: Vec<WorstStall>,
    /// Queue-pair-direction time inside kill windows (ns).
    pub near_stream_ns: u64,
    /// Queue-pair-direction time outside them (ns).
    pub away_stream_ns: u64,
}

/// What one kill did.
#[derive(Debug, Clone, Default)]
pub struct KillOutcome {
    /// Kill -> first TX frame published after the kill on the TAP.
    pub recovery_ns: Option<u64>,
    /// Kill -> first RX frame sent after the kill reaped from the queue.
    pub rx_recovery_ns: Option<u64>,
    /// Kill -> replacement pid seen in the stats.
    pub replaced_ns: Option<u64>,
    /// See [`KillEvent::runq_wait_ns`].
    pub runq_wait_ns: Option<u64>,
    /// The other queue pairs' worst TX stall in the kill's window.
    pub others_tx: WorstStall,
    /// The other queue pairs' worst RX stall in the kill's window.
    pub others_rx: WorstStall,
    /// The same queue pairs' worst stall (TX or RX) in the [`BASELINE_NS`]
    /// before the kill: what the machine does to them without a kill.
    pub others_stall_before_ns: u64,
    /// TX chains in flight at the kill (upper bound: avail_after - used_before).
    pub tx_in_flight: u64,
    /// TX frames that arrived twice because of this kill.
    pub tx_dups: u64,
    /// RX frames sent to the killed queue pair's flows before the signal
    /// took effect and not reaped before the kill: all it could have held.
    pub rx_in_flight: u64,
    /// RX frames this kill cost.
    pub rx_lost: u64,
}

impl KillOutcome {
    /// The worse of the two stalls.
    pub fn others_worst(&self) -> WorstStall {
        worse(self.others_tx, self.others_rx)
    }
}

/// The verdict on a whole run.
#[derive(Debug, Default)]
pub struct Analysis {
    /// One outcome per kill, in order.
    pub kills: Vec<KillOutcome>,
    /// Broken invariants (independent of timing thresholds): corruption,
    /// loss, unexplained duplicates, leaked descriptors.
    pub problems: Vec<String>,
    /// The worst service stall of any queue pair away from every kill
    /// (more than `window` after the last kill, before the next): the
    /// machine's own noise, reported for comparison.
    pub quiet_stall_ns: u64,
    /// Stalls over [`LONG_STALL_NS`] away from every kill's window (with
    /// the CPU wait inside each), and the time inside and outside the
    /// windows: the machine's own rate of long stalls.
    pub away: AwayStalls,
    /// Distinct TX frames that arrived.
    pub tx_frames: u64,
    /// TX duplicates in total.
    pub tx_dups: u64,
    /// RX frames sent.
    pub rx_sent: u64,
    /// RX frames that arrived.
    pub rx_frames: u64,
    /// RX frames lost in total.
    pub rx_lost: u64,
    /// Queue pairs no RX test frame arrived on at all.
    pub rx_silent_queues: Vec<usize>,
}

/// CPU wait of the threads on a frame's path of queue pair `q` during
/// `[start, end]`.
type PathWait<'a> = &'a dyn Fn(usize, u64, u64) -> u64;

/// The worst stall of the queue pairs other than `killed` in `[t0, t1]`.
fn others_worst(
    stalls: &[Vec<Stall>],
    killed: usize,
    (t0, t1): (u64, u64),
    cpu: PathWait<'_>,
) -> WorstStall {
    let mut worst = WorstStall::default();
    for (q, s) in stalls.iter().enumerate().filter(|(q, _)| *q != killed) {
        if let Some(st) = worst_stall(s, t0, t1) {
            if st.ns() > worst.ns {
                worst = WorstStall {
                    ns: st.ns(),
                    queue: q,
                    cpu_wait_ns: cpu(q, st.start, st.end),
                };
            }
        }
    }
    worst
}

fn worse(a: WorstStall, b: WorstStall) -> WorstStall {
    if b.ns > a.ns {
        b
    } else {
        a
    }
}

/// The stretches after kill `k` in which the other queue pairs are held to
/// their stall limit: `window_ns` from the signal, and, when the worker was
/// replaced later than that (a wedged worker, killed by the watchdog), again
/// around the replacement. Each ends at the next kill.
fn kill_windows(kills: &[KillEvent], k: usize, window_ns: u64) -> Vec<(u64, u64)> {
    let ev = &kills[k];
    let next = kills.get(k + 1).map_or(u64::MAX, |n| n.at_ns);
    let mut windows = vec![(ev.at_ns, (ev.at_ns + window_ns).min(next))];
    if let Some(r) = ev.replaced_ns.filter(|&r| r > ev.at_ns + window_ns) {
        windows.push((
            r.saturating_sub(REPLACEMENT_LEAD_NS),
            (r + window_ns).min(next),
        ));
    }
    windows
}

/// Judge `kills` against `records`. `window_ns`: how long after a kill the
/// other queue pairs are watched for stalls.
pub fn analyze(records: &Records, kills: &[KillEvent], window_ns: u64) -> Analysis {
    let mut a = Analysis {
        kills: vec![KillOutcome::default(); kills.len()],
        ..Analysis::default()
    };
    let stalls = QueueStalls::of(records);
    let mut arrivals = records.tx_arrivals.clone();
    for v in &mut arrivals {
        v.sort_by_key(|x| x.at_ns);
    }
    for (k, ev) in kills.iter().enumerate() {
        let out = &mut a.kills[k];
        out.tx_in_flight = ev.avail_after.saturating_sub(ev.used_before);
        out.replaced_ns = ev.replaced_ns.map(|t| t.saturating_sub(ev.at_ns));
        out.runq_wait_ns = ev.runq_wait_ns;
        out.recovery_ns = first_new_arrival(
            &arrivals[ev.queue],
            &records.pushed_at[ev.queue],
            ev.effective_ns.max(ev.at_ns),
        )
        .map(|at| at - ev.at_ns);
        let cpu = &records.cpu;
        for window in kill_windows(kills, k, window_ns) {
            let tx = others_worst(&stalls.tx, ev.queue, window, &|q, s, e| {
                cpu.during_tx(q, s, e)
            });
            let rx = others_worst(&stalls.rx, ev.queue, window, &|q, s, e| {
                cpu.during_rx(q, s, e)
            });
            out.others_tx = worse(out.others_tx, tx);
            out.others_rx = worse(out.others_rx, rx);
        }
        let before = (ev.at_ns.saturating_sub(BASELINE_NS), ev.at_ns);
        let none = |_, _, _| 0;
        out.others_stall_before_ns = others_worst(&stalls.tx, ev.queue, before, &none)
            .ns
            .max(others_worst(&stalls.rx, ev.queue, before, &none).ns);
    }
    a.quiet_stall_ns = stalls.quiet(kills, window_ns);
    let away = stalls.away_from_kills(kills, window_ns, LONG_STALL_NS);
    let cpu = &records.cpu;
    a.away = AwayStalls {
        long: away
            .long
            .iter()
            .map(|&(queue, dir, st)| WorstStall {
                ns: st.ns(),
                queue,
                cpu_wait_ns: match dir {
                    Direction::Tx => cpu.during_tx(queue, st.start, st.end),
                    Direction::Rx => cpu.during_rx(queue, st.start, st.end),
                },
            })
            .collect(),
        near_stream_ns: away.near_stream_ns,
        away_stream_ns: away.away_stream_ns,
    };
    check_tx_accounting(records, kills, &mut a);
    rx::check(records, kills, &mut a);
    for r in &records.rings {
        if let Some(p) = r.leak() {
            a.problems.push(format!("descriptor leak: {p}"));
        }
    }
    a
}

/// When the first frame of the queue published after `after` arrived.
pub fn first_new_arrival(arrivals: &[Arrival], published_at: &[u64], after: u64) -> Option<u64> {
    let from = arrivals.partition_point(|x| x.at_ns < after);
    arrivals[from..]
        .iter()
        .find(|x| published_at.get(x.seq as usize).is_some_and(|&p| p > after))
        .map(|x| x.at_ns)
}

/// TX: every frame arrived, intact; duplicates only of chains in flight at
/// a kill of their queue.
fn check_tx_accounting(records: &Records, kills: &[KillEvent], a: &mut Analysis) {
    if !records.tx_corrupt.is_empty() {
        a.problems
            .push(format!("corrupt TX frames: {:?}", records.tx_corrupt));
    }
    for q in 0..records.queues {
        let pushed = records.pushed_at[q].len();
        let mut count = vec![0u32; pushed];
        for x in &records.tx_arrivals[q] {
            match count.get_mut(x.seq as usize) {
                Some(c) => *c += 1,
                None => a.problems.push(format!(
                    "queue {q}: frame {} arrived but was never sent",
                    x.seq
                )),
            }
        }
        let missing: Vec<usize> = (0..pushed).filter(|&s| count[s] == 0).collect();
        if !missing.is_empty() {
            a.problems.push(format!(
                "queue {q}: {} TX frames lost, first {:?}",
                missing.len(),
                &missing[..missing.len().min(10)]
            ));
        }
        a.tx_frames += (pushed - missing.len()) as u64;
        let mut unexplained = Vec::new();
        for (seq, &c) in count.iter().enumerate() {
            if c <= 1 {
                continue;
            }
            let extra = u64::from(c - 1);
            a.tx_dups += extra;
            match duplicate_causes(kills, q, seq as u64, extra as usize) {
                Some(by) => by.into_iter().for_each(|k| a.kills[k].tx_dups += 1),
                None => unexplained.push((seq, c)),
            }
        }
        if !unexplained.is_empty() {
            a.problems.push(format!(
                "queue {q}: {} TX frames duplicated that were not in flight at a kill \
                 (seq, copies) {:?}",
                unexplained.len(),
                &unexplained[..unexplained.len().min(10)]
            ));
        }
    }
}

/// The kills that explain `extra` surplus copies of TX frame `seq` of
/// queue `q`, or `None` if they cannot. Each worker sends a chain at most
/// once, so a chain in flight at n kills (kills back to back, each before
/// the chain was marked used) may arrive up to n + 1 times: one extra copy
/// per such kill.
fn duplicate_causes(kills: &[KillEvent], q: usize, seq: u64, extra: usize) -> Option<Vec<usize>> {
    let by: Vec<usize> = kills
        .iter()
        .enumerate()
        .filter(|(_, k)| k.queue == q && k.used_before <= seq && seq < k.avail_after)
        .map(|(i, _)| i)
        .take(extra)
        .collect();
    (by.len() == extra).then_some(by)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(seq: u32, at_ns: u64) -> Arrival {
        Arrival { seq, at_ns }
    }

    fn kill(queue: usize, used_before: u64, avail_after: u64) -> KillEvent {
        KillEvent {
            used_before,
            avail_after,
            first_new_seq: avail_after,
            ..KillEvent::at(queue, 0)
        }
    }

    #[test]
    fn a_late_replacement_opens_a_second_window() {
        let ms = 1_000_000;
        let stop = KillEvent {
            replaced_ns: Some(1_000 * ms),
            ..KillEvent::at(1, 0)
        };
        assert_eq!(
            kill_windows(&[stop], 0, 100 * ms),
            vec![(0, 100 * ms), (950 * ms, 1_100 * ms)]
        );
        // A prompt replacement: one window, cut at the next kill.
        let quick = KillEvent {
            replaced_ns: Some(3 * ms),
            ..KillEvent::at(1, 0)
        };
        let next = KillEvent::at(2, 60 * ms);
        assert_eq!(
            kill_windows(&[quick, next], 0, 100 * ms),
            vec![(0, 60 * ms)]
        );
    }

    #[test]
    fn each_kill_explains_one_copy_of_a_chain_in_flight_at_it() {
        // Frame 208 in flight at two kills of queue 1 back to back.
        let kills = [kill(1, 200, 210), kill(0, 0, 300), kill(1, 208, 212)];
        assert_eq!(duplicate_causes(&kills, 1, 208, 1), Some(vec![0]));
        assert_eq!(duplicate_causes(&kills, 1, 208, 2), Some(vec![0, 2]));
        assert_eq!(duplicate_causes(&kills, 1, 208, 3), None);
        // In flight at one kill only: one extra copy at most.
        assert_eq!(duplicate_causes(&kills, 1, 205, 2), None);
        // Another queue's kill explains nothing; nor does a used chain.
        assert_eq!(duplicate_causes(&kills, 1, 250, 1), None);
        assert_eq!(duplicate_causes(&kills, 1, 199, 1), None);
    }

    #[test]
    fn recovery_waits_for_a_frame_published_after_the_kill() {
        let pushed = [0, 10, 20, 30];
        // Frame 1 and 2 were in flight at the kill (25) and re-sent.
        let arrivals = [arr(0, 1), arr(1, 11), arr(1, 40), arr(2, 41), arr(3, 42)];
        assert_eq!(first_new_arrival(&arrivals, &pushed, 25), Some(42));
        assert_eq!(first_new_arrival(&arrivals, &pushed, 50), None);
    }
}
