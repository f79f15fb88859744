//! Outgoing Raft traffic: one sender thread per peer with its own TCP
//! connection, reconnecting with backoff. Messages are dropped rather than
//! queued without bound when a peer is away — Raft retransmits.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufWriter;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};

use crate::auth::{handshake_initiator, Key, StreamError};
use crate::channel::{self, FrameWriter, ARBITER_LABEL};
use crate::frame::{FrameError, MAX_CLIENT_FRAME};
use crate::proto::{Hello, HelloReply};

const PEER_QUEUE: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What a sender thread tells the node loop about failed deliveries.
#[derive(Debug)]
pub struct SendFailure {
    pub to: u64,
    pub was_snapshot: bool,
}

/// Peers whose traffic is dropped in both directions (fault injection for partition tests).
#[derive(Clone, Default)]
pub struct DropFilter(Arc<Mutex<HashSet<u64>>>);

impl DropFilter {
    pub fn set(&self, peers: impl IntoIterator<Item = u64>) {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *set = peers.into_iter().collect();
    }

    pub fn drops(&self, peer: u64) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&peer)
    }
}

struct Peer {
    addr: Arc<Mutex<String>>,
    queue: Sender<Message>,
}

pub struct Transport {
    node_id: u64,
    cluster_id: String,
    key: Option<Key>,
    peers: HashMap<u64, Peer>,
    failures: Sender<SendFailure>,
    pub drop_filter: DropFilter,
}

impl Transport {
    pub fn new(
        node_id: u64,
        cluster_id: String,
        key: Option<Key>,
        failures: Sender<SendFailure>,
        drop_filter: DropFilter,
    ) -> Self {
        Transport {
            node_id,
            cluster_id,
            key,
            peers: HashMap::new(),
            failures,
            drop_filter,
        }
    }

    /// Brings the address book up to date (members change with membership).
    pub fn update_addresses(&mut self, members: &BTreeMap<u64, String>) {
        for (&id, addr) in members {
            if id == self.node_id {
                continue;
            }
            match self.peers.get(&id) {
                Some(p) => {
                    let mut current = p.addr.lock().unwrap_or_else(|e| e.into_inner());
                    if *current != *addr {
                        *current = addr.clone();
                    }
                }
                None => {
                    let peer = self.spawn_sender(id, addr.clone());
                    self.peers.insert(id, peer);
                }
            }
        }
    }

    pub fn send(&mut self, msgs: Vec<Message>) {
        for msg in msgs {
            let to = msg.to;
            if self.drop_filter.drops(to) {
                continue;
            }
            let Some(peer) = self.peers.get(&to) else {
                tracing::debug!(to, "no address for peer; message dropped");
                continue;
            };
            match peer.queue.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Full(m)) => {
                    let _ = self.failures.try_send(SendFailure {
                        to,
                        was_snapshot: m.get_msg_type() == MessageType::MsgSnapshot,
                    });
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }

    fn spawn_sender(&self, peer_id: u64, addr: String) -> Peer {
        let (queue, rx) = bounded(PEER_QUEUE);
        let addr = Arc::new(Mutex::new(addr));
        let sender = PeerSender {
            node_id: self.node_id,
            cluster_id: self.cluster_id.clone(),
            key: self.key.clone(),
            peer_id,
            addr: addr.clone(),
            failures: self.failures.clone(),
            last_warning: None,
        };
        std::thread::Builder::new()
            .name(format!("raft-send-{peer_id}"))
            .spawn(move || sender.run(rx))
            .expect("spawn sender thread");
        Peer { addr, queue }
    }
}

struct PeerSender {
    node_id: u64,
    cluster_id: String,
    key: Option<Key>,
    peer_id: u64,
    addr: Arc<Mutex<String>>,
    failures: Sender<SendFailure>,
    /// The last refusal logged, so a peer that keeps refusing us (another key,
    /// another cluster) is reported once per change, not once per reconnect.
    last_warning: Option<String>,
}

/// Why a connection to a peer could not be set up.
enum ConnectError {
    /// Not reachable now (down, restarting): retried quietly.
    Unreachable(std::io::Error),
    /// It answered but refused us or failed authentication: a misconfiguration an operator must see.
    Refused(String),
}

impl PeerSender {
    fn run(mut self, rx: Receiver<Message>) {
        let mut conn: Option<FrameWriter<BufWriter<TcpStream>>> = None;
        let mut backoff = Duration::from_millis(50);
        let mut retry_at = Instant::now();
        loop {
            let msg = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let was_snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
            if conn.is_none() && Instant::now() >= retry_at {
                match self.connect() {
                    Ok(c) => {
                        tracing::debug!(peer = self.peer_id, "connected to peer");
                        if self.last_warning.take().is_some() {
                            tracing::info!(peer = self.peer_id, "peer accepted our connection");
                        }
                        conn = Some(c);
                        backoff = Duration::from_millis(50);
                    }
                    Err(e) => {
                        match e {
                            ConnectError::Unreachable(e) => {
                                tracing::debug!(peer = self.peer_id, error = %e, "cannot reach peer");
                            }
                            ConnectError::Refused(warning) => {
                                if self.last_warning.as_ref() != Some(&warning) {
                                    tracing::error!(peer = self.peer_id, "{warning}");
                                    self.last_warning = Some(warning);
                                }
                            }
                        }
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            let Some(w) = conn.as_mut() else {
                let _ = self.failures.try_send(SendFailure {
                    to: self.peer_id,
                    was_snapshot,
                });
                continue;
            };
            let sent = msg
                .write_to_bytes()
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|bytes| w.write(&bytes))
                // Flush when the queue is drained so bursts share one syscall.
                .and_then(|()| if rx.is_empty() { w.flush() } else { Ok(()) });
            if let Err(e) = sent {
                tracing::debug!(peer = self.peer_id, error = %e, "peer connection lost");
                conn = None;
                let _ = self.failures.try_send(SendFailure {
                    to: self.peer_id,
                    was_snapshot,
                });
            }
        }
    }

    fn connect(&self) -> Result<FrameWriter<BufWriter<TcpStream>>, ConnectError> {
        use ConnectError::{Refused, Unreachable};
        let addr_str = self.addr.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let addr = addr_str
            .to_socket_addrs()
            .map_err(Unreachable)?
            .next()
            .ok_or_else(|| {
                Unreachable(std::io::Error::other(format!(
                    "{addr_str} resolves to nothing"
                )))
            })?;
        let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(Unreachable)?;
        stream.set_nodelay(true).map_err(Unreachable)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(Unreachable)?;
        let session = match &self.key {
            Some(key) => Some(
                handshake_initiator(&mut stream, key, ARBITER_LABEL).map_err(|e| match e {
                    StreamError::Auth(_) | StreamError::Frame(FrameError::TooLarge { .. }) => {
                        Refused(format!(
                            "peer at {addr_str} failed authentication: {e} (do all nodes use the same --key-file?)"
                        ))
                    }
                    // Down, restarting, or killed mid-handshake.
                    StreamError::Frame(e) => Unreachable(std::io::Error::other(e.to_string())),
                })?,
            ),
            None => None,
        };
        let (mut reader, mut writer) = channel::split(
            &stream,
            BufWriter::with_capacity(64 * 1024, stream.try_clone().map_err(Unreachable)?),
            session,
        );
        let hello = Hello::Peer {
            cluster_id: self.cluster_id.clone(),
            node_id: self.node_id,
        };
        writer
            .write(&serde_json::to_vec(&hello).expect("hello serializes"))
            .and_then(|()| writer.flush())
            .map_err(Unreachable)?;
        let reply = reader.read(MAX_CLIENT_FRAME).map_err(|e| match e {
            StreamError::Auth(e) => Refused(format!(
                "peer at {addr_str} sent an unauthentic hello reply: {e}"
            )),
            e => Unreachable(std::io::Error::other(e.to_string())),
        })?;
        match serde_json::from_slice::<HelloReply>(&reply) {
            Ok(HelloReply::Accepted { node_id }) if node_id == self.peer_id => {}
            Ok(HelloReply::Accepted { node_id }) => {
                return Err(Refused(format!(
                    "address {addr_str} answers as node {node_id}, not {}",
                    self.peer_id
                )));
            }
            Ok(HelloReply::Refused { reason }) => {
                return Err(Refused(format!("peer refused our connection: {reason}")));
            }
            Ok(HelloReply::AuthenticationRequired) => {
                return Err(Refused(format!(
                    "peer at {addr_str} requires authentication and this node has no --key-file"
                )));
            }
            Err(e) => {
                return Err(Unreachable(std::io::Error::other(format!(
                    "bad hello reply: {e}"
                ))))
            }
        }
        stream.set_read_timeout(None).map_err(Unreachable)?;
        stream
            .set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(Unreachable)?;
        Ok(writer)
    }
}
