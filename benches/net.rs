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
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use twinvm::net::netns::cleanup_stale;
use twinvm::net::probe::{decode_counter_reply, encode_counter_request};
use twinvm::net::{icmp_ping, CounterClient, NetNs};
use twinvm::replay::log::LogReader;

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
/// A reply later than this counts as lost.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);
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

/// One client loop's outcome.
#[derive(Default)]
struct LoopFigures {
    sent: u64,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl LoopFigures {
    fn lost(&self) -> u64 {
        self.sent - self.latencies.len() as u64
    }

    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn percentile_us(&self, p: usize) -> f64 {
        let mut v = self.latencies.clone();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_unstable();
        v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1e6
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

/// Sequential requests, one in flight.
fn closed_loop(client: &CounterClient, first_id: u64, requests: u64) -> LoopFigures {
    let mut figures = LoopFigures::default();
    let started = Instant::now();
    for id in first_id..first_id + requests {
        let sent = Instant::now();
        figures.sent += 1;
        if client
            .request(id, REPLY_TIMEOUT)
            .expect("request")
            .is_some()
        {
            figures.latencies.push(sent.elapsed());
        }
    }
    figures.elapsed = started.elapsed();
    figures
}

/// Requests at a fixed rate, whatever the replies; latency from the
/// moment each was sent.
fn open_loop(first_id: u64, requests: u64) -> LoopFigures {
    let socket = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap();
    socket.connect(SocketAddrV4::new(GUEST_IP, PORT)).unwrap();
    let receiver = socket.try_clone().unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let interval = Duration::from_nanos(1_000_000_000 / OPEN_RATE_PER_SEC);
    let started = Instant::now();
    let stop_at = started + interval * requests as u32 + REPLY_TIMEOUT;
    let received = std::thread::scope(|scope| {
        let collector = scope.spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while (got.len() as u64) < requests && Instant::now() < stop_at {
                if let Ok(n) = receiver.recv(&mut buf) {
                    if let Some((id, _)) = decode_counter_reply(&buf[..n]) {
                        got.push((id, Instant::now()));
                    }
                }
            }
            got
        });
        let mut sent_at = Vec::with_capacity(requests as usize);
        for i in 0..requests {
            let due = started + interval * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            sent_at.push(Instant::now());
            socket.send(&encode_counter_request(first_id + i)).unwrap();
        }
        (sent_at, collector.join().unwrap())
    });
    let (sent_at, replies) = received;
    let mut figures = LoopFigures {
        sent: requests,
        elapsed: started.elapsed(),
        ..LoopFigures::default()
    };
    for (id, at) in replies {
        if let Some(sent) = id
            .checked_sub(first_id)
            .and_then(|i| sent_at.get(i as usize))
        {
            figures.latencies.push(at.duration_since(*sent));
        }
    }
    figures
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
            let client = CounterClient::new(
                SocketAddr::from((HOST_IP, 0)),
                SocketAddr::from((GUEST_IP, PORT)),
            )
            .unwrap();
            closed_loop(&client, 1, WARMUP_REQUESTS);
            let before = file_len(&log);
            let closed = closed_loop(&client, 1_000_000, CLOSED_REQUESTS);
            let open = open_loop(2_000_000, OPEN_REQUESTS);
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
