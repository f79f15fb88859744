//! Failover drills: inject a fault into a running pair, watch a client of the
//! guest, and say what happened — who went live, how long the service was
//! interrupted, whether any request was lost, whether the guest's counter
//! ever went backwards or repeated an acknowledged value, and whether both
//! sides ever acted as the VM (split-brain).
//!
//! - [`history`] (sans-IO): what the client saw and its analysis;
//! - [`verdict`] (sans-IO): the checks a drill passes or fails;
//! - [`client`]: the `counter` guest's client (numbered, retried requests);
//! - [`pair`]: the pair's command lines (one place), processes, status queries;
//! - [`topology`]: the local drill's namespaces, bridges, TAPs and links;
//! - [`local`]: `--local` — build everything on this machine, drill, tear down;
//! - [`existing`]: drills against a pair that is already running;
//! - [`report`]: the report, as text and JSON.
//!
//! Operators' guide: docs/operations.md, "Failover drills".

pub mod client;
pub mod existing;
pub mod history;
pub mod local;
pub mod pair;
pub mod report;
pub mod topology;
pub mod verdict;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::net::NetNsError;

pub use client::ClientSettings;
pub use existing::{run_existing, ExistingOptions};
pub use local::{run_local, LocalOptions, LocalPair, Protection};
pub use report::DrillReport;
pub use verdict::{Limits, Verdict};

/// The fault a drill injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DrillKind {
    /// SIGKILL the primary: the backup must go live.
    KillPrimary,
    /// SIGKILL the backup: the primary must go on alone.
    KillBackup,
    /// Cut the logging link with both sides alive: exactly one must go on.
    Partition,
    /// SIGKILL the arbiter's Raft leader, then the primary: the backup must
    /// still go live with 2 of 3 arbiter nodes.
    ArbiterLeader,
    /// SIGKILL the primary (the backup goes live), clone the survivor to a
    /// new backup (`twinvm clone`), SIGKILL the survivor: the clone must go
    /// live (local only).
    DoubleFailure,
}

impl DrillKind {
    pub fn name(self) -> &'static str {
        match self {
            DrillKind::KillPrimary => "kill-primary",
            DrillKind::KillBackup => "kill-backup",
            DrillKind::Partition => "partition",
            DrillKind::ArbiterLeader => "arbiter-leader",
            DrillKind::DoubleFailure => "double-failure",
        }
    }
}

impl std::fmt::Display for DrillKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a drill could not be run (a drill that runs and fails its checks is
/// not an error: see [`Verdict`]).
#[derive(Debug, Error)]
pub enum DrillError {
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot start the {what}: {source}")]
    Spawn { what: String, source: io::Error },
    #[error("control socket {}: unexpected status answer: {reason}", path.display())]
    BadStatus { path: PathBuf, reason: String },
    #[error("drill client: {op}: {source}")]
    Client { op: &'static str, source: io::Error },
    #[error("arbiter: {0}")]
    Arbiter(String),
    #[error("{what} did not happen within {:.1} s{detail}", after.as_secs_f64())]
    Timeout {
        what: String,
        after: Duration,
        detail: String,
    },
    #[error("the {what} ended before the fault ({status}){tail}")]
    EndedEarly {
        what: String,
        status: String,
        tail: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("interrupted")]
    Interrupted,
}

/// Timings and amounts of a drill (the defaults suit the `counter` guest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phases {
    /// Steady traffic before the fault: at least this long...
    pub warmup: Duration,
    /// ...and until the client has had this many answers (an overloaded
    /// host answers slowly; the fault waits for steady service, within
    /// `ready_timeout`).
    pub warmup_answers: u64,
    /// Answers after the pair has settled (the loser stopped, the survivor
    /// serving) before the drill ends.
    pub after_replies: u64,
    /// Waiting for the pair to be ready and the guest to answer.
    pub ready_timeout: Duration,
    /// Most time from the fault to the end of the drill (the pair settling,
    /// then `after_replies` answers).
    pub recovery_timeout: Duration,
    /// Retrying the requests still unanswered once the drill ends.
    pub drain: Duration,
}

impl Default for Phases {
    fn default() -> Self {
        Phases {
            warmup: Duration::from_secs(2),
            warmup_answers: 100,
            after_replies: 200,
            ready_timeout: Duration::from_secs(60),
            recovery_timeout: Duration::from_secs(30),
            drain: Duration::from_secs(5),
        }
    }
}

/// How often waits poll what they wait for.
const POLL: Duration = Duration::from_millis(20);

/// Poll `check` until it yields a value, `timeout` passes (an error naming
/// `what`), or `interrupted` is set.
fn wait_until<T>(
    what: &str,
    timeout: Duration,
    interrupted: &AtomicBool,
    mut check: impl FnMut() -> Result<Option<T>, DrillError>,
) -> Result<T, DrillError> {
    let end = Instant::now() + timeout;
    loop {
        if interrupted.load(Ordering::SeqCst) {
            return Err(DrillError::Interrupted);
        }
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() >= end {
            return Err(DrillError::Timeout {
                what: what.to_owned(),
                after: timeout,
                detail: String::new(),
            });
        }
        std::thread::sleep(POLL);
    }
}

/// Sleep `d`, returning early with an error if `interrupted` is set, or if
/// `check` fails (it is called every poll interval).
fn sleep_checked(
    d: Duration,
    interrupted: &AtomicBool,
    mut check: impl FnMut() -> Result<(), DrillError>,
) -> Result<(), DrillError> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if interrupted.load(Ordering::SeqCst) {
            return Err(DrillError::Interrupted);
        }
        check()?;
        std::thread::sleep(POLL.min(end.saturating_duration_since(Instant::now())));
    }
    Ok(())
}
