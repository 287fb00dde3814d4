//! The test VMM: a vhost-user front end with memfd guest memory and a driver.
//!
//! [`Vmm::connect`] does what a VMM does when it brings up a vhost-user
//! virtio-net device, through the vhost crate's `Frontend`:
//! SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES (MQ | REPLY_ACK, after
//! which every request asks for an ack, so refusals surface as errors),
//! GET_QUEUE_NUM, SET_FEATURES, SET_MEM_TABLE, and per ring SET_VRING_NUM /
//! BASE / ADDR / KICK / CALL / ENABLE. Vring addresses are VMM virtual
//! addresses (`userspace_addr + (gpa - region gpa)`), as QEMU sends them.
//!
//! Memory layout: region 0 at GPA 0x1_0000_0000 holds the rings and the TX
//! buffers; with `two_regions`, the RX buffers live in region 1, placed after
//! a 16 MiB hole, so a backend must use the memory table rather than assume
//! one contiguous block.
//!
//! The same connection is also reachable raw ([`Vmm::raw`]) for requests the
//! frontend does not offer or would refuse to send.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use qpnet_secondary::test_util::{
    BumpAllocator, GuestMemory, RegionLayout, RingDriver, RingLayout, MEM_BASE,
};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

use crate::net_driver::{RxDriver, TxDriver, SCRATCH_SIZE};
use crate::raw_vhost::{connect_unix, feature, req, RawVhostUser};

const MIB: u64 = 1 << 20;

/// What the test VMM negotiates and how it lays out its queues.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    /// Queue pairs to set up (1..=16).
    pub queue_pairs: u16,
    /// Entries per ring (a power of two, > 16).
    pub queue_size: u16,
    /// Negotiate VIRTIO_NET_F_MRG_RXBUF.
    pub mrg_rxbuf: bool,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Negotiate VIRTIO_RING_F_INDIRECT_DESC.
    pub indirect_desc: bool,
    /// Size of each RX buffer (small + MRG_RXBUF forces multi-buffer frames).
    pub rx_buf_size: u32,
    /// Put RX buffers in a second memory region.
    pub two_regions: bool,
    /// Send every other TX frame as a header descriptor + frame descriptor.
    pub split_tx_header: bool,
    /// How long to wait for the backend's replies.
    pub reply_timeout: Duration,
    /// Post every RX buffer once the rings are set up (hostile tests turn
    /// this off to place their own chains first).
    pub post_rx: bool,
    /// Negotiate the TX offloads qpnet offers: CSUM, HOST_TSO4, HOST_TSO6,
    /// HOST_ECN.
    pub tx_offloads: bool,
}

impl Default for VmmConfig {
    fn default() -> VmmConfig {
        VmmConfig {
            queue_pairs: 1,
            queue_size: 256,
            mrg_rxbuf: true,
            event_idx: false,
            indirect_desc: false,
            rx_buf_size: 256,
            two_regions: true,
            split_tx_header: true,
            reply_timeout: Duration::from_secs(10),
            post_rx: true,
            tx_offloads: false,
        }
    }
}

/// A connected, fully set up test VMM.
pub struct Vmm {
    frontend: Frontend,
    raw: RawVhostUser,
    mem: Arc<GuestMemory>,
    /// TX queue drivers, one per queue pair.
    pub tx: Vec<TxDriver>,
    /// RX queue drivers, one per queue pair.
    pub rx: Vec<RxDriver>,
    features: u64,
    queue_num: u64,
    config: VmmConfig,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("features", &format_args!("{:#x}", self.features))
            .field("queue_num", &self.queue_num)
            .field("config", &self.config)
            .finish()
    }
}

impl Vmm {
    /// Connect to the backend at `socket` and bring the device up; RX buffers
    /// are posted on every queue.
    pub fn connect(socket: &Path, config: VmmConfig) -> Result<Vmm> {
        Vmm::over(connect_unix(socket, Duration::from_secs(5))?, config)
    }

    /// [`Vmm::connect`] over a connection already made (a backend that
    /// connected to us: `qpnet run --connect`).
    pub fn over(stream: UnixStream, config: VmmConfig) -> Result<Vmm> {
        stream.set_read_timeout(Some(config.reply_timeout))?;
        stream.set_write_timeout(Some(config.reply_timeout))?;
        let raw = RawVhostUser::from_stream(stream.try_clone()?);
        let vrings = 2 * u64::from(config.queue_pairs);
        let mut frontend = Frontend::from_stream(stream, vrings);

        let wanted = wanted_features(&config);
        frontend.set_owner().context("SET_OWNER")?;
        let offered = frontend.get_features().context("GET_FEATURES")?;
        if offered & wanted != wanted {
            bail!(
                "backend offers features {offered:#x}; missing {:#x}",
                wanted & !offered
            );
        }
        let proto_wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        let proto = frontend
            .get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?;
        if !proto.contains(proto_wanted) {
            bail!("backend offers protocol features {proto:?}; MQ | REPLY_ACK needed");
        }
        frontend
            .set_protocol_features(proto_wanted)
            .context("SET_PROTOCOL_FEATURES")?;
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        // Raw on purpose: the frontend would shrink its own ring limit to the
        // reply, and the spec leaves open whether it counts rings or pairs.
        let queue_num = raw.get_u64(req::GET_QUEUE_NUM).context("GET_QUEUE_NUM")?;
        if queue_num < u64::from(config.queue_pairs) {
            bail!(
                "backend supports {queue_num} queues, {} pairs wanted",
                config.queue_pairs
            );
        }
        frontend.set_features(wanted).context("SET_FEATURES")?;

        let (mem, tx, rx) = build_queues(&config)?;
        frontend
            .set_mem_table(&memory_table(&mem))
            .context("SET_MEM_TABLE")?;
        let mut vmm = Vmm {
            frontend,
            raw,
            mem,
            tx,
            rx,
            features: wanted,
            queue_num,
            config,
        };
        for qp in 0..usize::from(vmm.config.queue_pairs) {
            vmm.start_ring(2 * qp as u32, 0)?;
            vmm.start_ring(2 * qp as u32 + 1, 0)?;
        }
        if vmm.config.post_rx {
            for rx in &mut vmm.rx {
                rx.post_all();
            }
        }
        Ok(vmm)
    }

    /// The negotiated virtio features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// What GET_QUEUE_NUM returned.
    pub fn queue_num(&self) -> u64 {
        self.queue_num
    }

    /// The configuration the VMM was built with.
    pub fn config(&self) -> &VmmConfig {
        &self.config
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// The vhost crate frontend, for direct requests.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// The same connection, raw.
    pub fn raw(&self) -> &RawVhostUser {
        &self.raw
    }

    fn ring(&self, vring: u32) -> Result<&RingDriver> {
        let qp = (vring / 2) as usize;
        if qp >= self.tx.len() {
            bail!("vring {vring} is not set up");
        }
        Ok(if vring & 1 == 0 {
            &self.rx[qp].queue
        } else {
            &self.tx[qp].queue
        })
    }

    /// SET_VRING_NUM, BASE (`base`), ADDR, KICK, CALL, ENABLE for one ring.
    pub fn start_ring(&mut self, vring: u32, base: u16) -> Result<()> {
        let queue = self.ring(vring)?;
        let layout = queue.layout();
        let addrs = VringConfigData {
            queue_max_size: layout.size,
            queue_size: layout.size,
            flags: 0,
            desc_table_addr: vmm_addr(&self.mem, layout.desc)?,
            used_ring_addr: vmm_addr(&self.mem, layout.used)?,
            avail_ring_addr: vmm_addr(&self.mem, layout.avail)?,
            log_addr: None,
        };
        let (kick, call) = queue.vmm_eventfds().context("dup ring eventfds")?;
        let i = vring as usize;
        let fe = &mut self.frontend;
        fe.set_vring_num(i, layout.size)
            .with_context(|| format!("SET_VRING_NUM {vring}"))?;
        fe.set_vring_base(i, base)
            .with_context(|| format!("SET_VRING_BASE {vring}"))?;
        fe.set_vring_addr(i, &addrs)
            .with_context(|| format!("SET_VRING_ADDR {vring}"))?;
        fe.set_vring_kick(i, &kick)
            .with_context(|| format!("SET_VRING_KICK {vring}"))?;
        fe.set_vring_call(i, &call)
            .with_context(|| format!("SET_VRING_CALL {vring}"))?;
        fe.set_vring_enable(i, true)
            .with_context(|| format!("SET_VRING_ENABLE {vring}"))?;
        Ok(())
    }

    /// GET_VRING_BASE: stop a ring; returns the avail index it stopped at.
    pub fn stop_ring(&mut self, vring: u32) -> Result<u32> {
        self.frontend
            .get_vring_base(vring as usize)
            .with_context(|| format!("GET_VRING_BASE {vring}"))
    }
}

fn wanted_features(c: &VmmConfig) -> u64 {
    let mut f = feature::VERSION_1 | feature::PROTOCOL_FEATURES;
    if c.queue_pairs > 1 {
        f |= feature::MQ;
    }
    if c.mrg_rxbuf {
        f |= feature::MRG_RXBUF;
    }
    if c.event_idx {
        f |= feature::EVENT_IDX;
    }
    if c.indirect_desc {
        f |= feature::INDIRECT_DESC;
    }
    if c.tx_offloads {
        f |= feature::CSUM | feature::HOST_TSO4 | feature::HOST_TSO6 | feature::HOST_ECN;
    }
    f
}

/// `mem`'s memory table for SET_MEM_TABLE.
fn memory_table(mem: &GuestMemory) -> Vec<VhostUserMemoryRegionInfo> {
    mem.regions()
        .iter()
        .map(|r| VhostUserMemoryRegionInfo {
            guest_phys_addr: r.gpa(),
            memory_size: r.size(),
            userspace_addr: r.vmm_addr(),
            mmap_offset: r.layout().file_offset,
            mmap_handle: r.file().as_raw_fd(),
        })
        .collect()
}

/// Translate a GPA to this process's (the VMM's) address.
fn vmm_addr(mem: &GuestMemory, gpa: u64) -> Result<u64> {
    mem.vmm_addr(gpa)
        .with_context(|| format!("GPA {gpa:#x} is not inside a guest memory region"))
}

/// `size` bytes aligned to `align` from `a`.
fn alloc(a: &mut BumpAllocator, size: u64, align: u64) -> Result<u64> {
    a.alloc(size, align)
        .with_context(|| format!("guest memory exhausted: {size:#x} bytes wanted"))
}

/// The three parts of a `size`-entry ring from `a`.
fn ring_layout(a: &mut BumpAllocator, size: u16) -> Result<RingLayout> {
    RingLayout::alloc(a, size)
        .with_context(|| format!("guest memory exhausted: no room for a {size}-entry ring"))
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Guest memory sized for `c`, and a TX and RX driver per queue pair.
fn build_queues(c: &VmmConfig) -> Result<(Arc<GuestMemory>, Vec<TxDriver>, Vec<RxDriver>)> {
    if !c.queue_size.is_power_of_two() || c.queue_size <= 16 {
        bail!(
            "test queue size {} must be a power of two > 16",
            c.queue_size
        );
    }
    let qps = u64::from(c.queue_pairs);
    let ring_bytes = 2 * qps * (26 * u64::from(c.queue_size) + 64);
    let tx_bytes = qps * (TxDriver::buffer_bytes(c.queue_size) + SCRATCH_SIZE);
    let rx_bytes = qps * u64::from(c.queue_size) * u64::from(c.rx_buf_size);
    let mut layouts = Vec::new();
    if c.two_regions {
        let size0 = round_up(ring_bytes + tx_bytes, MIB) + MIB;
        let size1 = round_up(rx_bytes, MIB) + MIB;
        layouts.push(RegionLayout::new(MEM_BASE, size0));
        layouts.push(RegionLayout::new(MEM_BASE + size0 + 16 * MIB, size1));
    } else {
        let size = round_up(ring_bytes + tx_bytes + rx_bytes, MIB) + MIB;
        layouts.push(RegionLayout::new(MEM_BASE, size));
    }
    let mem = Arc::new(GuestMemory::new(&layouts)?);
    let mut alloc0 = BumpAllocator::new(&mem.regions()[0]);
    let mut alloc1 = mem.regions().get(1).map(BumpAllocator::new);
    let mut tx = Vec::new();
    let mut rx = Vec::new();
    for qp in 0..u32::from(c.queue_pairs) {
        let rx_ring = ring_layout(&mut alloc0, c.queue_size)?;
        let tx_ring = ring_layout(&mut alloc0, c.queue_size)?;
        let tx_bufs = alloc(&mut alloc0, TxDriver::buffer_bytes(c.queue_size), 4096)?;
        let scratch = alloc(&mut alloc0, SCRATCH_SIZE, 4096)?;
        let rx_alloc = alloc1.as_mut().unwrap_or(&mut alloc0);
        let rx_bytes = u64::from(c.queue_size) * u64::from(c.rx_buf_size);
        let rx_bufs = alloc(rx_alloc, rx_bytes, 4096)?;
        rx.push(RxDriver::new(
            RingDriver::new(mem.clone(), rx_ring),
            2 * qp,
            rx_bufs,
            c.rx_buf_size,
            c.mrg_rxbuf,
        )?);
        tx.push(TxDriver::new(
            RingDriver::new(mem.clone(), tx_ring),
            2 * qp + 1,
            tx_bufs,
            scratch,
            c.split_tx_header,
        )?);
    }
    Ok((mem, tx, rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_fit_their_regions_and_rx_buffers_go_to_region_one() {
        let c = VmmConfig {
            queue_pairs: 4,
            ..VmmConfig::default()
        };
        let (mem, tx, rx) = build_queues(&c).unwrap();
        assert_eq!(mem.regions().len(), 2);
        let r1 = &mem.regions()[1];
        for (t, r) in tx.iter().zip(&rx) {
            assert!(t.queue.layout().used < r1.gpa());
            assert!(r.queue.layout().used < r1.gpa());
            assert!(r.buffer_gpa(0) >= r1.gpa());
            let last = r.buffer_gpa(c.queue_size - 1) + u64::from(r.buffer_size());
            assert!(last <= r1.gpa() + r1.size());
            assert!(t.scratch() + SCRATCH_SIZE <= mem.regions()[0].gpa() + mem.regions()[0].size());
            assert_eq!(t.vring(), r.vring() + 1);
        }
        assert!(vmm_addr(&mem, r1.gpa()).is_ok());
    }
}
