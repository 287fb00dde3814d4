//! A worker whose frame I/O is a datagram socket (`FrameIoKind::Datagram`):
//! frames leave without the virtio-net header and arrive behind a zero one;
//! what the peer does wrong is counted and the queue keeps working.

use std::os::fd::AsRawFd;

use super::*;
use crate::test_util::{RingDriver, F_NEXT};

/// A worker with shared counters, no offloads negotiated, guest memory, a
/// datagram socket (the peer's end returned) and TX and RX rings running.
struct Bed {
    h: Harness,
    m: TestMemory,
    tx: RingDriver,
    rx: RingDriver,
    shm: SharedRegion,
    peer: Option<Peer>,
}

impl Bed {
    fn new(tag: &str, sndbuf: Option<libc::c_int>) -> Bed {
        let h = Harness::greeted();
        let m = TestMemory::new();
        let shm_path =
            std::env::temp_dir().join(format!("qpnet-worker-dgram-{tag}-{}", std::process::id()));
        let shm = SharedRegion::create(&shm_path, 2).expect("shared region");
        let _ = std::fs::remove_file(&shm_path);
        let (ours, peer_fd) = dgram_fds();
        if let Some(size) = sndbuf {
            // SAFETY: SO_SNDBUF reads one int through the pointer, a live
            // local of that size.
            let r = unsafe {
                libc::setsockopt(
                    ours.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "SO_SNDBUF");
        }
        h.ok(
            &Request::AttachShared {
                flow_tracking: false,
            },
            &[shm.fd()],
        );
        h.ok(
            &Request::SetFeatures {
                features: MRG_RXBUF,
                max_rx_frame: 1518,
                header_len: 12,
            },
            &[],
        );
        h.mem_table(&m);
        h.ok(
            &Request::AttachFrameIo {
                kind: FrameIoKind::Datagram,
            },
            &[ours.as_fd()],
        );
        let tx = m.ring(64);
        h.ok(
            &Request::StartRing(tx.config(RingKind::Tx)),
            &fd_refs(&tx.fds()),
        );
        let mut rx = m.ring_at(64, SECOND_RING);
        for i in 0..8 {
            rx.add_chain(&[desc(BUF_BASE + 0x10000 + 0x1000 * i, 2048, F_WRITE, 0)]);
        }
        h.ok(
            &Request::StartRing(rx.config(RingKind::Rx)),
            &fd_refs(&rx.fds()),
        );
        Bed {
            h,
            m,
            tx,
            rx,
            shm,
            peer: Some(Peer::new(peer_fd)),
        }
    }

    fn peer(&self) -> &Peer {
        self.peer.as_ref().expect("the peer is there")
    }

    /// Put `chain` (bytes per descriptor) on the TX ring at `at` and kick.
    fn send(&mut self, at: u64, parts: &[&[u8]]) {
        let mut descs = Vec::new();
        let mut gpa = at;
        for (i, p) in parts.iter().enumerate() {
            self.m.write(gpa, p);
            let next = if i + 1 < parts.len() { F_NEXT } else { 0 };
            descs.push(desc(gpa, p.len() as u32, next, 0));
            gpa += p.len() as u64 + 64;
        }
        self.tx.add_chain(&descs);
        self.tx.kick();
    }

    fn counter(&self, f: impl Fn(&QueueStats) -> &std::sync::atomic::AtomicU64) -> u64 {
        QueueStats::get(f(self.shm.queue(usize::from(QP)).unwrap()))
    }

    fn wait_counter(
        &self,
        what: &str,
        n: u64,
        f: impl Fn(&QueueStats) -> &std::sync::atomic::AtomicU64,
    ) {
        wait_for(what, || self.counter(&f) >= n);
    }
}

fn header(flags: u8) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = flags;
    h
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect()
}

#[test]
fn tx_frames_leave_without_the_header_and_rx_frames_arrive_behind_a_zero_one() {
    let mut b = Bed::new("both", None);
    let f = payload(600, 3);
    // Header and frame in one descriptor, then header alone and the frame
    // split over two more.
    let whole: Vec<u8> = header(0).iter().chain(&f).copied().collect();
    b.send(BUF_BASE, &[&whole]);
    assert_eq!(
        b.peer()
            .recv_frame_within(Duration::from_secs(5))
            .as_deref(),
        Some(&f[..])
    );
    b.send(BUF_BASE + 0x2000, &[&header(0), &f[..100], &f[100..]]);
    assert_eq!(
        b.peer()
            .recv_frame_within(Duration::from_secs(5))
            .as_deref(),
        Some(&f[..])
    );
    // A checksum request: no offload is negotiated on a socket backend.
    b.send(BUF_BASE + 0x4000, &[&header(1), &f]);
    b.wait_counter("drop_hdr_flags", 1, |q| &q.drop_hdr_flags);
    assert!(b.peer().is_empty(), "a refused frame is not sent");

    let incoming = payload(700, 7);
    b.peer().send_frame(&incoming);
    wait_for("the RX frame in the used ring", || b.rx.used().len() == 1);
    let heads = b.rx.heads();
    assert_eq!(b.rx.used(), vec![(heads[0], 12 + 700)]);
    let mut expected = vec![0u8; 12];
    expected[10] = 1; // num_buffers
    expected.extend(&incoming);
    assert_eq!(b.m.read(BUF_BASE + 0x10000, 12 + 700), expected);
    b.wait_counter("tx_frames", 2, |q| &q.tx_frames);
    assert_eq!(b.counter(|q| &q.tx_bytes), 1200);
    b.wait_counter("rx_frames", 1, |q| &q.rx_frames);
    assert_eq!(b.counter(|q| &q.rx_bytes), 700);
    b.h.call(&Request::Shutdown, &[]);
    b.h.join().unwrap();
}

#[test]
fn oversized_empty_refused_and_unanswered_frames_are_counted_and_the_queue_goes_on() {
    // A send buffer of 4 KiB (8 KiB as the kernel counts it): a larger
    // datagram is refused with EMSGSIZE.
    let mut b = Bed::new("bad", Some(4096));
    b.peer().send_frame(&payload(3000, 5)); // larger than a 2048-byte buffer
    b.wait_counter("drop_too_large", 1, |q| &q.drop_too_large);
    b.peer().send_frame(&[]);
    b.wait_counter("drop_rx_short", 1, |q| &q.drop_rx_short);
    b.peer().send_frame(&[1; 13]);
    b.wait_counter("drop_rx_short", 2, |q| &q.drop_rx_short);
    let f = payload(100, 9);
    b.peer().send_frame(&f);
    wait_for("the good RX frame", || b.rx.used().len() == 1);
    assert_eq!(b.m.read(BUF_BASE + 0x10000 + 12, 100), f);

    let big = payload(12_000, 1);
    b.send(BUF_BASE, &[&header(0), &big]);
    b.wait_counter("drop_peer_refused", 1, |q| &q.drop_peer_refused);
    b.send(BUF_BASE + 0x8000, &[&header(0), &f]);
    assert_eq!(
        b.peer()
            .recv_frame_within(Duration::from_secs(5))
            .as_deref(),
        Some(&f[..])
    );

    b.peer = None;
    b.send(BUF_BASE + 0x9000, &[&header(0), &f]);
    b.wait_counter("peer_unreachable", 1, |q| &q.peer_unreachable);
    b.send(BUF_BASE + 0xa000, &[&header(0), &f]);
    b.wait_counter("peer_unreachable", 2, |q| &q.peer_unreachable);
    wait_for("every TX chain completed", || b.tx.used().len() == 4);
    assert_eq!(b.counter(|q| &q.rx_frames), 1);
    assert_eq!(b.counter(|q| &q.tx_frames), 1);
    assert_eq!(b.counter(|q| &q.drop_tap_error), 0);
    b.h.call(&Request::Shutdown, &[]);
    b.h.join().unwrap();
}
