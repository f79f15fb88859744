//! Arbitration engines behind one interface: the twinvm arbiter cluster, or
//! an existing etcd cluster (test-and-set as a compare-and-swap transaction).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::client::{ArbiterClient, ClientError};
use crate::local_cluster::free_port_addr;
use crate::state_machine::{ResetOutcome, Slot, TasOutcome};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Arbiter(#[from] ClientError),
    #[error("etcd: no answer within {}s (last error: {last_error})", deadline.as_secs_f64())]
    EtcdUnavailable {
        deadline: Duration,
        last_error: String,
    },
    #[error("etcd: unexpected answer: {0}")]
    EtcdProtocol(String),
}

/// What the VMM needs from an arbiter, whichever engine provides it.
pub trait Engine: Send {
    fn test_and_set(
        &mut self,
        vm: &str,
        generation: u64,
        requester: &str,
    ) -> Result<TasOutcome, EngineError>;
    fn reset(&mut self, vm: &str, generation: u64) -> Result<ResetOutcome, EngineError>;
    fn get(&mut self, vm: &str) -> Result<Option<Slot>, EngineError>;
}

impl Engine for ArbiterClient {
    fn test_and_set(
        &mut self,
        vm: &str,
        generation: u64,
        requester: &str,
    ) -> Result<TasOutcome, EngineError> {
        Ok(ArbiterClient::test_and_set(
            self, vm, generation, requester,
        )?)
    }
    fn reset(&mut self, vm: &str, generation: u64) -> Result<ResetOutcome, EngineError> {
        Ok(ArbiterClient::reset(self, vm, generation)?)
    }
    fn get(&mut self, vm: &str) -> Result<Option<Slot>, EngineError> {
        Ok(ArbiterClient::get(self, vm)?)
    }
}

/// The arbiter table kept in etcd under `prefix`, one key per VM whose value is
/// the JSON of [`Slot`]. Every change is a transaction conditioned on the key's
/// create or mod revision, so concurrent contenders cannot both win.
/// Reads are etcd's default linearizable range requests.
pub struct EtcdEngine {
    endpoints: Vec<String>,
    prefix: String,
    deadline: Duration,
    agent: ureq::Agent,
    next: usize,
}

/// A key's current value and revision.
struct Current {
    slot: Slot,
    mod_revision: String,
}

impl EtcdEngine {
    /// `endpoints` are client URLs such as `http://127.0.0.1:2379`.
    pub fn new(endpoints: Vec<String>, prefix: &str, deadline: Duration) -> Self {
        EtcdEngine {
            endpoints,
            prefix: prefix.to_owned(),
            deadline,
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_millis(500))
                .timeout(Duration::from_secs(3))
                .build(),
            next: 0,
        }
    }

    /// Per-request timeout (default 3 s). A request that times out is retried on the
    /// next endpoint; both operations are safe to retry (see docs/arbiter.md).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_millis(500).min(timeout))
            .timeout(timeout)
            .build();
        self
    }

    fn key(&self, vm: &str) -> String {
        B64.encode(format!("{}{}", self.prefix, vm))
    }

    /// POSTs to the v3 JSON gateway, trying endpoints in turn until the deadline.
    fn post(&mut self, path: &str, body: &Value) -> Result<Value, EngineError> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        loop {
            let endpoint = self.endpoints[self.next % self.endpoints.len()].clone();
            let last_error = match self
                .agent
                .post(&format!("{endpoint}{path}"))
                .send_json(body.clone())
            {
                Ok(resp) => match resp.into_json::<Value>() {
                    Ok(v) => return Ok(v),
                    Err(e) => format!("{endpoint}: bad body: {e}"),
                },
                Err(e) => format!("{endpoint}: {e}"),
            };
            self.next += 1;
            if start.elapsed() >= self.deadline {
                return Err(EngineError::EtcdUnavailable {
                    deadline: self.deadline,
                    last_error,
                });
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    fn parse_kv(kv: &Value) -> Result<Current, EngineError> {
        let value = kv["value"].as_str().unwrap_or("");
        let bytes = B64
            .decode(value)
            .map_err(|e| EngineError::EtcdProtocol(format!("value is not base64: {e}")))?;
        let slot: Slot = serde_json::from_slice(&bytes)
            .map_err(|e| EngineError::EtcdProtocol(format!("value is not an arbiter slot: {e}")))?;
        let mod_revision = kv["mod_revision"].as_str().unwrap_or("0").to_owned();
        Ok(Current { slot, mod_revision })
    }

    fn read(&mut self, vm: &str) -> Result<Option<Current>, EngineError> {
        let resp = self.post("/v3/kv/range", &json!({ "key": self.key(vm) }))?;
        match resp["kvs"].as_array().and_then(|kvs| kvs.first()) {
            None => Ok(None),
            Some(kv) => Ok(Some(Self::parse_kv(kv)?)),
        }
    }

    /// Writes `slot` if the key is unchanged since `seen` (absent when `None`).
    /// Returns the current value instead when someone else changed it first.
    fn swap(
        &mut self,
        vm: &str,
        seen: Option<&Current>,
        slot: &Slot,
    ) -> Result<Result<(), Option<Current>>, EngineError> {
        let key = self.key(vm);
        let compare = match seen {
            None => {
                json!({ "key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0" })
            }
            Some(c) => {
                json!({ "key": key, "target": "MOD", "result": "EQUAL", "mod_revision": c.mod_revision })
            }
        };
        let value = B64.encode(serde_json::to_vec(slot).expect("slot serializes"));
        let txn = json!({
            "compare": [compare],
            "success": [{ "request_put": { "key": key, "value": value } }],
            "failure": [{ "request_range": { "key": key } }],
        });
        let resp = self.post("/v3/kv/txn", &txn)?;
        if resp["succeeded"].as_bool() == Some(true) {
            return Ok(Ok(()));
        }
        let kv = resp["responses"][0]["response_range"]["kvs"]
            .as_array()
            .and_then(|kvs| kvs.first().cloned());
        match kv {
            None => Ok(Err(None)),
            Some(kv) => Ok(Err(Some(Self::parse_kv(&kv)?))),
        }
    }
}

impl Engine for EtcdEngine {
    fn test_and_set(
        &mut self,
        vm: &str,
        generation: u64,
        requester: &str,
    ) -> Result<TasOutcome, EngineError> {
        let mine = Slot {
            generation,
            holder: Some(requester.to_owned()),
        };
        // Optimistic first try: a fresh VM is one transaction.
        let mut seen: Option<Current> = None;
        for _ in 0..100 {
            if let Some(c) = &seen {
                match &c.slot.holder {
                    _ if c.slot.generation != generation => {
                        return Ok(TasOutcome::NotArmed {
                            generation: c.slot.generation,
                        })
                    }
                    Some(h) if h == requester => return Ok(TasOutcome::Won { generation }),
                    Some(h) => {
                        return Ok(TasOutcome::Held {
                            holder: h.clone(),
                            generation,
                        })
                    }
                    None => {} // armed for this generation: try to take it
                }
            }
            match self.swap(vm, seen.as_ref(), &mine)? {
                Ok(()) => return Ok(TasOutcome::Won { generation }),
                Err(current) => seen = current,
            }
        }
        Err(EngineError::EtcdProtocol(
            "test-and-set kept conflicting".into(),
        ))
    }

    fn reset(&mut self, vm: &str, generation: u64) -> Result<ResetOutcome, EngineError> {
        let armed = Slot {
            generation,
            holder: None,
        };
        let mut seen = self.read(vm)?;
        for _ in 0..100 {
            let current = seen.as_ref().map_or(0, |c| c.slot.generation);
            if generation <= current {
                return Ok(ResetOutcome::Rejected {
                    current_generation: current,
                });
            }
            match self.swap(vm, seen.as_ref(), &armed)? {
                Ok(()) => return Ok(ResetOutcome::Reset { generation }),
                Err(current) => seen = current,
            }
        }
        Err(EngineError::EtcdProtocol("reset kept conflicting".into()))
    }

    fn get(&mut self, vm: &str) -> Result<Option<Slot>, EngineError> {
        Ok(self.read(vm)?.map(|c| c.slot))
    }
}

/// A 3-member etcd cluster on loopback (Debian's `etcd` binary), for tests and the benchmark.
pub struct LocalEtcd {
    bin: std::path::PathBuf,
    members: Vec<EtcdMember>,
    pub client_urls: Vec<String>,
    // Last field: dropped after the members are killed.
    _root: tempfile::TempDir,
}

struct EtcdMember {
    client_url: String,
    args: Vec<std::ffi::OsString>,
    child: Option<Child>,
}

impl LocalEtcd {
    /// The etcd binary, if installed.
    pub fn binary() -> Option<std::path::PathBuf> {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("etcd"))
                .find(|p| p.is_file())
        })
    }

    pub fn start(members: usize) -> anyhow::Result<Self> {
        let bin = Self::binary().context("etcd is not installed (Debian package etcd-server)")?;
        let root = tempfile::Builder::new().prefix("twinvm-etcd-").tempdir()?;
        let mut peer_urls = Vec::new();
        let mut client_urls = Vec::new();
        for _ in 0..members {
            peer_urls.push(format!("http://{}", free_port_addr()?));
            client_urls.push(format!("http://{}", free_port_addr()?));
        }
        let initial: Vec<String> = peer_urls
            .iter()
            .enumerate()
            .map(|(i, u)| format!("e{i}={u}"))
            .collect();
        let mut cluster = LocalEtcd {
            bin,
            members: Vec::new(),
            client_urls: client_urls.clone(),
            _root: root,
        };
        for i in 0..members {
            let dir = cluster._root.path().join(format!("e{i}"));
            let args: Vec<std::ffi::OsString> = [
                "--name".into(),
                format!("e{i}"),
                "--listen-client-urls".into(),
                client_urls[i].clone(),
                "--advertise-client-urls".into(),
                client_urls[i].clone(),
                "--listen-peer-urls".into(),
                peer_urls[i].clone(),
                "--initial-advertise-peer-urls".into(),
                peer_urls[i].clone(),
                "--initial-cluster".into(),
                initial.join(","),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                "twinvm-bench".into(),
                // Same timing as the arbiter's defaults (heartbeat 2 x 50 ms, election 10 x 50 ms,
                // both randomized up to 2x), so failover times compare like with like.
                "--heartbeat-interval".into(),
                "100".into(),
                "--election-timeout".into(),
                "500".into(),
                "--data-dir".into(),
            ]
            .into_iter()
            .map(Into::into)
            .chain(std::iter::once(dir.into_os_string()))
            .collect();
            cluster.members.push(EtcdMember {
                client_url: client_urls[i].clone(),
                args,
                child: None,
            });
            cluster.spawn(i)?;
        }
        let mut probe = EtcdEngine::new(client_urls, "/twinvm-probe/", Duration::from_secs(20));
        probe.get("probe").context("etcd cluster did not come up")?;
        Ok(cluster)
    }

    /// Starts (or restarts, on its data dir) member `index`.
    pub fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self._root.path().join(format!("e{index}.log")))?;
        let member = &mut self.members[index];
        anyhow::ensure!(member.child.is_none(), "etcd member {index} is running");
        member.child = Some(
            Command::new(&self.bin)
                .args(&member.args)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting etcd")?,
        );
        Ok(())
    }

    pub fn engine(&self, deadline: Duration) -> EtcdEngine {
        EtcdEngine::new(self.client_urls.clone(), "/twinvm/arbiter/", deadline)
    }

    /// Index of the member that currently leads.
    pub fn leader(&self) -> anyhow::Result<usize> {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build();
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let Ok(resp) = agent
                .post(&format!("{}/v3/maintenance/status", m.client_url))
                .send_json(json!({}))
            else {
                continue;
            };
            let v: Value = resp.into_json()?;
            if v["leader"].as_str().is_some() && v["leader"] == v["header"]["member_id"] {
                return Ok(i);
            }
        }
        bail!("no etcd member says it leads")
    }

    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
