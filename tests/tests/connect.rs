//! `qpnet run --connect`: qpnet connects to a VMM that listens on the
//! socket (QEMU's `server=on`), retrying until it appears; serves it both
//! ways; connects again when that VMM goes away; and on SIGTERM stops
//! cleanly without removing the socket, which is the VMM's.
//!
//! Needs root and `$QPNET_BIN`.

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use qpnet_tests::frames::{mixed_len, ETHERTYPE_TEST};
use qpnet_tests::netns::NetNs;
use qpnet_tests::qpnet::{Options, Qpnet};
use qpnet_tests::tap_io::TapSocket;
use qpnet_tests::testbed::TAP_NAME;
use qpnet_tests::traffic::{rx_traffic, tx_round, Strays};
use qpnet_tests::vmm::{Vmm, VmmConfig};

const QUEUE_PAIRS: u16 = 2;
const TIMEOUT: Duration = Duration::from_secs(30);
/// qpnet retries every 100 ms: it must connect well within this.
const CONNECT_LIMIT: Duration = Duration::from_secs(2);

/// Accept qpnet's connection on `l` within `limit`.
fn accept_within(l: &UnixListener, limit: Duration) -> Result<std::os::unix::net::UnixStream> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("accept"),
        }
        if Instant::now() >= deadline {
            bail!("qpnet did not connect within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A VMM session over `stream`: frames `seqs` on every TX queue and 300
/// RX frames, all byte-exact, exactly once.
fn serve(
    stream: std::os::unix::net::UnixStream,
    tap: &TapSocket,
    seqs: std::ops::Range<u32>,
) -> Result<()> {
    let mut vmm = Vmm::over(
        stream,
        VmmConfig {
            queue_pairs: QUEUE_PAIRS,
            ..VmmConfig::default()
        },
    )?;
    let all: Vec<usize> = (0..usize::from(QUEUE_PAIRS)).collect();
    tx_round(&mut vmm, tap, &all, seqs, Strays::Ignored, TIMEOUT)?;
    rx_traffic(&mut vmm, tap, 300, 8, mixed_len, TIMEOUT)?;
    Ok(())
}

#[test]
fn connect_mode_retries_until_the_vmm_listens_and_reconnects_after_it_leaves() -> Result<()> {
    let ns = NetNs::new()?;
    ns.add_tap(TAP_NAME, None)?;
    let tap = TapSocket::open(&ns, TAP_NAME, ETHERTYPE_TEST)?;
    let dir = std::env::temp_dir().join(qpnet_tests::unique_name());
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("vmm.sock");
    let mut qpnet = Qpnet::start_opts(
        &ns,
        TAP_NAME,
        QUEUE_PAIRS,
        &Options {
            connect_to: Some(path.clone()),
            ..Options::default()
        },
    )?;
    // Nothing at the path, then a stale socket nobody listens on: qpnet
    // keeps trying and keeps running.
    std::thread::sleep(Duration::from_millis(500));
    qpnet.check_alive()?;
    drop(UnixListener::bind(&path)?);
    ensure!(path.exists(), "the stale socket file is gone");
    std::thread::sleep(Duration::from_millis(500));
    qpnet.check_alive()?;
    ensure!(
        qpnet.stderr().contains("retrying"),
        "qpnet does not say it retries:\n{}",
        qpnet.stderr()
    );
    std::fs::remove_file(&path)?;
    let listener = UnixListener::bind(&path)?;
    let t = Instant::now();
    let first = accept_within(&listener, CONNECT_LIMIT)?;
    println!("qpnet connected {:?} after the VMM listened", t.elapsed());
    serve(first, &tap, 0..500).context("the first VMM session")?;
    // That VMM went away (its end closed): qpnet connects again.
    let t = Instant::now();
    let second = accept_within(&listener, CONNECT_LIMIT)
        .context("qpnet did not reconnect after the VMM left")?;
    println!("qpnet reconnected {:?} after the VMM left", t.elapsed());
    serve(second, &tap, 500..1000).context("the second VMM session")?;
    let stats = qpnet.stats_json(&[])?;
    ensure!(
        stats.vmm_connections >= 2,
        "stats count {} VMM connections",
        stats.vmm_connections
    );
    // The checked stop also requires the VMM's socket to be left alone.
    qpnet.stop()?;
    drop(listener);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
