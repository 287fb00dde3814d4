//! What the TX and RX queues have in common: the slot their ring lives in,
//! and what one run borrows from the queue pair.
//!
//! A queue owns its ring ([`RingSlot`]): the running [`Ring`], or, once the
//! worker stopped it itself (a ring fault, a memory table the ring no longer
//! fits), the position it stopped at, which the next StopRing reports so the
//! primary resumes the ring exactly there. A run of either queue borrows the
//! rest of the queue pair in one [`PathCtx`]: guest memory, the frame I/O,
//! the negotiated features, the counters and the flow tracker. Building it is
//! a handful of pointer copies per run, not per frame.

use crate::counters::LocalCounters;
use crate::features::NetFeatures;
use crate::flows::FlowTracker;
use crate::frame_io::FrameIo;
use crate::guest_memory::GuestMemoryMap;
use crate::ring::Ring;

/// A queue's ring: running, stopped by the worker at a position, or absent.
#[derive(Debug, Default)]
pub struct RingSlot {
    ring: Option<Ring>,
    /// Set when the worker stopped the ring itself: what StopRing reports.
    stopped_at: Option<u16>,
}

impl RingSlot {
    /// The running ring.
    pub fn ring(&self) -> Option<&Ring> {
        self.ring.as_ref()
    }

    /// The running ring, to run it.
    pub fn ring_mut(&mut self) -> Option<&mut Ring> {
        self.ring.as_mut()
    }

    /// Whether a ring runs.
    pub fn is_running(&self) -> bool {
        self.ring.is_some()
    }

    /// Run `ring` from now on; returns the ring it replaces.
    pub fn install(&mut self, ring: Ring) -> Option<Ring> {
        self.stopped_at = None;
        self.ring.replace(ring)
    }

    /// Remove the running ring (the caller deregisters and drops it).
    pub fn take(&mut self) -> Option<Ring> {
        self.ring.take()
    }

    /// Remember where a ring the worker stopped itself stopped.
    pub fn note_stopped_at(&mut self, at: u16) {
        self.stopped_at = Some(at);
    }

    /// Where the ring stopped, once (for StopRing).
    pub fn take_stopped_at(&mut self) -> Option<u16> {
        self.stopped_at.take()
    }
}

/// Everything a TX or RX run uses besides its own queue, borrowed from the
/// queue pair for that run.
pub struct PathCtx<'a> {
    /// Guest memory: rings, descriptors and buffers.
    pub mem: &'a GuestMemoryMap,
    /// Where frames go to and come from (the TAP today).
    pub io: &'a dyn FrameIo,
    /// What the driver negotiated.
    pub features: &'a NetFeatures,
    /// This queue pair's counters.
    pub counters: &'a mut LocalCounters,
    /// This queue pair's flow tracking.
    pub flows: &'a mut FlowTracker,
}
