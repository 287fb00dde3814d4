//! A reusable list of host `iovec`s pointing into guest memory.
//!
//! Frames move between the rings and the TAP with one `readv`/`writev` on the
//! buffers the guest supplied, so a descriptor chain is turned into a list of
//! host (pointer, length) pairs. The list is kept by the TX and RX paths and
//! cleared for every frame, so after warm-up no frame allocates. Raw `iovec`s
//! (not `IoSlice`) are used on purpose: guest memory changes under our feet,
//! and Rust references to it would promise the opposite.

use std::ops::Range;

/// Most iovecs one `readv`/`writev` accepts (`IOV_MAX` on Linux).
pub const MAX_IOVECS: usize = 1024;

/// Host iovecs of one frame, with their total length.
#[derive(Debug, Default)]
pub struct IoVecs {
    list: Vec<libc::iovec>,
    total: u64,
}

impl IoVecs {
    /// An empty list with room for a typical frame.
    pub fn new() -> IoVecs {
        IoVecs {
            list: Vec::with_capacity(64),
            total: 0,
        }
    }

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
    pub fn push(&mut self, base: *mut u8, len: usize) -> Result<(), TooManySegments> {
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

    /// The entries, for `readv`/`writev`.
    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.list
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
            // SAFETY: every iovec points into a live guest-memory mapping of
            // at least `iov_len` bytes (the list is rebuilt per batch from
            // the current map) and `skip + n <= iov_len`; our slice cannot
            // overlap guest memory. We copy through raw pointers and make no
            // reference into guest memory, so a hostile guest writing the
            // same bytes concurrently can only leave garbage in its own
            // buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(rest.as_ptr(), v.iov_base.cast::<u8>().add(skip), n)
            };
            rest = &rest[n..];
            skip = 0;
        }
        true
    }
}

impl IoVecs {
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
            // SAFETY: every iovec points into a live guest-memory mapping of
            // at least `iov_len` bytes and `skip + n <= iov_len`; `out` is
            // our own buffer with room for `n` more bytes. The guest may
            // write these bytes concurrently (it must not, but may be
            // hostile): we only copy them out and parse our copy.
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

    #[test]
    fn write_at_straddles_entries() {
        let mut a = [0u8; 11];
        let mut b = [0u8; 4];
        let mut v = IoVecs::new();
        v.push(a.as_mut_ptr(), a.len()).unwrap();
        v.push(b.as_mut_ptr(), b.len()).unwrap();
        assert_eq!(v.total(), 15);
        assert!(v.write_at(0..2, 10, &[0x34, 0x12]));
        assert_eq!(a[10], 0x34);
        assert_eq!(b[0], 0x12);
        assert!(
            !v.write_at(0..1, 10, &[1, 2]),
            "area of one entry is too short"
        );
        assert!(!v.write_at(0..2, 14, &[1, 2]));
        assert!(v.write_at(1..2, 2, &[7, 8]));
        assert_eq!(b, [0x12, 0, 7, 8]);
        assert!(!v.write_at(1..3, 0, &[1]), "range past the list");
        v.truncate(1);
        assert_eq!(v.total(), 11);
        v.push(b.as_mut_ptr(), b.len()).unwrap();
        v.remove_front(1);
        assert_eq!(v.total(), 4);
        assert_eq!(v.as_slice()[0].iov_base, b.as_mut_ptr().cast());
    }

    #[test]
    fn list_is_capped() {
        let mut x = [0u8; 1];
        let mut v = IoVecs::new();
        for _ in 0..MAX_IOVECS {
            v.push(x.as_mut_ptr(), 1).unwrap();
        }
        assert_eq!(v.push(x.as_mut_ptr(), 1), Err(TooManySegments));
        assert_eq!(v.len(), MAX_IOVECS);
    }
}
