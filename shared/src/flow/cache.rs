//! A worker's private front of the flow table: frames are counted here,
//! lock-free and allocation-free, and reach the shared table once per burst.
//!
//! Per frame, [`FlowCache::note_frame`] parses the key and adds the frame to
//! the flow's pending update (a small open-addressed index over the flows of
//! the current burst). At the end of the burst, [`FlowCache::flush`] makes
//! one [`FlowTable::record_hinted`] call per distinct flow, so a burst of 64
//! frames of one flow costs one locked update. A direct-mapped cache of
//! recent flows remembers where each flow's entry was, so the table can lock
//! that one stripe and check it instead of searching (a stale hint costs one
//! extra lock, never a wrong update).
//!
//! Flow affinity is counted per burst: the frames of a flow count as misses
//! when, at flush time, the flow was owned by another queue pair.

use std::time::Duration;

use super::key::{hash_words, random_seed, Direction, FlowKey};
use super::parse::{ParseError, FLOW_HEADROOM};
use super::slot::SlotRef;
use super::state::FlowTimeouts;
use super::sweep::SweepReport;
use super::table::{FlowError, FlowTable, FlowUpdate, Recorded};
use crate::layout::QueueStats;
use crate::robust_mutex::LockWait;

/// Distinct flows one burst may touch before further new flows of the burst
/// go untracked (call [`FlowCache::flush`] earlier when [`FlowCache::is_full`]).
pub const MAX_PENDING_FLOWS: usize = 256;
const INDEX_SIZE: usize = 2 * MAX_PENDING_FLOWS;
const HINTS: usize = 4096;

struct Pending {
    key: FlowKey,
    hash: u64,
    index_pos: usize,
    update: FlowUpdate,
}

#[derive(Clone, Copy)]
struct Hint {
    hash: u64,
    at: Option<SlotRef>,
}

/// What a flush did, to add to the queue pair's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// New flows entered in the table.
    pub flows_created: u64,
    /// Existing flows updated.
    pub flows_updated: u64,
    /// Frames counted in the table.
    pub tracked_frames: u64,
    /// Frames not counted (table full, lock unavailable, too many flows in
    /// one burst). They were forwarded all the same.
    pub untracked_frames: u64,
    /// Frames with no flow key (not IP, malformed).
    pub unparsed_frames: u64,
    /// Frames of flows owned by another queue pair.
    pub affinity_misses: u64,
    /// Flows whose update failed on a stripe lock.
    pub lock_errors: u64,
}

impl FlushReport {
    /// Add the report to the queue pair's published counters.
    pub fn add_to(&self, stats: &QueueStats) {
        for (n, counter) in [
            (self.flows_created, &stats.flows_created),
            (self.untracked_frames, &stats.flow_untracked_frames),
            (self.unparsed_frames, &stats.flow_unparsed_frames),
            (self.affinity_misses, &stats.flow_affinity_misses),
        ] {
            if n != 0 {
                QueueStats::add(counter, n);
            }
        }
    }
}

/// One worker's flow cache; see the module documentation.
pub struct FlowCache {
    queue_pair: usize,
    /// Random seed of the cache's own index hash (the fast keyed hash the
    /// table uses; SipHash per frame cost a few % of the packet path).
    seed: [u64; 2],
    pending: Vec<Pending>,
    index: Box<[u16; INDEX_SIZE]>,
    hints: Box<[Hint; HINTS]>,
    expiry_cursor: usize,
    unparsed_frames: u64,
    overflow_frames: u64,
}

impl FlowCache {
    /// A cache for the worker of `queue_pair`.
    pub fn new(queue_pair: usize) -> FlowCache {
        FlowCache {
            queue_pair,
            seed: random_seed(),
            pending: Vec::with_capacity(MAX_PENDING_FLOWS),
            index: Box::new([0; INDEX_SIZE]),
            hints: Box::new([Hint { hash: 0, at: None }; HINTS]),
            expiry_cursor: 0,
            unparsed_frames: 0,
            overflow_frames: 0,
        }
    }

    /// The queue pair this cache records for.
    pub fn queue_pair(&self) -> usize {
        self.queue_pair
    }

    /// Count one frame: `head` is its first bytes (at least
    /// min(len, [`FLOW_HEADROOM`]), no virtio-net header), `len` its full
    /// length. Never fails: a frame with no key is counted as unparsed.
    pub fn note_frame(&mut self, head: &[u8], len: u64, direction: Direction) {
        let head = &head[..head.len().min(FLOW_HEADROOM)];
        match FlowKey::parse(head, direction) {
            Ok(p) => self.note(&p.key, direction, len, p.tcp_flags),
            Err(ParseError::Truncated | ParseError::NotIp { .. } | ParseError::BadIpHeader) => {
                self.unparsed_frames += 1
            }
        }
    }

    /// Count one frame of a flow whose key the caller already has.
    pub fn note(&mut self, key: &FlowKey, direction: Direction, len: u64, tcp_flags: u8) {
        let hash = hash_words(&key.to_words(), self.seed);
        let mut pos = hash as usize & (INDEX_SIZE - 1);
        loop {
            match usize::from(self.index[pos]) {
                0 => break,
                n => {
                    let p = &mut self.pending[n - 1];
                    if p.hash == hash && p.key == *key {
                        p.update.add_frame(direction, len, tcp_flags);
                        return;
                    }
                }
            }
            pos = (pos + 1) & (INDEX_SIZE - 1);
        }
        if self.pending.len() >= MAX_PENDING_FLOWS {
            self.overflow_frames += 1;
            return;
        }
        self.pending.push(Pending {
            key: *key,
            hash,
            index_pos: pos,
            update: FlowUpdate::frame(direction, len, tcp_flags),
        });
        self.index[pos] = self.pending.len() as u16;
    }

    /// True when the burst touched [`MAX_PENDING_FLOWS`] flows: flush now
    /// or further new flows of the burst go untracked.
    pub fn is_full(&self) -> bool {
        self.pending.len() >= MAX_PENDING_FLOWS
    }

    /// Flows waiting for the next flush.
    pub fn pending_flows(&self) -> usize {
        self.pending.len()
    }

    /// Whether a flush has anything to do or report: flows to write, or
    /// frames to count (with no flow key, or left untracked).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || self.unparsed_frames > 0 || self.overflow_frames > 0
    }

    /// Write the burst's updates to the table: one locked update per flow.
    /// `now_ns` ([`crate::monotonic_ns`]) stamps every flow of the burst.
    /// After one lock wait runs out (a holder stopped, not dead), the rest
    /// of the flush only tries locks, so a flush stalls at most one wait.
    pub fn flush(&mut self, table: &FlowTable, now_ns: u64) -> FlushReport {
        let mut table = *table;
        let mut report = FlushReport {
            unparsed_frames: std::mem::take(&mut self.unparsed_frames),
            untracked_frames: std::mem::take(&mut self.overflow_frames),
            ..FlushReport::default()
        };
        let mut pending = std::mem::take(&mut self.pending);
        for p in pending.drain(..) {
            self.index[p.index_pos] = 0;
            if self.record_one(&table, &p, now_ns, &mut report).is_err() {
                table = table.with_lock_wait(LockWait::Bounded(Duration::ZERO));
            }
        }
        self.pending = pending;
        report
    }

    /// Forget the burst without recording it (no table attached yet).
    pub fn discard(&mut self) {
        for p in self.pending.drain(..) {
            self.index[p.index_pos] = 0;
        }
        self.unparsed_frames = 0;
        self.overflow_frames = 0;
    }

    /// Record one flow's update; `Err` when its stripe lock failed.
    fn record_one(
        &mut self,
        table: &FlowTable,
        p: &Pending,
        now: u64,
        r: &mut FlushReport,
    ) -> Result<(), FlowError> {
        let frames = p.update.frames();
        let hint = &mut self.hints[p.hash as usize & (HINTS - 1)];
        let known = if hint.hash == p.hash { hint.at } else { None };
        match table.record_hinted(&p.key, known, &p.update, self.queue_pair, now) {
            Ok(Recorded::Created { at }) => {
                r.flows_created += 1;
                r.tracked_frames += frames;
                *hint = Hint {
                    hash: p.hash,
                    at: Some(at),
                };
            }
            Ok(Recorded::Updated { at, previous_owner }) => {
                r.flows_updated += 1;
                r.tracked_frames += frames;
                if usize::from(previous_owner) != self.queue_pair {
                    r.affinity_misses += frames;
                }
                *hint = Hint {
                    hash: p.hash,
                    at: Some(at),
                };
            }
            Ok(Recorded::Full) => r.untracked_frames += frames,
            Err(e) => {
                r.untracked_frames += frames;
                r.lock_errors += 1;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Expire this queue pair's idle flows, visiting at most `max_stripes`
    /// stripes (a worker calls this every so often; a full pass takes
    /// `stripes / max_stripes` calls). Add `removed` to `flows_expired`.
    pub fn expire_idle(
        &mut self,
        table: &FlowTable,
        now_ns: u64,
        timeouts: &FlowTimeouts,
        max_stripes: usize,
    ) -> SweepReport {
        table.expire_idle(
            self.queue_pair,
            now_ns,
            timeouts,
            &mut self.expiry_cursor,
            max_stripes,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::parse::tests::tcp4_frame;
    use crate::flow::tcp_flags::{ACK, SYN};
    use crate::flow::testing::{key, tmp_region};
    use crate::Recorded;

    #[test]
    fn a_burst_of_one_flow_is_one_update() {
        let (path, region) = tmp_region("cache-burst", 1024);
        let table = region.flow_table().unwrap();
        let mut cache = FlowCache::new(1);
        let out = tcp4_frame([10, 77, 0, 2], 40000, [10, 77, 0, 1], 80, SYN);
        let back = tcp4_frame([10, 77, 0, 1], 80, [10, 77, 0, 2], 40000, SYN | ACK);
        for _ in 0..64 {
            cache.note_frame(&out, 1500, Direction::Tx);
        }
        cache.note_frame(&back, 60, Direction::Rx);
        cache.note_frame(&[0u8; 20], 20, Direction::Rx); // not IP
        assert_eq!(cache.pending_flows(), 1);
        let before = region.flows().counters();
        let r = cache.flush(&table, 42);
        assert_eq!(
            (
                r.flows_created,
                r.tracked_frames,
                r.unparsed_frames,
                r.affinity_misses
            ),
            (1, 65, 1, 0)
        );
        let after = region.flows().counters();
        assert_eq!(after.created - before.created, 1);
        let key = FlowKey::parse(&out, Direction::Tx).unwrap().key;
        let s = region.flows().lookup(&key).unwrap().unwrap();
        assert_eq!(
            (s.tx_frames, s.tx_bytes, s.rx_frames, s.rx_bytes),
            (64, 96000, 1, 60)
        );
        assert_eq!((s.owner, s.state), (1, crate::FlowState::Established));
        // The same flow seen by queue pair 2 (RX) is an affinity miss; the
        // owner stays 1 since only TX moves it.
        let mut other = FlowCache::new(2);
        for _ in 0..3 {
            other.note_frame(&back, 60, Direction::Rx);
        }
        let r = other.flush(&table, 43);
        assert_eq!((r.flows_updated, r.affinity_misses), (1, 3));
        let stats = region.queue(2).unwrap();
        r.add_to(stats);
        assert_eq!(QueueStats::get(&stats.flow_affinity_misses), 3);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn full_table_frames_are_untracked_and_counted() {
        let (path, region) = tmp_region("cache-full", 64);
        let table = region.flow_table().unwrap();
        let mut cache = FlowCache::new(0);
        let mut untracked = 0;
        for round in 0..4u32 {
            for n in 0..40u32 {
                cache.note(&key(round * 40 + n), Direction::Tx, 100, 0);
                cache.note(&key(round * 40 + n), Direction::Tx, 100, 0);
            }
            let r = cache.flush(&table, 1);
            untracked += r.untracked_frames;
            assert_eq!(r.tracked_frames + r.untracked_frames, 80);
        }
        assert_eq!(region.flows().len(), 64);
        assert_eq!(untracked, 2 * (160 - 64));
        assert_eq!(region.flows().counters().refused, 160 - 64);
        // Too many flows in one burst: the excess is untracked, not lost.
        for n in 0..(MAX_PENDING_FLOWS as u32 + 10) {
            cache.note(&key(10_000 + n), Direction::Rx, 100, 0);
        }
        assert!(cache.is_full());
        let r = cache.flush(&table, 2);
        assert_eq!(r.untracked_frames, MAX_PENDING_FLOWS as u64 + 10);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn stale_hints_never_update_the_wrong_flow() {
        let (path, region) = tmp_region("cache-hint", 64);
        let table = region.flow_table().unwrap();
        let mut cache = FlowCache::new(0);
        cache.note(&key(1), Direction::Tx, 100, 0);
        cache.flush(&table, 1);
        // Another process deletes the flow and a different one takes a slot.
        table.remove(&key(1)).unwrap().unwrap();
        assert!(matches!(
            table.record(&key(2), &FlowUpdate::frame(Direction::Tx, 1, 0), 3, 1),
            Ok(Recorded::Created { .. })
        ));
        cache.note(&key(1), Direction::Tx, 100, 0);
        let r = cache.flush(&table, 2);
        assert_eq!(r.flows_created, 1);
        assert_eq!(
            region.flows().lookup(&key(2)).unwrap().unwrap().tx_frames,
            1
        );
        assert_eq!(
            region.flows().lookup(&key(1)).unwrap().unwrap().tx_frames,
            1
        );
        std::fs::remove_file(path).unwrap();
    }
}
