//! Crash repair, scrubbing and audit: what puts a stripe back inside the
//! invariants I1-I4 (mod.rs) whatever a dead holder or corruption left in
//! it. [`FlowTable`]'s `repair` runs inside [`crate::robust_mutex`]'s
//! EOWNERDEAD handling, before the mutex is marked consistent; it is
//! idempotent, so a repairer that dies too is simply repaired again.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::key::KEY_WORDS;
use super::reader::FlowReader;
use super::slot::{decode, slot_ref, FlowSnapshot, SLOT_WORDS, W_CHECK, W_META, W_SEQ};
use super::stripe::SLOTS_PER_STRIPE;
use super::sweep::SweepReport;
use super::table::{FlowError, FlowTable};
use crate::robust_mutex::LockWait;

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

impl FlowTable<'_> {
    /// Repair stripe `s`, whose holder died: roll its intent back, scrub
    /// the stripe, count the repair. Runs inside `RobustMutex::lock` on
    /// EOWNERDEAD, lock held, before the mutex is marked consistent.
    pub(super) fn repair(&self, s: usize) {
        self.undo_intent(s);
        let _ = self.scrub_stripe(s);
        let stripe = self.reader.stripe(s);
        stripe.counts.repairs.fetch_add(1, Ordering::Relaxed);
        self.reader
            .counters_block()
            .repairs
            .fetch_add(1, Ordering::Relaxed);
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

    /// Under the lock: slot `i` of stripe `s` as a flow, if it keeps I1.
    pub(super) fn validate_locked(&self, s: usize, i: usize) -> Option<FlowSnapshot> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::intent::INTENT_ACTIVE;
    use crate::flow::slot::W_KEY;
    use crate::flow::testing::{key, tmp_region, tx, Rng};
    use crate::flow::{FlowTimeouts, Recorded};
    use crate::robust_mutex::LockWait;

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
        let mut rng = Rng(0xdead_beef_cafe_f00d);
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
}
