//! Record/replay benchmark: prints figures, asserts nothing about speed.
//!
//! For each test guest, side by side in one run: plain run vs record wall
//! time, replay vs record, log bytes per second, sync points per second and
//! their mean size, and what digests cost. Logs go to real files (fsynced).
//!
//! Run: `cargo bench --bench replay` (as root; needs /dev/kvm).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::time::{Duration, Instant};

use twinvm::devices::Platform;
use twinvm::guests;
use twinvm::replay::log::{LogHeader, LogReader, LogWriter};
use twinvm::replay::schedule::Schedule;
use twinvm::vmm::{self, sys, Kicker, Mode, RecordSettings, Recorder, RunReport, Vm, VmConfig};

fn config(name: &str) -> VmConfig {
    VmConfig {
        kernel_name: format!("builtin:{name}"),
        kernel: guests::builtin(name).expect("guest").to_vec(),
        initrd: None,
        cmdline: String::new(),
        mem_bytes: 64 << 20,
    }
}

/// Run `name` in `mode` with the vCPU thread on `host_cpu` (every mode on
/// the same CPU, as record and replay pin).
fn run(name: &str, mode: Mode<'_>, host_cpu: u32) -> RunReport {
    let mut vm = Vm::create(&config(name)).expect("create VM");
    let mut platform = Platform::new(std::io::sink(), 1_700_000_000);
    let (_tx, rx) = crossbeam_channel::unbounded();
    let kicker = Kicker::for_current_thread().expect("kicker");
    let report = vmm::run(&mut vm, &mut platform, &rx, kicker, mode, Some(host_cpu)).expect("run");
    assert_ne!(report.ending, vmm::Ending::Stopped, "{name} did not finish");
    report
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let dir = std::env::temp_dir().join(format!("twinvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // As `twinvm record`/`replay` do: one host CPU for every run (user-mode
    // CPUID reports it).
    let host_cpu = sys::current_cpu().unwrap();
    println!("twinvm record/replay benchmark, median of 3 runs per mode");
    println!(
        "{:<7} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10} {:>8} {:>10} {:>9} {:>10}",
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
        "digest ms"
    );
    for name in ["hello", "ticker", "storm", "portio"] {
        let mut plain = Vec::new();
        let mut record = Vec::new();
        let mut replay = Vec::new();
        let mut last_record = None;
        for i in 0..3 {
            plain.push(run(name, Mode::Live, host_cpu).wall);

            let path = dir.join(format!("{name}-{i}.log"));
            let file = File::create(&path).unwrap();
            let sync = file.try_clone().unwrap();
            let cfg = config(name);
            let header = LogHeader {
                kernel_hash: blake3::hash(&cfg.kernel).into(),
                initrd_hash: None,
                cmdline: String::new(),
                mem_bytes: cfg.mem_bytes,
                boot_unix_secs: 1_700_000_000,
                host_cpu,
            };
            let writer: Box<dyn Write + Send> = Box::new(BufWriter::new(file));
            let mut recorder = Recorder {
                log: LogWriter::new(writer, &header).unwrap(),
                settings: RecordSettings::default(),
            };
            let started = Instant::now();
            let r = run(name, Mode::Record(&mut recorder), host_cpu);
            recorder.log.flush().unwrap();
            sync.sync_all().unwrap();
            record.push(started.elapsed());

            let input: Box<dyn Read + Send> = Box::new(BufReader::new(File::open(&path).unwrap()));
            let mut schedule = Schedule::new(LogReader::new(input).unwrap());
            let rep = run(name, Mode::Replay(&mut schedule), host_cpu);
            assert!(
                rep.log_end_reached,
                "{name}: replay did not reach the end of the log"
            );
            replay.push(rep.wall);
            last_record = Some(r);
            std::fs::remove_file(&path).unwrap();
        }
        let (plain, record, replay) = (median(plain), median(record), median(replay));
        let r = last_record.unwrap();
        let s = &r.stats;
        let secs = r.wall.as_secs_f64();
        let sync_bytes = s.sync_point_bytes.checked_div(s.sync_points).unwrap_or(0);
        println!(
            "{:<7} {:>9.1} {:>9.1} {:>9.1} {:>8.2} {:>8.2} {:>10.0} {:>8.0} {:>10} {:>9} {:>10.2}",
            name,
            plain.as_secs_f64() * 1e3,
            record.as_secs_f64() * 1e3,
            replay.as_secs_f64() * 1e3,
            record.as_secs_f64() / plain.as_secs_f64(),
            replay.as_secs_f64() / record.as_secs_f64(),
            s.log_bytes as f64 / secs / 1024.0,
            s.sync_points as f64 / secs,
            sync_bytes,
            s.digests,
            s.digest_time.as_secs_f64() * 1e3
        );
    }
    println!();
    println!("B/sync: mean log bytes per sync point (vCPU state + dirtied pages + framing).");
    println!("digest ms: total time spent computing digests during the recording.");
    let _ = std::fs::remove_dir_all(&dir);
}
