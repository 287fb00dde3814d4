//! The worker process of one queue pair: an epoll loop over the control
//! socket, the TAP queue and the two kick eventfds.
//!
//! Single-threaded by design: a control request is handled between two
//! batches, so when it changes memory or rings nothing is in flight. Each
//! loop turn publishes the heartbeat, waits for events (not at all when TX
//! work is pending from an exhausted budget, 250 ms at most otherwise
//! so the heartbeat keeps ticking), handles at most one control request,
//! runs TX and RX as their events ask, then publishes the counters.
//!
//! TAP interest follows the paths' needs: readable while the RX ring runs
//! and has buffers (not while starved: frames then wait in the kernel until
//! the guest's RX kick), writable only while TX waits for room.

use std::os::fd::{AsFd, OwnedFd};

use anyhow::{anyhow, Context};
use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use qpnet_ipc::{Channel, IpcError, MemoryRegion, Reply, Request, RingConfig, RingKind};
use qpnet_shared::SharedRegion;

use crate::counters::{LocalCounters, StatsHome};
use crate::features::NetFeatures;
use crate::flows::FlowTracker;
use crate::guest_memory::GuestMemoryMap;
use crate::ring::{Ring, RingFault};
use crate::rx::{RxOutcome, RxPath};
use crate::tap::Tap;
use crate::tx::{TxOutcome, TxPath};

/// Chains (TX) or frames (RX) handled per run before other work gets a turn.
const BUDGET: usize = 256;
/// Longest sleep of the loop, so the heartbeat keeps moving when idle.
const IDLE_WAIT_MS: u16 = 250;

const TOKEN_CONTROL: u64 = 0;
const TOKEN_TAP: u64 = 1;
const TOKEN_RX_KICK: u64 = 2;
const TOKEN_TX_KICK: u64 = 3;

/// Serve queue pair `queue_pair` over the control socket `control` until
/// told to stop or the primary goes away.
pub fn run_worker(queue_pair: u16, control: OwnedFd) -> anyhow::Result<()> {
    crash_if_told(queue_pair);
    let channel = Channel::from_fd(control).context("control fd")?;
    let mut worker = Worker::new(queue_pair, channel)?;
    info!("qp{queue_pair}: worker {} started", std::process::id());
    worker.run()
}

/// Test-only fault hook: `QPNET_TEST_WORKER_FAULT=crash-on-start:Q[,Q...]`
/// in the primary's environment makes the workers of those queue pairs abort
/// as soon as they start (a crash loop on demand for the supervision tests).
fn crash_if_told(queue_pair: u16) {
    let Ok(spec) = std::env::var("QPNET_TEST_WORKER_FAULT") else {
        return;
    };
    if let Some(list) = spec.strip_prefix("crash-on-start:") {
        if list.split(',').any(|q| q.trim().parse() == Ok(queue_pair)) {
            error!("qp{queue_pair}: QPNET_TEST_WORKER_FAULT says crash on start: aborting");
            std::process::abort();
        }
    }
}

/// What the loop does after a control request.
enum Flow {
    Continue,
    Exit,
}

/// Events of one loop turn.
#[derive(Default)]
struct Wake {
    control: bool,
    tap_in: bool,
    tap_out: bool,
    tap_err: bool,
    rx_kick: bool,
    tx_kick: bool,
}

/// A ring slot: the running ring, or where a faulted ring stopped.
#[derive(Default)]
struct RingSlot {
    ring: Option<Ring>,
    /// Set when the worker stopped the ring itself (a fault): the position
    /// StopRing reports.
    stopped_at: Option<u16>,
}

/// Everything one queue pair's worker owns.
struct Worker {
    queue_pair: u16,
    channel: Channel,
    epoll: Epoll,
    greeted: bool,
    features: NetFeatures,
    memory: Option<GuestMemoryMap>,
    tap: Option<Tap>,
    tap_interest: EpollFlags,
    rx: RingSlot,
    tx: RingSlot,
    rx_path: RxPath,
    tx_path: TxPath,
    /// RX waits for the guest's kick (no buffers).
    rx_starved: bool,
    /// TX waits for the TAP to be writable.
    tx_blocked: bool,
    /// TX stopped at its budget with chains left.
    tx_more: bool,
    counters: LocalCounters,
    flows: FlowTracker,
    stats: StatsHome,
}

impl Worker {
    fn new(queue_pair: u16, channel: Channel) -> anyhow::Result<Worker> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
        epoll
            .add(
                channel.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_CONTROL),
            )
            .context("epoll add control socket")?;
        Ok(Worker {
            queue_pair,
            channel,
            epoll,
            greeted: false,
            features: NetFeatures::default(),
            memory: None,
            tap: None,
            tap_interest: EpollFlags::empty(),
            rx: RingSlot::default(),
            tx: RingSlot::default(),
            rx_path: RxPath::new(queue_pair),
            tx_path: TxPath::new(queue_pair),
            rx_starved: false,
            tx_blocked: false,
            tx_more: false,
            counters: LocalCounters::default(),
            flows: FlowTracker::new(queue_pair, false),
            stats: StatsHome::private(),
        })
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let mut events = [EpollEvent::empty(); 8];
        loop {
            self.stats.beat();
            let timeout = if self.tx_more {
                EpollTimeout::ZERO
            } else {
                EpollTimeout::from(IDLE_WAIT_MS)
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e).context("epoll_wait"),
            };
            let wake = Self::sort_events(&events[..n]);
            if wake.control {
                // The request may have changed rings, memory or TAP: the
                // data-path events are re-reported next turn (level-triggered).
                let flow = self.handle_control()?;
                self.publish();
                match flow {
                    Flow::Exit => return Ok(()),
                    Flow::Continue => continue,
                }
            }
            self.serve_data_path(&wake);
            self.publish();
        }
    }

    fn sort_events(events: &[EpollEvent]) -> Wake {
        let mut wake = Wake::default();
        for ev in events {
            let flags = ev.events();
            match ev.data() {
                TOKEN_CONTROL => wake.control = true,
                TOKEN_TAP => {
                    wake.tap_in |= flags.contains(EpollFlags::EPOLLIN);
                    wake.tap_out |= flags.contains(EpollFlags::EPOLLOUT);
                    wake.tap_err |= flags.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP);
                }
                TOKEN_RX_KICK => wake.rx_kick = true,
                TOKEN_TX_KICK => wake.tx_kick = true,
                _ => {}
            }
        }
        wake
    }

    fn publish(&mut self) {
        self.counters.publish(self.stats.stats());
    }

    // ---- data path -----------------------------------------------------

    fn serve_data_path(&mut self, wake: &Wake) {
        if wake.tap_err && !wake.tap_in {
            self.detach_tap("the TAP queue reported an error or hang-up");
        }
        if wake.tx_kick {
            if let Some(ring) = &self.tx.ring {
                if ring.drain_kick() {
                    self.counters.tx_kicks += 1;
                }
            }
        }
        if wake.rx_kick {
            self.on_rx_kick();
        }
        if wake.tx_kick || wake.tap_out || self.tx_more {
            if wake.tap_out {
                self.tx_blocked = false;
            }
            self.run_tx();
        }
        if wake.tap_in || wake.rx_kick {
            self.run_rx();
        }
        self.update_tap_interest();
    }

    fn on_rx_kick(&mut self) {
        let Some(ring) = &mut self.rx.ring else {
            return;
        };
        if ring.drain_kick() {
            self.counters.rx_kicks += 1;
        }
        if !self.rx_starved {
            return;
        }
        self.rx_starved = false;
        if let Some(mem) = &self.memory {
            // Busy again: the guest need not kick for every buffer.
            if let Err(fault) = ring.suppress_kicks(mem) {
                self.ring_faulted(RingKind::Rx, fault);
            }
        }
    }

    fn run_tx(&mut self) {
        self.tx_more = false;
        if self.tx_blocked {
            return;
        }
        let (Some(ring), Some(mem), Some(tap)) = (&mut self.tx.ring, &self.memory, &self.tap)
        else {
            return;
        };
        let result = self.tx_path.run(
            ring,
            mem,
            tap,
            &self.features,
            &mut self.counters,
            &mut self.flows,
            BUDGET,
        );
        self.flows.flush(&self.stats);
        match result {
            Ok(TxOutcome::Idle) => {}
            Ok(TxOutcome::MoreWork) => self.tx_more = true,
            Ok(TxOutcome::TapBlocked) => self.tx_blocked = true,
            Err(fault) => self.ring_faulted(RingKind::Tx, fault),
        }
    }

    fn run_rx(&mut self) {
        if self.rx_starved {
            return;
        }
        let (Some(ring), Some(mem), Some(tap)) = (&mut self.rx.ring, &self.memory, &self.tap)
        else {
            return;
        };
        let result = self.rx_path.run(
            ring,
            mem,
            tap,
            &self.features,
            &mut self.counters,
            &mut self.flows,
            BUDGET,
        );
        self.flows.flush(&self.stats);
        match result {
            Ok(RxOutcome::Drained | RxOutcome::MoreWork | RxOutcome::TapError) => {}
            Ok(RxOutcome::Starved { frames_waiting }) => {
                self.rx_starved = true;
                if frames_waiting {
                    self.counters.rx_no_buffer += 1;
                }
            }
            Err(fault) => self.ring_faulted(RingKind::Rx, fault),
        }
    }

    /// A ring became unusable: stop it, keep where it stopped for StopRing.
    fn ring_faulted(&mut self, kind: RingKind, fault: RingFault) {
        self.counters.drop_bad_descriptor += 1;
        let qp = self.queue_pair;
        if let Some(ring) = self.take_ring(kind) {
            let at = ring.next_used();
            error!("qp{qp}: {kind:?} ring stopped at {at}: {fault}; the device needs a reset");
            // Let the guest see whatever was completed before the fault.
            if ring.interrupt() {
                self.counters.interrupts += 1;
            }
            self.slot(kind).stopped_at = Some(at);
        }
    }

    /// Remove a ring from the loop (deregistered, path state cleared).
    fn take_ring(&mut self, kind: RingKind) -> Option<Ring> {
        let ring = self.slot(kind).ring.take()?;
        if let Err(e) = self.epoll.delete(ring.kick_fd()) {
            warn!("qp{}: epoll delete {kind:?} kick: {e}", self.queue_pair);
        }
        match kind {
            RingKind::Rx => {
                self.rx_starved = false;
                self.rx_path.reset();
            }
            RingKind::Tx => {
                self.tx_blocked = false;
                self.tx_more = false;
            }
        }
        self.update_tap_interest();
        Some(ring)
    }

    fn slot(&mut self, kind: RingKind) -> &mut RingSlot {
        match kind {
            RingKind::Rx => &mut self.rx,
            RingKind::Tx => &mut self.tx,
        }
    }

    fn detach_tap(&mut self, why: &str) {
        if let Some(tap) = self.tap.take() {
            warn!("qp{}: TAP queue detached: {why}", self.queue_pair);
            let _ = self.epoll.delete(tap.as_fd());
        }
        self.tap_interest = EpollFlags::empty();
        self.tx_blocked = false;
    }

    fn update_tap_interest(&mut self) {
        let Some(tap) = &self.tap else {
            return;
        };
        let mut want = EpollFlags::empty();
        if self.rx.ring.is_some() && !self.rx_starved {
            want |= EpollFlags::EPOLLIN;
        }
        if self.tx.ring.is_some() && self.tx_blocked {
            want |= EpollFlags::EPOLLOUT;
        }
        if want == self.tap_interest {
            return;
        }
        let mut ev = EpollEvent::new(want, TOKEN_TAP);
        match self.epoll.modify(tap.as_fd(), &mut ev) {
            Ok(()) => self.tap_interest = want,
            Err(e) => warn!("qp{}: epoll modify TAP: {e}", self.queue_pair),
        }
    }

    // ---- control -------------------------------------------------------

    fn handle_control(&mut self) -> anyhow::Result<Flow> {
        let (request, fds) = match self.channel.recv::<Request>() {
            Ok(m) => m,
            Err(IpcError::Closed) => {
                debug!("qp{}: control socket closed, exiting", self.queue_pair);
                return Ok(Flow::Exit);
            }
            Err(e @ (IpcError::Decode(_) | IpcError::Truncated)) => {
                warn!("qp{}: bad control message: {e}", self.queue_pair);
                self.reply(Reply::Error {
                    message: format!("bad control message: {e}"),
                })?;
                return Ok(Flow::Continue);
            }
            Err(e) => return Err(e).context("control socket receive"),
        };
        debug!(
            "qp{}: request {request:?} with {} fds",
            self.queue_pair,
            fds.len()
        );
        let (reply, flow) = self.dispatch(request, fds)?;
        if let Reply::Error { message } = &reply {
            warn!("qp{}: request refused: {message}", self.queue_pair);
        }
        self.reply(reply)?;
        if let Flow::Exit = flow {
            return Ok(Flow::Exit);
        }
        // Work the request made possible (a started ring, a new TAP).
        self.serve_after_control();
        Ok(Flow::Continue)
    }

    fn reply(&self, reply: Reply) -> anyhow::Result<()> {
        match self.channel.send(&reply, &[]) {
            Ok(()) | Err(IpcError::Closed) => Ok(()),
            Err(e) => Err(e).context("control socket send"),
        }
    }

    fn dispatch(&mut self, request: Request, fds: Vec<OwnedFd>) -> anyhow::Result<(Reply, Flow)> {
        // The fds' number and kind, by the rules the primary follows too;
        // on a refusal they are closed when `fds` drops, at once.
        if let Err(e) = request.check_fds(&fds) {
            return Ok((error_reply(e.to_string()), Flow::Continue));
        }
        if !self.greeted && !matches!(request, Request::Hello { .. }) {
            return Ok((error_reply("Hello must come first".into()), Flow::Continue));
        }
        let reply = match request {
            Request::Hello {
                version,
                queue_pair,
            } => return self.hello(version, queue_pair),
            Request::SetFeatures {
                features,
                max_rx_frame,
                header_len,
            } => self.set_features(features, max_rx_frame, header_len),
            Request::SetMemTable { regions } => self.set_mem_table(&regions, fds),
            Request::AttachTap => self.attach_tap(fds),
            Request::AttachShared { flow_tracking } => {
                self.flows.set_enabled(self.queue_pair, flow_tracking);
                self.attach_shared(fds)
            }
            Request::StartRing(cfg) => self.start_ring(&cfg, fds),
            Request::StopRing { kind } => self.stop_ring(kind),
            Request::Shutdown => {
                info!("qp{}: shutdown requested", self.queue_pair);
                return Ok((Reply::Ok, Flow::Exit));
            }
        };
        Ok((reply, Flow::Continue))
    }

    fn hello(&mut self, version: u32, queue_pair: u16) -> anyhow::Result<(Reply, Flow)> {
        if version != qpnet_ipc::PROTOCOL_VERSION {
            let message = format!(
                "protocol version {version}, this worker speaks {}",
                qpnet_ipc::PROTOCOL_VERSION
            );
            self.reply(error_reply(message.clone()))?;
            return Err(anyhow!("qp{}: {message}", self.queue_pair));
        }
        if queue_pair != self.queue_pair {
            let message = format!(
                "hello for queue pair {queue_pair}, this worker serves {}",
                self.queue_pair
            );
            self.reply(error_reply(message.clone()))?;
            return Err(anyhow!("qp{}: {message}", self.queue_pair));
        }
        self.greeted = true;
        Ok((
            Reply::Hello {
                version: qpnet_ipc::PROTOCOL_VERSION,
                pid: std::process::id(),
            },
            Flow::Continue,
        ))
    }

    fn set_features(&mut self, features: u64, max_rx_frame: u32, header_len: u32) -> Reply {
        let f = match NetFeatures::from_request(features, max_rx_frame, header_len) {
            Ok(f) => f,
            Err(message) => return error_reply(message),
        };
        for ring in [&mut self.rx.ring, &mut self.tx.ring].into_iter().flatten() {
            ring.set_event_idx(f.event_idx);
        }
        info!(
            "qp{}: features {features:#x}: event_idx {}, mergeable rx {}, header {} bytes, largest rx frame {}",
            self.queue_pair, f.event_idx, f.mergeable_rx, f.header_len, f.max_rx_frame
        );
        self.features = f;
        Reply::Ok
    }

    /// Install a new memory map; an empty table unmaps guest memory (the
    /// device was reset). Running rings keep their position if they still
    /// fit, and are stopped otherwise.
    fn set_mem_table(&mut self, regions: &[MemoryRegion], fds: Vec<OwnedFd>) -> Reply {
        let mem = if regions.is_empty() {
            info!("qp{}: guest memory unmapped", self.queue_pair);
            None
        } else {
            match GuestMemoryMap::map_regions(regions, fds) {
                Ok(m) => {
                    info!(
                        "qp{}: memory table of {} regions mapped",
                        self.queue_pair,
                        m.region_count()
                    );
                    Some(m)
                }
                Err(e) => return error_reply(format!("memory table refused: {e}")),
            }
        };
        let mut stopped = Vec::new();
        for kind in [RingKind::Rx, RingKind::Tx] {
            let fits = match (&self.slot(kind).ring, &mem) {
                (Some(ring), Some(mem)) => ring.fits(mem),
                (Some(_), None) => false,
                (None, _) => true,
            };
            if !fits {
                if let Some(ring) = self.take_ring(kind) {
                    self.slot(kind).stopped_at = Some(ring.next_used());
                    stopped.push(format!("{kind:?} (stopped at {})", ring.next_used()));
                }
            }
        }
        self.memory = mem;
        if stopped.is_empty() {
            Reply::Ok
        } else {
            error_reply(format!(
                "memory table installed, but ring(s) {} lie outside it and were stopped",
                stopped.join(", ")
            ))
        }
    }

    fn attach_tap(&mut self, fds: Vec<OwnedFd>) -> Reply {
        let Some(fd) = fds.into_iter().next() else {
            return error_reply("AttachTap without an fd".into());
        };
        let tap = match Tap::attach(fd) {
            Ok(t) => t,
            Err(e) => return error_reply(format!("TAP fd refused: {e}")),
        };
        self.detach_tap("replaced");
        if let Err(e) = self
            .epoll
            .add(tap.as_fd(), EpollEvent::new(EpollFlags::empty(), TOKEN_TAP))
        {
            return error_reply(format!("epoll add TAP: {e}"));
        }
        self.tap = Some(tap);
        self.update_tap_interest();
        info!("qp{}: TAP queue attached", self.queue_pair);
        Reply::Ok
    }

    fn attach_shared(&mut self, fds: Vec<OwnedFd>) -> Reply {
        let Some(fd) = fds.into_iter().next() else {
            return error_reply("AttachShared without an fd".into());
        };
        let region = match SharedRegion::attach_fd(std::fs::File::from(fd)) {
            Ok(r) => r,
            Err(e) => return error_reply(format!("shared region refused: {e}")),
        };
        // What was counted so far goes to the old home.
        self.publish();
        match self.stats.use_shared(region, usize::from(self.queue_pair)) {
            Ok(()) => {
                info!("qp{}: shared region attached", self.queue_pair);
                Reply::Ok
            }
            Err(message) => error_reply(message),
        }
    }

    fn start_ring(&mut self, cfg: &RingConfig, fds: Vec<OwnedFd>) -> Reply {
        let Some(mem) = &self.memory else {
            return error_reply(format!(
                "{:?} ring started before the memory table",
                cfg.kind
            ));
        };
        let ring = match Ring::start(cfg, self.features.event_idx, fds, mem) {
            Ok(r) => r,
            Err(e) => return error_reply(format!("{:?} ring refused: {e}", cfg.kind)),
        };
        if let Some(old) = self.take_ring(cfg.kind) {
            warn!(
                "qp{}: {:?} ring restarted while running (was at {})",
                self.queue_pair,
                cfg.kind,
                old.next_used()
            );
        }
        let token = match cfg.kind {
            RingKind::Rx => TOKEN_RX_KICK,
            RingKind::Tx => TOKEN_TX_KICK,
        };
        if let Err(e) = self
            .epoll
            .add(ring.kick_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))
        {
            return error_reply(format!("epoll add {:?} kick: {e}", cfg.kind));
        }
        if cfg.signal_on_start && ring.interrupt() {
            self.counters.interrupts += 1;
        }
        info!(
            "qp{}: {:?} ring started: size {}, next avail {}",
            self.queue_pair, cfg.kind, cfg.size, cfg.next_avail
        );
        let slot = self.slot(cfg.kind);
        slot.ring = Some(ring);
        slot.stopped_at = None;
        if cfg.kind == RingKind::Rx {
            self.rx_path.reset();
        }
        self.update_tap_interest();
        Reply::Ok
    }

    fn stop_ring(&mut self, kind: RingKind) -> Reply {
        if let Some(ring) = self.take_ring(kind) {
            let (avail, used) = (ring.next_avail(), ring.next_used());
            if avail != used {
                warn!(
                    "qp{}: {kind:?} ring stopped with next_avail {avail} != next_used {used}; reporting {used}",
                    self.queue_pair
                );
            }
            info!("qp{}: {kind:?} ring stopped at {used}", self.queue_pair);
            return Reply::RingStopped { next_avail: used };
        }
        match self.slot(kind).stopped_at.take() {
            Some(at) => Reply::RingStopped { next_avail: at },
            None => error_reply(format!("{kind:?} ring is not running")),
        }
    }

    /// After a request: process what the guest queued (a ring just started,
    /// a TAP just attached), as if kicked.
    fn serve_after_control(&mut self) {
        if self.tx.ring.is_some() && !self.tx_blocked {
            self.run_tx();
        }
        if self.rx.ring.is_some() && !self.rx_starved {
            if let (Some(ring), Some(mem)) = (&mut self.rx.ring, &self.memory) {
                if let Err(fault) = ring.suppress_kicks(mem) {
                    self.ring_faulted(RingKind::Rx, fault);
                }
            }
            self.run_rx();
        }
        self.update_tap_interest();
    }
}

fn error_reply(message: String) -> Reply {
    Reply::Error { message }
}
