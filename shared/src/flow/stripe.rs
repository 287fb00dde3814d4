//! A stripe: the header in front of each run of 64 entries (its robust
//! lock, its tag line, its counters and its undo record) and how the table
//! takes that lock.
//!
//! The tag line is the stripe's index: one byte per slot, 0 for a free
//! slot, else the key hash's tag. Eight tags fit a word, so "which slots
//! hold tag t" and "which are free" are a few SWAR operations per word,
//! with no probing order and no tombstones.

use std::sync::atomic::{AtomicU64, Ordering};

use super::intent::Intent;
use super::table::{FlowError, FlowTable};
use crate::robust_mutex::{LockError, LockWait, RobustGuard, RobustMutex};

/// Entries per stripe (one tag line).
pub const SLOTS_PER_STRIPE: usize = 64;

pub(super) const TAG_WORDS: usize = SLOTS_PER_STRIPE / 8;
const ONES: u64 = 0x0101_0101_0101_0101;
const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;

/// Counters of one stripe (written under its lock, read by anyone).
#[repr(C, align(64))]
pub(super) struct StripeCounts {
    pub(super) created: AtomicU64,
    pub(super) removed: AtomicU64,
    pub(super) repairs: AtomicU64,
    reserved: [AtomicU64; 5],
}

/// A stripe header: lock, tag line, counters, undo record.
#[repr(C, align(64))]
pub(crate) struct Stripe {
    pub(super) mutex: RobustMutex,
    pub(super) tags: [AtomicU64; TAG_WORDS],
    pub(super) counts: StripeCounts,
    pub(super) intent: Intent,
}

/// Bytes of one stripe header.
pub(crate) const STRIPE_SIZE: usize = std::mem::size_of::<Stripe>();

const _: () = assert!(STRIPE_SIZE == 384);
const _: () = assert!(std::mem::offset_of!(Stripe, tags) == 64);
const _: () = assert!(std::mem::offset_of!(Stripe, counts) == 128);
const _: () = assert!(std::mem::offset_of!(Stripe, intent) == 192);

/// Bit 7 of each byte of the result is set where `x` has a zero byte.
fn zero_bytes(x: u64) -> u64 {
    !(((x & LOW7).wrapping_add(LOW7)) | x | LOW7)
}

/// Slots (in one tag word) whose tag is `tag`.
pub(super) fn tag_matches(word: u64, tag: u8) -> u64 {
    zero_bytes(word ^ u64::from(tag).wrapping_mul(ONES))
}

/// Iterate the slot numbers of a byte mask produced by `zero_bytes`.
pub(super) fn mask_slots(word_index: usize, mut mask: u64) -> impl Iterator<Item = usize> {
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
    pub(super) fn tag_words(&self) -> [u64; TAG_WORDS] {
        std::array::from_fn(|w| self.tags[w].load(Ordering::Acquire))
    }

    pub(super) fn tag(&self, slot: usize) -> u8 {
        let slot = slot % SLOTS_PER_STRIPE;
        (self.tags[slot / 8].load(Ordering::Acquire) >> ((slot % 8) * 8)) as u8
    }

    /// Caller holds the lock (tag words have one writer at a time).
    pub(super) fn set_tag(&self, slot: usize, tag: u8) {
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
    pub(super) fn used(&self) -> usize {
        self.tag_words()
            .iter()
            .map(|&w| 8 - (zero_bytes(w).count_ones() as usize))
            .sum()
    }

    pub(super) fn used_slots(&self) -> impl Iterator<Item = usize> {
        let words = self.tag_words();
        (0..TAG_WORDS).flat_map(move |w| mask_slots(w, !zero_bytes(words[w]) & (ONES << 7)))
    }

    pub(super) fn first_free(&self) -> Option<usize> {
        let words = self.tag_words();
        (0..TAG_WORDS).find_map(|w| mask_slots(w, zero_bytes(words[w])).next())
    }
}

impl<'a> FlowTable<'a> {
    /// Take stripe `s`'s lock, repairing it first if its holder died.
    pub(super) fn lock(&self, s: usize) -> Result<RobustGuard<'a>, FlowError> {
        self.lock_with(s, self.wait)
    }

    pub(super) fn lock_with(&self, s: usize, wait: LockWait) -> Result<RobustGuard<'a>, FlowError> {
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
    pub(super) fn lock_pair(
        &self,
        a: usize,
        b: usize,
    ) -> Result<(RobustGuard<'a>, Option<RobustGuard<'a>>), FlowError> {
        let (lo, hi) = (a.min(b), a.max(b));
        let first = self.lock(lo)?;
        let second = if hi != lo { Some(self.lock(hi)?) } else { None };
        Ok((first, second))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
