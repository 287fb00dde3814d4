//! The qpnet shared-memory region.
//!
//! One region per qpnet instance, created by the primary as a file on the
//! runtime directory's tmpfs (so `qpnet stats` can map it read-only) and
//! handed to every worker as an fd. It holds a versioned header, one
//! cache-line aligned block of counters per queue pair, and the flow table.
//! Every counter is an atomic written by exactly one process (the queue
//! pair's worker, or the primary for supervision fields), so no lock is ever
//! taken to update or to read it. The flow table is changed under striped
//! robust mutexes that survive a holder killed at any instant, and read
//! without locks (see flow/mod.rs, "Theory of operation").
#![deny(missing_docs)]

mod clock;
mod flow;
mod layout;
mod queue_stats;
mod region;
mod robust_mutex;
pub mod stream_sync;
pub mod test_hooks;

pub use clock::monotonic_ns;
pub use flow::{
    fuzz_flow_key, hash_words, protocol, tcp_flags, AuditReport, Direction, Family, FlowCache,
    FlowError, FlowIter, FlowKey, FlowReader, FlowSnapshot, FlowState, FlowTable,
    FlowTableCounters, FlowTimeouts, FlowUpdate, FlushReport, ParseError, ParsedFrame, Recorded,
    SlotBusy, SlotRef, SweepReport, DEFAULT_FLOW_CAPACITY, DEFAULT_LOCK_WAIT, FLOW_HEADROOM,
    KEY_WORDS, MAX_FLOW_CAPACITY, MAX_PENDING_FLOWS, MIN_FLOW_CAPACITY, SLOTS_PER_STRIPE,
};
pub use layout::{
    FlowCounters, FlowGeometryHeader, QueueStats, RegionHeader, WorkerState, LAYOUT_VERSION, MAGIC,
    MAX_QUEUE_PAIRS, TRACKING_OFF, TRACKING_ON,
};
pub use queue_stats::{CounterId, CounterInfo, LocalCounters, QUEUE_COUNTERS};
pub use region::{RegionError, SharedRegion};
pub use robust_mutex::{LockError, LockWait};
