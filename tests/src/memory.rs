//! The test VMM's guest memory: memfd-backed regions shared with qpnet.
//!
//! Each region is a memfd, sized with ftruncate and mapped MAP_SHARED into the
//! test process; its fd goes to qpnet in SET_MEM_TABLE, so qpnet's workers map
//! the very same pages. Regions sit at a nonzero guest-physical address (GPA)
//! like a real VM's (0x1_0000_0000 by default), so a backend that confuses
//! GPAs, VMM virtual addresses and file offsets is caught.
//!
//! Three address spaces meet here:
//! - GPA: what descriptors and the memory table's `guest_phys_addr` hold;
//! - VMM address: where this process mapped the region (`userspace_addr`),
//!   what SET_VRING_ADDR carries;
//! - the mapping pointer itself, used to read and write.
//!
//! All accesses go through raw pointers (another process writes the same
//! pages concurrently); ring indices use volatile accesses and fences (see
//! [`crate::virtq`]).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;

use anyhow::{bail, Context, Result};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use vhost::VhostUserMemoryRegionInfo;

/// GPA of the first region of a default layout.
pub const DEFAULT_GPA: u64 = 0x1_0000_0000;

/// Where a region goes and how large it is.
#[derive(Debug, Clone, Copy)]
pub struct RegionLayout {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Size in bytes (a multiple of the page size).
    pub size: u64,
}

/// One memfd-backed, shared mapping.
#[derive(Debug)]
pub struct GuestRegion {
    gpa: u64,
    size: u64,
    file: File,
    ptr: NonNull<u8>,
}

// SAFETY: the mapping is owned by the region and unmapped only on drop; all
// accesses are raw-pointer reads/writes to shared memory, valid from any thread.
unsafe impl Send for GuestRegion {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for GuestRegion {}

impl GuestRegion {
    /// Create a memfd of `layout.size` bytes and map it shared.
    pub fn new(layout: RegionLayout) -> Result<GuestRegion> {
        let fd = nix::sys::memfd::memfd_create(
            c"qpnet-test-guest",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .context("memfd_create")?;
        let file = File::from(fd);
        file.set_len(layout.size)
            .context("ftruncate guest memory")?;
        let len = std::num::NonZeroUsize::new(layout.size as usize).context("empty region")?;
        // SAFETY: a fresh shared mapping of a file we own; nothing else in
        // this process aliases it.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file.as_fd(),
                0,
            )
        }
        .context("mmap guest memory")?;
        Ok(GuestRegion {
            gpa: layout.gpa,
            size: layout.size,
            file,
            ptr: ptr.cast(),
        })
    }

    /// Guest-physical start address.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The region's address in this process (the memory table's
    /// `userspace_addr`).
    pub fn vmm_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The memfd backing the region.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The vhost-user memory table entry for this region.
    pub fn info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.vmm_addr(),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa && len <= self.size && gpa - self.gpa <= self.size - len
    }
}

impl Drop for GuestRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no pointer into
        // it outlives the region.
        let _ = unsafe { munmap(self.ptr.cast(), self.size as usize) };
    }
}

/// The guest's memory: one or more regions, addressed by GPA.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<GuestRegion>,
}

impl GuestMemory {
    /// Create the regions of `layouts` (each a new memfd).
    pub fn new(layouts: &[RegionLayout]) -> Result<GuestMemory> {
        let regions = layouts
            .iter()
            .map(|l| GuestRegion::new(*l))
            .collect::<Result<Vec<_>>>()?;
        Ok(GuestMemory { regions })
    }

    /// The regions, in creation order.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// The memory table for SET_MEM_TABLE.
    pub fn region_infos(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.regions.iter().map(GuestRegion::info).collect()
    }

    /// Translate a GPA to this process's (the VMM's) virtual address.
    pub fn vmm_addr(&self, gpa: u64) -> Result<u64> {
        let r = self.region_of(gpa, 1)?;
        Ok(r.vmm_addr() + (gpa - r.gpa))
    }

    fn region_of(&self, gpa: u64, len: u64) -> Result<&GuestRegion> {
        match self.regions.iter().find(|r| r.contains(gpa, len)) {
            Some(r) => Ok(r),
            None => bail!("GPA range {gpa:#x}+{len:#x} is not inside one guest memory region"),
        }
    }

    /// A pointer to `len` bytes at `gpa` in this process.
    ///
    /// # Panics
    /// If the range is not inside one region (a test bug).
    pub fn ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        let r = self
            .region_of(gpa, len as u64)
            .unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: in bounds of the mapping, checked just above.
        unsafe { r.ptr.as_ptr().add((gpa - r.gpa) as usize) }
    }

    /// Copy `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let dst = self.ptr(gpa, data.len());
        // SAFETY: `dst` is valid for `data.len()` bytes (checked by `ptr`),
        // and a mapping never overlaps a Rust slice we hold.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }

    /// Copy `buf.len()` bytes of guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) {
        let src = self.ptr(gpa, buf.len());
        // SAFETY: `src` is valid for `buf.len()` bytes (checked by `ptr`).
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
    }

    /// Fill `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        let dst = self.ptr(gpa, len);
        // SAFETY: `dst` is valid for `len` bytes (checked by `ptr`).
        unsafe { std::ptr::write_bytes(dst, byte, len) };
    }

    /// Volatile little-endian u16 load (ring indices and entries).
    pub fn load_u16(&self, gpa: u64) -> u16 {
        let p = self.ptr(gpa, 2).cast::<u16>();
        assert!(p.is_aligned(), "unaligned ring field at {gpa:#x}");
        // SAFETY: valid and aligned (checked above).
        u16::from_le(unsafe { p.read_volatile() })
    }

    /// Volatile little-endian u16 store.
    pub fn store_u16(&self, gpa: u64, v: u16) {
        let p = self.ptr(gpa, 2).cast::<u16>();
        assert!(p.is_aligned(), "unaligned ring field at {gpa:#x}");
        // SAFETY: valid and aligned (checked above).
        unsafe { p.write_volatile(v.to_le()) };
    }

    /// Volatile little-endian u32 load.
    pub fn load_u32(&self, gpa: u64) -> u32 {
        let p = self.ptr(gpa, 4).cast::<u32>();
        assert!(p.is_aligned(), "unaligned ring field at {gpa:#x}");
        // SAFETY: valid and aligned (checked above).
        u32::from_le(unsafe { p.read_volatile() })
    }
}

/// Hands out GPA ranges of a region, front to back.
#[derive(Debug)]
pub struct BumpAllocator {
    next: u64,
    end: u64,
}

impl BumpAllocator {
    /// Allocate from the whole of `region`.
    pub fn new(region: &GuestRegion) -> BumpAllocator {
        BumpAllocator {
            next: region.gpa(),
            end: region.gpa() + region.size(),
        }
    }

    /// `size` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, size: u64, align: u64) -> Result<u64> {
        let start = (self.next + align - 1) & !(align - 1);
        if start + size > self.end {
            bail!(
                "guest memory exhausted: {size:#x} bytes wanted at {start:#x}, end {:#x}",
                self.end
            );
        }
        self.next = start + size;
        Ok(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_translate_and_share_pages_with_the_memfd() {
        let mem = GuestMemory::new(&[
            RegionLayout {
                gpa: DEFAULT_GPA,
                size: 1 << 20,
            },
            RegionLayout {
                gpa: DEFAULT_GPA + (16 << 20),
                size: 2 << 20,
            },
        ])
        .unwrap();
        let infos = mem.region_infos();
        assert_eq!(infos[1].guest_phys_addr, DEFAULT_GPA + (16 << 20));
        assert_eq!(
            mem.vmm_addr(DEFAULT_GPA + (16 << 20) + 10).unwrap(),
            infos[1].userspace_addr + 10
        );
        assert!(
            mem.vmm_addr(DEFAULT_GPA + (1 << 20)).is_err(),
            "gap between regions"
        );
        mem.write(DEFAULT_GPA + (16 << 20) + 100, b"hello");
        // A second mapping of the same memfd (as qpnet would make) sees it.
        let mut seen = [0u8; 5];
        let f = mem.regions()[1].file().try_clone().unwrap();
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut seen, 100).unwrap();
        assert_eq!(&seen, b"hello");
        mem.store_u16(DEFAULT_GPA + 2, 0xbeef);
        assert_eq!(mem.load_u16(DEFAULT_GPA + 2), 0xbeef);
        let mut a = BumpAllocator::new(&mem.regions()[0]);
        assert_eq!(a.alloc(3, 1).unwrap(), DEFAULT_GPA);
        assert_eq!(a.alloc(16, 16).unwrap(), DEFAULT_GPA + 16);
        assert!(a.alloc(1 << 20, 1).is_err());
    }
}
