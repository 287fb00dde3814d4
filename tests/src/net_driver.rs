//! A minimal virtio-net driver: TX and RX queues over the secondary test
//! kit's [`RingDriver`]s (each with its own kick and call eventfds).
//!
//! TX ([`TxDriver`]): each frame goes out as a 12-byte zeroed virtio-net
//! header plus the frame, either in one descriptor or (every other frame when
//! `split_header` is on) as a two-descriptor chain header -> frame, so the
//! device's chain walking is exercised too. Slot `s` owns descriptors `2s`
//! and `2s+1` and one 2 KiB buffer. The top [`RESERVED_DESCS`] descriptors and
//! a scratch area are left for hostile-input tests, whose completions are
//! collected separately ([`TxDriver::raw_completions`]).
//!
//! RX ([`RxDriver`]): every descriptor is one device-writable buffer of a
//! chosen size. Completed buffers are reassembled into frames using
//! `num_buffers` (header offset 10) when MRG_RXBUF is negotiated, and posted
//! again at once.
//!
//! The driver always kicks after publishing (spurious kicks are harmless) and
//! finds completions by polling the used ring, sleeping on the call eventfd
//! in between, so it works with and without EVENT_IDX.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use qpnet_secondary::test_util::{desc, Desc, RingDriver, UsedElem, F_NEXT, F_WRITE};

/// Size of the virtio-net header with VERSION_1 (num_buffers included).
pub const NET_HDR_LEN: usize = 12;
/// Size of one TX slot's buffer.
pub const TX_BUF_SIZE: u64 = 2048;
/// Descriptors at the top of a TX table kept for hostile-input tests.
pub const RESERVED_DESCS: u16 = 16;
/// Size of a TX queue's scratch area for hostile-input tests.
pub const SCRATCH_SIZE: u64 = 64 << 10;

/// The guest's side of one TX queue.
#[derive(Debug)]
pub struct TxDriver {
    /// The ring and its eventfds.
    pub queue: RingDriver,
    vring: u32,
    buf_base: u64,
    scratch: u64,
    free_slots: Vec<u16>,
    slots: u16,
    split_header: bool,
    chains_sent: u64,
    raw_completions: Vec<UsedElem>,
    completed: u64,
}

impl TxDriver {
    /// A TX driver on `queue` (vring index `vring`), with its slot buffers
    /// at `buf_base` (`(size - RESERVED_DESCS) / 2` slots of [`TX_BUF_SIZE`])
    /// and a [`SCRATCH_SIZE`] scratch area at `scratch`.
    pub fn new(
        queue: RingDriver,
        vring: u32,
        buf_base: u64,
        scratch: u64,
        split_header: bool,
    ) -> Result<TxDriver> {
        let size = queue.layout().size;
        if size <= RESERVED_DESCS {
            bail!("TX queue of {size} entries is too small for the test driver");
        }
        let slots = (size - RESERVED_DESCS) / 2;
        Ok(TxDriver {
            queue,
            vring,
            buf_base,
            scratch,
            free_slots: (0..slots).rev().collect(),
            slots,
            split_header,
            chains_sent: 0,
            raw_completions: Vec::new(),
            completed: 0,
        })
    }

    /// Guest-memory bytes the slot buffers of a `size`-entry queue take.
    pub fn buffer_bytes(size: u16) -> u64 {
        u64::from((size - RESERVED_DESCS) / 2) * TX_BUF_SIZE
    }

    /// The vring index (2 * queue pair + 1).
    pub fn vring(&self) -> u32 {
        self.vring
    }

    /// Queue a frame (header + frame) if a slot is free; not published yet.
    pub fn try_push(&mut self, frame: &[u8]) -> Result<bool> {
        self.try_push_with_header(&[0; NET_HDR_LEN], frame)
    }

    /// [`TxDriver::try_push`] with the virtio-net header `header`.
    pub fn try_push_with_header(
        &mut self,
        header: &[u8; NET_HDR_LEN],
        frame: &[u8],
    ) -> Result<bool> {
        if frame.len() + NET_HDR_LEN > TX_BUF_SIZE as usize {
            bail!("frame of {} bytes does not fit a TX buffer", frame.len());
        }
        let Some(slot) = self.free_slots.pop() else {
            return Ok(false);
        };
        let mem = self.queue.memory().clone();
        let buf = self.buf_base + u64::from(slot) * TX_BUF_SIZE;
        mem.write(buf, header);
        mem.write(buf + NET_HDR_LEN as u64, frame);
        let head = 2 * slot;
        if self.split_header && self.chains_sent % 2 == 1 {
            let frame_at = buf + NET_HDR_LEN as u64;
            let hdr = desc(buf, NET_HDR_LEN as u32, F_NEXT, head + 1);
            self.queue.write_desc(head, hdr);
            let body = desc(frame_at, frame.len() as u32, 0, 0);
            self.queue.write_desc(head + 1, body);
        } else {
            let whole = desc(buf, (NET_HDR_LEN + frame.len()) as u32, 0, 0);
            self.queue.write_desc(head, whole);
        }
        self.queue.push_avail(head);
        self.chains_sent += 1;
        Ok(true)
    }

    /// Publish queued chains and kick the device.
    pub fn flush(&mut self) {
        self.queue.publish();
        self.queue.kick();
    }

    /// Collect used entries; frees slots. Returns how many test frames
    /// completed (hostile chains go to [`TxDriver::raw_completions`]).
    pub fn reap(&mut self) -> Result<usize> {
        let mut n = 0;
        while let Some(elem) = self.queue.pop_used() {
            let slot_head = elem.id < 2 * u32::from(self.slots) && elem.id % 2 == 0;
            if slot_head {
                let slot = (elem.id / 2) as u16;
                if self.free_slots.contains(&slot) {
                    bail!("device completed TX chain {} twice", elem.id);
                }
                self.free_slots.push(slot);
                n += 1;
            } else {
                self.raw_completions.push(elem);
            }
        }
        self.completed += n as u64;
        Ok(n)
    }

    /// Test frames completed so far.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Chains made available and not yet used.
    pub fn in_flight(&self) -> u16 {
        self.queue.in_flight()
    }

    /// Send every frame, waiting for free slots as needed.
    pub fn send_all(&mut self, frames: &[Vec<u8>], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut i = 0;
        while i < frames.len() {
            while i < frames.len() && self.try_push(&frames[i])? {
                i += 1;
            }
            self.flush();
            if i < frames.len() {
                self.wait_progress(deadline)?;
            }
        }
        Ok(())
    }

    /// Wait until every chain made available has been used.
    pub fn wait_idle(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.in_flight() > 0 {
            self.wait_progress(deadline)?;
        }
        Ok(())
    }

    /// Reap; if nothing completed, sleep briefly on the call fd. Fails after
    /// `deadline`.
    pub fn wait_progress(&mut self, deadline: Instant) -> Result<()> {
        if self.reap()? > 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "TX vring {}: device stopped using chains ({} in flight, avail {}, used {})",
                self.vring,
                self.in_flight(),
                self.queue.avail_idx(),
                self.queue.used_idx()
            );
        }
        self.queue.wait_call(Duration::from_millis(2));
        self.reap().map(drop)
    }

    /// Hostile hook: descriptor index `k` of the reserved range (0-based).
    pub fn reserved_desc(&self, k: u16) -> u16 {
        assert!(k < RESERVED_DESCS);
        2 * self.slots + k
    }

    /// Hostile hook: GPA of the scratch area.
    pub fn scratch(&self) -> u64 {
        self.scratch
    }

    /// Hostile hook: write arbitrary descriptors, make `head` available,
    /// publish and kick.
    pub fn push_raw_chain(&mut self, descs: &[(u16, Desc)], head: u16) {
        for &(i, d) in descs {
            self.queue.write_desc(i, d);
        }
        self.queue.push_avail(head);
        self.flush();
    }

    /// Completions of chains that were not test-frame slots.
    pub fn raw_completions(&self) -> &[UsedElem] {
        &self.raw_completions
    }
}

/// A frame received from an RX queue.
#[derive(Debug, Clone)]
pub struct RxFrame {
    /// The virtio-net header as the device wrote it.
    pub header: [u8; NET_HDR_LEN],
    /// The frame (header stripped).
    pub data: Vec<u8>,
    /// How many buffers the frame spanned.
    pub buffers: u16,
}

impl RxFrame {
    /// The header's `num_buffers` field.
    pub fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.header[10], self.header[11]])
    }
}

/// A frame being reassembled from several buffers.
#[derive(Debug)]
struct PartialFrame {
    header: [u8; NET_HDR_LEN],
    data: Vec<u8>,
    buffers: u16,
    remaining: u16,
}

/// The guest's side of one RX queue.
#[derive(Debug)]
pub struct RxDriver {
    /// The ring and its eventfds.
    pub queue: RingDriver,
    vring: u32,
    buf_base: u64,
    buf_size: u32,
    mergeable: bool,
    partial: Option<PartialFrame>,
    reserved: u16,
    raw_completions: Vec<UsedElem>,
    /// Used entries reaped so far (never wraps).
    used_total: u64,
    /// Times the device's used index was seen inside a frame.
    inside_frame: u64,
    /// With [`RxDriver::record_frame_ends`]: `used_total` after each frame.
    frame_ends: Option<Vec<u64>>,
}

impl RxDriver {
    /// An RX driver on `queue` (vring index `vring`) with one buffer of
    /// `buf_size` bytes per descriptor at `buf_base`.
    pub fn new(
        queue: RingDriver,
        vring: u32,
        buf_base: u64,
        buf_size: u32,
        mergeable: bool,
    ) -> Result<RxDriver> {
        if (buf_size as usize) < NET_HDR_LEN {
            bail!("RX buffers must hold at least the virtio-net header");
        }
        Ok(RxDriver {
            queue,
            vring,
            buf_base,
            buf_size,
            mergeable,
            partial: None,
            reserved: 0,
            raw_completions: Vec::new(),
            used_total: 0,
            inside_frame: 0,
            frame_ends: None,
        })
    }

    /// The vring index (2 * queue pair).
    pub fn vring(&self) -> u32 {
        self.vring
    }

    fn buffer(&self, id: u16) -> u64 {
        self.buf_base + u64::from(id) * u64::from(self.buf_size)
    }

    /// Make every descriptor an available writable buffer; publish; kick.
    pub fn post_all(&mut self) {
        self.post_all_except(0);
    }

    /// Hostile hook: like [`RxDriver::post_all`], but descriptors
    /// `0..reserved` are left to the test; their completions are collected
    /// in [`RxDriver::raw_completions`] and never reposted.
    pub fn post_all_except(&mut self, reserved: u16) {
        self.reserved = reserved;
        for id in reserved..self.queue.layout().size {
            let buffer = desc(self.buffer(id), self.buf_size, F_WRITE, 0);
            self.queue.write_desc(id, buffer);
            self.queue.push_avail(id);
        }
        self.queue.publish();
        self.queue.kick();
    }

    /// Reap until `n` frames arrived, waiting on the call fd in between;
    /// fails after `timeout` saying how many came.
    pub fn reap_until(&mut self, n: usize, timeout: Duration) -> Result<Vec<RxFrame>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n {
            got.extend(self.reap()?);
            if got.len() < n && Instant::now() > deadline {
                bail!(
                    "RX vring {}: {} of {n} frames after {timeout:?}",
                    self.vring,
                    got.len()
                );
            }
            self.queue.wait_call(Duration::from_millis(5));
        }
        Ok(got)
    }

    /// Collect completed buffers into frames, post the buffers again.
    pub fn reap(&mut self) -> Result<Vec<RxFrame>> {
        let mut frames = Vec::new();
        let mut reposted = false;
        while let Some(elem) = self.queue.pop_used() {
            let size = self.queue.layout().size;
            if elem.id >= u32::from(size) {
                bail!("RX vring {}: used id {} out of range", self.vring, elem.id);
            }
            if elem.len > self.buf_size && elem.id >= u32::from(self.reserved) {
                bail!(
                    "RX vring {}: device wrote {} bytes into a {}-byte buffer",
                    self.vring,
                    elem.len,
                    self.buf_size
                );
            }
            self.used_total += 1;
            let id = elem.id as u16;
            if id < self.reserved {
                self.raw_completions.push(elem);
                continue;
            }
            let mut bytes = vec![0u8; elem.len as usize];
            self.queue.memory().read_into(self.buffer(id), &mut bytes);
            self.queue.push_avail(id);
            reposted = true;
            if let Some(frame) = self.absorb(bytes)? {
                if let Some(ends) = &mut self.frame_ends {
                    ends.push(self.used_total);
                }
                frames.push(frame);
            }
        }
        // pop_used stopped at the device's used index: with a frame still
        // partial, that index was inside a frame (its num_buffers says more
        // buffers than were used), which the device must never publish.
        if self.partial.is_some() {
            self.inside_frame += 1;
        }
        if reposted {
            self.queue.publish();
            self.queue.kick();
        }
        Ok(frames)
    }

    /// How many times a reap found the device's used index inside a frame
    /// (fewer buffers used than the frame's `num_buffers`): must stay 0.
    pub fn used_index_inside_frame(&self) -> u64 {
        self.inside_frame
    }

    /// From now on, note the used-entry count at the end of every frame
    /// ([`RxDriver::take_frame_ends`]).
    pub fn record_frame_ends(&mut self) {
        self.frame_ends = Some(vec![self.used_total]);
    }

    /// The used-entry counts (since the ring started, not wrapped) at which
    /// a frame ended, since [`RxDriver::record_frame_ends`].
    pub fn take_frame_ends(&mut self) -> Vec<u64> {
        self.frame_ends.take().unwrap_or_default()
    }

    /// Completions of the test's own (reserved) descriptors.
    pub fn raw_completions(&self) -> &[UsedElem] {
        &self.raw_completions
    }

    /// GPA of the buffer that descriptor `id` normally points at.
    pub fn buffer_gpa(&self, id: u16) -> u64 {
        self.buffer(id)
    }

    /// Size of each buffer.
    pub fn buffer_size(&self) -> u32 {
        self.buf_size
    }

    fn absorb(&mut self, bytes: Vec<u8>) -> Result<Option<RxFrame>> {
        let mut part = match self.partial.take() {
            Some(mut p) => {
                p.data.extend_from_slice(&bytes);
                p.buffers += 1;
                p.remaining -= 1;
                p
            }
            None => {
                if bytes.len() < NET_HDR_LEN {
                    bail!(
                        "RX vring {}: first buffer of a frame holds {} bytes, less than the header",
                        self.vring,
                        bytes.len()
                    );
                }
                let header: [u8; NET_HDR_LEN] = bytes[..NET_HDR_LEN].try_into().unwrap();
                let num = u16::from_le_bytes([header[10], header[11]]);
                let total = if self.mergeable { num } else { 1 };
                if total == 0 {
                    bail!("RX vring {}: num_buffers is 0", self.vring);
                }
                PartialFrame {
                    header,
                    data: bytes[NET_HDR_LEN..].to_vec(),
                    buffers: 1,
                    remaining: total - 1,
                }
            }
        };
        if part.remaining == 0 {
            return Ok(Some(RxFrame {
                header: part.header,
                data: std::mem::take(&mut part.data),
                buffers: part.buffers,
            }));
        }
        self.partial = Some(part);
        Ok(None)
    }
}
