//! Creating, attaching and checking the shared region.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use memmap2::{Mmap, MmapMut, MmapOptions};

use crate::layout::{QueueStats, RegionHeader, LAYOUT_VERSION, MAGIC, MAX_QUEUE_PAIRS};

/// Why a region could not be created or attached.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// Creating, opening, sizing or mapping the file failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is smaller than its header says it must be.
    #[error("shared region is {actual} bytes, its header needs {needed}")]
    TooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The magic number is wrong: not a qpnet region.
    #[error("not a qpnet shared region (bad magic)")]
    BadMagic,
    /// The region was written by a qpnet with another layout.
    #[error("shared region has layout version {found}, this qpnet reads version {expected}")]
    Version {
        /// Version in the file.
        found: u32,
        /// Version this build understands.
        expected: u32,
    },
    /// Sizes in the header disagree with this build's layout.
    #[error("shared region layout mismatch: {0}")]
    Layout(String),
}

enum Map {
    Rw(MmapMut),
    Ro(Mmap),
}

/// A mapped shared region.
pub struct SharedRegion {
    map: Map,
    file: File,
    queue_pairs: usize,
}

fn region_size(queue_pairs: usize) -> usize {
    std::mem::size_of::<RegionHeader>() + queue_pairs * std::mem::size_of::<QueueStats>()
}

impl SharedRegion {
    /// Create (or truncate and re-create) the region file at `path`, mode 0600,
    /// initialised for `queue_pairs` queue pairs.
    pub fn create(path: &Path, queue_pairs: usize) -> Result<SharedRegion, RegionError> {
        let io = |what, source| RegionError::Io {
            what,
            path: path.display().to_string(),
            source,
        };
        if queue_pairs == 0 || queue_pairs > MAX_QUEUE_PAIRS {
            return Err(RegionError::Layout(format!(
                "{queue_pairs} queue pairs (1..={MAX_QUEUE_PAIRS})"
            )));
        }
        let _ = std::fs::remove_file(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| io("create", e))?;
        let size = region_size(queue_pairs);
        file.set_len(size as u64).map_err(|e| io("size", e))?;
        // SAFETY: the file was just created by us with exactly `size` bytes and
        // is only ever resized by re-creation; all access goes through atomics.
        let map =
            unsafe { MmapOptions::new().len(size).map_mut(&file) }.map_err(|e| io("map", e))?;
        let region = SharedRegion {
            map: Map::Rw(map),
            file,
            queue_pairs,
        };
        let h = region.header();
        h.layout_version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.header_size.store(
            std::mem::size_of::<RegionHeader>() as u32,
            Ordering::Relaxed,
        );
        h.queue_stats_size
            .store(std::mem::size_of::<QueueStats>() as u32, Ordering::Relaxed);
        h.queue_pairs.store(queue_pairs as u32, Ordering::Relaxed);
        h.generation.fetch_add(1, Ordering::Relaxed);
        h.primary_pid.store(std::process::id(), Ordering::Relaxed);
        // Magic last: a reader that sees it sees a complete header.
        h.magic.store(MAGIC, Ordering::Release);
        Ok(region)
    }

    /// Attach to an existing region through an fd (a worker), read-write.
    pub fn attach_fd(file: File) -> Result<SharedRegion, RegionError> {
        Self::attach(file, true, "<fd>")
    }

    /// Open the region file at `path` read-only (`qpnet stats`).
    pub fn open_read_only(path: &Path) -> Result<SharedRegion, RegionError> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| RegionError::Io {
                what: "open",
                path: path.display().to_string(),
                source,
            })?;
        Self::attach(file, false, &path.display().to_string())
    }

    fn attach(file: File, writable: bool, name: &str) -> Result<SharedRegion, RegionError> {
        let io = |what, source| RegionError::Io {
            what,
            path: name.to_string(),
            source,
        };
        let len = file.metadata().map_err(|e| io("stat", e))?.len() as usize;
        let hsize = std::mem::size_of::<RegionHeader>();
        if len < hsize {
            return Err(RegionError::TooSmall {
                needed: hsize,
                actual: len,
            });
        }
        // SAFETY: we map exactly the file's current length; the layout is
        // validated below before any queue block is handed out, and every
        // field is an atomic, so concurrent writers cannot cause UB.
        let map = unsafe {
            if writable {
                Map::Rw(
                    MmapOptions::new()
                        .len(len)
                        .map_mut(&file)
                        .map_err(|e| io("map", e))?,
                )
            } else {
                Map::Ro(
                    MmapOptions::new()
                        .len(len)
                        .map(&file)
                        .map_err(|e| io("map", e))?,
                )
            }
        };
        let mut region = SharedRegion {
            map,
            file,
            queue_pairs: 0,
        };
        region.queue_pairs = region.validate(len)?;
        Ok(region)
    }

    fn validate(&self, len: usize) -> Result<usize, RegionError> {
        let h = self.header();
        if h.magic.load(Ordering::Acquire) != MAGIC {
            return Err(RegionError::BadMagic);
        }
        let found = h.layout_version.load(Ordering::Relaxed);
        if found != LAYOUT_VERSION {
            return Err(RegionError::Version {
                found,
                expected: LAYOUT_VERSION,
            });
        }
        let hs = h.header_size.load(Ordering::Relaxed) as usize;
        let qs = h.queue_stats_size.load(Ordering::Relaxed) as usize;
        if hs != std::mem::size_of::<RegionHeader>() || qs != std::mem::size_of::<QueueStats>() {
            return Err(RegionError::Layout(format!(
                "header {hs} / queue block {qs} bytes, expected {} / {}",
                std::mem::size_of::<RegionHeader>(),
                std::mem::size_of::<QueueStats>()
            )));
        }
        let qp = h.queue_pairs.load(Ordering::Relaxed) as usize;
        if qp == 0 || qp > MAX_QUEUE_PAIRS {
            return Err(RegionError::Layout(format!("{qp} queue pairs")));
        }
        if len < region_size(qp) {
            return Err(RegionError::TooSmall {
                needed: region_size(qp),
                actual: len,
            });
        }
        Ok(qp)
    }

    fn base(&self) -> *const u8 {
        match &self.map {
            Map::Rw(m) => m.as_ptr(),
            Map::Ro(m) => m.as_ptr(),
        }
    }

    /// The region header.
    pub fn header(&self) -> &RegionHeader {
        // SAFETY: the mapping is at least one header long (checked at create
        // and attach), page aligned, and RegionHeader is repr(C) of atomics.
        unsafe { &*(self.base() as *const RegionHeader) }
    }

    /// Number of queue pairs in the region.
    pub fn queue_pairs(&self) -> usize {
        self.queue_pairs
    }

    /// The counters of queue pair `qp`, or `None` past the end.
    pub fn queue(&self, qp: usize) -> Option<&QueueStats> {
        if qp >= self.queue_pairs {
            return None;
        }
        let off = std::mem::size_of::<RegionHeader>() + qp * std::mem::size_of::<QueueStats>();
        // SAFETY: validate() checked that the mapping holds `queue_pairs`
        // blocks after the header; offsets are multiples of 64 from a page
        // aligned base, and QueueStats is repr(C) of atomics.
        Some(unsafe { &*(self.base().add(off) as *const QueueStats) })
    }

    /// The underlying file, to pass to a worker.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("qpnet-shm-test-{}-{name}", std::process::id()))
    }

    #[test]
    fn create_attach_and_count() {
        let p = tmp("a");
        let r = SharedRegion::create(&p, 4).unwrap();
        let w = SharedRegion::attach_fd(r.file.try_clone().unwrap()).unwrap();
        QueueStats::add(&w.queue(3).unwrap().tx_frames, 5);
        let ro = SharedRegion::open_read_only(&p).unwrap();
        assert_eq!(ro.queue_pairs(), 4);
        assert_eq!(QueueStats::get(&ro.queue(3).unwrap().tx_frames), 5);
        assert!(ro.queue(4).is_none());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn other_version_refused() {
        let p = tmp("b");
        let r = SharedRegion::create(&p, 1).unwrap();
        r.header().layout_version.store(99, Ordering::Relaxed);
        match SharedRegion::open_read_only(&p) {
            Err(RegionError::Version { found: 99, .. }) => {}
            other => panic!("expected version error, got {:?}", other.err()),
        }
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn garbage_and_short_files_refused() {
        let p = tmp("c");
        std::fs::write(&p, vec![7u8; 100]).unwrap();
        assert!(matches!(
            SharedRegion::open_read_only(&p),
            Err(RegionError::BadMagic)
        ));
        std::fs::write(&p, vec![7u8; 10]).unwrap();
        assert!(matches!(
            SharedRegion::open_read_only(&p),
            Err(RegionError::TooSmall { .. })
        ));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn truncated_queue_blocks_refused() {
        let p = tmp("d");
        let r = SharedRegion::create(&p, 4).unwrap();
        r.file.set_len(64 + 128).unwrap();
        assert!(matches!(
            SharedRegion::open_read_only(&p),
            Err(RegionError::TooSmall { .. })
        ));
        std::fs::remove_file(p).unwrap();
    }
}
