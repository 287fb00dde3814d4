//! Unit tests of the TX queue over the test ring and a datagram socketpair
//! standing in for the TAP.

use super::*;
use crate::features::NetFeatures;
use crate::flows::FlowTracker;
use crate::tap::Tap;
use crate::test_util::{desc, dgram_pair, Peer, RingDriver, TestMemory, BUF_BASE, F_NEXT, F_WRITE};

const HDR: usize = 12;

/// A frame: a 12-byte header then `payload_len` patterned bytes. The
/// header asks for nothing (flags, GSO type and hdr_len 0); its other
/// fields are patterned, as a checksum offset means nothing without
/// NEEDS_CSUM, so a byte-exact arrival shows the header went through whole.
fn frame(seed: u8, payload_len: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..HDR as u8).map(|i| i.wrapping_mul(seed)).collect();
    f[..4].fill(0);
    f.extend((0..payload_len).map(|i| (i as u8).wrapping_add(seed)));
    f
}

/// A TX queue with a `size`-entry ring, a TAP stand-in and counters.
struct Tx {
    m: TestMemory,
    tr: RingDriver,
    q: TxQueue,
    tap: Tap,
    peer: Peer,
    c: LocalCounters,
}

impl Tx {
    fn new(size: u16, event_idx: bool) -> Tx {
        let m = TestMemory::new();
        let tr = m.ring(size);
        let mut q = TxQueue::new(0);
        q.install(tr.start(&m, event_idx));
        let (tap, peer) = dgram_pair();
        Tx {
            m,
            tr,
            q,
            tap,
            peer,
            c: LocalCounters::default(),
        }
    }

    fn run(&mut self, budget: usize) -> Result<TxOutcome, RingFault> {
        let ctx = PathCtx {
            mem: &self.m.map,
            io: &self.tap,
            features: &NetFeatures::default(),
            counters: &mut self.c,
            flows: &mut FlowTracker::disabled(),
        };
        self.q
            .run(ctx, budget)
            .map(|ran| ran.expect("the queue runs"))
    }

    fn ring(&self) -> &Ring {
        self.q.slot().ring().expect("a running ring")
    }
}

#[test]
fn frame_is_sent_byte_exact_from_split_buffers() {
    let mut t = Tx::new(16, false);
    let f = frame(7, 1000);
    // Header alone in one descriptor, payload split in two, the second
    // buffer straddling the boundary between the two memory regions.
    let a = BUF_BASE;
    let b = BUF_BASE + 0x1000;
    let c = t.m.region_boundary() - 300;
    t.m.write(a, &f[..HDR]);
    t.m.write(b, &f[HDR..HDR + 400]);
    t.m.write(c, &f[HDR + 400..]);
    t.tr.add_chain(&[
        desc(a, HDR as u32, F_NEXT, 0),
        desc(b, 400, F_NEXT, 0),
        desc(c, 600, 0, 0),
    ]);
    assert_eq!(t.run(256).unwrap(), TxOutcome::Idle);
    assert_eq!(t.peer.recv_frame(), f);
    assert_eq!(t.c.tx_frames, 1);
    assert_eq!(t.c.tx_bytes, 1000);
    assert_eq!(t.tr.used(), vec![(0, 0)]);
    assert_eq!(t.ring().next_avail(), t.ring().next_used());
    assert!(t.tr.interrupted(), "guest interrupted after the batch");
    assert_eq!(t.q.state(), TxState::Armed);
}

#[test]
fn hostile_chains_refused_and_counted_good_chain_still_goes() {
    let mut t = Tx::new(16, true);
    let good = frame(3, 100);
    t.m.write(BUF_BASE + 0x8000, &good);
    // 1: descriptor loop.
    t.tr.add_chain_raw(&[desc(BUF_BASE, 64, F_NEXT, 1), desc(BUF_BASE, 64, F_NEXT, 0)]);
    // 2: buffer outside guest memory.
    t.tr.add_chain(&[desc(0x1000, 64, 0, 0)]);
    // 3: device-writable descriptor in a TX chain.
    t.tr.add_chain(&[
        desc(BUF_BASE, 64, F_NEXT, 0),
        desc(BUF_BASE, 64, F_WRITE, 0),
    ]);
    // 4: runt (5 bytes).
    t.tr.add_chain(&[desc(BUF_BASE, 5, 0, 0)]);
    // 5: next index past the ring.
    t.tr.add_chain_raw(&[desc(BUF_BASE, 64, F_NEXT, 40)]);
    // 6: too large (header + 70000 bytes).
    t.tr.add_chain(&[desc(BUF_BASE, 70012, 0, 0)]);
    // 7: good.
    t.tr.add_chain(&[desc(BUF_BASE + 0x8000, good.len() as u32, 0, 0)]);
    assert_eq!(t.run(256).unwrap(), TxOutcome::Idle);
    assert_eq!(t.peer.recv_frame(), good);
    assert!(t.peer.is_empty(), "only the good frame reaches the TAP");
    assert_eq!(t.c.drop_bad_descriptor, 4);
    assert_eq!(t.c.drop_runt, 1);
    assert_eq!(t.c.drop_too_large, 1);
    assert_eq!(t.c.tx_frames, 1);
    let used = t.tr.used();
    assert_eq!(used.len(), 7, "every chain completed, in order");
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(
        used.iter().map(|u| u.0).collect::<Vec<_>>(),
        t.tr.heads(),
        "completed in avail order"
    );
}

#[test]
fn indirect_chain_is_sent() {
    let mut t = Tx::new(16, false);
    let f = frame(5, 300);
    t.m.write(BUF_BASE, &f[..HDR]);
    t.m.write(BUF_BASE + 0x1000, &f[HDR..]);
    let table = BUF_BASE + 0x10000;
    t.tr.add_indirect(
        table,
        &[
            desc(BUF_BASE, HDR as u32, 0, 0),
            desc(BUF_BASE + 0x1000, 300, 0, 0),
        ],
    );
    assert_eq!(t.run(256).unwrap(), TxOutcome::Idle);
    assert_eq!(t.peer.recv_frame(), f);
    assert_eq!(t.tr.used(), vec![(0, 0)]);
}

#[test]
fn chain_longer_than_ring_refused() {
    let mut t = Tx::new(4, false);
    // An indirect-free chain of 4 descriptors whose last points back.
    t.tr.add_chain_raw(&[
        desc(BUF_BASE, 20, F_NEXT, 1),
        desc(BUF_BASE, 20, F_NEXT, 2),
        desc(BUF_BASE, 20, F_NEXT, 3),
        desc(BUF_BASE, 20, F_NEXT, 0),
    ]);
    t.run(256).unwrap();
    assert_eq!(t.c.drop_bad_descriptor, 1);
    assert!(t.peer.is_empty());
    assert_eq!(t.tr.used(), vec![(0, 0)]);
}

#[test]
fn avail_index_jump_is_a_fault_and_ring_position_kept() {
    let mut t = Tx::new(8, false);
    t.tr.set_avail_idx(100);
    let err = t.run(256).unwrap_err();
    assert!(matches!(err, RingFault::Queue(_)), "{err}");
    assert_eq!(t.ring().next_avail(), 0);
}

#[test]
fn budget_leaves_work_pending() {
    let mut t = Tx::new(16, true);
    let f = frame(1, 50);
    t.m.write(BUF_BASE, &f);
    for _ in 0..5 {
        t.tr.add_chain(&[desc(BUF_BASE, f.len() as u32, 0, 0)]);
    }
    assert_eq!(t.run(3).unwrap(), TxOutcome::MoreWork);
    assert_eq!(t.q.state(), TxState::MoreWork);
    assert_eq!(t.run(3).unwrap(), TxOutcome::Idle);
    assert_eq!(t.q.state(), TxState::Armed);
    assert_eq!(t.c.tx_frames, 5);
    assert_eq!(t.c.batches, 2);
    for _ in 0..5 {
        assert_eq!(t.peer.recv_frame(), f);
    }
}

#[test]
fn full_tap_gives_the_chain_back() {
    let mut t = Tx::new(256, true);
    let f = frame(9, 60000);
    t.m.write(BUF_BASE, &f);
    for _ in 0..200 {
        t.tr.add_chain(&[desc(BUF_BASE, f.len() as u32, 0, 0)]);
    }
    assert_eq!(
        t.run(256).unwrap(),
        TxOutcome::Blocked,
        "a socket buffer fills up"
    );
    assert!(t.q.wants_writable());
    let sent = t.c.tx_frames;
    assert!(sent > 0 && sent < 200);
    assert_eq!(t.ring().next_avail(), t.ring().next_used());
    assert_eq!(t.c.drop_tap_error, 0);
    // While blocked the queue does not run; once writable it does.
    let ctx = PathCtx {
        mem: &t.m.map,
        io: &t.tap,
        features: &NetFeatures::default(),
        counters: &mut t.c,
        flows: &mut FlowTracker::disabled(),
    };
    assert_eq!(t.q.run(ctx, 256).unwrap(), None);
    // Drain the peer, run again: everything arrives exactly once.
    let mut got = 0;
    loop {
        while !t.peer.is_empty() {
            assert_eq!(t.peer.recv_frame(), f);
            got += 1;
        }
        if got == 200 {
            break;
        }
        t.q.unblock();
        t.run(256).unwrap();
    }
    assert_eq!(t.c.tx_frames, 200);
}

#[test]
fn no_ring_no_run() {
    let m = TestMemory::new();
    let (tap, _peer) = dgram_pair();
    let mut q = TxQueue::new(0);
    let mut c = LocalCounters::default();
    let ctx = PathCtx {
        mem: &m.map,
        io: &tap,
        features: &NetFeatures::default(),
        counters: &mut c,
        flows: &mut FlowTracker::disabled(),
    };
    assert_eq!(q.run(ctx, 256).unwrap(), None);
    assert!(!q.wants_writable());
}
