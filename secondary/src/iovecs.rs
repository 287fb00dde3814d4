//! Host `iovec`s pointing into guest memory, and the allocation they live in.
//!
//! Frames move between the rings and the frame I/O with one `readv`/`writev`
//! on the buffers the guest supplied, so a descriptor chain is turned into a
//! list of host (pointer, length) pairs. Those pointers are only valid while
//! the guest memory map they were translated through is mapped, so the list
//! that holds them, [`IoVecs`], borrows that map: it cannot outlive a remap
//! (`SetMemTable` replaces the map only between runs, when no list exists).
//! Its allocation, an [`IoVecBuf`], is kept by each queue from run to run and
//! holds no entry in between, so after warm-up no frame allocates: a run
//! binds the buffer to the current map ([`IoVecBuf::bind`]), which only
//! resets a length.
//!
//! Entries are added only by translating guest buffers
//! (`GuestMemoryMap::translate`), so every entry points into the map the list
//! borrows; that is what makes the copies below and the system calls of the
//! frame I/O sound. The one exception is [`IoVecs::with_prefix`]: for the
//! length of one call, the first entry points at a buffer of ours that the
//! call borrows mutably (the TX path's checked copy of the virtio-net
//! header, so the kernel never reads the header from guest memory). Raw `iovec`s (not `IoSlice`) are used on purpose: guest
//! memory changes under our feet, and Rust references to it would promise the
//! opposite.

use std::marker::PhantomData;
use std::ops::Range;

use crate::guest_memory::GuestMemoryMap;

/// Most iovecs one `readv`/`writev` accepts (`IOV_MAX` on Linux).
pub const MAX_IOVECS: usize = 1024;

/// The reusable allocation of an iovec list; empty between runs.
#[derive(Debug, Default)]
pub struct IoVecBuf {
    list: Vec<libc::iovec>,
}

impl IoVecBuf {
    /// An allocation with room for a typical frame's segments.
    pub fn new() -> IoVecBuf {
        IoVecBuf {
            list: Vec::with_capacity(64),
        }
    }

    /// An empty list for buffers of `mem`, in this allocation. The list
    /// borrows both, so neither the map nor the allocation can change while
    /// it holds pointers.
    pub fn bind<'m>(&'m mut self, _mem: &'m GuestMemoryMap) -> IoVecs<'m> {
        self.list.clear();
        IoVecs {
            list: &mut self.list,
            total: 0,
            _mem: PhantomData,
        }
    }
}

/// Host iovecs into the guest memory map `'m`, with their total length.
#[derive(Debug)]
pub struct IoVecs<'m> {
    list: &'m mut Vec<libc::iovec>,
    total: u64,
    _mem: PhantomData<&'m GuestMemoryMap>,
}

impl IoVecs<'_> {
    /// Forget every entry (keeps the allocation).
    pub fn clear(&mut self) {
        self.list.clear();
        self.total = 0;
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Sum of the entries' lengths.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Append `len` bytes at host address `base`. Fails (and appends nothing)
    /// when the list already holds [`MAX_IOVECS`] entries.
    ///
    /// # Safety
    /// `base..base + len` must lie inside one mapping of the guest memory
    /// map this list borrows (only `GuestMemoryMap::translate` calls this).
    pub(crate) unsafe fn push(&mut self, base: *mut u8, len: usize) -> Result<(), TooManySegments> {
        if self.list.len() >= MAX_IOVECS {
            return Err(TooManySegments);
        }
        self.list.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        });
        self.total += len as u64;
        Ok(())
    }

    /// Drop the entries from `len` on.
    pub fn truncate(&mut self, len: usize) {
        for v in self.list.iter().skip(len) {
            self.total -= v.iov_len as u64;
        }
        self.list.truncate(len);
    }

    /// Drop the first `n` entries, moving the rest to the front.
    pub fn remove_front(&mut self, n: usize) {
        let n = n.min(self.list.len());
        for v in self.list.drain(..n) {
            self.total -= v.iov_len as u64;
        }
    }

    /// Drop the first `n` bytes of the area (whole entries, then the front
    /// of the next); fewer when the area is shorter.
    pub fn skip_bytes(&mut self, n: usize) {
        let mut left = n;
        let whole = self
            .list
            .iter()
            .take_while(|v| {
                let all = v.iov_len <= left;
                if all {
                    left -= v.iov_len;
                }
                all
            })
            .count();
        self.remove_front(whole);
        if let Some(v) = self.list.first_mut() {
            let cut = left.min(v.iov_len);
            // The entry still points inside the same guest buffer (`cut` is
            // at most its length), so `push`'s contract still holds.
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(cut).cast();
            v.iov_len -= cut;
            self.total -= cut as u64;
        }
    }

    /// Run `f` with `prefix` (our own memory) as the first entry, for one
    /// `writev` or `readv` of prefix + area; the entry is removed again
    /// before this returns. `prefix` is borrowed mutably for the call, so
    /// the kernel may read or write it. Fails, running nothing, when the
    /// list is full.
    pub fn with_prefix<R>(
        &mut self,
        prefix: &mut [u8],
        f: impl FnOnce(&IoVecs<'_>) -> R,
    ) -> Result<R, TooManySegments> {
        if self.list.len() >= MAX_IOVECS {
            return Err(TooManySegments);
        }
        self.list.insert(
            0,
            libc::iovec {
                iov_base: prefix.as_mut_ptr().cast(),
                iov_len: prefix.len(),
            },
        );
        self.total += prefix.len() as u64;
        let r = f(self);
        self.list.remove(0);
        self.total -= prefix.len() as u64;
        Ok(r)
    }

    /// The entries, for `readv`/`writev`: each points into live guest memory
    /// of at least its length for as long as this list exists.
    pub fn as_slice(&self) -> &[libc::iovec] {
        self.list
    }

    /// Write `bytes` at byte `offset` of the area the entries `entries`
    /// describe (the bytes may straddle entries). Returns false, and writes
    /// nothing, when that area is too short.
    pub fn write_at(&self, entries: Range<usize>, offset: usize, bytes: &[u8]) -> bool {
        let Some(list) = self.list.get(entries) else {
            return false;
        };
        let area: usize = list.iter().map(|v| v.iov_len).sum();
        if !matches!(offset.checked_add(bytes.len()), Some(end) if end <= area) {
            return false;
        }
        let mut skip = offset;
        let mut rest = bytes;
        for v in list {
            if rest.is_empty() {
                break;
            }
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            let n = rest.len().min(v.iov_len - skip);
            // SAFETY: every entry points into a live mapping of the guest
            // memory map this list borrows, of at least `iov_len` bytes
            // (`push`'s contract), and `skip + n <= iov_len`; our slice
            // cannot overlap guest memory. We copy through raw pointers and
            // make no reference into guest memory, so a hostile guest writing
            // the same bytes concurrently can only leave garbage in its own
            // buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(rest.as_ptr(), v.iov_base.cast::<u8>().add(skip), n)
            };
            rest = &rest[n..];
            skip = 0;
        }
        true
    }

    /// Copy up to `out.len()` bytes from byte `offset` of the area the
    /// entries `entries` describe into `out`; returns how many were copied
    /// (fewer when the area ends first).
    pub fn read_at(&self, entries: Range<usize>, offset: usize, out: &mut [u8]) -> usize {
        let Some(list) = self.list.get(entries) else {
            return 0;
        };
        let mut skip = offset;
        let mut done = 0;
        for v in list {
            if done == out.len() {
                break;
            }
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            let n = (out.len() - done).min(v.iov_len - skip);
            // SAFETY: every entry points into a live mapping of the guest
            // memory map this list borrows, of at least `iov_len` bytes, and
            // `skip + n <= iov_len`; `out` is our own buffer with room for
            // `n` more bytes. The guest may write these bytes concurrently
            // (it must not, but may be hostile): we only copy them out and
            // parse our copy.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base.cast::<u8>().add(skip),
                    out.as_mut_ptr().add(done),
                    n,
                )
            };
            done += n;
            skip = 0;
        }
        done
    }
}

/// A frame needed more than [`MAX_IOVECS`] host segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("more than {MAX_IOVECS} memory segments")]
pub struct TooManySegments;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{TestMemory, BUF_BASE};

    #[test]
    fn write_at_straddles_entries() {
        let m = TestMemory::new();
        let (a, b) = (BUF_BASE, BUF_BASE + 0x1000);
        let mut buf = IoVecBuf::new();
        let mut v = buf.bind(&m.map);
        m.map.translate(a, 11, &mut v).unwrap();
        m.map.translate(b, 4, &mut v).unwrap();
        assert_eq!(v.total(), 15);
        assert!(v.write_at(0..2, 10, &[0x34, 0x12]));
        assert_eq!(m.read(a + 10, 1), [0x34]);
        assert_eq!(m.read(b, 1), [0x12]);
        assert!(
            !v.write_at(0..1, 10, &[1, 2]),
            "area of one entry is too short"
        );
        assert!(!v.write_at(0..2, 14, &[1, 2]));
        assert!(v.write_at(1..2, 2, &[7, 8]));
        assert_eq!(m.read(b, 4), [0x12, 0, 7, 8]);
        assert!(!v.write_at(1..3, 0, &[1]), "range past the list");
        let mut out = [0u8; 6];
        assert_eq!(v.read_at(0..2, 9, &mut out), 6);
        assert_eq!(out, [0, 0x34, 0x12, 0, 7, 8]);
        v.truncate(1);
        assert_eq!(v.total(), 11);
        m.map.translate(b, 4, &mut v).unwrap();
        v.remove_front(1);
        assert_eq!(v.total(), 4);
        assert_eq!(v.len(), 1);
        assert_eq!(v.read_at(0..1, 0, &mut out), 4);
        assert_eq!(out[..4], [0x12, 0, 7, 8]);
    }

    #[test]
    fn list_is_capped_and_rebinding_empties_it() {
        let m = TestMemory::new();
        let mut buf = IoVecBuf::new();
        let mut v = buf.bind(&m.map);
        for _ in 0..MAX_IOVECS {
            m.map.translate(BUF_BASE, 1, &mut v).unwrap();
        }
        assert!(m.map.translate(BUF_BASE, 1, &mut v).is_err());
        assert_eq!(v.len(), MAX_IOVECS);
        let v = buf.bind(&m.map);
        assert_eq!((v.len(), v.total()), (0, 0));
    }

    #[test]
    fn skipping_bytes_and_a_prefix_in_front() {
        let m = TestMemory::new();
        let (a, b) = (BUF_BASE, BUF_BASE + 0x1000);
        m.write(a, &[1, 2, 3, 4, 5]);
        m.write(b, &[6, 7, 8]);
        let mut buf = IoVecBuf::new();
        let mut v = buf.bind(&m.map);
        // A 4-byte "header" in 1 + 3 bytes, then the rest.
        m.map.translate(a, 1, &mut v).unwrap();
        m.map.translate(a + 1, 4, &mut v).unwrap();
        m.map.translate(b, 3, &mut v).unwrap();
        v.skip_bytes(4);
        assert_eq!((v.len(), v.total()), (2, 4));
        let mut out = [0u8; 4];
        assert_eq!(v.read_at(0..2, 0, &mut out), 4);
        assert_eq!(out, [5, 6, 7, 8]);
        let mut prefix = [9u8, 9];
        let seen = v
            .with_prefix(&mut prefix, |f| {
                let mut all = [0u8; 6];
                (f.len(), f.total(), f.read_at(0..f.len(), 0, &mut all), all)
            })
            .unwrap();
        assert_eq!(seen, (3, 6, 6, [9, 9, 5, 6, 7, 8]));
        // The prefix is gone again.
        assert_eq!((v.len(), v.total()), (2, 4));
        v.skip_bytes(100);
        assert_eq!((v.len(), v.total()), (0, 0));
    }

    #[test]
    fn a_full_list_takes_no_prefix() {
        let m = TestMemory::new();
        let mut buf = IoVecBuf::new();
        let mut v = buf.bind(&m.map);
        for _ in 0..MAX_IOVECS {
            m.map.translate(BUF_BASE, 1, &mut v).unwrap();
        }
        let mut prefix = [0u8; 12];
        assert!(v.with_prefix(&mut prefix, |_| ()).is_err());
        assert_eq!(v.len(), MAX_IOVECS);
    }
}
