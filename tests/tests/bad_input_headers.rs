//! Malformed virtio-net headers on TX: a frame whose header asks for an
//! offload the driver did not negotiate, carries flag bits a TX header may
//! not carry, or points outside the frame never reaches the host kernel.
//! The TAP's own `rx_packets` counter does not move for it, the stats count
//! it by cause, a good frame sent right after it still arrives, and qpnet
//! comes through unharmed (see `qpnet_tests::hostile`).
//!
//! Needs root and `$QPNET_BIN`.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use qpnet_tests::hostile::{check_unharmed, testbed, TIMEOUT};
use qpnet_tests::net_driver::NET_HDR_LEN;
use qpnet_tests::netns::run_checked;
use qpnet_tests::testbed::{Testbed, TAP_NAME};
use qpnet_tests::traffic::{tx_frame, TapCollector};
use qpnet_tests::vmm::VmmConfig;

/// One header and the counter it must land in (`None`: it is well formed
/// and the frame must arrive).
struct Case {
    what: &'static str,
    header: [u8; NET_HDR_LEN],
    counter: Option<&'static str>,
}

/// flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
fn hdr(flags: u8, gso: u8, fields: [u16; 4]) -> [u8; NET_HDR_LEN] {
    let mut h = [0; NET_HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    for (i, v) in fields.iter().enumerate() {
        h[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
    }
    h
}

fn case(what: &'static str, header: [u8; NET_HDR_LEN], counter: Option<&'static str>) -> Case {
    Case {
        what,
        header,
        counter,
    }
}

/// Frames qpnet wrote into the TAP so far (the TAP's `rx_packets`).
fn tap_rx_packets(bed: &Testbed) -> Result<u64> {
    let path = format!("/sys/class/net/{TAP_NAME}/statistics/rx_packets");
    let out = run_checked(bed.ns.command("cat").arg(&path))?;
    out.trim()
        .parse()
        .with_context(|| format!("{path} holds {out:?}"))
}

/// Send each case's frame, each followed by a good frame; then check what
/// reached the TAP and what the stats counted.
fn run(tx_offloads: bool, cases: &[Case]) -> Result<()> {
    let (mut bed, workers) = testbed(1)?;
    let mut vmm = bed.vmm(VmmConfig {
        tx_offloads,
        split_tx_header: false,
        ..VmmConfig::default()
    })?;
    let collector = TapCollector::start(&bed.tap)?;
    let before = tap_rx_packets(&bed)?;
    let mut seq = 0u32;
    let mut expected = 0u64;
    let result = (|| -> Result<()> {
        for (i, c) in cases.iter().enumerate() {
            let tx = &mut vmm.tx[0];
            // A refused frame is tagged as queue 1's, so the collector would
            // see it if it ever reached the TAP; a well-formed one is a
            // good frame of queue 0.
            let frame = match c.counter {
                Some(_) => tx_frame(1, i as u32),
                None => tx_frame(0, seq),
            };
            ensure!(
                tx.try_push_with_header(&c.header, &frame)?,
                "no free TX slot"
            );
            if c.counter.is_none() {
                seq += 1;
            }
            ensure!(tx.try_push(&tx_frame(0, seq))?, "no free TX slot");
            seq += 1;
            tx.flush();
            expected = u64::from(seq);
            collector
                .wait_received(expected, TIMEOUT)
                .with_context(|| format!("the good frame sent after {} never arrived", c.what))?;
            vmm.tx[0].wait_idle(TIMEOUT)?;
        }
        collector.check(&[(0, 0..seq)])?;
        let written = tap_rx_packets(&bed)? - before;
        ensure!(
            written == expected,
            "the TAP received {written} frames from qpnet, expected only the {expected} good ones"
        );
        let doc = bed.qpnet.stats_json(&[])?;
        let q = doc.queue(0)?;
        let mut want: BTreeMap<&str, u64> = BTreeMap::new();
        for c in cases.iter().filter_map(|c| c.counter) {
            *want.entry(c).or_default() += 1;
        }
        for name in [
            "drop_hdr_flags",
            "drop_hdr_gso",
            "drop_hdr_gso_size",
            "drop_hdr_len",
            "drop_hdr_csum",
        ] {
            let got = q.counter(name)?;
            let w = want.get(name).copied().unwrap_or(0);
            ensure!(got == w, "stats: {name} {got}, expected {w}");
        }
        ensure!(
            q.counter("tx_frames")? == expected,
            "stats: tx_frames {}, expected {expected}",
            q.counter("tx_frames")?
        );
        Ok(())
    })();
    collector.finish()?;
    bed.explain(result)?;
    drop(vmm);
    check_unharmed(bed, &workers)
}

/// The driver negotiated CSUM, HOST_TSO4, HOST_TSO6 and HOST_ECN.
#[test]
fn malformed_tx_headers_never_reach_the_tap_with_offloads() -> Result<()> {
    // Test frames are 60..1514 bytes: the first one is 60.
    run(
        true,
        &[
            case("RSC_INFO flag", hdr(4, 0, [0; 4]), Some("drop_hdr_flags")),
            case(
                "DATA_VALID flag on TX",
                hdr(2, 0, [0; 4]),
                Some("drop_hdr_flags"),
            ),
            case(
                "unknown flag bit",
                hdr(0x81, 0, [0; 4]),
                Some("drop_hdr_flags"),
            ),
            case(
                "UDP GSO (HOST_UFO not offered)",
                hdr(1, 3, [42, 1000, 34, 6]),
                Some("drop_hdr_gso"),
            ),
            case(
                "unknown GSO type",
                hdr(1, 7, [54, 1000, 34, 16]),
                Some("drop_hdr_gso"),
            ),
            case(
                "ECN bit without a GSO type",
                hdr(0, 0x80, [0; 4]),
                Some("drop_hdr_gso"),
            ),
            case(
                "TSO4 with gso_size 0",
                hdr(1, 1, [54, 0, 34, 16]),
                Some("drop_hdr_gso_size"),
            ),
            case(
                "hdr_len past the frame",
                hdr(0, 0, [4000, 0, 0, 0]),
                Some("drop_hdr_len"),
            ),
            case(
                "checksum past the frame",
                hdr(1, 0, [0, 0, 1500, 16]),
                Some("drop_hdr_csum"),
            ),
            case(
                "checksum offset overflowing",
                hdr(1, 0, [0, 0, u16::MAX, u16::MAX]),
                Some("drop_hdr_csum"),
            ),
            case("a hdr_len inside the frame", hdr(0, 0, [42, 0, 0, 0]), None),
        ],
    )
}

/// The driver negotiated no offload: headers asking for one are refused.
#[test]
fn offloads_not_negotiated_are_refused() -> Result<()> {
    run(
        false,
        &[
            case(
                "NEEDS_CSUM without CSUM",
                hdr(1, 0, [0, 0, 34, 6]),
                Some("drop_hdr_flags"),
            ),
            case(
                "TSO4 not negotiated",
                hdr(0, 1, [54, 1448, 0, 0]),
                Some("drop_hdr_gso"),
            ),
            case(
                "TSO6 not negotiated",
                hdr(0, 4, [74, 1428, 0, 0]),
                Some("drop_hdr_gso"),
            ),
        ],
    )
}
