//! Drills against a pair that is already running (no `--local`).
//!
//! What this mode can do is limited by what the drill can reach: it talks to
//! both sides' control sockets (so both processes run on this machine —
//! namespaces or plain processes), kills the process serving a socket
//! (found by SO_PEERCRED), sends the client's requests from the namespace the
//! drill runs in, and reads the arbiter's holder if given `--arbiters`.
//! `kill-primary` and `kill-backup` only: a partition needs the drill to own
//! the logging link, and `arbiter-leader` the arbiter's processes — both are
//! `--local` drills.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arbiter::auth::Key;
use arbiter::client::{ArbiterClient, ClientConfig};
use tracing::info;

use super::client::{wait_for_service, Client, ClientSettings};
use super::history::analyze;
use super::pair::{query_status, query_status_and_pid, PairStatus};
use super::report::DrillReport;
use super::verdict::{judge, Expectation, Limits, PairOutcome, SideOutcome, SERVING_STATES};
use super::{sleep_checked, wait_until, DrillError, DrillKind, Phases, POLL};
use crate::net::CounterClient;

const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// Once the drill ends, how long a survivor not (yet) serving gets to
/// answer in a serving state (an overloaded host answers late).
const OUTCOME_WAIT: Duration = Duration::from_secs(5);

/// What a control socket said.
enum Seen {
    Answered(PairStatus),
    /// Nothing listens there any more: its process is gone.
    Gone,
    /// No answer in time (an overloaded host): no evidence either way.
    Silent,
}

impl Seen {
    fn at(control: &Path) -> Seen {
        match query_status(control, STATUS_TIMEOUT) {
            Ok(s) => Seen::Answered(s),
            Err(DrillError::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Seen::Gone
            }
            Err(_) => Seen::Silent,
        }
    }

    /// Serving, or gone: nothing more to wait for.
    fn settled(&self) -> bool {
        match self {
            Seen::Answered(s) => SERVING_STATES.contains(&s.state.as_str()),
            Seen::Gone => true,
            Seen::Silent => false,
        }
    }
}

/// Settings of a drill against a running pair.
#[derive(Debug, Clone)]
pub struct ExistingOptions {
    pub primary_control: PathBuf,
    pub backup_control: PathBuf,
    /// The guest's counter service.
    pub target: SocketAddr,
    /// Where the client's socket binds (port 0: any).
    pub bind: SocketAddr,
    /// The arbiter nodes (`host:port`); empty: the holder is not checked.
    pub arbiters: Vec<String>,
    pub arbiter_key_file: Option<PathBuf>,
    pub arbiter_cluster_id: String,
    pub interval: Duration,
    pub retry_after: Duration,
    pub window: usize,
    pub phases: Phases,
    pub limits: Limits,
}

struct Side {
    control: PathBuf,
    status: PairStatus,
    pid: u32,
}

fn side(control: &Path, role: &str, state: &str) -> Result<Side, DrillError> {
    let (status, pid) = query_status_and_pid(control, STATUS_TIMEOUT)?;
    if status.role != role || status.state != state {
        return Err(DrillError::Usage(format!(
            "{} is the {} in state {}; a drill needs the {role} in state {state}",
            control.display(),
            status.role,
            status.state
        )));
    }
    if pid == std::process::id() {
        return Err(DrillError::Usage(format!(
            "{} is served by this very process",
            control.display()
        )));
    }
    Ok(Side {
        control: control.to_path_buf(),
        status,
        pid,
    })
}

/// Run drill `kind` against the pair behind the two control sockets.
pub fn run_existing(
    kind: DrillKind,
    opts: &ExistingOptions,
    interrupted: &AtomicBool,
) -> Result<DrillReport, DrillError> {
    if !matches!(kind, DrillKind::KillPrimary | DrillKind::KillBackup) {
        return Err(DrillError::Usage(format!(
            "{kind} needs --local: the drill must own the {} it breaks",
            match kind {
                DrillKind::Partition => "logging link",
                DrillKind::DoubleFailure => "host it clones to",
                _ => "arbiter nodes",
            }
        )));
    }
    let settings = ClientSettings {
        target: opts.target,
        interval: opts.interval,
        retry_after: opts.retry_after,
        window: opts.window,
    };
    settings.validate()?;
    let key = opts
        .arbiter_key_file
        .as_ref()
        .map(|p| {
            Key::from_file(p).map_err(|e| DrillError::Arbiter(format!("loading the key: {e}")))
        })
        .transpose()?;
    let setup_start = Instant::now();
    let primary = side(&opts.primary_control, "primary", "replicating")?;
    let backup = side(&opts.backup_control, "backup", "following")?;
    if primary.status.vm != backup.status.vm {
        return Err(DrillError::Usage(format!(
            "the sockets belong to two VMs: {} and {}",
            primary.status.vm, backup.status.vm
        )));
    }

    let probe = CounterClient::new(opts.bind, opts.target).map_err(|e| DrillError::Client {
        op: "opening the readiness probe",
        source: std::io::Error::other(e.to_string()),
    })?;
    let stop = || {
        if interrupted.load(Ordering::SeqCst) {
            Err(DrillError::Interrupted)
        } else {
            Ok(())
        }
    };
    if !wait_for_service(&probe, opts.phases.ready_timeout, stop)? {
        return Err(DrillError::Timeout {
            what: format!("the guest answering at {}", opts.target),
            after: opts.phases.ready_timeout,
            detail: String::new(),
        });
    }
    drop(probe);
    let setup = setup_start.elapsed();
    let socket = std::net::UdpSocket::bind(opts.bind).map_err(|source| DrillError::Client {
        op: "binding the client socket",
        source,
    })?;
    let client = Client::start(socket, settings, Instant::now())?;
    wait_until(
        "the drill client's first answer",
        Duration::from_secs(10),
        interrupted,
        || Ok((client.answered() > 0).then_some(())),
    )?;
    let before_warmup = client.answered();
    sleep_checked(opts.phases.warmup, interrupted, || Ok(()))?;
    // Steady service before the fault, however slowly the host answers.
    let want = opts.phases.warmup_answers;
    wait_until(
        &format!("{want} answers before the fault"),
        opts.phases.ready_timeout,
        interrupted,
        || Ok((client.answered() - before_warmup >= want).then_some(())),
    )?;

    let (victim, survivor) = match kind {
        DrillKind::KillBackup => (&backup, &primary),
        _ => (&primary, &backup),
    };
    // SAFETY: kill(2) takes no pointers. The PID is the one serving the
    // victim's control socket, read just before; the operator named it.
    if unsafe { libc::kill(victim.pid as libc::pid_t, libc::SIGKILL) } != 0 {
        return Err(DrillError::Io {
            op: "killing the process serving",
            path: victim.control.clone(),
            source: std::io::Error::last_os_error(),
        });
    }
    // Once the kill is sent: the victim answers nothing asked from here on.
    let fault_at = client.epoch().elapsed();
    let fault = format!(
        "SIGKILL of the {} on {} (pid {})",
        victim.status.role, victim.status.node, victim.pid
    );
    info!(%fault, "fault injected");

    // As in a local drill: traffic goes on until the survivor serves (or is
    // gone), then for `after_replies` more answers, within the recovery timeout.
    let fault_instant = Instant::now();
    let end = fault_instant + opts.phases.recovery_timeout;
    let mut answered_when_settled: Option<u64> = None;
    loop {
        if interrupted.load(Ordering::SeqCst) {
            return Err(DrillError::Interrupted);
        }
        if Instant::now() >= end {
            break;
        }
        if answered_when_settled.is_none() && Seen::at(&survivor.control).settled() {
            answered_when_settled = Some(client.answered());
        }
        if answered_when_settled.is_some_and(|n| client.answered() >= n + opts.phases.after_replies)
        {
            break;
        }
        std::thread::sleep(POLL);
    }
    let history = client.finish(opts.phases.drain)?;
    if interrupted.load(Ordering::SeqCst) {
        return Err(DrillError::Interrupted);
    }
    let outcome_end = Instant::now() + OUTCOME_WAIT;
    let mut seen = Seen::at(&survivor.control);
    while !seen.settled() && Instant::now() < outcome_end {
        std::thread::sleep(POLL);
        match Seen::at(&survivor.control) {
            Seen::Silent => {}
            other => seen = other,
        }
    }

    let outcome_of = |s: &Side, killed: bool, seen: &Seen| SideOutcome {
        node: s.status.node.clone(),
        role: s.status.role.clone(),
        killed_by_drill: killed,
        // A silent socket is still there: running, state unknown.
        running: !killed && !matches!(seen, Seen::Gone),
        exit_code: None,
        exit_signal: killed.then_some(libc::SIGKILL),
        final_state: match seen {
            Seen::Answered(st) => Some(st.state.clone()),
            _ => None,
        },
        // Not our child: its stderr is not ours to read.
        claimed_vm: false,
        reported_lost: false,
    };
    let mut sides = vec![
        outcome_of(victim, true, &Seen::Gone),
        outcome_of(survivor, false, &seen),
    ];
    if kind == DrillKind::KillBackup {
        sides.reverse();
    }
    let (arbiter_holder, arbiter_error) = if opts.arbiters.is_empty() {
        (None, Some("no --arbiters given".to_owned()))
    } else {
        let mut c = ArbiterClient::new(ClientConfig {
            cluster_id: opts.arbiter_cluster_id.clone(),
            addrs: opts.arbiters.clone(),
            deadline: Duration::from_secs(5),
            key,
        });
        match c.get(&primary.status.vm) {
            Ok(slot) => (Some(slot.and_then(|s| s.holder)), None),
            Err(e) => (None, Some(e.to_string())),
        }
    };
    let pair = PairOutcome {
        sides,
        arbiter_holder,
        arbiter_error,
    };
    let analysis = analyze(&history, Some(fault_at));
    let expect = Expectation::for_drill(kind, &primary.status.node, &backup.status.node);
    let verdict = judge(&analysis, &pair, &expect, opts.limits, None);
    Ok(DrillReport {
        drill: kind,
        mode: "existing",
        protection: "pair",
        network: None,
        fault,
        fault_at_ms: fault_at.as_secs_f64() * 1e3,
        setup_ms: setup.as_secs_f64() * 1e3,
        verdict,
        analysis,
        pair,
        logs: Vec::new(),
    })
}
