//! `qpnet run`: check the environment, set up the instance (runtime
//! directory, TAP, shared region, workers, vhost-user socket), serve VMMs,
//! and clean up on SIGTERM/SIGINT.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use qpnet_secondary::RunAs;
use qpnet_shared::SharedRegion;

use crate::access::{self, Access};
use crate::backend::Backend;
use crate::cli::{self, RunArgs};
use crate::device::{Device, DeviceConfig};
use crate::dgram::{DgramSockets, Remotes};
use crate::frame_io::HostSide;
use crate::runtime::{self, RuntimeDir};
use crate::server::{self, Endpoint, Server};
use crate::stream::StreamLinks;
use crate::supervision::{Instance, Policy, ProcessLauncher, Supervisor, WorkerBinary};
use crate::tap::{self, Tap};
use crate::vhost_user::VhostUserDevice;

const CAP_NET_ADMIN: u32 = 12;

fn has_cap_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .map(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
        .unwrap_or(false)
}

/// Refuse a socket path that a live process listens on; remove a stale one.
fn check_socket_path(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "socket path {} exists and is not a socket: remove it or choose another --socket",
            path.display()
        );
    }
    if UnixStream::connect(path).is_ok() {
        bail!(
            "socket path {} is in use: a running process (another qpnet or a VMM) listens on it; stop it or choose another --socket",
            path.display()
        );
    }
    std::fs::remove_file(path)
        .with_context(|| format!("removing the stale socket {}", path.display()))
}

fn qemu_hint(args: &RunArgs, qp: u16) -> String {
    let chardev = if args.connect {
        format!(
            "socket,id=qpnet0,path={},server=on,wait=off",
            args.socket.display()
        )
    } else {
        format!(
            "socket,id=qpnet0,path={},reconnect=1",
            args.socket.display()
        )
    };
    let device = if qp > 1 {
        format!("virtio-net-pci,netdev=net0,mq=on,vectors={}", 2 * qp + 2)
    } else {
        "virtio-net-pci,netdev=net0".to_string()
    };
    format!(
        "attach a VM with:\n  qemu-system-x86_64 ... \\\n    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n    -chardev {chardev} \\\n    -netdev vhost-user,id=net0,chardev=qpnet0,queues={qp} \\\n    -device {device}"
    )
}

/// Run the primary until a termination signal.
pub fn run(args: RunArgs) -> Result<()> {
    runtime::validate_name(&args.name)?;
    if let Some(name) = &args.host.tap {
        tap::validate_name(name)?;
    }
    let run_as = worker_user(args.worker_user.as_deref())?;
    let socket_group = args
        .socket_group
        .as_deref()
        .map(access::group)
        .transpose()?;
    let access = Access {
        allow_uids: args.allow_uid.clone(),
    };
    let qp = args.queue_pairs.unwrap_or_else(cli::default_queue_pairs);
    if args.host.tap.is_some() && !has_cap_net_admin() {
        bail!("qpnet run --tap needs CAP_NET_ADMIN to open TAP queues: run it as root (e.g. with sudo), or use --udp or --unix-dgram, which need no privilege");
    }
    let base = args
        .runtime_dir
        .clone()
        .unwrap_or_else(runtime::default_base);
    let rundir = RuntimeDir::acquire(&base, &args.name)?;
    if !args.connect {
        check_socket_path(&args.socket)?;
    }
    // Resolved once: workers are exec'd by this path, so they are `qpnet`
    // to the system like the primary.
    let binary = WorkerBinary::resolve()?;
    let signals = server::block_signals()?;
    // While it still may (CAP_SYSLOG): to name a worker's forbidden call.
    crate::kernel_log::open();
    let host = open_host(&args, qp)?;
    let shared = SharedRegion::create_with(
        &runtime::shm_path(rundir.path()),
        qp as usize,
        args.flow_capacity as usize,
    )
    .context("creating the shared region")?;
    shared.header().flow.tracking.store(
        if args.no_flow_tracking {
            qpnet_shared::TRACKING_OFF
        } else {
            qpnet_shared::TRACKING_ON
        },
        std::sync::atomic::Ordering::Relaxed,
    );
    let endpoint = if args.connect {
        Endpoint::Connect(args.socket.clone())
    } else {
        // Before the first accept: nobody else can have been served.
        let l = access::bind_restricted(&args.socket, socket_group)?;
        Endpoint::Listen(l, args.socket.clone())
    };
    log::info!(
        "instance {:?}: {}, {qp} queue pair(s), socket {}, runtime {}",
        args.name,
        describe_host(&args, &host, qp),
        args.socket.display(),
        rundir.path().display()
    );
    let device = Device::new(DeviceConfig {
        queue_pairs: qp,
        mac: args.mac.unwrap_or_else(|| cli::mac_from_name(&args.name)),
        offered: host.offered_features(),
    });
    let policy = Policy {
        watchdog: (args.watchdog_ms > 0)
            .then(|| std::time::Duration::from_millis(args.watchdog_ms)),
        crash_limit: args.crash_limit,
        crash_window: std::time::Duration::from_secs(args.crash_window_secs.max(1)),
    };
    let supervisor = Supervisor::new(Instance {
        host,
        shared,
        launcher: Box::new(ProcessLauncher::new(binary, run_as)),
        policy,
        flow_tracking: !args.no_flow_tracking,
    });
    let mut backend = Backend::new(device, supervisor);
    // Set up: keep only what supervising workers needs (and they start with
    // no more than that before they drop it all).
    qpnet_secondary::keep_only_capabilities(qpnet_secondary::PRIMARY_CAPABILITIES)
        .context("dropping the primary's capabilities after set-up")?;
    crate::seccomp::install()?;
    // Every queue pair's first worker, before any VMM is served.
    let (sup, dev) = backend.supervision();
    sup.supervise(dev);
    eprintln!("{}", qemu_hint(&args, qp));
    if let Some(spec) = &args.host.stream {
        eprintln!("a QEMU peer on the other end of queue pair K (one netdev per queue pair):");
        for k in 0..qp {
            if let Ok(line) = spec.qemu_peer(k, qp, args.stream_listen) {
                eprintln!("  {line}");
            }
        }
    }
    if let Some(spec) = args.host.udp.as_ref().or(args.host.unix_dgram.as_ref()) {
        let remotes = remotes(&args);
        let peers = match remotes {
            Remotes::PerQueuePair => {
                eprintln!(
                    "a QEMU peer on the other end of queue pair K (one netdev per queue pair):"
                );
                qp
            }
            Remotes::Single => {
                eprintln!("a QEMU peer on the other end of every queue pair (--single-peer):");
                1
            }
        };
        for k in 0..peers {
            if let Ok(line) = spec.qemu_peer(k, qp, remotes) {
                eprintln!("  {line}");
            }
        }
    }
    let dev = Arc::new(Mutex::new(VhostUserDevice {
        backend,
        reply_lost: false,
    }));
    let mut server = Server::new(endpoint, access, dev.clone(), signals);
    let exit = server.serve();
    log::info!("shutting down ({exit:?})");
    dev.lock()
        .unwrap_or_else(|p| p.into_inner())
        .backend
        .supervision()
        .0
        .shutdown();
    if server.owns_socket() {
        let _ = std::fs::remove_file(server.socket_path());
    }
    drop(rundir);
    exit.map(|_| ())
}

/// Open the host side the options name: the TAP's queues or one datagram
/// socket per queue pair.
fn open_host(args: &RunArgs, qp: u16) -> Result<HostSide> {
    let h = &args.host;
    if let Some(name) = &h.tap {
        return Ok(HostSide::Tap(Tap::open(name, qp as usize)?));
    }
    if let Some(spec) = &h.stream {
        let links = StreamLinks::open(spec, args.stream_listen, qp)
            .context("setting up the stream sockets")?;
        return Ok(HostSide::Stream(links));
    }
    let spec = h
        .udp
        .as_ref()
        .or(h.unix_dgram.as_ref())
        .context("no --tap, --udp, --unix-dgram or --stream")?;
    let sockets =
        DgramSockets::open(spec, qp, remotes(args)).context("opening the datagram sockets")?;
    Ok(HostSide::Datagram(sockets))
}

/// The datagram backend's remote layout (`--single-peer`).
fn remotes(args: &RunArgs) -> Remotes {
    if args.single_peer {
        Remotes::Single
    } else {
        Remotes::PerQueuePair
    }
}

fn describe_host(args: &RunArgs, host: &HostSide, qp: u16) -> String {
    match (
        host,
        args.host.udp.as_ref().or(args.host.unix_dgram.as_ref()),
    ) {
        (HostSide::Tap(t), _) => format!(
            "TAP {} ({})",
            t.name(),
            if t.created() { "created" } else { "existing" }
        ),
        (HostSide::Datagram(_), Some(spec)) => spec.describe(qp, remotes(args)),
        (HostSide::Datagram(_), None) => "datagram sockets".to_string(),
        (HostSide::Stream(s), _) => s.spec().describe(qp, s.listens()),
    }
}

/// `qpnet retry`: signal the primary of instance `name` (SIGUSR1) to retry
/// its failed queue pairs.
pub fn retry(args: crate::cli::RetryArgs) -> Result<()> {
    runtime::validate_name(&args.name)?;
    let base = args
        .runtime_dir
        .clone()
        .unwrap_or_else(runtime::default_base);
    let dir = runtime::instance_dir(&base, &args.name);
    let pid = runtime::running_pid(&dir)
        .with_context(|| format!("no qpnet instance {:?} is running", args.name))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .with_context(|| format!("signalling qpnet primary {pid}"))?;
    println!(
        "asked qpnet {:?} (pid {pid}) to retry its failed queue pairs",
        args.name
    );
    Ok(())
}

/// The user workers become: `name`, or `nobody` when qpnet runs as root and
/// no name is given, or none (they stay the user qpnet runs as).
fn worker_user(name: Option<&str>) -> Result<Option<RunAs>> {
    let name = match name {
        Some(n) => n,
        None if nix::unistd::Uid::effective().is_root() => "nobody",
        None => return Ok(None),
    };
    let user = nix::unistd::User::from_name(name)
        .with_context(|| format!("looking up --worker-user {name}"))?
        .with_context(|| format!("--worker-user {name}: no such user"))?;
    Ok(Some(RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }))
}
