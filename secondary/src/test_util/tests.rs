//! Tests of the test kit itself: the layouts follow the virtio spec, and
//! the guest's side and the worker's map see the same bytes.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::*;
use crate::chain::{walk_chain, Access, DescTable};
use crate::iovecs::IoVecBuf;

#[test]
fn regions_translate_and_share_pages_with_the_memfd() {
    let mem = GuestMemory::new(&[
        RegionLayout::new(MEM_BASE, 1 << 20),
        RegionLayout {
            gpa: MEM_BASE + (16 << 20),
            size: 2 << 20,
            file_offset: 1 << 20,
        },
    ])
    .unwrap();
    let table = mem.memory_table();
    assert_eq!(table[1].guest_phys_addr, MEM_BASE + (16 << 20));
    assert_eq!(table[1].mmap_offset, 1 << 20);
    let r1 = &mem.regions()[1];
    assert_eq!(
        mem.vmm_addr(MEM_BASE + (16 << 20) + 10),
        Some(r1.vmm_addr() + 10)
    );
    assert_eq!(
        mem.vmm_addr(MEM_BASE + (1 << 20)),
        None,
        "gap between regions"
    );
    mem.write(MEM_BASE + (16 << 20) + 100, b"hello");
    // A second mapping of the same memfd (as a worker makes) sees it, at the
    // region's file offset.
    let mut seen = [0u8; 5];
    r1.file().read_exact_at(&mut seen, (1 << 20) + 100).unwrap();
    assert_eq!(&seen, b"hello");
    let map = mem.map();
    assert_eq!(
        map.read_array::<5>(MEM_BASE + (16 << 20) + 100),
        Some(*b"hello")
    );
    assert!(map.write_bytes(MEM_BASE + 8, b"worker"));
    assert_eq!(mem.read(MEM_BASE + 8, 6), b"worker");
    mem.store_u16(MEM_BASE + 2, 0xbeef);
    assert_eq!(mem.load_u16(MEM_BASE + 2), 0xbeef);
    let mut a = BumpAllocator::new(&mem.regions()[0]);
    assert_eq!(a.alloc(3, 1), Some(MEM_BASE));
    assert_eq!(a.alloc(16, 16), Some(MEM_BASE + 16));
    assert_eq!(a.alloc(1 << 20, 1), None);
}

#[test]
fn bytes_straddle_adjacent_regions() {
    let m = TestMemory::new();
    let at = m.region_boundary() - 3;
    m.write(at, &[1, 2, 3, 4, 5, 6]);
    assert_eq!(m.read(at, 6), [1, 2, 3, 4, 5, 6]);
    m.fill(at + 1, 4, 9);
    assert_eq!(m.read(at, 6), [1, 9, 9, 9, 9, 6]);
    assert_eq!(m.map.read_array::<6>(at), Some([1, 9, 9, 9, 9, 6]));
}

#[test]
fn ring_layout_and_indices_follow_the_spec() {
    let mem = Arc::new(GuestMemory::new(&[RegionLayout::new(MEM_BASE, 1 << 20)]).unwrap());
    let mut alloc = BumpAllocator::new(&mem.regions()[0]);
    let layout = RingLayout::alloc(&mut alloc, 256).unwrap();
    assert_eq!(layout.desc % 16, 0);
    assert_eq!(layout.avail, layout.desc + 16 * 256);
    assert_eq!(layout.used % 4, 0);
    assert!(layout.used >= layout.avail + 6 + 2 * 256);
    assert_eq!(RingLayout::packed(layout.desc, 256), layout);
    let mut q = RingDriver::new(mem.clone(), layout);
    q.write_desc(3, desc(0x1122_3344_5566_7788, 0x99aa_bbcc, F_NEXT, 4));
    assert_eq!(
        mem.read(layout.desc + 48, 16),
        [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xcc, 0xbb, 0xaa, 0x99, 1, 0, 4, 0]
    );
    for i in 0..300u16 {
        q.push_avail(i % 256);
    }
    q.publish();
    assert_eq!(mem.load_u16(layout.avail + 2), 300);
    // Entry 299 wrapped to slot 43.
    assert_eq!(mem.load_u16(layout.avail + 4 + 2 * 43), 299 % 256);
    // Play device: complete two chains.
    mem.write(layout.used + 4, &[7, 0, 0, 0, 64, 0, 0, 0]);
    mem.write(layout.used + 12, &[9, 0, 0, 0, 0, 1, 0, 0]);
    mem.store_u16(layout.used + 2, 2);
    assert_eq!(q.used(), vec![(7, 64), (9, 256)]);
    assert_eq!(q.pop_used(), Some(UsedElem { id: 7, len: 64 }));
    assert_eq!(q.pop_used(), Some(UsedElem { id: 9, len: 256 }));
    assert_eq!(q.pop_used(), None);
    assert_eq!(mem.load_u16(layout.avail + 4 + 2 * 256), 2, "used_event");
    assert_eq!(q.in_flight(), 298);
    mem.store_u16(layout.used + 4 + 8 * 256, 77);
    assert_eq!(q.avail_event(), 77);
    let probe = q.probe();
    assert_eq!((probe.avail_idx(), probe.used_idx()), (300, 2));
    assert_eq!(probe.layout(), layout);
    // A probe sees what the ring holds, not what the driver thinks.
    q.set_avail_idx(7);
    mem.store_u16(layout.used + 2, 3);
    let seen = std::thread::spawn(move || (probe.avail_idx(), probe.used_idx()));
    assert_eq!(seen.join().unwrap(), (7, 3));
}

#[test]
fn chains_are_linked_wrap_around_and_walk_as_the_worker_walks_them() {
    let m = TestMemory::new();
    let mut q = m.ring(4);
    let walk = |q: &RingDriver, head: u16, access: Access| {
        let mut buf = IoVecBuf::new();
        let mut out = buf.bind(&m.map);
        let table = DescTable {
            addr: q.layout().desc,
            size: q.layout().size,
        };
        walk_chain(&m.map, table, head, access, &mut out).map(|_| out.total())
    };
    let a = q.add_chain(&[desc(BUF_BASE, 10, 0, 0), desc(BUF_BASE, 20, 0, 0)]);
    assert_eq!(walk(&q, a, Access::DeviceReads), Ok(30));
    // Three more descriptors: slots 2, 3 and (wrapping) 0.
    let b = q.add_chain(&[
        desc(BUF_BASE, 1, F_WRITE, 0),
        desc(BUF_BASE, 2, F_WRITE, 0),
        desc(BUF_BASE, 4, F_WRITE, 0),
    ]);
    assert_eq!((b, q.next_slot()), (2, 1));
    assert_eq!(walk(&q, b, Access::DeviceWrites), Ok(7));
    let c = q.add_indirect(
        BUF_BASE + 0x1000,
        &[desc(BUF_BASE, 100, 0, 0), desc(BUF_BASE, 200, 0, 0)],
    );
    assert_eq!(walk(&q, c, Access::DeviceReads), Ok(300));
    assert_eq!(q.heads(), vec![a, b, c]);
    assert_eq!(q.avail_idx(), 3);
    // Raw: a loop the worker refuses.
    let s = q.next_slot();
    let d = q.add_chain_raw(&[
        desc(BUF_BASE, 1, F_NEXT, s + 1),
        desc(BUF_BASE, 1, F_NEXT, s),
    ]);
    assert!(walk(&q, d, Access::DeviceReads).is_err());
}

#[test]
fn kicks_interrupts_and_event_fields() {
    let m = TestMemory::new();
    let q = m.ring(8);
    assert!(!q.interrupted());
    nix::unistd::write(q.call_fd(), &1u64.to_ne_bytes()).unwrap();
    assert!(q.wait_call(std::time::Duration::from_secs(1)));
    assert!(!q.interrupted(), "cleared");
    q.kick();
    let mut b = [0u8; 8];
    assert_eq!(nix::unistd::read(q.kick_fd(), &mut b), Ok(8));
    q.set_used_event(5);
    assert_eq!(m.load_u16(q.layout().used_event()), 5);
    q.set_avail_flags(1);
    assert_eq!(m.load_u16(q.layout().avail), 1);
    assert_eq!(q.used_flags(), 0);
    let (kick, _call) = q.vmm_eventfds().unwrap();
    kick.write(1).unwrap();
    assert_eq!(nix::unistd::read(q.kick_fd(), &mut b), Ok(8));
    let cfg = q.config(qpnet_ipc::RingKind::Rx);
    assert_eq!((cfg.size, cfg.desc_table), (8, q.layout().desc));
    assert_eq!(q.fds().len(), 2);
}
