//! Record/replay benchmark: prints figures, asserts nothing about speed.
//!
//! For each test guest, side by side in one run: plain run vs record wall
//! time, replay vs record, log bytes per second, sync points per second and
//! their mean size, and what digests cost. Logs go to real files (fsynced).
//!
//! Run: `cargo bench --bench replay` (as root; needs /dev/kvm).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
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

fn config(name: &str) -> VmConfig {
    VmConfig {
        kernel_name: format!("builtin:{name}"),
        kernel: guests::builtin(name).expect("guest").to_vec(),
        initrd: None,
        cmdline: String::new(),
        mem_bytes: 64 << 20,
    }
}

/// Run `name` in `role` with the vCPU thread on `host_cpu` (every role on
/// the same CPU, as record and replay pin); returns the engine too (its log).
fn run(name: &str, role: Role, host_cpu: u32) -> (RunReport, Engine) {
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
    let mut engine = Engine::new(
        vm,
        platform,
        Connections {
            inputs,
            outputs,
            kicker: Kicker::new(),
        },
        role,
        RecordSettings::default(),
        Some(host_cpu),
    )
    .expect("engine");
    let report = engine.run().expect("run");
    assert_ne!(
        report.ending(),
        Some(Ending::Stopped),
        "{name} did not finish"
    );
    (report, engine)
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
            plain.push(run(name, Role::Live, host_cpu).0.wall);

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
                net_mac: None,
            };
            let writer: Box<dyn LogSink> = Box::new(BufWriter::new(file));
            let recorder = Recorder {
                log: LogWriter::new(writer, &header).unwrap(),
            };
            let started = Instant::now();
            let (r, mut engine) = run(name, Role::Record(recorder), host_cpu);
            engine.recorder_mut().unwrap().log.flush().unwrap();
            sync.sync_all().unwrap();
            record.push(started.elapsed());

            let input: Box<dyn Read + Send> = Box::new(BufReader::new(File::open(&path).unwrap()));
            let schedule = Schedule::from_log(LogReader::new(input).unwrap());
            let (rep, _) = run(name, Role::Replay(schedule), host_cpu);
            assert!(
                matches!(rep.stop, Stop::Ended { log_end: true, .. }),
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
