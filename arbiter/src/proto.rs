//! Wire messages on the arbiter port. Every connection starts with the
//! authentication handshake when the cluster has a key (see `auth`), then a
//! [`Hello`] frame; peers then exchange protobuf Raft messages, clients
//! exchange JSON [`Request`]/[`Response`] frames (see docs/arbiter.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state_machine::{ResetOutcome, Slot, TasOutcome};

/// First frame on every connection (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hello {
    Peer { cluster_id: String, node_id: u64 },
    Client { cluster_id: String },
}

/// Answer to [`Hello`] (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Accepted {
        node_id: u64,
    },
    Refused {
        reason: String,
    },
    /// Sent in the clear to a party that sent a plain `Hello` to a node that
    /// requires authentication; the connection is then closed.
    AuthenticationRequired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    TestAndSet {
        client_id: u64,
        seq: u64,
        vm: String,
        generation: u64,
        requester: String,
    },
    Reset {
        client_id: u64,
        seq: u64,
        vm: String,
        generation: u64,
    },
    /// Linearizable read (ReadIndex on the leader).
    Get {
        vm: String,
    },
    Status,
    AddNode {
        node_id: u64,
        addr: String,
    },
    RemoveNode {
        node_id: u64,
    },
    /// Fault injection for tests: drop all Raft traffic to and from these peers.
    /// Refused unless the server runs with `--allow-fault-injection`.
    DropTraffic {
        peers: Vec<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub role: String,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub commit: u64,
    pub applied: u64,
    pub snapshot_index: u64,
    pub last_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub members: BTreeMap<u64, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Tas(TasOutcome),
    Reset(ResetOutcome),
    Get {
        slot: Option<Slot>,
    },
    Status(NodeStatus),
    MembershipChanged {
        voters: Vec<u64>,
    },
    Done,
    /// Ask the leader instead (address when known).
    NotLeader {
        leader_id: Option<u64>,
        leader_addr: Option<String>,
    },
    /// Could not be decided now (no quorum yet, election running); retry is safe.
    Unavailable {
        reason: String,
    },
    /// The request itself is wrong; retrying will not help.
    Invalid {
        reason: String,
    },
}
