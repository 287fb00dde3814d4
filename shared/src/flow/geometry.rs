//! Where the flow table sits in a region and how large it may be. The
//! primary chooses the geometry at create time and publishes it in the
//! header; every attach validates it against the file before a single
//! stripe or slot is reached (region.rs), so the references
//! [`super::FlowReader`] hands out stay inside the mapping.

use super::slot::SLOT_SIZE;
use super::stripe::{SLOTS_PER_STRIPE, STRIPE_SIZE};

/// Default number of entries.
pub const DEFAULT_FLOW_CAPACITY: usize = 65_536;
/// Smallest table: one stripe.
pub const MIN_FLOW_CAPACITY: usize = SLOTS_PER_STRIPE;
/// Largest table (512 MiB of entries).
pub const MAX_FLOW_CAPACITY: usize = 1 << 22;

/// Where the flow table sits in a region, as validated at create/attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlowGeometry {
    pub(crate) offset: usize,
    pub(crate) capacity: usize,
    pub(crate) stripes: usize,
    pub(crate) seed: [u64; 2],
}

impl FlowGeometry {
    /// Bytes the flow table takes from `offset`.
    pub(crate) fn bytes(capacity: usize) -> usize {
        (capacity / SLOTS_PER_STRIPE) * STRIPE_SIZE + capacity * SLOT_SIZE
    }

    /// Whether `capacity` is an acceptable table size.
    pub(crate) fn capacity_ok(capacity: usize) -> bool {
        capacity.is_power_of_two() && (MIN_FLOW_CAPACITY..=MAX_FLOW_CAPACITY).contains(&capacity)
    }
}
