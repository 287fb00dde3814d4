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
//! affinity). Then it stops QEMU and boots a second guest against the
//! same qpnet, which must ping too: qpnet serves one VMM after another.
//!
//! Needs root (namespaces, TAPs), qemu-system-x86, a Debian kernel, busybox-
//! static, iperf3 and ethtool (the guest build says which package is missing),
//! and a built qpnet (`$QPNET_BIN`, else `<workspace>/target/release/qpnet`;
//! see `qpnet_tests::qpnet`). qpnet is started and stopped by
//! `qpnet_tests::qpnet::Qpnet`; run-guest.sh (with its QEMU) and iperf3 each
//! lead their own process group and are killed with it on drop; the namespace
//! goes with its guard. On failure the serial consoles, qpnet's stderr and
//! iperf3's log are printed, and kept under /tmp/qpnet-guest-<name>/.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use qpnet_tests::netns::NetNs;
use qpnet_tests::qpnet::{qpnet_binary, Qpnet};
use qpnet_tests::wait::poll_until;

/// The host side of the test link (on the TAP) and the guest's addresses.
const HOST_ADDR: &str = "10.77.0.1";
const HOST_CIDR: &str = "10.77.0.1/24";
const FIRST_GUEST_CIDR: &str = "10.77.0.2/24";
const SECOND_GUEST_CIDR: &str = "10.77.0.3/24";
/// The TAP's name inside the test's own namespace.
const TAP: &str = "qptap0";
const QUEUE_PAIRS: usize = 2;
/// iperf3 seconds per direction and parallel streams. Queues are chosen by
/// flow hash (the guest's XPS/skb hash for TX, the TAP's for RX): with 8
/// streams plus the control connection and the other run's ACK flows, the
/// odds that one queue pair sees no flow at all in a direction are ~2^-17.
const IPERF_SECS: u32 = 5;
const IPERF_STREAMS: u32 = 8;
/// The iperf3 server's port.
const IPERF_PORT: u64 = 5201;
/// The guest's address, as qpnet's flow table shows it.
const FIRST_GUEST_ADDR: &str = "10.77.0.2";
/// Least share of tracked frames that must arrive on the queue pair that
/// owns their flow.
const MIN_FLOW_AFFINITY_PERCENT: f64 = 99.0;
/// Bounds (the whole test stays under five minutes): the first guest boots,
/// pings and runs two iperf3 rounds (about 20 s under TCG on a quiet
/// machine); the second only boots and pings.
const FIRST_GUEST_DEADLINE: Duration = Duration::from_secs(180);
const SECOND_GUEST_DEADLINE: Duration = Duration::from_secs(90);

#[test]
fn guest_moves_traffic_on_both_queue_pairs_and_a_second_guest_reconnects() {
    let mut bed = match GuestBed::start() {
        Ok(bed) => bed,
        Err(e) => panic!("setting up the guest test bed: {e:#}"),
    };
    if let Err(e) = run_scenario(&mut bed) {
        bed.print_logs();
        panic!("guest test failed: {e:#}");
    }
    bed.finish();
}

/// The whole scenario; every check fails with what it saw.
fn run_scenario(bed: &mut GuestBed) -> Result<()> {
    let started = Instant::now();
    let mut first = bed.start_guest(
        "guest1",
        FIRST_GUEST_CIDR,
        "ping,iperf-tx,iperf-rx,queues,hold",
    )?;
    GuestBed::wait_for_guest_line(
        &mut first,
        "QPNET-RESULT hold started",
        FIRST_GUEST_DEADLINE,
    )?;
    println!("first guest reached hold after {:?}", started.elapsed());
    let results = GuestResults::read(&first.log)?;
    check_first_guest(&results)?;
    check_qpnet_queue_counters(bed)?;
    check_qpnet_flows(bed)?;
    // Stop QEMU (the whole run-guest.sh process group).
    drop(first);

    let mut second = bed.start_guest("guest2", SECOND_GUEST_CIDR, "ping")?;
    let status = GuestBed::wait_for_guest_exit(&mut second, SECOND_GUEST_DEADLINE)?;
    let results = GuestResults::read(&second.log)?;
    let ping = results.ok_step("ping")?;
    println!("second guest: {}", ping.line);
    ensure!(
        status.success(),
        "second guest's run-guest.sh exited with {status}"
    );
    bed.qpnet.check_alive()?;
    println!("whole scenario took {:?}", started.elapsed());
    Ok(())
}

/// The first guest pinged, moved data both ways and used both queue pairs.
fn check_first_guest(results: &GuestResults) -> Result<()> {
    let ping = results.ok_step("ping")?;
    println!("first guest: {}", ping.line);
    for step in ["iperf-tx", "iperf-rx"] {
        let r = results.ok_step(step)?;
        println!("first guest: {}", r.line);
        ensure!(
            r.number(step, "bytes")? > 0,
            "{step} moved no data: {}",
            r.line
        );
    }
    let queues = results.ok_step("queues")?;
    println!("first guest: {}", queues.line);
    for qp in 0..QUEUE_PAIRS {
        for dir in ["rx", "tx"] {
            let key = format!("{dir}_queue_{qp}_packets");
            ensure!(
                queues.number("queues", &key)? > 0,
                "the guest's {key} is 0: queue pair {qp} carried no {dir} traffic ({})",
                queues.line
            );
        }
    }
    Ok(())
}

/// qpnet's own per-queue counters: every queue pair carried frames both ways.
fn check_qpnet_queue_counters(bed: &GuestBed) -> Result<()> {
    let queues = bed.qpnet_queue_stats()?;
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

/// The string member `key` of a JSON object, or "".
fn field<'a>(f: &'a json::Value, key: &str) -> &'a str {
    f.get(key).and_then(json::Value::as_str).unwrap_or("")
}

/// qpnet's flow table while the first guest holds: the guest's iperf3
/// connections are listed with its address and the server's, and flow
/// affinity (tracked frames that came through the queue pair owning their
/// flow) is above [`MIN_FLOW_AFFINITY_PERCENT`]. The last iperf3 run's
/// connections closed a moment ago; their entries stay until the closed-flow
/// timeout (10 s), and the check needs one stream per queue pair at least.
fn check_qpnet_flows(bed: &GuestBed) -> Result<()> {
    let text = bed.qpnet_stats_text(&["--json", "--top", "100"])?;
    let doc = json::parse(&text)?;
    ensure!(
        doc.get("flow_tracking").and_then(json::Value::as_bool) == Some(true),
        "qpnet stats says flow tracking is not on:\n{text}"
    );
    let flows = doc
        .get("flows")
        .and_then(json::Value::as_array)
        .context("qpnet stats --json has no \"flows\" array")?;
    let mut iperf = Vec::new();
    for f in flows {
        println!(
            "qpnet flow: {} owner={} state={} tx_bytes={} rx_bytes={}",
            field(f, "flow"),
            f.get("owner").and_then(json::Value::as_u64).unwrap_or(99),
            field(f, "state"),
            f.get("tx_bytes").and_then(json::Value::as_u64).unwrap_or(0),
            f.get("rx_bytes").and_then(json::Value::as_u64).unwrap_or(0),
        );
        let is_iperf = field(f, "protocol") == "tcp"
            && field(f, "guest_addr") == FIRST_GUEST_ADDR
            && field(f, "remote_addr") == HOST_ADDR
            && f.get("remote_port").and_then(json::Value::as_u64) == Some(IPERF_PORT);
        if is_iperf {
            let guest_port = f
                .get("guest_port")
                .and_then(json::Value::as_u64)
                .unwrap_or(0);
            ensure!(
                field(f, "flow")
                    == format!("tcp {FIRST_GUEST_ADDR}:{guest_port} <-> {HOST_ADDR}:{IPERF_PORT}"),
                "an iperf3 flow is printed as {:?}",
                field(f, "flow")
            );
            iperf.push(f);
        }
    }
    ensure!(
        iperf.len() >= QUEUE_PAIRS,
        "qpnet's flow table lists {} iperf3 connections of the guest \
         ({FIRST_GUEST_ADDR} <-> {HOST_ADDR}:{IPERF_PORT}), expected several:\n{text}",
        iperf.len()
    );
    let totals = doc.get("totals").context("no \"totals\" in qpnet stats")?;
    let count = |key: &str| {
        totals
            .get(key)
            .and_then(json::Value::as_u64)
            .with_context(|| format!("no numeric totals.{key}"))
    };
    let (tracked, misses) = (count("tracked_frames")?, count("flow_affinity_misses")?);
    ensure!(tracked > 0, "no tracked frames:\n{text}");
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
    dir: ScratchDir,
    _ns: NetNs,
    workspace: PathBuf,
    logs: Vec<PathBuf>,
}

/// One booted guest: its run-guest.sh process and serial log.
struct Guest {
    process: Spawned,
    log: PathBuf,
}

impl GuestBed {
    /// Namespace, TAP, iperf3 server and qpnet listening on its socket.
    fn start() -> Result<GuestBed> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "the guest test needs root (network namespaces, TAPs, QEMU)"
        );
        // Fail first, and clearly, if there is no qpnet to test.
        qpnet_binary()?;
        let ns = NetNs::new()?;
        // The server may bind before the TAP has its address.
        ns.sysctl("net.ipv4.ip_nonlocal_bind", "1")?;
        ns.add_tap(TAP, Some(HOST_CIDR))?;
        let dir = ScratchDir::create(ns.name())?;
        let iperf3_log = dir.path.join("iperf3.log");
        let iperf3 = Spawned::start(
            "iperf3 server",
            ns.command("iperf3").args(["-s", "-B", HOST_ADDR]),
            &iperf3_log,
        )?;
        let qpnet = Qpnet::start(&ns, TAP, QUEUE_PAIRS as u16)?;
        Ok(GuestBed {
            qpnet,
            _iperf3: iperf3,
            dir,
            _ns: ns,
            workspace: workspace_dir(),
            logs: vec![iperf3_log],
        })
    }

    /// Boot a guest against qpnet's socket with the given address and steps.
    fn start_guest(&mut self, label: &str, cidr: &str, tests: &str) -> Result<Guest> {
        let log = self.dir.path.join(format!("{label}-serial.log"));
        let out = self.dir.path.join(format!("{label}-run-guest.log"));
        self.logs.push(out.clone());
        self.logs.push(log.clone());
        let timeout = FIRST_GUEST_DEADLINE.max(SECOND_GUEST_DEADLINE) + Duration::from_secs(30);
        let process = Spawned::start(
            "run-guest.sh",
            Command::new(self.workspace.join("scripts/guest/run-guest.sh"))
                .arg("--vhost-user")
                .arg(self.qpnet.socket())
                .args(["--queues", &QUEUE_PAIRS.to_string()])
                .args(["--ip", cidr, "--peer", HOST_ADDR, "--tests", tests])
                .args(["--secs", &IPERF_SECS.to_string(), "--pingwait", "30"])
                .args(["--streams", &IPERF_STREAMS.to_string()])
                .args(["--timeout", &timeout.as_secs().to_string(), "--quiet"])
                .arg("--log")
                .arg(&log),
            &out,
        )?;
        Ok(Guest { process, log })
    }

    /// Wait until the guest's serial log has `needle`; fail as soon as the
    /// guest fails a step or finishes first, or after `deadline`.
    fn wait_for_guest_line(guest: &mut Guest, needle: &str, deadline: Duration) -> Result<()> {
        poll_until(needle, deadline, Duration::from_millis(200), || {
            let log = read_lossy(&guest.log);
            if log.contains(needle) {
                return Ok(Some(()));
            }
            if let Some(failed) = log
                .lines()
                .filter_map(StepResult::parse)
                .find(|r| !r.ok || r.step == "done")
            {
                bail!("the guest stopped short of {needle:?}: {}", failed.line);
            }
            if let Some(status) = guest.process.exited()? {
                bail!("run-guest.sh exited with {status} before the guest printed {needle:?}");
            }
            Ok(None)
        })
    }

    /// Wait for run-guest.sh to finish; its status is the guest's verdict.
    fn wait_for_guest_exit(guest: &mut Guest, deadline: Duration) -> Result<ExitStatus> {
        poll_until(
            "the guest to power off",
            deadline,
            Duration::from_millis(200),
            || guest.process.exited(),
        )
    }

    /// Per-queue counters from `qpnet stats --name NAME --json`.
    fn qpnet_queue_stats(&self) -> Result<Vec<QueueCounters>> {
        let out = self.qpnet.stats_command(&["--json"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "qpnet stats exited with {}: {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        QueueCounters::from_stats_json(&text)
            .with_context(|| format!("reading qpnet stats --json output:\n{text}"))
    }

    /// `qpnet stats --name NAME ARGS`, which must succeed; its stdout.
    fn qpnet_stats_text(&self, args: &[&str]) -> Result<String> {
        let out = self.qpnet.stats_command(args)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "qpnet stats {args:?} exited with {}: {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(text)
    }

    /// Print every log the test collected (on failure).
    fn print_logs(&self) {
        print_tail("qpnet stderr", &self.qpnet.stderr());
        for path in &self.logs {
            print_tail(&path.display().to_string(), &read_lossy(path));
        }
        eprintln!("===== logs kept in {} =====", self.dir.path.display());
    }

    /// Success: the scratch directory (logs) can go.
    fn finish(mut self) {
        self.dir.keep = false;
    }
}

/// Print the last lines of one log.
fn print_tail(what: &str, text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(300)..];
    eprintln!(
        "===== {what} ({} lines, last {}) =====",
        lines.len(),
        tail.len()
    );
    for line in tail {
        eprintln!("{line}");
    }
}

/// `<workspace>` (this crate's parent directory).
fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default()
}

/// A child process leading its own process group; on drop the whole group
/// (run-guest.sh with its QEMU, or iperf3) gets SIGTERM, then
/// SIGKILL if it lingers.
struct Spawned {
    what: &'static str,
    child: Child,
}

impl Spawned {
    /// Start `cmd` with stdin closed and stdout+stderr appended to `log`.
    fn start(what: &'static str, cmd: &mut Command, log: &Path) -> Result<Spawned> {
        use std::os::unix::process::CommandExt;
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {what}: {cmd:?}"))?;
        Ok(Spawned { what, child })
    }

    /// The exit status if the process has ended.
    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking on {}", self.what))
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let group = Pid::from_raw(self.child.id() as i32);
        let child = &mut self.child;
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                // The leader is gone; make sure no member of its group stays.
                let _ = killpg(group, Signal::SIGKILL);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait();
    }
}

/// `/tmp/qpnet-guest-<name>`: the socket and the logs. Removed on drop once
/// the test passed; kept (and named in the output) when it failed.
struct ScratchDir {
    path: PathBuf,
    keep: bool,
}

impl ScratchDir {
    fn create(name: &str) -> Result<ScratchDir> {
        // Short and under /tmp: a unix socket path must fit in 108 bytes.
        let path = PathBuf::from(format!("/tmp/qpnet-guest-{name}"));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ScratchDir { path, keep: true })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// One `QPNET-RESULT <step> ok|fail key=value...` line of a serial log.
struct StepResult {
    step: String,
    ok: bool,
    line: String,
}

impl StepResult {
    fn parse(line: &str) -> Option<StepResult> {
        let rest = line.strip_prefix("QPNET-RESULT ")?;
        let mut words = rest.split_whitespace();
        let step = words.next()?.to_owned();
        let ok = words.next()? == "ok";
        Some(StepResult {
            step,
            ok,
            line: line.to_owned(),
        })
    }

    /// The value of `key=` on the line.
    fn field(&self, key: &str) -> Option<&str> {
        self.line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }

    fn number(&self, step: &str, key: &str) -> Result<u64> {
        let v = self
            .field(key)
            .with_context(|| format!("{step}: no {key}= in {:?}", self.line))?;
        v.parse()
            .with_context(|| format!("{step}: {key}={v} is not a number"))
    }
}

/// All result lines of one guest's serial log.
struct GuestResults(Vec<StepResult>);

impl GuestResults {
    fn read(log: &Path) -> Result<GuestResults> {
        let text = std::fs::read(log).with_context(|| format!("reading {}", log.display()))?;
        let text = String::from_utf8_lossy(&text).replace('\r', "");
        Ok(GuestResults(
            text.lines().filter_map(StepResult::parse).collect(),
        ))
    }

    /// The result of `step`, which must be there and be ok.
    fn ok_step(&self, step: &str) -> Result<&StepResult> {
        let r = self
            .0
            .iter()
            .rev()
            .find(|r| r.step == step)
            .with_context(|| format!("the guest printed no result for {step}"))?;
        ensure!(r.ok, "guest step {step} failed: {}", r.line);
        Ok(r)
    }
}

/// What the test checks of one queue pair in `qpnet stats --json`.
struct QueueCounters {
    queue_pair: u64,
    tx_frames: u64,
    rx_frames: u64,
}

impl QueueCounters {
    /// The `queues` array of the stats document: objects with `queue_pair`,
    /// `tx_frames` and `rx_frames` (and more, ignored).
    fn from_stats_json(text: &str) -> Result<Vec<QueueCounters>> {
        let doc = json::parse(text)?;
        let queues = doc
            .get("queues")
            .and_then(json::Value::as_array)
            .context("no \"queues\" array")?;
        queues
            .iter()
            .map(|q| {
                let field = |key: &str| {
                    q.get(key)
                        .and_then(json::Value::as_u64)
                        .with_context(|| format!("queue entry without a numeric {key:?}"))
                };
                Ok(QueueCounters {
                    queue_pair: field("queue_pair")?,
                    tx_frames: field("tx_frames")?,
                    rx_frames: field("rx_frames")?,
                })
            })
            .collect()
    }
}

/// A small JSON reader for `qpnet stats --json` (the test crate has no JSON
/// dependency): objects, arrays, strings, numbers, booleans, null.
mod json {
    use anyhow::{bail, Context, Result};

    /// A parsed JSON value; numbers keep their text.
    pub enum Value {
        Null,
        Bool(bool),
        Number(String),
        String(String),
        Array(Vec<Value>),
        Object(Vec<(String, Value)>),
    }

    impl Value {
        /// The member `key` of an object.
        pub fn get(&self, key: &str) -> Option<&Value> {
            match self {
                Value::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
                _ => None,
            }
        }

        pub fn as_array(&self) -> Option<&[Value]> {
            match self {
                Value::Array(items) => Some(items),
                _ => None,
            }
        }

        pub fn as_u64(&self) -> Option<u64> {
            match self {
                Value::Number(n) => n.parse().ok(),
                _ => None,
            }
        }

        pub fn as_str(&self) -> Option<&str> {
            match self {
                Value::String(s) => Some(s),
                _ => None,
            }
        }

        pub fn as_bool(&self) -> Option<bool> {
            match self {
                Value::Bool(b) => Some(*b),
                _ => None,
            }
        }
    }

    /// Parse one JSON document (surrounding whitespace allowed).
    pub fn parse(text: &str) -> Result<Value> {
        let mut p = Parser {
            s: text.as_bytes(),
            pos: 0,
        };
        let v = p.value()?;
        p.skip_space();
        if p.pos != p.s.len() {
            bail!("trailing data at byte {}", p.pos);
        }
        Ok(v)
    }

    struct Parser<'a> {
        s: &'a [u8],
        pos: usize,
    }

    impl Parser<'_> {
        fn skip_space(&mut self) {
            while self
                .s
                .get(self.pos)
                .is_some_and(|c| c.is_ascii_whitespace())
            {
                self.pos += 1;
            }
        }

        fn peek(&mut self) -> Result<u8> {
            self.skip_space();
            self.s
                .get(self.pos)
                .copied()
                .context("unexpected end of JSON")
        }

        fn expect(&mut self, c: u8) -> Result<()> {
            if self.peek()? != c {
                bail!("expected {:?} at byte {}", c as char, self.pos);
            }
            self.pos += 1;
            Ok(())
        }

        fn literal(&mut self, word: &str, v: Value) -> Result<Value> {
            if !self.s[self.pos..].starts_with(word.as_bytes()) {
                bail!("bad literal at byte {}", self.pos);
            }
            self.pos += word.len();
            Ok(v)
        }

        fn value(&mut self) -> Result<Value> {
            match self.peek()? {
                b'{' => self.object(),
                b'[' => self.array(),
                b'"' => Ok(Value::String(self.string()?)),
                b't' => self.literal("true", Value::Bool(true)),
                b'f' => self.literal("false", Value::Bool(false)),
                b'n' => self.literal("null", Value::Null),
                _ => self.number(),
            }
        }

        fn object(&mut self) -> Result<Value> {
            self.expect(b'{')?;
            let mut members = Vec::new();
            if self.peek()? == b'}' {
                self.pos += 1;
                return Ok(Value::Object(members));
            }
            loop {
                self.skip_space();
                let key = self.string()?;
                self.expect(b':')?;
                members.push((key, self.value()?));
                match self.peek()? {
                    b',' => self.pos += 1,
                    b'}' => {
                        self.pos += 1;
                        return Ok(Value::Object(members));
                    }
                    c => bail!("unexpected {:?} in object at byte {}", c as char, self.pos),
                }
            }
        }

        fn array(&mut self) -> Result<Value> {
            self.expect(b'[')?;
            let mut items = Vec::new();
            if self.peek()? == b']' {
                self.pos += 1;
                return Ok(Value::Array(items));
            }
            loop {
                items.push(self.value()?);
                match self.peek()? {
                    b',' => self.pos += 1,
                    b']' => {
                        self.pos += 1;
                        return Ok(Value::Array(items));
                    }
                    c => bail!("unexpected {:?} in array at byte {}", c as char, self.pos),
                }
            }
        }

        /// A string; escapes are decoded except \u, kept as '?' (the test
        /// reads no such string).
        fn string(&mut self) -> Result<String> {
            self.expect(b'"')?;
            let mut out = Vec::new();
            loop {
                let c = *self.s.get(self.pos).context("unterminated string")?;
                self.pos += 1;
                match c {
                    b'"' => return Ok(String::from_utf8_lossy(&out).into_owned()),
                    b'\\' => {
                        let e = *self.s.get(self.pos).context("unterminated escape")?;
                        self.pos += 1;
                        out.push(match e {
                            b'n' => b'\n',
                            b't' => b'\t',
                            b'r' => b'\r',
                            b'b' => 8,
                            b'f' => 12,
                            b'u' => {
                                self.pos += 4;
                                b'?'
                            }
                            other => other,
                        });
                    }
                    _ => out.push(c),
                }
            }
        }

        fn number(&mut self) -> Result<Value> {
            let start = self.pos;
            while self
                .s
                .get(self.pos)
                .is_some_and(|c| c.is_ascii_digit() || b"+-.eE".contains(c))
            {
                self.pos += 1;
            }
            if start == self.pos {
                bail!("unexpected character at byte {start}");
            }
            Ok(Value::Number(
                String::from_utf8_lossy(&self.s[start..self.pos]).into_owned(),
            ))
        }
    }
}

#[test]
fn stats_json_queues_are_read() {
    let text = r#"{
      "name": "x", "primary_pid": 12, "vmm_connected": true, "queue_pairs": 2,
      "queues": [
        {"queue_pair": 0, "tx_frames": 5, "rx_frames": 7, "state": "running", "heartbeat_age_ms": null},
        {"queue_pair": 1, "tx_frames": 0, "rx_frames": 18446744073709551615, "state": "a\"b\\c"}
      ],
      "totals": {"tx_frames": 5, "rx_frames": 1.5e3, "list": [], "o": {}}
    }"#;
    let queues = QueueCounters::from_stats_json(text).unwrap();
    assert_eq!(queues.len(), 2);
    assert_eq!(
        (
            queues[0].queue_pair,
            queues[0].tx_frames,
            queues[0].rx_frames
        ),
        (0, 5, 7)
    );
    assert_eq!(
        (
            queues[1].queue_pair,
            queues[1].tx_frames,
            queues[1].rx_frames
        ),
        (1, 0, u64::MAX)
    );
    assert!(QueueCounters::from_stats_json("{\"queues\": [ {\"queue_pair\": 0} ]}").is_err());
    let doc = json::parse(text).unwrap();
    let q1 = &doc.get("queues").unwrap().as_array().unwrap()[1];
    assert_eq!(
        q1.get("state").and_then(json::Value::as_str),
        Some("a\"b\\c")
    );
    assert_eq!(
        doc.get("vmm_connected").and_then(json::Value::as_bool),
        Some(true)
    );
    assert_eq!(doc.get("name").and_then(json::Value::as_bool), None);
    assert!(json::parse("{\"a\": 1} x").is_err());
}

#[test]
fn guest_result_lines_are_read() {
    let r = StepResult::parse("QPNET-RESULT iperf-tx ok gbps=0.932 bytes=585760768 retransmits=0")
        .unwrap();
    assert!(r.ok);
    assert_eq!(r.step, "iperf-tx");
    assert_eq!(r.number("iperf-tx", "bytes").unwrap(), 585760768);
    assert!(r.number("iperf-tx", "gbps").is_err());
    let f = StepResult::parse("QPNET-RESULT ping fail reason=no-reply waited_s=60").unwrap();
    assert!(!f.ok);
    assert!(StepResult::parse("[ 3.1] virtio_net").is_none());
}
