//! The driver on a simulated network: no sockets, no threads, time is `tick()`.

use std::collections::{BTreeMap, HashSet, VecDeque};

use crossbeam_channel::{unbounded, Receiver};

use super::*;
use crate::state_machine::{Slot, TasOutcome};

/// Distinct fixed election timeouts per node: no hidden randomness, no split votes.
fn sim_config(id: u64) -> NodeConfig {
    let mut cfg = NodeConfig::new(id);
    cfg.snapshot_every = 5;
    let ticks = 10 + 3 * id as usize;
    cfg.election_tick_range = Some((ticks, ticks + 1));
    cfg
}

struct Sim {
    nodes: BTreeMap<u64, Node>,
    in_flight: VecDeque<Message>,
    /// Nodes whose traffic is dropped.
    isolated: HashSet<u64>,
    dirs: BTreeMap<u64, tempfile::TempDir>,
    /// Share of messages lost in transit; decided by a seeded RNG.
    drop_rate: f64,
    rng: rand::rngs::StdRng,
}

impl Sim {
    fn new(n: u64) -> Sim {
        let members: BTreeMap<u64, String> = (1..=n).map(|id| (id, format!("sim-{id}"))).collect();
        let mut dirs = BTreeMap::new();
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let dir = tempfile::tempdir().unwrap();
            let storage = DiskStorage::open(dir.path(), "sim", id).unwrap();
            let cfg = sim_config(id);
            let node = Node::new(cfg, storage, Some(members.clone()), &raft_logger(id)).unwrap();
            nodes.insert(id, node);
            dirs.insert(id, dir);
        }
        Sim {
            nodes,
            in_flight: VecDeque::new(),
            isolated: HashSet::new(),
            dirs,
            drop_rate: 0.0,
            rng: rand::SeedableRng::seed_from_u64(0),
        }
    }

    /// Crash and restart: the node is rebuilt from what its data dir holds.
    fn restart(&mut self, id: u64) {
        self.nodes.remove(&id);
        let storage = DiskStorage::open(self.dirs[&id].path(), "sim", id).unwrap();
        let node = Node::new(sim_config(id), storage, None, &raft_logger(id)).unwrap();
        self.nodes.insert(id, node);
    }

    /// Processes readies and delivers messages until the network is quiet.
    fn settle(&mut self) {
        for _ in 0..1000 {
            for node in self.nodes.values_mut() {
                let in_flight = &mut self.in_flight;
                node.on_ready(&mut |msgs| in_flight.extend(msgs)).unwrap();
            }
            if self.in_flight.is_empty() {
                return;
            }
            while let Some(m) = self.in_flight.pop_front() {
                if self.isolated.contains(&m.from) || self.isolated.contains(&m.to) {
                    continue;
                }
                if self.drop_rate > 0.0 && rand::Rng::gen_bool(&mut self.rng, self.drop_rate) {
                    continue;
                }
                if let Some(node) = self.nodes.get_mut(&m.to) {
                    node.step(m);
                }
            }
        }
        panic!("network never settled");
    }

    fn run_ticks(&mut self, ticks: usize) {
        for _ in 0..ticks {
            for node in self.nodes.values_mut() {
                node.tick();
            }
            self.settle();
        }
    }

    fn leader(&self) -> Option<u64> {
        self.nodes
            .values()
            .find(|n| n.is_leader() && !self.isolated.contains(&n.id()))
            .map(|n| n.id())
    }

    fn elect(&mut self) -> u64 {
        for _ in 0..100 {
            self.run_ticks(1);
            if let Some(l) = self.leader() {
                return l;
            }
        }
        panic!("no leader elected");
    }

    fn request(&mut self, to: u64, req: Request) -> Receiver<Response> {
        let (tx, rx) = unbounded();
        self.nodes
            .get_mut(&to)
            .unwrap()
            .handle_request(req, tx, Instant::now());
        self.settle();
        rx
    }
}

fn tas(seq: u64, who: &str) -> Request {
    Request::TestAndSet {
        client_id: 42,
        seq,
        vm: "vm".into(),
        generation: 1,
        requester: who.into(),
    }
}

#[test]
fn leader_decides_and_isolated_old_leader_cannot() {
    let mut sim = Sim::new(3);
    let leader = sim.elect();
    let rx = sim.request(leader, tas(1, "primary"));
    assert_eq!(
        rx.try_recv().unwrap(),
        Response::Tas(TasOutcome::Won { generation: 1 })
    );

    // A follower redirects to the leader.
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let rx = sim.request(follower, Request::Get { vm: "vm".into() });
    assert!(
        matches!(rx.try_recv().unwrap(), Response::NotLeader { leader_id: Some(l), .. } if l == leader)
    );

    // Isolate the leader: it cannot commit; the majority elects another one.
    sim.isolated.insert(leader);
    let stuck = sim.request(leader, tas(2, "backup"));
    let new_leader = sim.elect();
    assert_ne!(new_leader, leader);
    // It may have stepped down meanwhile (check-quorum) and said so, but never decided.
    let answer = stuck.try_recv();
    assert!(
        matches!(answer, Err(_) | Ok(Response::NotLeader { .. })),
        "isolated leader answered a write: {answer:?}"
    );
    let rx = sim.request(new_leader, Request::Get { vm: "vm".into() });
    sim.run_ticks(3);
    assert_eq!(
        rx.try_recv().unwrap(),
        Response::Get {
            slot: Some(Slot {
                generation: 1,
                holder: Some("primary".into())
            })
        }
    );
    // check-quorum: the isolated node stops believing it leads.
    sim.run_ticks(40);
    assert!(!sim.nodes[&leader].is_leader());
    sim.isolated.clear();
    sim.run_ticks(20);
    assert_eq!(
        sim.nodes[&leader].state_machine().get("vm"),
        sim.nodes[&new_leader].state_machine().get("vm")
    );
}

#[test]
fn retried_write_is_applied_once_and_logs_compact() {
    let mut sim = Sim::new(3);
    let leader = sim.elect();
    for seq in 1..=12 {
        let rx = sim.request(leader, tas(seq, "primary"));
        assert!(matches!(
            rx.try_recv().unwrap(),
            Response::Tas(TasOutcome::Won { .. })
        ));
    }
    // The same (client, seq) again returns the recorded answer.
    let rx = sim.request(leader, tas(12, "someone-else"));
    assert_eq!(
        rx.try_recv().unwrap(),
        Response::Tas(TasOutcome::Won { generation: 1 })
    );
    assert!(sim.nodes.values().all(|n| n.status().snapshot_index > 5));
}

#[test]
fn random_faults_never_make_two_winners_and_replicas_converge() {
    use rand::{Rng, SeedableRng};
    for seed in 0..4u64 {
        let mut sim = Sim::new(3);
        sim.drop_rate = 0.05;
        sim.rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + seed);
        let mut waiting: Vec<(String, String, Receiver<Response>)> = Vec::new();
        let mut winners: BTreeMap<String, HashSet<String>> = BTreeMap::new();
        let mut seq = 0;
        for _ in 0..300 {
            match rng.gen_range(0..10) {
                0 if sim.isolated.is_empty() => {
                    sim.isolated.insert(rng.gen_range(1..=3));
                }
                1 => sim.isolated.clear(),
                2 => sim.restart(rng.gen_range(1..=3)),
                3..=5 => {
                    let vm = ["a", "b", "c"][rng.gen_range(0..3)].to_string();
                    let who = rng.gen_range(0..4u64);
                    seq += 1;
                    let to = match sim.leader() {
                        Some(l) if rng.gen_bool(0.8) => l,
                        _ => rng.gen_range(1..=3),
                    };
                    let rx = sim.request(
                        to,
                        Request::TestAndSet {
                            client_id: who + 1,
                            seq,
                            vm: vm.clone(),
                            generation: 1,
                            requester: format!("r{who}"),
                        },
                    );
                    waiting.push((vm, format!("r{who}"), rx));
                }
                _ => {}
            }
            sim.run_ticks(1);
            waiting.retain(|(vm, who, rx)| match rx.try_recv() {
                Ok(Response::Tas(TasOutcome::Won { .. })) => {
                    winners.entry(vm.clone()).or_default().insert(who.clone());
                    false
                }
                Ok(_) => false,
                Err(_) => true,
            });
        }
        sim.isolated.clear();
        sim.drop_rate = 0.0;
        sim.run_ticks(60);
        for (vm, who) in &winners {
            assert_eq!(who.len(), 1, "seed {seed}: {vm} won by {who:?}");
        }
        assert!(!winners.is_empty(), "seed {seed}: nothing was ever decided");
        let term = sim.nodes.values().map(|n| n.status().term).max().unwrap();
        assert!(
            term > 3,
            "seed {seed}: faults never forced a new election (term {term})"
        );
        for vm in ["a", "b", "c"] {
            let slots: Vec<Option<Slot>> = sim
                .nodes
                .values()
                .map(|n| n.state_machine().get(vm))
                .collect();
            assert!(
                slots.windows(2).all(|w| w[0] == w[1]),
                "seed {seed}: replicas differ on {vm}: {slots:?}"
            );
            if let (Some(who), Some(slot)) = (winners.get(vm), &slots[0]) {
                assert!(
                    who.contains(slot.holder.as_ref().unwrap()),
                    "seed {seed}: {vm} {slot:?} vs {who:?}"
                );
            }
        }
    }
}
