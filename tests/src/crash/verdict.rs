//! The verdict on a crash run: every kill held to the acceptance
//! ([`check_kills`]: its queue pair forwards again within the limit, the
//! others never stall past theirs, RX loss bounded by what can be in
//! flight), and the distribution table every test prints ([`report`]).

use anyhow::{bail, Result};

use super::analysis::WorstStall;
use super::{ms, summarize, Analysis, KillEvent, KillOutcome};

/// The limit from a kill to the queue pair forwarding again.
pub const RECOVERY_LIMIT_NS: u64 = 100_000_000;
/// The median recovery (TX and RX) of a run of at least
/// [`MEDIAN_MIN_KILLS`] kills: the README's "within milliseconds"
/// (measured: about 3 ms).
pub const MEDIAN_RECOVERY_LIMIT_NS: u64 = 20_000_000;
/// Kills a run needs before its medians are held to a limit.
pub const MEDIAN_MIN_KILLS: usize = 10;
/// The limit on a stall of the queue pairs not killed.
pub const OTHERS_STALL_LIMIT_NS: u64 = 10_000_000;
/// A stall over [`OTHERS_STALL_LIMIT_NS`] is excused only if the excess is
/// no more than this and the stalled worker (or the test's driver thread)
/// spent at least the excess waiting for a CPU inside the stall itself.
pub const EXCUSE_CAP_NS: u64 = 5_000_000;
/// This share of the kills (rounded up) may have another queue pair stalled
/// over the limit (and under [`STALL_HARD_LIMIT_NS`]); more only as far as
/// twice the machine's own rate of such stalls away from kills predicts.
/// Every such kill is printed, `EXCUSED` when CPU wait inside the stall
/// covers its excess, else `OVER THE LIMIT`.
pub const LONG_SHARE_PERCENT: usize = 3;
/// No other queue pair may ever stall this long after a kill.
pub const STALL_HARD_LIMIT_NS: u64 = 50_000_000;
/// Long stalls per queue-pair-direction second away from kills
/// above which a run cannot judge isolation (and fails).
pub const NOISE_RATE_LIMIT: f64 = 1.0;
/// The limit for replacing a wedged worker (watchdog 1 s).
pub const WEDGED_LIMIT_NS: u64 = 2_000_000_000;
/// How long after a kill the other queue pairs are watched.
pub const KILL_WINDOW_NS: u64 = 100_000_000;
/// RX frames a dead worker can have read and not yet published: qpnet
/// publishes the used index after the frame that brings 64 completed chains
/// (ring.rs PUBLISH_EVERY), so at most 63 completed frames + 1 being read.
pub const RX_IN_FLIGHT_MAX: u64 = 64;

/// How many values, their median, 99th percentile and maximum.
type Summary = (usize, u64, u64, u64);

/// Print the distribution table of a run; return its lines too.
pub fn report(title: &str, a: &Analysis, kills: &[KillEvent]) -> String {
    let col = |f: &dyn Fn(&KillOutcome) -> Option<u64>| {
        let v: Vec<u64> = a.kills.iter().filter_map(f).collect();
        let (m, p99, max) = summarize(&v);
        (v.len(), m, p99, max)
    };
    let mut out = format!(
        "{title}: {} kills\n{:<48} {:>6} {:>9} {:>9} {:>9}\n",
        kills.len(),
        "metric (ms)",
        "n",
        "median",
        "p99",
        "max"
    );
    let rows: [(&str, Summary); 8] = [
        (
            "recovery: kill -> first new TX frame on the TAP",
            col(&|k| k.recovery_ns),
        ),
        ("replacement pid seen in the stats", col(&|k| k.replaced_ns)),
        (
            "of which primary + new worker waited for a CPU",
            col(&|k| k.runq_wait_ns),
        ),
        (
            "RX recovery: kill -> first new RX frame reaped",
            col(&|k| k.rx_recovery_ns),
        ),
        (
            "other queue pairs' worst TX stall, 100 ms after",
            col(&|k| Some(k.others_tx.ns)),
        ),
        (
            "other queue pairs' worst RX stall, 100 ms after",
            col(&|k| Some(k.others_rx.ns)),
        ),
        (
            "of which that worker + driver waited for a CPU",
            col(&|k| Some(k.others_worst().cpu_wait_ns)),
        ),
        (
            "same, 50 ms before the kill (baseline)",
            col(&|k| Some(k.others_stall_before_ns)),
        ),
    ];
    for (name, (n, m, p99, max)) in rows.into_iter().filter(|(_, (n, ..))| *n > 0) {
        out += &format!(
            "{name:<48} {n:>6} {:>9} {:>9} {:>9}\n",
            ms(m),
            ms(p99),
            ms(max)
        );
    }
    let inflight: Vec<u64> = a.kills.iter().map(|k| k.tx_in_flight).collect();
    let (im, ip, imax) = summarize(&inflight);
    let rx_lost: Vec<u64> = a.kills.iter().map(|k| k.rx_lost).collect();
    let (_, rp, rmax) = summarize(&rx_lost);
    let rx_held: Vec<u64> = a.kills.iter().map(|k| k.rx_in_flight).collect();
    let (hm, _, hmax) = summarize(&rx_held);
    out += &format!(
        "TX chains in flight at a kill: median {im}, p99 {ip}, max {imax}; TX duplicates {} \
         ({} distinct TX frames)\nRX frames lost {} (p99 {rp}, max {rmax} per kill) of {} \
         sent, {} received; RX frames in flight at a kill: median {hm}, max {hmax}\nworst \
         stall of any queue pair away from kills: {} ms\n",
        a.tx_dups,
        a.tx_frames,
        a.rx_lost,
        a.rx_sent,
        a.rx_frames,
        ms(a.quiet_stall_ns),
    );
    let over_rec = a
        .kills
        .iter()
        .filter(|k| k.recovery_ns.is_none_or(|r| r > RECOVERY_LIMIT_NS))
        .count();
    let over_stall = a
        .kills
        .iter()
        .filter(|k| k.others_worst().ns > OTHERS_STALL_LIMIT_NS)
        .count();
    out += &format!(
        "kills over the 100 ms recovery limit: {over_rec}; kills with another queue pair \
         stalled > 10 ms: {over_stall}\n{}\n",
        Noise::of(a)
    );
    let mut slow: Vec<(usize, &KillOutcome)> = a.kills.iter().enumerate().collect();
    slow.sort_by_key(|(_, k)| std::cmp::Reverse(k.recovery_ns.unwrap_or(u64::MAX)));
    for (i, k) in slow.iter().take(5) {
        out += &format!(
            "  slow kill {i}: recovery {} ms, of which waiting for a CPU {} ms\n",
            k.recovery_ns.map_or("never".into(), ms),
            k.runq_wait_ns.map_or("?".into(), ms)
        );
    }
    eprintln!("{out}");
    out
}

/// The per-kill acceptance of the issue, for every kill, and the run's
/// medians when it has at least [`MEDIAN_MIN_KILLS`] kills.
pub fn check_kills(a: &Analysis, kills: &[KillEvent], recovery_limit_ns: u64) -> Result<()> {
    let mut failures = Vec::new();
    if !a.problems.is_empty() {
        failures.push(format!("broken invariants: {:#?}", a.problems));
    }
    if !a.rx_silent_queues.is_empty() {
        failures.push(format!(
            "no RX test frame arrived on queue pairs {:?} ({} sent): their RX recovery cannot \
             be checked",
            a.rx_silent_queues, a.rx_sent
        ));
    }
    let mut long = Vec::new();
    for (k, (o, ev)) in a.kills.iter().zip(kills).enumerate() {
        let what = format!(
            "kill {k} ({} of queue pair {} pid {})",
            ev.signal, ev.queue, ev.pid
        );
        let mut recovery = |dir: &str, r: Option<u64>| match r {
            None => failures.push(format!(
                "{what}: its queue pair never forwarded {dir} again"
            )),
            Some(r) if r > recovery_limit_ns => failures.push(format!(
                "{what}: forwarded {dir} again after {} ms (limit {} ms)",
                ms(r),
                ms(recovery_limit_ns)
            )),
            _ => {}
        };
        recovery("TX", o.recovery_ns);
        if a.rx_sent > 0 {
            recovery("RX", o.rx_recovery_ns);
        }
        judge_others(&what, o, &mut failures, &mut long);
        if o.rx_lost > RX_IN_FLIGHT_MAX {
            failures.push(format!(
                "{what}: {} RX frames lost, more than a worker can hold unpublished \
                 ({RX_IN_FLIGHT_MAX})",
                o.rx_lost
            ));
        }
    }
    check_long(a, kills.len(), &long, &mut failures);
    if kills.len() >= MEDIAN_MIN_KILLS {
        check_medians(a, &mut failures);
    }
    if failures.is_empty() {
        return Ok(());
    }
    let n = failures.len();
    failures.truncate(25);
    let before: Vec<u64> = a.kills.iter().map(|k| k.others_stall_before_ns).collect();
    let (_, before_p99, before_max) = summarize(&before);
    bail!(
        "{n} failures, first {}:\n{}\n(for comparison, the machine's own noise: worst stall \
         away from every kill {} ms; the other queue pairs' worst stall in the 50 ms before \
         a kill: p99 {} ms, max {} ms)",
        failures.len(),
        failures.join("\n"),
        ms(a.quiet_stall_ns),
        ms(before_p99),
        ms(before_max)
    )
}

/// The other queue pairs' stalls after one kill (`what`): over the hard
/// limit into `failures`, over the limit (the worse of TX and RX) into
/// `long` with its label.
fn judge_others(
    what: &str,
    o: &KillOutcome,
    failures: &mut Vec<String>,
    long: &mut Vec<(&'static str, String)>,
) {
    let mut worst: Option<(&'static str, String)> = None;
    for (dir, st) in [("TX", o.others_tx), ("RX", o.others_rx)] {
        match judge_stall(st) {
            StallVerdict::Within => {}
            StallVerdict::Failed(line) if st.ns > STALL_HARD_LIMIT_NS => {
                failures.push(format!("{what}: {dir} {line}, over the hard limit"))
            }
            StallVerdict::Failed(line) => {
                worst = Some(("OVER THE LIMIT", format!("{what}: {dir} {line}")))
            }
            StallVerdict::Excused(line) => {
                worst.get_or_insert((
                    "EXCUSED (CPU wait inside it)",
                    format!("{what}: {dir} {line}"),
                ));
            }
        }
    }
    long.extend(worst);
}

/// Only the other queue pairs' side of [`check_kills`]: their stalls after
/// each kill (for kills whose own queue pair is not expected to recover in
/// time, such as one that fails its queue pair).
pub fn check_others(a: &Analysis, kills: &[KillEvent]) -> Result<()> {
    let mut failures = Vec::new();
    let mut long = Vec::new();
    for (k, (o, ev)) in a.kills.iter().zip(kills).enumerate() {
        let what = format!("kill {k} ({} of queue pair {})", ev.signal, ev.queue);
        judge_others(&what, o, &mut failures, &mut long);
    }
    check_long(a, kills.len(), &long, &mut failures);
    if failures.is_empty() {
        return Ok(());
    }
    bail!("{}", failures.join("\n"))
}

/// What a stall of another queue pair after a kill comes to.
#[derive(Debug, PartialEq, Eq)]
enum StallVerdict {
    Within,
    /// Over the limit by no more than [`EXCUSE_CAP_NS`], all of it spent
    /// waiting for a CPU inside the stall.
    Excused(String),
    Failed(String),
}

fn judge_stall(st: WorstStall) -> StallVerdict {
    if st.ns <= OTHERS_STALL_LIMIT_NS {
        return StallVerdict::Within;
    }
    let line = format!(
        "queue pair {} stalled {} ms (limit 10 ms), of which it waited {} ms for a CPU \
         during the stall",
        st.queue,
        ms(st.ns),
        ms(st.cpu_wait_ns)
    );
    let own = st.ns.saturating_sub(st.cpu_wait_ns);
    if st.ns <= OTHERS_STALL_LIMIT_NS + EXCUSE_CAP_NS && own <= OTHERS_STALL_LIMIT_NS {
        StallVerdict::Excused(line)
    } else {
        StallVerdict::Failed(line)
    }
}

/// Why a run cannot be judged at all, if it cannot: the machine's own
/// long stalls away from every kill came faster than [`NOISE_RATE_LIMIT`]
/// (the host took the CPUs away), so no timing of its kills means anything.
/// [`check_kills`] fails such a run; a test may run it again instead.
pub fn too_noisy(a: &Analysis) -> Option<String> {
    let noise = Noise::of(a);
    (noise.rate() > NOISE_RATE_LIMIT)
        .then(|| format!("too noisy to judge isolation: {noise}, over {NOISE_RATE_LIMIT}/s"))
}

/// The machine's own long stalls, away from every kill.
struct Noise {
    /// Stalls over the limit there.
    over: usize,
    /// Queue-pair-direction seconds away from kills.
    away_s: f64,
    /// How many such stalls the kill windows would see at the same rate.
    expected: f64,
}

impl Noise {
    fn of(a: &Analysis) -> Noise {
        let over = a.away.long.len();
        let away_s = a.away.away_stream_ns as f64 / 1e9;
        let near_s = a.away.near_stream_ns as f64 / 1e9;
        let rate = if away_s > 0.0 {
            over as f64 / away_s
        } else {
            0.0
        };
        Noise {
            over,
            away_s,
            expected: rate * near_s,
        }
    }

    fn rate(&self) -> f64 {
        if self.away_s > 0.0 {
            self.over as f64 / self.away_s
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for Noise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the machine's own stalls > 10 ms away from kills: {} in {:.1} \
             queue-pair-direction seconds ({:.3}/s; at that rate the kill windows would see \
             {:.1})",
            self.over,
            self.away_s,
            self.rate(),
            self.expected
        )
    }
}

/// Kills with another queue pair stalled over the limit (under the hard
/// limit; `long`: label and line of each, all printed): no more than
/// [`LONG_SHARE_PERCENT`] of the kills, or, when the run has more, that
/// share plus twice what the machine's own rate of such stalls away from
/// kills predicts for the kill windows, a rate that must then itself be at
/// most [`NOISE_RATE_LIMIT`].
fn check_long(
    a: &Analysis,
    kills: usize,
    long: &[(&'static str, String)],
    failures: &mut Vec<String>,
) {
    let share = (kills * LONG_SHARE_PERCENT).div_ceil(100);
    for (label, line) in long {
        println!("{label}: {line}");
    }
    if long.len() <= share {
        return;
    }
    let noise = Noise::of(a);
    let allowed = share + (2.0 * noise.expected) as usize;
    if long.len() > allowed {
        failures.push(format!(
            "{} kills had another queue pair stalled > 10 ms, more than {allowed} \
             ({LONG_SHARE_PERCENT} % of {kills} kills + twice the {:.1} that {noise})",
            long.len(),
            noise.expected
        ));
    }
    if noise.rate() > NOISE_RATE_LIMIT {
        failures.push(format!(
            "too noisy to judge isolation: {noise}, over {NOISE_RATE_LIMIT}/s"
        ));
    }
}

/// The medians of a run: recovery "within milliseconds", TX and RX.
fn check_medians(a: &Analysis, failures: &mut Vec<String>) {
    let tx: Vec<u64> = a.kills.iter().filter_map(|k| k.recovery_ns).collect();
    let rx: Vec<u64> = a.kills.iter().filter_map(|k| k.rx_recovery_ns).collect();
    let sides = [("TX", tx, true), ("RX", rx, a.rx_sent > 0)];
    for (dir, values, checked) in sides {
        let (median, _, _) = summarize(&values);
        if checked && median > MEDIAN_RECOVERY_LIMIT_NS {
            failures.push(format!(
                "median {dir} recovery {} ms over {} kills (limit {} ms)",
                ms(median),
                values.len(),
                ms(MEDIAN_RECOVERY_LIMIT_NS)
            ));
        }
    }
}

/// `a` restricted to the kills in `range` (the run's invariants, RX
/// figures and the machine's noise away from kills kept).
pub fn a_subset(a: &Analysis, range: std::ops::Range<usize>) -> Analysis {
    Analysis {
        kills: a.kills[range].to_vec(),
        problems: a.problems.clone(),
        quiet_stall_ns: a.quiet_stall_ns,
        away: a.away.clone(),
        rx_sent: a.rx_sent,
        rx_silent_queues: a.rx_silent_queues.clone(),
        ..Analysis::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crash::analysis::AwayStalls;

    fn stall(ms: u64, cpu_wait_ms: u64) -> WorstStall {
        WorstStall {
            ns: ms * 1_000_000,
            queue: 3,
            cpu_wait_ns: cpu_wait_ms * 1_000_000,
        }
    }

    #[test]
    fn a_stall_is_excused_only_by_cpu_wait_inside_it_and_only_a_little() {
        assert_eq!(judge_stall(stall(10, 0)), StallVerdict::Within);
        assert!(matches!(judge_stall(stall(11, 0)), StallVerdict::Failed(_)));
        assert!(matches!(judge_stall(stall(13, 2)), StallVerdict::Failed(_)));
        assert!(matches!(
            judge_stall(stall(13, 3)),
            StallVerdict::Excused(_)
        ));
        assert!(matches!(
            judge_stall(stall(15, 9)),
            StallVerdict::Excused(_)
        ));
        // Over the cap, however much the worker waited.
        assert!(matches!(
            judge_stall(stall(16, 16)),
            StallVerdict::Failed(_)
        ));
    }

    fn outcome(recovery_ms: u64) -> KillOutcome {
        KillOutcome {
            recovery_ns: Some(recovery_ms * 1_000_000),
            rx_recovery_ns: Some(recovery_ms * 1_000_000),
            ..KillOutcome::default()
        }
    }

    fn analysis(outcomes: Vec<KillOutcome>) -> Analysis {
        Analysis {
            kills: outcomes,
            rx_sent: 100,
            ..Analysis::default()
        }
    }

    #[test]
    fn slow_medians_and_missing_rx_recovery_fail() {
        let kills: Vec<KillEvent> = (0..10).map(|i| KillEvent::at(0, i)).collect();
        let fast = analysis((0..10).map(|_| outcome(3)).collect());
        assert!(check_kills(&fast, &kills, RECOVERY_LIMIT_NS).is_ok());
        // 50 ms slower, each kill still within 100 ms: the median fails.
        let slow = analysis((0..10).map(|_| outcome(53)).collect());
        let e = check_kills(&slow, &kills, RECOVERY_LIMIT_NS).unwrap_err();
        assert!(e.to_string().contains("median TX recovery"), "{e}");
        let mut no_rx = analysis((0..10).map(|_| outcome(3)).collect());
        no_rx.kills[4].rx_recovery_ns = None;
        let e = check_kills(&no_rx, &kills, RECOVERY_LIMIT_NS).unwrap_err();
        assert!(e.to_string().contains("never forwarded RX again"), "{e}");
    }

    #[test]
    fn long_stalls_are_a_small_share_or_held_to_the_machines_own_rate() {
        let kills: Vec<KillEvent> = (0..100).map(|i| KillEvent::at(0, i)).collect();
        let mut outcomes: Vec<KillOutcome> = (0..100).map(|_| outcome(3)).collect();
        // 3 in 100 kills, excused or not: the fixed share.
        outcomes[3].others_tx = stall(14, 0);
        outcomes[4].others_rx = stall(12, 2);
        outcomes[5].others_rx = stall(12, 0);
        assert!(check_kills(&analysis(outcomes.clone()), &kills, RECOVERY_LIMIT_NS).is_ok());
        outcomes[6].others_rx = stall(11, 0);
        let e = check_kills(&analysis(outcomes.clone()), &kills, RECOVERY_LIMIT_NS).unwrap_err();
        assert!(e.to_string().contains("more than 3 (3 %"), "{e}");
        // The same kills when the machine stalls 3 times in 10 s away from
        // kills and 10 s lie in kill windows: 3 expected, 3 + 6 allowed.
        let mut noisy = analysis(outcomes.clone());
        noisy.away = AwayStalls {
            long: vec![stall(13, 0), stall(11, 0), stall(12, 5)],
            near_stream_ns: 10_000_000_000,
            away_stream_ns: 10_000_000_000,
        };
        assert!(check_kills(&noisy, &kills, RECOVERY_LIMIT_NS).is_ok());
        // Over the hard limit fails whatever the machine does.
        outcomes[7].others_tx = stall(51, 0);
        noisy.kills = outcomes;
        let e = check_kills(&noisy, &kills, RECOVERY_LIMIT_NS).unwrap_err();
        assert!(e.to_string().contains("hard limit"), "{e}");
    }

    #[test]
    fn a_machine_too_noisy_to_judge_fails_when_its_noise_is_needed() {
        let kills: Vec<KillEvent> = (0..10).map(|i| KillEvent::at(0, i)).collect();
        let mut a = analysis((0..10).map(|_| outcome(3)).collect());
        a.away = AwayStalls {
            long: vec![stall(20, 0); 30],
            near_stream_ns: 1_000_000_000,
            away_stream_ns: 10_000_000_000,
        };
        // One long stall in 10 kills is within the share: the noise is
        // not needed.
        a.kills[1].others_tx = stall(12, 0);
        assert!(check_kills(&a, &kills, RECOVERY_LIMIT_NS).is_ok());
        a.kills[2].others_tx = stall(12, 0);
        let e = check_kills(&a, &kills, RECOVERY_LIMIT_NS).unwrap_err();
        assert!(e.to_string().contains("too noisy"), "{e}");
    }
}
