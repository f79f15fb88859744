//! `twinvm record` and `twinvm replay`: record a guest's nondeterministic
//! inputs to a log file, and re-execute the guest from that log.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::run::{RunArgs, VmSession};
use crate::replay::engine::{
    Ending, LogSink, PerturbKind, RecordSettings, Recorder, Role, RunReport, Stop, TestPerturbation,
};
use crate::replay::log::{LogHeader, LogReader, LogWriter};
pub use crate::replay::machine::header_for;
use crate::replay::schedule::Schedule;
use crate::vmm::{layout, sys, VmConfig};

/// Arguments of `twinvm record`.
#[derive(Debug, Clone, Args)]
pub struct RecordArgs {
    /// The log file to write.
    #[arg(long)]
    pub log: PathBuf,
    /// A state digest every this many landmarks (plus one at the end).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub digest_interval: u64,
    /// Microseconds a due interrupt may wait for a landmark before the guest
    /// is stopped for a sync point.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub sync_bound_us: u64,
    /// Log the guest's RIP and the landmark's own signature at every
    /// landmark; the replay then names the first landmark whose exit or
    /// RIP differs (for chasing a divergence).
    #[arg(long)]
    pub trace_landmarks: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Arguments of `twinvm replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// The log file to follow.
    #[arg(long)]
    pub log: PathBuf,
    /// Test hook: make this replay wrong on purpose at one landmark
    /// (`write-page:GPA@L`, `device:rtc@L`, `msr:INDEX@L`), to prove the divergence
    /// detectors fire (docs/operations.md).
    #[arg(long, hide = true, value_name = "KIND@LANDMARK")]
    pub test_perturb: Option<TestPerturbation>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Refuse to replay a log on a different guest, naming what differs.
pub fn check_header(log: &LogHeader, config: &VmConfig, net_mac: Option<[u8; 6]>) -> Result<()> {
    let ours = header_for(config, log.boot_unix_secs, log.host_cpu, net_mac);
    let differences = log.differences_from(&ours);
    if !differences.is_empty() {
        bail!(
            "this log was recorded from a different guest: {}",
            differences.join("; ")
        );
    }
    Ok(())
}

fn summary(report: &RunReport) -> String {
    let s = &report.stats;
    let secs = report.wall.as_secs_f64().max(1e-9);
    format!(
        "{} landmarks, {} interrupts, {} sync points ({} pages), {} trapped time reads, {} random reads, {} digests ({} pages, {:.1} ms), {} log records, {} log bytes ({:.0} B/s), {:.3} s",
        s.landmarks,
        s.interrupts_injected,
        s.sync_points,
        s.sync_point_pages,
        s.time_reads,
        s.random_reads,
        s.digests,
        s.digest_pages,
        s.digest_time.as_secs_f64() * 1e3,
        s.log_records,
        s.log_bytes,
        s.log_bytes as f64 / secs,
        secs
    )
}

/// `twinvm record`.
pub fn record(args: &RecordArgs) -> Result<ExitCode> {
    let session = VmSession::new(
        &args.run,
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )?;
    // Before the log file is created: a refused recording leaves no file behind.
    session.require_replayable()?;
    let file =
        File::create(&args.log).with_context(|| format!("creating log {}", args.log.display()))?;
    let sync_handle = file
        .try_clone()
        .context("duplicating the log file handle")?;
    // Stay on the CPU we are on; the replay pins itself to the same one.
    let host_cpu = sys::current_cpu().context("finding the host CPU to record on")?;
    let header = header_for(
        &session.config,
        session.boot_unix_secs,
        host_cpu,
        session.net_mac(),
    );
    let writer: Box<dyn LogSink> = Box::new(BufWriter::new(file));
    let log = LogWriter::new(writer, &header)
        .with_context(|| format!("writing log {}", args.log.display()))?;
    let settings = RecordSettings {
        digest_interval: args.digest_interval,
        sync_bound: Duration::from_micros(args.sync_bound_us),
        trace_landmarks: args.trace_landmarks,
    };
    let (report, mut engine) = session.run(
        true,
        Role::Record(Recorder { log }),
        settings,
        Some(host_cpu),
    )?;
    if let Some(recorder) = engine.recorder_mut() {
        recorder.log.flush().context("flushing the log")?;
    }
    sync_handle
        .sync_all()
        .with_context(|| format!("syncing log {}", args.log.display()))?;
    eprintln!("twinvm record: {}", super::run::describe(&report));
    eprintln!("twinvm record: {}", summary(&report));
    if args.run.stats {
        super::run::print_stats(&report);
    }
    Ok(match report.ending() {
        Some(Ending::Stopped) => ExitCode::from(130),
        _ => ExitCode::SUCCESS,
    })
}

/// `twinvm replay`.
pub fn replay(args: &ReplayArgs) -> Result<ExitCode> {
    let file =
        File::open(&args.log).with_context(|| format!("opening log {}", args.log.display()))?;
    let input: Box<dyn Read + Send> = Box::new(BufReader::new(file));
    let reader =
        LogReader::new(input).with_context(|| format!("reading log {}", args.log.display()))?;
    let boot_unix_secs = reader.header().boot_unix_secs;
    let mut session = VmSession::new(&args.run, boot_unix_secs)?;
    session.require_replayable()?;
    check_header(reader.header(), &session.config, session.net_mac())
        .with_context(|| format!("replaying {}", args.log.display()))?;
    if let Some(p) = args.test_perturb {
        if let PerturbKind::WritePage { gpa } = p.kind {
            if layout::ram_page_index(session.config.mem_bytes, gpa).is_none() {
                bail!(
                    "--test-perturb {p}: {gpa:#x} is not in the guest's RAM ({} MiB)",
                    session.config.mem_bytes >> 20
                );
            }
        }
        eprintln!("twinvm replay: --test-perturb {p}: this replay is made wrong on purpose");
        session.test_perturbation = Some(p);
    }
    let host_cpu = reader.header().host_cpu;
    // Checked up front (on a throwaway thread) for a clear message.
    std::thread::spawn(move || sys::pin_current_thread(host_cpu))
        .join()
        .map_err(|_| anyhow::anyhow!("the CPU check thread panicked"))?
        .with_context(|| {
            format!(
                "the recording ran on host CPU {host_cpu} (guest user-mode CPUID reports it \
                 here), and the replay must too: pinning to it failed"
            )
        })?;
    let schedule = Schedule::from_log(reader);
    let report = match session.run(
        false,
        Role::Replay(schedule),
        RecordSettings::default(),
        Some(host_cpu),
    ) {
        Ok((report, engine)) => {
            if let Some(p) = engine.test_perturbation_pending() {
                bail!(
                    "--test-perturb {p}: the replay ended at landmark {} without reaching landmark {}, so nothing was perturbed",
                    report.stats.landmarks,
                    p.landmark
                );
            }
            report
        }
        Err(e) => {
            eprintln!("twinvm replay: NOT identical");
            return Err(e.context(format!("replaying {}", args.log.display())));
        }
    };
    if !matches!(report.stop, Stop::Ended { log_end: true, .. }) {
        // Stopped by Ctrl-C before the log's end: nothing to conclude.
        eprintln!("twinvm replay: stopped before the end of the log");
        return Ok(ExitCode::from(130));
    }
    eprintln!("twinvm replay: {}", super::run::describe(&report));
    eprintln!("twinvm replay: {}", summary(&report));
    if args.run.stats {
        super::run::print_stats(&report);
    }
    println!(
        "replay: final state identical to the recording ({} landmarks, {} digests verified)",
        report.stats.landmarks, report.stats.digests
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel_name: "k".into(),
            kernel: vec![1, 2, 3],
            initrd: None,
            cmdline: "console=ttyS0".into(),
            mem_bytes: 64 << 20,
        }
    }

    #[test]
    fn a_different_guest_is_refused_naming_each_difference() {
        let log = header_for(&config(), 5, 0, None);
        assert!(check_header(&log, &config(), None).is_ok());
        let other = VmConfig {
            kernel: vec![9],
            initrd: Some(vec![1]),
            cmdline: "quiet".into(),
            mem_bytes: 128 << 20,
            ..config()
        };
        let err = check_header(&log, &other, Some([2; 6]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kernel image differs"), "{err}");
        assert!(err.contains("this run has an initrd"), "{err}");
        assert!(err.contains("\"console=ttyS0\", now \"quiet\""), "{err}");
        assert!(err.contains("memory was 64 MiB, now 128 MiB"), "{err}");
        assert!(err.contains("this run has a NIC"), "{err}");
    }
}
