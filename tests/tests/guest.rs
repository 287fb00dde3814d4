//! The real-guest test: a Linux guest under QEMU (TCG) whose virtio-net device
//! is served by `qpnet run` over vhost-user, with two queue pairs.
//!
//! The test creates a network namespace holding a multi-queue TAP with the
//! host address 10.77.0.1/24 and an iperf3 server bound to it, starts qpnet in
//! that namespace on the TAP, and boots the guest of `scripts/guest/`
//! (`run-guest.sh`) against qpnet's socket. The guest pings the host, runs
//! iperf3 in both directions with several parallel streams, reports its
//! per-queue packet counters and then pings forever (`hold`); while it holds,
//! the test reads `qpnet stats --json` and checks that both queue pairs moved
//! frames both ways, that qpnet's flow table lists the guest's iperf3
//! connections (10.77.0.2 <-> 10.77.0.1:5201) and that over 99% of the
//! tracked frames came through the queue pair owning their flow (flow
//! affinity). Then it stops QEMU and boots a second guest, with 2 vCPUs,
//! against the same qpnet, which must ping too (qpnet serves one VMM after
//! another) and receive an iperf3 run from the host. Both guests must count
//! no receive error (`/proc/net/dev` errs and frame, and virtio_net's "rx
//! error ... buffers out of ... missing" messages, switched on with dyndbg):
//! qpnet publishes the RX used index only at frame boundaries.
//!
//! Needs root (namespaces, TAPs), qemu-system-x86, a Debian kernel, busybox-
//! static, iperf3 and ethtool (the guest build says which package is missing),
//! and `$QPNET_BIN` (see `qpnet_tests::binary`). qpnet is started and
//! stopped (a checked SIGTERM: exit 0, workers gone, files removed) by
//! `qpnet_tests::qpnet::Qpnet`; run-guest.sh (with its QEMU) and iperf3 each
//! lead their own process group and are killed with it on drop, and the
//! namespace goes with its guard (see `qpnet_tests::guest`). On failure the
//! serial consoles, qpnet's stderr and iperf3's log are printed, and kept
//! under /tmp/qpnet-guest-<name>/.
//!
//! Timing-sensitive (TCG guests against deadlines): the test holds the
//! timing lock, so no other such test runs beside it.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use qpnet_tests::guest::{Bed, Guest, GuestArgs, Spawned, HOST_ADDR, TAP};
use qpnet_tests::qpnet::Qpnet;
use qpnet_tests::serial::TimingLock;

/// The guests' addresses (the host's is `qpnet_tests::guest::HOST_CIDR`).
const FIRST_GUEST_CIDR: &str = "10.77.0.2/24";
const SECOND_GUEST_CIDR: &str = "10.77.0.3/24";
const QUEUE_PAIRS: usize = 2;
/// iperf3 seconds per direction and parallel streams. Queues are chosen by
/// flow hash (the guest's XPS/skb hash for TX, the TAP's for RX): with 8
/// streams plus the control connection and the other run's ACK flows, the
/// odds that one queue pair sees no flow at all in a direction are ~2^-17.
const IPERF_SECS: u32 = 5;
const IPERF_STREAMS: u32 = 8;
/// The iperf3 server's port.
const IPERF_PORT: u16 = 5201;
/// The guest's address, as qpnet's flow table shows it.
const FIRST_GUEST_ADDR: &str = "10.77.0.2";
/// Least share of tracked frames that must arrive on the queue pair that
/// owns their flow.
const MIN_FLOW_AFFINITY_PERCENT: f64 = 99.0;
/// Bounds (the whole test stays under five minutes): the first guest boots,
/// pings and runs two iperf3 rounds (about 20 s under TCG on a quiet
/// machine); the second boots, pings and runs one host -> guest round.
const FIRST_GUEST_DEADLINE: Duration = Duration::from_secs(180);
const SECOND_GUEST_DEADLINE: Duration = Duration::from_secs(90);
/// What the first guest prints once it has run its steps and holds.
const HOLD_STARTED: &str = "QPNET-RESULT hold started";

#[test]
fn guest_moves_traffic_on_both_queue_pairs_and_a_second_guest_reconnects() {
    // Two TCG guests at once would race each other against the deadlines.
    let _timing = TimingLock::acquire("guest test").expect("the timing lock");
    let mut bed = match GuestBed::start() {
        Ok(bed) => bed,
        Err(e) => panic!("setting up the guest test bed: {e:#}"),
    };
    if let Err(e) = run_scenario(&mut bed) {
        bed.print_logs();
        panic!("guest test failed: {e:#}");
    }
    if let Err(e) = bed.finish() {
        panic!("after the guest test: {e:#}");
    }
}

/// The whole scenario; every check fails with what it saw.
fn run_scenario(bed: &mut GuestBed) -> Result<()> {
    let started = Instant::now();
    let mut first = bed.start_guest(
        "guest1",
        FIRST_GUEST_CIDR,
        "ping,iperf-tx,iperf-rx,queues,rxerrors,hold",
        1,
    )?;
    first.wait_line(0, HOLD_STARTED, FIRST_GUEST_DEADLINE, |l| {
        l.contains(HOLD_STARTED)
    })?;
    println!("first guest reached hold after {:?}", started.elapsed());
    check_first_guest(&mut first)?;
    check_rx_errors(&mut first, "first guest")?;
    check_qpnet_queue_counters(bed)?;
    check_qpnet_flows(bed)?;
    // Stop QEMU (the whole run-guest.sh process group).
    drop(first);

    // The second guest has 2 vCPUs: its driver polls its RX rings from
    // two CPUs while qpnet fills them (host -> guest iperf3), so a used
    // index published inside a frame would show as a receive error.
    let mut second = bed.start_guest(
        "guest2",
        SECOND_GUEST_CIDR,
        "ping,busypoll,iperf-rx,rxerrors",
        2,
    )?;
    let status = second.wait_exit(SECOND_GUEST_DEADLINE)?;
    let ping = second.ok_step("ping")?;
    println!("second guest: {}", ping.line);
    let rx = second.ok_step("iperf-rx")?;
    println!("second guest: {}", rx.line);
    ensure!(
        rx.number("bytes")? > 0,
        "iperf-rx moved no data: {}",
        rx.line
    );
    check_rx_errors(&mut second, "second guest (2 vCPUs)")?;
    ensure!(
        status.success(),
        "second guest's run-guest.sh exited with {status}"
    );
    bed.qpnet.check_alive()?;
    println!("whole scenario took {:?}", started.elapsed());
    Ok(())
}

/// The first guest pinged, moved data both ways and used both queue pairs.
fn check_first_guest(guest: &mut Guest) -> Result<()> {
    let ping = guest.ok_step("ping")?;
    println!("first guest: {}", ping.line);
    for step in ["iperf-tx", "iperf-rx"] {
        let r = guest.ok_step(step)?;
        println!("first guest: {}", r.line);
        ensure!(r.number("bytes")? > 0, "{step} moved no data: {}", r.line);
    }
    let queues = guest.ok_step("queues")?;
    println!("first guest: {}", queues.line);
    for qp in 0..QUEUE_PAIRS {
        for dir in ["rx", "tx"] {
            let key = format!("{dir}_queue_{qp}_packets");
            ensure!(
                queues.number(&key)? > 0,
                "the guest's {key} is 0: queue pair {qp} carried no {dir} traffic ({})",
                queues.line
            );
        }
    }
    Ok(())
}

/// The guest's driver counted no receive error and logged none (with its
/// "rx error" debug messages switched on): no frame arrived with buffers
/// missing, none with a garbage header.
fn check_rx_errors(guest: &mut Guest, who: &str) -> Result<()> {
    let r = guest.ok_step("rxerrors")?;
    println!("{who}: {}", r.line);
    ensure!(
        r.line.contains("dyndbg=on"),
        "{who}: virtio_net's rx error messages were not switched on, so their absence \
         proves nothing: {}",
        r.line
    );
    for key in ["errs", "frame", "rx_error_logs", "buffers_missing_logs"] {
        ensure!(
            r.number(key)? == 0,
            "{who}: {key} is not 0 after host -> guest traffic: {}",
            r.line
        );
    }
    Ok(())
}

/// qpnet's own per-queue counters: every queue pair carried frames both ways.
fn check_qpnet_queue_counters(bed: &GuestBed) -> Result<()> {
    let queues = bed.qpnet.stats_json(&[])?.queues;
    ensure!(
        queues.len() == QUEUE_PAIRS,
        "qpnet stats lists {} queue pairs, expected {QUEUE_PAIRS}",
        queues.len()
    );
    for q in &queues {
        println!(
            "qpnet queue pair {}: tx_frames={} rx_frames={}",
            q.queue_pair, q.tx_frames, q.rx_frames
        );
        ensure!(
            q.tx_frames > 0 && q.rx_frames > 0,
            "qpnet queue pair {} did not carry traffic both ways: tx_frames={} rx_frames={}",
            q.queue_pair,
            q.tx_frames,
            q.rx_frames
        );
    }
    Ok(())
}

/// qpnet's flow table while the first guest holds: the guest's iperf3
/// connections are listed with its address and the server's, and flow
/// affinity (tracked frames that came through the queue pair owning their
/// flow) is above [`MIN_FLOW_AFFINITY_PERCENT`]. The last iperf3 run's
/// connections closed a moment ago; their entries stay until the closed-flow
/// timeout (10 s), and the check needs one stream per queue pair at least.
fn check_qpnet_flows(bed: &GuestBed) -> Result<()> {
    let doc = bed.qpnet.stats_json(&["--top", "100"])?;
    ensure!(
        doc.flow_tracking == Some(true),
        "qpnet stats says flow tracking is not on:\n{}",
        doc.brief()
    );
    let mut iperf = Vec::new();
    for f in &doc.flows {
        println!(
            "qpnet flow: {} owner={} state={} tx_bytes={} rx_bytes={}",
            f.flow, f.owner, f.state, f.tx_bytes, f.rx_bytes,
        );
        let is_iperf = f.protocol == "tcp"
            && f.guest_addr == FIRST_GUEST_ADDR
            && f.remote_addr == HOST_ADDR
            && f.remote_port == IPERF_PORT;
        if is_iperf {
            ensure!(
                f.flow
                    == format!(
                        "tcp {FIRST_GUEST_ADDR}:{} <-> {HOST_ADDR}:{IPERF_PORT}",
                        f.guest_port
                    ),
                "an iperf3 flow is printed as {:?}",
                f.flow
            );
            iperf.push(f);
        }
    }
    ensure!(
        iperf.len() >= QUEUE_PAIRS,
        "qpnet's flow table lists {} iperf3 connections of the guest \
         ({FIRST_GUEST_ADDR} <-> {HOST_ADDR}:{IPERF_PORT}), expected several:\n{}",
        iperf.len(),
        doc.brief()
    );
    let tracked = doc.totals.counter("tracked_frames")?;
    let misses = doc.totals.counter("flow_affinity_misses")?;
    ensure!(tracked > 0, "no tracked frames:\n{}", doc.brief());
    let affinity = 100.0 - misses as f64 * 100.0 / tracked as f64;
    println!(
        "qpnet flow affinity: {affinity:.3}% ({misses} misses of {tracked} tracked frames), \
         {} iperf3 flows listed",
        iperf.len()
    );
    ensure!(
        affinity > MIN_FLOW_AFFINITY_PERCENT,
        "flow affinity {affinity:.3}% ({misses} of {tracked} tracked frames came through a queue \
         pair that does not own their flow), expected above {MIN_FLOW_AFFINITY_PERCENT}%"
    );
    Ok(())
}

/// Everything the test started but the guests (which the scenario owns and
/// stops first), in the order it must be torn down: qpnet and iperf3, then
/// the scratch directory and the namespace.
struct GuestBed {
    qpnet: Qpnet,
    _iperf3: Spawned,
    bed: Bed,
}

impl GuestBed {
    /// Namespace, TAP, iperf3 server and qpnet listening on its socket.
    fn start() -> Result<GuestBed> {
        let mut bed = Bed::create("guest")?;
        let iperf3 = bed.start_iperf3_server()?;
        let qpnet = Qpnet::start(bed.ns(), TAP, QUEUE_PAIRS as u16)?;
        Ok(GuestBed {
            qpnet,
            _iperf3: iperf3,
            bed,
        })
    }

    /// Boot a guest against qpnet's socket with the given address and steps.
    fn start_guest(&mut self, label: &str, cidr: &str, tests: &str, vcpus: u32) -> Result<Guest> {
        let timeout = FIRST_GUEST_DEADLINE.max(SECOND_GUEST_DEADLINE) + Duration::from_secs(30);
        let (secs, streams) = (IPERF_SECS.to_string(), IPERF_STREAMS.to_string());
        let smp = vcpus.to_string();
        let extra = [
            "--secs",
            &secs,
            "--pingwait",
            "30",
            "--streams",
            &streams,
            "--smp",
            &smp,
        ];
        let args = GuestArgs {
            queues: QUEUE_PAIRS as u16,
            ip: cidr,
            tests,
            extra: &extra,
            timeout,
        };
        self.bed.start_guest(self.qpnet.socket(), label, &args)
    }

    /// Print every log the test collected (on failure).
    fn print_logs(&self) {
        qpnet_tests::guest::print_tail("qpnet stderr", &self.qpnet.stderr());
        self.bed.print_logs();
    }

    /// Success: qpnet must stop cleanly (a checked SIGTERM), then the
    /// scratch directory (logs) can go; it stays if the stop failed.
    fn finish(self) -> Result<()> {
        let GuestBed {
            qpnet,
            _iperf3,
            mut bed,
        } = self;
        qpnet.stop()?;
        bed.finish();
        Ok(())
    }
}
