//! One queue pair's block in the shared region, and the one declaration of
//! its counters.
//!
//! Every per-queue counter is named once, in the [`queue_stats!`] invocation
//! below, with its help text. From that list the macro makes:
//! - [`QueueStats`], the `#[repr(C)]` block in shared memory (fields in the
//!   order listed; its size and alignment are asserted at compile time, so a
//!   new counter that breaks the layout fails the build, not an attach);
//! - [`LocalCounters`], the worker's plain-integer copy of the packet
//!   counters, added to the atomics once per loop turn
//!   ([`LocalCounters::publish`]), so no frame pays for an atomic;
//! - [`QUEUE_COUNTERS`] and [`CounterId`], what `qpnet stats` prints (names,
//!   help texts, where each value lives), in layout order.
//!
//! Packet counters are written by the queue pair's worker, supervision fields
//! by the primary (but `stream_sync`, the worker's while it runs), flow counters by the worker's flow tracker; each counter
//! has exactly one writing process, so none needs a lock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A per-queue counter as `qpnet stats` shows it.
#[derive(Debug, Clone, Copy)]
pub struct CounterInfo {
    /// Name: JSON key, Prometheus metric stem, table column source.
    pub name: &'static str,
    /// One line saying what it counts.
    pub help: &'static str,
    /// Where it lives in a [`QueueStats`].
    pub field: fn(&QueueStats) -> &AtomicU64,
}

impl CounterInfo {
    /// Whether it counts dropped frames (its name starts with `drop_`).
    pub fn is_drop(&self) -> bool {
        self.name.starts_with("drop_")
    }
}

macro_rules! queue_stats {
    (
        packet { $($p:ident: $phelp:literal,)* }
        supervision { $($(#[doc = $sdoc:literal])* $s:ident: $sty:ty,)* }
        flow { $($f:ident: $fhelp:literal,)* }
    ) => {
        /// The counters and status of one queue pair (see the module doc for
        /// who writes what).
        #[repr(C, align(64))]
        #[derive(Debug, Default)]
        pub struct QueueStats {
            $(#[doc = $phelp] pub $p: AtomicU64,)*
            $($(#[doc = $sdoc])* pub $s: $sty,)*
            $(#[doc = $fhelp] pub $f: AtomicU64,)*
        }

        /// The packet counters of [`QueueStats`], counted locally by a
        /// worker and published once per loop turn.
        #[derive(Debug, Default, Clone, PartialEq, Eq)]
        pub struct LocalCounters {
            $(#[doc = $phelp] pub $p: u64,)*
        }

        impl LocalCounters {
            /// Add every nonzero count to `stats` and reset it.
            pub fn publish(&mut self, stats: &QueueStats) {
                $(if self.$p != 0 {
                    QueueStats::add(&stats.$p, self.$p);
                    self.$p = 0;
                })*
            }
        }

        /// Every counter of [`QUEUE_COUNTERS`], by name: `CounterId::x as
        /// usize` is the position of counter `x`.
        #[allow(non_camel_case_types, missing_docs)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum CounterId {
            $($p,)*
            $($f,)*
        }

        /// The per-queue counters `qpnet stats` prints, in layout order.
        pub const QUEUE_COUNTERS: [CounterInfo; [$(stringify!($p),)* $(stringify!($f),)*].len()] = [
            $(CounterInfo { name: stringify!($p), help: $phelp, field: |q| &q.$p },)*
            $(CounterInfo { name: stringify!($f), help: $fhelp, field: |q| &q.$f },)*
        ];
    };
}

queue_stats! {
    packet {
        tx_frames: "Frames taken from the TX ring and written to the TAP or socket.",
        tx_bytes: "Bytes of TX frames (without the virtio-net header).",
        rx_frames: "Frames read from the TAP or socket and put in the RX ring.",
        rx_bytes: "Bytes of RX frames (without the virtio-net header).",
        drop_too_large: "RX frames (or datagrams) dropped: larger than the guest's buffers.",
        drop_bad_descriptor: "Chains refused because a descriptor was invalid (out of guest memory, looping, wrong direction, too long).",
        drop_runt: "TX chains shorter than the virtio-net header.",
        drop_tap_error: "Frames the TAP or socket refused on write, or reads of it that failed.",
        drop_hdr_flags: "TX frames dropped: virtio-net header flags not allowed (unknown bits, or NEEDS_CSUM without checksum offload).",
        drop_hdr_gso: "TX frames dropped: a GSO type that is unknown or was not negotiated.",
        drop_hdr_gso_size: "TX frames dropped: a GSO type with gso_size 0.",
        drop_hdr_len: "TX frames dropped: the header's hdr_len points past the end of the frame.",
        drop_hdr_csum: "TX frames dropped: the partial checksum lies past the end of the frame.",
        rx_no_buffer: "Times the TAP had frames while the RX ring had no buffer.",
        tx_kicks: "Kicks received on the TX ring.",
        rx_kicks: "Kicks received on the RX ring.",
        interrupts: "Interrupts sent to the guest.",
        batches: "Wake-ups that moved at least one frame.",
        ring_faults: "Rings stopped because the guest made them unusable (also signalled on the ring's SET_VRING_ERR eventfd).",
        drop_rx_short: "RX frames dropped: empty or shorter than an Ethernet header (a socket peer's datagram of 0 to 13 bytes).",
        drop_peer_refused: "TX frames dropped: the socket refused them as too large for the peer (EMSGSIZE).",
        peer_unreachable: "Times the socket's peer was not there (ECONNREFUSED, ENOENT, ENOTCONN, a closed stream); a TX frame is dropped, RX goes on.",
        drop_stream_framing: "Times a stream peer sent a length prefix of 0 or above 65,535: the connection is reset (and made again).",
    }
    supervision {
        /// Worker heartbeat: CLOCK_MONOTONIC nanoseconds of its last loop turn.
        heartbeat_ns: AtomicU64,
        /// Times the worker of this queue pair was (re)started after the first.
        restarts: AtomicU64,
        /// The worker's process id (0 when none).
        pid: AtomicU32,
        /// A [`crate::WorkerState`] value.
        state: AtomicU32,
        /// Stream backends only, written by the worker: nonzero while the
        /// connection may not be at a frame boundary (a write of a frame may
        /// be under way or only partly done, or part of a received frame is
        /// held), see [`crate::stream_sync`]. The primary reads it when the
        /// worker died, to hand the connection over or reset it.
        stream_sync: AtomicU32,
    }
    flow {
        flows_created: "Flows this queue pair's worker created in the flow table.",
        flows_expired: "Flows this queue pair's worker expired.",
        flow_untracked_frames: "Frames forwarded without flow tracking (table full or busy).",
        flow_unparsed_frames: "Frames with no flow key (not IP, or malformed headers).",
        flow_affinity_misses: "Frames seen on this queue pair whose flow another queue pair owns.",
    }
}

impl QueueStats {
    /// Add `n` to a counter. Single writer per counter: a relaxed
    /// load + store would do, but `fetch_add` keeps it obviously right.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Read a counter.
    #[inline]
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// The published worker state.
    pub fn worker_state(&self) -> Option<crate::WorkerState> {
        crate::WorkerState::from_u32(self.state.load(Ordering::Acquire))
    }

    /// Publish a worker state.
    pub fn set_worker_state(&self, s: crate::WorkerState) {
        self.state.store(s as u32, Ordering::Release);
    }
}

// The layout every process of an instance agrees on (LAYOUT_VERSION 6).
const _: () = assert!(std::mem::size_of::<QueueStats>() == 256);
const _: () = assert!(std::mem::size_of::<QueueStats>().is_multiple_of(64));
const _: () = assert!(std::mem::align_of::<QueueStats>() == 64);
const _: () = assert!(std::mem::offset_of!(QueueStats, heartbeat_ns) == 23 * 8);
const _: () = assert!(std::mem::offset_of!(QueueStats, stream_sync) == 23 * 8 + 24);
const _: () = assert!(std::mem::offset_of!(QueueStats, flows_created) == 27 * 8);
const _: () = assert!(QUEUE_COUNTERS.len() == 28);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_follows_the_layout_and_names_its_fields() {
        let q = QueueStats::default();
        for (i, c) in QUEUE_COUNTERS.iter().enumerate() {
            (c.field)(&q).store(i as u64 + 1, Ordering::Relaxed);
        }
        assert_eq!(QueueStats::get(&q.tx_frames), 1);
        assert_eq!(QueueStats::get(&q.flow_affinity_misses), 28);
        assert_eq!(
            QUEUE_COUNTERS[CounterId::flows_expired as usize].name,
            "flows_expired"
        );
        let drops: Vec<&str> = QUEUE_COUNTERS
            .iter()
            .filter(|c| c.is_drop())
            .map(|c| c.name)
            .collect();
        assert_eq!(
            drops,
            [
                "drop_too_large",
                "drop_bad_descriptor",
                "drop_runt",
                "drop_tap_error",
                "drop_hdr_flags",
                "drop_hdr_gso",
                "drop_hdr_gso_size",
                "drop_hdr_len",
                "drop_hdr_csum",
                "drop_rx_short",
                "drop_peer_refused",
                "drop_stream_framing"
            ]
        );
    }

    #[test]
    fn local_counters_publish_and_reset() {
        let q = QueueStats::default();
        let mut c = LocalCounters {
            tx_frames: 3,
            batches: 1,
            ..LocalCounters::default()
        };
        c.publish(&q);
        c.publish(&q);
        assert_eq!(QueueStats::get(&q.tx_frames), 3);
        assert_eq!(QueueStats::get(&q.batches), 1);
        assert_eq!(c, LocalCounters::default());
    }
}
