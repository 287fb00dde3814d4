//! `qpnet run --udp ... --single-peer`: every queue pair sends to one peer
//! socket, the way one QEMU `-netdev dgram` (one unconnected socket) is
//! the peer of a multi-queue guest.
//!
//! The test VMM drives qpnet with two queue pairs; the peer is one
//! unconnected UDP socket the test owns (127.0.0.1 inside the test's
//! namespace). Frames the VMM sends on either TX queue reach that one
//! socket, byte exact, each from its own queue pair's port (PORT+K); what
//! the peer sends to queue pair 0's port reaches RX queue 0, and what it
//! sends to PORT+1 reaches RX queue 1 (qpnet's sockets are connected to
//! the peer, which is the same address for both).
//!
//! Needs root (namespaces) and `$QPNET_BIN`.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use qpnet_tests::netns::NetNs;
use qpnet_tests::qpnet::{Options, Qpnet};
use qpnet_tests::traffic::tx_frame;
use qpnet_tests::vmm::{Vmm, VmmConfig};

const TIMEOUT: Duration = Duration::from_secs(20);
const FRAMES: u32 = 32;
const QPNET_PORT: u16 = 5000;
const PEER_PORT: u16 = 6000;
const QUEUE_PAIRS: u16 = 2;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Frames on RX queue `qp` until `n` arrived.
fn rx_frames(vmm: &mut Vmm, qp: usize, n: usize) -> Result<Vec<Vec<u8>>> {
    let deadline = Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    while got.len() < n {
        got.extend(vmm.rx[qp].reap()?.into_iter().map(|f| f.data));
        if Instant::now() > deadline {
            bail!("qp{qp}: {} of {n} RX frames after {TIMEOUT:?}", got.len());
        }
        vmm.rx[qp].queue.wait_call(Duration::from_millis(5));
    }
    Ok(got)
}

fn scenario(vmm: &mut Vmm, peer: &UdpSocket) -> Result<()> {
    // TX: both queue pairs reach the one peer, each from PORT+K.
    for qp in 0..QUEUE_PAIRS {
        let frames: Vec<Vec<u8>> = (0..FRAMES).map(|s| tx_frame(qp, s)).collect();
        vmm.tx[qp as usize].send_all(&frames, TIMEOUT)?;
        let mut buf = vec![0u8; 70_000];
        for (i, f) in frames.iter().enumerate() {
            let (n, from) = peer
                .recv_from(&mut buf)
                .with_context(|| format!("qp{qp}: frame {i} of {FRAMES} at the peer"))?;
            ensure!(&buf[..n] == f.as_slice(), "qp{qp}: frame {i} differs");
            ensure!(
                from == addr(QPNET_PORT + qp),
                "qp{qp}: frame {i} came from {from}, not from queue pair {qp}'s port"
            );
        }
    }
    // RX: the peer's frames reach the queue pair whose port they were sent to.
    for qp in 0..QUEUE_PAIRS {
        let want: Vec<Vec<u8>> = (0..FRAMES).map(|s| tx_frame(qp, 100 + s)).collect();
        for f in &want {
            peer.send_to(f, addr(QPNET_PORT + qp))?;
        }
        let got = rx_frames(vmm, qp as usize, want.len())?;
        ensure!(
            got == want,
            "qp{qp}: RX frames differ from what the peer sent"
        );
        let other = vmm.rx[1 - qp as usize].reap()?;
        ensure!(
            other.is_empty(),
            "a frame for qp{qp} reached the other queue"
        );
    }
    Ok(())
}

#[test]
fn single_peer_every_queue_pair_sends_to_one_unconnected_socket() -> Result<()> {
    let ns = NetNs::new()?;
    let peer = ns.run(|| {
        let s = UdpSocket::bind(addr(PEER_PORT))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        Ok(s)
    })?;
    let spec = format!("127.0.0.1:{QPNET_PORT},127.0.0.1:{PEER_PORT}");
    let mut opts = Options::host(&["--udp", &spec]);
    opts.extra.push("--single-peer".into());
    let qpnet = Qpnet::start_opts(&ns, "", QUEUE_PAIRS, &opts)?;
    let mut vmm = Vmm::connect(
        qpnet.socket(),
        VmmConfig {
            queue_pairs: QUEUE_PAIRS,
            ..VmmConfig::default()
        },
    )
    .with_context(|| format!("qpnet stderr:\n{}", qpnet.stderr()))?;
    // Printed before qpnet serves its first VMM.
    let log = qpnet.stderr();
    ensure!(
        log.contains("one peer socket for all") && log.contains("remote.port=5000"),
        "qpnet's log does not describe the single peer:\n{log}"
    );
    if let Err(e) = scenario(&mut vmm, &peer) {
        bail!("{e:#}\nqpnet stderr:\n{}", qpnet.stderr());
    }
    let doc = qpnet.stats_json(&[])?;
    for qp in 0..QUEUE_PAIRS as usize {
        let q = doc.queue(qp)?;
        ensure!(q.counter("peer_unreachable")? == 0, "qp{qp} lost its peer");
    }
    drop(vmm);
    qpnet.stop()?;
    Ok(())
}
