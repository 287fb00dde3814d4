//! Polling with a deadline instead of sleeping.
//!
//! Tests wait for conditions (a socket appears, frames arrive, a process
//! exits) by polling them until a deadline, so they are as fast as the system
//! allows and fail with a message naming what never happened.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Poll `cond` every `interval` until it returns `Some`, or fail after
/// `timeout` with an error that names `what`.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut cond: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(interval);
    }
}

/// [`poll_until`] for a plain boolean condition, polled every 5 ms.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    poll_until(what, timeout, Duration::from_millis(5), || {
        Ok(cond().then_some(()))
    })
}
