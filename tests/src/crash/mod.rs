//! The crash-isolation tests' kit: continuous, timed traffic while workers
//! are killed or stopped, what it says about each kill, and the crash test
//! bed itself.
//!
//! - [`load`]: [`run_load`] keeps every queue pair of a test VMM busy (TX
//!   frames stamped on arrival by the kernel through a [`StampedTap`], RX
//!   frames injected into the TAP) while the test's closure sends signals;
//! - [`records`]: what the run saw ([`Records`]);
//! - [`analysis`]: [`analyze`] judges each [`KillEvent`] (recovery, the other
//!   queue pairs' stalls, duplicates, losses, leaks);
//! - [`cpu_wait`]: every worker's CPU wait sampled each millisecond, so a
//!   stall is excused only by the machine's share of that very stall;
//! - [`bed`]: the four-queue-pair test bed, its workers found in the stats
//!   region and signalled through pinned handles;
//! - [`verdict`]: the acceptance of every kill ([`check_kills`]) and the
//!   distribution table ([`report`]).
//!
//! All times are CLOCK_REALTIME nanoseconds (the clock of the kernel's
//! socket timestamps), except heartbeats (CLOCK_MONOTONIC, [`monotonic_ns`]).

pub mod analysis;
pub mod bed;
pub mod cpu_wait;
pub mod load;
pub mod records;
pub mod rx_accounting;
pub mod stalls;
pub mod stamped;
pub mod verdict;

pub use analysis::{analyze, Analysis, KillEvent, KillOutcome, BASELINE_NS};
pub use load::{run_load, unwrap_index, LoadConfig, LoadView, RX_TAG};
pub use qpnet_secondary::test_util::RingProbe;
pub use records::{Arrival, Records, RingEnd, RxArrival};
pub use stamped::StampedTap;
pub use verdict::{check_kills, report};

/// CLOCK_MONOTONIC in nanoseconds (the clock of qpnet's heartbeats).
pub use qpnet_shared::monotonic_ns;

/// CLOCK_REALTIME in nanoseconds (the clock of `SO_TIMESTAMPNS`).
pub fn realtime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Median, 99th percentile and maximum of `values` (0s when empty).
pub fn summarize(values: &[u64]) -> (u64, u64, u64) {
    if values.is_empty() {
        return (0, 0, 0);
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

/// Nanoseconds as milliseconds with two decimals.
pub fn ms(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1e6)
}
