//! Bad command-line input and bad images: a clear error naming what is wrong,
//! a non-zero exit, never a panic.

mod common;

use std::time::Duration;

use common::{run_to_end, Finished, TempDir};

const TIMEOUT: Duration = Duration::from_secs(60);

fn assert_clean_failure(out: &Finished, needle: &str) {
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains(needle),
        "expected {needle:?} in stderr: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn zero_or_absurd_memory_sizes() {
    for mem in ["0", "1M", "100000G"] {
        let out = run_to_end(&["run", "--kernel", "builtin:hello", "--mem", mem], TIMEOUT);
        assert_clean_failure(&out, "out of range");
    }
    let out = run_to_end(
        &["run", "--kernel", "builtin:hello", "--mem", "lots"],
        TIMEOUT,
    );
    assert_clean_failure(&out, "not a size");
    let out = run_to_end(
        &[
            "run",
            "--kernel",
            "builtin:hello",
            "--mem",
            "99999999999999999999G",
        ],
        TIMEOUT,
    );
    assert_clean_failure(&out, "too large");
}

#[test]
fn sync_bounds_out_of_range_are_refused_and_one_in_range_runs() {
    for command in ["run", "record"] {
        for bound in ["0", "1000001", "soon"] {
            let mut args = vec![
                command,
                "--kernel",
                "builtin:hello",
                "--sync-bound-us",
                bound,
            ];
            if command == "record" {
                args.extend(["--log", "/nonexistent/never-written.log"]);
            }
            let out = run_to_end(&args, TIMEOUT);
            assert_clean_failure(&out, "--sync-bound-us");
        }
    }
    let out = run_to_end(
        &[
            "run",
            "--kernel",
            "builtin:hello",
            "--sync-bound-us",
            "2000",
        ],
        TIMEOUT,
    );
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("hello: done"), "{}", out.stdout);
}

#[test]
fn missing_files_are_named() {
    let out = run_to_end(&["run", "--kernel", "/nonexistent/vmlinux"], TIMEOUT);
    assert_clean_failure(&out, "reading kernel /nonexistent/vmlinux");
    let out = run_to_end(
        &[
            "run",
            "--kernel",
            "builtin:hello",
            "--initrd",
            "/nonexistent/initrd.img",
        ],
        TIMEOUT,
    );
    assert_clean_failure(&out, "reading initrd /nonexistent/initrd.img");
    let out = run_to_end(&["run", "--kernel", "builtin:nosuchguest"], TIMEOUT);
    assert_clean_failure(&out, "no embedded guest `nosuchguest`");
}

#[test]
fn unreadable_initrd_is_named() {
    let dir = TempDir::new("initrd-dir");
    // A directory cannot be read as a file.
    let out = run_to_end(
        &[
            "run",
            "--kernel",
            "builtin:hello",
            "--initrd",
            dir.0.to_str().unwrap(),
        ],
        TIMEOUT,
    );
    assert_clean_failure(&out, "reading initrd");
}

#[test]
fn a_file_that_is_not_a_kernel_is_refused() {
    let dir = TempDir::new("notkernel");
    let text = dir.0.join("notes.txt");
    std::fs::write(&text, "this is not a kernel, just some words\n").unwrap();
    let out = run_to_end(&["run", "--kernel", text.to_str().unwrap()], TIMEOUT);
    assert_clean_failure(&out, "not a kernel");
    let empty = dir.0.join("empty");
    std::fs::write(&empty, "").unwrap();
    let out = run_to_end(&["run", "--kernel", empty.to_str().unwrap()], TIMEOUT);
    assert_clean_failure(&out, "not a kernel");
    // An ELF for another machine.
    let mut arm = twinvm::guests::builtin("hello").unwrap().to_vec();
    arm[18] = 183;
    let arm_path = dir.0.join("arm.elf");
    std::fs::write(&arm_path, arm).unwrap();
    let out = run_to_end(&["run", "--kernel", arm_path.to_str().unwrap()], TIMEOUT);
    assert_clean_failure(&out, "not x86-64");
    // A truncated ELF.
    let cut = &twinvm::guests::builtin("hello").unwrap()[..100];
    let cut_path = dir.0.join("cut.elf");
    std::fs::write(&cut_path, cut).unwrap();
    let out = run_to_end(&["run", "--kernel", cut_path.to_str().unwrap()], TIMEOUT);
    assert_clean_failure(&out, "cannot load kernel");
}

#[test]
fn an_oversized_initrd_is_refused() {
    let dir = TempDir::new("bigrd");
    let path = dir.0.join("big.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(40 << 20).unwrap();
    let out = run_to_end(
        &[
            "run",
            "--kernel",
            "builtin:hello",
            "--mem",
            "32M",
            "--initrd",
            path.to_str().unwrap(),
        ],
        TIMEOUT,
    );
    assert_clean_failure(&out, "does not fit");
}

#[test]
fn a_too_long_command_line_is_refused() {
    let long = "x".repeat(5000);
    let out = run_to_end(
        &["run", "--kernel", "builtin:hello", "--cmdline", &long],
        TIMEOUT,
    );
    assert_clean_failure(&out, "command line is 5000 bytes");
}

#[test]
fn unknown_flags_and_serial_targets() {
    let out = run_to_end(
        &["run", "--kernel", "builtin:hello", "--frobnicate"],
        TIMEOUT,
    );
    assert_clean_failure(&out, "--frobnicate");
    let out = run_to_end(
        &[
            "run",
            "--kernel",
            "builtin:hello",
            "--serial",
            "/nonexistent/dir/console.log",
        ],
        TIMEOUT,
    );
    assert_clean_failure(
        &out,
        "creating serial output file /nonexistent/dir/console.log",
    );
}

#[test]
fn an_unknown_tick_delivery_is_refused_naming_the_choices() {
    let dir = TempDir::new("bad-tick-delivery");
    let log = dir.0.join("never.log");
    let out = run_to_end(
        &[
            "record",
            "--log",
            log.to_str().unwrap(),
            "--kernel",
            "builtin:hello",
            "--tick-delivery",
            "windows",
        ],
        TIMEOUT,
    );
    assert_clean_failure(&out, "unknown tick delivery `windows`");
    assert!(out.stderr.contains("window-exits"), "{}", out.stderr);
    assert!(!log.exists(), "a refused recording left {}", log.display());
}
