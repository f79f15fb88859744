//! The Raft node driver: owns raft-rs's `RawNode`, the durable storage and
//! the state machine, and turns inputs (peer messages, ticks, client
//! requests) into outputs (messages to send, client replies). No sockets and
//! no clock here: the caller passes `now` and a `send` callback, so the
//! driver runs the same in a test loop as in the server.
//!
//! `Ready` is handled in raft-rs's documented order: send leader messages,
//! install a snapshot, apply committed entries, append entries, persist the
//! hard state, fsync, then send the messages that depend on persisted state,
//! then `advance` and handle the `LightReady` the same way.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, StateRole, Storage as _};
use serde::{Deserialize, Serialize};

use crate::proto::{NodeStatus, Request, Response};
use crate::state_machine::{validate_op, Command, Op, OpResult, StateMachine};
use crate::storage::{DiskStorage, StorageError};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    /// Ticks without a leader message before a follower campaigns (randomized up to 2x by raft-rs).
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// Take a snapshot and compact the log after this many applied entries
    /// (or after as many entries as the table had VMs at the last snapshot, if that is more).
    pub snapshot_every: u64,
    /// How long a client request may wait for commit before it is answered `Unavailable`.
    pub request_timeout: Duration,
    /// Pins raft-rs's randomized election timeout to `[min, max)` ticks; `None` keeps
    /// `[election_tick, 2 * election_tick)`. Simulations pin it so runs repeat exactly.
    pub election_tick_range: Option<(usize, usize)>,
}

impl NodeConfig {
    pub fn new(id: u64) -> Self {
        NodeConfig {
            id,
            election_tick: 10,
            heartbeat_tick: 2,
            snapshot_every: 1000,
            request_timeout: Duration::from_secs(2),
            election_tick_range: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("replicated data does not decode at index {index}: {reason}")]
    BadEntry { index: u64, reason: String },
}

/// Context carried by a membership change entry.
#[derive(Debug, Serialize, Deserialize)]
struct ConfChangeContext {
    addr: Option<String>,
}

struct Waiter {
    reply: Sender<Response>,
    deadline: Instant,
}

/// A node being added: first as a learner, made a voter once it has caught up, so
/// it never counts in the quorum before it can acknowledge anything.
struct Promotion {
    node_id: u64,
    addr: String,
    /// Log index of the entry that made it a learner; caught up once it has that entry.
    learner_index: Option<u64>,
    voter_proposed: bool,
}

struct PendingRead {
    vm: String,
    waiter: Waiter,
    /// Whether `read_index` was called for it yet (see `issue_reads`).
    issued: bool,
    /// Set once raft-rs confirmed leadership; answer when applied reaches it.
    read_index: Option<u64>,
}

pub struct Node {
    raw: RawNode<DiskStorage>,
    sm: StateMachine,
    conf_state: ConfState,
    applied: u64,
    cfg: NodeConfig,
    writes: HashMap<(u64, u64), Vec<Waiter>>,
    conf_change: Option<Waiter>,
    promotion: Option<Promotion>,
    reads: BTreeMap<u64, PendingRead>,
    next_read_ctx: u64,
    /// A membership change was applied: snapshot now, so a node just added receives a
    /// snapshot whose configuration contains it (raft-rs ignores one that does not).
    snapshot_due: bool,
    slots_at_last_snapshot: u64,
}

impl Node {
    /// Starts a node on `storage`. With `bootstrap_members` and an empty
    /// store, writes the initial configuration (those nodes as voters).
    pub fn new(
        cfg: NodeConfig,
        mut storage: DiskStorage,
        bootstrap_members: Option<BTreeMap<u64, String>>,
        logger: &slog::Logger,
    ) -> Result<Self, NodeError> {
        if !storage.is_initialized() {
            if let Some(members) = bootstrap_members {
                let voters = members.keys().copied().collect();
                storage.bootstrap(voters, StateMachine::with_members(members).to_bytes())?;
            }
        }
        let snap = storage.snapshot_ref();
        let sm = StateMachine::from_bytes(&snap.data).map_err(|e| NodeError::BadEntry {
            index: snap.get_metadata().index,
            reason: format!("snapshot state machine: {e}"),
        })?;
        let conf_state = snap.get_metadata().get_conf_state().clone();
        let applied = snap.get_metadata().index;
        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            applied,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            read_only_option: raft::ReadOnlyOption::Safe,
            min_election_tick: cfg.election_tick_range.map_or(0, |r| r.0),
            max_election_tick: cfg.election_tick_range.map_or(0, |r| r.1),
            ..Default::default()
        };
        let raw = RawNode::new(&raft_cfg, storage, logger)?;
        let sm_slots = sm.slot_count() as u64;
        Ok(Node {
            raw,
            sm,
            conf_state,
            applied,
            cfg,
            writes: HashMap::new(),
            conf_change: None,
            promotion: None,
            reads: BTreeMap::new(),
            next_read_ctx: 1,
            snapshot_due: false,
            slots_at_last_snapshot: sm_slots,
        })
    }

    pub fn id(&self) -> u64 {
        self.cfg.id
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn leader_id(&self) -> Option<u64> {
        Some(self.raw.raft.leader_id).filter(|&id| id != raft::INVALID_ID)
    }

    pub fn members(&self) -> &BTreeMap<u64, String> {
        self.sm.members()
    }

    pub fn state_machine(&self) -> &StateMachine {
        &self.sm
    }

    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Feeds a message from a peer. Errors (stale term, unknown peer) are logged and dropped:
    /// a bad message from the network must not stop the node.
    pub fn step(&mut self, msg: Message) {
        if let Err(e) = self.raw.step(msg) {
            tracing::debug!(error = %e, "raft message dropped");
        }
    }

    pub fn report_unreachable(&mut self, peer: u64, was_snapshot: bool) {
        self.raw.report_unreachable(peer);
        if was_snapshot {
            self.raw
                .report_snapshot(peer, raft::SnapshotStatus::Failure);
        }
    }

    fn not_leader(&self) -> Response {
        let leader_id = self.leader_id().filter(|&id| id != self.cfg.id);
        Response::NotLeader {
            leader_id,
            leader_addr: leader_id.and_then(|id| self.sm.members().get(&id).cloned()),
        }
    }

    /// Handles a client request; the answer goes to `reply`, now or once decided.
    pub fn handle_request(&mut self, req: Request, reply: Sender<Response>, now: Instant) {
        let deadline = now + self.cfg.request_timeout;
        let waiter = Waiter { reply, deadline };
        match req {
            Request::Status => {
                let _ = waiter.reply.send(Response::Status(self.status()));
            }
            Request::DropTraffic { .. } => {
                let _ = waiter.reply.send(Response::Invalid {
                    reason: "fault injection is handled by the server, not the node".into(),
                });
            }
            _ if !self.is_leader() => {
                let _ = waiter.reply.send(self.not_leader());
            }
            Request::TestAndSet {
                client_id,
                seq,
                vm,
                generation,
                requester,
            } => self.propose_command(
                Command {
                    client_id,
                    seq,
                    op: Op::TestAndSet {
                        vm,
                        generation,
                        requester,
                    },
                },
                waiter,
            ),
            Request::Reset {
                client_id,
                seq,
                vm,
                generation,
            } => self.propose_command(
                Command {
                    client_id,
                    seq,
                    op: Op::Reset { vm, generation },
                },
                waiter,
            ),
            Request::Get { vm } => {
                if vm.is_empty() || vm.len() > crate::state_machine::MAX_NAME_LEN {
                    let _ = waiter.reply.send(Response::Invalid {
                        reason: format!(
                            "vm name must be 1..={} bytes",
                            crate::state_machine::MAX_NAME_LEN
                        ),
                    });
                    return;
                }
                let ctx = self.next_read_ctx;
                self.next_read_ctx += 1;
                self.reads.insert(
                    ctx,
                    PendingRead {
                        vm,
                        waiter,
                        issued: false,
                        read_index: None,
                    },
                );
                self.issue_reads();
            }
            Request::AddNode { node_id, addr } => self.add_node(node_id, addr, waiter),
            Request::RemoveNode { node_id } => {
                if self
                    .promotion
                    .as_ref()
                    .is_some_and(|p| p.node_id == node_id)
                {
                    self.promotion = None;
                }
                self.propose_conf_change(ConfChangeType::RemoveNode, node_id, None, waiter)
            }
        }
    }

    fn propose_command(&mut self, cmd: Command, waiter: Waiter) {
        if let Err(reason) = validate_op(&cmd.op) {
            let _ = waiter.reply.send(Response::Invalid { reason });
            return;
        }
        let data = serde_json::to_vec(&cmd).expect("command serializes");
        match self.raw.propose(Vec::new(), data) {
            Ok(()) => self
                .writes
                .entry((cmd.client_id, cmd.seq))
                .or_default()
                .push(waiter),
            Err(e) => {
                let _ = waiter.reply.send(Response::Unavailable {
                    reason: format!("proposal dropped: {e}"),
                });
            }
        }
    }

    fn add_node(&mut self, node_id: u64, addr: String, waiter: Waiter) {
        if self.conf_state.voters.contains(&node_id) {
            // Already a voter (e.g. a retried request): a no-op change that confirms it.
            return self.propose_conf_change(ConfChangeType::AddNode, node_id, Some(addr), waiter);
        }
        if self
            .promotion
            .as_ref()
            .is_some_and(|p| p.node_id == node_id)
        {
            // A retry while the same addition is under way: wait for it.
            match &self.conf_change {
                None => self.conf_change = Some(waiter),
                Some(_) => {
                    let _ = waiter.reply.send(Response::Unavailable {
                        reason: format!("node {node_id} is still catching up as a learner"),
                    });
                }
            }
            return;
        }
        if self.promotion.is_some() {
            let _ = waiter.reply.send(Response::Unavailable {
                reason: "another node is being added".into(),
            });
            return;
        }
        if self.conf_change.is_none() {
            self.promotion = Some(Promotion {
                node_id,
                addr: addr.clone(),
                learner_index: None,
                voter_proposed: false,
            });
        }
        self.propose_conf_change(ConfChangeType::AddLearnerNode, node_id, Some(addr), waiter);
        if self.conf_change.is_none() {
            self.promotion = None; // the proposal was refused
        }
    }

    /// Proposes the learner → voter step once the learner has caught up (leader only).
    fn maybe_promote(&mut self) {
        if !self.is_leader() {
            return;
        }
        let Some(p) = &self.promotion else { return };
        let Some(learner_index) = p.learner_index else {
            return;
        };
        let caught_up = self
            .raw
            .raft
            .prs()
            .get(p.node_id)
            .is_some_and(|pr| pr.matched >= learner_index);
        if p.voter_proposed || !caught_up {
            return;
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddNode);
        cc.node_id = p.node_id;
        let context = serde_json::to_vec(&ConfChangeContext {
            addr: Some(p.addr.clone()),
        })
        .expect("context serializes");
        let node_id = p.node_id;
        match self.raw.propose_conf_change(context, cc) {
            Ok(()) => {
                tracing::info!(node_id, "learner caught up; proposing it as a voter");
                if let Some(p) = self.promotion.as_mut() {
                    p.voter_proposed = true;
                }
            }
            Err(e) => tracing::debug!(error = %e, "promotion not proposed yet"),
        }
    }

    fn propose_conf_change(
        &mut self,
        change_type: ConfChangeType,
        node_id: u64,
        addr: Option<String>,
        waiter: Waiter,
    ) {
        if node_id == 0 {
            let _ = waiter.reply.send(Response::Invalid {
                reason: "node id 0 is reserved".into(),
            });
            return;
        }
        if self.conf_change.is_some() {
            let _ = waiter.reply.send(Response::Unavailable {
                reason: "another membership change is in progress".into(),
            });
            return;
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(change_type);
        cc.node_id = node_id;
        let context = serde_json::to_vec(&ConfChangeContext { addr }).expect("context serializes");
        match self.raw.propose_conf_change(context, cc) {
            Ok(()) => self.conf_change = Some(waiter),
            Err(e) => {
                let _ = waiter.reply.send(Response::Unavailable {
                    reason: format!("membership change refused: {e}"),
                });
            }
        }
    }

    /// Answers requests whose deadline passed with `Unavailable` (the client retries).
    pub fn expire(&mut self, now: Instant) {
        let timed_out = || Response::Unavailable {
            reason: "not committed in time (no quorum?)".into(),
        };
        self.writes.retain(|_, waiters| {
            waiters.retain(|w| {
                let keep = w.deadline > now;
                if !keep {
                    let _ = w.reply.send(timed_out());
                }
                keep
            });
            !waiters.is_empty()
        });
        self.reads.retain(|_, r| {
            let keep = r.waiter.deadline > now;
            if !keep {
                let _ = r.waiter.reply.send(timed_out());
            }
            keep
        });
        if self.conf_change.as_ref().is_some_and(|w| w.deadline <= now) {
            if let Some(w) = self.conf_change.take() {
                let _ = w.reply.send(timed_out());
            }
        }
    }

    /// Processes one `Ready`, if any: the only place that writes storage.
    pub fn on_ready(&mut self, send: &mut dyn FnMut(Vec<Message>)) -> Result<(), NodeError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            send(ready.take_messages());
        }
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone())?;
        }
        let committed = ready.take_committed_entries();
        self.apply_entries(committed)?;
        if !ready.entries().is_empty() {
            self.raw.mut_store().append(ready.entries())?;
        }
        if let Some(hs) = ready.hs() {
            self.raw.mut_store().set_hard_state(hs)?;
        }
        // Everything above must be durable before votes or append acks leave this node.
        self.raw.mut_store().sync()?;
        if !ready.persisted_messages().is_empty() {
            send(ready.take_persisted_messages());
        }
        let read_states = ready.take_read_states();
        if let Some(ss) = ready.ss() {
            if ss.raft_state != StateRole::Leader {
                self.fail_leader_only_waiters();
            }
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            // Commit can be re-learnt from the leader, so no fsync for it alone.
            self.raw.mut_store().set_commit(commit)?;
            self.raw.mut_store().flush_unsynced()?;
        }
        if !light.messages().is_empty() {
            send(light.take_messages());
        }
        self.apply_entries(light.take_committed_entries())?;
        self.raw.advance_apply();
        for rs in read_states {
            let ctx = u64::from_le_bytes(rs.request_ctx.as_slice().try_into().unwrap_or_default());
            if let Some(r) = self.reads.get_mut(&ctx) {
                r.read_index = Some(rs.index);
            }
        }
        self.answer_reads();
        self.issue_reads();
        self.maybe_promote();
        self.maybe_compact()?;
        Ok(())
    }

    /// raft-rs silently drops a ReadIndex request while the leader has not yet committed an
    /// entry of its own term (just after an election), so such reads wait here and are
    /// issued as soon as that no-op entry commits.
    fn issue_reads(&mut self) {
        if !self.is_leader() || !self.raw.raft.commit_to_current_term() {
            return;
        }
        let waiting: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| !r.issued)
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in waiting {
            self.raw.read_index(ctx.to_le_bytes().to_vec());
            if let Some(r) = self.reads.get_mut(&ctx) {
                r.issued = true;
            }
        }
    }

    fn fail_leader_only_waiters(&mut self) {
        let not_leader = self.not_leader();
        for (_, waiters) in self.writes.drain() {
            for w in waiters {
                let _ = w.reply.send(not_leader.clone());
            }
        }
        for (_, r) in std::mem::take(&mut self.reads) {
            let _ = r.waiter.reply.send(not_leader.clone());
        }
        if let Some(w) = self.conf_change.take() {
            let _ = w.reply.send(not_leader);
        }
        // The next leader takes an addition over when the client retries it.
        self.promotion = None;
    }

    fn answer_reads(&mut self) {
        let applied = self.applied;
        let ready: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.read_index.is_some_and(|i| i <= applied))
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in ready {
            if let Some(r) = self.reads.remove(&ctx) {
                let _ = r.waiter.reply.send(Response::Get {
                    slot: self.sm.get(&r.vm),
                });
            }
        }
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), NodeError> {
        let meta = snap.get_metadata().clone();
        let sm = StateMachine::from_bytes(&snap.data).map_err(|e| NodeError::BadEntry {
            index: meta.index,
            reason: format!("snapshot state machine: {e}"),
        })?;
        tracing::info!(
            index = meta.index,
            term = meta.term,
            "installing snapshot from leader"
        );
        self.raw.mut_store().install_snapshot(snap)?;
        self.sm = sm;
        self.conf_state = meta.get_conf_state().clone();
        self.applied = meta.index;
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        for entry in entries {
            let index = entry.index;
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {} // leader's no-op of a new term
                EntryType::EntryNormal => {
                    let cmd: Command =
                        serde_json::from_slice(&entry.data).map_err(|e| NodeError::BadEntry {
                            index,
                            reason: e.to_string(),
                        })?;
                    let result = self.sm.apply(index, &cmd);
                    if let Some(waiters) = self.writes.remove(&(cmd.client_id, cmd.seq)) {
                        let response = match result {
                            OpResult::Tas(t) => Response::Tas(t),
                            OpResult::Reset(r) => Response::Reset(r),
                            OpResult::StaleSequence { last_seq } => Response::Invalid {
                                reason: format!(
                                    "sequence number is older than this client's last ({last_seq})"
                                ),
                            },
                            OpResult::Invalid { reason } => Response::Invalid { reason },
                        };
                        for w in waiters {
                            let _ = w.reply.send(response.clone());
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&entry.data).map_err(|e| {
                        NodeError::BadEntry {
                            index,
                            reason: e.to_string(),
                        }
                    })?;
                    let ctx: ConfChangeContext = serde_json::from_slice(&entry.context)
                        .unwrap_or(ConfChangeContext { addr: None });
                    match self.raw.apply_conf_change(&cc) {
                        Ok(cs) => {
                            match cc.get_change_type() {
                                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                                    if let Some(addr) = ctx.addr {
                                        self.sm.set_member(cc.node_id, addr);
                                    }
                                }
                                ConfChangeType::RemoveNode => self.sm.remove_member(cc.node_id),
                            }
                            tracing::info!(voters = ?cs.voters, learners = ?cs.learners, "membership changed");
                            self.conf_state = cs;
                            self.snapshot_due = true;
                        }
                        Err(e) => tracing::warn!(error = %e, "membership change rejected at apply"),
                    }
                    let promoting = self.promotion.as_mut().filter(|p| p.node_id == cc.node_id);
                    let first_step_of_addition = match promoting {
                        Some(p) if cc.get_change_type() == ConfChangeType::AddLearnerNode => {
                            p.learner_index = Some(index);
                            true
                        }
                        Some(_) if cc.get_change_type() == ConfChangeType::AddNode => {
                            self.promotion = None;
                            false
                        }
                        _ => false,
                    };
                    if !first_step_of_addition {
                        if let Some(w) = self.conf_change.take() {
                            let _ = w.reply.send(Response::MembershipChanged {
                                voters: sorted(&self.conf_state.voters),
                            });
                        }
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    return Err(NodeError::BadEntry {
                        index,
                        reason: "joint-consensus changes are not used by this arbiter".into(),
                    })
                }
            }
            self.applied = index;
        }
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), NodeError> {
        let snap_index = self.raw.store().snapshot_ref().get_metadata().index;
        // Serializing the table costs O(table); waiting for as many entries as the table had
        // at the last snapshot keeps the cost per entry constant when the table is large,
        // and the log stays within about twice the table.
        let interval = self.cfg.snapshot_every.max(self.slots_at_last_snapshot);
        let due = self.snapshot_due || self.applied >= snap_index + interval;
        if due && self.applied > snap_index {
            self.snapshot_due = false;
            self.slots_at_last_snapshot = self.sm.slot_count() as u64;
            tracing::info!(
                index = self.applied,
                "snapshotting state machine, compacting log"
            );
            let data = self.sm.to_bytes();
            self.raw
                .mut_store()
                .compact(self.applied, self.conf_state.clone(), data)?;
        }
        Ok(())
    }

    pub fn status(&self) -> NodeStatus {
        let store = self.raw.store();
        NodeStatus {
            node_id: self.cfg.id,
            role: format!("{:?}", self.raw.raft.state),
            term: self.raw.raft.term,
            leader_id: self.leader_id(),
            commit: self.raw.raft.raft_log.committed,
            applied: self.applied,
            snapshot_index: store.snapshot_ref().get_metadata().index,
            last_index: store.last_index().unwrap_or(0),
            voters: sorted(&self.conf_state.voters),
            learners: sorted(&self.conf_state.learners),
            members: self.sm.members().clone(),
        }
    }
}

fn sorted(ids: &[u64]) -> Vec<u64> {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v
}

/// A slog drain that forwards raft-rs's log lines to `tracing`.
pub struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        struct Collect(String);
        impl slog::Serializer for Collect {
            fn emit_arguments(
                &mut self,
                key: slog::Key,
                val: &std::fmt::Arguments<'_>,
            ) -> slog::Result {
                use std::fmt::Write;
                let _ = write!(self.0, " {key}={val}");
                Ok(())
            }
        }
        let mut kv = Collect(String::new());
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let _ = slog::KV::serialize(values, record, &mut kv);
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{msg}{}", kv.0)
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}{}", kv.0),
            _ => tracing::debug!(target: "raft", "{msg}{}", kv.0),
        }
        Ok(())
    }
}

pub fn raft_logger(node_id: u64) -> slog::Logger {
    slog::Logger::root(slog::Fuse(TracingDrain), slog::o!("raft_id" => node_id))
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
