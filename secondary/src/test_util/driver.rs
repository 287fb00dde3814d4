//! The driver (guest) side of one split virtqueue, over [`GuestMemory`].
//!
//! Layout (virtio 1.x, split ring) for a queue of `size` entries:
//!
//! ```text
//! descriptor table  16 * size bytes, align 16: { addr u64, len u32, flags u16, next u16 }
//! avail ring        6 + 2 * size bytes, align 2: flags, idx, ring[size], used_event
//! used ring         6 + 8 * size bytes, align 4: flags, idx, ring[size] { id u32, len u32 }, avail_event
//! ```
//!
//! The driver writes descriptors and avail entries, then publishes them by
//! storing `avail.idx` between fences; it reads `used.idx` between fences
//! before reading used entries. Indices are free-running u16s (entry = idx %
//! size). This is all a device sees of a guest, so besides the well-behaved
//! calls ([`RingDriver::add_chain`], [`RingDriver::pop_used`]) the raw ones
//! ([`RingDriver::add_chain_raw`], [`RingDriver::write_desc`],
//! [`RingDriver::set_avail_idx`], [`RingDriver::add_indirect`]) build the
//! hostile input of refusal tests: loops, bad links, jumps, indirect tables.
//! Each driver owns its ring's kick and call eventfds (nonblocking).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use qpnet_ipc::{RingConfig, RingKind};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

use super::memory::{BumpAllocator, GuestMemory};

/// Descriptor flag: the chain continues at `next`.
pub const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the device writes this buffer.
pub const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer is a table of descriptors.
pub const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
/// Size of one descriptor table entry.
pub const DESC_SIZE: u64 = 16;

/// One descriptor table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Desc {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// `F_*` flags.
    pub flags: u16,
    /// Next descriptor index when [`F_NEXT`] is set.
    pub next: u16,
}

/// A descriptor (shorthand for the struct literal).
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
    Desc {
        addr,
        len,
        flags,
        next,
    }
}

impl Desc {
    /// The 16-byte little-endian wire form.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// One used ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index of the completed chain.
    pub id: u32,
    /// Bytes the device wrote into the chain.
    pub len: u32,
}

/// Guest-physical addresses of a ring's three parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Number of entries (a power of two for a valid ring).
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Avail ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

impl RingLayout {
    /// The three parts back to back from `base` (16-aligned), each at its
    /// spec alignment.
    pub fn packed(base: u64, size: u16) -> RingLayout {
        let n = u64::from(size);
        let avail = base + DESC_SIZE * n;
        RingLayout {
            size,
            desc: base,
            avail,
            used: (avail + 6 + 2 * n + 3) & !3,
        }
    }

    /// Allocate the three parts of a `size`-entry ring; `None` when the
    /// allocator's region is exhausted.
    pub fn alloc(alloc: &mut BumpAllocator, size: u16) -> Option<RingLayout> {
        let n = u64::from(size);
        Some(RingLayout {
            size,
            desc: alloc.alloc(DESC_SIZE * n, 16)?,
            avail: alloc.alloc(6 + 2 * n, 2)?,
            used: alloc.alloc(6 + 8 * n, 4)?,
        })
    }

    /// Bytes from `desc` to the end of the used ring when packed.
    pub fn packed_len(size: u16) -> u64 {
        let l = RingLayout::packed(0, size);
        l.used + 6 + 8 * u64::from(size)
    }

    /// Address of avail ring entry `i` (modulo the size).
    pub fn avail_entry(&self, i: u16) -> u64 {
        self.avail + 4 + 2 * u64::from(i % self.size)
    }

    /// Address of `used_event` (after the avail ring's entries).
    pub fn used_event(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }

    /// Address of used ring entry `i` (modulo the size).
    pub fn used_entry(&self, i: u16) -> u64 {
        self.used + 4 + 8 * u64::from(i % self.size)
    }

    /// Address of `avail_event` (after the used ring's entries).
    pub fn avail_event(&self) -> u64 {
        self.used + 4 + 8 * u64::from(self.size)
    }
}

/// The driver's view of one split virtqueue, with its eventfds.
#[derive(Debug)]
pub struct RingDriver {
    mem: Arc<GuestMemory>,
    layout: RingLayout,
    /// Table slot the next `add_chain` starts at.
    next_desc: u16,
    next_avail: u16,
    last_used: u16,
    heads: Vec<u16>,
    kick: OwnedFd,
    call: OwnedFd,
}

impl RingDriver {
    /// Start a ring on `layout`: its memory zeroed, indices at 0, fresh
    /// nonblocking kick and call eventfds.
    ///
    /// # Panics
    /// If the ring is not inside `mem`, or eventfds cannot be created.
    pub fn new(mem: Arc<GuestMemory>, layout: RingLayout) -> RingDriver {
        let n = usize::from(layout.size);
        mem.fill(layout.desc, 16 * n, 0);
        mem.fill(layout.avail, 6 + 2 * n, 0);
        mem.fill(layout.used, 6 + 8 * n, 0);
        RingDriver {
            mem,
            layout,
            next_desc: 0,
            next_avail: 0,
            last_used: 0,
            heads: Vec::new(),
            kick: new_eventfd(),
            call: new_eventfd(),
        }
    }

    /// The ring's addresses.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The guest memory the ring lives in.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// A read-only view of the ring's indices, for another thread.
    pub fn probe(&self) -> RingProbe {
        RingProbe::new(self.mem.clone(), self.layout)
    }

    // ---- descriptors ---------------------------------------------------

    /// Write descriptor `index` of the ring's table. Not bounded by the
    /// table size beyond guest memory itself: hostile tests use this too.
    pub fn write_desc(&self, index: u16, d: Desc) {
        self.mem.write_desc(self.layout.desc, index, d);
    }

    /// Make a chain available; its descriptors take the next free table
    /// slots (wrapping) and are linked in order: the `next` fields given are
    /// ignored and [`F_NEXT`] is set on all but the last. Returns the head.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let linked = if i + 1 < descs.len() {
                desc(d.addr, d.len, d.flags | F_NEXT, self.slot(i + 1))
            } else {
                desc(d.addr, d.len, d.flags & !F_NEXT, 0)
            };
            self.write_desc(self.slot(i), linked);
        }
        self.next_desc = self.slot(descs.len());
        self.make_available(head);
        head
    }

    /// Make a chain available with its descriptors stored in the next free
    /// slots exactly as given, `next` fields and flags included (loops, bad
    /// links; see [`RingDriver::next_slot`]). Returns the head.
    pub fn add_chain_raw(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            self.write_desc(self.slot(i), *d);
        }
        self.next_desc = self.slot(descs.len());
        self.make_available(head);
        head
    }

    /// Write `descs` as an indirect table at `table` (linked in order, like
    /// [`RingDriver::add_chain`]) and make a one-descriptor chain pointing to
    /// it available. Returns the head.
    pub fn add_indirect(&mut self, table: u64, descs: &[Desc]) -> u16 {
        for (i, d) in descs.iter().enumerate() {
            let linked = if i + 1 < descs.len() {
                desc(d.addr, d.len, d.flags | F_NEXT, i as u16 + 1)
            } else {
                desc(d.addr, d.len, d.flags & !F_NEXT, 0)
            };
            self.mem.write_desc(table, i as u16, linked);
        }
        let len = (DESC_SIZE * descs.len() as u64) as u32;
        self.add_chain_raw(&[desc(table, len, F_INDIRECT, 0)])
    }

    /// The table slot the next chain starts at.
    pub fn next_slot(&self) -> u16 {
        self.next_desc
    }

    // ---- avail ring ----------------------------------------------------

    /// Put `head` in the next avail slot; the device sees it only after
    /// [`RingDriver::publish`].
    pub fn push_avail(&mut self, head: u16) {
        self.mem
            .store_u16(self.layout.avail_entry(self.next_avail), head);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.heads.push(head);
    }

    /// Make every pushed entry visible: fence, then `avail.idx`.
    pub fn publish(&self) {
        fence(Ordering::SeqCst);
        self.mem.store_u16(self.layout.avail + 2, self.next_avail);
        fence(Ordering::SeqCst);
    }

    /// Push `head` and publish it.
    pub fn make_available(&mut self, head: u16) {
        self.push_avail(head);
        self.publish();
    }

    /// Hostile hook: store any value as `avail.idx` (and make it the
    /// driver's own idea of the next avail index).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.next_avail = idx;
        self.publish();
    }

    /// The avail index the driver has published (or will publish next).
    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }

    /// Write the avail ring's flags (`VRING_AVAIL_F_NO_INTERRUPT` = 1).
    pub fn set_avail_flags(&self, flags: u16) {
        self.mem.store_u16(self.layout.avail, flags);
    }

    /// Write `used_event` (EVENT_IDX: interrupt once entry `idx` is used).
    pub fn set_used_event(&self, idx: u16) {
        self.mem.store_u16(self.layout.used_event(), idx);
    }

    /// Heads made available so far, in order.
    pub fn heads(&self) -> Vec<u16> {
        self.heads.clone()
    }

    // ---- used ring -----------------------------------------------------

    /// The device's `used.idx`.
    pub fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        let v = self.mem.load_u16(self.layout.used + 2);
        fence(Ordering::SeqCst);
        v
    }

    /// The used ring's flags (`VRING_USED_F_NO_NOTIFY` = 1: the device asks
    /// not to be kicked).
    pub fn used_flags(&self) -> u16 {
        self.mem.load_u16(self.layout.used)
    }

    /// The device's `avail_event` (EVENT_IDX: kick after that avail entry).
    pub fn avail_event(&self) -> u16 {
        self.mem.load_u16(self.layout.avail_event())
    }

    /// Used entry number `i` (modulo the size), whether published or not.
    pub fn used_entry(&self, i: u16) -> UsedElem {
        let at = self.layout.used_entry(i);
        UsedElem {
            id: self.mem.load_u32(at),
            len: self.mem.load_u32(at + 4),
        }
    }

    /// The published used entries from index 0 (a ring that has not wrapped
    /// yet), as (head, len).
    pub fn used(&self) -> Vec<(u16, u32)> {
        (0..self.used_idx())
            .map(|i| {
                let e = self.used_entry(i);
                (e.id as u16, e.len)
            })
            .collect()
    }

    /// The next used entry, if the device has published one. Like Linux's
    /// driver it then asks for an interrupt at the very next used entry
    /// (writes `used_event`; meaningful with EVENT_IDX).
    pub fn pop_used(&mut self) -> Option<UsedElem> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let elem = self.used_entry(self.last_used);
        self.last_used = self.last_used.wrapping_add(1);
        self.set_used_event(self.last_used);
        Some(elem)
    }

    /// The used index up to which the driver has consumed entries.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Chains made available and not yet popped used.
    pub fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.last_used)
    }

    // ---- notifications -------------------------------------------------

    /// Kick the device, as the guest would.
    pub fn kick(&self) {
        nix::unistd::write(&self.kick, &1u64.to_ne_bytes()).expect("kick");
    }

    /// Whether the device wrote the call eventfd since the last look
    /// (clears it).
    pub fn interrupted(&self) -> bool {
        let mut b = [0u8; 8];
        nix::unistd::read(&self.call, &mut b).is_ok()
    }

    /// Sleep until the device signals or `timeout` passes; then clear the
    /// signal. Returns whether it signalled.
    pub fn wait_call(&self, timeout: Duration) -> bool {
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut pfd = [PollFd::new(self.call.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut pfd, PollTimeout::from(ms));
        self.interrupted()
    }

    /// The kick eventfd.
    pub fn kick_fd(&self) -> BorrowedFd<'_> {
        self.kick.as_fd()
    }

    /// The call eventfd.
    pub fn call_fd(&self) -> BorrowedFd<'_> {
        self.call.as_fd()
    }

    /// Copies of the kick and call eventfds, kick first (as `StartRing`
    /// carries them).
    pub fn fds(&self) -> Vec<OwnedFd> {
        vec![
            self.kick.try_clone().expect("dup kick"),
            self.call.try_clone().expect("dup call"),
        ]
    }

    /// Copies of the kick and call eventfds as vmm-sys-util `EventFd`s, the
    /// type the vhost crate's frontend takes (`set_vring_kick/call`).
    pub fn vmm_eventfds(
        &self,
    ) -> io::Result<(
        vmm_sys_util::eventfd::EventFd,
        vmm_sys_util::eventfd::EventFd,
    )> {
        let wrap = |fd: &OwnedFd| -> io::Result<vmm_sys_util::eventfd::EventFd> {
            let raw = fd.try_clone()?.into_raw_fd();
            // SAFETY: `raw` is a freshly duplicated eventfd that nothing
            // else owns; the EventFd takes ownership and closes it.
            Ok(unsafe { vmm_sys_util::eventfd::EventFd::from_raw_fd(raw) })
        };
        Ok((wrap(&self.kick)?, wrap(&self.call)?))
    }

    /// The configuration a primary would send a worker for this ring
    /// (starting at avail index 0, with its call eventfd).
    pub fn config(&self, kind: RingKind) -> RingConfig {
        RingConfig {
            kind,
            size: self.layout.size,
            desc_table: self.layout.desc,
            avail_ring: self.layout.avail,
            used_ring: self.layout.used,
            next_avail: 0,
            has_call: true,
            has_err: false,
            signal_on_start: false,
        }
    }

    fn slot(&self, i: usize) -> u16 {
        ((usize::from(self.next_desc) + i) % usize::from(self.layout.size)) as u16
    }
}

/// The two indices of a ring, read straight from guest memory: for an
/// observer (a watcher thread, a test's control thread) while a
/// [`RingDriver`] elsewhere drives the ring. Plain volatile loads, no fences
/// and no driver state: each read is a snapshot of what the ring holds.
#[derive(Debug, Clone)]
pub struct RingProbe {
    mem: Arc<GuestMemory>,
    layout: RingLayout,
}

impl RingProbe {
    /// A probe of the ring at `layout` in `mem`.
    pub fn new(mem: Arc<GuestMemory>, layout: RingLayout) -> RingProbe {
        RingProbe { mem, layout }
    }

    /// The ring's addresses.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The `avail.idx` the driver published.
    pub fn avail_idx(&self) -> u16 {
        self.mem.load_u16(self.layout.avail + 2)
    }

    /// The `used.idx` the device published.
    pub fn used_idx(&self) -> u16 {
        self.mem.load_u16(self.layout.used + 2)
    }
}

fn new_eventfd() -> OwnedFd {
    let flags = EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC;
    OwnedFd::from(EventFd::from_value_and_flags(0, flags).expect("eventfd"))
}
