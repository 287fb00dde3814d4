//! The qpnet worker: one process per queue pair, moving frames between the
//! guest's two virtqueues of that pair and one frame I/O (a TAP queue).
//!
//! The primary fork+execs `qpnet worker --queue-pair N --control-fd 3` and
//! drives it over a `SOCK_SEQPACKET` control socket (`qpnet_ipc`): guest
//! memory regions, the TAP queue fd, the shared stats region, and the rings
//! with their eventfds arrive there. Everything the guest writes is treated
//! as hostile: a bad descriptor chain is refused, completed and counted; a
//! broken ring is stopped; nothing the guest does may crash the worker.
//!
//! A frame's whole trip is readable here: [`worker`](crate::run_worker)
//! (the epoll loop, `events`) routes control requests to `control` and
//! everything else to the `queue_pair`, whose `tx` (ring -> frame I/O) and
//! `rx` (frame I/O -> ring) queues run through `ring` (virtqueue and
//! notifications), `chain` (descriptor walking), `iovecs` and `guest_memory`
//! (mapping and address translation), `flows` (flow tracking), and
//! `frame_io`, the trait behind which `tap` (a TAP queue) and `datagram`
//! (a UDP or unix datagram socket) sit.
//!
//! With the `test-utils` feature, [`test_util`] is the project's guest memory
//! and split-ring driver for tests of other crates.
#![deny(missing_docs)]

mod chain;
mod control;
mod counters;
mod datagram;
mod events;
mod features;
mod flows;
mod frame_io;
#[cfg(feature = "test-utils")]
#[doc(hidden)]
pub mod fuzz;
mod guest_memory;
mod iovecs;
mod queue;
mod queue_pair;
mod ring;
mod rx;
mod sandbox;
mod stream;
mod tap;
mod test_fault;
mod tx;
pub mod tx_header;
mod worker;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_util;
#[cfg(test)]
mod worker_tests;

pub use guest_memory::{GuestMemoryMap, MemoryError};
pub use sandbox::{enter as enter_sandbox, Files, Sandboxed};
pub use sandbox::{
    keep_only_capabilities, seccomp_kill_unless_allowed, syscall_name, RunAs, SandboxError,
    PRIMARY_CAPABILITIES,
};
pub use worker::run_worker;
