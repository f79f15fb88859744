//! The `twinvm-arbiter` commands as an operator runs them: selftest, client
//! commands and their exit codes, the no-quorum error, and a torn WAL tail.

mod common;

use std::process::Command;
use std::time::Duration;

use arbiter::local_cluster::ClusterOptions;
use common::{cluster, wait_until};

const EXE: &str = env!("CARGO_BIN_EXE_twinvm-arbiter");

#[test]
fn selftest_passes_with_a_one_line_verdict() {
    let out = Command::new(EXE)
        .arg("selftest")
        .output()
        .expect("run selftest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("selftest PASS"), "{stdout}");
}

fn client_cmd(c: &arbiter::local_cluster::LocalCluster, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(EXE)
        .args(args)
        .arg("--arbiters")
        .arg(c.addrs().join(","))
        .args(["--cluster-id", c.cluster_id(), "--deadline-secs", "2"])
        .arg("--key-file")
        .arg(c.key_path().expect("test clusters authenticate"))
        .output()
        .expect("run client command");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn client_commands_exit_codes_and_no_quorum_error() {
    let mut c = cluster(ClusterOptions::default());
    let (code, out, _) = client_cmd(
        &c,
        &["tas", "vm9", "--generation", "1", "--requester", "hostA"],
    );
    assert_eq!((code, out.trim()), (0, "won vm9 generation 1"));
    let (code, out, _) = client_cmd(
        &c,
        &["tas", "vm9", "--generation", "1", "--requester", "hostB"],
    );
    assert_eq!((code, out.trim()), (1, "held vm9 generation 1 by hostA"));
    let (code, out, _) = client_cmd(&c, &["get", "vm9"]);
    assert_eq!((code, out.trim()), (0, "vm9 generation 1 holder hostA"));
    let (code, _, _) = client_cmd(&c, &["reset", "vm9", "--generation", "1"]);
    assert_eq!(code, 1);
    let (code, out, _) = client_cmd(&c, &["reset", "vm9", "--generation", "2"]);
    assert_eq!((code, out.trim()), (0, "reset vm9 to generation 2"));
    let (code, out, _) = client_cmd(&c, &["status"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.lines().filter(|l| l.contains(" Leader ")).count(),
        1,
        "{out}"
    );

    // Two of three nodes down: no quorum, a clear error within the deadline, exit 2.
    let ids = c.ids();
    c.kill(ids[0]);
    c.kill(ids[1]);
    let started = std::time::Instant::now();
    let (code, _, err) = client_cmd(
        &c,
        &["tas", "vm10", "--generation", "1", "--requester", "hostA"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("no quorum within 2s"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn torn_wal_tail_is_dropped_and_the_node_rejoins() {
    let mut c = cluster(ClusterOptions::default());
    let mut client = c.client(Duration::from_secs(10));
    for i in 0..5 {
        client.test_and_set(&format!("vm{i}"), 1, "p").unwrap();
    }
    let victim = c.ids()[2];
    wait_until(Duration::from_secs(10), "victim to apply", || {
        c.status(victim).is_some_and(|s| s.applied >= 6)
    });
    c.kill(victim);
    // A crash in the middle of appending: half of a record at the end of the log.
    let wal = c.data_dir(victim).join("wal.log");
    let mut bytes = std::fs::read(&wal).unwrap();
    let good_len = bytes.len();
    let half_record = bytes[good_len - 20..].to_vec();
    bytes.extend_from_slice(&half_record[..10]);
    std::fs::write(&wal, &bytes).unwrap();

    c.spawn(victim).unwrap();
    client.test_and_set("after", 1, "p").unwrap();
    let leader_commit = c
        .status(c.wait_leader(Duration::from_secs(10)).unwrap())
        .unwrap()
        .commit;
    wait_until(Duration::from_secs(10), "victim to catch up", || {
        c.status(victim).is_some_and(|s| s.applied >= leader_commit)
    });
    assert!(
        c.log_of(victim).contains("dropping torn tail"),
        "{}",
        c.log_of(victim)
    );
}
