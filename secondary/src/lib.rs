//! The qpnet worker: one process per queue pair, moving frames between the
//! guest's two virtqueues of that pair and one TAP queue.
//!
//! The primary fork+execs `qpnet worker --queue-pair N --control-fd 3` and
//! drives it over a `SOCK_SEQPACKET` control socket (`qpnet_ipc`): guest
//! memory regions, the TAP queue fd, the shared stats region, and the rings
//! with their eventfds arrive there. Everything the guest writes is treated
//! as hostile: a bad descriptor chain is refused, completed and counted; a
//! broken ring is stopped; nothing the guest does may crash the worker.
//!
//! A frame's whole trip is readable here: [`worker`](crate::run_worker)
//! (epoll loop, control requests) -> `tx` (ring -> TAP) / `rx` (TAP -> ring),
//! through `ring` (virtqueue and notifications), `flows` (flow tracking), `chain` (descriptor
//! walking), `guest_memory` (mapping and address translation), `tap`.
#![deny(missing_docs)]

mod chain;
mod counters;
mod features;
mod flows;
mod guest_memory;
mod iovecs;
mod ring;
mod rx;
mod tap;
mod tx;
mod worker;

#[cfg(test)]
mod test_util;
#[cfg(test)]
mod worker_tests;

pub use guest_memory::{GuestMemoryMap, MemoryError};
pub use worker::run_worker;
