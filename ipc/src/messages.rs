//! The messages that cross a worker's control socket.
//!
//! Plain data only: the primary has already validated and translated
//! everything (ring addresses are guest-physical, sizes are checked), but the
//! worker still treats guest memory itself as hostile.

use serde::{Deserialize, Serialize};

/// Version of this protocol; bumped on any incompatible change of the types
/// below. Checked by both sides in the hello exchange.
pub const PROTOCOL_VERSION: u32 = 5;

/// The fd number at which a worker finds its control socket after `exec`.
pub const WORKER_CONTROL_FD: i32 = 3;

/// What a queue pair's frame I/O fd is. The one fact the worker needs about
/// the host side: whether each frame on it carries the virtio-net header.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameIoKind {
    /// A TAP queue with IFF_VNET_HDR: one read or write is one frame with
    /// the virtio-net header in front (the primary sets its length).
    Tap,
    /// A connected datagram socket (UDP or unix `SOCK_DGRAM`): one datagram
    /// is one Ethernet frame and carries no header, as with QEMU's
    /// `-netdev dgram`.
    Datagram,
    /// A connected stream socket (TCP or unix `SOCK_STREAM`): each Ethernet
    /// frame is prefixed by its length as a 4-byte big-endian integer and
    /// carries no header, as with QEMU's `-netdev stream` and passt.
    Stream,
}

impl FrameIoKind {
    /// Whether frames on the fd carry the virtio-net header.
    pub fn carries_vnet_header(self) -> bool {
        matches!(self, FrameIoKind::Tap)
    }

    /// A short name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            FrameIoKind::Tap => "TAP queue",
            FrameIoKind::Datagram => "datagram socket",
            FrameIoKind::Stream => "stream socket",
        }
    }
}

/// Which of the two virtqueues of a queue pair a message is about.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RingKind {
    /// The receive queue (TAP -> guest); vring index `2 * queue_pair`.
    Rx,
    /// The transmit queue (guest -> TAP); vring index `2 * queue_pair + 1`.
    Tx,
}

impl RingKind {
    /// The ring kind of a vhost-user vring index (even: RX, odd: TX).
    pub fn of_vring(index: u32) -> RingKind {
        if index & 1 == 0 {
            RingKind::Rx
        } else {
            RingKind::Tx
        }
    }
}

/// One region of guest memory. Its fd is sent beside the
/// [`Request::SetMemTable`] message, in the same order as the regions.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Guest-physical address of the first byte of the region.
    pub guest_phys_addr: u64,
    /// Length of the region in bytes.
    pub size: u64,
    /// Offset of the region's first byte in its fd.
    pub mmap_offset: u64,
}

/// Everything a worker needs to run one virtqueue. Its eventfds are sent
/// beside the message in this order: kick, then call when `has_call`, then
/// error when `has_err` ([`RingConfig::fd_names`]).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    /// RX or TX.
    pub kind: RingKind,
    /// Number of descriptors (a power of two, 1..=32768).
    pub size: u16,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used ring.
    pub used_ring: u64,
    /// Index of the next available entry to process (the vring base).
    pub next_avail: u16,
    /// Whether a call eventfd follows the kick eventfd.
    pub has_call: bool,
    /// Whether an error eventfd (SET_VRING_ERR) comes last: the worker
    /// writes it when it stops the ring because the guest made it unusable.
    pub has_err: bool,
    /// Signal the call eventfd once right after start (so a guest never waits
    /// on an interrupt lost when a previous worker died).
    pub signal_on_start: bool,
}

/// A request from the primary to a worker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// First message on a new control socket.
    Hello {
        /// The primary's [`PROTOCOL_VERSION`].
        version: u32,
        /// The queue pair this worker serves.
        queue_pair: u16,
    },
    /// The virtio features the driver acknowledged (decide header size,
    /// mergeable buffers, event index).
    SetFeatures {
        /// Acknowledged virtio feature bits.
        features: u64,
        /// Largest frame (without the virtio-net header) the TAP can deliver:
        /// from its MTU, or 65535 + 14 when the guest accepts GSO frames.
        /// Decides how many mergeable RX buffers a frame may need.
        max_rx_frame: u32,
        /// Length of the virtio-net header on the rings and the TAP (10 or 12).
        header_len: u32,
    },
    /// Replace the guest memory map. One fd per region follows. The primary
    /// stops the rings first; a worker that gets it with rings running keeps
    /// their indexes and re-checks them against the new map. An empty list
    /// unmaps guest memory (the VMM went away).
    SetMemTable {
        /// The regions, in the order of their fds.
        regions: Vec<MemoryRegion>,
    },
    /// The frame I/O fd of this queue pair follows: a TAP queue or a
    /// datagram socket, as `kind` says.
    AttachFrameIo {
        /// What the fd is, and so whether frames on it carry the virtio-net
        /// header.
        kind: FrameIoKind,
    },
    /// The shared region's fd follows (counters, heartbeat, flow table).
    AttachShared {
        /// Record every frame's flow in the region's flow table.
        flow_tracking: bool,
    },
    /// Start processing one ring. Its kick (call, error) eventfds follow.
    StartRing(RingConfig),
    /// Stop processing one ring; the reply is [`Reply::RingStopped`].
    StopRing {
        /// Which ring to stop.
        kind: RingKind,
    },
    /// Stop everything and exit.
    Shutdown,
}

/// A worker's answer to one [`Request`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Answer to [`Request::Hello`].
    Hello {
        /// The worker's [`PROTOCOL_VERSION`].
        version: u32,
        /// The worker's process id.
        pid: u32,
    },
    /// The request was carried out.
    Ok,
    /// Answer to [`Request::StopRing`]: the ring is stopped and every chain
    /// before `next_avail` is completed in the used ring.
    RingStopped {
        /// The index of the next available entry the worker would have
        /// processed (the value for GET_VRING_BASE).
        next_avail: u16,
    },
    /// The request was refused; the worker keeps running.
    Error {
        /// Why, for the primary's log and the VMM's error reply.
        message: String,
    },
}
