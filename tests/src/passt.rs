//! passt as the peer of a stream-socket backend, for the guest tests.
//!
//! passt (the Debian package `passt`) listens on a unix socket for Ethernet
//! frames, each prefixed by its length as a 4-byte big-endian integer
//! (QEMU's `-netdev stream` format, which `qpnet run --stream unix:PATH`
//! speaks too). It answers the guest's ARP and DHCP itself and carries the
//! guest's TCP and UDP through ordinary sockets of the network namespace it
//! runs in. It offers the guest the address, netmask and gateway of a
//! template interface of that namespace: the one with the default route.
//!
//! [`prepare_namespace`] gives the test's namespace that interface (one end
//! of a veth pair whose both ends stay in the namespace: this machine's
//! kernel has no dummy module) with [`TEMPLATE_CIDR`] and a default route
//! via [`GATEWAY`], and the address a test server listens on,
//! [`SERVER_ADDR`], on `lo`. The server address lies outside the template's
//! subnet, so the guest reaches it through the default route its DHCP lease
//! gave it, and passt's socket reaches it as a local address.
//!
//! [`Passt`] runs `passt -f` (in the foreground, so the pid is passt's) in
//! the namespace. Started as root, passt changes to another user before it
//! touches the guest's traffic; `--runas nobody` says which, and its socket
//! goes in a directory that user owns ([`socket_dir`]). Its log goes to a
//! file per instance, so a restarted passt's readiness ("UNIX domain socket
//! bound at") is told apart from the killed one's. A new passt on the path
//! of a killed one replaces the stale socket file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use nix::unistd::{chown, User};

use crate::guest::{read_lossy, Bed, Spawned};
use crate::netns::NetNs;
use crate::wait::poll_until;

/// The template interface's address (passt offers it to the guest) and
/// prefix, and the gateway of the namespace's default route (passt's
/// address as the guest sees it).
pub const TEMPLATE_ADDR: &str = "10.78.0.1";
pub const TEMPLATE_CIDR: &str = "10.78.0.1/24";
pub const TEMPLATE_MASK: &str = "255.255.255.0";
pub const GATEWAY: &str = "10.78.0.254";
/// Where the test's servers listen: on `lo` of the namespace, outside the
/// template subnet.
pub const SERVER_ADDR: &str = "10.79.0.1";
/// The template interface and its veth peer.
pub const TEMPLATE_IF: &str = "qppt0";
const TEMPLATE_PEER: &str = "qppt1";
/// The user passt changes to.
pub const PASST_USER: &str = "nobody";
/// What passt logs once its socket listens.
const READY: &str = "UNIX domain socket bound at";
/// How long passt may take to listen.
const START_LIMIT: Duration = Duration::from_secs(10);
/// How long passt gets to end after SIGTERM before its group is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Give `ns` the template interface, its default route and [`SERVER_ADDR`].
pub fn prepare_namespace(ns: &NetNs) -> Result<()> {
    ns.ip(&[
        "link",
        "add",
        TEMPLATE_IF,
        "type",
        "veth",
        "peer",
        "name",
        TEMPLATE_PEER,
    ])
    .context("creating the veth pair for passt's template interface")?;
    ns.ip(&["addr", "add", TEMPLATE_CIDR, "dev", TEMPLATE_IF])?;
    for dev in [TEMPLATE_IF, TEMPLATE_PEER] {
        ns.ip(&["link", "set", dev, "up"])?;
    }
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        GATEWAY,
        "dev",
        TEMPLATE_IF,
    ])?;
    ns.ip(&["addr", "add", &format!("{SERVER_ADDR}/32"), "dev", "lo"])?;
    Ok(())
}

/// A directory in the bed's scratch directory that [`PASST_USER`] owns,
/// for passt's socket.
pub fn socket_dir(bed: &Bed) -> Result<PathBuf> {
    let user = User::from_name(PASST_USER)
        .context("looking up the passt user")?
        .with_context(|| format!("no user {PASST_USER} for passt to run as"))?;
    let dir = bed.dir().join("passt");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    chown(&dir, Some(user.uid), Some(user.gid))
        .with_context(|| format!("chown {PASST_USER} {}", dir.display()))?;
    Ok(dir)
}

/// Fail, naming the package, when passt is not installed.
pub fn check_installed() -> Result<()> {
    match Command::new("passt").arg("--version").output() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "passt not found: install the Debian package 'passt' (apt-get install passt; \
             scripts/install-deps.sh test installs it)"
        ),
        Err(e) => Err(e).context("running passt --version"),
    }
}

/// A running passt listening on its socket.
pub struct Passt {
    process: Spawned,
    log: PathBuf,
}

impl Passt {
    /// Start passt in the bed's namespace on `socket`; returns once it
    /// listens. `label` names its logs (`<label>.log`, `<label>.out`).
    pub fn start(bed: &mut Bed, socket: &Path, label: &str) -> Result<Passt> {
        check_installed()?;
        let log = bed.log_path("passt log", &format!("{label}.log"));
        let out = bed.log_path("passt output", &format!("{label}.out"));
        let mut cmd = bed.ns().command("passt");
        cmd.args(["-f", "-4", "--runas", PASST_USER, "-i", TEMPLATE_IF])
            // No DNS: nothing the test runs resolves names, and the host's
            // resolv.conf is not the test's.
            .args(["-D", "none", "-S", "none"])
            .arg("--socket")
            .arg(socket)
            .arg("--log-file")
            .arg(&log);
        let mut process = Spawned::start("passt", &mut cmd, &out, STOP_GRACE)?;
        poll_until(
            "passt to listen on its socket",
            START_LIMIT,
            Duration::from_millis(20),
            || {
                if read_lossy(&log).contains(READY) {
                    return Ok(Some(()));
                }
                if let Some(st) = process.exited()? {
                    bail!(
                        "passt exited with {st} before listening: {}{}",
                        read_lossy(&out).trim(),
                        read_lossy(&log).trim()
                    );
                }
                Ok(None)
            },
        )?;
        Ok(Passt { process, log })
    }

    /// passt's pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// passt's log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// SIGKILL passt (a crash: no goodbye on its socket) and wait until it
    /// is gone.
    pub fn kill(mut self) -> Result<()> {
        self.process.signal(Signal::SIGKILL)?;
        poll_until(
            "passt to die of SIGKILL",
            Duration::from_secs(5),
            Duration::from_millis(5),
            || self.process.exited(),
        )?;
        Ok(())
    }
}
