//! The qpnet shared-memory region.
//!
//! One region per qpnet instance, created by the primary as a file on the
//! runtime directory's tmpfs (so `qpnet stats` can map it read-only) and
//! handed to every worker as an fd. It holds a versioned header and one
//! cache-line aligned block of counters per queue pair. Every counter is an
//! atomic written by exactly one process (the queue pair's worker, or the
//! primary for supervision fields), so no lock is ever taken to update or to
//! read it.
#![deny(missing_docs)]

mod layout;
mod region;

pub use layout::{QueueStats, RegionHeader, WorkerState, LAYOUT_VERSION, MAGIC, MAX_QUEUE_PAIRS};
pub use region::{RegionError, SharedRegion};
