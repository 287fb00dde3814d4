//! The qpnet integration tests' kit: real parts only.
//!
//! Everything here drives real kernel objects and real processes:
//! - the binary under test ([`binary`]: `$QPNET_BIN`, checked fresh) and a
//!   running instance ([`qpnet`]: started with a clean fd table, stopped
//!   with a check that the shutdown was clean), or one under the
//!   supervisor script ([`supervise`]);
//! - network namespaces and multi-queue TAPs the tests create ([`netns`]),
//!   an AF_PACKET socket on the TAP to see what qpnet writes and to inject
//!   what it should read ([`tap_io`]);
//! - a test VMM that speaks vhost-user through the vhost crate's frontend,
//!   with guest memory in memfds (the secondary's test kit,
//!   `qpnet_secondary::test_util`) and a small split-virtqueue virtio-net
//!   driver on its ring driver ([`vmm`], [`net_driver`]); hostile input
//!   the frontend refuses to produce goes through [`raw_vhost`], and the
//!   hostile-input tests share [`hostile`];
//! - test frames checked byte for byte ([`frames`]) and moved in bulk with
//!   every one accounted for ([`traffic`]: the TX round every test uses);
//!   [`testbed`] bundles a namespace, a TAP, its socket and a qpnet instance
//!   for one test;
//! - processes read from `/proc` safely against pid reuse ([`proc`]), the
//!   one typed reader of `qpnet stats --json` ([`stats_json`]), a checker of
//!   the Prometheus exposition format ([`prometheus`]);
//! - timed load and its analysis for the crash tests ([`crash`]), a real
//!   Linux guest under QEMU for the guest tests ([`guest`]), passt as a
//!   stream-socket peer for it ([`passt`]) and what its `tcphold` step
//!   prints ([`tcp_hold`]), and the lock
//!   that runs timing-sensitive tests one at a time ([`serial`]);
//! - [`wait`]: polling with a deadline instead of sleeping.

pub mod binary;
pub mod crash;
pub mod frames;
pub mod guest;
pub mod hostile;
pub mod net_driver;
pub mod netns;
pub mod passt;
pub mod proc;
pub mod prometheus;
pub mod qpnet;
pub mod raw_vhost;
pub mod serial;
pub mod stats_json;
pub mod stream_bed;
pub mod stream_peer;
pub mod supervise;
pub mod tap_io;
pub mod tcp_hold;
pub mod testbed;
pub mod traffic;
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
