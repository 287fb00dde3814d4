//! The guest's memory as this worker sees it: regions mapped from the fds the
//! primary sent, and guest-physical to host translation.
//!
//! Every region is checked before it is mapped, by the same function the
//! primary ran on the VMM's table (`qpnet_ipc::memory_table`): non-empty, no
//! address overflow, no overlap with another region, page-aligned file
//! offset, and a regular file at least as long as the mapping (touching a
//! page past EOF would kill the worker with SIGBUS). The regions are mapped
//! with vm-memory (`GuestMemoryMmap`), which virtio-queue uses to read and
//! write the rings. For the packet path a sorted table of (guest address,
//! length, host pointer) turns a descriptor's buffer into host iovecs with
//! one binary search ([`GuestMemoryMap::translate`]), so frames go to and
//! from the TAP without a copy; the iovec list borrows this map, so no host
//! pointer outlives the mapping it points into. Guest memory may start at any
//! address (DPDK's virtio-user uses its own virtual addresses); nothing here
//! assumes it starts at 0.

use std::fs::File;
use std::os::fd::OwnedFd;

use qpnet_ipc::memory_table::validate_table;
use qpnet_ipc::{MemoryRegion, MemoryTableError};
use vm_memory::mmap::MmapRegionError;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

use crate::iovecs::{IoVecs, TooManySegments};

/// Why a memory table could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The table breaks a rule (the same check the primary ran).
    #[error(transparent)]
    Table(#[from] MemoryTableError),
    /// mmap itself failed.
    #[error("region {index}: mmap failed")]
    Map {
        /// Position in the table.
        index: usize,
        /// The cause.
        #[source]
        source: MmapRegionError,
    },
    /// vm-memory refused the region set.
    #[error("cannot build the guest memory map: {0}")]
    Collection(String),
}

/// Why a guest buffer could not be turned into host iovecs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// Part of the buffer lies outside every region.
    #[error("buffer {gpa:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address of the buffer.
        gpa: u64,
        /// Its length.
        len: u32,
    },
    /// The frame needs more host segments than one system call takes.
    #[error(transparent)]
    TooManySegments(#[from] TooManySegments),
}

/// One mapped region, for translation.
#[derive(Debug, Clone, Copy)]
struct HostRange {
    gpa: u64,
    len: u64,
    host: *mut u8,
}

/// The guest's memory, mapped.
#[derive(Debug)]
pub struct GuestMemoryMap {
    mmap: GuestMemoryMmap<()>,
    /// Sorted by `gpa`, non-overlapping; pointers valid while `mmap` lives.
    ranges: Vec<HostRange>,
}

impl GuestMemoryMap {
    /// Validate `regions` against their `fds` (same order) and map them.
    pub fn map_regions(
        regions: &[MemoryRegion],
        fds: Vec<OwnedFd>,
    ) -> Result<GuestMemoryMap, MemoryError> {
        // The one set of memory-table rules, shared with the primary.
        validate_table(regions, &fds)?;
        let files: Vec<File> = fds.into_iter().map(File::from).collect();
        let mut mapped = Vec::with_capacity(regions.len());
        for (index, (region, file)) in regions.iter().zip(files).enumerate() {
            // validate_table checked that size fits a usize and the ranges.
            let size = region.size as usize;
            let mapping = MmapRegion::from_file(FileOffset::new(file, region.mmap_offset), size)
                .map_err(|source| MemoryError::Map { index, source })?;
            let guest = GuestRegionMmap::new(mapping, GuestAddress(region.guest_phys_addr)).ok_or(
                MemoryTableError::GuestRangeOverflow {
                    index,
                    gpa: region.guest_phys_addr,
                    size: region.size,
                },
            )?;
            mapped.push(guest);
        }
        mapped.sort_by_key(|r| r.start_addr());
        let mmap = GuestMemoryMmap::from_regions(mapped)
            .map_err(|e| MemoryError::Collection(e.to_string()))?;
        Ok(GuestMemoryMap::from_mmap(mmap))
    }

    /// Wrap a vm-memory map, listing its regions for translation.
    fn from_mmap(mmap: GuestMemoryMmap<()>) -> GuestMemoryMap {
        let mut ranges: Vec<HostRange> = mmap
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some(HostRange {
                    gpa: r.start_addr().0,
                    len: r.len(),
                    host,
                })
            })
            .collect();
        ranges.sort_by_key(|r| r.gpa);
        GuestMemoryMap { mmap, ranges }
    }

    /// The vm-memory view, for virtio-queue.
    pub fn vm(&self) -> &GuestMemoryMmap<()> {
        &self.mmap
    }

    /// Number of regions.
    pub fn region_count(&self) -> usize {
        self.ranges.len()
    }

    /// Append host iovecs covering guest buffer `gpa..gpa+len` to `out`, a
    /// list that cannot outlive this map. A buffer may run across adjacent
    /// regions (one iovec per region). On error `out` may hold part of the
    /// buffer; callers drop the whole frame.
    pub fn translate<'m>(
        &'m self,
        gpa: u64,
        len: u32,
        out: &mut IoVecs<'m>,
    ) -> Result<(), TranslateError> {
        let outside = TranslateError::OutsideMemory { gpa, len };
        let mut addr = gpa;
        let mut left = u64::from(len);
        while left > 0 {
            let range = self.range_containing(addr).ok_or(outside)?;
            let offset = addr - range.gpa;
            let chunk = left.min(range.len - offset);
            // SAFETY: `offset < range.len`, so the pointer stays inside the
            // mapping of this region, which lives as long as `self`.
            let host = unsafe { range.host.add(offset as usize) };
            // SAFETY: `host..host + chunk` lies inside this region's mapping
            // (`chunk <= range.len - offset`), and `out` cannot outlive
            // `self` (`'m`), which keeps the mapping alive.
            unsafe { out.push(host, chunk as usize) }?;
            left -= chunk;
            addr = addr.checked_add(chunk).ok_or(outside)?;
        }
        Ok(())
    }

    /// Read `N` bytes at `gpa` (one volatile copy: the guest may be
    /// writing them). `None` when any of them is outside guest memory.
    pub fn read_array<const N: usize>(&self, gpa: u64) -> Option<[u8; N]> {
        match self.host_span(gpa, N) {
            // SAFETY: host_span checked that all N bytes lie in one live
            // mapping; [u8; N] has no alignment or validity requirement.
            Some(p) => Some(unsafe { std::ptr::read_volatile(p as *const [u8; N]) }),
            None => {
                let mut bytes = [0u8; N];
                self.mmap
                    .read_slice(&mut bytes, GuestAddress(gpa))
                    .ok()
                    .map(|_| bytes)
            }
        }
    }

    /// Write `bytes` at `gpa` (volatile). False, and nothing written, when
    /// any of them is outside guest memory.
    pub fn write_bytes(&self, gpa: u64, bytes: &[u8]) -> bool {
        match self.host_span(gpa, bytes.len()) {
            Some(p) => {
                for (i, b) in bytes.iter().enumerate() {
                    // SAFETY: host_span checked that all the bytes lie in one
                    // live mapping.
                    unsafe { std::ptr::write_volatile(p.add(i), *b) };
                }
                true
            }
            None => {
                let vm = &self.mmap;
                vm.check_range(GuestAddress(gpa), bytes.len())
                    && vm.write_slice(bytes, GuestAddress(gpa)).is_ok()
            }
        }
    }

    /// Host address of `gpa..gpa+len` when it lies inside one region.
    fn host_span(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let range = self.range_containing(gpa)?;
        let offset = gpa - range.gpa;
        if (len as u64) > range.len - offset {
            return None;
        }
        // SAFETY: offset < range.len: inside the mapping.
        Some(unsafe { range.host.add(offset as usize) })
    }

    fn range_containing(&self, addr: u64) -> Option<&HostRange> {
        let after = self.ranges.partition_point(|r| r.gpa <= addr);
        let range = self.ranges.get(after.checked_sub(1)?)?;
        (addr - range.gpa < range.len).then_some(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iovecs::IoVecBuf;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn region(gpa: u64, size: u64, off: u64) -> MemoryRegion {
        MemoryRegion {
            guest_phys_addr: gpa,
            size,
            mmap_offset: off,
        }
    }

    fn memfd(len: u64) -> OwnedFd {
        let fd = nix::sys::memfd::memfd_create(c"qpnet-test", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd_create");
        nix::unistd::ftruncate(fd.as_fd(), len as i64).expect("ftruncate");
        fd
    }

    #[test]
    fn region_past_eof_refused() {
        let err = GuestMemoryMap::map_regions(&[region(0x1000_0000, 0x2000, 0)], vec![memfd(4096)])
            .unwrap_err();
        assert!(
            matches!(
                err,
                MemoryError::Table(MemoryTableError::PastEndOfFile {
                    index: 0,
                    file_size: 4096,
                    needed: 0x2000
                })
            ),
            "{err}"
        );
        let err =
            GuestMemoryMap::map_regions(&[region(0x1000_0000, 0x1000, 0x1000)], vec![memfd(4096)])
                .unwrap_err();
        assert!(
            matches!(
                err,
                MemoryError::Table(MemoryTableError::PastEndOfFile { .. })
            ),
            "{err}"
        );
    }

    #[test]
    fn non_file_fd_refused() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = GuestMemoryMap::map_regions(&[region(0, 0x1000, 0)], vec![OwnedFd::from(a)])
            .unwrap_err();
        assert!(
            matches!(
                err,
                MemoryError::Table(MemoryTableError::NotRegularFile { index: 0 })
            ),
            "{err}"
        );
    }

    #[test]
    fn fd_count_must_match() {
        let err = GuestMemoryMap::map_regions(&[region(0, 0x1000, 0)], vec![]).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::Table(MemoryTableError::FdCount { .. })
        ));
    }

    #[test]
    fn high_regions_map_and_translate_across_a_boundary() {
        // Two adjacent regions at a high address, backed by one memfd at
        // different offsets, listed out of order.
        let fd = memfd(0x3000);
        let mut f = File::from(fd.try_clone().unwrap());
        f.write_all(&[0xaa; 0x3000]).unwrap();
        let base = 0x1_0000_0000u64;
        let regions = [
            region(base + 0x1000, 0x2000, 0x1000),
            region(base, 0x1000, 0),
        ];
        let mem =
            GuestMemoryMap::map_regions(&regions, vec![fd.try_clone().unwrap(), fd]).expect("map");
        assert_eq!(mem.region_count(), 2);
        let mut buf = IoVecBuf::new();
        let mut v = buf.bind(&mem);
        mem.translate(base + 0xff0, 0x20, &mut v).unwrap();
        assert_eq!(v.len(), 2, "a buffer across two regions gives two iovecs");
        assert_eq!(v.total(), 0x20);
        assert_eq!(v.as_slice()[0].iov_len, 0x10);
        v.clear();
        assert!(mem.translate(base + 0x2ff0, 0x20, &mut v).is_err());
        v.clear();
        assert!(mem.translate(base - 1, 1, &mut v).is_err());
        v.clear();
        assert!(
            mem.translate(0, 1, &mut v).is_err(),
            "memory does not start at 0"
        );
        v.clear();
        mem.translate(base + 0x2fff, 1, &mut v).unwrap();
        mem.translate(u64::MAX, 0, &mut v).unwrap();

        // Small reads and writes, inside one region and across the boundary.
        let bytes: Vec<u8> = (1..=16).collect();
        assert!(mem.write_bytes(base + 0x0ff8, &bytes));
        assert_eq!(mem.read_array::<16>(base + 0x0ff8).unwrap().to_vec(), bytes);
        assert!(mem.write_bytes(base + 0x2ff0, &bytes));
        assert_eq!(mem.read_array::<4>(base + 0x2ffc), Some([13, 14, 15, 16]));
        assert!(!mem.write_bytes(base + 0x2ff8, &bytes), "past the end");
        assert_eq!(mem.read_array::<16>(base + 0x2ff8), None);
        assert_eq!(mem.read_array::<2>(0), None);
    }
}
