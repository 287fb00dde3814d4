//! The load itself: [`run_load`] keeps every queue pair of a test VMM busy
//! while the test's closure kills or stops workers from another thread.
//!
//! - TX: a driver thread makes one sequence-numbered test frame available
//!   on every TX ring each tick (paced, not windowed: a dead queue pair's
//!   ring fills up and waits, the others go on), and notes when each frame
//!   was published;
//! - TAP: a collector thread receives them on a [`StampedTap`]; every frame
//!   is checked byte for byte;
//! - RX: a sender thread injects paced IPv4/UDP test frames of several flows
//!   into the TAP; the driver thread collects them from every RX ring.
//!
//! When the closure returns, pushing stops, the rings are drained, and the
//! [`Records`] say what happened.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use qpnet_secondary::test_util::RingProbe;

use super::cpu_wait::LoadThreads;
use super::realtime_ns;
use super::records::{Arrival, Records, RingEnd, RxArrival};
use super::stamped::StampedTap;
use crate::frames::{build, mixed_len, parse, verify, FrameId, FrameKind, FrameSpec};
use crate::tap_io::TapSocket;
use crate::traffic::tx_frame;
use crate::vmm::Vmm;

/// `FrameId::queue` of the RX test frames (apart from TX queue numbers and
/// from the tags of [`crate::traffic`]).
pub const RX_TAG: u16 = 0x300;
/// How long the rings may take to drain once pushing stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// No RX frame for this long after the sender stopped: RX is drained.
const RX_QUIET: Duration = Duration::from_millis(500);
/// The generator never catches up on more than this much lost time (after
/// its thread was descheduled, or a ring was full).
const MAX_CATCH_UP: Duration = Duration::from_millis(20);

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
            // Enough that the TAP's hash gives every queue pair RX flows
            // (with 16 flows over 4 queue pairs one gets none in ~4 % of
            // runs, and its RX recovery could not be checked).
            rx_flows: 64,
        }
    }
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
    /// The driver thread's tid, once it runs (0 before).
    driver_tid: AtomicU32,
    /// The RX sender thread's tid, once it runs (0 before).
    sender_tid: AtomicU32,
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

    /// The thread ids of the driver thread (which pushes TX frames and
    /// reaps RX ones) and the RX sender, waiting for them to start.
    pub fn threads(&self) -> Result<LoadThreads> {
        let (d, s) = (&self.live.driver_tid, &self.live.sender_tid);
        crate::wait::wait_for("the load's threads", Duration::from_secs(5), || {
            d.load(Ordering::Acquire) != 0 && s.load(Ordering::Acquire) != 0
        })?;
        Ok(LoadThreads {
            driver: d.load(Ordering::Acquire),
            sender: s.load(Ordering::Acquire),
        })
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
        driver_tid: AtomicU32::new(0),
        sender_tid: AtomicU32::new(0),
    };
    let tx_probes: Vec<RingProbe> = vmm.tx.iter().map(|t| t.queue.probe()).collect();
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
                cpu: Default::default(),
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
    live.driver_tid
        .store(nix::unistd::gettid().as_raw() as u32, Ordering::Release);
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
        tx.flush();
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
    live.sender_tid
        .store(nix::unistd::gettid().as_raw() as u32, Ordering::Release);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_indices_unwrap_below_the_count() {
        assert_eq!(unwrap_index(5, 5), 5);
        assert_eq!(unwrap_index(3, 5), 3);
        assert_eq!(unwrap_index(65535, 65536 + 2), 65535);
        assert_eq!(unwrap_index(1, 65536 + 2), 65537);
        assert_eq!(unwrap_index(10, 3), 0);
    }
}
