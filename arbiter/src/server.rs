//! The arbiter server: a listener for peers and clients on one port, and the
//! single thread that owns the Raft [`Node`].

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
use protobuf::Message as _;
use raft::eraftpb::Message;

use crate::auth::{handshake_responder_after, Key, Session, StreamError, NONCE_LEN};
use crate::channel::{self, FrameReader, FrameWriter, ARBITER_LABEL};
use crate::frame::{read_frame, write_frame, FrameError, MAX_CLIENT_FRAME, MAX_PEER_FRAME};
use crate::node::{raft_logger, Node, NodeConfig};
use crate::proto::{Hello, HelloReply, Request, Response};
use crate::storage::DiskStorage;
use crate::transport::{DropFilter, SendFailure, Transport};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub node_id: u64,
    pub cluster_id: String,
    /// Initial members (node id → address), this node included.
    pub peers: BTreeMap<u64, String>,
    pub data_dir: PathBuf,
    /// Join an existing cluster (added with `add-node`) instead of bootstrapping.
    pub join: bool,
    pub tick: Duration,
    pub snapshot_every: u64,
    pub allow_fault_injection: bool,
    /// Pre-shared key: every connection (client and peer) must authenticate
    /// with it. `None` leaves the slot table open to anyone who can connect.
    pub key: Option<Key>,
}

enum Event {
    Raft(Message),
    Client {
        req: Request,
        reply: Sender<Response>,
    },
}

/// Runs the server until a fatal error (storage failure); never returns `Ok` otherwise.
pub fn serve(cfg: ServerConfig) -> anyhow::Result<()> {
    let listen = cfg
        .peers
        .get(&cfg.node_id)
        .with_context(|| format!("--peers has no address for this node ({})", cfg.node_id))?
        .clone();
    // Bind before touching the data dir: a second process started for the same node fails
    // here ("address in use") instead of writing the same WAL; a process for another node
    // pointed at this dir is stopped by the identity stamp.
    let listener = TcpListener::bind(&listen).with_context(|| format!("binding {listen}"))?;
    let storage = DiskStorage::open(&cfg.data_dir, &cfg.cluster_id, cfg.node_id)
        .with_context(|| format!("opening data dir {}", cfg.data_dir.display()))?;
    let mut node_cfg = NodeConfig::new(cfg.node_id);
    node_cfg.snapshot_every = cfg.snapshot_every;
    let bootstrap = (!cfg.join).then(|| cfg.peers.clone());
    let mut node = Node::new(node_cfg, storage, bootstrap, &raft_logger(cfg.node_id))?;

    tracing::info!(node = cfg.node_id, %listen, cluster = %cfg.cluster_id, authenticated = cfg.key.is_some(), "arbiter node listening");
    if cfg.key.is_none() {
        tracing::warn!(
            "no --key-file: the slot table is unprotected; anyone who can reach {listen} can win or reset any VM's slot"
        );
    }

    let (events_tx, events_rx) = unbounded::<Event>();
    let (fail_tx, fail_rx) = bounded::<SendFailure>(1024);
    let drop_filter = DropFilter::default();
    let mut transport = Transport::new(
        cfg.node_id,
        cfg.cluster_id.clone(),
        cfg.key.clone(),
        fail_tx,
        drop_filter.clone(),
    );
    let mut address_book = cfg.peers.clone();
    address_book.extend(node.members().clone());
    transport.update_addresses(&address_book);

    let acceptor = Acceptor {
        node_id: cfg.node_id,
        cluster_id: cfg.cluster_id.clone(),
        events: events_tx,
        drop_filter,
        allow_fault_injection: cfg.allow_fault_injection,
        key: cfg.key.clone(),
    };
    std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || acceptor.run(listener))?;

    run_loop(
        &mut node,
        &mut transport,
        &events_rx,
        &fail_rx,
        cfg.tick,
        address_book,
    )
}

fn run_loop(
    node: &mut Node,
    transport: &mut Transport,
    events: &Receiver<Event>,
    failures: &Receiver<SendFailure>,
    tick: Duration,
    mut address_book: BTreeMap<u64, String>,
) -> anyhow::Result<()> {
    let mut next_tick = Instant::now() + tick;
    loop {
        let timeout = next_tick.saturating_duration_since(Instant::now());
        select! {
            recv(events) -> ev => match ev {
                Ok(Event::Raft(m)) => node.step(m),
                Ok(Event::Client { req, reply }) => node.handle_request(req, reply, Instant::now()),
                Err(_) => anyhow::bail!("event channel closed"),
            },
            recv(failures) -> f => if let Ok(f) = f {
                node.report_unreachable(f.to, f.was_snapshot);
            },
            default(timeout) => {}
        }
        // Take whatever else is queued so one Ready (one fsync) covers a batch.
        for _ in 0..256 {
            match events.try_recv() {
                Ok(Event::Raft(m)) => node.step(m),
                Ok(Event::Client { req, reply }) => node.handle_request(req, reply, Instant::now()),
                Err(_) => break,
            }
        }
        let now = Instant::now();
        if now >= next_tick {
            node.tick();
            node.expire(now);
            next_tick = now + tick;
        }
        node.on_ready(&mut |msgs| transport.send(msgs))
            .context("raft storage failed; stopping this node")?;
        if node
            .members()
            .iter()
            .any(|(id, a)| address_book.get(id) != Some(a))
        {
            address_book.extend(node.members().clone());
            transport.update_addresses(&address_book);
        }
    }
}

struct Acceptor {
    node_id: u64,
    cluster_id: String,
    events: Sender<Event>,
    drop_filter: DropFilter,
    allow_fault_injection: bool,
    key: Option<Key>,
}

impl Acceptor {
    fn run(self, listener: TcpListener) {
        for stream in listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let conn = Connection {
                node_id: self.node_id,
                cluster_id: self.cluster_id.clone(),
                events: self.events.clone(),
                drop_filter: self.drop_filter.clone(),
                allow_fault_injection: self.allow_fault_injection,
                key: self.key.clone(),
            };
            let _ = std::thread::Builder::new()
                .name("conn".into())
                .spawn(move || {
                    let peer = stream
                        .peer_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    if let Err(e) = conn.handle(stream) {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                });
        }
    }
}

struct Connection {
    node_id: u64,
    cluster_id: String,
    events: Sender<Event>,
    drop_filter: DropFilter,
    allow_fault_injection: bool,
    key: Option<Key>,
}

fn send_json<T: serde::Serialize, W: Write>(
    w: &mut FrameWriter<W>,
    value: &T,
) -> std::io::Result<()> {
    w.write(&serde_json::to_vec(value).expect("reply serializes"))?;
    w.flush()
}

/// A JSON frame outside any session (refusals to parties that did not authenticate).
fn send_plain_json<T: serde::Serialize>(w: &mut impl Write, value: &T) -> std::io::Result<()> {
    write_frame(w, &serde_json::to_vec(value).expect("reply serializes"))?;
    w.flush()
}

impl Connection {
    fn handle(self, stream: TcpStream) -> anyhow::Result<()> {
        stream.set_nodelay(true)?;
        // A silent connection must not hold a thread forever before saying hello.
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let peer_addr = stream.peer_addr()?;
        // Unbuffered until the handshake is over: no byte of what follows may sit in a buffer
        // that is then dropped.
        let first = read_frame(&mut &stream, MAX_CLIENT_FRAME)?;
        let (session, first) = match &self.key {
            Some(key) => match authenticate(&stream, key, &first) {
                Ok(session) => (Some(session), None),
                Err(reason) => {
                    tracing::warn!("connection from {peer_addr} failed authentication: {reason}");
                    return Ok(());
                }
            },
            None => (None, Some(first)),
        };
        let (mut reader, mut writer) = channel::split(
            BufReader::new(stream.try_clone()?),
            BufWriter::new(stream),
            session,
        );
        let hello_bytes = match first {
            Some(bytes) => bytes,
            None => match reader.read(MAX_CLIENT_FRAME) {
                Ok(bytes) => bytes,
                Err(StreamError::Auth(e)) => {
                    tracing::warn!("connection from {peer_addr}: {e}; closing the connection");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            },
        };
        let hello: Hello = match serde_json::from_slice(&hello_bytes) {
            Ok(h) => h,
            Err(_) if self.key.is_none() && hello_bytes.len() == NONCE_LEN => {
                tracing::warn!("connection from {peer_addr} tried to authenticate, but this node runs without --key-file; refused");
                send_json(
                    &mut writer,
                    &HelloReply::Refused {
                        reason: "this arbiter runs without authentication (no --key-file)".into(),
                    },
                )?;
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(%peer_addr, error = %e, "malformed hello; closing");
                send_json(
                    &mut writer,
                    &HelloReply::Refused {
                        reason: format!("malformed hello: {e}"),
                    },
                )?;
                return Ok(());
            }
        };
        let cluster = match &hello {
            Hello::Peer { cluster_id, .. } | Hello::Client { cluster_id } => cluster_id.clone(),
        };
        if cluster != self.cluster_id {
            tracing::error!(%peer_addr, theirs = %cluster, ours = %self.cluster_id, "refused connection: wrong cluster id");
            send_json(
                &mut writer,
                &HelloReply::Refused {
                    reason: format!(
                        "wrong cluster id {cluster:?}; this is cluster {:?}",
                        self.cluster_id
                    ),
                },
            )?;
            return Ok(());
        }
        send_json(
            &mut writer,
            &HelloReply::Accepted {
                node_id: self.node_id,
            },
        )?;
        match hello {
            Hello::Peer { node_id, .. } => self.peer_loop(node_id, reader),
            Hello::Client { .. } => self.client_loop(reader, writer, peer_addr),
        }
    }

    fn peer_loop(
        &self,
        from: u64,
        mut reader: FrameReader<BufReader<TcpStream>>,
    ) -> anyhow::Result<()> {
        reader.get_ref().get_ref().set_read_timeout(None)?;
        loop {
            let bytes = match reader.read(MAX_PEER_FRAME) {
                Ok(b) => b,
                Err(StreamError::Auth(e)) => {
                    tracing::warn!(from, "peer connection closed: {e}");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            let msg = match Message::parse_from_bytes(&bytes) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(from, error = %e, "undecodable raft message; closing connection");
                    return Ok(());
                }
            };
            if msg.to != self.node_id {
                tracing::warn!(from, to = msg.to, "raft message for another node; dropped");
                continue;
            }
            if msg.from != from {
                tracing::warn!(
                    from,
                    claimed = msg.from,
                    "raft message with a forged sender; dropped"
                );
                continue;
            }
            if self.drop_filter.drops(from) {
                continue;
            }
            if self.events.send(Event::Raft(msg)).is_err() {
                return Ok(());
            }
        }
    }

    fn client_loop(
        &self,
        mut reader: FrameReader<BufReader<TcpStream>>,
        mut writer: FrameWriter<BufWriter<TcpStream>>,
        peer_addr: std::net::SocketAddr,
    ) -> anyhow::Result<()> {
        // Idle clients are dropped after a while; the client library reconnects.
        reader
            .get_ref()
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(300)))?;
        loop {
            let bytes = match reader.read(MAX_CLIENT_FRAME) {
                Ok(b) => b,
                Err(StreamError::Auth(e)) => {
                    // Nothing of it was acted on; the stream cannot be trusted any more.
                    tracing::warn!("client {peer_addr}: {e}; closing the connection");
                    return Ok(());
                }
                Err(StreamError::Frame(FrameError::TooLarge { len, limit })) => {
                    // The stream cannot be resynchronised after an unread body: answer and close.
                    send_json(
                        &mut writer,
                        &Response::Invalid {
                            reason: format!("request of {len} bytes exceeds the limit of {limit}"),
                        },
                    )?;
                    return Ok(());
                }
                Err(StreamError::Frame(FrameError::Closed)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let response = match serde_json::from_slice::<Request>(&bytes) {
                Err(e) => Response::Invalid {
                    reason: format!("malformed or unknown request: {e}"),
                },
                Ok(Request::DropTraffic { peers }) => {
                    if self.allow_fault_injection {
                        tracing::warn!(?peers, "fault injection: dropping raft traffic with peers");
                        self.drop_filter.set(peers);
                        Response::Done
                    } else {
                        Response::Invalid {
                            reason: "fault injection is disabled on this node".into(),
                        }
                    }
                }
                Ok(req) => {
                    let (tx, rx) = bounded(1);
                    if self.events.send(Event::Client { req, reply: tx }).is_err() {
                        return Ok(());
                    }
                    rx.recv_timeout(Duration::from_secs(10))
                        .unwrap_or(Response::Unavailable {
                            reason: "node did not answer in time".into(),
                        })
                }
            };
            send_json(&mut writer, &response)?;
        }
    }
}

/// The responder's side of the handshake on a fresh connection whose first
/// frame was `first`; `Err` is the reason for the log. A party that sent a
/// plain `Hello` (no key) is told, in the clear, that a key is needed.
fn authenticate(stream: &TcpStream, key: &Key, first: &[u8]) -> Result<Session, String> {
    if serde_json::from_slice::<Hello>(first).is_ok() {
        let _ = send_plain_json(&mut &*stream, &HelloReply::AuthenticationRequired);
        return Err("no key (it sent a plain hello)".into());
    }
    handshake_responder_after(&mut &*stream, key, ARBITER_LABEL, first).map_err(|e| e.to_string())
}
