//! How long each worker, the load's own threads and the kernel's softirq
//! threads spent runnable but waiting for a CPU (`schedstat`, second
//! field), sampled every millisecond while a crash test runs. A stall is
//! charged to the machine only for the CPU wait, inside that very stall, of
//! the threads a frame passes through ([`CpuWaits::during_tx`],
//! [`CpuWaits::during_rx`]) and for the time the hypervisor stole from the
//! virtual CPUs, never for wait measured around it.
//!
//! The sampler keeps each `/proc` file open and re-reads it with `pread`,
//! one system call per file and sample, so it costs the 2-CPU machine
//! little.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::realtime_ns;

/// How often the sampler reads every worker's CPU wait.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(1);

/// One reading: cumulative CPU wait at a time (realtime ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    at_ns: u64,
    wait_ns: u64,
}

/// The threads of the test's load a frame passes through.
#[derive(Debug, Clone, Copy)]
pub struct LoadThreads {
    /// Pushes TX frames (and kicks), reaps RX frames.
    pub driver: u32,
    /// Sends RX frames into the TAP.
    pub sender: u32,
}

/// The samples of one run.
#[derive(Debug, Default, Clone)]
pub struct CpuWaits {
    /// `[queue]`: the samples of each worker that served it, in order.
    workers: Vec<Vec<Vec<Sample>>>,
    driver: Vec<Sample>,
    sender: Vec<Sample>,
    /// Each `ksoftirqd` thread (packets a CPU could not process at once).
    softirq: Vec<Vec<Sample>>,
    /// `[cpu]`: time the hypervisor ran something else on this virtual CPU
    /// (`/proc/stat` steal, in 10 ms steps): time no thread here could run.
    steal: Vec<Vec<Sample>>,
}

impl CpuWaits {
    /// CPU wait on a TX frame's path between `start` and `end` (realtime
    /// ns): queue pair `q`'s workers, the driver, the softirq threads; from
    /// the samples inside that interval only, so never more than the wait
    /// that happened in it.
    pub fn during_tx(&self, q: usize, start: u64, end: u64) -> u64 {
        let workers: u64 = self
            .workers
            .get(q)
            .map_or(0, |ws| ws.iter().map(|s| within(s, start, end)).sum());
        let softirq: u64 = self.softirq.iter().map(|s| within(s, start, end)).sum();
        // The stalled thread ran on one CPU, which one is not known: the
        // CPU stolen from most.
        let steal = self
            .steal
            .iter()
            .map(|s| within(s, start, end))
            .max()
            .unwrap_or(0);
        workers + softirq + steal + within(&self.driver, start, end)
    }

    /// [`CpuWaits::during_tx`] plus the RX sender thread.
    pub fn during_rx(&self, q: usize, start: u64, end: u64) -> u64 {
        self.during_tx(q, start, end) + within(&self.sender, start, end)
    }

    /// Samples taken of the driver thread (0: nothing was sampled).
    pub fn samples(&self) -> usize {
        self.driver.len()
    }
}

/// Growth of a cumulative counter over the samples within `[start, end]`.
fn within(s: &[Sample], start: u64, end: u64) -> u64 {
    let from = s.partition_point(|x| x.at_ns < start);
    let to = s.partition_point(|x| x.at_ns <= end);
    if to <= from + 1 {
        return 0;
    }
    s[to - 1].wait_ns.saturating_sub(s[from].wait_ns)
}

/// An open `/proc` file read again and again from offset 0.
struct ProcFile {
    file: File,
    buf: Vec<u8>,
}

impl ProcFile {
    fn open(path: &str) -> Option<ProcFile> {
        Some(ProcFile {
            file: File::open(path).ok()?,
            buf: vec![0; 4096],
        })
    }

    fn read(&mut self) -> Option<&str> {
        let n = self.file.read_at(&mut self.buf, 0).ok()?;
        std::str::from_utf8(&self.buf[..n]).ok()
    }

    /// The second field of a `schedstat` file.
    fn run_delay(&mut self) -> Option<u64> {
        self.read()?.split_whitespace().nth(1)?.parse().ok()
    }
}

/// A worker being sampled.
struct Watched {
    queue: usize,
    schedstat: ProcFile,
    samples: Vec<Sample>,
}

/// The queue pair a worker serves, from its command line
/// (`qpnet worker --queue-pair N ...`); `None` for any other child.
fn queue_of(pid: u32) -> Option<usize> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|&b| b == 0);
    args.by_ref().find(|a| *a == b"--queue-pair")?;
    std::str::from_utf8(args.next()?).ok()?.parse().ok()
}

/// The `ksoftirqd/N` kernel threads' `schedstat` files.
fn softirq_threads() -> Vec<ProcFile> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let path = e.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?;
            comm.starts_with("ksoftirqd/")
                .then(|| ProcFile::open(&format!("{}/schedstat", path.display())))?
        })
        .collect()
}

/// Per CPU, its steal time so far (ns), from `/proc/stat`'s `cpuN` lines.
fn steal_per_cpu(stat: &mut ProcFile) -> Vec<u64> {
    let tick_ns = 1_000_000_000
        / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100)
            .max(1) as u64;
    let Some(text) = stat.read() else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .filter_map(|l| l.split_whitespace().nth(8)?.parse::<u64>().ok())
        .map(|ticks| ticks * tick_ns)
        .collect()
}

fn thread_schedstat(tid: u32) -> Result<ProcFile> {
    let path = format!("/proc/self/task/{tid}/schedstat");
    ProcFile::open(&path).with_context(|| format!("open {path} (needs CONFIG_SCHED_INFO)"))
}

/// Sample the CPU wait of every worker of `primary`, of the load's
/// `threads` and of the softirq threads every [`SAMPLE_EVERY`] until
/// `stop`.
pub fn sample_until(primary: u32, threads: LoadThreads, stop: &AtomicBool) -> Result<CpuWaits> {
    let children_path = format!("/proc/{primary}/task/{primary}/children");
    let mut children = ProcFile::open(&children_path)
        .with_context(|| format!("open {children_path} (needs CONFIG_PROC_CHILDREN)"))?;
    let mut driver = thread_schedstat(threads.driver)?;
    let mut sender = thread_schedstat(threads.sender)?;
    let mut softirq = softirq_threads();
    let mut stat = ProcFile::open("/proc/stat").context("open /proc/stat")?;
    stat.buf.resize(64 * 1024, 0);
    let mut watched: HashMap<u32, Watched> = HashMap::new();
    let mut gone: Vec<Watched> = Vec::new();
    let mut out = CpuWaits::default();
    let mut next = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let pids: Vec<u32> = children
            .read()
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        for &pid in &pids {
            if watched.contains_key(&pid) {
                continue;
            }
            let opened = queue_of(pid).and_then(|queue| {
                let schedstat = ProcFile::open(&format!("/proc/{pid}/schedstat"))?;
                Some(Watched {
                    queue,
                    schedstat,
                    samples: Vec::new(),
                })
            });
            if let Some(w) = opened {
                watched.insert(pid, w);
            }
        }
        let ended: Vec<u32> = watched
            .keys()
            .copied()
            .filter(|p| !pids.contains(p))
            .collect();
        gone.extend(ended.iter().filter_map(|p| watched.remove(p)));
        let at_ns = realtime_ns();
        for w in watched.values_mut() {
            if let Some(wait_ns) = w.schedstat.run_delay() {
                w.samples.push(Sample { at_ns, wait_ns });
            }
        }
        if let Some(wait_ns) = driver.run_delay() {
            out.driver.push(Sample { at_ns, wait_ns });
        }
        if let Some(wait_ns) = sender.run_delay() {
            out.sender.push(Sample { at_ns, wait_ns });
        }
        let steal = steal_per_cpu(&mut stat);
        out.steal.resize(steal.len(), Vec::new());
        for (wait_ns, samples) in steal.into_iter().zip(&mut out.steal) {
            samples.push(Sample { at_ns, wait_ns });
        }
        out.softirq.resize(softirq.len(), Vec::new());
        for (f, samples) in softirq.iter_mut().zip(&mut out.softirq) {
            if let Some(wait_ns) = f.run_delay() {
                samples.push(Sample { at_ns, wait_ns });
            }
        }
        next += SAMPLE_EVERY;
        let now = Instant::now();
        if next < now {
            next = now;
        }
        std::thread::sleep(next - now);
    }
    for w in gone.into_iter().chain(watched.into_values()) {
        if out.workers.len() <= w.queue {
            out.workers.resize(w.queue + 1, Vec::new());
        }
        out.workers[w.queue].push(w.samples);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at_ns: u64, wait_ns: u64) -> Sample {
        Sample { at_ns, wait_ns }
    }

    #[test]
    fn only_the_wait_inside_the_interval_counts() {
        let samples = [s(0, 0), s(10, 5), s(20, 9), s(30, 30), s(40, 31)];
        // Samples at 10 and 20 lie in [8, 25]: 4 ns of wait between them;
        // the 21 ns after 20 fall outside even though they end at 30.
        assert_eq!(within(&samples, 8, 25), 4);
        assert_eq!(within(&samples, 0, 40), 31);
        // One sample or none in the interval: nothing can be charged.
        assert_eq!(within(&samples, 11, 25), 0);
        assert_eq!(within(&samples, 41, 50), 0);
    }

    #[test]
    fn a_queue_sums_the_threads_on_its_path() {
        let w = CpuWaits {
            workers: vec![
                vec![],
                vec![vec![s(0, 0), s(10, 3)], vec![s(10, 100), s(20, 104)]],
            ],
            driver: vec![s(0, 0), s(20, 2)],
            sender: vec![s(0, 0), s(20, 50)],
            softirq: vec![vec![s(0, 0), s(20, 7)]],
            steal: vec![vec![s(0, 0), s(20, 10)], vec![s(0, 0), s(20, 20)]],
        };
        // Steal: the CPU stolen from most (20), not both.
        assert_eq!(w.during_tx(1, 0, 20), 3 + 4 + 2 + 7 + 20);
        assert_eq!(w.during_rx(1, 0, 20), 3 + 4 + 2 + 7 + 20 + 50);
        assert_eq!(w.during_tx(0, 0, 20), 2 + 7 + 20);
        assert_eq!(w.during_tx(7, 0, 20), 2 + 7 + 20);
    }

    #[test]
    fn the_sampler_reads_this_process_as_its_own_driver() {
        let stop = AtomicBool::new(false);
        let tid = nix::unistd::gettid().as_raw() as u32;
        let threads = LoadThreads {
            driver: tid,
            sender: tid,
        };
        let waits = std::thread::scope(|sc| {
            let h = sc.spawn(|| sample_until(std::process::id(), threads, &stop));
            std::thread::sleep(Duration::from_millis(30));
            stop.store(true, Ordering::Release);
            h.join().expect("sampler panicked")
        })
        .expect("sampler failed");
        assert!(waits.samples() >= 5, "{} samples in 30 ms", waits.samples());
        assert!(!waits.steal.is_empty(), "no CPU in /proc/stat");
    }
}
