//! Record/replay benchmark: prints figures, asserts nothing about speed.
//!
//! For each test guest, side by side in one run: plain run vs record wall
//! time, replay vs record, log bytes per second, sync points per second and
//! their mean size, and what digests cost on each side. Then what the digest
//! interval costs (a few guests at 16, 256 and 4096 landmarks) and what the
//! whole-memory hash costs when an engine starts. Logs go to real files
//! (fsynced).
//!
//! Run: `cargo bench --bench replay` (as root; needs /dev/kvm).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::path::Path;
use std::time::{Duration, Instant};

use twinvm::devices::Platform;
use twinvm::guests;
use twinvm::replay::engine::{
    Connections, ConsoleAndNet, Ending, Engine, Inputs, LogSink, RecordSettings, Recorder, Role,
    RunReport, Stop,
};
use twinvm::replay::log::{LogHeader, LogReader, LogWriter};
use twinvm::replay::schedule::Schedule;
use twinvm::vmm::{sys, Kicker, Vm, VmConfig};

const MEM_BYTES: u64 = 64 << 20;

fn config(name: &str) -> VmConfig {
    VmConfig {
        kernel_name: format!("builtin:{name}"),
        kernel: guests::builtin(name).expect("guest").to_vec(),
        initrd: None,
        cmdline: String::new(),
        mem_bytes: MEM_BYTES,
    }
}

/// One finished run.
struct Outcome {
    report: RunReport,
    engine: Engine,
    /// `Engine::new`: mostly hashing all of guest memory once.
    setup: Duration,
}

/// Run `name` in `role` with the vCPU thread on `host_cpu` (every role on
/// the same CPU, as record and replay pin).
fn run(name: &str, role: Role, settings: RecordSettings, host_cpu: u32) -> Outcome {
    let vm = Vm::create(&config(name)).expect("create VM");
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
    let started = Instant::now();
    let mut engine = Engine::new(
        vm,
        platform,
        Connections {
            inputs,
            outputs,
            kicker: Kicker::new(),
        },
        role,
        settings,
        Some(host_cpu),
    )
    .expect("engine");
    let setup = started.elapsed();
    let report = engine.run().expect("run");
    assert_ne!(
        report.ending(),
        Some(Ending::Stopped),
        "{name} did not finish"
    );
    Outcome {
        report,
        engine,
        setup,
    }
}

/// Record `name` to `path` (fsynced); returns the recording's report and
/// its wall time including VM creation and the fsync.
fn record(
    name: &str,
    path: &Path,
    settings: RecordSettings,
    host_cpu: u32,
) -> (RunReport, Duration) {
    let file = File::create(path).unwrap();
    let sync = file.try_clone().unwrap();
    let cfg = config(name);
    let header = LogHeader {
        kernel_hash: blake3::hash(&cfg.kernel).into(),
        initrd_hash: None,
        cmdline: String::new(),
        mem_bytes: cfg.mem_bytes,
        boot_unix_secs: 1_700_000_000,
        host_cpu,
        net_mac: None,
        // No tick deferral here, so no catch-up (as `twinvm record`).
        tick_delivery: twinvm::devices::TickDelivery::AtLandmarks,
    };
    let writer: Box<dyn LogSink> = Box::new(BufWriter::new(file));
    let recorder = Recorder {
        log: LogWriter::new(writer, &header).unwrap(),
    };
    let started = Instant::now();
    let mut out = run(name, Role::Record(recorder), settings, host_cpu);
    out.engine.recorder_mut().unwrap().log.flush().unwrap();
    sync.sync_all().unwrap();
    (out.report, started.elapsed())
}

/// Replay the log at `path` to its end.
fn replay(name: &str, path: &Path, host_cpu: u32) -> Outcome {
    let input: Box<dyn Read + Send> = Box::new(BufReader::new(File::open(path).unwrap()));
    let schedule = Schedule::from_log(LogReader::new(input).unwrap());
    let out = run(
        name,
        Role::Replay(schedule),
        RecordSettings::default(),
        host_cpu,
    );
    assert!(
        matches!(out.report.stop, Stop::Ended { log_end: true, .. }),
        "{name}: replay did not reach the end of the log"
    );
    out
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let dir = std::env::temp_dir().join(format!("twinvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // As `twinvm record`/`replay` do: one host CPU for every run (user-mode
    // CPUID reports it).
    let host_cpu = sys::current_cpu().unwrap();
    let default = RecordSettings::default();
    let mut setups = Vec::new();

    println!("twinvm record/replay benchmark, median of 3 runs per mode");
    println!(
        "{:<7} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10} {:>8} {:>10} {:>9} {:>10} {:>10}",
        "guest",
        "plain ms",
        "record ms",
        "replay ms",
        "rec/pln",
        "rep/rec",
        "log KiB/s",
        "syncs/s",
        "B/sync",
        "digests",
        "digest ms",
        "rep dig ms"
    );
    for name in ["hello", "ticker", "storm", "portio"] {
        let mut plain = Vec::new();
        let mut record_wall = Vec::new();
        let mut replay_wall = Vec::new();
        let mut replay_digest = Vec::new();
        let mut last_record = None;
        for i in 0..3 {
            let live = run(name, Role::Live, default, host_cpu);
            plain.push(live.report.wall);
            setups.push(live.setup);

            let path = dir.join(format!("{name}-{i}.log"));
            let (r, wall) = record(name, &path, default, host_cpu);
            record_wall.push(wall);
            let rep = replay(name, &path, host_cpu);
            replay_wall.push(rep.report.wall);
            replay_digest.push(rep.report.stats.digest_time);
            last_record = Some(r);
            std::fs::remove_file(&path).unwrap();
        }
        let (plain, record_wall, replay_wall) =
            (median(plain), median(record_wall), median(replay_wall));
        let r = last_record.unwrap();
        let s = &r.stats;
        let secs = r.wall.as_secs_f64();
        let sync_bytes = s.sync_point_bytes.checked_div(s.sync_points).unwrap_or(0);
        println!(
            "{:<7} {:>9.1} {:>9.1} {:>9.1} {:>8.2} {:>8.2} {:>10.0} {:>8.0} {:>10} {:>9} {:>10.2} {:>10.2}",
            name,
            ms(plain),
            ms(record_wall),
            ms(replay_wall),
            record_wall.as_secs_f64() / plain.as_secs_f64(),
            replay_wall.as_secs_f64() / record_wall.as_secs_f64(),
            s.log_bytes as f64 / secs / 1024.0,
            s.sync_points as f64 / secs,
            sync_bytes,
            s.digests,
            ms(s.digest_time),
            ms(median(replay_digest))
        );
    }
    println!();
    println!("B/sync: mean log bytes per sync point (vCPU state + dirtied pages + framing).");
    println!(
        "digest ms / rep dig ms: total time spent computing digests while recording / replaying."
    );

    println!();
    println!("digest interval (record --digest-interval), median of 3 runs each");
    println!(
        "{:<7} {:>9} {:>9} {:>9} {:>8} {:>10} {:>10} {:>12}",
        "guest",
        "interval",
        "record ms",
        "replay ms",
        "digests",
        "digest ms",
        "rep dig ms",
        "pages/digest"
    );
    for name in ["ticker", "storm", "portio"] {
        for interval in [16, 256, 4096] {
            let settings = RecordSettings {
                digest_interval: interval,
                ..default
            };
            let mut record_wall = Vec::new();
            let mut replay_wall = Vec::new();
            let mut record_digest = Vec::new();
            let mut replay_digest = Vec::new();
            let mut last = None;
            for i in 0..3 {
                let path = dir.join(format!("{name}-{interval}-{i}.log"));
                let (r, wall) = record(name, &path, settings, host_cpu);
                record_wall.push(wall);
                record_digest.push(r.stats.digest_time);
                let rep = replay(name, &path, host_cpu);
                replay_wall.push(rep.report.wall);
                replay_digest.push(rep.report.stats.digest_time);
                last = Some(r.stats);
                std::fs::remove_file(&path).unwrap();
            }
            let s = last.unwrap();
            println!(
                "{:<7} {:>9} {:>9.1} {:>9.1} {:>8} {:>10.2} {:>10.2} {:>12.1}",
                name,
                interval,
                ms(median(record_wall)),
                ms(median(replay_wall)),
                s.digests,
                ms(median(record_digest)),
                ms(median(replay_digest)),
                s.digest_pages as f64 / s.digests.max(1) as f64
            );
        }
    }

    println!();
    println!(
        "engine start (Engine::new, whole-memory hash of {} MiB): median {:.1} ms of {} runs",
        MEM_BYTES >> 20,
        ms(median(setups.clone())),
        setups.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
