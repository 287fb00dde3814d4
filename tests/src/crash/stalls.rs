//! Service stalls: times a queue pair had a frame waiting and delivered
//! nothing. For each arrival, the stall runs from the later of the previous
//! arrival and this frame's publication (TX: made available by the driver;
//! RX: sent into the TAP) to this arrival, so pauses of the test's own
//! generators are never stalls.

use std::collections::BTreeSet;

use super::records::{Arrival, Records};
use super::KillEvent;

/// A time some queue pair had a frame waiting and delivered nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// The arrival before this one.
    pub prev: u64,
    /// When a frame was waiting and the previous one had arrived.
    pub start: u64,
    /// When the waiting frame arrived.
    pub end: u64,
}

impl Stall {
    /// Its length in nanoseconds.
    pub fn ns(&self) -> u64 {
        self.end - self.start
    }
}

/// The service stalls of one queue, in arrival order. `published_at[seq]`:
/// when frame `seq` was published.
pub fn service_stalls(arrivals: &[Arrival], published_at: &[u64]) -> Vec<Stall> {
    let mut seen = BTreeSet::new();
    let mut stalls = Vec::with_capacity(arrivals.len());
    let mut prev: Option<u64> = None;
    for a in arrivals {
        let first = seen.insert(a.seq);
        if let (true, Some(p), Some(&pushed)) = (first, prev, published_at.get(a.seq as usize)) {
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
pub fn worst_stall(stalls: &[Stall], t0: u64, t1: u64) -> Option<Stall> {
    let from = stalls.partition_point(|s| s.end < t0);
    stalls[from..]
        .iter()
        .take_while(|s| s.prev <= t1)
        .filter(|s| s.start <= t1)
        .max_by_key(|s| s.ns())
        .copied()
}

/// Which way the stalled frames went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Guest to TAP.
    Tx,
    /// TAP to guest.
    Rx,
}

/// Long stalls away from kills ([`QueueStalls::away_from_kills`]).
#[derive(Debug, Default, Clone)]
pub struct Away {
    /// (queue pair, direction, stall) of each.
    pub long: Vec<(usize, Direction, Stall)>,
    /// Queue-pair-direction time inside kill windows.
    pub near_stream_ns: u64,
    /// Queue-pair-direction time outside them.
    pub away_stream_ns: u64,
}

/// Every queue pair's stalls of one run, TX and RX.
#[derive(Debug, Default)]
pub struct QueueStalls {
    /// `[queue]`: TX stalls (frames from the ring to the TAP).
    pub tx: Vec<Vec<Stall>>,
    /// `[queue]`: RX stalls (frames from the TAP into the guest).
    pub rx: Vec<Vec<Stall>>,
}

impl QueueStalls {
    /// The stalls of `records`.
    pub fn of(records: &Records) -> QueueStalls {
        let tx = (0..records.queues)
            .map(|q| {
                let mut arrivals = records.tx_arrivals[q].clone();
                arrivals.sort_by_key(|x| x.at_ns);
                service_stalls(&arrivals, &records.pushed_at[q])
            })
            .collect();
        let rx = (0..records.queues)
            .map(|q| {
                let mut arrivals: Vec<Arrival> = records
                    .rx_arrivals
                    .iter()
                    .filter(|x| usize::from(x.queue) == q)
                    .map(|x| Arrival {
                        seq: x.seq,
                        at_ns: x.at_ns,
                    })
                    .collect();
                arrivals.sort_by_key(|x| x.at_ns);
                service_stalls(&arrivals, &records.rx_sent_at)
            })
            .collect();
        QueueStalls { tx, rx }
    }

    /// The stalls longer than `limit_ns` that ended away from every
    /// kill's window (`[kill, kill + window_ns]`), with their queue pair and
    /// direction, and the queue-pair-direction time (ns) inside and outside
    /// those windows: the machine's own rate of long stalls, to compare the
    /// kills with.
    pub fn away_from_kills(&self, kills: &[KillEvent], window_ns: u64, limit_ns: u64) -> Away {
        let in_window = |t: u64| {
            kills
                .iter()
                .any(|k| t >= k.at_ns && t <= k.at_ns + window_ns)
        };
        let mut away = Away::default();
        let mut span: Option<(u64, u64)> = None;
        for (dir, lists) in [(Direction::Tx, &self.tx), (Direction::Rx, &self.rx)] {
            for (q, list) in lists.iter().enumerate() {
                for st in list {
                    let (lo, hi) = span.get_or_insert((st.start, st.end));
                    *lo = (*lo).min(st.start);
                    *hi = (*hi).max(st.end);
                    if st.ns() > limit_ns && !in_window(st.end) {
                        away.long.push((q, dir, *st));
                    }
                }
            }
        }
        let streams = (self.tx.len() + self.rx.len()) as u64;
        let run = span.map_or(0, |(lo, hi)| hi - lo);
        let near = (kills.len() as u64 * window_ns).min(run);
        away.near_stream_ns = near * streams;
        away.away_stream_ns = (run - near) * streams;
        away
    }

    /// The worst stall of any queue pair in stretches with no kill in or
    /// just before them: the machine's own noise, for the report.
    pub fn quiet(&self, kills: &[KillEvent], window_ns: u64) -> u64 {
        let near_kill = |s: &Stall| {
            kills
                .iter()
                .any(|k| s.end >= k.at_ns && s.start <= k.at_ns + window_ns)
        };
        self.tx
            .iter()
            .chain(&self.rx)
            .flatten()
            .filter(|s| !near_kill(s))
            .map(Stall::ns)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(seq: u32, at_ns: u64) -> Arrival {
        Arrival { seq, at_ns }
    }

    fn worst_len(s: &[Stall], t0: u64, t1: u64) -> u64 {
        worst_stall(s, t0, t1).map_or(0, |s| s.ns())
    }

    #[test]
    fn stalls_count_only_time_with_work_waiting() {
        // Frames published at 0, 10, 20, 100 (a generator pause) and 101.
        let pushed = [0, 10, 20, 100, 101];
        // Served quickly, except frame 4, which waited until 150.
        let arrivals = [arr(0, 1), arr(1, 11), arr(2, 21), arr(3, 102), arr(4, 150)];
        let s = service_stalls(&arrivals, &pushed);
        let lens: Vec<u64> = s.iter().map(Stall::ns).collect();
        // 1->11 starts at publication 10; the pause 21->100 is no stall.
        assert_eq!(lens, vec![1, 1, 2, 48]);
        assert_eq!(worst_len(&s, 0, 200), 48);
        assert_eq!(worst_len(&s, 0, 50), 1);
        assert_eq!(worst_len(&s, 140, 145), 48);
        assert_eq!(
            worst_stall(&s, 140, 145),
            Some(Stall {
                prev: 102,
                start: 102,
                end: 150
            })
        );
    }

    #[test]
    fn duplicates_do_not_open_stalls() {
        let pushed = [0, 1, 2];
        let arrivals = [arr(0, 5), arr(1, 6), arr(1, 50), arr(2, 51)];
        let s = service_stalls(&arrivals, &pushed);
        assert_eq!(worst_len(&s, 0, 100), 1);
    }
}
