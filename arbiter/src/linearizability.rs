//! A linearizability checker for histories of the arbiter's operations, in
//! the style of Wing & Gong with Lowe's memoization (as in Porcupine).
//!
//! The model is written here independently of [`crate::state_machine`], so a
//! history recorded against the real cluster is checked against the
//! specification, not against the code under test. Operations on different
//! VMs commute, so the history is split per VM and each part is checked
//! alone (P-compositionality), which keeps the search small.
//!
//! An operation whose outcome is unknown (the client timed out) may or may
//! not have taken effect: it gets a return time of "never" and accepts any
//! output, the usual treatment.

use std::collections::{BTreeMap, HashSet};

use crate::state_machine::{ResetOutcome, Slot, TasOutcome};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    TestAndSet {
        vm: String,
        generation: u64,
        requester: String,
    },
    Reset {
        vm: String,
        generation: u64,
    },
    Get {
        vm: String,
    },
}

impl Input {
    fn vm(&self) -> &str {
        match self {
            Input::TestAndSet { vm, .. } | Input::Reset { vm, .. } | Input::Get { vm } => vm,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Tas(TasOutcome),
    Reset(ResetOutcome),
    Get(Option<Slot>),
    /// No answer: may or may not have taken effect.
    Unknown,
}

/// One completed (or abandoned) client operation. Times are any monotonic unit.
#[derive(Debug, Clone)]
pub struct Operation {
    pub client: u64,
    pub input: Input,
    pub output: Output,
    pub call: u64,
    /// `None` when the outcome is unknown.
    pub ret: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order of the operations on `vm` explains what the clients saw.
    NotLinearizable {
        vm: String,
    },
    /// The search gave up after its step budget; nothing proven either way.
    Inconclusive {
        vm: String,
    },
}

/// The specification: state of one VM is `Option<Slot>`.
fn step(state: &Option<Slot>, input: &Input, output: &Output) -> Option<Option<Slot>> {
    let (next, expected) = match input {
        Input::Get { .. } => (state.clone(), Output::Get(state.clone())),
        Input::TestAndSet {
            generation,
            requester,
            ..
        } => {
            let won = |slot: Slot| {
                (
                    Some(slot),
                    Output::Tas(TasOutcome::Won {
                        generation: *generation,
                    }),
                )
            };
            match state {
                None => won(Slot {
                    generation: *generation,
                    holder: Some(requester.clone()),
                }),
                Some(s) if s.generation != *generation => (
                    state.clone(),
                    Output::Tas(TasOutcome::NotArmed {
                        generation: s.generation,
                    }),
                ),
                Some(s) => match &s.holder {
                    None => won(Slot {
                        generation: *generation,
                        holder: Some(requester.clone()),
                    }),
                    Some(h) if h == requester => won(s.clone()),
                    Some(h) => (
                        state.clone(),
                        Output::Tas(TasOutcome::Held {
                            holder: h.clone(),
                            generation: *generation,
                        }),
                    ),
                },
            }
        }
        Input::Reset { generation, .. } => {
            let current = state.as_ref().map_or(0, |s| s.generation);
            if *generation > current {
                (
                    Some(Slot {
                        generation: *generation,
                        holder: None,
                    }),
                    Output::Reset(ResetOutcome::Reset {
                        generation: *generation,
                    }),
                )
            } else {
                (
                    state.clone(),
                    Output::Reset(ResetOutcome::Rejected {
                        current_generation: current,
                    }),
                )
            }
        }
    };
    (*output == Output::Unknown || *output == expected).then_some(next)
}

/// Checks a whole history; `max_steps` bounds the search per VM.
pub fn check(history: &[Operation], max_steps: u64) -> Verdict {
    let mut per_vm: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in history {
        per_vm.entry(op.input.vm()).or_default().push(op);
    }
    for (vm, ops) in per_vm {
        match check_one(&ops, max_steps) {
            Some(true) => {}
            Some(false) => return Verdict::NotLinearizable { vm: vm.to_owned() },
            None => return Verdict::Inconclusive { vm: vm.to_owned() },
        }
    }
    Verdict::Linearizable
}

#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    prev: usize,
    next: usize,
    /// For a call: index of its return event.
    partner: usize,
}

/// Some(true) linearizable, Some(false) not, None out of budget.
fn check_one(ops: &[&Operation], max_steps: u64) -> Option<bool> {
    // Events ordered by time; at equal times calls first (treats touching ops as concurrent).
    let mut order: Vec<(u64, u8, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        order.push((op.call, 0, i));
        order.push((op.ret.unwrap_or(u64::MAX), 1, i));
    }
    order.sort();
    // Node 0 is the list head sentinel; events are 1..=2n.
    let n_events = order.len();
    let mut ev = vec![
        Event {
            op: usize::MAX,
            is_call: false,
            prev: 0,
            next: 0,
            partner: 0,
        };
        n_events + 1
    ];
    let mut ret_pos = vec![0usize; ops.len()];
    for (pos, &(_, kind, op)) in order.iter().enumerate() {
        let idx = pos + 1;
        ev[idx] = Event {
            op,
            is_call: kind == 0,
            prev: idx - 1,
            next: if idx == n_events { 0 } else { idx + 1 },
            partner: 0,
        };
        if kind == 1 {
            ret_pos[op] = idx;
        }
    }
    ev[0].next = if n_events > 0 { 1 } else { 0 };
    for idx in 1..=n_events {
        if ev[idx].is_call {
            ev[idx].partner = ret_pos[ev[idx].op];
        }
    }

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<Slot>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<Slot>)> = Vec::new();
    let mut state: Option<Slot> = None;
    let mut entry = ev[0].next;
    let mut steps = 0u64;

    let unlink = |ev: &mut Vec<Event>, i: usize| {
        let (p, n) = (ev[i].prev, ev[i].next);
        ev[p].next = n;
        ev[n].prev = p;
    };
    let relink = |ev: &mut Vec<Event>, i: usize| {
        let (p, n) = (ev[i].prev, ev[i].next);
        ev[p].next = i;
        ev[n].prev = i;
    };

    while ev[0].next != 0 {
        steps += 1;
        if steps > max_steps {
            return None;
        }
        let e = ev[entry];
        // (entry 0 is the sentinel: only reachable past the last event; treat like a return.)
        if entry != 0 && e.is_call {
            let op = ops[e.op];
            if let Some(next_state) = step(&state, &op.input, &op.output) {
                let mut with_op = linearized.clone();
                with_op[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((with_op.clone(), next_state.clone())) {
                    stack.push((entry, state));
                    state = next_state;
                    linearized = with_op;
                    unlink(&mut ev, entry);
                    unlink(&mut ev, e.partner);
                    entry = ev[0].next;
                    continue;
                }
            }
            entry = e.next;
        } else {
            // A return whose call is not linearized yet: backtrack.
            let Some((call_entry, prev_state)) = stack.pop() else {
                return Some(false);
            };
            let op = ev[call_entry].op;
            linearized[op / 64] &= !(1 << (op % 64));
            state = prev_state;
            let partner = ev[call_entry].partner;
            relink(&mut ev, partner);
            relink(&mut ev, call_entry);
            entry = ev[call_entry].next;
        }
    }
    Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tas(
        client: u64,
        who: &str,
        generation: u64,
        out: TasOutcome,
        call: u64,
        ret: u64,
    ) -> Operation {
        Operation {
            client,
            input: Input::TestAndSet {
                vm: "vm".into(),
                generation,
                requester: who.into(),
            },
            output: Output::Tas(out),
            call,
            ret: Some(ret),
        }
    }

    fn get(client: u64, slot: Option<Slot>, call: u64, ret: u64) -> Operation {
        Operation {
            client,
            input: Input::Get { vm: "vm".into() },
            output: Output::Get(slot),
            call,
            ret: Some(ret),
        }
    }

    fn held_by(who: &str, generation: u64) -> Option<Slot> {
        Some(Slot {
            generation,
            holder: Some(who.into()),
        })
    }

    #[test]
    fn concurrent_race_with_one_winner_is_linearizable() {
        let h = vec![
            tas(1, "a", 1, TasOutcome::Won { generation: 1 }, 0, 10),
            tas(
                2,
                "b",
                1,
                TasOutcome::Held {
                    holder: "a".into(),
                    generation: 1,
                },
                1,
                9,
            ),
            get(3, None, 0, 3), // overlaps the winning write: may read before it
            get(3, held_by("a", 1), 11, 12),
        ];
        assert_eq!(check(&h, 100_000), Verdict::Linearizable);
    }

    #[test]
    fn two_winners_are_rejected() {
        let h = vec![
            tas(1, "a", 1, TasOutcome::Won { generation: 1 }, 0, 10),
            tas(2, "b", 1, TasOutcome::Won { generation: 1 }, 1, 9),
        ];
        assert_eq!(
            check(&h, 100_000),
            Verdict::NotLinearizable { vm: "vm".into() }
        );
    }

    #[test]
    fn stale_read_after_completed_write_is_rejected() {
        // The write finished before the read began, yet the read saw the old state:
        // what a follower serving local reads could return.
        let h = vec![
            tas(1, "a", 1, TasOutcome::Won { generation: 1 }, 0, 5),
            get(2, None, 6, 7),
        ];
        assert_eq!(
            check(&h, 100_000),
            Verdict::NotLinearizable { vm: "vm".into() }
        );
    }

    #[test]
    fn reads_must_not_go_back_in_time() {
        let reset = |client, generation, call, ret| Operation {
            client,
            input: Input::Reset {
                vm: "vm".into(),
                generation,
            },
            output: Output::Reset(ResetOutcome::Reset { generation }),
            call,
            ret: Some(ret),
        };
        let armed = |generation| {
            Some(Slot {
                generation,
                holder: None,
            })
        };
        // Reset to 2 overlaps both reads; the first read sees it, the later one does not.
        let h = vec![
            tas(1, "a", 1, TasOutcome::Won { generation: 1 }, 0, 1),
            reset(2, 2, 2, 20),
            get(3, armed(2), 3, 4),
            get(4, held_by("a", 1), 5, 6),
        ];
        assert_eq!(
            check(&h, 100_000),
            Verdict::NotLinearizable { vm: "vm".into() }
        );
        // In the other order, both reads fit.
        let h = vec![
            tas(1, "a", 1, TasOutcome::Won { generation: 1 }, 0, 1),
            reset(2, 2, 2, 20),
            get(3, held_by("a", 1), 3, 4),
            get(4, armed(2), 5, 6),
        ];
        assert_eq!(check(&h, 100_000), Verdict::Linearizable);
    }

    #[test]
    fn an_abandoned_write_may_or_may_not_have_happened() {
        let mut lost = tas(1, "a", 1, TasOutcome::Won { generation: 1 }, 0, 0);
        lost.output = Output::Unknown;
        lost.ret = None;
        let took_effect = vec![
            lost.clone(),
            tas(
                2,
                "b",
                1,
                TasOutcome::Held {
                    holder: "a".into(),
                    generation: 1,
                },
                5,
                6,
            ),
        ];
        assert_eq!(check(&took_effect, 100_000), Verdict::Linearizable);
        let did_not = vec![
            lost,
            tas(2, "b", 1, TasOutcome::Won { generation: 1 }, 5, 6),
        ];
        assert_eq!(check(&did_not, 100_000), Verdict::Linearizable);
    }

    #[test]
    fn vms_are_checked_independently_and_budget_is_reported() {
        let mut h = vec![tas(1, "a", 1, TasOutcome::Won { generation: 1 }, 0, 1)];
        let mut other = tas(2, "b", 1, TasOutcome::Won { generation: 1 }, 0, 1);
        other.input = Input::TestAndSet {
            vm: "other".into(),
            generation: 1,
            requester: "b".into(),
        };
        h.push(other);
        assert_eq!(check(&h, 100_000), Verdict::Linearizable);
        let racing: Vec<Operation> = (0..20)
            .map(|i| {
                tas(
                    i,
                    "x",
                    1,
                    TasOutcome::Held {
                        holder: "nobody".into(),
                        generation: 1,
                    },
                    0,
                    100,
                )
            })
            .collect();
        assert!(matches!(check(&racing, 10), Verdict::Inconclusive { .. }));
    }
}
