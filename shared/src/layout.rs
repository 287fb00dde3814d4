//! The `#[repr(C)]` layout of the shared region.
//!
//! ```text
//! offset 0            RegionHeader   (3 cache lines: identity, flow table
//!                                     geometry, flow table counters)
//! offset 192          QueueStats[0]  (QUEUE_STATS_SIZE bytes, cache-line aligned)
//! ...                 QueueStats[queue_pairs - 1]
//! flow.offset         Stripe[flow.stripes]     (page aligned; see flow/stripe.rs)
//!                     FlowSlot[flow.capacity]
//! ```
//!
//! The header's magic, layout version and sizes are checked on every attach;
//! a reader built for another layout refuses to interpret the rest.

use std::sync::atomic::{AtomicU32, AtomicU64};

pub use crate::queue_stats::QueueStats;

/// "QPNETSHM" as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"QPNETSHM");
/// Version of this layout; bumped on any incompatible change.
pub const LAYOUT_VERSION: u32 = 6;
/// Most queue pairs a region (and a qpnet instance) can have.
pub const MAX_QUEUE_PAIRS: usize = 16;

/// The region header.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct RegionHeader {
    /// [`MAGIC`].
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`].
    pub layout_version: AtomicU32,
    /// `size_of::<RegionHeader>()` of the writer.
    pub header_size: AtomicU32,
    /// `size_of::<QueueStats>()` of the writer.
    pub queue_stats_size: AtomicU32,
    /// Number of queue pairs (blocks that follow the header).
    pub queue_pairs: AtomicU32,
    /// Bumped each time a primary (re)initialises the region.
    pub generation: AtomicU64,
    /// Process id of the primary that owns the region.
    pub primary_pid: AtomicU32,
    /// Nonzero while a VMM is connected.
    pub vmm_connected: AtomicU32,
    /// Number of VMM connections served so far.
    pub vmm_connections: AtomicU64,
    /// Where the flow table is and how it is shaped (written once, by the
    /// primary, before the magic).
    pub flow: FlowGeometryHeader,
    /// Flow table events, for `qpnet stats` (atomics, any process adds).
    pub flow_counters: FlowCounters,
}

/// The flow table's geometry as published in the header. Attach checks it
/// against this build's layout and the file's length before any stripe or
/// slot is touched.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct FlowGeometryHeader {
    /// Byte offset of the first stripe from the start of the region.
    pub offset: AtomicU64,
    /// Number of entries (a power of two).
    pub capacity: AtomicU32,
    /// Number of lock stripes (`capacity / slots_per_stripe`).
    pub stripes: AtomicU32,
    /// Entries per stripe.
    pub slots_per_stripe: AtomicU32,
    /// `size_of` one stripe header of the writer.
    pub stripe_size: AtomicU32,
    /// `size_of` one entry of the writer.
    pub slot_size: AtomicU32,
    /// Whether workers track flows: [`TRACKING_ON`], [`TRACKING_OFF`], or 0
    /// when the primary has not said.
    pub tracking: AtomicU32,
    /// Secret seed of the keyed hash that places flows (random per region).
    pub hash_seed: [AtomicU64; 2],
}

/// [`FlowGeometryHeader::tracking`]: workers record flows.
pub const TRACKING_ON: u32 = 1;
/// [`FlowGeometryHeader::tracking`]: flow tracking is turned off.
pub const TRACKING_OFF: u32 = 2;

/// Flow table events that are rare enough to count in one shared place.
/// Per-stripe insert/remove counts live in the stripes; per-queue-pair flow
/// counts in [`QueueStats`].
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct FlowCounters {
    /// Stripes repaired after their lock holder died (EOWNERDEAD).
    pub repairs: AtomicU64,
    /// New flows refused because both their stripes were full.
    pub refused: AtomicU64,
    /// Lock waits that hit their bound (holder stopped or very slow).
    pub lock_timeouts: AtomicU64,
    /// Lock attempts that failed outright (corrupt or unrecoverable lock).
    pub lock_failures: AtomicU64,
    /// Entries found invalid (garbage, torn beyond repair) and freed.
    pub scrubbed: AtomicU64,
    /// Flows removed because their owner queue pair is gone (primary).
    pub owner_gone_removed: AtomicU64,
}

/// What a queue pair's worker is doing, as published in [`QueueStats::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WorkerState {
    /// No worker yet.
    Absent = 0,
    /// Spawned, not yet acknowledged its hello.
    Starting = 1,
    /// Running; its rings may or may not be started.
    Running = 2,
    /// Exited or killed; a new one is being started.
    Restarting = 3,
    /// Given up on after repeated crashes.
    Failed = 4,
    /// Stopped on purpose (shutdown).
    Stopped = 5,
}

impl WorkerState {
    /// Decode a published state value.
    pub fn from_u32(v: u32) -> Option<WorkerState> {
        Some(match v {
            0 => WorkerState::Absent,
            1 => WorkerState::Starting,
            2 => WorkerState::Running,
            3 => WorkerState::Restarting,
            4 => WorkerState::Failed,
            5 => WorkerState::Stopped,
            _ => return None,
        })
    }

    /// A short lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Absent => "absent",
            WorkerState::Starting => "starting",
            WorkerState::Running => "running",
            WorkerState::Restarting => "restarting",
            WorkerState::Failed => "failed",
            WorkerState::Stopped => "stopped",
        }
    }
}

const _: () = assert!(std::mem::size_of::<RegionHeader>() == 192);
const _: () = assert!(std::mem::offset_of!(RegionHeader, flow) == 64);
const _: () = assert!(std::mem::offset_of!(RegionHeader, flow_counters) == 128);
const _: () = assert!(std::mem::size_of::<FlowGeometryHeader>() == 64);
const _: () = assert!(std::mem::size_of::<FlowCounters>() == 64);
