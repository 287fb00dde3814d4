//! One flow table entry as it sits in shared memory, and the consistent
//! copy a lock-free reader takes of it.
//!
//! An entry is sixteen 64-bit atomic words (two cache lines), so the table
//! can copy it word by word into an undo record, and a reader racing a
//! writer can never see a torn word, only a torn entry, which the per-entry
//! sequence counter (word 0, odd while being written) lets it detect and
//! retry.
//!
//! ```text
//! word 0      seq          even: stable; odd: a writer is inside
//! word 1      meta         byte 0 in-use (1), 1 owner queue pair,
//!                          2 TCP flags seen from the guest, 3 from the remote,
//!                          4 FlowState, 5..7 zero
//! words 2-6   key          FlowKey::to_words
//! words 7-10  tx frames, tx bytes, rx frames, rx bytes
//! words 11-12 first seen, last seen (CLOCK_MONOTONIC ns)
//! word 13     check        keyed hash of the key: garbage never validates
//! words 14-15 reserved, zero
//! ```

use std::sync::atomic::{fence, AtomicU64, Ordering};

use super::key::{FlowKey, KEY_WORDS};
use super::state::FlowState;
use crate::layout::MAX_QUEUE_PAIRS;

/// Words in an entry.
pub(crate) const SLOT_WORDS: usize = 16;
pub(crate) const W_SEQ: usize = 0;
pub(crate) const W_META: usize = 1;
pub(crate) const W_KEY: usize = 2;
pub(crate) const W_TX_FRAMES: usize = 7;
pub(crate) const W_TX_BYTES: usize = 8;
pub(crate) const W_RX_FRAMES: usize = 9;
pub(crate) const W_RX_BYTES: usize = 10;
pub(crate) const W_FIRST_NS: usize = 11;
pub(crate) const W_LAST_NS: usize = 12;
pub(crate) const W_CHECK: usize = 13;

const META_IN_USE: u64 = 1;

/// Times a lock-free reader re-reads an entry that keeps changing before it
/// reports it busy (a writer stopped or killed mid-write leaves it odd until
/// the stripe is repaired).
const READ_SPINS: u32 = 64;
const READ_YIELDS: u32 = 16;

/// One table entry. Only ever reached by reference into the mapping.
#[repr(C, align(64))]
pub(crate) struct FlowSlot {
    pub(crate) words: [AtomicU64; SLOT_WORDS],
}

const _: () = assert!(std::mem::size_of::<FlowSlot>() == 128);
const _: () = assert!(W_KEY + KEY_WORDS == W_TX_FRAMES);
const _: () = assert!(W_CHECK < SLOT_WORDS);

/// Bytes of one entry.
pub(crate) const SLOT_SIZE: usize = std::mem::size_of::<FlowSlot>();

const _: () = assert!(SLOT_SIZE == 128);

/// Where an entry is: stripe and slot within it. A hint, valid only while
/// the entry holds the same key; the table re-checks it under the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRef {
    /// Stripe index.
    pub stripe: u32,
    /// Slot index within the stripe.
    pub slot: u32,
}

/// A consistent copy of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowSnapshot {
    /// The flow.
    pub key: FlowKey,
    /// Owner queue pair: the TX queue the flow was last seen on (or, for a
    /// flow first seen from the TAP, the queue it arrived on).
    pub owner: u8,
    /// Frames from the guest.
    pub tx_frames: u64,
    /// Bytes from the guest.
    pub tx_bytes: u64,
    /// Frames to the guest.
    pub rx_frames: u64,
    /// Bytes to the guest.
    pub rx_bytes: u64,
    /// CLOCK_MONOTONIC ns of the first frame.
    pub first_seen_ns: u64,
    /// CLOCK_MONOTONIC ns of the last flush that saw a frame.
    pub last_seen_ns: u64,
    /// TCP flags seen from the guest.
    pub tcp_flags_tx: u8,
    /// TCP flags seen from the remote end.
    pub tcp_flags_rx: u8,
    /// State.
    pub state: FlowState,
    /// Where the entry is.
    pub at: SlotRef,
}

/// The fields packed in the meta word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) in_use: bool,
    pub(crate) owner: u8,
    pub(crate) flags_tx: u8,
    pub(crate) flags_rx: u8,
    pub(crate) state: u8,
}

impl Meta {
    pub(crate) fn unpack(w: u64) -> Meta {
        Meta {
            in_use: w & 0xff == META_IN_USE,
            owner: (w >> 8) as u8,
            flags_tx: (w >> 16) as u8,
            flags_rx: (w >> 24) as u8,
            state: (w >> 32) as u8,
        }
    }

    pub(crate) fn pack(&self) -> u64 {
        u64::from(self.in_use)
            | u64::from(self.owner) << 8
            | u64::from(self.flags_tx) << 16
            | u64::from(self.flags_rx) << 24
            | u64::from(self.state) << 32
    }
}

/// A consistent copy failed: the entry kept changing, or a writer died in
/// it and its stripe has not been repaired yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotBusy;

impl FlowSlot {
    pub(crate) fn get(&self, w: usize) -> u64 {
        self.words[w % SLOT_WORDS].load(Ordering::Relaxed)
    }

    pub(crate) fn set(&self, w: usize, v: u64) {
        self.words[w % SLOT_WORDS].store(v, Ordering::Relaxed);
    }

    pub(crate) fn key_words(&self) -> [u64; KEY_WORDS] {
        std::array::from_fn(|i| self.get(W_KEY + i))
    }

    pub(crate) fn meta(&self) -> Meta {
        Meta::unpack(self.get(W_META))
    }

    /// Open a write: readers that start now retry until `end_write`.
    /// Caller holds the stripe lock.
    pub(crate) fn begin_write(&self) {
        let seq = self.words[W_SEQ].load(Ordering::Relaxed);
        self.words[W_SEQ].store(seq | 1, Ordering::Relaxed);
        fence(Ordering::Release);
    }

    /// Close a write with a new even sequence number.
    pub(crate) fn end_write(&self) {
        let seq = self.words[W_SEQ].load(Ordering::Relaxed);
        self.words[W_SEQ].store((seq | 1).wrapping_add(1), Ordering::Release);
    }

    /// Copy every word as of one instant, without locking.
    pub(crate) fn read_consistent(&self) -> Result<[u64; SLOT_WORDS], SlotBusy> {
        for attempt in 0..READ_SPINS + READ_YIELDS {
            let before = self.words[W_SEQ].load(Ordering::Acquire);
            if before & 1 == 0 {
                let copy: [u64; SLOT_WORDS] = std::array::from_fn(|i| self.get(i));
                fence(Ordering::Acquire);
                if self.words[W_SEQ].load(Ordering::Relaxed) == before {
                    return Ok(copy);
                }
            }
            if attempt < READ_SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        Err(SlotBusy)
    }
}

/// Decode a consistent copy; `None` unless it is a valid in-use entry whose
/// check word matches its key under `seed` (garbage never passes).
pub(crate) fn decode(
    words: &[u64; SLOT_WORDS],
    seed: [u64; 2],
    at: SlotRef,
) -> Option<FlowSnapshot> {
    let meta = Meta::unpack(words[W_META]);
    if !meta.in_use || usize::from(meta.owner) >= MAX_QUEUE_PAIRS {
        return None;
    }
    let key_words: [u64; KEY_WORDS] = std::array::from_fn(|i| words[W_KEY + i]);
    let key = FlowKey::from_words(&key_words)?;
    if super::key::hash_words(&key_words, seed) != words[W_CHECK] {
        return None;
    }
    Some(FlowSnapshot {
        key,
        owner: meta.owner,
        tx_frames: words[W_TX_FRAMES],
        tx_bytes: words[W_TX_BYTES],
        rx_frames: words[W_RX_FRAMES],
        rx_bytes: words[W_RX_BYTES],
        first_seen_ns: words[W_FIRST_NS],
        last_seen_ns: words[W_LAST_NS],
        tcp_flags_tx: meta.flags_tx,
        tcp_flags_rx: meta.flags_rx,
        state: FlowState::from_u8(meta.state)?,
        at,
    })
}

pub(super) fn slot_ref(s: usize, i: usize) -> SlotRef {
    SlotRef {
        stripe: s as u32,
        slot: i as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        let m = Meta {
            in_use: true,
            owner: 15,
            flags_tx: 0x12,
            flags_rx: 0x11,
            state: 2,
        };
        assert_eq!(Meta::unpack(m.pack()), m);
    }
}
