//! The simulated environment: an event queue on a virtual clock, one TCP
//! connection between the sides (in-order delivery, latency, retransmission
//! stalls, partitions, resets, FIN after a close), and the arbiter modelled by
//! `arbiter::state_machine::StateMachine` itself, with outages.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Duration;

use arbiter::state_machine::{Command, Op, OpResult, StateMachine};
use rand::rngs::StdRng;
use rand::Rng;

use crate::ft::failover::Verdict;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Primary,
    Backup,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Primary => Side::Backup,
            Side::Backup => Side::Primary,
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug)]
pub enum Ev {
    Deliver { to: Side, bytes: Vec<u8> },
    ConnLost { to: Side, reason: &'static str },
    ArbiterApply { from: Side, requester: String },
    ArbiterReply { to: Side, verdict: Verdict },
    Fault(usize),
}

struct Timed {
    at: Duration,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Timed {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timed {
    // Reversed: BinaryHeap pops the earliest (then the first scheduled).
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
pub struct Queue {
    heap: BinaryHeap<Timed>,
    seq: u64,
}

impl Queue {
    pub fn at(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.heap.push(Timed {
            at,
            seq: self.seq,
            ev,
        });
    }
    pub fn next_time(&self) -> Option<Duration> {
        self.heap.peek().map(|t| t.at)
    }
    pub fn pop_due(&mut self, now: Duration) -> Option<Ev> {
        if self.heap.peek()?.at <= now {
            self.heap.pop().map(|t| t.ev)
        } else {
            None
        }
    }
}

fn us(v: u64) -> Duration {
    Duration::from_micros(v)
}

/// The one TCP connection of the run.
pub struct Net {
    /// False after a reset: nothing more is delivered.
    pub open: bool,
    /// A side closed its socket (or its process died): it sends nothing more
    /// and the peer sees EOF after the bytes already on the way.
    fin: [bool; 2],
    last_delivery: [Duration; 2],
    partition_until: [Duration; 2],
    /// The next delivery to this side gets one byte flipped.
    pub corrupt_next: [bool; 2],
}

impl Net {
    pub fn new() -> Self {
        Net {
            open: true,
            fin: [false; 2],
            last_delivery: [Duration::ZERO; 2],
            partition_until: [Duration::ZERO; 2],
            corrupt_next: [false; 2],
        }
    }

    /// Queues bytes written by `from`, split into a few pieces, in order.
    pub fn send(
        &mut self,
        q: &mut Queue,
        rng: &mut StdRng,
        now: Duration,
        from: Side,
        bytes: Vec<u8>,
    ) {
        if !self.open || self.fin[from.index()] {
            return;
        }
        let to = from.other();
        let mut at = now + us(rng.gen_range(50..400));
        if rng.gen_bool(0.01) {
            // A lost segment: TCP retransmits it, everything behind it waits.
            at += us(rng.gen_range(20_000..60_000));
        }
        at = at
            .max(self.last_delivery[to.index()])
            .max(self.partition_until[to.index()]);
        self.last_delivery[to.index()] = at;
        let mut bytes = bytes;
        if std::mem::take(&mut self.corrupt_next[to.index()]) && !bytes.is_empty() {
            let i = rng.gen_range(0..bytes.len());
            bytes[i] ^= 1 << rng.gen_range(0..8);
        }
        let pieces = rng.gen_range(1..=3).min(bytes.len().max(1));
        let mut rest = bytes.as_slice();
        for k in (1..=pieces).rev() {
            let take = if k == 1 {
                rest.len()
            } else {
                rng.gen_range(0..=rest.len())
            };
            let (piece, tail) = rest.split_at(take);
            q.at(
                at,
                Ev::Deliver {
                    to,
                    bytes: piece.to_vec(),
                },
            );
            rest = tail;
        }
    }

    pub fn may_deliver(&self, to: Side) -> bool {
        // After a FIN from the sender, bytes already queued still arrive.
        self.open && !self.fin[to.index()]
    }

    /// `side` closed its socket or died with a FIN: the peer gets EOF after the data in flight.
    pub fn fin(&mut self, q: &mut Queue, now: Duration, side: Side) {
        if !self.open || self.fin[side.index()] {
            return;
        }
        self.fin[side.index()] = true;
        let to = side.other();
        let at = (now + us(200)).max(self.last_delivery[to.index()]);
        q.at(
            at,
            Ev::ConnLost {
                to,
                reason: "connection closed by peer",
            },
        );
    }

    /// A connection reset: data in flight is lost, both sides see an error.
    pub fn reset(&mut self, q: &mut Queue, rng: &mut StdRng, now: Duration) {
        if !self.open {
            return;
        }
        self.open = false;
        for to in [Side::Primary, Side::Backup] {
            q.at(
                now + us(rng.gen_range(10..5000)),
                Ev::ConnLost {
                    to,
                    reason: "connection reset",
                },
            );
        }
    }

    /// Nothing reaches `to` before `until` (TCP keeps retrying).
    pub fn partition(&mut self, to: Side, until: Duration) {
        let i = to.index();
        self.partition_until[i] = self.partition_until[i].max(until);
    }
}

/// The arbiter: the real test-and-set state machine, behind a network that
/// can be down globally or for one side.
pub struct ArbiterModel {
    pub sm: StateMachine,
    vm: String,
    generation: u64,
    index: u64,
    seq: [u64; 2],
    down_until: Duration,
    cut_until: [Duration; 2],
    pub requests: u64,
}

/// How long a client waits before calling the arbiter unreachable.
const ARBITER_TIMEOUT: Duration = Duration::from_millis(50);

impl ArbiterModel {
    /// The arbiter as the pair running `vm` at `generation` uses it.
    pub fn new(vm: &str, generation: u64) -> Self {
        ArbiterModel {
            sm: StateMachine::default(),
            vm: vm.into(),
            generation,
            index: 0,
            seq: [0; 2],
            down_until: Duration::ZERO,
            cut_until: [Duration::ZERO; 2],
            requests: 0,
        }
    }

    fn reachable(&self, side: Side, at: Duration) -> bool {
        at >= self.down_until && at >= self.cut_until[side.index()]
    }

    pub fn outage(&mut self, until: Duration) {
        self.down_until = self.down_until.max(until);
    }

    pub fn cut(&mut self, side: Side, until: Duration) {
        let i = side.index();
        self.cut_until[i] = self.cut_until[i].max(until);
    }

    pub fn request(
        &mut self,
        q: &mut Queue,
        rng: &mut StdRng,
        now: Duration,
        from: Side,
        requester: String,
    ) {
        self.requests += 1;
        let at = now + us(rng.gen_range(500..3000));
        if self.reachable(from, at) {
            q.at(at, Ev::ArbiterApply { from, requester });
        } else {
            q.at(now + ARBITER_TIMEOUT, unreachable(from));
        }
    }

    /// The request reaches the leader and is committed; the answer may still be lost.
    pub fn apply(
        &mut self,
        q: &mut Queue,
        rng: &mut StdRng,
        now: Duration,
        from: Side,
        requester: String,
    ) -> Result<(), String> {
        self.index += 1;
        self.seq[from.index()] += 1;
        let cmd = Command {
            client_id: from.index() as u64 + 1,
            seq: self.seq[from.index()],
            op: Op::TestAndSet {
                vm: self.vm.clone(),
                generation: self.generation,
                requester,
            },
        };
        let outcome = match self.sm.apply(self.index, &cmd) {
            OpResult::Tas(outcome) => outcome,
            other => return Err(format!("arbiter answered {other:?} to a test-and-set")),
        };
        let at = now + us(rng.gen_range(500..3000));
        if self.reachable(from, at) {
            q.at(
                at,
                Ev::ArbiterReply {
                    to: from,
                    verdict: Verdict::Decided(outcome),
                },
            );
        } else {
            q.at(now + ARBITER_TIMEOUT, unreachable(from));
        }
        Ok(())
    }
}

fn unreachable(to: Side) -> Ev {
    Ev::ArbiterReply {
        to,
        verdict: Verdict::Unreachable {
            error: "arbiter timed out".into(),
        },
    }
}
