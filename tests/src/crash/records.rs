//! What a load run ([`super::run_load`]) saw: when each TX frame was
//! published and when it arrived on the TAP, when each RX frame was sent and
//! where it arrived in the guest, and every ring's final indices (for the
//! descriptor-leak check).

use super::cpu_wait::CpuWaits;

/// One TX frame's arrival on the TAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// Its sequence number on its queue.
    pub seq: u32,
    /// Kernel receive time (realtime ns).
    pub at_ns: u64,
}

/// One RX frame's arrival in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxArrival {
    /// Its sequence number.
    pub seq: u32,
    /// Its flow.
    pub flow: u16,
    /// The RX queue (queue pair) it came through.
    pub queue: u16,
    /// When the driver reaped it (realtime ns).
    pub at_ns: u64,
}

/// A ring's indices after the load drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingEnd {
    /// The vring index.
    pub vring: u32,
    /// Ring size.
    pub size: u16,
    /// The driver's avail index.
    pub avail: u16,
    /// The device's used index, in guest memory.
    pub used: u16,
    /// Where the driver stopped reading used entries.
    pub last_used: u16,
}

impl RingEnd {
    /// The descriptor-leak check: every chain is either used and reaped, or
    /// (RX) still available to the device; nothing is stuck in between.
    pub fn leak(&self) -> Option<String> {
        let is_tx = self.vring % 2 == 1;
        let outstanding = self.avail.wrapping_sub(self.used);
        let ok = self.used == self.last_used
            && if is_tx {
                outstanding == 0
            } else {
                outstanding == self.size
            };
        (!ok).then(|| {
            format!(
                "vring {} ({}): avail {} used {} reaped {}: {}",
                self.vring,
                if is_tx { "TX" } else { "RX" },
                self.avail,
                self.used,
                self.last_used,
                if is_tx {
                    "chains made available were never used"
                } else {
                    "not every RX buffer is back with the device"
                }
            )
        })
    }
}

/// Everything a load run saw.
#[derive(Debug, Default)]
pub struct Records {
    /// Queue pairs.
    pub queues: usize,
    /// `[queue][seq]`: when each TX frame was published.
    pub pushed_at: Vec<Vec<u64>>,
    /// `[queue]`: TX arrivals on the TAP, in arrival order.
    pub tx_arrivals: Vec<Vec<Arrival>>,
    /// TX frames that failed byte-for-byte verification.
    pub tx_corrupt: Vec<String>,
    /// `[seq]`: when each RX frame was sent into the TAP.
    pub rx_sent_at: Vec<u64>,
    /// RX flows used.
    pub rx_flows: u16,
    /// RX test frames received.
    pub rx_arrivals: Vec<RxArrival>,
    /// RX frames that failed verification (or had a dirty header).
    pub rx_corrupt: Vec<String>,
    /// Frames in the RX rings that were not this run's test frames.
    pub rx_foreign: u64,
    /// Every ring's final indices.
    pub rings: Vec<RingEnd>,
    /// Times the driver found an RX used index inside a frame (must be 0).
    pub rx_used_index_inside_frame: u64,
    /// RX test frames that spanned more than one buffer.
    pub rx_multi_buffer: u64,
    /// The workers' and the driver's CPU waits over the run (empty when
    /// not sampled).
    pub cpu: CpuWaits,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaks_are_named() {
        let tx = RingEnd {
            vring: 1,
            size: 256,
            avail: 10,
            used: 10,
            last_used: 10,
        };
        assert!(tx.leak().is_none());
        assert!(RingEnd { used: 9, ..tx }.leak().is_some());
        let rx = RingEnd {
            vring: 0,
            size: 256,
            avail: 266,
            used: 10,
            last_used: 10,
        };
        assert!(rx.leak().is_none());
        assert!(RingEnd { avail: 265, ..rx }.leak().is_some());
    }
}
