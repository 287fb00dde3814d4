//! qpnet-sockpeer: the far end of qpnet's socket backends for the benchmark
//! (`scripts/bench/dpdk-bench.sh --backends qpnet-udp,...`).
//!
//! `sink` receives what qpnet sends (guest->host) and counts whole frames;
//! `source` sends frames toward qpnet as fast as qpnet takes them
//! (host->guest). Both are given qpnet's own `--udp`, `--unix-dgram` or
//! `--stream` value and take the other side of every queue pair: the peer
//! binds qpnet's REMOTE (PORT+K, PATH.K) or listens where qpnet connects.
//! Datagrams move with `recvmmsg`/`sendmmsg` in batches, stream bytes in
//! large reads and writes, one thread per queue pair, so the peer costs few
//! system calls per frame.
//!
//! It prints `ready` once every socket is bound or listening (start qpnet
//! then), starts sending on SIGUSR2 (source), prints a `stats` line of its
//! counters on SIGUSR1 and a last one on SIGTERM or SIGINT, then exits.

mod counters;
mod dgram;
mod frames;
mod spec;
mod stream;

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use counters::Counters;
use spec::{Endpoint, Spec};

#[derive(Parser)]
#[command(
    name = "qpnet-sockpeer",
    about = "The far end of qpnet's socket backends, for benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Receive and count what qpnet sends.
    Sink(Common),
    /// Send frames toward qpnet as fast as it takes them (after SIGUSR2).
    Source {
        #[command(flatten)]
        common: Common,
        /// Frame size in bytes, a whole Ethernet frame without FCS (60..1514).
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
}

#[derive(Args)]
struct Common {
    /// qpnet's `--udp LOCAL_IP:PORT,REMOTE_IP:PORT`, as given to it.
    #[arg(long, value_name = "LOCAL,REMOTE")]
    qpnet_udp: Option<String>,
    /// qpnet's `--unix-dgram LOCAL_PATH,REMOTE_PATH`, as given to it.
    #[arg(long, value_name = "LOCAL,REMOTE")]
    qpnet_unix_dgram: Option<String>,
    /// qpnet's `--stream unix:PATH` (qpnet connects; we listen).
    #[arg(long, value_name = "unix:PATH")]
    qpnet_stream: Option<String>,
    /// qpnet's `--queue-pairs`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    queue_pairs: u16,
    /// Frames per `recvmmsg`/`sendmmsg` (or per stream write).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    batch: u16,
    /// Sink: after a receive that found less than a full batch (or half a
    /// stream chunk), sleep this long before the next, so that frames
    /// collect and one call takes many (0: never sleep).
    #[arg(long, default_value_t = 50)]
    coalesce_us: u64,
}

impl Common {
    fn spec(&self) -> Result<Spec> {
        match (&self.qpnet_udp, &self.qpnet_unix_dgram, &self.qpnet_stream) {
            (Some(v), None, None) => Spec::udp(v),
            (None, Some(v), None) => Spec::unix_dgram(v),
            (None, None, Some(v)) => Spec::stream(v),
            _ => bail!("give exactly one of --qpnet-udp, --qpnet-unix-dgram, --qpnet-stream"),
        }
    }
}

/// A queue pair's socket, bound or listening, before its thread runs.
enum Opened {
    Dgram(dgram::Opened),
    Stream(OwnedFd),
}

fn open(ep: &Endpoint) -> Result<Opened> {
    Ok(match ep {
        Endpoint::Stream { listen } => Opened::Stream(stream::listen(listen)?),
        _ => Opened::Dgram(dgram::open(ep)?),
    })
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("qpnet-sockpeer: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let (common, size) = match &cli.role {
        Role::Sink(c) => (c, None),
        Role::Source { common, size } => {
            if !(frames::MIN_FRAME..=frames::MAX_FRAME).contains(size) {
                bail!(
                    "--size must be {}..{}",
                    frames::MIN_FRAME,
                    frames::MAX_FRAME
                );
            }
            (common, Some(*size))
        }
    };
    let spec = common.spec()?;
    let n = usize::from(common.queue_pairs);
    let batch = usize::from(common.batch);
    let coalesce = std::time::Duration::from_micros(common.coalesce_us);

    // Blocked before any thread starts, so only the signalfd sees them.
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGTERM,
        Signal::SIGINT,
    ] {
        mask.add(s);
    }
    mask.thread_block().context("blocking signals")?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC).context("signalfd")?;

    let all: Arc<Vec<Counters>> = Arc::new((0..n).map(|_| Counters::default()).collect());
    let mut opened = Vec::with_capacity(n);
    for k in 0..n {
        let ep = spec.endpoint(k, n)?;
        opened.push((
            open(&ep).with_context(|| format!("queue pair {k}: {ep:?}"))?,
            ep,
        ));
    }
    for (k, (sock, ep)) in opened.into_iter().enumerate() {
        let all = Arc::clone(&all);
        std::thread::Builder::new()
            .name(format!("qp{k}"))
            .spawn(move || {
                let c = &all[k];
                let r = match (sock, size) {
                    (Opened::Dgram(s), None) => dgram::sink(s, &ep, c, batch, coalesce),
                    (Opened::Dgram(s), Some(size)) => dgram::source(s, &ep, c, batch, size),
                    (Opened::Stream(l), None) => stream::sink(l, c, coalesce),
                    (Opened::Stream(l), Some(size)) => stream::source(l, c, batch, size),
                };
                if let Err(e) = r {
                    eprintln!("qpnet-sockpeer: queue pair {k}: {e:#}");
                    std::process::exit(1);
                }
            })
            .context("spawning a thread")?;
    }
    println!("ready");

    let mut seq = 0;
    loop {
        let Some(info) = sfd.read_signal().context("reading the signalfd")? else {
            continue;
        };
        let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
        if signo == libc::SIGUSR2 {
            counters::GO.store(true, Relaxed);
            continue;
        }
        seq += 1;
        println!("{}", counters::line(seq, &all));
        if signo != libc::SIGUSR1 {
            std::process::exit(0);
        }
    }
}
