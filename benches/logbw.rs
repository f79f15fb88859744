//! Log bandwidth benchmark: prints figures, asserts nothing about speed
//! (docs/benchmarks.md, "Log bandwidth").
//!
//! For each workload, side by side in one run: a plain run, a recording
//! to a real file (fsynced) and its replay. Reported: log Mbit/s (log
//! bytes over the recording's run time), sync points per second, pages per
//! sync point, log bytes per sync point and the vCPU state's share of
//! them, record/plain and replay/record
//! wall time, the shadow page-table flushes of the replay, and whether the
//! replay was identical (it must be: a replay that is not fails the run).
//!
//! Workloads: the `memwrite` guest (user-mode stores of random 8-byte
//! words over a working set at a set rate, 250 Hz timer) in the rows of
//! issue 14, plus the existing test guests.
//!
//! Run: `cargo bench --bench logbw` (as root; needs /dev/kvm). Environment:
//! - `TWINVM_LOGBW_ROWS=a,b,...` only the rows whose label contains one
//!   of these words;
//! - `TWINVM_LOGBW_RUNS=N` runs per mode, medians shown (default 1);
//! - `TWINVM_LOGBW_DIR=DIR` where the logs go (default the temp dir; each
//!   is deleted after its replay);
//! - `TWINVM_LOGBW_MAX_GB=N` the most one recording may write (default 4):
//!   a row whose log passes it is reported as such, not finished (the
//!   heaviest rows log more than a gigabit per second, and `record` itself
//!   has no size bound yet: issue 14);
//! - `TWINVM_LOGBW_TICK_DEFERRAL_MS=N` the tick deferral of the plain run
//!   and the recording (default: the engine's default).
//! - `TWINVM_LOGBW_PAGE_CACHE_MIB=N` the recording's page cache (default
//!   64; 0 sends every sync-point page whole, as log format 3 did).
//! - `TWINVM_LOGBW_HOT_PAGES=N` the recording's hot-page budget (pages
//!   its dirty-log harvests leave write-enabled; default: the engine's;
//!   0 re-protects every page at every harvest, as before).

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use twinvm::devices::Platform;
use twinvm::guests;
use twinvm::replay::engine::{
    Connections, ConsoleAndNet, Ending, Engine, ExitStats, Inputs, LogSink, RecordSettings,
    Recorder, Role, RunReport, Stop,
};
use twinvm::replay::log::{LogHeader, LogReader, LogWriter, PageStats, StateStats};
use twinvm::replay::schedule::Schedule;
use twinvm::vmm::{sys, Kicker, Vm, VmConfig};

/// One workload.
struct Row {
    label: &'static str,
    guest: &'static str,
    cmdline: &'static str,
    mem_mib: u64,
}

const ROWS: &[Row] = &[
    Row {
        label: "compute only (no stores), 4 MiB",
        guest: "memwrite",
        cmdline: "ws=4096 every=0 rounds=600000000",
        mem_mib: 64,
    },
    // The same loop without the 4 MiB of random data the row above writes
    // (and logs, ~34 Mbit) before it: a CPU-bound guest's steady state.
    Row {
        label: "compute only (no stores), 4 KiB",
        guest: "memwrite",
        cmdline: "ws=4 every=0 rounds=600000000",
        mem_mib: 64,
    },
    Row {
        label: "~1 MiB/s (130k stores/s) over 4 MiB",
        guest: "memwrite",
        cmdline: "ws=4096 every=2300 rounds=600000000",
        mem_mib: 64,
    },
    Row {
        label: "~365k stores/s over 4 MiB",
        guest: "memwrite",
        cmdline: "ws=4096 every=800 rounds=600000000",
        mem_mib: 64,
    },
    Row {
        label: "~10 MiB/s (1.3M stores/s) over 1 MiB",
        guest: "memwrite",
        cmdline: "ws=1024 every=230 rounds=600000000",
        mem_mib: 64,
    },
    Row {
        label: "~10 MiB/s (1.3M stores/s) over 4 MiB",
        guest: "memwrite",
        cmdline: "ws=4096 every=230 rounds=600000000",
        mem_mib: 64,
    },
    Row {
        label: "~10 MiB/s (1.3M stores/s) over 64 MiB",
        guest: "memwrite",
        cmdline: "ws=65536 every=230 rounds=600000000",
        mem_mib: 128,
    },
    Row {
        label: "~100 MiB/s (13M stores/s) over 4 MiB",
        guest: "memwrite",
        cmdline: "ws=4096 every=23 rounds=600000000",
        mem_mib: 64,
    },
    Row {
        label: "a store every round over 256 KiB",
        guest: "memwrite",
        cmdline: "ws=256 every=1 rounds=600000000",
        mem_mib: 64,
    },
    Row {
        label: "a store every round over 4 MiB",
        guest: "memwrite",
        cmdline: "ws=4096 every=1 rounds=150000000",
        mem_mib: 64,
    },
    Row {
        label: "guest ticker",
        guest: "ticker",
        cmdline: "",
        mem_mib: 64,
    },
    Row {
        label: "guest storm",
        guest: "storm",
        cmdline: "",
        mem_mib: 64,
    },
    Row {
        label: "guest remap",
        guest: "remap",
        cmdline: "",
        mem_mib: 64,
    },
    Row {
        label: "guest portio",
        guest: "portio",
        cmdline: "",
        mem_mib: 64,
    },
];

fn config(row: &Row) -> VmConfig {
    VmConfig {
        kernel_name: format!("builtin:{}", row.guest),
        kernel: guests::builtin(row.guest).expect("guest").to_vec(),
        initrd: None,
        cmdline: row.cmdline.to_string(),
        mem_bytes: row.mem_mib << 20,
    }
}

/// The engine's settings, with `TWINVM_LOGBW_TICK_DEFERRAL_MS` applied.
fn settings() -> RecordSettings {
    let mut settings = RecordSettings::default();
    if let Some(ms) = std::env::var("TWINVM_LOGBW_TICK_DEFERRAL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        settings.tick_deferral = Duration::from_millis(ms);
    }
    if let Some(pages) = std::env::var("TWINVM_LOGBW_HOT_PAGES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        settings.hot_page_budget = pages;
    }
    settings
}

/// Run `row` in `role` with the vCPU thread on `host_cpu`; the console
/// output comes back with the report.
fn run(row: &Row, role: Role, host_cpu: u32) -> Result<(RunReport, Engine), String> {
    let vm = Vm::create(&config(row)).expect("create VM");
    let platform = Platform::new(Vec::new(), 1_700_000_000);
    let (_tx, rx) = crossbeam_channel::bounded(1);
    let inputs = Inputs {
        control: rx,
        serial: None,
        net: None,
    };
    let outputs = Box::new(ConsoleAndNet {
        console: Box::new(std::io::sink()),
        net: None,
    });
    let mut engine = Engine::new(
        vm,
        platform,
        Connections {
            inputs,
            outputs,
            kicker: Kicker::new(),
        },
        role,
        settings(),
        Some(host_cpu),
    )
    .expect("engine");
    let report = engine.run().map_err(|e| e.to_string())?;
    assert_ne!(
        report.ending(),
        Some(Ending::Stopped),
        "{} did not finish",
        row.label
    );
    Ok((report, engine))
}

/// A log file that refuses to grow past a bound (the write fails, so the
/// recording stops with an error instead of filling the disk).
struct CappedLog {
    file: BufWriter<File>,
    written: u64,
    cap: u64,
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.cap {
            return Err(io::Error::other(format!(
                "the log passed TWINVM_LOGBW_MAX_GB ({} bytes)",
                self.cap
            )));
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl LogSink for CappedLog {}

fn log_cap() -> u64 {
    std::env::var("TWINVM_LOGBW_MAX_GB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(4)
        << 30
}

/// Record `row` to `path` (fsynced): the report and the wall time of the
/// run plus the final flush and fsync.
/// Also how its sync-point pages and vCPU states travelled (whole, as
/// deltas, ...).
fn record(
    row: &Row,
    path: &Path,
    host_cpu: u32,
) -> Result<(RunReport, Duration, PageStats, StateStats), String> {
    let file = File::create(path).unwrap();
    let sync = file.try_clone().unwrap();
    let cfg = config(row);
    let header = LogHeader {
        kernel_hash: blake3::hash(&cfg.kernel).into(),
        initrd_hash: None,
        cmdline: cfg.cmdline.clone(),
        mem_bytes: cfg.mem_bytes,
        boot_unix_secs: 1_700_000_000,
        host_cpu,
        net_mac: None,
    };
    let writer: Box<dyn LogSink> = Box::new(CappedLog {
        file: BufWriter::new(file),
        written: 0,
        cap: log_cap(),
    });
    let mut log = LogWriter::new(writer, &header).unwrap();
    if let Some(mib) = std::env::var("TWINVM_LOGBW_PAGE_CACHE_MIB")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        log.set_page_cache(mib * 256).unwrap();
    }
    let recorder = Recorder { log };
    let (report, mut engine) = run(row, Role::Record(recorder), host_cpu)?;
    let started = Instant::now();
    let log = &mut engine.recorder_mut().unwrap().log;
    log.flush().unwrap();
    let pages = log.page_stats();
    let states = log.state_stats();
    sync.sync_all().unwrap();
    Ok((report, report.wall + started.elapsed(), pages, states))
}

/// Replay the log at `path` to its end; it must be identical.
fn replay(row: &Row, path: &Path, host_cpu: u32) -> RunReport {
    let input: Box<dyn Read + Send> = Box::new(BufReader::new(File::open(path).unwrap()));
    let schedule = Schedule::from_log(LogReader::new(input).unwrap());
    let (report, _) = run(row, Role::Replay(schedule), host_cpu).expect("replay");
    assert!(
        matches!(report.stop, Stop::Ended { log_end: true, .. }),
        "{}: the replay did not reach the end of the log",
        row.label
    );
    report
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn wanted(row: &Row) -> bool {
    match std::env::var("TWINVM_LOGBW_ROWS") {
        Ok(words) => words
            .split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .any(|w| row.label.contains(w)),
        Err(_) => true,
    }
}

fn main() {
    let dir = std::env::var_os("TWINVM_LOGBW_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("twinvm-logbw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let runs: usize = std::env::var("TWINVM_LOGBW_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let host_cpu = sys::current_cpu().unwrap();

    println!(
        "twinvm log bandwidth benchmark, median of {runs} run(s) per mode, tick deferral {} ms, hot-page budget {}",
        settings().tick_deferral.as_millis(),
        settings().hot_page_budget
    );
    println!(
        "{:<40} {:>8} {:>8} {:>8} {:>7} {:>7} {:>9} {:>8} {:>8} {:>9} {:>6} {:>7} {:>8} {:>8} {:>6} {:>6} {:>6} {:>5} {:>7}",
        "workload",
        "plain s",
        "rec s",
        "rep s",
        "rec/pl",
        "rep/rec",
        "log Mb/s",
        "syncs/s",
        "pg/sync",
        "B/sync",
        "cpu B",
        "flushes",
        "tick ms",
        "tick max",
        "whole%",
        "delta%",
        "same%",
        "cache",
        "sync us"
    );
    for row in ROWS.iter().filter(|r| wanted(r)) {
        let mut plain = Vec::new();
        let mut recorded = Vec::new();
        let mut replayed = Vec::new();
        let mut last: Option<(ExitStats, Duration, ExitStats, PageStats, StateStats)> = None;
        let mut stopped = None;
        for i in 0..runs {
            plain.push(run(row, Role::Live, host_cpu).expect("plain run").0.wall);
            let path = dir.join(format!("{}-{i}.log", row.guest));
            let (rec, wall, pages, states) = match record(row, &path, host_cpu) {
                Ok(recorded) => recorded,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    stopped = Some(e);
                    break;
                }
            };
            recorded.push(wall);
            let rep = replay(row, &path, host_cpu);
            replayed.push(rep.wall);
            std::fs::remove_file(&path).unwrap();
            last = Some((rec.stats, rec.wall, rep.stats, pages, states));
        }
        if let Some(why) = stopped {
            println!(
                "{:<40} {:>8.2} recording stopped: {why}",
                row.label,
                median(plain).as_secs_f64()
            );
            continue;
        }
        let (s, rec_run, rep, pages, states) = last.unwrap();
        let carried = (pages.full + pages.delta + pages.same + pages.zero).max(1) as f64;
        let (plain, recorded, replayed) = (median(plain), median(recorded), median(replayed));
        let secs = rec_run.as_secs_f64();
        println!(
            "{:<40} {:>8.2} {:>8.2} {:>8.2} {:>7.2} {:>7.2} {:>9.2} {:>8.0} {:>8.1} {:>9.0} {:>6.0} {:>7} {:>8.2} {:>8.2} {:>6.1} {:>6.1} {:>6.1} {:>4}M {:>7.0}",
            row.label,
            plain.as_secs_f64(),
            recorded.as_secs_f64(),
            replayed.as_secs_f64(),
            recorded.as_secs_f64() / plain.as_secs_f64(),
            replayed.as_secs_f64() / recorded.as_secs_f64(),
            s.log_bytes as f64 * 8.0 / secs / 1e6,
            s.sync_points as f64 / secs,
            s.sync_point_pages as f64 / s.sync_points.max(1) as f64,
            s.sync_point_bytes as f64 / s.sync_points.max(1) as f64,
            states.bytes as f64 / (states.whole + states.delta).max(1) as f64,
            rep.shadow_mmu_flushes,
            s.timer_poll_delay_total.as_secs_f64() * 1e3 / s.timer_polls.max(1) as f64,
            s.timer_poll_delay_max.as_secs_f64() * 1e3,
            pages.full as f64 * 100.0 / carried,
            pages.delta as f64 * 100.0 / carried,
            pages.same as f64 * 100.0 / carried,
            pages.cache_bytes >> 20,
            s.sync_point_time.as_secs_f64() * 1e6 / s.sync_points.max(1) as f64,
        );
    }
    println!();
    println!(
        "log Mb/s: log bytes x 8 / the recording's run time / 1e6. pg/sync: pages a sync point"
    );
    println!(
        "carries; B/sync: log bytes per sync point, cpu B the vCPU state's share (log format 5:"
    );
    println!(
        "whole or a delta against the previous sync point's). flushes: the replay's shadow page-table zaps."
    );
    println!(
        "tick ms / tick max: how late past its deadline the recording raised a timer tick, mean / max."
    );
    println!(
        "whole/delta/same%: of the pages carried, those sent whole, as a delta against the page"
    );
    println!("cache, unchanged (the rest are zero pages); cache: its contents at the end.");
    println!(
        "sync us: the recording's mean time making one sync point (dirty log, pages, log write)."
    );
    let _ = std::fs::remove_dir_all(&dir);
}
