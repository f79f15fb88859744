//! The false-failover check: does the pair fail over by itself, with no
//! fault injected? A pair idle for N seconds, then a fresh pair for N
//! seconds under a steady open-loop load (optionally with CPU-bound busy
//! loops in hostB's namespace); both sides' state polled every second; the
//! go-live / continuing-alone claims, the lost-peer lines and every other
//! suspicion line in the sides' stderr counted and reported. A 1 ms sleep
//! loop in the benchmark tells whether the machine itself stalled meanwhile.
//! In soak-only mode, plain `twinvm run` under the same load follows, as a
//! reference.

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use twinvm::ft::drill::local::guest_target;
use twinvm::ft::drill::pair::{read_claims, CLAIM_LINES, LOST_LINE};
use twinvm::ft::drill::topology::Host;
use twinvm::ft::drill::Protection;
use twinvm::ft::node::query_status;

use super::counter_load::{open_loop, LoopFigures};
use super::{
    check_interrupted, client_bind, loadavg, roles, spread_text, start, timers, STOP_GRACE,
};

/// The load: requests per second, in chunks of this length.
const SOAK_RATE: u64 = 1000;
const SOAK_CHUNK: Duration = Duration::from_secs(10);
const SOAK_POLL: Duration = Duration::from_secs(1);

/// Busy loops in hostB's namespace during the loaded phase (default none:
/// the machine is shared).
const BUSY_ENV: &str = "TWINVM_PAIR_BENCH_SOAK_BUSY";

/// CPU-bound busy loops in a namespace, killed when dropped.
struct BusyLoops(Vec<Child>);

impl BusyLoops {
    fn start(ns: &twinvm::net::NetNs, n: usize) -> Result<BusyLoops> {
        let mut loops = BusyLoops(Vec::new());
        for _ in 0..n {
            let child = ns
                .command("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting a busy loop")?;
            loops.0.push(child);
        }
        Ok(loops)
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        // Our own unreaped children (`ip netns exec` execs sh in place).
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a side's stderr says happened to the pair, counted.
#[derive(Default, Clone, Copy)]
pub struct Events {
    /// Sides whose stderr says they won the arbitration and serve alone
    /// ("going live" / "continuing alone").
    pub claims: usize,
    /// "primary lost" / "backup lost": a side gave up on its peer.
    pub peer_lost: usize,
    /// "lost the arbitration".
    pub lost_arbitration: usize,
}

impl Events {
    fn of(stderr: &str) -> Events {
        let mut e = Events {
            claims: usize::from(read_claims(stderr).0),
            ..Events::default()
        };
        for l in stderr.lines() {
            if l.starts_with("twinvm primary: backup lost")
                || l.starts_with("twinvm backup: primary lost")
            {
                e.peer_lost += 1;
            }
            if l.starts_with(LOST_LINE) {
                e.lost_arbitration += 1;
            }
        }
        e
    }

    fn add(&mut self, o: Events) {
        self.claims += o.claims;
        self.peer_lost += o.peer_lost;
        self.lost_arbitration += o.lost_arbitration;
    }

    fn none(&self) -> bool {
        self.claims == 0 && self.peer_lost == 0 && self.lost_arbitration == 0
    }
}

/// Lines of a side's stderr about a suspected or lost peer and what the
/// arbiter said (the pair's own lines, not the tracing log's copies).
fn suspicion_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.starts_with("twinvm"))
        .filter(|l| {
            l.contains("asking the arbiter")
                || l.contains("silent for")
                || l.starts_with(LOST_LINE)
                || CLAIM_LINES.iter().any(|c| l.starts_with(c))
        })
        .map(str::to_owned)
        .collect()
}

/// Gaps longer than this in a 1 ms sleep loop are counted: the machine (or
/// this process) did not run for that long.
const STALL: Duration = Duration::from_millis(50);

/// Sleep 1 ms at a time until `stop`; the gaps over [`STALL`] (ms).
fn stall_probe(stop: &AtomicBool) -> Vec<f64> {
    let mut gaps = Vec::new();
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(1));
        let now = Instant::now();
        if now - last > STALL {
            gaps.push((now - last).as_secs_f64() * 1e3);
        }
        last = now;
    }
    gaps
}

/// The client's chunks of open loop, summed up.
fn client_text(chunks: Vec<LoopFigures>) -> String {
    let sent: u64 = chunks.iter().map(|f| f.sent).sum();
    let lost: u64 = chunks.iter().map(|f| f.lost()).sum();
    let worst_p99 = chunks
        .iter()
        .map(|f| f.percentile_us(99))
        .fold(0.0, f64::max);
    let all = LoopFigures {
        sent,
        latencies: chunks.into_iter().flat_map(|f| f.latencies).collect(),
        elapsed: Duration::ZERO,
    };
    format!(
        "{sent} requests, {lost} lost; latency p50 {:.0} us, p99 {:.0} us, worst p99 of a {} s chunk {:.0} us",
        all.percentile_us(50),
        all.percentile_us(99),
        SOAK_CHUNK.as_secs(),
        worst_p99
    )
}

fn busy_loops() -> Result<usize> {
    match std::env::var(BUSY_ENV) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{BUSY_ENV}={v:?} is not a number of busy loops")),
        Err(_) => Ok(0),
    }
}

/// One soak phase: the guest as `protection` for `length`, idle or loaded.
/// Returns true if the pair stayed a pair throughout: no claim, no lost
/// peer, every status poll replicating/following, both sides running.
fn soak_phase(
    exe: &Path,
    protection: Protection,
    length: Duration,
    loaded: bool,
    interrupted: &AtomicBool,
) -> Result<bool> {
    let pair = protection == Protection::Pair;
    let busy_n = busy_loops()?;
    let mut lp = start(exe, protection, interrupted)?;
    let busy = if loaded && busy_n > 0 {
        Some(BusyLoops::start(&lp.topo.host_b, busy_n)?)
    } else {
        None
    };
    let started = Instant::now();
    let load_before = loadavg();
    let (pc, bc) = (lp.control(Host::A), lp.control(Host::B));
    let stop = AtomicBool::new(false);
    let mut polls = 0u64;
    let mut off: Vec<(f64, String, String)> = Vec::new();
    let mut poll_errors = 0u64;
    let mut first_poll_error: Option<(f64, String)> = None;
    let mut lag_ms = Vec::new();
    let mut lag_landmarks = Vec::new();
    let (chunks, stalls) = std::thread::scope(|scope| -> Result<_> {
        let client = &lp.topo.client;
        let stop = &stop;
        let prober = scope.spawn(move || stall_probe(stop));
        let loader = loaded.then(|| {
            scope.spawn(move || -> Result<Vec<LoopFigures>> {
                let mut chunks = Vec::new();
                let mut first_id = 1;
                // Chunks until the phase's end (the last one shorter), so
                // the load and the status polls cover the same time.
                while !stop.load(Ordering::Relaxed) {
                    let left = length.saturating_sub(started.elapsed()).min(SOAK_CHUNK);
                    let requests = (SOAK_RATE as f64 * left.as_secs_f64()) as u64;
                    if requests == 0 {
                        break;
                    }
                    let f = client.enter_on_thread(|| {
                        open_loop(client_bind(), guest_target(), SOAK_RATE, first_id, requests)
                    })??;
                    first_id += requests;
                    chunks.push(f);
                }
                Ok(chunks)
            })
        });
        while started.elapsed() < length && !interrupted.load(Ordering::SeqCst) {
            std::thread::sleep(SOAK_POLL);
            if !pair {
                continue;
            }
            polls += 1;
            match (query_status(&pc), query_status(&bc)) {
                (Ok(p), Ok(b)) => {
                    if p.state != "replicating" || b.state != "following" {
                        off.push((started.elapsed().as_secs_f64(), p.state, b.state));
                    }
                    lag_ms.push(b.lag_ms);
                    lag_landmarks.push(b.lag_landmarks as f64);
                }
                (p, b) => {
                    poll_errors += 1;
                    if first_poll_error.is_none() {
                        let e = p.err().or(b.err()).map(|e| e.to_string());
                        first_poll_error =
                            Some((started.elapsed().as_secs_f64(), e.unwrap_or_default()));
                    }
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let chunks = match loader {
            Some(l) => l.join().expect("the soak client panicked")?,
            None => Vec::new(),
        };
        Ok((chunks, prober.join().expect("the stall probe panicked")))
    })?;
    let elapsed = started.elapsed();
    drop(busy);
    let load_after = loadavg();
    let mut suspicions = Vec::new();
    let mut events = Events::default();
    let mut ended = 0;
    for role in roles(protection) {
        let side = lp.side(role).expect("LocalPair started this role");
        let running = side.running();
        let stderr = side.stderr_text();
        events.add(Events::of(&stderr));
        for line in suspicion_lines(&stderr) {
            suspicions.push(format!("{role}: {line}"));
        }
        if !running {
            ended += 1;
            suspicions.push(format!("{role}: ended ({:?})", side.exit_code_and_signal()));
        }
    }
    lp.stop(STOP_GRACE);
    check_interrupted(interrupted)?;

    println!();
    println!(
        "soak {} {}: {:.0} s, {}{}; load average {load_before} at the start, {load_after} at the end",
        if pair { "FT pair" } else { "plain (reference)" },
        if loaded { "loaded" } else { "idle" },
        elapsed.as_secs_f64(),
        if pair { timers()? } else { "no pair".into() },
        if loaded {
            format!(", open loop at {SOAK_RATE}/s and {busy_n} busy loops (sh) in hostB's namespace")
        } else {
            ", no traffic".into()
        }
    );
    if pair {
        println!(
            "  status polls every {} s: {polls}, {} not replicating/following{}, {poll_errors} failed{}",
            SOAK_POLL.as_secs(),
            off.len(),
            off.first()
                .map(|(t, p, b)| format!(" (first at {t:.0} s: {p}/{b})"))
                .unwrap_or_default(),
            first_poll_error
                .map(|(t, e)| format!(" (first at {t:.0} s: {e})"))
                .unwrap_or_default()
        );
        println!(
            "  backup lag (backup's status), min / median / max: {} landmarks; {} ms",
            spread_text(&lag_landmarks, 0),
            spread_text(&lag_ms, 2)
        );
    }
    if loaded {
        println!("  client: {}", client_text(chunks));
    }
    println!(
        "  the benchmark's own 1 ms sleep loop: {} gaps over {} ms{}",
        stalls.len(),
        STALL.as_millis(),
        if stalls.is_empty() {
            String::new()
        } else {
            format!(
                ", longest {:.0} ms",
                stalls.iter().copied().fold(0.0, f64::max)
            )
        }
    );
    let stayed = events.none() && off.is_empty() && ended == 0;
    if pair {
        println!(
            "  failover events: {} sides went live/alone, {} primary/backup lost, \
             {} lost arbitrations, {ended} sides ended => {}",
            events.claims,
            events.peer_lost,
            events.lost_arbitration,
            if stayed {
                "no failover"
            } else {
                "FAILED OVER OR BROKE"
            }
        );
        println!(
            "  suspicion and arbitration lines in the sides' stderr: {}{}",
            suspicions.len(),
            if suspicions.is_empty() {
                String::new()
            } else {
                format!(":\n    {}", suspicions.join("\n    "))
            }
        );
    }
    Ok(stayed || !pair)
}

/// How long the plain reference runs under the loaded phase's load.
const REFERENCE: Duration = Duration::from_secs(60);

/// The false-failover check: the pair idle for `seconds`, then a fresh pair
/// loaded for `seconds`; with `reference`, plain `twinvm run` under the same
/// load afterwards. Returns true if neither pair failed over.
pub fn soak(exe: &Path, seconds: u64, reference: bool, interrupted: &AtomicBool) -> Result<bool> {
    println!();
    println!(
        "false-failover check: does the pair fail over by itself? {seconds} s idle, then {seconds} s loaded{}",
        if reference {
            format!(
                ", then plain `twinvm run` under the same load for at most {} s (a reference)",
                REFERENCE.as_secs()
            )
        } else {
            String::new()
        }
    );
    let length = Duration::from_secs(seconds);
    let idle = soak_phase(exe, Protection::Pair, length, false, interrupted)?;
    let loaded = soak_phase(exe, Protection::Pair, length, true, interrupted)?;
    if reference {
        soak_phase(
            exe,
            Protection::Unprotected,
            length.min(REFERENCE),
            true,
            interrupted,
        )?;
    }
    println!(
        "false failovers: idle {}, loaded {}",
        if idle { "none" } else { "YES (above)" },
        if loaded { "none" } else { "YES (above)" }
    );
    Ok(idle && loaded)
}
