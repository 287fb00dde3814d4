//! The driver side of a split virtqueue, over the test VMM's guest memory.
//!
//! Layout (virtio 1.x, split ring) for a queue of `size` entries:
//!
//! ```text
//! descriptor table  16 * size bytes, align 16: { addr u64, len u32, flags u16, next u16 }
//! avail ring        6 + 2 * size bytes, align 2: flags, idx, ring[size], used_event
//! used ring         6 + 8 * size bytes, align 4: flags, idx, ring[size] { id u32, len u32 }, avail_event
//! ```
//!
//! The driver writes descriptors and avail entries, then publishes them by
//! storing `avail.idx` after a release fence; it reads `used.idx` with an
//! acquire fence before reading used entries. Indices are free-running u16s
//! (entry = idx % size). This is all the device (qpnet) sees of the guest, so
//! the raw setters ([`SplitQueue::write_desc`], [`SplitQueue::set_avail_idx`])
//! also serve hostile-input tests.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use anyhow::Result;

use anyhow::Context;
use qpnet_secondary::test_util::{BumpAllocator, GuestMemory};

/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Size of one descriptor table entry.
pub const DESC_SIZE: u64 = 16;

/// One descriptor table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Desc {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// `VIRTQ_DESC_F_*` flags.
    pub flags: u16,
    /// Next descriptor index when `VIRTQ_DESC_F_NEXT` is set.
    pub next: u16,
}

impl Desc {
    /// The 16-byte little-endian wire form.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// One used ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index of the completed chain.
    pub id: u32,
    /// Bytes the device wrote into the chain.
    pub len: u32,
}

/// Guest-physical addresses of a ring's three parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Number of entries (a power of two).
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Avail ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

impl RingLayout {
    /// Allocate the three parts of a `size`-entry ring.
    pub fn alloc(alloc: &mut BumpAllocator, size: u16) -> Result<RingLayout> {
        let n = u64::from(size);
        Ok(RingLayout {
            size,
            desc: alloc.alloc(DESC_SIZE * n, 16).context("exhausted")?,
            avail: alloc.alloc(6 + 2 * n, 2).context("exhausted")?,
            used: alloc.alloc(6 + 8 * n, 4).context("exhausted")?,
        })
    }

    fn avail_entry(&self, i: u16) -> u64 {
        self.avail + 4 + 2 * u64::from(i % self.size)
    }

    fn used_entry(&self, i: u16) -> u64 {
        self.used + 4 + 8 * u64::from(i % self.size)
    }
}

/// The driver's view of one split virtqueue.
#[derive(Debug)]
pub struct SplitQueue {
    mem: Arc<GuestMemory>,
    layout: RingLayout,
    next_avail: u16,
    last_used: u16,
}

impl SplitQueue {
    /// Start a queue on `layout`: zero its memory, indices at 0.
    pub fn new(mem: Arc<GuestMemory>, layout: RingLayout) -> SplitQueue {
        let n = usize::from(layout.size);
        mem.fill(layout.desc, 16 * n, 0);
        mem.fill(layout.avail, 6 + 2 * n, 0);
        mem.fill(layout.used, 6 + 8 * n, 0);
        SplitQueue {
            mem,
            layout,
            next_avail: 0,
            last_used: 0,
        }
    }

    /// The ring's addresses.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The guest memory the ring lives in.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// Write descriptor `index` (no bounds check against the table size
    /// beyond the memory itself: hostile tests use this too).
    pub fn write_desc(&self, index: u16, d: Desc) {
        self.mem.write(
            self.layout.desc + DESC_SIZE * u64::from(index),
            &d.to_bytes(),
        );
    }

    /// Put `head` in the next avail slot; not visible to the device until
    /// [`SplitQueue::publish`].
    pub fn push_avail(&mut self, head: u16) {
        self.mem
            .store_u16(self.layout.avail_entry(self.next_avail), head);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Make every pushed entry visible: release fence, then `avail.idx`.
    pub fn publish(&self) {
        fence(Ordering::SeqCst);
        self.mem.store_u16(self.layout.avail + 2, self.next_avail);
        fence(Ordering::SeqCst);
    }

    /// Hostile hook: store any value as `avail.idx` (and make it the driver's
    /// own idea of the next avail index).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.next_avail = idx;
        self.publish();
    }

    /// The avail index the driver has published (or will publish next).
    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }

    /// The device's current `used.idx`.
    pub fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        let v = self.mem.load_u16(self.layout.used + 2);
        fence(Ordering::SeqCst);
        v
    }

    /// The used index up to which the driver has consumed entries.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Chains made available and not yet seen used.
    pub fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.last_used)
    }

    /// The next used entry, if the device has published one.
    pub fn pop_used(&mut self) -> Option<UsedElem> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let at = self.layout.used_entry(self.last_used);
        let elem = UsedElem {
            id: self.mem.load_u32(at),
            len: self.mem.load_u32(at + 4),
        };
        self.last_used = self.last_used.wrapping_add(1);
        // With EVENT_IDX, ask for an interrupt at the very next used entry.
        self.mem.store_u16(
            self.layout.avail + 4 + 2 * u64::from(self.layout.size),
            self.last_used,
        );
        Some(elem)
    }

    /// The device's `avail_event` (meaningful with EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        self.mem
            .load_u16(self.layout.used + 4 + 8 * u64::from(self.layout.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qpnet_secondary::test_util::{RegionLayout, MEM_BASE as DEFAULT_GPA};

    #[test]
    fn ring_layout_and_indices_follow_the_spec() {
        let mem = Arc::new(GuestMemory::new(&[RegionLayout::new(DEFAULT_GPA, 1 << 20)]).unwrap());
        let mut alloc = BumpAllocator::new(&mem.regions()[0]);
        let layout = RingLayout::alloc(&mut alloc, 256).unwrap();
        assert_eq!(layout.desc % 16, 0);
        assert_eq!(layout.avail, layout.desc + 16 * 256);
        assert_eq!(layout.used % 4, 0);
        assert!(layout.used >= layout.avail + 6 + 2 * 256);
        let mut q = SplitQueue::new(mem.clone(), layout);
        q.write_desc(
            3,
            Desc {
                addr: 0x1122_3344_5566_7788,
                len: 0x99aa_bbcc,
                flags: VIRTQ_DESC_F_NEXT,
                next: 4,
            },
        );
        let mut raw = [0u8; 16];
        mem.read_into(layout.desc + 48, &mut raw);
        assert_eq!(
            raw,
            [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xcc, 0xbb, 0xaa, 0x99, 1, 0, 4, 0]
        );
        for i in 0..300u16 {
            q.push_avail(i % 256);
        }
        q.publish();
        assert_eq!(mem.load_u16(layout.avail + 2), 300);
        // Entry 299 wrapped to slot 43.
        assert_eq!(mem.load_u16(layout.avail + 4 + 2 * 43), 299 % 256);
        // Play device: complete two chains.
        mem.write(layout.used + 4, &[7, 0, 0, 0, 64, 0, 0, 0]);
        mem.write(layout.used + 12, &[9, 0, 0, 0, 0, 1, 0, 0]);
        mem.store_u16(layout.used + 2, 2);
        assert_eq!(q.pop_used(), Some(UsedElem { id: 7, len: 64 }));
        assert_eq!(q.pop_used(), Some(UsedElem { id: 9, len: 256 }));
        assert_eq!(q.pop_used(), None);
        assert_eq!(mem.load_u16(layout.avail + 4 + 2 * 256), 2, "used_event");
        assert_eq!(q.in_flight(), 298);
    }
}
