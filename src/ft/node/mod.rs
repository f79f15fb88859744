//! The pair's I/O edge: the TCP logging channel, the threads around the
//! replay engine, the arbiter client and the control socket. The protocol
//! decisions are the sans-IO core's (`link`, `output`, `failover`); this
//! module moves bytes and runs the engine (`twinvm primary`, `twinvm backup`).
//!
//! Threads of a replica: the vCPU thread (the engine; the caller's), the
//! link thread (the channel's state machines, the held or shadow outputs,
//! the failover machine), a socket reader, an arbiter client, the control
//! socket server, and the TAP and timer threads of the engine.

#![forbid(unsafe_code)]

mod backup;
mod edge;
mod feed;
mod primary;
mod status;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use arbiter::auth::Key;
use arbiter::{ArbiterClient, ClientConfig};
use crossbeam_channel::{Receiver, Sender};

use edge::{LinkEdge, WRITE_SLICE};

pub use backup::{run_backup, run_backup_from};
pub use primary::run_primary;
pub use status::{query_status, request_clone, PageCacheStatus, PairStatus};

use super::failover::{Action, Failover, FailoverEvent, Verdict};
use super::link::LinkConfig;
use crate::devices::TickDelivery;
use crate::net::tap::TapBackend;
use crate::net::NetSpec;
use crate::replay::engine::Control;
use crate::vmm::Kicker;
use crate::vmm::VmConfig;

/// Exit codes of `twinvm primary|backup` (docs/operations.md).
pub const EXIT_OK: i32 = 0;
pub const EXIT_ERROR: i32 = 1;
pub use super::failover::{EXIT_DIVERGED, EXIT_LOST};
pub const EXIT_STOPPED: i32 = 130;

/// How to reach the arbiter.
#[derive(Debug, Clone)]
pub struct ArbiterSettings {
    pub addrs: Vec<String>,
    pub cluster_id: String,
    pub key: Option<Key>,
    /// Budget of one test-and-set attempt (the failover machine retries).
    pub attempt_deadline: Duration,
}

/// One replica's settings (flags or a TOML file, see `cli::pair`).
#[derive(Debug, Clone)]
pub struct PairConfig {
    pub vm: String,
    pub generation: u64,
    /// This host's name, qualified with the role for the arbiter.
    pub node: String,
    /// The logging channel's pre-shared key.
    pub key: Key,
    pub arbiter: ArbiterSettings,
    pub link: LinkConfig,
    /// The control socket (`twinvm status`).
    pub control: PathBuf,
    /// Host CPU the vCPU thread runs on (the primary's is written in the
    /// log header; a backup normally pins to the same one, see
    /// docs/operations.md "Host CPU").
    pub host_cpu: Option<u32>,
    /// How long a due interrupt may wait for a landmark before a sync point.
    pub sync_bound: Duration,
    /// How long a tick owed to a user-mode guest may wait (the primary's;
    /// `RecordSettings::tick_deferral`).
    pub tick_deferral: Duration,
    /// The most of the time, in percent, the primary's sync points for
    /// ticks may keep the guest stopped (`RecordSettings::sync_budget_percent`).
    pub sync_budget_percent: u8,
    /// How the primary's ticks reach the guest (`--tick-delivery`; a
    /// backup follows the log header's).
    pub tick_delivery: TickDelivery,
    /// The primary's hot-page budget (`RecordSettings::hot_page_budget`;
    /// a backup re-protects every page whatever it says).
    pub hot_pages: usize,
    /// The primary's least time between sync points with state
    /// (`RecordSettings::sync_state_every`).
    pub sync_state_every: Duration,
}

/// The guest both replicas run.
pub struct GuestSetup {
    pub vm: VmConfig,
    pub net: Option<NetSpec>,
    /// Where the console goes (stdout or a file).
    pub console: Box<dyn Write + Send>,
    /// Wall-clock seconds the guest's RTC starts from (the primary's; the
    /// backup takes it from the log header).
    pub boot_unix_secs: u64,
    /// Test hook: a backup made wrong on purpose (`replay --test-perturb`).
    pub test_perturbation: Option<crate::replay::engine::TestPerturbation>,
}

/// The TAP of `--net`, moving frames, waking the vCPU through `kicker`.
pub fn open_tap(net: Option<&NetSpec>, kicker: &Kicker) -> anyhow::Result<Option<Arc<TapBackend>>> {
    let Some(spec) = net else {
        return Ok(None);
    };
    let wake = kicker.clone();
    let backend = TapBackend::open(&spec.tap, move || wake.kick())
        .map_err(|e| anyhow::anyhow!("opening TAP device {} (--net): {e}", spec.tap))?;
    Ok(Some(Arc::new(backend)))
}

/// Bytes from the peer, or the end of the connection.
#[derive(Debug)]
enum SocketEvent {
    Bytes(Vec<u8>),
    Closed(String),
}

/// Read the socket on a thread of its own, so the link thread can wait on
/// channels (and its timers) instead of a blocking read.
fn spawn_socket_reader(mut stream: TcpStream, tx: Sender<SocketEvent>) -> std::io::Result<()> {
    thread::Builder::new()
        .name("twinvm-ft-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => {
                        let _ =
                            tx.send(SocketEvent::Closed("the peer closed the connection".into()));
                        return;
                    }
                    Ok(n) => {
                        tracing::trace!(bytes = n, "link: read");
                        if tx.send(SocketEvent::Bytes(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ =
                            tx.send(SocketEvent::Closed(format!("reading the connection: {e}")));
                        return;
                    }
                }
            }
        })
        .map(|_| ())
}

/// A test-and-set request for the arbiter thread.
#[derive(Debug, Clone)]
struct ArbiterRequest {
    vm: String,
    generation: u64,
    requester: String,
}

/// The arbiter client on its own thread: a test-and-set may take a while
/// (a leader election), and heartbeats must go on meanwhile.
fn spawn_arbiter_client(
    settings: ArbiterSettings,
) -> std::io::Result<(Sender<ArbiterRequest>, Receiver<Verdict>)> {
    let (req_tx, req_rx) = crossbeam_channel::bounded::<ArbiterRequest>(4);
    let (verdict_tx, verdict_rx) = crossbeam_channel::bounded(4);
    thread::Builder::new()
        .name("twinvm-ft-arbiter".into())
        .spawn(move || {
            let mut client = ArbiterClient::new(ClientConfig {
                cluster_id: settings.cluster_id.clone(),
                addrs: settings.addrs.clone(),
                deadline: settings.attempt_deadline,
                key: settings.key.clone(),
            });
            for req in req_rx {
                let started = Instant::now();
                let verdict = match client.test_and_set(&req.vm, req.generation, &req.requester) {
                    Ok(outcome) => Verdict::Decided(outcome),
                    Err(e) => Verdict::Unreachable {
                        error: e.to_string(),
                    },
                };
                tracing::info!(
                    "arbiter test-and-set({}, {}, {}) -> {verdict:?} in {:.1} ms",
                    req.vm,
                    req.generation,
                    req.requester,
                    started.elapsed().as_secs_f64() * 1e3
                );
                if verdict_tx.send(verdict).is_err() {
                    return;
                }
            }
        })?;
    Ok((req_tx, verdict_rx))
}

/// What the edge does with either end of the logging channel.
trait LinkEnd {
    fn on_bytes_received(&mut self, bytes: &[u8], now: Duration);
    fn connection_lost(&mut self, reason: &str);
    fn poll_transmit(&mut self, now: Duration) -> Option<Vec<u8>>;
    fn handle_timeout(&mut self, now: Duration);
    fn credit_local_stall(&mut self, stalled: Duration, now: Duration) -> Duration;
}

macro_rules! link_end {
    ($t:ty) => {
        impl LinkEnd for $t {
            fn on_bytes_received(&mut self, bytes: &[u8], now: Duration) {
                <$t>::on_bytes_received(self, bytes, now)
            }
            fn connection_lost(&mut self, reason: &str) {
                <$t>::connection_lost(self, reason)
            }
            fn poll_transmit(&mut self, now: Duration) -> Option<Vec<u8>> {
                <$t>::poll_transmit(self, now)
            }
            fn handle_timeout(&mut self, now: Duration) {
                <$t>::handle_timeout(self, now)
            }
            fn credit_local_stall(&mut self, stalled: Duration, now: Duration) -> Duration {
                <$t>::credit_local_stall(self, stalled, now)
            }
        }
    };
}
link_end!(super::link::PrimaryLink);
link_end!(super::link::BackupLink);

/// Feed what the socket reader delivered (or its end) to the link.
fn apply_socket_event(
    link: &mut dyn LinkEnd,
    event: Result<SocketEvent, crossbeam_channel::RecvError>,
    now: Duration,
) {
    match event {
        Ok(SocketEvent::Bytes(bytes)) => link.on_bytes_received(&bytes, now),
        Ok(SocketEvent::Closed(reason)) => link.connection_lost(&reason),
        Err(_) => link.connection_lost("the socket reader ended"),
    }
}

/// The failover machine and the arbiter client it drives.
struct Arbitration {
    failover: Option<Failover>,
    arbiter_tx: Sender<ArbiterRequest>,
}

impl Arbitration {
    fn handle(&mut self, event: FailoverEvent, now: Duration) {
        if let Some(f) = &mut self.failover {
            f.handle(event, now);
        }
    }

    /// The machine's actions due by `now`, the arbiter already asked for
    /// those that ask it; the others are the caller's to perform.
    fn actions(&mut self, now: Duration) -> Vec<Action> {
        let Some(failover) = &mut self.failover else {
            return Vec::new();
        };
        failover.handle_timeout(now);
        let mut actions = Vec::new();
        while let Some(action) = failover.poll_action() {
            match action {
                Action::AskArbiter {
                    vm,
                    generation,
                    requester,
                } => {
                    let _ = self.arbiter_tx.try_send(ArbiterRequest {
                        vm,
                        generation,
                        requester,
                    });
                }
                // `poll_timeout` covers the retry.
                Action::RetryArbiterAt(_) => {}
                other => actions.push(other),
            }
        }
        actions
    }

    fn poll_timeout(&self) -> Option<Duration> {
        self.failover.as_ref().and_then(|f| f.poll_timeout())
    }

    /// Copy the machine's state into the status board.
    fn publish(&self, board: &mut PairStatus) {
        if let Some(f) = &self.failover {
            let s = f.status();
            board.state = s.state.to_string();
            board.detail = s.detail;
        }
    }
}

/// How the link thread reaches the engine: control messages and a kick.
#[derive(Clone)]
struct EngineHandle {
    control_tx: Sender<Control>,
    kicker: Kicker,
}

impl EngineHandle {
    fn send(&self, msg: Control) {
        let _ = self.control_tx.try_send(msg);
        self.kicker.kick();
    }
}

/// The failover machine said stop: say why (loudly when the arbitration
/// was lost), stop the engine, and return the exit.
fn stop_for(engine: &EngineHandle, exit_code: i32, message: String) -> (i32, String) {
    if exit_code == EXIT_LOST {
        eprintln!("twinvm: lost the arbitration ({message}): stopping");
    }
    engine.send(Control::Stop);
    (exit_code, message)
}

/// The pair's clock: time since the replica started, for the sans-IO core.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}
