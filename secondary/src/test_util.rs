//! Test fixtures: anonymous guest memory at a high address, a split ring laid
//! out with virtio-queue's mock building blocks, and a unix datagram
//! socketpair standing in for the TAP (same one-message-per-frame
//! boundaries).
//!
//! Guest memory is two adjacent 2 MiB regions at 4 GiB, so nothing can pass
//! by assuming memory starts at 0, and buffers can straddle two regions.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use qpnet_ipc::{RingConfig, RingKind};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::guest_memory::GuestMemoryMap;
use crate::ring::Ring;
use crate::tap::Tap;

/// Start of guest memory.
pub const MEM_BASE: u64 = 0x1_0000_0000;
/// Size of each of the two regions.
pub const REGION_SIZE: u64 = 0x20_0000;
/// Where tests put frame buffers (rings live below).
pub const BUF_BASE: u64 = MEM_BASE + 0x10_0000;
/// Descriptor flags.
pub const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// Descriptor flags.
pub const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor flags.
pub const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Where a second ring can live (the first is at [`MEM_BASE`]).
pub const SECOND_RING: u64 = MEM_BASE + 0x8_0000;
const AVAIL_OFFSET: u64 = 0x4_0000;
const USED_OFFSET: u64 = 0x6_0000;

/// A raw descriptor.
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// Anonymous guest memory.
pub struct TestMemory {
    /// The map under test.
    pub map: GuestMemoryMap,
}

impl TestMemory {
    /// Two adjacent regions at [`MEM_BASE`].
    pub fn new() -> TestMemory {
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(MEM_BASE), REGION_SIZE as usize),
            (GuestAddress(MEM_BASE + REGION_SIZE), REGION_SIZE as usize),
        ])
        .expect("anonymous guest memory");
        TestMemory {
            map: GuestMemoryMap::from_mmap(mmap),
        }
    }

    /// The same layout backed by a 4 MiB memfd (returned, for a worker):
    /// region 0 at file offset 0, region 1 at 2 MiB.
    pub fn shared() -> (TestMemory, OwnedFd, [qpnet_ipc::MemoryRegion; 2]) {
        let fd = nix::sys::memfd::memfd_create(c"qpnet-guest", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd_create");
        nix::unistd::ftruncate(&fd, 2 * REGION_SIZE as i64).expect("ftruncate");
        let regions = [
            qpnet_ipc::MemoryRegion {
                guest_phys_addr: MEM_BASE,
                size: REGION_SIZE,
                mmap_offset: 0,
            },
            qpnet_ipc::MemoryRegion {
                guest_phys_addr: MEM_BASE + REGION_SIZE,
                size: REGION_SIZE,
                mmap_offset: REGION_SIZE,
            },
        ];
        let map = GuestMemoryMap::map_regions(
            &regions,
            vec![fd.try_clone().unwrap(), fd.try_clone().unwrap()],
        )
        .expect("map memfd");
        (TestMemory { map }, fd, regions)
    }

    /// The vm-memory view.
    pub fn vm(&self) -> &GuestMemoryMmap<()> {
        self.map.vm()
    }

    /// First address of the second region.
    pub fn region_boundary(&self) -> u64 {
        MEM_BASE + REGION_SIZE
    }

    /// Write bytes at a guest address.
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        self.vm()
            .write_slice(bytes, GuestAddress(gpa))
            .expect("test write");
    }

    /// Read bytes at a guest address.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.vm()
            .read_slice(&mut v, GuestAddress(gpa))
            .expect("test read");
        v
    }

    /// Store descriptor `index` of the table at `table`.
    pub fn write_desc(&self, table: u64, index: u16, d: RawDescriptor) {
        self.vm()
            .write_obj(d, GuestAddress(table + 16 * u64::from(index)))
            .expect("test descriptor write");
    }
}

/// A split ring the test drives as the guest would.
pub struct TestRing<'a> {
    desc: DescriptorTable<'a, GuestMemoryMmap>,
    avail: AvailRing<'a, GuestMemoryMmap>,
    used: UsedRing<'a, GuestMemoryMmap>,
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    heads: Vec<u16>,
    kick: OwnedFd,
    call: OwnedFd,
}

impl<'a> TestRing<'a> {
    /// An empty ring of `size` entries (at most 16384) at [`MEM_BASE`].
    pub fn new(m: &'a TestMemory, size: u16) -> TestRing<'a> {
        Self::new_at(m, size, MEM_BASE)
    }

    /// An empty ring of `size` entries with its descriptor table at `base`.
    pub fn new_at(m: &'a TestMemory, size: u16, base: u64) -> TestRing<'a> {
        let flags = EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC;
        TestRing {
            desc: DescriptorTable::new(m.vm(), GuestAddress(base), size),
            avail: AvailRing::new(m.vm(), GuestAddress(base + AVAIL_OFFSET), size),
            used: UsedRing::new(m.vm(), GuestAddress(base + USED_OFFSET), size),
            base,
            size,
            next_desc: 0,
            avail_idx: 0,
            heads: Vec::new(),
            kick: new_eventfd(flags),
            call: new_eventfd(flags),
        }
    }

    /// Make a chain available; its descriptors take the next free table
    /// slots and are linked in order (the `next` fields given are ignored).
    pub fn add_chain(&mut self, descs: &[RawDescriptor]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let d = Descriptor::from(*d);
            let index = self.slot(i);
            let (flags, next) = if i + 1 < descs.len() {
                (d.flags() | F_NEXT, self.slot(i + 1))
            } else {
                (d.flags() & !F_NEXT, 0)
            };
            let linked = Descriptor::new(d.addr().0, d.len(), flags, next);
            self.desc.store(index, RawDescriptor::from(linked)).unwrap();
        }
        self.next_desc = self.slot(descs.len());
        self.publish(head);
        head
    }

    /// Make a chain available with its descriptors stored in the next free
    /// slots exactly as given, `next` fields included (to build loops and
    /// bad links; see [`TestRing::next_slot`]).
    pub fn add_chain_raw(&mut self, descs: &[RawDescriptor]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            self.desc.store(self.slot(i), *d).unwrap();
        }
        self.next_desc = self.slot(descs.len());
        self.publish(head);
        head
    }

    /// The table slot the next chain starts at.
    pub fn next_slot(&self) -> u16 {
        self.next_desc
    }

    /// Put `head` in the avail ring and bump its index.
    pub fn publish(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        self.avail.ring().ref_at(slot).unwrap().store(head.to_le());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.avail.idx().store(self.avail_idx.to_le());
        self.heads.push(head);
    }

    /// Overwrite the avail index (to make it jump).
    pub fn set_avail_idx(&mut self, _m: &TestMemory, idx: u16) {
        self.avail_idx = idx;
        self.avail.idx().store(idx.to_le());
    }

    /// Write the avail ring's flags (VRING_AVAIL_F_NO_INTERRUPT = 1).
    pub fn set_avail_flags(&self, m: &TestMemory, flags: u16) {
        m.write(self.base + AVAIL_OFFSET, &flags.to_le_bytes());
    }

    /// Write `used_event` (EVENT_IDX: interrupt once this entry is used).
    pub fn set_used_event(&self, m: &TestMemory, idx: u16) {
        let at = self.base + AVAIL_OFFSET + 4 + 2 * u64::from(self.size);
        m.write(at, &idx.to_le_bytes());
    }

    /// The used ring's index as the guest sees it.
    pub fn used_idx(&self, m: &TestMemory) -> u16 {
        let b = m.read(self.base + USED_OFFSET + 2, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Heads made available so far, in order.
    pub fn heads(&self) -> Vec<u16> {
        self.heads.clone()
    }

    /// The used ring's entries so far: (head, len).
    pub fn used(&self, _m: &TestMemory) -> Vec<(u16, u32)> {
        let n = u16::from_le(self.used.idx().load());
        (0..n)
            .map(|i| {
                let e = self
                    .used
                    .ring()
                    .ref_at(usize::from(i % self.size))
                    .unwrap()
                    .load();
                (e.id() as u16, e.len())
            })
            .collect()
    }

    /// Used entry number `i` (modulo the ring size): (head, len).
    pub fn used_entry(&self, i: u16) -> (u16, u32) {
        let e = self
            .used
            .ring()
            .ref_at(usize::from(i % self.size))
            .unwrap()
            .load();
        (e.id() as u16, e.len())
    }

    /// Whether the call eventfd was written since the last look.
    pub fn interrupted(&self) -> bool {
        let mut b = [0u8; 8];
        nix::unistd::read(&self.call, &mut b).is_ok()
    }

    /// Kick the ring as the guest would.
    pub fn kick(&self) {
        nix::unistd::write(&self.kick, &1u64.to_ne_bytes()).unwrap();
    }

    /// The configuration a primary would send for this ring.
    pub fn config(&self, kind: RingKind) -> RingConfig {
        RingConfig {
            kind,
            size: self.size,
            desc_table: self.base,
            avail_ring: self.base + AVAIL_OFFSET,
            used_ring: self.base + USED_OFFSET,
            next_avail: 0,
            has_call: true,
            signal_on_start: false,
        }
    }

    /// Copies of the kick and call eventfds.
    pub fn fds(&self) -> Vec<OwnedFd> {
        vec![
            self.kick.try_clone().unwrap(),
            self.call.try_clone().unwrap(),
        ]
    }

    /// Start a [`Ring`] on this layout.
    pub fn start(&self, m: &TestMemory, event_idx: bool) -> Ring {
        Ring::start(&self.config(RingKind::Tx), event_idx, self.fds(), &m.map).expect("ring start")
    }

    fn slot(&self, i: usize) -> u16 {
        ((usize::from(self.next_desc) + i) % usize::from(self.size)) as u16
    }
}

/// The test's end of the TAP stand-in.
pub struct Peer {
    fd: OwnedFd,
}

impl Peer {
    /// Receive one frame (one must be waiting).
    pub fn recv_frame(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 128 * 1024];
        let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).expect("a frame");
        buf.truncate(n);
        buf
    }

    /// Wait up to `timeout` for a frame.
    pub fn recv_frame_within(&self, timeout: std::time::Duration) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + timeout;
        while self.is_empty() {
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Some(self.recv_frame())
    }

    /// Whether no frame waits.
    pub fn is_empty(&self) -> bool {
        let mut b = [0u8; 1];
        recv(
            self.fd.as_raw_fd(),
            &mut b,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK,
        )
        .is_err()
    }

    /// Send one frame towards the worker.
    pub fn send_frame(&self, frame: &[u8]) {
        send(self.fd.as_raw_fd(), frame, MsgFlags::MSG_DONTWAIT).expect("send frame");
    }
}

/// A TAP stand-in and its peer.
pub fn dgram_pair() -> (Tap, Peer) {
    let (a, b) = dgram_fds();
    (Tap::attach(a).expect("tap attach"), Peer { fd: b })
}

/// A raw unix datagram socketpair.
pub fn dgram_fds() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::Datagram,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair")
}

/// Wrap a raw fd as a peer.
pub fn peer(fd: OwnedFd) -> Peer {
    Peer { fd }
}

/// Poll `cond` every millisecond for up to five seconds.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A fresh eventfd.
pub fn new_eventfd(flags: EfdFlags) -> OwnedFd {
    let fd = EventFd::from_value_and_flags(0, flags).expect("eventfd");
    OwnedFd::from(fd)
}
