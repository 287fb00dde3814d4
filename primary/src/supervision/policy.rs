//! The supervision policy: what to do when a queue pair's worker dies, and
//! when a live worker counts as wedged. Plain bookkeeping with the clock
//! passed in, so the policy is tested without processes; the queue pair
//! (`queue_pair.rs`) acts on its decisions.
//!
//! Theory of operation:
//! - A worker that dies is replaced at once, unless it is crash-looping:
//!   after [`QUICK_CRASHES_BEFORE_BACKOFF`] consecutive deaths within
//!   [`QUICK_LIFETIME`] of their start, each further restart waits twice as
//!   long as the previous one (from 10 ms up to 1 s). A worker that lived
//!   longer resets that count.
//! - More than `crash_limit` deaths within `crash_window` mark the queue pair
//!   *failed*: no new worker, its rings left alone, the rest of the device
//!   keeps working. `qpnet retry` (SIGUSR1 to the primary) or the next VMM
//!   connection clears the history and tries again. `crash_limit` 0 turns the
//!   guard off.
//! - The watchdog: a worker publishes a heartbeat at least every 250 ms even
//!   when idle. If its heartbeat is older than `watchdog` while its queue
//!   pair has work (TX chains waiting, or TAP frames waiting with RX buffers
//!   posted), it is wedged: the primary kills it and it is replaced like a
//!   crashed one.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A worker dying sooner than this after its start is a "quick" crash.
pub const QUICK_LIFETIME: Duration = Duration::from_secs(1);
/// Consecutive quick crashes restarted without delay.
pub const QUICK_CRASHES_BEFORE_BACKOFF: u32 = 3;
const BACKOFF_START: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Supervision settings (from the command line).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Heartbeat age that makes a worker with work wedged; `None`: off.
    pub watchdog: Option<Duration>,
    /// Deaths allowed within `crash_window` before the queue pair is failed
    /// (0: never fail).
    pub crash_limit: u32,
    /// The window for `crash_limit`.
    pub crash_window: Duration,
}

/// What to do after a worker died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start a new worker now.
    RespawnNow,
    /// Start a new worker at this time (back-off).
    RespawnAt(Instant),
    /// Give up on this queue pair.
    Fail,
}

/// The crash history of one queue pair.
#[derive(Debug, Default)]
pub struct CrashHistory {
    deaths: VecDeque<Instant>,
    quick_crashes: u32,
    started_at: Option<Instant>,
}

impl CrashHistory {
    /// A worker was started (or failed to start) at `now`.
    pub fn started(&mut self, now: Instant) {
        self.started_at = Some(now);
    }

    /// The worker died at `now`: record it and decide.
    pub fn died(&mut self, now: Instant, policy: &Policy) -> Decision {
        let lived = self
            .started_at
            .map(|s| now.saturating_duration_since(s))
            .unwrap_or(Duration::ZERO);
        self.started_at = None;
        if lived < QUICK_LIFETIME {
            self.quick_crashes += 1;
        } else {
            self.quick_crashes = 0;
        }
        self.deaths.push_back(now);
        while let Some(&t) = self.deaths.front() {
            if now.saturating_duration_since(t) > policy.crash_window {
                self.deaths.pop_front();
            } else {
                break;
            }
        }
        if policy.crash_limit > 0 && self.deaths.len() > policy.crash_limit as usize {
            return Decision::Fail;
        }
        if self.quick_crashes <= QUICK_CRASHES_BEFORE_BACKOFF {
            return Decision::RespawnNow;
        }
        let exp = (self.quick_crashes - QUICK_CRASHES_BEFORE_BACKOFF - 1).min(16);
        let delay = BACKOFF_START.saturating_mul(1 << exp).min(BACKOFF_MAX);
        Decision::RespawnAt(now + delay)
    }

    /// Forget the history (operator retry, new VMM).
    pub fn clear(&mut self) {
        *self = CrashHistory::default();
    }

    /// Deaths within the current window.
    pub fn recent_deaths(&self) -> usize {
        self.deaths.len()
    }
}

/// Whether a worker whose last heartbeat is `heartbeat_age` old is wedged:
/// too old while its queue pair has work (`has_work` is asked only when the
/// heartbeat is too old: it reads guest memory).
pub fn is_wedged(
    policy: &Policy,
    heartbeat_age: Duration,
    has_work: impl FnOnce() -> bool,
) -> bool {
    match policy.watchdog {
        Some(limit) => heartbeat_age > limit && has_work(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(limit: u32) -> Policy {
        Policy {
            watchdog: Some(Duration::from_secs(1)),
            crash_limit: limit,
            crash_window: Duration::from_secs(10),
        }
    }

    #[test]
    fn long_lived_workers_restart_at_once() {
        let p = policy(5);
        let mut h = CrashHistory::default();
        let t0 = Instant::now();
        h.started(t0);
        assert_eq!(
            h.died(t0 + Duration::from_secs(5), &p),
            Decision::RespawnNow
        );
        h.started(t0 + Duration::from_secs(5));
        assert_eq!(
            h.died(t0 + Duration::from_secs(20), &p),
            Decision::RespawnNow
        );
    }

    #[test]
    fn quick_crashes_back_off_then_fail() {
        let p = policy(5);
        let mut h = CrashHistory::default();
        let mut now = Instant::now();
        let mut deaths = vec![];
        for _ in 0..6 {
            h.started(now);
            now += Duration::from_millis(5);
            deaths.push((now, h.died(now, &p)));
        }
        for (_, d) in &deaths[..3] {
            assert_eq!(*d, Decision::RespawnNow);
        }
        let ms = Duration::from_millis;
        assert_eq!(deaths[3].1, Decision::RespawnAt(deaths[3].0 + ms(10)));
        assert_eq!(deaths[4].1, Decision::RespawnAt(deaths[4].0 + ms(20)));
        assert_eq!(deaths[5].1, Decision::Fail, "6 deaths > limit 5");
        assert_eq!(h.recent_deaths(), 6);
        h.clear();
        assert_eq!(h.recent_deaths(), 0);
        // Cleared: the next quick crash is a first one again.
        h.started(now);
        now += Duration::from_millis(5);
        assert_eq!(h.died(now, &p), Decision::RespawnNow);
    }

    #[test]
    fn old_deaths_leave_the_window() {
        let p = policy(2);
        let mut h = CrashHistory::default();
        let t0 = Instant::now();
        for k in 0..10u64 {
            h.started(t0 + Duration::from_secs(11 * k));
            let d = h.died(t0 + Duration::from_secs(11 * k + 2), &p);
            assert_eq!(d, Decision::RespawnNow, "death {k} is alone in its window");
        }
    }

    #[test]
    fn limit_zero_never_fails() {
        let p = policy(0);
        let mut h = CrashHistory::default();
        let mut now = Instant::now();
        for _ in 0..100 {
            h.started(now);
            now += Duration::from_secs(2);
            assert_eq!(h.died(now, &p), Decision::RespawnNow);
        }
    }

    #[test]
    fn watchdog_needs_work_and_age() {
        let p = policy(5);
        assert!(is_wedged(&p, Duration::from_millis(1500), || true));
        assert!(!is_wedged(&p, Duration::from_millis(1500), || false));
        assert!(!is_wedged(&p, Duration::from_millis(500), || panic!(
            "not asked when fresh"
        )));
        let off = Policy {
            watchdog: None,
            ..p
        };
        assert!(!is_wedged(&off, Duration::from_secs(100), || true));
    }
}
