//! The undo record ("intent") of a stripe, and every change to a slot,
//! each made inside it.
//!
//! A writer holding the stripe lock saves the slot's words, its tag and the
//! stripe's counters in the intent, marks it active, makes its change, then
//! retires the intent. A holder killed in between leaves the intent active,
//! and the next locker rolls the change back whole ([`FlowTable`]'s
//! `undo_intent`, run by the repair). `intent_begin` and `undo_intent` sit
//! side by side here: the one restores exactly what the other saved.

use std::sync::atomic::{AtomicU64, Ordering};

use super::slot::{
    FlowSlot, Meta, SLOT_WORDS, W_CHECK, W_FIRST_NS, W_KEY, W_LAST_NS, W_META, W_RX_BYTES,
    W_RX_FRAMES, W_TX_BYTES, W_TX_FRAMES,
};
use super::state::FlowState;
use super::stripe::SLOTS_PER_STRIPE;
use super::table::{FlowTable, FlowUpdate, Probe};
use crate::test_hooks::{reached, CrashPoint};

/// "INTENT!!": an intent is active only with exactly this value, so garbage
/// in the record is never replayed.
pub(super) const INTENT_ACTIVE: u64 = u64::from_le_bytes(*b"INTENT!!");

/// The undo record of the one change a stripe's holder is making.
#[repr(C, align(64))]
pub(super) struct Intent {
    pub(super) active: AtomicU64,
    pub(super) slot: AtomicU64,
    pub(super) tag: AtomicU64,
    created: AtomicU64,
    removed: AtomicU64,
    reserved: [AtomicU64; 3],
    pub(super) saved: [AtomicU64; SLOT_WORDS],
}

const _: () = assert!(std::mem::size_of::<Intent>() == 192);

/// Changes to one slot, each inside an intent; the caller holds the
/// stripe's lock.
impl FlowTable<'_> {
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

    pub(super) fn insert_slot(
        &self,
        s: usize,
        i: usize,
        p: &Probe,
        u: &FlowUpdate,
        owner: u8,
        now: u64,
    ) {
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
    pub(super) fn update_slot(
        &self,
        s: usize,
        i: usize,
        u: &FlowUpdate,
        owner: u8,
        now: u64,
    ) -> u8 {
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

    pub(super) fn delete_slot(&self, s: usize, i: usize) {
        self.intent_begin(s, i);
        let stripe = self.reader.stripe(s);
        stripe.set_tag(i, 0);
        reached(CrashPoint::DeleteTagCleared);
        self.clear_slot(s, i);
        stripe.counts.removed.fetch_add(1, Ordering::Relaxed);
        self.intent_end(s);
        reached(CrashPoint::CommittedBeforeUnlock);
    }

    pub(super) fn clear_slot(&self, s: usize, i: usize) {
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
    pub(super) fn scrub_slot(&self, s: usize, i: usize) {
        self.reader.stripe(s).set_tag(i, 0);
        self.clear_slot(s, i);
        self.reader
            .counters_block()
            .scrubbed
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Roll the dead holder's change back from the intent record.
    pub(super) fn undo_intent(&self, s: usize) {
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
}

/// The meta word after an update: the owner moves to the recording queue
/// pair when it sent (TX) frames of the flow; a SYN without ACK on a closed
/// TCP flow starts a new connection on the same tuple, so flags restart.
fn updated_meta(old: &Meta, slot: &FlowSlot, u: &FlowUpdate, owner: u8) -> Meta {
    let protocol = (slot.get(W_KEY + 4) >> 56) as u8;
    let reopened = old.state == FlowState::Closed as u8
        && u.tcp_flags_tx & crate::flow::tcp_flags::SYN != 0
        && u.tcp_flags_tx & crate::flow::tcp_flags::ACK == 0;
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
