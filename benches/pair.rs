//! Fault-tolerant pair benchmark: prints figures, asserts nothing about
//! speed; exits 1 if a failover drill fails or cannot run.
//!
//! On the local drill's topology (src/ft/drill: namespaces for two hosts, a
//! client and 3 arbiter nodes; `LocalPair` starts exactly what the drill
//! runs), side by side in one run:
//! 1. the `counter` guest under plain `twinvm run` on hostA (the drill's
//!    unprotected mode) and as the FT pair (primary on hostA, backup on
//!    hostB, the real arbiter), the two interleaved over several rounds:
//!    closed-loop loads (window 1 and a wider window) and an open loop at a
//!    fixed rate — requests/s and latency p50/p99, with ratios FT/plain;
//! 2. during the FT loads: log bytes per request and Mbit/s per load, and
//!    both sides' `twinvm status` sampled every 200 ms (log rate, backup
//!    lag in landmarks and ms, held outputs), and the primary's output hold
//!    times (p50/p99/max);
//! 3. failover time over 20 `kill-primary` drills (the drill library's
//!    `run_local` and `RepeatSummary`), and over 5 `partition` drills.
//!
//! 4. the false-failover check (pair/soak.rs): a pair idle for 60 s, then a
//!    fresh pair for 60 s under a steady open-loop load, default timers;
//!    any go-live / continuing-alone claim, lost peer or state other than
//!    replicating/following is reported (and the benchmark exits 1).
//!
//! Run: `cargo bench --bench pair` (root: /dev/kvm, /dev/net/tun, namespaces).
//!
//! Environment:
//! - `TWINVM_PAIR_BENCH_SOAK_S=N`: each false-failover phase lasts N s
//!   (default 60); `TWINVM_PAIR_BENCH_SOAK_ONLY=1` runs only that check,
//!   followed by plain `twinvm run` under the same load as a reference;
//!   `TWINVM_PAIR_BENCH_SOAK_BUSY=N` starts N CPU-bound busy loops in
//!   hostB's namespace during the loaded phase (default 0: the machine is
//!   shared);
//! - `TWINVM_PAIR_BENCH_ROUNDS=N` (default 3) rounds of loads;
//!   `TWINVM_PAIR_BENCH_DRILLS=N` (default 20) kill-primary drills;
//! - `TWINVM_PAIR_BENCH_HEARTBEAT_MS` / `TWINVM_PAIR_BENCH_PEER_TIMEOUT_MS`
//!   give the pair other timers (default: the pair's own, 20 and 120 ms);
//! - `TWINVM_PAIR_BENCH_BINARY=PATH` runs another build of twinvm (e.g. with
//!   a local change) for every process, arbiter nodes included.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use twinvm::ft::drill::local::guest_target;
use twinvm::ft::drill::report::RepeatSummary;
use twinvm::ft::drill::topology::{addr, Host};
use twinvm::ft::drill::verdict::{spread, Spread};
use twinvm::ft::drill::{run_local, DrillError, DrillKind, LocalOptions, LocalPair, Protection};
use twinvm::ft::node::{query_status, PairStatus};

#[path = "common/counter_load.rs"]
mod counter_load;
#[path = "common/interrupt.rs"]
mod interrupt;
use counter_load::{closed_loop, open_loop, LoopFigures};
use interrupt::{check_interrupted, interrupt_flag};

#[path = "pair/soak.rs"]
mod soak;
use soak::soak;

/// Namespaces of this benchmark are named `PREFIX-PID-N` (not the drills'
/// `tvd`, so a drill run by hand meanwhile is never mistaken for ours).
const PREFIX: &str = "tvpb";
const DEFAULT_ROUNDS: u64 = 3;
const WARMUP_REQUESTS: u64 = 200;
/// What each process is measured under, in this order.
const LOADS: [Load; 3] = [
    Load::Closed {
        window: 1,
        requests: 2000,
    },
    Load::Closed {
        window: 16,
        requests: 4000,
    },
    Load::Open {
        rate: 1000,
        requests: 3000,
    },
];
const DEFAULT_KILL_PRIMARY_DRILLS: u64 = 20;
const DEFAULT_SOAK_S: u64 = 60;
/// The drill client's pace: finer than the drill's default 5 ms, so that a
/// short failover is not hidden in the gaps between requests.
const DRILL_INTERVAL: Duration = Duration::from_millis(1);
const PARTITION_DRILLS: usize = 5;
const STATUS_EVERY: Duration = Duration::from_millis(200);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy)]
enum Load {
    Closed { window: usize, requests: u64 },
    Open { rate: u64, requests: u64 },
}

impl Load {
    fn name(self) -> String {
        match self {
            Load::Closed { window, .. } => format!("closed w={window}"),
            Load::Open { rate, .. } => format!("open {rate}/s"),
        }
    }

    fn requests(self) -> u64 {
        match self {
            Load::Closed { requests, .. } | Load::Open { requests, .. } => requests,
        }
    }

    fn run(self, first_id: u64) -> std::io::Result<LoopFigures> {
        let (bind, target) = (client_bind(), guest_target());
        match self {
            Load::Closed { window, requests } => {
                closed_loop(bind, target, window, first_id, requests)
            }
            Load::Open { rate, requests } => open_loop(bind, target, rate, first_id, requests),
        }
    }
}

fn client_bind() -> SocketAddr {
    SocketAddr::from((addr::CLIENT, 0))
}

fn protection_name(p: Protection) -> &'static str {
    match p {
        Protection::Pair => "FT pair",
        Protection::Unprotected => "plain",
    }
}

/// The roles `LocalPair` gives the processes of `p`.
fn roles(p: Protection) -> &'static [&'static str] {
    match p {
        Protection::Pair => &["primary", "backup"],
        Protection::Unprotected => &["unprotected"],
    }
}

fn env_number(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        Err(_) => Ok(None),
    }
}

fn env_ms(name: &str) -> Result<Option<u64>> {
    env_number(name)
}

fn rounds() -> Result<usize> {
    Ok(env_number("TWINVM_PAIR_BENCH_ROUNDS")?
        .unwrap_or(DEFAULT_ROUNDS)
        .max(1) as usize)
}

fn options(exe: &Path, protection: Protection) -> Result<LocalOptions> {
    let mut o = LocalOptions::new(exe.to_path_buf());
    o.protection = protection;
    o.prefix = PREFIX.into();
    o.heartbeat_ms = env_ms("TWINVM_PAIR_BENCH_HEARTBEAT_MS")?;
    o.peer_timeout_ms = env_ms("TWINVM_PAIR_BENCH_PEER_TIMEOUT_MS")?;
    o.phases.ready_timeout = READY_TIMEOUT;
    Ok(o)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// SIGINT/SIGTERM set the flag the drill library's waits poll (everything is
/// then torn down); a second one ends the process at once.
/// Start the guest as `protection` on the drill's topology and wait until
/// it answers from the client's namespace.
fn start(exe: &Path, protection: Protection, interrupted: &AtomicBool) -> Result<LocalPair> {
    let opts = options(exe, protection)?;
    let mut lp = LocalPair::start(&opts, interrupted)
        .with_context(|| format!("starting the {}", protection_name(protection)))?;
    lp.wait_for_guest(READY_TIMEOUT, interrupted)?;
    Ok(lp)
}

/// Both sides' status, sampled during the FT loads.
struct StatusSample {
    primary: PairStatus,
    backup: PairStatus,
}

/// Query both control sockets every [`STATUS_EVERY`] until `stop`.
fn sample_statuses(
    primary: &Path,
    backup: &Path,
    stop: &AtomicBool,
) -> (Vec<StatusSample>, Vec<String>) {
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match (query_status(primary), query_status(backup)) {
            (Ok(primary), Ok(backup)) => samples.push(StatusSample { primary, backup }),
            (Err(e), _) | (_, Err(e)) => errors.push(e),
        }
        std::thread::sleep(STATUS_EVERY);
    }
    (samples, errors)
}

/// One process (plain) or pair (FT) under one load.
struct Sample {
    load: LoopFigures,
    ft: Option<FtFigures>,
}

struct FtFigures {
    /// Log bytes the primary sent during the load.
    log_bytes: u64,
    statuses: Vec<StatusSample>,
    status_errors: Vec<String>,
    /// The primary's status before the load (its hold times: boot and
    /// warm-up outputs) and after it.
    before: PairStatus,
    after: PairStatus,
}

/// Start the guest as `protection`, warm it up, put `load` on it (sampling
/// both sides' status meanwhile, for a pair) and stop it.
fn measure(
    exe: &Path,
    protection: Protection,
    load: Load,
    interrupted: &AtomicBool,
) -> Result<Sample> {
    let mut lp = start(exe, protection, interrupted)?;
    let ft = protection == Protection::Pair;
    let (pc, bc) = (lp.control(Host::A), lp.control(Host::B));
    let primary_status =
        |what: &str| query_status(&pc).map_err(|e| anyhow!("the primary's status ({what}): {e}"));
    let client = &lp.topo.client;
    client
        .enter_on_thread(|| closed_loop(client_bind(), guest_target(), 1, 1, WARMUP_REQUESTS))?
        .context("the warm-up")?;
    check_interrupted(interrupted)?;
    let before = ft.then(|| primary_status("before the load")).transpose()?;
    let stop = AtomicBool::new(false);
    let (figures, sampled) = std::thread::scope(|scope| -> Result<_> {
        let sampler = ft.then(|| scope.spawn(|| sample_statuses(&pc, &bc, &stop)));
        let figures = client.enter_on_thread(|| load.run(1_000_000));
        stop.store(true, Ordering::Relaxed);
        let sampled = sampler.map(|s| s.join().expect("the status sampler panicked"));
        let figures = figures?.with_context(|| format!("the {} load", load.name()))?;
        Ok((figures, sampled))
    })?;
    let ft = match (before, sampled) {
        (Some(before), Some((statuses, status_errors))) => {
            let after = primary_status("after the load")?;
            Some(FtFigures {
                log_bytes: after.log_bytes.saturating_sub(before.log_bytes),
                statuses,
                status_errors,
                before,
                after,
            })
        }
        _ => None,
    };
    for role in roles(protection) {
        let side = lp.side(role).expect("LocalPair started this role");
        if !side.running() {
            bail!(
                "the {role} ended during the load: {}",
                side.stderr_tail(20).join(" | ")
            );
        }
    }
    lp.stop(STOP_GRACE);
    Ok(Sample { load: figures, ft })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `min / median / max` of `values`.
fn spread_text(values: &[f64], digits: usize) -> String {
    match spread(values) {
        Some(Spread {
            min_ms,
            median_ms,
            max_ms,
            ..
        }) => format!("{min_ms:.digits$} / {median_ms:.digits$} / {max_ms:.digits$}"),
        None => "-".into(),
    }
}

/// Samples per load (index into [`LOADS`]), per protection.
struct Results {
    plain: Vec<Vec<Sample>>,
    ft: Vec<Vec<Sample>>,
}

fn print_throughput(r: &Results, rounds: usize) {
    println!();
    println!(
        "{:<13} {:>9} {:>9} {:>6} {:>8} {:>8} {:>6} {:>8} {:>8} {:>6} {:>10}",
        "load",
        "plain/s",
        "FT/s",
        "ratio",
        "p50 pl",
        "p50 FT",
        "ratio",
        "p99 pl",
        "p99 FT",
        "ratio",
        "lost pl/FT"
    );
    for (i, load) in LOADS.iter().enumerate() {
        let m = |runs: &[Sample], f: &dyn Fn(&LoopFigures) -> f64| {
            median(runs.iter().map(|s| f(&s.load)).collect())
        };
        let (plain, ft) = (&r.plain[i], &r.ft[i]);
        let rate = (m(plain, &|l| l.rate()), m(ft, &|l| l.rate()));
        let p50 = (
            m(plain, &|l| l.percentile_us(50)),
            m(ft, &|l| l.percentile_us(50)),
        );
        let p99 = (
            m(plain, &|l| l.percentile_us(99)),
            m(ft, &|l| l.percentile_us(99)),
        );
        let lost = |runs: &[Sample]| runs.iter().map(|s| s.load.lost()).sum::<u64>();
        println!(
            "{:<13} {:>9.0} {:>9.0} {:>6.2} {:>8.0} {:>8.0} {:>6.2} {:>8.0} {:>8.0} {:>6.2} {:>5}/{:<4}",
            load.name(),
            rate.0,
            rate.1,
            rate.1 / rate.0,
            p50.0,
            p50.1,
            p50.1 / p50.0,
            p99.0,
            p99.1,
            p99.1 / p99.0,
            lost(plain),
            lost(ft)
        );
    }
    println!(
        "(medians over {rounds} rounds; /s = answered requests per second; p50/p99 latency in µs; \
         ratio = FT / plain; lost = no reply within 1 s, summed over rounds)"
    );
}

fn print_ft_figures(r: &Results) {
    println!();
    println!(
        "FT pair, per load: the log (the primary's log_bytes before and after the load) and the \
         output hold time (production to release, the primary's histogram: within 12.5%, max \
         exact; ms); medians over rounds, max = the largest"
    );
    println!(
        "{:<13} {:>9} {:>10} {:>9} {:>8} {:>8} {:>8}",
        "load", "log B/req", "log Mbit/s", "outputs", "hold p50", "hold p99", "hold max"
    );
    for (i, load) in LOADS.iter().enumerate() {
        let runs: Vec<(&Sample, &FtFigures)> = r.ft[i]
            .iter()
            .filter_map(|s| s.ft.as_ref().map(|f| (s, f)))
            .collect();
        let m = |f: &dyn Fn(&Sample, &FtFigures) -> f64| {
            median(runs.iter().map(|(s, ft)| f(s, ft)).collect())
        };
        println!(
            "{:<13} {:>9.0} {:>10.3} {:>4.0}/{:<4.0} {:>8.3} {:>8.3} {:>8.3}",
            load.name(),
            m(&|_, f| f.log_bytes as f64 / load.requests() as f64),
            m(&|s, f| f.log_bytes as f64 * 8.0 / s.load.elapsed.as_secs_f64() / 1e6),
            m(&|_, f| f.before.hold_ms.count as f64),
            m(&|_, f| f.after.hold_ms.count as f64),
            m(&|_, f| f.after.hold_ms.p50),
            m(&|_, f| f.after.hold_ms.p99),
            runs.iter()
                .map(|(_, f)| f.after.hold_ms.max)
                .fold(f64::NAN, f64::max)
        );
    }
    println!(
        "(outputs: released before the load (boot console and warm-up replies) / in all; the hold \
         percentiles are over all of them)"
    );

    println!();
    println!(
        "`twinvm status` of both sides every {} ms during each load (all rounds), min / median / max:",
        STATUS_EVERY.as_millis()
    );
    println!(
        "{:<13} {:>8} {:>22} {:>14} {:>20} {:>20} {:>20}",
        "load",
        "samples",
        "log Mbit/s (last 1 s)",
        "held outputs",
        "lag landmarks (B)",
        "lag ms (B)",
        "lag ms (P's view)"
    );
    let mut off = Vec::new();
    let mut errors = Vec::new();
    for (i, load) in LOADS.iter().enumerate() {
        let samples: Vec<&StatusSample> = r.ft[i]
            .iter()
            .filter_map(|s| s.ft.as_ref())
            .flat_map(|f| &f.statuses)
            .collect();
        let col = |f: &dyn Fn(&StatusSample) -> f64, digits: usize| {
            spread_text(&samples.iter().map(|s| f(s)).collect::<Vec<_>>(), digits)
        };
        println!(
            "{:<13} {:>8} {:>22} {:>14} {:>20} {:>20} {:>20}",
            load.name(),
            samples.len(),
            col(&|s| s.primary.log_mbit_s, 2),
            col(&|s| s.primary.held_outputs as f64, 0),
            col(&|s| s.backup.lag_landmarks as f64, 0),
            col(&|s| s.backup.lag_ms, 1),
            col(&|s| s.primary.lag_ms, 1),
        );
        off.extend(
            samples
                .iter()
                .filter(|s| s.primary.state != "replicating" || s.backup.state != "following")
                .map(|s| format!("{}/{}", s.primary.state, s.backup.state)),
        );
        errors.extend(
            r.ft[i]
                .iter()
                .filter_map(|s| s.ft.as_ref())
                .flat_map(|f| f.status_errors.iter().cloned()),
        );
    }
    println!(
        "(B: the backup's status, P: the primary's; states: {} samples not replicating/following{}; \
         {} status queries failed{})",
        off.len(),
        off.first().map(|s| format!(", e.g. {s}")).unwrap_or_default(),
        errors.len(),
        errors
            .first()
            .map(|e| format!(", e.g. {e}"))
            .unwrap_or_default()
    );
}

/// Run `kind` `runs` times on fresh local pairs; print each outcome to
/// stderr and the summary to stdout. Returns whether all passed.
fn drills(exe: &Path, kind: DrillKind, runs: usize, interrupted: &AtomicBool) -> Result<bool> {
    let mut opts = options(exe, Protection::Pair)?;
    opts.interval = DRILL_INTERVAL;
    let mut reports = Vec::new();
    let mut could_not_run = Vec::new();
    for run in 1..=runs {
        check_interrupted(interrupted)?;
        match run_local(kind, &opts, interrupted) {
            Ok(report) => {
                eprintln!(
                    "{kind} {run}/{runs}: {} failover {}",
                    if report.passed() { "PASS" } else { "FAIL" },
                    report
                        .verdict
                        .failover_ms
                        .map_or("none".into(), |ms| format!("{ms:.1} ms"))
                );
                if !report.passed() {
                    eprint!("{}", report.to_text());
                }
                reports.push(report);
            }
            Err(DrillError::Interrupted) => bail!("interrupted"),
            Err(e) => {
                eprintln!("{kind} {run}/{runs}: cannot run: {e}");
                could_not_run.push(e.to_string());
            }
        }
    }
    let summary = RepeatSummary::of(kind, &reports);
    print!("{}", summary.to_text());
    let times: Vec<String> = reports
        .iter()
        .filter_map(|r| r.verdict.failover_ms)
        .map(|ms| format!("{ms:.0}"))
        .collect();
    println!("  each run (ms): {}", times.join(" "));
    if !could_not_run.is_empty() {
        println!(
            "  {} runs could not run; first: {}",
            could_not_run.len(),
            could_not_run[0]
        );
    }
    Ok(summary.all_passed() && could_not_run.is_empty())
}

fn timers() -> Result<String> {
    let hb = env_ms("TWINVM_PAIR_BENCH_HEARTBEAT_MS")?;
    let pt = env_ms("TWINVM_PAIR_BENCH_PEER_TIMEOUT_MS")?;
    let show = |v: Option<u64>| v.map_or("default".into(), |ms| format!("{ms} ms"));
    Ok(format!("heartbeat {}, peer timeout {}", show(hb), show(pt)))
}

fn soak_seconds() -> Result<u64> {
    Ok(env_number("TWINVM_PAIR_BENCH_SOAK_S")?.unwrap_or(DEFAULT_SOAK_S))
}

fn bench(exe: &Path, interrupted: &AtomicBool) -> Result<bool> {
    let rounds = rounds()?;
    let kill_primary_drills =
        env_number("TWINVM_PAIR_BENCH_DRILLS")?.unwrap_or(DEFAULT_KILL_PRIMARY_DRILLS) as usize;
    let soak_s = soak_seconds()?;
    println!(
        "twinvm pair benchmark: counter guest on the local drill topology, plain `twinvm run` on hostA \
         vs FT pair (hostA primary, hostB backup, 3-node arbiter; {})",
        timers()?
    );
    println!(
        "a fresh process (or pair) per load and round: {WARMUP_REQUESTS} warm-up requests, then one of {}; \
         {rounds} rounds, plain and FT interleaved",
        LOADS
            .iter()
            .map(|l| format!("{} ({} requests)", l.name(), l.requests()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("binary: {}", exe.display());
    println!("load average at start: {}", loadavg());
    let mut results = Results {
        plain: LOADS.iter().map(|_| Vec::new()).collect(),
        ft: LOADS.iter().map(|_| Vec::new()).collect(),
    };
    for round in 0..rounds {
        for (i, load) in LOADS.iter().enumerate() {
            let order = if (round + i) % 2 == 0 {
                [Protection::Unprotected, Protection::Pair]
            } else {
                [Protection::Pair, Protection::Unprotected]
            };
            for protection in order {
                check_interrupted(interrupted)?;
                let sample = measure(exe, protection, *load, interrupted)?;
                let f = &sample.load;
                eprintln!(
                    "round {round} {} {}: {:.0}/s p50 {:.0} us p99 {:.0} us lost {}{}",
                    load.name(),
                    protection_name(protection),
                    f.rate(),
                    f.percentile_us(50),
                    f.percentile_us(99),
                    f.lost(),
                    sample
                        .ft
                        .as_ref()
                        .map(|ft| format!(
                            "; hold p50 {:.3} p99 {:.3} max {:.3} ms",
                            ft.after.hold_ms.p50, ft.after.hold_ms.p99, ft.after.hold_ms.max
                        ))
                        .unwrap_or_default()
                );
                match protection {
                    Protection::Pair => results.ft[i].push(sample),
                    Protection::Unprotected => results.plain[i].push(sample),
                }
            }
        }
    }
    print_throughput(&results, rounds);
    print_ft_figures(&results);
    println!();
    println!("load average after the loads: {}", loadavg());

    println!();
    println!(
        "failover (the drill library's run_local; its client sends a request every {} ms, \
         retried after 30 ms, at most 64 outstanding):",
        DRILL_INTERVAL.as_millis()
    );
    let kill_ok = drills(
        exe,
        DrillKind::KillPrimary,
        kill_primary_drills,
        interrupted,
    )?;
    println!("load average: {}", loadavg());
    let partition_ok = drills(exe, DrillKind::Partition, PARTITION_DRILLS, interrupted)?;
    println!();
    println!(
        "failover time: the longest silence the drill's client saw from the fault on \
         (last reply before it to the first after it)."
    );
    println!("load average: {}", loadavg());
    let no_false_failover = soak(exe, soak_s, false, interrupted)?;
    println!("load average at the end: {}", loadavg());
    Ok(kill_ok && partition_ok && no_false_failover)
}

fn main() {
    let exe = match std::env::var_os("TWINVM_PAIR_BENCH_BINARY") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_BIN_EXE_twinvm")),
    };
    // A namespace of our own first: without root the benchmark cannot run.
    if let Err(e) = twinvm::net::NetNs::create(PREFIX) {
        println!("pair benchmark skipped: cannot create a network namespace ({e}); run as root");
        return;
    }
    let outcome = interrupt_flag().and_then(|interrupted| {
        if std::env::var_os("TWINVM_PAIR_BENCH_SOAK_ONLY").is_some() {
            soak(&exe, soak_seconds()?, true, &interrupted)
        } else {
            bench(&exe, &interrupted)
        }
    });
    match outcome {
        Ok(true) => {}
        Ok(false) => {
            println!("pair benchmark: some drills failed or could not run, or the pair failed over by itself (above)");
            std::process::exit(1);
        }
        Err(e) => {
            println!("pair benchmark: {e:#}");
            std::process::exit(1);
        }
    }
}
