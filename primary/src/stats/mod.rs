//! `qpnet stats`: attach to a running instance's shared region read-only and
//! print its per-queue counters, worker state, flow table figures and top
//! flows, as a table, JSON (`--json`) or the Prometheus text exposition
//! format (`--prometheus`), once or every `--watch SECS` with rates.
//!
//! It never takes a lock and never writes to the region, so a worker is never
//! made to wait and a worker killed at any instant cannot stall it. What it
//! reads is untrusted (another build, a dying process, corruption):
//! out-of-range values are shown as such ("invalid(7)", "-"), never as
//! something plausible.
//!
//! This file is the command: arguments, exit codes, dispatch.
//! [`instance`] finds and attaches the region, [`snapshot`] reads it,
//! [`table`], [`json`] and [`prometheus`] print it, [`watch`] repeats it
//! with rates.
//!
//! Exit codes, for scripts: 0 printed; 1 error (I/O, permission); 2 bad
//! arguments; 3 no such instance is running (no region, or one left behind
//! by a primary that is gone); 4 the region cannot be read by this qpnet
//! (another layout version, or not a qpnet region).

mod instance;
mod json;
mod prometheus;
mod snapshot;
mod table;
mod watch;

use std::io::Write;

use anyhow::{Context, Result};

use crate::cli::StatsArgs;
use crate::runtime;
use instance::Target;
use snapshot::Snapshot;
use watch::View;

/// Exit code for arguments that make no sense (as clap's).
pub const EXIT_USAGE: i32 = 2;
/// Exit code when no instance of that name runs.
pub const EXIT_NO_INSTANCE: i32 = 3;
/// Exit code when the region's layout is not ours.
pub const EXIT_INCOMPATIBLE: i32 = 4;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Table,
    Json,
    Prometheus,
}

impl Format {
    fn of(args: &StatsArgs) -> Format {
        if args.json {
            Format::Json
        } else if args.prometheus {
            Format::Prometheus
        } else {
            Format::Table
        }
    }
}

fn render(format: Format, v: &View, watching: bool) -> Result<String> {
    Ok(match format {
        Format::Table => table::render_table(v),
        Format::Prometheus => prometheus::render_prometheus(v),
        // One document per line while watching (NDJSON), pretty otherwise.
        Format::Json if watching => serde_json::to_string(&json::render_json(v))? + "\n",
        Format::Json => serde_json::to_string_pretty(&json::render_json(v))? + "\n",
    })
}

/// Write `text` to stdout; `false` when the reader went away (a closed
/// pipe ends the command quietly).
fn emit(text: &str) -> Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

/// Print the stats; returns the process exit code.
pub fn stats(args: StatsArgs) -> Result<i32> {
    runtime::validate_name(&args.name)?;
    let interval = match watch::watch_interval(&args) {
        Ok(i) => i,
        Err(msg) => {
            eprintln!("qpnet stats: {msg}");
            return Ok(EXIT_USAGE);
        }
    };
    let target = Target::new(&args);
    let inst = match target.attach()? {
        Ok(i) => i,
        Err(r) => {
            let (code, msg) = r.exit();
            eprintln!("qpnet stats: {msg}");
            return Ok(code);
        }
    };
    let format = Format::of(&args);
    match interval {
        None => {
            let snap = Snapshot::take(&inst.region, args.top, false);
            let view = View {
                name: &args.name,
                cur: &snap,
                prev: None,
            };
            emit(&render(format, &view, false)?)?;
            Ok(0)
        }
        Some(every) => watch::watch(&args, &target, inst, format, every),
    }
}
