//! One queue pair, the unit of work of a worker: its TX and RX queues (each
//! with its ring and path state), the frame I/O they share, guest memory,
//! the negotiated features, counters, flow tracking, and where the counters
//! are published.
//!
//! As cloud-hypervisor's `NetQueuePair`, the struct owns everything a frame
//! touches on its way, so a run is `run_tx()` / `run_rx()` with nothing to
//! pass but the worker's epoll set ([`Events`]), which the queue pair keeps
//! in step with the fds it owns: a ring's kick eventfd is registered while
//! the ring runs and taken out before the ring (and its fd) is dropped, and
//! the frame I/O is watched for exactly what its queues wait for (readable
//! while the RX queue has buffers, writable while TX is blocked).
//!
//! A ring that faults is stopped here, never in the middle of a frame: its
//! position (always at a frame boundary, see ring.rs) is kept for the next
//! StopRing, the guest is interrupted once so it sees what was completed,
//! and the fault is counted (`ring_faults`) and signalled once on the ring's
//! error eventfd, when the VMM gave one (SET_VRING_ERR).

use log::{error, info, warn};
use qpnet_ipc::{RingConfig, RingKind};
use qpnet_shared::SharedRegion;

use crate::counters::{LocalCounters, StatsHome, Tally};
use crate::datagram::PeerFault;
use crate::events::Events;
use crate::features::NetFeatures;
use crate::flows::FlowTracker;
use crate::frame_io::FrameIo;
use crate::guest_memory::GuestMemoryMap;
use crate::queue::{PathCtx, RingSlot};
use crate::ring::{Ring, RingFault};
use crate::rx::RxQueue;
use crate::tx::{TxQueue, TxState};

/// Chains (TX) or frames (RX) handled per run before other work gets a turn.
pub const BUDGET: usize = 256;

/// A queue pair: two queues over one frame I/O.
pub struct QueuePair {
    index: u16,
    tx: TxQueue,
    rx: RxQueue,
    common: Common,
    /// Peer errors taken from an error event, for rate-limited logging.
    peer_errors: Tally,
}

/// The parts of the queue pair both queues use.
struct Common {
    features: NetFeatures,
    memory: Option<GuestMemoryMap>,
    io: Option<Box<dyn FrameIo>>,
    /// The frame I/O's connection ended and its fd is no longer watched
    /// (it stays, dropping and counting TX frames, until a new one comes).
    io_ended: bool,
    counters: LocalCounters,
    flows: FlowTracker,
    stats: StatsHome,
}

impl Common {
    /// What a run borrows, once memory and the frame I/O are there.
    fn ctx(&mut self) -> Option<PathCtx<'_>> {
        Some(PathCtx {
            mem: self.memory.as_ref()?,
            io: self.io.as_deref()?,
            features: &self.features,
            counters: &mut self.counters,
            flows: &mut self.flows,
        })
    }
}

impl QueuePair {
    /// Queue pair `index`, with nothing attached yet.
    pub fn new(index: u16) -> QueuePair {
        QueuePair {
            index,
            tx: TxQueue::new(index),
            rx: RxQueue::new(index),
            peer_errors: Tally::default(),
            common: Common {
                features: NetFeatures::default(),
                memory: None,
                io: None,
                io_ended: false,
                counters: LocalCounters::default(),
                flows: FlowTracker::new(index, false),
                stats: StatsHome::private(),
            },
        }
    }

    /// Its number.
    pub fn index(&self) -> u16 {
        self.index
    }

    // ---- set-up, from control requests ---------------------------------

    /// Use what the driver negotiated from now on (the running rings too).
    pub fn set_features(&mut self, f: NetFeatures) {
        for ring in [self.rx.slot_mut(), self.tx.slot_mut()]
            .into_iter()
            .filter_map(RingSlot::ring_mut)
        {
            ring.set_event_idx(f.event_idx);
        }
        self.common.features = f;
    }

    /// Turn flow tracking on or off.
    pub fn set_flow_tracking(&mut self, on: bool) {
        self.common.flows.set_enabled(self.index, on);
    }

    /// Publish counters and the heartbeat into `region` from now on (what
    /// was counted so far goes to the old home first).
    pub fn attach_stats(&mut self, region: SharedRegion) -> Result<(), String> {
        self.publish();
        self.common
            .stats
            .use_shared(region, usize::from(self.index))
    }

    /// Install a new memory map (`None`: guest memory unmapped). Running
    /// rings keep their position if they still fit, and are stopped
    /// otherwise; returns those, with where they stopped.
    pub fn set_memory(
        &mut self,
        mem: Option<GuestMemoryMap>,
        events: &mut Events,
    ) -> Vec<(RingKind, u16)> {
        let mut stopped = Vec::new();
        for kind in [RingKind::Rx, RingKind::Tx] {
            let fits = match (self.slot(kind).ring(), &mem) {
                (Some(ring), Some(mem)) => ring.fits(mem),
                (Some(_), None) => false,
                (None, _) => true,
            };
            if fits {
                continue;
            }
            if let Some(ring) = self.take_ring(kind, events) {
                let at = ring.next_used();
                self.slot_mut(kind).note_stopped_at(at);
                stopped.push((kind, at));
            }
        }
        self.common.memory = mem;
        stopped
    }

    /// Move frames through `io` from now on (replacing the previous one).
    pub fn attach_io(&mut self, io: Box<dyn FrameIo>, events: &mut Events) -> Result<(), String> {
        self.detach_io("replaced", events);
        events
            .add_io(io.as_ref())
            .map_err(|e| format!("epoll add TAP: {e}"))?;
        self.common.io = Some(io);
        self.common.io_ended = false;
        self.update_interest(events);
        Ok(())
    }

    /// Where a stream frame I/O publishes its framing state.
    pub fn sync_word(&self) -> crate::stream::SyncWord {
        self.common.stats.sync_word()
    }

    /// Start a ring (replacing one of its kind that runs). Refused before
    /// the memory table, or when the ring does not fit it.
    pub fn start_ring(
        &mut self,
        cfg: &RingConfig,
        fds: Vec<std::os::fd::OwnedFd>,
        events: &mut Events,
    ) -> Result<(), String> {
        let kind = cfg.kind;
        let Some(mem) = &self.common.memory else {
            return Err(format!("{kind:?} ring started before the memory table"));
        };
        let ring = Ring::start(cfg, self.common.features.event_idx, fds, mem)
            .map_err(|e| format!("{kind:?} ring refused: {e}"))?;
        if let Some(old) = self.take_ring(kind, events) {
            warn!(
                "qp{}: {kind:?} ring restarted while running (was at {})",
                self.index,
                old.next_used()
            );
        }
        events
            .add_ring(kind, &ring)
            .map_err(|e| format!("epoll add {kind:?} kick: {e}"))?;
        if cfg.signal_on_start && ring.interrupt() {
            self.common.counters.interrupts += 1;
        }
        info!(
            "qp{}: {kind:?} ring started: size {}, next avail {}",
            self.index, cfg.size, cfg.next_avail
        );
        match kind {
            RingKind::Rx => self.rx.install(ring),
            RingKind::Tx => self.tx.install(ring),
        };
        self.update_interest(events);
        Ok(())
    }

    /// Stop a ring; returns the position to resume it at (where it stopped
    /// if the worker stopped it earlier), `None` when none ran.
    pub fn stop_ring(&mut self, kind: RingKind, events: &mut Events) -> Option<u16> {
        let Some(ring) = self.take_ring(kind, events) else {
            return self.slot_mut(kind).take_stopped_at();
        };
        let (avail, used) = (ring.next_avail(), ring.next_used());
        if avail != used {
            warn!(
                "qp{}: {kind:?} ring stopped with next_avail {avail} != next_used {used}; reporting {used}",
                self.index
            );
        }
        info!("qp{}: {kind:?} ring stopped at {used}", self.index);
        Some(used)
    }

    /// After a control request: process what the guest queued (a ring just
    /// started, a frame I/O just attached), as if kicked.
    pub fn serve_after_control(&mut self, events: &mut Events) {
        if self.tx.slot().is_running() && self.tx.state() != TxState::Blocked {
            self.run_tx(events);
        }
        match self.rx.prepare_unkicked_run(self.common.memory.as_ref()) {
            Ok(true) => self.run_rx(events),
            Ok(false) => {}
            Err(fault) => self.stop_faulted(RingKind::Rx, fault, events),
        }
        self.update_interest(events);
    }

    // ---- events --------------------------------------------------------

    /// The guest kicked the TX ring.
    pub fn on_tx_kick(&mut self) {
        self.tx.on_kick(&mut self.common.counters);
    }

    /// The guest kicked the RX ring (a starved queue runs again).
    pub fn on_rx_kick(&mut self, events: &mut Events) {
        let common = &mut self.common;
        if let Err(fault) = self
            .rx
            .on_kick(common.memory.as_ref(), &mut common.counters)
        {
            self.stop_faulted(RingKind::Rx, fault, events);
        }
    }

    /// The frame I/O is writable again.
    pub fn on_io_writable(&mut self) {
        if let Some(io) = &self.common.io {
            io.on_writable();
        }
        self.tx.unblock();
    }

    /// The frame I/O reported an error or hang-up: a pending error of the
    /// peer (a datagram socket's ICMP port unreachable) is taken, counted
    /// and the queue goes on; anything else detaches the frame I/O.
    pub fn on_io_error(&mut self, events: &mut Events) {
        let Some(io) = self.common.io.as_deref() else {
            return;
        };
        let Some(e) = io.take_error() else {
            if !io.ended() {
                self.detach_io("it reported an error or hang-up", events);
            }
            return;
        };
        match PeerFault::of(&e) {
            Some(PeerFault::Gone) => self.common.counters.peer_unreachable += 1,
            Some(PeerFault::TooLarge) => self.common.counters.drop_peer_refused += 1,
            None => {
                self.detach_io(&format!("it reported {e}"), events);
                return;
            }
        }
        if let Some(n) = self.peer_errors.note() {
            warn!("qp{}: the socket's peer: {e} ({n} so far)", self.index);
        }
    }

    /// Detach the frame I/O (an error or hang-up on it, or a new one).
    pub fn detach_io(&mut self, why: &str, events: &mut Events) {
        if let Some(io) = self.common.io.take() {
            warn!("qp{}: frame I/O detached: {why}", self.index);
            if !self.common.io_ended {
                events.remove_io(io.as_ref());
            }
        }
        self.common.io_ended = false;
        self.tx.forget_io();
    }

    /// Whether TX stopped at its budget with chains left (run again at once).
    pub fn tx_has_more_work(&self) -> bool {
        self.tx.state() == TxState::MoreWork
    }

    /// Run the TX queue once, if it can run.
    pub fn run_tx(&mut self, events: &mut Events) {
        let Some(ctx) = self.common.ctx() else {
            return;
        };
        let result = self.tx.run(ctx, BUDGET).map(|ran| ran.is_some());
        self.after_run(RingKind::Tx, result, events);
    }

    /// Run the RX queue once, if it can run.
    pub fn run_rx(&mut self, events: &mut Events) {
        let Some(ctx) = self.common.ctx() else {
            return;
        };
        let result = self.rx.run(ctx, BUDGET).map(|ran| ran.is_some());
        self.after_run(RingKind::Rx, result, events);
    }

    /// Watch the frame I/O for what the queues wait for.
    pub fn update_interest(&mut self, events: &mut Events) {
        let Some(io) = &self.common.io else {
            return;
        };
        if self.common.io_ended {
            return;
        }
        if io.ended() {
            // Its connection is over: the primary makes a new one.
            warn!(
                "qp{}: the stream connection ended; TX frames are dropped until a new one is attached",
                self.index
            );
            events.remove_io(io.as_ref());
            self.common.io_ended = true;
            self.tx.unblock();
            return;
        }
        events.watch_io(
            io.as_ref(),
            self.rx.wants_readable(),
            self.tx.wants_writable() || io.wants_writable(),
        );
    }

    /// Add the counters to the published ones.
    pub fn publish(&mut self) {
        self.common.counters.publish(self.common.stats.stats());
    }

    /// Publish the heartbeat.
    pub fn beat(&self) {
        self.common.stats.beat();
    }

    // ---- internals -----------------------------------------------------

    /// After a run (`Ok(false)`: it did not run): flush the flows it noted
    /// and stop the ring if it faulted.
    fn after_run(&mut self, kind: RingKind, result: Result<bool, RingFault>, events: &mut Events) {
        match result {
            Ok(false) => {}
            Ok(true) => self.common.flows.flush(&self.common.stats),
            Err(fault) => {
                self.common.flows.flush(&self.common.stats);
                self.stop_faulted(kind, fault, events);
            }
        }
    }

    /// A ring became unusable: stop it, keep where it stopped for StopRing,
    /// count it and tell the VMM on the ring's error eventfd. The ring is
    /// gone after this, so each fault is counted and signalled once.
    fn stop_faulted(&mut self, kind: RingKind, fault: RingFault, events: &mut Events) {
        let Some(ring) = self.take_ring(kind, events) else {
            return;
        };
        self.common.counters.ring_faults += 1;
        let at = ring.next_used();
        let reported = if ring.signal_error() {
            "reported on its error eventfd"
        } else {
            "no error eventfd to report it on"
        };
        error!(
            "qp{}: {kind:?} ring stopped at {at}: {fault}; {reported}; the device needs a reset",
            self.index
        );
        // Let the guest see whatever was completed before the fault.
        if ring.interrupt() {
            self.common.counters.interrupts += 1;
        }
        self.slot_mut(kind).note_stopped_at(at);
    }

    /// Remove a ring: out of epoll first, path state cleared.
    fn take_ring(&mut self, kind: RingKind, events: &mut Events) -> Option<Ring> {
        let ring = match kind {
            RingKind::Rx => self.rx.take_ring(),
            RingKind::Tx => self.tx.take_ring(),
        }?;
        events.remove_ring(kind, &ring);
        self.update_interest(events);
        Some(ring)
    }

    fn slot(&self, kind: RingKind) -> &RingSlot {
        match kind {
            RingKind::Rx => self.rx.slot(),
            RingKind::Tx => self.tx.slot(),
        }
    }

    fn slot_mut(&mut self, kind: RingKind) -> &mut RingSlot {
        match kind {
            RingKind::Rx => self.rx.slot_mut(),
            RingKind::Tx => self.tx.slot_mut(),
        }
    }
}

#[cfg(test)]
mod tests;
