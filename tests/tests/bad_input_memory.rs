//! Hostile memory descriptions: rings outside the memory table, memory
//! regions that overlap, wrap or cannot be mapped, regions that reach past
//! the end of their memfd (an access there would be SIGBUS), and memory
//! that cannot be mapped writable (a write-sealed memfd, a read-only fd). qpnet
//! refuses each clearly and keeps serving, unharmed (see
//! `qpnet_tests::hostile`).
//!
//! Needs root and `$QPNET_BIN`.

use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{ensure, Context, Result};
use qpnet_secondary::test_util::{GuestMemory, RegionLayout, MEM_BASE};
use qpnet_tests::hostile::{
    check_unharmed, ensure_refused, entries, fds, guest_memory, mem_session, outside_vmm,
    ring_start_refused, session, testbed, valid_ring, MIB, QUEUE_PAIRS, RING,
};
use qpnet_tests::raw_vhost::{mem_table, req, MemEntry};

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
    if outside_vmm(&mem, MEM_BASE) {
        cases.push((
            "ring addresses given as guest-physical addresses",
            (MEM_BASE, MEM_BASE + 8192, MEM_BASE + 4096),
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
    check_unharmed(bed, &workers)
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
            with(MEM_BASE + MIB, 4 * MIB),
        ),
        ("two regions at the same addresses", with(MEM_BASE, 4 * MIB)),
        ("a region inside another", with(MEM_BASE + MIB, MIB)),
        ("a region of size 0", with(MEM_BASE + 32 * MIB, 0)),
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
    check_unharmed(bed, &workers)
}

#[test]
fn a_region_past_the_end_of_its_memfd_is_refused_without_sigbus() -> Result<()> {
    let (bed, workers) = testbed(QUEUE_PAIRS)?;
    let small = GuestMemory::new(&[RegionLayout::new(MEM_BASE, MIB)])?;
    let r0 = &small.regions()[0];
    let base = MemEntry {
        gpa: MEM_BASE,
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
    let unharmed = check_unharmed(bed, &workers);
    ensure!(
        accepted.is_empty(),
        "not refused: {accepted:?}; afterwards: {unharmed:?}"
    );
    unharmed
}

/// Memory the worker could not write: a write-sealed memfd, and a memfd
/// reached through a read-only fd. Refused at SET_MEM_TABLE, not found out
/// by a fault later.
#[test]
fn memory_that_cannot_be_mapped_writable_is_refused() -> Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag, SealFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let layout = GuestMemory::new(&[RegionLayout::new(MEM_BASE, MIB)])?;
    let entry = MemEntry {
        gpa: MEM_BASE,
        size: MIB,
        user_addr: layout.regions()[0].vmm_addr(),
        mmap_offset: 0,
    };
    let sealed = memfd_create("qpnet-test-sealed", MFdFlags::MFD_ALLOW_SEALING)?;
    nix::unistd::ftruncate(&sealed, MIB as i64)?;
    fcntl(
        &sealed,
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK),
    )?;
    let plain = memfd_create("qpnet-test-plain", MFdFlags::empty())?;
    nix::unistd::ftruncate(&plain, MIB as i64)?;
    let read_only: OwnedFd = nix::fcntl::open(
        format!("/proc/self/fd/{}", plain.as_raw_fd()).as_str(),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    for (what, fd) in [
        ("a write-sealed memfd", sealed.as_raw_fd()),
        ("a memfd through a read-only fd", read_only.as_raw_fd()),
    ] {
        let raw = session(&bed)?;
        let r = raw.request(req::SET_MEM_TABLE, &mem_table(&[entry]), &[fd]);
        bed.explain(r.and_then(|reply| ensure_refused(what, reply)))?;
    }
    check_unharmed(bed, &workers)
}
