//! What each queue pair's thread counts, read by the main thread when the
//! benchmark asks (SIGUSR1).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// One queue pair's counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Whole frames received (sink) or sent (source).
    pub frames: AtomicU64,
    /// Their bytes (Ethernet frames, no prefix).
    pub bytes: AtomicU64,
    /// Times the source found qpnet's side full and waited for room.
    pub waits: AtomicU64,
    /// Errors the peer went on after (qpnet absent, connection ended).
    pub errors: AtomicU64,
}

impl Counters {
    pub fn add(&self, frames: u64, bytes: u64) {
        self.frames.fetch_add(frames, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }
}

/// Set by SIGUSR2: a source starts sending.
pub static GO: AtomicBool = AtomicBool::new(false);

/// Waits for [`GO`].
pub fn wait_for_go() {
    while !GO.load(Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// One line: `stats SEQ frames F bytes B waits W errors E q0 F0 q1 F1 ...`.
pub fn line(seq: u64, all: &[Counters]) -> String {
    let sum = |f: fn(&Counters) -> &AtomicU64| all.iter().map(|c| f(c).load(Relaxed)).sum::<u64>();
    let mut s = format!(
        "stats {seq} frames {} bytes {} waits {} errors {}",
        sum(|c| &c.frames),
        sum(|c| &c.bytes),
        sum(|c| &c.waits),
        sum(|c| &c.errors)
    );
    for (k, c) in all.iter().enumerate() {
        s.push_str(&format!(" q{k} {}", c.frames.load(Relaxed)));
    }
    s
}
