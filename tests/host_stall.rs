//! A host that stalls is not a host that failed: the counter guest's FT
//! pair in the local drill's namespaces has both its processes frozen
//! (SIGSTOP, then SIGCONT: what an overloaded or overcommitted host does to
//! them, only longer) for twice the peer timeout, and must go on as a pair:
//! nobody asks the arbiter, both sides still replicate, the client is
//! answered again. A side that freezes alone is still suspected (a frozen
//! backup is, by its primary, which goes on alone): the stall credit only
//! covers the judging side's own lateness. Needs root and /dev/kvm.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use twinvm::ft::drill::client::Client;
use twinvm::ft::drill::local::{LocalOptions, LocalPair};
use twinvm::ft::drill::topology::Host;
use twinvm::ft::node::{query_status, PairStatus};

const TIMEOUT: Duration = Duration::from_secs(120);
/// Twice the default peer timeout (200 ms).
const FREEZE: Duration = Duration::from_millis(400);

fn exe() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_twinvm").into()
}

/// The side's status; if it has none, its stderr says why.
fn status(lp: &mut LocalPair, host: Host) -> PairStatus {
    query_status(&lp.control(host)).unwrap_or_else(|e| {
        let stderr: Vec<String> = ["primary", "backup"]
            .iter()
            .filter_map(|role| {
                lp.side(role)
                    .map(|p| format!("{role}:\n{}", p.stderr_text()))
            })
            .collect();
        panic!("no status from {host:?}: {e}\n{}", stderr.join("\n"))
    })
}

/// `kill -SIG pid...`, all at once.
fn signal(sig: &str, pids: &[u32]) {
    let out = Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids.iter().map(u32::to_string))
        .output()
        .expect("running kill");
    assert!(out.status.success(), "kill -{sig} {pids:?}: {out:?}");
}

fn start(prefix: &str) -> (LocalPair, Client) {
    let mut opts = LocalOptions::new(exe());
    opts.prefix = prefix.into();
    common::counter_pair_with_client(&opts, TIMEOUT)
}

fn wait_answers(client: &Client, more_than: u64) {
    let end = Instant::now() + Duration::from_secs(30);
    while client.answered() <= more_than {
        assert!(
            Instant::now() < end,
            "the client got no answer past {more_than}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_pair_whose_host_freezes_past_the_peer_timeout_goes_on_as_a_pair() {
    let (mut lp, client) = start("tvstall");
    wait_answers(&client, 100);
    let pids: Vec<u32> = ["primary", "backup"]
        .iter()
        .map(|role| lp.side(role).expect("a side").pid())
        .collect();
    for round in 0..3 {
        let before = client.answered();
        signal("STOP", &pids);
        std::thread::sleep(FREEZE);
        signal("CONT", &pids);
        wait_answers(&client, before + 100);
        std::thread::sleep(Duration::from_secs(1));
        let (p, b) = (status(&mut lp, Host::A), status(&mut lp, Host::B));
        assert_eq!(
            (p.state.as_str(), b.state.as_str()),
            ("replicating", "following"),
            "round {round}: a frozen host must not fail its pair over\nprimary: {p:?}\nbackup: {b:?}"
        );
        assert!(p.peer_connected && b.peer_connected, "round {round}");
    }
    assert_eq!(
        lp.arbiter_holder().expect("reading the arbiter"),
        None,
        "nobody asked the arbiter"
    );

    // The backup alone freezes: to its primary that is a lost backup.
    let backup = pids[1];
    signal("STOP", &[backup]);
    let end = Instant::now() + TIMEOUT;
    while status(&mut lp, Host::A).state != "alone" {
        assert!(Instant::now() < end, "the primary never went on alone");
        std::thread::sleep(Duration::from_millis(50));
    }
    signal("CONT", &[backup]);
    let before = client.answered();
    wait_answers(&client, before + 100);
    lp.stop(Duration::from_secs(2));
}
