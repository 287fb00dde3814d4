//! Guest memory as a test VMM or a test of the packet path owns it:
//! memfd-backed regions at any guest-physical address, mapped shared into
//! the test process.
//!
//! Each region is its own memfd (sized with ftruncate, mapped MAP_SHARED
//! from its file offset), so the very same pages can be handed to a worker
//! (`SetMemTable`: [`GuestMemory::memory_table`] and [`GuestMemory::fds`]),
//! to a VMM's memory table ([`GuestRegion::vmm_addr`], [`GuestRegion::file`]),
//! or mapped again here the way a worker maps them ([`GuestMemory::map`]).
//! Regions sit at nonzero guest-physical addresses like a real VM's, and may
//! be adjacent (buffers then straddle two regions) or far apart, so a backend
//! that confuses guest addresses, VMM addresses and file offsets is caught.
//!
//! Accesses go through raw pointers: another process (or thread) writes the
//! same pages concurrently, and no Rust reference into them is ever made.
//! Ring fields use volatile loads and stores (see the ring driver). A range
//! outside every region is a bug in the test, so the accessors panic.

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use qpnet_ipc::MemoryRegion;

use crate::guest_memory::GuestMemoryMap;

use super::driver::{Desc, RingDriver, RingLayout};

/// Start of the standard test layout's guest memory (4 GiB: nothing can
/// pass by assuming memory starts at 0).
pub const MEM_BASE: u64 = 0x1_0000_0000;
/// Size of each of the standard layout's two adjacent regions.
pub const REGION_SIZE: u64 = 0x20_0000;
/// Where tests of the standard layout put frame buffers (rings live below).
pub const BUF_BASE: u64 = MEM_BASE + 0x10_0000;
/// Where a second ring of the standard layout can live (the first is at
/// [`MEM_BASE`]; each has room for 16384 entries).
pub const SECOND_RING: u64 = MEM_BASE + 0x8_0000;

/// Where a region goes, how large it is, and where it starts in its memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionLayout {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Size in bytes (a multiple of the page size).
    pub size: u64,
    /// Offset of the region's first byte in its memfd (a multiple of the
    /// page size): the memory table's `mmap_offset`.
    pub file_offset: u64,
}

impl RegionLayout {
    /// `size` bytes at `gpa`, from the start of its memfd.
    pub fn new(gpa: u64, size: u64) -> RegionLayout {
        RegionLayout {
            gpa,
            size,
            file_offset: 0,
        }
    }
}

/// One memfd-backed region, mapped shared into this process.
#[derive(Debug)]
pub struct GuestRegion {
    layout: RegionLayout,
    file: File,
    ptr: NonNull<u8>,
}

// SAFETY: the mapping is owned by the region and unmapped only on drop; all
// accesses are raw-pointer reads and writes of shared memory, valid from any
// thread.
unsafe impl Send for GuestRegion {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for GuestRegion {}

impl GuestRegion {
    /// Create a memfd of `file_offset + size` bytes and map the region's
    /// part of it shared.
    pub fn new(layout: RegionLayout) -> io::Result<GuestRegion> {
        let fd = nix::sys::memfd::memfd_create(
            c"qpnet-test-guest",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?;
        let file = File::from(fd);
        file.set_len(layout.file_offset + layout.size)?;
        let len = std::num::NonZeroUsize::new(layout.size as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty region"))?;
        // SAFETY: a fresh shared mapping of a file we own, inside the file's
        // length; nothing in this process aliases it.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file.as_fd(),
                layout.file_offset as i64,
            )
        }?;
        Ok(GuestRegion {
            layout,
            file,
            ptr: ptr.cast(),
        })
    }

    /// Where it is.
    pub fn layout(&self) -> RegionLayout {
        self.layout
    }

    /// Guest-physical start address.
    pub fn gpa(&self) -> u64 {
        self.layout.gpa
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.layout.size
    }

    /// The region's address in this process: a VMM's `userspace_addr`.
    pub fn vmm_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The memfd behind the region (its `mmap_offset` is
    /// [`RegionLayout::file_offset`]).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The entry a primary sends a worker for this region.
    pub fn table_entry(&self) -> MemoryRegion {
        MemoryRegion {
            guest_phys_addr: self.layout.gpa,
            size: self.layout.size,
            mmap_offset: self.layout.file_offset,
        }
    }

    fn contains(&self, gpa: u64, len: u64) -> bool {
        let (start, size) = (self.layout.gpa, self.layout.size);
        gpa >= start && len <= size && gpa - start <= size - len
    }
}

impl Drop for GuestRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no pointer
        // into it outlives the region.
        let _ = unsafe { munmap(self.ptr.cast(), self.layout.size as usize) };
    }
}

/// The guest's memory: one or more regions, addressed by guest-physical
/// address.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<GuestRegion>,
}

impl GuestMemory {
    /// Create the regions of `layouts` (each a new memfd), in that order.
    pub fn new(layouts: &[RegionLayout]) -> io::Result<GuestMemory> {
        let regions = layouts
            .iter()
            .map(|l| GuestRegion::new(*l))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(GuestMemory { regions })
    }

    /// The standard test layout: two adjacent [`REGION_SIZE`] regions at
    /// [`MEM_BASE`].
    pub fn standard() -> io::Result<GuestMemory> {
        GuestMemory::new(&[
            RegionLayout::new(MEM_BASE, REGION_SIZE),
            RegionLayout::new(MEM_BASE + REGION_SIZE, REGION_SIZE),
        ])
    }

    /// The regions, in creation order.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// The table a primary sends with `SetMemTable` (same order as
    /// [`GuestMemory::fds`]).
    pub fn memory_table(&self) -> Vec<MemoryRegion> {
        self.regions.iter().map(GuestRegion::table_entry).collect()
    }

    /// The regions' memfds, in table order, to send beside the table.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.regions.iter().map(|r| r.file.as_fd()).collect()
    }

    /// Copies of the regions' memfds, in table order.
    pub fn owned_fds(&self) -> io::Result<Vec<OwnedFd>> {
        self.regions
            .iter()
            .map(|r| r.file.as_fd().try_clone_to_owned())
            .collect()
    }

    /// Map the same pages the way a worker does (through the memory-table
    /// checks and mmap of `GuestMemoryMap::map_regions`).
    ///
    /// # Panics
    /// If the worker refuses the table (a test bug).
    pub fn map(&self) -> GuestMemoryMap {
        let fds = self.owned_fds().expect("dup guest memory fds");
        GuestMemoryMap::map_regions(&self.memory_table(), fds).expect("worker maps guest memory")
    }

    /// Translate a guest-physical address to this process's (a VMM's)
    /// address; `None` outside every region.
    pub fn vmm_addr(&self, gpa: u64) -> Option<u64> {
        let r = self.regions.iter().find(|r| r.contains(gpa, 1))?;
        Some(r.vmm_addr() + (gpa - r.gpa()))
    }

    /// A pointer to `len` bytes at `gpa` in this process.
    ///
    /// # Panics
    /// If the range is not inside one region (a test bug).
    pub fn ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        let Some(r) = self.regions.iter().find(|r| r.contains(gpa, len as u64)) else {
            panic!("GPA range {gpa:#x}+{len:#x} is not inside one guest memory region");
        };
        // SAFETY: in bounds of the mapping, checked just above.
        unsafe { r.ptr.as_ptr().add((gpa - r.gpa()) as usize) }
    }

    /// Copy `data` into guest memory at `gpa` (it may straddle adjacent
    /// regions).
    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.each_piece(gpa, data.len(), |at, p, n| {
            // SAFETY: `p` is valid for `n` bytes (checked by `ptr`); a
            // mapping never overlaps a Rust slice we hold.
            unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), p, n) }
        });
    }

    /// Copy `buf.len()` bytes of guest memory at `gpa` into `buf` (they may
    /// straddle adjacent regions).
    pub fn read_into(&self, gpa: u64, buf: &mut [u8]) {
        self.each_piece(gpa, buf.len(), |at, p, n| {
            // SAFETY: `p` is valid for `n` bytes (checked by `ptr`).
            unsafe { std::ptr::copy_nonoverlapping(p, buf[at..].as_mut_ptr(), n) }
        });
    }

    /// `len` bytes of guest memory at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read_into(gpa, &mut v);
        v
    }

    /// Fill `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        self.each_piece(gpa, len, |_, p, n| {
            // SAFETY: `p` is valid for `n` bytes (checked by `ptr`).
            unsafe { std::ptr::write_bytes(p, byte, n) }
        });
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

    /// Store descriptor `index` of the table at `table` (anywhere: hostile
    /// tests write tables of their own).
    pub fn write_desc(&self, table: u64, index: u16, d: Desc) {
        self.write(table + 16 * u64::from(index), &d.to_bytes());
    }

    /// Call `f(offset, pointer, length)` for each piece of `gpa..gpa+len`
    /// that lies in one region.
    fn each_piece(&self, gpa: u64, len: usize, mut f: impl FnMut(usize, *mut u8, usize)) {
        let mut at = 0;
        while at < len {
            let addr = gpa + at as u64;
            let Some(r) = self.regions.iter().find(|r| r.contains(addr, 1)) else {
                panic!("GPA {addr:#x} (of {gpa:#x}+{len:#x}) is outside guest memory");
            };
            let n = (len - at).min((r.gpa() + r.size() - addr) as usize);
            f(at, self.ptr(addr, n), n);
            at += n;
        }
    }
}

/// Hands out guest-physical ranges of a region, front to back.
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

    /// `size` bytes aligned to `align` (a power of two); `None` when the
    /// region is exhausted.
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let start = self.next.checked_add(align - 1)? & !(align - 1);
        if start.checked_add(size)? > self.end {
            return None;
        }
        self.next = start + size;
        Some(start)
    }
}

/// Guest memory seen from both sides, for tests of the packet path: the
/// guest's side (`guest`, also reached through `Deref`) and the worker's map
/// of the very same pages (`map`).
#[derive(Debug)]
pub struct TestMemory {
    /// The guest's (driver's) side.
    pub guest: Arc<GuestMemory>,
    /// The worker's map, as `GuestMemoryMap::map_regions` builds it.
    pub map: GuestMemoryMap,
}

impl TestMemory {
    /// The standard layout (two adjacent regions at [`MEM_BASE`]).
    ///
    /// # Panics
    /// If memfds cannot be created or mapped.
    pub fn new() -> TestMemory {
        TestMemory::with_layout(&[
            RegionLayout::new(MEM_BASE, REGION_SIZE),
            RegionLayout::new(MEM_BASE + REGION_SIZE, REGION_SIZE),
        ])
    }

    /// Regions of `layouts`.
    ///
    /// # Panics
    /// If memfds cannot be created or mapped, or the worker refuses them.
    pub fn with_layout(layouts: &[RegionLayout]) -> TestMemory {
        let guest = Arc::new(GuestMemory::new(layouts).expect("test guest memory"));
        let map = guest.map();
        TestMemory { guest, map }
    }

    /// First address of the standard layout's second region.
    pub fn region_boundary(&self) -> u64 {
        MEM_BASE + REGION_SIZE
    }

    /// A driver for an empty `size`-entry ring packed at [`MEM_BASE`].
    pub fn ring(&self, size: u16) -> RingDriver {
        self.ring_at(size, MEM_BASE)
    }

    /// A driver for an empty `size`-entry ring packed at `base`.
    pub fn ring_at(&self, size: u16, base: u64) -> RingDriver {
        RingDriver::new(self.guest.clone(), RingLayout::packed(base, size))
    }
}

impl Default for TestMemory {
    fn default() -> Self {
        TestMemory::new()
    }
}

impl Deref for TestMemory {
    type Target = GuestMemory;

    fn deref(&self) -> &GuestMemory {
        &self.guest
    }
}
