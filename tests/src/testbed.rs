//! One test's world: a namespace, a multi-queue TAP, a packet socket on it
//! and a qpnet instance serving it.
//!
//! Field order is drop order: qpnet stops first, then the socket closes, then
//! the namespace (and with it the TAP) goes away.

use std::ops::Range;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::frames::mixed_len;
use crate::traffic::{rx_traffic, send_tx, TapCollector};

use crate::frames::ETHERTYPE_TEST;
use crate::netns::NetNs;
use crate::qpnet::Qpnet;
use crate::tap_io::TapSocket;
use crate::vmm::{Vmm, VmmConfig};

/// First sequence number of [`Testbed::check_serving`] frames, far from
/// those the tests themselves send.
pub const SERVING_SEQ: u32 = 0x4000_0000;

/// The TAP name used inside every test namespace.
pub const TAP_NAME: &str = "qptap0";

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
        Testbed::with_args(queue_pairs, &[])
    }

    /// [`Testbed::new`] with extra `qpnet run` arguments.
    pub fn with_args(queue_pairs: u16, extra: &[&str]) -> Result<Testbed> {
        let ns = NetNs::new()?;
        ns.add_tap(TAP_NAME, None)?;
        let tap = TapSocket::open(&ns, TAP_NAME, ETHERTYPE_TEST)?;
        let qpnet = Qpnet::start_with(&ns, TAP_NAME, queue_pairs, extra)?;
        Ok(Testbed { qpnet, tap, ns })
    }

    /// Connect a test VMM with `config`; failures quote qpnet's stderr.
    pub fn vmm(&mut self, config: VmmConfig) -> Result<Vmm> {
        let r = Vmm::connect(self.qpnet.socket(), config);
        self.explain(r)
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
        let collector = TapCollector::start(&self.tap)?;
        let all: Vec<usize> = (0..usize::from(qps)).collect();
        let seqs = SERVING_SEQ..SERVING_SEQ + frames;
        send_tx(
            &mut vmm,
            &all,
            seqs.clone(),
            &collector,
            Duration::from_secs(30),
        )?;
        let expected: Vec<(u16, Range<u32>)> =
            all.iter().map(|&q| (q as u16, seqs.clone())).collect();
        collector.wait_received(u64::from(frames) * u64::from(qps), Duration::from_secs(30))?;
        collector.check_expected(&expected)?;
        collector.finish()?;
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
