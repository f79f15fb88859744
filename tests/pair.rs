//! `twinvm primary` and `twinvm backup` as real processes in a network
//! namespace with a real 3-node arbiter: strangers and a primary running
//! another guest are refused (the backup keeps waiting), a pair whose guest
//! powers off ends together with identical consoles (also with a tick
//! deferral, its ticks caught up through interrupt windows), a backup whose replay
//! diverges stops while the primary goes on alone, an idle pair's lag,
//! `twinvm status` and a
//! `--config` file. The failover drills (tests/drill.rs) cover the faults.
//! Needs root and /dev/kvm.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Finished, Running, TempDir};
use twinvm::net::netns::cleanup_stale;
use twinvm::net::NetNs;

const PREFIX: &str = "twinvm-pairtest";
const TIMEOUT: Duration = Duration::from_secs(120);
const ARBITERS: &str = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103";
const BACKUP_ADDR: &str = "127.0.0.1:7200";

/// A namespace with a 3-node arbiter on its loopback and a key shared by
/// every connection; the arbiter processes end with it.
struct Site {
    dir: TempDir,
    ns: NetNs,
    arbiters: Vec<Running>,
}

impl Site {
    fn new(tag: &str) -> Site {
        cleanup_stale(PREFIX).expect("cleaning up namespaces of earlier runs");
        let ns = NetNs::create(PREFIX).expect("creating a network namespace (needs root)");
        let dir = TempDir::new(tag);
        let key = dir.0.join("pair.key");
        let out = Command::new(env!("CARGO_BIN_EXE_twinvm"))
            .args(["arbiter", "keygen", "--out"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let mut site = Site {
            dir,
            ns,
            arbiters: Vec::new(),
        };
        for id in 1..=3 {
            let data = site.dir.0.join(format!("arb{id}"));
            let args = vec![
                "arbiter".to_string(),
                "serve".into(),
                "--id".into(),
                id.to_string(),
                "--peers".into(),
                "1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103".into(),
                "--data-dir".into(),
                data.to_str().unwrap().into(),
                "--key-file".into(),
                site.key(),
            ];
            site.arbiters.push(site.spawn(&args));
        }
        site.wait_for_arbiter();
        site
    }

    fn key(&self) -> String {
        self.dir.0.join("pair.key").to_str().unwrap().to_string()
    }

    fn path(&self, name: &str) -> String {
        self.dir.0.join(name).to_str().unwrap().to_string()
    }

    fn spawn(&self, args: &[String]) -> Running {
        let mut cmd = self.ns.command(env!("CARGO_BIN_EXE_twinvm"));
        cmd.args(args);
        Running::spawn_command(cmd)
    }

    /// Until the arbiter answers a read (it has a leader).
    fn wait_for_arbiter(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self
                .ns
                .command(env!("CARGO_BIN_EXE_twinvm"))
                .args([
                    "arbiter",
                    "get",
                    "nobody",
                    "--cluster-id",
                    "twinvm",
                    "--key-file",
                    &self.key(),
                    "--arbiters",
                    ARBITERS,
                    "--deadline-secs",
                    "1",
                ])
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the arbiter never answered: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The flags every replica of VM `vm` shares.
    fn pair_flags(&self, vm: &str, role: &str, guest: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "--vm",
            vm,
            "--generation",
            "1",
            "--key-file",
            &self.key(),
            "--arbiter",
            ARBITERS,
            "--node",
            role,
            "--control",
            &self.path(&format!("{vm}-{role}.sock")),
            "--serial",
            &self.path(&format!("{vm}-{role}.console")),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(guest.iter().map(|s| s.to_string()));
        args
    }

    fn backup(&self, vm: &str, guest: &[&str]) -> Running {
        self.backup_under(&[], vm, guest, &[])
    }

    /// A backup started through `wrapper` (a command and its arguments
    /// that then run twinvm: `nice`, `taskset`), with `extra` flags.
    fn backup_under(&self, wrapper: &[&str], vm: &str, guest: &[&str], extra: &[&str]) -> Running {
        let mut args = vec!["backup".to_string(), "--listen".into(), BACKUP_ADDR.into()];
        args.extend(self.pair_flags(vm, "backup", guest));
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut backup = self.spawn_under(wrapper, &args);
        backup.wait_for_stderr("waiting for the primary", TIMEOUT);
        backup
    }

    fn spawn_under(&self, wrapper: &[&str], args: &[String]) -> Running {
        let Some((program, rest)) = wrapper.split_first() else {
            return self.spawn(args);
        };
        let mut cmd = self.ns.command(program);
        cmd.args(rest).arg(env!("CARGO_BIN_EXE_twinvm")).args(args);
        Running::spawn_command(cmd)
    }

    fn primary(&self, vm: &str, guest: &[&str]) -> Running {
        self.primary_under(&[], vm, guest)
    }

    fn primary_under(&self, wrapper: &[&str], vm: &str, guest: &[&str]) -> Running {
        let mut args = vec!["primary".to_string(), "--backup".into(), BACKUP_ADDR.into()];
        args.extend(self.pair_flags(vm, "primary", guest));
        self.spawn_under(wrapper, &args)
    }

    fn console(&self, vm: &str, role: &str) -> String {
        std::fs::read_to_string(self.dir.0.join(format!("{vm}-{role}.console"))).unwrap_or_default()
    }

    /// `twinvm status --json` of a replica, parsed.
    fn status(&self, control: &Path) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_twinvm"))
            .args(["status", "--json", "--control"])
            .arg(control)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn finish(r: Running) -> Finished {
    r.finish(TIMEOUT)
}

#[test]
fn strangers_and_a_primary_with_another_guest_are_refused_and_the_backup_waits_on() {
    let site = Site::new("pair-refuse");
    let guest = [
        "--kernel",
        "builtin:counter",
        "--mem",
        "64M",
        "--cmdline",
        "max=0",
    ];
    let backup = site.backup("refuse", &guest);
    // Someone without the key: garbage, then a connection that says nothing.
    site.ns
        .enter_on_thread(|| {
            let mut s = TcpStream::connect(BACKUP_ADDR).unwrap();
            let _ = s.write_all(&[0xff; 64]);
            let mut buf = [0u8; 16];
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // The backup drops the connection (EOF or reset), never applies anything.
            let _ = s.read(&mut buf);
            drop(TcpStream::connect(BACKUP_ADDR).unwrap());
        })
        .unwrap();
    // A primary running the same kernel with other memory: refused by name.
    let other = [
        "--kernel",
        "builtin:counter",
        "--mem",
        "128M",
        "--cmdline",
        "max=0",
    ];
    let refused = finish(site.primary("refuse", &other));
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        refused.stderr.contains("memory was 128 MiB, now 64 MiB"),
        "{}",
        refused.stderr
    );
    // The backup is still waiting: status says so, and its log names the refusals.
    let status = site.status(Path::new(&site.path("refuse-backup.sock")));
    assert_eq!(status["state"], "connecting", "{status}");
    assert_eq!(status["role"], "backup", "{status}");
    drop(backup);
}

/// Run the ticker guest (timer interrupts into a user-mode loop, sync
/// points streamed to the backup; it powers off by itself) as pair `vm`
/// with `flags`: both sides end together, exit 0, the backup because the
/// primary's guest ended. Returns the primary's console.
fn ticker_pair_ends_together(site: &Site, vm: &str, flags: &[&str]) -> String {
    let mut guest = vec!["--kernel", "builtin:ticker", "--mem", "64M"];
    guest.extend_from_slice(flags);
    let backup = site.backup(vm, &guest);
    let mut primary = site.primary(vm, &guest);
    primary.wait_for_stderr("backup connected (generation 1)", TIMEOUT);
    let status = site.status(Path::new(&site.path(&format!("{vm}-primary.sock"))));
    assert_eq!(status["role"], "primary", "{status}");
    end_together(primary, backup);
    let console = site.console(vm, "primary");
    assert!(console.contains("ticker: done"), "{console}");
    console
}

/// Both sides of a pair whose guest powers off exit 0, the backup because
/// the primary's guest ended (so it followed it to the end, its final
/// digest and End record checked). Returns the backup's output.
fn end_together(primary: Running, backup: Running) -> Finished {
    let primary = finish(primary);
    let backup = finish(backup);
    assert_eq!(primary.status.code(), Some(0), "{primary:?}");
    assert_eq!(backup.status.code(), Some(0), "{backup:?}");
    assert!(
        backup.stderr.contains("the primary's guest ended"),
        "{}",
        backup.stderr
    );
    backup
}

#[test]
fn a_pair_whose_guest_powers_off_ends_together_with_the_same_console() {
    let site = Site::new("pair-bye");
    ticker_pair_ends_together(&site, "bye", &[]);
    // The backup emitted nothing (the primary released everything), but it
    // produced the same console: its replay would have, had it gone live.
    assert_eq!(site.console("bye", "backup"), "");
}

#[test]
fn a_pair_with_tick_deferral_streams_caught_up_ticks_and_ends_together() {
    let site = Site::new("pair-catchup");
    // A 20 ms deferral: owed ticks go in at interrupt-window exits,
    // landmarks with no record, which the backup must meet at the same
    // instructions (its digests check it; a divergence stops it with an
    // error).
    let console = ticker_pair_ends_together(
        &site,
        "catchup",
        &["--tick-deferral-ms", "20", "--tick-delivery", "catch-up"],
    );
    // Caught up: far more ticks than the ~40 a second one tick per
    // deferral gave (the loop runs about a second; kept tolerant).
    let ticks: u64 = console
        .lines()
        .find_map(|l| l.strip_prefix("ticker: ticks="))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no tick count in {console}"));
    assert!(ticks >= 300, "{ticks} ticks\n{console}");
}

#[test]
fn an_idle_pair_shows_its_backup_one_landmark_behind_with_no_lag() {
    let site = Site::new("pair-idle");
    // The echo guest waits in `hlt` for console input that never comes:
    // no landmark for seconds, and the backup one landmark behind by design.
    let guest = ["--kernel", "builtin:echo", "--mem", "64M"];
    let backup = site.backup("idle", &guest);
    let mut primary = site.primary("idle", &guest);
    primary.wait_for_stderr("backup connected (generation 1)", TIMEOUT);
    let backup_control = PathBuf::from(site.path("idle-backup.sock"));
    let deadline = Instant::now() + TIMEOUT;
    while site.status(&backup_control)["state"] != "following" {
        assert!(Instant::now() < deadline, "the backup never followed");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Booted and settled: the backup's landmark stands still for a second.
    let mut landmark = site.status(&backup_control)["landmark"].clone();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = site.status(&backup_control)["landmark"].clone();
        if now == landmark && now.as_u64() > Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "the guest never went idle");
        landmark = now;
    }
    std::thread::sleep(Duration::from_secs(3));
    let b = site.status(&backup_control);
    let p = site.status(Path::new(&site.path("idle-primary.sock")));
    assert_eq!(b["landmark"], landmark, "the guest was not idle: {b}");
    assert!(b["lag_landmarks"].as_u64() <= Some(1), "{b}");
    // Before the lag counted only replayable work, this read 3,000 ms and
    // more: the age of the landmark the backup waits one behind.
    let lag = |s: &serde_json::Value| s["lag_ms"].as_f64().unwrap_or(f64::MAX);
    assert!(lag(&b) < 100.0, "an idle backup reports lag: {b}");
    assert!(
        lag(&p) < 100.0,
        "the primary reports its idle backup's lag: {p}"
    );
    let term = Command::new("kill")
        .args(["-TERM", &primary.pid().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    // A stopped primary exits 130 (docs/operations.md); it says goodbye
    // first, so its backup ends with it rather than going live.
    let primary = finish(primary);
    let backup = finish(backup);
    assert_eq!(primary.status.code(), Some(130), "{primary:?}");
    assert_eq!(backup.status.code(), Some(0), "{backup:?}");
}

#[test]
fn a_backup_that_diverges_stops_and_the_primary_goes_on_alone() {
    let site = Site::new("pair-diverge");
    // The storm guest runs for several seconds; the backup's test hook
    // writes one byte of guest memory the primary never wrote, early on:
    // the next digest reports it while the primary still runs (acks mean
    // receipt, so a primary whose guest ended first would never hear of it).
    let guest = ["--kernel", "builtin:storm", "--mem", "64M"];
    let mut args = vec![
        "backup".to_string(),
        "--listen".into(),
        BACKUP_ADDR.into(),
        "--test-perturb".into(),
        "write-page:0x3000000@300".into(),
    ];
    args.extend(site.pair_flags("diverge", "backup", &guest));
    let mut backup = site.spawn(&args);
    backup.wait_for_stderr("waiting for the primary", TIMEOUT);
    let primary = site.primary("diverge", &guest);
    let backup = finish(backup);
    let primary = finish(primary);
    assert_eq!(backup.status.code(), Some(4), "{backup:?}");
    assert!(backup.stderr.contains("diverged"), "{}", backup.stderr);
    assert_eq!(primary.status.code(), Some(0), "{primary:?}");
    assert!(
        primary.stderr.contains("the backup diverged"),
        "{}",
        primary.stderr
    );
    assert!(
        primary.stderr.contains("continuing alone"),
        "{}",
        primary.stderr
    );
    assert!(site.console("diverge", "primary").contains("storm: done"));
}

/// CPU-bound loops pinned to one host CPU, killed when dropped.
struct BusyLoops(Vec<std::process::Child>);

impl BusyLoops {
    fn on_cpu(cpu: u32, count: usize) -> BusyLoops {
        BusyLoops(
            (0..count)
                .map(|_| {
                    Command::new("taskset")
                        .args(["-c", &cpu.to_string(), "sh", "-c", "while :; do :; done"])
                        .spawn()
                        .expect("starting a busy loop")
                })
                .collect(),
        )
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn a_backup_that_falls_behind_catches_up_and_ends_with_its_primary() {
    let site = Site::new("pair-behind");
    // The primary records the storm guest (a sync point every ~1 ms for a
    // few seconds) on CPU 0, every sync point with state; the backup's
    // vCPU runs on CPU 1 beside two busy loops, so it gets a third of that
    // CPU and waits a scheduler slice or two at a time: it falls behind by
    // more than one sync point again and again.
    let guest = ["--kernel", "builtin:storm", "--mem", "64M"];
    let _busy = BusyLoops::on_cpu(1, 2);
    let backup = site.backup_under(&[], "behind", &guest, &["--host-cpu", "1"]);
    let mut primary_guest = guest.to_vec();
    primary_guest.extend(["--sync-state-every-ms", "0"]);
    let mut primary = site.primary_under(&["taskset", "-c", "0"], "behind", &primary_guest);
    primary.wait_for_stderr("backup connected (generation 1)", TIMEOUT);
    // It caught up (loading sync points with state instead of executing)
    // and still ended in the primary's state: its digests after each jump
    // and the End record's check passed, or it would have stopped with a
    // divergence.
    let backup = end_together(primary, backup);
    let caught_up: u64 = backup
        .stderr
        .split("caught up ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the backup never caught up: {}", backup.stderr));
    println!("the backup caught up {caught_up} times");
    assert!(caught_up >= 1, "{}", backup.stderr);
    assert!(site.console("behind", "primary").contains("storm: done"));
}

#[test]
fn a_backup_configured_from_a_toml_file() {
    let site = Site::new("pair-toml");
    let config: PathBuf = site.dir.0.join("backup.toml");
    std::fs::write(
        &config,
        format!(
            "vm = \"toml\"\ngeneration = 1\nkey_file = \"{}\"\nlisten = \"{BACKUP_ADDR}\"\n\
             node = \"b\"\ncontrol = \"{}\"\n\n[arbiter]\naddrs = [{}]\n\n\
             [guest]\nkernel = \"builtin:hello\"\nmem = \"64M\"\nserial = \"{}\"\n",
            site.key(),
            site.path("toml-backup.sock"),
            ARBITERS
                .split(',')
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", "),
            site.path("toml-backup.console"),
        ),
    )
    .unwrap();
    let mut backup = site.spawn(&[
        "backup".into(),
        "--config".into(),
        config.to_str().unwrap().into(),
    ]);
    backup.wait_for_stderr("waiting for the primary", TIMEOUT);
    let primary = finish(site.primary("toml", &["--kernel", "builtin:hello", "--mem", "64M"]));
    assert_eq!(primary.status.code(), Some(0), "{primary:?}");
    let backup = finish(backup);
    assert_eq!(backup.status.code(), Some(0), "{backup:?}");
    // A typo in the file is named.
    std::fs::write(&config, "vm = \"toml\"\ngenration = 1\n").unwrap();
    let bad = finish(site.spawn(&[
        "backup".into(),
        "--config".into(),
        config.to_str().unwrap().into(),
    ]));
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(bad.stderr.contains("genration"), "{}", bad.stderr);
}
