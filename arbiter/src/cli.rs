//! Command-line interface shared by `twinvm-arbiter <cmd>` and `twinvm arbiter <cmd>`.
//!
//! Embedding in the main CLI takes one variant and one call:
//!
//! ```text
//! #[derive(clap::Subcommand)]
//! enum Command {
//!     #[command(subcommand)]
//!     Arbiter(arbiter::cli::ArbiterCommand),
//! }
//! // ...
//! Command::Arbiter(cmd) => arbiter::cli::run_with_launcher(
//!     cmd,
//!     arbiter::local_cluster::Launcher {
//!         exe: std::env::current_exe()?,
//!         prefix_args: vec!["arbiter".into(), "serve".into()],
//!     },
//! ),
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::auth::Key;
use crate::client::{ArbiterClient, ClientConfig};
use crate::engine::{Engine, EtcdEngine};
use crate::local_cluster::Launcher;
use crate::server::{serve, ServerConfig};
use crate::state_machine::{ResetOutcome, TasOutcome};

#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Arbiter addresses, comma separated (any members; the leader is found from there).
    #[arg(long, value_delimiter = ',', required_unless_present = "etcd")]
    pub arbiters: Vec<String>,
    /// Use an existing etcd cluster instead (client URLs, comma separated); tas/reset/get only.
    #[arg(long, value_delimiter = ',', conflicts_with = "arbiters")]
    pub etcd: Vec<String>,
    /// Key prefix of the arbiter table in etcd.
    #[arg(long, default_value = "/twinvm/arbiter/")]
    pub etcd_prefix: String,
    /// Must match the servers' --cluster-id.
    #[arg(long, default_value = "twinvm")]
    pub cluster_id: String,
    /// Give up with "no quorum" after this many seconds.
    #[arg(long, default_value_t = 5.0)]
    pub deadline_secs: f64,
    /// The cluster's pre-shared key file (64 hex digits, mode 0600; see `keygen`).
    #[arg(long, env = KEY_FILE_ENV)]
    pub key_file: Option<PathBuf>,
}

/// Environment variable standing in for `--key-file`.
pub const KEY_FILE_ENV: &str = "TWINVM_ARBITER_KEY_FILE";

fn load_key(path: Option<&PathBuf>) -> anyhow::Result<Option<Key>> {
    path.map(|p| Key::from_file(p).context("loading the arbiter key"))
        .transpose()
}

impl ClientArgs {
    fn deadline(&self) -> anyhow::Result<Duration> {
        if !(self.deadline_secs.is_finite() && self.deadline_secs > 0.0 && self.deadline_secs < 1e6)
        {
            bail!("--deadline-secs must be a positive number of seconds");
        }
        Ok(Duration::from_secs_f64(self.deadline_secs))
    }

    /// The twinvm arbiter cluster (membership and status need it).
    fn client(&self) -> anyhow::Result<ArbiterClient> {
        if self.arbiters.is_empty() {
            bail!("this command needs --arbiters (etcd has no such operation here)");
        }
        Ok(ArbiterClient::new(ClientConfig {
            cluster_id: self.cluster_id.clone(),
            addrs: self.arbiters.clone(),
            deadline: self.deadline()?,
            key: load_key(self.key_file.as_ref())?,
        }))
    }

    /// Whichever engine was chosen: `--etcd` or `--arbiters`.
    fn engine(&self) -> anyhow::Result<Box<dyn Engine>> {
        if self.etcd.is_empty() {
            Ok(Box::new(self.client()?))
        } else {
            if self.key_file.is_some() {
                tracing::warn!(
                    "--key-file ({KEY_FILE_ENV}) applies to twinvm arbiters; not used with --etcd"
                );
            }
            Ok(Box::new(EtcdEngine::new(
                self.etcd.clone(),
                &self.etcd_prefix,
                self.deadline()?,
            )))
        }
    }
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum ArbiterCommand {
    /// Run one arbiter node.
    Serve {
        /// This node's id (≥ 1), one of --peers.
        #[arg(long)]
        id: u64,
        /// Members as id=host:port, comma separated, this node included (its address is where it listens).
        #[arg(long, value_delimiter = ',', required = true)]
        peers: Vec<String>,
        /// Where the WAL, snapshot and identity stamp live.
        #[arg(long)]
        data_dir: PathBuf,
        /// Name of this cluster; peers, clients and data dirs of another cluster are refused.
        #[arg(long, default_value = "twinvm")]
        cluster_id: String,
        /// Start empty and wait to be added by `add-node` instead of bootstrapping with --peers.
        #[arg(long)]
        join: bool,
        /// Raft tick; election timeout is 10-20 ticks, heartbeat 2 ticks.
        #[arg(long, default_value_t = 50)]
        tick_ms: u64,
        /// Snapshot and compact the log every this many applied entries.
        #[arg(long, default_value_t = 1000)]
        snapshot_every: u64,
        /// Accept `drop-traffic` requests (partition tests only).
        #[arg(long)]
        allow_fault_injection: bool,
        /// Pre-shared key file (see `keygen`): clients and peers must prove they hold
        /// the same key. Without it, anyone who can connect can win or reset any slot.
        #[arg(long, env = KEY_FILE_ENV)]
        key_file: Option<PathBuf>,
    },
    /// Write a new random 256-bit key file (mode 0600) for `--key-file`.
    Keygen {
        /// Where to write it; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Test-and-set: exit 0 if REQUESTER holds VM for GENERATION, 1 if someone else does, 2 on error.
    Tas {
        /// VM name (1..=256 bytes).
        vm: String,
        /// Generation of the primary/backup pair asking.
        #[arg(long)]
        generation: u64,
        /// Who asks (e.g. the host name); the winner is recorded as holder.
        #[arg(long)]
        requester: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Re-arm VM for a higher generation (after a repair).
    Reset {
        /// VM name.
        vm: String,
        /// New generation; must be higher than the current one.
        #[arg(long)]
        generation: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Linearizable read of VM's holder.
    Get {
        /// VM name.
        vm: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Status of every listed node.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add a voter: learner first, promoted once caught up (start it with `serve --join`).
    AddNode {
        /// The new node's id.
        #[arg(long)]
        id: u64,
        /// Where the new node listens (host:port).
        #[arg(long)]
        addr: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a voter.
    RemoveNode {
        /// The id of the node to remove.
        #[arg(long)]
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Start 3 local nodes, race, kill the leader, restart all; one-line verdict.
    Selftest,
    /// Measure test-and-set latency/throughput and failover on a local 3-node cluster.
    Bench {
        /// Client counts to measure, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1u32, 16])]
        clients: Vec<u32>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Also measure etcd (etcd binary on PATH) the same way.
        #[arg(long)]
        etcd: bool,
        /// The arbiter nodes' --snapshot-every.
        #[arg(long, default_value_t = 1000)]
        snapshot_every: u64,
    },
}

/// Parses `1=host:port,2=host:port` items.
pub fn parse_peers(items: &[String]) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for item in items {
        let (id, addr) = item
            .split_once('=')
            .with_context(|| format!("peer {item:?} is not id=host:port"))?;
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("peer id in {item:?}"))?;
        if id == 0 {
            bail!("node id 0 is reserved");
        }
        if peers.insert(id, addr.trim().to_owned()).is_some() {
            bail!("node {id} listed twice in --peers");
        }
    }
    Ok(peers)
}

/// Runs a command; servers are spawned as this executable's `serve`.
pub fn run(cmd: ArbiterCommand) -> anyhow::Result<ExitCode> {
    run_with_launcher(cmd, Launcher::current_exe()?)
}

/// Runs a command; `launcher` says how to start server processes (selftest, bench).
pub fn run_with_launcher(cmd: ArbiterCommand, launcher: Launcher) -> anyhow::Result<ExitCode> {
    match cmd {
        ArbiterCommand::Serve {
            id,
            peers,
            data_dir,
            cluster_id,
            join,
            tick_ms,
            snapshot_every,
            allow_fault_injection,
            key_file,
        } => {
            if !(5..=10_000).contains(&tick_ms) {
                bail!("--tick-ms must be within 5..=10000");
            }
            let key = load_key(key_file.as_ref())?;
            serve(ServerConfig {
                node_id: id,
                cluster_id,
                peers: parse_peers(&peers)?,
                data_dir,
                join,
                tick: Duration::from_millis(tick_ms),
                snapshot_every: snapshot_every.max(1),
                allow_fault_injection,
                key,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        ArbiterCommand::Keygen { out } => {
            Key::generate()
                .save_new(&out)
                .context("writing the new key")?;
            println!(
                "wrote a new key to {} (mode 0600); copy it to every arbiter node and VMM host over a secure channel",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        ArbiterCommand::Tas {
            vm,
            generation,
            requester,
            client,
        } => match client.engine()?.test_and_set(&vm, generation, &requester) {
            Ok(TasOutcome::Won { generation }) => {
                println!("won {vm} generation {generation}");
                Ok(ExitCode::SUCCESS)
            }
            Ok(TasOutcome::Held { holder, generation }) => {
                println!("held {vm} generation {generation} by {holder}");
                Ok(ExitCode::from(1))
            }
            Ok(TasOutcome::NotArmed { generation }) => {
                println!("not-armed {vm}: current generation is {generation}");
                Ok(ExitCode::from(1))
            }
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(2))
            }
        },
        ArbiterCommand::Reset {
            vm,
            generation,
            client,
        } => match client.engine()?.reset(&vm, generation) {
            Ok(ResetOutcome::Reset { generation }) => {
                println!("reset {vm} to generation {generation}");
                Ok(ExitCode::SUCCESS)
            }
            Ok(ResetOutcome::Rejected { current_generation }) => {
                println!("rejected: {vm} is at generation {current_generation}; a reset needs a higher one");
                Ok(ExitCode::from(1))
            }
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(2))
            }
        },
        ArbiterCommand::Get { vm, client } => match client.engine()?.get(&vm) {
            Ok(Some(slot)) => {
                let holder = slot.holder.as_deref().unwrap_or("-");
                println!("{vm} generation {} holder {holder}", slot.generation);
                Ok(ExitCode::SUCCESS)
            }
            Ok(None) => {
                println!("{vm} unknown");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(2))
            }
        },
        ArbiterCommand::Status { client } => {
            let mut c = client.client()?;
            let mut all_ok = true;
            for addr in &client.arbiters {
                match c.status_of(addr) {
                    Ok(s) => println!(
                        "{addr} node {} {} term {} leader {:?} commit {} applied {} snapshot {} last {} voters {:?}",
                        s.node_id, s.role, s.term, s.leader_id, s.commit, s.applied, s.snapshot_index, s.last_index, s.voters
                    ),
                    Err(e @ crate::client::ClientError::NoQuorum { .. }) => {
                        all_ok = false;
                        println!("{addr} unreachable: {e}");
                    }
                    Err(e) => {
                        all_ok = false;
                        println!("{addr} error: {e}");
                    }
                }
            }
            Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        ArbiterCommand::AddNode { id, addr, client } => {
            membership(client.client()?.add_node(id, &addr))
        }
        ArbiterCommand::RemoveNode { id, client } => membership(client.client()?.remove_node(id)),
        ArbiterCommand::Selftest => crate::selftest::run(launcher),
        ArbiterCommand::Bench {
            clients,
            seconds,
            etcd,
            snapshot_every,
        } => crate::bench::run(launcher, &clients, seconds, etcd, snapshot_every),
    }
}

fn membership(result: Result<Vec<u64>, crate::client::ClientError>) -> anyhow::Result<ExitCode> {
    match result {
        Ok(voters) => {
            println!("voters now {voters:?}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

/// Logging to stderr, filtered by RUST_LOG (default info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
