//! The etcd engine against a real 3-member etcd cluster (Debian's etcd-server).
//! Skipped, with a message, where etcd is not installed.

use std::time::Duration;

use arbiter::engine::{Engine, LocalEtcd};
use arbiter::{ResetOutcome, Slot, TasOutcome};

#[test]
fn etcd_engine_test_and_set_reset_get_and_leader_loss() {
    if LocalEtcd::binary().is_none() {
        eprintln!("SKIPPED: etcd not installed (apt-get install etcd-server)");
        return;
    }
    let mut etcd = LocalEtcd::start(3).expect("etcd cluster starts");
    let handles: Vec<_> = ["primary", "backup"]
        .into_iter()
        .map(|who| {
            let mut e = etcd.engine(Duration::from_secs(10));
            std::thread::spawn(move || (who, e.test_and_set("vm", 1, who).unwrap()))
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let winners: Vec<_> = results
        .iter()
        .filter(|(_, r)| matches!(r, TasOutcome::Won { .. }))
        .map(|(w, _)| *w)
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let winner = winners[0];

    let mut e = etcd.engine(Duration::from_secs(10));
    assert_eq!(
        e.test_and_set("vm", 1, winner).unwrap(),
        TasOutcome::Won { generation: 1 }
    );
    assert_eq!(
        e.test_and_set("vm", 2, "x").unwrap(),
        TasOutcome::NotArmed { generation: 1 }
    );
    assert_eq!(
        e.reset("vm", 1).unwrap(),
        ResetOutcome::Rejected {
            current_generation: 1
        }
    );
    assert_eq!(
        e.reset("vm", 2).unwrap(),
        ResetOutcome::Reset { generation: 2 }
    );
    assert_eq!(
        e.get("vm").unwrap(),
        Some(Slot {
            generation: 2,
            holder: None
        })
    );
    assert_eq!(
        e.test_and_set("vm", 2, "backup").unwrap(),
        TasOutcome::Won { generation: 2 }
    );
    assert_eq!(
        e.test_and_set("vm", 2, "primary").unwrap(),
        TasOutcome::Held {
            holder: "backup".into(),
            generation: 2
        }
    );

    // The etcd leader dies: the decision stands.
    let leader = etcd.leader().unwrap();
    etcd.kill(leader);
    assert_eq!(
        e.get("vm").unwrap(),
        Some(Slot {
            generation: 2,
            holder: Some("backup".into())
        })
    );
    assert_eq!(e.get("unknown-vm").unwrap(), None);
}
