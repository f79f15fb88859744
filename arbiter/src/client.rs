//! The client library the VMM uses: finds the leader through redirects,
//! retries with backoff (retried writes carry the same sequence number, so
//! the cluster applies them once) and gives up with [`ClientError::NoQuorum`]
//! when no answer comes within the deadline.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::frame::{read_frame, write_frame, MAX_CLIENT_FRAME};
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
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub cluster_id: String,
    /// Any subset of the members' addresses; the leader is found from there.
    pub addrs: Vec<String>,
    /// Overall time budget of one operation, retries included.
    pub deadline: Duration,
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
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
            Err(e) => Err(ClientError::Protocol(format!("{addr}: {e}"))),
        }
    }

    /// Sends `req` to the leader, following redirects and retrying until the deadline.
    fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        let mut last_error;
        let mut redirects_in_a_row = 0;
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
            match self.call_once(&addr, req) {
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
                Err(e) => {
                    last_error = format!("{addr}: {e}");
                    self.leader = None;
                }
            }
            let elapsed = start.elapsed();
            if elapsed >= self.cfg.deadline {
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

    fn call_once(&mut self, addr: &str, req: &Request) -> std::io::Result<Response> {
        let result = self.exchange(addr, req);
        if result.is_err() {
            self.conns.remove(addr);
        }
        result
    }

    fn exchange(&mut self, addr: &str, req: &Request) -> std::io::Result<Response> {
        if !self.conns.contains_key(addr) {
            let conn = connect(addr, &self.cfg.cluster_id)?;
            self.conns.insert(addr.to_owned(), conn);
        }
        let conn = self.conns.get_mut(addr).expect("inserted above");
        write_frame(
            &mut conn.writer,
            &serde_json::to_vec(req).expect("request serializes"),
        )?;
        conn.writer.flush()?;
        let bytes = read_frame(&mut conn.reader, MAX_CLIENT_FRAME)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::other(format!("bad response: {e}")))
    }
}

fn connect(addr: &str, cluster_id: &str) -> std::io::Result<Conn> {
    let sock = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to nothing")))?;
    let stream = TcpStream::connect_timeout(&sock, Duration::from_millis(500))?;
    stream.set_nodelay(true)?;
    // Longer than the server's commit timeout, so a slow answer is not mistaken for a dead node.
    stream.set_read_timeout(Some(Duration::from_secs(4)))?;
    stream.set_write_timeout(Some(Duration::from_secs(4)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    let hello = Hello::Client {
        cluster_id: cluster_id.into(),
    };
    write_frame(
        &mut writer,
        &serde_json::to_vec(&hello).expect("hello serializes"),
    )?;
    writer.flush()?;
    let reply = read_frame(&mut reader, MAX_CLIENT_FRAME)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    match serde_json::from_slice::<HelloReply>(&reply) {
        Ok(HelloReply::Accepted { .. }) => Ok(Conn { reader, writer }),
        Ok(HelloReply::Refused { reason }) => {
            Err(std::io::Error::other(format!("refused: {reason}")))
        }
        Err(e) => Err(std::io::Error::other(format!("bad hello reply: {e}"))),
    }
}
