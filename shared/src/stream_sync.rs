//! Whether a stream backend's connection is at a frame boundary: the word
//! ([`crate::QueueStats::stream_sync`]) a worker keeps up to date and the
//! primary reads when that worker died.
//!
//! A stream carries frames back to back, each behind its length; a worker
//! killed after writing half a frame, or after reading half of one, leaves
//! the connection out of step, and the next worker would make the peer read
//! a torn frame as a length prefix. So before anything that can leave the
//! connection between frames the worker sets a bit here, and clears it once
//! the connection is at a boundary again:
//! - [`TX_MAY_BE_PARTIAL`] from before a write of a frame until the write
//!   returned whole (a write cut short keeps it set until the rest is out);
//! - [`RX_PARTIAL`] while part of a received frame is held by the worker
//!   (the peer sent it in pieces).
//!
//! When the worker died with a bit set, the primary resets the connection
//! (the peer sees it close, then a new one, never a torn frame); with none
//! set it hands the same connection to the next worker. A kill that lands
//! inside a write is counted as partial, conservatively.

/// A write of a frame may be under way or cut short.
pub const TX_MAY_BE_PARTIAL: u32 = 1;
/// Part of a received frame is held by the worker.
pub const RX_PARTIAL: u32 = 2;

/// Bytes of a frame's length prefix on a stream (big-endian).
pub const LENGTH_PREFIX: usize = 4;
/// The largest frame a stream carries: QEMU's `-netdev stream` and passt
/// take at most 65,535 bytes (a larger prefix is a framing error).
pub const MAX_STREAM_FRAME: usize = 65_535;

/// Whether `word` says the connection is at a frame boundary.
pub fn at_boundary(word: u32) -> bool {
    word & (TX_MAY_BE_PARTIAL | RX_PARTIAL) == 0
}
