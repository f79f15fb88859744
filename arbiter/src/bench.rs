//! `bench`: test-and-set latency and throughput of a local 3-node arbiter
//! (fsync on) and, optionally, of a local 3-member etcd doing the equivalent
//! compare-and-swap, with the same client concurrency; then leader failover
//! time (kill -9 the leader → next successful test-and-set).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::engine::{Engine, LocalEtcd};
use crate::local_cluster::{ClusterOptions, Launcher, LocalCluster};
use crate::state_machine::TasOutcome;

#[derive(Debug)]
pub struct Stats {
    pub ops: usize,
    pub errors: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub throughput: f64,
}

/// Runs `clients` threads, each doing test-and-set on fresh VM names for `seconds`.
pub fn measure(make: &dyn Fn() -> Box<dyn Engine>, clients: u32, seconds: f64, tag: &str) -> Stats {
    let run_for = Duration::from_secs_f64(seconds);
    let handles: Vec<_> = (0..clients)
        .map(|w| {
            let mut engine = make();
            let tag = format!("{tag}-{w}");
            std::thread::spawn(move || {
                // One warm-up call opens connections and finds the leader.
                let _ = engine.test_and_set(&format!("{tag}-warmup"), 1, "bench");
                let mut latencies = Vec::new();
                let mut errors = 0;
                let start = Instant::now();
                let mut i = 0u64;
                while start.elapsed() < run_for {
                    let t = Instant::now();
                    match engine.test_and_set(&format!("{tag}-{i}"), 1, "bench") {
                        Ok(TasOutcome::Won { .. }) => latencies.push(t.elapsed()),
                        _ => errors += 1,
                    }
                    i += 1;
                }
                (latencies, errors, start.elapsed())
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut wall = Duration::ZERO;
    for h in handles {
        let (l, e, elapsed) = h.join().expect("bench worker");
        all.extend(l);
        errors += e;
        wall = wall.max(elapsed);
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Stats {
        ops: all.len(),
        errors,
        p50: pct(0.50),
        p99: pct(0.99),
        throughput: all.len() as f64 / wall.as_secs_f64(),
    }
}

/// Time from killing the leader to the next successful test-and-set.
fn failover_once(
    kill_leader: &mut dyn FnMut() -> anyhow::Result<()>,
    engine: &mut dyn Engine,
    tag: &str,
) -> anyhow::Result<Duration> {
    engine.test_and_set(&format!("{tag}-before"), 1, "bench")?;
    let t = Instant::now();
    kill_leader()?;
    let mut i = 0;
    loop {
        if let Ok(TasOutcome::Won { .. }) =
            engine.test_and_set(&format!("{tag}-after-{i}"), 1, "bench")
        {
            return Ok(t.elapsed());
        }
        i += 1;
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(30),
            "no test-and-set succeeded within 30s of the kill"
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn row(engine: &str, clients: u32, s: &Stats) -> String {
    format!(
        "| {engine} | {clients} | {} | {} | {} | {:.0} | {} |",
        s.ops,
        ms(s.p50),
        ms(s.p99),
        s.throughput,
        s.errors
    )
}

/// Per-request timeout of the etcd client during failover trials.
pub const ETCD_FAILOVER_REQUEST_TIMEOUT_MS: u64 = 250;

pub fn run(
    launcher: Launcher,
    clients: &[u32],
    seconds: f64,
    etcd: bool,
    snapshot_every: u64,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        seconds > 0.0 && seconds < 3600.0,
        "--seconds must be within (0, 3600)"
    );
    let mut rows = Vec::new();
    let mut failovers = Vec::new();
    {
        let opts = ClusterOptions {
            allow_fault_injection: false,
            cluster_id: "twinvm-bench".into(),
            snapshot_every: snapshot_every.max(1),
            ..Default::default()
        };
        let mut cluster =
            LocalCluster::start(launcher, opts).context("starting the arbiter cluster")?;
        for &c in clients {
            let make = || -> Box<dyn Engine> { Box::new(cluster.client(Duration::from_secs(10))) };
            let s = measure(&make, c, seconds, &format!("twinvm-c{c}"));
            eprintln!("{}", row("twinvm arbiter", c, &s));
            rows.push(row("twinvm arbiter", c, &s));
        }
        for trial in 0..3 {
            let mut client = cluster.client(Duration::from_secs(30));
            let leader = cluster.wait_leader(Duration::from_secs(15))?;
            let took = failover_once(
                &mut || {
                    cluster.kill(leader);
                    Ok(())
                },
                &mut client,
                &format!("twinvm-failover-{trial}"),
            )?;
            failovers.push(format!("| twinvm arbiter | {} | {} |", trial + 1, ms(took)));
            cluster.spawn(leader)?;
            cluster.wait_leader(Duration::from_secs(15))?;
            std::thread::sleep(Duration::from_secs(1)); // let the restarted node catch up
        }
    }
    if etcd {
        let mut etcd = LocalEtcd::start(3)?;
        for &c in clients {
            let make = || -> Box<dyn Engine> { Box::new(etcd.engine(Duration::from_secs(10))) };
            let s = measure(&make, c, seconds, &format!("etcd-c{c}"));
            eprintln!("{}", row("etcd 3.4 CAS txn", c, &s));
            rows.push(row("etcd 3.4 CAS txn", c, &s));
        }
        for trial in 0..3 {
            // A short per-request timeout: during an election etcd holds requests rather than
            // redirecting, so the client's timeout, not etcd, would otherwise set the figure.
            let mut engine = etcd
                .engine(Duration::from_secs(30))
                .with_request_timeout(Duration::from_millis(ETCD_FAILOVER_REQUEST_TIMEOUT_MS));
            let leader = etcd.leader()?;
            let took = failover_once(
                &mut || {
                    etcd.kill(leader);
                    Ok(())
                },
                &mut engine,
                &format!("etcd-failover-{trial}"),
            )?;
            failovers.push(format!("| etcd 3.4 | {} | {} |", trial + 1, ms(took)));
            etcd.spawn(leader)?;
            std::thread::sleep(Duration::from_secs(2)); // rejoin and catch up
        }
    }
    println!("| engine | clients | ops | p50 ms | p99 ms | ops/s | errors |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!();
    println!("| engine | failover trial | kill leader → next successful test-and-set, ms |");
    println!("|---|---|---|");
    for f in failovers {
        println!("{f}");
    }
    Ok(ExitCode::SUCCESS)
}
