//! `twinvm drill`: failover drills (src/ft/drill; docs/operations.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::ft::drill::report::RepeatSummary;
use crate::ft::drill::{
    run_existing, run_local, DrillError, DrillKind, DrillReport, ExistingOptions, Limits,
    LocalOptions, Protection,
};

/// Exit codes of `twinvm drill`.
const EXIT_FAILED: u8 = 1;
const EXIT_CANNOT_RUN: u8 = 2;
const EXIT_INTERRUPTED: u8 = 130;

/// Arguments of `twinvm drill`.
#[derive(Debug, Clone, Args)]
pub struct DrillArgs {
    /// The fault: kill-primary, kill-backup, partition (cut the logging link), arbiter-leader
    /// (kill the arbiter's Raft leader, then the primary).
    #[arg(value_enum)]
    pub kind: DrillKind,
    /// Build everything on this machine (namespaces, 3 arbiter nodes, the `counter` guest as an
    /// FT pair, a client), drill, and tear it all down. Needs root and /dev/kvm.
    #[arg(long)]
    pub local: bool,
    /// With --local: run the guest with `twinvm run` alone, no backup (a baseline: the drill
    /// shows what is lost without FT, and fails). kill-primary only.
    #[arg(long, requires = "local")]
    pub unprotected: bool,
    /// Run the drill this many times (a fresh pair each time); prints min/median/max failover time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub repeat: u32,
    /// Print the report(s) as one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Fail a drill whose failover time (longest silence after the fault) exceeds this.
    #[arg(long, value_name = "MS")]
    pub max_failover_ms: Option<f64>,

    /// A new client request this often (ms).
    #[arg(long, default_value_t = 5.0, value_name = "MS")]
    pub interval_ms: f64,
    /// Resend an unanswered request (same id) after this long (ms).
    #[arg(long, default_value_t = 30.0, value_name = "MS")]
    pub retry_ms: f64,
    /// Most requests outstanding at once.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Steady traffic before the fault (ms).
    #[arg(long, default_value_t = 2000.0, value_name = "MS")]
    pub warmup_ms: f64,
    /// ...and at least this many answers during it (a slow host makes the warm-up longer, up to
    /// --ready-timeout-s).
    #[arg(long, default_value_t = 100)]
    pub warmup_answers: u64,
    /// Answers to wait for once the pair has settled after the fault (loser stopped, survivor serving).
    #[arg(long, default_value_t = 200)]
    pub after_replies: u64,
    /// Give up if the pair is not replicating and the guest answering after this long (s).
    #[arg(long, default_value_t = 60.0, value_name = "S")]
    pub ready_timeout_s: f64,
    /// Most time from the fault to the end of the drill (s).
    #[arg(long, default_value_t = 30.0, value_name = "S")]
    pub recovery_timeout_s: f64,
    /// Keep retrying unanswered requests this long once the drill ends (ms).
    #[arg(long, default_value_t = 5000.0, value_name = "MS")]
    pub drain_ms: f64,

    /// With --local: the pair's --heartbeat-ms (default: the pair's own).
    #[arg(long, requires = "local")]
    pub heartbeat_ms: Option<u64>,
    /// With --local: the pair's --peer-timeout-ms (default: the pair's own).
    #[arg(long, requires = "local")]
    pub peer_timeout_ms: Option<u64>,

    /// Without --local: the running primary's control socket.
    #[arg(long, conflicts_with = "local", required_unless_present = "local")]
    pub primary_control: Option<PathBuf>,
    /// Without --local: the running backup's control socket.
    #[arg(long, conflicts_with = "local", required_unless_present = "local")]
    pub backup_control: Option<PathBuf>,
    /// Without --local: the guest's counter service (the `counter` test guest), IP:PORT.
    #[arg(long, conflicts_with = "local", required_unless_present = "local")]
    pub target: Option<SocketAddr>,
    /// Without --local: where the client binds.
    #[arg(long, conflicts_with = "local", default_value = "0.0.0.0:0")]
    pub bind: SocketAddr,
    /// Without --local: arbiter addresses, to check the holder after the fault.
    #[arg(long, conflicts_with = "local", value_delimiter = ',')]
    pub arbiters: Vec<String>,
    /// Without --local: the arbiter's key file.
    #[arg(long, conflicts_with = "local")]
    pub arbiter_key_file: Option<PathBuf>,
    /// Without --local: the arbiter's cluster id.
    #[arg(long, conflicts_with = "local", default_value = "twinvm")]
    pub arbiter_cluster_id: String,
}

fn millis(name: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v < 1e9) {
        bail!("--{name} must be a positive number");
    }
    Ok(Duration::from_secs_f64(v / 1e3))
}

fn phases(args: &DrillArgs) -> Result<crate::ft::drill::Phases> {
    Ok(crate::ft::drill::Phases {
        warmup: millis("warmup-ms", args.warmup_ms)?,
        warmup_answers: args.warmup_answers,
        after_replies: args.after_replies,
        ready_timeout: millis("ready-timeout-s", args.ready_timeout_s * 1e3)?,
        recovery_timeout: millis("recovery-timeout-s", args.recovery_timeout_s * 1e3)?,
        drain: millis("drain-ms", args.drain_ms)?,
    })
}

fn limits(args: &DrillArgs) -> Result<Limits> {
    Ok(Limits {
        max_failover: args
            .max_failover_ms
            .map(|ms| millis("max-failover-ms", ms))
            .transpose()?,
    })
}

enum Mode {
    Local(Box<LocalOptions>),
    Existing(Box<ExistingOptions>),
}

fn mode(args: &DrillArgs) -> Result<Mode> {
    let interval = millis("interval-ms", args.interval_ms)?;
    let retry_after = millis("retry-ms", args.retry_ms)?;
    if args.local {
        let exe = std::env::current_exe().context("locating the twinvm binary")?;
        let mut o = LocalOptions::new(exe);
        o.protection = if args.unprotected {
            Protection::Unprotected
        } else {
            Protection::Pair
        };
        o.heartbeat_ms = args.heartbeat_ms;
        o.peer_timeout_ms = args.peer_timeout_ms;
        o.interval = interval;
        o.retry_after = retry_after;
        o.window = args.window;
        o.phases = phases(args)?;
        o.limits = limits(args)?;
        Ok(Mode::Local(Box::new(o)))
    } else {
        let (Some(primary_control), Some(backup_control), Some(target)) = (
            args.primary_control.clone(),
            args.backup_control.clone(),
            args.target,
        ) else {
            bail!("without --local, give --primary-control, --backup-control and --target");
        };
        Ok(Mode::Existing(Box::new(ExistingOptions {
            primary_control,
            backup_control,
            target,
            bind: args.bind,
            arbiters: args.arbiters.clone(),
            arbiter_key_file: args.arbiter_key_file.clone(),
            arbiter_cluster_id: args.arbiter_cluster_id.clone(),
            interval,
            retry_after,
            window: args.window,
            phases: phases(args)?,
            limits: limits(args)?,
        })))
    }
}

/// SIGINT/SIGTERM set the returned flag, which every wait of the drill polls
/// (the drill then tears down and exits 130); a second signal ends the
/// process at once.
pub(super) fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(
            sig,
            i32::from(EXIT_INTERRUPTED),
            flag.clone(),
        )
        .context("installing signal handlers")?;
        signal_hook::flag::register(sig, flag.clone()).context("installing signal handlers")?;
    }
    Ok(flag)
}

/// `twinvm drill`.
pub fn drill(args: &DrillArgs) -> Result<ExitCode> {
    let mode = match mode(args) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("twinvm drill: {e:#}");
            return Ok(ExitCode::from(EXIT_CANNOT_RUN));
        }
    };
    let interrupted = interrupt_flag()?;
    let mut reports: Vec<DrillReport> = Vec::new();
    let runs = args.repeat;
    for run in 1..=runs {
        if runs > 1 && !args.json {
            eprintln!("twinvm drill: run {run} of {runs}");
        }
        let result = match &mode {
            Mode::Local(o) => run_local(args.kind, o, &interrupted),
            Mode::Existing(o) => run_existing(args.kind, o, &interrupted),
        };
        match result {
            Ok(report) => {
                if !args.json {
                    print!("{}", report.to_text());
                }
                reports.push(report);
            }
            Err(DrillError::Interrupted) => {
                eprintln!("twinvm drill: interrupted; everything it started was torn down");
                return Ok(ExitCode::from(EXIT_INTERRUPTED));
            }
            Err(e) => {
                eprintln!("twinvm drill: cannot run the {} drill: {e}", args.kind);
                if interrupted.load(Ordering::SeqCst) {
                    return Ok(ExitCode::from(EXIT_INTERRUPTED));
                }
                return Ok(ExitCode::from(EXIT_CANNOT_RUN));
            }
        }
    }
    let summary = RepeatSummary::of(args.kind, &reports);
    if args.json {
        let doc = serde_json::json!({ "runs": reports, "summary": summary });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else if runs > 1 {
        print!("{}", summary.to_text());
    }
    Ok(if summary.all_passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}
