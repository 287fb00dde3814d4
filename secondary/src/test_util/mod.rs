//! The project's test kit for the guest side of a virtio-net device: guest
//! memory and a split-ring driver, compiled for this crate's tests and, with
//! the `test-utils` feature, for other crates' (rust-vmm style); production
//! builds never see it.
//!
//! - [`GuestMemory`]: memfd-backed regions at any guest-physical addresses,
//!   with what a worker (`SetMemTable`: [`GuestMemory::memory_table`],
//!   [`GuestMemory::fds`]) or a VMM (per region: [`GuestRegion::vmm_addr`],
//!   [`GuestRegion::file`], [`GuestRegion::table_entry`]) needs, byte and
//!   ring-field accessors, and [`GuestMemory::map`], the worker's own map of
//!   the same pages. [`BumpAllocator`] places rings and buffers in a region.
//! - [`RingDriver`]: one split virtqueue driven as a guest would (chains made
//!   available, used entries read, kicks, interrupts, event-index fields),
//!   plus the raw calls hostile-input tests need; [`RingLayout`] places it,
//!   and a [`RingProbe`] reads its indices from another thread.
//! - [`TestMemory`]: both sides at once, for tests of the packet path;
//!   [`Peer`] and [`dgram_fds`]: a datagram socketpair standing in for the
//!   TAP.
//!
//! The standard layout ([`TestMemory::new`], [`GuestMemory::standard`]) is two
//! adjacent 2 MiB regions at 4 GiB, so nothing passes by assuming memory
//! starts at 0, and buffers can straddle two regions.

mod driver;
mod memory;
mod peer;

pub use driver::{
    desc, Desc, RingDriver, RingLayout, RingProbe, UsedElem, DESC_SIZE, F_INDIRECT, F_NEXT, F_WRITE,
};
pub use memory::{
    BumpAllocator, GuestMemory, GuestRegion, RegionLayout, TestMemory, BUF_BASE, MEM_BASE,
    REGION_SIZE, SECOND_RING,
};
pub use peer::{dgram_fds, Peer};

use std::time::{Duration, Instant};

/// Poll `cond` every millisecond for up to five seconds.
///
/// # Panics
/// When it is still false then, naming `what`.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Serve queue pair `queue_pair` on `control` as [`crate::run_worker`]
/// does, but without its sandbox (which needs a process of its own: a
/// user namespace cannot be entered by a thread of a threaded process), so
/// a test may run the worker as one of its threads.
pub fn serve_worker(queue_pair: u16, control: std::os::fd::OwnedFd) -> anyhow::Result<()> {
    crate::worker::serve(queue_pair, control)
}

#[cfg(test)]
pub(crate) use internal::dgram_pair;

#[cfg(test)]
mod internal {
    //! Fixtures on this crate's private types, for its own unit tests.

    use super::{dgram_fds, Peer, RingDriver, TestMemory};
    use crate::ring::Ring;
    use crate::tap::Tap;
    use qpnet_ipc::RingKind;

    impl RingDriver {
        /// Start a worker-side [`Ring`] on this ring, in `m`'s map.
        pub(crate) fn start(&self, m: &TestMemory, event_idx: bool) -> Ring {
            Ring::start(&self.config(RingKind::Tx), event_idx, self.fds(), &m.map)
                .expect("ring start")
        }
    }

    /// A TAP stand-in and its peer.
    pub(crate) fn dgram_pair() -> (Tap, Peer) {
        let (a, b) = dgram_fds();
        (Tap::attach(a).expect("tap attach"), Peer::new(b))
    }
}

#[cfg(test)]
mod tests;
