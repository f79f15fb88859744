//! Crash, restart, partition and catch-up tests on real arbiter processes.

mod common;

use std::time::Duration;

use arbiter::local_cluster::ClusterOptions;
use arbiter::{Slot, TasOutcome};
use common::{cluster, wait_until};

const DEADLINE: Duration = Duration::from_secs(10);

fn held(who: &str, generation: u64) -> Option<Slot> {
    Some(Slot {
        generation,
        holder: Some(who.into()),
    })
}

#[test]
fn leader_and_follower_kills_keep_the_decision() {
    let mut c = cluster(ClusterOptions::default());
    let mut client = c.client(DEADLINE);
    assert_eq!(
        client.test_and_set("vm1", 1, "primary").unwrap(),
        TasOutcome::Won { generation: 1 }
    );

    // A follower dies: the two others still decide.
    let leader = c.wait_leader(DEADLINE).unwrap();
    let follower = c.ids().into_iter().find(|&id| id != leader).unwrap();
    c.kill(follower);
    assert_eq!(
        client.test_and_set("vm2", 1, "backup").unwrap(),
        TasOutcome::Won { generation: 1 }
    );
    c.spawn(follower).unwrap();

    // The leader dies: a new one gives the same answers.
    wait_until(DEADLINE, "restarted follower to catch up", || {
        c.status(follower).is_some_and(|s| s.applied >= 4)
    });
    c.kill(leader);
    let new_leader = c.wait_leader(DEADLINE).unwrap();
    assert_ne!(new_leader, leader);
    assert_eq!(
        client.test_and_set("vm1", 1, "backup").unwrap(),
        TasOutcome::Held {
            holder: "primary".into(),
            generation: 1
        }
    );
    assert_eq!(client.get("vm2").unwrap(), held("backup", 1));
}

#[test]
fn full_cluster_restart_from_disk() {
    let mut c = cluster(ClusterOptions::default());
    let mut client = c.client(DEADLINE);
    for i in 0..20 {
        client
            .test_and_set(&format!("vm{i}"), 1, &format!("node{i}"))
            .unwrap();
    }
    assert!(matches!(
        client.reset("vm0", 2).unwrap(),
        arbiter::ResetOutcome::Reset { generation: 2 }
    ));
    for id in c.ids() {
        c.kill(id);
    }
    for id in c.ids() {
        c.spawn(id).unwrap();
    }
    c.wait_leader(DEADLINE).unwrap();
    let mut client = c.client(DEADLINE);
    assert_eq!(
        client.get("vm0").unwrap(),
        Some(Slot {
            generation: 2,
            holder: None
        })
    );
    for i in 1..20 {
        assert_eq!(
            client.get(&format!("vm{i}")).unwrap(),
            held(&format!("node{i}"), 1)
        );
    }
}

#[test]
fn partitioned_leader_cannot_decide_and_majority_goes_on() {
    let c = cluster(ClusterOptions::default());
    let mut client = c.client(DEADLINE);
    client.test_and_set("before", 1, "a").unwrap();
    let old = c.wait_leader(DEADLINE).unwrap();
    let others: Vec<u64> = c.ids().into_iter().filter(|&id| id != old).collect();
    // Cut the leader off in both directions.
    client.drop_traffic(c.addr(old), others.clone()).unwrap();
    for &id in &others {
        client.drop_traffic(c.addr(id), vec![old]).unwrap();
    }
    // The isolated leader must not decide anything (check-quorum makes it step down).
    let mut isolated = arbiter::ArbiterClient::new(arbiter::ClientConfig {
        cluster_id: c.cluster_id().into(),
        addrs: vec![c.addr(old).into()],
        deadline: Duration::from_secs(3),
        key: c.key().cloned(),
    });
    assert!(isolated.test_and_set("during", 1, "isolated-side").is_err());
    wait_until(
        DEADLINE,
        "isolated leader to step down (check-quorum)",
        || c.status(old).is_some_and(|s| s.role != "Leader"),
    );

    let mut majority = arbiter::ArbiterClient::new(arbiter::ClientConfig {
        cluster_id: c.cluster_id().into(),
        addrs: others.iter().map(|&id| c.addr(id).to_string()).collect(),
        deadline: DEADLINE,
        key: c.key().cloned(),
    });
    assert_eq!(
        majority.test_and_set("during", 1, "majority-side").unwrap(),
        TasOutcome::Won { generation: 1 }
    );

    // Heal; the old leader learns the majority's decision.
    for id in c.ids() {
        client.drop_traffic(c.addr(id), vec![]).unwrap();
    }
    let target = c.status(others[0]).unwrap().commit;
    wait_until(DEADLINE, "old leader to catch up", || {
        c.status(old).is_some_and(|s| s.applied >= target)
    });
    assert_eq!(client.get("during").unwrap(), held("majority-side", 1));
}

#[test]
fn follower_far_behind_catches_up_through_a_snapshot() {
    let opts = ClusterOptions {
        snapshot_every: 50,
        ..Default::default()
    };
    let mut c = cluster(opts);
    let mut client = c.client(DEADLINE);
    let leader = c.wait_leader(DEADLINE).unwrap();
    let lagging = c.ids().into_iter().find(|&id| id != leader).unwrap();
    c.kill(lagging);
    for i in 0..300 {
        client.test_and_set(&format!("vm{i}"), 1, "p").unwrap();
    }
    let leader_status = c.status(c.wait_leader(DEADLINE).unwrap()).unwrap();
    // Snapshots every max(50, table size) entries: near 50, 100, 200 (after the bootstrap one).
    assert!(
        leader_status.snapshot_index >= 150,
        "leader compacted: {leader_status:?}"
    );
    c.spawn(lagging).unwrap();
    wait_until(DEADLINE, "lagging follower to catch up", || {
        c.status(lagging)
            .is_some_and(|s| s.applied >= leader_status.commit)
    });
    assert!(
        c.log_of(lagging)
            .contains("installing snapshot from leader"),
        "{}",
        c.log_of(lagging)
    );
    // With the caught-up node as one of only two live voters, the cluster still serves the table.
    for id in c.ids() {
        if id != lagging {
            c.kill(id);
        }
    }
    let other = c.ids().into_iter().find(|&id| id != lagging).unwrap();
    c.spawn(other).unwrap();
    c.wait_leader(DEADLINE).unwrap();
    assert_eq!(client.get("vm299").unwrap(), held("p", 1));
}

#[test]
fn corrupted_wal_record_is_reported_not_truncated() {
    let mut c = cluster(ClusterOptions::default());
    let mut client = c.client(DEADLINE);
    for i in 0..10 {
        client
            .test_and_set(&format!("corruption-{i}"), 1, "p")
            .unwrap();
    }
    let victim = c.ids()[0];
    wait_until(DEADLINE, "victim to have the entries", || {
        c.status(victim).is_some_and(|s| s.applied >= 11)
    });
    c.kill(victim);
    let wal = c.data_dir(victim).join("wal.log");
    let mut bytes = std::fs::read(&wal).unwrap();
    let needle = b"corruption-5";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("entry in WAL");
    bytes[at] ^= 0x20;
    std::fs::write(&wal, &bytes).unwrap();

    c.spawn(victim).unwrap();
    let status = c
        .wait_exit(victim, DEADLINE)
        .expect("node refuses to start");
    assert!(!status.success());
    let log = c.log_of(victim);
    assert!(
        log.contains("wal.log") && log.contains("corrupt record at byte offset"),
        "log does not name the damage: {log}"
    );
    assert_eq!(
        std::fs::read(&wal).unwrap(),
        bytes,
        "the WAL must be left as found"
    );
    // The two healthy nodes still serve the decision.
    assert_eq!(client.get("corruption-5").unwrap(), held("p", 1));
}
