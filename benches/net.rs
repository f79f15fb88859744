//! Network benchmark: prints figures, asserts nothing about speed.
//!
//! The `counter` guest behind a persistent TAP in a network namespace, under
//! `twinvm run` and `twinvm record`, measured side by side in one run (the
//! modes interleaved, several rounds):
//! - a closed-loop client (one request in flight): requests per second and
//!   latency p50/p99;
//! - an open-loop client (requests sent at a fixed rate whatever the
//!   replies): latency p50/p99 and requests left unanswered;
//! - for `record`: log bytes per received frame and per second during that
//!   load, and where the log's bytes go by record kind.
//!
//! Run: `cargo bench --bench net` (root: /dev/kvm, /dev/net/tun, namespaces).
//! To compare builds of twinvm (e.g. with a local change), name them:
//! `TWINVM_NET_BENCH_BINARIES="rule=target/release/twinvm,other=/tmp/twinvm-other"`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use twinvm::net::netns::cleanup_stale;
use twinvm::net::{icmp_ping, NetNs};
use twinvm::replay::log::LogReader;

#[path = "common/counter_load.rs"]
mod counter_load;
use counter_load::{closed_loop, open_loop, LoopFigures, REPLY_TIMEOUT};

const PREFIX: &str = "twinvm-netbench";
const TAP: &str = "tb0";
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const PORT: u16 = 7777;
const ROUNDS: usize = 5;
const WARMUP_REQUESTS: u64 = 100;
const CLOSED_REQUESTS: u64 = 3000;
const OPEN_RATE_PER_SEC: u64 = 1000;
const OPEN_REQUESTS: u64 = 3000;
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    Run,
    Record,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Run => "run",
            Mode::Record => "record",
        }
    }
}

/// One twinvm process under both loads.
struct Sample {
    closed: LoopFigures,
    open: LoopFigures,
    /// Log bytes written during the two loads (record only).
    load_log_bytes: u64,
    /// `shadow-mmu-flushes=N` from `--stats`.
    shadow_flushes: u64,
    /// Bytes and records per record kind over the whole log (record only).
    log_kinds: BTreeMap<&'static str, (u64, u64)>,
}

fn binaries() -> Vec<(String, PathBuf)> {
    match std::env::var("TWINVM_NET_BENCH_BINARIES") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|item| {
                let (label, path) = item.split_once('=').unwrap_or_else(|| {
                    panic!("TWINVM_NET_BENCH_BINARIES: `{item}` is not LABEL=PATH")
                });
                (label.to_string(), PathBuf::from(path))
            })
            .collect(),
        _ => vec![(
            "this build".to_string(),
            PathBuf::from(env!("CARGO_BIN_EXE_twinvm")),
        )],
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Wait until `path` (the guest's console) contains `text`.
fn wait_for_console(child: &mut Child, path: &Path, text: &str) {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(text)) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("twinvm exited ({status}) before printing {text:?}");
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} within {BOOT_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Bytes and records per record kind in a log.
fn log_kinds(path: &Path) -> BTreeMap<&'static str, (u64, u64)> {
    let input: Box<dyn Read> = Box::new(BufReader::new(File::open(path).unwrap()));
    let mut reader = LogReader::new(input).unwrap();
    let mut kinds = BTreeMap::new();
    let mut offset = reader.offset();
    while let Some(record) = reader.next_record().unwrap() {
        let entry = kinds.entry(record.kind_name()).or_insert((0, 0));
        entry.0 += reader.offset() - offset;
        entry.1 += 1;
        offset = reader.offset();
    }
    kinds
}

fn stats_value(stderr: &str, key: &str) -> u64 {
    stderr
        .split(&format!("{key}="))
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {stderr}"))
}

/// Boot the counter guest in `mode` with `binary`, put both loads on it,
/// stop it (SIGTERM) and collect its figures.
fn measure(ns: &NetNs, binary: &Path, mode: Mode, dir: &Path) -> Sample {
    let console = dir.join("console.txt");
    let log = dir.join("counter.log");
    let _ = std::fs::remove_file(&console);
    let _ = std::fs::remove_file(&log);
    let mut cmd = ns.command(binary);
    cmd.arg(mode.name());
    if mode == Mode::Record {
        cmd.arg("--log").arg(&log);
    }
    cmd.args([
        "--kernel",
        "builtin:counter",
        "--mem",
        "64M",
        "--net",
        &format!("tap={TAP}"),
        "--stats",
        "--serial",
    ])
    .arg(&console)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("starting twinvm");
    wait_for_console(&mut child, &console, "counter: ready");

    let (closed, open, load_log_bytes) = ns
        .enter_on_thread(|| {
            let rtt = icmp_ping(GUEST_IP, 0x6e62, 0, BOOT_TIMEOUT).expect("ping");
            assert!(rtt.is_some(), "the guest does not answer ping");
            let bind = SocketAddr::from((HOST_IP, 0));
            let target = SocketAddr::from((GUEST_IP, PORT));
            closed_loop(bind, target, 1, 1, WARMUP_REQUESTS).expect("warm-up");
            let before = file_len(&log);
            let closed =
                closed_loop(bind, target, 1, 1_000_000, CLOSED_REQUESTS).expect("closed loop");
            let open = open_loop(bind, target, OPEN_RATE_PER_SEC, 2_000_000, OPEN_REQUESTS)
                .expect("open loop");
            (closed, open, file_len(&log) - before)
        })
        .unwrap();

    // A child not yet reaped (`ip netns exec` execs twinvm in place): its
    // PID names no other process.
    let signalled = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(signalled.success(), "signalling twinvm: {signalled}");
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("twinvm did not stop within {EXIT_TIMEOUT:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let log_kinds = if mode == Mode::Record {
        log_kinds(&log)
    } else {
        BTreeMap::new()
    };
    Sample {
        closed,
        open,
        load_log_bytes,
        shadow_flushes: stats_value(&stderr, "shadow-mmu-flushes"),
        log_kinds,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let ns = match cleanup_stale(PREFIX).and_then(|_| NetNs::create(PREFIX)) {
        Ok(ns) => ns,
        Err(e) => {
            println!("net benchmark skipped: cannot create a network namespace ({e}); run as root");
            return;
        }
    };
    // No IPv6 chatter on the TAP: every frame is a request or ARP.
    ns.enter_on_thread(|| {
        for conf in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
        }
    })
    .unwrap();
    ns.add_tap(TAP).unwrap();
    ns.addr_add(TAP, "10.77.0.1/24").unwrap();
    let dir = std::env::temp_dir().join(format!("twinvm-netbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let binaries = binaries();

    println!(
        "twinvm network benchmark: counter guest, {CLOSED_REQUESTS} closed-loop requests then \
         {OPEN_REQUESTS} open-loop at {OPEN_RATE_PER_SEC}/s per process, {ROUNDS} rounds, \
         modes interleaved; medians over rounds"
    );
    let mut samples: BTreeMap<(usize, Mode), Vec<Sample>> = BTreeMap::new();
    for round in 0..ROUNDS {
        for (b, (label, path)) in binaries.iter().enumerate() {
            for mode in [Mode::Run, Mode::Record] {
                let sample = measure(&ns, path, mode, &dir);
                eprintln!(
                    "round {round} {label} {}: closed {:.0}/s p50 {:.0} us, open p50 {:.0} us, {} lost, {} flushes",
                    mode.name(),
                    sample.closed.rate(),
                    sample.closed.percentile_us(50),
                    sample.open.percentile_us(50),
                    sample.closed.lost() + sample.open.lost(),
                    sample.shadow_flushes
                );
                samples.entry((b, mode)).or_default().push(sample);
            }
        }
    }

    println!();
    println!(
        "{:<12} {:<7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>10} {:>6} {:>8}",
        "build",
        "mode",
        "closed/s",
        "p50 us",
        "p99 us",
        "open p50",
        "open p99",
        "lost",
        "log B/fr",
        "log KiB/s",
        "syncs",
        "flushes"
    );
    for ((b, mode), runs) in &samples {
        let m = |f: &dyn Fn(&Sample) -> f64| median(runs.iter().map(f).collect());
        let frames = (CLOSED_REQUESTS + OPEN_REQUESTS) as f64;
        let (log_per_frame, log_per_sec, syncs) = if *mode == Mode::Record {
            (
                format!("{:.0}", m(&|s| s.load_log_bytes as f64 / frames)),
                format!(
                    "{:.1}",
                    m(&|s| {
                        s.load_log_bytes as f64
                            / (s.closed.elapsed + s.open.elapsed).as_secs_f64()
                            / 1024.0
                    })
                ),
                format!(
                    "{:.0}",
                    m(&|s| s.log_kinds.get("sync-point").map_or(0, |k| k.1) as f64)
                ),
            )
        } else {
            ("-".into(), "-".into(), "-".into())
        };
        println!(
            "{:<12} {:<7} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>6.0} {:>9} {:>10} {:>6} {:>8.0}",
            binaries[*b].0,
            mode.name(),
            m(&|s| s.closed.rate()),
            m(&|s| s.closed.percentile_us(50)),
            m(&|s| s.closed.percentile_us(99)),
            m(&|s| s.open.percentile_us(50)),
            m(&|s| s.open.percentile_us(99)),
            m(&|s| (s.closed.lost() + s.open.lost()) as f64),
            log_per_frame,
            log_per_sec,
            syncs,
            m(&|s| s.shadow_flushes as f64)
        );
    }

    for (b, (label, _)) in binaries.iter().enumerate() {
        let Some(last) = samples.get(&(b, Mode::Record)).and_then(|r| r.last()) else {
            continue;
        };
        println!();
        println!("log of the last `{label}` recording by record kind (whole run, boot included):");
        println!(
            "{:<14} {:>8} {:>10} {:>8}",
            "kind", "records", "bytes", "B/rec"
        );
        for (kind, (bytes, count)) in &last.log_kinds {
            println!(
                "{kind:<14} {count:>8} {bytes:>10} {:>8.1}",
                *bytes as f64 / *count as f64
            );
        }
    }
    println!();
    println!(
        "closed/s, p50, p99: closed loop (one request in flight), replies per second and latency."
    );
    println!("open p50/p99: open loop at {OPEN_RATE_PER_SEC}/s, latency from each send; lost: no reply within {REPLY_TIMEOUT:?}.");
    println!("log B/fr, log KiB/s: log growth during both loads per request frame received, and per second.");
    println!(
        "syncs: sync points in the recording (whole run); flushes: KVM shadow page-table flushes the process made (--stats)."
    );
    let _ = std::fs::remove_dir_all(&dir);
}
