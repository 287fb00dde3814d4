//! Test-only fault hooks, armed by `QPNET_TEST_WORKER_FAULT` in the
//! primary's environment (its workers inherit it; never set otherwise):
//! - `crash-on-start:Q[,Q...]`: the workers of those queue pairs abort as
//!   soon as they start (a crash loop on demand, for the supervision
//!   tests);
//! - `forbidden-call-once:Q:MARKER`: the worker of queue pair Q that
//!   creates the file MARKER (the first one: a replacement finds it) makes
//!   a system call its seccomp filter refuses, `socket(2)`, at its first TX
//!   kick: inside its sandbox, while it serves rings.

use log::error;

/// What this worker was told to do wrong.
pub(crate) struct TestFaults {
    forbidden_call: bool,
}

/// Read the hooks for `queue_pair` at start (before the sandbox: the
/// marker file is created while the file system is still there).
pub(crate) fn at_start(queue_pair: u16) -> TestFaults {
    let mut faults = TestFaults::none();
    let Ok(spec) = std::env::var("QPNET_TEST_WORKER_FAULT") else {
        return faults;
    };
    if let Some(list) = spec.strip_prefix("crash-on-start:") {
        if list.split(',').any(|q| q.trim().parse() == Ok(queue_pair)) {
            error!("qp{queue_pair}: QPNET_TEST_WORKER_FAULT says crash on start: aborting");
            std::process::abort();
        }
    }
    if let Some((q, marker)) = spec
        .strip_prefix("forbidden-call-once:")
        .and_then(|rest| rest.split_once(':'))
    {
        faults.forbidden_call = q.parse() == Ok(queue_pair)
            && std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(marker)
                .is_ok();
    }
    faults
}

impl TestFaults {
    /// No fault (workers run as threads by the unit tests).
    pub(crate) fn none() -> TestFaults {
        TestFaults {
            forbidden_call: false,
        }
    }

    /// At a TX kick: the forbidden call, once, when armed.
    pub(crate) fn on_tx_kick(&mut self, queue_pair: u16) {
        if !std::mem::take(&mut self.forbidden_call) {
            return;
        }
        error!("qp{queue_pair}: QPNET_TEST_WORKER_FAULT says make a forbidden call: socket(2)");
        let r = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::empty(),
            None,
        );
        error!("qp{queue_pair}: socket(2) was not refused ({r:?}): no seccomp filter?");
    }
}
