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
//! - RX: frames may be lost only if sent shortly before a kill of the
//!   queue pair their flow lands on (the dead worker had read them but not
//!   published them); never duplicated, never corrupted.

use std::collections::{BTreeSet, HashMap};

use super::records::{Arrival, Records, RxArrival};

/// A lost RX frame must have been sent at most this long before the kill
/// that explains it.
const RX_LOSS_HORIZON_NS: u64 = 1_000_000_000;
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
    /// Per queue pair, how long its worker spent runnable but waiting for a
    /// CPU in the 100 ms after the kill (0 for the killed queue pair, and
    /// when unknown): the part of a stall the machine, not qpnet, caused.
    pub others_runq_wait_ns: Vec<u64>,
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
    /// The other queue pairs' worst service stall in the kill's window.
    pub others_stall_ns: u64,
    /// Which queue pair that was.
    pub others_stall_queue: usize,
    /// The same queue pairs' worst stall in the [`BASELINE_NS`] before the
    /// kill: what the machine does to them without a kill.
    pub others_stall_before_ns: u64,
    /// TX chains in flight at the kill (upper bound: avail_after - used_before).
    pub tx_in_flight: u64,
    /// TX frames that arrived twice because of this kill.
    pub tx_dups: u64,
    /// RX frames this kill cost.
    pub rx_lost: u64,
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
    /// machine's own noise.
    pub quiet_stall_ns: u64,
    /// Distinct TX frames that arrived.
    pub tx_frames: u64,
    /// TX duplicates in total.
    pub tx_dups: u64,
    /// RX frames that arrived.
    pub rx_frames: u64,
    /// RX frames lost in total.
    pub rx_lost: u64,
}

/// A time some queue pair had a frame waiting and delivered nothing.
#[derive(Debug, Clone, Copy)]
struct Stall {
    /// The arrival before this one.
    prev: u64,
    start: u64,
    end: u64,
}

/// The service stalls of one queue, in arrival order.
fn service_stalls(arrivals: &[Arrival], pushed_at: &[u64]) -> Vec<Stall> {
    let mut seen = BTreeSet::new();
    let mut stalls = Vec::with_capacity(arrivals.len());
    let mut prev: Option<u64> = None;
    for a in arrivals {
        let first = seen.insert(a.seq);
        if let (true, Some(p), Some(&pushed)) = (first, prev, pushed_at.get(a.seq as usize)) {
            let start = p.max(pushed);
            if a.at_ns > start {
                stalls.push(Stall {
                    prev: p,
                    start,
                    end: a.at_ns,
                });
            }
        }
        prev = Some(prev.map_or(a.at_ns, |p| p.max(a.at_ns)));
    }
    stalls
}

/// The longest stall overlapping `[t0, t1]` (and which started by `t1`).
fn worst_stall(stalls: &[Stall], t0: u64, t1: u64) -> u64 {
    let from = stalls.partition_point(|s| s.end < t0);
    stalls[from..]
        .iter()
        .take_while(|s| s.prev <= t1)
        .filter(|s| s.start <= t1)
        .map(|s| s.end - s.start)
        .max()
        .unwrap_or(0)
}

/// Judge `kills` against `records`. `window_ns`: how long after a kill the
/// other queue pairs are watched for stalls.
pub fn analyze(records: &Records, kills: &[KillEvent], window_ns: u64) -> Analysis {
    let mut a = Analysis {
        kills: vec![KillOutcome::default(); kills.len()],
        ..Analysis::default()
    };
    let mut arrivals = records.tx_arrivals.clone();
    for v in &mut arrivals {
        v.sort_by_key(|x| x.at_ns);
    }
    let stalls: Vec<Vec<Stall>> = (0..records.queues)
        .map(|q| service_stalls(&arrivals[q], &records.pushed_at[q]))
        .collect();
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
        let next = kills.get(k + 1).map_or(u64::MAX, |n| n.at_ns);
        let t1 = (ev.at_ns + window_ns).min(next);
        for (q, s) in stalls.iter().enumerate() {
            if q == ev.queue {
                continue;
            }
            let w = worst_stall(s, ev.at_ns, t1);
            if w >= out.others_stall_ns {
                out.others_stall_ns = w;
                out.others_stall_queue = q;
            }
            let before = worst_stall(s, ev.at_ns.saturating_sub(BASELINE_NS), ev.at_ns);
            out.others_stall_before_ns = out.others_stall_before_ns.max(before);
        }
    }
    a.quiet_stall_ns = quiet_stall(&stalls, kills, window_ns);
    check_tx_accounting(records, kills, &mut a);
    check_rx(records, kills, &mut a);
    for r in &records.rings {
        if let Some(p) = r.leak() {
            a.problems.push(format!("descriptor leak: {p}"));
        }
    }
    a
}

/// When the first frame of the queue published after `after` arrived.
fn first_new_arrival(arrivals: &[Arrival], pushed_at: &[u64], after: u64) -> Option<u64> {
    let from = arrivals.partition_point(|x| x.at_ns < after);
    arrivals[from..]
        .iter()
        .find(|x| pushed_at.get(x.seq as usize).is_some_and(|&p| p > after))
        .map(|x| x.at_ns)
}

/// The worst stall of any queue pair in stretches with no kill in or just
/// before them.
fn quiet_stall(stalls: &[Vec<Stall>], kills: &[KillEvent], window_ns: u64) -> u64 {
    let near_kill = |s: &Stall| {
        kills
            .iter()
            .any(|k| s.end >= k.at_ns && s.start <= k.at_ns + window_ns)
    };
    stalls
        .iter()
        .flatten()
        .filter(|s| !near_kill(s))
        .map(|s| s.end - s.start)
        .max()
        .unwrap_or(0)
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

/// RX: intact, never twice, lost only just before a kill of their queue.
fn check_rx(records: &Records, kills: &[KillEvent], a: &mut Analysis) {
    if !records.rx_corrupt.is_empty() {
        a.problems
            .push(format!("corrupt RX frames: {:?}", records.rx_corrupt));
    }
    if records.rx_used_index_inside_frame > 0 {
        a.problems.push(format!(
            "the RX used index was published inside a frame {} times",
            records.rx_used_index_inside_frame
        ));
    }
    let sent = records.rx_sent_at.len();
    let mut count = vec![0u32; sent];
    let mut flow_queues: HashMap<u16, BTreeSet<usize>> = HashMap::new();
    let mut per_queue: Vec<Vec<RxArrival>> = vec![Vec::new(); records.queues];
    for x in &records.rx_arrivals {
        match count.get_mut(x.seq as usize) {
            Some(c) => *c += 1,
            None => a
                .problems
                .push(format!("RX frame {} arrived but was never sent", x.seq)),
        }
        flow_queues
            .entry(x.flow)
            .or_default()
            .insert(usize::from(x.queue));
        per_queue[usize::from(x.queue)].push(*x);
    }
    let dups: Vec<usize> = (0..sent).filter(|&s| count[s] > 1).collect();
    if !dups.is_empty() {
        a.problems.push(format!(
            "{} RX frames arrived more than once, first {:?}",
            dups.len(),
            &dups[..dups.len().min(10)]
        ));
    }
    a.rx_frames = count.iter().filter(|&&c| c > 0).count() as u64;
    let flows = u32::from(records.rx_flows.max(1));
    let mut unexplained = Vec::new();
    for seq in (0..sent).filter(|&s| count[s] == 0) {
        a.rx_lost += 1;
        let flow = (seq as u32 % flows) as u16;
        let t = records.rx_sent_at[seq];
        let queues = flow_queues.get(&flow);
        let by = kills.iter().position(|k| {
            queues.is_some_and(|qs| qs.contains(&k.queue))
                && k.at_ns >= t
                && k.at_ns - t <= RX_LOSS_HORIZON_NS
        });
        match by {
            Some(k) => a.kills[k].rx_lost += 1,
            None => unexplained.push(seq),
        }
    }
    if !unexplained.is_empty() {
        a.problems.push(format!(
            "{} RX frames lost with no kill of their queue pair to explain them, first {:?}",
            unexplained.len(),
            &unexplained[..unexplained.len().min(10)]
        ));
    }
    for (k, ev) in kills.iter().enumerate() {
        let list = &per_queue[ev.queue];
        let after = ev.effective_ns.max(ev.at_ns);
        let from = list.partition_point(|x| x.at_ns < after);
        a.kills[k].rx_recovery_ns = list[from..]
            .iter()
            .find(|x| records.rx_sent_at[x.seq as usize] > after)
            .map(|x| x.at_ns - ev.at_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(seq: u32, at_ns: u64) -> Arrival {
        Arrival { seq, at_ns }
    }

    #[test]
    fn stalls_count_only_time_with_work_waiting() {
        // Frames published at 0, 10, 20, 100 (a generator pause) and 101.
        let pushed = [0, 10, 20, 100, 101];
        // Served quickly, except frame 4, which waited until 150.
        let arrivals = [arr(0, 1), arr(1, 11), arr(2, 21), arr(3, 102), arr(4, 150)];
        let s = service_stalls(&arrivals, &pushed);
        let lens: Vec<u64> = s.iter().map(|s| s.end - s.start).collect();
        // 1->11 starts at publication 10; the pause 21->100 is no stall.
        assert_eq!(lens, vec![1, 1, 2, 48]);
        assert_eq!(worst_stall(&s, 0, 200), 48);
        assert_eq!(worst_stall(&s, 0, 50), 1);
        assert_eq!(worst_stall(&s, 140, 145), 48);
    }

    #[test]
    fn duplicates_do_not_open_stalls() {
        let pushed = [0, 1, 2];
        let arrivals = [arr(0, 5), arr(1, 6), arr(1, 50), arr(2, 51)];
        let s = service_stalls(&arrivals, &pushed);
        assert_eq!(worst_stall(&s, 0, 100), 1);
    }

    fn kill(queue: usize, used_before: u64, avail_after: u64) -> KillEvent {
        KillEvent {
            queue,
            pid: 1,
            signal: "SIGKILL",
            at_ns: 0,
            effective_ns: 0,
            used_before,
            avail_after,
            first_new_seq: avail_after,
            replaced_ns: None,
            runq_wait_ns: None,
            others_runq_wait_ns: Vec::new(),
        }
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
