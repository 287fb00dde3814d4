//! Shared pieces of the hostile-input tests (`tests/bad_input_*.rs`): raw
//! vhost-user sessions, real memfd guest memory to describe in memory
//! tables, the "refused" verdict on a reply, starting a ring step by step
//! (until one step is refused, or all accepted), waiting for a ring's
//! error eventfd, and the check that qpnet came through unharmed (no worker
//! died or restarted, a fresh VMM still passes frames both ways, and it
//! stops cleanly).
//!
//! Each refusal must be explicit: a nonzero REPLY_ACK, or the connection
//! closed for a malformed message; silence or a success ack fails the test.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use qpnet_secondary::test_util::{GuestMemory, RegionLayout, MEM_BASE};
use qpnet_shared::QueueStats;
use vmm_sys_util::eventfd::EventFd;

use crate::raw_vhost::{
    feature, mem_table, req, u64_body, vring_addr, vring_state, MemEntry, RawVhostUser, Reply,
};
use crate::testbed::Testbed;

/// Queue pairs of the hostile-input testbeds.
pub const QUEUE_PAIRS: u16 = 2;
/// Ring size of the rings the tests describe.
pub const RING: u32 = 256;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// How long a hostile case may take to be refused.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A raw session: connected, features (VERSION_1 | PROTOCOL_FEATURES | MQ)
/// and protocol features (MQ | REPLY_ACK) negotiated.
pub fn session(bed: &Testbed) -> Result<RawVhostUser> {
    let mut raw = RawVhostUser::connect(bed.qpnet.socket(), Duration::from_secs(5))?;
    raw.set_reply_timeout(Duration::from_secs(5));
    raw.negotiate(feature::MQ)?;
    Ok(raw)
}

/// Two real memfd regions (4 MiB each, a 28 MiB hole between them).
pub fn guest_memory() -> Result<GuestMemory> {
    Ok(GuestMemory::new(&[
        RegionLayout::new(MEM_BASE, 4 * MIB),
        RegionLayout::new(MEM_BASE + 32 * MIB, 4 * MIB),
    ])?)
}

/// `mem`'s memory table as a VMM sends it (VMM addresses included).
pub fn entries(mem: &GuestMemory) -> Vec<MemEntry> {
    mem.regions()
        .iter()
        .map(|r| MemEntry {
            gpa: r.gpa(),
            size: r.size(),
            user_addr: r.vmm_addr(),
            mmap_offset: r.layout().file_offset,
        })
        .collect()
}

/// `mem`'s memfds, in table order.
pub fn fds(mem: &GuestMemory) -> Vec<RawFd> {
    mem.fds().iter().map(|fd| fd.as_raw_fd()).collect()
}

/// A session whose memory table holds `mem`.
pub fn mem_session(bed: &Testbed, mem: &GuestMemory) -> Result<RawVhostUser> {
    let raw = session(bed)?;
    raw.request_ok(req::SET_MEM_TABLE, &mem_table(&entries(mem)), &fds(mem))
        .context("a valid memory table must be accepted")?;
    Ok(raw)
}

/// Valid VMM addresses for a 256-entry ring at the start of region 0:
/// (desc, used, avail).
pub fn valid_ring(mem: &GuestMemory) -> (u64, u64, u64) {
    let u = mem.regions()[0].vmm_addr();
    (u, u + 8192, u + 4096)
}

/// True if `addr` is inside none of `mem`'s regions in VMM address space.
pub fn outside_vmm(mem: &GuestMemory, addr: u64) -> bool {
    mem.regions()
        .iter()
        .all(|r| addr < r.vmm_addr() || addr >= r.vmm_addr() + r.size())
}

pub fn ensure_refused(what: &str, reply: Reply) -> Result<()> {
    ensure!(
        reply.is_refusal(),
        "{what}: expected a refusal (nonzero REPLY_ACK or the connection closed), got {reply:?}"
    );
    Ok(())
}

/// Start ring `vring` step by step (NUM `num`, BASE, ADDR, KICK, CALL,
/// ENABLE); one of the steps must be refused. Returns the refused step.
pub fn ring_start_refused(
    raw: &RawVhostUser,
    vring: u32,
    num: u32,
    addrs: (u64, u64, u64),
) -> Result<&'static str> {
    let kick = EventFd::new(0)?;
    let call = EventFd::new(0)?;
    let fd_body = u64_body(u64::from(vring & 0xff));
    let steps: [(&'static str, u32, Vec<u8>, Vec<RawFd>); 6] = [
        (
            "SET_VRING_NUM",
            req::SET_VRING_NUM,
            vring_state(vring, num),
            vec![],
        ),
        (
            "SET_VRING_BASE",
            req::SET_VRING_BASE,
            vring_state(vring, 0),
            vec![],
        ),
        (
            "SET_VRING_ADDR",
            req::SET_VRING_ADDR,
            vring_addr(vring, addrs.0, addrs.1, addrs.2),
            vec![],
        ),
        (
            "SET_VRING_KICK",
            req::SET_VRING_KICK,
            fd_body.clone(),
            vec![kick.as_raw_fd()],
        ),
        (
            "SET_VRING_CALL",
            req::SET_VRING_CALL,
            fd_body,
            vec![call.as_raw_fd()],
        ),
        (
            "SET_VRING_ENABLE",
            req::SET_VRING_ENABLE,
            vring_state(vring, 1),
            vec![],
        ),
    ];
    for (name, code, body, fds) in steps {
        match raw.request(code, &body, &fds)? {
            Reply::Value(0) => {}
            r if r.is_refusal() => return Ok(name),
            other => bail!("{name}: unexpected reply {other:?}"),
        }
    }
    bail!("ring {vring} (num {num}, addresses {addrs:#x?}) was started without any refusal")
}

/// Start ring `vring` (NUM [`RING`], BASE 0, ADDR `addrs`, KICK, CALL, ERR
/// with `err` if given, ENABLE); every step must be accepted. Returns the
/// kick and call eventfds.
pub fn ring_start(
    raw: &RawVhostUser,
    vring: u32,
    addrs: (u64, u64, u64),
    err: Option<&EventFd>,
) -> Result<(EventFd, EventFd)> {
    let kick = EventFd::new(0)?;
    let call = EventFd::new(0)?;
    let fd_body = u64_body(u64::from(vring & 0xff));
    let step = |name: &str, code: u32, body: &[u8], fds: &[RawFd]| {
        raw.request_ok(code, body, fds)
            .with_context(|| format!("{name} on vring {vring}"))
    };
    step(
        "SET_VRING_NUM",
        req::SET_VRING_NUM,
        &vring_state(vring, RING),
        &[],
    )?;
    step(
        "SET_VRING_BASE",
        req::SET_VRING_BASE,
        &vring_state(vring, 0),
        &[],
    )?;
    let addr = vring_addr(vring, addrs.0, addrs.1, addrs.2);
    step("SET_VRING_ADDR", req::SET_VRING_ADDR, &addr, &[])?;
    step(
        "SET_VRING_KICK",
        req::SET_VRING_KICK,
        &fd_body,
        &[kick.as_raw_fd()],
    )?;
    step(
        "SET_VRING_CALL",
        req::SET_VRING_CALL,
        &fd_body,
        &[call.as_raw_fd()],
    )?;
    if let Some(err) = err {
        step(
            "SET_VRING_ERR",
            req::SET_VRING_ERR,
            &fd_body,
            &[err.as_raw_fd()],
        )?;
    }
    step(
        "SET_VRING_ENABLE",
        req::SET_VRING_ENABLE,
        &vring_state(vring, 1),
        &[],
    )?;
    Ok((kick, call))
}

/// A nonblocking eventfd, as a VMM would give for SET_VRING_ERR.
pub fn error_eventfd() -> Result<EventFd> {
    Ok(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?)
}

/// Wait up to `timeout` for the error eventfd `err` (nonblocking) to be
/// written; its counter, which reading resets.
pub fn wait_ring_error(what: &str, err: &EventFd, timeout: Duration) -> Result<u64> {
    crate::wait::poll_until(what, timeout, Duration::from_millis(5), || {
        Ok(err.read().ok())
    })
}

/// Whether the error eventfd `err` (nonblocking) was written since the
/// last read (reading resets it).
pub fn ring_error_pending(err: &EventFd) -> bool {
    err.read().is_ok()
}

/// A testbed and its workers' pids, taken before any hostile input.
pub fn testbed(queue_pairs: u16) -> Result<(Testbed, Vec<u32>)> {
    let mut bed = Testbed::new(queue_pairs)?;
    let workers = bed
        .qpnet
        .wait_workers(usize::from(queue_pairs), Duration::from_secs(10))?;
    Ok((bed, workers))
}

/// No worker died or was restarted, qpnet still serves a fresh VMM
/// connection, and it stops cleanly: the end of every hostile-input test.
pub fn check_unharmed(mut bed: Testbed, workers: &[u32]) -> Result<()> {
    bed.qpnet.check_alive()?;
    let now = bed.qpnet.worker_pids();
    ensure!(
        now == workers,
        "workers changed: {workers:?} before, {now:?} now"
    );
    let stats = bed.qpnet.stats()?;
    for qp in 0..usize::from(QUEUE_PAIRS.min(bed.qpnet.queue_pairs())) {
        let q = stats.queue(qp).context("queue stats")?;
        let restarts = QueueStats::get(&q.restarts);
        ensure!(
            restarts == 0,
            "queue pair {qp}: worker restarted {restarts} times (it crashed)"
        );
    }
    bed.check_serving(50)?;
    let now = bed.qpnet.worker_pids();
    ensure!(
        now == workers,
        "workers changed while serving: {workers:?} before, {now:?} now"
    );
    bed.finish()
}
