//! Clean shutdown, as the README promises it: SIGTERM or SIGINT to a qpnet
//! serving a VMM under traffic both ways stops it with exit status 0, every
//! worker gone, its socket and runtime files removed by qpnet itself; a TAP
//! that qpnet created (`--tap` of a missing TAP) exists while it runs, as a
//! multi-queue TAP with vnet headers, link up, and is gone after; an
//! existing TAP is left as it was (same device, flags, MAC, MTU, queue
//! length, addresses). The same through `scripts/qpnet-supervise`: SIGTERM
//! to the supervisor, it and qpnet exit 0, nothing left.
//!
//! The checks of the stop itself are the harness's ([`Qpnet::stop_with`],
//! [`Supervisor::stop`]); these tests add the traffic and the TAPs.
//!
//! Needs root and `$QPNET_BIN`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use qpnet_tests::frames::{build, FrameId, FrameKind, FrameSpec, ETHERTYPE_TEST};
use qpnet_tests::netns::NetNs;
use qpnet_tests::qpnet::Qpnet;
use qpnet_tests::stats_json::Value;
use qpnet_tests::supervise::Supervisor;
use qpnet_tests::tap_io::TapSocket;
use qpnet_tests::traffic::{tx_frame, TapCollector};
use qpnet_tests::vmm::{Vmm, VmmConfig};
use qpnet_tests::wait::wait_for;

const QUEUE_PAIRS: u16 = 2;

/// Connect a VMM to `socket`, keep frames moving both ways (TX frames from
/// the VMM, UDP frames into the TAP), and once both directions are seen
/// flowing, run `stop` while they still flow.
fn stop_under_traffic<T>(
    ns: &NetNs,
    tap: &str,
    socket: &Path,
    stop: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let tap_sock = TapSocket::open(ns, tap, ETHERTYPE_TEST)?;
    let mut vmm = Vmm::connect(
        socket,
        VmmConfig {
            queue_pairs: QUEUE_PAIRS,
            ..VmmConfig::default()
        },
    )?;
    let collector = TapCollector::start(&tap_sock)?;
    let done = AtomicBool::new(false);
    let rx_got = AtomicU64::new(0);
    let r = std::thread::scope(|s| {
        let vmm = &mut vmm;
        let (done, rx_got, tap_sock) = (&done, &rx_got, &tap_sock);
        s.spawn(move || {
            let mut seq = 0u32;
            while !done.load(Ordering::Relaxed) {
                for qp in 0..vmm.tx.len() {
                    let _ = vmm.tx[qp].reap();
                    if vmm.tx[qp]
                        .try_push(&tx_frame(qp as u16, seq))
                        .unwrap_or(false)
                    {
                        vmm.tx[qp].flush();
                    }
                }
                for rx in vmm.rx.iter_mut() {
                    let n = rx.reap().map(|f| f.len()).unwrap_or(0);
                    rx_got.fetch_add(n as u64, Ordering::Relaxed);
                }
                seq = seq.wrapping_add(1);
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        s.spawn(move || {
            let mut seq = 0u32;
            while !done.load(Ordering::Relaxed) {
                let frame = build(&FrameSpec {
                    id: FrameId { queue: 0x200, seq },
                    len: 200,
                    kind: FrameKind::Udp {
                        flow: (seq % 16) as u16,
                    },
                });
                // Fails once a TAP qpnet created is gone: expected then.
                let _ = tap_sock.send(&frame);
                seq = seq.wrapping_add(1);
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let flowing = wait_for("traffic both ways", Duration::from_secs(20), || {
            collector.received() >= 200 && rx_got.load(Ordering::Relaxed) >= 200
        })
        .with_context(|| {
            format!(
                "{} TX frames on the TAP, {} RX frames in the guest",
                collector.received(),
                rx_got.load(Ordering::Relaxed)
            )
        });
        let r = flowing.and_then(|()| stop());
        done.store(true, Ordering::Relaxed);
        r
    });
    // Its socket fails (ENETDOWN) once the TAP went down with qpnet: it
    // served its purpose before the stop.
    let _ = collector.finish();
    r
}

/// The facts of a link that must not change: `ip -d -j link` and its IPv4
/// addresses, without what depends on whether a queue is attached.
fn link_facts(ns: &NetNs, tap: &str) -> Result<Value> {
    let link: Value = serde_json::from_str(&ns.ip(&["-d", "-j", "link", "show", "dev", tap])?)?;
    let l = &link[0];
    let info = &l["linkinfo"]["info_data"];
    let addrs: Value = serde_json::from_str(&ns.ip(&["-j", "-4", "addr", "show", "dev", tap])?)?;
    let up = l["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "UP"));
    Ok(serde_json::json!({
        "ifindex": l["ifindex"], "ifname": l["ifname"], "mtu": l["mtu"],
        "address": l["address"], "txqlen": l["txqlen"], "up": up,
        "type": info["type"], "pi": info["pi"], "vnet_hdr": info["vnet_hdr"],
        "multi_queue": info["multi_queue"], "persist": info["persist"],
        "addr_info": addrs[0]["addr_info"].as_array().map(|a| a.iter()
            .map(|x| serde_json::json!([x["local"], x["prefixlen"]])).collect::<Vec<_>>()),
    }))
}

/// qpnet creates a missing TAP, serves, and on `sig` stops cleanly and the
/// TAP goes with it.
fn created_tap_goes_with_qpnet(sig: Signal) -> Result<()> {
    let ns = NetNs::new()?;
    let tap = "qpnew0";
    ensure!(ns.ifindex(tap).is_err(), "{tap} exists before qpnet");
    let qpnet = Qpnet::start(&ns, tap, QUEUE_PAIRS)?;
    let facts = link_facts(&ns, tap)?;
    ensure!(
        facts["multi_queue"] == true && facts["vnet_hdr"] == true && facts["up"] == true,
        "the TAP qpnet created: {facts}"
    );
    let socket = qpnet.socket().to_owned();
    let report = stop_under_traffic(&ns, tap, &socket, || qpnet.stop_with(sig))?;
    ensure!(
        report.workers.len() >= usize::from(QUEUE_PAIRS),
        "only workers {:?} were seen",
        report.workers
    );
    println!("{sig}: {report:?}");
    ensure!(
        ns.ifindex(tap).is_err(),
        "the TAP qpnet created is still there after {sig}"
    );
    Ok(())
}

/// An existing TAP (made as the README says) is served and, after `sig`,
/// left as it was.
fn existing_tap_is_left_as_it_was(sig: Signal) -> Result<()> {
    let ns = NetNs::new()?;
    let tap = "qptap0";
    ns.add_tap(tap, Some("10.77.0.1/24"))?;
    let before = link_facts(&ns, tap)?;
    let qpnet = Qpnet::start(&ns, tap, QUEUE_PAIRS)?;
    let socket = qpnet.socket().to_owned();
    let report = stop_under_traffic(&ns, tap, &socket, || qpnet.stop_with(sig))?;
    println!("{sig}: {report:?}");
    let after = link_facts(&ns, tap).context("the existing TAP is gone")?;
    ensure!(
        after == before,
        "the existing TAP changed: before {before}, after {after}"
    );
    Ok(())
}

#[test]
fn sigterm_under_traffic_stops_cleanly() -> Result<()> {
    created_tap_goes_with_qpnet(Signal::SIGTERM)?;
    existing_tap_is_left_as_it_was(Signal::SIGTERM)
}

#[test]
fn sigint_under_traffic_stops_cleanly() -> Result<()> {
    created_tap_goes_with_qpnet(Signal::SIGINT)?;
    existing_tap_is_left_as_it_was(Signal::SIGINT)
}

#[test]
fn sigterm_to_the_supervisor_under_traffic_stops_everything_cleanly() -> Result<()> {
    let ns = NetNs::new()?;
    let tap = "qpsup0";
    let dir = std::env::temp_dir().join(qpnet_tests::unique_name());
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("supervise.log");
    let mut sup = Supervisor::start(&ns, &dir, &log, tap, QUEUE_PAIRS)?;
    let primary = sup.wait_primary(None, Duration::from_secs(10))?;
    // The primary's children are its workers and nothing else (no log
    // pipe of the supervisor's hanging off it).
    qpnet_tests::wait::wait_for("the primary's workers", Duration::from_secs(10), || {
        primary.children().len() >= usize::from(QUEUE_PAIRS)
    })?;
    let others: Vec<String> = primary
        .children()
        .iter()
        .filter_map(|c| std::fs::read(format!("/proc/{}/cmdline", c.pid())).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| !c.starts_with("qpnet worker "))
        .collect();
    ensure!(
        others.is_empty(),
        "the primary has children that are not workers: {others:?}"
    );
    let socket = sup.socket().to_owned();
    let status = stop_under_traffic(&ns, tap, &socket, || sup.stop())?;
    println!("supervisor: {status}; primary was {}", primary.pid());
    ensure!(primary.is_reaped(), "the primary is still there");
    ensure!(
        ns.ifindex(tap).is_err(),
        "the TAP qpnet created is still there"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
