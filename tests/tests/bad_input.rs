//! Hostile input from the VMM and the guest: qpnet refuses it clearly and
//! keeps serving.
//!
//! Each refusal must be explicit: a nonzero REPLY_ACK, or the connection
//! closed for a malformed message; silence or a success ack fails the test.
//! After every group of cases the same qpnet must still serve a fresh VMM
//! connection that passes frames both ways, with its workers never restarted.
//! Hostile descriptor chains must cost only themselves: a good frame sent
//! right after each one still arrives.
//!
//! Needs root and the release binary (`cargo build --release -p
//! qpnet-primary`).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use qpnet_shared::QueueStats;
use qpnet_tests::frames::mixed_len;
use qpnet_tests::memory::{GuestMemory, RegionLayout, DEFAULT_GPA};
use qpnet_tests::net_driver::NET_HDR_LEN;
use qpnet_tests::raw_vhost::{
    feature, mem_table, req, u64_body, vring_addr, vring_state, MemEntry, RawVhostUser, Reply,
    FLAG_NEED_REPLY, FLAG_VERSION,
};
use qpnet_tests::testbed::Testbed;
use qpnet_tests::traffic::{rx_traffic_lossy, tx_frame, TapCollector};
use qpnet_tests::virtq::{Desc, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use qpnet_tests::vmm::VmmConfig;
use qpnet_tests::wait::wait_for;
use vmm_sys_util::eventfd::EventFd;

const QUEUE_PAIRS: u16 = 2;
const RING: u32 = 256;
const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

/// A raw session: connected, features (VERSION_1 | PROTOCOL_FEATURES | MQ)
/// and protocol features (MQ | REPLY_ACK) negotiated.
fn session(bed: &Testbed) -> Result<RawVhostUser> {
    let mut raw = RawVhostUser::connect(bed.qpnet.socket(), Duration::from_secs(5))?;
    raw.set_reply_timeout(Duration::from_secs(5));
    raw.negotiate(feature::MQ)?;
    Ok(raw)
}

/// Two real memfd regions (4 MiB each, a 28 MiB hole between them).
fn guest_memory() -> Result<GuestMemory> {
    GuestMemory::new(&[
        RegionLayout {
            gpa: DEFAULT_GPA,
            size: 4 * MIB,
        },
        RegionLayout {
            gpa: DEFAULT_GPA + 32 * MIB,
            size: 4 * MIB,
        },
    ])
}

fn entries(mem: &GuestMemory) -> Vec<MemEntry> {
    mem.regions()
        .iter()
        .map(|r| MemEntry {
            gpa: r.gpa(),
            size: r.size(),
            user_addr: r.vmm_addr(),
            mmap_offset: 0,
        })
        .collect()
}

fn fds(mem: &GuestMemory) -> Vec<RawFd> {
    mem.regions().iter().map(|r| r.file().as_raw_fd()).collect()
}

/// A session whose memory table holds `mem`.
fn mem_session(bed: &Testbed, mem: &GuestMemory) -> Result<RawVhostUser> {
    let raw = session(bed)?;
    raw.request_ok(req::SET_MEM_TABLE, &mem_table(&entries(mem)), &fds(mem))
        .context("a valid memory table must be accepted")?;
    Ok(raw)
}

/// Valid VMM addresses for a 256-entry ring at the start of region 0:
/// (desc, used, avail).
fn valid_ring(mem: &GuestMemory) -> (u64, u64, u64) {
    let u = mem.regions()[0].vmm_addr();
    (u, u + 8192, u + 4096)
}

/// True if `addr` is inside none of `mem`'s regions in VMM address space.
fn outside_vmm(mem: &GuestMemory, addr: u64) -> bool {
    mem.regions()
        .iter()
        .all(|r| addr < r.vmm_addr() || addr >= r.vmm_addr() + r.size())
}

fn ensure_refused(what: &str, reply: Reply) -> Result<()> {
    ensure!(
        reply.is_refusal(),
        "{what}: expected a refusal (nonzero REPLY_ACK or the connection closed), got {reply:?}"
    );
    Ok(())
}

/// Start ring `vring` step by step (NUM `num`, BASE, ADDR, KICK, CALL,
/// ENABLE); one of the steps must be refused. Returns the refused step.
fn ring_start_refused(
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

/// A testbed and its workers' pids, taken before any hostile input.
fn testbed(queue_pairs: u16) -> Result<(Testbed, Vec<u32>)> {
    let mut bed = Testbed::new(queue_pairs)?;
    let workers = bed
        .qpnet
        .wait_workers(usize::from(queue_pairs), Duration::from_secs(10))?;
    Ok((bed, workers))
}

/// No worker died or was restarted, and qpnet still serves a fresh VMM
/// connection.
fn check_unharmed(bed: &mut Testbed, workers: &[u32]) -> Result<()> {
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
    Ok(())
}

/// A named way to send one hostile message and read what came back.
type MessageCase<'a> = (
    &'static str,
    Box<dyn Fn(&RawVhostUser) -> Result<Reply> + 'a>,
);

#[test]
fn unknown_and_malformed_messages_are_refused() -> Result<()> {
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let mem = guest_memory()?;
    let cases: Vec<MessageCase> = vec![
        (
            "unknown request code 999",
            Box::new(|raw| {
                raw.send(999, FLAG_VERSION | FLAG_NEED_REPLY, &u64_body(0), &[])?;
                raw.recv_reply(999)
            }),
        ),
        (
            "request code 0",
            Box::new(|raw| {
                raw.send(0, FLAG_VERSION | FLAG_NEED_REPLY, &[], &[])?;
                raw.recv_reply(0)
            }),
        ),
        (
            "header claiming a 64 KiB body",
            Box::new(|raw| {
                let mut h = Vec::new();
                for v in [req::SET_VRING_NUM, FLAG_VERSION | FLAG_NEED_REPLY, 0x10000] {
                    h.extend_from_slice(&v.to_le_bytes());
                }
                raw.send_bytes(&h, &vring_state(0, 256), &[])?;
                raw.recv_reply(req::SET_VRING_NUM)
            }),
        ),
        (
            "SET_VRING_NUM with a 4-byte body",
            Box::new(|raw| raw.request(req::SET_VRING_NUM, &0u32.to_le_bytes(), &[])),
        ),
        (
            "wrong protocol version",
            Box::new(|raw| {
                raw.send(
                    req::SET_VRING_NUM,
                    0x2 | FLAG_NEED_REPLY,
                    &vring_state(0, 256),
                    &[],
                )?;
                raw.recv_reply(req::SET_VRING_NUM)
            }),
        ),
        (
            "SET_MEM_TABLE for 2 regions carrying 1 region and 1 fd",
            Box::new(|raw| {
                let mut body = mem_table(&entries(&mem)[..1]);
                body[0] = 2;
                raw.request(req::SET_MEM_TABLE, &body, &fds(&mem)[..1])
            }),
        ),
        (
            "SET_MEM_TABLE with no fd",
            Box::new(|raw| raw.request(req::SET_MEM_TABLE, &mem_table(&entries(&mem)[..1]), &[])),
        ),
        (
            "SET_MEM_TABLE with 0 regions",
            Box::new(|raw| raw.request(req::SET_MEM_TABLE, &mem_table(&[]), &[])),
        ),
        (
            "a message cut short by the VMM going away",
            Box::new(|raw| {
                let mut h = Vec::new();
                for v in [req::SET_VRING_NUM, FLAG_VERSION | FLAG_NEED_REPLY, 8] {
                    h.extend_from_slice(&v.to_le_bytes());
                }
                raw.send_bytes(&h, &[0, 0, 0, 0], &[])?;
                raw.stream().shutdown(std::net::Shutdown::Write)?;
                raw.recv_reply(req::SET_VRING_NUM)
            }),
        ),
    ];
    for (what, case) in &cases {
        let raw = session(&bed)?;
        let r = case(&raw);
        bed.explain(r.and_then(|reply| ensure_refused(what, reply)))?;
    }
    check_unharmed(&mut bed, &workers)
}

/// A VMM that stops in the middle of a message and keeps its socket open
/// must not freeze the primary: the connection is closed after the
/// primary's I/O timeout (2 s), and qpnet serves the next VMM.
#[test]
fn a_message_stalled_mid_body_is_cut_off() -> Result<()> {
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let mut raw = session(&bed)?;
    raw.set_reply_timeout(Duration::from_secs(10));
    let mut h = Vec::new();
    for v in [req::SET_VRING_NUM, FLAG_VERSION | FLAG_NEED_REPLY, 8] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    let started = std::time::Instant::now();
    // The header announces an 8-byte body; none follows.
    raw.send_bytes(&h, &[], &[])?;
    let reply = raw.recv_reply(req::SET_VRING_NUM)?;
    let took = started.elapsed();
    println!("stalled connection closed after {took:?}");
    ensure!(
        matches!(reply, Reply::Closed),
        "a stalled message got {reply:?} instead of the connection closing"
    );
    ensure!(
        took < Duration::from_secs(5),
        "the stalled connection was closed only after {took:?} (timeout 2 s)"
    );
    check_unharmed(&mut bed, &workers)
}

#[test]
fn vring_index_out_of_range_is_refused() -> Result<()> {
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let mem = guest_memory()?;
    let (d, u, a) = valid_ring(&mem);
    let first_bad = 2 * u32::from(QUEUE_PAIRS);
    for index in [first_bad, first_bad + 1, 255, 0xffff_ffff] {
        let requests: Vec<(&str, u32, Vec<u8>)> = vec![
            (
                "SET_VRING_NUM",
                req::SET_VRING_NUM,
                vring_state(index, RING),
            ),
            ("SET_VRING_BASE", req::SET_VRING_BASE, vring_state(index, 0)),
            (
                "SET_VRING_ADDR",
                req::SET_VRING_ADDR,
                vring_addr(index, d, u, a),
            ),
            (
                "SET_VRING_ENABLE",
                req::SET_VRING_ENABLE,
                vring_state(index, 1),
            ),
        ];
        for (name, code, body) in requests {
            let raw = mem_session(&bed, &mem)?;
            let r = raw.request(code, &body, &[]);
            bed.explain(
                r.and_then(|reply| ensure_refused(&format!("{name} on vring {index}"), reply)),
            )?;
        }
        // GET_VRING_BASE has no ack: the only clear refusal is closing.
        let raw = mem_session(&bed, &mem)?;
        raw.send(
            req::GET_VRING_BASE,
            FLAG_VERSION,
            &vring_state(index, 0),
            &[],
        )?;
        let reply = raw.recv_reply(req::GET_VRING_BASE)?;
        ensure!(
            reply == Reply::Closed,
            "GET_VRING_BASE on vring {index}: expected the connection closed, got {reply:?}"
        );
    }
    for index in [first_bad, 255] {
        for (name, code) in [
            ("SET_VRING_KICK", req::SET_VRING_KICK),
            ("SET_VRING_CALL", req::SET_VRING_CALL),
        ] {
            let raw = mem_session(&bed, &mem)?;
            let efd = EventFd::new(0)?;
            let r = raw.request(code, &u64_body(u64::from(index)), &[efd.as_raw_fd()]);
            bed.explain(
                r.and_then(|reply| ensure_refused(&format!("{name} on vring {index}"), reply)),
            )?;
        }
    }
    check_unharmed(&mut bed, &workers)
}

#[test]
fn bad_queue_sizes_are_refused() -> Result<()> {
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let mem = guest_memory()?;
    for num in [0, 3, 100, 32769, 65536, 0xffff_ffff] {
        let raw = mem_session(&bed, &mem)?;
        let r = ring_start_refused(&raw, 1, num, valid_ring(&mem));
        let step = bed.explain(r.with_context(|| format!("queue size {num}")))?;
        eprintln!("queue size {num}: refused at {step}");
    }
    check_unharmed(&mut bed, &workers)
}

#[test]
fn ring_addresses_outside_the_memory_table_are_refused() -> Result<()> {
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let mem = guest_memory()?;
    let (d, u, a) = valid_ring(&mem);
    let end0 = mem.regions()[0].vmm_addr() + mem.regions()[0].size();
    let mut below = mem.regions()[0].vmm_addr() - 4096;
    while !outside_vmm(&mem, below) {
        below -= 4 * MIB;
    }
    let mut cases: Vec<(&str, (u64, u64, u64))> = vec![
        ("descriptor table below every region", (below, u, a)),
        ("used ring at address 0", (d, 0, a)),
        (
            "avail ring at the top of the address space",
            (d, u, u64::MAX - 8),
        ),
        (
            "avail ring straddling the end of region 0",
            (d, u, end0 - 100),
        ),
        (
            "descriptor table straddling the end of region 0",
            (end0 - 2048, u, a),
        ),
    ];
    if outside_vmm(&mem, DEFAULT_GPA) {
        cases.push((
            "ring addresses given as guest-physical addresses",
            (DEFAULT_GPA, DEFAULT_GPA + 8192, DEFAULT_GPA + 4096),
        ));
    }
    if outside_vmm(&mem, end0) {
        cases.push(("used ring just past the end of region 0", (d, end0, a)));
    }
    for (what, addrs) in cases {
        let raw = mem_session(&bed, &mem)?;
        let r = ring_start_refused(&raw, 1, RING, addrs);
        let step = bed.explain(r.with_context(|| what.to_string()))?;
        eprintln!("{what}: refused at {step}");
    }
    check_unharmed(&mut bed, &workers)
}

#[test]
fn overlapping_and_impossible_memory_regions_are_refused() -> Result<()> {
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let mem = guest_memory()?;
    let e = entries(&mem);
    let with = |gpa1: u64, size1: u64| {
        vec![
            e[0],
            MemEntry {
                gpa: gpa1,
                size: size1,
                ..e[1]
            },
        ]
    };
    let cases: Vec<(&str, Vec<MemEntry>)> = vec![
        (
            "regions overlapping by 3 MiB",
            with(DEFAULT_GPA + MIB, 4 * MIB),
        ),
        (
            "two regions at the same addresses",
            with(DEFAULT_GPA, 4 * MIB),
        ),
        ("a region inside another", with(DEFAULT_GPA + MIB, MIB)),
        ("a region of size 0", with(DEFAULT_GPA + 32 * MIB, 0)),
        (
            "a region whose end overflows u64",
            with(u64::MAX - 0xffff, 4 * MIB),
        ),
        (
            "a region whose VMM address range overflows u64",
            vec![
                e[0],
                MemEntry {
                    user_addr: u64::MAX - 0xffff,
                    ..e[1]
                },
            ],
        ),
        (
            "an mmap offset that is not page aligned (region still inside its file)",
            vec![MemEntry {
                mmap_offset: 0x800,
                size: e[0].size - 0x1000,
                ..e[0]
            }],
        ),
    ];
    for (what, table) in cases {
        let raw = session(&bed)?;
        let fds = fds(&mem);
        let r = raw.request(req::SET_MEM_TABLE, &mem_table(&table), &fds[..table.len()]);
        bed.explain(r.and_then(|reply| ensure_refused(what, reply)))?;
    }
    // A pipe where a memory fd belongs: not a file that can be mapped. (Its
    // session is closed before the check: qpnet serves one VMM at a time.)
    {
        let (pipe_r, _pipe_w) = nix::unistd::pipe()?;
        let raw = session(&bed)?;
        let r = raw.request(
            req::SET_MEM_TABLE,
            &mem_table(&e[..1]),
            &[pipe_r.as_raw_fd()],
        );
        bed.explain(r.and_then(|reply| ensure_refused("a pipe as a memory region's fd", reply)))?;
    }
    check_unharmed(&mut bed, &workers)
}

#[test]
fn a_region_past_the_end_of_its_memfd_is_refused_without_sigbus() -> Result<()> {
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let small = GuestMemory::new(&[RegionLayout {
        gpa: DEFAULT_GPA,
        size: MIB,
    }])?;
    let r0 = &small.regions()[0];
    let base = MemEntry {
        gpa: DEFAULT_GPA,
        size: MIB,
        user_addr: r0.vmm_addr(),
        mmap_offset: 0,
    };
    let cases = [
        (
            "a 4 MiB region on a 1 MiB memfd",
            MemEntry {
                size: 4 * MIB,
                ..base
            },
        ),
        (
            "a region starting at the memfd's end",
            MemEntry {
                mmap_offset: MIB,
                ..base
            },
        ),
        (
            "a region half past the memfd's end",
            MemEntry {
                mmap_offset: MIB / 2,
                ..base
            },
        ),
        (
            "an unaligned mmap offset",
            MemEntry {
                mmap_offset: 100,
                size: MIB - 4096,
                ..base
            },
        ),
    ];
    let mut accepted = Vec::new();
    for (what, entry) in cases {
        let raw = session(&bed)?;
        let reply = raw.request(
            req::SET_MEM_TABLE,
            &mem_table(&[entry]),
            &[r0.file().as_raw_fd()],
        )?;
        if reply.is_refusal() {
            continue;
        }
        // Accepted: push it to the SIGBUS it invites (a ring in the part of
        // the region that has no file behind it), then report.
        accepted.push(format!("{what}: {reply:?}"));
        let u = entry.user_addr + entry.size - 64 * 1024;
        let _ = ring_start_refused(&raw, 1, RING, (u, u + 8192, u + 4096));
    }
    let unharmed = check_unharmed(&mut bed, &workers);
    ensure!(
        accepted.is_empty(),
        "not refused: {accepted:?}; afterwards: {unharmed:?}"
    );
    unharmed
}

fn not_eventfds() -> Result<Vec<(&'static str, OwnedFd)>> {
    let (pipe_r, pipe_w) = nix::unistd::pipe()?;
    let memfd =
        nix::sys::memfd::memfd_create(c"not-an-eventfd", nix::sys::memfd::MFdFlags::empty())?;
    let null = OwnedFd::from(File::open("/dev/null")?);
    let (sock, _peer) = std::os::unix::net::UnixStream::pair()?;
    Ok(vec![
        ("a pipe's read end", pipe_r),
        ("a pipe's write end", pipe_w),
        ("a memfd", memfd),
        ("/dev/null", null),
        ("a unix socket", OwnedFd::from(sock)),
    ])
}

#[test]
fn kick_and_call_fds_that_are_not_eventfds_are_refused() -> Result<()> {
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let mem = guest_memory()?;
    let (d, u, a) = valid_ring(&mem);
    for (name, code) in [
        ("SET_VRING_KICK", req::SET_VRING_KICK),
        ("SET_VRING_CALL", req::SET_VRING_CALL),
    ] {
        for (what, fd) in not_eventfds()? {
            let raw = mem_session(&bed, &mem)?;
            raw.request_ok(req::SET_VRING_NUM, &vring_state(1, RING), &[])?;
            raw.request_ok(req::SET_VRING_BASE, &vring_state(1, 0), &[])?;
            raw.request_ok(req::SET_VRING_ADDR, &vring_addr(1, d, u, a), &[])?;
            let r = raw.request(code, &u64_body(1), &[fd.as_raw_fd()]);
            bed.explain(r.and_then(|reply| ensure_refused(&format!("{name} with {what}"), reply)))?;
        }
    }
    // Malformed: an fd announced (no "invalid fd" flag) but none attached,
    // and two eventfds where one is expected.
    let raw = mem_session(&bed, &mem)?;
    let r = raw.request(req::SET_VRING_KICK, &u64_body(1), &[]);
    bed.explain(r.and_then(|reply| ensure_refused("SET_VRING_KICK without its fd", reply)))?;
    let raw = mem_session(&bed, &mem)?;
    let (e1, e2) = (EventFd::new(0)?, EventFd::new(0)?);
    let r = raw.request(
        req::SET_VRING_KICK,
        &u64_body(1),
        &[e1.as_raw_fd(), e2.as_raw_fd()],
    );
    bed.explain(r.and_then(|reply| ensure_refused("SET_VRING_KICK with two fds", reply)))?;
    check_unharmed(&mut bed, &workers)
}

/// A hostile TX chain: what it is, whether it is a runt (else a bad
/// descriptor), and its descriptors (the first is the head).
struct ChainCase {
    what: &'static str,
    runt: bool,
    descs: Vec<(u16, Desc)>,
}

/// Shorthand for a [`ChainCase`].
fn chain(what: &'static str, runt: bool, descs: Vec<(u16, Desc)>) -> ChainCase {
    ChainCase { what, runt, descs }
}

/// Hostile TX chains, each followed by a good frame: every good frame must
/// arrive, every hostile chain must come back used, counters must say why.
#[test]
fn hostile_tx_chains_cost_only_themselves() -> Result<()> {
    let (mut bed, workers) = testbed(1)?;
    let mut vmm = bed.vmm(VmmConfig {
        indirect_desc: true,
        split_tx_header: false,
        ..VmmConfig::default()
    })?;
    let collector = TapCollector::start(&bed.tap)?;
    let size = vmm.config().queue_size;
    let tx = &vmm.tx[0];
    let r = |k: u16| tx.reserved_desc(k);
    let s = tx.scratch();
    let mem = vmm.memory().clone();
    let end0 = mem.regions()[0].gpa() + mem.regions()[0].size();
    // A valid header + 60-byte frame at the scratch start, for chains that
    // are bad only in their structure.
    let frame = tx_frame(7, 0);
    mem.fill(s, NET_HDR_LEN, 0);
    mem.write(s + NET_HDR_LEN as u64, &frame[..60]);
    let d = |addr: u64, len: u32, flags: u16, next: u16| Desc {
        addr,
        len,
        flags,
        next,
    };
    const N: u16 = VIRTQ_DESC_F_NEXT;
    // An indirect table (its contents do not matter: it is refused first)
    // and one that points at another indirect table.
    let table = s + 4096;
    mem.write(table, &d(s, NET_HDR_LEN as u32, N, 1).to_bytes());
    let nested = s + 16 * 1024;
    mem.write(nested, &d(table, 32, VIRTQ_DESC_F_INDIRECT, 0).to_bytes());
    // A chain through every descriptor of the table and on: longer than the
    // ring. It borrows the driver's slot descriptors (all free between
    // cases), so the good frame after it waits until it is refused.
    let head = r(10);
    let mut through_all: Vec<(u16, Desc)> = (0..size)
        .map(|i| (i, d(s + 12, 1, N, (i + 1) % size)))
        .collect();
    through_all[usize::from(head)].1 = d(s, NET_HDR_LEN as u32, N, head + 1);
    through_all.swap(0, usize::from(head));
    let first_reserved = r(0);

    let cases: Vec<ChainCase> = vec![
        chain(
            "two descriptors looping",
            false,
            vec![(r(0), d(s, 12, N, r(1))), (r(1), d(s + 12, 60, N, r(0)))],
        ),
        chain(
            "a descriptor chained to itself",
            false,
            vec![(r(2), d(s, 72, N, r(2)))],
        ),
        chain(
            "next index outside the table",
            false,
            vec![(r(3), d(s, 12, N, size + 7))],
        ),
        chain(
            "a buffer below guest memory",
            false,
            vec![(r(4), d(0x1000, 72, 0, 0))],
        ),
        chain(
            "a buffer in the hole between regions",
            false,
            vec![(r(5), d(end0 + 4096, 72, 0, 0))],
        ),
        chain(
            "a buffer straddling the end of region 0",
            false,
            vec![(r(6), d(end0 - 40, 100, 0, 0))],
        ),
        chain(
            "a buffer address that overflows",
            false,
            vec![(r(7), d(u64::MAX - 16, 100, 0, 0))],
        ),
        chain("a 4 GiB buffer", false, vec![(r(8), d(s, u32::MAX, 0, 0))]),
        chain(
            "a device-writable buffer on TX",
            false,
            vec![(r(9), d(s, 72, VIRTQ_DESC_F_WRITE, 0))],
        ),
        chain(
            "a chain through all descriptors and on, longer than the ring",
            false,
            through_all,
        ),
        chain(
            "an indirect table inside an indirect table",
            false,
            vec![(r(11), d(nested, 16, VIRTQ_DESC_F_INDIRECT, 0))],
        ),
        chain(
            "an indirect table of 24 bytes",
            false,
            vec![(r(12), d(table, 24, VIRTQ_DESC_F_INDIRECT, 0))],
        ),
        chain(
            "a frame shorter than the virtio-net header",
            true,
            vec![(r(13), d(s, 8, 0, 0))],
        ),
    ];
    let result = (|| -> Result<()> {
        for (i, ChainCase { what, descs, .. }) in cases.iter().enumerate() {
            let head = descs[0].0;
            vmm.tx[0].push_raw_chain(descs, head)?;
            if descs.iter().any(|(i, _)| *i < first_reserved) {
                let tx = &mut vmm.tx[0];
                wait_for(&format!("{what} to be refused"), TIMEOUT, || {
                    tx.reap().is_ok() && tx.raw_completions().len() > i
                })?;
            }
            ensure!(
                vmm.tx[0].try_push(&tx_frame(0, i as u32))?,
                "no free TX slot"
            );
            vmm.tx[0].flush()?;
            let tx = &mut vmm.tx[0];
            let done = wait_for(
                &format!("the chain after {what} to complete"),
                TIMEOUT,
                || tx.reap().is_ok() && tx.raw_completions().len() > i && tx.in_flight() == 0,
            );
            done.with_context(|| {
                format!(
                    "after {what}: raw completions {:?}, in flight {}",
                    vmm.tx[0].raw_completions(),
                    vmm.tx[0].in_flight()
                )
            })?;
            collector
                .wait_received(i as u64 + 1, TIMEOUT)
                .with_context(|| format!("the good frame sent after {what} never arrived"))?;
        }
        let heads: Vec<u32> = vmm.tx[0].raw_completions().iter().map(|e| e.id).collect();
        let want: Vec<u32> = cases.iter().map(|c| u32::from(c.descs[0].0)).collect();
        ensure!(
            heads == want,
            "hostile chains completed as {heads:?}, expected {want:?}"
        );
        collector.check(&[(0, 0..cases.len() as u32)])?;
        let stats = bed.qpnet.stats()?;
        let q = stats.queue(0).context("queue stats")?;
        let bad = cases.iter().filter(|c| !c.runt).count() as u64;
        let runts = cases.iter().filter(|c| c.runt).count() as u64;
        let (got_bad, got_runt, got_tx) = (
            QueueStats::get(&q.drop_bad_descriptor),
            QueueStats::get(&q.drop_runt),
            QueueStats::get(&q.tx_frames),
        );
        ensure!(
            got_bad == bad && got_runt == runts && got_tx == cases.len() as u64,
            "stats: drop_bad_descriptor {got_bad} (want {bad}), drop_runt {got_runt} (want {runts}), tx_frames {got_tx} (want {})",
            cases.len()
        );
        Ok(())
    })();
    collector.finish()?;
    bed.explain(result)?;
    drop(vmm);
    check_unharmed(&mut bed, &workers)
}

/// An avail index far ahead of the ring (more entries than the ring has)
/// must not crash the worker.
#[test]
fn avail_index_jumping_past_the_ring_harms_nothing_else() -> Result<()> {
    let (mut bed, workers) = testbed(1)?;
    let mut vmm = bed.vmm(VmmConfig::default())?;
    let size = vmm.config().queue_size;
    vmm.tx[0].queue.set_avail_idx(size + 10);
    vmm.tx[0].fds.kick()?;
    vmm.rx[0].queue.set_avail_idx(3 * size);
    vmm.rx[0].fds.kick()?;
    for i in 0..20 {
        bed.tap.send(&qpnet_tests::frames::build(
            &qpnet_tests::frames::FrameSpec {
                id: qpnet_tests::frames::FrameId { queue: 0, seq: i },
                len: 100,
                kind: qpnet_tests::frames::FrameKind::Udp { flow: 1 },
            },
        ))?;
    }
    // Bounded wait for a negative: give the worker time to trip over it.
    std::thread::sleep(Duration::from_millis(200));
    let used = vmm.tx[0].queue.used_idx();
    ensure!(
        used == 0,
        "the device used {used} chains from a ring whose avail index is impossible"
    );
    drop(vmm);
    check_unharmed(&mut bed, &workers)
}

/// Hostile RX buffers placed first in the ring: read-only, outside guest
/// memory, looping. The device must not write a read-only buffer, must not
/// die, and frames after them must arrive intact.
#[test]
fn hostile_rx_buffers_cost_only_themselves() -> Result<()> {
    let (mut bed, workers) = testbed(1)?;
    let mut vmm = bed.vmm(VmmConfig {
        post_rx: false,
        ..VmmConfig::default()
    })?;
    let mem = vmm.memory().clone();
    let rx = &mut vmm.rx[0];
    let (b0, bsz) = (rx.buffer_gpa(0), rx.buffer_size());
    let end0 = mem.regions()[0].gpa() + mem.regions()[0].size();
    mem.fill(b0, bsz as usize, 0xAA);
    let d = |addr: u64, len: u32, flags: u16, next: u16| Desc {
        addr,
        len,
        flags,
        next,
    };
    let hostile = [
        d(b0, bsz, 0, 0),
        d(0x1000, bsz, VIRTQ_DESC_F_WRITE, 0),
        d(end0 - 16, bsz, VIRTQ_DESC_F_WRITE, 0),
        d(
            rx.buffer_gpa(3),
            bsz,
            VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
            3,
        ),
    ];
    for (i, desc) in hostile.iter().enumerate() {
        rx.queue.write_desc(i as u16, *desc);
        rx.queue.push_avail(i as u16);
    }
    rx.post_all_except(hostile.len() as u16)?;
    let r = rx_traffic_lossy(
        &mut vmm,
        &bed.tap,
        300,
        4,
        mixed_len,
        hostile.len() as u32,
        TIMEOUT,
    );
    let report = bed.explain(r)?;
    eprintln!(
        "hostile RX: {report:?}; completions {:?}",
        vmm.rx[0].raw_completions()
    );
    let mut ro = vec![0u8; bsz as usize];
    mem.read(b0, &mut ro);
    ensure!(
        ro.iter().all(|&b| b == 0xAA),
        "the device wrote into a read-only RX buffer"
    );
    for e in vmm.rx[0].raw_completions() {
        ensure!(
            e.len == 0,
            "hostile RX chain {} completed with length {}",
            e.id,
            e.len
        );
    }
    let stats = bed.qpnet.stats()?;
    let bad = QueueStats::get(&stats.queue(0).context("stats")?.drop_bad_descriptor);
    ensure!(
        bad >= 1,
        "no bad descriptor counted for {} hostile RX chains",
        hostile.len()
    );
    drop(vmm);
    check_unharmed(&mut bed, &workers)
}
