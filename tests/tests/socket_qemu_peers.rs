//! QEMU's own netdevs as the peers of qpnet's socket backends, with no
//! guest: QEMU (`-machine none`) joins the netdev qpnet talks to (a
//! `-netdev stream,server=on`, or a unix `-netdev dgram`) and a UDP
//! `-netdev dgram` to a socket the test owns in one hub, so every frame
//! qpnet sends comes out of QEMU as a UDP datagram, and back. Frames are
//! checked byte for byte both ways; then QEMU is restarted and qpnet
//! reaches the new one.
//!
//! Needs root (namespaces), qemu-system-x86_64 and `$QPNET_BIN`.

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use qpnet_tests::netns::NetNs;
use qpnet_tests::qpnet::{Options, Qpnet};
use qpnet_tests::traffic::tx_frame;
use qpnet_tests::vmm::{Vmm, VmmConfig};

const TIMEOUT: Duration = Duration::from_secs(20);
const QEMU_UDP: u16 = 7301;
const TEST_UDP: u16 = 7302;

/// QEMU bridging `netdev` (id `s0`, its socket at `sock`) and UDP
/// 127.0.0.1:QEMU_UDP -> TEST_UDP, inside `ns`.
fn start_qemu(ns: &NetNs, netdev: &str, sock: &Path, log: &Path) -> Result<Child> {
    let qemu = "qemu-system-x86_64";
    if Command::new(qemu).arg("--version").output().is_err() {
        bail!("{qemu} is missing: install qemu-system-x86 (scripts/install-deps.sh does)");
    }
    let _ = std::fs::remove_file(sock);
    let mut cmd = ns.command(qemu);
    cmd.args(["-machine", "none", "-nodefaults", "-display", "none"])
        .args(["-netdev", netdev])
        .arg("-netdev")
        .arg(format!(
            "dgram,id=d0,local.type=inet,local.host=127.0.0.1,local.port={QEMU_UDP},\
             remote.type=inet,remote.host=127.0.0.1,remote.port={TEST_UDP}"
        ))
        .args(["-netdev", "hubport,id=h0,hubid=0,netdev=s0"])
        .args(["-netdev", "hubport,id=h1,hubid=0,netdev=d0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?);
    let child = cmd.spawn().context("starting QEMU")?;
    let deadline = Instant::now() + TIMEOUT;
    while !sock.exists() {
        ensure!(
            Instant::now() < deadline,
            "QEMU did not listen on {}: {}",
            sock.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

struct Bed {
    vmm: Vmm,
    qpnet: Qpnet,
    udp: UdpSocket,
}

impl Bed {
    /// Throw away what QEMU forwarded so far (the frames sent while qpnet
    /// looked for the new QEMU).
    fn drain_udp(&self) -> Result<()> {
        self.udp
            .set_read_timeout(Some(Duration::from_millis(100)))?;
        while self.udp.recv(&mut [0u8; 2048]).is_ok() {}
        self.udp.set_read_timeout(Some(TIMEOUT))?;
        Ok(())
    }

    fn err(&self) -> String {
        format!("qpnet stderr:\n{}", self.qpnet.stderr())
    }

    /// Guest -> qpnet -> QEMU's stream -> hub -> QEMU's dgram -> our UDP
    /// socket, and back; `seqs` each way, byte exact and in order.
    fn both_ways(&mut self, seqs: std::ops::Range<u32>) -> Result<()> {
        let frames: Vec<Vec<u8>> = seqs.map(|s| tx_frame(0, s)).collect();
        self.vmm.tx[0].send_all(&frames, TIMEOUT)?;
        let mut buf = vec![0u8; 70_000];
        for (i, f) in frames.iter().enumerate() {
            let n = self
                .udp
                .recv(&mut buf)
                .with_context(|| format!("TX frame {i} through QEMU; {}", self.err()))?;
            ensure!(&buf[..n] == f.as_slice(), "TX frame {i} differs after QEMU");
        }
        for f in &frames {
            self.udp.send(f)?;
        }
        let got: Vec<Vec<u8>> = self.vmm.rx[0]
            .reap_until(frames.len(), TIMEOUT)
            .with_context(|| format!("RX frames from QEMU; {}", self.err()))?
            .into_iter()
            .map(|f| f.data)
            .collect();
        ensure!(got == frames, "RX frames from QEMU differ");
        Ok(())
    }
}

/// qpnet with `host` arguments, its log waited on for `connected` (the
/// count of lines naming a connection it made), a VMM and the UDP socket.
fn start_bed(ns: &NetNs, host: &[&str]) -> Result<Bed> {
    let udp = ns.run(|| {
        let s = UdpSocket::bind(("127.0.0.1", TEST_UDP))?;
        s.connect(("127.0.0.1", QEMU_UDP))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        Ok(s)
    })?;
    let qpnet = Qpnet::start_opts(ns, "", 1, &Options::host(host))?;
    let vmm = Vmm::connect(qpnet.socket(), VmmConfig::default())
        .with_context(|| format!("qpnet stderr:\n{}", qpnet.stderr()))?;
    Ok(Bed { vmm, qpnet, udp })
}

/// Wait until qpnet's log has `n` lines saying `needle`.
fn wait_log(bed: &Bed, needle: &str, n: usize) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    while bed.qpnet.stderr().matches(needle).count() < n {
        ensure!(
            Instant::now() < deadline,
            "qpnet never said {needle:?}; {}",
            bed.err()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The worker gets a new connection right after the primary logs it.
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}

/// QEMU's `-netdev dgram,local.type=unix,...` pointed at qpnet's
/// `--unix-dgram` socket: byte exact both ways; a restarted QEMU on the
/// same path is reached again.
#[test]
fn qemus_unix_dgram_netdev_is_a_peer_and_a_restarted_one_is_reached_again() -> Result<()> {
    let ns = NetNs::new()?;
    let dir = std::env::temp_dir().join(format!("{}-qdgram", qpnet_tests::unique_name()));
    std::fs::create_dir_all(&dir)?;
    let (theirs, ours) = (dir.join("qemu.sock"), dir.join("qpnet.sock"));
    let netdev = format!(
        "dgram,id=s0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
        theirs.display(),
        ours.display()
    );
    let log = dir.join("qemu.log");
    let mut qemu = start_qemu(&ns, &netdev, &theirs, &log)?;
    let spec = format!("{},{}", ours.display(), theirs.display());
    let mut bed = start_bed(&ns, &["--unix-dgram", &spec])?;
    bed.both_ways(0..32)?;
    qemu.kill()?;
    qemu.wait()?;
    // Frames sent to the dead QEMU are counted; a new QEMU on the same
    // path is connected to again (a send that finds the peer gone starts
    // that, so the guest keeps sending meanwhile).
    let mut qemu = start_qemu(&ns, &netdev, &theirs, &log)?;
    let deadline = Instant::now() + TIMEOUT;
    while !bed
        .qpnet
        .stderr()
        .contains("connected again to the unix datagram peer")
    {
        ensure!(
            Instant::now() < deadline,
            "qpnet did not reach the new QEMU; {}",
            bed.err()
        );
        bed.vmm.tx[0].send_all(&[tx_frame(0, 60)], TIMEOUT)?;
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        bed.qpnet.counter(0, |q| &q.peer_unreachable)? > 0,
        "frames sent to the dead QEMU were not counted"
    );
    wait_log(&bed, "connected again to the unix datagram peer", 1)?;
    bed.drain_udp()?;
    bed.both_ways(100..132)?;
    qemu.kill()?;
    qemu.wait()?;
    let Bed { vmm, qpnet, .. } = bed;
    drop(vmm);
    qpnet.stop()?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[test]
fn qemus_stream_netdev_is_a_peer_and_a_restarted_one_is_connected_again() -> Result<()> {
    let ns = NetNs::new()?;
    let dir = std::env::temp_dir().join(format!("{}-qstream", qpnet_tests::unique_name()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("qemu-stream.sock");
    let log = dir.join("qemu.log");
    let netdev = format!(
        "stream,id=s0,server=on,addr.type=unix,addr.path={}",
        sock.display()
    );
    let mut qemu = start_qemu(&ns, &netdev, &sock, &log)?;
    let spec = format!("unix:{}", sock.display());
    let mut bed = start_bed(&ns, &["--stream", &spec])?;
    wait_log(&bed, "stream connected to", 1)?;
    bed.both_ways(0..32)?;
    // QEMU goes away and a new one listens on the same path.
    qemu.kill()?;
    qemu.wait()?;
    let mut qemu = start_qemu(&ns, &netdev, &sock, &log)?;
    wait_log(&bed, "stream connected to", 2)?;
    bed.both_ways(100..132)?;
    qemu.kill()?;
    qemu.wait()?;
    let Bed { vmm, qpnet, .. } = bed;
    drop(vmm);
    qpnet.stop()?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
