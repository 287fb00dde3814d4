//! The worker process of one queue pair: an epoll loop that routes each
//! event to the control side ([`Control`]) or the packet path
//! ([`QueuePair`]).
//!
//! Single-threaded by design: a control request is handled between two
//! runs, so when it changes memory or rings nothing is in flight. Each loop
//! turn publishes the heartbeat, waits for events (not at all when TX work is
//! pending from an exhausted budget, 250 ms at most otherwise so the
//! heartbeat keeps ticking), handles at most one control request, runs TX
//! and RX as their events ask, then publishes the counters.
//!
//! Frame I/O interest follows the queues' needs: readable while the RX ring
//! runs and has buffers (not while starved: frames then wait in the kernel
//! until the guest's RX kick), writable only while TX waits for room.

use std::os::fd::OwnedFd;

use anyhow::Context;
use log::info;
use nix::errno::Errno;
use nix::sys::epoll::EpollTimeout;
use qpnet_ipc::Channel;

use crate::control::{Control, Flow};
use crate::events::{Events, Wake};
use crate::queue_pair::QueuePair;
use crate::sandbox::{self, RunAs};
use crate::test_fault::{self, TestFaults};

/// Longest sleep of the loop, so the heartbeat keeps moving when idle.
const IDLE_WAIT_MS: u16 = 250;

/// Serve queue pair `queue_pair` over the control socket `control` until
/// told to stop or the primary goes away; first give up every privilege
/// (as user `run_as` when given: [`crate::sandbox`]).
pub fn run_worker(queue_pair: u16, control: OwnedFd, run_as: Option<RunAs>) -> anyhow::Result<()> {
    let faults = test_fault::at_start(queue_pair);
    let sandboxed = sandbox::enter(run_as).context("dropping privileges")?;
    info!("qp{queue_pair}: worker {} {sandboxed}", std::process::id());
    run(queue_pair, control, faults)
}

/// [`run_worker`] without the sandbox (the unit tests run workers as
/// threads of the test process).
#[cfg(any(test, feature = "test-utils"))]
pub(crate) fn serve(queue_pair: u16, control: OwnedFd) -> anyhow::Result<()> {
    run(queue_pair, control, TestFaults::none())
}

fn run(queue_pair: u16, control: OwnedFd, faults: TestFaults) -> anyhow::Result<()> {
    let channel = Channel::from_fd(control).context("control fd")?;
    let control = Control::new(queue_pair, channel);
    let events = Events::new(queue_pair, control.fd()).context("epoll set")?;
    let mut worker = Worker {
        control,
        events,
        qp: QueuePair::new(queue_pair),
        faults,
    };
    info!("qp{queue_pair}: worker {} started", std::process::id());
    worker.run()
}

/// Everything one queue pair's worker owns.
struct Worker {
    control: Control,
    events: Events,
    qp: QueuePair,
    faults: TestFaults,
}

impl Worker {
    fn run(&mut self) -> anyhow::Result<()> {
        loop {
            self.qp.beat();
            let timeout = if self.qp.tx_has_more_work() {
                EpollTimeout::ZERO
            } else {
                EpollTimeout::from(IDLE_WAIT_MS)
            };
            let wake = match self.events.wait(timeout) {
                Ok(wake) => wake,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e).context("epoll_wait"),
            };
            if wake.control {
                // The request may have changed rings, memory or the frame
                // I/O: the data-path events are re-reported next turn
                // (level-triggered).
                let flow = self.control.handle(&mut self.qp, &mut self.events)?;
                self.qp.publish();
                match flow {
                    Flow::Exit => return Ok(()),
                    Flow::Continue => continue,
                }
            }
            self.serve_data_path(&wake);
            self.qp.publish();
        }
    }

    fn serve_data_path(&mut self, wake: &Wake) {
        let (qp, events) = (&mut self.qp, &mut self.events);
        if wake.io_err && !wake.io_in {
            qp.on_io_error(events);
        }
        if wake.tx_kick {
            self.faults.on_tx_kick(qp.index());
            qp.on_tx_kick();
        }
        if wake.rx_kick {
            qp.on_rx_kick(events);
        }
        if wake.tx_kick || wake.io_out || qp.tx_has_more_work() {
            if wake.io_out {
                qp.on_io_writable();
            }
            qp.run_tx(events);
        }
        if wake.io_in || wake.rx_kick {
            qp.run_rx(events);
        }
        qp.update_interest(events);
    }
}
