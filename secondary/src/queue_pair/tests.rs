use std::os::fd::{AsFd, OwnedFd};

use nix::sys::epoll::EpollTimeout;

use super::*;
use crate::tap::Tap;
use crate::test_util::{
    desc, dgram_fds, Peer, RingDriver, TestMemory, BUF_BASE, F_WRITE, SECOND_RING,
};

/// A queue pair over `m` with a TAP stand-in, and its epoll set (whose
/// "control socket" is a spare socket nobody writes).
struct Fixture {
    qp: QueuePair,
    events: Events,
    peer: Peer,
    _control: OwnedFd,
}

impl Fixture {
    fn new(m: &TestMemory) -> Fixture {
        let (control, _) = dgram_fds();
        let mut events = Events::new(0, control.as_fd()).unwrap();
        let mut qp = QueuePair::new(0);
        assert!(qp.set_memory(Some(m.guest.map()), &mut events).is_empty());
        let (tap, peer) = dgram_fds();
        qp.attach_io(Box::new(Tap::attach(tap).unwrap()), &mut events)
            .unwrap();
        Fixture {
            qp,
            events,
            peer: Peer::new(peer),
            _control: control,
        }
    }

    fn start(&mut self, ring: &RingDriver, kind: RingKind) {
        self.qp
            .start_ring(&ring.config(kind), ring.fds(), &mut self.events)
            .unwrap();
    }

    fn poll(&self) -> crate::events::Wake {
        self.events.wait(EpollTimeout::ZERO).unwrap()
    }
}

#[test]
fn a_faulted_ring_leaves_epoll_and_reports_where_it_stopped() {
    let m = TestMemory::new();
    let mut f = Fixture::new(&m);
    let mut tr = m.ring(8);
    f.start(&tr, RingKind::Tx);
    tr.set_avail_idx(100);
    tr.kick();
    assert!(f.poll().tx_kick);
    f.qp.on_tx_kick();
    f.qp.run_tx(&mut f.events);
    assert!(tr.interrupted(), "the guest hears of the stop");
    // Its kick eventfd (shared with the VMM) no longer wakes the loop.
    tr.kick();
    assert!(!f.poll().tx_kick);
    assert_eq!(f.qp.stop_ring(RingKind::Tx, &mut f.events), Some(0));
    assert_eq!(f.qp.stop_ring(RingKind::Tx, &mut f.events), None);
}

/// An eventfd standing in for the VMM's SET_VRING_ERR one: a copy goes
/// to the worker, the test keeps the other.
fn err_eventfd() -> (OwnedFd, OwnedFd) {
    let fd = OwnedFd::from(
        nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_NONBLOCK).unwrap(),
    );
    (fd.try_clone().unwrap(), fd)
}

/// What the eventfd's counter holds (0 when nothing was written).
fn take_count(fd: &OwnedFd) -> u64 {
    let mut b = [0u8; 8];
    match nix::unistd::read(fd, &mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

/// Start TX on `tr` with `err` as its error eventfd.
fn start_with_err(f: &mut Fixture, tr: &RingDriver, err: OwnedFd) {
    let mut cfg = tr.config(RingKind::Tx);
    cfg.has_err = true;
    let mut fds = tr.fds();
    fds.push(err);
    let req = qpnet_ipc::Request::StartRing(cfg);
    req.check_fds(&fds).expect("the fds a primary would send");
    f.qp.start_ring(&cfg, fds, &mut f.events).unwrap();
}

#[test]
fn a_ring_fault_is_counted_and_signalled_on_the_error_eventfd_once() {
    let m = TestMemory::new();
    let mut f = Fixture::new(&m);
    let mut tr = m.ring(8);
    let (theirs, ours) = err_eventfd();
    start_with_err(&mut f, &tr, theirs);
    tr.add_chain(&[desc(BUF_BASE, 5, 0, 0)]);
    f.qp.run_tx(&mut f.events);
    assert_eq!(take_count(&ours), 0, "a refused chain is no ring fault");
    assert_eq!(tr.used(), vec![(0, 0)]);
    tr.set_avail_idx(100);
    for _ in 0..3 {
        tr.kick();
        f.qp.on_tx_kick();
        f.qp.run_tx(&mut f.events);
    }
    assert_eq!(take_count(&ours), 1, "one fault, one signal");
    assert_eq!(f.qp.common.counters.ring_faults, 1);
    assert_eq!(f.qp.stop_ring(RingKind::Tx, &mut f.events), Some(1));
    // Started again on the same broken ring: a second fault, a second
    // signal.
    let again = ours.try_clone().unwrap();
    start_with_err(&mut f, &tr, again.try_clone().unwrap());
    f.qp.run_tx(&mut f.events);
    assert_eq!(take_count(&ours), 1);
    assert_eq!(f.qp.common.counters.ring_faults, 2);
    // A counter the VMM never reads, full: the write fails, nothing
    // blocks, the fault is still counted.
    nix::unistd::write(&again, &(u64::MAX - 1).to_ne_bytes()).unwrap();
    start_with_err(&mut f, &tr, again);
    f.qp.run_tx(&mut f.events);
    assert_eq!(take_count(&ours), u64::MAX - 1, "nothing added");
    assert_eq!(f.qp.common.counters.ring_faults, 3);
}

#[test]
fn a_detached_io_leaves_no_tx_work_pending() {
    let m = TestMemory::new();
    let mut f = Fixture::new(&m);
    let mut tr = m.ring(512);
    // Runts: refused and completed without touching the TAP, so the
    // run ends at its budget, not on a full socket.
    for _ in 0..BUDGET + 10 {
        tr.add_chain(&[desc(BUF_BASE, 5, 0, 0)]);
    }
    f.start(&tr, RingKind::Tx);
    f.qp.run_tx(&mut f.events);
    assert!(f.qp.tx_has_more_work(), "more than a budget's worth");
    f.qp.detach_io("test", &mut f.events);
    assert!(!f.qp.tx_has_more_work());
    f.qp.run_tx(&mut f.events);
    assert_eq!(tr.used_idx() as usize, BUDGET, "nothing runs without I/O");
}

#[test]
fn a_starved_rx_queue_stops_watching_the_io_until_kicked() {
    let m = TestMemory::new();
    let mut f = Fixture::new(&m);
    let mut tr = m.ring_at(16, SECOND_RING);
    f.start(&tr, RingKind::Rx);
    f.peer.send_frame(&[0u8; 80]);
    assert!(f.poll().io_in);
    f.qp.run_rx(&mut f.events);
    f.qp.update_interest(&mut f.events);
    assert!(!f.poll().io_in, "starved: the frame waits in the kernel");
    tr.add_chain(&[desc(BUF_BASE, 2048, F_WRITE, 0)]);
    tr.kick();
    let wake = f.poll();
    assert!(wake.rx_kick);
    f.qp.on_rx_kick(&mut f.events);
    f.qp.run_rx(&mut f.events);
    assert_eq!(tr.used(), vec![(0, 80)]);
}
