//! The rules a memory table must follow, checked in one place.
//!
//! The primary checks a VMM's SET_MEM_TABLE with [`validate_table`] before it
//! changes any state; every worker checks the same table with the same
//! function before it maps anything. One function on both sides of the
//! process boundary: if the two checks could disagree, a table the primary
//! accepted could crash a worker (a mapping past the end of its file is a
//! SIGBUS on first touch), which is exactly what the check is there to stop.
//!
//! The rules: one to [`MAX_REGIONS`] regions; each of non-zero size, with
//! its guest address plus size and its file offset plus size inside 64 bits
//! (and the offset inside an `off_t`); file offsets page aligned (mmap needs
//! it); no two regions share guest-physical addresses; each fd a regular file
//! (memfd, tmpfs or hugetlbfs) at least `mmap_offset + size` bytes long. The
//! primary adds the one rule only it can check: no overlap in the VMM's
//! address space.

use std::os::fd::AsFd;

use crate::MemoryRegion;

/// Most regions a memory table may have (the vhost-user limit).
pub const MAX_REGIONS: usize = 8;

/// Why a memory table was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryTableError {
    /// The number of fds differs from the number of regions.
    #[error("{fds} fds sent for {regions} memory regions")]
    FdCount {
        /// Regions in the table.
        regions: usize,
        /// Fds beside it.
        fds: usize,
    },
    /// The table has no region.
    #[error("memory table has no region")]
    NoRegion,
    /// More regions than [`MAX_REGIONS`].
    #[error("memory table has {0} regions, at most {MAX_REGIONS} allowed")]
    TooManyRegions(usize),
    /// A region has size 0.
    #[error("region {index} has size 0")]
    EmptyRegion {
        /// Position in the table.
        index: usize,
    },
    /// Guest address plus size does not fit in 64 bits (or the size in a
    /// `usize`).
    #[error("region {index}: guest address {gpa:#x} + size {size:#x} overflows")]
    GuestRangeOverflow {
        /// Position in the table.
        index: usize,
        /// Start address.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// File offset plus size does not fit in 64 bits (or in an `off_t`).
    #[error("region {index}: mmap offset {offset:#x} + size {size:#x} overflows")]
    FileRangeOverflow {
        /// Position in the table.
        index: usize,
        /// File offset.
        offset: u64,
        /// Size.
        size: u64,
    },
    /// The file offset is not a multiple of the page size (mmap needs it).
    #[error("region {index}: mmap offset {offset:#x} is not page aligned")]
    UnalignedOffset {
        /// Position in the table.
        index: usize,
        /// File offset.
        offset: u64,
    },
    /// Two regions share guest-physical addresses.
    #[error("regions {first} and {second} overlap in guest-physical space")]
    Overlap {
        /// Position of one region.
        first: usize,
        /// Position of the other.
        second: usize,
    },
    /// `fstat` of a region's fd failed.
    #[error("region {index}: fstat failed")]
    Stat {
        /// Position in the table.
        index: usize,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The fd is not a regular file (memfd, tmpfs or hugetlbfs file).
    #[error("region {index}: its fd is not a regular file (memfd, tmpfs or hugetlbfs file)")]
    NotRegularFile {
        /// Position in the table.
        index: usize,
    },
    /// The file is shorter than the mapping: an access would raise SIGBUS.
    #[error(
        "region {index}: its file has {file_size} bytes, the region needs {needed} (a mapping past the end of its file)"
    )]
    PastEndOfFile {
        /// Position in the table.
        index: usize,
        /// Bytes in the file.
        file_size: u64,
        /// mmap_offset + size.
        needed: u64,
    },
}

/// Check a memory table and the files behind it (same order as the
/// regions). See the module documentation for the rules.
pub fn validate_table<F: AsFd>(
    regions: &[MemoryRegion],
    files: &[F],
) -> Result<(), MemoryTableError> {
    if files.len() != regions.len() {
        return Err(MemoryTableError::FdCount {
            regions: regions.len(),
            fds: files.len(),
        });
    }
    validate_layout(regions, page_size())?;
    for (index, (region, file)) in regions.iter().zip(files).enumerate() {
        check_file_covers(index, region, file.as_fd())?;
    }
    Ok(())
}

/// The rules that need no file: sizes, overflow, alignment to `page_size`,
/// overlap. Part of [`validate_table`]; on its own for tests and fuzzing.
pub fn validate_layout(regions: &[MemoryRegion], page_size: u64) -> Result<(), MemoryTableError> {
    if regions.is_empty() {
        return Err(MemoryTableError::NoRegion);
    }
    if regions.len() > MAX_REGIONS {
        return Err(MemoryTableError::TooManyRegions(regions.len()));
    }
    for (index, r) in regions.iter().enumerate() {
        if r.size == 0 {
            return Err(MemoryTableError::EmptyRegion { index });
        }
        if r.guest_phys_addr.checked_add(r.size).is_none() || usize::try_from(r.size).is_err() {
            return Err(MemoryTableError::GuestRangeOverflow {
                index,
                gpa: r.guest_phys_addr,
                size: r.size,
            });
        }
        let file_end = r.mmap_offset.checked_add(r.size);
        if !matches!(file_end, Some(end) if end <= i64::MAX as u64) {
            return Err(MemoryTableError::FileRangeOverflow {
                index,
                offset: r.mmap_offset,
                size: r.size,
            });
        }
        if !r.mmap_offset.is_multiple_of(page_size.max(1)) {
            return Err(MemoryTableError::UnalignedOffset {
                index,
                offset: r.mmap_offset,
            });
        }
    }
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by_key(|&i| regions[i].guest_phys_addr);
    for pair in order.windows(2) {
        let (a, b) = (&regions[pair[0]], &regions[pair[1]]);
        // No overflow: checked above.
        if a.guest_phys_addr + a.size > b.guest_phys_addr {
            return Err(MemoryTableError::Overlap {
                first: pair[0].min(pair[1]),
                second: pair[0].max(pair[1]),
            });
        }
    }
    Ok(())
}

/// Refuse a region whose fd is not a regular file long enough for it.
fn check_file_covers(
    index: usize,
    region: &MemoryRegion,
    fd: std::os::fd::BorrowedFd<'_>,
) -> Result<(), MemoryTableError> {
    let st =
        nix::sys::stat::fstat(fd).map_err(|source| MemoryTableError::Stat { index, source })?;
    use nix::sys::stat::SFlag;
    if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() {
        return Err(MemoryTableError::NotRegularFile { index });
    }
    let file_size = u64::try_from(st.st_size).unwrap_or(0);
    // No overflow: validate_layout checked it.
    let needed = region.mmap_offset + region.size;
    if file_size < needed {
        return Err(MemoryTableError::PastEndOfFile {
            index,
            file_size,
            needed,
        });
    }
    Ok(())
}

/// The system's page size (4096 if it cannot be read).
pub fn page_size() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(n)) if n > 0 => n as u64,
        _ => 4096,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

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
        nix::unistd::ftruncate(&fd, len as i64).expect("ftruncate");
        fd
    }

    #[test]
    fn overlapping_regions_refused_in_any_order() {
        let r = [
            region(0x1_0000_0000, 0x2000, 0),
            region(0x1_0000_1000, 0x1000, 0),
        ];
        assert!(matches!(
            validate_layout(&r, 4096),
            Err(MemoryTableError::Overlap {
                first: 0,
                second: 1
            })
        ));
        let r = [region(0x5000, 0x1000, 0), region(0x0, 0x6000, 0)];
        assert!(matches!(
            validate_layout(&r, 4096),
            Err(MemoryTableError::Overlap { .. })
        ));
        let adjacent = [region(0x5000, 0x1000, 0), region(0x0, 0x5000, 0)];
        validate_layout(&adjacent, 4096).unwrap();
    }

    #[test]
    fn bad_sizes_offsets_and_counts_refused() {
        use MemoryTableError as E;
        assert!(matches!(validate_layout(&[], 4096), Err(E::NoRegion)));
        let nine: Vec<_> = (0..9).map(|i| region(i << 20, 0x1000, 0)).collect();
        assert!(matches!(
            validate_layout(&nine, 4096),
            Err(E::TooManyRegions(9))
        ));
        assert!(matches!(
            validate_layout(&[region(0, 0, 0)], 4096),
            Err(E::EmptyRegion { index: 0 })
        ));
        assert!(matches!(
            validate_layout(&[region(u64::MAX - 10, 0x1000, 0)], 4096),
            Err(E::GuestRangeOverflow { .. })
        ));
        assert!(matches!(
            validate_layout(&[region(0, 0x1000, u64::MAX - 0xfff)], 4096),
            Err(E::FileRangeOverflow { .. })
        ));
        assert!(matches!(
            validate_layout(&[region(0, 0x1000, 0x10)], 4096),
            Err(E::UnalignedOffset { .. })
        ));
    }

    #[test]
    fn files_must_be_regular_and_long_enough() {
        use MemoryTableError as E;
        let r = [region(0x1_0000_0000, 0x2000, 0x1000)];
        validate_table(&r, &[memfd(0x3000)]).unwrap();
        assert!(matches!(
            validate_table(&r, &[memfd(0x2fff)]),
            Err(E::PastEndOfFile {
                index: 0,
                file_size: 0x2fff,
                needed: 0x3000
            })
        ));
        let (a, _b) = nix::unistd::pipe().unwrap();
        assert!(matches!(
            validate_table(&r, &[a]),
            Err(E::NotRegularFile { index: 0 })
        ));
        let (s, _t) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            validate_table(&r, &[s]),
            Err(E::NotRegularFile { index: 0 })
        ));
        assert!(matches!(
            validate_table::<OwnedFd>(&r, &[]),
            Err(E::FdCount { regions: 1, fds: 0 })
        ));
    }
}
