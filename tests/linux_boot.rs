//! Boots Debian's stock cloud kernel with the busybox initramfs from
//! guest-images/linux/build.sh to its userspace marker and clean power-off;
//! records that boot and replays it to an identical state.
//!
//! Opt-in: slow on hosts where KVM emulates guest kernel code (minutes per
//! boot), and it downloads Debian packages. Runs only with
//! `TWINVM_LINUX_TESTS=1`; otherwise each test prints that it was skipped
//! and passes at once. The two tests run side by side (one vCPU thread
//! each). `TWINVM_LINUX_IMAGE_DIR` overrides where the image is built and
//! cached, `TWINVM_LINUX_TIMEOUT` the timeout of each boot, record or replay
//! in seconds (default 2400).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Finished, Running, TempDir};

/// Whether the Linux tests run; if not, say so where a normal `cargo test`
/// shows it (the harness captures `println!`).
fn enabled(test: &str) -> bool {
    let on = std::env::var("TWINVM_LINUX_TESTS").is_ok_and(|v| v == "1");
    if !on {
        let _ = writeln!(
            std::io::stderr(),
            "{test}: SKIPPED (set TWINVM_LINUX_TESTS=1 to build the Debian kernel image and boot it; slow)"
        );
    }
    on
}

fn timeout() -> Duration {
    Duration::from_secs(
        std::env::var("TWINVM_LINUX_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2400),
    )
}

/// The image directory, built once for both tests.
fn image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(build_image)
}

/// `--kernel`, `--initrd`, `--cmdline` and `--mem` for the image.
fn guest_args() -> Vec<String> {
    let dir = image();
    let cmdline = std::fs::read_to_string(dir.join("cmdline")).expect("read OUTDIR/cmdline");
    vec![
        "--kernel".into(),
        dir.join("vmlinux").to_str().unwrap().into(),
        "--initrd".into(),
        dir.join("initrd.img").to_str().unwrap().into(),
        "--cmdline".into(),
        cmdline.trim().into(),
        "--mem".into(),
        "512M".into(),
    ]
}

fn run_twinvm(args: &[String]) -> Finished {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Running::spawn(&args).finish(timeout())
}

/// Build (or reuse) the image and return its directory.
fn build_image() -> PathBuf {
    let dir = std::env::var_os("TWINVM_LINUX_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("linux-image"));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest-images/linux/build.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .status()
        .expect("run guest-images/linux/build.sh");
    assert!(status.success(), "{} failed: {status}", script.display());
    dir
}

#[test]
fn debian_cloud_kernel_boots_to_userspace_and_powers_off() {
    if !enabled("linux_boot") {
        return;
    }
    let mut args = vec!["run".to_string(), "--stats".into()];
    args.extend(guest_args());
    let started = Instant::now();
    let out = run_twinvm(&args);
    let wall = started.elapsed();
    println!("linux_boot: wall time {wall:.1?}");
    println!("linux_boot: stderr: {}", out.stderr.trim_end());
    for line in out.stdout.lines().filter(|l| l.contains("TWINVM-")) {
        println!("linux_boot: console: {line}");
    }
    assert!(
        out.stdout.contains("TWINVM-LINUX-UP"),
        "no userspace marker; console tail: {}",
        tail(&out.stdout)
    );
    assert!(
        out.stdout.contains("TWINVM-WORKLOAD sum="),
        "workload did not run; console tail: {}",
        tail(&out.stdout)
    );
    // A pipeline of applets: each started through /proc/self/exe.
    let bin: u32 = out
        .stdout
        .split("TWINVM-WORKLOAD bin=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bin count; console tail: {}", tail(&out.stdout)));
    assert!(
        bin > 100,
        "ls /bin | wc -l gave {bin}: {}",
        tail(&out.stdout)
    );
    assert!(
        !out.stdout.contains("segfault"),
        "a user process crashed: {}",
        tail(&out.stdout)
    );
    assert!(
        out.stdout.contains("TWINVM-POWEROFF"),
        "{}",
        tail(&out.stdout)
    );
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.contains("guest powered off"), "{}", out.stderr);
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The whole boot, user space included: the kernel, busybox's `/init`, its
/// workload and the power-off, recorded and replayed to an identical state
/// with a byte-identical console.
#[test]
fn debian_cloud_linux_boot_records_and_replays_identically() {
    if !enabled("linux_record_replay") {
        return;
    }
    let dir = TempDir::new("linux-rr");
    let log = dir.0.join("linux-boot.log").to_str().unwrap().to_string();
    let guest = guest_args();
    let mut record = vec!["record".to_string(), "--log".into(), log.clone()];
    // Sync points only where a timer is 2 ms overdue: fewer kicks into the
    // slow (emulated) kernel.
    record.extend(["--sync-bound-us".into(), "2000".into()]);
    record.extend(guest.iter().cloned());
    let started = Instant::now();
    let rec = run_twinvm(&record);
    println!(
        "linux_record_replay: record wall {:.1?}: {}",
        started.elapsed(),
        rec.stderr.trim_end()
    );
    assert!(rec.status.success(), "record failed: {}", rec.stderr);
    for marker in [
        "TWINVM-LINUX-UP",
        "TWINVM-WORKLOAD sha256",
        "TWINVM-POWEROFF",
    ] {
        assert!(
            rec.stdout.contains(marker),
            "the recorded boot has no {marker}; console tail: {}",
            tail(&rec.stdout)
        );
    }
    let mut replay = vec!["replay".to_string(), "--log".into(), log];
    replay.extend(guest);
    let started = Instant::now();
    let rep = run_twinvm(&replay);
    println!(
        "linux_record_replay: replay wall {:.1?}: {}",
        started.elapsed(),
        rep.stderr.trim_end()
    );
    assert!(rep.status.success(), "replay failed: {}", rep.stderr);
    assert!(
        rep.stdout
            .contains("replay: final state identical to the recording"),
        "{}",
        rep.stderr
    );
    // The console byte for byte (the kernel writes \r\n), without the
    // replay's own final line.
    let console = rep
        .stdout
        .split("replay: final state identical")
        .next()
        .unwrap_or_default();
    assert!(
        console == rec.stdout,
        "the replayed console differs; replay tail: {}",
        tail(console)
    );
}
