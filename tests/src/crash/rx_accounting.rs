//! RX across kills: every frame arrives intact and at most once; a frame may
//! be lost only if the dead worker can have held it, that is it was sent
//! before the signal took effect and no frame sent after it on the same
//! queue pair had arrived before the kill (a TAP queue is FIFO and a worker
//! completes RX frames in the order it reads them, so a later frame seen
//! in the guest means this one had been published too). Each loss is
//! charged to the first such kill.
//!
//! There is no time limit on how long before the kill such a frame may
//! have been sent: while a queue pair waits out a crash-loop back-off
//! (seconds), nobody reads its TAP queue, and the next worker reads frames
//! sent long before it started. The FIFO rule alone bounds the frames a
//! kill can explain: only those after the last one reaped before it.

use std::collections::{BTreeSet, HashMap};

use super::analysis::{Analysis, KillEvent};
use super::records::{Records, RxArrival};

/// How a loss no kill explains is reported (the multi-buffer test picks
/// such lines out).
pub const RX_UNEXPLAINED: &str = "RX frames lost that no dead worker can have held";

/// What the RX arrivals of a run say, indexed for the checks.
struct RxIndex<'a> {
    records: &'a Records,
    /// `[seq]`: how often it arrived.
    count: Vec<u32>,
    /// `[seq]`: when it first arrived.
    arrived_at: Vec<Option<u64>>,
    /// Flow -> the queue pairs its frames arrived on.
    flow_queues: HashMap<u16, BTreeSet<usize>>,
    /// `[queue]`: arrivals, in reap order.
    per_queue: Vec<Vec<RxArrival>>,
}

impl<'a> RxIndex<'a> {
    fn of(records: &'a Records, a: &mut Analysis) -> RxIndex<'a> {
        let sent = records.rx_sent_at.len();
        let mut ix = RxIndex {
            records,
            count: vec![0; sent],
            arrived_at: vec![None; sent],
            flow_queues: HashMap::new(),
            per_queue: vec![Vec::new(); records.queues],
        };
        for x in &records.rx_arrivals {
            let Some(c) = ix.count.get_mut(x.seq as usize) else {
                a.problems
                    .push(format!("RX frame {} arrived but was never sent", x.seq));
                continue;
            };
            *c += 1;
            ix.arrived_at[x.seq as usize].get_or_insert(x.at_ns);
            ix.flow_queues
                .entry(x.flow)
                .or_default()
                .insert(usize::from(x.queue));
            ix.per_queue[usize::from(x.queue)].push(*x);
        }
        for list in &mut ix.per_queue {
            list.sort_by_key(|x| x.at_ns);
        }
        ix
    }

    fn lands_on(&self, seq: usize, queue: usize) -> bool {
        let flow = (seq as u32 % u32::from(self.records.rx_flows.max(1))) as u16;
        self.flow_queues
            .get(&flow)
            .is_some_and(|qs| qs.contains(&queue))
    }

    /// The highest sequence number reaped from `queue` before `t`.
    fn last_reaped_before(&self, queue: usize, t: u64) -> Option<u32> {
        let list = &self.per_queue[queue];
        list[..list.partition_point(|x| x.at_ns < t)]
            .iter()
            .map(|x| x.seq)
            .max()
    }

    /// Frames of `ev`'s queue pair sent after the last one reaped from it
    /// before the kill and before the signal took effect, and not reaped
    /// before the kill.
    fn in_flight(&self, ev: &KillEvent) -> u64 {
        let sent = &self.records.rx_sent_at;
        let from = self
            .last_reaped_before(ev.queue, ev.at_ns)
            .map_or(0, |last| last as usize + 1);
        let to = sent.partition_point(|&t| t < ev.effective_ns.max(ev.at_ns));
        (from..to)
            .filter(|&seq| self.lands_on(seq, ev.queue))
            .filter(|&seq| self.arrived_at[seq].is_none_or(|t| t >= ev.at_ns))
            .count() as u64
    }

    /// The kill that can have cost frame `seq`, if any.
    fn loss_cause(&self, seq: usize, kills: &[KillEvent]) -> Option<usize> {
        let t = self.records.rx_sent_at[seq];
        kills.iter().position(|k| {
            self.lands_on(seq, k.queue)
                && k.effective_ns.max(k.at_ns) >= t
                && self
                    .last_reaped_before(k.queue, k.at_ns)
                    .is_none_or(|last| (last as usize) < seq)
        })
    }
}

impl RxIndex<'_> {
    /// Why no kill explains the loss of `seq`: each kill of a queue pair
    /// its flow lands on after it was sent, and the last frame reaped from
    /// that queue pair before the kill.
    fn why_unexplained(&self, seq: usize, kills: &[KillEvent]) -> String {
        let t = self.records.rx_sent_at[seq];
        let near: Vec<String> = kills
            .iter()
            .filter(|k| self.lands_on(seq, k.queue) && k.effective_ns.max(k.at_ns) >= t)
            .take(3)
            .map(|k| {
                format!(
                    "kill of queue pair {} {:.1} ms later, last frame reaped before it {:?}",
                    k.queue,
                    (k.at_ns as f64 - t as f64) / 1e6,
                    self.last_reaped_before(k.queue, k.at_ns)
                )
            })
            .collect();
        let flow = (seq as u32 % u32::from(self.records.rx_flows.max(1))) as u16;
        format!(
            "frame {seq} (flow {flow}, seen on queue pairs {:?}): {}",
            self.flow_queues.get(&flow),
            if near.is_empty() {
                "no kill of its queue pair after it was sent".to_string()
            } else {
                near.join("; ")
            }
        )
    }
}

/// Check the RX side of `records` against `kills` into `a`.
pub fn check(records: &Records, kills: &[KillEvent], a: &mut Analysis) {
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
    let ix = RxIndex::of(records, a);
    let sent = records.rx_sent_at.len();
    a.rx_sent = sent as u64;
    let dups: Vec<usize> = (0..sent).filter(|&s| ix.count[s] > 1).collect();
    if !dups.is_empty() {
        a.problems.push(format!(
            "{} RX frames arrived more than once, first {:?}",
            dups.len(),
            &dups[..dups.len().min(10)]
        ));
    }
    a.rx_frames = ix.count.iter().filter(|&&c| c > 0).count() as u64;
    if sent > 0 {
        a.rx_silent_queues = (0..records.queues)
            .filter(|&q| ix.per_queue[q].is_empty())
            .collect();
    }
    let mut unexplained = Vec::new();
    for seq in (0..sent).filter(|&s| ix.count[s] == 0) {
        a.rx_lost += 1;
        match ix.loss_cause(seq, kills) {
            Some(k) => a.kills[k].rx_lost += 1,
            None => unexplained.push(seq),
        }
    }
    if !unexplained.is_empty() {
        a.problems.push(format!(
            "{} {RX_UNEXPLAINED}, first {:?}; {}",
            unexplained.len(),
            &unexplained[..unexplained.len().min(10)],
            ix.why_unexplained(unexplained[0], kills)
        ));
    }
    for (k, ev) in kills.iter().enumerate() {
        a.kills[k].rx_in_flight = ix.in_flight(ev);
        let list = &ix.per_queue[ev.queue];
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

    /// Two queue pairs, two flows (flow = seq % 2 lands on queue pair
    /// flow), one frame every 10 ns; `arrived`: (seq, reaped at).
    fn records(sent: usize, arrived: &[(u32, u64)]) -> Records {
        Records {
            queues: 2,
            rx_flows: 2,
            rx_sent_at: (0..sent as u64).map(|s| s * 10).collect(),
            rx_arrivals: arrived
                .iter()
                .map(|&(seq, at_ns)| RxArrival {
                    seq,
                    flow: (seq % 2) as u16,
                    queue: (seq % 2) as u16,
                    at_ns,
                })
                .collect(),
            ..Records::default()
        }
    }

    fn run(r: &Records, kills: &[KillEvent]) -> Analysis {
        let mut a = Analysis {
            kills: vec![Default::default(); kills.len()],
            ..Analysis::default()
        };
        check(r, kills, &mut a);
        a
    }

    #[test]
    fn a_frame_the_dead_worker_can_have_held_is_charged_to_its_kill() {
        // Frame 3 (queue pair 1, sent at 30) never arrives; queue pair 1's
        // worker dies at 35, having delivered only frame 1 before.
        let r = records(
            8,
            &[(0, 1), (1, 12), (2, 21), (4, 41), (5, 52), (6, 61), (7, 72)],
        );
        let a = run(&r, &[KillEvent::at(1, 35)]);
        assert!(a.problems.is_empty(), "{:?}", a.problems);
        assert_eq!((a.rx_lost, a.kills[0].rx_lost), (1, 1));
        // Frame 3 was sent before the kill and not reaped before it.
        assert_eq!(a.kills[0].rx_in_flight, 1);
        assert_eq!(a.kills[0].rx_recovery_ns, Some(52 - 35));
    }

    #[test]
    fn a_frame_overtaken_before_the_kill_is_a_real_loss() {
        // Frame 5 of the same queue pair arrived before the kill at 55, so
        // frame 3 had been published: its loss is not the kill's.
        let r = records(
            8,
            &[(0, 1), (1, 12), (2, 21), (4, 41), (5, 52), (6, 61), (7, 72)],
        );
        let a = run(&r, &[KillEvent::at(1, 55)]);
        assert_eq!(a.kills[0].rx_lost, 0);
        assert!(
            a.problems.iter().any(|p| p.contains(RX_UNEXPLAINED)),
            "{:?}",
            a.problems
        );
        // A kill of the other queue pair does not explain it either.
        let a = run(&r, &[KillEvent::at(0, 35)]);
        assert!(a.problems.iter().any(|p| p.contains(RX_UNEXPLAINED)));
        // Nor does one before the frame was sent.
        let a = run(&r, &[KillEvent::at(1, 25)]);
        assert!(a.problems.iter().any(|p| p.contains(RX_UNEXPLAINED)));
    }

    #[test]
    fn a_frame_left_in_the_tap_queue_through_a_back_off_is_the_next_kills() {
        // Queue pair 1 has no worker from 15 to 5 s later (a back-off):
        // frame 3 (sent at 30) waits in the TAP queue, and the worker
        // started after the back-off dies at 5 s, seconds after the frame
        // was sent, holding it.
        let r = records(8, &[(0, 1), (1, 12), (2, 21), (4, 41), (6, 61)]);
        let late = 5_000_000_000;
        let mut k = KillEvent::at(1, late);
        k.effective_ns = late;
        let a = run(&r, &[KillEvent::at(1, 15), k]);
        // Frames 3, 5 and 7 were all sent after the last frame queue pair 1
        // delivered (1) and before the second kill: it can have cost them.
        assert!(a.problems.is_empty(), "{:?}", a.problems);
        assert_eq!((a.kills[0].rx_lost, a.kills[1].rx_lost), (0, 3));
        // Frame 3, sent 5 s before the second kill, is still counted as in
        // flight at it: nothing of queue pair 1 was reaped since.
        assert_eq!(a.kills[1].rx_in_flight, 3);
    }

    #[test]
    fn duplicates_and_silent_queues_are_reported() {
        let r = records(4, &[(0, 1), (0, 2), (2, 21)]);
        let a = run(&r, &[]);
        assert!(a.problems.iter().any(|p| p.contains("more than once")));
        assert_eq!(a.rx_silent_queues, vec![1]);
    }
}
