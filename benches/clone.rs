//! Clone benchmark (issue 13, item 7): total time and guest pause of
//! `twinvm clone` for a 256 MiB guest at several dirty rates; prints
//! figures, asserts nothing about speed; exits 1 if a clone fails.
//!
//! On the local drill's topology (`LocalPair`: namespaces for two hosts,
//! a client and a 3-node arbiter), each workload runs as an FT pair whose
//! backup is then killed: the primary goes on alone, and is cloned
//! `TWINVM_CLONE_BENCH_REPS` times (default 3) to a new
//! `twinvm backup --from-clone` in hostB's namespace; after each clone the
//! pair must stay whole for 2 s (the clone following, not diverged), then
//! the clone is killed and the primary is alone again for the next one.
//! Workloads:
//! - the `counter` guest idle;
//! - the `counter` guest answering a client (a request every 1 ms, up to 64
//!   in flight), whose losses are counted;
//! - the `memwrite` guest storing random words from user mode at about
//!   10 MiB/s over 64 MiB, about 100 MiB/s over 4 MiB, and as fast as it
//!   can over 4 MiB (a rate no copy catches: the round bound ends it).
//!
//! Run: `cargo bench --bench clone` (root: /dev/kvm, /dev/net/tun,
//! namespaces). `TWINVM_CLONE_BENCH_MEM` sets the guest memory (default
//! 256M); `TWINVM_CLONE_BENCH_ONLY=TEXT` runs only the workloads whose
//! name contains TEXT.
//!
//! Opt-in, `TWINVM_CLONE_BENCH_LINUX=1` adds two Linux rows (benches/clone/
//! linux.rs): Debian's kernel (tests/linux_guest's image, built or reused as
//! for tests/linux_boot.rs) as a pair serving TCP, cloned with its client's
//! TCP session idle, then busy. Its boot takes 15-45 minutes here (both
//! replicas on one host CPU); `TWINVM_LINUX_TIMEOUT` bounds the wait for it
//! to serve (seconds, default 2400). `TWINVM_CLONE_BENCH_LINUX=1
//! TWINVM_CLONE_BENCH_ONLY=Linux` runs only those.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use twinvm::clone::CloneStatus;
use twinvm::ft::drill::client::{Client, ClientSettings};
use twinvm::ft::drill::history::analyze;
use twinvm::ft::drill::local::guest_target;
use twinvm::ft::drill::topology::{addr, Host};
use twinvm::ft::drill::{LocalOptions, LocalPair};
use twinvm::ft::node::query_status;

#[path = "common/interrupt.rs"]
mod interrupt;
use interrupt::{check_interrupted, interrupt_flag};
#[path = "clone/linux.rs"]
mod linux;
#[path = "../tests/linux_guest/mod.rs"]
mod linux_guest;

const PREFIX: &str = "tvcb";
/// How long a clone's pair must stay whole before it counts.
const SETTLE: Duration = Duration::from_secs(2);
const TIMEOUT: Duration = Duration::from_secs(120);

struct Workload {
    name: &'static str,
    kernel: &'static str,
    cmdline: String,
    /// A client asking the counter guest during the clones.
    client: bool,
}

fn workloads() -> Vec<Workload> {
    let counter = format!("ip={} port={}", addr::GUEST, addr::GUEST_PORT);
    // memwrite's loop runs far longer than the benchmark (the guest would
    // power off at its end).
    let memwrite =
        |ws_kib: u32, every: u32| format!("ws={ws_kib} every={every} rounds=1000000000000 hz=250");
    vec![
        Workload {
            name: "counter, idle",
            kernel: "builtin:counter",
            cmdline: counter.clone(),
            client: false,
        },
        Workload {
            name: "counter, a request per ms",
            kernel: "builtin:counter",
            cmdline: counter,
            client: true,
        },
        Workload {
            name: "memwrite ~10 MiB/s over 64 MiB",
            kernel: "builtin:memwrite",
            cmdline: memwrite(65536, 230),
            client: false,
        },
        Workload {
            name: "memwrite ~100 MiB/s over 4 MiB",
            kernel: "builtin:memwrite",
            cmdline: memwrite(4096, 23),
            client: false,
        },
        Workload {
            name: "memwrite, a store per round over 4 MiB",
            kernel: "builtin:memwrite",
            cmdline: memwrite(4096, 1),
            client: false,
        },
    ]
}

/// A table row: a workload's name, its clones, the client's requests lost.
type Row = (&'static str, Vec<Sample>, Option<u64>);

/// One clone's figures, and whether its pair stayed whole.
struct Sample {
    report: CloneStatus,
    stayed_whole: bool,
}

fn main() {
    if let Err(e) = twinvm::net::NetNs::create(PREFIX) {
        println!("clone benchmark skipped: cannot create a network namespace ({e}); run as root");
        return;
    }
    match interrupt_flag().and_then(|interrupted| bench(&interrupted)) {
        Ok(true) => {}
        Ok(false) => {
            println!("clone benchmark: some clones failed (above)");
            std::process::exit(1);
        }
        Err(e) => {
            println!("clone benchmark: {e:#}");
            std::process::exit(1);
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow!("{name}={v:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

fn bench(interrupted: &AtomicBool) -> Result<bool> {
    let reps: usize = env_or("TWINVM_CLONE_BENCH_REPS", 3)?;
    let mem: String = env_or("TWINVM_CLONE_BENCH_MEM", "256M".to_string())?;
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_twinvm"));
    println!("clone benchmark: guest memory {mem}, {reps} clones per workload");
    let mut all_ok = true;
    let mut table: Vec<Row> = Vec::new();
    let only = std::env::var("TWINVM_CLONE_BENCH_ONLY").unwrap_or_default();
    for w in workloads()
        .into_iter()
        .filter(|w| w.name.contains(only.as_str()))
    {
        check_interrupted(interrupted)?;
        println!("== {}", w.name);
        match run_workload(&exe, &w, &mem, reps, interrupted) {
            Ok((samples, lost)) => {
                all_ok &= samples.iter().all(|s| s.stayed_whole) && lost.unwrap_or(0) == 0;
                table.push((w.name, samples, lost));
            }
            Err(e) => {
                println!("   failed: {e:#}");
                all_ok = false;
            }
        }
    }
    let linux = std::env::var("TWINVM_CLONE_BENCH_LINUX").is_ok_and(|v| v == "1");
    if linux
        && [linux::IDLE, linux::BUSY]
            .iter()
            .any(|n| n.contains(only.as_str()))
    {
        check_interrupted(interrupted)?;
        println!(
            "== Linux: booting Debian's kernel as a pair ({mem}, both replicas on one host CPU)"
        );
        match linux::run(&exe, &mem, &only, interrupted) {
            Ok(rows) => {
                all_ok &= rows
                    .iter()
                    .all(|(_, s, _)| s.iter().all(|s| s.stayed_whole));
                table.extend(rows);
            }
            Err(e) => {
                println!("   failed: {e:#}");
                all_ok = false;
            }
        }
    }
    println!();
    println!(
        "| workload | clone | guest dirty rate (MiB/s) | rounds | pages sent | MiB sent | total (ms) | pause (ms) | wait for a landmark (ms) | cut | pair whole 2 s later | requests lost |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, samples, lost) in &table {
        for s in samples {
            let r = &s.report;
            println!(
                "| {name} | {} | {:.1} | {} | {} | {:.1} | {:.0} | {:.1} | {:.1} | {} | {} | {} |",
                r.phase,
                r.dirty_rate * 4096.0 / (1 << 20) as f64,
                r.round,
                r.pages_sent,
                r.bytes_sent as f64 / (1 << 20) as f64,
                r.total_ms,
                r.pause_ms,
                r.cut_wait_ms,
                r.cut_reason,
                if s.stayed_whole { "yes" } else { "NO" },
                lost.map_or("-".to_string(), |l| l.to_string()),
            );
        }
    }
    Ok(all_ok)
}

/// Start `w` as a pair, lose the backup, clone the primary `reps` times.
/// Returns the samples and, with a client, the requests it lost.
fn run_workload(
    exe: &std::path::Path,
    w: &Workload,
    mem: &str,
    reps: usize,
    interrupted: &AtomicBool,
) -> Result<(Vec<Sample>, Option<u64>)> {
    let mut opts = LocalOptions::new(exe.to_owned());
    opts.prefix = PREFIX.into();
    opts.guest.kernel = w.kernel.into();
    opts.guest.cmdline = w.cmdline.clone();
    opts.guest.mem = mem.into();
    let mut lp = LocalPair::start(&opts, interrupted).context("starting the pair")?;
    let client = if w.client {
        Some(start_client(&mut lp, interrupted)?)
    } else {
        None
    };
    let primary = lp.control(Host::A);
    lp.side("backup")
        .ok_or_else(|| anyhow!("the pair has no backup"))?
        .kill();
    wait_state(&primary, "the primary alone", |s| s.state == "alone")?;
    let mut samples = Vec::new();
    for i in 0..reps {
        let node = format!("clone{i}");
        samples.push(clone_once(&mut lp, &opts, &node, i + 1, interrupted)?);
        // Lose the clone: the primary is alone again for the next one.
        lp.kill_node(&node);
        wait_state(&primary, "the primary alone again", |s| s.state == "alone")?;
    }
    let lost = match client {
        Some(c) => {
            let history = c.finish(Duration::from_secs(3))?;
            Some(analyze(&history, None).lost)
        }
        None => None,
    };
    lp.stop(Duration::from_secs(2));
    Ok((samples, lost))
}

/// Clone the primary (on hostA, alone) to `node` on hostB, then check the
/// pair is still whole [`SETTLE`] later; prints the figures. A failed clone
/// is a sample (the source's report of it), not an error.
fn clone_once(
    lp: &mut LocalPair,
    opts: &LocalOptions,
    node: &str,
    number: usize,
    interrupted: &AtomicBool,
) -> Result<Sample> {
    let primary = lp.control(Host::A);
    let (report, stayed_whole) =
        match lp.clone_alone_side(opts, Host::A, Host::B, node, interrupted) {
            Ok(report) => {
                // The pair stays whole for a while: the clone follows.
                std::thread::sleep(SETTLE);
                let control = twinvm::ft::drill::pair::SideFiles::in_dir(lp.dir(), node).control;
                let whole = query_status(&control).is_ok_and(|s| s.state == "following")
                    && query_status(&primary).is_ok_and(|s| s.state == "replicating");
                (report, whole)
            }
            Err(e) => {
                // The source's report of the failed clone.
                println!("   clone {number} failed: {e}");
                let report = query_status(&primary)
                    .ok()
                    .and_then(|s| s.clone)
                    .ok_or_else(|| anyhow!("no report of the failed clone: {e}"))?;
                (report, false)
            }
        };
    println!(
        "   clone {number}: {}, total {:.0} ms, pause {:.1} ms, {} rounds, {} pages, {:.1} MiB, cut: {}; pair whole {:?} later: {}",
        report.phase,
        report.total_ms,
        report.pause_ms,
        report.round,
        report.pages_sent,
        report.bytes_sent as f64 / (1 << 20) as f64,
        report.cut_reason,
        SETTLE,
        stayed_whole
    );
    Ok(Sample {
        report,
        stayed_whole,
    })
}

/// A client in the client namespace asking the counter guest every 1 ms,
/// started once the guest answers.
fn start_client(lp: &mut LocalPair, interrupted: &AtomicBool) -> Result<Client> {
    lp.wait_for_guest(TIMEOUT, interrupted)?;
    let socket = lp
        .topo
        .client
        .enter_on_thread(|| UdpSocket::bind((addr::CLIENT, 0)))?
        .context("the client's socket")?;
    Ok(Client::start(
        socket,
        ClientSettings {
            target: guest_target(),
            interval: Duration::from_millis(1),
            retry_after: Duration::from_millis(30),
            window: 64,
        },
        Instant::now(),
    )?)
}

fn wait_state(
    control: &std::path::Path,
    what: &str,
    want: impl Fn(&twinvm::ft::node::PairStatus) -> bool,
) -> Result<()> {
    let end = Instant::now() + TIMEOUT;
    loop {
        if query_status(control).is_ok_and(|s| want(&s)) {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("{what} not within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
