//! Counters of this queue pair: counted locally, published once per batch.
//!
//! The packet path bumps plain integers in [`LocalCounters`]; once per loop
//! turn they are added to the published [`QueueStats`] atomics, so no frame
//! pays for an atomic operation. Until the primary sends the shared region,
//! the counters go to a private block that nobody reads. [`Tally`] counts
//! refusals for the log, which names only the 1st, 2nd, 4th, 8th... of a
//! kind, so a guest sending garbage at line rate cannot flood it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use qpnet_shared::{monotonic_ns, QueueStats, SharedRegion};

use crate::stream::SyncWord;

pub use qpnet_shared::LocalCounters;

/// Where this queue pair's counters live: the shared region once the
/// primary sent it, a private block before.
pub struct StatsHome {
    private: Box<QueueStats>,
    shared: Option<(Arc<SharedRegion>, usize)>,
    /// The stream framing word while no region is attached.
    private_sync: Arc<std::sync::atomic::AtomicU32>,
}

impl StatsHome {
    /// Counters in a private block.
    pub fn private() -> StatsHome {
        StatsHome {
            private: Box::default(),
            shared: None,
            private_sync: Arc::default(),
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
        self.shared = Some((Arc::new(region), queue_pair));
        Ok(())
    }

    /// Where a stream frame I/O publishes its framing state: the queue
    /// pair's `stream_sync` in the region once it is attached.
    pub fn sync_word(&self) -> SyncWord {
        match &self.shared {
            Some((region, qp)) => SyncWord::Shared(Arc::clone(region), *qp),
            None => SyncWord::Private(Arc::clone(&self.private_sync)),
        }
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

/// How often one kind of refusal happened, for rate-limited logging.
#[derive(Debug, Default)]
pub struct Tally(u64);

impl Tally {
    /// Count one more; `Some(total so far)` when this one should be logged
    /// (the total is a power of two).
    pub fn note(&mut self) -> Option<u64> {
        self.0 += 1;
        self.0.is_power_of_two().then_some(self.0)
    }
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

    #[test]
    fn tally_logs_powers_of_two() {
        let mut t = Tally::default();
        let logged: Vec<u64> = (0..20).filter_map(|_| t.note()).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16]);
    }
}
