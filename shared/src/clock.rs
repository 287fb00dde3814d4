//! The one clock every process of an instance shares: CLOCK_MONOTONIC in
//! nanoseconds. Worker heartbeats, flow first/last-seen times and the
//! primary's watchdog all compare values of this clock written by different
//! processes, so they must all read it the same way.

/// CLOCK_MONOTONIC in nanoseconds (0 in the impossible case that the clock
/// cannot be read).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            (t.tv_sec() as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(t.tv_nsec() as u64)
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clock_moves_forward() {
        let a = super::monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::monotonic_ns();
        assert!(a > 0 && b >= a + 2_000_000, "{a} then {b}");
    }
}
