//! The guest's memory table as the VMM sent it (SET_MEM_TABLE): each
//! region's fd and addresses, the checks a table passes before the device
//! takes it, the translation of ring addresses from the VMM's address space
//! to guest-physical addresses, and the two-byte reads of ring indexes that
//! supervision needs.
//!
//! The primary never maps guest memory: it reads a ring index with `pread`
//! on the region's fd, so a hostile or shrinking memory file can never make
//! the primary fault.
//!
//! The checks are the worker's own (`qpnet_ipc::memory_table::validate_table`:
//! one function on both sides of the process boundary, so the two can never
//! disagree) plus the one only the primary can make: no wrap-around or
//! overlap in the VMM's address space, through which ring addresses are
//! translated.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use qpnet_ipc::memory_table::validate_table;
use qpnet_ipc::{MemoryRegion, Request};
use vhost::vhost_user::message::VhostUserMemoryRegion;

use crate::device::{make_cloexec, refuse, DevResult, Refusal};

/// A memory region as the VMM described it (copied out of the packed
/// protocol struct).
#[derive(Debug, Clone, Copy)]
struct RegionInfo {
    guest_phys_addr: u64,
    memory_size: u64,
    user_addr: u64,
    mmap_offset: u64,
}

impl From<&VhostUserMemoryRegion> for RegionInfo {
    fn from(r: &VhostUserMemoryRegion) -> RegionInfo {
        RegionInfo {
            guest_phys_addr: r.guest_phys_addr,
            memory_size: r.memory_size,
            user_addr: r.user_addr,
            mmap_offset: r.mmap_offset,
        }
    }
}

struct GuestRegion {
    info: RegionInfo,
    file: File,
}

impl GuestRegion {
    /// The region as workers get it (no VMM address).
    fn table_entry(&self) -> MemoryRegion {
        MemoryRegion {
            guest_phys_addr: self.info.guest_phys_addr,
            size: self.info.memory_size,
            mmap_offset: self.info.mmap_offset,
        }
    }
}

/// A checked memory table (empty before the first SET_MEM_TABLE and after a
/// reset).
#[derive(Default)]
pub struct MemoryTable {
    regions: Vec<GuestRegion>,
}

impl MemoryTable {
    /// Check a VMM's SET_MEM_TABLE. Its fds are made close-on-exec first,
    /// so they never leak into a worker but through SCM_RIGHTS.
    pub fn from_vmm(regions: &[VhostUserMemoryRegion], files: Vec<File>) -> DevResult<MemoryTable> {
        if regions.len() != files.len() {
            return refuse(format!("{} regions but {} fds", regions.len(), files.len()));
        }
        for f in &files {
            make_cloexec(f.as_fd());
        }
        let table = MemoryTable {
            regions: regions
                .iter()
                .zip(files)
                .map(|(r, file)| GuestRegion {
                    info: r.into(),
                    file,
                })
                .collect(),
        };
        table.validate()?;
        Ok(table)
    }

    /// Whether the table has no region (no guest memory known).
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Bytes of guest memory in all regions.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.info.memory_size).sum()
    }

    /// The table as a worker gets it, with one fd per region.
    pub fn request(&self) -> (Request, Vec<BorrowedFd<'_>>) {
        let regions = self.regions.iter().map(GuestRegion::table_entry).collect();
        let fds = self.regions.iter().map(|r| r.file.as_fd()).collect();
        (Request::SetMemTable { regions }, fds)
    }

    /// Translate `len` bytes at VMM virtual address `va` to a guest-physical
    /// address, if the whole range lies inside one region.
    pub fn translate(&self, va: u64, len: u64) -> Option<u64> {
        self.find(va, len).map(|(_, gpa)| gpa)
    }

    /// Read the little-endian u16 `offset` bytes into the structure at VMM
    /// virtual address `va` (both inside one region) through its region's
    /// fd.
    pub fn read_u16(&self, va: u64, offset: u64) -> Option<u16> {
        let (region, gpa) = self.find(va, offset.checked_add(2)?)?;
        let off = region.info.mmap_offset + (gpa - region.info.guest_phys_addr) + offset;
        let mut b = [0u8; 2];
        region.file.read_exact_at(&mut b, off).ok()?;
        Some(u16::from_le_bytes(b))
    }

    fn find(&self, va: u64, len: u64) -> Option<(&GuestRegion, u64)> {
        self.regions.iter().find_map(|r| {
            let start = r.info.user_addr;
            let end = start.checked_add(r.info.memory_size)?;
            let last = va.checked_add(len)?;
            (va >= start && last <= end).then(|| (r, r.info.guest_phys_addr + (va - start)))
        })
    }

    /// The rules every worker checks too (the same function), plus no
    /// wrap-around or overlap in the VMM's address space.
    fn validate(&self) -> DevResult<()> {
        let table: Vec<MemoryRegion> = self.regions.iter().map(GuestRegion::table_entry).collect();
        let files: Vec<&File> = self.regions.iter().map(|r| &r.file).collect();
        validate_table(&table, &files)
            .map_err(|e| Refusal(format!("memory table refused: {e}")))?;
        for (n, r) in self.regions.iter().enumerate() {
            let i = &r.info;
            let end = i.user_addr.checked_add(i.memory_size).ok_or_else(|| {
                Refusal(format!(
                    "memory region {n} wraps around the VMM's address space"
                ))
            })?;
            for (m, o) in self.regions.iter().enumerate().take(n) {
                let o = &o.info;
                // No overflow: checked for region m on its own turn.
                if i.user_addr < o.user_addr + o.memory_size && o.user_addr < end {
                    return refuse(format!(
                        "memory regions {m} and {n} overlap in VMM address space"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn memfd(len: u64) -> File {
        let fd = nix::sys::memfd::memfd_create(c"qpnet-test", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd_create");
        nix::unistd::ftruncate(&fd, len as i64).expect("ftruncate");
        File::from(fd)
    }

    fn region(gpa: u64, size: u64, mmap_offset: u64, file_len: u64) -> GuestRegion {
        GuestRegion {
            info: RegionInfo {
                guest_phys_addr: gpa,
                memory_size: size,
                user_addr: 0x7f00_0000_0000u64.wrapping_add(gpa),
                mmap_offset,
            },
            file: memfd(file_len),
        }
    }

    fn validate_regions(regions: Vec<GuestRegion>) -> DevResult<()> {
        MemoryTable { regions }.validate()
    }

    /// The primary and the worker refuse the same bad tables, for the same
    /// reason: both run `qpnet_ipc::memory_table::validate_table`.
    #[test]
    fn primary_and_worker_refuse_the_same_tables_alike() {
        const G: u64 = 0x1_0000_0000;
        let tables: Vec<(&str, Vec<GuestRegion>)> = vec![
            ("empty", vec![]),
            ("size 0", vec![region(G, 0, 0, 0x1000)]),
            ("wraps", vec![region(u64::MAX - 0xfff, 0x2000, 0, 0x2000)]),
            ("unaligned offset", vec![region(G, 0x1000, 0x10, 0x2000)]),
            (
                "past the end of its file",
                vec![region(G, 0x2000, 0, 0x1000)],
            ),
            (
                "overlap",
                vec![
                    region(G, 0x2000, 0, 0x2000),
                    region(G + 0x1000, 0x1000, 0, 0x1000),
                ],
            ),
            (
                "nine regions",
                (0..9)
                    .map(|i| region(G + (i << 20), 0x1000, 0, 0x1000))
                    .collect(),
            ),
        ];
        for (what, regions) in tables {
            let table: Vec<MemoryRegion> = regions.iter().map(GuestRegion::table_entry).collect();
            let fds: Vec<OwnedFd> = regions
                .iter()
                .map(|r| OwnedFd::from(r.file.try_clone().expect("dup")))
                .collect();
            let primary = validate_regions(regions).expect_err(what).0;
            let worker = qpnet_secondary::GuestMemoryMap::map_regions(&table, fds)
                .expect_err(what)
                .to_string();
            assert_eq!(
                primary,
                format!("memory table refused: {worker}"),
                "{what}: the two sides disagree"
            );
        }
    }

    #[test]
    fn only_the_primary_checks_the_vmm_address_space() {
        let mut a = region(0x1_0000_0000, 0x2000, 0, 0x2000);
        let mut b = region(0x2_0000_0000, 0x2000, 0, 0x2000);
        a.info.user_addr = 0x7f00_0000_0000;
        b.info.user_addr = 0x7f00_0000_1000;
        let e = validate_regions(vec![a, b]).unwrap_err().0;
        assert!(e.contains("overlap in VMM address space"), "{e}");
    }

    #[test]
    fn ring_indexes_are_read_through_the_region_fd() {
        let r = region(0x1_0000_0000, 0x2000, 0x1000, 0x3000);
        r.file
            .write_all_at(&0xbeefu16.to_le_bytes(), 0x1000 + 0x10)
            .unwrap();
        let va = r.info.user_addr;
        let t = MemoryTable { regions: vec![r] };
        assert_eq!(t.read_u16(va + 0xe, 2), Some(0xbeef));
        assert_eq!(t.translate(va + 0x10, 2), Some(0x1_0000_0010));
        assert_eq!(t.read_u16(va + 0x1ffd, 2), None, "crosses the region's end");
        assert_eq!(t.translate(va - 1, 2), None);
    }
}
