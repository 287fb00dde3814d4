//! Sweeps: a pass over some stripes that removes the entries matching a
//! rule (idle past their timeout, owned by a queue pair that is gone) and
//! frees invalid ones on the way. A stripe with nothing to remove, judged
//! without its lock, is not locked, so a pass costs O(stripes + live) reads
//! and locks only where there is work.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::slot::{FlowSnapshot, SlotBusy};
use super::state::FlowTimeouts;
use super::table::FlowTable;
use crate::layout::MAX_QUEUE_PAIRS;
use crate::robust_mutex::LockWait;

/// What a sweep (expiry, owner removal, scrub) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Stripes looked at.
    pub stripes_visited: usize,
    /// Entries removed because they matched (expired, owner gone).
    pub removed: usize,
    /// Invalid entries freed.
    pub scrubbed: usize,
    /// Stripes skipped because their lock could not be had.
    pub stripes_skipped: usize,
}

impl SweepReport {
    /// Add an expiry pass's removals to the queue pair's `flows_expired`.
    pub fn add_expired_to(&self, stats: &crate::QueueStats) {
        if self.removed != 0 {
            crate::QueueStats::add(&stats.flows_expired, self.removed as u64);
        }
    }
}

impl FlowTable<'_> {
    /// Expire idle flows owned by `queue_pair`, visiting at most
    /// `max_stripes` stripes from `*cursor` (which is advanced), so a worker
    /// can spread a full pass over many loop turns.
    pub fn expire_idle(
        &self,
        queue_pair: usize,
        now_ns: u64,
        timeouts: &FlowTimeouts,
        cursor: &mut usize,
        max_stripes: usize,
    ) -> SweepReport {
        if queue_pair >= MAX_QUEUE_PAIRS {
            return SweepReport::default();
        }
        let owner = queue_pair as u8;
        let idle = |snap: &FlowSnapshot| {
            let limit = timeouts.for_flow(snap.key.protocol, snap.state);
            snap.owner == owner
                && now_ns.saturating_sub(snap.last_seen_ns) > limit.as_nanos() as u64
        };
        let count = max_stripes.min(self.reader.geo.stripes);
        let start = *cursor % self.reader.geo.stripes;
        *cursor = (start + count) % self.reader.geo.stripes;
        let stripes = (0..count).map(|k| (start + k) % self.reader.geo.stripes);
        self.sweep(stripes, idle)
    }

    /// Remove every flow owned by `queue_pair` (its worker is gone for
    /// good, or the queue pair no longer exists). Primary only.
    pub fn remove_owned_by(&self, queue_pair: usize) -> SweepReport {
        if queue_pair >= MAX_QUEUE_PAIRS {
            return SweepReport::default();
        }
        let owner = queue_pair as u8;
        let report = self.sweep(0..self.reader.geo.stripes, |snap| snap.owner == owner);
        self.reader
            .counters_block()
            .owner_gone_removed
            .fetch_add(report.removed as u64, Ordering::Relaxed);
        report
    }

    /// Visit `stripes`; in each, free invalid entries and remove valid ones
    /// for which `remove_if` holds. A stripe with nothing to do (judged
    /// without the lock) is not locked. After one lock wait runs out, the
    /// rest of the sweep only tries locks (skipped stripes wait for the
    /// next pass), so a sweep stalls at most one wait.
    fn sweep(
        &self,
        stripes: impl Iterator<Item = usize>,
        mut remove_if: impl FnMut(&FlowSnapshot) -> bool,
    ) -> SweepReport {
        let mut report = SweepReport::default();
        let mut wait = self.wait;
        for s in stripes {
            report.stripes_visited += 1;
            if !self.stripe_needs_visit(s, &mut remove_if) {
                continue;
            }
            let Ok(_guard) = self.lock_with(s, wait) else {
                report.stripes_skipped += 1;
                wait = LockWait::Bounded(Duration::ZERO);
                continue;
            };
            // Under a lock taken normally no intent can be legitimately
            // active: a nonzero record is corruption; settle it.
            if self.reader.stripe(s).intent.active.load(Ordering::Relaxed) != 0 {
                self.undo_intent(s);
            }
            for i in self.reader.stripe(s).used_slots() {
                match self.validate_locked(s, i) {
                    None => {
                        self.scrub_slot(s, i);
                        report.scrubbed += 1;
                    }
                    Some(snap) if remove_if(&snap) => {
                        self.delete_slot(s, i);
                        report.removed += 1;
                    }
                    Some(_) => {}
                }
            }
        }
        report
    }

    fn stripe_needs_visit(
        &self,
        s: usize,
        remove_if: &mut impl FnMut(&FlowSnapshot) -> bool,
    ) -> bool {
        self.reader
            .stripe(s)
            .used_slots()
            .any(|i| match self.reader.snapshot(s, i) {
                Ok(Some(snap)) => remove_if(&snap),
                Ok(None) | Err(SlotBusy) => true,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::testing::{key, tmp_region, tx};
    use crate::flow::{protocol, FlowUpdate};

    #[test]
    fn expiry_respects_timeouts_and_owner() {
        let (p, region) = tmp_region("expiry", 128);
        let t = region.flow_table().unwrap();
        let sec = 1_000_000_000u64;
        t.record(&key(1), &tx(1), 0, 10 * sec).unwrap(); // UDP new: 30 s
        t.record(&key(2), &tx(1), 1, 10 * sec).unwrap(); // other owner
        let mut tcp = key(3);
        tcp.protocol = protocol::TCP;
        let syn = FlowUpdate {
            tcp_flags_tx: crate::flow::tcp_flags::SYN,
            ..tx(1)
        };
        t.record(&tcp, &syn, 0, 10 * sec).unwrap(); // TCP new: 60 s
        let mut cursor = 0;
        let all = usize::MAX;
        let d = FlowTimeouts::default();
        assert_eq!(t.expire_idle(0, 45 * sec, &d, &mut cursor, all).removed, 1);
        assert!(t.reader().lookup(&key(1)).unwrap().is_none());
        assert!(t.reader().lookup(&key(2)).unwrap().is_some());
        assert_eq!(t.expire_idle(0, 75 * sec, &d, &mut cursor, all).removed, 1);
        // The primary removes the flows of a queue pair that is gone.
        assert_eq!(t.remove_owned_by(1).removed, 1);
        assert_eq!(t.reader().counters().owner_gone_removed, 1);
        assert!(t.reader().is_empty());
        std::fs::remove_file(p).unwrap();
    }
}
