//! The `#[repr(C)]` layout of the shared region.
//!
//! ```text
//! offset 0            RegionHeader   (3 cache lines: identity, flow table
//!                                     geometry, flow table counters)
//! offset 192          QueueStats[0]  (QUEUE_STATS_SIZE bytes, cache-line aligned)
//! ...                 QueueStats[queue_pairs - 1]
//! flow.offset         Stripe[flow.stripes]     (page aligned; see flow_table.rs)
//!                     FlowSlot[flow.capacity]
//! ```
//!
//! The header's magic, layout version and sizes are checked on every attach;
//! a reader built for another layout refuses to interpret the rest.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// "QPNETSHM" as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"QPNETSHM");
/// Version of this layout; bumped on any incompatible change.
pub const LAYOUT_VERSION: u32 = 2;
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

/// The counters and status of one queue pair. Frame and drop counters are
/// written only by the queue pair's worker; `state`, `pid` and `restarts`
/// only by the primary.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Frames taken from the TX ring and written to the TAP.
    pub tx_frames: AtomicU64,
    /// Bytes of those frames (without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// Frames read from the TAP and put in the RX ring.
    pub rx_frames: AtomicU64,
    /// Bytes of those frames (without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// RX frames cut short because the guest's buffers were too small.
    pub drop_too_large: AtomicU64,
    /// Chains refused because a descriptor was invalid (out of guest memory,
    /// looping, wrong direction, too long).
    pub drop_bad_descriptor: AtomicU64,
    /// TX chains shorter than the virtio-net header.
    pub drop_runt: AtomicU64,
    /// Frames the TAP refused on write.
    pub drop_tap_error: AtomicU64,
    /// Times the TAP had frames while the RX ring had no buffer.
    pub rx_no_buffer: AtomicU64,
    /// Kicks received on the TX ring.
    pub tx_kicks: AtomicU64,
    /// Kicks received on the RX ring.
    pub rx_kicks: AtomicU64,
    /// Interrupts (call eventfd writes) sent to the guest.
    pub interrupts: AtomicU64,
    /// Batches processed (wake-ups that moved at least one frame).
    pub batches: AtomicU64,
    /// Worker heartbeat: CLOCK_MONOTONIC nanoseconds of its last loop turn.
    pub heartbeat_ns: AtomicU64,
    /// Times the worker of this queue pair was (re)started after the first.
    pub restarts: AtomicU64,
    /// The worker's process id (0 when none).
    pub pid: AtomicU32,
    /// A [`WorkerState`] value.
    pub state: AtomicU32,
    /// Flows this queue pair's worker created in the flow table.
    pub flows_created: AtomicU64,
    /// Flows this queue pair's worker expired (idle past their timeout).
    pub flows_expired: AtomicU64,
    /// Frames forwarded without flow tracking: the table was full (or a
    /// stripe lock could not be had in time).
    pub flow_untracked_frames: AtomicU64,
    /// Frames with no flow key (not IP, truncated or malformed headers).
    pub flow_unparsed_frames: AtomicU64,
    /// Frames seen on this queue pair whose flow was owned by another one
    /// (flow affinity misses; counted per burst, see flow_cache.rs).
    pub flow_affinity_misses: AtomicU64,
}

impl QueueStats {
    /// Add `n` to a counter. Single writer per counter: a relaxed
    /// load + store would do, but `fetch_add` keeps it obviously right.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Read a counter.
    #[inline]
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// The published worker state.
    pub fn worker_state(&self) -> Option<WorkerState> {
        WorkerState::from_u32(self.state.load(Ordering::Acquire))
    }

    /// Publish a worker state.
    pub fn set_worker_state(&self, s: WorkerState) {
        self.state.store(s as u32, Ordering::Release);
    }
}

const _: () = assert!(std::mem::size_of::<RegionHeader>() == 192);
const _: () = assert!(std::mem::offset_of!(RegionHeader, flow) == 64);
const _: () = assert!(std::mem::offset_of!(RegionHeader, flow_counters) == 128);
const _: () = assert!(std::mem::size_of::<FlowGeometryHeader>() == 64);
const _: () = assert!(std::mem::size_of::<FlowCounters>() == 64);
const _: () = assert!(std::mem::size_of::<QueueStats>() == 192);
const _: () = assert!(std::mem::size_of::<QueueStats>().is_multiple_of(64));
const _: () = assert!(std::mem::align_of::<QueueStats>() == 64);
