//! The supervision tests' test bed (`tests.rs`): a real [`Backend`], device
//! and queue pairs over fake workers (`fake.rs`), with the VMM's usual
//! requests, and what the workers got.

use std::fs::File;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::eventfd::EventFd;
use qpnet_ipc::{Request, RingConfig};
use qpnet_shared::{QueueStats, SharedRegion, MIN_FLOW_CAPACITY};
use vhost::vhost_user::message::VhostUserMemoryRegion;

use super::fake::{lock, FakeLauncher, Fault, Plan, Shared};
use super::queue_pair::RingState;
use super::*;
use crate::backend::Backend;
use crate::device::{Device, DeviceConfig};

/// VMM address of guest-physical 0.
pub(super) const UA: u64 = 0x7f00_0000_0000;
pub(super) const MEM: u64 = 1 << 20;
pub(super) const RING: u16 = 256;

/// Ring `i`'s parts: descriptor table, available ring, used ring (VMM
/// addresses).
pub(super) fn ring_addrs(i: usize) -> (u64, u64, u64) {
    let base = UA + 0x1_0000 * i as u64;
    (base, base + 0x4000, base + 0x8000)
}

pub(super) struct Bed {
    pub(super) world: Shared,
    pub(super) backend: Backend,
    mem: File,
    dir: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(super) fn eventfd() -> File {
    File::from(OwnedFd::from(EventFd::new().expect("eventfd")))
}

fn policy() -> Policy {
    Policy {
        watchdog: Some(Duration::from_secs(1)),
        crash_limit: 5,
        crash_window: Duration::from_secs(10),
    }
}

pub(super) fn bed(queue_pairs: u16) -> Bed {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "qpnet-supervision-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let shared = SharedRegion::create_with(
        &dir.join("stats.shm"),
        queue_pairs as usize,
        MIN_FLOW_CAPACITY,
    )
    .expect("shared region");
    let world = Shared::default();
    let tap = crate::tap::Tap::from_queues(
        "qpnet-none",
        (0..queue_pairs)
            .map(|_| OwnedFd::from(EventFd::new().unwrap()))
            .collect(),
    );
    let supervisor = Supervisor::new(Instance {
        host: crate::frame_io::HostSide::Tap(tap),
        shared,
        launcher: Box::new(FakeLauncher(world.clone())),
        policy: policy(),
        flow_tracking: true,
    });
    let device = Device::new(DeviceConfig {
        queue_pairs,
        mac: [2, 0, 0, 0, 0, 1],
        offered: crate::features::OFFERED,
    });
    let mem = nix::sys::memfd::memfd_create(c"guest", nix::sys::memfd::MFdFlags::empty()).unwrap();
    nix::unistd::ftruncate(&mem, MEM as i64).unwrap();
    let mut bed = Bed {
        world,
        backend: Backend::new(device, supervisor),
        mem: File::from(mem),
        dir,
    };
    bed.supervise();
    bed
}

impl Bed {
    pub(super) fn supervise(&mut self) {
        let (sup, dev) = self.backend.supervision();
        sup.supervise(dev);
    }

    pub(super) fn sup(&self) -> &Supervisor {
        self.backend.supervisor()
    }

    pub(super) fn stats(&self, qp: usize) -> &QueueStats {
        self.sup().shared().queue(qp).unwrap()
    }

    pub(super) fn set_mem_table(&mut self) -> DevResult<()> {
        let region = VhostUserMemoryRegion::new(0, MEM, UA, 0);
        let file = self.mem.try_clone().unwrap();
        self.backend.set_mem_table(&[region], vec![file])
    }

    /// The VMM's usual sequence for ring `i`; the kick starts it.
    pub(super) fn describe_ring(&mut self, i: usize) -> DevResult<()> {
        let (desc, avail, used) = ring_addrs(i);
        let b = &mut self.backend;
        b.set_vring_num(i as u32, RING as u32)?;
        b.set_vring_addr(i as u32, desc, used, avail)?;
        b.set_vring_base(i as u32, 0)?;
        b.set_vring_call(i as u8, Some(eventfd()))?;
        b.set_vring_kick(i as u8, Some(eventfd()))
    }

    /// A device with its memory table and every ring running.
    pub(super) fn running(queue_pairs: u16) -> Bed {
        let mut bed = bed(queue_pairs);
        bed.set_mem_table().unwrap();
        for i in 0..2 * queue_pairs as usize {
            bed.describe_ring(i).unwrap();
        }
        bed
    }

    /// Write ring `i`'s used (or available) index into guest memory.
    pub(super) fn write_index(&self, i: usize, used: bool, value: u16) {
        let (_, avail, used_ring) = ring_addrs(i);
        let at = if used { used_ring } else { avail } - UA + 2;
        self.mem.write_all_at(&value.to_le_bytes(), at).unwrap();
    }

    pub(super) fn plan(&self, qp: u16, request: &'static str, skip: usize, fault: Fault) {
        lock(&self.world).plans.push(Plan {
            qp,
            request,
            skip,
            fault,
        });
    }

    pub(super) fn launched(&self, qp: u16) -> Vec<u32> {
        let w = lock(&self.world);
        w.launched
            .iter()
            .filter(|l| l.0 == qp)
            .map(|l| l.1)
            .collect()
    }

    pub(super) fn current(&self, qp: u16) -> u32 {
        *self.launched(qp).last().expect("a worker was launched")
    }

    /// The requests worker `pid` got.
    pub(super) fn got(&self, pid: u32) -> Vec<Request> {
        let w = lock(&self.world);
        w.log
            .iter()
            .filter(|g| g.pid == pid)
            .map(|g| g.req.clone())
            .collect()
    }

    /// The StartRing configs worker `pid` got.
    pub(super) fn starts(&self, pid: u32) -> Vec<RingConfig> {
        self.got(pid)
            .into_iter()
            .filter_map(|r| match r {
                Request::StartRing(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    /// The StartRing configs worker `pid` got, each with the primary's fd
    /// numbers that came with it (kick, call, error).
    pub(super) fn starts_with_fds(&self, pid: u32) -> Vec<(RingConfig, Vec<RawFd>)> {
        let w = lock(&self.world);
        w.log
            .iter()
            .filter(|g| g.pid == pid)
            .filter_map(|g| match &g.req {
                Request::StartRing(c) => Some((*c, g.fds.clone())),
                _ => None,
            })
            .collect()
    }

    pub(super) fn ring(&self, i: usize) -> RingState {
        self.sup().queue_pair(i / 2).ring_state(i % 2)
    }

    /// A worker killed from outside: its pidfd fires in the loop.
    pub(super) fn kill_from_outside(&mut self, qp: u16) {
        let pid = self.current(qp);
        lock(&self.world).dead.insert(pid);
        self.backend.supervision().0.worker_exited(qp as usize);
        self.supervise();
    }

    /// Kill `qp`'s worker with every new one failing to start, and run the
    /// loop until the crash-loop guard gives up on it; how long it took.
    pub(super) fn crash_loop(&mut self, qp: u16) -> Duration {
        let started = Instant::now();
        lock(&self.world).launch_fails.insert(qp);
        self.kill_from_outside(qp);
        while !self.sup().queue_pair(qp as usize).is_failed() {
            assert!(started.elapsed() < Duration::from_secs(5), "never failed");
            let due = self.sup().next_supervision().unwrap();
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            self.supervise();
        }
        lock(&self.world).launch_fails.clear();
        started.elapsed()
    }
}

pub(super) fn names(reqs: &[Request]) -> Vec<&'static str> {
    reqs.iter().map(Request::name).collect()
}

/// What a new worker gets when the device has a memory table and both its
/// rings are ready.
pub(super) const FULL_START: [&str; 6] = [
    "hello",
    "attach-shared",
    "attach-frame-io",
    "set-mem-table",
    "start-ring",
    "start-ring",
];
