//! Taking guest buffers for the next frames of an RX run, and giving back
//! the ones no frame used.
//!
//! The chains taken in a run sit in one iovec list, in ring order; [`Taken`]
//! records where each chain's entries end and how much it holds. Chains
//! before `first` were used by delivered frames (completed in the used ring);
//! the rest are pending, held for the next frame. [`RxRun::gather`] takes
//! chains until the pending ones hold `need` bytes, refusing bad chains when
//! they are first in line (completed with length 0, counted) and stopping
//! short of one that is not (it must not overtake the chains before it).
//! [`Buffers::give_back`] rewinds the ring over every pending chain, so
//! between runs no chain is taken.

use std::ops::Range;

use crate::chain::{walk_chain, Access, ChainError};
use crate::guest_memory::TranslateError;
use crate::iovecs::IoVecs;
use crate::ring::{Ring, RingFault};

use super::RxRun;

/// One chain taken from the ring.
#[derive(Debug, Clone, Copy)]
pub(super) struct Taken {
    pub(super) head: u16,
    pub(super) capacity: u64,
    /// Index in the iovec list just after this chain's entries.
    pub(super) end: usize,
}

/// State of the buffers taken for the next frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gather {
    /// Enough for the frame (one chain without MRG_RXBUF).
    Ready,
    /// Some, but not enough, and the ring has no more now.
    Short,
    /// Some, not enough, and the next chain cannot join them now (a bad
    /// chain waiting its turn, or the iovec limit).
    Blocked,
    /// None at all.
    Empty,
}

/// Why an RX chain was refused.
#[derive(Debug, Clone, Copy, thiserror::Error)]
enum Refusal {
    /// The chain itself is bad.
    #[error(transparent)]
    Chain(ChainError),
    /// Too short to hold even the virtio-net header.
    #[error("buffer of {capacity} bytes is shorter than the {header}-byte header")]
    ShorterThanHeader { capacity: u64, header: u64 },
}

/// The chains an RX run has taken, over the iovec list of their buffers.
pub(super) struct Buffers<'a> {
    /// Every taken chain's buffers, in ring order.
    pub(super) iov: IoVecs<'a>,
    taken: &'a mut Vec<Taken>,
    /// First entry of `taken` not used by a frame yet.
    first: usize,
    /// Capacity of `taken[first..]`.
    capacity: u64,
}

impl<'a> Buffers<'a> {
    /// No chain taken yet; `taken` is the queue's reusable list.
    pub(super) fn new(iov: IoVecs<'a>, taken: &'a mut Vec<Taken>) -> Buffers<'a> {
        taken.clear();
        Buffers {
            iov,
            taken,
            first: 0,
            capacity: 0,
        }
    }

    /// Bytes the pending chains hold.
    pub(super) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The iovec entries of the pending chains.
    pub(super) fn pending_iovecs(&self) -> Range<usize> {
        self.first_iovec()..self.iov.len()
    }

    /// The iovec entries of the first pending chain (where the header goes).
    pub(super) fn first_chain_iovecs(&self) -> Range<usize> {
        self.first_iovec()..self.taken[self.first].end
    }

    /// How many of the pending chains a frame of `n` bytes fills (at least
    /// 1).
    pub(super) fn chains_for(&self, n: u64) -> usize {
        let mut left = n;
        let mut used = 0;
        for t in &self.taken[self.first..] {
            used += 1;
            left = left.saturating_sub(t.capacity);
            if left == 0 {
                break;
            }
        }
        used.max(1)
    }

    /// `(head, bytes written)` of the first `used` pending chains, filled in
    /// order by a frame of `n` bytes.
    pub(super) fn frame_chains(
        &self,
        used: usize,
        n: u64,
    ) -> impl Iterator<Item = (u16, u32)> + '_ {
        let mut left = n;
        self.taken[self.first..self.first + used]
            .iter()
            .map(move |t| {
                let len = left.min(t.capacity);
                left -= len;
                // len <= n, the length of one frame.
                (t.head, len as u32)
            })
    }

    /// The first `used` pending chains now belong to a completed frame.
    pub(super) fn consume(&mut self, used: usize) {
        let frame = &self.taken[self.first..self.first + used];
        self.capacity -= frame.iter().map(|t| t.capacity).sum::<u64>();
        self.first += used;
    }

    /// Give every pending chain back to the ring.
    pub(super) fn give_back(&mut self, ring: &mut Ring) {
        let left = self.taken.len() - self.first;
        // At most one chain per ring entry, so it fits in a u16.
        ring.unpop(left as u16);
        self.taken.clear();
        self.first = 0;
        self.capacity = 0;
        self.iov.clear();
    }

    fn pending(&self) -> usize {
        self.taken.len() - self.first
    }

    fn first_iovec(&self) -> usize {
        match self.first {
            0 => 0,
            i => self.taken[i - 1].end,
        }
    }

    /// Forget the chains already used, keeping the pending ones.
    fn compact(&mut self) {
        if self.first == 0 {
            return;
        }
        let cut = self.first_iovec();
        self.iov.remove_front(cut);
        self.taken.drain(..self.first);
        for t in self.taken.iter_mut() {
            t.end -= cut;
        }
        self.first = 0;
    }
}

impl RxRun<'_> {
    /// Take chains until `need` bytes fit (at least one chain; exactly one
    /// without MRG_RXBUF, where `need` is 0).
    pub(super) fn gather(&mut self, need: u64) -> Result<Gather, RingFault> {
        let mem = self.ctx.mem;
        self.bufs.compact();
        let header = u64::from(self.ctx.features.header_len);
        loop {
            let pending = self.bufs.pending();
            if pending > 0 && self.bufs.capacity >= need {
                return Ok(Gather::Ready);
            }
            let Some(head) = self.ring.pop(mem)? else {
                return Ok(if pending == 0 {
                    Gather::Empty
                } else {
                    Gather::Short
                });
            };
            let start = self.bufs.iov.len();
            let before = self.bufs.iov.total();
            let walked = walk_chain(
                mem,
                self.ring.desc_table(),
                head,
                Access::DeviceWrites,
                &mut self.bufs.iov,
            );
            let capacity = self.bufs.iov.total() - before;
            let refusal = match walked {
                Ok(()) if capacity >= header => None,
                Ok(()) => Some(Refusal::ShorterThanHeader { capacity, header }),
                Err(ChainError::Buffer(TranslateError::TooManySegments(_))) if pending > 0 => {
                    // Not this chain's fault: the frame's list is full.
                    self.bufs.iov.truncate(start);
                    self.ring.unpop(1);
                    return Ok(Gather::Blocked);
                }
                Err(e) => Some(Refusal::Chain(e)),
            };
            let Some(why) = refusal else {
                let end = self.bufs.iov.len();
                self.bufs.taken.push(Taken {
                    head,
                    capacity,
                    end,
                });
                self.bufs.capacity += capacity;
                continue;
            };
            self.bufs.iov.truncate(start);
            if pending > 0 {
                // Completing it now would overtake the chains still taken.
                self.ring.unpop(1);
                return Ok(Gather::Blocked);
            }
            // Completed with len 0 so the guest does not see a descriptor leak.
            self.ctx.counters.drop_bad_descriptor += 1;
            self.log.refused(head, why);
            self.ring.complete_frame(mem, [(head, 0)])?;
        }
    }
}
