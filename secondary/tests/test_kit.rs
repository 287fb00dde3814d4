//! The test kit as another crate sees it (feature `test-utils`): a worker
//! driven through the kit's entry point (`serve_worker`: the worker
//! without its sandbox) with nothing but `test_util`'s
//! public items, as the integration tests of `tests/` can be. Guest memory
//! is two regions far apart, the second at a nonzero file offset, so the
//! worker's view of the memory table is exercised too.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use qpnet_ipc::{Channel, FrameIoKind, Reply, Request, RingKind, PROTOCOL_VERSION};
use qpnet_secondary::test_util::{
    desc, dgram_fds, serve_worker, wait_for, BumpAllocator, GuestMemory, Peer, RegionLayout,
    RingDriver, RingLayout, UsedElem, F_WRITE,
};

fn call(channel: &Channel, request: &Request, fds: &[BorrowedFd<'_>]) -> Reply {
    channel
        .call(request, fds, Duration::from_secs(5))
        .expect("a reply from the worker")
}

fn start(channel: &Channel, ring: &RingDriver, kind: RingKind) {
    let fds = ring.fds();
    let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let reply = call(channel, &Request::StartRing(ring.config(kind)), &fds);
    assert_eq!(reply, Reply::Ok, "{kind:?} ring start");
}

#[test]
fn a_worker_driven_with_the_public_kit_moves_frames_both_ways() {
    let mem = Arc::new(
        GuestMemory::new(&[
            RegionLayout::new(0x4_0000_0000, 1 << 20),
            RegionLayout {
                gpa: 0x8_0000_0000,
                size: 1 << 20,
                file_offset: 1 << 20,
            },
        ])
        .expect("guest memory"),
    );
    let mut rings = BumpAllocator::new(&mem.regions()[0]);
    let mut tx = RingDriver::new(mem.clone(), RingLayout::alloc(&mut rings, 64).unwrap());
    let mut rx = RingDriver::new(mem.clone(), RingLayout::alloc(&mut rings, 64).unwrap());
    let mut bufs = BumpAllocator::new(&mem.regions()[1]);

    let (ours, theirs) = Channel::pair().expect("channel pair");
    let worker = std::thread::spawn(move || serve_worker(0, OwnedFd::from(theirs)));
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        queue_pair: 0,
    };
    assert!(matches!(call(&ours, &hello, &[]), Reply::Hello { .. }));
    let table = Request::SetMemTable {
        regions: mem.memory_table(),
    };
    assert_eq!(call(&ours, &table, &mem.fds()), Reply::Ok);
    let (tap, peer) = dgram_fds();
    let peer = Peer::new(peer);
    assert_eq!(
        call(
            &ours,
            &Request::AttachFrameIo {
                kind: FrameIoKind::Tap
            },
            &[tap.as_fd()]
        ),
        Reply::Ok
    );
    start(&ours, &tx, RingKind::Tx);
    start(&ours, &rx, RingKind::Rx);

    // Guest -> TAP.
    let mut frame = vec![0u8; 12];
    frame.extend((0..200u32).map(|i| i as u8));
    let at = bufs.alloc(2048, 16).unwrap();
    mem.write(at, &frame);
    let head = tx.add_chain(&[desc(at, frame.len() as u32, 0, 0)]);
    tx.kick();
    assert_eq!(
        peer.recv_frame_within(Duration::from_secs(5)).as_deref(),
        Some(&frame[..])
    );
    wait_for("the TX chain used", || tx.used_idx() == 1);
    assert_eq!(
        tx.pop_used(),
        Some(UsedElem {
            id: head.into(),
            len: 0
        })
    );

    // TAP -> guest.
    let at = bufs.alloc(2048, 16).unwrap();
    let head = rx.add_chain(&[desc(at, 2048, F_WRITE, 0)]);
    rx.kick();
    peer.send_frame(&frame);
    wait_for("the RX frame", || rx.used_idx() == 1);
    let used = rx.pop_used().expect("a used entry");
    assert_eq!(
        used,
        UsedElem {
            id: head.into(),
            len: frame.len() as u32
        }
    );
    assert_eq!(mem.read(at + 12, 200), frame[12..]);

    let stop = Request::StopRing { kind: RingKind::Tx };
    assert_eq!(
        call(&ours, &stop, &[]),
        Reply::RingStopped { next_avail: 1 }
    );
    assert_eq!(call(&ours, &Request::Shutdown, &[]), Reply::Ok);
    worker.join().expect("worker thread").expect("clean exit");
}
