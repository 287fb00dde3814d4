//! The command line: `qpnet run`, `qpnet worker`, `qpnet stats`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// qpnet: a multi-process vhost-user-net backend. Every queue pair of the
/// VM's virtio-net device is moved by its own worker process, so a crashing
/// or wedged worker never takes the VM's network down.
#[derive(Parser, Debug)]
#[command(name = "qpnet", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
// Parsed once per process: the size of `RunArgs` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the primary: serve a VMM on a vhost-user socket, forward through
    /// a TAP (--tap, needs CAP_NET_ADMIN) or datagram sockets (--udp,
    /// --unix-dgram, need no privilege), one worker process per queue pair.
    Run(RunArgs),
    /// Internal: a queue pair's worker, started by `qpnet run` only.
    Worker(WorkerArgs),
    /// Show the per-queue counters and worker state of a running instance.
    Stats(StatsArgs),
    /// Ask a running instance to retry the queue pairs it marked failed
    /// after repeated worker crashes.
    Retry(RetryArgs),
}

/// Options of `qpnet run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The vhost-user unix socket. qpnet listens on it (the VMM connects),
    /// or with --connect connects to a VMM listening there.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Where frames go: exactly one of --tap, --udp, --unix-dgram, --stream.
    #[command(flatten)]
    pub host: HostArgs,
    /// With --udp or --unix-dgram: every queue pair sends to REMOTE as given
    /// (not REMOTE PORT+K, REMOTE_PATH.K), for a peer with one unconnected
    /// socket such as one QEMU `-netdev dgram` pointed at queue pair 0's
    /// address. The peer's frames then reach the guest on queue pair 0
    /// only; the guest's TX leaves through every queue pair.
    #[arg(long, conflicts_with_all = ["tap", "stream"])]
    pub single_peer: bool,
    /// Number of queue pairs (1..=16), each served by its own worker
    /// process. Default: the number of CPUs, at most 16.
    #[arg(long, value_name = "N", value_parser = parse_queue_pairs, allow_negative_numbers = true)]
    pub queue_pairs: Option<u16>,
    /// Connect to a VMM that listens on --socket (retrying until it does)
    /// instead of listening.
    #[arg(long)]
    pub connect: bool,
    /// Instance name: names the runtime directory (/run/qpnet/NAME as root)
    /// where `qpnet stats --name NAME` finds it.
    #[arg(long, value_name = "NAME", default_value = "qpnet")]
    pub name: String,
    /// MAC address reported to drivers that read the config space
    /// (default: a locally administered address derived from --name).
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    pub mac: Option<[u8; 6]>,
    /// Base directory for runtime files (default /run/qpnet as root, else
    /// $XDG_RUNTIME_DIR/qpnet, or /tmp/qpnet-UID without it).
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Watchdog: a worker whose heartbeat is older than this while its queue
    /// pair has work is killed and replaced (0 turns the watchdog off).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub watchdog_ms: u64,
    /// Crash-loop guard: a queue pair whose worker dies more than this many
    /// times within --crash-window-secs is marked failed (0: never).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub crash_limit: u32,
    /// The window of --crash-limit, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub crash_window_secs: u64,
    /// Capacity of the shared flow table (a power of two).
    #[arg(long, value_name = "N", default_value_t = 65536, value_parser = parse_flow_capacity)]
    pub flow_capacity: u32,
    /// Do not track flows (frames are forwarded the same; the flow table
    /// stays empty). For measuring what tracking costs.
    #[arg(long)]
    pub no_flow_tracking: bool,
    /// The user the workers run as once they have given up their
    /// capabilities (they parse guest memory; they need no privilege).
    /// Default when qpnet runs as root: `nobody`; otherwise the user qpnet
    /// runs as.
    #[arg(long, value_name = "USER")]
    pub worker_user: Option<String>,
    /// Give the listening socket to this group too (mode 0660), for a VMM
    /// running as another user in that group. Default: owner only (0600).
    #[arg(long, value_name = "GROUP", conflicts_with = "connect")]
    pub socket_group: Option<String>,
    /// With --stream: listen at its address (the peer connects, as QEMU's
    /// `-netdev stream,server=off` does) instead of connecting to it.
    #[arg(long)]
    pub stream_listen: bool,
    /// Serve only VMMs whose connection comes from one of these uids
    /// (SO_PEERCRED); others are refused and logged. Default: any peer
    /// that can reach the socket.
    #[arg(long, value_name = "UID[,UID...]", value_delimiter = ',')]
    pub allow_uid: Option<Vec<u32>>,
}

impl RunArgs {
    /// What clap cannot say: `--stream-listen` only with `--stream`.
    pub fn check_usage(&self) -> Result<(), String> {
        if self.stream_listen && self.host.stream.is_none() {
            return Err("--stream-listen needs --stream (it names where to listen)".into());
        }
        Ok(())
    }
}

/// The host side of `qpnet run`: exactly one is given.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct HostArgs {
    /// The TAP interface: created if missing (and removed on exit), or an
    /// existing multi-queue TAP (`ip tuntap add dev NAME mode tap
    /// multi_queue vnet_hdr`). Its link is brought up; addresses are yours
    /// to assign. Needs CAP_NET_ADMIN (run as root).
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,
    /// UDP sockets instead of a TAP: one Ethernet frame per datagram, no
    /// header (QEMU's `-netdev dgram,local.type=inet,...,remote.type=inet`).
    /// Queue pair K binds LOCAL_IP:PORT+K and sends to REMOTE_IP:PORT+K.
    /// IPv6 as [::1]:PORT. Needs no privilege: with --runtime-dir and
    /// --socket in a directory you own, qpnet runs as any user.
    #[arg(long, value_name = "LOCAL_IP:PORT,REMOTE_IP:PORT", value_parser = crate::dgram::parse_udp)]
    pub udp: Option<crate::dgram::DgramSpec>,
    /// Unix datagram sockets instead of a TAP (QEMU's `-netdev
    /// dgram,local.type=unix,...`): qpnet binds LOCAL_PATH and connects to
    /// REMOTE_PATH, which must be bound already; with more than one queue
    /// pair, queue pair K uses LOCAL_PATH.K and REMOTE_PATH.K. Needs no
    /// privilege.
    #[arg(long, value_name = "LOCAL_PATH,REMOTE_PATH", value_parser = crate::dgram::parse_unix)]
    pub unix_dgram: Option<crate::dgram::DgramSpec>,
    /// A stream socket instead of a TAP: each frame behind its length as a
    /// 4-byte big-endian integer (QEMU's `-netdev stream`, passt's socket).
    /// qpnet connects to unix:PATH or tcp:HOST:PORT (or listens there with
    /// --stream-listen), one connection per queue pair: queue pair K uses
    /// PATH.K or PORT+K when there is more than one. A connection that ends
    /// is made again (back-off 50 ms to 2 s); meanwhile the guest's frames
    /// are dropped and counted. For passt (one connection) use one queue
    /// pair: `--stream unix:$(passt's socket)`. Needs no privilege.
    #[arg(long, value_name = "unix:PATH|tcp:HOST:PORT", value_parser = crate::stream::parse_stream)]
    pub stream: Option<crate::stream::StreamSpec>,
}

/// Options of `qpnet retry`.
#[derive(Args, Debug)]
pub struct RetryArgs {
    /// Instance name (as given to `qpnet run --name`).
    #[arg(long, value_name = "NAME", default_value = "qpnet")]
    pub name: String,
    /// Base directory for runtime files (default /run/qpnet as root, else
    /// $XDG_RUNTIME_DIR/qpnet, or /tmp/qpnet-UID without it).
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
}

/// Options of `qpnet worker` (set by the primary).
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The queue pair to serve.
    #[arg(long, value_name = "N")]
    pub queue_pair: u16,
    /// The inherited control socket (SOCK_SEQPACKET).
    #[arg(long, value_name = "FD", default_value_t = qpnet_ipc::WORKER_CONTROL_FD)]
    pub control_fd: i32,
    /// Become this user and group (numeric `UID:GID`) when giving up
    /// privileges at start (given by `qpnet run --worker-user`).
    #[arg(long, value_name = "UID:GID")]
    pub run_as: Option<qpnet_secondary::RunAs>,
}

/// Options of `qpnet stats`.
#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Instance name (as given to `qpnet run --name`).
    #[arg(long, value_name = "NAME", default_value = "qpnet")]
    pub name: String,
    /// Print JSON instead of a table.
    #[arg(long, conflicts_with = "prometheus")]
    pub json: bool,
    /// Print the Prometheus text exposition format instead of a table.
    #[arg(long)]
    pub prometheus: bool,
    /// Print again every SECS seconds (fractions allowed), with rates per
    /// second, until interrupted.
    #[arg(long, value_name = "SECS")]
    pub watch: Option<f64>,
    /// How many flows to list, largest first (0: none).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: usize,
    /// Base directory for runtime files (default /run/qpnet as root, else
    /// $XDG_RUNTIME_DIR/qpnet, or /tmp/qpnet-UID without it).
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
}

fn parse_queue_pairs(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if (1..=16).contains(&n) => Ok(n),
        _ => Err(format!(
            "queue pairs must be between 1 and 16 (1..=16), got {s:?}"
        )),
    }
}

fn parse_flow_capacity(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n.is_power_of_two() && (64..=(1 << 22)).contains(&n) => Ok(n),
        _ => Err(format!(
            "flow capacity must be a power of two from 64 to 4194304, got {s:?}"
        )),
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("{s:?} is not a MAC address like 52:54:00:12:34:56");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "{s:?} is a multicast address; a device needs a unicast MAC"
        ));
    }
    Ok(mac)
}

/// The default number of queue pairs: CPUs, capped at 16.
pub fn default_queue_pairs() -> u16 {
    std::thread::available_parallelism()
        .map(|n| n.get().min(16) as u16)
        .unwrap_or(1)
}

/// A locally administered MAC derived from the instance name.
pub fn mac_from_name(name: &str) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    [0x52, 0x54, 0x00, b[1], b[2], b[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_pairs_range() {
        assert_eq!(parse_queue_pairs("1"), Ok(1));
        assert_eq!(parse_queue_pairs("16"), Ok(16));
        assert!(parse_queue_pairs("0")
            .unwrap_err()
            .contains("between 1 and 16"));
        assert!(parse_queue_pairs("17").is_err());
        assert!(parse_queue_pairs("x").is_err());
    }

    #[test]
    fn macs() {
        assert_eq!(parse_mac("52:54:00:00:00:01"), Ok([0x52, 0x54, 0, 0, 0, 1]));
        assert!(parse_mac("01:00:00:00:00:00").is_err());
        assert!(parse_mac("52:54:00:00:00").is_err());
        assert!(parse_mac("zz:54:00:00:00:00").is_err());
        assert_eq!(mac_from_name("a")[0] & 1, 0);
    }
}
