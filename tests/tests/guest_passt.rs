//! Real-guest tests against passt: a Linux guest under QEMU (TCG) whose
//! network is passt's, reached over a unix stream socket (frames with a
//! 4-byte big-endian length prefix).
//!
//! The test creates a network namespace with passt's template interface
//! (10.78.0.1/24, default route via 10.78.0.254) and an iperf3 server on
//! 10.79.0.1 (on `lo`, outside that subnet), and runs passt there on a
//! socket in its scratch directory (`qpnet_tests::passt`). The guest of
//! `scripts/guest/` gets its address by DHCP from passt (the `dhcp` step:
//! passt offers the template's address and gateway), then runs iperf3 both
//! ways to the server through passt, which carries the guest's TCP through
//! ordinary sockets of the namespace.
//!
//! - `passt_baseline_...`: the guest's device is QEMU's own `-netdev
//!   stream` connected to passt, no qpnet: it proves the plumbing (passt,
//!   DHCP, the server, the guest's steps) on its own, so a failure of the
//!   other test is qpnet's. QEMU 7.2's stream netdev cannot reconnect, so
//!   the restart is not part of it.
//! - `guest_on_qpnet_stream_...`: the guest's device is served by qpnet
//!   over vhost-user, one queue pair, and qpnet's host side is `--stream
//!   unix:PASST_SOCKET`: qpnet connects to passt. After the lease and the
//!   two iperf3 rounds the guest runs iperf3 again and again (`tcphold`,
//!   guest -> host and host -> guest in turn). passt is then SIGKILLed and,
//!   a second later, a new passt started on the same socket path: qpnet
//!   must reconnect by itself (the new passt logs the connection, from
//!   qpnet's primary's pid; qpnet logs the end and the new connection),
//!   and a run that started after the kill must end ok in each direction;
//!   qpnet's frame counters must have moved past their values before the
//!   kill, the frames the guest sent meanwhile must be counted
//!   (`peer_unreachable`), and qpnet must then stop cleanly. The
//!   outage (kill to the first run ending ok) and the failed runs are
//!   printed.
//!
//! Needs root (namespaces), passt, qemu-system-x86, a Debian kernel,
//! busybox-static, iperf3 and ethtool (each missing one fails the test
//! naming its package). Every process the test starts leads its own
//! process group and is stopped with it on drop; the namespace goes with
//! its guard. On failure the serial console and passt's and iperf3's logs
//! are printed and kept under /tmp/qpnet-gpasst-<name>/. Timing-sensitive
//! (TCG guests against deadlines): the tests hold the timing lock.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use qpnet_tests::guest::{print_tail, Bed, Guest, GuestArgs, GuestNet, Spawned};
use qpnet_tests::passt::{
    prepare_namespace, socket_dir, Passt, GATEWAY, SERVER_ADDR, TEMPLATE_ADDR, TEMPLATE_MASK,
};
use qpnet_tests::qpnet::{Options, Qpnet};
use qpnet_tests::serial::TimingLock;
use qpnet_tests::stats_json::QueueDoc;
use qpnet_tests::tcp_hold::{tcp_of, TcpEvent, TcpLine};

/// iperf3 seconds per run.
const IPERF_SECS: &str = "3";
/// The baseline guest boots, gets a lease and runs two iperf3 rounds
/// (about 20 s under TCG on a quiet machine); so does the guest on qpnet
/// before it starts its tcphold step.
const BASELINE_DEADLINE: Duration = Duration::from_secs(150);
/// A tcphold run takes IPERF_SECS plus its connection set-up.
const RUN_DEADLINE: Duration = Duration::from_secs(40);
/// How long passt stays dead before the new one starts: long enough for
/// qpnet to see its peer gone and retry at least once.
const PASST_DOWN: Duration = Duration::from_secs(1);
/// From the new passt to a run that ends ok in each direction: qpnet's
/// reconnect back-off, the run in flight at the kill ending (bounded in
/// the guest by IPERF_SECS + 15 s), and two more runs.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(120);
/// Whole-guest bound (run-guest.sh kills QEMU after it).
const GUEST_TIMEOUT: Duration = Duration::from_secs(420);
/// What the guest prints when its tcphold step starts.
const TCPHOLD_STARTED: &str = "QPNET-RESULT tcphold started";

#[test]
fn passt_baseline_guest_gets_a_dhcp_lease_and_reaches_a_tcp_server_over_qemus_stream_netdev() {
    let _timing = TimingLock::acquire("guest passt baseline").expect("the timing lock");
    let mut bed = match PasstBed::start() {
        Ok(bed) => bed,
        Err(e) => panic!("setting up the passt test bed: {e:#}"),
    };
    if let Err(e) = run_baseline(&mut bed) {
        bed.print_logs();
        panic!("passt baseline failed: {e:#}");
    }
    bed.bed.finish();
}

#[test]
fn guest_on_qpnet_stream_gets_a_dhcp_lease_from_passt_and_tcp_comes_back_after_passt_restarts() {
    let _timing = TimingLock::acquire("guest passt restart").expect("the timing lock");
    let mut qb = match QpnetPasstBed::start() {
        Ok(qb) => qb,
        Err(e) => panic!("setting up qpnet on passt: {e:#}"),
    };
    if let Err(e) = run_restart(&mut qb) {
        qb.print_logs();
        panic!("guest on qpnet --stream with a passt restart failed: {e:#}");
    }
    if let Err(e) = qb.finish() {
        panic!("after the passt restart test: {e:#}");
    }
}

/// The guest on qpnet on passt: lease, both ways, then passt dies and a
/// new one takes its socket while the guest keeps running iperf3.
fn run_restart(qb: &mut QpnetPasstBed) -> Result<()> {
    let started = Instant::now();
    let vhost = qb.qpnet.socket().to_owned();
    let tests = "dhcp,iperf-tx,iperf-rx,tcphold";
    let mut guest = qb.pb.bed.start_guest_on(
        &GuestNet::VhostUser(&vhost),
        SERVER_ADDR,
        "guest",
        &guest_args(tests, GUEST_TIMEOUT),
    )?;
    let (hold_at, _) = guest.wait_line(0, "the tcphold step", BASELINE_DEADLINE, |l| {
        l.contains(TCPHOLD_STARTED)
    })?;
    println!("guest reached tcphold after {:?}", started.elapsed());
    check_lease(&mut guest)?;
    check_transfers(&mut guest)?;
    guest.wait_line(
        hold_at,
        "a first tcphold run to end ok",
        RUN_DEADLINE,
        |l| run_ok(l, 0, None),
    )?;
    let before = queue_pair_0(&qb.qpnet)?;

    // Read the console just before the kill: a run not started by now
    // starts after it.
    guest.check_running(hold_at)?;
    let last_started = guest.lines()[hold_at..]
        .iter()
        .filter_map(|l| tcp_of(&l.text))
        .filter(|t| t.event == TcpEvent::Start)
        .map(|t| t.seq)
        .max()
        .unwrap_or(0);
    let from = guest.lines().len();
    let passt = qb.pb.passt.take().context("no passt running")?;
    let old_pid = passt.pid();
    passt.kill()?;
    let killed_at = Instant::now();
    println!("passt (pid {old_pid}) killed during run {last_started}");
    std::thread::sleep(PASST_DOWN);
    let socket = qb.pb.socket.clone();
    let new_passt = Passt::start(&mut qb.pb.bed, &socket, "passt-2")?;
    println!(
        "new passt (pid {}) listening {:?} after the kill",
        new_passt.pid(),
        killed_at.elapsed()
    );
    qb.pb.passt = Some(new_passt);

    let mut first_ok = None;
    for dir in ["tx", "rx"] {
        let (i, line) = guest.wait_line(
            from,
            &format!("a tcphold run ({dir}) started after the kill to end ok"),
            RECOVERY_DEADLINE,
            |l| run_ok(l, last_started, Some(dir)),
        )?;
        println!("guest after the restart: {line}");
        let at = guest.lines()[i].at;
        first_ok = Some(first_ok.map_or(at, |f: Instant| f.min(at)));
    }
    let failed = guest.lines()[from..]
        .iter()
        .filter_map(|l| tcp_of(&l.text))
        .filter(|t| t.event == TcpEvent::Fail)
        .count();
    let outage = first_ok.map(|t| t.duration_since(killed_at));
    println!("outage: kill to the first run ending ok {outage:?}; {failed} runs failed in between");

    let passt_log = qb.pb.passt.as_ref().map(Passt::log).unwrap_or_default();
    let accepted = format!("accepted connection from PID {}", qb.qpnet.pid());
    ensure!(
        passt_log.contains(&accepted),
        "the new passt's log does not say {accepted:?} (qpnet's primary): it was not qpnet          that reconnected"
    );
    let after = queue_pair_0(&qb.qpnet)?;
    println!(
        "qpnet queue pair 0: tx_frames {} -> {}, rx_frames {} -> {}",
        before.tx_frames, after.tx_frames, before.rx_frames, after.rx_frames
    );
    ensure!(
        after.tx_frames > before.tx_frames && after.rx_frames > before.rx_frames,
        "qpnet's frame counters did not move after the restart: tx {} -> {}, rx {} -> {}",
        before.tx_frames,
        after.tx_frames,
        before.rx_frames,
        after.rx_frames
    );
    let unreachable = after.counter("peer_unreachable")?;
    println!(
        "qpnet queue pair 0: peer_unreachable {unreachable} (frames dropped while passt was down)"
    );
    ensure!(
        unreachable > 0,
        "qpnet counted no frame dropped while passt was down (peer_unreachable is 0), though the \
         guest was sending"
    );
    qb.qpnet.check_alive()?;
    check_qpnet_reconnected(&qb.qpnet, &qb.pb.socket)?;
    println!("whole scenario took {:?}", started.elapsed());
    Ok(())
}

/// `line` is a tcphold run numbered above `after` (in direction `dir`, if
/// given) that ended ok.
fn run_ok(line: &str, after: u64, dir: Option<&str>) -> bool {
    matches!(
        tcp_of(line),
        Some(TcpLine { seq, dir: d, event: TcpEvent::Ok { bytes } })
            if seq > after && bytes > 0 && dir.is_none_or(|want| want == d)
    )
}

/// qpnet's only queue pair, from `qpnet stats --json`.
fn queue_pair_0(qpnet: &Qpnet) -> Result<QueueDoc> {
    let mut queues = qpnet.stats_json(&[])?.queues;
    ensure!(
        queues.len() == 1,
        "qpnet stats lists {} queue pairs, expected 1",
        queues.len()
    );
    Ok(queues.remove(0))
}

/// qpnet logged its stream connection to passt's socket ending and being
/// made again (its lines are printed, for the record).
fn check_qpnet_reconnected(qpnet: &Qpnet, socket: &Path) -> Result<()> {
    let target = format!("unix:{}", socket.display());
    let ended = format!("the stream connection with {target} ended");
    let connected = format!("stream connected to {target}");
    let err = qpnet.stderr();
    let (mut ends, mut connects) = (0, 0);
    for line in err.lines() {
        if line.contains(&ended)
            || line.contains(&connected)
            || line.contains("connecting the stream")
        {
            println!("qpnet: {line}");
        }
        ends += usize::from(line.contains(&ended));
        connects += usize::from(line.contains(&connected));
    }
    ensure!(
        ends >= 1 && connects >= 2,
        "qpnet's log shows {ends} end(s) of its stream connection and {connects} connection(s) \
         to {target}, expected at least 1 and 2 (connected, ended at the kill, connected again)"
    );
    Ok(())
}

/// QEMU's own stream netdev on passt's socket: lease, then both ways.
fn run_baseline(bed: &mut PasstBed) -> Result<()> {
    let started = Instant::now();
    let socket = bed.socket.clone();
    let mut guest = bed.bed.start_guest_on(
        &GuestNet::Stream(&socket),
        SERVER_ADDR,
        "baseline",
        &guest_args("dhcp,iperf-tx,iperf-rx", BASELINE_DEADLINE),
    )?;
    let status = guest.wait_exit(BASELINE_DEADLINE)?;
    check_lease(&mut guest)?;
    check_transfers(&mut guest)?;
    ensure!(status.success(), "run-guest.sh exited with {status}");
    println!("baseline took {:?}", started.elapsed());
    Ok(())
}

/// The guest's lease is the one passt offers: the template interface's
/// address and netmask, the namespace's gateway; and eth0 carries it.
fn check_lease(guest: &mut Guest) -> Result<()> {
    let dhcp = guest.ok_step("dhcp")?;
    println!("guest: {}", dhcp.line);
    let expected = [
        ("ip", TEMPLATE_ADDR.to_owned()),
        ("mask", TEMPLATE_MASK.to_owned()),
        ("router", GATEWAY.to_owned()),
        ("eth0", format!("{TEMPLATE_ADDR}/24")),
        ("default_via", GATEWAY.to_owned()),
    ];
    for (key, want) in expected {
        ensure!(
            dhcp.field(key) == Some(want.as_str()),
            "the guest's lease has {key}={:?}, expected {want} (passt offers its template \
             interface's): {}",
            dhcp.field(key),
            dhcp.line
        );
    }
    Ok(())
}

/// iperf3 moved data both ways between the guest and the server.
fn check_transfers(guest: &mut Guest) -> Result<()> {
    for step in ["iperf-tx", "iperf-rx"] {
        let r = guest.ok_step(step)?;
        println!("guest: {}", r.line);
        ensure!(r.number("bytes")? > 0, "{step} moved no data: {}", r.line);
    }
    Ok(())
}

/// run-guest.sh's arguments: no static address (the lease gives it), the
/// server as peer, one iperf3 stream of [`IPERF_SECS`].
fn guest_args(tests: &str, deadline: Duration) -> GuestArgs<'_> {
    const EXTRA: &[&str] = &["--secs", IPERF_SECS, "--streams", "1", "--dhcptries", "60"];
    GuestArgs {
        queues: 1,
        ip: "none",
        tests,
        extra: EXTRA,
        timeout: deadline + Duration::from_secs(30),
    }
}

/// The namespace with passt's network, the iperf3 server and passt; torn
/// down in field order (passt, iperf3, then the scratch directory and the
/// namespace).
struct PasstBed {
    passt: Option<Passt>,
    _iperf3: Spawned,
    socket: PathBuf,
    bed: Bed,
}

impl PasstBed {
    fn start() -> Result<PasstBed> {
        let mut bed = Bed::without_tap("gpasst")?;
        prepare_namespace(bed.ns())?;
        let iperf3 = bed.start_iperf3_server_on(SERVER_ADDR)?;
        let socket = socket_dir(&bed)?.join("passt.sock");
        let passt = Passt::start(&mut bed, &socket, "passt-1")?;
        Ok(PasstBed {
            passt: Some(passt),
            _iperf3: iperf3,
            socket,
            bed,
        })
    }

    fn print_logs(&self) {
        self.bed.print_logs();
    }
}

/// qpnet (`--stream unix:` on passt's socket, one queue pair) on the passt
/// bed; qpnet is stopped first.
struct QpnetPasstBed {
    qpnet: Qpnet,
    pb: PasstBed,
}

impl QpnetPasstBed {
    fn start() -> Result<QpnetPasstBed> {
        let pb = PasstBed::start()?;
        let peer = format!("unix:{}", pb.socket.display());
        let qpnet = Qpnet::start_opts(pb.bed.ns(), "", 1, &Options::host(&["--stream", &peer]))?;
        Ok(QpnetPasstBed { qpnet, pb })
    }

    fn print_logs(&self) {
        print_tail("qpnet stderr", &self.qpnet.stderr());
        self.pb.print_logs();
    }

    /// Success: qpnet must stop cleanly (a checked SIGTERM), then the
    /// scratch directory can go.
    fn finish(self) -> Result<()> {
        let QpnetPasstBed { qpnet, mut pb } = self;
        qpnet.stop()?;
        pb.bed.finish();
        Ok(())
    }
}
