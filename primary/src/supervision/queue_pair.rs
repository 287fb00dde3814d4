//! One queue pair as the primary runs it: its worker link, its crash
//! history, and the hand-over of its two rings (RX `2 * qp`, TX `2 * qp + 1`)
//! to whichever worker runs them. This is the only place that starts,
//! stops and replaces a worker.
//!
//! Theory of operation (ring hand-over):
//! - Each ring is `Stopped` (in no worker), `Running` (in the current
//!   worker), or `Owed` to the queue pair's next worker. A worker only ever
//!   holds a ring the device describes fully and has enabled.
//! - Stopping a running ring asks the worker (`StopRing`); its reply is the
//!   next available index, which becomes the ring's base. The ring is
//!   marked stopped before the call, so if the worker dies during it the
//!   ring is not owed to the replacement: its base is then the used index
//!   read from guest memory (workers complete chains strictly in order, and
//!   publish the used index only at frame boundaries, so that index is
//!   exactly where the ring stopped). An owed ring stops the same way.
//! - Starting a ring sends `StartRing` at the device's base. If the queue
//!   pair has no live worker, or the worker dies during the call, the ring
//!   is owed as a start: the next worker gets that same request.
//! - When a worker dies, each ring it ran is owed as a resume: the next
//!   worker gets it at the used index read from guest memory, with
//!   `signal_on_start` so the guest never waits on a lost interrupt. If
//!   that worker dies during the hand-over too, whatever it had not
//!   acknowledged stays owed, and what it had becomes owed as a resume.
//! - A worker's death is never acted on inside the request that met it:
//!   the call marks the queue pair dead (the worker is killed and reaped at
//!   once, so no two workers ever run one ring), the request completes by
//!   the rules above, and the primary's loop, right after, asks the policy
//!   and starts the replacement ([`QueuePair::supervise`]).
//! - A new worker gets, in order: hello, the shared region, its TAP queue,
//!   the features and the memory table if the device has them, then every
//!   owed ring. Any failure there is a death like any other.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use qpnet_ipc::{FrameIoKind, Reply, Request, RingKind, PROTOCOL_VERSION};
use qpnet_shared::{monotonic_ns, stream_sync, QueueStats, WorkerState};

use super::link::{describe, WorkerLink};
use super::policy::{is_wedged, CrashHistory, Decision};
use super::Instance;
use crate::device::{refuse, DevResult, Device};
use crate::frame_io::HostSide;

/// How an owed ring is given to the next worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owed {
    /// A start no worker acknowledged: sent again as it was (at the base).
    Start,
    /// A ring a worker ran when it died: resumed at the used index.
    Resume,
}

/// Where a ring is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingState {
    /// In no worker.
    Stopped,
    /// In the current worker.
    Running,
    /// For the queue pair's next worker.
    Owed(Owed),
}

/// The queue pair's worker.
enum Worker {
    /// A live worker.
    Up(Box<dyn WorkerLink>),
    /// Its worker died (killed and reaped already); the loop decides next.
    Dead { pid: Option<u32>, why: String },
    /// A new worker is to start at this time (now, or after a back-off).
    Due(Instant),
    /// Given up on by the crash-loop guard, until a retry.
    Failed,
    /// Shut down with the primary.
    Stopped,
}

/// Why a request to the worker did not take effect.
#[derive(Debug, thiserror::Error)]
enum CallError {
    /// No live worker: the next one gets the effect.
    #[error("queue pair {0} has no worker")]
    NoWorker(u16),
    /// The worker died during the call; the queue pair is now dead.
    #[error("{0}")]
    Died(String),
    /// The worker (or the device, for a ring it cannot describe) refused.
    #[error("{0}")]
    Refused(String),
}

/// One queue pair.
pub struct QueuePair {
    index: u16,
    worker: Worker,
    history: CrashHistory,
    /// RX, TX.
    rings: [RingState; 2],
}

impl QueuePair {
    /// Queue pair `index`, its first worker due now.
    pub fn new(index: u16) -> QueuePair {
        QueuePair {
            index,
            worker: Worker::Due(Instant::now()),
            history: CrashHistory::default(),
            rings: [RingState::Stopped; 2],
        }
    }

    /// Where ring `slot` (0 RX, 1 TX) is.
    #[cfg(test)]
    pub fn ring_state(&self, slot: usize) -> RingState {
        self.rings[slot]
    }

    /// The live worker's pid and pidfd.
    pub fn worker(&self) -> Option<(u32, BorrowedFd<'_>)> {
        match &self.worker {
            Worker::Up(link) => Some((link.pid(), link.pidfd())),
            _ => None,
        }
    }

    /// Whether the crash-loop guard gave up on this queue pair.
    pub fn is_failed(&self) -> bool {
        matches!(self.worker, Worker::Failed)
    }

    /// When [`QueuePair::supervise`] has something to do without an event:
    /// a death to act on, or a start that is due.
    pub fn deadline(&self) -> Option<Instant> {
        match self.worker {
            Worker::Dead { .. } => Some(Instant::now()),
            Worker::Due(at) => Some(at),
            _ => None,
        }
    }

    fn vring(&self, slot: usize) -> usize {
        2 * self.index as usize + slot
    }

    fn stats<'a>(&self, inst: &'a Instance) -> &'a QueueStats {
        inst.shared
            .queue(self.index as usize)
            .expect("shared region has a block per queue pair")
    }

    // ---- requests -----------------------------------------------------------

    /// One request to the live worker. A worker that does not answer is
    /// marked dead here; nothing else happens until the loop acts on it.
    fn call(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<Reply, CallError> {
        let Worker::Up(link) = &mut self.worker else {
            return Err(CallError::NoWorker(self.index));
        };
        link.request(req, fds).map_err(|e| {
            let why = self.with_end(describe(&e));
            self.mark_dead(why.clone());
            CallError::Died(why)
        })
    }

    fn call_ok(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<(), CallError> {
        let qp = self.index;
        match self.call(req, fds)? {
            Reply::Ok => Ok(()),
            Reply::Error { message } => Err(CallError::Refused(format!(
                "worker of queue pair {qp} refused {}: {message}",
                req.name()
            ))),
            other => Err(CallError::Refused(format!(
                "worker of queue pair {qp} answered {} with {other:?}",
                req.name()
            ))),
        }
    }

    /// Give the worker device-wide state (features, memory table). Without a
    /// live worker, or if it dies, the next worker gets the device's state
    /// when it starts; only a refusal is an error.
    pub fn send(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> DevResult<()> {
        match self.call_ok(req, fds) {
            Ok(()) | Err(CallError::NoWorker(_) | CallError::Died(_)) => Ok(()),
            Err(CallError::Refused(m)) => refuse(m),
        }
    }

    // ---- ring hand-over -----------------------------------------------------

    /// Stop ring `slot` if a worker runs it or it is owed; the ring's new
    /// base, if it has one.
    pub fn stop_ring(&mut self, slot: usize, dev: &Device) -> DevResult<Option<u16>> {
        let i = self.vring(slot);
        // Marked stopped first: if the worker dies during this call, the
        // replacement must not restart this ring.
        match std::mem::replace(&mut self.rings[slot], RingState::Stopped) {
            RingState::Stopped => Ok(None),
            RingState::Owed(_) => Ok(dev.used_idx(i)),
            RingState::Running => {
                let kind = RingKind::of_vring(i as u32);
                match self.call(&Request::StopRing { kind }, &[]) {
                    Ok(Reply::RingStopped { next_avail }) => Ok(Some(next_avail)),
                    Ok(Reply::Error { message }) => refuse(format!("ring {i}: {message}")),
                    Ok(other) => refuse(format!("ring {i}: unexpected reply {other:?}")),
                    // It died: chains are completed in order, so the used
                    // index in guest memory is where the ring stopped.
                    Err(_) => Ok(dev.used_idx(i)),
                }
            }
        }
    }

    /// Start ring `slot` if it is stopped and the device has it ready; owed
    /// to the next worker if there is no live one or it dies meanwhile.
    pub fn sync_ring(&mut self, slot: usize, dev: &Device) -> DevResult<()> {
        let i = self.vring(slot);
        if self.rings[slot] != RingState::Stopped || !dev.ring_ready(i) {
            return Ok(());
        }
        match self.start_ring(slot, dev, Owed::Start) {
            Ok(()) => Ok(()),
            Err(CallError::NoWorker(_) | CallError::Died(_)) => {
                self.rings[slot] = RingState::Owed(Owed::Start);
                Ok(())
            }
            Err(CallError::Refused(m)) => refuse(m),
        }
    }

    fn start_ring(&mut self, slot: usize, dev: &Device, how: Owed) -> Result<(), CallError> {
        let i = self.vring(slot);
        let base = match how {
            Owed::Start => dev.vring(i).base,
            Owed::Resume => dev.used_idx(i).unwrap_or_else(|| {
                log::warn!("ring {i}: cannot read its used index; resuming at base");
                dev.vring(i).base
            }),
        };
        let (req, fds) = dev
            .start_request(i, base, how == Owed::Resume)
            .map_err(|e| CallError::Refused(e.0))?;
        self.call_ok(&req, &fds)?;
        self.rings[slot] = RingState::Running;
        log::debug!(
            "ring {i}: started at {base} ({} entries)",
            dev.vring(i).num.unwrap_or(0)
        );
        Ok(())
    }

    /// Give the live worker every ring owed to it.
    fn hand_over(&mut self, dev: &Device) {
        for slot in 0..2 {
            let RingState::Owed(how) = self.rings[slot] else {
                continue;
            };
            match self.start_ring(slot, dev, how) {
                Ok(()) => {}
                // It died too: what is owed stays owed to its successor.
                Err(CallError::NoWorker(_) | CallError::Died(_)) => return,
                Err(e) => log::error!(
                    "ring {}: not resumed on the new worker: {e}",
                    self.vring(slot)
                ),
            }
        }
    }

    // ---- supervision --------------------------------------------------------

    /// The worker died or must die: kill it if it still runs and reap it.
    /// The rings it ran are owed to the next worker; what comes next is for
    /// the loop to decide ([`QueuePair::supervise`]).
    fn mark_dead(&mut self, why: String) {
        let pid = match std::mem::replace(&mut self.worker, Worker::Stopped) {
            Worker::Up(mut link) => {
                link.kill();
                Some(link.pid())
            }
            _ => None,
        };
        self.worker = Worker::Dead { pid, why };
        for r in &mut self.rings {
            if *r == RingState::Running {
                *r = RingState::Owed(Owed::Resume);
            }
        }
    }

    /// `why`, and how the worker ended when that is news: one that died
    /// while the primary waited for its answer (its control socket closed)
    /// of something other than the SIGKILL this sends, e.g. an abort, or
    /// SIGSYS from its seccomp filter.
    fn with_end(&mut self, why: String) -> String {
        let Worker::Up(link) = &mut self.worker else {
            return why;
        };
        link.kill();
        match link.try_reap() {
            Some(how) if how != "killed by SIGKILL" => format!("{why}; the worker was {how}"),
            _ => why,
        }
    }

    /// The worker's pidfd fired: reap it and mark the queue pair dead.
    pub fn exited(&mut self) {
        if let Worker::Up(link) = &mut self.worker {
            let why = link
                .try_reap()
                .unwrap_or_else(|| "its process ended".into());
            self.mark_dead(why);
        }
    }

    /// Called from the primary's loop: the watchdog for a live worker, then
    /// a death to act on and any start that is due. A start that fails is a
    /// death, decided at once; the policy's back-off and crash-loop guard
    /// end the loop.
    pub fn supervise(&mut self, inst: &mut Instance, dev: &Device) {
        self.watchdog(inst, dev);
        loop {
            match self.worker {
                Worker::Dead { .. } => self.decide(inst),
                Worker::Due(at) if at <= Instant::now() => self.bring_up(inst, dev),
                _ => return,
            }
        }
    }

    /// A live worker whose heartbeat is stale while its queue pair has work
    /// is wedged: it is killed and replaced like a crashed one.
    fn watchdog(&mut self, inst: &Instance, dev: &Device) {
        if !matches!(self.worker, Worker::Up(_)) {
            return;
        }
        let hb = QueueStats::get(&self.stats(inst).heartbeat_ns);
        let age = Duration::from_nanos(monotonic_ns().saturating_sub(hb));
        if hb != 0 && is_wedged(&inst.policy, age, || self.has_work(inst, dev)) {
            self.mark_dead(format!(
                "wedged: no heartbeat for {} ms while it has work",
                age.as_millis()
            ));
        }
    }

    /// Whether a live worker would be doing something: TX chains not yet
    /// used, or TAP frames waiting while RX buffers are posted.
    fn has_work(&self, inst: &Instance, dev: &Device) -> bool {
        let pending = |slot: usize| {
            let i = self.vring(slot);
            self.rings[slot] != RingState::Stopped
                && matches!((dev.avail_idx(i), dev.used_idx(i)), (Some(a), Some(u)) if a != u)
        };
        if pending(1) {
            return true;
        }
        pending(0)
            && inst
                .host
                .queue(self.index as usize)
                .is_some_and(|fd| fd_readable(fd.as_fd()))
    }

    /// Act on a death: repair what the worker may have left locked, count
    /// it, and let the policy say when (or whether) the next worker starts.
    fn decide(&mut self, inst: &mut Instance) {
        let Worker::Dead { pid, why } = std::mem::replace(&mut self.worker, Worker::Stopped) else {
            return;
        };
        let qp = self.index;
        self.hand_over_stream(inst);
        let pid = pid.map_or_else(|| "-".to_string(), |p| p.to_string());
        repair_flow_table(inst);
        let st = self.stats(inst);
        QueueStats::add(&st.restarts, 1);
        st.pid.store(0, Ordering::Relaxed);
        let now = Instant::now();
        self.worker = match self.history.died(now, &inst.policy) {
            Decision::RespawnNow => {
                log::warn!("queue pair {qp}: worker {pid} gone ({why}); starting a new one");
                st.set_worker_state(WorkerState::Restarting);
                Worker::Due(now)
            }
            Decision::RespawnAt(at) => {
                let ms = at.saturating_duration_since(now).as_millis();
                log::warn!(
                    "queue pair {qp}: worker {pid} gone ({why}); crashing repeatedly, next start in {ms} ms"
                );
                st.set_worker_state(WorkerState::Restarting);
                Worker::Due(at)
            }
            Decision::Fail => {
                log::error!(
                    "queue pair {qp}: worker {pid} gone ({why}); {} crashes within {:?}: queue pair marked failed, its rings left alone (qpnet retry to try again)",
                    self.history.recent_deaths(),
                    inst.policy.crash_window
                );
                st.set_worker_state(WorkerState::Failed);
                inst.host.set_serving(qp as usize, false);
                if let Some(t) = inst.shared.flow_table() {
                    let r = t.remove_owned_by(qp as usize);
                    log::info!("queue pair {qp}: {} of its flows removed", r.removed);
                }
                Worker::Failed
            }
        };
    }

    /// Start a worker, tell it the device's state, and hand it the owed
    /// rings. Any failure marks the queue pair dead again.
    fn bring_up(&mut self, inst: &Instance, dev: &Device) {
        let qp = self.index;
        self.history.started(Instant::now());
        // Back in the TAP's choice if it was failed (a retry).
        inst.host.set_serving(qp as usize, true);
        let st = self.stats(inst);
        st.set_worker_state(WorkerState::Starting);
        match inst.launcher.launch(qp) {
            Ok(link) => self.worker = Worker::Up(link),
            Err(e) => return self.mark_dead(format!("could not start: {}", describe(&e))),
        }
        if let Err(e) = self.introduce(inst, dev) {
            match &mut self.worker {
                // It died answering: already killed and reaped.
                Worker::Dead { why, .. } => *why = format!("could not start: {why}"),
                _ => self.mark_dead(format!("could not start: {e}")),
            }
            return;
        }
        let Some((pid, _)) = self.worker() else {
            return;
        };
        st.pid.store(pid, Ordering::Relaxed);
        st.set_worker_state(WorkerState::Running);
        log::info!("queue pair {qp}: worker pid {pid} ready");
        self.hand_over(dev);
    }

    /// The requests every new worker gets before its rings.
    fn introduce(&mut self, inst: &Instance, dev: &Device) -> Result<(), CallError> {
        let qp = self.index;
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            queue_pair: qp,
        };
        match self.call(&hello, &[])? {
            Reply::Hello { version, .. } if version == PROTOCOL_VERSION => {}
            Reply::Hello { version, .. } => {
                return Err(CallError::Refused(format!(
                    "worker speaks control protocol {version}, primary {PROTOCOL_VERSION}"
                )))
            }
            other => {
                return Err(CallError::Refused(format!(
                    "worker answered hello with {other:?}"
                )))
            }
        }
        let shared = Request::AttachShared {
            flow_tracking: inst.flow_tracking,
        };
        self.call_ok(&shared, &[inst.shared.fd()])?;
        let kind = inst.host.kind();
        match inst.host.queue(qp as usize) {
            Some(fd) => self.call_ok(&Request::AttachFrameIo { kind }, &[fd.as_fd()])?,
            // A stream not connected now: attached once it is.
            None if kind == FrameIoKind::Stream => {}
            None => {
                return Err(CallError::Refused(format!(
                    "no {} for queue pair {qp}",
                    kind.name()
                )))
            }
        }
        if let Some(req) = dev.features_request(inst.host.mtu()) {
            self.call_ok(&req, &[])?;
        }
        if let Some((req, fds)) = dev.mem_table_request() {
            self.call_ok(&req, &fds)?;
        }
        Ok(())
    }

    /// The host side has a new fd for this queue pair (a stream connected):
    /// give it to the live worker (the next worker gets it anyway).
    pub fn attach_frame_io(&mut self, inst: &Instance) {
        let Some(fd) = inst.host.queue(self.index as usize) else {
            return;
        };
        let kind = inst.host.kind();
        match self.call_ok(&Request::AttachFrameIo { kind }, &[fd.as_fd()]) {
            Ok(()) | Err(CallError::NoWorker(_) | CallError::Died(_)) => {}
            Err(CallError::Refused(m)) => {
                self.mark_dead(format!("its new {} was refused: {m}", kind.name()))
            }
        }
    }

    /// The worker died: on a stream backend its connection goes to the
    /// next worker only if the dead one left it at a frame boundary;
    /// otherwise it is reset (see `qpnet_shared::stream_sync`).
    fn hand_over_stream(&self, inst: &mut Instance) {
        let HostSide::Stream(links) = &mut inst.host else {
            return;
        };
        let Some(st) = inst.shared.queue(self.index as usize) else {
            return;
        };
        let bits = st.stream_sync.swap(0, Ordering::AcqRel);
        if !stream_sync::at_boundary(bits) {
            links.reset(self.index as usize);
        }
    }

    /// Forget the crash history and start a worker at the loop's next turn,
    /// if the queue pair was failed (`qpnet retry`, a new VMM).
    pub fn retry(&mut self) {
        if self.is_failed() {
            log::info!("queue pair {}: retrying after failure", self.index);
            self.history.clear();
            self.worker = Worker::Due(Instant::now());
        }
    }

    /// Stop the worker for good (primary shutdown).
    pub fn shutdown(&mut self, inst: &Instance) {
        if let Worker::Up(mut link) = std::mem::replace(&mut self.worker, Worker::Stopped) {
            link.shutdown();
        }
        self.worker = Worker::Stopped;
        self.stats(inst).set_worker_state(WorkerState::Stopped);
    }
}

/// A worker died, possibly inside a flow-table critical section: repair any
/// stripe it left locked now instead of by its next user.
fn repair_flow_table(inst: &Instance) {
    if let Some(t) = inst.shared.flow_table() {
        let repaired = t.recover_abandoned();
        if repaired > 0 {
            log::warn!("flow table: {repaired} stripe(s) left locked by a dead worker repaired");
        }
    }
}

fn fd_readable(fd: BorrowedFd<'_>) -> bool {
    let mut p = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut p, PollTimeout::ZERO), Ok(1))
        && p[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
}
