//! `twinvm drill ... --local`: build the whole topology on this machine
//! (namespaces, bridges, TAPs, the logging link), a 3-node arbiter, the
//! `counter` guest as an FT pair and a client; inject the fault; judge; tear
//! everything down — also when the drill is interrupted (the caller sets the
//! `interrupted` flag from its signal handler; every wait polls it, and the
//! teardown is the drop of [`LocalPair`]).

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arbiter::local_cluster::{ClusterOptions, Launcher, LocalCluster};
use tracing::{debug, info};

use super::client::{wait_for_service, Client, ClientSettings};
use super::history::analyze;
use super::pair::{
    backup_args, primary_args, query_status, read_claims, unprotected_args, GuestSpec, PairSpec,
    Proc, SideFiles,
};
use super::report::{DrillReport, ProcessLog};
use super::topology::{self, addr, Host, Topology};
use super::verdict::{
    judge, Expectation, Limits, PairOutcome, PreFaultFailover, SideOutcome, SERVING_STATES,
};
use super::{wait_until, DrillError, DrillKind, Phases};
use crate::net::CounterClient;

mod repair;
mod whole;

use whole::{not_injected, warm_up, Injected};

/// The node name of the double-failure drill's clone (it runs in hostA's
/// namespace, the first primary's host, once that primary is dead).
pub const CLONE_NODE: &str = "hostC";
/// The VM name and generation the local pair runs with.
pub const VM_NAME: &str = "drill";
pub const GENERATION: u64 = 1;
/// The arbiter's cluster id (the pair uses the default).
const ARBITER_CLUSTER_ID: &str = "twinvm";
/// Namespaces of local drills are named `PREFIX-PID-N`.
pub const DEFAULT_PREFIX: &str = "tvd";
/// How long a status query may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// With every side gone, how long the client keeps asking after the fault.
const NOTHING_LEFT_GRACE: Duration = Duration::from_secs(1);
/// Stderr lines kept from each process in a failed drill's report.
const LOG_TAIL: usize = 20;
/// Once the drill ends, how long the sides still running get to answer a
/// status query in a settled state (an overloaded host answers late).
const OUTCOME_WAIT: Duration = Duration::from_secs(5);
/// The states of a whole pair (the primary's, the backup's).
const WHOLE_STATES: [&str; 2] = ["replicating", "following"];

/// Whether the guest runs as an FT pair or alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// `twinvm primary` on hostA, `twinvm backup` on hostB.
    Pair,
    /// `twinvm run` on hostA only: a baseline showing what the drill reports
    /// when nothing can take over (its verdict fails by design).
    Unprotected,
}

impl Protection {
    fn name(self) -> &'static str {
        match self {
            Protection::Pair => "pair",
            Protection::Unprotected => "unprotected",
        }
    }
}

/// Settings of a local drill.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The `twinvm` binary the pair and the arbiter nodes run.
    pub exe: PathBuf,
    pub protection: Protection,
    pub guest: GuestSpec,
    pub heartbeat_ms: Option<u64>,
    pub peer_timeout_ms: Option<u64>,
    /// The client's pace (its target is the guest's address in the topology).
    pub interval: Duration,
    pub retry_after: Duration,
    pub window: usize,
    pub phases: Phases,
    pub limits: Limits,
    /// Prefix of the namespaces' names.
    pub prefix: String,
}

impl LocalOptions {
    /// The defaults: the `counter` guest with 64 MiB on `tap0`, a request
    /// every 5 ms retried after 30 ms.
    pub fn new(exe: PathBuf) -> LocalOptions {
        LocalOptions {
            exe,
            protection: Protection::Pair,
            guest: GuestSpec {
                kernel: "builtin:counter".into(),
                initrd: None,
                cmdline: format!("ip={} port={}", addr::GUEST, addr::GUEST_PORT),
                mem: "64M".into(),
                tap: topology::TAP.into(),
                host_cpu: None,
                sync_bound_us: None,
            },
            heartbeat_ms: None,
            peer_timeout_ms: None,
            interval: Duration::from_millis(5),
            retry_after: Duration::from_millis(30),
            window: 64,
            phases: Phases::default(),
            limits: Limits::default(),
            prefix: DEFAULT_PREFIX.into(),
        }
    }

    fn client_settings(&self) -> ClientSettings {
        ClientSettings {
            target: guest_target(),
            interval: self.interval,
            retry_after: self.retry_after,
            window: self.window,
        }
    }
}

/// The counter service of the guest in the local topology.
pub fn guest_target() -> SocketAddr {
    SocketAddr::from((addr::GUEST, addr::GUEST_PORT))
}

/// A running local pair (or unprotected guest) in its own network. Dropping
/// it kills every process it started and deletes the namespaces and files.
pub struct LocalPair {
    // Drop order matters: processes first, then the arbiter nodes, then the
    // namespaces they ran in, then the files.
    sides: Vec<Proc>,
    arbiter: Option<LocalCluster>,
    pub topo: Topology,
    dir: tempfile::TempDir,
    protection: Protection,
    /// Per node, how many suspicion lines ([`suspicions`]) it had written
    /// when the pair was last known whole ([`LocalPair::mark_whole`]).
    whole_marks: std::collections::HashMap<String, usize>,
}

impl LocalPair {
    /// Build the network, start the arbiter (for a pair) and the guest's
    /// side(s), and wait until the pair replicates (`primary` replicating,
    /// `backup` following) or the unprotected guest's process runs.
    pub fn start(opts: &LocalOptions, interrupted: &AtomicBool) -> Result<LocalPair, DrillError> {
        let stale = cleanup_stale(&opts.prefix)?;
        if !stale.is_empty() {
            info!(leftovers = ?stale, "removed the leftovers of killed drills");
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .map_err(|source| DrillError::Io {
                op: "creating a temporary directory in",
                path: std::env::temp_dir(),
                source,
            })?;
        let topo = Topology::build(&opts.prefix)?;
        debug!(namespaces = %topo.describe(), dir = %dir.path().display(), "local drill");
        let mut lp = LocalPair {
            sides: Vec::new(),
            arbiter: None,
            topo,
            dir,
            protection: opts.protection,
            whole_marks: Default::default(),
        };
        if interrupted.load(Ordering::SeqCst) {
            return Err(DrillError::Interrupted);
        }
        match opts.protection {
            Protection::Unprotected => {
                let files = SideFiles::in_dir(lp.dir.path(), Host::A.node());
                let mut cmd = lp.topo.host_a.command(&opts.exe);
                cmd.args(unprotected_args(&opts.guest, &files));
                lp.sides
                    .push(Proc::spawn(cmd, Host::A.node(), "unprotected", files)?);
            }
            Protection::Pair => lp.start_pair(opts, interrupted)?,
        }
        Ok(lp)
    }

    fn start_pair(
        &mut self,
        opts: &LocalOptions,
        interrupted: &AtomicBool,
    ) -> Result<(), DrillError> {
        let cluster = start_arbiter(&self.topo, &opts.exe)?;
        let key_file = cluster
            .key_path()
            .ok_or_else(|| DrillError::Arbiter("the cluster has no key file".into()))?
            .to_owned();
        self.arbiter = Some(cluster);
        if interrupted.load(Ordering::SeqCst) {
            return Err(DrillError::Interrupted);
        }

        let spec = PairSpec {
            vm: VM_NAME.into(),
            generation: GENERATION,
            backup_listen: format!("{}:{}", addr::FT_B, addr::FT_PORT),
            key_file,
            arbiters: Topology::arbiter_addrs(),
            heartbeat_ms: opts.heartbeat_ms,
            peer_timeout_ms: opts.peer_timeout_ms,
        };
        let b_files = SideFiles::in_dir(self.dir.path(), Host::B.node());
        let mut cmd = self.topo.host_b.command(&opts.exe);
        cmd.args(backup_args(&spec, &opts.guest, Host::B.node(), &b_files));
        self.sides
            .push(Proc::spawn(cmd, Host::B.node(), "backup", b_files)?);
        let timeout = opts.phases.ready_timeout;
        wait_until(
            "the backup's control socket answering",
            timeout,
            interrupted,
            || {
                self.check_running()?;
                Ok(query_status(&self.sides[0].files.control, STATUS_TIMEOUT).ok())
            },
        )?;

        let a_files = SideFiles::in_dir(self.dir.path(), Host::A.node());
        let mut cmd = self.topo.host_a.command(&opts.exe);
        cmd.args(primary_args(&spec, &opts.guest, Host::A.node(), &a_files));
        // The primary first in `sides`, as in every report.
        self.sides
            .insert(0, Proc::spawn(cmd, Host::A.node(), "primary", a_files)?);
        wait_until(
            "the pair replicating (primary `replicating`, backup `following`)",
            timeout,
            interrupted,
            || {
                self.check_running()?;
                let state = |p: &Proc| {
                    query_status(&p.files.control, STATUS_TIMEOUT)
                        .ok()
                        .map(|s| s.state)
                };
                let ready = state(&self.sides[0]).as_deref() == Some(WHOLE_STATES[0])
                    && state(&self.sides[1]).as_deref() == Some(WHOLE_STATES[1]);
                Ok(ready.then_some(()))
            },
        )?;
        self.mark_whole();
        Ok(())
    }

    /// An error if one of the sides has ended (before the fault), with the
    /// last lines it wrote.
    fn check_running(&mut self) -> Result<(), DrillError> {
        match self.sides.iter_mut().find_map(ended_early) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Wait until the guest answers a probe from the client's namespace,
    /// every side still running; a timeout names where its console is.
    pub fn wait_for_guest(
        &mut self,
        within: Duration,
        interrupted: &AtomicBool,
    ) -> Result<(), DrillError> {
        let probe = self
            .topo
            .client
            .enter_on_thread(|| {
                CounterClient::new(SocketAddr::from((addr::CLIENT, 0)), guest_target())
            })?
            .map_err(|e| DrillError::Client {
                op: "opening the readiness probe",
                source: std::io::Error::other(e.to_string()),
            })?;
        let up = wait_for_service(&probe, within, || {
            if interrupted.load(Ordering::SeqCst) {
                return Err(DrillError::Interrupted);
            }
            self.check_running()
        })?;
        if !up {
            return Err(DrillError::Timeout {
                what: format!("the guest answering at {}", guest_target()),
                after: within,
                detail: format!(" (its console: {})", self.dir().display()),
            });
        }
        Ok(())
    }

    /// The process of `role` (`primary`, `backup`, `unprotected`).
    pub fn side(&mut self, role: &str) -> Option<&mut Proc> {
        self.sides.iter_mut().find(|p| p.role == role)
    }

    /// The control socket of the side on `host`.
    pub fn control(&self, host: Host) -> PathBuf {
        SideFiles::in_dir(self.dir.path(), host.node()).control
    }

    /// Where the processes' logs, consoles and sockets are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The arbiter's key file (a pair only).
    pub fn key_file(&self) -> Option<&Path> {
        self.arbiter.as_ref().and_then(LocalCluster::key_path)
    }

    fn cluster(&self) -> Result<&LocalCluster, DrillError> {
        self.arbiter
            .as_ref()
            .ok_or_else(|| DrillError::Usage("an unprotected drill has no arbiter".into()))
    }

    /// The arbiter's current Raft leader (asked from its namespace).
    pub fn arbiter_leader(&self) -> Result<u64, DrillError> {
        let cluster = self.cluster()?;
        self.topo
            .arb
            .enter_on_thread(|| cluster.wait_leader(Duration::from_secs(5)))?
            .map_err(|e| DrillError::Arbiter(format!("finding the leader: {e:#}")))
    }

    /// SIGKILL arbiter node `id`.
    pub fn kill_arbiter(&mut self, id: u64) {
        if let Some(c) = self.arbiter.as_mut() {
            c.kill(id);
        }
    }

    /// The arbiter's holder of the drill's VM (`None` if it has none).
    pub fn arbiter_holder(&self) -> Result<Option<String>, DrillError> {
        let cluster = self.cluster()?;
        let slot = self
            .topo
            .arb
            .enter_on_thread(|| cluster.client(Duration::from_secs(5)).get(VM_NAME))?
            .map_err(|e| DrillError::Arbiter(format!("reading the holder of {VM_NAME}: {e}")))?;
        Ok(slot.and_then(|s| s.holder))
    }

    /// A counter client socket in the client's namespace.
    fn client_socket(&self) -> Result<UdpSocket, DrillError> {
        self.topo
            .client
            .enter_on_thread(|| UdpSocket::bind((addr::CLIENT, 0)))?
            .map_err(|source| DrillError::Client {
                op: "binding the client socket",
                source,
            })
    }

    /// Whether every side has ended (nothing can answer any more).
    fn all_ended(&mut self) -> bool {
        self.sides.iter_mut().all(|p| !p.running())
    }

    /// Every side either ended or serving alone.
    fn settled(&mut self) -> bool {
        self.sides.iter_mut().all(|p| {
            !p.running()
                || query_status(&p.files.control, STATUS_TIMEOUT)
                    .is_ok_and(|s| SERVING_STATES.contains(&s.state.as_str()))
        })
    }

    /// What became of each side. A side still running and not (yet)
    /// serving — a loser on its way out, a status query an overloaded host
    /// answered late — is asked again until it has settled (ended, or a
    /// serving state) or `OUTCOME_WAIT` has passed: its last answer is
    /// what is judged.
    fn outcome(&mut self) -> PairOutcome {
        let end = Instant::now() + OUTCOME_WAIT;
        let mut states: Vec<Option<String>> = vec![None; self.sides.len()];
        loop {
            let mut settled = true;
            for (p, state) in self.sides.iter_mut().zip(states.iter_mut()) {
                if !p.running() {
                    *state = None;
                    continue;
                }
                if let Ok(s) = query_status(&p.files.control, STATUS_TIMEOUT) {
                    *state = Some(s.state);
                }
                settled &= state
                    .as_deref()
                    .is_some_and(|s| SERVING_STATES.contains(&s));
            }
            if settled || Instant::now() >= end {
                break;
            }
            std::thread::sleep(super::POLL);
        }
        let sides = self
            .sides
            .iter_mut()
            .zip(states)
            .map(|(p, final_state)| {
                let running = p.running();
                let (exit_code, exit_signal) = p.exit_code_and_signal();
                let (claimed_vm, reported_lost) = read_claims(&p.stderr_text());
                SideOutcome {
                    node: p.node.clone(),
                    role: p.role.clone(),
                    killed_by_drill: p.killed_by_drill(),
                    running,
                    exit_code,
                    exit_signal,
                    final_state: final_state.filter(|_| running),
                    claimed_vm,
                    reported_lost,
                }
            })
            .collect();
        let (arbiter_holder, arbiter_error) = match self.protection {
            Protection::Unprotected => (None, Some("no arbiter in an unprotected drill".into())),
            Protection::Pair => match self.arbiter_holder() {
                Ok(h) => (Some(h), None),
                Err(e) => (None, Some(e.to_string())),
            },
        };
        PairOutcome {
            sides,
            arbiter_holder,
            arbiter_error,
        }
    }

    fn logs(&self) -> Vec<ProcessLog> {
        self.sides
            .iter()
            .map(|p| ProcessLog {
                node: p.node.clone(),
                role: p.role.clone(),
                lines: p.stderr_tail(LOG_TAIL),
            })
            .collect()
    }

    /// Stop what still runs: SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        for p in &mut self.sides {
            p.stop(grace);
        }
    }
}

/// Start the 3 arbiter nodes in the topology's arbiter namespace (on
/// 10.77.0.21-23, with a fresh key) and wait until one leads.
pub fn start_arbiter(topo: &Topology, exe: &Path) -> Result<LocalCluster, DrillError> {
    let launcher = Launcher {
        exe: "ip".into(),
        prefix_args: vec![
            "netns".into(),
            "exec".into(),
            topo.arb.name().into(),
            exe.to_string_lossy().into_owned(),
            "arbiter".into(),
            "serve".into(),
        ],
    };
    let cluster_opts = ClusterOptions {
        cluster_id: ARBITER_CLUSTER_ID.into(),
        allow_fault_injection: false,
        listen_addrs: Topology::arbiter_addrs(),
        ..ClusterOptions::default()
    };
    // Started from a thread in the arbiter's namespace, so that waiting for
    // its leader reaches the nodes' addresses.
    topo.arb
        .enter_on_thread(|| LocalCluster::start(launcher, cluster_opts))?
        .map_err(|e| DrillError::Arbiter(format!("starting 3 nodes: {e:#}")))
}

/// Temporary directories of local drills are named `DIR_PREFIX` PID `-` random.
const DIR_PREFIX: &str = "twinvm-drill-";

/// Remove what killed drills (SIGKILL: no teardown) left behind: their
/// namespaces named with `prefix` and every process still inside them
/// ([`topology::cleanup_stale`]), and their temporary directories. Returns
/// what was removed. Leftovers of running drills are never touched.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>, DrillError> {
    let mut removed = topology::cleanup_stale(prefix)?;
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return Ok(removed);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => removed.push(entry.path().display().to_string()),
            Err(e) => {
                tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove a stale drill directory")
            }
        }
    }
    Ok(removed)
}

/// The text that describes the local network in reports.
pub fn network_summary() -> String {
    let arbiters = addr::ARBITERS;
    format!(
        "client {} -> guest {}:{}; hostA {}, hostB {} (bridged TAPs); logging link {} <-> {}; arbiters {}, {}, {} port {}",
        addr::CLIENT,
        addr::GUEST,
        addr::GUEST_PORT,
        addr::HOST_A,
        addr::HOST_B,
        addr::FT_A,
        addr::FT_B,
        arbiters[0],
        arbiters[1],
        arbiters[2],
        addr::ARBITER_PORT
    )
}

/// Run drill `kind` on a local topology built for it, and tear it down.
pub fn run_local(
    kind: DrillKind,
    opts: &LocalOptions,
    interrupted: &AtomicBool,
) -> Result<DrillReport, DrillError> {
    if opts.protection == Protection::Unprotected && kind != DrillKind::KillPrimary {
        return Err(DrillError::Usage(format!(
            "an unprotected drill has only one side to kill: use kill-primary, not {kind}"
        )));
    }
    let settings = opts.client_settings();
    settings.validate()?;
    let phases = opts.phases;
    let setup_start = Instant::now();
    let mut lp = LocalPair::start(opts, interrupted)?;

    // The guest answers: a probe from the client's namespace.
    lp.wait_for_guest(phases.ready_timeout, interrupted)?;
    let setup = setup_start.elapsed();

    let client = Client::start(lp.client_socket()?, settings, Instant::now())?;
    wait_until(
        "the drill client's first answer",
        Duration::from_secs(10),
        interrupted,
        || {
            lp.check_running()?;
            Ok((client.answered() > 0).then_some(()))
        },
    )?;
    let early = warm_up(&mut lp, &client, &phases, 0, interrupted)?;
    // The fault only into a whole pair: one that failed over by itself
    // is judged as such, not as the drill's fault.
    let injected = match early.map_or_else(|| lp.not_whole(0), |e| Ok(Some(e)))? {
        Some(evidence) => not_injected(&client, "the fault", evidence),
        None => inject(kind, &mut lp, &client, opts, interrupted)?,
    };
    let Injected {
        what: fault,
        at: fault_at,
        mut pre_fault,
    } = injected;
    if pre_fault.is_none() {
        pre_fault = lp
            .killed_side_had_suspected()
            .map(|evidence| PreFaultFailover {
                evidence,
                fault_injected: true,
            });
    }
    match &pre_fault {
        None => info!(%fault, "fault injected"),
        Some(p) => {
            tracing::warn!(evidence = %p.evidence, "the pair failed over by itself before the fault")
        }
    }

    // After the fault the client goes on while the pair settles (the loser
    // stops, the survivor reports `alone`/`live`), and then for
    // `after_replies` more answers: a side still emitting when it should
    // have stopped shows in the counter. Ends early at the recovery
    // timeout, or a moment after nothing is left that could answer (what
    // the client asked meanwhile is what was lost).
    let fault_instant = Instant::now();
    let end = fault_instant + phases.recovery_timeout;
    let mut answered_when_settled: Option<u64> = None;
    loop {
        if interrupted.load(Ordering::SeqCst) {
            return Err(DrillError::Interrupted);
        }
        if Instant::now() >= end
            || (lp.all_ended() && fault_instant.elapsed() >= NOTHING_LEFT_GRACE)
        {
            break;
        }
        if answered_when_settled.is_none()
            && (opts.protection == Protection::Unprotected || lp.settled())
        {
            answered_when_settled = Some(client.answered());
        }
        if answered_when_settled.is_some_and(|n| client.answered() >= n + phases.after_replies) {
            break;
        }
        std::thread::sleep(super::POLL);
    }
    let history = client.finish(phases.drain)?;
    if interrupted.load(Ordering::SeqCst) {
        return Err(DrillError::Interrupted);
    }
    let pair = lp.outcome();
    let analysis = analyze(&history, Some(fault_at));
    let expect = Expectation::for_drill(kind, Host::A.node(), Host::B.node());
    let verdict = judge(&analysis, &pair, &expect, opts.limits, pre_fault.as_ref());
    let logs = if verdict.passed {
        Vec::new()
    } else {
        lp.logs()
    };
    lp.stop(Duration::from_secs(2));
    Ok(DrillReport {
        drill: kind,
        mode: "local",
        protection: opts.protection.name(),
        network: Some(network_summary()),
        fault,
        fault_at_ms: fault_at.as_secs_f64() * 1e3,
        setup_ms: setup.as_secs_f64() * 1e3,
        verdict,
        analysis,
        pair,
        logs,
    })
}

/// `EndedEarly` if `p` has exited, with the last lines of its stderr.
fn ended_early(p: &mut Proc) -> Option<DrillError> {
    let status = p.poll_exit()?;
    let tail = p.stderr_tail(LOG_TAIL);
    Some(DrillError::EndedEarly {
        what: format!("{} on {}", p.role, p.node),
        status: status.to_string(),
        tail: if tail.is_empty() {
            String::new()
        } else {
            format!("; its last lines:\n  {}", tail.join("\n  "))
        },
    })
}

/// Inject `kind`'s fault into the whole pair; returns what was done and when.
fn inject(
    kind: DrillKind,
    lp: &mut LocalPair,
    client: &Client,
    opts: &LocalOptions,
    interrupted: &AtomicBool,
) -> Result<Injected, DrillError> {
    let kill = |lp: &mut LocalPair, role: &str| -> Result<(String, Duration), DrillError> {
        let p = lp
            .side(role)
            .ok_or_else(|| DrillError::Usage(format!("this drill has no {role}")))?;
        let what = format!("SIGKILL of the {role} on {} (pid {})", p.node, p.pid());
        p.kill();
        // Once it is reaped: whatever is asked from here on, it cannot answer.
        Ok((what, client.epoch().elapsed()))
    };
    let injected = |(what, at): (String, Duration)| Injected {
        what,
        at,
        pre_fault: None,
    };
    match kind {
        DrillKind::KillPrimary => match lp.protection {
            Protection::Pair => kill(lp, "primary").map(injected),
            Protection::Unprotected => kill(lp, "unprotected").map(injected),
        },
        DrillKind::KillBackup => kill(lp, "backup").map(injected),
        DrillKind::Partition => {
            lp.topo.cut_logging_link()?;
            let at = client.epoch().elapsed();
            Ok(injected((
                format!(
                    "logging link cut ({} {} <-> {}, link down; LAN and arbiter still reachable)",
                    topology::FT_LINK,
                    addr::FT_A,
                    addr::FT_B
                ),
                at,
            )))
        }
        DrillKind::DoubleFailure => {
            let first = kill(lp, "primary")?;
            let clone = clone_survivor(lp, opts, interrupted)?;
            // The survivor and its clone are the pair now (sides 1 and 2).
            lp.mark_whole();
            let early = warm_up(lp, client, &opts.phases, 1, interrupted)?;
            if let Some(evidence) = early.map_or_else(|| lp.not_whole(1), |e| Ok(Some(e)))? {
                let mut i = not_injected(client, "the second fault", evidence);
                i.what = format!("{}; {clone}; then {}", first.0, i.what);
                return Ok(i);
            }
            let (second, at) = kill(lp, "backup")?;
            Ok(injected((
                format!("{}; {clone}; then {second}", first.0),
                at,
            )))
        }
        DrillKind::ArbiterLeader => {
            let leader = lp.arbiter_leader()?;
            lp.kill_arbiter(leader);
            let (what, at) = kill(lp, "primary")?;
            Ok(injected((
                format!("SIGKILL of arbiter node {leader} (the Raft leader), then {what}"),
                at,
            )))
        }
    }
}

/// The double-failure drill's repair: once the backup on hostB is live,
/// clone it to a new backup, [`CLONE_NODE`], in hostA's namespace (its
/// primary is dead). Returns what was done, with the clone's figures.
fn clone_survivor(
    lp: &mut LocalPair,
    opts: &LocalOptions,
    interrupted: &AtomicBool,
) -> Result<String, DrillError> {
    let report = lp.clone_alone_side(opts, Host::B, Host::A, CLONE_NODE, interrupted)?;
    Ok(format!(
        "clone of the live backup to {CLONE_NODE} (in hostA's namespace, {}:{}): \
         {:.0} ms in all, pause {:.1} ms, {} rounds, {} pages",
        addr::FT_A,
        addr::FT_PORT,
        report.total_ms,
        report.pause_ms,
        report.round,
        report.pages_sent
    ))
}
