//! `twinvm demo`: the README's main job on embedded guests. Part 1: the
//! `counter` guest runs as a fault-tolerant pair on this machine (network
//! namespaces for two hosts and a client, a 3-node arbiter), a client sends
//! it numbered requests, the primary is killed, and the backup takes over
//! (the local kill-primary drill). Part 2: the record/replay engine under
//! it: the `storm` guest is recorded and replayed to an identical state,
//! and a guest reading the TSC in user mode is caught as divergence.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};

use super::replay::{record, replay, RecordArgs, ReplayArgs};
use super::run::{boot_and_run, describe, print_stats, RunArgs};
use crate::ft::drill::{run_local, DrillKind, LocalOptions};
use crate::guests::BUILTIN_PREFIX;
use crate::replay::engine::{
    Ending, RecordSettings, DEFAULT_HOT_PAGE_BUDGET, DEFAULT_SYNC_BUDGET_PERCENT,
    DEFAULT_SYNC_STATE_EVERY, DEFAULT_TICK_DEFERRAL,
};

fn guest_args(name: &str, serial: &str) -> RunArgs {
    RunArgs {
        kernel: format!("{BUILTIN_PREFIX}{name}"),
        initrd: None,
        cmdline: String::new(),
        mem: 64 << 20,
        serial: serial.into(),
        stats: false,
        net: None,
    }
}

/// `twinvm record`'s defaults, recording `run` to `log`.
fn record_args(log: PathBuf, run: RunArgs) -> RecordArgs {
    RecordArgs {
        log,
        digest_interval: 256,
        sync_bound_us: 200,
        tick_deferral_ms: DEFAULT_TICK_DEFERRAL.as_millis() as u64,
        sync_budget_percent: DEFAULT_SYNC_BUDGET_PERCENT,
        tick_delivery: None,
        trace_landmarks: false,
        max_log_size: None,
        page_cache: 64 << 20,
        hot_pages: DEFAULT_HOT_PAGE_BUDGET,
        sync_state_every_ms: DEFAULT_SYNC_STATE_EVERY.as_millis() as u64,
        run,
    }
}

/// A scratch directory removed when the demo ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Part 1: a VM survives the loss of its host.
fn failover() -> Result<bool> {
    eprintln!(
        "\n== twinvm demo, part 1: the `counter` guest as a fault-tolerant pair on hosts A and B \
         (network namespaces), a 3-node arbiter, a client sending numbered requests; then the \
         primary's process is killed"
    );
    let interrupted = super::drill::interrupt_flag()?;
    let exe = std::env::current_exe().context("locating the twinvm executable")?;
    let report = run_local(
        DrillKind::KillPrimary,
        &LocalOptions::new(exe),
        &interrupted,
    )
    .context("running the local kill-primary drill")?;
    print!("{}", report.to_text());
    Ok(report.passed())
}

pub fn demo() -> Result<ExitCode> {
    let survived = failover()?;
    eprintln!("\n== twinvm demo, part 2: the record/replay engine under the pair");
    eprintln!("\n== twinvm demo: booting builtin:hello");
    let report = boot_and_run(
        &guest_args("hello", "stdio"),
        RecordSettings::default(),
        false,
    )?;
    eprintln!("twinvm demo: builtin:hello: {}", describe(&report));
    print_stats(&report);
    if report.ending() == Some(Ending::Stopped) {
        return Ok(ExitCode::from(130));
    }

    let dir = Scratch(std::env::temp_dir().join(format!("twinvm-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let log = dir.0.join("storm.log");
    let recorded_console = dir.0.join("storm-recorded.txt");
    let replayed_console = dir.0.join("storm-replayed.txt");

    eprintln!("\n== twinvm demo: recording builtin:storm (1 kHz timer into user-mode loops, trapped time reads)");
    let code = record(&record_args(
        log.clone(),
        guest_args("storm", &path_str(&recorded_console)),
    ))?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    let console =
        std::fs::read_to_string(&recorded_console).context("reading the recorded console")?;
    print!("{console}");
    eprintln!("\n== twinvm demo: replaying it from the log");
    replay(&ReplayArgs {
        log: log.clone(),
        test_perturb: None,
        catch_up: false,
        run: guest_args("storm", &path_str(&replayed_console)),
    })?;
    let replayed =
        std::fs::read_to_string(&replayed_console).context("reading the replayed console")?;
    println!(
        "demo: the replayed console is {} to the recorded one",
        if replayed == console {
            "identical"
        } else {
            "NOT identical"
        }
    );

    eprintln!("\n== twinvm demo: a guest that reads the TSC in user mode cannot be replayed; the digests say so");
    let log = dir.0.join("rdtscuser.log");
    record(&record_args(
        log.clone(),
        guest_args("rdtscuser", &path_str(&dir.0.join("r1.txt"))),
    ))?;
    match replay(&ReplayArgs {
        log,
        test_perturb: None,
        catch_up: false,
        run: guest_args("rdtscuser", &path_str(&dir.0.join("r2.txt"))),
    }) {
        Ok(_) => println!("demo: UNEXPECTED: the user-mode TSC guest replayed as identical"),
        Err(e) => println!("demo: divergence detected as expected: {e:#}"),
    }
    Ok(if survived && replayed == console {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
