//! The datagram socket backend end to end: the test VMM drives `qpnet run
//! --udp` / `--unix-dgram`, and peer sockets the test owns (loopback
//! addresses inside the test's namespace, unix paths in a temp directory)
//! play the other end: QEMU's `-netdev dgram` wire format, one Ethernet
//! frame per datagram and no header.
//!
//! Every frame is checked byte for byte, and on the socket of its own queue
//! pair: queue pair K sends from and receives on PORT+K (or PATH.K).
//!
//! Needs root (namespaces; `nobody` for the unprivileged run) and
//! `$QPNET_BIN`.

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use qpnet_shared::{QueueStats, SharedRegion};
use qpnet_tests::netns::NetNs;
use qpnet_tests::qpnet::{Options, Qpnet};
use qpnet_tests::traffic::tx_frame;
use qpnet_tests::vmm::{Vmm, VmmConfig};

const TIMEOUT: Duration = Duration::from_secs(20);
const FRAMES: u32 = 64;
const QPNET_PORT: u16 = 5000;
const PEER_PORT: u16 = 6000;

/// Which socket kind a test runs over.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Udp4,
    Udp6,
    Unix,
}

/// The test's end of one queue pair.
enum Peer {
    Udp(UdpSocket),
    Unix(UnixDatagram),
}

impl Peer {
    fn recv(&self, buf: &mut [u8]) -> Result<(usize, String)> {
        match self {
            Peer::Udp(s) => {
                let (n, from) = s.recv_from(buf).context("peer recv")?;
                Ok((n, from.to_string()))
            }
            Peer::Unix(s) => {
                let (n, from) = s.recv_from(buf).context("peer recv")?;
                let from = from
                    .as_pathname()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                Ok((n, from))
            }
        }
    }

    fn send(&self, bytes: &[u8]) -> Result<()> {
        let n = match self {
            Peer::Udp(s) => s.send(bytes),
            Peer::Unix(s) => s.send(bytes),
        }
        .context("peer send")?;
        ensure!(n == bytes.len(), "peer sent {n} of {} bytes", bytes.len());
        Ok(())
    }
}

/// qpnet on sockets of `kind` with `qps` queue pairs, the peers, and a VMM.
struct Bed {
    vmm: Vmm,
    qpnet: Qpnet,
    peers: Vec<Peer>,
    /// Where qpnet's socket of queue pair K is, as the peer sees it.
    ours: Vec<String>,
    /// The unix paths' directory.
    dir: PathBuf,
    ns: NetNs,
}

fn ip(kind: Kind) -> &'static str {
    match kind {
        Kind::Udp6 => "[::1]",
        _ => "127.0.0.1",
    }
}

fn udp_addr(kind: Kind, port: u16) -> SocketAddr {
    format!("{}:{port}", ip(kind))
        .parse()
        .expect("a socket address")
}

impl Bed {
    fn new(kind: Kind, qps: u16) -> Result<Bed> {
        Bed::with(kind, qps, None)
    }

    fn with(kind: Kind, qps: u16, user: Option<&str>) -> Result<Bed> {
        let ns = NetNs::new()?;
        if let Kind::Udp6 = kind {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0")?;
            ns.sysctl("net.ipv6.conf.lo.disable_ipv6", "0")?;
        }
        let dir = std::env::temp_dir().join(format!("{}-dgram", qpnet_tests::unique_name()));
        std::fs::create_dir_all(&dir)?;
        let suffix = |k: u16| {
            if qps > 1 {
                format!(".{k}")
            } else {
                String::new()
            }
        };
        let (peers, ours, host) = match kind {
            Kind::Udp4 | Kind::Udp6 => {
                let peers = ns.run(|| {
                    (0..qps)
                        .map(|k| {
                            let s = UdpSocket::bind(udp_addr(kind, PEER_PORT + k))?;
                            s.connect(udp_addr(kind, QPNET_PORT + k))?;
                            s.set_read_timeout(Some(TIMEOUT))?;
                            Ok(Peer::Udp(s))
                        })
                        .collect::<Result<Vec<_>>>()
                })?;
                let ours = (0..qps)
                    .map(|k| udp_addr(kind, QPNET_PORT + k).to_string())
                    .collect();
                let spec = format!("{}:{QPNET_PORT},{}:{PEER_PORT}", ip(kind), ip(kind));
                (peers, ours, vec!["--udp".to_string(), spec])
            }
            Kind::Unix => {
                let peers = (0..qps)
                    .map(|k| {
                        let s = UnixDatagram::bind(dir.join(format!("peer{}", suffix(k))))?;
                        s.set_read_timeout(Some(TIMEOUT))?;
                        Ok(Peer::Unix(s))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let ours: Vec<String> = (0..qps)
                    .map(|k| {
                        dir.join(format!("qpnet{}", suffix(k)))
                            .display()
                            .to_string()
                    })
                    .collect();
                let spec = format!(
                    "{},{}",
                    dir.join("qpnet").display(),
                    dir.join("peer").display()
                );
                (peers, ours, vec!["--unix-dgram".to_string(), spec])
            }
        };
        let host: Vec<&str> = host.iter().map(String::as_str).collect();
        let mut opts = Options::host(&host);
        if let Some(u) = user {
            opts = opts.as_user(u);
        }
        let qpnet = Qpnet::start_opts(&ns, "", qps, &opts)?;
        if let Kind::Unix = kind {
            for (p, path) in peers.iter().zip(&ours) {
                if let Peer::Unix(s) = p {
                    s.connect(path).context("connecting the unix peer")?;
                }
            }
        }
        let vmm = Vmm::connect(
            qpnet.socket(),
            VmmConfig {
                queue_pairs: qps,
                ..VmmConfig::default()
            },
        )
        .with_context(|| format!("qpnet stderr:\n{}", qpnet.stderr()))?;
        Ok(Bed {
            vmm,
            qpnet,
            peers,
            ours,
            dir,
            ns,
        })
    }

    /// Send `frames` on TX queue `qp` and wait until the ring took them.
    fn send_tx(&mut self, qp: usize, frames: &[Vec<u8>]) -> Result<()> {
        self.vmm.tx[qp].send_all(frames, TIMEOUT)
    }

    /// Peer `qp` must receive exactly `frames`, in order, from qpnet's
    /// socket of queue pair `qp`.
    fn expect_on_peer(&self, qp: usize, frames: &[Vec<u8>]) -> Result<()> {
        let mut buf = vec![0u8; 70_000];
        for (i, f) in frames.iter().enumerate() {
            let (n, from) = self.peers[qp]
                .recv(&mut buf)
                .with_context(|| format!("qp{qp}: frame {i} of {}", frames.len()))?;
            ensure!(
                &buf[..n] == f.as_slice(),
                "qp{qp}: frame {i} differs ({n} bytes, {} sent)",
                f.len()
            );
            ensure!(
                from == self.ours[qp],
                "qp{qp}: frame {i} came from {from}, not {}",
                self.ours[qp]
            );
        }
        Ok(())
    }

    /// Frames received on RX queue `qp` until `n` arrived.
    fn rx_frames(&mut self, qp: usize, n: usize) -> Result<Vec<Vec<u8>>> {
        let frames = self.vmm.rx[qp]
            .reap_until(n, TIMEOUT)
            .with_context(|| format!("qpnet stderr:\n{}", self.qpnet.stderr()))?;
        frames
            .into_iter()
            .map(|f| {
                ensure!(
                    f.header[..10] == [0; 10],
                    "qp{qp}: RX header {:?} is not zero (a socket carries none)",
                    f.header
                );
                ensure!(
                    f.num_buffers() == f.buffers,
                    "qp{qp}: num_buffers {} for a frame of {} buffers",
                    f.num_buffers(),
                    f.buffers
                );
                Ok(f.data)
            })
            .collect()
    }

    /// Frames from every peer reach the RX queue of its queue pair, byte
    /// exact and in order; none reaches another queue.
    fn rx_round(&mut self, qps: &[usize], seqs: std::ops::Range<u32>) -> Result<()> {
        for &qp in qps {
            for seq in seqs.clone() {
                self.peers[qp].send(&tx_frame(qp as u16, seq))?;
            }
        }
        for &qp in qps {
            let want: Vec<Vec<u8>> = seqs.clone().map(|s| tx_frame(qp as u16, s)).collect();
            let got = self.rx_frames(qp, want.len())?;
            ensure!(
                got == want,
                "qp{qp}: RX frames differ from what its peer sent"
            );
        }
        for qp in 0..self.peers.len() {
            ensure!(
                self.vmm.rx[qp].reap()?.is_empty(),
                "qp{qp}: an RX frame arrived that its peer did not send"
            );
        }
        Ok(())
    }

    /// TX frames of every queue pair in `qps` reach its own peer.
    fn tx_round(&mut self, qps: &[usize], seqs: std::ops::Range<u32>) -> Result<()> {
        for &qp in qps {
            let frames: Vec<Vec<u8>> = seqs.clone().map(|s| tx_frame(qp as u16, s)).collect();
            self.send_tx(qp, &frames)?;
        }
        for &qp in qps {
            let frames: Vec<Vec<u8>> = seqs.clone().map(|s| tx_frame(qp as u16, s)).collect();
            self.expect_on_peer(qp, &frames)?;
        }
        Ok(())
    }

    fn stats(&self) -> Result<SharedRegion> {
        self.qpnet.stats()
    }

    fn counter(
        &self,
        qp: usize,
        f: impl Fn(&QueueStats) -> &std::sync::atomic::AtomicU64,
    ) -> Result<u64> {
        self.qpnet.counter(qp, f)
    }

    /// Send frames on TX queue `qp` until `peer_unreachable` moves (a UDP
    /// peer's ICMP error comes back on the send after the one it answers;
    /// a unix peer may still be held open for a moment by a child another
    /// test forks).
    fn tx_until_unreachable(&mut self, qp: usize) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        for seq in 1000.. {
            self.send_tx(qp, &[tx_frame(qp as u16, seq)])
                .with_context(|| format!("qpnet stderr:\n{}", self.qpnet.stderr()))?;
            if self.counter(qp, |q| &q.peer_unreachable)? > 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!(
            "qp{qp}: peer_unreachable did not move; qpnet stderr:\n{}",
            self.qpnet.stderr()
        )
    }

    /// Wait until qpnet's log says `needle`.
    fn wait_log(&self, needle: &str) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        while !self.qpnet.stderr().contains(needle) {
            if Instant::now() > deadline {
                bail!(
                    "qpnet's log never said {needle:?}:\n{}",
                    self.qpnet.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Wait until counter `f` of queue pair `qp` reaches `at_least`.
    fn wait_counter(
        &self,
        what: &str,
        qp: usize,
        at_least: u64,
        f: impl Fn(&QueueStats) -> &std::sync::atomic::AtomicU64,
    ) -> Result<()> {
        self.qpnet.wait_counter(what, qp, at_least, TIMEOUT, f)
    }

    fn finish(self) -> Result<()> {
        let Bed {
            vmm,
            qpnet,
            dir,
            ours,
            ..
        } = self;
        let err = qpnet.stderr();
        ensure!(
            !err.contains("SIGSYS"),
            "a worker was killed by its seccomp filter:\n{err}"
        );
        drop(vmm);
        qpnet.stop()?;
        for path in ours.iter().filter(|o| o.starts_with('/')) {
            ensure!(
                !std::path::Path::new(path).exists(),
                "qpnet left the unix socket {path} it bound"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }
}

fn both_ways(kind: Kind, qps: u16) -> Result<()> {
    let mut bed = Bed::new(kind, qps)?;
    let all: Vec<usize> = (0..qps as usize).collect();
    bed.tx_round(&all, 0..FRAMES)?;
    bed.rx_round(&all, 0..FRAMES)?;
    for qp in all {
        ensure!(bed.counter(qp, |q| &q.tx_frames)? == u64::from(FRAMES));
        ensure!(bed.counter(qp, |q| &q.rx_frames)? == u64::from(FRAMES));
    }
    bed.finish()
}

#[test]
fn udp4_one_queue_pair_moves_frames_both_ways_byte_exact() -> Result<()> {
    both_ways(Kind::Udp4, 1)
}

#[test]
fn udp4_four_queue_pairs_each_on_its_own_port() -> Result<()> {
    both_ways(Kind::Udp4, 4)
}

#[test]
fn udp6_one_queue_pair_moves_frames_both_ways_byte_exact() -> Result<()> {
    both_ways(Kind::Udp6, 1)
}

#[test]
fn udp6_four_queue_pairs_each_on_its_own_port() -> Result<()> {
    both_ways(Kind::Udp6, 4)
}

#[test]
fn unix_one_queue_pair_uses_the_paths_as_given() -> Result<()> {
    both_ways(Kind::Unix, 1)
}

#[test]
fn unix_four_queue_pairs_each_on_its_own_path() -> Result<()> {
    both_ways(Kind::Unix, 4)
}

/// Oversized, empty and runt datagrams are dropped and counted on their queue
/// pair; the queue keeps working and the other queue pair sees nothing.
fn bad_datagrams(kind: Kind) -> Result<()> {
    let mut bed = Bed::new(kind, 2)?;
    // Larger than the RX buffers a 1500-byte MTU asks the guest for.
    bed.peers[0].send(&vec![0x5a; 4000])?;
    bed.wait_counter("drop_too_large", 0, 1, |q| &q.drop_too_large)?;
    bed.peers[0].send(&[])?;
    bed.wait_counter("drop_rx_short", 0, 1, |q| &q.drop_rx_short)?;
    bed.peers[0].send(&[0xa5; 13])?;
    bed.wait_counter("drop_rx_short", 0, 2, |q| &q.drop_rx_short)?;
    bed.rx_round(&[0, 1], 0..8)?;
    bed.tx_round(&[0, 1], 0..8)?;
    ensure!(bed.counter(1, |q| &q.drop_too_large)? == 0);
    ensure!(bed.counter(1, |q| &q.drop_rx_short)? == 0);
    ensure!(
        bed.counter(0, |q| &q.rx_frames)? == 8,
        "dropped datagrams are no frames"
    );
    // `qpnet stats` shows them (the table sums them into its drops).
    let doc = bed.qpnet.stats_json(&[])?;
    let q0 = doc.queue(0)?;
    ensure!(q0.counter("drop_too_large")? == 1 && q0.counter("drop_rx_short")? == 2);
    ensure!(q0.counter("drops")? == 3 && doc.queue(1)?.counter("drops")? == 0);
    ensure!(q0.counter("peer_unreachable")? == 0);
    bed.finish()
}

#[test]
fn udp_oversized_and_empty_datagrams_are_dropped_and_counted() -> Result<()> {
    bad_datagrams(Kind::Udp4)
}

#[test]
fn unix_oversized_and_empty_datagrams_are_dropped_and_counted() -> Result<()> {
    bad_datagrams(Kind::Unix)
}

/// The UDP peer of queue pair 0 goes away: frames to it are lost, the
/// ICMP port unreachable is counted, queue pair 1 is unaffected, and when
/// the peer is back queue pair 0 works again.
#[test]
fn udp_peer_gone_is_counted_and_the_queue_recovers() -> Result<()> {
    let mut bed = Bed::new(Kind::Udp4, 2)?;
    bed.tx_round(&[0, 1], 0..4)?;
    bed.peers[0] = bed.ns.run(|| {
        // Replaced by a socket on another port: 6000 is closed meanwhile.
        Ok(Peer::Udp(UdpSocket::bind(udp_addr(Kind::Udp4, 7000))?))
    })?;
    bed.tx_until_unreachable(0)?;
    bed.wait_log("Connection refused")?;
    let doc = bed.qpnet.stats_json(&[])?;
    ensure!(doc.queue(0)?.counter("peer_unreachable")? >= 1);
    bed.tx_round(&[1], 4..12)?;
    bed.rx_round(&[1], 0..8)?;
    ensure!(bed.counter(1, |q| &q.peer_unreachable)? == 0);
    // The peer is back on its port.
    bed.peers[0] = bed.ns.run(|| {
        let s = UdpSocket::bind(udp_addr(Kind::Udp4, PEER_PORT))?;
        s.connect(udp_addr(Kind::Udp4, QPNET_PORT))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        Ok(Peer::Udp(s))
    })?;
    bed.tx_round(&[0], 200..210)?;
    bed.rx_round(&[0], 0..8)?;
    bed.finish()
}

/// The unix peer of queue pair 0 closes its socket: sends fail and are
/// counted (its TX ring still completes every chain), queue pair 1 is
/// unaffected both ways; when the peer is back on the same path, qpnet
/// connects to it again and queue pair 0 works both ways.
#[test]
fn unix_peer_gone_is_counted_and_reached_again_when_back() -> Result<()> {
    let mut bed = Bed::new(Kind::Unix, 2)?;
    bed.tx_round(&[0, 1], 0..4)?;
    bed.peers[0] = Peer::Unix(UnixDatagram::unbound()?);
    bed.tx_until_unreachable(0)?;
    bed.wait_log("Connection refused")?;
    bed.vmm.tx[0].wait_idle(TIMEOUT)?;
    bed.tx_round(&[1], 4..12)?;
    bed.rx_round(&[1], 0..8)?;
    ensure!(bed.counter(1, |q| &q.peer_unreachable)? == 0);
    // The peer is restarted on the same path: qpnet connects to it again.
    let path = bed.dir.join("peer.0");
    std::fs::remove_file(&path)?;
    let back = UnixDatagram::bind(&path)?;
    back.set_read_timeout(Some(TIMEOUT))?;
    back.connect(&bed.ours[0])?;
    bed.peers[0] = Peer::Unix(back);
    bed.wait_log("connected again to the unix datagram peer")?;
    bed.tx_round(&[0, 1], 100..116)?;
    bed.rx_round(&[0, 1], 100..116)?;
    bed.finish()
}

/// qpnet as `nobody`, with its socket and runtime directory in a directory
/// it owns, serves over UDP: no capability needed.
#[test]
fn unprivileged_qpnet_serves_over_udp() -> Result<()> {
    let mut bed = Bed::with(Kind::Udp4, 2, Some("nobody"))?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", bed.qpnet.pid()))?;
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
    ensure!(
        !uid_line.contains("\t0\t"),
        "qpnet runs as root: {uid_line}"
    );
    let cap = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .unwrap_or("");
    ensure!(
        cap.ends_with("0000000000000000"),
        "qpnet has capabilities: {cap}"
    );
    bed.tx_round(&[0, 1], 0..FRAMES)?;
    bed.rx_round(&[0, 1], 0..FRAMES)?;
    bed.finish()
}

/// A worker killed on a socket backend is replaced and gets the same
/// socket: datagrams sent meanwhile wait in it, and both ways work again;
/// the other queue pair never stops.
#[test]
fn a_killed_worker_is_replaced_on_the_same_socket() -> Result<()> {
    let mut bed = Bed::new(Kind::Udp4, 2)?;
    bed.tx_round(&[0, 1], 0..8)?;
    let pid = bed
        .stats()?
        .queue(0)
        .context("queue 0")?
        .pid
        .load(std::sync::atomic::Ordering::Relaxed);
    ensure!(pid != 0, "queue pair 0 has a worker");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    bed.wait_counter("restarts", 0, 1, |q| &q.restarts)?;
    bed.rx_round(&[0, 1], 100..116)?;
    bed.tx_round(&[0, 1], 100..116)?;
    bed.finish()
}

/// No virtio-net offload is offered on a socket backend: a driver that
/// wants checksum and TSO offloads does not find them.
#[test]
fn no_offloads_are_offered_on_a_socket_backend() -> Result<()> {
    let bed = Bed::new(Kind::Udp4, 1)?;
    let Bed {
        vmm, qpnet, dir, ..
    } = bed;
    drop(vmm);
    let _ = std::fs::remove_dir_all(dir);
    let wanting = Vmm::connect(
        qpnet.socket(),
        VmmConfig {
            tx_offloads: true,
            ..VmmConfig::default()
        },
    );
    let err = match wanting {
        Ok(_) => bail!("a driver got TX offloads from a socket backend"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(err.contains("missing"), "unexpected refusal: {err}");
    qpnet.stop()?;
    Ok(())
}
