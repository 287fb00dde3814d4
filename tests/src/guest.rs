//! Plumbing for the real-guest tests (`tests/guest.rs`, `tests/guest_crash.rs`):
//! a Linux guest booted by `scripts/guest/run-guest.sh` under QEMU (TCG),
//! its network served by qpnet over vhost-user.
//!
//! [`Bed`] is what every such test stands on: a network namespace holding a
//! multi-queue TAP with [`HOST_CIDR`] (or none: [`Bed::without_tap`], for
//! guests that reach each other or passt over sockets), a scratch directory for the socket and
//! the logs (removed once the test passed, kept and named when it failed),
//! and the list of logs to print on failure. [`Bed::start_iperf3_server`]
//! and [`Bed::start_guest`] start the host's iperf3 server and a guest
//! ([`Bed::start_guest_on`]: a guest inside the namespace on any
//! [`GuestNet`], with another guest as its peer); both
//! run as [`Spawned`] processes, each leading its own process group, stopped
//! with it on drop so nothing they started stays behind.
//!
//! A [`Guest`] reads its serial console as it grows ([`SerialLog`]), so each
//! line carries the host time it appeared, and waits for lines while
//! failing early when the guest fails a step or stops. The guest's init
//! (`scripts/guest/init`) prints `QPNET-RESULT <step> ok|fail key=value...`
//! ([`ResultLine`]) and, while it holds, `QPNET-HOLD seq=N ok|lost ...`
//! ([`HoldLine`]).

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::binary::qpnet_binary;
pub use crate::binary::workspace_dir;
use crate::netns::NetNs;
use crate::wait::poll_until;

mod lines;
pub use lines::{hold_of, ok_result, result_of, HoldLine, ResultLine};

/// The host side of the test link (on the TAP), with and without its prefix.
pub const HOST_ADDR: &str = "10.77.0.1";
pub const HOST_CIDR: &str = "10.77.0.1/24";
/// The TAP's name inside the test's own namespace.
pub const TAP: &str = "qptap0";
/// How often a guest's serial console is read while a test waits on it.
pub const SERIAL_POLL: Duration = Duration::from_millis(20);
/// How long run-guest.sh (with its QEMU) and iperf3 get to end after
/// SIGTERM before their process group is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A file's text, `\r` removed ("" if it cannot be read).
pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default()
}

/// Print the last lines of one log.
pub fn print_tail(what: &str, text: &str) {
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

// ---- the test bed --------------------------------------------------------

/// The namespace with the TAP, the scratch directory and the logs to print
/// on failure. Dropped in that field order: the scratch directory first,
/// then the namespace.
pub struct Bed {
    dir: ScratchDir,
    ns: NetNs,
    logs: Vec<(String, PathBuf)>,
}

/// What run-guest.sh is asked to do.
pub struct GuestArgs<'a> {
    /// Queue pairs of the guest's virtio-net device.
    pub queues: u16,
    /// The guest's address with its prefix (the peer is [`HOST_ADDR`], or
    /// the one [`Bed::start_guest_on`] is given), or `none` for the dhcp
    /// step.
    pub ip: &'a str,
    /// The guest init's steps, comma-separated (`ping,iperf-tx,hold`).
    pub tests: &'a str,
    /// More run-guest.sh options (`--secs`, `--streams`, `--reconnect`...).
    pub extra: &'a [&'a str],
    /// run-guest.sh kills QEMU after this, even if the test process died
    /// without its drops.
    pub timeout: Duration,
}

/// What backs a guest's virtio-net device.
pub enum GuestNet<'a> {
    /// vhost-user: QEMU connects to the backend listening on this socket.
    VhostUser(&'a Path),
    /// QEMU's own `-netdev dgram` (IPv4): one UDP socket bound to `local`,
    /// sending to `remote`.
    Dgram {
        local: SocketAddr,
        remote: SocketAddr,
    },
    /// QEMU's own `-netdev stream`, connecting to a peer (passt) listening
    /// on this unix socket: the baseline without qpnet.
    Stream(&'a Path),
}

impl Bed {
    /// A new namespace with [`TAP`] at [`HOST_CIDR`] and the scratch
    /// directory `/tmp/qpnet-<scratch>-<namespace>`. Fails, saying what is
    /// missing, without root or without a qpnet binary.
    pub fn create(scratch: &str) -> Result<Bed> {
        let bed = Bed::without_tap(scratch)?;
        bed.ns.add_tap(TAP, Some(HOST_CIDR))?;
        Ok(bed)
    }

    /// [`Bed::create`] with no TAP: the namespace has only its loopback.
    pub fn without_tap(scratch: &str) -> Result<Bed> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "the real-guest tests need root (network namespaces, TAPs, QEMU)"
        );
        // Fail first, and clearly, if there is no qpnet to test.
        qpnet_binary()?;
        let ns = NetNs::new()?;
        // The iperf3 server may bind before the TAP has its address.
        ns.sysctl("net.ipv4.ip_nonlocal_bind", "1")?;
        let dir = ScratchDir::create(&format!("qpnet-{scratch}-{}", ns.name()))?;
        Ok(Bed {
            dir,
            ns,
            logs: Vec::new(),
        })
    }

    /// The test's network namespace.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    /// A log file `file` in the scratch directory, printed on failure as
    /// `what`.
    pub fn log_path(&mut self, what: &str, file: &str) -> PathBuf {
        let p = self.dir.path.join(file);
        self.logs.push((what.to_owned(), p.clone()));
        p
    }

    /// `iperf3 -s -B HOST_ADDR` in the namespace, logging to `iperf3.log`.
    pub fn start_iperf3_server(&mut self) -> Result<Spawned> {
        self.start_iperf3_server_on(HOST_ADDR)
    }

    /// `iperf3 -s -B addr` in the namespace, logging to `iperf3.log`.
    pub fn start_iperf3_server_on(&mut self, addr: &str) -> Result<Spawned> {
        let log = self.log_path("iperf3 server", "iperf3.log");
        Spawned::start(
            "iperf3 server",
            self.ns.command("iperf3").args(["-s", "-B", addr]),
            &log,
            STOP_GRACE,
        )
    }

    /// Boot a guest against the vhost-user socket `socket` (QEMU connects
    /// to it); its output and serial console are logged as
    /// `<label>-run-guest.log` and `<label>-serial.log`.
    pub fn start_guest(&mut self, socket: &Path, label: &str, args: &GuestArgs) -> Result<Guest> {
        let backend = vec!["--vhost-user".into(), socket.into()];
        self.spawn_guest(label, args, backend, HOST_ADDR)
    }

    /// Boot a guest whose QEMU runs inside the namespace, on `net`, with
    /// `peer` as its ping target and iperf3 server (another guest).
    pub fn start_guest_on(
        &mut self,
        net: &GuestNet,
        peer: &str,
        label: &str,
        args: &GuestArgs,
    ) -> Result<Guest> {
        let mut backend: Vec<OsString> = match net {
            GuestNet::VhostUser(socket) => vec!["--vhost-user".into(), socket.into()],
            GuestNet::Dgram { local, remote } => {
                vec!["--dgram".into(), format!("{local},{remote}").into()]
            }
            GuestNet::Stream(socket) => vec!["--stream".into(), socket.into()],
        };
        backend.extend(["--netns".into(), self.ns.name().into()]);
        self.spawn_guest(label, args, backend, peer)
    }

    fn spawn_guest(
        &mut self,
        label: &str,
        args: &GuestArgs,
        backend: Vec<OsString>,
        peer: &str,
    ) -> Result<Guest> {
        let out = self.log_path("run-guest.sh", &format!("{label}-run-guest.log"));
        let serial = self.log_path("guest serial console", &format!("{label}-serial.log"));
        let process = Spawned::start(
            "run-guest.sh",
            Command::new(workspace_dir().join("scripts/guest/run-guest.sh"))
                .args(backend)
                .args(["--queues", &args.queues.to_string()])
                .args(["--ip", args.ip, "--peer", peer, "--tests", args.tests])
                .args(args.extra)
                .args(["--timeout", &args.timeout.as_secs().to_string(), "--quiet"])
                .arg("--log")
                .arg(&serial),
            &out,
            STOP_GRACE,
        )?;
        Ok(Guest {
            process,
            serial: SerialLog::new(serial),
        })
    }

    /// Print every log collected (on failure) and where they are kept.
    pub fn print_logs(&self) {
        for (what, path) in &self.logs {
            print_tail(&format!("{what}: {}", path.display()), &read_lossy(path));
        }
        eprintln!("===== logs kept in {} =====", self.dir.path.display());
    }

    /// Success: the scratch directory (logs) can go.
    pub fn finish(&mut self) {
        self.dir.keep = false;
    }
}

/// A directory under /tmp: kept on drop unless the test passed.
struct ScratchDir {
    path: PathBuf,
    keep: bool,
}

impl ScratchDir {
    fn create(name: &str) -> Result<ScratchDir> {
        // Short and under /tmp: a unix socket path must fit in 108 bytes.
        let path = Path::new("/tmp").join(name);
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

// ---- processes -----------------------------------------------------------

/// A child process leading its own process group. [`Spawned::stop`] (also
/// on drop) sends SIGTERM to the leader, waits `grace`, then SIGKILLs the
/// whole group so nothing it started stays behind.
pub struct Spawned {
    what: &'static str,
    child: Child,
    grace: Duration,
    stopped: bool,
}

impl Spawned {
    /// Start `cmd` with stdin closed and stdout+stderr into `log`.
    pub fn start(
        what: &'static str,
        cmd: &mut Command,
        log: &Path,
        grace: Duration,
    ) -> Result<Spawned> {
        use std::os::unix::process::CommandExt;
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {what}: {cmd:?}"))?;
        Ok(Spawned {
            what,
            child,
            grace,
            stopped: false,
        })
    }

    /// The leader's pid (also its process group).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send `sig` to the leader (not yet reaped, so its pid is its own).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), sig)
            .with_context(|| format!("{sig} to {}", self.what))
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking on {}", self.what))
    }

    /// Stop the process and its group (once; later calls do nothing).
    pub fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let leader = Pid::from_raw(self.child.id() as i32);
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(leader, Signal::SIGTERM);
            let deadline = Instant::now() + self.grace;
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = killpg(leader, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- the guest -----------------------------------------------------------

/// A booted guest: run-guest.sh (with QEMU) and its serial console.
pub struct Guest {
    process: Spawned,
    serial: SerialLog,
}

impl Guest {
    /// Serial lines read so far, with the time each was seen.
    pub fn lines(&self) -> &[SerialLine] {
        &self.serial.lines
    }

    /// Read new output; fail if the guest failed a step (anywhere), printed
    /// its verdict at or after line `from`, or run-guest.sh ended.
    pub fn check_running(&mut self, from: usize) -> Result<()> {
        self.serial.poll()?;
        if let Some(bad) = self.serial.lines.iter().enumerate().find_map(|(i, l)| {
            let r = ResultLine::parse(&l.text)?;
            (r.failed() || (i >= from && r.step == "done")).then_some(r.line)
        }) {
            bail!("the guest stopped: {bad}");
        }
        if let Some(st) = self.process.exited()? {
            bail!("run-guest.sh exited with {st}");
        }
        Ok(())
    }

    /// The first line at index >= `from` that `pred` accepts, waiting up to
    /// `timeout`; fails as soon as the guest fails a step or stops.
    pub fn wait_line(
        &mut self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, String)> {
        poll_until(what, timeout, SERIAL_POLL, || {
            self.serial.poll()?;
            if let Some((i, l)) = self
                .serial
                .lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| pred(&l.text))
            {
                return Ok(Some((i, l.text.clone())));
            }
            self.check_running(from)?;
            Ok(None)
        })
    }

    /// Wait for run-guest.sh to end; its status is the guest's verdict.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        poll_until("the guest to power off", timeout, SERIAL_POLL, || {
            self.process.exited()
        })
    }

    /// The last result line of `step` among the lines read so far.
    pub fn result(&self, step: &str) -> Option<ResultLine> {
        self.serial
            .lines
            .iter()
            .rev()
            .find_map(|l| result_of(&l.text, step))
    }

    /// Read what the console printed since, then the last result of
    /// `step`, which must be there and be ok.
    pub fn ok_step(&mut self, step: &str) -> Result<ResultLine> {
        self.serial.poll()?;
        let r = self
            .result(step)
            .with_context(|| format!("the guest printed no result for {step}"))?;
        ensure!(r.ok(), "guest step {step} failed: {}", r.line);
        Ok(r)
    }
}

/// One line of the serial console and when the test first saw it.
pub struct SerialLine {
    pub at: Instant,
    pub text: String,
}

/// The serial console log, read incrementally so each line gets the host
/// time it appeared (polled every [`SERIAL_POLL`] while a test waits).
pub struct SerialLog {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    lines: Vec<SerialLine>,
}

impl SerialLog {
    pub fn new(path: PathBuf) -> SerialLog {
        SerialLog {
            path,
            offset: 0,
            partial: Vec::new(),
            lines: Vec::new(),
        }
    }

    /// Read the complete lines added since the last call (none while the
    /// file does not exist yet).
    pub fn poll(&mut self) -> Result<()> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.path.display())),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let n = f.read_to_end(&mut self.partial)?;
        self.offset += n as u64;
        let now = Instant::now();
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.partial.drain(..=end).collect();
            let text = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .replace('\r', "");
            self.lines.push(SerialLine { at: now, text });
        }
        Ok(())
    }
}
