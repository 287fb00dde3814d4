//! The body of the `chain` fuzz target (`fuzz/fuzz_targets/chain.rs`), shared
//! with the stable replay test (`tests/tests/fuzz_replay.rs`): descriptor
//! chains walked by the real TX and RX queues over guest memory built from
//! arbitrary bytes, with an in-memory frame I/O standing in for the TAP.
//!
//! Guest memory is three memfd regions: two adjacent 64 KiB ones at
//! [`MEM`] (buffers may straddle them) and one page far away at [`FAR`].
//! The input's memory image is copied to [`MEM`]; the TX and RX rings sit
//! anywhere in its first 16 KiB (they may overlap each other). Everything the
//! worker reads from the guest (descriptors, indirect tables, avail ring,
//! `used_event`) therefore comes from the fuzzer.
//!
//! Checked besides "no panic": after every run that did not fault, every
//! chain taken was completed or given back (`next_avail == next_used`); TX
//! completions have length 0 and name a head inside the ring, and the used
//! index in guest memory is the ring's; each frame that reaches the frame
//! I/O has a size the TX path allows and a header that passes the check
//! (the checked copy went out, not the guest's bytes); an RX completion
//! names a head inside the ring and never claims more bytes than that chain
//! can hold (checked when no device-writable buffer overlaps a ring or an
//! indirect table, so the snapshot of the tables taken before the run is
//! still what the worker walked).

mod stream_peer;

pub use stream_peer::fuzz_stream;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sys::eventfd::{EfdFlags, EventFd};
use qpnet_ipc::{RingConfig, RingKind};

use crate::counters::{LocalCounters, StatsHome};
use crate::features::{NetFeatures, ETH_HLEN, MAX_RX_FRAME_LIMIT, MAX_TX_FRAME};
use crate::flows::FlowTracker;
use crate::frame_io::FrameIo;
use crate::iovecs::IoVecs;
use crate::queue::PathCtx;
use crate::ring::Ring;
use crate::rx::{RxOutcome, RxQueue};
use crate::test_util::{
    GuestMemory, RegionLayout, RingLayout, TestMemory, DESC_SIZE, F_INDIRECT, F_NEXT, F_WRITE,
};
use crate::tx::{TxOutcome, TxQueue};
use crate::tx_header::{TxHeader, TxOffloads};

/// Guest-physical address of the first of the two adjacent regions.
pub const MEM: u64 = 0x1_0000;
/// Size of each adjacent region.
const REGION: u64 = 0x1_0000;
/// Guest-physical address of the lone far page.
pub const FAR: u64 = 0x1_0000_0000;
const FAR_SIZE: u64 = 0x1000;
/// Bytes of configuration before the frame lengths.
const CONFIG_LEN: usize = 16;

/// What the input asks for (see [`fuzz_chain`]).
struct Config {
    tx_size: u16,
    rx_size: u16,
    features: NetFeatures,
    tx_next: u16,
    rx_next: u16,
    tx_at: u64,
    rx_at: u64,
    budget: usize,
    rounds: usize,
    event_idx_start: bool,
    tx_blocks: u8,
    tx_errors: u8,
    rx_errors: u8,
    frames: usize,
}

impl Config {
    fn parse(c: &[u8; CONFIG_LEN]) -> Config {
        let bit = |b: u8| c[1] & (1 << b) != 0;
        let header_len = if bit(2) && !bit(1) { 10 } else { 12 };
        let max_rx = u16::from_le_bytes([c[2], c[3]]) as u32;
        let features = NetFeatures {
            event_idx: bit(0),
            mergeable_rx: bit(1),
            header_len,
            max_rx_frame: max_rx.clamp(ETH_HLEN, MAX_RX_FRAME_LIMIT),
            tx_offloads: TxOffloads {
                csum: bit(3),
                tso4: bit(4),
                tso6: bit(5),
                ecn: bit(6),
                ufo: bit(7),
            },
        };
        Config {
            tx_size: 1 << (c[0] & 0xf).min(8),
            rx_size: 1 << (c[0] >> 4).min(8),
            features,
            tx_next: u16::from_le_bytes([c[4], c[5]]),
            rx_next: u16::from_le_bytes([c[6], c[7]]),
            tx_at: MEM + 0x40 * u64::from(c[8]),
            rx_at: MEM + 0x40 * u64::from(c[9]),
            budget: usize::from(c[10]) + 1,
            rounds: usize::from(c[11] & 3) + 1,
            event_idx_start: c[11] & 4 != 0,
            tx_blocks: c[12],
            tx_errors: c[13],
            rx_errors: c[14],
            frames: usize::from(c[15] & 7),
        }
    }
}

/// Run the TX and RX queues over guest memory and frames built from
/// `input`. Layout: 16 bytes of configuration (below), then one
/// little-endian u16 length per RX frame, then the memory image copied to
/// [`MEM`] (RX frames take their bytes from it too, cyclically).
///
/// Configuration: `[0]` ring sizes, log2 of TX (low nibble) and RX (high
/// nibble), at most 256; `[1]` features: EVENT_IDX, MRG_RXBUF, a 10-byte
/// header (without MRG_RXBUF), then the TX offloads csum, tso4, tso6, ecn,
/// ufo; `[2..4]` max_rx_frame (clamped); `[4..6]`, `[6..8]` where the TX and
/// RX rings start (next_avail); `[8]`, `[9]` the TX and RX rings' place,
/// in 64-byte steps from [`MEM`]; `[10]` the budget minus one; `[11]` runs
/// minus one (bits 0-1), and whether the rings start with EVENT_IDX before
/// the features turn it on or off (bit 2); `[12]` which frame writes would
/// block and `[13]` which fail (bit `n % 8` for write `n`); `[14]` which
/// frame reads fail; `[15]` number of RX frames (bits 0-2).
///
/// # Panics
/// When an invariant listed in the module documentation fails.
pub fn fuzz_chain(input: &[u8]) {
    let Some((config, rest)) = input.split_first_chunk::<CONFIG_LEN>() else {
        return;
    };
    let cfg = Config::parse(config);
    let (lens, image) = rest.split_at(rest.len().min(2 * cfg.frames));
    let m = TestMemory::with_layout(&[
        RegionLayout::new(MEM, REGION),
        RegionLayout::new(MEM + REGION, REGION),
        RegionLayout::new(FAR, FAR_SIZE),
    ]);
    let image = &image[..image.len().min(2 * REGION as usize)];
    m.write(MEM, image);
    let frames = lens
        .chunks_exact(2)
        .map(|l| {
            let len = usize::from(u16::from_le_bytes([l[0], l[1]]));
            (0..len)
                .map(|i| {
                    image
                        .get(i % image.len().max(1))
                        .copied()
                        .unwrap_or(i as u8)
                })
                .collect()
        })
        .collect();
    let io = FakeIo::new(&cfg, frames);
    let tx_layout = RingLayout::packed(cfg.tx_at, cfg.tx_size);
    let rx_layout = RingLayout::packed(cfg.rx_at, cfg.rx_size);
    let mut tx = TxQueue::new(0);
    let mut rx = RxQueue::new(0);
    let mut tx_ring = start(
        &m,
        tx_layout,
        RingKind::Tx,
        cfg.tx_next,
        cfg.event_idx_start,
    );
    let mut rx_ring = start(
        &m,
        rx_layout,
        RingKind::Rx,
        cfg.rx_next,
        cfg.event_idx_start,
    );
    for ring in [&mut tx_ring, &mut rx_ring].into_iter().flatten() {
        ring.set_event_idx(cfg.features.event_idx);
    }
    let (tx_on, rx_on) = (tx_ring.is_some(), rx_ring.is_some());
    if let Some(r) = tx_ring {
        tx.install(r);
    }
    if let Some(r) = rx_ring {
        rx.install(r);
    }
    let mut counters = LocalCounters::default();
    let mut flows = FlowTracker::new(0, true);
    let home = StatsHome::private();
    for _ in 0..cfg.rounds {
        if tx_on {
            run_tx(&m, &cfg, &io, &mut tx, &mut counters, &mut flows);
            flows.flush(&home);
        }
        if rx_on {
            run_rx(&m, &cfg, &io, &mut rx, &mut counters, &mut flows);
            flows.flush(&home);
        }
    }
}

/// A worker-side ring on `layout`, if the worker accepts it.
fn start(m: &TestMemory, layout: RingLayout, kind: RingKind, next: u16, ev: bool) -> Option<Ring> {
    let cfg = RingConfig {
        kind,
        size: layout.size,
        desc_table: layout.desc,
        avail_ring: layout.avail,
        used_ring: layout.used,
        next_avail: next,
        has_call: true,
        has_err: false,
        signal_on_start: false,
    };
    Ring::start(&cfg, ev, vec![eventfd(), eventfd()], &m.map).ok()
}

/// A nonblocking eventfd (none left would be an fd leak: a finding).
fn eventfd() -> OwnedFd {
    OwnedFd::from(
        EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).expect("an eventfd"),
    )
}

fn run_tx(
    m: &TestMemory,
    cfg: &Config,
    io: &FakeIo,
    tx: &mut TxQueue,
    counters: &mut LocalCounters,
    flows: &mut FlowTracker,
) {
    let Some(start) = tx.slot().ring().map(Ring::next_used) else {
        return;
    };
    let ctx = PathCtx {
        mem: &m.map,
        io,
        features: &cfg.features,
        counters,
        flows,
    };
    match tx.run(ctx, cfg.budget) {
        Ok(Some(outcome)) => {
            let ring = tx.slot().ring().expect("a ring that ran is installed");
            check_settled(ring, "TX");
            let layout = RingLayout::packed(cfg.tx_at, cfg.tx_size);
            for (head, len) in completions(m, layout, start, ring.next_used()) {
                assert!(head < u32::from(cfg.tx_size), "TX completed head {head}");
                assert_eq!(len, 0, "TX chain {head} completed with length {len}");
            }
            // Published at the end of a run that completed chains.
            if ring.next_used() != start {
                assert_eq!(
                    m.load_u16(layout.used + 2),
                    ring.next_used(),
                    "TX used index in guest memory"
                );
            }
            if outcome == TxOutcome::Blocked {
                tx.unblock();
            }
        }
        Ok(None) => {}
        // A faulted ring is stopped by the worker; so it is here.
        Err(_) => drop(tx.take_ring()),
    }
}

fn run_rx(
    m: &TestMemory,
    cfg: &Config,
    io: &FakeIo,
    rx: &mut RxQueue,
    counters: &mut LocalCounters,
    flows: &mut FlowTracker,
) {
    let Some(start) = rx.slot().ring().map(Ring::next_used) else {
        return;
    };
    let layout = RingLayout::packed(cfg.rx_at, cfg.rx_size);
    let capacity = chain_capacities(m, layout);
    let ctx = PathCtx {
        mem: &m.map,
        io,
        features: &cfg.features,
        counters: &mut *counters,
        flows,
    };
    match rx.run(ctx, cfg.budget) {
        Ok(Some(outcome)) => {
            let ring = rx.slot().ring().expect("a ring that ran is installed");
            check_settled(ring, "RX");
            if let Some(capacity) = capacity {
                check_rx(m, layout, &capacity, start, ring.next_used());
            }
            if matches!(outcome, RxOutcome::Starved { .. }) {
                // The guest's next kick.
                let _ = rx.on_kick(Some(&m.map), counters);
            }
        }
        Ok(None) => {}
        Err(_) => drop(rx.take_ring()),
    }
}

/// RX completions against the chains' capacities (see
/// [`chain_capacities`]), and the used index they published.
fn check_rx(m: &TestMemory, layout: RingLayout, capacity: &[u64], start: u16, end: u16) {
    for (head, len) in completions(m, layout, start, end) {
        let cap = capacity.get(head as usize).copied();
        assert!(cap.is_some(), "RX completed head {head}");
        assert!(
            u64::from(len) <= cap.unwrap_or(0),
            "RX chain {head} completed with {len} bytes, it holds {cap:?}"
        );
    }
    if end != start {
        assert_eq!(
            m.load_u16(layout.used + 2),
            end,
            "RX used index in guest memory"
        );
    }
}

/// Between runs every chain taken was completed or given back.
fn check_settled(ring: &Ring, what: &str) {
    assert_eq!(
        ring.next_avail(),
        ring.next_used(),
        "{what}: chains taken and neither completed nor given back"
    );
}

/// The used entries `start..end` still in the ring (the last `size`), as
/// (head, len).
fn completions(m: &TestMemory, l: RingLayout, start: u16, end: u16) -> Vec<(u32, u32)> {
    let count = end.wrapping_sub(start).min(l.size);
    (0..count)
        .map(|k| {
            let at = l.used + 4 + 8 * u64::from(end.wrapping_sub(count - k) % l.size);
            (m.load_u32(at), m.load_u32(at + 4))
        })
        .collect()
}

/// Whether `gpa..gpa+len` lies in guest memory.
fn inside(gpa: u64, len: u64) -> bool {
    let Some(end) = gpa.checked_add(len) else {
        return false;
    };
    (gpa >= MEM && end <= MEM + 2 * REGION) || (gpa >= FAR && end <= FAR + FAR_SIZE)
}

/// One descriptor: addr, len, flags, next.
type Raw = (u64, u32, u16, u16);

fn read_table(m: &GuestMemory, addr: u64, entries: u64) -> Option<Vec<Raw>> {
    if !inside(addr, entries.checked_mul(DESC_SIZE)?) {
        return None;
    }
    let bytes = m.read(addr, (entries * DESC_SIZE) as usize);
    Some(
        bytes
            .chunks_exact(16)
            .map(|d| {
                let u = |r: std::ops::Range<usize>| {
                    d[r].iter().rev().fold(0u64, |a, &b| a << 8 | u64::from(b))
                };
                (u(0..8), u(8..12) as u32, u(12..14) as u16, u(14..16) as u16)
            })
            .collect(),
    )
}

/// The bytes of device-writable buffers in the chain from `first` in
/// `table`. An indirect descriptor ends it with its table's chain (one of
/// `tables`, read from guest memory; none inside an indirect table, where
/// `tables` is empty).
fn writable_len(table: &[Raw], first: usize, tables: &[(u64, Vec<Raw>)]) -> u64 {
    let (mut i, mut sum) = (first, 0u64);
    for _ in 0..=table.len() {
        let Some(&(addr, len, flags, next)) = table.get(i) else {
            break;
        };
        if flags & F_INDIRECT != 0 {
            let entries = u64::from(len) / DESC_SIZE;
            if let Some((_, t)) = tables
                .iter()
                .find(|(a, t)| *a == addr && t.len() as u64 == entries)
            {
                sum += writable_len(t, 0, &[]);
            }
            break;
        }
        if flags & F_WRITE != 0 {
            sum += u64::from(len);
        }
        if flags & F_NEXT == 0 {
            break;
        }
        i = usize::from(next);
    }
    sum
}

/// For each head of the RX ring, the bytes of device-writable buffers its
/// chain holds (an over-estimate for chains the worker refuses), or `None`
/// when a device-writable buffer overlaps a ring part or an indirect table,
/// or the ring's parts overlap: then the device's own writes may change
/// what it walks, and the snapshot says nothing.
fn chain_capacities(m: &TestMemory, l: RingLayout) -> Option<Vec<u64>> {
    let n = u64::from(l.size);
    let main = read_table(m, l.desc, n)?;
    let mut tables: Vec<(u64, Vec<Raw>)> = Vec::new();
    for &(addr, len, flags, _) in &main {
        let entries = u64::from(len) / DESC_SIZE;
        let known = |t: &(u64, Vec<Raw>)| t.0 == addr && t.1.len() as u64 == entries;
        if flags & F_INDIRECT != 0 && !tables.iter().any(known) {
            if let Some(t) = read_table(m, addr, entries) {
                tables.push((addr, t));
            }
        }
    }
    let mut guarded = vec![
        (l.desc, DESC_SIZE * n),
        (l.avail, 6 + 2 * n),
        (l.used, 6 + 8 * n),
    ];
    guarded.extend(tables.iter().map(|(a, t)| (*a, DESC_SIZE * t.len() as u64)));
    let overlap = |a: (u64, u64), b: (u64, u64)| a.0 < b.0 + b.1 && b.0 < a.0 + a.1;
    for (i, &a) in guarded.iter().enumerate() {
        if guarded[..i].iter().any(|&b| overlap(a, b)) {
            return None;
        }
    }
    let all = main.iter().chain(tables.iter().flat_map(|(_, t)| t.iter()));
    for &(addr, len, flags, _) in all {
        let buf = (addr, u64::from(len));
        if flags & F_WRITE != 0 && guarded.iter().any(|&g| overlap(buf, g)) {
            return None;
        }
    }
    let capacity = (0..main.len())
        .map(|head| writable_len(&main, head, &tables))
        .collect();
    Some(capacity)
}

/// The frame I/O of the fuzz target: RX frames from the input, TX frames
/// checked and counted, failures and back-pressure where the input says.
struct FakeIo {
    fd: OwnedFd,
    rx: RefCell<VecDeque<Vec<u8>>>,
    writes: Cell<u32>,
    reads: Cell<u32>,
    header_len: usize,
    offloads: TxOffloads,
    tx_blocks: u8,
    tx_errors: u8,
    rx_errors: u8,
}

impl FakeIo {
    fn new(cfg: &Config, frames: VecDeque<Vec<u8>>) -> FakeIo {
        FakeIo {
            fd: eventfd(),
            rx: RefCell::new(frames),
            writes: Cell::new(0),
            reads: Cell::new(0),
            header_len: cfg.features.header_len as usize,
            offloads: cfg.features.tx_offloads,
            tx_blocks: cfg.tx_blocks,
            tx_errors: cfg.tx_errors,
            rx_errors: cfg.rx_errors,
        }
    }

    /// Count call `n` of `counter`; bit `n % 8` of a script is its fate.
    fn next(counter: &Cell<u32>) -> u8 {
        let n = counter.get();
        counter.set(n.wrapping_add(1));
        1 << (n % 8)
    }

    fn next_frame(&self) -> io::Result<Vec<u8>> {
        if Self::next(&self.reads) & self.rx_errors != 0 {
            return Err(io::Error::other("fuzz: read fails"));
        }
        self.rx
            .borrow_mut()
            .pop_front()
            .ok_or_else(|| io::ErrorKind::WouldBlock.into())
    }
}

impl FrameIo for FakeIo {
    fn write_frame(&self, frame: &IoVecs<'_>, _header: usize) -> io::Result<usize> {
        let fate = Self::next(&self.writes);
        if fate & self.tx_blocks != 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let total = frame.total();
        let header = self.header_len as u64;
        assert!(
            total >= header + u64::from(ETH_HLEN) && total <= header + u64::from(MAX_TX_FRAME),
            "a {total}-byte frame reached the frame I/O"
        );
        let mut hdr = [0u8; 12];
        let got = frame.read_at(0..frame.len(), 0, &mut hdr[..self.header_len]);
        assert_eq!(got, self.header_len, "the header is in the frame");
        let checked =
            TxHeader::from_bytes(&hdr[..self.header_len]).check(self.offloads, total - header);
        assert!(checked.is_ok(), "an unchecked header went out: {hdr:?}");
        if fate & self.tx_errors != 0 {
            return Err(io::Error::other("fuzz: write fails"));
        }
        Ok(total as usize)
    }

    fn read_frame(&self, bufs: &IoVecs<'_>, from: usize, _header: usize) -> io::Result<usize> {
        let frame = self.next_frame()?;
        // Like a TAP's readv: as much of the frame as fits, its full length.
        if let Some(list) = bufs.as_slice().get(from..) {
            let room: usize = list.iter().map(|v| v.iov_len).sum();
            let n = frame.len().min(room);
            assert!(bufs.write_at(from..bufs.len(), 0, &frame[..n]));
        }
        Ok(frame.len())
    }

    fn read_into(&self, buf: &mut [u8], _header: usize) -> io::Result<usize> {
        let frame = self.next_frame()?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(frame.len())
    }

    fn has_frame(&self) -> bool {
        !self.rx.borrow().is_empty()
    }
}

impl AsFd for FakeIo {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
