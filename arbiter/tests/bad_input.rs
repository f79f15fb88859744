//! Malformed, unknown, oversize and foreign input: clear errors, no panic, no state change.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use arbiter::auth::{handshake_initiator, read_opened, write_sealed, Key, Session, TAG_LEN};
use arbiter::channel::ARBITER_LABEL;
use arbiter::frame::MAX_CLIENT_FRAME;
use arbiter::local_cluster::ClusterOptions;
use arbiter::proto::{Hello, HelloReply, Request, Response};
use arbiter::TasOutcome;
use common::{cluster, serve_command, wait_until, KillOnDrop};

/// An authenticated connection that sends whatever bytes the test wants inside sealed frames.
struct RawClient {
    stream: TcpStream,
    session: Session,
}

fn raw_client(addr: &str, cluster_id: &str, key: &Key) -> (RawClient, HelloReply) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let session = handshake_initiator(&mut stream, key, ARBITER_LABEL).unwrap();
    let mut c = RawClient { stream, session };
    let hello = serde_json::to_vec(&Hello::Client {
        cluster_id: cluster_id.into(),
    })
    .unwrap();
    write_sealed(&mut c.stream, &mut c.session.sealer, &hello).unwrap();
    let reply = read_opened(&mut c.stream, &mut c.session.opener, MAX_CLIENT_FRAME).unwrap();
    (c, serde_json::from_slice(&reply).unwrap())
}

fn ask_raw(c: &mut RawClient, payload: &[u8]) -> Response {
    write_sealed(&mut c.stream, &mut c.session.sealer, payload).unwrap();
    c.stream.flush().unwrap();
    let reply = read_opened(&mut c.stream, &mut c.session.opener, MAX_CLIENT_FRAME).unwrap();
    serde_json::from_slice(&reply).unwrap()
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let c = cluster(ClusterOptions {
        allow_fault_injection: false,
        ..Default::default()
    });
    let leader = c.wait_leader(Duration::from_secs(10)).unwrap();
    let addr = c.addr(leader).to_string();
    let before = c.status(leader).unwrap();

    let key = c.key().unwrap().clone();
    let (mut s, reply) = raw_client(&addr, c.cluster_id(), &key);
    assert!(matches!(reply, HelloReply::Accepted { .. }));
    let invalid = |r: Response| match r {
        Response::Invalid { reason } => reason,
        other => panic!("expected Invalid, got {other:?}"),
    };
    let reason = invalid(ask_raw(&mut s, b"{this is not json"));
    assert!(reason.contains("malformed"), "{reason}");
    let reason = invalid(ask_raw(&mut s, br#"{"FormatDisk":{}}"#));
    assert!(reason.contains("unknown variant"), "{reason}");
    let reason = invalid(ask_raw(&mut s, &[0xff, 0x00, 0x13]));
    assert!(reason.contains("malformed"), "{reason}");
    let long_vm = "v".repeat(10_000);
    let req = serde_json::to_vec(&Request::TestAndSet {
        client_id: 1,
        seq: 1,
        vm: long_vm,
        generation: 1,
        requester: "x".into(),
    })
    .unwrap();
    let reason = invalid(ask_raw(&mut s, &req));
    assert!(reason.contains("vm must be"), "{reason}");
    let reason = invalid(ask_raw(
        &mut s,
        &serde_json::to_vec(&Request::DropTraffic { peers: vec![1] }).unwrap(),
    ));
    assert!(reason.contains("disabled"), "{reason}");
    // The connection still works after bad requests.
    assert!(matches!(
        ask_raw(&mut s, &serde_json::to_vec(&Request::Status).unwrap()),
        Response::Status(_)
    ));

    // Oversize frame: refused from the length prefix alone, then the connection is closed.
    s.stream
        .write_all(&(MAX_CLIENT_FRAME + 1 + TAG_LEN as u32).to_le_bytes())
        .unwrap();
    let reply = read_opened(&mut s.stream, &mut s.session.opener, MAX_CLIENT_FRAME).unwrap();
    let reason = invalid(serde_json::from_slice(&reply).unwrap());
    assert!(reason.contains("exceeds the limit"), "{reason}");

    // Wrong cluster id: refused at hello.
    let (_s, reply) = raw_client(&addr, "some-other-cluster", &key);
    match reply {
        HelloReply::Refused { reason } => assert!(reason.contains("wrong cluster id"), "{reason}"),
        other => panic!("expected refusal, got {other:?}"),
    }

    // Nothing was proposed: the log did not grow, and every node is still up.
    let after = c.status(leader).unwrap();
    assert_eq!(after.last_index, before.last_index);
    for id in c.ids() {
        assert!(c.status(id).is_some(), "node {id} died");
    }
    let mut client = c.client(Duration::from_secs(10));
    assert_eq!(
        client.test_and_set("fine", 1, "p").unwrap(),
        TasOutcome::Won { generation: 1 }
    );
}

#[test]
fn node_of_another_cluster_is_refused_and_logged() {
    let mut c = cluster(ClusterOptions::default());
    // Restart node 1 believing it is in another cluster: its data dir must be refused.
    let victim = c.ids()[0];
    c.kill(victim);
    let out = serve_command(&c, victim, "intruder", c.data_dir(victim), c.key_path())
        .output()
        .expect("run server");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("belongs to cluster") && stderr.contains("intruder"),
        "{stderr}"
    );

    // A process of another cluster with a fresh data dir: peers refuse its traffic with a log line.
    let dir = tempfile::tempdir().unwrap();
    let mut intruder = serve_command(
        &c,
        victim,
        "intruder",
        &dir.path().join("data"),
        c.key_path(),
    );
    let log = std::fs::File::create(dir.path().join("out.log")).unwrap();
    let mut child = intruder
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let guard = KillOnDrop(&mut child);
    let other = c.ids()[1];
    wait_until(Duration::from_secs(10), "a peer to log the refusal", || {
        c.log_of(other)
            .contains("refused connection: wrong cluster id")
    });
    drop(guard);
}

#[test]
fn second_process_for_a_running_node_is_refused() {
    let c = cluster(ClusterOptions::default());
    let id = c.ids()[0];
    let out = serve_command(&c, id, c.cluster_id(), c.data_dir(id), c.key_path())
        .output()
        .expect("run server");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("binding"), "{stderr}");
    assert!(
        c.status(id).is_some(),
        "the running node must be unaffected"
    );
}
