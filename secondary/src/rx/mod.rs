//! The receive queue: frames from the frame I/O -> chains of the RX ring.
//!
//! Theory of operation. For each frame the path first takes enough guest
//! buffers, then reads the frame with one `readv` straight into them (the
//! TAP writes the virtio-net header itself, a datagram socket's frame I/O
//! writes a zero one; we only fill in `num_buffers`).
//! The frame's size is unknown before the read, so buffers are taken for
//! the largest frame the frame I/O may deliver:
//!
//! - without MRG_RXBUF, one chain per frame (the guest sized it);
//! - with MRG_RXBUF, chains until their capacity covers header +
//!   `max_rx_frame`. A frame uses as many of them as it fills; the rest stay
//!   taken for the next frame of the same run, so each chain is walked once
//!   per run, not once per frame. At the end of a run every chain still
//!   taken is given back (`next_avail` rewound), so between runs
//!   `next_avail == next_used`.
//!
//! Chains are completed strictly in order, and all the chains of one frame
//! together (`Ring::complete_frame`): the guest never sees a used index
//! inside a frame. A bad chain (wrong direction, outside memory, shorter than
//! the header, ...) found while earlier chains are still taken is given back
//! and refused later, when it is first in line; refused chains are completed
//! with length 0 and counted.
//!
//! Short of buffers (MRG_RXBUF only). When the ring holds less than the
//! largest frame, the path does not wait blindly (the frame may be small)
//! and does not gamble either (a cut frame would be lost): it reads that one
//! frame into a private buffer, then copies it into the chains if they are
//! enough. Otherwise it holds the frame, gives the chains back, asks the
//! guest to kick on its next new buffer and reports [`RxOutcome::Starved`];
//! the held frame is delivered first once buffers arrive. If the guest has
//! already made its whole ring available and the frame still does not fit,
//! the frame is dropped and counted as too large. Only this rare case
//! copies.
//!
//! Out of buffers. When the ring is empty, the path asks the guest to kick
//! on its next new buffer and reports [`RxOutcome::Starved`]: the queue
//! enters [`RxState::Starved`] and stops reading the frame I/O (frames wait
//! in the kernel's queue, none is read and dropped) until that kick
//! ([`RxQueue::on_kick`]).
//!
//! The frame I/O reports a frame's full length even when the buffers were
//! shorter (a TAP does, a socket is read with `MSG_TRUNC`):
//! `n > capacity` means the frame was cut, so it is dropped and counted, and
//! the buffers are reused for the next frame.
//!
//! The code follows those concerns: `buffers.rs` takes and gives back guest
//! buffers, `deliver.rs` reads a frame into them and completes it, and
//! `bounce.rs` is the short-of-buffers path; this file holds the queue and
//! the run loop that chooses between them.

mod bounce;
mod buffers;
mod deliver;

use log::warn;

use crate::counters::{LocalCounters, Tally};
use crate::guest_memory::GuestMemoryMap;
use crate::iovecs::IoVecBuf;
use crate::queue::{PathCtx, RingSlot};
use crate::ring::{Ring, RingFault};

use bounce::Bounce;
use buffers::{Buffers, Gather, Taken};

/// How an RX run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// The frame I/O has no frame left.
    Drained,
    /// The budget ran out: the frame I/O may hold more frames.
    MoreWork,
    /// Not enough guest buffers: kicks are armed, stop reading the frame I/O
    /// until the next RX kick. `frames_waiting` says whether a frame waited.
    Starved {
        /// Whether a frame was waiting (in the frame I/O or held).
        frames_waiting: bool,
    },
    /// Reading the frame I/O failed (counted).
    IoError,
}

/// What the RX queue does between runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// Reads frames whenever the frame I/O has some (kicks suppressed).
    Running,
    /// Out of guest buffers: kicks armed, the frame I/O not read until the
    /// guest's next kick.
    Starved,
}

/// What became of one read.
enum Received {
    /// A frame was delivered or dropped (counted).
    Frame,
    /// A frame was read into the bounce buffer and is held.
    Bounced,
    /// The frame I/O was empty.
    Empty,
    /// The read failed (counted).
    Failed,
}

/// The RX queue of one queue pair: its ring, its path state, a frame it may
/// hold, and its reusable lists.
#[derive(Debug)]
pub struct RxQueue {
    slot: RingSlot,
    state: RxState,
    iovecs: IoVecBuf,
    /// The chains a run has taken (empty between runs; kept for its
    /// allocation).
    taken: Vec<Taken>,
    bounce: Bounce,
    log: RxLog,
}

/// Rate-limited log lines of one RX queue.
#[derive(Debug)]
struct RxLog {
    queue_pair: u16,
    /// Chains refused so far.
    refusals: Tally,
    /// Frames dropped so far.
    drops: Tally,
}

impl RxQueue {
    /// An RX queue for `queue_pair` (named in log lines), without a ring.
    pub fn new(queue_pair: u16) -> RxQueue {
        RxQueue {
            slot: RingSlot::default(),
            state: RxState::Running,
            iovecs: IoVecBuf::new(),
            taken: Vec::with_capacity(64),
            bounce: Bounce::default(),
            log: RxLog {
                queue_pair,
                refusals: Tally::default(),
                drops: Tally::default(),
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

    /// What the queue does between runs.
    #[cfg(test)]
    pub fn state(&self) -> RxState {
        self.state
    }

    /// Whether the frame I/O should report frames: a ring runs and has
    /// buffers (while starved, frames wait in the kernel).
    pub fn wants_readable(&self) -> bool {
        self.slot.is_running() && self.state == RxState::Running
    }

    /// Run `ring` from now on (returns the ring it replaces); a frame held
    /// for the old ring is dropped.
    pub fn install(&mut self, ring: Ring) -> Option<Ring> {
        self.state = RxState::Running;
        self.bounce.reset();
        self.slot.install(ring)
    }

    /// Remove the ring and forget its path state (and a held frame).
    pub fn take_ring(&mut self) -> Option<Ring> {
        self.state = RxState::Running;
        self.bounce.reset();
        self.slot.take()
    }

    /// The guest kicked: clear the kick eventfd, and if the queue was
    /// starved, run again with kicks suppressed (busy again: the guest need
    /// not kick for every buffer).
    pub fn on_kick(
        &mut self,
        mem: Option<&GuestMemoryMap>,
        counters: &mut LocalCounters,
    ) -> Result<(), RingFault> {
        let Some(ring) = self.slot.ring_mut() else {
            return Ok(());
        };
        if ring.drain_kick() {
            counters.rx_kicks += 1;
        }
        if self.state != RxState::Starved {
            return Ok(());
        }
        self.state = RxState::Running;
        match mem {
            Some(mem) => ring.suppress_kicks(mem),
            None => Ok(()),
        }
    }

    /// Before a run that no kick asked for (after a control request): a
    /// running, unstarved ring gets its kicks suppressed. Returns whether
    /// the queue can run.
    pub fn prepare_unkicked_run(
        &mut self,
        mem: Option<&GuestMemoryMap>,
    ) -> Result<bool, RingFault> {
        let Some(ring) = self.slot.ring_mut() else {
            return Ok(false);
        };
        if self.state == RxState::Starved {
            return Ok(false);
        }
        if let Some(mem) = mem {
            ring.suppress_kicks(mem)?;
        }
        Ok(true)
    }

    /// Move up to `budget` frames from `ctx.io` into the ring, unless no ring
    /// runs or the queue is starved (then `Ok(None)`: nothing ran).
    pub fn run(&mut self, ctx: PathCtx<'_>, budget: usize) -> Result<Option<RxOutcome>, RingFault> {
        let Some(ring) = self.slot.ring_mut() else {
            return Ok(None);
        };
        if self.state == RxState::Starved {
            return Ok(None);
        }
        let mut run = RxRun {
            bufs: Buffers::new(self.iovecs.bind(ctx.mem), &mut self.taken),
            ring,
            ctx,
            bounce: &mut self.bounce,
            log: &mut self.log,
        };
        let result = run.receive_frames(budget);
        run.bufs.give_back(run.ring);
        let counters = &mut *run.ctx.counters;
        let outcome = run.ring.finish_run(run.ctx.mem, counters, result)?;
        if let RxOutcome::Starved { frames_waiting } = outcome {
            self.state = RxState::Starved;
            if frames_waiting {
                counters.rx_no_buffer += 1;
            }
        }
        Ok(Some(outcome))
    }

    /// Whether a frame read earlier still waits for guest buffers.
    #[cfg(test)]
    pub fn holds_frame(&self) -> bool {
        self.bounce.held().is_some()
    }
}

/// One RX run: the ring, the buffers taken from it (borrowing guest memory),
/// the held frame, and the rest of the queue pair.
struct RxRun<'a> {
    ring: &'a mut Ring,
    ctx: PathCtx<'a>,
    bufs: Buffers<'a>,
    bounce: &'a mut Bounce,
    log: &'a mut RxLog,
}

impl RxRun<'_> {
    /// Deliver frames until the frame I/O is empty, the budget is spent or
    /// the guest's buffers ran out. Returns the outcome and the frames
    /// moved (delivered or dropped).
    fn receive_frames(&mut self, budget: usize) -> Result<(RxOutcome, usize), RingFault> {
        let features = *self.ctx.features;
        let mem = self.ctx.mem;
        let mut moved = 0;
        let mut rearms = 0;
        while moved < budget {
            let need = match self.bounce.held() {
                Some(len) => len as u64,
                None if features.mergeable_rx => features.rx_frame_capacity(),
                None => 0,
            };
            let buffers = self.gather(need)?;
            let received = match (buffers, self.bounce.held()) {
                (Gather::Ready, None) => self.receive_one()?,
                (Gather::Ready, Some(len)) => self.deliver_held(len)?,
                (Gather::Short | Gather::Blocked, None) => self.read_bounce(),
                (Gather::Blocked, Some(_)) => {
                    self.drop_held("a bad chain blocks the buffers it needs");
                    Received::Frame
                }
                (Gather::Short, Some(_)) if self.ring.outstanding(mem)? >= self.ring.size() => {
                    self.drop_held("the whole ring is too small for it");
                    Received::Frame
                }
                (Gather::Short | Gather::Empty, _) => {
                    // Hold nothing while idle, then ask for a kick.
                    self.bufs.give_back(self.ring);
                    if self.ring.arm_kick_after_current(mem)? {
                        // Buffers arrived meanwhile: go on, quietly.
                        self.ring.suppress_kicks(mem)?;
                        rearms += 1;
                        if rearms > budget {
                            return Ok((RxOutcome::MoreWork, moved));
                        }
                        continue;
                    }
                    let frames_waiting = self.bounce.held().is_some() || self.ctx.io.has_frame();
                    return Ok((RxOutcome::Starved { frames_waiting }, moved));
                }
            };
            match received {
                Received::Frame => moved += 1,
                Received::Bounced => {}
                Received::Empty => return Ok((RxOutcome::Drained, moved)),
                Received::Failed => return Ok((RxOutcome::IoError, moved)),
            }
        }
        Ok((RxOutcome::MoreWork, moved))
    }
}

impl RxLog {
    fn dropped(&mut self, why: std::fmt::Arguments<'_>) {
        if let Some(n) = self.drops.note() {
            warn!(
                "qp{}: RX frame dropped ({n} so far): {why}",
                self.queue_pair
            );
        }
    }

    fn refused(&mut self, head: u16, why: impl std::fmt::Display) {
        if let Some(n) = self.refusals.note() {
            warn!(
                "qp{}: RX chain {head} refused ({n} so far): {why}",
                self.queue_pair
            );
        }
    }
}

#[cfg(test)]
mod boundary_tests;
#[cfg(test)]
mod tests;
