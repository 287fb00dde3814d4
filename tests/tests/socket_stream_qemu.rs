//! QEMU's own `-netdev stream` as the peer of qpnet's stream backend, with
//! no guest: QEMU (`-machine none`) joins a `-netdev stream,server=on` (what
//! qpnet connects to) and a `-netdev dgram` (UDP, to a socket the test
//! owns) in one hub, so every frame qpnet writes on the stream comes out of
//! QEMU as a UDP datagram, and back. Frames are checked byte for byte both
//! ways; then QEMU is restarted and qpnet connects to the new one.
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

/// QEMU bridging a stream server at `sock` and UDP 127.0.0.1:QEMU_UDP ->
/// TEST_UDP, inside `ns`.
fn start_qemu(ns: &NetNs, sock: &Path, log: &Path) -> Result<Child> {
    let qemu = "qemu-system-x86_64";
    if Command::new(qemu).arg("--version").output().is_err() {
        bail!("{qemu} is missing: install qemu-system-x86 (scripts/install-deps.sh does)");
    }
    let _ = std::fs::remove_file(sock);
    let mut cmd = ns.command(qemu);
    cmd.args(["-machine", "none", "-nodefaults", "-display", "none"])
        .arg("-netdev")
        .arg(format!(
            "stream,id=s0,server=on,addr.type=unix,addr.path={}",
            sock.display()
        ))
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
        let mut got = Vec::new();
        let deadline = Instant::now() + TIMEOUT;
        while got.len() < frames.len() {
            got.extend(self.vmm.rx[0].reap()?.into_iter().map(|f| f.data));
            ensure!(
                Instant::now() < deadline,
                "{} of {} RX frames from QEMU; {}",
                got.len(),
                frames.len(),
                self.err()
            );
            self.vmm.rx[0].queue.wait_call(Duration::from_millis(5));
        }
        ensure!(got == frames, "RX frames from QEMU differ");
        Ok(())
    }
}

#[test]
fn qemus_stream_netdev_is_a_peer_and_a_restarted_one_is_connected_again() -> Result<()> {
    let ns = NetNs::new()?;
    let dir = std::env::temp_dir().join(format!("{}-qstream", qpnet_tests::unique_name()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("qemu-stream.sock");
    let log = dir.join("qemu.log");
    let mut qemu = start_qemu(&ns, &sock, &log)?;
    let udp = ns.run(|| {
        let s = UdpSocket::bind(("127.0.0.1", TEST_UDP))?;
        s.connect(("127.0.0.1", QEMU_UDP))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        Ok(s)
    })?;
    let spec = format!("unix:{}", sock.display());
    let qpnet = Qpnet::start_opts(&ns, "", 1, &Options::host(&["--stream", &spec]))?;
    let vmm = Vmm::connect(qpnet.socket(), VmmConfig::default())
        .with_context(|| format!("qpnet stderr:\n{}", qpnet.stderr()))?;
    let mut bed = Bed { vmm, qpnet, udp };
    let wait_connected = |bed: &Bed, n: usize| -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        while bed.qpnet.stderr().matches("stream connected to").count() < n {
            ensure!(
                Instant::now() < deadline,
                "qpnet did not connect; {}",
                bed.err()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The worker gets the connection right after the primary logs it.
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    };
    wait_connected(&bed, 1)?;
    bed.both_ways(0..32)?;
    // QEMU goes away and a new one listens on the same path.
    qemu.kill()?;
    qemu.wait()?;
    let mut qemu = start_qemu(&ns, &sock, &log)?;
    wait_connected(&bed, 2)?;
    bed.both_ways(100..132)?;
    qemu.kill()?;
    qemu.wait()?;
    let Bed { vmm, qpnet, .. } = bed;
    drop(vmm);
    qpnet.stop()?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
