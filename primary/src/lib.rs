//! The primary and the `qpnet` command line: one executable for the primary
//! (`run`), its workers (`worker`, started by the primary with fork+exec of
//! this same file), the `stats` reader and `retry`. The binary (`main.rs`)
//! only calls [`main`]; being a library lets the fuzz targets and their
//! replay test reach the vhost-user request handling (`fuzz`, with the
//! `fuzzing` feature).

mod access;
mod backend;
mod cli;
mod device;
mod dgram;
mod features;
mod frame_io;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;
mod kernel_log;
mod logging;
mod memory_table;
mod reply_guard;
mod run;
mod runtime;
mod seccomp;
mod server;
mod stats;
mod stream;
mod supervision;
mod tap;
mod vhost_user;

use std::os::fd::{FromRawFd, OwnedFd};

use clap::Parser;
use cli::{Cli, Command};

/// The `qpnet` command: parse the command line, run it, exit with its code.
pub fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => {
            if let Err(e) = args.check_usage() {
                eprintln!("error: {e}\n\nFor more information, try 'qpnet run --help'.");
                std::process::exit(2);
            }
            logging::init("primary");
            match run::run(args) {
                Ok(()) => 0,
                Err(e) => {
                    log::error!("{e:#}");
                    eprintln!("qpnet run: error: {e:#}");
                    1
                }
            }
        }
        Command::Worker(args) => {
            logging::init(&format!("worker {}", args.queue_pair));
            if args.control_fd < 3 {
                eprintln!("qpnet worker: --control-fd must be an inherited fd >= 3 (qpnet worker is started by qpnet run)");
                std::process::exit(2);
            }
            // SAFETY: the primary placed our control socket at this fd before
            // exec; nothing else in this process owns it. Channel::from_fd
            // checks that it is a SOCK_SEQPACKET socket.
            let fd = unsafe { OwnedFd::from_raw_fd(args.control_fd) };
            match qpnet_secondary::run_worker(args.queue_pair, fd, args.run_as) {
                Ok(()) => 0,
                Err(e) => {
                    log::error!("{e:#}");
                    1
                }
            }
        }
        Command::Retry(args) => match run::retry(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("qpnet retry: error: {e:#}");
                stats::EXIT_NO_INSTANCE
            }
        },
        Command::Stats(args) => match stats::stats(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("qpnet stats: error: {e:#}");
                1
            }
        },
    };
    std::process::exit(code);
}
