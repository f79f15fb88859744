//! `twinvm record` and `twinvm replay`: record a guest's nondeterministic
//! inputs to a log file, and re-execute the guest from that log.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::run::{RunArgs, VmSession};
use crate::replay::log::{LogHeader, LogReader, LogWriter};
use crate::replay::schedule::Schedule;
use crate::vmm::{self, sys, Ending, RecordSettings, Recorder, RunReport, VmConfig};

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
    /// Log the guest's RIP at every landmark; the replay then names the
    /// first landmark where its RIP differs (for chasing a divergence).
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
    #[command(flatten)]
    pub run: RunArgs,
}

/// The header describing the guest `config` would boot.
pub fn header_for(config: &VmConfig, boot_unix_secs: u64, host_cpu: u32) -> LogHeader {
    LogHeader {
        kernel_hash: blake3::hash(&config.kernel).into(),
        initrd_hash: config.initrd.as_ref().map(|i| blake3::hash(i).into()),
        cmdline: config.cmdline.clone(),
        mem_bytes: config.mem_bytes,
        boot_unix_secs,
        host_cpu,
    }
}

/// Refuse to replay a log on a different guest, naming what differs.
pub fn check_header(log: &LogHeader, config: &VmConfig) -> Result<()> {
    let ours = header_for(config, log.boot_unix_secs, log.host_cpu);
    let mut differences = Vec::new();
    if log.kernel_hash != ours.kernel_hash {
        differences.push("the kernel image differs from the recorded one".to_string());
    }
    if log.initrd_hash != ours.initrd_hash {
        differences.push(match (log.initrd_hash, ours.initrd_hash) {
            (Some(_), None) => "the recording had an initrd and this run has none".to_string(),
            (None, Some(_)) => "this run has an initrd and the recording had none".to_string(),
            _ => "the initrd differs from the recorded one".to_string(),
        });
    }
    if log.cmdline != ours.cmdline {
        differences.push(format!(
            "the command line was {:?}, now {:?}",
            log.cmdline, ours.cmdline
        ));
    }
    if log.mem_bytes != ours.mem_bytes {
        differences.push(format!(
            "memory was {} MiB, now {} MiB",
            log.mem_bytes >> 20,
            ours.mem_bytes >> 20
        ));
    }
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
    let header = header_for(&session.config, session.boot_unix_secs, host_cpu);
    let writer: Box<dyn Write + Send> = Box::new(BufWriter::new(file));
    let log = LogWriter::new(writer, &header)
        .with_context(|| format!("writing log {}", args.log.display()))?;
    let mut recorder = Recorder {
        log,
        settings: RecordSettings {
            digest_interval: args.digest_interval,
            sync_bound: Duration::from_micros(args.sync_bound_us),
            trace_landmarks: args.trace_landmarks,
        },
    };
    let report = session.run(true, vmm::Mode::Record(&mut recorder), Some(host_cpu))?;
    recorder.log.flush().context("flushing the log")?;
    sync_handle
        .sync_all()
        .with_context(|| format!("syncing log {}", args.log.display()))?;
    eprintln!("twinvm record: {}", super::run::describe(&report));
    eprintln!("twinvm record: {}", summary(&report));
    if args.run.stats {
        super::run::print_stats(&report);
    }
    Ok(match report.ending {
        Ending::Stopped => ExitCode::from(130),
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
    let session = VmSession::new(&args.run, boot_unix_secs)?;
    session.require_replayable()?;
    check_header(reader.header(), &session.config)
        .with_context(|| format!("replaying {}", args.log.display()))?;
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
    let mut schedule = Schedule::new(reader);
    let report = match session.run(false, vmm::Mode::Replay(&mut schedule), Some(host_cpu)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("twinvm replay: NOT identical");
            return Err(e.context(format!("replaying {}", args.log.display())));
        }
    };
    if !report.log_end_reached {
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
        let log = header_for(&config(), 5, 0);
        assert!(check_header(&log, &config()).is_ok());
        let other = VmConfig {
            kernel: vec![9],
            initrd: Some(vec![1]),
            cmdline: "quiet".into(),
            mem_bytes: 128 << 20,
            ..config()
        };
        let err = check_header(&log, &other).unwrap_err().to_string();
        assert!(err.contains("kernel image differs"), "{err}");
        assert!(err.contains("this run has an initrd"), "{err}");
        assert!(err.contains("\"console=ttyS0\", now \"quiet\""), "{err}");
        assert!(err.contains("memory was 64 MiB, now 128 MiB"), "{err}");
    }
}
