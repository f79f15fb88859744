//! A cluster of real arbiter processes on loopback with temporary data dirs,
//! used by `selftest`, `bench` and the integration tests. Every process is
//! killed when the cluster is dropped, even on a failing test.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::auth::Key;
use crate::cli::KEY_FILE_ENV;
use crate::client::{ArbiterClient, ClientConfig};
use crate::proto::NodeStatus;

/// How to start a server: `exe prefix_args... --id N ...`
/// (`twinvm-arbiter serve` or `twinvm arbiter serve`).
#[derive(Debug, Clone)]
pub struct Launcher {
    pub exe: PathBuf,
    pub prefix_args: Vec<String>,
}

impl Launcher {
    /// The running executable, assumed to be `twinvm-arbiter`.
    pub fn current_exe() -> anyhow::Result<Self> {
        Ok(Launcher {
            exe: std::env::current_exe().context("locating the running executable")?,
            prefix_args: vec!["serve".into()],
        })
    }
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: u64,
    pub tick_ms: u64,
    pub snapshot_every: u64,
    pub allow_fault_injection: bool,
    pub cluster_id: String,
    /// Generate a key into the temp dir and run every node with `--key-file`
    /// (the default: the path deployments use); `false` runs the unprotected mode.
    pub authenticate: bool,
    /// Where each node listens (`host:port`, one per node); empty: a free
    /// loopback port each. Drills use it to put the nodes on a namespace's LAN.
    pub listen_addrs: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            tick_ms: 50,
            snapshot_every: 1000,
            allow_fault_injection: true,
            cluster_id: "twinvm-local".into(),
            authenticate: true,
            listen_addrs: Vec::new(),
        }
    }
}

struct NodeProc {
    addr: String,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    join: bool,
}

pub struct LocalCluster {
    launcher: Launcher,
    opts: ClusterOptions,
    root: tempfile::TempDir,
    nodes: BTreeMap<u64, NodeProc>,
    /// Initial members, passed to every process as `--peers`.
    peers: BTreeMap<u64, String>,
    /// The cluster key and its file (mode 0600 in the temp dir), if authenticating.
    key: Option<(Key, PathBuf)>,
}

/// Name of the key file in the cluster's temp dir.
pub const KEY_FILE_NAME: &str = "cluster.key";

/// A loopback port that was free a moment ago.
pub fn free_port_addr() -> anyhow::Result<String> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.to_string())
}

/// A node of a starting cluster stopped by itself: on a port found free a
/// moment earlier, most likely because something else took the port before
/// the node bound it.
#[derive(Debug)]
struct NodeExitedAtStart {
    id: u64,
    addr: String,
    log: String,
}

impl std::fmt::Display for NodeExitedAtStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node {} ({}) stopped while the cluster started; its log: {}",
            self.id,
            self.addr,
            self.log.trim_end()
        )
    }
}

impl std::error::Error for NodeExitedAtStart {}

/// Times a cluster on free ports is started again after one of its nodes
/// stopped at start.
const START_ATTEMPTS: u32 = 3;

impl LocalCluster {
    /// Starts `opts.nodes` processes and waits until one of them leads and
    /// every one answers. A port found free can be taken before its node
    /// binds it (any process's outgoing connection may get it as its
    /// ephemeral port); that node then stops, and a cluster on free ports
    /// is started again on new ones. Otherwise the majority would lead
    /// without it and a test that later needs it would fail far from the
    /// cause.
    pub fn start(launcher: Launcher, opts: ClusterOptions) -> anyhow::Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(launcher.clone(), opts.clone()) {
                Err(e)
                    if attempt < START_ATTEMPTS
                        && opts.listen_addrs.is_empty()
                        && e.downcast_ref::<NodeExitedAtStart>().is_some() =>
                {
                    tracing::warn!("starting the local arbiter cluster again: {e:#}");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    fn start_once(launcher: Launcher, opts: ClusterOptions) -> anyhow::Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("twinvm-arbiter-")
            .tempdir()
            .context("creating temp dir")?;
        let mut cluster = LocalCluster {
            launcher,
            opts,
            root,
            nodes: BTreeMap::new(),
            peers: BTreeMap::new(),
            key: None,
        };
        if cluster.opts.authenticate {
            let key = Key::generate();
            let path = cluster.root.path().join(KEY_FILE_NAME);
            key.save_new(&path).context("writing the cluster key")?;
            cluster.key = Some((key, path));
        }
        if !cluster.opts.listen_addrs.is_empty()
            && cluster.opts.listen_addrs.len() as u64 != cluster.opts.nodes
        {
            bail!(
                "{} listen addresses for {} nodes",
                cluster.opts.listen_addrs.len(),
                cluster.opts.nodes
            );
        }
        for id in 1..=cluster.opts.nodes {
            let addr = match cluster.opts.listen_addrs.get((id - 1) as usize) {
                Some(addr) => addr.clone(),
                None => free_port_addr()?,
            };
            cluster.peers.insert(id, addr.clone());
            cluster.add_proc(id, addr, false);
        }
        for id in 1..=cluster.opts.nodes {
            cluster.spawn(id)?;
        }
        let started = Instant::now();
        let leader = cluster.wait_leader(Duration::from_secs(15));
        cluster.check_every_node_answers(started + Duration::from_secs(15))?;
        leader?;
        Ok(cluster)
    }

    /// Every node answers a status request before `deadline`; one that
    /// stopped by itself is a [`NodeExitedAtStart`].
    fn check_every_node_answers(&mut self, deadline: Instant) -> anyhow::Result<()> {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            while self.status(id).is_none() {
                if Instant::now() >= deadline {
                    bail!("node {id} ({}) does not answer", self.addr(id));
                }
                // Also the pause between two requests.
                if self.wait_exit(id, Duration::from_millis(50)).is_some() {
                    return Err(NodeExitedAtStart {
                        id,
                        addr: self.addr(id).to_string(),
                        log: self.log_of(id),
                    }
                    .into());
                }
            }
        }
        Ok(())
    }

    fn add_proc(&mut self, id: u64, addr: String, join: bool) {
        let data_dir = self.root.path().join(format!("node-{id}"));
        let log_path = self.root.path().join(format!("node-{id}.log"));
        self.nodes.insert(
            id,
            NodeProc {
                addr,
                data_dir,
                log_path,
                child: None,
                join,
            },
        );
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn cluster_id(&self) -> &str {
        &self.opts.cluster_id
    }

    /// The cluster's key, if it authenticates.
    pub fn key(&self) -> Option<&Key> {
        self.key.as_ref().map(|(k, _)| k)
    }

    /// The key file every node was started with, if it authenticates.
    pub fn key_path(&self) -> Option<&Path> {
        self.key.as_ref().map(|(_, p)| p.as_path())
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    pub fn addr(&self, id: u64) -> &str {
        &self.nodes[&id].addr
    }

    pub fn data_dir(&self, id: u64) -> &Path {
        &self.nodes[&id].data_dir
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.addr.clone()).collect()
    }

    fn peers_arg(&self) -> String {
        let mut all = self.peers.clone();
        for (id, n) in &self.nodes {
            all.insert(*id, n.addr.clone());
        }
        all.iter()
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The command line that starts node `id`.
    pub fn command(&self, id: u64) -> Command {
        let node = &self.nodes[&id];
        let mut cmd = Command::new(&self.launcher.exe);
        cmd.args(&self.launcher.prefix_args)
            .arg("--id")
            .arg(id.to_string())
            .arg("--peers")
            .arg(self.peers_arg())
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--cluster-id")
            .arg(&self.opts.cluster_id)
            .arg("--tick-ms")
            .arg(self.opts.tick_ms.to_string())
            .arg("--snapshot-every")
            .arg(self.opts.snapshot_every.to_string());
        if self.opts.allow_fault_injection {
            cmd.arg("--allow-fault-injection");
        }
        if node.join {
            cmd.arg("--join");
        }
        if let Some(path) = self.key_path() {
            cmd.arg("--key-file").arg(path);
        }
        // The caller's environment must not add a key the options did not ask for.
        cmd.env_remove(KEY_FILE_ENV);
        cmd
    }

    /// Starts (or restarts) node `id` on its data dir; output goes to its log file.
    pub fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let mut cmd = self.command(id);
        let node = self.nodes.get_mut(&id).context("unknown node")?;
        if node.child.is_some() {
            bail!("node {id} is already running");
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .context("opening node log")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .spawn()
            .with_context(|| format!("starting {}", self.launcher.exe.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// Registers a new node that will join through `add-node` (not yet started).
    pub fn prepare_joining_node(&mut self, id: u64) -> anyhow::Result<String> {
        let addr = free_port_addr()?;
        self.add_proc(id, addr.clone(), true);
        Ok(addr)
    }

    /// Forgets a removed node (after killing it).
    pub fn forget(&mut self, id: u64) {
        self.kill(id);
        self.nodes.remove(&id);
        self.peers.remove(&id);
    }

    /// SIGKILL: no chance to flush anything, like a power cut of that process.
    pub fn kill(&mut self, id: u64) {
        if let Some(node) = self.nodes.get_mut(&id) {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.child.is_some())
    }

    /// Exit status of a node that stopped by itself, if it did within `timeout`.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<std::process::ExitStatus> {
        let node = self.nodes.get_mut(&id)?;
        let child = node.child.as_mut()?;
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(status)) = child.try_wait() {
                node.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_of(&self, id: u64) -> String {
        std::fs::read_to_string(&self.nodes[&id].log_path).unwrap_or_default()
    }

    pub fn client(&self, deadline: Duration) -> ArbiterClient {
        ArbiterClient::new(ClientConfig {
            cluster_id: self.opts.cluster_id.clone(),
            addrs: self.addrs(),
            deadline,
            key: self.key().cloned(),
        })
    }

    pub fn status(&self, id: u64) -> Option<NodeStatus> {
        let mut c = self.client(Duration::from_secs(1));
        c.status_of(self.addr(id)).ok()
    }

    /// Waits until a running node says it leads and a majority of running nodes agree.
    pub fn wait_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let end = Instant::now() + timeout;
        loop {
            let statuses: Vec<NodeStatus> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.child.is_some())
                .filter_map(|(id, _)| self.status(*id))
                .collect();
            if let Some(leader) = statuses.iter().find(|s| s.role == "Leader") {
                let agree = statuses
                    .iter()
                    .filter(|s| s.leader_id == Some(leader.node_id) && s.term == leader.term)
                    .count();
                if agree * 2 > leader.voters.len() {
                    return Ok(leader.node_id);
                }
            }
            if Instant::now() >= end {
                bail!("no leader within {timeout:?}; statuses: {statuses:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}
