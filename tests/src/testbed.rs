//! One test's world: a namespace, a multi-queue TAP, a packet socket on it
//! and a qpnet instance serving it.
//!
//! Field order is drop order: qpnet stops first (a checked stop: see
//! [`crate::qpnet`]), then the socket closes, then the namespace (and with
//! it the TAP) goes away. [`Testbed::finish`] does the same and returns the
//! stop's verdict instead of panicking with it.
//!
//! The set-up every test repeats lives here once: [`Testbed::tx_round`] (N
//! frames on every TX queue, all must arrive once, byte-exact),
//! [`Testbed::frames_through`] (the same on some queues, ignoring frames of
//! earlier rounds), [`Testbed::rx_round`] (RX frames, nothing foreign
//! allowed) and [`Testbed::check_serving`] (a fresh VMM moves frames both
//! ways).

use std::ops::Range;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::frames::{mixed_len, ETHERTYPE_TEST};
use crate::netns::NetNs;
use crate::qpnet::{Options, Qpnet};
use crate::tap_io::TapSocket;
use crate::traffic::{rx_traffic, tx_round, RxReport, Strays};
use crate::vmm::{Vmm, VmmConfig};

/// First sequence number of [`Testbed::check_serving`] frames, far from
/// those the tests themselves send.
pub const SERVING_SEQ: u32 = 0x4000_0000;

/// The TAP name used inside every test namespace.
pub const TAP_NAME: &str = "qptap0";

/// How long a round of test traffic may take.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);

/// Namespace + TAP + packet socket + running qpnet.
#[derive(Debug)]
pub struct Testbed {
    /// The qpnet instance.
    pub qpnet: Qpnet,
    /// Packet socket on the TAP (ethertype 0x88B5).
    pub tap: TapSocket,
    /// The namespace everything lives in.
    pub ns: NetNs,
}

impl Testbed {
    /// A fresh namespace and TAP with qpnet serving `queue_pairs` on it.
    pub fn new(queue_pairs: u16) -> Result<Testbed> {
        Testbed::with_options(queue_pairs, &Options::default())
    }

    /// [`Testbed::new`] with extra `qpnet run` arguments.
    pub fn with_args(queue_pairs: u16, extra: &[&str]) -> Result<Testbed> {
        Testbed::with_options(queue_pairs, &Options::args(extra))
    }

    /// [`Testbed::new`] with qpnet started with `opts`.
    pub fn with_options(queue_pairs: u16, opts: &Options) -> Result<Testbed> {
        let ns = NetNs::new()?;
        ns.add_tap(TAP_NAME, None)?;
        let tap = TapSocket::open(&ns, TAP_NAME, ETHERTYPE_TEST)?;
        let qpnet = Qpnet::start_opts(&ns, TAP_NAME, queue_pairs, opts)?;
        Ok(Testbed { qpnet, tap, ns })
    }

    /// Connect a test VMM with `config`; failures quote qpnet's stderr.
    pub fn vmm(&mut self, config: VmmConfig) -> Result<Vmm> {
        let r = Vmm::connect(self.qpnet.socket(), config);
        self.explain(r)
    }

    /// `per_queue` frames (sequence numbers from 0) on every TX queue of
    /// `vmm`: every one must arrive on the TAP once, intact, and nothing
    /// else may arrive.
    pub fn tx_round(&mut self, vmm: &mut Vmm, per_queue: u32) -> Result<()> {
        let qps: Vec<usize> = (0..vmm.tx.len()).collect();
        let r = tx_round(
            vmm,
            &self.tap,
            &qps,
            0..per_queue,
            Strays::Refused,
            ROUND_TIMEOUT,
        );
        self.explain(r)
    }

    /// Frames `seqs` on the TX queues `qps`: every one must arrive once,
    /// intact; test frames of earlier rounds may still arrive.
    pub fn frames_through(&mut self, vmm: &mut Vmm, qps: &[usize], seqs: Range<u32>) -> Result<()> {
        let r = tx_round(vmm, &self.tap, qps, seqs, Strays::Ignored, ROUND_TIMEOUT);
        self.explain(r)
    }

    /// `count` RX frames over `flows` flows (lengths by `len_of`): all must
    /// arrive once, intact, and no frame the test did not send (a kernel
    /// frame, a frame of an earlier round) may reach the guest, so counts
    /// can be exact.
    pub fn rx_round(
        &mut self,
        vmm: &mut Vmm,
        count: u32,
        flows: u16,
        len_of: fn(u32) -> usize,
    ) -> Result<RxReport> {
        let r = rx_traffic(vmm, &self.tap, count, flows, len_of, ROUND_TIMEOUT);
        let report = self.explain(r)?;
        ensure!(
            report.foreign == 0 && report.stale == 0,
            "frames the test did not send reached the guest: {report:?}"
        );
        Ok(report)
    }

    /// Prove qpnet still serves: a fresh VMM connection moves `frames` test
    /// frames per queue pair each way, byte for byte. The VMM disconnects
    /// before this returns.
    pub fn check_serving(&mut self, frames: u32) -> Result<()> {
        let r = self.try_serving(frames);
        self.explain(r.context("a fresh VMM connection must pass frames"))
    }

    fn try_serving(&mut self, frames: u32) -> Result<()> {
        let qps = self.qpnet.queue_pairs();
        let mut vmm = Vmm::connect(
            self.qpnet.socket(),
            VmmConfig {
                queue_pairs: qps,
                ..VmmConfig::default()
            },
        )?;
        let all: Vec<usize> = (0..usize::from(qps)).collect();
        tx_round(
            &mut vmm,
            &self.tap,
            &all,
            SERVING_SEQ..SERVING_SEQ + frames,
            Strays::Ignored,
            Duration::from_secs(30),
        )?;
        rx_traffic(
            &mut vmm,
            &self.tap,
            frames,
            8,
            mixed_len,
            Duration::from_secs(30),
        )?;
        self.qpnet.check_alive()
    }

    /// The end of a test: qpnet must still run, then stop cleanly
    /// (SIGTERM: exit 0, workers gone, socket and runtime files removed).
    pub fn finish(mut self) -> Result<()> {
        self.qpnet.check_alive()?;
        let Testbed { qpnet, tap, ns } = self;
        qpnet.stop()?;
        drop(tap);
        drop(ns);
        Ok(())
    }

    /// Add qpnet's liveness and stderr to an error.
    pub fn explain<T>(&mut self, r: Result<T>) -> Result<T> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                let alive = if self.qpnet.is_alive() {
                    "running"
                } else {
                    "EXITED"
                };
                Err(e).with_context(|| {
                    format!(
                        "qpnet (pid {}) is {alive}; its stderr:\n{}",
                        self.qpnet.pid(),
                        tail(&self.qpnet.stderr(), 60)
                    )
                })
            }
        }
    }
}

/// The last `lines` lines of `s`.
pub fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
