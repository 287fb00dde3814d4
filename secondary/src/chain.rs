//! Walking one descriptor chain into host iovecs, refusing anything hostile.
//!
//! virtio-queue's own chain iterator ends silently on a loop, an index out of
//! range or unreadable memory, so a broken chain looks like a short valid one.
//! The packet path needs the difference (a bad chain is completed with length
//! 0 and counted, a good one is sent), so this walker reads each descriptor
//! exactly once (the guest may rewrite it behind us; only our copy is used)
//! and reports what was wrong:
//!
//! - an index past the end of its table;
//! - more descriptors than the table holds (the only way to get there is a
//!   loop, or a chain longer than the ring);
//! - a descriptor, or the buffer it names, outside guest memory;
//! - a descriptor of the wrong direction (device-writable on TX, readable on
//!   RX);
//! - an indirect table inside an indirect table, or one whose length is not
//!   a non-zero multiple of 16 bytes;
//! - more host segments than one `readv`/`writev` takes.
//!
//! An indirect descriptor switches to its table for the rest of the chain
//! (its own NEXT flag is ignored, as QEMU and virtio-queue do).

use virtio_bindings::bindings::virtio_ring::VRING_DESC_ALIGN_SIZE;
use virtio_queue::desc::split::Descriptor;

use crate::guest_memory::{GuestMemoryMap, TranslateError};
use crate::iovecs::IoVecs;

/// Largest indirect table we walk: descriptor indexes are 16 bits, so a
/// longer table can only be reached through a loop anyway.
const MAX_INDIRECT_ENTRIES: u32 = 1 << 16;

/// The descriptor table a chain starts in.
#[derive(Debug, Clone, Copy)]
pub struct DescTable {
    /// Guest-physical address of the table.
    pub addr: u64,
    /// Number of entries (the queue size).
    pub size: u16,
}

/// Which way the device uses the buffers of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The device reads them (TX): every descriptor must be device-readable.
    DeviceReads,
    /// The device writes them (RX): every descriptor must be device-writable.
    DeviceWrites,
}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor index points past the end of its table.
    #[error("descriptor index {index} outside a table of {size} entries")]
    IndexOutOfRange {
        /// The index.
        index: u32,
        /// Entries in the table.
        size: u32,
    },
    /// The chain has more descriptors than its table: a loop.
    #[error("chain longer than its table of {limit} descriptors (a descriptor loop)")]
    TooLong {
        /// Entries in the table.
        limit: u32,
    },
    /// A descriptor itself could not be read from guest memory.
    #[error("descriptor at {addr:#x} is outside guest memory")]
    DescriptorOutsideMemory {
        /// Guest address of the descriptor.
        addr: u64,
    },
    /// An indirect descriptor inside an indirect table.
    #[error("indirect table inside an indirect table")]
    NestedIndirect,
    /// An indirect table whose length is 0 or not a multiple of 16.
    #[error("indirect table of {len} bytes (must be a non-zero multiple of 16)")]
    BadIndirectLength {
        /// Length in bytes.
        len: u32,
    },
    /// A descriptor of the wrong direction.
    #[error("{} descriptor in a chain the device must {}", if *.writable { "device-writable" } else { "device-readable" }, if *.writable { "read" } else { "write" })]
    WrongDirection {
        /// Whether the offending descriptor was device-writable.
        writable: bool,
    },
    /// A buffer outside guest memory, or too many segments.
    #[error(transparent)]
    Buffer(#[from] TranslateError),
}

/// Walk the chain starting at `head` of `table`, appending the host iovecs of
/// its buffers to `out` (which the caller cleared or positioned). Every
/// descriptor must allow `access`. The total length is `out.total()` minus
/// what was there before. On error `out` may hold part of the chain.
pub fn walk_chain<'m>(
    mem: &'m GuestMemoryMap,
    table: DescTable,
    head: u16,
    access: Access,
    out: &mut IoVecs<'m>,
) -> Result<(), ChainError> {
    let mut table_addr = table.addr;
    let mut table_len = u32::from(table.size);
    let mut index = u32::from(head);
    let mut indirect = false;
    // Descriptors we may still visit in this table before it must be a loop.
    let mut left = table_len;
    loop {
        if index >= table_len {
            return Err(ChainError::IndexOutOfRange {
                index,
                size: table_len,
            });
        }
        if left == 0 {
            return Err(ChainError::TooLong { limit: table_len });
        }
        left -= 1;
        let desc = read_descriptor(mem, table_addr, index)?;
        if desc.refers_to_indirect_table() {
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            let len = desc.len();
            let entries = len / VRING_DESC_ALIGN_SIZE;
            if len == 0 || len % VRING_DESC_ALIGN_SIZE != 0 || entries > MAX_INDIRECT_ENTRIES {
                return Err(ChainError::BadIndirectLength { len });
            }
            indirect = true;
            table_addr = desc.addr().0;
            table_len = entries;
            left = entries;
            index = 0;
            continue;
        }
        let writable = desc.is_write_only();
        if writable != (access == Access::DeviceWrites) {
            return Err(ChainError::WrongDirection { writable });
        }
        mem.translate(desc.addr().0, desc.len(), out)?;
        if !desc.has_next() {
            return Ok(());
        }
        index = u32::from(desc.next());
    }
}

/// Read entry `index` of the descriptor table at `table_addr` (one copy).
fn read_descriptor(
    mem: &GuestMemoryMap,
    table_addr: u64,
    index: u32,
) -> Result<Descriptor, ChainError> {
    let addr = u64::from(index)
        .checked_mul(u64::from(VRING_DESC_ALIGN_SIZE))
        .and_then(|off| table_addr.checked_add(off))
        .ok_or(ChainError::DescriptorOutsideMemory { addr: table_addr })?;
    let raw: [u8; 16] = mem
        .read_array(addr)
        .ok_or(ChainError::DescriptorOutsideMemory { addr })?;
    let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
    Ok(Descriptor::new(
        u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        u32::from_le_bytes([l0, l1, l2, l3]),
        u16::from_le_bytes([f0, f1]),
        u16::from_le_bytes([n0, n1]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iovecs::IoVecBuf;
    use crate::test_util::{desc, TestMemory, BUF_BASE, F_INDIRECT, F_NEXT, F_WRITE};

    const TABLE: u64 = crate::test_util::MEM_BASE;

    fn walk(m: &TestMemory, size: u16, head: u16, access: Access) -> Result<u64, ChainError> {
        let mut buf = IoVecBuf::new();
        let mut out = buf.bind(&m.map);
        walk_chain(
            &m.map,
            DescTable { addr: TABLE, size },
            head,
            access,
            &mut out,
        )
        .map(|_| out.total())
    }

    #[test]
    fn good_chain_and_indirect_chain() {
        let m = TestMemory::new();
        m.write_desc(TABLE, 0, desc(BUF_BASE, 100, F_NEXT, 1));
        m.write_desc(TABLE, 1, desc(BUF_BASE + 0x1000, 50, 0, 0));
        assert_eq!(walk(&m, 8, 0, Access::DeviceReads), Ok(150));
        // Indirect table of three entries at BUF_BASE + 0x10000.
        let ind = BUF_BASE + 0x10000;
        m.write_desc(TABLE, 2, desc(ind, 48, F_INDIRECT, 0));
        m.write_desc(ind, 0, desc(BUF_BASE, 10, F_WRITE | F_NEXT, 1));
        m.write_desc(ind, 1, desc(BUF_BASE, 20, F_WRITE | F_NEXT, 2));
        m.write_desc(ind, 2, desc(BUF_BASE, 30, F_WRITE, 0));
        assert_eq!(walk(&m, 8, 2, Access::DeviceWrites), Ok(60));
    }

    #[test]
    fn hostile_chains_refused() {
        let m = TestMemory::new();
        // Loop 0 -> 1 -> 0.
        m.write_desc(TABLE, 0, desc(BUF_BASE, 10, F_NEXT, 1));
        m.write_desc(TABLE, 1, desc(BUF_BASE, 10, F_NEXT, 0));
        assert_eq!(
            walk(&m, 8, 0, Access::DeviceReads),
            Err(ChainError::TooLong { limit: 8 })
        );
        // Next index past the table.
        m.write_desc(TABLE, 1, desc(BUF_BASE, 10, F_NEXT, 9));
        assert_eq!(
            walk(&m, 8, 0, Access::DeviceReads),
            Err(ChainError::IndexOutOfRange { index: 9, size: 8 })
        );
        // Head past the table.
        assert!(matches!(
            walk(&m, 8, 8, Access::DeviceReads),
            Err(ChainError::IndexOutOfRange { .. })
        ));
        // Buffer outside guest memory.
        m.write_desc(TABLE, 2, desc(0x1000, 10, 0, 0));
        assert!(matches!(
            walk(&m, 8, 2, Access::DeviceReads),
            Err(ChainError::Buffer(TranslateError::OutsideMemory { .. }))
        ));
        // Writable descriptor on TX, readable on RX.
        m.write_desc(TABLE, 3, desc(BUF_BASE, 10, F_WRITE, 0));
        assert_eq!(
            walk(&m, 8, 3, Access::DeviceReads),
            Err(ChainError::WrongDirection { writable: true })
        );
        m.write_desc(TABLE, 3, desc(BUF_BASE, 10, 0, 0));
        assert_eq!(
            walk(&m, 8, 3, Access::DeviceWrites),
            Err(ChainError::WrongDirection { writable: false })
        );
        // Indirect: bad length, nested, table outside memory.
        let ind = BUF_BASE + 0x10000;
        m.write_desc(TABLE, 4, desc(ind, 20, F_INDIRECT, 0));
        assert_eq!(
            walk(&m, 8, 4, Access::DeviceReads),
            Err(ChainError::BadIndirectLength { len: 20 })
        );
        m.write_desc(TABLE, 4, desc(ind, 32, F_INDIRECT, 0));
        m.write_desc(ind, 0, desc(ind, 16, F_INDIRECT, 0));
        assert_eq!(
            walk(&m, 8, 4, Access::DeviceReads),
            Err(ChainError::NestedIndirect)
        );
        m.write_desc(TABLE, 4, desc(0x10, 32, F_INDIRECT, 0));
        assert!(matches!(
            walk(&m, 8, 4, Access::DeviceReads),
            Err(ChainError::DescriptorOutsideMemory { .. })
        ));
        // A loop inside an indirect table.
        m.write_desc(TABLE, 4, desc(ind, 32, F_INDIRECT, 0));
        m.write_desc(ind, 0, desc(BUF_BASE, 1, F_NEXT, 1));
        m.write_desc(ind, 1, desc(BUF_BASE, 1, F_NEXT, 0));
        assert_eq!(
            walk(&m, 8, 4, Access::DeviceReads),
            Err(ChainError::TooLong { limit: 2 })
        );
    }

    #[test]
    fn too_many_segments_refused() {
        let m = TestMemory::new();
        // An indirect table of 1100 one-byte buffers.
        let ind = BUF_BASE + 0x20000;
        for i in 0..1100u16 {
            let flags = if i == 1099 { 0 } else { F_NEXT };
            m.write_desc(ind, i, desc(BUF_BASE, 1, flags, i + 1));
        }
        m.write_desc(TABLE, 0, desc(ind, 1100 * 16, F_INDIRECT, 0));
        assert!(matches!(
            walk(&m, 8, 0, Access::DeviceReads),
            Err(ChainError::Buffer(TranslateError::TooManySegments(_)))
        ));
    }
}
