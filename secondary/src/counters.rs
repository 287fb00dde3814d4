//! Counters of this queue pair: counted locally, published once per batch.
//!
//! The packet path bumps plain integers in [`LocalCounters`]; once per loop
//! turn they are added to the published [`QueueStats`] atomics, so no frame
//! pays for an atomic operation. Until the primary sends the shared region,
//! the counters go to a private block that nobody reads.

use std::sync::atomic::{AtomicU64, Ordering};

use qpnet_shared::{QueueStats, SharedRegion};

/// Counts not yet published. Field meanings are those of [`QueueStats`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct LocalCounters {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub drop_too_large: u64,
    pub drop_bad_descriptor: u64,
    pub drop_runt: u64,
    pub drop_tap_error: u64,
    pub rx_no_buffer: u64,
    pub tx_kicks: u64,
    pub rx_kicks: u64,
    pub interrupts: u64,
    pub batches: u64,
}

impl LocalCounters {
    /// Add every nonzero count to `stats` and reset it.
    pub fn publish(&mut self, stats: &QueueStats) {
        let pairs: [(&mut u64, &AtomicU64); 13] = [
            (&mut self.tx_frames, &stats.tx_frames),
            (&mut self.tx_bytes, &stats.tx_bytes),
            (&mut self.rx_frames, &stats.rx_frames),
            (&mut self.rx_bytes, &stats.rx_bytes),
            (&mut self.drop_too_large, &stats.drop_too_large),
            (&mut self.drop_bad_descriptor, &stats.drop_bad_descriptor),
            (&mut self.drop_runt, &stats.drop_runt),
            (&mut self.drop_tap_error, &stats.drop_tap_error),
            (&mut self.rx_no_buffer, &stats.rx_no_buffer),
            (&mut self.tx_kicks, &stats.tx_kicks),
            (&mut self.rx_kicks, &stats.rx_kicks),
            (&mut self.interrupts, &stats.interrupts),
            (&mut self.batches, &stats.batches),
        ];
        for (local, shared) in pairs {
            if *local != 0 {
                QueueStats::add(shared, *local);
                *local = 0;
            }
        }
    }
}

/// Where this queue pair's counters live: the shared region once the
/// primary sent it, a private block before.
pub struct StatsHome {
    private: Box<QueueStats>,
    shared: Option<(SharedRegion, usize)>,
}

impl StatsHome {
    /// Counters in a private block.
    pub fn private() -> StatsHome {
        StatsHome {
            private: Box::default(),
            shared: None,
        }
    }

    /// Publish into `region` from now on, refusing a region without a block
    /// for `queue_pair`.
    pub fn use_shared(&mut self, region: SharedRegion, queue_pair: usize) -> Result<(), String> {
        if region.queue(queue_pair).is_none() {
            return Err(format!(
                "shared region has {} queue pairs, none for queue pair {queue_pair}",
                region.queue_pairs()
            ));
        }
        self.shared = Some((region, queue_pair));
        Ok(())
    }

    /// The counters block.
    pub fn stats(&self) -> &QueueStats {
        self.shared
            .as_ref()
            .and_then(|(region, qp)| region.queue(*qp))
            .unwrap_or(&self.private)
    }

    /// The shared flow table, once the region is attached.
    pub fn flow_table(&self) -> Option<qpnet_shared::FlowTable<'_>> {
        self.shared
            .as_ref()
            .and_then(|(region, _)| region.flow_table())
    }

    /// Publish the heartbeat: CLOCK_MONOTONIC nanoseconds.
    pub fn beat(&self) {
        self.stats()
            .heartbeat_ns
            .store(monotonic_ns(), Ordering::Relaxed);
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the clock the primary's watchdog reads).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_adds_and_resets() {
        let home = StatsHome::private();
        let mut c = LocalCounters {
            tx_frames: 3,
            rx_no_buffer: 1,
            ..Default::default()
        };
        c.publish(home.stats());
        c.tx_frames = 2;
        c.publish(home.stats());
        assert_eq!(QueueStats::get(&home.stats().tx_frames), 5);
        assert_eq!(QueueStats::get(&home.stats().rx_no_buffer), 1);
        assert_eq!(c, LocalCounters::default());
        home.beat();
        assert!(QueueStats::get(&home.stats().heartbeat_ns) > 0);
    }
}
