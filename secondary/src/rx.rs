//! The receive path: frames on the TAP -> chains of the RX ring.
//!
//! Theory of operation. For each frame the path first takes enough guest
//! buffers, then reads the frame with one `readv` straight into them (the
//! TAP writes the virtio-net header itself; we only fill in `num_buffers`).
//! The frame's size is unknown before the read, so buffers are taken for
//! the largest frame the TAP may deliver:
//!
//! - without MRG_RXBUF, one chain per frame (the guest sized it);
//! - with MRG_RXBUF, chains until their capacity covers header +
//!   `max_rx_frame`. A frame uses as many of them as it fills; the rest stay
//!   taken for the next frame of the same run, so each chain is walked once
//!   per run, not once per frame. At the end of a run every chain still
//!   taken is given back (`next_avail` rewound), so between runs
//!   `next_avail == next_used`.
//!
//! Chains are completed strictly in order. A bad chain (wrong direction,
//! outside memory, shorter than the header, ...) found while earlier chains
//! are still taken is given back and refused later, when it is first in
//! line; refused chains are completed with length 0 and counted.
//!
//! Short of buffers (MRG_RXBUF only). When the ring holds less than the
//! largest frame, the path does not wait blindly (the frame may be small)
//! and does not gamble either (a cut frame would be lost): it reads that one
//! frame into a private buffer, then copies it into the chains if they are
//! enough. Otherwise it holds the frame, gives the chains back, asks the
//! guest to kick on its next new buffer and reports [`RxOutcome::Starved`];
//! the held frame is delivered first once buffers arrive. If the guest has
//! already made its whole ring available and the frame still does not fit,
//! the frame is dropped and counted as too large. Only this rare case
//! copies.
//!
//! Out of buffers. When the ring is empty, the path asks the guest to kick
//! on its next new buffer and reports [`RxOutcome::Starved`]: the worker
//! stops reading the TAP (frames wait in the kernel's queue, none is read
//! and dropped) until that kick.
//!
//! A TAP reports a frame's full length even when the buffers were shorter:
//! `n > capacity` means the frame was cut, so it is dropped and counted, and
//! the buffers are reused for the next frame.

use log::warn;

use crate::chain::{walk_chain, Access, ChainError};
use crate::counters::LocalCounters;
use crate::features::{NetFeatures, NUM_BUFFERS_OFFSET};
use crate::flows::FlowTracker;
use crate::guest_memory::{GuestMemoryMap, TranslateError};
use crate::iovecs::IoVecs;
use crate::ring::{Ring, RingFault};
use crate::tap::Tap;
use qpnet_shared::Direction;

/// How an RX run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// The TAP has no frame left.
    Drained,
    /// The budget ran out: the TAP may hold more frames.
    MoreWork,
    /// Not enough guest buffers: kicks are armed, stop reading the TAP until
    /// the next RX kick. `frames_waiting` says whether the TAP held a frame.
    Starved {
        /// Whether a frame was waiting in the TAP.
        frames_waiting: bool,
    },
    /// Reading the TAP failed (counted).
    TapError,
}

/// One chain taken from the ring.
#[derive(Debug, Clone, Copy)]
struct Taken {
    head: u16,
    capacity: u64,
    /// Index in the iovec list just after this chain's entries.
    end: usize,
}

/// State of the buffers taken for the next frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gather {
    /// Enough for the frame (one chain without MRG_RXBUF).
    Ready,
    /// Some, but not enough, and the ring has no more now.
    Short,
    /// Some, not enough, and the next chain cannot join them now (a bad
    /// chain waiting its turn, or the iovec limit).
    Blocked,
    /// None at all.
    Empty,
}

/// Why an RX chain was refused.
#[derive(Debug, Clone, Copy, thiserror::Error)]
enum Refusal {
    /// The chain itself is bad.
    #[error(transparent)]
    Chain(ChainError),
    /// Too short to hold even the virtio-net header.
    #[error("buffer of {capacity} bytes is shorter than the {header}-byte header")]
    ShorterThanHeader { capacity: u64, header: u64 },
}

/// What became of one read.
enum Received {
    /// A frame was delivered or dropped (counted).
    Frame,
    /// A frame was read into the bounce buffer and is held.
    Bounced,
    /// The TAP was empty.
    Empty,
    /// The read failed (counted).
    Failed,
}

/// The RX path of one queue pair, with its reusable lists.
#[derive(Debug)]
pub struct RxPath {
    queue_pair: u16,
    iovecs: IoVecs,
    taken: Vec<Taken>,
    /// First entry of `taken` not used by a frame yet.
    first: usize,
    /// Capacity of `taken[first..]`.
    capacity: u64,
    /// Bounce buffer for a frame read while short of guest buffers.
    bounce: Vec<u8>,
    /// Length of the frame held in `bounce`, if any.
    held: Option<usize>,
    refusals: u64,
    drops: u64,
}

impl RxPath {
    /// An RX path for `queue_pair` (named in log lines).
    pub fn new(queue_pair: u16) -> RxPath {
        RxPath {
            queue_pair,
            iovecs: IoVecs::new(),
            taken: Vec::with_capacity(64),
            first: 0,
            capacity: 0,
            bounce: Vec::new(),
            held: None,
            refusals: 0,
            drops: 0,
        }
    }

    /// Move up to `budget` frames from `tap` into `ring`.
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
    ) -> Result<RxOutcome, RingFault> {
        let result = self.receive_frames(ring, mem, tap, features, counters, flows, budget);
        self.give_back(ring);
        ring.finish_run(mem, counters, result)
    }

    /// Drop a held frame (the ring is stopped or reset).
    pub fn reset(&mut self) {
        self.held = None;
    }

    /// Whether a frame read earlier still waits for guest buffers.
    #[cfg(test)]
    pub fn holds_frame(&self) -> bool {
        self.held.is_some()
    }

    // Each argument is a separate borrow of a worker field (ring, memory,
    // TAP, counters, flows); a struct of borrows would only be rebuilt per run.
    #[allow(clippy::too_many_arguments)]
    fn receive_frames(
        &mut self,
        ring: &mut Ring,
        mem: &GuestMemoryMap,
        tap: &Tap,
        features: &NetFeatures,
        counters: &mut LocalCounters,
        flows: &mut FlowTracker,
        budget: usize,
    ) -> Result<(RxOutcome, usize), RingFault> {
        let mut moved = 0;
        let mut rearms = 0;
        while moved < budget {
            let need = match self.held {
                Some(len) => len as u64,
                None if features.mergeable_rx => features.rx_frame_capacity(),
                None => 0,
            };
            let buffers = self.gather(ring, mem, features, counters, need)?;
            let received = match (buffers, self.held) {
                (Gather::Ready, None) => {
                    self.receive_one(ring, mem, tap, features, counters, flows)?
                }
                (Gather::Ready, Some(len)) => {
                    self.deliver_held(ring, mem, len, features, counters, flows)?
                }
                (Gather::Short | Gather::Blocked, None) => {
                    self.read_bounce(tap, features, counters)
                }
                (Gather::Blocked, Some(_)) => {
                    self.drop_held(counters, "a bad chain blocks the buffers it needs");
                    Received::Frame
                }
                (Gather::Short, Some(_)) if ring.outstanding(mem)? >= ring.size() => {
                    self.drop_held(counters, "the whole ring is too small for it");
                    Received::Frame
                }
                (Gather::Short | Gather::Empty, _) => {
                    // Hold nothing while idle, then ask for a kick.
                    self.give_back(ring);
                    if ring.arm_kick_after_current(mem)? {
                        // Buffers arrived meanwhile: go on, quietly.
                        ring.suppress_kicks(mem)?;
                        rearms += 1;
                        if rearms > budget {
                            return Ok((RxOutcome::MoreWork, moved));
                        }
                        continue;
                    }
                    let frames_waiting = self.held.is_some() || tap.has_frame();
                    return Ok((RxOutcome::Starved { frames_waiting }, moved));
                }
            };
            match received {
                Received::Frame => moved += 1,
                Received::Bounced => {}
                Received::Empty => return Ok((RxOutcome::Drained, moved)),
                Received::Failed => return Ok((RxOutcome::TapError, moved)),
            }
        }
        Ok((RxOutcome::MoreWork, moved))
    }

    /// Read one frame into the bounce buffer and hold it.
    fn read_bounce(
        &mut self,
        tap: &Tap,
        features: &NetFeatures,
        counters: &mut LocalCounters,
    ) -> Received {
        let size = features.rx_frame_capacity() as usize;
        if self.bounce.len() != size {
            // Only on the first bounce after a feature change.
            self.bounce.resize(size, 0);
        }
        let n = match tap.read_into(&mut self.bounce) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Received::Empty,
            Err(e) => {
                counters.drop_tap_error += 1;
                self.dropped(format_args!("TAP read failed: {e}"));
                return Received::Failed;
            }
        };
        if n > size {
            counters.drop_too_large += 1;
            self.dropped(format_args!("frame of {n} bytes, the limit is {size}"));
            return Received::Frame;
        }
        if n < features.header_len as usize {
            counters.drop_tap_error += 1;
            self.dropped(format_args!("TAP gave a {n}-byte frame"));
            return Received::Frame;
        }
        self.held = Some(n);
        Received::Bounced
    }

    /// Copy the held frame into the taken chains (they are enough).
    fn deliver_held(
        &mut self,
        ring: &mut Ring,
        mem: &GuestMemoryMap,
        len: usize,
        features: &NetFeatures,
        counters: &mut LocalCounters,
        flows: &mut FlowTracker,
    ) -> Result<Received, RingFault> {
        let from = self.first_iovec();
        let end = self.iovecs.len();
        self.iovecs.write_at(from..end, 0, &self.bounce[..len]);
        self.held = None;
        self.complete_frame(ring, mem, len as u64, features, counters, flows)?;
        Ok(Received::Frame)
    }

    fn drop_held(&mut self, counters: &mut LocalCounters, why: &str) {
        if let Some(len) = self.held.take() {
            counters.drop_too_large += 1;
            self.dropped(format_args!("held frame of {len} bytes: {why}"));
        }
    }

    /// Take chains until `need` bytes fit (at least one chain; exactly one
    /// without MRG_RXBUF, where `need` is 0).
    fn gather(
        &mut self,
        ring: &mut Ring,
        mem: &GuestMemoryMap,
        features: &NetFeatures,
        counters: &mut LocalCounters,
        need: u64,
    ) -> Result<Gather, RingFault> {
        self.compact();
        let header = u64::from(features.header_len);
        loop {
            let pending = self.taken.len() - self.first;
            if pending > 0 && self.capacity >= need {
                return Ok(Gather::Ready);
            }
            let Some(head) = ring.pop(mem)? else {
                return Ok(if pending == 0 {
                    Gather::Empty
                } else {
                    Gather::Short
                });
            };
            let start = self.iovecs.len();
            let before = self.iovecs.total();
            let walked = walk_chain(
                mem,
                ring.desc_table(),
                head,
                Access::DeviceWrites,
                &mut self.iovecs,
            );
            let capacity = self.iovecs.total() - before;
            let refusal = match walked {
                Ok(()) if capacity >= header => None,
                Ok(()) => Some(Refusal::ShorterThanHeader { capacity, header }),
                Err(ChainError::Buffer(TranslateError::TooManySegments(_))) if pending > 0 => {
                    // Not this chain's fault: the frame's list is full.
                    self.iovecs.truncate(start);
                    ring.unpop(1);
                    return Ok(Gather::Blocked);
                }
                Err(e) => Some(Refusal::Chain(e)),
            };
            let Some(why) = refusal else {
                self.taken.push(Taken {
                    head,
                    capacity,
                    end: self.iovecs.len(),
                });
                self.capacity += capacity;
                continue;
            };
            self.iovecs.truncate(start);
            if pending > 0 {
                // Completing it now would overtake the chains still taken.
                ring.unpop(1);
                return Ok(Gather::Blocked);
            }
            // Completed with len 0 so the guest does not see a descriptor leak.
            counters.drop_bad_descriptor += 1;
            self.refusals += 1;
            if self.refusals.is_power_of_two() {
                warn!(
                    "qp{}: RX chain {head} refused ({} so far): {why}",
                    self.queue_pair, self.refusals
                );
            }
            ring.complete_frame(mem, [(head, 0)])?;
        }
    }

    /// Read one frame into the taken chains and complete the ones it used.
    fn receive_one(
        &mut self,
        ring: &mut Ring,
        mem: &GuestMemoryMap,
        tap: &Tap,
        features: &NetFeatures,
        counters: &mut LocalCounters,
        flows: &mut FlowTracker,
    ) -> Result<Received, RingFault> {
        let from = self.first_iovec();
        let n = match tap.read_frame(&self.iovecs, from) {
            Ok(n) => n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Received::Empty),
            Err(e) => {
                counters.drop_tap_error += 1;
                self.dropped(format_args!("TAP read failed: {e}"));
                return Ok(Received::Failed);
            }
        };
        let header = u64::from(features.header_len);
        if n > self.capacity {
            // The buffers stay taken for the next frame.
            counters.drop_too_large += 1;
            let capacity = self.capacity;
            self.dropped(format_args!(
                "frame of {n} bytes cut: {capacity} bytes of guest buffers"
            ));
            return Ok(Received::Frame);
        }
        if n < header {
            counters.drop_tap_error += 1;
            self.dropped(format_args!("TAP gave a {n}-byte frame"));
            return Ok(Received::Frame);
        }
        self.complete_frame(ring, mem, n, features, counters, flows)?;
        Ok(Received::Frame)
    }

    /// Complete the chains a frame of `n` bytes (header included) filled,
    /// writing `num_buffers` into its header first.
    fn complete_frame(
        &mut self,
        ring: &mut Ring,
        mem: &GuestMemoryMap,
        n: u64,
        features: &NetFeatures,
        counters: &mut LocalCounters,
        flows: &mut FlowTracker,
    ) -> Result<(), RingFault> {
        let from = self.first_iovec();
        let header = u64::from(features.header_len);
        flows.note(
            &self.iovecs,
            from..self.iovecs.len(),
            header as usize,
            n - header,
            Direction::Rx,
        );
        let used = self.chains_for(n);
        if features.has_num_buffers() {
            let first_end = self.taken[self.first].end;
            // Chains shorter than the header were refused, so it fits.
            self.iovecs.write_at(
                from..first_end,
                NUM_BUFFERS_OFFSET,
                &(used as u16).to_le_bytes(),
            );
        }
        let frame = &self.taken[self.first..self.first + used];
        let mut left = n;
        let chains = frame.iter().map(|t| {
            let len = left.min(t.capacity);
            left -= len;
            // len <= n, the length of one frame.
            (t.head, len as u32)
        });
        // All of the frame's chains become used together: the guest never
        // sees a used index inside this frame (see ring.rs).
        ring.complete_frame(mem, chains)?;
        self.capacity -= frame.iter().map(|t| t.capacity).sum::<u64>();
        self.first += used;
        counters.rx_frames += 1;
        counters.rx_bytes += n - header;
        Ok(())
    }

    /// How many of the taken chains a frame of `n` bytes filled (at least 1).
    fn chains_for(&self, n: u64) -> usize {
        let mut left = n;
        let mut used = 0;
        for t in &self.taken[self.first..] {
            used += 1;
            left = left.saturating_sub(t.capacity);
            if left == 0 {
                break;
            }
        }
        used.max(1)
    }

    fn first_iovec(&self) -> usize {
        match self.first {
            0 => 0,
            i => self.taken[i - 1].end,
        }
    }

    /// Forget the chains already used, keeping the ones still taken.
    fn compact(&mut self) {
        if self.first == 0 {
            return;
        }
        let cut = self.first_iovec();
        self.iovecs.remove_front(cut);
        self.taken.drain(..self.first);
        for t in &mut self.taken {
            t.end -= cut;
        }
        self.first = 0;
    }

    /// Give every chain still taken back to the ring.
    fn give_back(&mut self, ring: &mut Ring) {
        let left = self.taken.len() - self.first;
        // At most one chain per ring entry, so it fits in a u16.
        ring.unpop(left as u16);
        self.taken.clear();
        self.first = 0;
        self.capacity = 0;
        self.iovecs.clear();
    }

    fn dropped(&mut self, why: std::fmt::Arguments<'_>) {
        self.drops += 1;
        if self.drops.is_power_of_two() {
            warn!(
                "qp{}: RX frame dropped ({} so far): {why}",
                self.queue_pair, self.drops
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{desc, dgram_pair, TestMemory, TestRing, BUF_BASE, F_NEXT, F_WRITE};

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
        tr: TestRing<'a>,
        ring: Ring,
        rx: RxPath,
        c: LocalCounters,
        tap: Tap,
        peer: crate::test_util::Peer,
    }

    impl<'a> Rx<'a> {
        fn new(m: &'a TestMemory, size: u16) -> Rx<'a> {
            let tr = TestRing::new(m, size);
            let ring = tr.start(m, true);
            let (tap, peer) = dgram_pair();
            Rx {
                m,
                tr,
                ring,
                rx: RxPath::new(0),
                c: LocalCounters::default(),
                tap,
                peer,
            }
        }

        fn run(&mut self, f: &NetFeatures) -> RxOutcome {
            self.rx
                .run(
                    &mut self.ring,
                    &self.m.map,
                    &self.tap,
                    f,
                    &mut self.c,
                    &mut FlowTracker::disabled(),
                    256,
                )
                .expect("rx run")
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
        assert_eq!(t.tr.used(&m), vec![(head, f.len() as u32)]);
        assert_eq!((t.c.rx_frames, t.c.rx_bytes), (1, 1800));
        assert_eq!(t.ring.next_avail(), t.ring.next_used());
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
        let used = t.tr.used(&m);
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
        assert_eq!(t.ring.next_avail(), 5);
        assert_eq!(t.ring.next_used(), 5);
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
        let a = t.add_buffers(BUF_BASE, 1, 2048)[0];
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
        assert_eq!(t.tr.used(&m), vec![(heads[0], 100), (heads[1], 62)]);
        let mut got = m.read(BUF_BASE, 100);
        got.extend(m.read(BUF_BASE + 0x1000, 62));
        assert_eq!(got, expected(&f, 2));

        // 200 bytes of buffers, a 262-byte frame: held until more arrive.
        t.add_buffers(BUF_BASE + 0x2000, 2, 100);
        let g = frame(6, 250);
        t.peer.send_frame(&g);
        assert_eq!(
            t.run(&feats),
            RxOutcome::Starved {
                frames_waiting: true
            }
        );
        assert!(t.rx.holds_frame());
        assert_eq!(
            t.ring.next_avail(),
            t.ring.next_used(),
            "buffers given back"
        );
        t.add_buffers(BUF_BASE + 0x4000, 1, 100);
        assert!(matches!(t.run(&feats), RxOutcome::Starved { .. }));
        assert!(!t.rx.holds_frame());
        let used = t.tr.used(&m);
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
        let used = t.tr.used(&m);
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
            t.tr.used(&m),
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
        assert_eq!(t.ring.next_avail(), t.ring.next_used());
    }

    #[test]
    fn avail_index_jump_is_a_fault() {
        let m = TestMemory::new();
        let mut t = Rx::new(&m, 8);
        t.tr.set_avail_idx(&m, 9);
        t.peer.send_frame(&frame(1, 60));
        let err =
            t.rx.run(
                &mut t.ring,
                &m.map,
                &t.tap,
                &features(false, 1514),
                &mut t.c,
                &mut FlowTracker::disabled(),
                256,
            )
            .unwrap_err();
        assert!(matches!(err, RingFault::Queue(_)));
    }
}

#[cfg(test)]
mod boundary_tests {
    use super::*;
    use crate::test_util::{desc, dgram_pair, TestMemory, TestRing, BUF_BASE, F_WRITE};

    /// The guest's side: one-descriptor buffers posted in order, used
    /// entries reassembled into frames by their num_buffers.
    struct Driver {
        last_used: u16,
        posted: u64,
        partial: Option<(Vec<u8>, u16)>,
    }

    fn lcg(x: &mut u64) -> u64 {
        *x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *x >> 33
    }

    /// Issue 13, at the unit level: random frames, budgets and buffer
    /// refills (so runs go short of buffers, bounce, starve and resume), and
    /// after every run the guest finds only whole frames below the used
    /// index, byte-exact and in order.
    #[test]
    fn random_runs_publish_only_whole_frames() {
        const SIZE: u16 = 64;
        const BUF: u32 = 128;
        let m = TestMemory::new();
        let mut tr = TestRing::new(&m, SIZE);
        let mut ring = tr.start(&m, true);
        let (tap, peer) = dgram_pair();
        let mut rx = RxPath::new(0);
        let mut c = LocalCounters::default();
        let feats = NetFeatures {
            event_idx: true,
            mergeable_rx: true,
            header_len: 12,
            max_rx_frame: 1514,
        };
        let mut d = Driver {
            last_used: 0,
            posted: 0,
            partial: None,
        };
        let post = |tr: &mut TestRing<'_>, d: &mut Driver, n: u16| {
            for _ in 0..n {
                let slot = d.posted % u64::from(SIZE);
                tr.add_chain(&[desc(BUF_BASE + slot * 0x1000, BUF, F_WRITE, 0)]);
                d.posted += 1;
            }
        };
        post(&mut tr, &mut d, SIZE);
        let mut seed = 7u64;
        let mut sent: std::collections::VecDeque<Vec<u8>> = Default::default();
        let mut got = 0u64;
        for round in 0..20_000 {
            for _ in 0..lcg(&mut seed) % 4 {
                let len = 12 + 60 + (lcg(&mut seed) % 1455) as usize;
                let mut f: Vec<u8> = (0..len).map(|i| (i as u64 ^ round) as u8).collect();
                f[10] = 0xee;
                f[11] = 0xee;
                peer.send_frame(&f);
                sent.push_back(f);
            }
            let budget = 1 + (lcg(&mut seed) % 8) as usize;
            rx.run(
                &mut ring,
                &m.map,
                &tap,
                &feats,
                &mut c,
                &mut FlowTracker::disabled(),
                budget,
            )
            .expect("rx run");
            // The driver reaps what it sees, reassembling frames.
            let used = tr.used_idx(&m);
            while d.last_used != used {
                let (head, len) = tr.used_entry(d.last_used);
                let bytes = m.read(BUF_BASE + u64::from(head % SIZE) * 0x1000, len as usize);
                d.last_used = d.last_used.wrapping_add(1);
                let (mut data, left) = match d.partial.take() {
                    Some((mut data, left)) => {
                        data.extend_from_slice(&bytes);
                        (data, left - 1)
                    }
                    None => {
                        let nb = u16::from_le_bytes([bytes[10], bytes[11]]);
                        assert!(nb >= 1, "round {round}: num_buffers 0");
                        (bytes, nb - 1)
                    }
                };
                if left > 0 {
                    d.partial = Some((data, left));
                    continue;
                }
                let want = sent.pop_front().expect("a frame nobody sent");
                data[10] = 0xee;
                data[11] = 0xee;
                assert_eq!(data, want, "round {round}: frame {got} corrupt");
                got += 1;
            }
            assert!(
                d.partial.is_none(),
                "round {round}: used index {used} published inside a frame"
            );
            // Repost some of the reaped buffers.
            let free = SIZE - (d.posted as u16).wrapping_sub(d.last_used);
            let n = (lcg(&mut seed) % (u64::from(free) + 1)) as u16;
            post(&mut tr, &mut d, n);
            if n > 0 {
                tr.kick();
                rx.run(
                    &mut ring,
                    &m.map,
                    &tap,
                    &feats,
                    &mut c,
                    &mut FlowTracker::disabled(),
                    0,
                )
                .ok();
            }
            if sent.len() > 200 {
                // Let the ring drain completely now and then.
                let free = SIZE - (d.posted as u16).wrapping_sub(d.last_used);
                post(&mut tr, &mut d, free);
            }
        }
        assert!(got > 10_000, "only {got} frames received");
        assert_eq!(c.drop_too_large, 0);
    }
}
