//! Boots Debian's stock cloud kernel with the busybox initramfs from
//! guest-images/linux/build.sh to its userspace marker and clean power-off.
//!
//! Opt-in: slow on hosts where KVM emulates guest kernel code (minutes), and
//! it downloads Debian packages. Runs only with `TWINVM_LINUX_TESTS=1`;
//! otherwise it prints that it was skipped and passes at once.
//! `TWINVM_LINUX_IMAGE_DIR` overrides where the image is built and cached,
//! `TWINVM_LINUX_TIMEOUT` the boot timeout in seconds (default 2400).

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Running;

fn enabled() -> bool {
    std::env::var("TWINVM_LINUX_TESTS").is_ok_and(|v| v == "1")
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
    if !enabled() {
        // Straight to the stderr handle: the test harness captures
        // `println!`, and a skip must be visible in a normal `cargo test`.
        let _ = writeln!(
            std::io::stderr(),
            "linux_boot: SKIPPED (set TWINVM_LINUX_TESTS=1 to build the Debian kernel image and boot it; slow)"
        );
        return;
    }
    let timeout = Duration::from_secs(
        std::env::var("TWINVM_LINUX_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2400),
    );
    let dir = build_image();
    let cmdline = std::fs::read_to_string(dir.join("cmdline")).expect("read OUTDIR/cmdline");
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initrd.img");
    let started = Instant::now();
    let vm = Running::spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        cmdline.trim(),
        "--mem",
        "512M",
        "--stats",
    ]);
    let out = vm.finish(timeout);
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
