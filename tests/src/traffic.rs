//! Moving many test frames through qpnet and accounting for every one.
//!
//! Guest -> TAP: [`TapCollector`] receives on the TAP's packet socket in a
//! background thread, checks every frame byte for byte and counts each
//! [`FrameId`]; [`send_tx`] pushes frames into the VMM's TX rings while
//! keeping at most a window of frames between "made available" and
//! "received on the TAP", so no kernel queue can overflow and any loss is
//! qpnet's. [`TapCollector::check`] then names what is missing, duplicated,
//! corrupt or unexpected.
//!
//! TAP -> guest: [`rx_traffic`] sends IPv4/UDP test frames of several flows
//! on the packet socket from a thread (again windowed) while the VMM collects
//! from every RX queue, and reports per-queue counts and multi-buffer frames.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::frames::{build, mixed_len, verify, FrameId, FrameKind, FrameSpec};
use crate::tap_io::TapSocket;
use crate::vmm::Vmm;

/// Frames allowed between the VMM's TX ring and the TAP socket at once.
pub const TX_WINDOW: u64 = 1024;
/// Frames allowed between the TAP socket and the VMM's RX rings at once.
pub const RX_WINDOW: u64 = 128;

/// What the collector saw.
#[derive(Debug, Default)]
pub struct Collected {
    /// How many times each test frame arrived.
    pub seen: HashMap<FrameId, u32>,
    /// Descriptions of frames that failed byte-for-byte verification.
    pub corrupt: Vec<String>,
}

/// Receives and verifies frames from the TAP in a background thread.
#[derive(Debug)]
pub struct TapCollector {
    state: Arc<Mutex<Collected>>,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl TapCollector {
    /// Start collecting from a duplicate of `tap`'s socket.
    pub fn start(tap: &TapSocket) -> Result<TapCollector> {
        let sock = tap.try_clone()?;
        let state = Arc::new(Mutex::new(Collected::default()));
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, rc, sp) = (state.clone(), received.clone(), stop.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            while !sp.load(Ordering::Relaxed) {
                let Some(frame) = sock.recv_timeout(Duration::from_millis(20))? else {
                    continue;
                };
                let mut s = st.lock().unwrap();
                match verify(&frame) {
                    Ok(id) => *s.seen.entry(id).or_insert(0) += 1,
                    Err(e) => {
                        if s.corrupt.len() < 20 {
                            s.corrupt.push(e.to_string());
                        }
                    }
                }
                rc.fetch_add(1, Ordering::Release);
            }
            Ok(())
        });
        Ok(TapCollector {
            state,
            received,
            stop,
            thread: Some(thread),
        })
    }

    /// Frames received so far (test frames or not).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    /// Wait until at least `n` frames were received.
    pub fn wait_received(&self, n: u64, timeout: Duration) -> Result<()> {
        crate::wait::wait_for(&format!("{n} frames on the TAP"), timeout, || {
            self.received() >= n
        })
        .with_context(|| format!("only {} frames arrived", self.received()))
    }

    /// Check that every frame of `expected` (queue, seq range) arrived
    /// exactly once, intact, and nothing else arrived.
    pub fn check(&self, expected: &[(u16, Range<u32>)]) -> Result<()> {
        self.check_frames(expected, true)
    }

    /// Like [`TapCollector::check`], but test frames outside `expected`
    /// (left over from an earlier session) are ignored.
    pub fn check_expected(&self, expected: &[(u16, Range<u32>)]) -> Result<()> {
        self.check_frames(expected, false)
    }

    fn check_frames(&self, expected: &[(u16, Range<u32>)], strict: bool) -> Result<()> {
        let s = self.state.lock().unwrap();
        let mut problems = Vec::new();
        if !s.corrupt.is_empty() {
            problems.push(format!("corrupt frames: {:?}", s.corrupt));
        }
        let mut want = 0usize;
        for (queue, range) in expected {
            let mut missing = Vec::new();
            let mut dups = Vec::new();
            for seq in range.clone() {
                want += 1;
                match s.seen.get(&FrameId { queue: *queue, seq }) {
                    None => missing.push(seq),
                    Some(&n) if n > 1 => dups.push((seq, n)),
                    _ => {}
                }
            }
            if !missing.is_empty() {
                problems.push(format!(
                    "queue {queue}: {} of {} frames missing, first {:?}",
                    missing.len(),
                    range.len(),
                    &missing[..missing.len().min(10)]
                ));
            }
            if !dups.is_empty() {
                problems.push(format!(
                    "queue {queue}: {} frames duplicated, first (seq, times) {:?}",
                    dups.len(),
                    &dups[..dups.len().min(10)]
                ));
            }
        }
        let unexpected = s
            .seen
            .keys()
            .filter(|id| {
                !expected
                    .iter()
                    .any(|(q, r)| *q == id.queue && r.contains(&id.seq))
            })
            .count();
        if strict && unexpected > 0 {
            problems.push(format!("{unexpected} frames nobody sent"));
        }
        if !problems.is_empty() {
            bail!(
                "{} test frames expected, {} received: {}",
                want,
                self.received(),
                problems.join("; ")
            );
        }
        Ok(())
    }

    /// Stop the thread and surface its error, if any.
    pub fn finish(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("TAP collector thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for TapCollector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether test frames other than a round's own may arrive on the TAP
/// during [`tx_round`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strays {
    /// Nothing else may arrive: any other frame fails the round.
    Refused,
    /// Frames of earlier rounds still on their way are ignored.
    Ignored,
}

/// The TX round every test uses: frames `seqs` on the TX queue of every
/// queue pair in `qps`; every one must arrive on the TAP exactly once, byte
/// for byte, within `timeout` (and with [`Strays::Refused`], nothing else).
pub fn tx_round(
    vmm: &mut Vmm,
    tap: &TapSocket,
    qps: &[usize],
    seqs: Range<u32>,
    strays: Strays,
    timeout: Duration,
) -> Result<()> {
    let collector = TapCollector::start(tap)?;
    let expected: Vec<(u16, Range<u32>)> = qps.iter().map(|&q| (q as u16, seqs.clone())).collect();
    let r = send_tx(vmm, qps, seqs.clone(), &collector, timeout).and_then(|()| match strays {
        Strays::Refused => {
            collector.wait_received(seqs.len() as u64 * qps.len() as u64, timeout)?;
            collector.check(&expected)
        }
        Strays::Ignored => {
            let mut last = Ok(());
            let waited = crate::wait::wait_for("the round's frames on the TAP", timeout, || {
                last = collector.check_expected(&expected);
                last.is_ok()
            });
            last.and(waited)
        }
    });
    let finished = collector.finish();
    r.and(finished)
}

/// The frame test traffic puts on `queue` with sequence number `seq`.
pub fn tx_frame(queue: u16, seq: u32) -> Vec<u8> {
    build(&FrameSpec {
        id: FrameId { queue, seq },
        len: mixed_len(seq),
        kind: FrameKind::Experimental,
    })
}

/// Send frames `seqs` on the TX queue of every queue pair in `qps`
/// (interleaved), windowed against `collector`. Returns when all were made
/// available and the TX rings have no chain in flight; frames may still be on
/// their way to the socket (use [`TapCollector::wait_received`]).
pub fn send_tx(
    vmm: &mut Vmm,
    qps: &[usize],
    seqs: Range<u32>,
    collector: &TapCollector,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut next: Vec<u32> = qps.iter().map(|_| seqs.start).collect();
    let base = collector.received();
    let mut sent: u64 = 0;
    loop {
        let mut progress = false;
        for (i, &qp) in qps.iter().enumerate() {
            let tx = &mut vmm.tx[qp];
            progress |= tx.reap()? > 0;
            let mut pushed = false;
            while next[i] < seqs.end && sent - (collector.received() - base).min(sent) < TX_WINDOW {
                if !tx.try_push(&tx_frame(qp as u16, next[i]))? {
                    break;
                }
                next[i] += 1;
                sent += 1;
                pushed = true;
            }
            if pushed {
                tx.flush();
                progress = true;
            }
        }
        let all_pushed = next.iter().all(|&n| n == seqs.end);
        let idle = qps.iter().all(|&qp| vmm.tx[qp].in_flight() == 0);
        if all_pushed && idle {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let state: Vec<String> = qps
                .iter()
                .zip(&next)
                .map(|(&qp, n)| {
                    let q = &vmm.tx[qp].queue;
                    format!(
                        "qp {qp}: next seq {n}, avail {}, used {}",
                        q.avail_idx(),
                        q.used_idx()
                    )
                })
                .collect();
            bail!(
                "TX stalled: {sent} frames sent, {} received on the TAP; {}",
                collector.received() - base,
                state.join("; ")
            );
        }
        if !progress {
            vmm.tx[qps[0]].queue.wait_call(Duration::from_micros(500));
        }
    }
}

/// What [`rx_traffic`] saw.
#[derive(Debug, Default, Clone)]
pub struct RxReport {
    /// Test frames received per queue pair.
    pub per_queue: Vec<u64>,
    /// Frames that spanned more than one buffer.
    pub multi_buffer_frames: u64,
    /// The most buffers one frame spanned.
    pub max_buffers: u16,
    /// Frames received that were not test frames (the kernel's own).
    pub foreign: u64,
    /// Frames that never arrived (only [`rx_traffic_lossy`] allows any).
    pub lost: u32,
    /// Test frames of an earlier run (another tag), left in the TAP's
    /// queues and delivered now; ignored.
    pub stale: u64,
    /// Times the driver found a used index inside a frame (must be 0).
    pub used_index_inside_frame: u64,
}

/// Tags RX runs apart (carried in [`FrameId::queue`]), so frames an earlier
/// run left queued in the TAP are never mistaken for this run's.
static RX_TAG: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0x100);

/// Send `count` UDP test frames over `flows` flows into the TAP (lengths by
/// `len_of(seq)`) and collect them from every RX queue of `vmm`; every frame
/// must arrive exactly once, byte for byte, with a clean virtio-net header.
pub fn rx_traffic(
    vmm: &mut Vmm,
    tap: &TapSocket,
    count: u32,
    flows: u16,
    len_of: fn(u32) -> usize,
    timeout: Duration,
) -> Result<RxReport> {
    rx_traffic_lossy(vmm, tap, count, flows, len_of, 0, timeout)
}

/// [`rx_traffic`] where up to `max_lost` frames may be missing (hostile RX
/// buffers may cost the frame that met them); the rest must arrive once,
/// intact. [`RxReport::lost`] says how many did not.
pub fn rx_traffic_lossy(
    vmm: &mut Vmm,
    tap: &TapSocket,
    count: u32,
    flows: u16,
    len_of: fn(u32) -> usize,
    max_lost: u32,
    timeout: Duration,
) -> Result<RxReport> {
    let received = AtomicU64::new(0);
    let abort = AtomicBool::new(false);
    let tag = RX_TAG.fetch_add(1, Ordering::Relaxed);
    let deadline = Instant::now() + timeout;
    let mut report = RxReport {
        per_queue: vec![0; vmm.rx.len()],
        ..RxReport::default()
    };
    let mut seen = vec![0u8; count as usize];
    let mut problems: Vec<String> = Vec::new();
    let inside_before: u64 = vmm.rx.iter().map(|r| r.used_index_inside_frame()).sum();
    std::thread::scope(|s| -> Result<()> {
        let sender = s.spawn(|| -> Result<()> {
            for seq in 0..count {
                while u64::from(seq) - received.load(Ordering::Acquire).min(u64::from(seq))
                    >= RX_WINDOW
                {
                    if abort.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                let spec = FrameSpec {
                    id: FrameId { queue: tag, seq },
                    len: len_of(seq),
                    kind: FrameKind::Udp {
                        flow: (seq % u32::from(flows.max(1))) as u16,
                    },
                };
                tap.send(&build(&spec))?;
            }
            Ok(())
        });
        let result = collect_rx(
            vmm,
            &received,
            &mut seen,
            &mut report,
            &mut problems,
            (tag, count, max_lost),
            deadline,
        );
        abort.store(true, Ordering::Relaxed);
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))?;
        result.and(sent)
    })?;
    report.used_index_inside_frame = vmm
        .rx
        .iter()
        .map(|r| r.used_index_inside_frame())
        .sum::<u64>()
        - inside_before;
    if report.used_index_inside_frame > 0 {
        problems.push(format!(
            "the used index was published inside a frame {} times",
            report.used_index_inside_frame
        ));
    }
    let missing: Vec<u32> = (0..count).filter(|&i| seen[i as usize] == 0).collect();
    let dups: Vec<u32> = (0..count).filter(|&i| seen[i as usize] > 1).collect();
    report.lost = missing.len() as u32;
    if missing.len() > max_lost as usize {
        problems.push(format!(
            "{} frames missing, first {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    if !dups.is_empty() {
        problems.push(format!(
            "{} frames duplicated, first {:?}",
            dups.len(),
            &dups[..dups.len().min(10)]
        ));
    }
    if !problems.is_empty() {
        bail!(
            "RX of {count} frames: {}; report {report:?}",
            problems.join("; ")
        );
    }
    Ok(report)
}

/// Poll every RX queue until `count` frames arrived, or at least
/// `count - max_lost` and nothing more came for a while.
fn collect_rx(
    vmm: &mut Vmm,
    received: &AtomicU64,
    seen: &mut [u8],
    report: &mut RxReport,
    problems: &mut Vec<String>,
    (tag, count, max_lost): (u16, u32, u32),
    deadline: Instant,
) -> Result<()> {
    let mut got = 0u64;
    let enough = u64::from(count - max_lost.min(count));
    let mut quiet_since = Instant::now();
    while got < u64::from(count) {
        if max_lost > 0 && got >= enough && quiet_since.elapsed() > Duration::from_millis(300) {
            break;
        }
        let mut progress = false;
        for qp in 0..vmm.rx.len() {
            for frame in vmm.rx[qp].reap()? {
                progress = true;
                if frame.header[0] != 0 || frame.header[1] != 0 {
                    problems.push(format!(
                        "qp {qp}: header flags/gso_type {:02x?} without offloads negotiated",
                        &frame.header[..2]
                    ));
                }
                if frame.buffers > 1 {
                    report.multi_buffer_frames += 1;
                }
                report.max_buffers = report.max_buffers.max(frame.buffers);
                match verify(&frame.data) {
                    Ok(id) if id.queue != tag => report.stale += 1,
                    Ok(id) if id.seq < count => {
                        seen[id.seq as usize] = seen[id.seq as usize].saturating_add(1);
                        report.per_queue[qp] += 1;
                        got += 1;
                        received.fetch_add(1, Ordering::Release);
                    }
                    Ok(id) => problems.push(format!("unexpected frame {id:?}")),
                    Err(_) if crate::frames::parse(&frame.data).is_none() => report.foreign += 1,
                    Err(e) => problems.push(format!("qp {qp}: {e}")),
                }
                if problems.len() > 20 {
                    bail!("RX: too many problems: {problems:?}");
                }
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "RX stalled: {got} of {count} frames arrived; per queue {:?}",
                report.per_queue
            );
        }
        if progress {
            quiet_since = Instant::now();
        } else {
            vmm.rx[0].queue.wait_call(Duration::from_micros(500));
        }
    }
    Ok(())
}
