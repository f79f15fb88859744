//! `twinvm record` and `twinvm replay`: record a guest's nondeterministic
//! inputs to a log file, and re-execute the guest from that log.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::run::{RunArgs, VmSession};
use super::size::parse_size;
use crate::devices::TickDelivery;
use crate::replay::engine::{
    final_records_reserve, window_exit_warning, Ending, LogSink, PerturbKind, RecordSettings,
    Recorder, Role, RunReport, Stop, TestPerturbation, DEFAULT_HOT_PAGE_BUDGET,
    DEFAULT_SYNC_BOUND_US, DEFAULT_SYNC_BUDGET_PERCENT, DEFAULT_SYNC_STATE_EVERY,
    DEFAULT_TICK_DEFERRAL, MAX_HOT_PAGE_BUDGET,
};
use crate::replay::log::{LogHeader, LogReader, LogWriter, PAGE_SIZE};
use crate::replay::log_file::LogFile;
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
    #[arg(long, default_value_t = DEFAULT_SYNC_BOUND_US, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub sync_bound_us: u64,
    /// Milliseconds a timer tick may be held past its deadline while the
    /// guest runs in user mode with nothing else owed to it, so fewer sync
    /// points are made; the PIT periods missed meanwhile coalesce into one
    /// tick (unless `--tick-delivery catch-up`). 0 delivers every tick
    /// within the sync bound. Input, frames and other interrupts are never
    /// held.
    #[arg(long, default_value_t = DEFAULT_TICK_DEFERRAL.as_millis() as u64, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub tick_deferral_ms: u64,
    /// The most of the time, in percent, that sync points made for timer
    /// ticks may keep the guest stopped: after a sync point that took C, a
    /// tick due while the guest runs in user mode waits until C·(100−p)/p
    /// after it, at most 100 ms past its deadline (the missed periods
    /// coalesce as with `--tick-deferral-ms`, the later of the two wins).
    /// Sync points of a few pages at 250 Hz defer nothing (at 1 kHz, where
    /// they take ~6% of the time, some ticks coalesce); a guest writing
    /// megabytes between ticks gets fewer, later ticks instead of spending
    /// a third of its time stopped. 0 turns it off.
    #[arg(long, default_value_t = DEFAULT_SYNC_BUDGET_PERCENT, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub sync_budget_percent: u8,
    /// How timer ticks reach the guest, recorded in the log header:
    /// `landmarks` (the default: missed periods coalesce; a tick the guest
    /// cannot take yet waits for a landmark or a sync point),
    /// `window-exits` (it goes in at the interrupt-window exit where the
    /// guest can take it: fewer sync points, and a guest that counts ticks
    /// gets them) or `catch-up` (window exits, and missed periods are owed
    /// and delivered one after the other). Window exits are not exact for
    /// every guest on hosts like these (a Linux recording diverged on
    /// replay): see docs/operations.md, "Tick delivery".
    #[arg(long, value_name = "RULE")]
    pub tick_delivery: Option<TickDelivery>,
    /// Log the guest's RIP and the landmark's own signature at every
    /// landmark; the replay then names the first landmark whose exit or
    /// RIP differs (for chasing a divergence).
    #[arg(long)]
    pub trace_landmarks: bool,
    /// Largest log to write (512M, 20G, ...; a bare number is MiB): the
    /// recording ends cleanly (at a landmark, with its End record; exit
    /// status 1 and a message) before the log would pass it. Default: the
    /// free space where the log goes, less 5% (and at least 64 MiB).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub max_log_size: Option<u64>,
    /// Memory for the last logged version of recently logged pages, which
    /// sync points send their pages against as deltas (64M, 256M, ...; a
    /// bare number is MiB; at most 256M; 0 sends every page whole). The
    /// replay holds as much.
    #[arg(long, value_parser = parse_size, value_name = "SIZE", default_value = "64M")]
    pub page_cache: u64,
    /// Most guest pages left write-enabled between dirty-log harvests
    /// ("hot" pages: a page the guest keeps storing to no longer faults at
    /// every store after a harvest, but is carried by every sync point,
    /// unchanged ones as a few bytes). 0 re-protects every page at every
    /// harvest. No effect on hosts without KVM's manual dirty-log
    /// protection.
    #[arg(long, value_name = "PAGES", default_value_t = DEFAULT_HOT_PAGE_BUDGET, value_parser = parse_hot_pages)]
    pub hot_pages: usize,
    /// Least time between two sync points that also carry the devices'
    /// state, clock and landmark signature (a backup that fell behind can
    /// catch up at those; a replay checks its state there). When no sync
    /// point came for four times this, the recording makes one for the
    /// state at the next landmark. 0: every sync point, none made for one.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_SYNC_STATE_EVERY.as_millis() as u64)]
    pub sync_state_every_ms: u64,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `--hot-pages`: a page count from 0 to [`MAX_HOT_PAGE_BUDGET`].
pub(crate) fn parse_hot_pages(text: &str) -> Result<usize, String> {
    let pages: usize = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of pages (0 to {MAX_HOT_PAGE_BUDGET})"))?;
    if pages > MAX_HOT_PAGE_BUDGET {
        return Err(format!(
            "{pages} pages is more than {MAX_HOT_PAGE_BUDGET}, the most a recording keeps write-enabled"
        ));
    }
    Ok(pages)
}

/// The least room a size limit must leave for records, beyond what is kept
/// for the final digest and End record.
const MIN_LOG_ROOM: u64 = 1 << 20;

/// The default size limit: the free space where the log goes, less 5% and
/// at least 64 MiB, so a recording ends before it fills the disk.
fn default_log_limit(log: &Path) -> Result<u64> {
    let dir = match log.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let free = sys::free_bytes(dir)
        .with_context(|| format!("finding the free space for the log in {}", dir.display()))?;
    Ok(free.saturating_sub((free / 20).max(64 << 20)))
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
    /// Load sync points that carry the machine's state instead of executing
    /// up to them, while at least two are ahead (what a live backup that
    /// fell behind does): fast, but nothing in the skipped stretches is
    /// checked; digests after each jump still are.
    #[arg(long)]
    pub catch_up: bool,
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
        "{} landmarks, {} interrupts, {} sync points ({} pages; {} with state, {} made for one{}), {} interrupt windows, {} ticks caught up ({} dropped), {} trapped time reads, {} random reads, {} digests ({} pages, {:.1} ms), {} log records, {} log bytes ({:.0} B/s), {:.3} s",
        s.landmarks,
        s.interrupts_injected,
        s.sync_points,
        s.sync_point_pages,
        s.sync_states,
        s.sync_points_for_state,
        if s.catch_ups > 0 {
            format!(
                "; caught up {} times, skipping {} landmarks and {} records",
                s.catch_ups, s.landmarks_skipped, s.records_skipped
            )
        } else {
            String::new()
        },
        s.interrupt_windows,
        s.pit_ticks_caught_up,
        s.pit_ticks_dropped,
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
    let mut session = VmSession::new(
        &args.run,
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )?;
    session.tick_delivery = args.tick_delivery.unwrap_or_default();
    if let Some(warning) = window_exit_warning(session.tick_delivery) {
        eprintln!("twinvm record: warning: {warning}");
    }
    // Before the log file is created: a refused recording leaves no file behind.
    session.require_replayable()?;
    let max_log_bytes = match args.max_log_size {
        Some(limit) => limit,
        None => default_log_limit(&args.log)?,
    };
    let reserve = final_records_reserve(session.config.mem_bytes);
    if max_log_bytes < reserve + MIN_LOG_ROOM {
        bail!(
            "a log limit of {max_log_bytes} bytes{} is too small: a recording of a {} MiB guest keeps {reserve} bytes for its final digest and needs at least {MIN_LOG_ROOM} more",
            if args.max_log_size.is_none() {
                " (the default: the free space where the log goes, less 5% and at least 64 MiB; free some space or pass --max-log-size)"
            } else {
                " (--max-log-size)"
            },
            session.config.mem_bytes >> 20,
        );
    }
    let file =
        File::create(&args.log).with_context(|| format!("creating log {}", args.log.display()))?;
    let sync_handle = file
        .try_clone()
        .context("duplicating the log file handle")?;
    // Stay on the CPU we are on; the replay pins itself to the same one.
    let host_cpu = sys::current_cpu().context("finding the host CPU to record on")?;
    let header = LogHeader {
        tick_delivery: session.tick_delivery,
        ..header_for(
            &session.config,
            session.boot_unix_secs,
            host_cpu,
            session.net_mac(),
        )
    };
    let writer: Box<dyn LogSink> = Box::new(
        LogFile::new(file).with_context(|| format!("writing log {}", args.log.display()))?,
    );
    let mut log = LogWriter::new(writer, &header)
        .with_context(|| format!("writing log {}", args.log.display()))?;
    let cache_pages = u32::try_from(args.page_cache / PAGE_SIZE as u64).unwrap_or(u32::MAX);
    log.set_page_cache(cache_pages).context("--page-cache")?;
    // The magic and header reach the file now: a disk that fills later
    // leaves a log that says what it is.
    log.flush()
        .with_context(|| format!("writing log {}", args.log.display()))?;
    let settings = RecordSettings {
        digest_interval: args.digest_interval,
        sync_bound: Duration::from_micros(args.sync_bound_us),
        tick_deferral: Duration::from_millis(args.tick_deferral_ms),
        sync_budget_percent: args.sync_budget_percent,
        trace_landmarks: args.trace_landmarks,
        max_log_bytes: Some(max_log_bytes),
        hot_page_budget: args.hot_pages,
        sync_state_every: Duration::from_millis(args.sync_state_every_ms),
    };
    let (report, mut engine) = session
        .run(
            true,
            Role::Record(Recorder { log }),
            settings,
            Some(host_cpu),
        )
        .with_context(|| format!("recording to {}", args.log.display()))?;
    if let Some(recorder) = engine.recorder_mut() {
        recorder.log.flush().context("flushing the log")?;
        let p = recorder.log.page_stats();
        eprintln!(
            "twinvm record: sync-point pages: {} whole, {} as deltas, {} unchanged, {} zero; page cache {} of {} pages ({} MiB)",
            p.full,
            p.delta,
            p.same,
            p.zero,
            p.cache_pages,
            p.cache_capacity,
            p.cache_bytes >> 20
        );
        let st = recorder.log.state_stats();
        eprintln!(
            "twinvm record: sync-point vCPU states: {} whole, {} as deltas; {:.0} bytes each on average",
            st.whole,
            st.delta,
            st.bytes as f64 / (st.whole + st.delta).max(1) as f64
        );
    }
    sync_handle
        .sync_all()
        .with_context(|| format!("syncing log {}", args.log.display()))?;
    eprintln!("twinvm record: {}", super::run::describe(&report));
    eprintln!("twinvm record: {}", summary(&report));
    if args.run.stats {
        super::run::print_stats(&report);
    }
    if report.stats.log_size_limit_reached {
        eprintln!(
            "twinvm record: {}: the log reached its size limit of {max_log_bytes} bytes ({}): the recording was ended at landmark {}{}; it replays identically up to there",
            args.log.display(),
            if args.max_log_size.is_some() {
                "--max-log-size"
            } else {
                "the default: the free space where it goes, less 5%; see --max-log-size"
            },
            report.stats.landmarks,
            if report.stats.log_limit_before_sync_point {
                ", the one before a sync point that did not fit, with its End record but no final digest"
            } else {
                " with its final digest and End record"
            }
        );
        return Ok(ExitCode::from(1));
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
    reader
        .check_replayable()
        .with_context(|| format!("replaying {}", args.log.display()))?;
    let boot_unix_secs = reader.header().boot_unix_secs;
    let mut session = VmSession::new(&args.run, boot_unix_secs)?;
    session.tick_delivery = reader.header().tick_delivery;
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
    let mut schedule = Schedule::from_log(reader);
    if args.catch_up {
        // A file replay emits nothing that must wait for a primary.
        schedule.set_catch_up(Some(Box::new(|| u64::MAX)));
    }
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

    #[test]
    fn hot_pages_takes_a_page_count_within_its_bound_and_names_what_is_wrong() {
        assert_eq!(parse_hot_pages("0"), Ok(0));
        assert_eq!(parse_hot_pages("512"), Ok(512));
        assert_eq!(
            parse_hot_pages(&MAX_HOT_PAGE_BUDGET.to_string()),
            Ok(MAX_HOT_PAGE_BUDGET)
        );
        let err = parse_hot_pages("70000").unwrap_err();
        assert!(err.contains("more than 65536"), "{err}");
        for bad in ["-1", "lots", "8M", ""] {
            let err = parse_hot_pages(bad).unwrap_err();
            assert!(err.contains("is not a number of pages"), "{bad}: {err}");
        }
        // Through the command line, with the default when absent.
        let cli = |extra: &[&str]| {
            let mut argv = vec![
                "twinvm",
                "record",
                "--log",
                "x.log",
                "--kernel",
                "builtin:ticker",
            ];
            argv.extend_from_slice(extra);
            <crate::cli::Cli as clap::Parser>::try_parse_from(argv)
        };
        let record_args = |cli: crate::cli::Cli| match cli.command {
            crate::cli::Command::Record(args) => args,
            _ => panic!("not a record command"),
        };
        assert_eq!(
            record_args(cli(&[]).unwrap()).hot_pages,
            DEFAULT_HOT_PAGE_BUDGET
        );
        assert_eq!(
            record_args(cli(&["--hot-pages", "0"]).unwrap()).hot_pages,
            0
        );
        let err = cli(&["--hot-pages", "100000"]).unwrap_err().to_string();
        assert!(err.contains("--hot-pages"), "{err}");
    }
}
