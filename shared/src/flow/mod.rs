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
//!
//! # Where the code is
//!
//! | file | what it holds |
//! | --- | --- |
//! | `key.rs` | [`FlowKey`], its packed words and its keyed hash |
//! | `parse.rs` | [`FlowKey::parse`]: the key of an untrusted Ethernet frame |
//! | `state.rs` | [`FlowState`] (a flow's lifecycle) and [`FlowTimeouts`] |
//! | `slot.rs` | one entry's layout in shared memory and its seqlock |
//! | `stripe.rs` | the stripe header (lock, tag line, counters) and taking its lock |
//! | `intent.rs` | the undo record and every change made inside it |
//! | `reader.rs` | [`FlowReader`]: lock-free lookups, iteration, counters |
//! | `table.rs` | [`FlowTable`]: record (update or insert) and remove |
//! | `sweep.rs` | expiry and owner removal |
//! | `repair.rs` | EOWNERDEAD repair, scrubbing, audit |
//! | `geometry.rs` | where the table sits in the region, and its size limits |
//! | `cache.rs` | [`FlowCache`]: a worker's private, per-burst front of the table |

mod cache;
mod geometry;
mod intent;
mod key;
mod parse;
mod reader;
mod repair;
mod slot;
mod state;
mod stripe;
mod sweep;
mod table;

#[cfg(test)]
mod multiprocess_tests;
#[cfg(test)]
mod testing;

pub use cache::{FlowCache, FlushReport, MAX_PENDING_FLOWS};
pub use geometry::{DEFAULT_FLOW_CAPACITY, MAX_FLOW_CAPACITY, MIN_FLOW_CAPACITY};
pub use key::{hash_words, protocol, tcp_flags, Direction, Family, FlowKey, KEY_WORDS};
pub use parse::{fuzz_flow_key, ParseError, ParsedFrame, FLOW_HEADROOM};
pub use reader::{FlowIter, FlowReader, FlowTableCounters};
pub use repair::AuditReport;
pub use slot::{FlowSnapshot, SlotBusy, SlotRef};
pub use state::{FlowState, FlowTimeouts};
pub use stripe::SLOTS_PER_STRIPE;
pub use sweep::SweepReport;
pub use table::{FlowError, FlowTable, FlowUpdate, Recorded, DEFAULT_LOCK_WAIT};

pub(crate) use geometry::FlowGeometry;
pub(crate) use key::random_seed;
pub(crate) use slot::SLOT_SIZE;
pub(crate) use stripe::STRIPE_SIZE;
