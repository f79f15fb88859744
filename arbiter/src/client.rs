//! The client library the VMM uses: finds the leader through redirects,
//! retries with backoff (retried writes carry the same sequence number, so
//! the cluster applies them once) and gives up with [`ClientError::NoQuorum`]
//! when no answer comes within the deadline.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, BufWriter};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::auth::{handshake_initiator, AuthError, Key, StreamError};
use crate::channel::{self, FrameReader, FrameWriter, ARBITER_LABEL};
use crate::frame::MAX_CLIENT_FRAME;
use crate::proto::{Hello, HelloReply, NodeStatus, Request, Response};
use crate::state_machine::{ResetOutcome, Slot, TasOutcome};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no quorum within {}s (last error: {last_error})", deadline.as_secs_f64())]
    NoQuorum {
        deadline: Duration,
        last_error: String,
    },
    #[error("request rejected: {0}")]
    Invalid(String),
    #[error("unexpected response: {0}")]
    Protocol(String),
    /// The arbiter wants a key we do not have, or has another one.
    #[error("the arbiter refused authentication: wrong or missing key ({addr}: {detail})")]
    AuthRefused { addr: String, detail: String },
    /// We have a key but the other side did not run the handshake.
    #[error(
        "arbiter at {addr} did not authenticate ({detail}); is it running without --key-file?"
    )]
    ServerUnauthenticated { addr: String, detail: String },
}

/// Why one attempt at one address failed.
enum Failure {
    /// Connection or protocol trouble: another node or a retry may do better.
    Transport(String),
    /// Authentication failed: every node with the same key answers the same way.
    Auth(ClientError),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Transport(e) => f.write_str(e),
            Failure::Auth(e) => e.fmt(f),
        }
    }
}

fn transport(e: impl std::fmt::Display) -> Failure {
    Failure::Transport(e.to_string())
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub cluster_id: String,
    /// Any subset of the members' addresses; the leader is found from there.
    pub addrs: Vec<String>,
    /// Overall time budget of one operation, retries included.
    pub deadline: Duration,
    /// The cluster's pre-shared key (`--key-file`); `None` for a cluster without one.
    pub key: Option<Key>,
}

struct Conn {
    reader: FrameReader<BufReader<TcpStream>>,
    writer: FrameWriter<BufWriter<TcpStream>>,
}

pub struct ArbiterClient {
    cfg: ClientConfig,
    client_id: u64,
    seq: u64,
    conns: HashMap<String, Conn>,
    leader: Option<String>,
    next_addr: usize,
}

impl ArbiterClient {
    pub fn new(cfg: ClientConfig) -> Self {
        ArbiterClient {
            cfg,
            client_id: rand::random::<u64>() | 1,
            seq: 0,
            conns: HashMap::new(),
            leader: None,
            next_addr: 0,
        }
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    pub fn set_deadline(&mut self, deadline: Duration) {
        self.cfg.deadline = deadline;
    }

    pub fn test_and_set(
        &mut self,
        vm: &str,
        generation: u64,
        requester: &str,
    ) -> Result<TasOutcome, ClientError> {
        self.seq += 1;
        let req = Request::TestAndSet {
            client_id: self.client_id,
            seq: self.seq,
            vm: vm.into(),
            generation,
            requester: requester.into(),
        };
        match self.call(&req)? {
            Response::Tas(t) => Ok(t),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub fn reset(&mut self, vm: &str, generation: u64) -> Result<ResetOutcome, ClientError> {
        self.seq += 1;
        let req = Request::Reset {
            client_id: self.client_id,
            seq: self.seq,
            vm: vm.into(),
            generation,
        };
        match self.call(&req)? {
            Response::Reset(r) => Ok(r),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub fn get(&mut self, vm: &str) -> Result<Option<Slot>, ClientError> {
        match self.call(&Request::Get { vm: vm.into() })? {
            Response::Get { slot } => Ok(slot),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Adds a voter (`addr` is where the new node listens); returns the new voter set.
    pub fn add_node(&mut self, node_id: u64, addr: &str) -> Result<Vec<u64>, ClientError> {
        match self.call(&Request::AddNode {
            node_id,
            addr: addr.into(),
        })? {
            Response::MembershipChanged { voters } => Ok(voters),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub fn remove_node(&mut self, node_id: u64) -> Result<Vec<u64>, ClientError> {
        match self.call(&Request::RemoveNode { node_id })? {
            Response::MembershipChanged { voters } => Ok(voters),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Status of the node at `addr` (no redirect: every node answers for itself).
    pub fn status_of(&mut self, addr: &str) -> Result<NodeStatus, ClientError> {
        match self.call_once(addr, &Request::Status) {
            Ok(Response::Status(s)) => Ok(s),
            Ok(other) => Err(ClientError::Protocol(format!("{other:?}"))),
            Err(Failure::Auth(e)) => Err(e),
            Err(e) => Err(ClientError::NoQuorum {
                deadline: self.cfg.deadline,
                last_error: format!("{addr}: {e}"),
            }),
        }
    }

    /// Fault injection (test clusters only): the node at `addr` drops traffic with `peers`.
    pub fn drop_traffic(&mut self, addr: &str, peers: Vec<u64>) -> Result<(), ClientError> {
        match self.call_once(addr, &Request::DropTraffic { peers }) {
            Ok(Response::Done) => Ok(()),
            Ok(Response::Invalid { reason }) => Err(ClientError::Invalid(reason)),
            Ok(other) => Err(ClientError::Protocol(format!("{other:?}"))),
            Err(Failure::Auth(e)) => Err(e),
            Err(e) => Err(ClientError::Protocol(format!("{addr}: {e}"))),
        }
    }

    /// Sends `req` to the leader, following redirects and retrying until the deadline.
    fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        let mut last_error;
        let mut redirects_in_a_row = 0;
        // Addresses that failed authentication in this call, and that failure if it was the last.
        let mut auth_refused: HashSet<String> = HashSet::new();
        let mut last_auth_failure: Option<ClientError> = None;
        loop {
            let addr = match self.leader.clone() {
                Some(a) => a,
                None => {
                    if self.cfg.addrs.is_empty() {
                        return Err(ClientError::Invalid("no arbiter address given".into()));
                    }
                    let a = self.cfg.addrs[self.next_addr % self.cfg.addrs.len()].clone();
                    self.next_addr += 1;
                    a
                }
            };
            let mut wait = true;
            let result = self.call_once(&addr, req);
            if result.is_ok() {
                last_auth_failure = None;
            }
            match result {
                Ok(Response::NotLeader {
                    leader_addr,
                    leader_id,
                }) => {
                    last_error = format!("{addr}: not the leader (leader {leader_id:?})");
                    // Follow a redirect at once, but not forever: hints can be stale mid-election.
                    redirects_in_a_row += 1;
                    wait = leader_addr.is_none() || redirects_in_a_row > 2;
                    self.leader = leader_addr;
                }
                Ok(Response::Unavailable { reason }) => {
                    last_error = format!("{addr}: {reason}");
                    self.leader = None;
                }
                Ok(Response::Invalid { reason }) => return Err(ClientError::Invalid(reason)),
                Ok(resp) => {
                    self.leader = Some(addr);
                    return Ok(resp);
                }
                Err(Failure::Transport(e)) => {
                    last_error = format!("{addr}: {e}");
                    last_auth_failure = None;
                    self.leader = None;
                }
                Err(Failure::Auth(e)) => {
                    last_error = e.to_string();
                    self.leader = None;
                    auth_refused.insert(addr);
                    // Every configured node refused: more retries only repeat the refusal.
                    if self.cfg.addrs.iter().all(|a| auth_refused.contains(a)) {
                        return Err(e);
                    }
                    last_auth_failure = Some(e);
                }
            }
            let elapsed = start.elapsed();
            if elapsed >= self.cfg.deadline {
                if let Some(e) = last_auth_failure {
                    return Err(e);
                }
                return Err(ClientError::NoQuorum {
                    deadline: self.cfg.deadline,
                    last_error,
                });
            }
            if wait {
                redirects_in_a_row = 0;
                std::thread::sleep(backoff.min(self.cfg.deadline - elapsed));
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
        }
    }

    fn call_once(&mut self, addr: &str, req: &Request) -> Result<Response, Failure> {
        let result = self.exchange(addr, req);
        if result.is_err() {
            self.conns.remove(addr);
        }
        result
    }

    fn exchange(&mut self, addr: &str, req: &Request) -> Result<Response, Failure> {
        if !self.conns.contains_key(addr) {
            let conn = connect(addr, &self.cfg.cluster_id, self.cfg.key.as_ref())?;
            self.conns.insert(addr.to_owned(), conn);
        }
        let conn = self.conns.get_mut(addr).expect("inserted above");
        conn.writer
            .write(&serde_json::to_vec(req).expect("request serializes"))
            .and_then(|()| conn.writer.flush())
            .map_err(transport)?;
        let bytes = conn.reader.read(MAX_CLIENT_FRAME).map_err(transport)?;
        serde_json::from_slice(&bytes).map_err(|e| transport(format!("bad response: {e}")))
    }
}

fn connect(addr: &str, cluster_id: &str, key: Option<&Key>) -> Result<Conn, Failure> {
    let sock = addr
        .to_socket_addrs()
        .map_err(transport)?
        .next()
        .ok_or_else(|| transport(format!("{addr} resolves to nothing")))?;
    let stream =
        TcpStream::connect_timeout(&sock, Duration::from_millis(500)).map_err(transport)?;
    stream.set_nodelay(true).map_err(transport)?;
    // Longer than the server's commit timeout, so a slow answer is not mistaken for a dead node.
    stream
        .set_read_timeout(Some(Duration::from_secs(4)))
        .map_err(transport)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(4)))
        .map_err(transport)?;
    let session = match key {
        Some(key) => Some(
            handshake_initiator(&mut &stream, key, ARBITER_LABEL).map_err(|e| match e {
                StreamError::Auth(AuthError::WrongKey) => Failure::Auth(ClientError::AuthRefused {
                    addr: addr.into(),
                    detail: e.to_string(),
                }),
                StreamError::Auth(e) => Failure::Auth(ClientError::ServerUnauthenticated {
                    addr: addr.into(),
                    detail: e.to_string(),
                }),
                StreamError::Frame(e) => transport(e),
            })?,
        ),
        None => None,
    };
    let (mut reader, mut writer) = channel::split(
        BufReader::new(stream.try_clone().map_err(transport)?),
        BufWriter::new(stream),
        session,
    );
    let hello = Hello::Client {
        cluster_id: cluster_id.into(),
    };
    writer
        .write(&serde_json::to_vec(&hello).expect("hello serializes"))
        .and_then(|()| writer.flush())
        .map_err(transport)?;
    let reply = reader.read(MAX_CLIENT_FRAME).map_err(transport)?;
    match serde_json::from_slice::<HelloReply>(&reply) {
        Ok(HelloReply::Accepted { .. }) => Ok(Conn { reader, writer }),
        Ok(HelloReply::Refused { reason }) => Err(transport(format!("refused: {reason}"))),
        Ok(HelloReply::AuthenticationRequired) => Err(Failure::Auth(ClientError::AuthRefused {
            addr: addr.into(),
            detail: "it requires a key (--key-file) and this client has none".into(),
        })),
        Err(e) => Err(transport(format!("bad hello reply: {e}"))),
    }
}
