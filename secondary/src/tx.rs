//! The transmit path: chains of the TX ring -> frames on the TAP.
//!
//! One run drains up to a budget of chains. Each chain is walked into host
//! iovecs (every descriptor device-readable, inside guest memory) and sent
//! with one `writev` straight from guest memory: the virtio-net header goes
//! to the TAP as it is (IFF_VNET_HDR), nothing is copied. A chain that is
//! refused (bad descriptor, runt, oversized) or that the TAP refuses is
//! still completed, with length 0, and counted: the guest gets its buffers
//! back and the queue goes on. Kicks are suppressed while draining and
//! re-armed at the end; the guest is interrupted at most once per run.
//!
//! If the TAP is full (`EAGAIN`, which a real TAP practically never says),
//! the chain is given back and the run stops until the TAP is writable
//! again, so no frame is lost to back-pressure.

use log::warn;

use crate::chain::{walk_chain, Access};
use crate::counters::LocalCounters;
use crate::features::{NetFeatures, ETH_HLEN, MAX_TX_FRAME};
use crate::flows::FlowTracker;
use crate::guest_memory::GuestMemoryMap;
use crate::iovecs::IoVecs;
use crate::ring::{Ring, RingFault};
use crate::tap::Tap;
use qpnet_shared::Direction;

/// How a TX run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOutcome {
    /// The ring is empty and kicks are armed.
    Idle,
    /// The budget ran out with chains left: run again soon.
    MoreWork,
    /// The TAP would block: run again when it is writable.
    TapBlocked,
}

/// What became of one chain.
enum Sent {
    /// Done with it (sent or refused and counted): complete it.
    Done,
    /// The TAP would block: give it back.
    Blocked,
}

/// The TX path of one queue pair, with its reusable iovec list.
#[derive(Debug)]
pub struct TxPath {
    queue_pair: u16,
    iovecs: IoVecs,
    /// Chains refused so far (for log rate limiting).
    refusals: u64,
    /// TAP write errors so far (for log rate limiting).
    tap_errors: u64,
}

impl TxPath {
    /// A TX path for `queue_pair` (named in log lines).
    pub fn new(queue_pair: u16) -> TxPath {
        TxPath {
            queue_pair,
            iovecs: IoVecs::new(),
            refusals: 0,
            tap_errors: 0,
        }
    }

    /// Send up to `budget` chains from `ring` to `tap`.
    // Each argument is a separate borrow of a worker field (ring, memory,
    // TAP, counters, flows); a struct of borrows would only be rebuilt per run.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        ring: &mut Ring,
        mem: &GuestMemoryMap,
        tap: &Tap,
        features: &NetFeatures,
        counters: &mut LocalCounters,
        flows: &mut FlowTracker,
        budget: usize,
    ) -> Result<TxOutcome, RingFault> {
        let result = self.drain(ring, mem, tap, features, counters, flows, budget);
        ring.finish_run(mem, counters, result)
    }

    // Each argument is a separate borrow of a worker field (ring, memory,
    // TAP, counters, flows); a struct of borrows would only be rebuilt per run.
    #[allow(clippy::too_many_arguments)]
    fn drain(
        &mut self,
        ring: &mut Ring,
        mem: &GuestMemoryMap,
        tap: &Tap,
        features: &NetFeatures,
        counters: &mut LocalCounters,
        flows: &mut FlowTracker,
        budget: usize,
    ) -> Result<(TxOutcome, usize), RingFault> {
        let mut moved = 0;
        loop {
            ring.suppress_kicks(mem)?;
            while moved < budget {
                let Some(head) = ring.pop(mem)? else {
                    break;
                };
                match self.send_chain(ring, mem, tap, features, head, counters, flows) {
                    Sent::Done => ring.complete_frame(mem, [(head, 0)])?,
                    Sent::Blocked => {
                        ring.unpop(1);
                        return Ok((TxOutcome::TapBlocked, moved));
                    }
                }
                moved += 1;
            }
            if moved >= budget {
                return Ok((TxOutcome::MoreWork, moved));
            }
            if !ring.allow_kicks(mem)? {
                return Ok((TxOutcome::Idle, moved));
            }
        }
    }

    /// Walk, check and write one chain.
    #[allow(clippy::too_many_arguments)] // as for `run`
    fn send_chain(
        &mut self,
        ring: &Ring,
        mem: &GuestMemoryMap,
        tap: &Tap,
        features: &NetFeatures,
        head: u16,
        counters: &mut LocalCounters,
        flows: &mut FlowTracker,
    ) -> Sent {
        self.iovecs.clear();
        // On error, the head is still completed with len 0 by the caller, so
        // the guest does not see a descriptor leak.
        if let Err(e) = walk_chain(
            mem,
            ring.desc_table(),
            head,
            Access::DeviceReads,
            &mut self.iovecs,
        ) {
            counters.drop_bad_descriptor += 1;
            self.refused(head, format_args!("{e}"));
            return Sent::Done;
        }
        let total = self.iovecs.total();
        let header = u64::from(features.header_len);
        if total < header + u64::from(ETH_HLEN) {
            counters.drop_runt += 1;
            self.refused(
                head,
                format_args!("runt frame of {total} bytes ({header}-byte header)"),
            );
            return Sent::Done;
        }
        if total > header + u64::from(MAX_TX_FRAME) {
            counters.drop_too_large += 1;
            self.refused(head, format_args!("frame of {total} bytes is too large"));
            return Sent::Done;
        }
        match tap.write_frame(&self.iovecs) {
            Ok(_) => {
                counters.tx_frames += 1;
                counters.tx_bytes += total - header;
                let all = 0..self.iovecs.len();
                flows.note(
                    &self.iovecs,
                    all,
                    header as usize,
                    total - header,
                    Direction::Tx,
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Sent::Blocked,
            Err(e) => {
                counters.drop_tap_error += 1;
                self.tap_errors += 1;
                if self.tap_errors.is_power_of_two() {
                    warn!(
                        "qp{}: TAP write failed ({} so far): {e}",
                        self.queue_pair, self.tap_errors
                    );
                }
            }
        }
        Sent::Done
    }

    fn refused(&mut self, head: u16, why: std::fmt::Arguments<'_>) {
        self.refusals += 1;
        if self.refusals.is_power_of_two() {
            warn!(
                "qp{}: TX chain {head} refused ({} so far): {why}",
                self.queue_pair, self.refusals
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{desc, dgram_pair, TestMemory, TestRing, BUF_BASE, F_NEXT, F_WRITE};

    const HDR: usize = 12;

    fn features() -> NetFeatures {
        NetFeatures::default()
    }

    /// A frame: a 12-byte header then `payload_len` patterned bytes.
    fn frame(seed: u8, payload_len: usize) -> Vec<u8> {
        let mut f: Vec<u8> = (0..HDR as u8).map(|i| i.wrapping_mul(seed)).collect();
        f.extend((0..payload_len).map(|i| (i as u8).wrapping_add(seed)));
        f
    }

    #[test]
    fn frame_is_sent_byte_exact_from_split_buffers() {
        let m = TestMemory::new();
        let mut tr = TestRing::new(&m, 16);
        let f = frame(7, 1000);
        // Header alone in one descriptor, payload split in two, the second
        // buffer straddling the boundary between the two memory regions.
        let a = BUF_BASE;
        let b = BUF_BASE + 0x1000;
        let c = m.region_boundary() - 300;
        m.write(a, &f[..HDR]);
        m.write(b, &f[HDR..HDR + 400]);
        m.write(c, &f[HDR + 400..]);
        tr.add_chain(&[
            desc(a, HDR as u32, F_NEXT, 0),
            desc(b, 400, F_NEXT, 0),
            desc(c, 600, 0, 0),
        ]);
        let (tap, peer) = dgram_pair();
        let mut ring = tr.start(&m, false);
        let mut tx = TxPath::new(0);
        let mut c = LocalCounters::default();
        let out = tx.run(
            &mut ring,
            &m.map,
            &tap,
            &features(),
            &mut c,
            &mut FlowTracker::disabled(),
            256,
        );
        assert_eq!(out.unwrap(), TxOutcome::Idle);
        assert_eq!(peer.recv_frame(), f);
        assert_eq!(c.tx_frames, 1);
        assert_eq!(c.tx_bytes, 1000);
        assert_eq!(tr.used(&m), vec![(0, 0)]);
        assert_eq!(ring.next_avail(), ring.next_used());
        assert!(tr.interrupted(), "guest interrupted after the batch");
    }

    #[test]
    fn hostile_chains_refused_and_counted_good_chain_still_goes() {
        let m = TestMemory::new();
        let mut tr = TestRing::new(&m, 16);
        let good = frame(3, 100);
        m.write(BUF_BASE + 0x8000, &good);
        // 1: descriptor loop.
        tr.add_chain_raw(&[desc(BUF_BASE, 64, F_NEXT, 1), desc(BUF_BASE, 64, F_NEXT, 0)]);
        // 2: buffer outside guest memory.
        tr.add_chain(&[desc(0x1000, 64, 0, 0)]);
        // 3: device-writable descriptor in a TX chain.
        tr.add_chain(&[
            desc(BUF_BASE, 64, F_NEXT, 0),
            desc(BUF_BASE, 64, F_WRITE, 0),
        ]);
        // 4: runt (5 bytes).
        tr.add_chain(&[desc(BUF_BASE, 5, 0, 0)]);
        // 5: next index past the ring.
        tr.add_chain_raw(&[desc(BUF_BASE, 64, F_NEXT, 40)]);
        // 6: too large (header + 70000 bytes).
        tr.add_chain(&[desc(BUF_BASE, 70012, 0, 0)]);
        // 7: good.
        tr.add_chain(&[desc(BUF_BASE + 0x8000, good.len() as u32, 0, 0)]);
        let (tap, peer) = dgram_pair();
        let mut ring = tr.start(&m, true);
        let mut tx = TxPath::new(0);
        let mut c = LocalCounters::default();
        let out = tx.run(
            &mut ring,
            &m.map,
            &tap,
            &features(),
            &mut c,
            &mut FlowTracker::disabled(),
            256,
        );
        assert_eq!(out.unwrap(), TxOutcome::Idle);
        assert_eq!(peer.recv_frame(), good);
        assert!(peer.is_empty(), "only the good frame reaches the TAP");
        assert_eq!(c.drop_bad_descriptor, 4);
        assert_eq!(c.drop_runt, 1);
        assert_eq!(c.drop_too_large, 1);
        assert_eq!(c.tx_frames, 1);
        let used = tr.used(&m);
        assert_eq!(used.len(), 7, "every chain completed, in order");
        assert!(used.iter().all(|&(_, len)| len == 0));
        assert_eq!(
            used.iter().map(|u| u.0).collect::<Vec<_>>(),
            tr.heads(),
            "completed in avail order"
        );
    }

    #[test]
    fn chain_longer_than_ring_refused() {
        let m = TestMemory::new();
        let mut tr = TestRing::new(&m, 4);
        // An indirect-free chain of 4 descriptors whose last points back.
        tr.add_chain_raw(&[
            desc(BUF_BASE, 20, F_NEXT, 1),
            desc(BUF_BASE, 20, F_NEXT, 2),
            desc(BUF_BASE, 20, F_NEXT, 3),
            desc(BUF_BASE, 20, F_NEXT, 0),
        ]);
        let (tap, peer) = dgram_pair();
        let mut ring = tr.start(&m, false);
        let mut c = LocalCounters::default();
        TxPath::new(0)
            .run(
                &mut ring,
                &m.map,
                &tap,
                &features(),
                &mut c,
                &mut FlowTracker::disabled(),
                256,
            )
            .unwrap();
        assert_eq!(c.drop_bad_descriptor, 1);
        assert!(peer.is_empty());
        assert_eq!(tr.used(&m), vec![(0, 0)]);
    }

    #[test]
    fn avail_index_jump_is_a_fault_and_ring_position_kept() {
        let m = TestMemory::new();
        let mut tr = TestRing::new(&m, 8);
        tr.set_avail_idx(&m, 100);
        let (tap, _peer) = dgram_pair();
        let mut ring = tr.start(&m, false);
        let mut c = LocalCounters::default();
        let err = TxPath::new(0)
            .run(
                &mut ring,
                &m.map,
                &tap,
                &features(),
                &mut c,
                &mut FlowTracker::disabled(),
                256,
            )
            .unwrap_err();
        assert!(matches!(err, RingFault::Queue(_)), "{err}");
        assert_eq!(ring.next_avail(), 0);
    }

    #[test]
    fn budget_leaves_work_pending() {
        let m = TestMemory::new();
        let mut tr = TestRing::new(&m, 16);
        let f = frame(1, 50);
        m.write(BUF_BASE, &f);
        for _ in 0..5 {
            tr.add_chain(&[desc(BUF_BASE, f.len() as u32, 0, 0)]);
        }
        let (tap, peer) = dgram_pair();
        let mut ring = tr.start(&m, true);
        let mut tx = TxPath::new(0);
        let mut c = LocalCounters::default();
        let feats = features();
        assert_eq!(
            tx.run(
                &mut ring,
                &m.map,
                &tap,
                &feats,
                &mut c,
                &mut FlowTracker::disabled(),
                3
            )
            .unwrap(),
            TxOutcome::MoreWork
        );
        assert_eq!(
            tx.run(
                &mut ring,
                &m.map,
                &tap,
                &feats,
                &mut c,
                &mut FlowTracker::disabled(),
                3
            )
            .unwrap(),
            TxOutcome::Idle
        );
        assert_eq!(c.tx_frames, 5);
        assert_eq!(c.batches, 2);
        for _ in 0..5 {
            assert_eq!(peer.recv_frame(), f);
        }
    }

    #[test]
    fn full_tap_gives_the_chain_back() {
        let m = TestMemory::new();
        let mut tr = TestRing::new(&m, 256);
        let f = frame(9, 60000);
        m.write(BUF_BASE, &f);
        for _ in 0..200 {
            tr.add_chain(&[desc(BUF_BASE, f.len() as u32, 0, 0)]);
        }
        let (tap, peer) = dgram_pair();
        let mut ring = tr.start(&m, true);
        let mut tx = TxPath::new(0);
        let mut c = LocalCounters::default();
        let feats = features();
        let out = tx
            .run(
                &mut ring,
                &m.map,
                &tap,
                &feats,
                &mut c,
                &mut FlowTracker::disabled(),
                256,
            )
            .unwrap();
        assert_eq!(out, TxOutcome::TapBlocked, "a socket buffer fills up");
        let sent = c.tx_frames;
        assert!(sent > 0 && sent < 200);
        assert_eq!(ring.next_avail(), ring.next_used());
        assert_eq!(c.drop_tap_error, 0);
        // Drain the peer, run again: everything arrives exactly once.
        let mut got = 0;
        loop {
            while !peer.is_empty() {
                assert_eq!(peer.recv_frame(), f);
                got += 1;
            }
            if got == 200 {
                break;
            }
            tx.run(
                &mut ring,
                &m.map,
                &tap,
                &feats,
                &mut c,
                &mut FlowTracker::disabled(),
                256,
            )
            .unwrap();
        }
        assert_eq!(c.tx_frames, 200);
    }
}
