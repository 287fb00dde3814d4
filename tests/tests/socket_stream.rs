//! The stream socket backend end to end: the test VMM drives `qpnet run
//! --stream`, and peer sockets the test owns (unix paths in a temp
//! directory, loopback TCP inside the test's namespace) play the other end
//! with the wire format of QEMU's `-netdev stream` and passt: each frame
//! behind its length as a 4-byte big-endian integer.
//!
//! The peer reads strictly: a length prefix outside 14..=65,535 (what a
//! torn frame would look like) fails the test. Needs root (namespaces) and
//! `$QPNET_BIN`.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use qpnet_shared::{QueueStats, SharedRegion};
use qpnet_tests::netns::NetNs;
use qpnet_tests::qpnet::{Options, Qpnet};
use qpnet_tests::stream_bed::{Kind, StreamBed as Bed, FRAMES};
use qpnet_tests::stream_peer::{connect_when_there, read_frame, write_frame, Listener, TIMEOUT};
use qpnet_tests::traffic::tx_frame;
use qpnet_tests::vmm::{Vmm, VmmConfig};

fn both_ways(kind: Kind, qps: u16) -> Result<()> {
    let mut bed = Bed::new(kind, qps)?;
    let all: Vec<usize> = (0..qps as usize).collect();
    bed.tx_round(&all, 0..FRAMES)?;
    bed.rx_round(&all, 0..FRAMES)?;
    for qp in all {
        ensure!(bed.counter(qp, |q| &q.tx_frames)? == u64::from(FRAMES));
        ensure!(bed.counter(qp, |q| &q.rx_frames)? == u64::from(FRAMES));
        // Flow tracking ran on every frame, both ways (test frames carry no
        // IP header, so each is counted as having no flow key).
        let unparsed = bed.counter(qp, |q| &q.flow_unparsed_frames)?;
        ensure!(
            unparsed == 2 * u64::from(FRAMES),
            "qp{qp}: the flow tracker saw {unparsed} of {} frames",
            2 * FRAMES
        );
    }
    bed.finish()
}

#[test]
fn unix_stream_one_queue_pair_moves_frames_both_ways_byte_exact() -> Result<()> {
    both_ways(Kind::Unix, 1)
}

#[test]
fn unix_stream_four_queue_pairs_each_on_its_own_connection() -> Result<()> {
    both_ways(Kind::Unix, 4)
}

#[test]
fn tcp_stream_two_queue_pairs_each_on_port_plus_k() -> Result<()> {
    both_ways(Kind::Tcp, 2)
}

/// qpnet as `nobody`, with no capability, connects to the peer's unix
/// socket and serves both ways.
#[test]
fn unprivileged_qpnet_serves_over_a_stream() -> Result<()> {
    let mut bed = Bed::build(Kind::Unix, 2, &[], Some("nobody"))?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", bed.qpnet.pid()))?;
    let line = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or("")
            .to_string()
    };
    ensure!(
        !line("Uid:").contains("\t0\t"),
        "qpnet runs as root: {}",
        line("Uid:")
    );
    ensure!(
        line("CapEff:").ends_with("0000000000000000"),
        "qpnet has capabilities: {}",
        line("CapEff:")
    );
    bed.tx_round(&[0, 1], 0..FRAMES)?;
    bed.rx_round(&[0, 1], 0..FRAMES)?;
    bed.finish()
}

/// The peer of queue pair 0 goes away and comes back: qpnet connects again,
/// the guest's frames meanwhile are dropped and counted, and both ways work
/// again; queue pair 1 never notices.
#[test]
fn a_peer_that_goes_away_is_connected_again() -> Result<()> {
    let mut bed = Bed::new(Kind::Unix, 2)?;
    bed.tx_round(&[0, 1], 0..8)?;
    // The peer closes, and stops accepting for a while.
    let Listener::Unix(l) = &bed.listeners[0] else {
        bail!("a unix listener");
    };
    let path = l.local_addr()?.as_pathname().context("path")?.to_path_buf();
    let stand_in = UnixListener::bind(bed.dir.join("stand-in.sock"))?;
    drop(std::mem::replace(
        &mut bed.listeners[0],
        Listener::Unix(stand_in),
    ));
    std::fs::remove_file(&path)?;
    bed.peer_leaves(0)?;
    // Frames the guest sends meanwhile are dropped and counted.
    let frames: Vec<Vec<u8>> = (100..110).map(|s| tx_frame(0, s)).collect();
    bed.vmm.tx[0].send_all(&frames, TIMEOUT)?;
    bed.wait_counter("peer_unreachable", 0, 1, |q| &q.peer_unreachable)?;
    bed.tx_round(&[1], 8..16)?;
    // The peer is back: qpnet connects (its back-off is at most 2 s).
    let l = UnixListener::bind(&path)?;
    l.set_nonblocking(true)?;
    bed.listeners[0] = Listener::Unix(l);
    bed.conns[0] = bed.listeners[0].accept().with_context(|| bed.err())?;
    bed.rx_round(&[0, 1], 200..216)?;
    bed.tx_round(&[0, 1], 200..216)?;
    ensure!(bed.qpnet.stderr().contains("stream connected to"));
    bed.finish()
}

/// passt started as root makes its socket as `nobody`, mode 0755, which
/// root without CAP_DAC_OVERRIDE may not connect to. qpnet as root made its
/// first connection during set-up, with every capability; its primary keeps
/// none of the file ones afterwards, and must still connect again when such
/// a peer restarts.
#[test]
fn a_peer_socket_of_another_user_is_connected_again_after_the_peer_restarts() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let nobody = nix::unistd::User::from_name("nobody")?.context("no user nobody")?;
    let mut bed = Bed::new(Kind::Unix, 1)?;
    bed.tx_round(&[0], 0..8)?;
    let path = bed.dir.join("peer.sock");
    // The peer goes away...
    let stand_in = UnixListener::bind(bed.dir.join("stand-in.sock"))?;
    drop(std::mem::replace(
        &mut bed.listeners[0],
        Listener::Unix(stand_in),
    ));
    std::fs::remove_file(&path)?;
    bed.peer_leaves(0)?;
    // ...and comes back as `nobody`, its socket not writable by others.
    let l = UnixListener::bind(&path)?;
    nix::unistd::chown(&path, Some(nobody.uid), Some(nobody.gid))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    l.set_nonblocking(true)?;
    bed.listeners[0] = Listener::Unix(l);
    bed.conns[0] = bed.listeners[0].accept().with_context(|| bed.err())?;
    bed.rx_round(&[0], 100..108)?;
    bed.tx_round(&[0], 100..108)?;
    bed.finish()
}

/// A peer breaking the framing (a length of 0, or above 65,535) has its
/// connection reset and counted; qpnet connects again and frames flow; a
/// frame larger than the guest's buffers, and a runt, are dropped and
/// counted without losing step; a frame cut by the peer leaving never
/// reaches the guest; the other queue pair sees nothing of it.
#[test]
fn bad_length_prefixes_reset_the_connection_and_are_counted() -> Result<()> {
    let mut bed = Bed::new(Kind::Unix, 2)?;
    for (n, bad) in [0u32, 70_000].into_iter().enumerate() {
        let mut wire = bad.to_be_bytes().to_vec();
        wire.extend([0x5a; 64]);
        bed.conns[0].write_all(&wire)?;
        bed.wait_counter("drop_stream_framing", 0, n as u64 + 1, |q| {
            &q.drop_stream_framing
        })?;
        bed.expect_reconnect(0)?;
        bed.rx_round(&[0, 1], 0..8)?;
    }
    // Larger than the buffers of a 1500-byte MTU, then a runt: dropped,
    // and the frames after them arrive.
    write_frame(bed.conns[0].as_mut(), &vec![0xa5; 4000])?;
    bed.wait_counter("drop_too_large", 0, 1, |q| &q.drop_too_large)?;
    bed.conns[0].write_all(&[0, 0, 0, 5, 1, 2, 3, 4, 5])?;
    bed.wait_counter("drop_rx_short", 0, 1, |q| &q.drop_rx_short)?;
    bed.rx_round(&[0, 1], 8..16)?;
    bed.tx_round(&[0, 1], 0..8)?;
    // A frame cut by the peer closing the connection: nothing of it reaches
    // the guest, qpnet connects again and frames flow.
    let mut cut = 100u32.to_be_bytes().to_vec();
    cut.extend([0x77; 10]);
    bed.conns[0].write_all(&cut)?;
    std::thread::sleep(Duration::from_millis(50));
    bed.peer_leaves(0)?;
    bed.expect_reconnect_now(0)?;
    bed.rx_round(&[0, 1], 16..24)?;
    ensure!(bed.counter(1, |q| &q.drop_stream_framing)? == 0);
    let doc = bed.qpnet.stats_json(&[])?;
    ensure!(doc.queue(0)?.counter("drop_stream_framing")? == 2);
    bed.finish()
}

/// A frame the peer writes in pieces, with pauses, arrives whole.
#[test]
fn a_frame_written_in_pieces_arrives_whole() -> Result<()> {
    let mut bed = Bed::new(Kind::Tcp, 1)?;
    let f = tx_frame(0, 7);
    let mut wire = (f.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&f);
    for piece in [&wire[..2], &wire[2..9], &wire[9..]] {
        bed.conns[0].write_all(piece)?;
        bed.conns[0].flush()?;
        std::thread::sleep(Duration::from_millis(30));
    }
    ensure!(bed.rx_frames(0, 1)? == vec![f]);
    bed.rx_round(&[0], 0..8)?;
    bed.finish()
}

/// What the peer of the kill test read.
#[derive(Debug, Default)]
struct PeerRead {
    frames: u32,
    duplicates: u32,
    lost: u32,
    reconnects: u32,
}

/// Workers killed at random moments while they write frames faster than
/// the peer reads (so writes fill the socket and are cut short): the peer
/// never reads a torn frame (each connection either goes on with the next
/// worker or is closed at a boundary and made again), every frame it reads
/// is one the guest sent, in order (but for frames a dead worker wrote
/// before completing them, sent again), and frames flow after the last
/// kill.
fn kills_under_load(kind: Kind) -> Result<()> {
    let mut bed = Bed::with(kind, 1, &["--crash-limit", "0", "--crash-window-secs", "1"])?;
    const N: u32 = 10_000;
    let valid: HashMap<Vec<u8>, u32> = (0..N).map(|s| (tx_frame(0, s), s)).collect();
    let mut conn = bed.conns.remove(0);
    let listener = bed.listeners.remove(0);
    // The peer: strict, in order, a little slower than qpnet.
    let reader = std::thread::spawn(move || -> Result<PeerRead> {
        let mut r = PeerRead::default();
        let mut last = None::<u32>;
        let mut seen = vec![false; N as usize];
        conn.set_timeout(Duration::from_secs(3))?;
        loop {
            match read_frame(conn.as_mut()) {
                Ok(Some(f)) => {
                    let seq = *valid.get(&f).context("a frame the guest never sent")?;
                    // A frame the dead worker wrote but had not completed
                    // in the ring is sent again by the next one (as with a
                    // TAP): at most a ring's worth back.
                    if let Some(l) = last {
                        ensure!(
                            seq > l || l - seq < 256,
                            "frame {seq} after frame {l}: out of order"
                        );
                    }
                    if std::mem::replace(&mut seen[seq as usize], true) {
                        r.duplicates += 1;
                    }
                    last = Some(seq);
                    r.frames += 1;
                    if seq == N - 1 {
                        r.lost = seen.iter().filter(|s| !**s).count() as u32;
                        return Ok(r);
                    }
                    if r.frames % 64 == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                Ok(None) => {
                    conn = listener.accept()?;
                    conn.set_timeout(Duration::from_secs(3))?;
                    r.reconnects += 1;
                }
                Err(e) => return Err(e.context(format!("after {} frames", r.frames))),
            }
        }
    });
    // The killer: a SIGKILL to the worker once it has written 300 to 1,300
    // frames (so it dies in the middle of its work, not while starting).
    let shm = bed.qpnet.runtime_dir().join("stats.shm");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<u32> {
            let region = SharedRegion::open_read_only(&shm)?;
            let q = region.queue(0).context("queue 0")?;
            let (mut kills, mut n, mut from) = (0u32, 1u64, QueueStats::get(&q.tx_frames));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let due = from + 300 + (n >> 54);
                while QueueStats::get(&q.tx_frames) < due {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return Ok(kills);
                    }
                    std::thread::yield_now();
                }
                let pid = q.pid.load(std::sync::atomic::Ordering::Relaxed);
                if pid != 0 {
                    nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    )?;
                    kills += 1;
                }
                from = QueueStats::get(&q.tx_frames);
            }
            Ok(kills)
        })
    };
    let mut sent = 0;
    while sent < N {
        let frames: Vec<Vec<u8>> = (sent..(sent + 200).min(N))
            .map(|s| tx_frame(0, s))
            .collect();
        bed.vmm.tx[0]
            .send_all(&frames, TIMEOUT)
            .with_context(|| bed.err())?;
        sent += frames.len() as u32;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer
        .join()
        .map_err(|_| anyhow::anyhow!("the killer panicked"))??;
    let r = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader panicked"))?
        .with_context(|| bed.err())?;
    let resets = bed
        .qpnet
        .stderr()
        .matches("resetting the stream connection")
        .count() as u32;
    eprintln!(
        "{kills} kills: {} frames read ({} sent again after a kill, {} of {N} lost), {} reconnects ({resets} resets logged)",
        r.frames, r.duplicates, r.lost, r.reconnects
    );
    ensure!(kills >= 4, "only {kills} kills landed");
    ensure!(
        r.reconnects == resets,
        "{} reconnects, {resets} resets logged",
        r.reconnects
    );
    ensure!(
        r.duplicates <= kills * 256 && r.lost <= (kills + resets) * 512,
        "more frames sent again or lost than the kills explain"
    );
    bed.finish()
}

#[test]
fn unix_stream_workers_killed_under_load_never_tear_a_frame() -> Result<()> {
    kills_under_load(Kind::Unix)
}

#[test]
fn tcp_stream_workers_killed_under_load_never_tear_a_frame() -> Result<()> {
    kills_under_load(Kind::Tcp)
}

/// `--stream-listen`: qpnet listens and the peer connects (QEMU's
/// `-netdev stream,server=off`); a second connection while the first lasts
/// is closed; the peer can go and connect again.
#[test]
fn listening_qpnet_takes_one_peer_at_a_time() -> Result<()> {
    let ns = NetNs::new()?;
    let dir = std::env::temp_dir().join(format!("{}-listen", qpnet_tests::unique_name()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("qpnet.sock");
    let spec = format!("unix:{}", path.display());
    let opts = Options::host(&["--stream", &spec, "--stream-listen"]);
    let qpnet = Qpnet::start_opts(&ns, "", 1, &opts)?;
    let err = || format!("qpnet stderr:\n{}", qpnet.stderr());
    let mut vmm = Vmm::connect(qpnet.socket(), VmmConfig::default()).with_context(err)?;
    for round in 0..2u32 {
        let mut c = connect_when_there(&path)?;
        if round == 0 {
            // A second peer meanwhile is closed at once.
            let mut second = connect_when_there(&path)?;
            ensure!(
                read_frame(second.as_mut())?.is_none(),
                "the second peer was served"
            );
        }
        let frames: Vec<Vec<u8>> = (0..16).map(|s| tx_frame(0, s + 100 * round)).collect();
        // The connection may be attached a moment after it is accepted:
        // frames sent before that are dropped (counted), so wait for it.
        let deadline = Instant::now() + TIMEOUT;
        while qpnet.stderr().matches("stream connected from").count() <= round as usize {
            ensure!(
                Instant::now() < deadline,
                "qpnet did not take the connection; {}",
                err()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
        vmm.tx[0].send_all(&frames, TIMEOUT)?;
        for f in &frames {
            ensure!(
                read_frame(c.as_mut())?.as_ref() == Some(f),
                "TX frame differs; {}",
                err()
            );
        }
        for f in &frames {
            write_frame(c.as_mut(), f)?;
        }
        let got: Vec<Vec<u8>> = vmm.rx[0]
            .reap_until(frames.len(), TIMEOUT)
            .with_context(err)?
            .into_iter()
            .map(|f| f.data)
            .collect();
        ensure!(got == frames, "RX frames differ");
        // The peer goes; it connects again next round.
    }
    drop(vmm);
    qpnet.stop()?;
    ensure!(
        !path.exists(),
        "qpnet left its listening socket {}",
        path.display()
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// A worker that stops (SIGSTOP: wedged) while the guest sends is killed
/// by the watchdog and replaced; the stream goes on (handed over or made
/// again) and frames flow both ways.
#[test]
fn a_wedged_worker_on_a_stream_is_replaced_by_the_watchdog() -> Result<()> {
    let mut bed = Bed::with(Kind::Unix, 1, &["--watchdog-ms", "300"])?;
    bed.tx_round(&[0], 0..8)?;
    // Every chain completed: the worker is idle, between frames.
    bed.vmm.tx[0].wait_idle(TIMEOUT)?;
    let pid = bed
        .qpnet
        .stats()?
        .queue(0)
        .context("queue 0")?
        .pid
        .load(std::sync::atomic::Ordering::Relaxed);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )?;
    let frames: Vec<Vec<u8>> = (100..104).map(|s| tx_frame(0, s)).collect();
    for f in &frames {
        ensure!(bed.vmm.tx[0].try_push(f)?, "the TX ring is full");
    }
    bed.vmm.tx[0].flush();
    bed.wait_counter("restarts", 0, 1, |q| &q.restarts)?;
    ensure!(
        bed.qpnet.stderr().contains("wedged"),
        "the watchdog did not say why; {}",
        bed.err()
    );
    // The new worker sends the frames the wedged one left in the ring.
    for f in &frames {
        let got = loop {
            match read_frame(bed.conns[0].as_mut())? {
                Some(got) => break got,
                None => bed.expect_reconnect_now(0)?,
            }
        };
        let seq = (0..300).find(|&s| tx_frame(0, s) == got);
        ensure!(
            &got == f,
            "after the watchdog: frame {seq:?} ({} bytes) instead of the next one left in the ring; {}",
            got.len(),
            bed.err()
        );
    }
    bed.tx_round(&[0], 200..216)?;
    bed.rx_round(&[0], 200..216)?;
    bed.finish()
}
