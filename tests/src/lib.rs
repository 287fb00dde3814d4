//! Real-part test helpers for qpnet's integration tests.
//!
//! Everything here drives real kernel objects and real processes: network
//! namespaces and multi-queue TAPs the tests create ([`netns`]), an AF_PACKET
//! socket on the TAP to see what qpnet writes and to inject what it should read
//! ([`tap_io`]), the qpnet binary itself ([`qpnet`]), and a test VMM that speaks
//! vhost-user through the vhost crate's frontend with guest memory in memfds
//! and a small split-virtqueue virtio-net driver ([`vmm`], [`memory`],
//! [`virtq`], [`net_driver`]). Hostile input that the frontend refuses to
//! produce goes through [`raw_vhost`]. [`frames`] builds and checks test frames
//! byte for byte; [`traffic`] moves many of them with flow control and reports
//! what was lost, duplicated or corrupted. [`testbed`] bundles a namespace, a
//! TAP, its socket and a qpnet instance for one test. [`guest`] boots a real
//! Linux guest under QEMU for the guest tests; [`json`] reads `qpnet stats
//! --json`.

pub mod crash_traffic;
pub mod frames;
pub mod guest;
pub mod json;
pub mod memory;
pub mod net_driver;
pub mod netns;
pub mod qpnet;
pub mod raw_vhost;
pub mod tap_io;
pub mod testbed;
pub mod traffic;
pub mod virtq;
pub mod vmm;
pub mod wait;

/// A name unique to this process and call: `qpt-<pid>-<counter>`.
///
/// Used for namespaces, qpnet instance names and temporary directories, so
/// tests of one run (and of concurrent runs) never collide.
pub fn unique_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("qpt-{}-{}", std::process::id(), n)
}
