//! Concurrent clients record a history while leaders are killed and nodes
//! partitioned; the history must be linearizable under the arbiter's model.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbiter::linearizability::{check, Input, Operation, Output, Verdict};
use arbiter::local_cluster::ClusterOptions;
use arbiter::ClientError;
use common::cluster;
use rand::{Rng, SeedableRng};

const CLIENTS: u64 = 4;
const VMS: [&str; 3] = ["vm-a", "vm-b", "vm-c"];
const RUN_FOR: Duration = Duration::from_secs(10);

#[test]
fn history_under_faults_is_linearizable() {
    let mut c = cluster(ClusterOptions {
        snapshot_every: 100,
        ..Default::default()
    });
    let start = Instant::now();
    let history = Arc::new(Mutex::new(Vec::<Operation>::new()));
    let stop = Arc::new(AtomicBool::new(false));

    let workers: Vec<_> = (0..CLIENTS)
        .map(|client_no| {
            // Half the clients give up early, so some writes end with an unknown outcome
            // (and are retried by nobody): the checker must allow both possibilities.
            let deadline = if client_no % 2 == 0 { 3000 } else { 700 };
            let mut client = c.client(Duration::from_millis(deadline));
            let history = history.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(client_no);
                let requester = format!("client-{client_no}");
                while !stop.load(Ordering::Relaxed) {
                    let vm = VMS[rng.gen_range(0..VMS.len())].to_string();
                    let call = start.elapsed().as_nanos() as u64;
                    let (input, result) = match rng.gen_range(0..10) {
                        0..=4 => {
                            let generation = rng.gen_range(1..=4);
                            let r = client
                                .test_and_set(&vm, generation, &requester)
                                .map(Output::Tas);
                            (
                                Input::TestAndSet {
                                    vm,
                                    generation,
                                    requester: requester.clone(),
                                },
                                r,
                            )
                        }
                        5 => {
                            let generation = rng.gen_range(1..=6);
                            (
                                Input::Reset {
                                    vm: vm.clone(),
                                    generation,
                                },
                                client.reset(&vm, generation).map(Output::Reset),
                            )
                        }
                        _ => (
                            Input::Get { vm: vm.clone() },
                            client.get(&vm).map(Output::Get),
                        ),
                    };
                    let ret = start.elapsed().as_nanos() as u64;
                    let op = match result {
                        Ok(output) => Operation {
                            client: client_no,
                            input,
                            output,
                            call,
                            ret: Some(ret),
                        },
                        // A read without an answer had no effect: leave it out.
                        Err(ClientError::NoQuorum { .. }) if matches!(input, Input::Get { .. }) => {
                            continue
                        }
                        Err(ClientError::NoQuorum { .. }) => Operation {
                            client: client_no,
                            input,
                            output: Output::Unknown,
                            call,
                            ret: None,
                        },
                        Err(e) => panic!("client {client_no}: unexpected error {e}"),
                    };
                    history.lock().unwrap().push(op);
                }
            })
        })
        .collect();

    // Faults: kill the leader, restart it; isolate a node, heal; kill a follower, restart it.
    let mut admin = c.client(Duration::from_secs(3));
    let mut round = 0;
    while start.elapsed() < RUN_FOR {
        std::thread::sleep(Duration::from_millis(700));
        let Ok(leader) = c.wait_leader(Duration::from_secs(10)) else {
            continue;
        };
        match round % 3 {
            0 => {
                c.kill(leader);
                std::thread::sleep(Duration::from_millis(800));
                c.spawn(leader).unwrap();
            }
            1 => {
                let others: Vec<u64> = c.ids().into_iter().filter(|&id| id != leader).collect();
                let _ = admin.drop_traffic(c.addr(leader), others.clone());
                for &id in &others {
                    let _ = admin.drop_traffic(c.addr(id), vec![leader]);
                }
                std::thread::sleep(Duration::from_millis(1500));
                for id in c.ids() {
                    let _ = admin.drop_traffic(c.addr(id), vec![]);
                }
            }
            _ => {
                let follower = c.ids().into_iter().find(|&id| id != leader).unwrap();
                c.kill(follower);
                std::thread::sleep(Duration::from_millis(800));
                c.spawn(follower).unwrap();
            }
        }
        round += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("client thread");
    }
    let history = history.lock().unwrap().clone();
    let completed = history.iter().filter(|o| o.ret.is_some()).count();
    let unknown = history.len() - completed;
    assert!(
        completed > 100,
        "too few operations completed ({completed}) to mean anything"
    );
    assert!(round >= 3, "fault rounds: {round}");
    let verdict = check(&history, 20_000_000);
    assert_eq!(
        verdict,
        Verdict::Linearizable,
        "{} operations",
        history.len()
    );
    // The same history with one read falsified must be rejected: the check has teeth here too.
    let mut forged = history.clone();
    let victim = forged
        .iter_mut()
        .rev()
        .find(|o| matches!(&o.output, Output::Get(Some(_))))
        .expect("some read saw a holder");
    if let Output::Get(Some(slot)) = &mut victim.output {
        slot.holder = Some("nobody-ever-asked".into());
    }
    assert!(matches!(
        check(&forged, 20_000_000),
        Verdict::NotLinearizable { .. }
    ));
    eprintln!(
        "checked {} operations ({completed} completed, {unknown} unknown) over {round} fault rounds: linearizable",
        history.len()
    );
}
