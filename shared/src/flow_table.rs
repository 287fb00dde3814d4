//! The flow table: every flow the workers have seen, in shared memory, safe
//! against any process dying at any instant.
//!
//! # Theory of operation
//!
//! Shape. The table is `capacity` entries (a power of two, default 65,536)
//! cut into stripes of 64 entries. Each stripe has a robust process-shared
//! mutex, a line of 64 one-byte tags (tag 0: slot free; otherwise 1..=255
//! from the key's hash), two counters (entries created, entries removed)
//! and an undo record ("intent"). A key's keyed hash names two stripes
//! (`a` from the low bits, `b` from bits 32 and up) and a tag (bits 48 and
//! up). A flow lives in one slot of stripe `a` or `b`, any slot: within a
//! stripe, the tag line is the index, so there is no probing order and no
//! tombstone. Two choices per key keep the stripes evenly loaded: the first
//! refusal (both stripes full) comes at ~97% load, where one choice per key
//! would refuse from ~70%.
//!
//! Invariants, for every stripe whose lock is free:
//!   I1 tag[i] != 0  <=>  slot i is in use, its check word is the keyed hash
//!      of its key, tag[i] is that hash's tag and the stripe is one of the
//!      hash's two stripes. A free slot has all words but `seq` zero.
//!   I2 a key is in at most one slot of its two stripes.
//!   I3 every slot's `seq` is even; the intent record is inactive.
//!   I4 live entries (nonzero tags) == created - removed.
//!
//! Changes. Every change to a stripe is made holding its lock, one slot at
//! a time, inside an intent: the writer first copies the slot's 16 words,
//! its tag and the stripe's two counters into the intent and marks it
//! active; then changes the slot (between `seq` odd and `seq` even, so
//! lock-free readers retry instead of reading a torn entry), the tag and the
//! counter; then marks the intent inactive. Insert writes the slot, then
//! publishes the tag (readers never find a half-written entry); delete
//! clears the tag, then frees the slot. Updates change counters, owner,
//! flags and state, never the key. Insert locks both of the key's stripes
//! (lower index first, so two inserters cannot deadlock) and searches both
//! before choosing the emptier one: that is what keeps I2. Updates and
//! deletes of a flow whose slot is known (from the per-worker cache, or a
//! lock-free search) lock only that stripe and re-check the key there.
//!
//! Repair. A process killed holding a stripe lock leaves at most one slot
//! half-changed, and an active intent says which. The next locker gets
//! EOWNERDEAD and, before marking the mutex consistent: (1) if the intent
//! is active, writes the saved words, tag and counters back (the change is
//! rolled back whole; a change that had already retired its intent stays);
//! (2) scrubs the stripe: frees every slot that breaks I1 (garbage, torn
//! beyond the intent, or placed in the wrong stripe), drops duplicate keys,
//! evens odd sequence numbers; (3) counts the repair in the header. Repair
//! is idempotent: if the repairer dies too, the next locker repeats it.
//! Nothing read from shared memory is trusted as an index: slot numbers
//! are reduced modulo 64, stripe numbers masked, keys and owners validated.
//!
//! Waiting. Death is handled by the robust mutex; a holder that is stopped
//! or descheduled is not dead, so the packet path waits at most
//! [`DEFAULT_LOCK_WAIT`] for a stripe, and after one such timeout a flush or
//! sweep only tries locks: the frames of that stripe go untracked (counted)
//! instead of stalling the worker.
//!
//! Readers. `qpnet stats` and lookups take no lock: they read a slot's
//! `seq`, its words, then `seq` again, and retry (bounded) when it changed
//! or was odd. A slot left odd by a dead writer reads as busy until its
//! stripe is repaired, which the next locker (or the primary's
//! [`FlowTable::recover_abandoned`]) does.
//!
//! Costs. A lookup reads two tag lines plus ~1/255 false candidates per
//! stripe: two to four cache lines, hit or miss. An update holds one lock for
//! ~35 word copies. An insert holds two locks. A full scan (stats, expiry)
//! reads 64 tag bytes per stripe and two lines per live entry, so it costs
//! O(capacity / 64 + live); expiry locks only stripes with something to
//! expire, and a worker spreads it over calls with a cursor.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::flow_key::{FlowKey, KEY_WORDS};
use crate::flow_slot::{
    decode, FlowSlot, FlowSnapshot, FlowState, FlowTimeouts, FlowUpdate, Meta, SlotBusy, SlotRef,
    SLOT_WORDS, W_CHECK, W_FIRST_NS, W_KEY, W_LAST_NS, W_META, W_RX_BYTES, W_RX_FRAMES, W_SEQ,
    W_TX_BYTES, W_TX_FRAMES,
};
use crate::layout::{FlowCounters, MAX_QUEUE_PAIRS};
use crate::robust_mutex::{LockError, LockWait, RobustGuard, RobustMutex};
use crate::test_hooks::{reached, CrashPoint};
use crate::SharedRegion;

/// Entries per stripe (one tag line).
pub const SLOTS_PER_STRIPE: usize = 64;
/// Default number of entries.
pub const DEFAULT_FLOW_CAPACITY: usize = 65_536;
/// Smallest table: one stripe.
pub const MIN_FLOW_CAPACITY: usize = SLOTS_PER_STRIPE;
/// Largest table (512 MiB of entries).
pub const MAX_FLOW_CAPACITY: usize = 1 << 22;
/// How long the packet path waits for a stripe before giving up on
/// tracking a flow for this burst: a holder that is stopped (not dead)
/// must not stall the other workers.
pub const DEFAULT_LOCK_WAIT: LockWait = LockWait::Bounded(Duration::from_millis(10));

const TAG_WORDS: usize = SLOTS_PER_STRIPE / 8;
const ONES: u64 = 0x0101_0101_0101_0101;
const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
/// "INTENT!!": an intent is active only with exactly this value, so garbage
/// in the record is never replayed.
const INTENT_ACTIVE: u64 = u64::from_le_bytes(*b"INTENT!!");

/// Counters of one stripe (written under its lock, read by anyone).
#[repr(C, align(64))]
struct StripeCounts {
    created: AtomicU64,
    removed: AtomicU64,
    repairs: AtomicU64,
    reserved: [AtomicU64; 5],
}

/// The undo record of the one change a stripe's holder is making.
#[repr(C, align(64))]
struct Intent {
    active: AtomicU64,
    slot: AtomicU64,
    tag: AtomicU64,
    created: AtomicU64,
    removed: AtomicU64,
    reserved: [AtomicU64; 3],
    saved: [AtomicU64; SLOT_WORDS],
}

/// A stripe header: lock, tag line, counters, undo record.
#[repr(C, align(64))]
pub(crate) struct Stripe {
    mutex: RobustMutex,
    tags: [AtomicU64; TAG_WORDS],
    counts: StripeCounts,
    intent: Intent,
}

/// Bytes of one stripe header.
pub(crate) const STRIPE_SIZE: usize = std::mem::size_of::<Stripe>();
/// Bytes of one entry.
pub(crate) const SLOT_SIZE: usize = std::mem::size_of::<FlowSlot>();

const _: () = assert!(STRIPE_SIZE == 384);
const _: () = assert!(std::mem::offset_of!(Stripe, tags) == 64);
const _: () = assert!(std::mem::offset_of!(Stripe, counts) == 128);
const _: () = assert!(std::mem::offset_of!(Stripe, intent) == 192);
const _: () = assert!(std::mem::size_of::<Intent>() == 192);
const _: () = assert!(SLOT_SIZE == 128);

/// Where the flow table sits in a region, as validated at create/attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlowGeometry {
    pub(crate) offset: usize,
    pub(crate) capacity: usize,
    pub(crate) stripes: usize,
    pub(crate) seed: [u64; 2],
}

impl FlowGeometry {
    /// Bytes the flow table takes from `offset`.
    pub(crate) fn bytes(capacity: usize) -> usize {
        (capacity / SLOTS_PER_STRIPE) * STRIPE_SIZE + capacity * SLOT_SIZE
    }

    /// Whether `capacity` is an acceptable table size.
    pub(crate) fn capacity_ok(capacity: usize) -> bool {
        capacity.is_power_of_two() && (MIN_FLOW_CAPACITY..=MAX_FLOW_CAPACITY).contains(&capacity)
    }
}

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

/// What [`FlowTable::audit`] found. A quiescent, uncorrupted table is
/// [`AuditReport::is_clean`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// Entries in use.
    pub live: usize,
    /// Sum of the stripes' created counters.
    pub created: u64,
    /// Sum of the stripes' removed counters.
    pub removed: u64,
    /// Slots with a tag whose entry does not validate (I1).
    pub invalid: usize,
    /// Keys present more than once (I2).
    pub duplicates: usize,
    /// Intents left active or odd sequence numbers (I3).
    pub unsettled: usize,
    /// Free slots (tag 0) with an in-use entry behind them.
    pub leftovers: usize,
}

impl AuditReport {
    /// Every invariant holds.
    pub fn is_clean(&self) -> bool {
        self.invalid == 0
            && self.duplicates == 0
            && self.unsettled == 0
            && self.leftovers == 0
            && self.live as u64 == self.created.wrapping_sub(self.removed)
    }
}

/// Bit 7 of each byte of the result is set where `x` has a zero byte.
fn zero_bytes(x: u64) -> u64 {
    !(((x & LOW7).wrapping_add(LOW7)) | x | LOW7)
}

/// Slots (in one tag word) whose tag is `tag`.
fn tag_matches(word: u64, tag: u8) -> u64 {
    zero_bytes(word ^ u64::from(tag).wrapping_mul(ONES))
}

/// Iterate the slot numbers of a byte mask produced by `zero_bytes`.
fn mask_slots(word_index: usize, mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let byte = mask.trailing_zeros() as usize / 8;
        mask &= mask - 1;
        Some(word_index * 8 + byte)
    })
}

impl Stripe {
    fn tag_words(&self) -> [u64; TAG_WORDS] {
        std::array::from_fn(|w| self.tags[w].load(Ordering::Acquire))
    }

    fn tag(&self, slot: usize) -> u8 {
        let slot = slot % SLOTS_PER_STRIPE;
        (self.tags[slot / 8].load(Ordering::Acquire) >> ((slot % 8) * 8)) as u8
    }

    /// Caller holds the lock (tag words have one writer at a time).
    fn set_tag(&self, slot: usize, tag: u8) {
        let slot = slot % SLOTS_PER_STRIPE;
        let shift = (slot % 8) * 8;
        let word = &self.tags[slot / 8];
        let old = word.load(Ordering::Relaxed);
        word.store(
            (old & !(0xff << shift)) | u64::from(tag) << shift,
            Ordering::Release,
        );
    }

    /// Slots in use, read without the lock.
    fn used(&self) -> usize {
        self.tag_words()
            .iter()
            .map(|&w| 8 - (zero_bytes(w).count_ones() as usize))
            .sum()
    }

    fn used_slots(&self) -> impl Iterator<Item = usize> {
        let words = self.tag_words();
        (0..TAG_WORDS).flat_map(move |w| mask_slots(w, !zero_bytes(words[w]) & (ONES << 7)))
    }

    fn first_free(&self) -> Option<usize> {
        let words = self.tag_words();
        (0..TAG_WORDS).find_map(|w| mask_slots(w, zero_bytes(words[w])).next())
    }
}

/// The lock-free read side of the flow table: lookups, iteration, counts.
/// Works on read-only mappings (`qpnet stats`).
#[derive(Clone, Copy)]
pub struct FlowReader<'a> {
    region: &'a SharedRegion,
    geo: FlowGeometry,
}

/// The flow table for processes that change it (workers, the primary).
/// Cheap to make and copy; every operation takes `&self`.
#[derive(Clone, Copy)]
pub struct FlowTable<'a> {
    reader: FlowReader<'a>,
    wait: LockWait,
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

    fn stripe(&self, s: usize) -> &'a Stripe {
        let s = s & (self.geo.stripes - 1);
        // SAFETY: the region was validated (create/attach) to hold
        // `stripes` stripe headers from `offset`, which is 64-byte aligned
        // in a page-aligned mapping; `s` is masked into range. Stripe is
        // repr(C) of atomics and a pthread mutex in an UnsafeCell, so shared
        // references are sound while other processes use it.
        unsafe { &*(self.region.base().add(self.geo.offset + s * STRIPE_SIZE) as *const Stripe) }
    }

    fn slot(&self, s: usize, i: usize) -> &'a FlowSlot {
        let s = s & (self.geo.stripes - 1);
        let index = s * SLOTS_PER_STRIPE + i % SLOTS_PER_STRIPE;
        let off = self.geo.offset + self.geo.stripes * STRIPE_SIZE + index * SLOT_SIZE;
        // SAFETY: the region holds `capacity` slots after the stripes
        // (validated); `index < capacity` by the masking above; FlowSlot is
        // repr(C, align(64)) of atomics and `off` is a multiple of 64.
        unsafe { &*(self.region.base().add(off) as *const FlowSlot) }
    }

    fn counters_block(&self) -> &'a FlowCounters {
        &self.region.header().flow_counters
    }

    /// The keyed hash of `key` in this table.
    pub fn hash(&self, key: &FlowKey) -> u64 {
        key.hash_with(self.geo.seed)
    }

    fn stripes_of(&self, hash: u64) -> (usize, usize) {
        let mask = self.geo.stripes - 1;
        (hash as usize & mask, (hash >> 32) as usize & mask)
    }

    fn tag_of(hash: u64) -> u8 {
        1 + ((hash >> 48) % 255) as u8
    }

    /// Search one stripe without its lock. The answer is a hint: a writer
    /// may change the slot right after; callers that act on it re-check
    /// under the lock.
    fn find_unlocked(&self, s: usize, words: &[u64; KEY_WORDS], tag: u8) -> Option<usize> {
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
    fn snapshot(&self, s: usize, i: usize) -> Result<Option<FlowSnapshot>, SlotBusy> {
        let words = self.slot(s, i).read_consistent()?;
        let at = SlotRef {
            stripe: s as u32,
            slot: i as u32,
        };
        Ok(decode(&words, self.geo.seed, at))
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

/// The candidate slots of one flow: key words, hash, tag, stripes.
struct Probe {
    words: [u64; KEY_WORDS],
    hash: u64,
    tag: u8,
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

    /// Take stripe `s`'s lock, repairing it first if its holder died.
    fn lock(&self, s: usize) -> Result<RobustGuard<'a>, FlowError> {
        self.lock_with(s, self.wait)
    }

    fn lock_with(&self, s: usize, wait: LockWait) -> Result<RobustGuard<'a>, FlowError> {
        let c = self.reader.counters_block();
        self.reader
            .stripe(s)
            .mutex
            .lock(wait, || self.repair(s))
            .map_err(|e| {
                let counter = match e {
                    LockError::TimedOut => &c.lock_timeouts,
                    _ => &c.lock_failures,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                FlowError::Lock(e)
            })
    }

    /// Lock two stripes in index order (one lock when they are the same).
    fn lock_pair(
        &self,
        a: usize,
        b: usize,
    ) -> Result<(RobustGuard<'a>, Option<RobustGuard<'a>>), FlowError> {
        let (lo, hi) = (a.min(b), a.max(b));
        let first = self.lock(lo)?;
        let second = if hi != lo { Some(self.lock(hi)?) } else { None };
        Ok((first, second))
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

    /// Check every slot of every stripe, settle stray intents and free
    /// invalid entries (after suspected corruption; expiry does the same
    /// for the live entries of the stripes it visits).
    pub fn scrub_all(&self) -> SweepReport {
        let mut report = SweepReport::default();
        for s in 0..self.reader.geo.stripes {
            report.stripes_visited += 1;
            let Ok(_guard) = self.lock(s) else {
                report.stripes_skipped += 1;
                continue;
            };
            if self.reader.stripe(s).intent.active.load(Ordering::Relaxed) != 0 {
                self.undo_intent(s);
            }
            report.scrubbed += self.scrub_stripe(s);
        }
        report
    }

    /// Try every stripe's lock once without waiting, so any stripe whose
    /// holder died is repaired now rather than by its next user. The primary
    /// calls this after reaping a dead worker. Returns the stripes repaired.
    pub fn recover_abandoned(&self) -> usize {
        (0..self.reader.geo.stripes)
            .filter(|&s| {
                self.reader
                    .stripe(s)
                    .mutex
                    .lock(LockWait::Bounded(Duration::ZERO), || self.repair(s))
                    .is_ok_and(|g| g.repaired())
            })
            .count()
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

    /// Under the lock: slot `i` of stripe `s` as a flow, if it keeps I1.
    fn validate_locked(&self, s: usize, i: usize) -> Option<FlowSnapshot> {
        let slot = self.reader.slot(s, i);
        let words: [u64; SLOT_WORDS] = std::array::from_fn(|w| slot.get(w));
        let snap = decode(&words, self.reader.geo.seed, slot_ref(s, i))?;
        let check = words[W_CHECK];
        let (a, b) = self.reader.stripes_of(check);
        let placed = (s == a || s == b)
            && self.reader.stripe(s).tag(i) == FlowReader::tag_of(check)
            && words[W_SEQ] & 1 == 0;
        placed.then_some(snap)
    }

    // ---- changes to one slot, each inside an intent; caller holds the lock.

    fn intent_begin(&self, s: usize, i: usize) {
        let stripe = self.reader.stripe(s);
        let slot = self.reader.slot(s, i);
        let it = &stripe.intent;
        for (w, saved) in it.saved.iter().enumerate() {
            saved.store(slot.get(w), Ordering::Relaxed);
        }
        it.slot.store(i as u64, Ordering::Relaxed);
        it.tag.store(u64::from(stripe.tag(i)), Ordering::Relaxed);
        let counts = &stripe.counts;
        it.created
            .store(counts.created.load(Ordering::Relaxed), Ordering::Relaxed);
        it.removed
            .store(counts.removed.load(Ordering::Relaxed), Ordering::Relaxed);
        it.active.store(INTENT_ACTIVE, Ordering::Release);
        reached(CrashPoint::IntentWritten);
    }

    fn intent_end(&self, s: usize) {
        self.reader
            .stripe(s)
            .intent
            .active
            .store(0, Ordering::Release);
    }

    fn insert_slot(&self, s: usize, i: usize, p: &Probe, u: &FlowUpdate, owner: u8, now: u64) {
        self.intent_begin(s, i);
        let slot = self.reader.slot(s, i);
        slot.begin_write();
        let state = FlowState::derive(
            (p.words[4] >> 56) as u8,
            u.tcp_flags_tx,
            u.tcp_flags_rx,
            u.tx_frames > 0 && u.rx_frames > 0,
        );
        let meta = Meta {
            in_use: true,
            owner,
            flags_tx: u.tcp_flags_tx,
            flags_rx: u.tcp_flags_rx,
            state: state as u8,
        };
        slot.set(W_META, meta.pack());
        for (k, w) in p.words.iter().enumerate() {
            slot.set(W_KEY + k, *w);
        }
        reached(CrashPoint::InsertHalfWritten);
        slot.set(W_TX_FRAMES, u.tx_frames);
        slot.set(W_TX_BYTES, u.tx_bytes);
        slot.set(W_RX_FRAMES, u.rx_frames);
        slot.set(W_RX_BYTES, u.rx_bytes);
        slot.set(W_FIRST_NS, now);
        slot.set(W_LAST_NS, now);
        slot.set(W_CHECK, p.hash);
        slot.set(W_CHECK + 1, 0);
        slot.set(W_CHECK + 2, 0);
        slot.end_write();
        let stripe = self.reader.stripe(s);
        stripe.set_tag(i, p.tag);
        stripe.counts.created.fetch_add(1, Ordering::Relaxed);
        self.intent_end(s);
        reached(CrashPoint::CommittedBeforeUnlock);
    }

    /// Returns the owner before the update.
    fn update_slot(&self, s: usize, i: usize, u: &FlowUpdate, owner: u8, now: u64) -> u8 {
        self.intent_begin(s, i);
        let slot = self.reader.slot(s, i);
        let add = |w: usize, n: u64| slot.set(w, slot.get(w).wrapping_add(n));
        slot.begin_write();
        add(W_TX_FRAMES, u.tx_frames);
        reached(CrashPoint::UpdateHalfWritten);
        add(W_TX_BYTES, u.tx_bytes);
        add(W_RX_FRAMES, u.rx_frames);
        add(W_RX_BYTES, u.rx_bytes);
        slot.set(W_LAST_NS, slot.get(W_LAST_NS).max(now));
        let old = slot.meta();
        let meta = updated_meta(&old, slot, u, owner);
        slot.set(W_META, meta.pack());
        slot.end_write();
        self.intent_end(s);
        reached(CrashPoint::CommittedBeforeUnlock);
        old.owner
    }

    fn delete_slot(&self, s: usize, i: usize) {
        self.intent_begin(s, i);
        let stripe = self.reader.stripe(s);
        stripe.set_tag(i, 0);
        reached(CrashPoint::DeleteTagCleared);
        self.clear_slot(s, i);
        stripe.counts.removed.fetch_add(1, Ordering::Relaxed);
        self.intent_end(s);
        reached(CrashPoint::CommittedBeforeUnlock);
    }

    fn clear_slot(&self, s: usize, i: usize) {
        let slot = self.reader.slot(s, i);
        slot.begin_write();
        for w in W_META..SLOT_WORDS {
            slot.set(w, 0);
        }
        slot.end_write();
    }

    /// Free an entry that does not validate: it was never (correctly)
    /// created, so it is counted as scrubbed, not removed. Idempotent, so
    /// it needs no intent: a repeat after a crash finishes the job.
    fn scrub_slot(&self, s: usize, i: usize) {
        self.reader.stripe(s).set_tag(i, 0);
        self.clear_slot(s, i);
        self.reader
            .counters_block()
            .scrubbed
            .fetch_add(1, Ordering::Relaxed);
    }

    // ---- repair (runs inside RobustMutex::lock on EOWNERDEAD).

    fn repair(&self, s: usize) {
        self.undo_intent(s);
        let _ = self.scrub_stripe(s);
        let stripe = self.reader.stripe(s);
        stripe.counts.repairs.fetch_add(1, Ordering::Relaxed);
        self.reader
            .counters_block()
            .repairs
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Roll the dead holder's change back from the intent record.
    fn undo_intent(&self, s: usize) {
        let stripe = self.reader.stripe(s);
        let it = &stripe.intent;
        if it.active.load(Ordering::Acquire) == INTENT_ACTIVE {
            let i = (it.slot.load(Ordering::Relaxed) % SLOTS_PER_STRIPE as u64) as usize;
            let slot = self.reader.slot(s, i);
            slot.begin_write();
            for w in W_META..SLOT_WORDS {
                slot.set(w, it.saved[w].load(Ordering::Relaxed));
            }
            slot.end_write();
            let tag = it.tag.load(Ordering::Relaxed);
            stripe.set_tag(i, u8::try_from(tag).unwrap_or(0));
            let counts = &stripe.counts;
            counts
                .created
                .store(it.created.load(Ordering::Relaxed), Ordering::Relaxed);
            counts
                .removed
                .store(it.removed.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        it.active.store(0, Ordering::Release);
    }

    /// Restore I1-I3 in a stripe whatever its contents: free invalid
    /// entries, drop duplicate keys, clear leftovers behind free tags and
    /// even out odd sequence numbers. Returns the entries freed.
    fn scrub_stripe(&self, s: usize) -> usize {
        let mut freed = 0;
        let mut seen: Vec<[u64; KEY_WORDS]> = Vec::new();
        for i in 0..SLOTS_PER_STRIPE {
            let slot = self.reader.slot(s, i);
            let tagged = self.reader.stripe(s).tag(i) != 0;
            if slot.get(W_SEQ) & 1 == 1 {
                slot.end_write();
            }
            if !tagged {
                if slot.meta().in_use || (W_META..SLOT_WORDS).any(|w| slot.get(w) != 0) {
                    self.clear_slot(s, i);
                }
                continue;
            }
            if self.validate_locked(s, i).is_none() {
                self.scrub_slot(s, i);
                freed += 1;
                continue;
            }
            let key = slot.key_words();
            if seen.contains(&key) {
                self.delete_slot(s, i);
                self.reader
                    .counters_block()
                    .scrubbed
                    .fetch_add(1, Ordering::Relaxed);
                freed += 1;
            } else {
                seen.push(key);
            }
        }
        freed
    }

    /// Check every invariant, one stripe lock at a time (repairing stripes
    /// whose holder died). Meant for a quiescent table (tests, `--check`):
    /// with writers running, keys moving between stripes may show as
    /// duplicates.
    pub fn audit(&self) -> Result<AuditReport, FlowError> {
        let mut r = AuditReport::default();
        let mut keys: HashSet<[u64; KEY_WORDS]> = HashSet::new();
        for s in 0..self.reader.geo.stripes {
            let _guard = self.lock(s)?;
            let stripe = self.reader.stripe(s);
            r.created = r
                .created
                .wrapping_add(stripe.counts.created.load(Ordering::Relaxed));
            r.removed = r
                .removed
                .wrapping_add(stripe.counts.removed.load(Ordering::Relaxed));
            if stripe.intent.active.load(Ordering::Relaxed) != 0 {
                r.unsettled += 1;
            }
            for i in 0..SLOTS_PER_STRIPE {
                let slot = self.reader.slot(s, i);
                if slot.get(W_SEQ) & 1 == 1 {
                    r.unsettled += 1;
                }
                if stripe.tag(i) == 0 {
                    if slot.meta().in_use {
                        r.leftovers += 1;
                    }
                    continue;
                }
                r.live += 1;
                if self.validate_locked(s, i).is_none() {
                    r.invalid += 1;
                } else if !keys.insert(slot.key_words()) {
                    r.duplicates += 1;
                }
            }
        }
        Ok(r)
    }
}

/// The meta word after an update: the owner moves to the recording queue
/// pair when it sent (TX) frames of the flow; a SYN without ACK on a closed
/// TCP flow starts a new connection on the same tuple, so flags restart.
fn updated_meta(old: &Meta, slot: &FlowSlot, u: &FlowUpdate, owner: u8) -> Meta {
    let protocol = (slot.get(W_KEY + 4) >> 56) as u8;
    let reopened = old.state == FlowState::Closed as u8
        && u.tcp_flags_tx & crate::flow_key::tcp_flags::SYN != 0
        && u.tcp_flags_tx & crate::flow_key::tcp_flags::ACK == 0;
    let (flags_tx, flags_rx) = if reopened {
        (u.tcp_flags_tx, u.tcp_flags_rx)
    } else {
        (old.flags_tx | u.tcp_flags_tx, old.flags_rx | u.tcp_flags_rx)
    };
    let both_ways = slot.get(W_TX_FRAMES) > 0 && slot.get(W_RX_FRAMES) > 0;
    Meta {
        in_use: true,
        owner: if u.tx_frames > 0 { owner } else { old.owner },
        flags_tx,
        flags_rx,
        state: FlowState::derive(protocol, flags_tx, flags_rx, both_ways) as u8,
    }
}

fn slot_ref(s: usize, i: usize) -> SlotRef {
    SlotRef {
        stripe: s as u32,
        slot: i as u32,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::flow_key::protocol;
    use std::net::Ipv4Addr;

    pub(crate) fn tmp_region(name: &str, capacity: usize) -> (std::path::PathBuf, SharedRegion) {
        let p = std::env::temp_dir().join(format!("qpnet-flow-test-{}-{name}", std::process::id()));
        let r = SharedRegion::create_with(&p, 4, capacity).unwrap();
        (p, r)
    }

    pub(crate) fn key(n: u32) -> FlowKey {
        let [a, b, c, d] = n.to_be_bytes();
        FlowKey::v4(
            protocol::UDP,
            (Ipv4Addr::new(10, 77, a, b), 1000 + u16::from(c)),
            (Ipv4Addr::new(10, 78, 0, d), 53),
        )
    }

    fn tx(frames: u64) -> FlowUpdate {
        FlowUpdate {
            tx_frames: frames,
            tx_bytes: frames * 100,
            ..FlowUpdate::default()
        }
    }

    fn rx(frames: u64) -> FlowUpdate {
        FlowUpdate {
            rx_frames: frames,
            rx_bytes: frames * 100,
            ..FlowUpdate::default()
        }
    }

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
            tcp_flags_tx: crate::flow_key::tcp_flags::SYN,
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

    /// Garbage over the whole flow area except the mutexes: no reader or
    /// writer may crash, and a scrub brings the table back to a clean state.
    #[test]
    fn garbage_in_the_table_never_crashes_and_is_scrubbed() {
        let (p, region) = tmp_region("garbage", 512);
        let t = region
            .flow_table()
            .unwrap()
            .with_lock_wait(LockWait::Forever);
        for n in 0..200 {
            t.record(&key(n), &tx(1), 0, 1).unwrap();
        }
        let mut rng = crate::flow_key::tests::Rng(0xdead_beef_cafe_f00d);
        let mut scribble = |t: &FlowTable| {
            for s in 0..t.reader().stripe_count() {
                let st = t.reader().stripe(s);
                for w in st.tags.iter() {
                    w.store(rng.next(), Ordering::Relaxed);
                }
                for w in st.intent.saved.iter() {
                    w.store(rng.next(), Ordering::Relaxed);
                }
                st.intent.slot.store(rng.next(), Ordering::Relaxed);
                st.intent.tag.store(rng.next(), Ordering::Relaxed);
                st.intent.active.store(
                    if rng.next().is_multiple_of(2) {
                        INTENT_ACTIVE
                    } else {
                        rng.next()
                    },
                    Ordering::Relaxed,
                );
                for i in 0..SLOTS_PER_STRIPE {
                    let slot = t.reader().slot(s, i);
                    for w in 0..SLOT_WORDS {
                        if rng.next().is_multiple_of(3) {
                            slot.set(w, rng.next());
                        }
                    }
                    // Some slots look in use with a valid key but a wrong
                    // check word, owner or stripe.
                    if rng.next().is_multiple_of(4) {
                        let k = key(rng.next() as u32);
                        for (j, w) in k.to_words().iter().enumerate() {
                            slot.set(W_KEY + j, *w);
                        }
                        slot.set(W_META, rng.next() & 0xffff_ffff_ff01);
                    }
                }
            }
        };
        scribble(&t);
        // Readers: never panic, never return something that fails to decode.
        let n = t.reader().iter().count();
        assert!(n <= 512);
        let _ = t.reader().counters();
        for k in 0..300 {
            let _ = t.reader().lookup(&key(k));
        }
        // Writers: records, removes, expiry all run; the table may refuse.
        for k in 0..300 {
            let _ = t.record(&key(k), &tx(1), (k % 4) as usize, 2).unwrap();
            if k % 3 == 0 {
                let _ = t.remove(&key(k)).unwrap();
            }
        }
        let mut cursor = 0;
        let _ = t.expire_idle(0, u64::MAX, &FlowTimeouts::default(), &mut cursor, 3);
        // Simulated dead holder with a garbage intent on every stripe.
        scribble(&t);
        for s in 0..t.reader().stripe_count() {
            let _guard = t.lock(s).unwrap();
            t.repair(s);
        }
        let after_repair = t.audit().unwrap();
        assert_eq!(
            (
                after_repair.invalid,
                after_repair.duplicates,
                after_repair.unsettled,
                after_repair.leftovers
            ),
            (0, 0, 0, 0),
            "{after_repair:?}"
        );
        scribble(&t);
        t.scrub_all();
        let a = t.audit().unwrap();
        assert_eq!((a.invalid, a.duplicates, a.leftovers), (0, 0, 0), "{a:?}");
        // The table still works (the counters are garbage, the entries not).
        let fresh = key(1_000_000);
        assert!(matches!(
            t.record(&fresh, &tx(1), 0, 3).unwrap(),
            Recorded::Created { .. } | Recorded::Updated { .. } | Recorded::Full
        ));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn swar_tag_helpers() {
        let w = u64::from_le_bytes([0, 5, 0, 7, 5, 0, 0, 9]);
        let zeros: Vec<usize> = mask_slots(1, zero_bytes(w)).collect();
        assert_eq!(zeros, vec![8, 10, 13, 14]);
        let fives: Vec<usize> = mask_slots(0, tag_matches(w, 5)).collect();
        assert_eq!(fives, vec![1, 4]);
        assert_eq!(zero_bytes(u64::MAX), 0);
        assert_eq!(zero_bytes(0x8080_8080_8080_8080), 0);
        assert_eq!(zero_bytes(0x0100_0000_0000_0001).count_ones(), 6);
    }
}
