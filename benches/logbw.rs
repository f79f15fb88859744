//! Log bandwidth benchmark: prints figures, asserts nothing about speed
//! (docs/benchmarks.md, "Log bandwidth").
//!
//! For each workload, side by side in one run: a plain run, a recording
//! to a real file (fsynced) and its replay. Reported: log Mbit/s (log
//! bytes over the recording's run time), sync points per second, pages per
//! sync point, log bytes per sync point and the vCPU state's share of
//! them, record/plain and replay/record
//! wall time, the shadow page-table flushes of the replay, the interrupts
//! the recorded guest took per second (every workload here unmasks only
//! IRQ0, so these are its timer ticks), interrupt-window exits per second
//! and PIT ticks caught up / dropped, and whether the
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
//! - `TWINVM_LOGBW_RUN_SCALE=F` the memwrite rows' length times F (default
//!   1: plain runs of ~3.5 s, the length of issue 14's table, so the fixed
//!   costs of a recording -- sending the working set once, the final
//!   digest, the fsync -- weigh as they did there);
//! - `TWINVM_LOGBW_DIR=DIR` where the logs go (default the temp dir; each
//!   is deleted after its replay);
//! - `TWINVM_LOGBW_MAX_GB=N` the most one recording may write (default 4):
//!   a row whose log passes it is reported as such, not finished (the
//!   heaviest rows log more than a gigabit per second, and `record` itself
//!   has no size bound yet: issue 14);
//! - `TWINVM_LOGBW_TICK_DEFERRAL_MS=N` the tick deferral of the plain run
//!   and the recording (default: the engine's default).
//! - `TWINVM_LOGBW_SYNC_BUDGET=N` the sync-point budget in percent of the
//!   plain run and the recording (default: the engine's, 5; 0 turns it off).
//! - `TWINVM_LOGBW_TICK_DELIVERY=RULE` the recording's tick delivery
//!   (`landmarks`, `window-exits`, `catch-up`; default as `twinvm record`);
//! - `TWINVM_LOGBW_PAGE_CACHE_MIB=N` the recording's page cache (default
//!   64; 0 sends every sync-point page whole, as log format 3 did).
//! - `TWINVM_LOGBW_HOT_PAGES=N` the recording's hot-page budget (pages
//!   its dirty-log harvests leave write-enabled; default: the engine's;
//!   0 re-protects every page at every harvest, as before).
//! - `TWINVM_LOGBW_SYNC_STATE_MS=N` the least time between the
//!   recording's sync points with state (catch-up; default: the engine's,
//!   50; a huge value leaves them out, as before log format 7).
//! - `TWINVM_LOGBW_LINUX=1` adds the opt-in Linux row (a user-space
//!   workload in Debian's kernel: three boots, 30-60 minutes here; its own
//!   variables in benches/logbw/linux.rs); `TWINVM_LOGBW_ROWS=Linux` runs
//!   only it.
//! - `RUST_LOG=...` the engine's logs on stderr, as for `twinvm` (for
//!   example `twinvm::replay::engine=trace`: every sync point and record
//!   with its time, which is how the held-tick deadline bug was found).

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use twinvm::devices::TickDelivery;
use twinvm::guests;
use twinvm::replay::engine::{
    Connections, ConsoleAndNet, Control, Ending, Engine, ExitStats, Inputs, LogSink,
    RecordSettings, Recorder, Role, RunReport, Stop,
};
use twinvm::replay::log::{LogReader, LogWriter, PageStats, StateStats};
use twinvm::replay::log_file::LogFile;
use twinvm::replay::machine;
use twinvm::replay::schedule::Schedule;
use twinvm::vmm::{sys, Kicker, VmConfig};

#[path = "logbw/linux.rs"]
mod linux;
#[path = "../tests/linux_guest/mod.rs"]
mod linux_guest;

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
        cmdline: "ws=4096 every=0 rounds=2100000000",
        mem_mib: 64,
    },
    // The same loop without the 4 MiB of random data the row above writes
    // (and logs, ~34 Mbit) before it: a CPU-bound guest's steady state.
    Row {
        label: "compute only (no stores), 4 KiB",
        guest: "memwrite",
        cmdline: "ws=4 every=0 rounds=2100000000",
        mem_mib: 64,
    },
    Row {
        label: "~1 MiB/s (130k stores/s) over 4 MiB",
        guest: "memwrite",
        cmdline: "ws=4096 every=2300 rounds=2100000000",
        mem_mib: 64,
    },
    Row {
        label: "~365k stores/s over 4 MiB",
        guest: "memwrite",
        cmdline: "ws=4096 every=800 rounds=2100000000",
        mem_mib: 64,
    },
    Row {
        label: "~10 MiB/s (1.3M stores/s) over 1 MiB",
        guest: "memwrite",
        cmdline: "ws=1024 every=230 rounds=2100000000",
        mem_mib: 64,
    },
    Row {
        label: "~10 MiB/s (1.3M stores/s) over 4 MiB",
        guest: "memwrite",
        cmdline: "ws=4096 every=230 rounds=2100000000",
        mem_mib: 64,
    },
    Row {
        label: "~10 MiB/s (1.3M stores/s) over 64 MiB",
        guest: "memwrite",
        cmdline: "ws=65536 every=230 rounds=2100000000",
        mem_mib: 128,
    },
    Row {
        label: "~100 MiB/s (13M stores/s) over 4 MiB",
        guest: "memwrite",
        cmdline: "ws=4096 every=23 rounds=2100000000",
        mem_mib: 64,
    },
    Row {
        label: "a store every round over 256 KiB",
        guest: "memwrite",
        cmdline: "ws=256 every=1 rounds=2100000000",
        mem_mib: 64,
    },
    Row {
        label: "a store every round over 4 MiB",
        guest: "memwrite",
        cmdline: "ws=4096 every=1 rounds=2100000000",
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
        cmdline: scaled_rounds(row.cmdline, run_scale()),
        mem_bytes: row.mem_mib << 20,
    }
}

/// `TWINVM_LOGBW_RUN_SCALE`: the memwrite rows' `rounds=` times this
/// (default 1: plain runs of 3.4-4.5 s here, as long as issue 14's table;
/// 0.2857 gives the ~1 s runs of the figures measured before 2026-11-27
/// 19:30 UTC, docs/benchmarks.md).
fn run_scale() -> f64 {
    std::env::var("TWINVM_LOGBW_RUN_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|scale| *scale > 0.0)
        .unwrap_or(1.0)
}

/// A guest command line with its `rounds=N` word multiplied by `scale`.
fn scaled_rounds(cmdline: &str, scale: f64) -> String {
    cmdline
        .split_whitespace()
        .map(|word| match word.strip_prefix("rounds=") {
            Some(n) => {
                let rounds: u64 = n.parse().expect("a row's rounds= is a number");
                format!("rounds={}", ((rounds as f64 * scale) as u64).max(1))
            }
            None => word.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
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
    if let Some(percent) = std::env::var("TWINVM_LOGBW_SYNC_BUDGET")
        .ok()
        .and_then(|v| v.parse::<u8>().ok())
    {
        settings.sync_budget_percent = percent.min(100);
    }
    if let Some(pages) = std::env::var("TWINVM_LOGBW_HOT_PAGES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        settings.hot_page_budget = pages;
    }
    if let Some(ms) = std::env::var("TWINVM_LOGBW_SYNC_STATE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        settings.sync_state_every = Duration::from_millis(ms);
    }
    settings
}

/// `TWINVM_LOGBW_TICK_DELIVERY`, if set: the recording's tick delivery
/// rule (landmarks, window-exits, catch-up; the replay follows the log).
fn chosen_delivery() -> Option<TickDelivery> {
    let name = std::env::var("TWINVM_LOGBW_TICK_DELIVERY").ok()?;
    match name.parse() {
        Ok(rule) => Some(rule),
        Err(e) => {
            eprintln!("logbw: TWINVM_LOGBW_TICK_DELIVERY: {e}");
            std::process::exit(2);
        }
    }
}

/// The RTC's boot time of every run (the same in a recording and its
/// replay).
const BOOT_UNIX_SECS: u64 = 1_700_000_000;

/// How one run is set up besides its guest and role.
struct Setup {
    settings: RecordSettings,
    /// How ticks reach the guest: the bench's choice for a recording or a
    /// plain run, the log header's for a replay.
    tick_delivery: TickDelivery,
    /// Where the guest's console goes.
    console: Box<dyn Write + Send>,
    /// Stop the guest after this long (the run then fails).
    timeout: Option<Duration>,
}

impl Setup {
    /// The memwrite and test-guest rows: the bench's settings, no console,
    /// no timeout (they end by themselves in seconds).
    fn quiet() -> Setup {
        Setup {
            settings: settings(),
            tick_delivery: chosen_delivery().unwrap_or_default(),
            console: Box::new(std::io::sink()),
            timeout: None,
        }
    }
}

/// Run `cfg` (named `label` in messages) in `role` with the vCPU thread on
/// `host_cpu`.
fn run(
    cfg: &VmConfig,
    label: &str,
    role: Role,
    host_cpu: u32,
    setup: Setup,
) -> Result<(RunReport, Engine), String> {
    let (vm, platform) =
        machine::build(cfg, BOOT_UNIX_SECS, setup.tick_delivery, None).expect("create VM");
    let (control, rx) = crossbeam_channel::bounded(1);
    let inputs = Inputs {
        control: rx,
        serial: None,
        net: None,
    };
    let outputs = Box::new(ConsoleAndNet {
        console: setup.console,
        net: None,
    });
    let kicker = Kicker::new();
    let mut engine = Engine::new(
        vm,
        platform,
        Connections {
            inputs,
            outputs,
            kicker: kicker.clone(),
        },
        role,
        setup.settings,
        Some(host_cpu),
    )
    .expect("engine");
    // A watchdog stops the guest at the timeout; the run's end (its
    // sender dropped) ends the watchdog.
    let (done, finished) = crossbeam_channel::bounded::<()>(0);
    let watchdog = setup.timeout.map(|limit| {
        thread::spawn(move || {
            if finished.recv_timeout(limit).is_err_and(|e| e.is_timeout()) {
                let _ = control.try_send(Control::Stop);
                kicker.kick();
            }
        })
    });
    let report = engine.run().map_err(|e| e.to_string());
    drop(done);
    if let Some(watchdog) = watchdog {
        watchdog.join().expect("the watchdog thread");
    }
    let report = report?;
    if report.ending() == Some(Ending::Stopped) {
        return Err(format!(
            "{label} did not finish within {:?}",
            setup.timeout.unwrap_or_default()
        ));
    }
    Ok((report, engine))
}

/// `twinvm record`'s log file (written behind the guest) that refuses to
/// grow past a bound (the write fails, so the recording stops with an
/// error instead of filling the disk). `written` is shared: the Linux row
/// reads it when its console markers arrive.
struct CappedLog {
    file: LogFile,
    written: Arc<AtomicU64>,
    cap: u64,
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.written.load(Ordering::Relaxed);
        if written + buf.len() as u64 > self.cap {
            return Err(io::Error::other(format!(
                "the log passed TWINVM_LOGBW_MAX_GB ({} bytes)",
                self.cap
            )));
        }
        let n = self.file.write(buf)?;
        self.written.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl LogSink for CappedLog {
    fn landmark_done(&mut self, landmark: u64) -> io::Result<()> {
        self.file.landmark_done(landmark)
    }
}

fn log_cap() -> u64 {
    std::env::var("TWINVM_LOGBW_MAX_GB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(4)
        << 30
}

/// What a recording gives back: its report, the wall time of the run
/// plus the final flush and fsync, and how its sync-point pages and vCPU
/// states travelled (whole, as deltas, ...).
struct Recorded {
    report: RunReport,
    wall: Duration,
    pages: PageStats,
    states: StateStats,
}

/// Record `cfg` to `path` (fsynced); `written` counts the log's bytes as
/// they go to the file.
fn record(
    cfg: &VmConfig,
    label: &str,
    path: &Path,
    host_cpu: u32,
    setup: Setup,
    written: Arc<AtomicU64>,
) -> Result<Recorded, String> {
    let file = File::create(path).unwrap();
    let sync = file.try_clone().unwrap();
    let header = twinvm::replay::log::LogHeader {
        tick_delivery: setup.tick_delivery,
        ..machine::header_for(cfg, BOOT_UNIX_SECS, host_cpu, None)
    };
    let writer: Box<dyn LogSink> = Box::new(CappedLog {
        file: LogFile::new(file).expect("the log writer thread"),
        written,
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
    let (report, mut engine) = run(cfg, label, Role::Record(recorder), host_cpu, setup)?;
    let started = Instant::now();
    let log = &mut engine.recorder_mut().unwrap().log;
    log.flush().unwrap();
    let pages = log.page_stats();
    let states = log.state_stats();
    sync.sync_all().unwrap();
    Ok(Recorded {
        report,
        wall: report.wall + started.elapsed(),
        pages,
        states,
    })
}

/// Replay the log at `path` to its end; it must be identical.
/// Replay the log at `path` to its end; with `catch_up`, as `twinvm replay
/// --catch-up` (load sync points with state instead of executing).
fn replay(
    cfg: &VmConfig,
    label: &str,
    path: &Path,
    host_cpu: u32,
    mut setup: Setup,
    catch_up: bool,
) -> Result<RunReport, String> {
    let input: Box<dyn Read + Send> = Box::new(BufReader::new(File::open(path).unwrap()));
    let reader = LogReader::new(input).unwrap();
    // As `twinvm replay`: the rule the log was recorded with.
    setup.tick_delivery = reader.header().tick_delivery;
    let mut schedule = Schedule::from_log(reader);
    if catch_up {
        schedule.set_catch_up(Some(Box::new(|| u64::MAX)));
    }
    let (report, _) = run(cfg, label, Role::Replay(schedule), host_cpu, setup)?;
    if !matches!(report.stop, Stop::Ended { log_end: true, .. }) {
        return Err(format!(
            "{label}: the replay did not reach the end of the log"
        ));
    }
    Ok(report)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn wanted(label: &str) -> bool {
    match std::env::var("TWINVM_LOGBW_ROWS") {
        Ok(words) => words
            .split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .any(|w| label.contains(w)),
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
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let host_cpu = sys::current_cpu().unwrap();

    println!(
        "twinvm log bandwidth benchmark, median of {runs} run(s) per mode, run scale {}, tick deferral {} ms, sync-point budget {}%, hot-page budget {}",
        run_scale(),
        settings().tick_deferral.as_millis(),
        settings().sync_budget_percent,
        settings().hot_page_budget
    );
    println!(
        "{:<40} {:>8} {:>8} {:>8} {:>7} {:>7} {:>9} {:>8} {:>8} {:>9} {:>6} {:>7} {:>8} {:>8} {:>6} {:>6} {:>6} {:>5} {:>7} {:>7} {:>7} {:>7} {:>7}",
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
        "sync us",
        "ticks/s",
        "win/s",
        "caught",
        "dropped"
    );
    for row in ROWS.iter().filter(|r| wanted(r.label)) {
        let mut plain = Vec::new();
        let mut recorded = Vec::new();
        let mut replayed = Vec::new();
        let mut last: Option<(ExitStats, Duration, ExitStats, PageStats, StateStats)> = None;
        let mut stopped = None;
        let cfg = config(row);
        for i in 0..runs {
            let (live, _) =
                run(&cfg, row.label, Role::Live, host_cpu, Setup::quiet()).expect("plain run");
            plain.push(live.wall);
            let path = dir.join(format!("{}-{i}.log", row.guest));
            let written = Arc::new(AtomicU64::new(0));
            let rec = match record(&cfg, row.label, &path, host_cpu, Setup::quiet(), written) {
                Ok(recorded) => recorded,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    stopped = Some(e);
                    break;
                }
            };
            recorded.push(rec.wall);
            let rep =
                replay(&cfg, row.label, &path, host_cpu, Setup::quiet(), false).expect("replay");
            replayed.push(rep.wall);
            std::fs::remove_file(&path).unwrap();
            let (stats, run_wall) = (rec.report.stats, rec.report.wall);
            last = Some((stats, run_wall, rep.stats, rec.pages, rec.states));
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
            "{:<40} {:>8.2} {:>8.2} {:>8.2} {:>7.2} {:>7.2} {:>9.2} {:>8.0} {:>8.1} {:>9.0} {:>6.0} {:>7} {:>8.2} {:>8.2} {:>6.1} {:>6.1} {:>6.1} {:>4}M {:>7.0} {:>7.0} {:>7.0} {:>7} {:>7}",
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
            s.interrupts_injected as f64 / secs,
            s.interrupt_windows as f64 / secs,
            s.pit_ticks_caught_up,
            s.pit_ticks_dropped,
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
    println!(
        "ticks/s: interrupts the recorded guest took per second (only IRQ0 is unmasked here: its ticks);"
    );
    println!(
        "win/s: interrupt-window exits per second; caught / dropped: PIT periods raised late (tick"
    );
    println!("catch-up) and dropped past the one-second bound, over the recording.");
    if wanted(linux::LABEL) {
        if !linux::enabled() {
            println!();
            println!(
                "{}: skipped (three boots of Debian's kernel, 30-60 minutes here; set TWINVM_LOGBW_LINUX=1)",
                linux::LABEL
            );
        } else if let Err(e) = linux::bench(&dir, host_cpu) {
            let _ = std::fs::remove_dir_all(&dir);
            panic!("{e}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
