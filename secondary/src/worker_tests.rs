//! Tests of the whole worker through its control socket: the worker runs in
//! a thread on one end of a real `SOCK_SEQPACKET` pair, guest memory is a
//! memfd mapped by both sides at a high address, and a unix datagram
//! socketpair stands in for the TAP.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::Duration;

use qpnet_ipc::{Channel, FrameIoKind, MemoryRegion, Reply, Request, RingKind, PROTOCOL_VERSION};
use qpnet_shared::{QueueStats, SharedRegion};

use crate::test_util::{
    desc, dgram_fds, wait_for, Peer, TestMemory, BUF_BASE, F_WRITE, MEM_BASE, SECOND_RING,
};
use crate::worker::serve;

const QP: u16 = 1;
const EVENT_IDX: u64 = 1 << 29;
const MRG_RXBUF: u64 = 1 << 15;

struct Harness {
    channel: Channel,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Harness {
    fn spawn() -> Harness {
        let (ours, theirs) = Channel::pair().expect("channel pair");
        let thread = std::thread::spawn(move || serve(QP, OwnedFd::from(theirs)));
        Harness {
            channel: ours,
            thread: Some(thread),
        }
    }

    fn greeted() -> Harness {
        let h = Harness::spawn();
        match h.call(
            &Request::Hello {
                version: PROTOCOL_VERSION,
                queue_pair: QP,
            },
            &[],
        ) {
            Reply::Hello { version, pid } => {
                assert_eq!(version, PROTOCOL_VERSION);
                assert_eq!(pid, std::process::id());
            }
            other => panic!("hello answered with {other:?}"),
        }
        h
    }

    fn call(&self, request: &Request, fds: &[BorrowedFd<'_>]) -> Reply {
        self.channel
            .call(request, fds, Duration::from_secs(5))
            .expect("reply from the worker")
    }

    fn ok(&self, request: &Request, fds: &[BorrowedFd<'_>]) {
        assert_eq!(self.call(request, fds), Reply::Ok, "{request:?}");
    }

    fn refused(&self, request: &Request, fds: &[BorrowedFd<'_>], needle: &str) {
        match self.call(request, fds) {
            Reply::Error { message } => assert!(
                message.contains(needle),
                "{request:?}: error {message:?} should mention {needle:?}"
            ),
            other => panic!("{request:?} should be refused, got {other:?}"),
        }
    }

    fn join(mut self) -> anyhow::Result<()> {
        let t = self.thread.take().expect("joined once");
        drop(self);
        t.join().expect("worker thread panicked")
    }

    fn mem_table(&self, m: &TestMemory) {
        self.ok(
            &Request::SetMemTable {
                regions: m.memory_table(),
            },
            &m.fds(),
        );
    }
}

fn fd_refs(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

#[test]
fn hello_then_shutdown_exits_cleanly() {
    let h = Harness::greeted();
    h.ok(&Request::Shutdown, &[]);
    h.join().expect("shutdown exits with success");
}

#[test]
fn closed_control_socket_exits_quietly() {
    let h = Harness::greeted();
    h.join().expect("a closed socket is a clean exit");
}

#[test]
fn version_mismatch_is_refused_and_fatal() {
    let h = Harness::spawn();
    h.refused(
        &Request::Hello {
            version: PROTOCOL_VERSION + 7,
            queue_pair: QP,
        },
        &[],
        "version",
    );
    assert!(h.join().is_err(), "the worker exits nonzero");
}

#[test]
fn requests_before_hello_and_bad_fd_counts_refused() {
    let h = Harness::spawn();
    h.refused(
        &Request::AttachFrameIo {
            kind: FrameIoKind::Tap,
        },
        &[],
        "fds",
    );
    h.refused(&Request::Shutdown, &[], "Hello");
    let h2 = Harness::greeted();
    let (a, _b) = dgram_fds();
    h2.refused(&Request::Shutdown, &[a.as_fd()], "fds");
    h2.refused(
        &Request::StopRing { kind: RingKind::Rx },
        &[],
        "not running",
    );
    h2.ok(&Request::Shutdown, &[]);
    h2.join().unwrap();
}

#[test]
fn bad_memory_tables_refused() {
    let h = Harness::greeted();
    let m = TestMemory::new();
    let (fds, regions) = (m.fds(), m.memory_table());
    let overlapping = vec![
        regions[0],
        MemoryRegion {
            guest_phys_addr: MEM_BASE + 0x1000,
            ..regions[1]
        },
    ];
    h.refused(
        &Request::SetMemTable {
            regions: overlapping,
        },
        &fds,
        "overlap",
    );
    // Region 0's memfd holds 2 MiB; this region would end past it.
    let past_eof = vec![MemoryRegion {
        guest_phys_addr: MEM_BASE,
        size: 0x20_0000,
        mmap_offset: 0x1000,
    }];
    h.refused(
        &Request::SetMemTable { regions: past_eof },
        &fds[..1],
        "past the end of its file",
    );
    // Still running, and a good table is taken.
    h.mem_table(&m);
}

#[test]
fn bad_ring_starts_refused() {
    let h = Harness::greeted();
    let m = TestMemory::new();
    let tr = m.ring(64);
    let cfg = tr.config(RingKind::Tx);
    h.refused(
        &Request::StartRing(cfg),
        &fd_refs(&tr.fds()),
        "memory table",
    );
    h.mem_table(&m);
    // A kick that is not an eventfd (a memfd here).
    let call = tr.fds().pop().unwrap();
    h.refused(
        &Request::StartRing(cfg),
        &[m.fds()[0], call.as_fd()],
        "eventfd",
    );
    // Rings outside guest memory.
    let outside = qpnet_ipc::RingConfig {
        used_ring: 0x1000,
        ..cfg
    };
    h.refused(
        &Request::StartRing(outside),
        &fd_refs(&tr.fds()),
        "ring addresses outside guest memory",
    );
    // A size that is not a power of two.
    let odd = qpnet_ipc::RingConfig { size: 48, ..cfg };
    h.refused(&Request::StartRing(odd), &fd_refs(&tr.fds()), "refused");
    h.ok(&Request::StartRing(cfg), &fd_refs(&tr.fds()));
}

#[test]
fn frames_flow_both_ways_and_counters_are_shared() {
    let h = Harness::greeted();
    let m = TestMemory::new();
    let shm_path = std::env::temp_dir().join(format!("qpnet-worker-test-{}", std::process::id()));
    let shm = SharedRegion::create(&shm_path, 2).expect("shared region");
    let (tap_fd, peer_fd) = dgram_fds();
    let peer = Peer::new(peer_fd);

    h.ok(
        &Request::AttachShared {
            flow_tracking: true,
        },
        &[shm.fd()],
    );
    h.ok(
        &Request::SetFeatures {
            features: EVENT_IDX | MRG_RXBUF,
            max_rx_frame: 1514,
            header_len: 12,
        },
        &[],
    );
    h.mem_table(&m);
    h.ok(
        &Request::AttachFrameIo {
            kind: FrameIoKind::Tap,
        },
        &[tap_fd.as_fd()],
    );

    // TX: a frame queued before the ring starts goes out at start.
    let mut tx = m.ring(64);
    let mut early = vec![0u8; 12];
    early.extend(b"early frame: queued before StartRing");
    m.write(BUF_BASE, &early);
    tx.add_chain(&[desc(BUF_BASE, early.len() as u32, 0, 0)]);
    let mut cfg = tx.config(RingKind::Tx);
    cfg.signal_on_start = true;
    h.ok(&Request::StartRing(cfg), &fd_refs(&tx.fds()));
    assert_eq!(
        peer.recv_frame_within(Duration::from_secs(5)).as_deref(),
        Some(&early[..])
    );
    assert!(tx.interrupted(), "signal_on_start and the batch interrupt");

    // TX on a kick.
    // A header asking for nothing (flags, GSO type, hdr_len 0), the rest
    // patterned: it must arrive byte for byte.
    let mut later = vec![0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
    later.extend((0..1500u32).map(|i| i as u8));
    m.write(BUF_BASE + 0x1000, &later);
    tx.add_chain(&[desc(BUF_BASE + 0x1000, later.len() as u32, 0, 0)]);
    tx.kick();
    assert_eq!(
        peer.recv_frame_within(Duration::from_secs(5)).as_deref(),
        Some(&later[..])
    );

    // RX: buffers posted, a frame arrives from the TAP.
    let mut rx = m.ring_at(64, SECOND_RING);
    for i in 0..8 {
        rx.add_chain(&[desc(BUF_BASE + 0x10000 + 0x1000 * i, 2048, F_WRITE, 0)]);
    }
    h.ok(
        &Request::StartRing(rx.config(RingKind::Rx)),
        &fd_refs(&rx.fds()),
    );
    let mut incoming = vec![0u8; 12];
    incoming.extend((0..700u32).map(|i| (i * 7) as u8));
    peer.send_frame(&incoming);
    wait_for("the RX frame in the used ring", || rx.used().len() == 1);
    let heads = rx.heads();
    assert_eq!(rx.used(), vec![(heads[0], incoming.len() as u32)]);
    let mut expected = incoming.clone();
    expected[10] = 1; // num_buffers
    assert_eq!(m.read(BUF_BASE + 0x10000, incoming.len()), expected);

    // Counters reach the shared region.
    let stats = shm.queue(usize::from(QP)).unwrap();
    wait_for("published counters", || {
        QueueStats::get(&stats.tx_frames) == 2 && QueueStats::get(&stats.rx_frames) == 1
    });
    assert_eq!(
        QueueStats::get(&stats.tx_bytes),
        (early.len() + later.len() - 24) as u64
    );
    assert_eq!(QueueStats::get(&stats.rx_bytes), 700);
    assert!(QueueStats::get(&stats.heartbeat_ns) > 0);
    assert!(QueueStats::get(&stats.tx_kicks) >= 1);

    assert_eq!(
        h.call(&Request::StopRing { kind: RingKind::Tx }, &[]),
        Reply::RingStopped { next_avail: 2 }
    );
    assert_eq!(
        h.call(&Request::StopRing { kind: RingKind::Rx }, &[]),
        Reply::RingStopped { next_avail: 1 }
    );
    h.ok(&Request::Shutdown, &[]);
    h.join().unwrap();
    let _ = std::fs::remove_file(shm_path);
}

#[test]
fn rx_waits_for_buffers_without_dropping() {
    let h = Harness::greeted();
    let m = TestMemory::new();
    let (tap_fd, peer_fd) = dgram_fds();
    let peer = Peer::new(peer_fd);
    h.ok(
        &Request::SetFeatures {
            features: EVENT_IDX,
            max_rx_frame: 1514,
            header_len: 12,
        },
        &[],
    );
    h.mem_table(&m);
    h.ok(
        &Request::AttachFrameIo {
            kind: FrameIoKind::Tap,
        },
        &[tap_fd.as_fd()],
    );
    let mut rx = m.ring(16);
    h.ok(
        &Request::StartRing(rx.config(RingKind::Rx)),
        &fd_refs(&rx.fds()),
    );
    let mut frame = vec![0u8; 12];
    frame.extend([0x5a; 60]);
    peer.send_frame(&frame);
    std::thread::sleep(Duration::from_millis(50));
    assert!(rx.used().is_empty());
    rx.add_chain(&[desc(BUF_BASE, 2048, F_WRITE, 0)]);
    rx.kick();
    wait_for("the frame once a buffer arrived", || rx.used().len() == 1);
    assert_eq!(m.read(BUF_BASE + 12, 60), vec![0x5a; 60]);
}

#[test]
fn broken_ring_is_stopped_and_reports_its_position() {
    let h = Harness::greeted();
    let m = TestMemory::new();
    let (tap_fd, peer_fd) = dgram_fds();
    let peer = Peer::new(peer_fd);
    h.mem_table(&m);
    h.ok(
        &Request::AttachFrameIo {
            kind: FrameIoKind::Tap,
        },
        &[tap_fd.as_fd()],
    );
    let mut tx = m.ring(16);
    h.ok(
        &Request::StartRing(tx.config(RingKind::Tx)),
        &fd_refs(&tx.fds()),
    );
    let mut good = vec![0u8; 12];
    good.extend([1u8; 64]);
    m.write(BUF_BASE, &good);
    tx.add_chain(&[desc(BUF_BASE, good.len() as u32, 0, 0)]);
    tx.kick();
    assert!(peer.recv_frame_within(Duration::from_secs(5)).is_some());
    // The avail index jumps far past the ring size.
    tx.set_avail_idx(1000);
    tx.kick();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        h.call(&Request::StopRing { kind: RingKind::Tx }, &[]),
        Reply::RingStopped { next_avail: 1 }
    );
    // The worker is still alive and serving.
    h.refused(
        &Request::StopRing { kind: RingKind::Tx },
        &[],
        "not running",
    );
    h.ok(&Request::Shutdown, &[]);
    h.join().unwrap();
}

#[test]
fn memory_swap_keeps_rings_or_stops_the_ones_outside() {
    let h = Harness::greeted();
    let m = TestMemory::new();
    let (tap_fd, peer_fd) = dgram_fds();
    let peer = Peer::new(peer_fd);
    h.mem_table(&m);
    h.ok(
        &Request::AttachFrameIo {
            kind: FrameIoKind::Tap,
        },
        &[tap_fd.as_fd()],
    );
    let mut tx = m.ring(16);
    h.ok(
        &Request::StartRing(tx.config(RingKind::Tx)),
        &fd_refs(&tx.fds()),
    );
    let mut f = vec![0u8; 12];
    f.extend([9u8; 100]);
    m.write(BUF_BASE, &f);
    tx.add_chain(&[desc(BUF_BASE, f.len() as u32, 0, 0)]);
    tx.kick();
    assert!(peer.recv_frame_within(Duration::from_secs(5)).is_some());

    // Same memory again: the ring keeps its position and keeps working.
    h.mem_table(&m);
    tx.add_chain(&[desc(BUF_BASE, f.len() as u32, 0, 0)]);
    tx.kick();
    assert!(peer.recv_frame_within(Duration::from_secs(5)).is_some());
    wait_for("two used entries", || tx.used().len() == 2);

    // Only the second region: the ring (in the first) is outside; stopped.
    h.refused(
        &Request::SetMemTable {
            regions: vec![m.memory_table()[1]],
        },
        &m.fds()[1..],
        "outside",
    );
    assert_eq!(
        h.call(&Request::StopRing { kind: RingKind::Tx }, &[]),
        Reply::RingStopped { next_avail: 2 }
    );

    // An empty table unmaps memory (device reset); rings need a table again.
    h.ok(&Request::SetMemTable { regions: vec![] }, &[]);
    h.refused(
        &Request::StartRing(tx.config(RingKind::Tx)),
        &fd_refs(&tx.fds()),
        "memory table",
    );
}

/// A worker on a datagram socket (the socket backend).
mod datagram;
