//! The body of the `vhost_user` fuzz target (`fuzz/fuzz_targets/vhost_user.rs`),
//! shared with the stable replay test (`tests/tests/fuzz_replay.rs`): a
//! hostile VMM's messages, with arbitrary payloads and fds, through the very
//! request handling the server runs ([`serve_request`]: the header wait, the
//! vhost crate's `BackendReqHandler` with its header, size and fd checks,
//! [`VhostUserDevice`], the backend, the device, the memory table and the
//! queue pairs' supervision) over a real socketpair, with fake workers
//! (`supervision/fake.rs`) that can die, hang or refuse where the input says.
//!
//! Checked besides "no panic and no hang": every request sent to a worker
//! carries the fds `Request::check_fds` allows (the fake worker checks), and
//! a worker's first is hello; no queue pair ever has two live workers; and
//! no fd is left open once the input is done (the count of open fds is the
//! same before and after).

use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EventFd;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use qpnet_shared::{SharedRegion, MIN_FLOW_CAPACITY};
use vhost::vhost_user::BackendReqHandler;

use crate::backend::Backend;
use crate::device::{Device, DeviceConfig};
use crate::server::{end_connection, serve_request, Served};
use crate::supervision::fake::{lock, FakeLauncher, Fault, Plan, Shared};
use crate::supervision::{Instance, Policy, Supervisor};
use crate::tap::Tap;
use crate::vhost_user::VhostUserDevice;

/// Most messages (and harness events) one input makes.
const MAX_MESSAGES: usize = 64;
/// Most requests served after one message (each takes a header or closes).
const MAX_SERVED: usize = 64;
/// Largest payload sent (the vhost crate refuses more than 4 KiB).
const MAX_PAYLOAD: usize = 0x1100;
/// Worker requests a fault can be planned on.
const REQUESTS: [&str; 8] = [
    "hello",
    "attach-shared",
    "attach-frame-io",
    "set-features",
    "set-mem-table",
    "start-ring",
    "stop-ring",
    "shutdown",
];
/// Sizes of the memfds sent (a page, a region, large and sparse...).
const MEMFD_SIZES: [u64; 8] = [
    0,
    0x1000,
    0x1_0000,
    0x10_0000,
    0x20_0000,
    0x100_0000,
    1 << 30,
    0x1001,
];

/// Feed `input` to the primary's vhost-user request handling as a VMM's
/// messages. The first byte chooses 1 or 2 queue pairs (bit 0); then each
/// message is a tag byte and its fields:
///
/// - tag below 0xf0: a VMM message with request code `tag`, then a flags
///   byte (bit 7 set: the low 7 bits are the header's flags as they are;
///   clear: VERSION 1 plus its REPLY and NEED_REPLY bits 2-3), a byte whose
///   value minus 128 is added to the header's size field (0x80: the size is
///   the payload's), an fd byte (count in bits 0-2; kind in bits 3-4:
///   eventfd, memfd, pipe, socket; memfd size class in bits 5-7), a
///   little-endian u16 payload length (at most [`MAX_PAYLOAD`]) and the
///   payload;
/// - tag 0xf0 and up: a harness event with one parameter byte `p`, by
///   `tag & 7`: plan a worker fault (queue pair `p & 1`; die, hang or
///   refuse by `(p >> 1) & 3`; on request `REQUESTS[p >> 5]`), a worker
///   killed from outside (queue pair `p`), `qpnet retry`, the VMM
///   disconnects, StopRing answers `p * 257`, launches of queue pair `p & 1`
///   fail (`p & 2`) or not.
///
/// # Panics
/// When an invariant of the module documentation fails.
pub fn fuzz_vhost_user(input: &[u8]) {
    // Whatever the first run opens lazily (and keeps) is not a leak.
    static WARM_UP: Once = Once::new();
    WARM_UP.call_once(|| run(&[1, 1, 1, 0x80, 0, 0, 0]));
    let before = open_fds();
    run(input);
    let after = open_fds();
    assert_eq!(before, after, "fds open before and after an input");
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The fuzz input, read front to back.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }
}

/// Everything of one input's primary besides the connection.
struct Bed {
    world: Shared,
    dev: Arc<Mutex<VhostUserDevice>>,
    queue_pairs: u16,
    dir: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bed {
    fn new(queue_pairs: u16) -> Bed {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "qpnet-fuzz-vhost-user-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let shared = SharedRegion::create_with(
            &dir.join("stats.shm"),
            usize::from(queue_pairs),
            MIN_FLOW_CAPACITY,
        )
        .expect("a shared region");
        let world = Shared::default();
        let tap = Tap::from_queues("qpnet-none", (0..queue_pairs).map(|_| eventfd()).collect());
        let supervisor = Supervisor::new(Instance {
            host: crate::frame_io::HostSide::Tap(tap),
            shared,
            launcher: Box::new(FakeLauncher(world.clone())),
            // No watchdog: fake workers never beat, and the run must not
            // depend on time.
            policy: Policy {
                watchdog: None,
                crash_limit: 3,
                crash_window: Duration::from_secs(10),
            },
            flow_tracking: true,
        });
        let device = Device::new(DeviceConfig {
            queue_pairs,
            mac: [2, 0, 0, 0, 0, 1],
            offered: crate::features::OFFERED,
        });
        let dev = Arc::new(Mutex::new(VhostUserDevice {
            backend: Backend::new(device, supervisor),
            reply_lost: false,
        }));
        let bed = Bed {
            world,
            dev,
            queue_pairs,
            dir,
        };
        bed.supervise();
        bed
    }

    fn supervise(&self) {
        let mut d = self.dev.lock().unwrap_or_else(|p| p.into_inner());
        let (sup, dev) = d.backend.supervision();
        sup.supervise(dev);
    }

    /// No queue pair has two live workers; workers the log names were
    /// launched.
    fn check(&self) {
        let w = lock(&self.world);
        let launched = |pid: &u32| w.launched.iter().any(|l| l.1 == *pid);
        for qp in 0..self.queue_pairs {
            let live = w
                .launched
                .iter()
                .filter(|l| l.0 == qp && !w.dead.contains(&l.1))
                .count();
            assert!(live <= 1, "queue pair {qp} has {live} live workers");
        }
        let mut greeted = std::collections::HashSet::new();
        for g in &w.log {
            assert!(launched(&g.pid), "a request went to no worker");
            if greeted.insert(g.pid) {
                assert_eq!(g.req.name(), "hello", "worker {}'s first request", g.pid);
            }
        }
        assert!(
            w.killed.iter().all(launched),
            "killed a worker never launched"
        );
    }

    /// A harness event (see [`fuzz_vhost_user`]).
    fn event(&self, tag: u8, p: u8, conn: &mut Conn) {
        match tag & 7 {
            0 => lock(&self.world).plans.push(Plan {
                qp: u16::from(p & 1),
                request: REQUESTS[usize::from(p >> 5)],
                skip: 0,
                fault: match (p >> 1) & 3 {
                    1 => Fault::Hang,
                    2 => Fault::Refuse("refused by the fuzzer"),
                    _ => Fault::Die,
                },
            }),
            1 => {
                let qp = u16::from(p) % self.queue_pairs;
                let pid = {
                    let mut w = lock(&self.world);
                    let pid = w.launched.iter().rev().find(|l| l.0 == qp).map(|l| l.1);
                    pid.inspect(|pid| {
                        w.dead.insert(*pid);
                    })
                };
                if pid.is_some() {
                    let mut d = self.dev.lock().unwrap_or_else(|p| p.into_inner());
                    let (sup, dev) = d.backend.supervision();
                    sup.worker_exited(usize::from(qp));
                    sup.supervise(dev);
                }
            }
            2 => {
                let mut d = self.dev.lock().unwrap_or_else(|p| p.into_inner());
                let (sup, dev) = d.backend.supervision();
                sup.retry_failed();
                sup.supervise(dev);
            }
            3 => conn.vmm = None,
            4 => lock(&self.world).stop_at = u16::from(p) * 257,
            _ => {
                let mut w = lock(&self.world);
                let qp = u16::from(p & 1);
                if p & 2 != 0 {
                    w.launch_fails.insert(qp);
                } else {
                    w.launch_fails.remove(&qp);
                }
            }
        }
    }
}

/// One VMM connection: the VMM's end, and ours as the server holds it.
struct Conn {
    vmm: Option<UnixStream>,
    peek: OwnedFd,
    handler: BackendReqHandler<Mutex<VhostUserDevice>>,
}

impl Conn {
    fn open(dev: &Arc<Mutex<VhostUserDevice>>) -> Conn {
        let (vmm, ours) = UnixStream::pair().expect("a socketpair");
        vmm.set_nonblocking(true).expect("nonblocking VMM end");
        // The server waits 2 s for a body or for room for a reply; here all
        // of a message is sent before it is served, so nothing need wait.
        let short = Some(Duration::from_millis(1));
        ours.set_read_timeout(short).expect("read timeout");
        ours.set_write_timeout(short).expect("write timeout");
        let peek = OwnedFd::from(ours.try_clone().expect("dup of our end"));
        Conn {
            vmm: Some(vmm),
            peek,
            handler: BackendReqHandler::from_stream(ours, dev.clone()),
        }
    }

    /// Send one message; false when the VMM end is gone or full.
    fn send(&mut self, bytes: &[u8], fds: &[RawFd]) -> bool {
        let Some(vmm) = &self.vmm else {
            return false;
        };
        let iov = [IoSlice::new(bytes)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs = if fds.is_empty() { &[][..] } else { &cmsg[..] };
        let r = sendmsg::<UnixAddr>(vmm.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_DONTWAIT, None);
        matches!(r, Ok(n) if n == bytes.len())
    }

    /// Whether the server's poll would wake for this connection.
    fn readable(&self) -> bool {
        let mut pfd = [PollFd::new(self.peek.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut pfd, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// Read and forget the replies (a VMM that reads them).
    fn drain_replies(&mut self) {
        let Some(vmm) = &mut self.vmm else {
            return;
        };
        let mut buf = [0u8; 4096];
        while matches!(vmm.read(&mut buf), Ok(n) if n > 0) {}
    }
}

fn eventfd() -> OwnedFd {
    OwnedFd::from(EventFd::new().expect("an eventfd"))
}

/// `count` fds of `kind` (eventfd, memfd of `size`, pipe, socket).
fn make_fds(count: u8, kind: u8, size: u64) -> Vec<OwnedFd> {
    (0..count)
        .map(|_| match kind {
            0 => eventfd(),
            1 => {
                let fd = memfd_create(c"qpnet-fuzz", MFdFlags::MFD_CLOEXEC).expect("a memfd");
                nix::unistd::ftruncate(&fd, size as i64).expect("sizing a memfd");
                fd
            }
            2 => nix::unistd::pipe().expect("a pipe").0,
            _ => OwnedFd::from(UnixStream::pair().expect("a socketpair").0),
        })
        .collect()
}

/// One VMM message: header (request, flags, size) and payload.
fn message(input: &mut Input<'_>, code: u8) -> (Vec<u8>, Vec<OwnedFd>) {
    let flags_byte = input.byte().unwrap_or(0);
    let flags = if flags_byte & 0x80 != 0 {
        u32::from(flags_byte & 0x7f)
    } else {
        1 | u32::from(flags_byte & 0x0c)
    };
    let delta = i32::from(input.byte().unwrap_or(0x80)) - 0x80;
    let fd_byte = input.byte().unwrap_or(0);
    let fds = make_fds(
        fd_byte & 7,
        (fd_byte >> 3) & 3,
        MEMFD_SIZES[usize::from(fd_byte >> 5)],
    );
    let lo = input.byte().unwrap_or(0);
    let hi = input.byte().unwrap_or(0);
    let len = usize::from(u16::from_le_bytes([lo, hi])).min(MAX_PAYLOAD);
    let payload = input.bytes(len);
    let size = (payload.len() as i32).wrapping_add(delta) as u32;
    let mut bytes = Vec::with_capacity(12 + payload.len());
    for word in [u32::from(code), flags, size] {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    bytes.extend_from_slice(payload);
    (bytes, fds)
}

fn run(input: &[u8]) {
    let mut input = Input(input);
    let queue_pairs = 1 + u16::from(input.byte().unwrap_or(0) & 1);
    let bed = Bed::new(queue_pairs);
    let mut conn = Conn::open(&bed.dev);
    for _ in 0..MAX_MESSAGES {
        let Some(tag) = input.byte() else {
            break;
        };
        if tag >= 0xf0 {
            let p = input.byte().unwrap_or(0);
            bed.event(tag, p, &mut conn);
        } else {
            let (bytes, fds) = message(&mut input, tag);
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            if !conn.send(&bytes, &raw) {
                // The VMM cannot send: it gives up on this connection.
                conn.vmm = None;
            }
            // Ours are closed; the server's copies are in flight.
            drop(fds);
        }
        // The server's loop: serve while the connection is readable.
        for _ in 0..MAX_SERVED {
            if !conn.readable() {
                break;
            }
            let served = serve_request(
                &mut conn.handler,
                &bed.dev,
                conn.peek.as_fd(),
                Duration::ZERO,
            );
            conn.drain_replies();
            if served == Served::Close {
                end_connection(&bed.dev);
                conn = Conn::open(&bed.dev);
                break;
            }
        }
        bed.check();
    }
    drop(conn);
    end_connection(&bed.dev);
    bed.check();
}
