//! Supervision and the ring hand-over against a fake worker (`fake.rs`):
//! deaths at chosen moments (from outside, during a VMM request, during the
//! hand-over, during a stop), a worker that stops answering, refusals, a
//! crash loop, the watchdog, and a VMM disconnect.

use std::time::Duration;

use qpnet_ipc::{Request, RingKind};
use qpnet_shared::{monotonic_ns, QueueStats, WorkerState};

use super::fake::{lock, Fault};
use super::queue_pair::{Owed, RingState};
use super::test_bed::{bed, eventfd, names, ring_addrs, Bed, FULL_START, UA};

#[test]
fn a_new_worker_gets_the_instance_the_device_state_and_its_rings() {
    let bed = Bed::running(2);
    for qp in 0..2u16 {
        let pid = bed.current(qp);
        assert_eq!(bed.launched(qp).len(), 1);
        assert_eq!(names(&bed.got(pid)), FULL_START);
        let starts = bed.starts(pid);
        assert!(starts
            .iter()
            .all(|c| c.next_avail == 0 && !c.signal_on_start && c.has_call));
        assert_eq!(
            bed.stats(qp as usize).worker_state(),
            Some(WorkerState::Running)
        );
        assert_eq!(QueueStats::get(&bed.stats(qp as usize).restarts), 0);
    }
    // Ring addresses reach the worker guest-physical.
    let (desc, avail, used) = ring_addrs(3);
    let c = bed.starts(bed.current(1))[1];
    assert_eq!(
        (c.desc_table, c.avail_ring, c.used_ring),
        (desc - UA, avail - UA, used - UA)
    );
}

#[test]
fn a_killed_worker_is_replaced_and_its_rings_resume_at_the_used_index() {
    let mut bed = Bed::running(2);
    let first = bed.current(0);
    bed.write_index(0, true, 37);
    bed.write_index(1, true, 5);
    bed.kill_from_outside(0);
    let second = bed.current(0);
    assert_ne!(first, second);
    let starts = bed.starts(second);
    assert_eq!(
        starts
            .iter()
            .map(|c| (c.next_avail, c.signal_on_start))
            .collect::<Vec<_>>(),
        [(37, true), (5, true)],
        "resumed at the used index, the guest signalled once"
    );
    let st = bed.stats(0);
    assert_eq!(QueueStats::get(&st.restarts), 1);
    assert_eq!(st.pid.load(std::sync::atomic::Ordering::Relaxed), second);
    assert_eq!(st.worker_state(), Some(WorkerState::Running));
    // The other queue pair never heard of it.
    assert_eq!(bed.launched(1).len(), 1);
    assert_eq!(bed.got(bed.current(1)).len(), 6);
}

#[test]
fn a_death_during_a_vmm_request_is_handled_by_the_loop_not_the_request() {
    let mut bed = bed(1);
    bed.set_mem_table().unwrap();
    bed.describe_ring(0).unwrap();
    let first = bed.current(0);
    bed.plan(0, "start-ring", 0, Fault::Die);
    // The VMM's request is answered: the ring is owed to the next worker.
    bed.describe_ring(1)
        .expect("answered although the worker died");
    assert_eq!(
        bed.launched(0),
        [first],
        "no worker started inside the request"
    );
    assert_eq!(lock(&bed.world).killed, [first]);
    assert_eq!(bed.ring(0), RingState::Owed(Owed::Resume));
    assert_eq!(bed.ring(1), RingState::Owed(Owed::Start));
    bed.write_index(0, true, 9);
    bed.supervise();
    let second = bed.current(0);
    assert_ne!(first, second);
    assert_eq!(bed.ring(0), RingState::Running);
    assert_eq!(bed.ring(1), RingState::Running);
    let starts: Vec<_> = bed
        .starts(second)
        .iter()
        .map(|c| (c.kind, c.next_avail, c.signal_on_start))
        .collect();
    use RingKind::{Rx, Tx};
    // RX ran and is resumed; TX's start is sent again as it was.
    assert_eq!(starts, [(Rx, 9, true), (Tx, 0, false)]);
}

#[test]
fn a_worker_dying_during_the_hand_over_leaves_no_ring_behind() {
    let mut bed = Bed::running(1);
    // The replacement dies taking its second ring; the one after takes both.
    bed.plan(0, "start-ring", 1, Fault::Die);
    bed.write_index(0, true, 11);
    bed.write_index(1, true, 22);
    bed.kill_from_outside(0);
    let pids = bed.launched(0);
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert_eq!(bed.starts(pids[1]).len(), 2, "died on its second start");
    let last: Vec<_> = bed
        .starts(pids[2])
        .iter()
        .map(|c| (c.next_avail, c.signal_on_start))
        .collect();
    assert_eq!(last, [(11, true), (22, true)]);
    assert_eq!(bed.ring(0), RingState::Running);
    assert_eq!(bed.ring(1), RingState::Running);
    assert_eq!(QueueStats::get(&bed.stats(0).restarts), 2);
}

#[test]
fn the_error_eventfd_reaches_the_worker_survives_respawns_and_is_replaced() {
    use std::os::fd::AsRawFd;
    let mut bed = Bed::running(1);
    let err = eventfd();
    let err_fd = err.as_raw_fd();
    bed.backend.set_vring_err(1, Some(err)).unwrap();
    // The running ring was restarted where it stopped, with the error fd last.
    let first = bed.current(0);
    let (cfg, fds) = bed.starts_with_fds(first).pop().unwrap();
    assert_eq!(
        (cfg.kind, cfg.has_err, cfg.has_call),
        (RingKind::Tx, true, true)
    );
    assert_eq!((fds.len(), fds[2]), (3, err_fd));
    // RX has none.
    assert!(!bed.starts(first)[0].has_err);
    // A new worker gets it again.
    bed.write_index(1, true, 9);
    bed.kill_from_outside(0);
    let second = bed.current(0);
    assert_ne!(first, second);
    let tx: Vec<_> = bed
        .starts_with_fds(second)
        .into_iter()
        .filter(|(c, _)| c.kind == RingKind::Tx)
        .collect();
    assert_eq!(tx.len(), 1);
    assert!(tx[0].0.has_err && tx[0].0.signal_on_start);
    assert_eq!(tx[0].1.last(), Some(&err_fd));
    // GET_VRING_BASE and a new kick keep it.
    bed.backend.get_vring_base(1).unwrap();
    bed.backend.set_vring_kick(1, Some(eventfd())).unwrap();
    let (cfg, fds) = bed.starts_with_fds(second).pop().unwrap();
    assert!(cfg.has_err);
    assert_eq!(fds.last(), Some(&err_fd));
    // A later SET_VRING_ERR replaces it; "no fd" takes it away.
    let newer = eventfd();
    let newer_fd = newer.as_raw_fd();
    bed.backend.set_vring_err(1, Some(newer)).unwrap();
    let (_, fds) = bed.starts_with_fds(second).pop().unwrap();
    assert_eq!(fds.last(), Some(&newer_fd));
    bed.backend.set_vring_err(1, None).unwrap();
    let (cfg, fds) = bed.starts_with_fds(second).pop().unwrap();
    assert!(!cfg.has_err);
    assert_eq!(fds.len(), 2);
    // A refused SET_VRING_ERR (index out of range) changes nothing.
    let before = bed.got(second).len();
    assert!(bed.backend.set_vring_err(2, Some(eventfd())).is_err());
    assert_eq!(bed.got(second).len(), before);
}

#[test]
fn a_ring_stopped_as_its_worker_dies_takes_the_used_index_and_is_not_owed() {
    let mut bed = Bed::running(1);
    bed.plan(0, "stop-ring", 0, Fault::Die);
    bed.write_index(1, true, 42);
    let base = bed.backend.get_vring_base(1).expect("answered");
    assert_eq!(base, 42, "the used index is where it stopped");
    assert_eq!(bed.ring(1), RingState::Stopped);
    assert_eq!(bed.ring(0), RingState::Owed(Owed::Resume));
    bed.supervise();
    let starts = bed.starts(bed.current(0));
    assert_eq!(starts.len(), 1, "only RX is resumed: {starts:?}");
    assert_eq!(starts[0].kind, RingKind::Rx);
    // Stopped until the next SET_VRING_KICK, which starts it at its base.
    bed.backend.set_vring_kick(1, Some(eventfd())).unwrap();
    let tx = *bed.starts(bed.current(0)).last().unwrap();
    assert_eq!((tx.kind, tx.next_avail), (RingKind::Tx, 42));
}

#[test]
fn a_worker_that_stops_answering_is_killed_and_its_replacement_gets_the_new_table() {
    let mut bed = Bed::running(1);
    let first = bed.current(0);
    lock(&bed.world).stop_at = 7;
    bed.plan(0, "set-mem-table", 0, Fault::Hang);
    bed.set_mem_table()
        .expect("answered although the worker hung");
    assert_eq!(lock(&bed.world).killed, [first], "killed, not left running");
    assert_eq!(bed.launched(0), [first]);
    bed.supervise();
    let second = bed.current(0);
    assert_eq!(names(&bed.got(second)), FULL_START);
    // Both rings had been stopped at 7 before the table was sent: each start
    // is sent again as it was.
    assert!(bed
        .starts(second)
        .iter()
        .all(|c| c.next_avail == 7 && !c.signal_on_start));
}

#[test]
fn a_refusal_is_a_refusal_not_a_death() {
    let mut bed = bed(1);
    bed.set_mem_table().unwrap();
    bed.plan(0, "start-ring", 0, Fault::Refuse("no such ring"));
    let e = bed.describe_ring(0).expect_err("refused");
    assert!(e.0.contains("no such ring"), "{e}");
    bed.supervise();
    assert_eq!(bed.launched(0).len(), 1, "the worker lives on");
    assert!(lock(&bed.world).killed.is_empty());
    assert_eq!(bed.ring(0), RingState::Stopped);
    // A refused table does not kill either.
    bed.plan(0, "set-mem-table", 0, Fault::Refuse("cannot map"));
    assert!(bed.set_mem_table().is_err());
    assert!(lock(&bed.world).killed.is_empty());
}

#[test]
fn a_crash_loop_backs_off_then_fails_and_retry_hands_over_the_owed_rings() {
    let mut bed = Bed::running(2);
    lock(&bed.world).launch_fails.insert(1);
    bed.kill_from_outside(1);
    // Death 1 (the kill) and three failed starts at once, then a back-off.
    assert_eq!(QueueStats::get(&bed.stats(1).restarts), 4);
    assert_eq!(bed.stats(1).worker_state(), Some(WorkerState::Restarting));
    assert!(!bed.sup().queue_pair(1).is_failed());
    let took = bed.crash_loop(1);
    // 6 deaths within the window > limit 5, after waits of 10 and 20 ms.
    assert_eq!(QueueStats::get(&bed.stats(1).restarts), 6);
    assert!(took >= Duration::from_millis(30), "{took:?}");
    assert_eq!(bed.stats(1).worker_state(), Some(WorkerState::Failed));
    // Failed: the VMM is still answered, the rings left alone, owed.
    bed.backend.set_vring_enable(3, true).unwrap();
    assert_eq!(bed.ring(3), RingState::Owed(Owed::Start));
    assert_eq!(
        bed.launched(0).len(),
        1,
        "the other queue pair never noticed"
    );
    bed.write_index(2, true, 3);
    bed.backend.supervision().0.retry_failed();
    bed.supervise();
    let pid = bed.current(1);
    let starts: Vec<_> = bed
        .starts(pid)
        .iter()
        .map(|c| (c.next_avail, c.signal_on_start))
        .collect();
    assert_eq!(starts, [(3, true), (0, false)]);
    assert_eq!(bed.stats(1).worker_state(), Some(WorkerState::Running));
}

#[test]
fn the_watchdog_kills_a_stale_worker_only_while_it_has_work() {
    let mut bed = Bed::running(1);
    let first = bed.current(0);
    let stale = monotonic_ns() - 5_000_000_000;
    bed.stats(0)
        .heartbeat_ns
        .store(stale, std::sync::atomic::Ordering::Relaxed);
    bed.supervise();
    assert_eq!(bed.current(0), first, "idle: left alone");
    // A TX chain waits (avail 1, used 0).
    bed.write_index(1, false, 1);
    bed.supervise();
    assert_eq!(lock(&bed.world).killed, [first]);
    assert_ne!(bed.current(0), first, "replaced");
    assert_eq!(bed.ring(1), RingState::Running);
}

#[test]
fn a_vmm_disconnect_stops_the_rings_and_workers_forget_guest_memory() {
    let mut bed = Bed::running(2);
    bed.crash_loop(1);
    assert!(bed.sup().queue_pair(1).is_failed());
    let pid = bed.current(0);
    let before = bed.got(pid).len();
    bed.backend.reset();
    assert_eq!(
        names(&bed.got(pid)[before..]),
        ["stop-ring", "stop-ring", "set-mem-table"]
    );
    assert_eq!(
        bed.got(pid).last(),
        Some(&Request::SetMemTable { regions: vec![] })
    );
    for i in 0..4 {
        assert_eq!(bed.ring(i), RingState::Stopped, "ring {i}");
    }
    // A new VMM gets a fresh try at the failed queue pair.
    bed.supervise();
    assert_eq!(
        bed.stats(1).worker_state(),
        Some(WorkerState::Running),
        "retried"
    );
    assert_eq!(
        names(&bed.got(bed.current(1))),
        ["hello", "attach-shared", "attach-frame-io"],
        "no memory, no rings"
    );
}
