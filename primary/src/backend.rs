//! The backend: the device (what the VMM said) and the queue pairs (who
//! runs it), and the rule that turns each VMM request into work for them.
//!
//! Each request is checked and recorded by the [`Device`], then carried out
//! by the queue pairs it concerns. Every request that changes a ring goes
//! through one function: stop the ring if it runs (its base becomes where it
//! stopped), apply the change, start it again if the device has it ready. So
//! a worker only ever holds a fully described, enabled ring. GET_VRING_BASE
//! stops the ring and forgets its kick fd (per the protocol the ring stays
//! stopped until the next SET_VRING_KICK); SET_MEM_TABLE stops every ring,
//! hands the new table to every worker and starts the rings again with
//! addresses translated through it. Every worker request is answered before
//! the VMM's request is answered.

use std::fs::File;

use vhost::vhost_user::message::VhostUserMemoryRegion;

use crate::device::{DevResult, Device, Refusal, Vring};
use crate::memory_table::MemoryTable;
use crate::supervision::Supervisor;

/// The device and its queue pairs.
pub struct Backend {
    device: Device,
    supervisor: Supervisor,
}

impl Backend {
    /// A backend with no VMM yet; its workers start at the first
    /// [`Supervisor::supervise`].
    pub fn new(device: Device, supervisor: Supervisor) -> Backend {
        Backend { device, supervisor }
    }

    /// Supervision, with the device state it reads (for the loop's events).
    pub fn supervision(&mut self) -> (&mut Supervisor, &Device) {
        (&mut self.supervisor, &self.device)
    }

    /// Supervision, to read.
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    fn stop_ring(&mut self, i: usize) -> DevResult<()> {
        if let Some(base) = self.supervisor.stop_ring(i, &self.device)? {
            self.device.vring_mut(i).base = base;
        }
        Ok(())
    }

    fn sync_ring(&mut self, i: usize) -> DevResult<()> {
        self.supervisor.sync_ring(i, &self.device)
    }

    /// Stop, change, and start again if ready: every ring-changing request
    /// goes through here.
    fn update_ring(&mut self, i: usize, change: impl FnOnce(&mut Vring)) -> DevResult<()> {
        self.stop_ring(i)?;
        change(self.device.vring_mut(i));
        self.sync_ring(i)
    }

    /// VMM disconnected or reset the device: stop every ring, forget the
    /// guest's memory (workers unmap it), and give failed queue pairs a new
    /// chance.
    pub fn reset(&mut self) {
        for i in 0..self.device.rings() {
            if let Err(e) = self.stop_ring(i) {
                log::warn!("reset: {e}");
            }
        }
        self.device.reset();
        let forget = qpnet_ipc::Request::SetMemTable { regions: vec![] };
        if let Err(e) = self.supervisor.send_to_all(&forget, &[]) {
            log::warn!("reset: {e}");
        }
        self.supervisor.retry_failed();
    }

    // ---- vhost-user requests ------------------------------------------------

    /// Whether the driver's SET_FEATURES acknowledged PROTOCOL_FEATURES.
    pub fn protocol_features_acked(&self) -> bool {
        self.device.protocol_features_acked()
    }

    /// Number of queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        self.device.queue_pairs()
    }

    /// The virtio features offered to drivers.
    pub fn offered_features(&self) -> u64 {
        self.device.offered_features()
    }

    /// SET_FEATURES: a TAP follows the header size and offloads, every
    /// worker gets the features.
    pub fn set_features(&mut self, f: u64) -> DevResult<()> {
        self.device.set_features(f)?;
        let host = self.supervisor.host();
        host.apply_features(f)
            .map_err(|e| Refusal(format!("{e}")))?;
        let mtu = host.mtu();
        let req = self
            .device
            .features_request(mtu)
            .expect("features were just set");
        self.supervisor.send_to_all(&req, &[])
    }

    /// SET_PROTOCOL_FEATURES.
    pub fn set_protocol_features(&mut self, f: u64) -> DevResult<()> {
        self.device.set_protocol_features(f)
    }

    /// SET_MEM_TABLE: check, stop the rings, hand the new table to every
    /// worker, start the rings again.
    pub fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> DevResult<()> {
        let table = MemoryTable::from_vmm(regions, files)?;
        for i in 0..self.device.rings() {
            self.stop_ring(i)?;
        }
        self.device.set_memory(table);
        let (req, fds) = self.device.memory().request();
        let mut result = self.supervisor.send_to_all(&req, &fds);
        for i in 0..self.device.rings() {
            if let Err(e) = self.sync_ring(i) {
                log::warn!("after SET_MEM_TABLE: {e}");
                result = result.and(Err(e));
            }
        }
        let mem = self.device.memory();
        log::info!(
            "memory table: {} region(s), {} MiB",
            mem.len(),
            mem.total_size() >> 20
        );
        result
    }

    /// SET_VRING_NUM.
    pub fn set_vring_num(&mut self, index: u32, num: u32) -> DevResult<()> {
        let i = self.device.check_vring_num(index, num)?;
        self.update_ring(i, |v| v.num = Some(num as u16))
    }

    /// SET_VRING_ADDR (addresses in the VMM's virtual address space).
    pub fn set_vring_addr(
        &mut self,
        index: u32,
        desc: u64,
        used: u64,
        avail: u64,
    ) -> DevResult<()> {
        let (i, addr) = self.device.check_vring_addr(index, desc, used, avail)?;
        self.update_ring(i, |v| v.addr = Some(addr))
    }

    /// SET_VRING_BASE.
    pub fn set_vring_base(&mut self, index: u32, base: u32) -> DevResult<()> {
        let i = self.device.check_vring_base(index, base)?;
        self.update_ring(i, |v| v.base = base as u16)
    }

    /// GET_VRING_BASE: stop the ring and return where it stopped.
    pub fn get_vring_base(&mut self, index: u32) -> DevResult<u16> {
        let i = self.device.check_index(index)?;
        self.stop_ring(i)?;
        let v = self.device.vring_mut(i);
        v.kick = None;
        Ok(v.base)
    }

    /// SET_VRING_KICK.
    pub fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> DevResult<()> {
        let (i, fd) = self.device.check_vring_kick(index, fd)?;
        self.update_ring(i, |v| v.kick = Some(fd))
    }

    /// SET_VRING_CALL.
    pub fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> DevResult<()> {
        let i = self.device.check_vring_fd(index, "call", fd.as_ref())?;
        self.update_ring(i, |v| v.call = fd)
    }

    /// SET_VRING_ERR: the ring's error eventfd (or none), which its worker
    /// writes when the guest makes the ring unusable. A running ring is
    /// restarted where it stopped, so its worker holds the new one.
    pub fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> DevResult<()> {
        let i = self.device.check_vring_fd(index, "error", fd.as_ref())?;
        self.update_ring(i, |v| v.err = fd)
    }

    /// SET_VRING_ENABLE.
    pub fn set_vring_enable(&mut self, index: u32, enable: bool) -> DevResult<()> {
        let i = self.device.check_index(index)?;
        self.update_ring(i, |v| v.enabled = enable)
    }

    /// GET_CONFIG: the virtio-net config space.
    pub fn get_config(&self, offset: u32, size: u32) -> DevResult<Vec<u8>> {
        let mtu = self.supervisor.host().mtu();
        self.device.config_space(offset, size, mtu)
    }
}
