//! The transmit queue: chains of the TX ring -> frames on the frame I/O.
//!
//! One run drains up to a budget of chains. Each chain is walked into host
//! iovecs (every descriptor device-readable, inside guest memory) and sent
//! with one `writev` straight from guest memory, except for the virtio-net
//! header: it is copied out once, checked against the negotiated offloads
//! and the frame ([`crate::tx_header`]), and the TAP (IFF_VNET_HDR) gets
//! that copy (a datagram socket, which carries no header, skips it). A
//! frame the socket's peer refuses (EMSGSIZE) or cannot take (gone) is
//! counted as such. A chain that is refused (bad descriptor, runt, oversized, a
//! malformed header) or that the frame I/O refuses is
//! still completed, with length 0, and counted: the guest gets its buffers
//! back and the queue goes on. Kicks are suppressed while draining and
//! re-armed at the end; the guest is interrupted at most once per run.
//!
//! If the frame I/O is full (`EAGAIN`, which a real TAP practically never
//! says; a unix datagram peer that reads slowly does), the chain is given back and the queue waits until the I/O is
//! writable again ([`TxState::Blocked`]), so no frame is lost to
//! back-pressure.

use log::warn;

use crate::chain::{walk_chain, Access};
use crate::counters::{LocalCounters, Tally};
use crate::datagram::PeerFault;
use crate::features::{ETH_HLEN, MAX_TX_FRAME};
use crate::iovecs::{IoVecBuf, IoVecs};
use crate::queue::{PathCtx, RingSlot};
use crate::ring::{Ring, RingFault};
use crate::tx_header::TxHeader;
use qpnet_shared::Direction;

/// How a TX run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOutcome {
    /// The ring is empty and kicks are armed.
    Idle,
    /// The budget ran out with chains left: run again soon.
    MoreWork,
    /// The frame I/O would block: run again when it is writable.
    Blocked,
}

/// What the TX queue waits for before its next run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxState {
    /// The guest's next kick: its kicks are armed (or the ring just started).
    Armed,
    /// Nothing: the budget ran out with chains left; run on the next turn.
    MoreWork,
    /// Room in the frame I/O: a frame was given back on `WouldBlock`.
    Blocked,
}

/// The TX queue of one queue pair: its ring, its path state and its
/// reusable iovec list.
#[derive(Debug)]
pub struct TxQueue {
    slot: RingSlot,
    state: TxState,
    iovecs: IoVecBuf,
    log: TxLog,
}

/// Rate-limited log lines of one TX queue.
#[derive(Debug)]
struct TxLog {
    queue_pair: u16,
    /// Chains refused so far.
    refusals: Tally,
    /// Frame I/O write errors so far.
    io_errors: Tally,
}

/// What became of one chain.
enum Sent {
    /// Done with it (sent or refused and counted): complete it.
    Done,
    /// The frame I/O would block: give it back.
    Blocked,
}

impl TxQueue {
    /// A TX queue for `queue_pair` (named in log lines), without a ring.
    pub fn new(queue_pair: u16) -> TxQueue {
        TxQueue {
            slot: RingSlot::default(),
            state: TxState::Armed,
            iovecs: IoVecBuf::new(),
            log: TxLog {
                queue_pair,
                refusals: Tally::default(),
                io_errors: Tally::default(),
            },
        }
    }

    /// The ring's slot.
    pub fn slot(&self) -> &RingSlot {
        &self.slot
    }

    /// The ring's slot, to record where a stopped ring stopped.
    pub fn slot_mut(&mut self) -> &mut RingSlot {
        &mut self.slot
    }

    /// What the queue waits for.
    pub fn state(&self) -> TxState {
        self.state
    }

    /// Whether the frame I/O must report when it is writable again.
    pub fn wants_writable(&self) -> bool {
        self.slot.is_running() && self.state == TxState::Blocked
    }

    /// Run `ring` from now on (returns the ring it replaces).
    pub fn install(&mut self, ring: Ring) -> Option<Ring> {
        self.state = TxState::Armed;
        self.slot.install(ring)
    }

    /// Remove the ring and forget its path state.
    pub fn take_ring(&mut self) -> Option<Ring> {
        self.state = TxState::Armed;
        self.slot.take()
    }

    /// The guest kicked: clear the kick eventfd.
    pub fn on_kick(&mut self, counters: &mut LocalCounters) {
        if self.slot.ring().is_some_and(Ring::drain_kick) {
            counters.tx_kicks += 1;
        }
    }

    /// The frame I/O is writable again.
    pub fn unblock(&mut self) {
        if self.state == TxState::Blocked {
            self.state = TxState::Armed;
        }
    }

    /// The frame I/O went away: nothing to wait for from it, nothing to
    /// resume on it (the next run, on a new one, starts afresh).
    pub fn forget_io(&mut self) {
        self.state = TxState::Armed;
    }

    /// Send up to `budget` chains to `ctx.io`, unless no ring runs or the
    /// queue waits for room (then `Ok(None)`: nothing ran).
    pub fn run(&mut self, ctx: PathCtx<'_>, budget: usize) -> Result<Option<TxOutcome>, RingFault> {
        let Some(ring) = self.slot.ring_mut() else {
            return Ok(None);
        };
        if self.state == TxState::Blocked {
            return Ok(None);
        }
        let mut run = TxRun {
            frame: self.iovecs.bind(ctx.mem),
            ring,
            ctx,
            log: &mut self.log,
        };
        let result = run.drain(budget);
        let outcome = run.ring.finish_run(run.ctx.mem, run.ctx.counters, result)?;
        self.state = match outcome {
            TxOutcome::Idle => TxState::Armed,
            TxOutcome::MoreWork => TxState::MoreWork,
            TxOutcome::Blocked => TxState::Blocked,
        };
        Ok(Some(outcome))
    }
}

/// One TX run: the ring, the iovec list of the frame being sent (borrowing
/// guest memory), and the rest of the queue pair.
struct TxRun<'a> {
    ring: &'a mut Ring,
    frame: IoVecs<'a>,
    ctx: PathCtx<'a>,
    log: &'a mut TxLog,
}

impl TxRun<'_> {
    /// Send chains until the ring is empty (kicks re-armed), the budget is
    /// spent or the frame I/O is full. Returns the outcome and the chains
    /// completed.
    fn drain(&mut self, budget: usize) -> Result<(TxOutcome, usize), RingFault> {
        let mem = self.ctx.mem;
        let mut moved = 0;
        loop {
            self.ring.suppress_kicks(mem)?;
            while moved < budget {
                let Some(head) = self.ring.pop(mem)? else {
                    break;
                };
                match self.send_chain(head) {
                    Sent::Done => self.ring.complete_frame(mem, [(head, 0)])?,
                    Sent::Blocked => {
                        self.ring.unpop(1);
                        return Ok((TxOutcome::Blocked, moved));
                    }
                }
                moved += 1;
            }
            if moved >= budget {
                return Ok((TxOutcome::MoreWork, moved));
            }
            if !self.ring.allow_kicks(mem)? {
                return Ok((TxOutcome::Idle, moved));
            }
        }
    }

    /// Walk, check and write one chain.
    fn send_chain(&mut self, head: u16) -> Sent {
        let ctx = &mut self.ctx;
        self.frame.clear();
        // On error, the head is still completed with len 0 by the caller, so
        // the guest does not see a descriptor leak.
        if let Err(e) = walk_chain(
            ctx.mem,
            self.ring.desc_table(),
            head,
            Access::DeviceReads,
            &mut self.frame,
        ) {
            ctx.counters.drop_bad_descriptor += 1;
            self.log.refused(head, format_args!("{e}"));
            return Sent::Done;
        }
        let total = self.frame.total();
        let header = u64::from(ctx.features.header_len);
        if total < header + u64::from(ETH_HLEN) {
            ctx.counters.drop_runt += 1;
            self.log.refused(
                head,
                format_args!("runt frame of {total} bytes ({header}-byte header)"),
            );
            return Sent::Done;
        }
        if total > header + u64::from(MAX_TX_FRAME) {
            ctx.counters.drop_too_large += 1;
            self.log
                .refused(head, format_args!("frame of {total} bytes is too large"));
            return Sent::Done;
        }
        // The runt check above guarantees the whole header is there.
        let Some(mut hdr) = TxHeader::read(&self.frame, header as usize) else {
            ctx.counters.drop_runt += 1;
            return Sent::Done;
        };
        if let Err(fault) = hdr.check(ctx.features.tx_offloads, total - header) {
            fault.count(ctx.counters);
            self.log.refused(head, format_args!("{fault}"));
            return Sent::Done;
        }
        // From here on the frame is our checked copy of the header, then the
        // guest's bytes after it: the kernel never reads the header from
        // guest memory, so the guest cannot change it after the check.
        self.frame.skip_bytes(header as usize);
        let io = ctx.io;
        let written = self
            .frame
            .with_prefix(hdr.bytes_mut(), |frame| {
                io.write_frame(frame, header as usize)
            })
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match written {
            Ok(_) => {
                ctx.counters.tx_frames += 1;
                ctx.counters.tx_bytes += total - header;
                let (frame, all) = (&self.frame, 0..self.frame.len());
                ctx.flows.note(Direction::Tx, total - header, |head| {
                    frame.read_at(all, 0, head)
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Sent::Blocked,
            Err(e) => {
                match PeerFault::of(&e) {
                    Some(PeerFault::Gone) => ctx.counters.peer_unreachable += 1,
                    Some(PeerFault::TooLarge) => ctx.counters.drop_peer_refused += 1,
                    None => ctx.counters.drop_tap_error += 1,
                }
                if let Some(n) = self.log.io_errors.note() {
                    warn!(
                        "qp{}: frame I/O write failed ({n} so far): {e}",
                        self.log.queue_pair
                    );
                }
            }
        }
        Sent::Done
    }
}

impl TxLog {
    fn refused(&mut self, head: u16, why: std::fmt::Arguments<'_>) {
        if let Some(n) = self.refusals.note() {
            warn!(
                "qp{}: TX chain {head} refused ({n} so far): {why}",
                self.queue_pair
            );
        }
    }
}

#[cfg(test)]
mod tests;
