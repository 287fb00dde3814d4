//! Flow tracking on the packet path: the head of every frame moved is
//! copied out of guest memory (at most [`FLOW_HEADROOM`] bytes after the
//! virtio-net header) into the per-worker [`FlowCache`], which turns a burst
//! into one locked update per distinct flow of the shared flow table. The
//! cache is flushed once per TX or RX run (a run handles at most 256 frames,
//! and the cache holds 256 flows, so a run never overflows it), and this
//! queue pair's idle flows are expired a few stripes at a time every 100 ms.
//! A frame whose flow cannot be recorded (table full, stripe busy) is
//! forwarded anyway and counted as untracked.

use qpnet_shared::{Direction, FlowCache, FlowTimeouts, FLOW_HEADROOM};

use crate::counters::StatsHome;
use qpnet_shared::monotonic_ns;

const EXPIRY_INTERVAL_NS: u64 = 100_000_000;
const EXPIRY_STRIPES_PER_PASS: usize = 16;

/// The flow tracking of one worker (disabled: every call is a no-op).
pub struct FlowTracker {
    cache: Option<FlowCache>,
    head: [u8; FLOW_HEADROOM],
    next_expiry_ns: u64,
    timeouts: FlowTimeouts,
}

impl FlowTracker {
    /// Tracking for `queue_pair`, on or off.
    pub fn new(queue_pair: u16, enabled: bool) -> FlowTracker {
        FlowTracker {
            cache: enabled.then(|| FlowCache::new(usize::from(queue_pair))),
            head: [0; FLOW_HEADROOM],
            next_expiry_ns: 0,
            timeouts: FlowTimeouts::default(),
        }
    }

    /// Tracking turned off.
    #[cfg(test)]
    pub fn disabled() -> FlowTracker {
        FlowTracker::new(0, false)
    }

    /// Turn tracking on or off (as the primary says).
    pub fn set_enabled(&mut self, queue_pair: u16, enabled: bool) {
        if enabled != self.cache.is_some() {
            *self = FlowTracker::new(queue_pair, enabled);
        }
    }

    /// Note one frame of `frame_len` bytes (virtio-net header excluded) going
    /// `direction`. `copy_head` copies the frame's first bytes into the
    /// buffer it is given and returns how many it copied; it is called only
    /// while tracking is on.
    #[inline]
    pub fn note(
        &mut self,
        direction: Direction,
        frame_len: u64,
        copy_head: impl FnOnce(&mut [u8]) -> usize,
    ) {
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let want = usize::try_from(frame_len).map_or(FLOW_HEADROOM, |l| l.min(FLOW_HEADROOM));
        let got = copy_head(&mut self.head[..want]).min(want);
        cache.note_frame(&self.head[..got], frame_len, direction);
    }

    /// Write the burst to the shared table (or forget it before the region
    /// arrives) and expire idle flows when it is time.
    pub fn flush(&mut self, home: &StatsHome) {
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let Some(table) = home.flow_table() else {
            cache.discard();
            return;
        };
        let now = monotonic_ns();
        // Frames with no flow key are counted even in a burst with no flow.
        if cache.has_pending() {
            cache.flush(&table, now).add_to(home.stats());
        }
        if now >= self.next_expiry_ns {
            self.next_expiry_ns = now + EXPIRY_INTERVAL_NS;
            cache
                .expire_idle(&table, now, &self.timeouts, EXPIRY_STRIPES_PER_PASS)
                .add_expired_to(home.stats());
        }
    }
}
