//! The flow table's changing side: [`FlowTable::record`] updates a flow or
//! inserts it, [`FlowTable::remove`] deletes it. Each locks the one stripe
//! a lock-free search or the caller's hint points at, and falls back to
//! both of the key's stripes, lower index first (see "Theory of operation"
//! in mod.rs). Expiry is sweep.rs, crash repair repair.rs.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::key::{Direction, FlowKey, KEY_WORDS};
use super::reader::FlowReader;
use super::slot::{slot_ref, FlowSnapshot, SlotRef, W_CHECK};
use super::stripe::{mask_slots, tag_matches, SLOTS_PER_STRIPE, TAG_WORDS};
use crate::layout::MAX_QUEUE_PAIRS;
use crate::robust_mutex::{LockError, LockWait};

/// How long the packet path waits for a stripe before giving up on
/// tracking a flow for this burst: a holder that is stopped (not dead)
/// must not stall the other workers.
pub const DEFAULT_LOCK_WAIT: LockWait = LockWait::Bounded(Duration::from_millis(10));

/// Why a table operation did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// A stripe lock could not be taken.
    #[error("flow table stripe lock: {0}")]
    Lock(#[from] LockError),
    /// The queue pair number is out of range.
    #[error("queue pair {0} out of range")]
    QueuePair(usize),
}

/// What [`FlowTable::record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The flow existed; `previous_owner` owned it before this update.
    Updated {
        /// Where it is.
        at: SlotRef,
        /// Its owner before the update.
        previous_owner: u8,
    },
    /// A new entry was made, owned by the recording queue pair.
    Created {
        /// Where it is.
        at: SlotRef,
    },
    /// Both of the flow's stripes are full: not tracked (forward anyway).
    Full,
}

/// What a batch of frames adds to one flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowUpdate {
    /// Frames from the guest.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames to the guest.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// TCP flags seen on frames from the guest.
    pub tcp_flags_tx: u8,
    /// TCP flags seen on frames to the guest.
    pub tcp_flags_rx: u8,
}

impl FlowUpdate {
    /// One frame of `bytes` bytes going `direction` with `flags`.
    pub fn frame(direction: Direction, bytes: u64, flags: u8) -> FlowUpdate {
        let mut u = FlowUpdate::default();
        u.add_frame(direction, bytes, flags);
        u
    }

    /// Add one frame.
    pub fn add_frame(&mut self, direction: Direction, bytes: u64, flags: u8) {
        match direction {
            Direction::Tx => {
                self.tx_frames += 1;
                self.tx_bytes = self.tx_bytes.saturating_add(bytes);
                self.tcp_flags_tx |= flags;
            }
            Direction::Rx => {
                self.rx_frames += 1;
                self.rx_bytes = self.rx_bytes.saturating_add(bytes);
                self.tcp_flags_rx |= flags;
            }
        }
    }

    /// Frames in both directions.
    pub fn frames(&self) -> u64 {
        self.tx_frames.saturating_add(self.rx_frames)
    }
}

/// The flow table for processes that change it (workers, the primary).
/// Cheap to make and copy; every operation takes `&self`.
#[derive(Clone, Copy)]
pub struct FlowTable<'a> {
    pub(super) reader: FlowReader<'a>,
    pub(super) wait: LockWait,
}

/// The candidate slots of one flow: key words, hash, tag, stripes.
pub(super) struct Probe {
    pub(super) words: [u64; KEY_WORDS],
    pub(super) hash: u64,
    pub(super) tag: u8,
    a: usize,
    b: usize,
}

impl<'a> FlowTable<'a> {
    pub(crate) fn new(reader: FlowReader<'a>) -> FlowTable<'a> {
        FlowTable {
            reader,
            wait: DEFAULT_LOCK_WAIT,
        }
    }

    /// The same table with another lock wait policy (the primary and tests
    /// may wait forever; the packet path keeps the bounded default).
    pub fn with_lock_wait(self, wait: LockWait) -> FlowTable<'a> {
        FlowTable { wait, ..self }
    }

    /// The lock-free read side.
    pub fn reader(&self) -> FlowReader<'a> {
        self.reader
    }

    fn probe(&self, key: &FlowKey, hash: u64) -> Probe {
        let (a, b) = self.reader.stripes_of(hash);
        Probe {
            words: key.to_words(),
            hash,
            tag: FlowReader::tag_of(hash),
            a,
            b,
        }
    }

    /// Under the lock: does slot `i` of stripe `s` hold exactly this key?
    fn holds(&self, s: usize, i: usize, p: &Probe) -> bool {
        let slot = self.reader.slot(s, i);
        self.reader.stripe(s).tag(i) == p.tag
            && slot.meta().in_use
            && slot.key_words() == p.words
            && slot.get(W_CHECK) == p.hash
    }

    fn find_locked(&self, s: usize, p: &Probe) -> Option<usize> {
        let tags = self.reader.stripe(s).tag_words();
        (0..TAG_WORDS)
            .flat_map(|w| mask_slots(w, tag_matches(tags[w], p.tag)))
            .find(|&i| self.holds(s, i, p))
    }

    /// Add `update` to `key`'s flow, creating it if it is new. `queue_pair`
    /// is the recording worker's: it becomes the owner when the update has
    /// TX frames, or when the flow is created.
    pub fn record(
        &self,
        key: &FlowKey,
        update: &FlowUpdate,
        queue_pair: usize,
        now_ns: u64,
    ) -> Result<Recorded, FlowError> {
        self.record_hinted(key, None, update, queue_pair, now_ns)
    }

    /// [`FlowTable::record`] with, optionally, where the flow was last time
    /// (from [`Recorded`]). A wrong or stale hint costs one extra lock, never
    /// a wrong update.
    pub fn record_hinted(
        &self,
        key: &FlowKey,
        hint: Option<SlotRef>,
        update: &FlowUpdate,
        queue_pair: usize,
        now_ns: u64,
    ) -> Result<Recorded, FlowError> {
        if queue_pair >= MAX_QUEUE_PAIRS {
            return Err(FlowError::QueuePair(queue_pair));
        }
        let owner = queue_pair as u8;
        let p = self.probe(key, self.reader.hash(key));
        let known = hint
            .map(|h| (h.stripe as usize, h.slot as usize % SLOTS_PER_STRIPE))
            .filter(|&(s, _)| s == p.a || s == p.b)
            .or_else(|| self.find_unlocked_either(&p));
        if let Some((s, i)) = known {
            let _guard = self.lock(s)?;
            if self.holds(s, i, &p) {
                let previous_owner = self.update_slot(s, i, update, owner, now_ns);
                return Ok(Recorded::Updated {
                    at: slot_ref(s, i),
                    previous_owner,
                });
            }
        }
        let _guards = self.lock_pair(p.a, p.b)?;
        for s in [p.a, p.b] {
            if let Some(i) = self.find_locked(s, &p) {
                let previous_owner = self.update_slot(s, i, update, owner, now_ns);
                return Ok(Recorded::Updated {
                    at: slot_ref(s, i),
                    previous_owner,
                });
            }
        }
        let (ua, ub) = (
            self.reader.stripe(p.a).used(),
            self.reader.stripe(p.b).used(),
        );
        let target = if ub < ua { p.b } else { p.a };
        match self.reader.stripe(target).first_free() {
            Some(i) => {
                self.insert_slot(target, i, &p, update, owner, now_ns);
                Ok(Recorded::Created {
                    at: slot_ref(target, i),
                })
            }
            None => {
                self.reader
                    .counters_block()
                    .refused
                    .fetch_add(1, Ordering::Relaxed);
                Ok(Recorded::Full)
            }
        }
    }

    fn find_unlocked_either(&self, p: &Probe) -> Option<(usize, usize)> {
        [p.a, p.b]
            .into_iter()
            .find_map(|s| Some((s, self.reader.find_unlocked(s, &p.words, p.tag)?)))
    }

    /// Remove `key`'s flow; returns what it held, `None` if absent.
    pub fn remove(&self, key: &FlowKey) -> Result<Option<FlowSnapshot>, FlowError> {
        let p = self.probe(key, self.reader.hash(key));
        if let Some((s, i)) = self.find_unlocked_either(&p) {
            let _guard = self.lock(s)?;
            if self.holds(s, i, &p) {
                return Ok(self.take_slot(s, i));
            }
        }
        let _guards = self.lock_pair(p.a, p.b)?;
        for s in [p.a, p.b] {
            if let Some(i) = self.find_locked(s, &p) {
                return Ok(self.take_slot(s, i));
            }
        }
        Ok(None)
    }

    /// Under the lock: copy then delete a slot that holds the key. An entry
    /// that does not validate (corrupted owner or state) is scrubbed instead
    /// and reported absent.
    fn take_slot(&self, s: usize, i: usize) -> Option<FlowSnapshot> {
        match self.validate_locked(s, i) {
            Some(snap) => {
                self.delete_slot(s, i);
                Some(snap)
            }
            None => {
                self.scrub_slot(s, i);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::testing::{key, rx, tmp_region, tx};
    use crate::flow::FlowState;
    use crate::FlowTimeouts;

    #[test]
    fn insert_update_lookup_remove() {
        let (p, region) = tmp_region("basic", 1024);
        let t = region.flow_table().unwrap();
        let k = key(1);
        assert!(matches!(
            t.record(&k, &rx(2), 3, 1000),
            Ok(Recorded::Created { .. })
        ));
        let s = t.reader().lookup(&k).unwrap().unwrap();
        assert_eq!(
            (s.owner, s.rx_frames, s.rx_bytes, s.tx_frames),
            (3, 2, 200, 0)
        );
        assert_eq!(s.state, FlowState::New);
        // RX on another queue pair keeps the owner; TX moves it.
        match t.record(&k, &rx(1), 1, 2000).unwrap() {
            Recorded::Updated { previous_owner, .. } => assert_eq!(previous_owner, 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.reader().lookup(&k).unwrap().unwrap().owner, 3);
        t.record(&k, &tx(1), 1, 3000).unwrap();
        let s = t.reader().lookup(&k).unwrap().unwrap();
        assert_eq!((s.owner, s.tx_frames, s.rx_frames), (1, 1, 3));
        assert_eq!((s.first_seen_ns, s.last_seen_ns), (1000, 3000));
        assert_eq!(s.state, FlowState::Established);
        assert_eq!(t.reader().len(), 1);
        assert_eq!(t.remove(&k).unwrap().unwrap().tx_frames, 1);
        assert_eq!(t.remove(&k).unwrap(), None);
        assert_eq!(t.reader().lookup(&k).unwrap(), None);
        let a = t.audit().unwrap();
        assert!(a.is_clean(), "{a:?}");
        assert_eq!((a.created, a.removed, a.live), (1, 1, 0));
        assert_eq!(t.record(&k, &tx(1), 16, 0), Err(FlowError::QueuePair(16)));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn table_fills_refuses_then_expiry_frees() {
        let (p, region) = tmp_region("full", 256);
        let t = region.flow_table().unwrap();
        let mut first_refusal = None;
        let mut refused = 0u64;
        for n in 0..1024u32 {
            match t
                .record(&key(n), &tx(1), (n % 4) as usize, 1_000_000_000)
                .unwrap()
            {
                Recorded::Full => {
                    first_refusal.get_or_insert(t.reader().len());
                    refused += 1;
                }
                Recorded::Created { .. } => {}
                other => panic!("{other:?}"),
            }
        }
        let first = first_refusal.expect("a 256-entry table refuses some of 1024 flows");
        // Two choices per key: the first refusal comes late, and in the
        // end every slot is used.
        assert!(first >= 256 * 85 / 100, "first refusal at {first}");
        assert_eq!(t.reader().len(), 256);
        let c = t.reader().counters();
        assert_eq!((c.refused, c.live, c.created), (refused, 256, 256));
        // Idle for longer than the UDP timeout: each queue pair expires its
        // own flows, a few stripes per call.
        let later = 1_000_000_000 + 31_000_000_000;
        let timeouts = FlowTimeouts::default();
        let mut expired = 0;
        for qp in 0..4 {
            let mut cursor = 0;
            for _ in 0..t.reader().stripe_count() {
                expired += t.expire_idle(qp, later, &timeouts, &mut cursor, 1).removed;
            }
        }
        assert_eq!(expired, 256);
        assert!(t.reader().is_empty());
        assert!(matches!(
            t.record(&key(5000), &tx(1), 0, later),
            Ok(Recorded::Created { .. })
        ));
        assert!(t.audit().unwrap().is_clean());
        std::fs::remove_file(p).unwrap();
    }
}
