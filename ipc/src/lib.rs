//! The control protocol between the qpnet primary and its workers.
//!
//! Every worker (one per queue pair) is connected to the primary by one
//! `SOCK_SEQPACKET` socket. The primary sends [`Request`]s, the worker answers
//! each with exactly one [`Reply`]. Messages are serde types encoded with
//! bincode 2; file descriptors (guest memory, eventfds, the TAP queue, the
//! shared region) travel beside them as `SCM_RIGHTS`, received with
//! `MSG_CMSG_CLOEXEC` so they never leak into a later `exec`.
//!
//! The first exchange is [`Request::Hello`] / [`Reply::Hello`], which checks
//! [`PROTOCOL_VERSION`] on both sides.
//!
//! Facts both sides must agree on are defined here once: how many fds each
//! request carries and what kind they are ([`Request::check_fds`],
//! [`check_eventfd`], [`check_anon_inode`]), and the rules of a memory table
//! ([`memory_table::validate_table`]).
#![deny(missing_docs)]

mod channel;
mod fds;
pub mod memory_table;
mod messages;

pub use channel::{
    decode_message, encode_message, fuzz_ipc_decode, Channel, IpcError, MAX_FDS, MAX_MESSAGE_SIZE,
};
pub use fds::{check_anon_inode, check_eventfd, FdError, RingFds};
pub use memory_table::MemoryTableError;
pub use messages::{
    FrameIoKind, MemoryRegion, Reply, Request, RingConfig, RingKind, PROTOCOL_VERSION,
    WORKER_CONTROL_FD,
};
