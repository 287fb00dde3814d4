//! Hostile descriptor chains from the guest: loops, indices out of the
//! table, buffers outside guest memory or straddling a region's end,
//! wrong-direction buffers, nested and malformed indirect tables, runts, an
//! avail index far past the ring, hostile RX buffers. Each must cost only
//! itself: it comes back used with length 0 and is counted, a good frame
//! sent right after it still arrives, and qpnet comes through unharmed
//! (see `qpnet_tests::hostile`). A ring the guest made unusable is stopped,
//! counted (`ring_faults`) and reported once on the ring's error eventfd
//! (SET_VRING_ERR), and the other queue pair goes on forwarding.
//!
//! Needs root and `$QPNET_BIN`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use qpnet_secondary::test_util::{desc as d, Desc, F_INDIRECT, F_NEXT, F_WRITE};
use qpnet_shared::{QueueStats, WorkerState};
use qpnet_tests::frames::{build, mixed_len, FrameId, FrameKind, FrameSpec};
use qpnet_tests::hostile::{
    check_unharmed, error_eventfd, ring_error_pending, testbed, wait_ring_error, TIMEOUT,
};
use qpnet_tests::net_driver::NET_HDR_LEN;
use qpnet_tests::traffic::{rx_traffic_lossy, tx_frame, TapCollector};
use qpnet_tests::vmm::VmmConfig;
use qpnet_tests::wait::wait_for;
use vhost::VhostBackend;

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
    const N: u16 = F_NEXT;
    // An indirect table (its contents do not matter: it is refused first)
    // and one that points at another indirect table.
    let table = s + 4096;
    mem.write(table, &d(s, NET_HDR_LEN as u32, N, 1).to_bytes());
    let nested = s + 16 * 1024;
    mem.write(nested, &d(table, 32, F_INDIRECT, 0).to_bytes());
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
            vec![(r(9), d(s, 72, F_WRITE, 0))],
        ),
        chain(
            "a chain through all descriptors and on, longer than the ring",
            false,
            through_all,
        ),
        chain(
            "an indirect table inside an indirect table",
            false,
            vec![(r(11), d(nested, 16, F_INDIRECT, 0))],
        ),
        chain(
            "an indirect table of 24 bytes",
            false,
            vec![(r(12), d(table, 24, F_INDIRECT, 0))],
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
            vmm.tx[0].push_raw_chain(descs, head);
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
            vmm.tx[0].flush();
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
    check_unharmed(bed, &workers)
}

/// An avail index far ahead of the ring (more entries than the ring has)
/// must not crash the worker.
#[test]
fn avail_index_jumping_past_the_ring_harms_nothing_else() -> Result<()> {
    let (mut bed, workers) = testbed(1)?;
    let mut vmm = bed.vmm(VmmConfig::default())?;
    let size = vmm.config().queue_size;
    vmm.tx[0].queue.set_avail_idx(size + 10);
    vmm.tx[0].queue.kick();
    vmm.rx[0].queue.set_avail_idx(3 * size);
    vmm.rx[0].queue.kick();
    for i in 0..20 {
        bed.tap.send(&build(&FrameSpec {
            id: FrameId { queue: 0, seq: i },
            len: 100,
            kind: FrameKind::Udp { flow: 1 },
        }))?;
    }
    // Bounded wait for a negative: give the worker time to trip over it.
    std::thread::sleep(Duration::from_millis(200));
    let used = vmm.tx[0].queue.used_idx();
    ensure!(
        used == 0,
        "the device used {used} chains from a ring whose avail index is impossible"
    );
    drop(vmm);
    check_unharmed(bed, &workers)
}

/// A TX ring the guest made unusable (avail index more than a ring ahead)
/// is stopped, counted once in `ring_faults` and reported once on the error
/// eventfd the VMM gave with SET_VRING_ERR; the other rings' error eventfds
/// stay silent, the other queue pair forwards both ways, and no worker is
/// replaced.
#[test]
fn a_ring_made_unusable_is_reported_on_its_error_eventfd() -> Result<()> {
    let (mut bed, workers) = testbed(2)?;
    let mut vmm = bed.vmm(VmmConfig {
        queue_pairs: 2,
        ..VmmConfig::default()
    })?;
    let errs = [
        error_eventfd()?,
        error_eventfd()?,
        error_eventfd()?,
        error_eventfd()?,
    ];
    let result = (|| -> Result<()> {
        for (vring, err) in errs.iter().enumerate() {
            vmm.frontend()
                .set_vring_err(vring, err)
                .with_context(|| format!("SET_VRING_ERR {vring}"))?;
        }
        // The rings restarted with their error eventfds still forward.
        bed.frames_through(&mut vmm, &[0, 1], 0..20)?;
        ensure!(
            !errs.iter().any(ring_error_pending),
            "an error eventfd was written before any fault"
        );
        let size = vmm.config().queue_size;
        let tx0 = &mut vmm.tx[0];
        let used_before = tx0.queue.used_idx();
        tx0.queue.set_avail_idx(used_before.wrapping_add(size + 10));
        tx0.queue.kick();
        let n = wait_ring_error("ring 1's error eventfd", &errs[1], TIMEOUT)?;
        ensure!(n == 1, "ring 1's error eventfd counted {n}, one fault");
        // Kicked again: the ring is stopped, so nothing more is reported.
        for _ in 0..5 {
            vmm.tx[0].queue.kick();
        }
        bed.frames_through(&mut vmm, &[1], 20..120)?;
        bed.rx_round(&mut vmm, 200, 8, mixed_len)?;
        let used = vmm.tx[0].queue.used_idx();
        ensure!(
            used == used_before,
            "the device used chains of a ring whose avail index is impossible ({used_before} -> {used})"
        );
        for (vring, err) in errs.iter().enumerate() {
            ensure!(
                !ring_error_pending(err),
                "ring {vring}'s error eventfd written (again)"
            );
        }
        let stats = bed.qpnet.stats()?;
        let faults: Vec<u64> = (0..2)
            .map(|qp| stats.queue(qp).map(|q| QueueStats::get(&q.ring_faults)))
            .collect::<Option<_>>()
            .context("queue stats")?;
        ensure!(faults == [1, 0], "ring_faults per queue pair: {faults:?}");
        Ok(())
    })();
    bed.explain(result)?;
    drop(vmm);
    check_unharmed(bed, &workers)
}

/// The error eventfd outlives the worker it was given to: after queue pair
/// 0's worker is killed, its replacement gets the fd again with the resumed
/// ring, forwards, and reports the guest's fault on it, once.
#[test]
fn a_replacement_worker_reports_on_the_error_eventfd_it_got_again() -> Result<()> {
    let (mut bed, _workers) = testbed(2)?;
    let mut vmm = bed.vmm(VmmConfig {
        queue_pairs: 2,
        ..VmmConfig::default()
    })?;
    let err = error_eventfd()?;
    let result = (|| -> Result<()> {
        vmm.frontend()
            .set_vring_err(1, &err)
            .context("SET_VRING_ERR 1")?;
        let stats = bed.qpnet.stats()?;
        let q0 = stats.queue(0).context("queue stats")?;
        let old = q0.pid.load(Ordering::Relaxed);
        ensure!(old != 0, "queue pair 0 has no worker pid");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(old)?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
        wait_for("queue pair 0's replacement worker", TIMEOUT, || {
            let now = q0.pid.load(Ordering::Relaxed);
            now != 0 && now != old && q0.worker_state() == Some(WorkerState::Running)
        })?;
        bed.frames_through(&mut vmm, &[0, 1], 0..20)?;
        ensure!(
            !ring_error_pending(&err),
            "the error eventfd was written before any fault"
        );
        let size = vmm.config().queue_size;
        let tx0 = &mut vmm.tx[0];
        tx0.queue
            .set_avail_idx(tx0.queue.used_idx().wrapping_add(size + 10));
        tx0.queue.kick();
        let n = wait_ring_error("ring 1's error eventfd", &err, TIMEOUT)?;
        ensure!(n == 1, "ring 1's error eventfd counted {n}, one fault");
        let (faults, restarts) = (
            QueueStats::get(&q0.ring_faults),
            QueueStats::get(&q0.restarts),
        );
        ensure!(
            (faults, restarts) == (1, 1),
            "queue pair 0: ring_faults {faults}, restarts {restarts}"
        );
        Ok(())
    })();
    bed.explain(result)?;
    drop(vmm);
    bed.finish()
}

/// Hostile RX buffers placed first in the ring: read-only, outside guest
/// memory, straddling a region's end, looping. The device must not write a
/// read-only buffer and must not die; as on TX, every hostile chain comes
/// back used, in order, with length 0, and is counted as a bad descriptor;
/// frames after them arrive intact.
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
    let hostile = [
        d(b0, bsz, 0, 0),
        d(0x1000, bsz, F_WRITE, 0),
        d(end0 - 16, bsz, F_WRITE, 0),
        d(rx.buffer_gpa(3), bsz, F_WRITE | F_NEXT, 3),
    ];
    for (i, desc) in hostile.iter().enumerate() {
        rx.queue.write_desc(i as u16, *desc);
        rx.queue.push_avail(i as u16);
    }
    rx.post_all_except(hostile.len() as u16);
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
    mem.read_into(b0, &mut ro);
    ensure!(
        ro.iter().all(|&b| b == 0xAA),
        "the device wrote into a read-only RX buffer"
    );
    // As on TX: every hostile chain came back, in ring order, each once,
    // with length 0 (nothing written into it), and each was counted.
    let completed: Vec<(u32, u32)> = vmm.rx[0]
        .raw_completions()
        .iter()
        .map(|e| (e.id, e.len))
        .collect();
    let want: Vec<(u32, u32)> = (0..hostile.len() as u32).map(|id| (id, 0)).collect();
    ensure!(
        completed == want,
        "hostile RX chains completed as (head, len) {completed:?}, expected {want:?}"
    );
    let stats = bed.qpnet.stats()?;
    let bad = QueueStats::get(&stats.queue(0).context("stats")?.drop_bad_descriptor);
    ensure!(
        bad == hostile.len() as u64,
        "drop_bad_descriptor is {bad} for {} hostile RX chains",
        hostile.len()
    );
    drop(vmm);
    check_unharmed(bed, &workers)
}
