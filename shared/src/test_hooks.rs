//! Deterministic crash points inside the flow table's critical sections.
//!
//! Tests (this crate's, or other crates' with the `test-hooks` feature) arm
//! one point in a child process; when the child's table operation reaches it
//! with a stripe lock held and a write half done, the child stops itself
//! (SIGSTOP, so the test can line up a waiter and then SIGKILL it) or kills
//! itself (SIGKILL). Production builds compile every point to nothing.

/// A place inside a critical section where a test may kill the holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CrashPoint {
    /// Undo record written and active; the entry not yet touched.
    IntentWritten = 1,
    /// Insert: entry marked in use and key written, counters not yet.
    InsertHalfWritten = 2,
    /// Update: the TX frame counter added, the rest not yet.
    UpdateHalfWritten = 3,
    /// Delete: the tag cleared, the entry itself not yet freed.
    DeleteTagCleared = 4,
    /// The change complete and the undo record retired; lock still held.
    CommittedBeforeUnlock = 5,
}

#[cfg(any(test, feature = "test-hooks"))]
mod armed {
    use super::CrashPoint;
    use nix::sys::signal::{raise, Signal};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// What the process does to itself at the armed point.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum CrashAction {
        /// raise(SIGKILL): die on the spot.
        Kill,
        /// raise(SIGSTOP): freeze, lock held, until someone kills us.
        Stop,
    }

    static POINT: AtomicU32 = AtomicU32::new(0);
    static STOP: AtomicU32 = AtomicU32::new(0);

    /// Arm `point` in this process.
    pub fn arm(point: CrashPoint, action: CrashAction) {
        STOP.store(u32::from(action == CrashAction::Stop), Ordering::SeqCst);
        POINT.store(point as u32, Ordering::SeqCst);
    }

    /// Disarm.
    pub fn disarm() {
        POINT.store(0, Ordering::SeqCst);
    }

    /// Called by the table at each point.
    pub(crate) fn reached(point: CrashPoint) {
        if POINT.load(Ordering::Relaxed) != point as u32 {
            return;
        }
        let signal = if STOP.load(Ordering::Relaxed) != 0 {
            Signal::SIGSTOP
        } else {
            Signal::SIGKILL
        };
        // Cannot fail for a valid signal sent to ourselves.
        let _ = raise(signal);
    }
}

#[cfg(any(test, feature = "test-hooks"))]
pub(crate) use armed::reached;
#[cfg(any(test, feature = "test-hooks"))]
pub use armed::{arm, disarm, CrashAction};

/// Without hooks compiled in, a crash point is nothing.
#[cfg(not(any(test, feature = "test-hooks")))]
#[inline(always)]
pub(crate) fn reached(_point: CrashPoint) {}
