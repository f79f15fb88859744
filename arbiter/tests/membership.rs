//! Replacing a failed node: add a new voter, remove the dead one, no downtime.

mod common;

use std::time::Duration;

use arbiter::local_cluster::{free_port_addr, ClusterOptions, LocalCluster};
use arbiter::{Slot, TasOutcome};
use common::{cluster, launcher, wait_until};

#[test]
fn replace_a_failed_node() {
    let mut c = cluster(ClusterOptions {
        snapshot_every: 20,
        ..Default::default()
    });
    let mut client = c.client(Duration::from_secs(10));
    for i in 0..30 {
        client.test_and_set(&format!("vm{i}"), 1, "p").unwrap();
    }
    // Node 3 dies for good.
    let dead = 3;
    c.kill(dead);

    // A new node 4 joins empty and is brought up to date (through a snapshot: the log was compacted).
    let addr = c.prepare_joining_node(4).unwrap();
    c.spawn(4).unwrap();
    let voters = client.add_node(4, &addr).unwrap();
    assert_eq!(voters, vec![1, 2, 3, 4]);
    let voters = client
        .remove_node(dead)
        .unwrap_or_else(|e| panic!("{e}\nnode 4 log:\n{}", c.log_of(4)));
    assert_eq!(voters, vec![1, 2, 4]);
    c.forget(dead);
    assert!(
        c.ids()
            .iter()
            .any(|&id| c.log_of(id).contains("learner caught up")),
        "node 4 was not added as a learner first"
    );

    let leader = c.wait_leader(Duration::from_secs(10)).unwrap();
    let commit = c.status(leader).unwrap().commit;
    wait_until(Duration::from_secs(10), "new node to catch up", || {
        c.status(4)
            .is_some_and(|s| s.applied >= commit && s.voters == vec![1, 2, 4])
    });

    // Quorum now needs node 4: with one of the old nodes down, decisions still happen.
    let old = if leader == 1 { 2 } else { 1 };
    c.kill(old);
    let mut client = c.client(Duration::from_secs(15));
    assert_eq!(
        client.test_and_set("after", 1, "b").unwrap(),
        TasOutcome::Won { generation: 1 }
    );
    assert_eq!(
        client.get("vm7").unwrap(),
        Some(Slot {
            generation: 1,
            holder: Some("p".into())
        })
    );
    // Node 4 survives a restart with its new membership.
    c.kill(4);
    c.spawn(4).unwrap();
    wait_until(Duration::from_secs(10), "node 4 back", || {
        c.status(4).is_some_and(|s| s.voters == vec![1, 2, 4])
    });
    assert!(client.get("after").unwrap().is_some());
}

#[test]
fn removing_the_leader_hands_over_to_the_rest() {
    let mut c = cluster(ClusterOptions::default());
    let mut client = c.client(Duration::from_secs(10));
    client.test_and_set("before", 1, "p").unwrap();
    let leader = c.wait_leader(Duration::from_secs(10)).unwrap();
    let voters = client.remove_node(leader).unwrap();
    assert_eq!(voters.len(), 2);
    assert!(!voters.contains(&leader));
    c.forget(leader);
    let new_leader = c.wait_leader(Duration::from_secs(10)).unwrap();
    assert_ne!(new_leader, leader);
    let mut client = c.client(Duration::from_secs(10));
    assert_eq!(
        client.test_and_set("after", 1, "q").unwrap(),
        TasOutcome::Won { generation: 1 }
    );
    assert_eq!(
        client.get("before").unwrap(),
        Some(Slot {
            generation: 1,
            holder: Some("p".into())
        })
    );
}

/// A node that cannot bind its port stops; starting the cluster says which
/// and why, rather than letting the other two lead without it (a cluster on
/// free ports is then started again on new ones: `LocalCluster::start`).
#[test]
fn a_node_that_cannot_bind_its_port_fails_the_start_by_name() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let opts = ClusterOptions {
        listen_addrs: vec![
            free_port_addr().unwrap(),
            taken_addr.clone(),
            free_port_addr().unwrap(),
        ],
        ..Default::default()
    };
    let err = match LocalCluster::start(launcher(), opts) {
        Ok(_) => panic!("a cluster started with node 2's port taken"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(&format!(
            "node 2 ({taken_addr}) stopped while the cluster started"
        )) && err.contains("binding"),
        "{err}"
    );
    drop(taken);
}
