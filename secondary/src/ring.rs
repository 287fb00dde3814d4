//! One virtqueue of the queue pair: a virtio-queue `Queue` with its kick and
//! call eventfds, and the notification rules around it.
//!
//! Theory of operation. The worker completes chains strictly in the order
//! the guest made them available, so between two batches `next_avail ==
//! next_used`: every chain before `next_avail` is in the used ring. That is
//! what StopRing reports and what a re-spawned worker resumes from. Inside a
//! batch a path may take chains and give them back ([`Ring::unpop`]) but it
//! never completes a later chain before an earlier one.
//!
//! The used ring is written here, not through virtio-queue: elements go
//! straight to guest memory and the used index is published once per batch
//! (or once at least [`PUBLISH_EVERY`] chains are waiting), which saves a
//! store to a cache line the guest polls for every frame. virtio-queue keeps
//! the avail side (taking heads, the avail-index sanity check, kick
//! suppression) and the ring validation.
//!
//! Frame boundaries. A frame is completed whole, by one
//! [`Ring::complete_frame`] call with every chain it used (one on TX; with
//! MRG_RXBUF up to `num_buffers` on RX). Its used elements are written
//! first and `next_used` moves past all of them only when all were written,
//! so `next_used` -- and with it every used index this ring ever publishes,
//! every position StopRing / GET_VRING_BASE reports and where a faulted ring
//! stopped -- is always at a frame boundary. The guest never sees a frame
//! whose `num_buffers` says N while fewer than N of its buffers are used,
//! and a worker killed at any instant leaves the published used index at a
//! boundary: resuming there (the crash hand-over reads it from guest memory)
//! is always safe, because no chain before it belongs to a frame still
//! being written and no chain after it is visible to the guest.
//!
//! Notifications. While a path is busy it suppresses kicks
//! ([`Ring::suppress_kicks`]); when it runs dry it re-arms them and re-checks
//! the avail index, so a buffer made available in between is never missed.
//! With EVENT_IDX the used ring's `avail_event` says after which entry the
//! guest should kick; [`Ring::arm_kick_after_current`] sets it to the
//! current avail index (used by RX when it gave buffers back and waits for
//! more). The guest is interrupted at most once per batch, and only when it
//! asked for it (`used_event` with EVENT_IDX, as in the virtio spec's
//! `vring_need_event`; `VRING_AVAIL_F_NO_INTERRUPT` without).
//!
//! Anything that makes the ring itself unusable (an avail index that jumped
//! past the ring size, a head index out of range, ring memory that cannot be
//! written) is a [`RingFault`]: the worker stops that ring, counts it
//! (`ring_faults`) and writes the ring's error eventfd once
//! ([`Ring::signal_error`]), when the VMM gave one (SET_VRING_ERR).

use std::num::Wrapping;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use qpnet_ipc::{RingConfig, RingFds};
use virtio_bindings::bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::chain::DescTable;
use crate::counters::LocalCounters;
use crate::guest_memory::GuestMemoryMap;

/// Why a ring could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Fewer fds than its configuration names came with StartRing (the
    /// control request's fds are checked before, so only a caller bug gets
    /// here).
    #[error("StartRing came without the eventfds its configuration names")]
    NoKick,
    /// The kick fd could not be made nonblocking.
    #[error("cannot make the kick eventfd nonblocking")]
    Nonblocking(#[source] nix::Error),
    /// Size or ring address refused by virtio-queue (power of two, alignment).
    #[error("ring configuration refused: {0}")]
    Config(virtio_queue::Error),
    /// The rings do not lie inside guest memory.
    #[error("ring addresses outside guest memory (desc {desc:#x}, avail {avail:#x}, used {used:#x}, size {size})")]
    OutsideMemory {
        /// Descriptor table address.
        desc: u64,
        /// Avail ring address.
        avail: u64,
        /// Used ring address.
        used: u64,
        /// Queue size.
        size: u16,
    },
}

/// A condition that makes a running ring unusable.
#[derive(Debug, thiserror::Error)]
pub enum RingFault {
    /// virtio-queue refused the ring (avail index jumped past the ring size,
    /// memory not accessible, ...).
    #[error("virtqueue error: {0}")]
    Queue(virtio_queue::Error),
    /// Ring memory could not be read or written.
    #[error("ring memory at {addr:#x} is not accessible")]
    Memory {
        /// Guest address of the access.
        addr: u64,
    },
    /// The avail ring holds a head index past the end of the table: it
    /// cannot even be completed.
    #[error("avail ring entry holds head index {head}, ring size is {size}")]
    HeadOutOfRange {
        /// The index.
        head: u16,
        /// The ring size.
        size: u16,
    },
}

/// A running virtqueue.
#[derive(Debug)]
pub struct Ring {
    queue: Queue,
    kick: OwnedFd,
    call: Option<OwnedFd>,
    /// The error eventfd (SET_VRING_ERR), written once when the ring faults.
    err: Option<OwnedFd>,
    /// Next used entry to fill (ours; the queue's copy is synced on publish).
    next_used: Wrapping<u16>,
    /// Used index last stored in guest memory.
    published_used: Wrapping<u16>,
    /// Used index at the last interrupt decision.
    signalled_used: Wrapping<u16>,
}

/// Completed chains after which the used index is published even in the
/// middle of a batch (after the frame that reaches it, never inside one), so
/// the guest can start on them early.
pub const PUBLISH_EVERY: u16 = 64;

impl Ring {
    /// Build a ring from its configuration and fds (kick, then call when
    /// `cfg.has_call`, then error when `cfg.has_err`: `RingConfig::split_fds`;
    /// checked with the request), checking the ring against `mem`.
    pub fn start(
        cfg: &RingConfig,
        event_idx: bool,
        fds: Vec<OwnedFd>,
        mem: &GuestMemoryMap,
    ) -> Result<Ring, StartError> {
        // Their number and kind were checked with the request
        // (`Request::check_fds`).
        let RingFds { kick, call, err } = cfg.split_fds(fds).ok_or(StartError::NoKick)?;
        set_nonblocking(&kick).map_err(StartError::Nonblocking)?;
        // A call or error eventfd the VMM never reads would block a write
        // once its counter is full; nonblocking, that write is dropped
        // instead. (The VMM shares the open file and could clear O_NONBLOCK
        // again; then only this queue pair can hang, and the primary's
        // watchdog replaces its worker.)
        for fd in call.iter().chain(err.iter()) {
            set_nonblocking(fd).map_err(StartError::Nonblocking)?;
        }
        let queue = build_queue(cfg, event_idx)?;
        if !queue.is_valid(mem.vm()) {
            return Err(StartError::OutsideMemory {
                desc: cfg.desc_table,
                avail: cfg.avail_ring,
                used: cfg.used_ring,
                size: cfg.size,
            });
        }
        let start = Wrapping(cfg.next_avail);
        Ok(Ring {
            queue,
            kick,
            call,
            err,
            next_used: start,
            published_used: start,
            signalled_used: start,
        })
    }

    /// The kick eventfd, for epoll.
    pub fn kick_fd(&self) -> BorrowedFd<'_> {
        self.kick.as_fd()
    }

    /// Index of the next avail entry to take.
    pub fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    /// Index of the next used entry to fill: always at a frame boundary.
    pub fn next_used(&self) -> u16 {
        self.next_used.0
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// The descriptor table, for the chain walker.
    pub fn desc_table(&self) -> DescTable {
        DescTable {
            addr: self.queue.desc_table(),
            size: self.queue.size(),
        }
    }

    /// Whether the ring still lies inside `mem` (after a memory swap).
    pub fn fits(&self, mem: &GuestMemoryMap) -> bool {
        self.queue.is_valid(mem.vm())
    }

    /// Switch EVENT_IDX on or off.
    pub fn set_event_idx(&mut self, on: bool) {
        self.queue.set_event_idx(on);
    }

    /// Take the head index of the next available chain, if any.
    pub fn pop(&mut self, mem: &GuestMemoryMap) -> Result<Option<u16>, RingFault> {
        let size = self.queue.size();
        let head = {
            let mut avail = self.queue.iter(mem.vm()).map_err(RingFault::Queue)?;
            match avail.next() {
                Some(chain) => chain.head_index(),
                None => return Ok(None),
            }
        };
        if head >= size {
            // Leave it in place: a stopped ring resumes before it.
            self.unpop(1);
            return Err(RingFault::HeadOutOfRange { head, size });
        }
        Ok(Some(head))
    }

    /// Give back the last `n` chains taken (they will be taken again).
    pub fn unpop(&mut self, n: u16) {
        let next = Wrapping(self.queue.next_avail()) - Wrapping(n);
        self.queue.set_next_avail(next.0);
    }

    /// Put the chains of one frame in the used ring: `(head, bytes written)`
    /// for each, in order. All of them become visible together: the used
    /// index moves past the whole frame or not at all (on a fault nothing of
    /// this frame counts as used). The used index is published at the end
    /// of the batch ([`Ring::signal_guest`]) or here, after this frame, once
    /// [`PUBLISH_EVERY`] chains are waiting.
    pub fn complete_frame(
        &mut self,
        mem: &GuestMemoryMap,
        chains: impl IntoIterator<Item = (u16, u32)>,
    ) -> Result<(), RingFault> {
        let size = self.queue.size();
        let mut at = self.next_used;
        for (head, len) in chains {
            if head >= size {
                return Err(RingFault::HeadOutOfRange { head, size });
            }
            let slot = u64::from(at.0 % size);
            let addr = self.used_ring_addr(4 + 8 * slot)?;
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            if !mem.write_bytes(addr.0, &elem) {
                return Err(RingFault::Memory { addr: addr.0 });
            }
            at += Wrapping(1);
        }
        // The frame boundary: only here does next_used move.
        self.next_used = at;
        if (self.next_used - self.published_used).0 >= PUBLISH_EVERY {
            self.publish_used(mem)?;
        }
        Ok(())
    }

    /// Store the used index in guest memory (after the elements: release).
    /// `next_used` is always at a frame boundary (see [`Ring::complete_frame`]).
    pub fn publish_used(&mut self, mem: &GuestMemoryMap) -> Result<(), RingFault> {
        if self.next_used == self.published_used {
            return Ok(());
        }
        let addr = self.used_ring_addr(2)?;
        mem.vm()
            .store(self.next_used.0.to_le(), addr, Ordering::Release)
            .map_err(|_| RingFault::Memory { addr: addr.0 })?;
        self.published_used = self.next_used;
        self.queue.set_next_used(self.next_used.0);
        Ok(())
    }

    /// Ask the guest not to kick (while we are busy anyway).
    pub fn suppress_kicks(&mut self, mem: &GuestMemoryMap) -> Result<(), RingFault> {
        self.queue
            .disable_notification(mem.vm())
            .map_err(RingFault::Queue)
    }

    /// Ask the guest to kick for anything past `next_avail`. Returns true
    /// when chains are already available (go on instead of waiting).
    pub fn allow_kicks(&mut self, mem: &GuestMemoryMap) -> Result<bool, RingFault> {
        self.queue
            .enable_notification(mem.vm())
            .map_err(RingFault::Queue)
    }

    /// Ask the guest to kick when it makes the next new chain available,
    /// even though chains before that were given back (RX waiting for more
    /// buffers). Returns true when a new chain arrived meanwhile.
    pub fn arm_kick_after_current(&mut self, mem: &GuestMemoryMap) -> Result<bool, RingFault> {
        let vm = mem.vm();
        let seen = self
            .queue
            .avail_idx(vm, Ordering::Acquire)
            .map_err(RingFault::Queue)?;
        if self.queue.event_idx_enabled() {
            let avail_event = self.used_ring_addr(4 + 8 * u64::from(self.queue.size()))?;
            vm.store(seen.0.to_le(), avail_event, Ordering::Relaxed)
                .map_err(|e| RingFault::Queue(virtio_queue::Error::GuestMemory(e)))?;
        } else {
            // Clears VRING_USED_F_NO_NOTIFY; its return value compares with
            // next_avail, which is not what we wait for here.
            self.allow_kicks(mem)?;
        }
        fence(Ordering::SeqCst);
        let now = self
            .queue
            .avail_idx(vm, Ordering::Acquire)
            .map_err(RingFault::Queue)?;
        Ok(now != seen)
    }

    /// Entries the guest has made available that are not used yet (taken
    /// by us or still waiting). When it equals the ring size the guest
    /// cannot add more.
    pub fn outstanding(&self, mem: &GuestMemoryMap) -> Result<u16, RingFault> {
        let avail = self
            .queue
            .avail_idx(mem.vm(), Ordering::Acquire)
            .map_err(RingFault::Queue)?;
        Ok((avail - self.next_used).0)
    }

    /// Publish the used index, then interrupt the guest if chains were
    /// completed since the last decision and the guest asked for it.
    /// Returns whether an interrupt was sent.
    pub fn signal_guest(&mut self, mem: &GuestMemoryMap) -> Result<bool, RingFault> {
        self.publish_used(mem)?;
        let old = self.signalled_used;
        if self.next_used == old {
            return Ok(false);
        }
        self.signalled_used = self.next_used;
        if !self.guest_wants_interrupt(mem, old)? {
            return Ok(false);
        }
        Ok(self.interrupt())
    }

    /// End a TX or RX run that moved `result`'s frames: publish the used
    /// index and signal the guest once (even when the ring broke, so it sees
    /// what was completed), and count the batch and the interrupt.
    pub fn finish_run<T>(
        &mut self,
        mem: &GuestMemoryMap,
        counters: &mut LocalCounters,
        result: Result<(T, usize), RingFault>,
    ) -> Result<T, RingFault> {
        let signalled = self.signal_guest(mem);
        let (outcome, moved) = result?;
        if moved > 0 {
            counters.batches += 1;
        }
        if signalled? {
            counters.interrupts += 1;
        }
        Ok(outcome)
    }

    /// Write the call eventfd unconditionally. Returns whether it was written.
    pub fn interrupt(&self) -> bool {
        let Some(call) = &self.call else {
            return false;
        };
        // EAGAIN means the counter is saturated: an interrupt is pending.
        nix::unistd::write(call, &1u64.to_ne_bytes()).is_ok()
    }

    /// Tell the VMM the guest made this ring unusable: write 1 to the error
    /// eventfd, if there is one. Never blocks; a saturated counter (EAGAIN:
    /// the VMM has not read the earlier ones) or any other failure is only
    /// logged. Returns whether it was written.
    pub fn signal_error(&self) -> bool {
        let Some(err) = &self.err else {
            return false;
        };
        match nix::unistd::write(err, &1u64.to_ne_bytes()) {
            Ok(_) => true,
            Err(e) => {
                log::warn!("ring error eventfd not written: {e}");
                false
            }
        }
    }

    /// Clear the kick eventfd. Returns whether it had been kicked.
    pub fn drain_kick(&self) -> bool {
        let mut buf = [0u8; 8];
        matches!(nix::unistd::read(&self.kick, &mut buf), Ok(8))
    }

    /// Whether the guest asked to be interrupted for the entries completed
    /// since used index `old` (EVENT_IDX: `used_event` lies in that span;
    /// otherwise: VRING_AVAIL_F_NO_INTERRUPT is clear).
    fn guest_wants_interrupt(
        &mut self,
        mem: &GuestMemoryMap,
        old: Wrapping<u16>,
    ) -> Result<bool, RingFault> {
        // The used index must be visible before we read the guest's wishes.
        fence(Ordering::SeqCst);
        let size = u64::from(self.queue.size());
        if self.queue.event_idx_enabled() {
            let addr = self.avail_ring_addr(4 + 2 * size)?;
            let used_event: u16 = mem
                .vm()
                .load(addr, Ordering::Relaxed)
                .map_err(|_| RingFault::Memory { addr: addr.0 })?;
            let new = self.next_used;
            let event = Wrapping(u16::from_le(used_event));
            return Ok(new - event - Wrapping(1) < new - old);
        }
        let addr = self.avail_ring_addr(0)?;
        let flags: u16 = mem
            .vm()
            .load(addr, Ordering::Relaxed)
            .map_err(|_| RingFault::Memory { addr: addr.0 })?;
        Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
    }

    fn avail_ring_addr(&self, offset: u64) -> Result<GuestAddress, RingFault> {
        self.queue
            .avail_ring()
            .checked_add(offset)
            .map(GuestAddress)
            .ok_or(RingFault::Queue(virtio_queue::Error::AddressOverflow))
    }

    fn used_ring_addr(&self, offset: u64) -> Result<GuestAddress, RingFault> {
        self.queue
            .used_ring()
            .checked_add(offset)
            .map(GuestAddress)
            .ok_or(RingFault::Queue(virtio_queue::Error::AddressOverflow))
    }
}

fn build_queue(cfg: &RingConfig, event_idx: bool) -> Result<Queue, StartError> {
    let mut queue = Queue::new(cfg.size).map_err(StartError::Config)?;
    queue.try_set_size(cfg.size).map_err(StartError::Config)?;
    queue
        .try_set_desc_table_address(GuestAddress(cfg.desc_table))
        .map_err(StartError::Config)?;
    queue
        .try_set_avail_ring_address(GuestAddress(cfg.avail_ring))
        .map_err(StartError::Config)?;
    queue
        .try_set_used_ring_address(GuestAddress(cfg.used_ring))
        .map_err(StartError::Config)?;
    queue.set_event_idx(event_idx);
    queue.set_next_avail(cfg.next_avail);
    queue.set_next_used(cfg.next_avail);
    queue.set_ready(true);
    Ok(queue)
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{desc, TestMemory, BUF_BASE, F_WRITE};

    fn take_and_complete(ring: &mut Ring, m: &TestMemory, n: usize) {
        for _ in 0..n {
            let head = ring.pop(&m.map).unwrap().expect("a chain");
            ring.complete_frame(&m.map, [(head, 0)]).unwrap();
        }
    }

    #[test]
    fn used_index_is_published_per_batch_and_every_64() {
        let m = TestMemory::new();
        let mut tr = m.ring(256);
        for _ in 0..100 {
            tr.add_chain(&[desc(BUF_BASE, 64, 0, 0)]);
        }
        let mut ring = tr.start(&m, false);
        take_and_complete(&mut ring, &m, 10);
        assert_eq!(tr.used_idx(), 0, "not yet published");
        take_and_complete(&mut ring, &m, 60);
        assert_eq!(tr.used_idx(), PUBLISH_EVERY);
        take_and_complete(&mut ring, &m, 30);
        assert!(ring.signal_guest(&m.map).unwrap());
        assert_eq!(tr.used_idx(), 100);
        assert_eq!(tr.used().len(), 100);
        assert!(
            !ring.signal_guest(&m.map).unwrap(),
            "nothing new: no interrupt"
        );
    }

    #[test]
    fn a_frame_is_published_whole_even_across_the_publish_threshold() {
        let m = TestMemory::new();
        let mut tr = m.ring(256);
        for _ in 0..70 {
            tr.add_chain(&[desc(BUF_BASE, 64, F_WRITE, 0)]);
        }
        let mut ring = tr.start(&m, false);
        take_and_complete(&mut ring, &m, 60);
        assert_eq!(tr.used_idx(), 0);
        // One frame of 8 chains: 60..68 straddles PUBLISH_EVERY (64).
        let heads: Vec<u16> = (0..8).map(|_| ring.pop(&m.map).unwrap().unwrap()).collect();
        ring.complete_frame(&m.map, heads.iter().map(|&h| (h, 64)))
            .unwrap();
        assert_eq!(tr.used_idx(), 68, "published after the whole frame");
        assert_eq!(ring.next_used(), 68);
    }

    #[test]
    fn a_frame_that_faults_halfway_leaves_the_used_index_at_its_start() {
        let m = TestMemory::new();
        let mut tr = m.ring(16);
        for _ in 0..4 {
            tr.add_chain(&[desc(BUF_BASE, 64, F_WRITE, 0)]);
        }
        let mut ring = tr.start(&m, false);
        take_and_complete(&mut ring, &m, 1);
        let a = ring.pop(&m.map).unwrap().unwrap();
        let err = ring
            .complete_frame(&m.map, [(a, 64), (16, 64)])
            .unwrap_err();
        assert!(matches!(err, RingFault::HeadOutOfRange { head: 16, .. }));
        assert_eq!(ring.next_used(), 1, "nothing of the broken frame is used");
        assert!(ring.signal_guest(&m.map).unwrap());
        assert_eq!(tr.used_idx(), 1);
    }

    #[test]
    fn event_idx_interrupts_only_when_used_event_is_crossed() {
        let m = TestMemory::new();
        let mut tr = m.ring(16);
        for _ in 0..6 {
            tr.add_chain(&[desc(BUF_BASE, 64, 0, 0)]);
        }
        let mut ring = tr.start(&m, true);
        tr.set_used_event(3); // interrupt when entry 3 is used
        take_and_complete(&mut ring, &m, 2);
        assert!(!ring.signal_guest(&m.map).unwrap());
        assert!(!tr.interrupted());
        take_and_complete(&mut ring, &m, 2); // entries 2 and 3
        assert!(ring.signal_guest(&m.map).unwrap());
        assert!(tr.interrupted());
        take_and_complete(&mut ring, &m, 1); // entry 4: past the event
        assert!(!ring.signal_guest(&m.map).unwrap());
    }

    #[test]
    fn no_interrupt_flag_is_honoured_without_event_idx() {
        let m = TestMemory::new();
        let mut tr = m.ring(16);
        for _ in 0..2 {
            tr.add_chain(&[desc(BUF_BASE, 64, 0, 0)]);
        }
        let mut ring = tr.start(&m, false);
        tr.set_avail_flags(1);
        take_and_complete(&mut ring, &m, 1);
        assert!(!ring.signal_guest(&m.map).unwrap());
        tr.set_avail_flags(0);
        take_and_complete(&mut ring, &m, 1);
        assert!(ring.signal_guest(&m.map).unwrap());
        assert_eq!(tr.used_idx(), 2);
    }

    #[test]
    fn kicks_are_armed_after_the_current_avail_index() {
        let m = TestMemory::new();
        let mut tr = m.ring(16);
        for _ in 0..3 {
            tr.add_chain(&[desc(BUF_BASE, 64, 0, 0)]);
        }
        let mut ring = tr.start(&m, true);
        assert!(!ring.arm_kick_after_current(&m.map).unwrap());
        // avail_event (after the used ring's entries) is the avail index.
        assert_eq!(tr.avail_event(), 3);
        assert_eq!(ring.next_avail(), 0, "chains stay available");
    }
}
