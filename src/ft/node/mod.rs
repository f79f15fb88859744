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
mod feed;
mod primary;
mod status;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use arbiter::auth::Key;
use arbiter::{ArbiterClient, ClientConfig};
use crossbeam_channel::{Receiver, Sender};

pub use backup::run_backup;
pub use primary::run_primary;
pub use status::{query_status, PairStatus};

use super::failover::Verdict;
use super::link::LinkConfig;
use crate::net::NetSpec;
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

/// Write all of `bytes` to the peer; an error means the connection is gone.
fn write_frame_bytes(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    stream
        .write_all(bytes)
        .map_err(|e| format!("writing to the connection: {e}"))
}

/// The pair's clock: time since the replica started, for the sans-IO core.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}
