//! The lock-free read side of the flow table: lookups, iteration and
//! counters, for the workers (a search before they lock) and for `qpnet
//! stats` on its read-only mapping. Every entry is copied under its
//! seqlock (slot.rs), so a reader never sees a torn entry and never
//! blocks a writer.

use std::sync::atomic::{AtomicU64, Ordering};

use super::geometry::FlowGeometry;
use super::key::{FlowKey, KEY_WORDS};
use super::slot::{decode, slot_ref, FlowSlot, FlowSnapshot, SlotBusy, SLOT_SIZE};
use super::stripe::{mask_slots, tag_matches, Stripe, SLOTS_PER_STRIPE, STRIPE_SIZE, TAG_WORDS};
use crate::layout::FlowCounters;
use crate::robust_mutex::LockError;
use crate::SharedRegion;

/// Table-wide figures, read without locks (approximate while writers run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowTableCounters {
    /// Entries.
    pub capacity: usize,
    /// Entries in use.
    pub live: usize,
    /// Entries ever created.
    pub created: u64,
    /// Entries ever removed (expired, deleted, owner gone).
    pub removed: u64,
    /// New flows refused (table full).
    pub refused: u64,
    /// Stripes repaired after a dead lock holder.
    pub repairs: u64,
    /// Lock waits that hit their bound.
    pub lock_timeouts: u64,
    /// Lock attempts that failed outright.
    pub lock_failures: u64,
    /// Invalid entries freed.
    pub scrubbed: u64,
    /// Flows removed because their queue pair is gone.
    pub owner_gone_removed: u64,
}

/// The lock-free read side of the flow table: lookups, iteration, counts.
/// Works on read-only mappings (`qpnet stats`).
#[derive(Clone, Copy)]
pub struct FlowReader<'a> {
    region: &'a SharedRegion,
    pub(super) geo: FlowGeometry,
}

impl<'a> FlowReader<'a> {
    pub(crate) fn new(region: &'a SharedRegion, geo: FlowGeometry) -> FlowReader<'a> {
        FlowReader { region, geo }
    }

    /// Initialise stripe `s`'s mutex.
    ///
    /// # Safety
    /// Only for a region being created: no other thread or process may be
    /// able to reach the stripe yet.
    pub(crate) unsafe fn init_stripe_lock(&self, s: usize) -> Result<(), LockError> {
        // SAFETY: forwarded from this function's contract; the stripe lives
        // in the region's MAP_SHARED mapping.
        unsafe { self.stripe(s).mutex.init() }
    }

    /// Entries the table can hold.
    pub fn capacity(&self) -> usize {
        self.geo.capacity
    }

    /// Number of lock stripes.
    pub fn stripe_count(&self) -> usize {
        self.geo.stripes
    }

    pub(super) fn stripe(&self, s: usize) -> &'a Stripe {
        let s = s & (self.geo.stripes - 1);
        // SAFETY: the region was validated (create/attach) to hold
        // `stripes` stripe headers from `offset`, which is 64-byte aligned
        // in a page-aligned mapping; `s` is masked into range. Stripe is
        // repr(C) of atomics and a pthread mutex in an UnsafeCell, so shared
        // references are sound while other processes use it.
        unsafe { &*(self.region.base().add(self.geo.offset + s * STRIPE_SIZE) as *const Stripe) }
    }

    pub(super) fn slot(&self, s: usize, i: usize) -> &'a FlowSlot {
        let s = s & (self.geo.stripes - 1);
        let index = s * SLOTS_PER_STRIPE + i % SLOTS_PER_STRIPE;
        let off = self.geo.offset + self.geo.stripes * STRIPE_SIZE + index * SLOT_SIZE;
        // SAFETY: the region holds `capacity` slots after the stripes
        // (validated); `index < capacity` by the masking above; FlowSlot is
        // repr(C, align(64)) of atomics and `off` is a multiple of 64.
        unsafe { &*(self.region.base().add(off) as *const FlowSlot) }
    }

    pub(super) fn counters_block(&self) -> &'a FlowCounters {
        &self.region.header().flow_counters
    }

    /// The keyed hash of `key` in this table.
    pub fn hash(&self, key: &FlowKey) -> u64 {
        key.hash_with(self.geo.seed)
    }

    pub(super) fn stripes_of(&self, hash: u64) -> (usize, usize) {
        let mask = self.geo.stripes - 1;
        (hash as usize & mask, (hash >> 32) as usize & mask)
    }

    pub(super) fn tag_of(hash: u64) -> u8 {
        1 + ((hash >> 48) % 255) as u8
    }

    /// Search one stripe without its lock. The answer is a hint: a writer
    /// may change the slot right after; callers that act on it re-check
    /// under the lock.
    pub(super) fn find_unlocked(
        &self,
        s: usize,
        words: &[u64; KEY_WORDS],
        tag: u8,
    ) -> Option<usize> {
        let stripe = self.stripe(s);
        let tags = stripe.tag_words();
        (0..TAG_WORDS)
            .flat_map(|w| mask_slots(w, tag_matches(tags[w], tag)))
            .find(|&i| {
                let slot = self.slot(s, i);
                slot.meta().in_use && slot.key_words() == *words
            })
    }

    /// Look a flow up without taking any lock.
    pub fn lookup(&self, key: &FlowKey) -> Result<Option<FlowSnapshot>, SlotBusy> {
        let hash = self.hash(key);
        let words = key.to_words();
        let tag = Self::tag_of(hash);
        let (a, b) = self.stripes_of(hash);
        for s in [a, b] {
            if let Some(i) = self.find_unlocked(s, &words, tag) {
                match self.snapshot(s, i)? {
                    Some(snap) if snap.key == *key => return Ok(Some(snap)),
                    _ => {}
                }
            }
        }
        Ok(None)
    }

    /// A consistent copy of slot `i` of stripe `s`, if it holds a valid flow.
    pub(super) fn snapshot(&self, s: usize, i: usize) -> Result<Option<FlowSnapshot>, SlotBusy> {
        let words = self.slot(s, i).read_consistent()?;
        Ok(decode(&words, self.geo.seed, slot_ref(s, i)))
    }

    /// Every flow, each copied consistently, without taking any lock.
    /// Entries being written right now or invalid ones are skipped (and
    /// counted in the iterator).
    pub fn iter(&self) -> FlowIter<'a> {
        FlowIter {
            reader: *self,
            stripe: 0,
            pending: Vec::new(),
            skipped_busy: 0,
            skipped_invalid: 0,
        }
    }

    /// Entries in use (lock-free; exact when no writer runs).
    pub fn len(&self) -> usize {
        (0..self.geo.stripes).map(|s| self.stripe(s).used()).sum()
    }

    /// True when no entry is in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Table-wide figures for stats, without locks.
    pub fn counters(&self) -> FlowTableCounters {
        let c = self.counters_block();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = FlowTableCounters {
            capacity: self.geo.capacity,
            refused: get(&c.refused),
            repairs: get(&c.repairs),
            lock_timeouts: get(&c.lock_timeouts),
            lock_failures: get(&c.lock_failures),
            scrubbed: get(&c.scrubbed),
            owner_gone_removed: get(&c.owner_gone_removed),
            ..FlowTableCounters::default()
        };
        for s in 0..self.geo.stripes {
            let st = self.stripe(s);
            out.live += st.used();
            out.created = out.created.wrapping_add(get(&st.counts.created));
            out.removed = out.removed.wrapping_add(get(&st.counts.removed));
        }
        out
    }
}

/// Iterator over consistent copies of every live flow; see [`FlowReader::iter`].
pub struct FlowIter<'a> {
    reader: FlowReader<'a>,
    stripe: usize,
    pending: Vec<FlowSnapshot>,
    /// Entries skipped because they were being written throughout.
    pub skipped_busy: usize,
    /// Entries skipped because they did not validate.
    pub skipped_invalid: usize,
}

impl Iterator for FlowIter<'_> {
    type Item = FlowSnapshot;

    fn next(&mut self) -> Option<FlowSnapshot> {
        loop {
            if let Some(snap) = self.pending.pop() {
                return Some(snap);
            }
            if self.stripe >= self.reader.geo.stripes {
                return None;
            }
            let s = self.stripe;
            self.stripe += 1;
            for i in self.reader.stripe(s).used_slots() {
                match self.reader.snapshot(s, i) {
                    Ok(Some(snap)) => self.pending.push(snap),
                    Ok(None) => self.skipped_invalid += 1,
                    Err(SlotBusy) => self.skipped_busy += 1,
                }
            }
            self.pending.reverse();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::testing::{key, tmp_region, tx};

    #[test]
    fn iteration_sees_every_flow_once() {
        let (p, region) = tmp_region("iter", 1024);
        let t = region.flow_table().unwrap();
        for n in 0..500 {
            t.record(&key(n), &tx(u64::from(n) + 1), 2, 5).unwrap();
        }
        let mut it = t.reader().iter();
        let mut seen: Vec<u64> = it.by_ref().map(|s| s.tx_frames).collect();
        seen.sort_unstable();
        assert_eq!(seen, (1..=500).collect::<Vec<u64>>());
        assert_eq!((it.skipped_busy, it.skipped_invalid), (0, 0));
        // The read-only view (`qpnet stats`) sees the same.
        let ro = SharedRegion::open_read_only(&p).unwrap();
        assert_eq!(ro.flows().iter().count(), 500);
        assert!(ro.flow_table().is_none());
        std::fs::remove_file(p).unwrap();
    }
}
