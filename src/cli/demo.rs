//! `twinvm demo`: the README's main job on embedded guests. Boots the test
//! guests, records the `storm` guest (timer interrupts into user-mode loops,
//! trapped time reads) and replays it to an identical state, then shows that
//! a guest reading the TSC in user mode is caught as divergence.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};

use super::replay::{record, replay, RecordArgs, ReplayArgs};
use super::run::{boot_and_run, describe, print_stats, RunArgs};
use crate::guests::BUILTIN_PREFIX;
use crate::replay::engine::Ending;

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

pub fn demo() -> Result<ExitCode> {
    for name in ["hello", "ticker"] {
        eprintln!("\n== twinvm demo: booting builtin:{name}");
        let report = boot_and_run(&guest_args(name, "stdio"), false)?;
        eprintln!("twinvm demo: builtin:{name}: {}", describe(&report));
        print_stats(&report);
        if report.ending() == Some(Ending::Stopped) {
            return Ok(ExitCode::from(130));
        }
    }

    let dir = Scratch(std::env::temp_dir().join(format!("twinvm-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let log = dir.0.join("storm.log");
    let recorded_console = dir.0.join("storm-recorded.txt");
    let replayed_console = dir.0.join("storm-replayed.txt");

    eprintln!("\n== twinvm demo: recording builtin:storm (1 kHz timer into user-mode loops, trapped time reads)");
    let code = record(&RecordArgs {
        log: log.clone(),
        digest_interval: 256,
        sync_bound_us: 200,
        trace_landmarks: false,
        run: guest_args("storm", &path_str(&recorded_console)),
    })?;
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
    record(&RecordArgs {
        log: log.clone(),
        digest_interval: 256,
        sync_bound_us: 200,
        trace_landmarks: false,
        run: guest_args("rdtscuser", &path_str(&dir.0.join("r1.txt"))),
    })?;
    match replay(&ReplayArgs {
        log,
        test_perturb: None,
        run: guest_args("rdtscuser", &path_str(&dir.0.join("r2.txt"))),
    }) {
        Ok(_) => println!("demo: UNEXPECTED: the user-mode TSC guest replayed as identical"),
        Err(e) => println!("demo: divergence detected as expected: {e:#}"),
    }
    Ok(if replayed == console {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
