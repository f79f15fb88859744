//! `twinvm clone`: ask a primary running alone to clone itself to a new
//! backup, then follow the copy until the pair is whole or the clone failed
//! (docs/operations.md "Repair by clone").

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;

use crate::clone::CloneStatus;
use crate::ft::node::{query_status, request_clone};

/// How long `twinvm clone` follows a clone before giving up watching (the
/// clone itself goes on in the primary).
const WATCH_FOR: Duration = Duration::from_secs(3600);

/// `twinvm clone`.
#[derive(Debug, Clone, Args)]
pub struct CloneArgs {
    /// The primary's control socket.
    #[arg(long)]
    pub control: PathBuf,
    /// The new backup's --listen address, host:port.
    #[arg(long)]
    pub to: String,
    /// Print the final report as JSON (the `clone` object of `twinvm status --json`).
    #[arg(long)]
    pub json: bool,
}

fn progress_line(s: &CloneStatus) -> String {
    format!(
        "{:<10} round {:>3}  {:>8} pages  {:>9.1} MiB sent  {:>7} dirty ({:.0} pages/s)  est. pause {:.1} ms",
        s.phase,
        s.round,
        s.pages_sent,
        s.bytes_sent as f64 / (1 << 20) as f64,
        s.dirty_pages,
        s.dirty_rate,
        s.estimated_pause_ms
    )
}

/// The final report as text.
pub fn report(s: &CloneStatus) -> String {
    if s.phase == "done" {
        format!(
            "clone to {} done: the pair is whole at generation {}\n\
             total {:.2} s, {} rounds, {} pages ({:.1} MiB on the wire), pause {:.1} ms \
             (after {:.1} ms waiting for a landmark), cut at landmark {}\n\
             ({})\n",
            s.to,
            s.generation,
            s.total_ms / 1e3,
            s.round,
            s.pages_sent,
            s.bytes_sent as f64 / (1 << 20) as f64,
            s.pause_ms,
            s.cut_wait_ms,
            s.landmark,
            s.cut_reason
        )
    } else {
        format!(
            "clone to {} failed after {:.2} s: {}\nthe primary goes on alone at its old generation\n",
            s.to,
            s.total_ms / 1e3,
            s.error
        )
    }
}

pub fn clone(args: &CloneArgs) -> Result<ExitCode> {
    request_clone(&args.control, &args.to)
        .map_err(|e| anyhow::anyhow!("the primary refused the clone: {e}"))?;
    let terminal = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last = String::new();
    loop {
        if started.elapsed() > WATCH_FOR {
            bail!("the clone is still under way after {WATCH_FOR:?}; see `twinvm status`");
        }
        thread::sleep(Duration::from_millis(200));
        let status = query_status(&args.control).map_err(anyhow::Error::msg)?;
        let Some(clone) = status.clone else {
            bail!("the primary reports no clone");
        };
        if clone.finished() {
            if terminal {
                eprintln!();
            }
            if args.json {
                println!("{}", serde_json::to_string(&clone)?);
            } else {
                print!("{}", report(&clone));
            }
            return Ok(if clone.phase == "done" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        let line = progress_line(&clone);
        if line != last {
            if terminal {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
            last = line;
        }
    }
}
