//! A fake worker for the supervision tests (`tests.rs`, on the test bed of
//! `test_bed.rs`) and the `vhost_user` fuzz target (`crate::fuzz`): the
//! VMM's requests go through the real backend, device and queue pairs; the
//! workers are [`FakeWorker`]s that die, refuse or stop answering at the
//! moments a test (or the fuzzer) chooses, and record every request they get
//! (checked against `Request::check_fds`, the one rule of what travels
//! beside each request).

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::eventfd::EventFd;
use qpnet_ipc::{IpcError, Reply, Request, PROTOCOL_VERSION};

use super::link::{Launch, LaunchError, LinkError, WorkerLink};

// ---- the fake worker ---------------------------------------------------------

/// What a fake worker does with a request instead of answering it.
#[derive(Debug, Clone)]
pub(crate) enum Fault {
    /// Die (its control socket closes).
    Die,
    /// Stop answering (the request times out).
    Hang,
    /// Answer `Reply::Error`.
    Refuse(&'static str),
}

/// A fault for queue pair `qp`'s workers, on the request named `request`,
/// after `skip` such requests went through.
pub(crate) struct Plan {
    pub(crate) qp: u16,
    pub(crate) request: &'static str,
    pub(crate) skip: usize,
    pub(crate) fault: Fault,
}

/// A request a fake worker got.
#[derive(Debug, Clone)]
pub(crate) struct Got {
    pub(crate) pid: u32,
    pub(crate) req: Request,
    /// The primary's fd numbers that came with it (which of its files):
    /// read by the supervision tests, not by the fuzz target.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fds: Vec<RawFd>,
}

/// Everything the fake workers share with the test.
#[derive(Default)]
pub(crate) struct World {
    next_pid: u32,
    /// Workers launched, (queue pair, pid), in order.
    pub(crate) launched: Vec<(u16, u32)>,
    /// Every request a worker got, in order.
    pub(crate) log: Vec<Got>,
    /// Faults still to happen.
    pub(crate) plans: Vec<Plan>,
    /// Workers that died (or were killed).
    pub(crate) dead: HashSet<u32>,
    /// Workers the primary killed (and reaped), in order.
    pub(crate) killed: Vec<u32>,
    /// Launches of these queue pairs fail.
    pub(crate) launch_fails: HashSet<u16>,
    /// What StopRing answers.
    pub(crate) stop_at: u16,
}

impl World {
    fn fault(&mut self, qp: u16, request: &str) -> Option<Fault> {
        let k = self
            .plans
            .iter()
            .position(|p| p.qp == qp && p.request == request)?;
        if self.plans[k].skip > 0 {
            self.plans[k].skip -= 1;
            return None;
        }
        Some(self.plans.remove(k).fault)
    }
}

pub(crate) type Shared = Arc<Mutex<World>>;

pub(crate) fn lock(w: &Shared) -> MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) struct FakeLauncher(pub(crate) Shared);

impl Launch for FakeLauncher {
    fn launch(&self, queue_pair: u16) -> Result<Box<dyn WorkerLink>, LaunchError> {
        let mut w = lock(&self.0);
        if w.launch_fails.contains(&queue_pair) {
            return Err(LaunchError::Spawn(
                queue_pair,
                std::io::Error::other("fake launch failure"),
            ));
        }
        w.next_pid += 1;
        let pid = 1000 + w.next_pid;
        w.launched.push((queue_pair, pid));
        Ok(Box::new(FakeWorker {
            world: self.0.clone(),
            qp: queue_pair,
            pid,
            pidfd: EventFd::new().expect("eventfd").into(),
        }))
    }
}

pub(crate) struct FakeWorker {
    world: Shared,
    qp: u16,
    pid: u32,
    pidfd: OwnedFd,
}

impl FakeWorker {
    fn error(&self, req: &Request, source: IpcError) -> LinkError {
        LinkError {
            queue_pair: self.qp,
            pid: self.pid,
            request: req.name(),
            source,
        }
    }
}

impl WorkerLink for FakeWorker {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    fn request(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<Reply, LinkError> {
        let mut w = lock(&self.world);
        if w.dead.contains(&self.pid) {
            return Err(self.error(req, IpcError::Closed));
        }
        // The one rule of what travels beside each request.
        req.check_fds(fds)
            .unwrap_or_else(|e| panic!("{req:?} sent with bad fds: {e}"));
        w.log.push(Got {
            pid: self.pid,
            req: req.clone(),
            fds: fds.iter().map(|fd| fd.as_raw_fd()).collect(),
        });
        match w.fault(self.qp, req.name()) {
            Some(Fault::Die) => {
                w.dead.insert(self.pid);
                Err(self.error(req, IpcError::Closed))
            }
            Some(Fault::Hang) => Err(self.error(req, IpcError::Timeout(Duration::from_secs(3)))),
            Some(Fault::Refuse(m)) => Ok(Reply::Error { message: m.into() }),
            None => Ok(match req {
                Request::Hello { .. } => Reply::Hello {
                    version: PROTOCOL_VERSION,
                    pid: self.pid,
                },
                Request::StopRing { .. } => Reply::RingStopped {
                    next_avail: w.stop_at,
                },
                _ => Reply::Ok,
            }),
        }
    }

    fn try_reap(&mut self) -> Option<String> {
        let w = lock(&self.world);
        w.dead
            .contains(&self.pid)
            .then(|| "killed by SIGKILL".to_string())
    }

    fn kill(&mut self) {
        // Once, as a real worker is killed and reaped once.
        let mut w = lock(&self.world);
        w.dead.insert(self.pid);
        if !w.killed.contains(&self.pid) {
            w.killed.push(self.pid);
        }
    }

    fn shutdown(&mut self) {
        lock(&self.world).dead.insert(self.pid);
    }
}
