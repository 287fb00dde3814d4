//! Continuous, timed traffic for the crash-isolation tests, and what it
//! says about each worker kill.
//!
//! [`run_load`] keeps every queue pair of a test VMM busy while a test
//! kills or stops workers from another thread:
//! - TX: a driver thread makes one sequence-numbered test frame available
//!   on every TX ring each tick (paced, not windowed: a dead queue pair's
//!   ring fills up and waits, the others go on), and notes when each frame
//!   was published;
//! - TAP: a collector thread receives them on a packet socket that asks the
//!   kernel for receive timestamps (`SO_TIMESTAMPNS`), so an arrival time is
//!   when qpnet's `writev` reached the TAP, not when this process got round
//!   to reading it; every frame is checked byte for byte;
//! - RX: a sender thread injects paced IPv4/UDP test frames of several flows
//!   into the TAP; the driver thread collects them from every RX ring.
//!
//! All times are CLOCK_REALTIME nanoseconds (the clock of the kernel's
//! socket timestamps). When the test's closure returns, pushing stops, the
//! rings are drained, and the [`Records`] say what was pushed when, and what
//! arrived where and when. The rings' final indices are kept too, for the
//! descriptor-leak check.
//!
//! [`analyze`] then judges each [`KillEvent`]:
//! - recovery: from the kill to the arrival of the first frame of that
//!   queue pair that was published after the signal took effect (so it can
//!   only have been sent by the new worker);
//! - the other queue pairs' worst *service stall* around it: the longest
//!   time one of them had a frame waiting and delivered nothing (for each
//!   arrival, from max(previous arrival, this frame's publication) to this
//!   arrival). Pauses of the test's own generator are not stalls;
//! - duplicates: a frame may arrive twice only if its chain was in flight
//!   at the kill (made available, used index not yet published:
//!   `used_before..avail_after` of that kill); TX never loses a frame;
//! - RX: frames may be lost only if sent shortly before a kill of the
//!   queue pair their flow lands on (the dead worker had read them but not
//!   published them); never duplicated, never corrupted.

use std::collections::{BTreeSet, HashMap};
use std::io::IoSliceMut;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};

use crate::frames::{
    build, mixed_len, parse, verify, FrameId, FrameKind, FrameSpec, ETHERTYPE_TEST,
};
use crate::memory::GuestMemory;
use crate::netns::NetNs;
use crate::tap_io::{set_int_option, wait_readable, TapSocket};
use crate::traffic::tx_frame;
use crate::virtq::RingLayout;
use crate::vmm::Vmm;

/// `FrameId::queue` of the RX test frames (apart from TX queue numbers and
/// from the tags of [`crate::traffic`]).
pub const RX_TAG: u16 = 0x300;
/// `PACKET_IGNORE_OUTGOING` (linux/if_packet.h).
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// Receive buffer of the stamping socket.
const SOCKET_BUFFER_BYTES: libc::c_int = 64 << 20;
/// How long the rings may take to drain once pushing stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// No RX frame for this long after the sender stopped: RX is drained.
const RX_QUIET: Duration = Duration::from_millis(500);
/// A lost RX frame must have been sent at most this long before the kill
/// that explains it.
const RX_LOSS_HORIZON_NS: u64 = 1_000_000_000;
/// Length of the stretch before each kill whose stalls serve as baseline.
pub const BASELINE_NS: u64 = 50_000_000;
/// The generator never catches up on more than this much lost time (after
/// its thread was descheduled, or a ring was full).
const MAX_CATCH_UP: Duration = Duration::from_millis(20);

/// CLOCK_REALTIME in nanoseconds (the clock of `SO_TIMESTAMPNS`).
pub fn realtime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// CLOCK_MONOTONIC in nanoseconds (the clock of qpnet's heartbeats).
pub use qpnet_shared::monotonic_ns;

/// Nanoseconds `pid` has spent runnable but waiting for a CPU
/// (/proc/PID/schedstat, second field; the main thread of a
/// single-threaded process).
pub fn runq_wait_ns(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A packet socket on the TAP netdev that receives test frames (ethertype
/// 0x88B5) with the kernel's receive timestamp.
#[derive(Debug)]
pub struct StampedTap {
    fd: OwnedFd,
}

impl StampedTap {
    /// Open it on `ifname` inside `ns`.
    pub fn open(ns: &NetNs, ifname: &str) -> Result<StampedTap> {
        let name = ifname.to_owned();
        ns.run(move || {
            let ifindex = nix::net::if_::if_nametoindex(name.as_str())
                .with_context(|| format!("no interface {name} in the namespace"))?;
            // SAFETY: plain socket(2); the result is checked before use.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(ETHERTYPE_TEST.to_be()),
                )
            };
            if raw < 0 {
                return Err(std::io::Error::last_os_error())
                    .context("socket(AF_PACKET) (needs CAP_NET_RAW)");
            }
            // SAFETY: a fresh descriptor nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = ETHERTYPE_TEST.to_be();
            addr.sll_ifindex = ifindex as i32;
            // SAFETY: `addr` is a valid sockaddr_ll for the length given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error()).context("bind(AF_PACKET)");
            }
            set_int_option(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)?;
            set_int_option(
                &fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                SOCKET_BUFFER_BYTES,
            )?;
            setsockopt(&fd, sockopt::ReceiveTimestampns, &true).context("SO_TIMESTAMPNS")?;
            Ok(StampedTap { fd })
        })
    }

    /// The next frame (into `buf`) and its kernel receive time, or `None`
    /// after `timeout`.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> Result<Option<(usize, u64)>> {
        if !wait_readable(self.fd.as_raw_fd(), timeout)? {
            return Ok(None);
        }
        let mut iov = [IoSliceMut::new(buf)];
        let mut space = nix::cmsg_space!(nix::sys::time::TimeSpec);
        let msg = match recvmsg::<()>(
            self.fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Ok(None),
            Err(e) => return Err(e).context("recvmsg on the stamping socket"),
        };
        let mut stamp = None;
        for c in msg.cmsgs().context("control messages")? {
            if let ControlMessageOwned::ScmTimestampns(ts) = c {
                stamp = Some(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64);
            }
        }
        let stamp = stamp.ok_or_else(|| anyhow!("a frame came without its timestamp"))?;
        Ok(Some((msg.bytes, stamp)))
    }
}

/// How much traffic [`run_load`] generates.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// TX frames per second on every TX queue.
    pub tx_per_queue_per_sec: u32,
    /// RX frames per second in total (0: no RX load).
    pub rx_per_sec: u32,
    /// UDP flows the RX frames are spread over.
    pub rx_flows: u16,
}

impl Default for LoadConfig {
    fn default() -> LoadConfig {
        LoadConfig {
            tx_per_queue_per_sec: 1000,
            rx_per_sec: 2000,
            rx_flows: 16,
        }
    }
}

/// One TX frame's arrival on the TAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// Its sequence number on its queue.
    pub seq: u32,
    /// Kernel receive time (realtime ns).
    pub at_ns: u64,
}

/// One RX frame's arrival in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxArrival {
    /// Its sequence number.
    pub seq: u32,
    /// Its flow.
    pub flow: u16,
    /// The RX queue (queue pair) it came through.
    pub queue: u16,
    /// When the driver reaped it (realtime ns).
    pub at_ns: u64,
}

/// A ring's indices after the load drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingEnd {
    /// The vring index.
    pub vring: u32,
    /// Ring size.
    pub size: u16,
    /// The driver's avail index.
    pub avail: u16,
    /// The device's used index, in guest memory.
    pub used: u16,
    /// Where the driver stopped reading used entries.
    pub last_used: u16,
}

impl RingEnd {
    /// The descriptor-leak check: every chain is either used and reaped, or
    /// (RX) still available to the device; nothing is stuck in between.
    pub fn leak(&self) -> Option<String> {
        let is_tx = self.vring % 2 == 1;
        let outstanding = self.avail.wrapping_sub(self.used);
        let ok = self.used == self.last_used
            && if is_tx {
                outstanding == 0
            } else {
                outstanding == self.size
            };
        (!ok).then(|| {
            format!(
                "vring {} ({}): avail {} used {} reaped {}: {}",
                self.vring,
                if is_tx { "TX" } else { "RX" },
                self.avail,
                self.used,
                self.last_used,
                if is_tx {
                    "chains made available were never used"
                } else {
                    "not every RX buffer is back with the device"
                }
            )
        })
    }
}

/// Everything a load run saw.
#[derive(Debug, Default)]
pub struct Records {
    /// Queue pairs.
    pub queues: usize,
    /// `[queue][seq]`: when each TX frame was published.
    pub pushed_at: Vec<Vec<u64>>,
    /// `[queue]`: TX arrivals on the TAP, in arrival order.
    pub tx_arrivals: Vec<Vec<Arrival>>,
    /// TX frames that failed byte-for-byte verification.
    pub tx_corrupt: Vec<String>,
    /// `[seq]`: when each RX frame was sent into the TAP.
    pub rx_sent_at: Vec<u64>,
    /// RX flows used.
    pub rx_flows: u16,
    /// RX test frames received.
    pub rx_arrivals: Vec<RxArrival>,
    /// RX frames that failed verification (or had a dirty header).
    pub rx_corrupt: Vec<String>,
    /// Frames in the RX rings that were not this run's test frames.
    pub rx_foreign: u64,
    /// Every ring's final indices.
    pub rings: Vec<RingEnd>,
    /// Times the driver found an RX used index inside a frame (must be 0).
    pub rx_used_index_inside_frame: u64,
    /// RX test frames that spanned more than one buffer.
    pub rx_multi_buffer: u64,
}

/// Live counters, shared by the load's threads and the test.
#[derive(Debug)]
struct Live {
    stop: AtomicBool,
    sender_done: AtomicBool,
    collector_stop: AtomicBool,
    pushed: Vec<AtomicU64>,
    arrived: Vec<AtomicU64>,
    /// Per queue: 1 + the highest sequence number seen on the TAP.
    seen_up_to: Vec<AtomicU64>,
    rx_sent: AtomicU64,
    rx_got: Vec<AtomicU64>,
}

/// Reads one ring's indices straight from guest memory.
#[derive(Debug, Clone)]
pub struct RingProbe {
    mem: Arc<GuestMemory>,
    layout: RingLayout,
}

impl RingProbe {
    /// The avail index the driver published.
    pub fn avail_idx(&self) -> u16 {
        self.mem.load_u16(self.layout.avail + 2)
    }

    /// The used index the device published.
    pub fn used_idx(&self) -> u16 {
        self.mem.load_u16(self.layout.used + 2)
    }
}

/// What the test's closure sees of a running load.
#[derive(Debug)]
pub struct LoadView<'a> {
    live: &'a Live,
    tx_probes: Vec<RingProbe>,
}

impl LoadView<'_> {
    /// TX frames made available so far on queue `q` (the next sequence
    /// number; also the TX ring position of that frame, unwrapped).
    pub fn pushed(&self, q: usize) -> u64 {
        self.live.pushed[q].load(Ordering::Acquire)
    }

    /// TX frames of queue `q` seen on the TAP so far (duplicates included).
    pub fn arrived(&self, q: usize) -> u64 {
        self.live.arrived[q].load(Ordering::Acquire)
    }

    /// RX frames received on queue `q` so far.
    pub fn rx_received(&self, q: usize) -> u64 {
        self.live.rx_got[q].load(Ordering::Acquire)
    }

    /// The TX ring of queue pair `q`, read from guest memory.
    pub fn tx_ring(&self, q: usize) -> &RingProbe {
        &self.tx_probes[q]
    }

    /// Wait until a TX frame of queue `q` with sequence number `seq` or
    /// later arrived on the TAP (with `seq` = [`LoadView::pushed`] read at
    /// some moment: a frame published after that moment went through).
    pub fn wait_forwarded(&self, q: usize, seq: u64, timeout: Duration) -> Result<()> {
        crate::wait::wait_for(
            &format!("TX frame {seq} (or later) of queue {q} on the TAP"),
            timeout,
            || self.live.seen_up_to[q].load(Ordering::Acquire) > seq,
        )
    }

    /// Wait until `n` more TX frames of every queue in `queues` arrived.
    pub fn wait_flowing(&self, queues: &[usize], n: u64, timeout: Duration) -> Result<()> {
        let base: Vec<u64> = queues.iter().map(|&q| self.arrived(q)).collect();
        crate::wait::wait_for(
            &format!("{n} more frames from TX queues {queues:?}"),
            timeout,
            || {
                queues
                    .iter()
                    .zip(&base)
                    .all(|(&q, &b)| self.arrived(q) >= b + n)
            },
        )
    }
}

/// Unwrap a 16-bit ring index to the 64-bit position at or below `near`
/// (`near` is a count that is known to be at or past the index).
pub fn unwrap_index(idx: u16, near: u64) -> u64 {
    let behind = (near as u16).wrapping_sub(idx);
    near.saturating_sub(u64::from(behind))
}

/// Run the load on every queue pair of `vmm` while `control` runs; then
/// drain and return what `control` returned and what the load saw.
/// `tap` (any packet socket on the TAP) injects the RX frames; `stamped`
/// receives the TX frames.
pub fn run_load<R>(
    vmm: &mut Vmm,
    tap: &TapSocket,
    stamped: &StampedTap,
    cfg: &LoadConfig,
    control: impl FnOnce(&LoadView<'_>) -> Result<R>,
) -> Result<(R, Records)> {
    let queues = vmm.tx.len();
    let live = Live {
        stop: AtomicBool::new(false),
        sender_done: AtomicBool::new(cfg.rx_per_sec == 0),
        collector_stop: AtomicBool::new(false),
        pushed: (0..queues).map(|_| AtomicU64::new(0)).collect(),
        arrived: (0..queues).map(|_| AtomicU64::new(0)).collect(),
        seen_up_to: (0..queues).map(|_| AtomicU64::new(0)).collect(),
        rx_sent: AtomicU64::new(0),
        rx_got: (0..queues).map(|_| AtomicU64::new(0)).collect(),
    };
    let tx_probes: Vec<RingProbe> = vmm
        .tx
        .iter()
        .map(|t| RingProbe {
            mem: vmm.memory().clone(),
            layout: t.queue.layout(),
        })
        .collect();
    std::thread::scope(|s| {
        let live = &live;
        let collector = s.spawn(move || collect_tx(stamped, queues, live));
        let sender = s.spawn(move || send_rx(tap, cfg, live));
        let driver = s.spawn(move || drive(vmm, cfg, live));
        let view = LoadView { live, tx_probes };
        let controlled = control(&view);
        live.stop.store(true, Ordering::Release);
        let sent = join(sender, "RX sender");
        let driven = join(driver, "VMM driver");
        live.collector_stop.store(true, Ordering::Release);
        let collected = join(collector, "TAP collector");
        let r = controlled?;
        let (rx_sent_at, (driven, (tx_arrivals, tx_corrupt))) = (sent?, (driven?, collected?));
        Ok((
            r,
            Records {
                queues,
                pushed_at: driven.pushed_at,
                tx_arrivals,
                tx_corrupt,
                rx_sent_at,
                rx_flows: cfg.rx_flows,
                rx_arrivals: driven.rx_arrivals,
                rx_corrupt: driven.rx_corrupt,
                rx_foreign: driven.rx_foreign,
                rings: driven.rings,
                rx_used_index_inside_frame: driven.rx_used_index_inside_frame,
                rx_multi_buffer: driven.rx_multi_buffer,
            },
        ))
    })
}

fn join<T>(h: std::thread::ScopedJoinHandle<'_, Result<T>>, what: &str) -> Result<T> {
    h.join()
        .map_err(|_| anyhow!("the {what} thread panicked"))?
        .with_context(|| format!("the {what} thread failed"))
}

/// What the driver thread recorded.
struct Driven {
    pushed_at: Vec<Vec<u64>>,
    rx_arrivals: Vec<RxArrival>,
    rx_corrupt: Vec<String>,
    rx_foreign: u64,
    rings: Vec<RingEnd>,
    rx_used_index_inside_frame: u64,
    rx_multi_buffer: u64,
}

/// The driver thread: push TX frames every tick, reap TX and RX, and after
/// the stop, drain everything.
fn drive(vmm: &mut Vmm, cfg: &LoadConfig, live: &Live) -> Result<Driven> {
    let queues = vmm.tx.len();
    let tick = Duration::from_nanos(1_000_000_000 / u64::from(cfg.tx_per_queue_per_sec.max(1)));
    let mut out = Driven {
        pushed_at: vec![Vec::new(); queues],
        rx_arrivals: Vec::new(),
        rx_corrupt: Vec::new(),
        rx_foreign: 0,
        rings: Vec::new(),
        rx_used_index_inside_frame: 0,
        rx_multi_buffer: 0,
    };
    let mut next_tick = Instant::now();
    let mut drain_started: Option<Instant> = None;
    let mut last_rx = Instant::now();
    loop {
        for tx in vmm.tx.iter_mut() {
            tx.reap()?;
        }
        let stopping = live.stop.load(Ordering::Acquire);
        let now = Instant::now();
        if !stopping && now >= next_tick {
            push_tick(vmm, live, &mut out.pushed_at)?;
            next_tick += tick;
            if next_tick + MAX_CATCH_UP < now {
                next_tick = now;
            }
        }
        if reap_rx(vmm, live, &mut out)? {
            last_rx = Instant::now();
        }
        if stopping {
            let started = *drain_started.get_or_insert_with(Instant::now);
            let tx_idle = vmm.tx.iter().all(|t| t.in_flight() == 0);
            let rx_done = live.sender_done.load(Ordering::Acquire)
                && (rx_total(live) >= live.rx_sent.load(Ordering::Acquire)
                    || last_rx.elapsed() >= RX_QUIET);
            if tx_idle && rx_done {
                break;
            }
            if started.elapsed() > DRAIN_TIMEOUT {
                bail!(
                    "the rings did not drain within {DRAIN_TIMEOUT:?}: {}",
                    ring_states(vmm)
                );
            }
            std::thread::sleep(Duration::from_micros(500));
        } else {
            let wait = next_tick.saturating_duration_since(Instant::now());
            std::thread::sleep(wait.max(Duration::from_micros(50)));
        }
    }
    out.rings = ring_ends(vmm);
    out.rx_used_index_inside_frame = vmm.rx.iter().map(|r| r.used_index_inside_frame()).sum();
    Ok(out)
}

fn rx_total(live: &Live) -> u64 {
    live.rx_got.iter().map(|c| c.load(Ordering::Acquire)).sum()
}

/// One frame on every TX queue that has a free slot, published and kicked.
fn push_tick(vmm: &mut Vmm, live: &Live, pushed_at: &mut [Vec<u64>]) -> Result<()> {
    for (q, tx) in vmm.tx.iter_mut().enumerate() {
        let seq = pushed_at[q].len() as u32;
        if !tx.try_push(&tx_frame(q as u16, seq))? {
            continue; // ring full (its worker is down): try next tick
        }
        // Counted before it is published, so the count is never behind the
        // avail index a test reads from guest memory.
        live.pushed[q].store(u64::from(seq) + 1, Ordering::Release);
        let t = realtime_ns();
        tx.flush()?;
        pushed_at[q].push(t);
    }
    Ok(())
}

/// Reap every RX ring; true if anything arrived.
fn reap_rx(vmm: &mut Vmm, live: &Live, out: &mut Driven) -> Result<bool> {
    let mut any = false;
    for (q, rx) in vmm.rx.iter_mut().enumerate() {
        let frames = rx.reap()?;
        if frames.is_empty() {
            continue;
        }
        let t = realtime_ns();
        for f in frames {
            any = true;
            if f.header[0] != 0 || f.header[1] != 0 {
                push_capped(
                    &mut out.rx_corrupt,
                    format!("qp {q}: header flags/gso {:02x?}", &f.header[..2]),
                );
            }
            match verify(&f.data) {
                Ok(id) if id.queue == RX_TAG => {
                    if f.buffers > 1 {
                        out.rx_multi_buffer += 1;
                    }
                    let flow = match parse(&f.data).map(|s| s.kind) {
                        Some(FrameKind::Udp { flow }) => flow,
                        _ => u16::MAX,
                    };
                    out.rx_arrivals.push(RxArrival {
                        seq: id.seq,
                        flow,
                        queue: q as u16,
                        at_ns: t,
                    });
                    live.rx_got[q].fetch_add(1, Ordering::Release);
                }
                Ok(_) => out.rx_foreign += 1,
                Err(_) if parse(&f.data).is_none() => out.rx_foreign += 1,
                Err(e) => push_capped(&mut out.rx_corrupt, format!("qp {q}: {e}")),
            }
        }
    }
    Ok(any)
}

fn push_capped(list: &mut Vec<String>, s: String) {
    if list.len() < 20 {
        list.push(s);
    }
}

fn ring_ends(vmm: &Vmm) -> Vec<RingEnd> {
    let mut ends = Vec::new();
    for (tx, rx) in vmm.tx.iter().zip(&vmm.rx) {
        for (vring, q) in [(rx.vring(), &rx.queue), (tx.vring(), &tx.queue)] {
            ends.push(RingEnd {
                vring,
                size: q.layout().size,
                avail: q.avail_idx(),
                used: q.used_idx(),
                last_used: q.last_used(),
            });
        }
    }
    ends
}

fn ring_states(vmm: &Vmm) -> String {
    ring_ends(vmm)
        .iter()
        .map(|r| format!("vring {}: avail {} used {}", r.vring, r.avail, r.used))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The RX sender thread: paced UDP test frames into the TAP.
fn send_rx(tap: &TapSocket, cfg: &LoadConfig, live: &Live) -> Result<Vec<u64>> {
    let mut sent_at = Vec::new();
    if cfg.rx_per_sec == 0 {
        return Ok(sent_at);
    }
    let result = (|| -> Result<()> {
        let tick = Duration::from_millis(1);
        let per_tick = f64::from(cfg.rx_per_sec) / 1000.0;
        let start = Instant::now();
        let mut credit = 0.0f64;
        let mut next_tick = start;
        while !live.stop.load(Ordering::Acquire) {
            credit += per_tick;
            while credit >= 1.0 {
                let seq = sent_at.len() as u32;
                let frame = build(&FrameSpec {
                    id: FrameId { queue: RX_TAG, seq },
                    len: mixed_len(seq),
                    kind: FrameKind::Udp {
                        flow: (seq % u32::from(cfg.rx_flows.max(1))) as u16,
                    },
                });
                sent_at.push(realtime_ns());
                tap.send(&frame)?;
                live.rx_sent.store(u64::from(seq) + 1, Ordering::Release);
                credit -= 1.0;
            }
            next_tick += tick;
            let now = Instant::now();
            if next_tick + MAX_CATCH_UP < now {
                next_tick = now;
            }
            std::thread::sleep(next_tick.saturating_duration_since(now));
        }
        Ok(())
    })();
    live.sender_done.store(true, Ordering::Release);
    result.map(|_| sent_at)
}

/// The collector thread: every test frame on the TAP, verified and stamped.
fn collect_tx(
    stamped: &StampedTap,
    queues: usize,
    live: &Live,
) -> Result<(Vec<Vec<Arrival>>, Vec<String>)> {
    let mut arrivals = vec![Vec::new(); queues];
    let mut corrupt = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let stopping = live.collector_stop.load(Ordering::Acquire);
        // Once the driver drained the rings every frame is already queued
        // on the socket: a quiet 200 ms means all were read.
        let timeout = Duration::from_millis(if stopping { 200 } else { 20 });
        let Some((n, at_ns)) = stamped.recv(&mut buf, timeout)? else {
            if stopping {
                break;
            }
            continue;
        };
        match verify(&buf[..n]) {
            Ok(id) if usize::from(id.queue) < queues => {
                arrivals[usize::from(id.queue)].push(Arrival { seq: id.seq, at_ns });
                live.arrived[usize::from(id.queue)].fetch_add(1, Ordering::Release);
                live.seen_up_to[usize::from(id.queue)]
                    .fetch_max(u64::from(id.seq) + 1, Ordering::Release);
            }
            Ok(id) => push_capped(&mut corrupt, format!("frame of unknown queue {id:?}")),
            Err(e) => push_capped(&mut corrupt, e.to_string()),
        }
    }
    Ok((arrivals, corrupt))
}

// ---- analysis -----------------------------------------------------------

/// A signal the test sent to a worker.
#[derive(Debug, Clone)]
pub struct KillEvent {
    /// The queue pair.
    pub queue: usize,
    /// The worker's pid.
    pub pid: u32,
    /// "SIGKILL" or "SIGSTOP".
    pub signal: &'static str,
    /// Just before kill(2) (realtime ns).
    pub at_ns: u64,
    /// When the test saw the signal in effect (process dead or stopped):
    /// frames published after this can only go through a new worker.
    pub effective_ns: u64,
    /// TX used index (unwrapped) read just before kill(2).
    pub used_before: u64,
    /// TX avail index (unwrapped) read once the signal had taken effect.
    pub avail_after: u64,
    /// [`LoadView::pushed`] then: this frame and later ones can only go
    /// through a new worker.
    pub first_new_seq: u64,
    /// When the test saw the replacement's pid in the stats (realtime ns).
    pub replaced_ns: Option<u64>,
    /// Time the primary and the new worker spent runnable but waiting for a
    /// CPU between the kill and the replacement being seen (schedstat): how
    /// much of the recovery the machine's load took.
    pub runq_wait_ns: Option<u64>,
    /// Per queue pair, how long its worker spent runnable but waiting for a
    /// CPU in the 100 ms after the kill (0 for the killed queue pair, and
    /// when unknown): the part of a stall the machine, not qpnet, caused.
    pub others_runq_wait_ns: Vec<u64>,
}

/// What one kill did.
#[derive(Debug, Clone, Default)]
pub struct KillOutcome {
    /// Kill -> first TX frame published after the kill on the TAP.
    pub recovery_ns: Option<u64>,
    /// Kill -> first RX frame sent after the kill reaped from the queue.
    pub rx_recovery_ns: Option<u64>,
    /// Kill -> replacement pid seen in the stats.
    pub replaced_ns: Option<u64>,
    /// See [`KillEvent::runq_wait_ns`].
    pub runq_wait_ns: Option<u64>,
    /// The other queue pairs' worst service stall in the kill's window.
    pub others_stall_ns: u64,
    /// Which queue pair that was.
    pub others_stall_queue: usize,
    /// The same queue pairs' worst stall in the [`BASELINE_NS`] before the
    /// kill: what the machine does to them without a kill.
    pub others_stall_before_ns: u64,
    /// TX chains in flight at the kill (upper bound: avail_after - used_before).
    pub tx_in_flight: u64,
    /// TX frames that arrived twice because of this kill.
    pub tx_dups: u64,
    /// RX frames this kill cost.
    pub rx_lost: u64,
}

/// The verdict on a whole run.
#[derive(Debug, Default)]
pub struct Analysis {
    /// One outcome per kill, in order.
    pub kills: Vec<KillOutcome>,
    /// Broken invariants (independent of timing thresholds): corruption,
    /// loss, unexplained duplicates, leaked descriptors.
    pub problems: Vec<String>,
    /// The worst service stall of any queue pair away from every kill
    /// (more than `window` after the last kill, before the next): the
    /// machine's own noise.
    pub quiet_stall_ns: u64,
    /// Distinct TX frames that arrived.
    pub tx_frames: u64,
    /// TX duplicates in total.
    pub tx_dups: u64,
    /// RX frames that arrived.
    pub rx_frames: u64,
    /// RX frames lost in total.
    pub rx_lost: u64,
}

/// A time some queue pair had a frame waiting and delivered nothing.
#[derive(Debug, Clone, Copy)]
struct Stall {
    /// The arrival before this one.
    prev: u64,
    start: u64,
    end: u64,
}

/// The service stalls of one queue, in arrival order.
fn service_stalls(arrivals: &[Arrival], pushed_at: &[u64]) -> Vec<Stall> {
    let mut seen = BTreeSet::new();
    let mut stalls = Vec::with_capacity(arrivals.len());
    let mut prev: Option<u64> = None;
    for a in arrivals {
        let first = seen.insert(a.seq);
        if let (true, Some(p), Some(&pushed)) = (first, prev, pushed_at.get(a.seq as usize)) {
            let start = p.max(pushed);
            if a.at_ns > start {
                stalls.push(Stall {
                    prev: p,
                    start,
                    end: a.at_ns,
                });
            }
        }
        prev = Some(prev.map_or(a.at_ns, |p| p.max(a.at_ns)));
    }
    stalls
}

/// The longest stall overlapping `[t0, t1]` (and which started by `t1`).
fn worst_stall(stalls: &[Stall], t0: u64, t1: u64) -> u64 {
    let from = stalls.partition_point(|s| s.end < t0);
    stalls[from..]
        .iter()
        .take_while(|s| s.prev <= t1)
        .filter(|s| s.start <= t1)
        .map(|s| s.end - s.start)
        .max()
        .unwrap_or(0)
}

/// Judge `kills` against `records`. `window_ns`: how long after a kill the
/// other queue pairs are watched for stalls.
pub fn analyze(records: &Records, kills: &[KillEvent], window_ns: u64) -> Analysis {
    let mut a = Analysis {
        kills: vec![KillOutcome::default(); kills.len()],
        ..Analysis::default()
    };
    let mut arrivals = records.tx_arrivals.clone();
    for v in &mut arrivals {
        v.sort_by_key(|x| x.at_ns);
    }
    let stalls: Vec<Vec<Stall>> = (0..records.queues)
        .map(|q| service_stalls(&arrivals[q], &records.pushed_at[q]))
        .collect();
    for (k, ev) in kills.iter().enumerate() {
        let out = &mut a.kills[k];
        out.tx_in_flight = ev.avail_after.saturating_sub(ev.used_before);
        out.replaced_ns = ev.replaced_ns.map(|t| t.saturating_sub(ev.at_ns));
        out.runq_wait_ns = ev.runq_wait_ns;
        out.recovery_ns = first_new_arrival(
            &arrivals[ev.queue],
            &records.pushed_at[ev.queue],
            ev.effective_ns.max(ev.at_ns),
        )
        .map(|at| at - ev.at_ns);
        let next = kills.get(k + 1).map_or(u64::MAX, |n| n.at_ns);
        let t1 = (ev.at_ns + window_ns).min(next);
        for (q, s) in stalls.iter().enumerate() {
            if q == ev.queue {
                continue;
            }
            let w = worst_stall(s, ev.at_ns, t1);
            if w >= out.others_stall_ns {
                out.others_stall_ns = w;
                out.others_stall_queue = q;
            }
            let before = worst_stall(s, ev.at_ns.saturating_sub(BASELINE_NS), ev.at_ns);
            out.others_stall_before_ns = out.others_stall_before_ns.max(before);
        }
    }
    a.quiet_stall_ns = quiet_stall(&stalls, kills, window_ns);
    check_tx_accounting(records, kills, &mut a);
    check_rx(records, kills, &mut a);
    for r in &records.rings {
        if let Some(p) = r.leak() {
            a.problems.push(format!("descriptor leak: {p}"));
        }
    }
    a
}

/// When the first frame of the queue published after `after` arrived.
fn first_new_arrival(arrivals: &[Arrival], pushed_at: &[u64], after: u64) -> Option<u64> {
    let from = arrivals.partition_point(|x| x.at_ns < after);
    arrivals[from..]
        .iter()
        .find(|x| pushed_at.get(x.seq as usize).is_some_and(|&p| p > after))
        .map(|x| x.at_ns)
}

/// The worst stall of any queue pair in stretches with no kill in or just
/// before them.
fn quiet_stall(stalls: &[Vec<Stall>], kills: &[KillEvent], window_ns: u64) -> u64 {
    let near_kill = |s: &Stall| {
        kills
            .iter()
            .any(|k| s.end >= k.at_ns && s.start <= k.at_ns + window_ns)
    };
    stalls
        .iter()
        .flatten()
        .filter(|s| !near_kill(s))
        .map(|s| s.end - s.start)
        .max()
        .unwrap_or(0)
}

/// TX: every frame arrived, intact; duplicates only of chains in flight at
/// a kill of their queue.
fn check_tx_accounting(records: &Records, kills: &[KillEvent], a: &mut Analysis) {
    if !records.tx_corrupt.is_empty() {
        a.problems
            .push(format!("corrupt TX frames: {:?}", records.tx_corrupt));
    }
    for q in 0..records.queues {
        let pushed = records.pushed_at[q].len();
        let mut count = vec![0u32; pushed];
        for x in &records.tx_arrivals[q] {
            match count.get_mut(x.seq as usize) {
                Some(c) => *c += 1,
                None => a.problems.push(format!(
                    "queue {q}: frame {} arrived but was never sent",
                    x.seq
                )),
            }
        }
        let missing: Vec<usize> = (0..pushed).filter(|&s| count[s] == 0).collect();
        if !missing.is_empty() {
            a.problems.push(format!(
                "queue {q}: {} TX frames lost, first {:?}",
                missing.len(),
                &missing[..missing.len().min(10)]
            ));
        }
        a.tx_frames += (pushed - missing.len()) as u64;
        let mut unexplained = Vec::new();
        for (seq, &c) in count.iter().enumerate() {
            if c <= 1 {
                continue;
            }
            let extra = u64::from(c - 1);
            a.tx_dups += extra;
            let s = seq as u64;
            let by = kills
                .iter()
                .position(|k| k.queue == q && k.used_before <= s && s < k.avail_after);
            match by {
                Some(k) if extra == 1 => a.kills[k].tx_dups += 1,
                _ => unexplained.push((seq, c)),
            }
        }
        if !unexplained.is_empty() {
            a.problems.push(format!(
                "queue {q}: {} TX frames duplicated that were not in flight at a kill \
                 (seq, copies) {:?}",
                unexplained.len(),
                &unexplained[..unexplained.len().min(10)]
            ));
        }
    }
}

/// RX: intact, never twice, lost only just before a kill of their queue.
fn check_rx(records: &Records, kills: &[KillEvent], a: &mut Analysis) {
    if !records.rx_corrupt.is_empty() {
        a.problems
            .push(format!("corrupt RX frames: {:?}", records.rx_corrupt));
    }
    if records.rx_used_index_inside_frame > 0 {
        a.problems.push(format!(
            "the RX used index was published inside a frame {} times",
            records.rx_used_index_inside_frame
        ));
    }
    let sent = records.rx_sent_at.len();
    let mut count = vec![0u32; sent];
    let mut flow_queues: HashMap<u16, BTreeSet<usize>> = HashMap::new();
    let mut per_queue: Vec<Vec<RxArrival>> = vec![Vec::new(); records.queues];
    for x in &records.rx_arrivals {
        match count.get_mut(x.seq as usize) {
            Some(c) => *c += 1,
            None => a
                .problems
                .push(format!("RX frame {} arrived but was never sent", x.seq)),
        }
        flow_queues
            .entry(x.flow)
            .or_default()
            .insert(usize::from(x.queue));
        per_queue[usize::from(x.queue)].push(*x);
    }
    let dups: Vec<usize> = (0..sent).filter(|&s| count[s] > 1).collect();
    if !dups.is_empty() {
        a.problems.push(format!(
            "{} RX frames arrived more than once, first {:?}",
            dups.len(),
            &dups[..dups.len().min(10)]
        ));
    }
    a.rx_frames = count.iter().filter(|&&c| c > 0).count() as u64;
    let flows = u32::from(records.rx_flows.max(1));
    let mut unexplained = Vec::new();
    for seq in (0..sent).filter(|&s| count[s] == 0) {
        a.rx_lost += 1;
        let flow = (seq as u32 % flows) as u16;
        let t = records.rx_sent_at[seq];
        let queues = flow_queues.get(&flow);
        let by = kills.iter().position(|k| {
            queues.is_some_and(|qs| qs.contains(&k.queue))
                && k.at_ns >= t
                && k.at_ns - t <= RX_LOSS_HORIZON_NS
        });
        match by {
            Some(k) => a.kills[k].rx_lost += 1,
            None => unexplained.push(seq),
        }
    }
    if !unexplained.is_empty() {
        a.problems.push(format!(
            "{} RX frames lost with no kill of their queue pair to explain them, first {:?}",
            unexplained.len(),
            &unexplained[..unexplained.len().min(10)]
        ));
    }
    for (k, ev) in kills.iter().enumerate() {
        let list = &per_queue[ev.queue];
        let after = ev.effective_ns.max(ev.at_ns);
        let from = list.partition_point(|x| x.at_ns < after);
        a.kills[k].rx_recovery_ns = list[from..]
            .iter()
            .find(|x| records.rx_sent_at[x.seq as usize] > after)
            .map(|x| x.at_ns - ev.at_ns);
    }
}

/// Median, 99th percentile and maximum of `values` (0s when empty).
pub fn summarize(values: &[u64]) -> (u64, u64, u64) {
    if values.is_empty() {
        return (0, 0, 0);
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

/// Nanoseconds as milliseconds with two decimals.
pub fn ms(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(seq: u32, at_ns: u64) -> Arrival {
        Arrival { seq, at_ns }
    }

    #[test]
    fn stalls_count_only_time_with_work_waiting() {
        // Frames published at 0, 10, 20, 100 (a generator pause) and 101.
        let pushed = [0, 10, 20, 100, 101];
        // Served quickly, except frame 4, which waited until 150.
        let arrivals = [arr(0, 1), arr(1, 11), arr(2, 21), arr(3, 102), arr(4, 150)];
        let s = service_stalls(&arrivals, &pushed);
        let lens: Vec<u64> = s.iter().map(|s| s.end - s.start).collect();
        // 1->11 starts at publication 10; the pause 21->100 is no stall.
        assert_eq!(lens, vec![1, 1, 2, 48]);
        assert_eq!(worst_stall(&s, 0, 200), 48);
        assert_eq!(worst_stall(&s, 0, 50), 1);
        assert_eq!(worst_stall(&s, 140, 145), 48);
    }

    #[test]
    fn duplicates_do_not_open_stalls() {
        let pushed = [0, 1, 2];
        let arrivals = [arr(0, 5), arr(1, 6), arr(1, 50), arr(2, 51)];
        let s = service_stalls(&arrivals, &pushed);
        assert_eq!(worst_stall(&s, 0, 100), 1);
    }

    #[test]
    fn ring_indices_unwrap_below_the_count() {
        assert_eq!(unwrap_index(5, 5), 5);
        assert_eq!(unwrap_index(3, 5), 3);
        assert_eq!(unwrap_index(65535, 65536 + 2), 65535);
        assert_eq!(unwrap_index(1, 65536 + 2), 65537);
        assert_eq!(unwrap_index(10, 3), 0);
    }

    #[test]
    fn recovery_waits_for_a_frame_published_after_the_kill() {
        let pushed = [0, 10, 20, 30];
        // Frame 1 and 2 were in flight at the kill (25) and re-sent.
        let arrivals = [arr(0, 1), arr(1, 11), arr(1, 40), arr(2, 41), arr(3, 42)];
        assert_eq!(first_new_arrival(&arrivals, &pushed, 25), Some(42));
        assert_eq!(first_new_arrival(&arrivals, &pushed, 50), None);
    }

    #[test]
    fn leaks_are_named() {
        let tx = RingEnd {
            vring: 1,
            size: 256,
            avail: 10,
            used: 10,
            last_used: 10,
        };
        assert!(tx.leak().is_none());
        assert!(RingEnd { used: 9, ..tx }.leak().is_some());
        let rx = RingEnd {
            vring: 0,
            size: 256,
            avail: 266,
            used: 10,
            last_used: 10,
        };
        assert!(rx.leak().is_none());
        assert!(RingEnd { avail: 265, ..rx }.leak().is_some());
    }
}
