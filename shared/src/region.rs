//! Creating, attaching and checking the shared region.
//!
//! The primary creates the region (file on the runtime directory's tmpfs),
//! initialises the flow table's stripe mutexes and publishes the magic
//! last. Every attach (worker, `qpnet stats`) checks the header's version,
//! sizes and flow table geometry against this build and the file's length
//! before handing out a single reference into it.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use memmap2::{Mmap, MmapMut, MmapOptions};

use crate::flow::{
    random_seed, FlowGeometry, FlowReader, FlowTable, DEFAULT_FLOW_CAPACITY, MAX_FLOW_CAPACITY,
    MIN_FLOW_CAPACITY, SLOTS_PER_STRIPE, SLOT_SIZE, STRIPE_SIZE,
};
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
    flow: FlowGeometry,
}

/// Bytes of the header and the queue blocks.
fn stats_size(queue_pairs: usize) -> usize {
    std::mem::size_of::<RegionHeader>() + queue_pairs * std::mem::size_of::<QueueStats>()
}

/// Where the flow table starts: the first page after the queue blocks.
fn flow_offset(queue_pairs: usize) -> usize {
    stats_size(queue_pairs).next_multiple_of(4096)
}

impl SharedRegion {
    /// Create (or truncate and re-create) the region file at `path`, mode 0600,
    /// initialised for `queue_pairs` queue pairs and a flow table of
    /// [`DEFAULT_FLOW_CAPACITY`] entries.
    pub fn create(path: &Path, queue_pairs: usize) -> Result<SharedRegion, RegionError> {
        Self::create_with(path, queue_pairs, DEFAULT_FLOW_CAPACITY)
    }

    /// [`SharedRegion::create`] with a flow table of `flow_capacity` entries
    /// (a power of two, 64 ..= 4Mi).
    pub fn create_with(
        path: &Path,
        queue_pairs: usize,
        flow_capacity: usize,
    ) -> Result<SharedRegion, RegionError> {
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
        if !FlowGeometry::capacity_ok(flow_capacity) {
            return Err(RegionError::Layout(format!(
                "flow capacity {flow_capacity} (a power of two, \
                 {MIN_FLOW_CAPACITY}..={MAX_FLOW_CAPACITY})"
            )));
        }
        let flow = FlowGeometry {
            offset: flow_offset(queue_pairs),
            capacity: flow_capacity,
            stripes: flow_capacity / SLOTS_PER_STRIPE,
            seed: random_seed(),
        };
        let _ = std::fs::remove_file(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| io("create", e))?;
        let size = flow.offset + FlowGeometry::bytes(flow_capacity);
        file.set_len(size as u64).map_err(|e| io("size", e))?;
        // SAFETY: the file was just created by us with exactly `size` bytes and
        // is only ever resized by re-creation; all access goes through atomics.
        let map =
            unsafe { MmapOptions::new().len(size).map_mut(&file) }.map_err(|e| io("map", e))?;
        let region = SharedRegion {
            map: Map::Rw(map),
            file,
            queue_pairs,
            flow,
        };
        region.init_flow_locks()?;
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
        let g = &h.flow;
        g.offset.store(flow.offset as u64, Ordering::Relaxed);
        g.capacity.store(flow.capacity as u32, Ordering::Relaxed);
        g.stripes.store(flow.stripes as u32, Ordering::Relaxed);
        g.slots_per_stripe
            .store(SLOTS_PER_STRIPE as u32, Ordering::Relaxed);
        g.stripe_size.store(STRIPE_SIZE as u32, Ordering::Relaxed);
        g.slot_size.store(SLOT_SIZE as u32, Ordering::Relaxed);
        for (dst, v) in g.hash_seed.iter().zip(flow.seed) {
            dst.store(v, Ordering::Relaxed);
        }
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
            flow: FlowGeometry {
                offset: 0,
                capacity: 0,
                stripes: 0,
                seed: [0; 2],
            },
        };
        region.queue_pairs = region.validate(len)?;
        region.flow = region.validate_flow(len)?;
        Ok(region)
    }

    /// Initialise every stripe's robust mutex (fresh file, not yet
    /// published: nobody else can reach it).
    fn init_flow_locks(&self) -> Result<(), RegionError> {
        let table = FlowReader::new(self, self.flow);
        for s in 0..self.flow.stripes {
            // SAFETY: the file was created by this process a moment ago and
            // the magic is not yet published: nobody else uses the locks.
            unsafe { table.init_stripe_lock(s) }.map_err(|e| {
                RegionError::Layout(format!("initialising flow table lock {s}: {e}"))
            })?;
        }
        Ok(())
    }

    fn validate_flow(&self, len: usize) -> Result<FlowGeometry, RegionError> {
        let g = &self.header().flow;
        let offset = g.offset.load(Ordering::Relaxed);
        let capacity = g.capacity.load(Ordering::Relaxed) as usize;
        let stripes = g.stripes.load(Ordering::Relaxed) as usize;
        let sizes = (
            g.slots_per_stripe.load(Ordering::Relaxed) as usize,
            g.stripe_size.load(Ordering::Relaxed) as usize,
            g.slot_size.load(Ordering::Relaxed) as usize,
        );
        if sizes != (SLOTS_PER_STRIPE, STRIPE_SIZE, SLOT_SIZE) {
            return Err(RegionError::Layout(format!(
                "flow table sizes (slots per stripe, stripe, slot) {sizes:?}, expected {:?}",
                (SLOTS_PER_STRIPE, STRIPE_SIZE, SLOT_SIZE)
            )));
        }
        if !FlowGeometry::capacity_ok(capacity) || stripes != capacity / SLOTS_PER_STRIPE {
            return Err(RegionError::Layout(format!(
                "flow table of {capacity} entries in {stripes} stripes"
            )));
        }
        let offset = usize::try_from(offset)
            .ok()
            .filter(|&o| o % 4096 == 0 && o >= stats_size(self.queue_pairs))
            .ok_or_else(|| RegionError::Layout(format!("flow table offset {offset}")))?;
        let needed = offset
            .checked_add(FlowGeometry::bytes(capacity))
            .ok_or_else(|| RegionError::Layout("flow table size overflows".into()))?;
        if len < needed {
            return Err(RegionError::TooSmall {
                needed,
                actual: len,
            });
        }
        Ok(FlowGeometry {
            offset,
            capacity,
            stripes,
            seed: [
                g.hash_seed[0].load(Ordering::Relaxed),
                g.hash_seed[1].load(Ordering::Relaxed),
            ],
        })
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
        if len < stats_size(qp) {
            return Err(RegionError::TooSmall {
                needed: stats_size(qp),
                actual: len,
            });
        }
        Ok(qp)
    }

    pub(crate) fn base(&self) -> *const u8 {
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

    /// The flow table's lock-free read side (lookups, iteration, counters).
    /// Works on every mapping, including `qpnet stats`'s read-only one.
    pub fn flows(&self) -> FlowReader<'_> {
        FlowReader::new(self, self.flow)
    }

    /// The flow table for changing it (workers, the primary); `None` on a
    /// read-only mapping.
    pub fn flow_table(&self) -> Option<FlowTable<'_>> {
        match self.map {
            Map::Rw(_) => Some(FlowTable::new(self.flows())),
            Map::Ro(_) => None,
        }
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
        std::fs::write(&p, vec![7u8; 300]).unwrap();
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

    #[test]
    fn flow_table_geometry_checked() {
        let p = tmp("e");
        for bad in [0, 32, 100, 3 << 10, MAX_FLOW_CAPACITY * 2] {
            assert!(
                matches!(
                    SharedRegion::create_with(&p, 1, bad),
                    Err(RegionError::Layout(_))
                ),
                "capacity {bad} accepted"
            );
        }
        let r = SharedRegion::create_with(&p, 2, 1024).unwrap();
        assert_eq!(r.flows().capacity(), 1024);
        assert_eq!(r.flows().stripe_count(), 16);
        // A file cut inside the flow table is refused.
        let full = r.file.metadata().unwrap().len();
        r.file.set_len(full - 1).unwrap();
        assert!(matches!(
            SharedRegion::open_read_only(&p),
            Err(RegionError::TooSmall { .. })
        ));
        r.file.set_len(full).unwrap();
        // So is a header whose geometry does not add up.
        r.header().flow.stripes.store(15, Ordering::Relaxed);
        assert!(matches!(
            SharedRegion::open_read_only(&p),
            Err(RegionError::Layout(_))
        ));
        r.header().flow.stripes.store(16, Ordering::Relaxed);
        r.header().flow.offset.store(64, Ordering::Relaxed);
        assert!(matches!(
            SharedRegion::open_read_only(&p),
            Err(RegionError::Layout(_))
        ));
        std::fs::remove_file(p).unwrap();
    }
}
