//! Pre-shared-key authentication on real processes: an authenticated cluster
//! works; clients without the key or with another key are refused and change
//! nothing; a node with another key cannot rejoin or disturb the cluster; a
//! frame that is not sealed with the session's key ends the connection.

mod common;

use std::io::{ErrorKind, Write as _};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use arbiter::auth::{handshake_initiator, read_opened, write_sealed, Key, Session};
use arbiter::channel::ARBITER_LABEL;
use arbiter::frame::{read_frame, write_frame, FrameError, MAX_CLIENT_FRAME};
use arbiter::local_cluster::{ClusterOptions, LocalCluster};
use arbiter::proto::{Hello, HelloReply, Request, Response};
use arbiter::{ArbiterClient, ClientConfig, ClientError, ResetOutcome, Slot, TasOutcome};
use common::{cluster, serve_command, wait_until, KillOnDrop};

const EXE: &str = env!("CARGO_BIN_EXE_twinvm-arbiter");
const DEADLINE: Duration = Duration::from_secs(10);

fn client_with(c: &LocalCluster, key: Option<Key>) -> ArbiterClient {
    ArbiterClient::new(ClientConfig {
        cluster_id: c.cluster_id().into(),
        addrs: c.addrs(),
        deadline: DEADLINE,
        key,
    })
}

/// Runs a client command against `c`; `key_file` None passes no key at all.
fn cli(c: &LocalCluster, args: &[&str], key_file: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(EXE);
    cmd.args(args)
        .arg("--arbiters")
        .arg(c.addrs().join(","))
        .args(["--cluster-id", c.cluster_id(), "--deadline-secs", "5"])
        .env_remove(arbiter::cli::KEY_FILE_ENV);
    if let Some(p) = key_file {
        cmd.arg("--key-file").arg(p);
    }
    let out = cmd.output().expect("run client command");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_key_file(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    Key::generate().save_new(&path).unwrap();
    path
}

fn any_log_contains(c: &LocalCluster, needle: &str) -> bool {
    c.ids().iter().any(|&id| c.log_of(id).contains(needle))
}

#[test]
fn authenticated_cluster_works_and_refuses_clients_without_the_key() {
    let c = cluster(ClusterOptions::default());
    let key_path = c.key_path().expect("test clusters authenticate").to_owned();

    // The authenticated path: test-and-set, reset, get.
    let mut good = c.client(DEADLINE);
    assert_eq!(
        good.test_and_set("vm1", 1, "hostA").unwrap(),
        TasOutcome::Won { generation: 1 }
    );
    assert_eq!(
        good.reset("vm1", 2).unwrap(),
        ResetOutcome::Reset { generation: 2 }
    );
    assert_eq!(
        good.test_and_set("vm1", 2, "hostB").unwrap(),
        TasOutcome::Won { generation: 2 }
    );
    let vm1 = Some(Slot {
        generation: 2,
        holder: Some("hostB".into()),
    });
    assert_eq!(good.get("vm1").unwrap(), vm1);
    let leader = c.wait_leader(DEADLINE).unwrap();
    let before = c.status(leader).unwrap();

    // A library client without a key, and one with another key: refused, quickly, and clearly.
    for (who, key) in [("no key", None), ("wrong key", Some(Key::generate()))] {
        let mut intruder = client_with(&c, key);
        let started = Instant::now();
        for result in [
            intruder.test_and_set("vm1", 3, "intruder").map(|_| ()),
            intruder.reset("vm1", 100).map(|_| ()),
            intruder.test_and_set("fresh-vm", 1, "intruder").map(|_| ()),
            intruder.get("vm1").map(|_| ()),
        ] {
            let err = result.expect_err(who);
            assert!(
                matches!(err, ClientError::AuthRefused { .. }),
                "{who}: {err}"
            );
            assert!(
                err.to_string()
                    .starts_with("the arbiter refused authentication: wrong or missing key"),
                "{who}: {err}"
            );
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{who}: refusal took {:?}, not fail-fast",
            started.elapsed()
        );
    }

    // The same through the CLI: no key, a wrong key, the key in a group-readable file.
    let dir = tempfile::tempdir().unwrap();
    let wrong = write_key_file(dir.path(), "wrong.key");
    let tas = ["tas", "vm2", "--generation", "1", "--requester", "intruder"];
    for key_file in [None, Some(wrong.as_path())] {
        let (code, out, err) = cli(&c, &tas, key_file);
        assert_eq!(code, 2, "{key_file:?}: {out}{err}");
        assert!(
            err.contains("the arbiter refused authentication: wrong or missing key"),
            "{key_file:?}: {err}"
        );
        let (code, _, err) = cli(&c, &["reset", "vm1", "--generation", "50"], key_file);
        assert_eq!(code, 2, "{err}");
    }
    let loose = dir.path().join("loose.key");
    std::fs::copy(&key_path, &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = cli(&c, &tas, Some(&loose));
    assert_eq!(code, 2);
    assert!(
        err.contains("loose.key") && err.contains("chmod 600"),
        "{err}"
    );

    // Servers log who failed and why.
    assert!(
        any_log_contains(&c, "failed authentication: no key"),
        "{}",
        c.log_of(leader)
    );
    assert!(
        any_log_contains(&c, "failed authentication: wrong key or tampered message"),
        "{}",
        c.log_of(leader)
    );

    // Nothing changed: no entry was proposed, the slots are as the key holder left them.
    assert_eq!(c.status(leader).unwrap().last_index, before.last_index);
    assert_eq!(good.get("vm1").unwrap(), vm1);
    assert_eq!(good.get("vm2").unwrap(), None);
    assert_eq!(good.get("fresh-vm").unwrap(), None);

    // The right key through the CLI, once by flag and once by environment variable.
    let (code, out, err) = cli(&c, &["get", "vm1"], Some(&key_path));
    assert_eq!(
        (code, out.trim()),
        (0, "vm1 generation 2 holder hostB"),
        "{err}"
    );
    let out = Command::new(EXE)
        .args(["tas", "vm2", "--generation", "1", "--requester", "hostC"])
        .arg("--arbiters")
        .arg(c.addrs().join(","))
        .args(["--cluster-id", c.cluster_id()])
        .env(arbiter::cli::KEY_FILE_ENV, &key_path)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "won vm2 generation 1",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unauthenticated_mode_still_works_and_warns() {
    let c = cluster(ClusterOptions {
        authenticate: false,
        ..Default::default()
    });
    assert!(c.key_path().is_none());
    let mut open = client_with(&c, None);
    assert_eq!(
        open.test_and_set("vm1", 1, "hostA").unwrap(),
        TasOutcome::Won { generation: 1 }
    );
    assert!(any_log_contains(&c, "the slot table is unprotected"));
    // A client holding a key never trusts a server that cannot prove it holds it.
    let mut careful = client_with(&c, Some(Key::generate()));
    let err = careful.get("vm1").unwrap_err();
    assert!(
        matches!(err, ClientError::ServerUnauthenticated { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("without --key-file"), "{err}");
    assert!(any_log_contains(
        &c,
        "tried to authenticate, but this node runs without --key-file"
    ));
}

#[test]
fn node_with_another_key_cannot_rejoin_or_disturb_the_cluster() {
    let mut c = cluster(ClusterOptions::default());
    let mut client = c.client(DEADLINE);
    client.test_and_set("before", 1, "a").unwrap();
    let leader = c.wait_leader(DEADLINE).unwrap();
    let victim = *c.ids().iter().find(|&&id| id != leader).unwrap();
    c.kill(victim);

    // Restart the victim on its own data dir, but with another key.
    let dir = tempfile::tempdir().unwrap();
    let other_key_path = write_key_file(dir.path(), "other.key");
    let other_key = Key::from_file(&other_key_path).unwrap();
    let log = std::fs::File::create(dir.path().join("intruder.log")).unwrap();
    let mut child = serve_command(
        &c,
        victim,
        c.cluster_id(),
        c.data_dir(victim),
        Some(&other_key_path),
    )
    .stdout(log.try_clone().unwrap())
    .stderr(log)
    .spawn()
    .unwrap();
    let guard = KillOnDrop(&mut child);

    // Its own key answers its status: it is up, and it is left behind.
    let status_of_victim = || {
        ArbiterClient::new(ClientConfig {
            cluster_id: c.cluster_id().into(),
            addrs: vec![c.addr(victim).into()],
            deadline: Duration::from_secs(1),
            key: Some(other_key.clone()),
        })
        .status_of(c.addr(victim))
        .ok()
    };
    wait_until(DEADLINE, "the restarted victim to answer", || {
        status_of_victim().is_some()
    });
    let victim_applied = status_of_victim().unwrap().applied;
    let term = c.status(leader).unwrap().term;

    // The other two keep deciding while the victim keeps trying (elections run every 0.5-1 s).
    let end = Instant::now() + Duration::from_secs(4);
    let mut decided = 0;
    while Instant::now() < end {
        assert_eq!(
            client
                .test_and_set(&format!("during-{decided}"), 1, "a")
                .unwrap(),
            TasOutcome::Won { generation: 1 }
        );
        decided += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let leader_status = c.status(leader).unwrap();
    assert_eq!(leader_status.role, "Leader");
    assert_eq!(
        leader_status.term, term,
        "the intruder disturbed the leader"
    );
    let victim_now = status_of_victim().unwrap();
    assert_eq!(
        victim_now.applied, victim_applied,
        "the node with another key received entries"
    );
    assert!(victim_now.applied < leader_status.commit);
    let intruder_log = std::fs::read_to_string(dir.path().join("intruder.log")).unwrap();
    assert!(
        intruder_log.contains("failed authentication: wrong key or tampered message"),
        "{intruder_log}"
    );
    assert!(any_log_contains(
        &c,
        &format!("peer at {} failed authentication", c.addr(victim))
    ));
    drop(guard);

    // With the cluster's key again it catches up.
    c.spawn(victim).unwrap();
    wait_until(DEADLINE, "the victim to catch up", || {
        c.status(victim)
            .is_some_and(|s| s.applied >= leader_status.commit)
    });
}

/// An authenticated raw connection that has said hello.
fn raw(addr: &str, c: &LocalCluster) -> (TcpStream, Session) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut session = handshake_initiator(&mut s, c.key().unwrap(), ARBITER_LABEL).unwrap();
    let hello = serde_json::to_vec(&Hello::Client {
        cluster_id: c.cluster_id().into(),
    })
    .unwrap();
    write_sealed(&mut s, &mut session.sealer, &hello).unwrap();
    let reply: HelloReply = serde_json::from_slice(
        &read_opened(&mut s, &mut session.opener, MAX_CLIENT_FRAME).unwrap(),
    )
    .unwrap();
    assert!(matches!(reply, HelloReply::Accepted { .. }), "{reply:?}");
    (s, session)
}

/// The server closed the connection (rather than answering or leaving it open until the timeout).
fn assert_closed(s: &mut TcpStream, what: &str) {
    match read_frame(s, u32::MAX) {
        Err(FrameError::Closed) => {}
        Err(FrameError::Io(e))
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) => {}
        other => panic!("{what}: expected the server to close the connection, got {other:?}"),
    }
}

#[test]
fn frames_not_sealed_with_the_session_key_drop_the_connection() {
    let c = cluster(ClusterOptions::default());
    let leader = c.wait_leader(DEADLINE).unwrap();
    let addr = c.addr(leader).to_string();
    let tas = serde_json::to_vec(&Request::TestAndSet {
        client_id: 77,
        seq: 1,
        vm: "forged".into(),
        generation: 1,
        requester: "intruder".into(),
    })
    .unwrap();
    let before = c.status(leader).unwrap();

    // A sealed request is answered; the same request unsealed closes the connection.
    let (mut s, mut session) = raw(&addr, &c);
    write_sealed(
        &mut s,
        &mut session.sealer,
        &serde_json::to_vec(&Request::Status).unwrap(),
    )
    .unwrap();
    let reply: Response = serde_json::from_slice(
        &read_opened(&mut s, &mut session.opener, MAX_CLIENT_FRAME).unwrap(),
    )
    .unwrap();
    assert!(matches!(reply, Response::Status(_)), "{reply:?}");
    write_frame(&mut s, &tas).unwrap();
    assert_closed(&mut s, "unsealed frame");

    // A sealed frame with one byte changed.
    let (mut s, mut session) = raw(&addr, &c);
    let mut sealed = session.sealer.seal(&tas);
    sealed[10] ^= 0x20;
    write_frame(&mut s, &sealed).unwrap();
    assert_closed(&mut s, "tampered frame");

    // A replayed frame: the first copy is answered, the second closes the connection.
    let (mut s, mut session) = raw(&addr, &c);
    let status = session
        .sealer
        .seal(&serde_json::to_vec(&Request::Status).unwrap());
    write_frame(&mut s, &status).unwrap();
    read_opened(&mut s, &mut session.opener, MAX_CLIENT_FRAME).unwrap();
    write_frame(&mut s, &status).unwrap();
    assert_closed(&mut s, "replayed frame");

    // Garbage, of handshake size and not, instead of a handshake.
    for garbage in [vec![0x5a; 32], vec![0xff; 7], vec![0u8; 5000]] {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        write_frame(&mut s, &garbage).unwrap();
        s.flush().unwrap();
        if garbage.len() == 32 {
            // Taken as message 1: answered with message 2; then a bogus message 3.
            let m2 = read_frame(&mut s, 4096).unwrap();
            assert_eq!(m2.len(), 64);
            write_frame(&mut s, &[0u8; 32]).unwrap();
        }
        assert_closed(&mut s, "garbage handshake");
    }

    // None of it was acted on, the node is fine, and the log says why each one ended.
    let mut good = c.client(DEADLINE);
    assert_eq!(good.get("forged").unwrap(), None);
    assert_eq!(c.status(leader).unwrap().last_index, before.last_index);
    let log = c.log_of(leader);
    assert!(
        log.contains("failed authentication: tampered, replayed"),
        "{log}"
    );
    assert!(
        log.contains("malformed handshake message (7 bytes, expected 32)"),
        "{log}"
    );
}

#[test]
fn keygen_writes_a_private_key_file_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("arbiter.key");
    let out = Command::new(EXE)
        .args(["keygen", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.len(), 65, "{text:?}");
    assert!(text.trim_end().chars().all(|ch| ch.is_ascii_hexdigit()));
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    Key::from_file(&path).unwrap();

    let again = Command::new(EXE)
        .args(["keygen", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("arbiter.key: already exists; refusing to overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
}
