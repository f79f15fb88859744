//! The log bandwidth benchmark's opt-in Linux row (`TWINVM_LOGBW_LINUX=1`):
//! Debian's kernel with the busybox initramfs (tests/linux_guest) booted
//! with `twinvm.work=ROUNDS`, whose /init runs a user-space workload that
//! allocates and writes (awk hash tables, sort, gzip, gunzip) between two
//! console markers. A plain run, a recording to a real file and its replay,
//! one after the other on the same host CPU, each a whole boot (7-16
//! minutes here: guest kernel code is emulated), then the same log replayed
//! with catch-up (as `twinvm replay --catch-up`, a backup that fell
//! behind: seconds). Reported for the whole run
//! and for the workload phase (from the host arrival times of the markers
//! TWINVM-WORK-START and TWINVM-WORK-END): wall times, record/plain,
//! replay/record, log Mbit/s, sync points per second and pages per sync
//! point (the phase's from the log records between the two markers).
//!
//! `TWINVM_LOGBW_LINUX_ROUNDS` sets the workload's rounds (default 4);
//! `TWINVM_LOGBW_LINUX_SYNC_BOUND_US` the sync bound of the plain run and
//! the recording (default 2000, as docs/benchmarks.md's Linux recordings); `TWINVM_LINUX_TIMEOUT`
//! the limit of each run in seconds and `TWINVM_LINUX_IMAGE_DIR` the image
//! directory, as for tests/linux_boot.rs.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twinvm::replay::engine::{ExitStats, Role, RunReport};
use twinvm::replay::log::{LogReader, Record};
use twinvm::vmm::VmConfig;

use super::linux_guest::{image_parts, number_after, tail, timeout};
use super::{chosen_delivery, record, replay, run, settings, Setup};

/// The row's label (`TWINVM_LOGBW_ROWS` matches words of it).
pub const LABEL: &str = "Linux user workload";

const START_MARKER: &str = "TWINVM-WORK-START";
const END_MARKER: &str = "TWINVM-WORK-END";

/// Whether the row was asked for (`TWINVM_LOGBW_LINUX=1`).
pub fn enabled() -> bool {
    std::env::var("TWINVM_LOGBW_LINUX").is_ok_and(|v| v == "1")
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One console line with "TWINVM-" in it: when it arrived (host time since
/// the run started) and how many log bytes had been written by then.
struct Mark {
    line: String,
    at: Duration,
    log_bytes: u64,
}

/// What a run's console received.
#[derive(Default)]
struct Received {
    text: Vec<u8>,
    marks: Vec<Mark>,
}

impl Received {
    fn mark(&self, marker: &str) -> Option<&Mark> {
        self.marks.iter().find(|m| m.line.contains(marker))
    }

    /// The host time from the start marker to the end marker.
    fn phase(&self) -> Option<Duration> {
        let start = self.mark(START_MARKER)?.at;
        self.mark(END_MARKER)?.at.checked_sub(start)
    }
}

/// The guest's console: keeps what arrives and notes the marker lines.
struct MarkerConsole {
    started: Instant,
    line: Vec<u8>,
    received: Arc<Mutex<Received>>,
    log_bytes: Option<Arc<AtomicU64>>,
}

impl MarkerConsole {
    fn new(log_bytes: Option<Arc<AtomicU64>>) -> (MarkerConsole, Arc<Mutex<Received>>) {
        let received = Arc::new(Mutex::new(Received::default()));
        let console = MarkerConsole {
            started: Instant::now(),
            line: Vec::new(),
            received: received.clone(),
            log_bytes,
        };
        (console, received)
    }
}

impl Write for MarkerConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let at = self.started.elapsed();
        let log_bytes = self
            .log_bytes
            .as_ref()
            .map_or(0, |b| b.load(Ordering::Relaxed));
        let mut received = self.received.lock().unwrap_or_else(|p| p.into_inner());
        received.text.extend_from_slice(buf);
        for &byte in buf {
            if byte != b'\n' {
                self.line.push(byte);
                continue;
            }
            let line = String::from_utf8_lossy(&self.line).trim_end().to_string();
            self.line.clear();
            if line.contains("TWINVM-") {
                received.marks.push(Mark {
                    line,
                    at,
                    log_bytes,
                });
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One mode's run: its report and what its console received.
struct ModeRun {
    report: RunReport,
    /// The whole run's wall time (a recording's with its final fsync).
    wall: Duration,
    received: Received,
}

impl ModeRun {
    fn console(&self) -> String {
        String::from_utf8_lossy(&self.received.text).into_owned()
    }

    /// The workload phase's host time; a run without both markers fails.
    fn phase(&self, mode: &str) -> Result<Duration, String> {
        self.received.phase().ok_or_else(|| {
            format!(
                "{LABEL}, {mode}: no {START_MARKER} ... {END_MARKER} on the console; its tail:\n{}",
                tail(&self.console())
            )
        })
    }

    /// The workload's checksum (the end marker's `sum=`).
    fn sum(&self) -> Option<u64> {
        number_after(&self.received.mark(END_MARKER)?.line, "sum=")
    }
}

fn taken(received: Arc<Mutex<Received>>) -> Received {
    std::mem::take(&mut *received.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Sync points and their pages among the log records that start in
/// `[from, to)` (byte offsets in the log file).
fn sync_points_between(path: &Path, from: u64, to: u64) -> Result<(u64, u64), String> {
    let what = |e: &dyn std::fmt::Display| format!("{LABEL}: reading {}: {e}", path.display());
    let file = File::open(path).map_err(|e| what(&e))?;
    let mut reader = LogReader::new(BufReader::new(file)).map_err(|e| what(&e))?;
    let (mut syncs, mut pages) = (0, 0);
    loop {
        let at = reader.offset();
        if at >= to {
            break;
        }
        let Some(record) = reader.next_record().map_err(|e| what(&e))? else {
            break;
        };
        if let Record::SyncPoint { pages: p, .. } = record {
            if at >= from {
                syncs += 1;
                pages += p.len() as u64;
            }
        }
    }
    Ok((syncs, pages))
}

/// Boot the workload plain, recorded and replayed, and print the row.
pub fn bench(dir: &Path, host_cpu: u32) -> Result<(), String> {
    let rounds = env_u64("TWINVM_LOGBW_LINUX_ROUNDS", 4);
    let sync_bound_us = env_u64("TWINVM_LOGBW_LINUX_SYNC_BOUND_US", 2000);
    let limit = timeout();
    let (kernel, initrd, cmdline) = image_parts(&format!("twinvm.work={rounds}"));
    let read = |p: &str| std::fs::read(p).map_err(|e| format!("{LABEL}: reading {p}: {e}"));
    let cfg = VmConfig {
        kernel_name: kernel.clone(),
        kernel: read(&kernel)?,
        initrd: Some(read(&initrd)?),
        cmdline,
        mem_bytes: 512 << 20,
    };
    let setup = |console: MarkerConsole, sync_bound: Option<Duration>| {
        let mut settings = settings();
        if let Some(bound) = sync_bound {
            settings.sync_bound = bound;
        }
        Setup {
            settings,
            tick_delivery: chosen_delivery().unwrap_or_default(),
            console: Box::new(console),
            timeout: Some(limit),
        }
    };
    println!();
    println!(
        "{LABEL}: twinvm.work={rounds}, Debian 6.1 + busybox, 512 MiB, host CPU {host_cpu}, \
         plain run and recording with sync bound {sync_bound_us} us; each run a whole boot (limit {limit:?})"
    );

    // The plain run with the recording's sync bound: `twinvm run` has the
    // default (200 us), which here made the plain boot slower than the
    // recording (docs/benchmarks.md, "Linux user workload"); the same bound
    // leaves record/plain to what recording costs.
    let bound = Some(Duration::from_micros(sync_bound_us));
    let started = Instant::now();
    let (console, received) = MarkerConsole::new(None);
    let (report, _) = run(&cfg, LABEL, Role::Live, host_cpu, setup(console, bound))?;
    let plain = ModeRun {
        report,
        wall: report.wall,
        received: taken(received),
    };
    println!("   plain run done after {:.1?}", started.elapsed());

    let path = dir.join("linux-work.log");
    let written = Arc::new(AtomicU64::new(0));
    let (console, received) = MarkerConsole::new(Some(written.clone()));
    let rec = record(&cfg, LABEL, &path, host_cpu, setup(console, bound), written);
    let rec = rec.inspect_err(|_| {
        let _ = std::fs::remove_file(&path);
    })?;
    let recorded = ModeRun {
        report: rec.report,
        wall: rec.wall,
        received: taken(received),
    };
    println!("   recording done after {:.1?}", started.elapsed());

    let (console, received) = MarkerConsole::new(None);
    let rep = replay(&cfg, LABEL, &path, host_cpu, setup(console, None), false);
    // A backup that fell behind: the same log loaded with catch-up (it skips
    // most of the console's output, so only its whole run and final state
    // are compared).
    let (console, _) = MarkerConsole::new(None);
    let caught_up = replay(&cfg, LABEL, &path, host_cpu, setup(console, None), true);
    let phase_log = recorded
        .received
        .mark(START_MARKER)
        .zip(recorded.received.mark(END_MARKER))
        .map(|(s, e)| (s.log_bytes, e.log_bytes));
    let phase_syncs = match phase_log {
        Some((from, to)) => Some(sync_points_between(&path, from, to)?),
        None => None,
    };
    let _ = std::fs::remove_file(&path);
    let report = rep?;
    let replayed = ModeRun {
        report,
        wall: report.wall,
        received: taken(received),
    };
    let caught_up = caught_up?;
    println!("   replays done after {:.1?}", started.elapsed());

    // The replay must be identical: the engine checked every digest and
    // the final state; the console must match the recording's byte for
    // byte, and every mode must have computed the same workload.
    let identical = replayed.received.text == recorded.received.text;
    let sums = [plain.sum(), recorded.sum(), replayed.sum()];
    let phases = [
        plain.phase("plain")?,
        recorded.phase("record")?,
        replayed.phase("replay")?,
    ];
    if sums[0].is_none() || sums.iter().any(|s| *s != sums[0]) {
        return Err(format!(
            "{LABEL}: the workload's checksums differ (plain, record, replay): {sums:?}"
        ));
    }
    let (from, to) = phase_log.unwrap_or_default();
    let (phase_syncs, phase_pages) = phase_syncs.unwrap_or_default();

    print_table(
        [&plain, &recorded, &replayed],
        phases,
        (to - from, phase_syncs, phase_pages),
    );
    let c = &caught_up.stats;
    println!(
        "   replay with catch-up (a backup behind): {:.1} s, {:.3} of the recording; caught up {} times, \
         skipping {} of {} landmarks; final state and {} digests verified",
        caught_up.wall.as_secs_f64(),
        caught_up.wall.as_secs_f64() / recorded.wall.as_secs_f64(),
        c.catch_ups,
        c.landmarks_skipped,
        recorded.report.stats.landmarks,
        c.digests
    );
    for m in &recorded.received.marks {
        if m.line.contains("TWINVM-WORK") {
            println!(
                "   record +{:>7.1}s  {}",
                m.at.as_secs_f64(),
                marker_text(&m.line)
            );
        }
    }
    println!(
        "   replay identical: {} (final state and {} digests verified, console {})",
        if identical { "yes" } else { "NO" },
        replayed.report.stats.digests,
        if identical {
            "byte-identical"
        } else {
            "DIFFERS"
        }
    );
    if !identical {
        return Err(format!(
            "{LABEL}: the replay's console differs from the recording's"
        ));
    }
    Ok(())
}

/// The marker line without the kernel's log prefix.
fn marker_text(line: &str) -> &str {
    line.find("TWINVM-").map_or(line, |i| &line[i..])
}

fn print_table(runs: [&ModeRun; 3], phases: [Duration; 3], phase_log: (u64, u64, u64)) {
    let [plain, rec, rep] = runs;
    let s: &ExitStats = &rec.report.stats;
    let run_secs = rec.report.wall.as_secs_f64();
    let (phase_bytes, phase_syncs, phase_pages) = phase_log;
    let phase_secs = phases[1].as_secs_f64();
    println!(
        "{:<16} {:>8} {:>8} {:>8} {:>7} {:>7} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8}",
        "part",
        "plain s",
        "rec s",
        "rep s",
        "rec/pl",
        "rep/rec",
        "log Mb/s",
        "syncs/s",
        "pg/sync",
        "B/sync",
        "syncs",
        "flushes"
    );
    let line = |part: &str, t: [f64; 3], bytes: u64, syncs: u64, pages: u64, secs: f64| {
        println!(
            "{:<16} {:>8.1} {:>8.1} {:>8.1} {:>7.2} {:>7.2} {:>9.2} {:>8.1} {:>8.1} {:>9.0} {:>8} {:>8}",
            part,
            t[0],
            t[1],
            t[2],
            t[1] / t[0],
            t[2] / t[1],
            bytes as f64 * 8.0 / secs / 1e6,
            syncs as f64 / secs,
            pages as f64 / syncs.max(1) as f64,
            bytes as f64 / syncs.max(1) as f64,
            syncs,
            if part == "whole run" {
                rep.report.stats.shadow_mmu_flushes.to_string()
            } else {
                "-".into()
            }
        );
    };
    line(
        "whole run",
        [plain.wall, rec.wall, rep.wall].map(|d| d.as_secs_f64()),
        s.log_bytes,
        s.sync_points,
        s.sync_point_pages,
        run_secs,
    );
    line(
        "workload phase",
        phases.map(|d| d.as_secs_f64()),
        phase_bytes,
        phase_syncs,
        phase_pages,
        phase_secs,
    );
    println!(
        "   recording: {} landmarks, {} interrupts, {} trapped time reads, {} digests, {} log bytes, \
         sync points {:.0} us each; replay: {} shadow page-table flushes, {} landmarks",
        s.landmarks,
        s.interrupts_injected,
        s.time_reads,
        s.digests,
        s.log_bytes,
        s.sync_point_time.as_secs_f64() * 1e6 / s.sync_points.max(1) as f64,
        rep.report.stats.shadow_mmu_flushes,
        rep.report.stats.landmarks,
    );
    let emulated = |run: &ModeRun| match run.report.stats.emulated_instructions {
        Some(n) => format!(
            "{:.1} M ({:.2} M/s)",
            n as f64 / 1e6,
            n as f64 / 1e6 / run.wall.as_secs_f64()
        ),
        None => "unknown".into(),
    };
    println!(
        "   instructions KVM's emulator ran (the guest kernel's, whole run): plain {}, record {}, replay {}",
        emulated(plain),
        emulated(rec),
        emulated(rep)
    );
    for (what, run) in [("record", rec), ("replay", rep)] {
        println!(
            "   {what}: vCPU time between landmarks, count/seconds by length: {}",
            run.report.stats.stretches.summary()
        );
    }
    println!(
        "   (B/sync: log bytes per sync point, all records included; phase figures: records \
         between the markers' arrival, over the recording's phase time)"
    );
}
