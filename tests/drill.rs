//! Failover drills against real namespaces, processes and KVM guests.
//! Needs root and /dev/kvm.
//!
//! What runs by default exercises the drill's own machinery against what
//! exists without the pair: the topology, the arbiter in it, stale cleanup,
//! an unprotected guest (`twinvm run`) whose kill the verdict must fail, and
//! teardown on SIGINT. The drills of the FT pair (`twinvm primary/backup`)
//! run once each (`TWINVM_DRILL_REPEAT=N` for more; CI uses 5), and an
//! opt-in soak runs each 20 times (`TWINVM_DRILL_SOAK=N` to change).

mod common;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use arbiter::client::{ArbiterClient, ClientConfig};
use arbiter::TasOutcome;
use twinvm::ft::drill::local::{self, guest_target, start_arbiter, LocalPair};
use twinvm::ft::drill::report::RepeatSummary;
use twinvm::ft::drill::topology::{self, addr, Host, Topology};
use twinvm::ft::drill::{
    run_existing, run_local, DrillKind, DrillReport, ExistingOptions, LocalOptions, Phases,
    Protection,
};
use twinvm::net::icmp_ping;

const PING_WAIT: Duration = Duration::from_secs(2);

/// Held by tests whose `twinvm drill` processes use the default namespace
/// prefix: each drill removes the leftovers of dead drills with that prefix
/// as it starts, which would race with a test that inspects them.
static DEFAULT_PREFIX_DRILLS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn default_prefix_lock() -> std::sync::MutexGuard<'static, ()> {
    DEFAULT_PREFIX_DRILLS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_twinvm"))
}

/// Names in `ip netns list` starting with `prefix`.
fn namespaces_with(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

fn pids_in(ns: &str) -> Vec<u32> {
    twinvm::net::netns::pids_in(ns).unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    // A zombie is as good as gone: its parent just has not reaped it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ping `dst` from `ns`, a few tries (the first may wait for ARP).
fn reaches(ns: &twinvm::net::NetNs, dst: Ipv4Addr) -> bool {
    ns.enter_on_thread(|| {
        (1..=3).any(|seq| icmp_ping(dst, 0x7d, seq, PING_WAIT).unwrap().is_some())
    })
    .unwrap()
}

#[test]
fn the_topology_comes_up_connected_and_goes_away() {
    const PREFIX: &str = "tvdtopo";
    topology::cleanup_stale(PREFIX).unwrap();
    let topo = Topology::build(PREFIX).unwrap();
    let names = namespaces_with(&format!("{PREFIX}-{}-", std::process::id()));
    assert_eq!(names.len(), 5, "{names:?}");

    // The LAN: the client reaches both hosts and every arbiter address;
    // the hosts reach each other and the arbiter.
    for dst in [addr::HOST_A, addr::HOST_B] {
        assert!(reaches(&topo.client, dst), "client -> {dst}");
    }
    for dst in addr::ARBITERS {
        assert!(reaches(&topo.client, dst), "client -> {dst}");
        assert!(reaches(&topo.host_a, dst), "hostA -> {dst}");
        assert!(reaches(&topo.host_b, dst), "hostB -> {dst}");
    }
    // The logging link joins the hosts directly.
    assert!(reaches(&topo.host_a, addr::FT_B));
    assert!(reaches(&topo.host_b, addr::FT_A));
    // The TAPs are bridged with each host's LAN port.
    for host in [Host::A, Host::B] {
        let out = topo
            .host(host)
            .run(&["ip", "-o", "link", "show", "master", topology::BRIDGE])
            .unwrap();
        let ports = String::from_utf8_lossy(&out.stdout);
        assert!(ports.contains("tap0") && ports.contains("lan0"), "{ports}");
    }

    // A partition: the logging link is down, the LAN is not.
    topo.cut_logging_link().unwrap();
    let cut = topo
        .host_a
        .enter_on_thread(|| icmp_ping(addr::FT_B, 0x7d, 9, Duration::from_millis(300)))
        .unwrap();
    assert!(
        !matches!(cut, Ok(Some(_))),
        "the logging link still carries traffic"
    );
    assert!(reaches(&topo.host_a, addr::HOST_B));
    assert!(reaches(&topo.host_b, addr::ARBITERS[0]));

    // A process the drill did not start itself (a grandchild, say) is
    // killed with the namespaces, not left running in an unnamed one.
    let mut stray = topo.host_b.command("sleep").arg("600").spawn().unwrap();
    let host_b = topo.host_b.name().to_owned();
    wait_for(
        "the stray process inside hostB",
        Duration::from_secs(5),
        || !pids_in(&host_b).is_empty(),
    );

    drop(topo);
    let end = Instant::now() + Duration::from_secs(5);
    while stray.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < end,
            "the stray process survived the teardown"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        namespaces_with(&format!("{PREFIX}-{}-", std::process::id())),
        Vec::<String>::new()
    );
}

#[test]
fn the_arbiter_runs_on_the_lan_and_survives_its_leader() {
    const PREFIX: &str = "tvdarb";
    topology::cleanup_stale(PREFIX).unwrap();
    let topo = Topology::build(PREFIX).unwrap();
    let mut cluster = start_arbiter(&topo, &exe()).unwrap();
    let key = cluster.key().cloned();
    assert!(key.is_some(), "the drill's arbiter authenticates");
    let from = |ns: &twinvm::net::NetNs, requester: &'static str| {
        let key = key.clone();
        ns.enter_on_thread(move || {
            ArbiterClient::new(ClientConfig {
                cluster_id: "twinvm".into(),
                addrs: Topology::arbiter_addrs(),
                deadline: Duration::from_secs(10),
                key,
            })
            .test_and_set("vm", 1, requester)
        })
        .unwrap()
        .unwrap()
    };
    // Both hosts reach it over the LAN; the first to ask wins.
    assert_eq!(
        from(&topo.host_a, "hostA"),
        TasOutcome::Won { generation: 1 }
    );
    assert_eq!(
        from(&topo.host_b, "hostB"),
        TasOutcome::Held {
            holder: "hostA".into(),
            generation: 1
        }
    );
    // With the leader killed, 2 of 3 still decide (and remember).
    let leader = topo
        .arb
        .enter_on_thread(|| cluster.wait_leader(Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    cluster.kill(leader);
    assert_eq!(
        from(&topo.host_b, "hostB"),
        TasOutcome::Held {
            holder: "hostA".into(),
            generation: 1
        }
    );
    let new_leader = topo
        .arb
        .enter_on_thread(|| cluster.wait_leader(Duration::from_secs(10)))
        .unwrap()
        .unwrap();
    assert_ne!(new_leader, leader);
}

#[test]
fn stale_drill_namespaces_are_removed_with_their_processes() {
    const PREFIX: &str = "tvdstale";
    // A drill that was SIGKILLed: its PID is gone, its namespace and a
    // process inside it are not.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let name = format!("{PREFIX}-{dead_pid}-0");
    assert!(Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap()
        .success());
    let mut orphan = Command::new("ip")
        .args(["netns", "exec", &name, "sleep", "600"])
        .spawn()
        .unwrap();
    wait_for(
        "the process inside the namespace",
        Duration::from_secs(5),
        || !pids_in(&name).is_empty(),
    );

    let removed = topology::cleanup_stale(PREFIX).unwrap();
    assert_eq!(removed, std::slice::from_ref(&name));
    assert!(namespaces_with(&name).is_empty());
    let end = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = orphan.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "the orphan was not killed");
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

/// Short phases for an unprotected drill (its outcome is known: nothing recovers).
fn unprotected_options(prefix: &str) -> LocalOptions {
    let mut o = LocalOptions::new(exe());
    o.protection = Protection::Unprotected;
    o.prefix = prefix.into();
    o.phases = Phases {
        warmup: Duration::from_millis(1500),
        recovery_timeout: Duration::from_secs(2),
        drain: Duration::from_millis(300),
        ..Phases::default()
    };
    o
}

#[test]
fn an_unprotected_guest_killed_fails_the_drill() {
    const PREFIX: &str = "tvdunprot";
    let report = run_local(
        DrillKind::KillPrimary,
        &unprotected_options(PREFIX),
        &AtomicBool::new(false),
    )
    .unwrap();
    let text = report.to_text();
    let a = &report.analysis;
    // The client got answers from the guest across both bridges before the fault...
    assert!(a.answered >= 100, "{text}");
    assert!(a.last_reply_before_fault.is_some(), "{text}");
    assert_eq!((a.backwards, a.repeated), (0, 0), "{text}");
    // ...and nothing after: the verdict fails on exactly what was lost.
    assert!(!report.passed(), "{text}");
    assert!(a.lost >= 1, "{text}");
    // (Replies already on their way when it was killed may still arrive;
    // nothing asked after the kill is answered.)
    assert_eq!(a.answered_sent_after_fault, 0, "{text}");
    let failed: Vec<_> = report
        .verdict
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name)
        .collect();
    assert_eq!(
        failed,
        ["requests lost", "service resumed", "who went live"],
        "{text}"
    );
    assert!(text.contains("went live: nobody"), "{text}");
    assert!(
        report.fault.contains("SIGKILL of the unprotected on hostA"),
        "{text}"
    );
    // Its process log is in the failed report; the network is gone.
    assert_eq!(report.logs.len(), 1, "{text}");
    assert!(namespaces_with(&format!("{PREFIX}-{}-", std::process::id())).is_empty());
}

#[test]
fn the_cli_reports_an_unprotected_drill_as_json_and_fails() {
    let _serial = default_prefix_lock();
    let out = common::run_to_end(
        &[
            "drill",
            "kill-primary",
            "--local",
            "--unprotected",
            "--json",
            "--warmup-ms",
            "1000",
            "--recovery-timeout-s",
            "1",
            "--drain-ms",
            "200",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).expect(&out.stdout);
    let run = &doc["runs"][0];
    assert_eq!(run["drill"], "kill-primary");
    assert_eq!(run["protection"], "unprotected");
    assert_eq!(run["verdict"]["passed"], false);
    assert!(run["analysis"]["lost"].as_u64().unwrap() >= 1);
    assert_eq!(doc["summary"]["runs"], 1);
    assert_eq!(doc["summary"]["passed"], 0);
}

#[test]
fn the_cli_refuses_what_it_cannot_drill() {
    // Partition needs --local (the drill must own the logging link).
    let out = common::run_to_end(
        &[
            "drill",
            "partition",
            "--primary-control",
            "/nonexistent/a.sock",
            "--backup-control",
            "/nonexistent/b.sock",
            "--target",
            "10.77.0.2:7777",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr.contains("partition needs --local"),
        "{}",
        out.stderr
    );
    // A control socket that is not there.
    let out = common::run_to_end(
        &[
            "drill",
            "kill-primary",
            "--primary-control",
            "/nonexistent/a.sock",
            "--backup-control",
            "/nonexistent/b.sock",
            "--target",
            "10.77.0.2:7777",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr
            .contains("connecting to the control socket /nonexistent/a.sock"),
        "{}",
        out.stderr
    );
    // Only kill-primary makes sense without a backup.
    let out = common::run_to_end(
        &["drill", "kill-backup", "--local", "--unprotected"],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("use kill-primary"), "{}", out.stderr);
    // Without --local, the pair must be named.
    let out = common::run_to_end(&["drill", "kill-primary"], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("--primary-control"), "{}", out.stderr);
}

/// Start `twinvm drill kill-primary --local --unprotected` with a long
/// warm-up and wait until its guest runs; returns the drill and the guest's PID.
fn drill_with_a_running_guest() -> (common::Running, u32) {
    let drill = common::Running::spawn(&[
        "drill",
        "kill-primary",
        "--local",
        "--unprotected",
        "--warmup-ms",
        "120000",
    ]);
    let prefix = format!("tvd-{}-", drill.pid());
    let mut guest = None;
    // The `twinvm run` in hostA (not an `ip -n` of the topology's set-up,
    // which also shows in a namespace while it runs).
    let is_guest = |pid: &u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|&b| b == 0).any(|w| w == b"--kernel"))
    };
    wait_for("the drill's guest running", Duration::from_secs(60), || {
        guest = namespaces_with(&prefix)
            .iter()
            .flat_map(|ns| pids_in(ns))
            .find(is_guest);
        guest.is_some()
    });
    (drill, guest.unwrap())
}

#[test]
fn sigint_tears_a_local_drill_down() {
    let _serial = default_prefix_lock();
    let (drill, guest) = drill_with_a_running_guest();
    let pid = drill.pid();
    let prefix = format!("tvd-{pid}-");
    // SAFETY: kill(2) takes no pointers; the PID is our running child's.
    unsafe { libc::kill(drill.pid() as libc::pid_t, libc::SIGINT) };
    let out = drill.finish(Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(130), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("interrupted"), "{}", out.stderr);
    assert!(namespaces_with(&prefix).is_empty());
    assert!(
        drill_dirs_of(pid).is_empty(),
        "its temporary directory is gone"
    );
    wait_for("the guest's process gone", Duration::from_secs(5), || {
        !alive(guest)
    });
}

#[test]
fn a_killed_drill_is_cleaned_up_by_the_next() {
    let _serial = default_prefix_lock();
    let (drill, guest) = drill_with_a_running_guest();
    let pid = drill.pid();
    let prefix = format!("tvd-{pid}-");
    drop(drill); // SIGKILL: no teardown
    assert_eq!(namespaces_with(&prefix).len(), 5);
    assert!(alive(guest), "the orphaned guest still runs");
    let dirs = drill_dirs_of(pid);
    assert_eq!(dirs.len(), 1, "{dirs:?}");

    let removed = local::cleanup_stale(local::DEFAULT_PREFIX).unwrap();
    assert_eq!(
        removed.iter().filter(|n| n.starts_with(&prefix)).count(),
        5,
        "{removed:?}"
    );
    assert!(namespaces_with(&prefix).is_empty());
    assert!(
        drill_dirs_of(pid).is_empty(),
        "its temporary directory is gone"
    );
    wait_for("the orphaned guest killed", Duration::from_secs(5), || {
        !alive(guest)
    });
}

/// The temporary directories of the drill process `pid`.
fn drill_dirs_of(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("twinvm-drill-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .collect()
}

// ---- The FT pair's drills ----

fn repeats(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Most extra runs `drill_pair` makes for runs whose pair failed over by
/// itself before the fault (an overloaded host can starve a side past its
/// peer timeout).
const INCONCLUSIVE_RERUNS: usize = 3;

/// Run `kind` `n` times on a fresh local pair each; every run must pass.
/// A run whose pair failed over by itself before the fault tested another
/// failure than the drill's: it must still have been safe (no split-brain,
/// the counter never backwards or repeated, and nothing lost when the fault
/// was not injected at all), and is run again, at most
/// `INCONCLUSIVE_RERUNS` times in all.
fn drill_pair(kind: DrillKind, n: usize) -> Vec<DrillReport> {
    let mut o = LocalOptions::new(exe());
    o.prefix = format!("tvd{}", kind.name().replace('-', ""));
    o.prefix.truncate(12);
    let mut reports = Vec::new();
    let mut inconclusive = Vec::new();
    while reports.len() < n {
        let r = run_local(kind, &o, &AtomicBool::new(false)).unwrap();
        match &r.verdict.pre_fault_failover {
            Some(early) => {
                assert!(r.verdict.safe(), "{}", r.to_text());
                if !early.fault_injected {
                    assert_eq!(r.analysis.lost, 0, "{}", r.to_text());
                }
                eprint!("{}", r.to_text());
                inconclusive.push(r);
                assert!(
                    inconclusive.len() <= INCONCLUSIVE_RERUNS,
                    "{} runs of {kind} failed over by themselves before the fault",
                    inconclusive.len()
                );
            }
            None => {
                assert!(r.passed(), "{}", r.to_text());
                assert_eq!(r.analysis.lost, 0);
                reports.push(r);
            }
        }
    }
    let all: Vec<DrillReport> = reports.iter().chain(&inconclusive).cloned().collect();
    eprint!("{}", RepeatSummary::of(kind, &all).to_text());
    reports
}

#[test]
fn kill_primary_drill() {
    let reports = drill_pair(DrillKind::KillPrimary, repeats("TWINVM_DRILL_REPEAT", 5));
    for r in reports {
        assert_eq!(r.verdict.went_live.as_deref(), Some("hostB"));
    }
}

#[test]
fn kill_backup_drill() {
    let reports = drill_pair(DrillKind::KillBackup, repeats("TWINVM_DRILL_REPEAT", 5));
    for r in reports {
        assert_eq!(r.verdict.went_live.as_deref(), Some("hostA"));
    }
}

#[test]
fn partition_drill() {
    for r in drill_pair(DrillKind::Partition, repeats("TWINVM_DRILL_REPEAT", 5)) {
        // Exactly one side goes on; the other stopped on losing the arbitration.
        let losers: Vec<_> = r.pair.sides.iter().filter(|s| !s.serving()).collect();
        assert_eq!(losers.len(), 1, "{}", r.to_text());
        assert_eq!(losers[0].exit_code, Some(3), "{}", r.to_text());
    }
}

#[test]
fn arbiter_leader_drill() {
    let reports = drill_pair(DrillKind::ArbiterLeader, repeats("TWINVM_DRILL_REPEAT", 5));
    for r in reports {
        assert_eq!(r.verdict.went_live.as_deref(), Some("hostB"));
    }
}

#[test]
fn double_failure_drill() {
    // Kill the primary, clone the live backup to a new backup, kill the
    // survivor: the clone serves, nothing lost (issue 13).
    let reports = drill_pair(DrillKind::DoubleFailure, repeats("TWINVM_DRILL_REPEAT", 1));
    for r in reports {
        assert_eq!(
            r.verdict.went_live.as_deref(),
            Some("hostC"),
            "{}",
            r.to_text()
        );
        assert!(r.fault.contains("clone of the live backup"), "{}", r.fault);
    }
}

#[test]
fn kill_primary_against_an_existing_pair() {
    // A pair started by the library's local set-up, drilled through its
    // control sockets as an operator would.
    let mut o = LocalOptions::new(exe());
    o.prefix = "tvdexist".into();
    let interrupted = AtomicBool::new(false);
    let lp = LocalPair::start(&o, &interrupted).unwrap();
    let existing = ExistingOptions {
        primary_control: lp.control(Host::A),
        backup_control: lp.control(Host::B),
        target: guest_target(),
        bind: "0.0.0.0:0".parse().unwrap(),
        arbiters: Topology::arbiter_addrs(),
        arbiter_key_file: lp.key_file().map(PathBuf::from),
        arbiter_cluster_id: "twinvm".into(),
        interval: o.interval,
        retry_after: o.retry_after,
        window: o.window,
        phases: o.phases,
        limits: o.limits,
    };
    let report = lp
        .topo
        .client
        .enter_on_thread(|| run_existing(DrillKind::KillPrimary, &existing, &interrupted))
        .unwrap()
        .unwrap();
    assert!(report.passed(), "{}", report.to_text());
    assert_eq!(report.verdict.went_live.as_deref(), Some("hostB"));
}

#[test]
#[ignore = "soak: 20 runs of each pair drill (TWINVM_DRILL_SOAK=N to change); needs the pair CLI"]
fn soak_every_drill() {
    let n = repeats("TWINVM_DRILL_SOAK", 20);
    for kind in [
        DrillKind::KillPrimary,
        DrillKind::KillBackup,
        DrillKind::Partition,
        DrillKind::ArbiterLeader,
        DrillKind::DoubleFailure,
    ] {
        drill_pair(kind, n);
    }
}
