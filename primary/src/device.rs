//! The device state machine: everything the VMM has told us about the
//! device (features, memory table, per-ring size/addresses/base/eventfds/
//! enable), and the rule that turns it into worker requests.
//!
//! Theory of operation (ring hand-over):
//! - A ring is *ready* when the memory table, its size, its addresses and its
//!   kick eventfd are known and it is enabled (rings start enabled when
//!   VHOST_USER_F_PROTOCOL_FEATURES was not negotiated, disabled otherwise).
//! - Every request that changes a ring first stops it in its worker if it is
//!   running (the worker answers with the next available index, which becomes
//!   the ring's base), then applies the change, then starts it again if it is
//!   ready. So a worker only ever holds fully described, enabled rings, and
//!   the base is always exact: workers complete chains strictly in order.
//! - GET_VRING_BASE stops the ring and forgets its kick fd: per the protocol
//!   the ring stays stopped until the next SET_VRING_KICK.
//! - SET_MEM_TABLE stops each running ring, hands the new table to every
//!   worker, and starts the rings again with addresses translated through the
//!   new table.
//! - Every worker request is answered before the VMM's request is answered.
//!
//! If a worker dies, its queue pair is rebuilt on a new worker from this
//! state; its running rings resume at the used index read from guest memory
//! (see [`Device::resume_rings`]).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use qpnet_ipc::memory_table::validate_table;
use qpnet_ipc::{check_eventfd, MemoryRegion, Reply, Request, RingConfig, RingKind};
use qpnet_shared::{monotonic_ns, QueueStats, SharedRegion, WorkerState};
use vhost::vhost_user::message::VhostUserMemoryRegion;

use crate::features;
use crate::supervisor::{self, Decision, Policy, QueuePairHealth};
use crate::tap::Tap;
use crate::workers::{make_cloexec, Worker};

/// Largest virtqueue size (split rings: 2^15).
pub const MAX_QUEUE_SIZE: u32 = 32768;

/// Why a VMM request was refused. The message goes to the log and, with
/// REPLY_ACK, a failure code goes back to the VMM.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// Result of a device operation.
pub type DevResult<T> = std::result::Result<T, Refusal>;

fn refuse<T>(msg: impl Into<String>) -> DevResult<T> {
    Err(Refusal(msg.into()))
}

/// Static configuration of the device.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Number of queue pairs (1..=16).
    pub queue_pairs: u16,
    /// MAC address reported in the config space.
    pub mac: [u8; 6],
    /// Whether workers record flows in the shared flow table.
    pub flow_tracking: bool,
}

/// Ring addresses in the VMM's virtual address space.
#[derive(Debug, Clone, Copy)]
struct VringAddr {
    desc: u64,
    avail: u64,
    used: u64,
}

#[derive(Debug, Default)]
struct Vring {
    num: Option<u16>,
    addr: Option<VringAddr>,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    enabled: bool,
    /// Running in the queue pair's worker, or owed to its next worker (the
    /// worker died and its replacement has not started yet).
    started: bool,
    /// The worker (by [`Worker::serial`]) that acknowledged this ring's
    /// start: a ring stays `started` (owed) until a worker has it.
    on_worker: Option<u64>,
}

/// A memory region as the VMM described it (copied out of the packed
/// protocol struct).
#[derive(Debug, Clone, Copy)]
struct RegionInfo {
    guest_phys_addr: u64,
    memory_size: u64,
    user_addr: u64,
    mmap_offset: u64,
}

impl From<&VhostUserMemoryRegion> for RegionInfo {
    fn from(r: &VhostUserMemoryRegion) -> RegionInfo {
        RegionInfo {
            guest_phys_addr: r.guest_phys_addr,
            memory_size: r.memory_size,
            user_addr: r.user_addr,
            mmap_offset: r.mmap_offset,
        }
    }
}

struct GuestRegion {
    info: RegionInfo,
    file: File,
}

impl GuestRegion {
    /// The region as workers get it (no VMM address).
    fn table_entry(&self) -> MemoryRegion {
        MemoryRegion {
            guest_phys_addr: self.info.guest_phys_addr,
            size: self.info.memory_size,
            mmap_offset: self.info.mmap_offset,
        }
    }
}

/// The device and the workers that run its queue pairs.
pub struct Device {
    config: DeviceConfig,
    tap: Tap,
    shared: SharedRegion,
    workers: Vec<Option<Worker>>,
    features: u64,
    features_set: bool,
    protocol_features: u64,
    mem: Vec<GuestRegion>,
    vrings: Vec<Vring>,
    policy: Policy,
    health: Vec<QueuePairHealth>,
}

fn ring_bytes(kind: usize, num: u64) -> u64 {
    match kind {
        0 => 16 * num,    // descriptor table
        1 => 6 + 2 * num, // available ring incl. used_event
        _ => 6 + 8 * num, // used ring incl. avail_event
    }
}

impl Device {
    /// A device with no VMM yet, its workers started.
    pub fn new(config: DeviceConfig, tap: Tap, shared: SharedRegion, policy: Policy) -> Device {
        let n = config.queue_pairs as usize;
        let mut dev = Device {
            config,
            tap,
            shared,
            workers: (0..n).map(|_| None).collect(),
            features: 0,
            features_set: false,
            protocol_features: 0,
            mem: Vec::new(),
            vrings: (0..2 * n).map(|_| Vring::default()).collect(),
            policy,
            health: (0..n).map(|_| QueuePairHealth::default()).collect(),
        };
        for qp in 0..n {
            dev.bring_up(qp);
        }
        dev
    }

    /// Whether the driver's SET_FEATURES acknowledged PROTOCOL_FEATURES.
    pub fn protocol_features_acked(&self) -> bool {
        self.features_set && features::has_protocol_features(self.features)
    }

    /// Number of queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        self.config.queue_pairs
    }

    /// The shared region (counters, worker status).
    pub fn shared(&self) -> &SharedRegion {
        &self.shared
    }

    fn stats(&self, qp: usize) -> &QueueStats {
        self.shared
            .queue(qp)
            .expect("shared region has a block per queue pair")
    }

    /// Spawn a worker for `qp` and give it the instance-wide fds and the
    /// current features and memory table (not the rings).
    fn start_worker(&self, qp: u16) -> anyhow::Result<Worker> {
        let st = self.stats(qp as usize);
        st.set_worker_state(WorkerState::Starting);
        let mut w = Worker::spawn(qp)?;
        w.request_ok(
            &Request::AttachShared {
                flow_tracking: self.config.flow_tracking,
            },
            &[self.shared.fd()],
        )?;
        let tap_fd = self
            .tap
            .queue(qp as usize)
            .ok_or_else(|| anyhow::anyhow!("no TAP queue for queue pair {qp}"))?;
        w.request_ok(&Request::AttachTap, &[tap_fd.as_fd()])?;
        if self.features_set {
            w.request_ok(&self.features_request(), &[])?;
        }
        if !self.mem.is_empty() {
            let (req, fds) = self.mem_table_request();
            w.request_ok(&req, &fds)?;
        }
        st.pid.store(w.pid(), std::sync::atomic::Ordering::Relaxed);
        st.set_worker_state(WorkerState::Running);
        log::info!("queue pair {qp}: worker pid {} ready", w.pid());
        Ok(w)
    }

    fn features_request(&self) -> Request {
        let mtu = self.tap.mtu().unwrap_or(1500);
        Request::SetFeatures {
            features: self.features,
            max_rx_frame: features::max_rx_frame(self.features, mtu),
            header_len: features::header_len(self.features),
        }
    }

    fn mem_table_request(&self) -> (Request, Vec<BorrowedFd<'_>>) {
        let regions = self.mem.iter().map(GuestRegion::table_entry).collect();
        let fds = self.mem.iter().map(|r| r.file.as_fd()).collect();
        (Request::SetMemTable { regions }, fds)
    }

    /// Send a request to the worker of `qp`. A queue pair waiting out a
    /// restart back-off gets its worker now (the VMM is waiting). If the
    /// worker dies or stops answering it is replaced, and with `retry` the
    /// request is sent once more to the new worker (for requests whose
    /// effect the new worker must have).
    fn worker_call(
        &mut self,
        qp: usize,
        req: &Request,
        fds: &[BorrowedFd<'_>],
        retry: bool,
    ) -> DevResult<Reply> {
        if self.workers[qp].is_none() {
            if self.health[qp].failed {
                return refuse(format!(
                    "queue pair {qp} is failed after repeated worker crashes (qpnet retry, or a VMM reconnect, tries again)"
                ));
            }
            self.bring_up(qp);
        }
        for attempt in 0..2 {
            let Some(w) = self.workers[qp].as_mut() else {
                break;
            };
            match w.request(req, fds) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    self.handle_death(qp, &format!("{e:#}"));
                    if !retry || attempt == 1 {
                        return refuse(format!("worker of queue pair {qp} failed: {e:#}"));
                    }
                }
            }
        }
        refuse(format!("queue pair {qp} has no worker"))
    }

    fn worker_call_ok(
        &mut self,
        qp: usize,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> DevResult<()> {
        match self.worker_call(qp, req, fds, true)? {
            Reply::Ok => Ok(()),
            Reply::Error { message } => refuse(format!("queue pair {qp}: {message}")),
            other => refuse(format!("queue pair {qp}: unexpected reply {other:?}")),
        }
    }

    /// Start a worker for `qp` and hand it the queue pair's rings; on
    /// failure, treat it as a crash.
    fn bring_up(&mut self, qp: usize) {
        self.health[qp].started(Instant::now());
        match self.start_worker(qp as u16) {
            Ok(w) => {
                self.workers[qp] = Some(w);
                self.resume_rings(qp);
            }
            Err(e) => self.handle_death(qp, &format!("could not start: {e:#}")),
        }
    }

    /// Give a new worker the rings its predecessor ran: each resumes at the
    /// used index found in guest memory (chains are completed in order), and
    /// the guest is signalled once in case an interrupt was lost.
    fn resume_rings(&mut self, qp: usize) {
        // A ring stays owed (`started`) until a worker acknowledged it;
        // `on_worker` says which worker runs it. If the worker dies during
        // the hand-over, its successor's bring_up (now, after a back-off, or
        // after qpnet retry) resumes every owed ring.
        let Some(serial) = self.workers[qp].as_ref().map(Worker::serial) else {
            return;
        };
        for i in [2 * qp, 2 * qp + 1] {
            if !self.vrings[i].started || self.vrings[i].on_worker == Some(serial) {
                continue;
            }
            match self.read_used_idx(i) {
                Some(idx) => self.vrings[i].base = idx,
                None => log::warn!("ring {i}: cannot read its used index; resuming at base"),
            }
            if let Err(e) = self.start_ring(i, true) {
                log::error!("ring {i}: not resumed on the new worker: {e}");
            }
            if self.workers[qp].as_ref().map(Worker::serial) != Some(serial) {
                // That worker died too; its successor resumed what is owed.
                return;
            }
        }
    }

    /// The worker of `qp` died (or must die): reap it, count it, and start a
    /// new one now, later (back-off), or never (crash loop).
    fn handle_death(&mut self, qp: usize, why: &str) {
        let pid = match self.workers[qp].take() {
            Some(mut old) => {
                old.kill();
                old.pid().to_string()
            }
            None => "-".into(),
        };
        self.repair_flow_table();
        {
            let st = self.stats(qp);
            QueueStats::add(&st.restarts, 1);
            st.pid.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        let decision = self.health[qp].died(Instant::now(), &self.policy);
        match decision {
            Decision::RespawnNow => {
                log::warn!("queue pair {qp}: worker {pid} gone ({why}); starting a new one");
                self.stats(qp).set_worker_state(WorkerState::Restarting);
                self.bring_up(qp);
            }
            Decision::RespawnAt(at) => {
                let ms = at.saturating_duration_since(Instant::now()).as_millis();
                log::warn!(
                    "queue pair {qp}: worker {pid} gone ({why}); crashing repeatedly, next start in {ms} ms"
                );
                self.stats(qp).set_worker_state(WorkerState::Restarting);
            }
            Decision::Fail => {
                log::error!(
                    "queue pair {qp}: worker {pid} gone ({why}); {} crashes within {:?}: queue pair marked failed, its rings left alone (qpnet retry to try again)",
                    self.health[qp].recent_deaths(),
                    self.policy.crash_window
                );
                self.stats(qp).set_worker_state(WorkerState::Failed);
                if let Some(t) = self.shared.flow_table() {
                    let r = t.remove_owned_by(qp);
                    log::info!("queue pair {qp}: {} of its flows removed", r.removed);
                }
            }
        }
    }

    /// A worker died, possibly inside a flow-table critical section: repair
    /// any stripe it left locked now instead of by its next user.
    fn repair_flow_table(&self) {
        if let Some(t) = self.shared.flow_table() {
            let repaired = t.recover_abandoned();
            if repaired > 0 {
                log::warn!(
                    "flow table: {repaired} stripe(s) left locked by a dead worker repaired"
                );
            }
        }
    }

    /// Called when a worker's pidfd fires: reap and replace it.
    pub fn worker_exited(&mut self, qp: usize) {
        let why = self.workers[qp]
            .as_mut()
            .and_then(|w| w.try_reap())
            .unwrap_or_else(|| "its process ended".into());
        self.handle_death(qp, &why);
    }

    /// Periodic supervision: restarts due after a back-off, and the watchdog.
    pub fn supervise(&mut self) {
        let now = Instant::now();
        for qp in 0..self.workers.len() {
            if self.workers[qp].is_none() {
                if matches!(self.health[qp].respawn_at, Some(t) if t <= now) {
                    self.bring_up(qp);
                }
                continue;
            }
            let hb = QueueStats::get(&self.stats(qp).heartbeat_ns);
            let age = Duration::from_nanos(monotonic_ns().saturating_sub(hb));
            if hb != 0 && supervisor::is_wedged(&self.policy, age, || self.has_work(qp)) {
                self.handle_death(
                    qp,
                    &format!(
                        "wedged: no heartbeat for {} ms while it has work",
                        age.as_millis()
                    ),
                );
            }
        }
    }

    /// When [`Device::supervise`] should run next.
    pub fn next_supervision(&self) -> Option<Instant> {
        let now = Instant::now();
        let backoff = self.health.iter().filter_map(|h| h.respawn_at).min();
        let tick = self
            .policy
            .watchdog
            .map(|w| now + (w / 4).clamp(Duration::from_millis(20), Duration::from_millis(250)));
        [backoff, tick].into_iter().flatten().min()
    }

    /// Whether queue pair `qp` has work a live worker would be doing: TX
    /// chains not yet used, or TAP frames waiting while RX buffers are posted.
    fn has_work(&self, qp: usize) -> bool {
        let pending = |i: usize| {
            self.vrings[i].started
                && matches!((self.read_avail_idx(i), self.read_used_idx(i)), (Some(a), Some(u)) if a != u)
        };
        if pending(2 * qp + 1) {
            return true;
        }
        pending(2 * qp) && self.tap.queue(qp).is_some_and(|fd| fd_readable(fd.as_fd()))
    }

    /// Forget crash histories and start workers for failed queue pairs
    /// (`qpnet retry`, or a new VMM).
    pub fn retry_failed(&mut self) {
        for qp in 0..self.workers.len() {
            if self.health[qp].failed {
                log::info!("queue pair {qp}: retrying after failure");
                self.health[qp].clear();
                self.bring_up(qp);
            }
        }
    }

    /// The pidfds of the current workers, with their queue pair.
    pub fn worker_pidfds(&self) -> Vec<(usize, BorrowedFd<'_>)> {
        self.workers
            .iter()
            .enumerate()
            .filter_map(|(qp, w)| w.as_ref().map(|w| (qp, w.pidfd())))
            .collect()
    }

    /// Read a ring's used index from guest memory through the region's fd
    /// (the primary never maps guest memory).
    fn read_used_idx(&self, index: usize) -> Option<u16> {
        self.read_ring_u16(self.vrings[index].addr?.used, 2)
    }

    /// Read a ring's available index the same way.
    fn read_avail_idx(&self, index: usize) -> Option<u16> {
        self.read_ring_u16(self.vrings[index].addr?.avail, 2)
    }

    fn read_ring_u16(&self, va: u64, offset: u64) -> Option<u16> {
        let (region, gpa) = self.translate(va, offset + 2)?;
        let off = region.info.mmap_offset + (gpa - region.info.guest_phys_addr) + offset;
        let mut b = [0u8; 2];
        region.file.read_exact_at(&mut b, off).ok()?;
        Some(u16::from_le_bytes(b))
    }

    /// Translate `len` bytes at VMM virtual address `va` to a guest-physical
    /// address, if the whole range lies inside one region.
    fn translate(&self, va: u64, len: u64) -> Option<(&GuestRegion, u64)> {
        self.mem.iter().find_map(|r| {
            let start = r.info.user_addr;
            let end = start.checked_add(r.info.memory_size)?;
            let last = va.checked_add(len)?;
            (va >= start && last <= end).then(|| (r, r.info.guest_phys_addr + (va - start)))
        })
    }

    fn check_index(&self, index: u32) -> DevResult<usize> {
        let n = 2 * self.config.queue_pairs as u32;
        if index >= n {
            return refuse(format!(
                "vring index {index} out of range: this device has {n} rings ({} queue pairs)",
                self.config.queue_pairs
            ));
        }
        Ok(index as usize)
    }

    fn ring_ready(&self, i: usize) -> bool {
        let v = &self.vrings[i];
        let enabled = v.enabled || !features::has_protocol_features(self.features);
        !self.mem.is_empty() && v.num.is_some() && v.addr.is_some() && v.kick.is_some() && enabled
    }

    /// Stop ring `i` in its worker if it runs; its base becomes the worker's
    /// next available index.
    fn stop_ring(&mut self, i: usize) -> DevResult<()> {
        if !self.vrings[i].started {
            return Ok(());
        }
        let qp = i / 2;
        let kind = RingKind::of_vring(i as u32);
        // Marked stopped first: if the worker dies during this call, the
        // replacement must not restart this ring.
        self.vrings[i].started = false;
        let reply = if self.workers[qp].is_some() {
            self.worker_call(qp, &Request::StopRing { kind }, &[], false)
        } else {
            refuse("no worker")
        };
        match reply {
            Ok(Reply::RingStopped { next_avail }) => {
                self.vrings[i].base = next_avail;
                Ok(())
            }
            Ok(Reply::Error { message }) => refuse(format!("ring {i}: {message}")),
            Ok(other) => refuse(format!("ring {i}: unexpected reply {other:?}")),
            Err(_) => {
                // No worker (it died, or is waiting out a back-off); chains
                // are completed in order, so the used index in guest memory
                // is where the ring stopped.
                if let Some(idx) = self.read_used_idx(i) {
                    self.vrings[i].base = idx;
                }
                Ok(())
            }
        }
    }

    /// Start ring `i` in its worker if it is ready and not running.
    fn sync_ring(&mut self, i: usize) -> DevResult<()> {
        if self.vrings[i].started || !self.ring_ready(i) {
            return Ok(());
        }
        if self.health[i / 2].failed {
            // Owed to the queue pair's next worker (qpnet retry, new VMM).
            self.vrings[i].started = true;
            return Ok(());
        }
        self.start_ring(i, false)
    }

    fn start_ring(&mut self, i: usize, signal_on_start: bool) -> DevResult<()> {
        let v = &self.vrings[i];
        let (Some(num), Some(addr), Some(kick)) = (v.num, v.addr, v.kick.as_ref()) else {
            return refuse(format!("ring {i} is not fully described"));
        };
        let n = num as u64;
        let gpa = |va: u64, kind: usize, what: &str| {
            self.translate(va, ring_bytes(kind, n))
                .map(|(_, g)| g)
                .ok_or_else(|| {
                    Refusal(format!(
                        "ring {i}: {what} at VMM address {va:#x} (+{}) is outside the memory table",
                        ring_bytes(kind, n)
                    ))
                })
        };
        let config = RingConfig {
            kind: RingKind::of_vring(i as u32),
            size: num,
            desc_table: gpa(addr.desc, 0, "descriptor table")?,
            avail_ring: gpa(addr.avail, 1, "available ring")?,
            used_ring: gpa(addr.used, 2, "used ring")?,
            next_avail: v.base,
            has_call: v.call.is_some(),
            signal_on_start,
        };
        let mut fds = vec![kick.as_fd()];
        if let Some(c) = v.call.as_ref() {
            fds.push(c.as_fd());
        }
        // The fds borrow self.vrings; dup them so the worker call can borrow
        // self mutably.
        let owned: Vec<std::os::fd::OwnedFd> = fds
            .iter()
            .map(|f| f.try_clone_to_owned())
            .collect::<Result<_, _>>()
            .map_err(|e| Refusal(format!("ring {i}: dup of eventfd failed: {e}")))?;
        let borrowed: Vec<BorrowedFd<'_>> = owned.iter().map(|f| f.as_fd()).collect();
        // A resume is not retried here: the replacement's own bring_up
        // resumes every owed ring.
        match self.worker_call(
            i / 2,
            &Request::StartRing(config),
            &borrowed,
            !signal_on_start,
        )? {
            Reply::Ok => {}
            Reply::Error { message } => return refuse(format!("queue pair {}: {message}", i / 2)),
            other => return refuse(format!("queue pair {}: unexpected reply {other:?}", i / 2)),
        }
        self.vrings[i].started = true;
        self.vrings[i].on_worker = self.workers[i / 2].as_ref().map(Worker::serial);
        log::debug!(
            "ring {i}: started at {} ({} entries)",
            config.next_avail,
            num
        );
        Ok(())
    }

    /// Stop, change, and start again if ready: every ring-changing request
    /// goes through here.
    fn update_ring(&mut self, index: u32, change: impl FnOnce(&mut Vring)) -> DevResult<()> {
        let i = self.check_index(index)?;
        self.stop_ring(i)?;
        change(&mut self.vrings[i]);
        self.sync_ring(i)
    }

    /// VMM disconnected or reset the device: stop every ring, forget the
    /// guest's memory (workers unmap it), and wait for the next driver.
    pub fn reset(&mut self) {
        for i in 0..self.vrings.len() {
            if let Err(e) = self.stop_ring(i) {
                log::warn!("reset: {e}");
            }
        }
        self.vrings = (0..self.vrings.len()).map(|_| Vring::default()).collect();
        self.mem.clear();
        self.features = 0;
        self.features_set = false;
        self.protocol_features = 0;
        for qp in 0..self.workers.len() {
            if self.workers[qp].is_none() {
                continue;
            }
            let req = Request::SetMemTable { regions: vec![] };
            if let Err(e) = self.worker_call_ok(qp, &req, &[]) {
                log::warn!("reset: {e}");
            }
        }
        // A new VMM gets a fresh chance for queue pairs given up on.
        self.retry_failed();
    }

    /// Stop every worker (primary shutdown).
    pub fn shutdown(&mut self) {
        for (qp, w) in self.workers.iter_mut().enumerate() {
            if let Some(w) = w.take() {
                w.shutdown();
            }
            if let Some(s) = self.shared.queue(qp) {
                s.set_worker_state(WorkerState::Stopped);
            }
        }
    }

    // ---- vhost-user requests ---------------------------------------------

    /// SET_FEATURES.
    pub fn set_features(&mut self, features: u64) -> DevResult<()> {
        let unknown = features & !features::OFFERED;
        if unknown != 0 {
            return refuse(format!(
                "driver acknowledged features {unknown:#x} that were not offered"
            ));
        }
        self.features = features;
        self.features_set = true;
        if let Err(e) = self.tap.set_header_len(features::header_len(features)) {
            return refuse(format!("{e}"));
        }
        if let Err(e) = self.tap.set_offloads(features::tap_offloads(features)) {
            return refuse(format!("{e}"));
        }
        let req = self.features_request();
        for qp in 0..self.workers.len() {
            if self.health[qp].failed {
                continue; // its next worker gets them at start
            }
            self.worker_call_ok(qp, &req, &[])?;
        }
        Ok(())
    }

    /// SET_PROTOCOL_FEATURES.
    pub fn set_protocol_features(&mut self, features: u64) -> DevResult<()> {
        let unknown = features & !features::protocol_offered().bits();
        if unknown != 0 {
            return refuse(format!("protocol features {unknown:#x} were not offered"));
        }
        self.protocol_features = features;
        Ok(())
    }

    /// SET_MEM_TABLE: validate, then hand the new table to every worker.
    pub fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> DevResult<()> {
        if regions.len() != files.len() {
            return refuse(format!("{} regions but {} fds", regions.len(), files.len()));
        }
        for f in &files {
            make_cloexec(f.as_fd());
        }
        let new: Vec<GuestRegion> = regions
            .iter()
            .zip(files)
            .map(|(r, file)| GuestRegion {
                info: r.into(),
                file,
            })
            .collect();
        validate_regions(&new)?;
        let running: Vec<usize> = (0..self.vrings.len())
            .filter(|&i| self.vrings[i].started)
            .collect();
        for &i in &running {
            self.stop_ring(i)?;
        }
        self.mem = new;
        let mut result = Ok(());
        for qp in 0..self.workers.len() {
            if self.health[qp].failed {
                continue; // its next worker gets it at start
            }
            let (req, fds) = self.mem_table_request();
            let owned: Vec<std::os::fd::OwnedFd> = fds
                .iter()
                .filter_map(|f| f.try_clone_to_owned().ok())
                .collect();
            let borrowed: Vec<BorrowedFd<'_>> = owned.iter().map(|f| f.as_fd()).collect();
            if let Err(e) = self.worker_call_ok(qp, &req, &borrowed) {
                result = Err(e);
            }
        }
        for i in 0..self.vrings.len() {
            if let Err(e) = self.sync_ring(i) {
                log::warn!("after SET_MEM_TABLE: {e}");
                result = result.and(Err(e));
            }
        }
        log::info!(
            "memory table: {} region(s), {} MiB",
            self.mem.len(),
            self.mem.iter().map(|r| r.info.memory_size).sum::<u64>() >> 20
        );
        result
    }

    /// SET_VRING_NUM.
    pub fn set_vring_num(&mut self, index: u32, num: u32) -> DevResult<()> {
        if num == 0 || !num.is_power_of_two() || num > MAX_QUEUE_SIZE {
            self.check_index(index)?;
            return refuse(format!(
                "vring {index}: queue size {num} refused: must be a power of two from 1 to {MAX_QUEUE_SIZE}"
            ));
        }
        self.update_ring(index, |v| v.num = Some(num as u16))
    }

    /// SET_VRING_ADDR (addresses in the VMM's virtual address space).
    pub fn set_vring_addr(
        &mut self,
        index: u32,
        desc: u64,
        used: u64,
        avail: u64,
    ) -> DevResult<()> {
        let i = self.check_index(index)?;
        if !desc.is_multiple_of(16) || !avail.is_multiple_of(2) || !used.is_multiple_of(4) {
            return refuse(format!(
                "vring {index}: misaligned ring addresses (desc {desc:#x} needs 16, avail {avail:#x} 2, used {used:#x} 4)"
            ));
        }
        if !self.mem.is_empty() {
            let n = self.vrings[i].num.unwrap_or(1) as u64;
            for (va, kind, what) in [
                (desc, 0, "descriptor table"),
                (avail, 1, "available ring"),
                (used, 2, "used ring"),
            ] {
                if self.translate(va, ring_bytes(kind, n)).is_none() {
                    return refuse(format!(
                        "vring {index}: {what} at VMM address {va:#x} is outside the memory table"
                    ));
                }
            }
        }
        self.update_ring(index, |v| v.addr = Some(VringAddr { desc, avail, used }))
    }

    /// SET_VRING_BASE.
    pub fn set_vring_base(&mut self, index: u32, base: u32) -> DevResult<()> {
        if base > u16::MAX as u32 {
            self.check_index(index)?;
            return refuse(format!(
                "vring {index}: base {base} does not fit a 16-bit ring index"
            ));
        }
        self.update_ring(index, |v| v.base = base as u16)
    }

    /// GET_VRING_BASE: stop the ring and return where it stopped.
    pub fn get_vring_base(&mut self, index: u32) -> DevResult<u16> {
        let i = self.check_index(index)?;
        self.stop_ring(i)?;
        self.vrings[i].kick = None;
        Ok(self.vrings[i].base)
    }

    /// SET_VRING_KICK.
    pub fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> DevResult<()> {
        let fd = match fd {
            Some(f) => f,
            None => {
                self.check_index(index as u32)?;
                return refuse(format!(
                    "vring {index}: polling mode (no kick eventfd) is not supported"
                ));
            }
        };
        make_cloexec(fd.as_fd());
        if let Err(e) = check_eventfd("kick", fd.as_fd()) {
            self.check_index(index as u32)?;
            return refuse(format!("vring {index}: {e}"));
        }
        self.update_ring(index as u32, |v| v.kick = Some(fd))
    }

    /// SET_VRING_CALL.
    pub fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> DevResult<()> {
        if let Some(f) = fd.as_ref() {
            make_cloexec(f.as_fd());
            if let Err(e) = check_eventfd("call", f.as_fd()) {
                self.check_index(index as u32)?;
                return refuse(format!("vring {index}: {e}"));
            }
        }
        self.update_ring(index as u32, |v| v.call = fd)
    }

    /// SET_VRING_ERR: accepted (checked) but unused.
    pub fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> DevResult<()> {
        self.check_index(index as u32)?;
        if let Some(f) = fd.as_ref() {
            make_cloexec(f.as_fd());
            if let Err(e) = check_eventfd("error", f.as_fd()) {
                return refuse(format!("vring {index}: {e}"));
            }
        }
        Ok(())
    }

    /// SET_VRING_ENABLE.
    pub fn set_vring_enable(&mut self, index: u32, enable: bool) -> DevResult<()> {
        self.update_ring(index, |v| v.enabled = enable)
    }

    /// GET_CONFIG: the virtio-net config space (mac, status, max pairs, mtu).
    pub fn get_config(&self, offset: u32, size: u32) -> DevResult<Vec<u8>> {
        let mut space = Vec::with_capacity(12);
        space.extend_from_slice(&self.config.mac);
        space.extend_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
        space.extend_from_slice(&self.config.queue_pairs.to_le_bytes());
        let mtu = self.tap.mtu().unwrap_or(1500).min(u16::MAX as u32) as u16;
        space.extend_from_slice(&mtu.to_le_bytes());
        let (o, s) = (offset as usize, size as usize);
        match o.checked_add(s) {
            Some(end) if end <= space.len() => Ok(space[o..end].to_vec()),
            _ => refuse(format!(
                "GET_CONFIG offset {offset} size {size} outside the {}-byte config space",
                space.len()
            )),
        }
    }
}

fn fd_readable(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) == 1 && p.revents & libc::POLLIN != 0 }
}

/// Check a memory table: the rules every worker checks too
/// (`qpnet_ipc::memory_table`, the same function), plus the one only the
/// primary can check: no wrap-around or overlap in the VMM's address space
/// (ring addresses are translated through it).
fn validate_regions(regions: &[GuestRegion]) -> DevResult<()> {
    let table: Vec<MemoryRegion> = regions.iter().map(GuestRegion::table_entry).collect();
    let files: Vec<&File> = regions.iter().map(|r| &r.file).collect();
    validate_table(&table, &files).map_err(|e| Refusal(format!("memory table refused: {e}")))?;
    for (n, r) in regions.iter().enumerate() {
        let i = &r.info;
        let end = i.user_addr.checked_add(i.memory_size).ok_or_else(|| {
            Refusal(format!(
                "memory region {n} wraps around the VMM's address space"
            ))
        })?;
        for (m, o) in regions.iter().enumerate().take(n) {
            let o = &o.info;
            // No overflow: checked for region m on its own turn.
            if i.user_addr < o.user_addr + o.memory_size && o.user_addr < end {
                return refuse(format!(
                    "memory regions {m} and {n} overlap in VMM address space"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn memfd(len: u64) -> File {
        let fd = nix::sys::memfd::memfd_create(c"qpnet-test", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd_create");
        nix::unistd::ftruncate(&fd, len as i64).expect("ftruncate");
        File::from(fd)
    }

    fn region(gpa: u64, size: u64, mmap_offset: u64, file_len: u64) -> GuestRegion {
        GuestRegion {
            info: RegionInfo {
                guest_phys_addr: gpa,
                memory_size: size,
                user_addr: 0x7f00_0000_0000 + gpa,
                mmap_offset,
            },
            file: memfd(file_len),
        }
    }

    /// The primary and the worker refuse the same bad tables, for the same
    /// reason: both run `qpnet_ipc::memory_table::validate_table`.
    #[test]
    fn primary_and_worker_refuse_the_same_tables_alike() {
        const G: u64 = 0x1_0000_0000;
        let tables: Vec<(&str, Vec<GuestRegion>)> = vec![
            ("empty", vec![]),
            ("size 0", vec![region(G, 0, 0, 0x1000)]),
            ("wraps", vec![region(u64::MAX - 0xfff, 0x2000, 0, 0x2000)]),
            ("unaligned offset", vec![region(G, 0x1000, 0x10, 0x2000)]),
            (
                "past the end of its file",
                vec![region(G, 0x2000, 0, 0x1000)],
            ),
            (
                "overlap",
                vec![
                    region(G, 0x2000, 0, 0x2000),
                    region(G + 0x1000, 0x1000, 0, 0x1000),
                ],
            ),
            (
                "nine regions",
                (0..9)
                    .map(|i| region(G + (i << 20), 0x1000, 0, 0x1000))
                    .collect(),
            ),
        ];
        for (what, regions) in tables {
            let primary = validate_regions(&regions).expect_err(what).0;
            let table: Vec<MemoryRegion> = regions.iter().map(GuestRegion::table_entry).collect();
            let fds: Vec<OwnedFd> = regions.into_iter().map(|r| OwnedFd::from(r.file)).collect();
            let worker = qpnet_secondary::GuestMemoryMap::map_regions(&table, fds)
                .expect_err(what)
                .to_string();
            assert_eq!(
                primary,
                format!("memory table refused: {worker}"),
                "{what}: the two sides disagree"
            );
        }
    }

    #[test]
    fn only_the_primary_checks_the_vmm_address_space() {
        let mut a = region(0x1_0000_0000, 0x2000, 0, 0x2000);
        let mut b = region(0x2_0000_0000, 0x2000, 0, 0x2000);
        a.info.user_addr = 0x7f00_0000_0000;
        b.info.user_addr = 0x7f00_0000_1000;
        let e = validate_regions(&[a, b]).unwrap_err().0;
        assert!(e.contains("overlap in VMM address space"), "{e}");
    }
}
