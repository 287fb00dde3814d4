//! The device: everything the VMM has told us through vhost-user, and
//! nothing else. Features, protocol features, the memory table and, for each
//! ring, its size, addresses, base, eventfds and enable bit; the checks each
//! request passes before any of it changes; and what a worker needs to be
//! told of it (the SetFeatures, SetMemTable and StartRing requests).
//!
//! The device knows no worker. Turning a change of this state into worker
//! requests is the backend's job (`backend.rs`); who runs a ring, and what
//! happens when that worker dies, is the queue pair's
//! (`supervision/queue_pair.rs`).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use qpnet_ipc::{check_eventfd, Request, RingConfig, RingKind};

use crate::features;
use crate::memory_table::MemoryTable;

/// Largest virtqueue size (split rings: 2^15).
pub const MAX_QUEUE_SIZE: u32 = 32768;

/// Why a VMM request was refused. The message goes to the log and, with
/// REPLY_ACK, a failure code goes back to the VMM.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// Result of a device operation.
pub type DevResult<T> = std::result::Result<T, Refusal>;

/// Refuse with `msg`.
pub fn refuse<T>(msg: impl Into<String>) -> DevResult<T> {
    Err(Refusal(msg.into()))
}

/// Mark an fd received from the VMM close-on-exec, so it never leaks into a
/// worker except through an explicit SCM_RIGHTS hand-over.
pub fn make_cloexec(fd: BorrowedFd<'_>) {
    if let Err(e) = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
        log::warn!("cannot set FD_CLOEXEC on fd {}: {e}", fd.as_raw_fd());
    }
}

/// Static configuration of the device.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Number of queue pairs (1..=16).
    pub queue_pairs: u16,
    /// MAC address reported in the config space.
    pub mac: [u8; 6],
    /// The virtio features offered (they depend on the host side, see
    /// `frame_io::offered_features`).
    pub offered: u64,
}

/// Ring addresses in the VMM's virtual address space.
#[derive(Debug, Clone, Copy)]
pub struct VringAddr {
    desc: u64,
    avail: u64,
    used: u64,
}

/// One ring as the VMM described it.
#[derive(Debug, Default)]
pub struct Vring {
    /// Queue size (SET_VRING_NUM).
    pub num: Option<u16>,
    /// Addresses (SET_VRING_ADDR).
    pub addr: Option<VringAddr>,
    /// Next available index to process when the ring starts
    /// (SET_VRING_BASE, or where a worker stopped it).
    pub base: u16,
    /// Kick eventfd (SET_VRING_KICK; forgotten by GET_VRING_BASE).
    pub kick: Option<File>,
    /// Call eventfd (SET_VRING_CALL).
    pub call: Option<File>,
    /// Error eventfd (SET_VRING_ERR): the worker writes it when it stops
    /// the ring because the guest made it unusable. Kept across
    /// GET_VRING_BASE and worker re-spawns; replaced by the next
    /// SET_VRING_ERR, forgotten on reset.
    pub err: Option<File>,
    /// SET_VRING_ENABLE.
    pub enabled: bool,
}

/// Bytes of the part of a ring: descriptor table (0), available ring (1),
/// used ring (2), for `num` entries.
fn ring_bytes(kind: usize, num: u64) -> u64 {
    match kind {
        0 => 16 * num,    // descriptor table
        1 => 6 + 2 * num, // available ring incl. used_event
        _ => 6 + 8 * num, // used ring incl. avail_event
    }
}

/// The vhost-user state of the device.
pub struct Device {
    config: DeviceConfig,
    features: u64,
    features_set: bool,
    protocol_features: u64,
    mem: MemoryTable,
    vrings: Vec<Vring>,
}

impl Device {
    /// A device no VMM has described yet.
    pub fn new(config: DeviceConfig) -> Device {
        let rings = 2 * config.queue_pairs as usize;
        Device {
            config,
            features: 0,
            features_set: false,
            protocol_features: 0,
            mem: MemoryTable::default(),
            vrings: (0..rings).map(|_| Vring::default()).collect(),
        }
    }

    /// Forget everything the VMM said (it disconnected or reset the device).
    pub fn reset(&mut self) {
        *self = Device::new(self.config.clone());
    }

    /// The virtio features offered to drivers.
    pub fn offered_features(&self) -> u64 {
        self.config.offered
    }

    /// Number of queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        self.config.queue_pairs
    }

    /// Number of rings (two per queue pair).
    pub fn rings(&self) -> usize {
        self.vrings.len()
    }

    /// Whether the driver's SET_FEATURES acknowledged PROTOCOL_FEATURES.
    pub fn protocol_features_acked(&self) -> bool {
        self.features_set && features::has_protocol_features(self.features)
    }

    /// Ring `i` (an index checked by [`Device::check_index`]).
    pub fn vring(&self, i: usize) -> &Vring {
        &self.vrings[i]
    }

    /// Ring `i`, to change it.
    pub fn vring_mut(&mut self, i: usize) -> &mut Vring {
        &mut self.vrings[i]
    }

    /// The memory table.
    pub fn memory(&self) -> &MemoryTable {
        &self.mem
    }

    /// Take a checked memory table.
    pub fn set_memory(&mut self, table: MemoryTable) {
        self.mem = table;
    }

    /// Refuse a vring index this device does not have.
    pub fn check_index(&self, index: u32) -> DevResult<usize> {
        let n = 2 * self.config.queue_pairs as u32;
        if index >= n {
            return refuse(format!(
                "vring index {index} out of range: this device has {n} rings ({} queue pairs)",
                self.config.queue_pairs
            ));
        }
        Ok(index as usize)
    }

    // ---- what workers are told ---------------------------------------------

    /// The SetFeatures request for workers, once the driver set features.
    pub fn features_request(&self, mtu: u32) -> Option<Request> {
        self.features_set.then(|| Request::SetFeatures {
            features: self.features,
            max_rx_frame: features::max_rx_frame(self.features, mtu),
            header_len: features::header_len(self.features),
        })
    }

    /// The SetMemTable request for workers, once there is a table.
    pub fn mem_table_request(&self) -> Option<(Request, Vec<BorrowedFd<'_>>)> {
        (!self.mem.is_empty()).then(|| self.mem.request())
    }

    /// Whether ring `i` can run: the memory table, its size, its addresses
    /// and its kick eventfd are known, and it is enabled (rings start
    /// enabled when VHOST_USER_F_PROTOCOL_FEATURES was not negotiated).
    pub fn ring_ready(&self, i: usize) -> bool {
        let v = &self.vrings[i];
        let enabled = v.enabled || !features::has_protocol_features(self.features);
        !self.mem.is_empty() && v.num.is_some() && v.addr.is_some() && v.kick.is_some() && enabled
    }

    /// The StartRing request for ring `i` at `next_avail`, with its kick
    /// (call, error) eventfds in the order `RingConfig::fd_names` says;
    /// addresses translated to guest-physical through the current memory
    /// table.
    pub fn start_request(
        &self,
        i: usize,
        next_avail: u16,
        signal_on_start: bool,
    ) -> DevResult<(Request, Vec<BorrowedFd<'_>>)> {
        let v = &self.vrings[i];
        let (Some(num), Some(addr), Some(kick)) = (v.num, v.addr, v.kick.as_ref()) else {
            return refuse(format!("ring {i} is not fully described"));
        };
        let n = num as u64;
        let gpa = |va: u64, kind: usize, what: &str| {
            self.mem.translate(va, ring_bytes(kind, n)).ok_or_else(|| {
                Refusal(format!(
                    "ring {i}: {what} at VMM address {va:#x} (+{}) is outside the memory table",
                    ring_bytes(kind, n)
                ))
            })
        };
        let config = RingConfig {
            kind: RingKind::of_vring(i as u32),
            size: num,
            desc_table: gpa(addr.desc, 0, "descriptor table")?,
            avail_ring: gpa(addr.avail, 1, "available ring")?,
            used_ring: gpa(addr.used, 2, "used ring")?,
            next_avail,
            has_call: v.call.is_some(),
            has_err: v.err.is_some(),
            signal_on_start,
        };
        let mut fds = vec![kick.as_fd()];
        fds.extend(v.call.as_ref().map(|c| c.as_fd()));
        fds.extend(v.err.as_ref().map(|e| e.as_fd()));
        Ok((Request::StartRing(config), fds))
    }

    /// Ring `i`'s used index, read from guest memory.
    pub fn used_idx(&self, i: usize) -> Option<u16> {
        self.mem.read_u16(self.vrings[i].addr?.used, 2)
    }

    /// Ring `i`'s available index, read from guest memory.
    pub fn avail_idx(&self, i: usize) -> Option<u16> {
        self.mem.read_u16(self.vrings[i].addr?.avail, 2)
    }

    // ---- checks of VMM requests ---------------------------------------------

    /// SET_FEATURES: refuse features that were not offered; record them.
    pub fn set_features(&mut self, features: u64) -> DevResult<()> {
        let unknown = features & !self.config.offered;
        if unknown != 0 {
            return refuse(format!(
                "driver acknowledged features {unknown:#x} that were not offered"
            ));
        }
        self.features = features;
        self.features_set = true;
        Ok(())
    }

    /// SET_PROTOCOL_FEATURES.
    pub fn set_protocol_features(&mut self, features: u64) -> DevResult<()> {
        let unknown = features & !features::protocol_offered().bits();
        if unknown != 0 {
            return refuse(format!("protocol features {unknown:#x} were not offered"));
        }
        self.protocol_features = features;
        Ok(())
    }

    /// Check SET_VRING_NUM; the ring it concerns.
    pub fn check_vring_num(&self, index: u32, num: u32) -> DevResult<usize> {
        let i = self.check_index(index)?;
        if num == 0 || !num.is_power_of_two() || num > MAX_QUEUE_SIZE {
            return refuse(format!(
                "vring {index}: queue size {num} refused: must be a power of two from 1 to {MAX_QUEUE_SIZE}"
            ));
        }
        Ok(i)
    }

    /// Check SET_VRING_ADDR (addresses in the VMM's virtual address space):
    /// aligned, and inside the memory table if there is one.
    pub fn check_vring_addr(
        &self,
        index: u32,
        desc: u64,
        used: u64,
        avail: u64,
    ) -> DevResult<(usize, VringAddr)> {
        let i = self.check_index(index)?;
        if !desc.is_multiple_of(16) || !avail.is_multiple_of(2) || !used.is_multiple_of(4) {
            return refuse(format!(
                "vring {index}: misaligned ring addresses (desc {desc:#x} needs 16, avail {avail:#x} 2, used {used:#x} 4)"
            ));
        }
        if !self.mem.is_empty() {
            let n = self.vrings[i].num.unwrap_or(1) as u64;
            for (va, kind, what) in [
                (desc, 0, "descriptor table"),
                (avail, 1, "available ring"),
                (used, 2, "used ring"),
            ] {
                if self.mem.translate(va, ring_bytes(kind, n)).is_none() {
                    return refuse(format!(
                        "vring {index}: {what} at VMM address {va:#x} is outside the memory table"
                    ));
                }
            }
        }
        Ok((i, VringAddr { desc, avail, used }))
    }

    /// Check SET_VRING_BASE.
    pub fn check_vring_base(&self, index: u32, base: u32) -> DevResult<usize> {
        let i = self.check_index(index)?;
        if base > u16::MAX as u32 {
            return refuse(format!(
                "vring {index}: base {base} does not fit a 16-bit ring index"
            ));
        }
        Ok(i)
    }

    /// Check SET_VRING_KICK: an eventfd is required (no polling mode).
    pub fn check_vring_kick(&self, index: u8, fd: Option<File>) -> DevResult<(usize, File)> {
        let i = self.check_index(index as u32)?;
        let Some(fd) = fd else {
            return refuse(format!(
                "vring {index}: polling mode (no kick eventfd) is not supported"
            ));
        };
        self.check_eventfd(index, "kick", &fd)?;
        Ok((i, fd))
    }

    /// Check SET_VRING_CALL and SET_VRING_ERR (`which`): no fd, or an
    /// eventfd.
    pub fn check_vring_fd(
        &self,
        index: u8,
        which: &'static str,
        fd: Option<&File>,
    ) -> DevResult<usize> {
        let i = self.check_index(index as u32)?;
        if let Some(f) = fd {
            self.check_eventfd(index, which, f)?;
        }
        Ok(i)
    }

    fn check_eventfd(&self, index: u8, which: &'static str, fd: &File) -> DevResult<()> {
        make_cloexec(fd.as_fd());
        check_eventfd(which, fd.as_fd()).map_err(|e| Refusal(format!("vring {index}: {e}")))
    }

    /// GET_CONFIG: the virtio-net config space (mac, status, max pairs, mtu).
    pub fn config_space(&self, offset: u32, size: u32, mtu: u32) -> DevResult<Vec<u8>> {
        let mut space = Vec::with_capacity(12);
        space.extend_from_slice(&self.config.mac);
        space.extend_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
        space.extend_from_slice(&self.config.queue_pairs.to_le_bytes());
        let mtu = mtu.min(u16::MAX as u32) as u16;
        space.extend_from_slice(&mtu.to_le_bytes());
        let (o, s) = (offset as usize, size as usize);
        match o.checked_add(s) {
            Some(end) if end <= space.len() => Ok(space[o..end].to_vec()),
            _ => refuse(format!(
                "GET_CONFIG offset {offset} size {size} outside the {}-byte config space",
                space.len()
            )),
        }
    }
}
