//! Supervision: one [`QueuePair`] per queue pair, each owning its worker,
//! its crash history and its rings' hand-over, and the events of the
//! primary's loop that drive them.
//!
//! Theory of operation:
//! - Events come from the loop (`server.rs`) only: a worker's pidfd fired
//!   ([`Supervisor::worker_exited`]), `qpnet retry` (SIGUSR1,
//!   [`Supervisor::retry_failed`]), and after every wake-up and every VMM
//!   request [`Supervisor::supervise`]: deaths to act on, starts that are
//!   due (first start, restart, back-off over, retry), and the watchdog.
//!   [`Supervisor::next_supervision`] tells the loop how long it may sleep.
//! - Actions a VMM request asks for ([`Supervisor::stop_ring`],
//!   [`Supervisor::sync_ring`], [`Supervisor::send_to_all`]) go to the queue
//!   pairs concerned. If a worker dies during one, that queue pair is only
//!   marked dead; the request completes (rings owed, state kept for the next
//!   worker) and is answered, and the loop replaces the worker right after.
//!   No VMM request ever starts a worker.
//! - The policy (`policy.rs`) decides after each death: restart now, after
//!   a back-off, or mark the queue pair failed. Its worker link is a trait
//!   (`link.rs`): worker processes (`process.rs`) in the primary, a fake
//!   (`fake.rs`) in the tests (`tests.rs`, on `test_bed.rs`) and the
//!   `vhost_user` fuzz target (`crate::fuzz`).

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fake;
mod link;
mod policy;
mod process;
mod queue_pair;
#[cfg(test)]
mod test_bed;
#[cfg(test)]
mod tests;

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use qpnet_ipc::Request;
use qpnet_shared::{QueueStats, SharedRegion};

use crate::device::{DevResult, Device};
use crate::frame_io::HostSide;
use crate::stream::Watch;
use link::Launch;
pub use policy::Policy;
pub use process::{ProcessLauncher, WorkerBinary};
use queue_pair::QueuePair;

/// What every queue pair's worker is started with: the instance's resources
/// and settings.
pub struct Instance {
    /// The host side: a TAP or datagram sockets (one fd per queue pair).
    pub host: HostSide,
    /// The shared region (counters, worker status, flow table).
    pub shared: SharedRegion,
    /// Starts workers.
    pub launcher: Box<dyn Launch>,
    /// Back-off, crash-loop guard, watchdog.
    pub policy: Policy,
    /// Whether workers record flows in the shared flow table.
    pub flow_tracking: bool,
}

/// All queue pairs and what they share.
pub struct Supervisor {
    instance: Instance,
    queue_pairs: Vec<QueuePair>,
}

impl Supervisor {
    /// One queue pair per block of the shared region, each with its first
    /// worker due now (started by the first [`Supervisor::supervise`]).
    pub fn new(instance: Instance) -> Supervisor {
        let n = instance.shared.queue_pairs() as u16;
        Supervisor {
            instance,
            queue_pairs: (0..n).map(QueuePair::new).collect(),
        }
    }

    /// The host side.
    pub fn host(&self) -> &HostSide {
        &self.instance.host
    }

    /// The shared region.
    pub fn shared(&self) -> &SharedRegion {
        &self.instance.shared
    }

    /// Queue pair `qp`.
    #[cfg(test)]
    pub fn queue_pair(&self, qp: usize) -> &QueuePair {
        &self.queue_pairs[qp]
    }

    // ---- events from the loop -----------------------------------------------

    /// The pidfd of queue pair `qp`'s worker fired.
    pub fn worker_exited(&mut self, qp: usize) {
        self.queue_pairs[qp].exited();
    }

    /// Act on deaths, start the workers that are due, run the watchdog.
    pub fn supervise(&mut self, dev: &Device) {
        for qp in &mut self.queue_pairs {
            qp.supervise(&mut self.instance, dev);
        }
    }

    /// The host side's fds the loop polls (stream connections and
    /// listeners), with their queue pair and what they wait for.
    pub fn host_poll_fds(&self) -> Vec<(usize, Watch, BorrowedFd<'_>)> {
        match &self.instance.host {
            HostSide::Stream(links) => links.poll_fds(),
            _ => Vec::new(),
        }
    }

    /// Act on the host side's events (`fired`) and due connects: a queue
    /// pair with a new connection gets it attached to its worker.
    pub fn host_service(&mut self, fired: &[(usize, Watch)]) {
        let shared = &self.instance.shared;
        let links = match &mut self.instance.host {
            HostSide::Stream(links) => links,
            HostSide::Datagram(sockets) => {
                sockets.revive(|qp| {
                    shared
                        .queue(qp)
                        .map_or(0, |q| QueueStats::get(&q.peer_unreachable))
                });
                return;
            }
            HostSide::Tap(_) => return,
        };
        for qp in links.service(fired) {
            if let Some(q) = self.queue_pairs.get_mut(qp) {
                q.attach_frame_io(&self.instance);
            }
        }
    }

    /// Give failed queue pairs a new worker at the loop's next turn
    /// (`qpnet retry`, or a new VMM).
    pub fn retry_failed(&mut self) {
        for qp in &mut self.queue_pairs {
            qp.retry();
        }
    }

    /// When [`Supervisor::supervise`] should run next.
    pub fn next_supervision(&self) -> Option<Instant> {
        let due = self
            .queue_pairs
            .iter()
            .filter_map(QueuePair::deadline)
            .min();
        let tick = self.instance.policy.watchdog.map(|w| {
            Instant::now() + (w / 4).clamp(Duration::from_millis(20), Duration::from_millis(250))
        });
        let connect = match &self.instance.host {
            HostSide::Stream(links) => links.deadline(),
            HostSide::Datagram(sockets) => sockets.deadline(),
            HostSide::Tap(_) => None,
        };
        [due, tick, connect].into_iter().flatten().min()
    }

    /// The pidfds of the live workers, with their queue pair.
    pub fn worker_pidfds(&self) -> Vec<(usize, BorrowedFd<'_>)> {
        self.queue_pairs
            .iter()
            .enumerate()
            .filter_map(|(n, qp)| qp.worker().map(|(_, fd)| (n, fd)))
            .collect()
    }

    /// Stop every worker (primary shutdown).
    pub fn shutdown(&mut self) {
        for qp in &mut self.queue_pairs {
            qp.shutdown(&self.instance);
        }
    }

    // ---- actions for VMM requests -------------------------------------------

    /// Stop vring `i` (see [`QueuePair::stop_ring`]); its new base, if any.
    pub fn stop_ring(&mut self, i: usize, dev: &Device) -> DevResult<Option<u16>> {
        self.queue_pairs[i / 2].stop_ring(i % 2, dev)
    }

    /// Start vring `i` if ready (see [`QueuePair::sync_ring`]).
    pub fn sync_ring(&mut self, i: usize, dev: &Device) -> DevResult<()> {
        self.queue_pairs[i / 2].sync_ring(i % 2, dev)
    }

    /// Send device-wide state to every live worker; the first refusal, after
    /// all were sent.
    pub fn send_to_all(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> DevResult<()> {
        let mut result = Ok(());
        for qp in &mut self.queue_pairs {
            if let Err(e) = qp.send(req, fds) {
                result = result.and(Err(e));
            }
        }
        result
    }
}
