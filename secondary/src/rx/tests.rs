//! Unit tests of the RX queue over the test ring and a datagram socketpair
//! standing in for the TAP.

use super::*;
use crate::features::NetFeatures;
use crate::flows::FlowTracker;
use crate::frame_io::FrameIo;
use crate::tap::Tap;
use crate::test_util::{desc, dgram_pair, Peer, RingDriver, TestMemory, BUF_BASE, F_NEXT, F_WRITE};

const HDR: usize = 12;
/// Every frame delivered and the ring used up: wait for the guest.
const IDLE_EMPTY_RING: RxOutcome = RxOutcome::Starved {
    frames_waiting: false,
};

fn features(mergeable: bool, max_rx_frame: u32) -> NetFeatures {
    NetFeatures {
        event_idx: true,
        mergeable_rx: mergeable,
        header_len: 12,
        max_rx_frame,
        ..NetFeatures::default()
    }
}

/// A frame as the TAP delivers it: header (num_buffers garbage) + payload.
fn frame(seed: u8, payload_len: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..HDR as u8).map(|i| i.wrapping_add(seed)).collect();
    f[10] = 0xee;
    f[11] = 0xee;
    f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(3).wrapping_add(seed)));
    f
}

/// The frame as the guest must see it: num_buffers filled in.
fn expected(f: &[u8], num_buffers: u16) -> Vec<u8> {
    let mut e = f.to_vec();
    e[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    e
}

struct Rx<'a> {
    m: &'a TestMemory,
    tr: RingDriver,
    q: RxQueue,
    c: LocalCounters,
    tap: Tap,
    peer: Peer,
}

impl<'a> Rx<'a> {
    fn new(m: &'a TestMemory, size: u16) -> Rx<'a> {
        let tr = m.ring(size);
        let mut q = RxQueue::new(0);
        q.install(tr.start(m, true));
        let (tap, peer) = dgram_pair();
        Rx {
            m,
            tr,
            q,
            c: LocalCounters::default(),
            tap,
            peer,
        }
    }

    fn try_run(&mut self, f: &NetFeatures, budget: usize) -> Result<Option<RxOutcome>, RingFault> {
        let ctx = PathCtx {
            mem: &self.m.map,
            io: &self.tap,
            features: f,
            counters: &mut self.c,
            flows: &mut FlowTracker::disabled(),
        };
        self.q.run(ctx, budget)
    }

    fn run(&mut self, f: &NetFeatures) -> RxOutcome {
        self.try_run(f, 256)
            .expect("rx run")
            .expect("the queue runs")
    }

    /// The guest kicks (after posting buffers) and the queue hears it.
    fn kick(&mut self) {
        self.tr.kick();
        self.q
            .on_kick(Some(&self.m.map), &mut self.c)
            .expect("rx kick");
    }

    fn ring(&self) -> &Ring {
        self.q.slot().ring().expect("a running ring")
    }

    /// `count` one-descriptor chains of `len` bytes, 0x1000 apart.
    fn add_buffers(&mut self, at: u64, count: usize, len: u32) -> Vec<u64> {
        (0..count)
            .map(|i| {
                let a = at + 0x1000 * i as u64;
                self.tr.add_chain(&[desc(a, len, F_WRITE, 0)]);
                a
            })
            .collect()
    }
}

#[test]
fn frame_lands_byte_exact_with_split_header() {
    let m = TestMemory::new();
    let mut t = Rx::new(&m, 16);
    // Header split 8 + rest; payload area straddles the region boundary.
    let a = BUF_BASE;
    let b = m.region_boundary() - 1000;
    let head =
        t.tr.add_chain(&[desc(a, 8, F_WRITE, 0), desc(b, 3000, F_WRITE, 0)]);
    let f = frame(5, 1800);
    t.peer.send_frame(&f);
    assert_eq!(t.run(&features(false, 1514)), IDLE_EMPTY_RING);
    let mut got = m.read(a, 8);
    got.extend(m.read(b, f.len() - 8));
    assert_eq!(got, expected(&f, 1));
    assert_eq!(t.tr.used(), vec![(head, f.len() as u32)]);
    assert_eq!((t.c.rx_frames, t.c.rx_bytes), (1, 1800));
    assert_eq!(t.ring().next_avail(), t.ring().next_used());
    assert!(t.tr.interrupted());
}

#[test]
fn frame_spans_mergeable_buffers_with_num_buffers() {
    let m = TestMemory::new();
    let mut t = Rx::new(&m, 16);
    // First chain: header split across two descriptors (6 + 1494).
    let h0 = t.tr.add_chain(&[
        desc(BUF_BASE, 6, F_WRITE, 0),
        desc(BUF_BASE + 0x800, 1494, F_WRITE, 0),
    ]);
    let addrs = t.add_buffers(BUF_BASE + 0x1000, 7, 1500);
    let feats = features(true, 9000);
    let big = frame(9, 5000); // 5012 bytes: 1500 * 3 + 512
    let small = frame(1, 60);
    t.peer.send_frame(&big);
    t.peer.send_frame(&small);
    assert_eq!(t.run(&feats), RxOutcome::Drained);
    let mut got = m.read(BUF_BASE, 6);
    got.extend(m.read(BUF_BASE + 0x800, 1494));
    for a in &addrs[..3] {
        got.extend(m.read(*a, 1500));
    }
    got.truncate(big.len());
    assert_eq!(got, expected(&big, 4));
    let used = t.tr.used();
    let heads = t.tr.heads();
    assert_eq!(
        used,
        vec![
            (h0, 1500),
            (heads[1], 1500),
            (heads[2], 1500),
            (heads[3], 512),
            (heads[4], small.len() as u32),
        ]
    );
    assert_eq!(m.read(addrs[3], small.len()), expected(&small, 1));
    assert_eq!(t.c.rx_frames, 2);
    // Three chains were taken for the next frame and given back.
    assert_eq!(t.ring().next_avail(), 5);
    assert_eq!(t.ring().next_used(), 5);
}

#[test]
fn no_buffer_starves_without_reading_then_resumes() {
    let m = TestMemory::new();
    let mut t = Rx::new(&m, 16);
    let feats = features(false, 1514);
    let f = frame(2, 100);
    t.peer.send_frame(&f);
    assert_eq!(
        t.run(&feats),
        RxOutcome::Starved {
            frames_waiting: true
        }
    );
    assert!(t.tap.has_frame(), "the frame stays in the TAP");
    assert_eq!(t.q.state(), RxState::Starved);
    assert!(!t.q.wants_readable(), "the TAP is not read while starved");
    assert_eq!(t.c.rx_no_buffer, 1);
    let a = t.add_buffers(BUF_BASE, 1, 2048)[0];
    assert_eq!(
        t.try_run(&feats, 256).unwrap(),
        None,
        "starved until the guest kicks"
    );
    assert!(t.tap.has_frame());
    t.kick();
    assert_eq!(t.q.state(), RxState::Running);
    assert_eq!(t.c.rx_kicks, 1);
    assert_eq!(t.run(&feats), IDLE_EMPTY_RING);
    assert_eq!(m.read(a, f.len()), expected(&f, 1));
    assert_eq!(t.c.rx_frames, 1);
}

#[test]
fn short_of_buffers_bounces_holds_and_delivers() {
    let m = TestMemory::new();
    let mut t = Rx::new(&m, 16);
    let feats = features(true, 1514); // the largest frame needs 1526 bytes
                                      // 200 bytes of buffers: a 162-byte frame fits (through the bounce).
    t.add_buffers(BUF_BASE, 2, 100);
    let f = frame(4, 150);
    t.peer.send_frame(&f);
    assert_eq!(
        t.run(&feats),
        RxOutcome::Starved {
            frames_waiting: false
        },
        "delivered, then out of buffers"
    );
    let heads = t.tr.heads();
    assert_eq!(t.tr.used(), vec![(heads[0], 100), (heads[1], 62)]);
    let mut got = m.read(BUF_BASE, 100);
    got.extend(m.read(BUF_BASE + 0x1000, 62));
    assert_eq!(got, expected(&f, 2));

    // 200 bytes of buffers, a 262-byte frame: held until more arrive.
    t.add_buffers(BUF_BASE + 0x2000, 2, 100);
    t.kick();
    let g = frame(6, 250);
    t.peer.send_frame(&g);
    assert_eq!(
        t.run(&feats),
        RxOutcome::Starved {
            frames_waiting: true
        }
    );
    assert!(t.q.holds_frame());
    assert_eq!(
        t.ring().next_avail(),
        t.ring().next_used(),
        "buffers given back"
    );
    t.add_buffers(BUF_BASE + 0x4000, 1, 100);
    t.kick();
    assert!(matches!(t.run(&feats), RxOutcome::Starved { .. }));
    assert!(!t.q.holds_frame());
    let used = t.tr.used();
    assert_eq!(used.len(), 5);
    assert_eq!(used[4].1, 62);
    let mut got = m.read(BUF_BASE + 0x2000, 100);
    got.extend(m.read(BUF_BASE + 0x3000, 100));
    got.extend(m.read(BUF_BASE + 0x4000, 62));
    assert_eq!(got, expected(&g, 3));
    assert_eq!(t.c.rx_frames, 2);
    assert_eq!(t.c.drop_too_large, 0);
}

#[test]
fn frame_larger_than_a_full_ring_is_dropped() {
    let m = TestMemory::new();
    let mut t = Rx::new(&m, 4);
    t.add_buffers(BUF_BASE, 4, 100);
    t.peer.send_frame(&frame(6, 400)); // 412 bytes > 4 * 100
    let small = frame(7, 20);
    t.peer.send_frame(&small);
    assert_eq!(t.run(&features(true, 1514)), RxOutcome::Drained);
    assert_eq!(t.c.drop_too_large, 1);
    assert_eq!(t.c.rx_frames, 1);
    assert_eq!(m.read(BUF_BASE, small.len()), expected(&small, 1));
}

#[test]
fn bad_rx_chains_refused_good_chain_still_used() {
    let m = TestMemory::new();
    let mut t = Rx::new(&m, 16);
    // Device-readable descriptor in an RX chain.
    t.tr.add_chain(&[desc(BUF_BASE, 2048, 0, 0)]);
    // Shorter than the header.
    t.tr.add_chain(&[desc(BUF_BASE, 4, F_WRITE, 0)]);
    // Outside guest memory.
    t.tr.add_chain(&[desc(0x2000, 2048, F_WRITE, 0)]);
    // Loop.
    let s = t.tr.next_slot();
    t.tr.add_chain_raw(&[
        desc(BUF_BASE, 64, F_WRITE | F_NEXT, s + 1),
        desc(BUF_BASE, 64, F_WRITE | F_NEXT, s),
    ]);
    let good = t.add_buffers(BUF_BASE + 0x4000, 1, 2048)[0];
    let f = frame(8, 500);
    t.peer.send_frame(&f);
    assert_eq!(t.run(&features(false, 1514)), IDLE_EMPTY_RING);
    assert_eq!(t.c.drop_bad_descriptor, 4);
    assert_eq!(m.read(good, f.len()), expected(&f, 1));
    let used = t.tr.used();
    let lens: Vec<u32> = used.iter().map(|u| u.1).collect();
    assert_eq!(lens, vec![0, 0, 0, 0, f.len() as u32]);
    assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), t.tr.heads());
}

#[test]
fn bad_chain_behind_taken_buffers_waits_its_turn() {
    let m = TestMemory::new();
    let mut t = Rx::new(&m, 16);
    t.add_buffers(BUF_BASE, 2, 1000);
    t.tr.add_chain(&[desc(BUF_BASE, 2048, 0, 0)]); // readable: bad
    t.add_buffers(BUF_BASE + 0x4000, 4, 1000);
    let feats = features(true, 3000); // the largest frame needs 3012
    let a = frame(1, 1500); // two buffers
    let b = frame(2, 100);
    t.peer.send_frame(&a);
    t.peer.send_frame(&b);
    assert_eq!(t.run(&feats), RxOutcome::Drained);
    let heads = t.tr.heads();
    assert_eq!(
        t.tr.used(),
        vec![
            (heads[0], 1000),
            (heads[1], a.len() as u32 - 1000),
            (heads[2], 0),
            (heads[3], b.len() as u32),
        ]
    );
    let mut got = m.read(BUF_BASE, 1000);
    got.extend(m.read(BUF_BASE + 0x1000, a.len() - 1000));
    assert_eq!(got, expected(&a, 2));
    assert_eq!(t.c.drop_bad_descriptor, 1);
    assert_eq!(t.c.rx_frames, 2);
    assert_eq!(t.ring().next_avail(), t.ring().next_used());
}

#[test]
fn avail_index_jump_is_a_fault() {
    let m = TestMemory::new();
    let mut t = Rx::new(&m, 8);
    t.tr.set_avail_idx(9);
    t.peer.send_frame(&frame(1, 60));
    let err = t.try_run(&features(false, 1514), 256).unwrap_err();
    assert!(matches!(err, RingFault::Queue(_)));
}
