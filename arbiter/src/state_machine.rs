//! The replicated test-and-set table: `vm → (generation, holder)`, plus the
//! client sessions that make retried writes exactly-once and the member
//! address book. Pure logic; the Raft driver feeds it committed commands.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest VM name or requester name accepted (keeps entries and snapshots small).
pub const MAX_NAME_LEN: usize = 256;
/// Sessions kept for duplicate detection; the least recently used is evicted first.
pub const MAX_SESSIONS: usize = 10_000;

/// The arbitration record of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Slot {
    pub generation: u64,
    /// `None` after a reset: armed, waiting for the first test-and-set of this generation.
    pub holder: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TasOutcome {
    /// The requester holds the VM for `generation` (also returned when it asks again).
    Won { generation: u64 },
    /// Someone else holds it.
    Held { holder: String, generation: u64 },
    /// The VM is armed for another generation than the one asked for; nobody was made holder.
    NotArmed { generation: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResetOutcome {
    Reset {
        generation: u64,
    },
    /// Only a strictly higher generation re-arms a VM.
    Rejected {
        current_generation: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    TestAndSet {
        vm: String,
        generation: u64,
        requester: String,
    },
    Reset {
        vm: String,
        generation: u64,
    },
}

/// A client write as it travels in a Raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub client_id: u64,
    pub seq: u64,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    Tas(TasOutcome),
    Reset(ResetOutcome),
    /// The client already moved past this sequence number; the old answer is gone.
    StaleSequence {
        last_seq: u64,
    },
    /// The operation was malformed; nothing changed.
    Invalid {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    last_seq: u64,
    last_result: OpResult,
    /// Log index of the last command, used for deterministic eviction.
    last_index: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMachine {
    slots: BTreeMap<String, Slot>,
    sessions: BTreeMap<u64, Session>,
    /// Node id → address (peers and clients use the same port).
    members: BTreeMap<u64, String>,
}

/// Checks the names in an operation; the same check runs before proposing.
pub fn validate_op(op: &Op) -> Result<(), String> {
    let check = |what: &str, s: &str| {
        if s.is_empty() || s.len() > MAX_NAME_LEN {
            Err(format!(
                "{what} must be 1..={MAX_NAME_LEN} bytes, got {}",
                s.len()
            ))
        } else {
            Ok(())
        }
    };
    match op {
        Op::TestAndSet { vm, requester, .. } => {
            check("vm", vm)?;
            check("requester", requester)
        }
        Op::Reset { vm, .. } => check("vm", vm),
    }
}

impl StateMachine {
    pub fn with_members(members: BTreeMap<u64, String>) -> Self {
        StateMachine {
            members,
            ..Default::default()
        }
    }

    /// Applies a committed command at log `index`, at most once per (client, seq).
    pub fn apply(&mut self, index: u64, cmd: &Command) -> OpResult {
        if let Some(session) = self.sessions.get(&cmd.client_id) {
            if cmd.seq == session.last_seq {
                return session.last_result.clone();
            }
            if cmd.seq < session.last_seq {
                return OpResult::StaleSequence {
                    last_seq: session.last_seq,
                };
            }
        }
        let result = match validate_op(&cmd.op) {
            // Validated before proposing too; a bad entry (older/foreign writer) changes nothing.
            Err(reason) => OpResult::Invalid { reason },
            Ok(()) => match &cmd.op {
                Op::TestAndSet {
                    vm,
                    generation,
                    requester,
                } => OpResult::Tas(self.test_and_set(vm, *generation, requester)),
                Op::Reset { vm, generation } => OpResult::Reset(self.reset(vm, *generation)),
            },
        };
        self.sessions.insert(
            cmd.client_id,
            Session {
                last_seq: cmd.seq,
                last_result: result.clone(),
                last_index: index,
            },
        );
        if self.sessions.len() > MAX_SESSIONS {
            if let Some(oldest) = self
                .sessions
                .iter()
                .min_by_key(|(id, s)| (s.last_index, **id))
                .map(|(id, _)| *id)
            {
                self.sessions.remove(&oldest);
            }
        }
        result
    }

    fn test_and_set(&mut self, vm: &str, generation: u64, requester: &str) -> TasOutcome {
        match self.slots.get_mut(vm) {
            None => {
                self.slots.insert(
                    vm.to_owned(),
                    Slot {
                        generation,
                        holder: Some(requester.to_owned()),
                    },
                );
                TasOutcome::Won { generation }
            }
            Some(slot) if slot.generation != generation => TasOutcome::NotArmed {
                generation: slot.generation,
            },
            Some(slot) => match &slot.holder {
                None => {
                    slot.holder = Some(requester.to_owned());
                    TasOutcome::Won { generation }
                }
                Some(h) if h == requester => TasOutcome::Won { generation },
                Some(h) => TasOutcome::Held {
                    holder: h.clone(),
                    generation,
                },
            },
        }
    }

    fn reset(&mut self, vm: &str, generation: u64) -> ResetOutcome {
        let current = self.slots.get(vm).map_or(0, |s| s.generation);
        if generation <= current {
            return ResetOutcome::Rejected {
                current_generation: current,
            };
        }
        self.slots.insert(
            vm.to_owned(),
            Slot {
                generation,
                holder: None,
            },
        );
        ResetOutcome::Reset { generation }
    }

    pub fn get(&self, vm: &str) -> Option<Slot> {
        self.slots.get(vm).cloned()
    }

    pub fn members(&self) -> &BTreeMap<u64, String> {
        &self.members
    }

    pub fn set_member(&mut self, id: u64, addr: String) {
        self.members.insert(id, addr);
    }

    pub fn remove_member(&mut self, id: u64) {
        self.members.remove(&id);
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("state machine serializes (string keys, plain data)")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        if bytes.is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tas(client_id: u64, seq: u64, vm: &str, generation: u64, who: &str) -> Command {
        Command {
            client_id,
            seq,
            op: Op::TestAndSet {
                vm: vm.into(),
                generation,
                requester: who.into(),
            },
        }
    }

    fn reset(client_id: u64, seq: u64, vm: &str, generation: u64) -> Command {
        Command {
            client_id,
            seq,
            op: Op::Reset {
                vm: vm.into(),
                generation,
            },
        }
    }

    #[test]
    fn first_contender_wins_and_the_second_learns_the_holder() {
        let mut sm = StateMachine::default();
        assert_eq!(
            sm.apply(1, &tas(1, 1, "vm", 1, "primary")),
            OpResult::Tas(TasOutcome::Won { generation: 1 })
        );
        assert_eq!(
            sm.apply(2, &tas(2, 1, "vm", 1, "backup")),
            OpResult::Tas(TasOutcome::Held {
                holder: "primary".into(),
                generation: 1
            })
        );
        // The winner asking again still wins (idempotent for the holder).
        assert_eq!(
            sm.apply(3, &tas(1, 2, "vm", 1, "primary")),
            OpResult::Tas(TasOutcome::Won { generation: 1 })
        );
    }

    #[test]
    fn reset_needs_a_higher_generation_and_rearms() {
        let mut sm = StateMachine::default();
        sm.apply(1, &tas(1, 1, "vm", 1, "primary"));
        assert_eq!(
            sm.apply(2, &reset(9, 1, "vm", 1)),
            OpResult::Reset(ResetOutcome::Rejected {
                current_generation: 1
            })
        );
        assert_eq!(
            sm.apply(3, &reset(9, 2, "vm", 2)),
            OpResult::Reset(ResetOutcome::Reset { generation: 2 })
        );
        assert_eq!(
            sm.apply(4, &tas(2, 1, "vm", 1, "backup")),
            OpResult::Tas(TasOutcome::NotArmed { generation: 2 })
        );
        assert_eq!(
            sm.apply(5, &tas(2, 2, "vm", 2, "backup")),
            OpResult::Tas(TasOutcome::Won { generation: 2 })
        );
        assert_eq!(
            sm.get("vm"),
            Some(Slot {
                generation: 2,
                holder: Some("backup".into())
            })
        );
    }

    #[test]
    fn retried_command_is_applied_once() {
        let mut sm = StateMachine::default();
        let first = sm.apply(1, &tas(7, 1, "vm", 1, "a"));
        sm.apply(2, &tas(8, 1, "vm", 1, "b"));
        // The retry of client 7's request must not be re-evaluated against the new state.
        sm.apply(3, &reset(9, 1, "vm", 5));
        assert_eq!(sm.apply(4, &tas(7, 1, "vm", 1, "a")), first);
        assert_eq!(
            sm.apply(5, &tas(7, 0, "vm", 1, "a")),
            OpResult::StaleSequence { last_seq: 1 }
        );
        assert_eq!(sm.get("vm").unwrap().generation, 5);
    }

    #[test]
    fn sessions_and_table_survive_serialization() {
        let mut sm = StateMachine::with_members([(1, "127.0.0.1:1".to_string())].into());
        let won = sm.apply(1, &tas(7, 1, "vm", 3, "a"));
        let restored = StateMachine::from_bytes(&sm.to_bytes()).unwrap();
        assert_eq!(restored, sm);
        let mut restored = restored;
        assert_eq!(restored.apply(2, &tas(7, 1, "vm", 3, "a")), won);
        assert!(StateMachine::from_bytes(b"{not json").is_err());
    }

    #[test]
    fn session_table_is_bounded() {
        let mut sm = StateMachine::default();
        for c in 0..(MAX_SESSIONS as u64 + 5) {
            sm.apply(c + 1, &tas(c, 1, "vm", 1, "x"));
        }
        assert_eq!(sm.sessions.len(), MAX_SESSIONS);
        assert!(!sm.sessions.contains_key(&0));
    }

    #[test]
    fn oversize_names_are_rejected_without_state_change() {
        let mut sm = StateMachine::default();
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert!(validate_op(&Op::Reset {
            vm: long.clone(),
            generation: 1
        })
        .is_err());
        sm.apply(1, &tas(1, 1, &long, 1, "a"));
        assert_eq!(sm.slot_count(), 0);
    }
}
