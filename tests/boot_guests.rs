//! Boots every test guest under real KVM through the `twinvm` binary and
//! checks what it prints and how twinvm exits.

mod common;

use std::time::Duration;

use common::{run_to_end, Running, TempDir};

const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn hello_prints_from_kernel_and_user_mode_and_powers_off() {
    let out = run_to_end(
        &[
            "run",
            "--kernel",
            "builtin:hello",
            "--mem",
            "64M",
            "--stats",
        ],
        TIMEOUT,
    );
    assert!(out.status.success(), "{out:?}");
    let expected = [
        "Hello from the twinvm test guest\n",
        // int3 at CPL0 goes through the emulation fallback and the guest's #BP handler.
        "hello: breakpoints handled=1\n",
        // popcnt at CPL0 is performed by the fallback: popcount(0xf00f000000000ff1) = 17.
        "hello: popcnt=17\n",
        "hello: user mode says hi\n",
        // sum 1..=1_000_000 computed in user mode.
        "hello: user exit code=500000500000\n",
        "hello: done\n",
    ];
    assert_eq!(out.stdout, expected.concat());
    assert!(out.stderr.contains("guest powered off"), "{}", out.stderr);
    assert!(
        out.stderr.contains("emulation-fallbacks=2"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_guest_can_be_booted_from_an_elf_file() {
    let dir = TempDir::new("elf");
    let path = dir.0.join("hello.elf");
    std::fs::write(&path, twinvm::guests::builtin("hello").unwrap()).unwrap();
    let out = run_to_end(
        &["run", "--kernel", path.to_str().unwrap(), "--mem", "32M"],
        TIMEOUT,
    );
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.ends_with("hello: done\n"), "{}", out.stdout);
}

/// The xorshift64 loop the ticker guest runs in user mode.
fn ticker_work(iterations: u32) -> u64 {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

#[test]
fn ticker_counts_timer_interrupts_during_user_mode_compute() {
    let out = run_to_end(
        &[
            "run",
            "--kernel",
            "builtin:ticker",
            "--mem",
            "64M",
            "--stats",
        ],
        TIMEOUT,
    );
    assert!(out.status.success(), "{out:?}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("ticker: ticks="))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    let mut fields = line
        .trim_start_matches("ticker: ticks=")
        .split([' ', '='])
        .filter(|f| f.starts_with(char::is_numeric));
    let ticks: u64 = fields.next().unwrap().parse().unwrap();
    let hex =
        |f: Option<&str>| u64::from_str_radix(f.unwrap().trim_start_matches("0x"), 16).unwrap();
    let work = hex(fields.next());
    let gs = hex(fields.next());
    // The interrupted computation still gives the exact result.
    assert_eq!(work, ticker_work(400_000_000));
    // The last SYS_SETGS came with the loop counter at 2^18, after
    // 400_000_000 - 2^18 + 1 rounds.
    let canonical = |v: u64| (((v << 16) as i64) >> 16) as u64;
    assert_eq!(
        gs,
        canonical(ticker_work(400_000_000 - (1 << 18) + 1)),
        "{line}"
    );
    // A 1 kHz timer over a compute loop that takes a good fraction of a second
    // on any host: interrupts reached the guest while it ran in user mode.
    assert!(ticks >= 20, "only {ticks} timer interrupts: {out:?}");
    assert!(out.stdout.ends_with("ticker: done\n"), "{}", out.stdout);
    // Interrupts were injected into a guest that never exits by itself: kicks did it.
    assert!(out.stderr.contains("interrupts="), "{}", out.stderr);
}

#[test]
fn echo_returns_serial_input_through_rx_interrupts() {
    let mut vm = Running::spawn(&["run", "--kernel", "builtin:echo", "--mem", "32M", "--stats"]);
    vm.wait_for_stdout("echo: ready\n", TIMEOUT);
    vm.write_stdin(b"hello twinvm\n");
    vm.wait_for_stdout("hello twinvm\n", TIMEOUT);
    vm.write_stdin(b"q");
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout
            .ends_with("hello twinvm\n\necho: received=14\necho: bye\n"),
        "{}",
        out.stdout
    );
}

#[test]
fn counter_reads_its_command_line_and_powers_off_without_a_device() {
    // twinvm has no virtio-net device unless asked for one: the guest names
    // the configuration it parsed, then powers off instead of waiting.
    let counter = |cmdline: Option<&str>| {
        let mut args = vec!["run", "--kernel", "builtin:counter", "--mem", "32M"];
        if let Some(c) = cmdline {
            args.extend(["--cmdline", c]);
        }
        let out = run_to_end(&args, TIMEOUT);
        assert!(out.status.success(), "{out:?}");
        assert!(out.stderr.contains("guest powered off"), "{}", out.stderr);
        out.stdout
    };
    assert_eq!(
        counter(Some("console=ttyS0 ip=10.1.2.3 port=99 max=5 myip=1.1.1.1")),
        "counter: no virtio-net device (ip=10.1.2.3 port=99 max=5)\n"
    );
    assert_eq!(
        counter(None),
        "counter: no virtio-net device (ip=10.77.0.2 port=7777 max=0)\n"
    );
    for bad in [
        "ip=10.1.2.256",
        "ip=10.1.2",
        "port=0",
        "port=65536",
        "max=12x",
    ] {
        assert_eq!(
            counter(Some(&format!("ip=10.1.2.3 {bad} port=99"))),
            format!("counter: bad command line argument: {bad}\n")
        );
    }
}

#[test]
fn guests_lists_every_builtin_guest_with_its_description() {
    let out = run_to_end(&["guests"], TIMEOUT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout.lines().count(), twinvm::guests::names().len());
    assert!(
        out.stdout.lines().any(|l| l.starts_with("builtin:counter ")
            && l.ends_with("  virtio-net guest answering ARP, ICMP echo and a UDP counter")),
        "{}",
        out.stdout
    );
}

#[test]
fn serial_output_can_go_to_a_file() {
    let dir = TempDir::new("serial");
    let path = dir.0.join("console.log");
    let out = run_to_end(
        &[
            "run",
            "--kernel",
            "builtin:hello",
            "--mem",
            "32M",
            "--serial",
            path.to_str().unwrap(),
        ],
        TIMEOUT,
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, "");
    let console = std::fs::read_to_string(&path).unwrap();
    assert!(console.ends_with("hello: done\n"), "{console}");
}

#[test]
fn triple_fault_is_a_clear_error() {
    let out = run_to_end(
        &["run", "--kernel", "builtin:triplefault", "--mem", "32M"],
        TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.contains("triplefault: going down"));
    assert!(
        out.stderr.contains("guest triple-faulted"),
        "{}",
        out.stderr
    );
}

#[test]
fn unhandled_emulation_failure_names_rip_bytes_and_instruction() {
    let out = run_to_end(
        &["run", "--kernel", "builtin:badinsn", "--mem", "32M"],
        TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!out.stdout.contains("vpxor completed"), "{}", out.stdout);
    let err = out.stderr.trim_end();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("unhandled emulation failure at RIP 0x"),
        "{err}"
    );
    assert!(err.contains("c5 f5 ef c2"), "{err}");
    assert!(err.contains("vpxor ymm0,ymm1,ymm2"), "{err}");
}

#[test]
fn sigint_stops_the_guest_cleanly() {
    let mut vm = Running::spawn(&["run", "--kernel", "builtin:echo", "--mem", "32M"]);
    vm.wait_for_stdout("echo: ready\n", TIMEOUT);
    let status = std::process::Command::new("kill")
        .args(["-INT", &vm.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = vm.finish(TIMEOUT);
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    assert!(out.stderr.contains("twinvm: stopped"), "{}", out.stderr);
}

#[test]
fn demo_survives_a_host_failure_then_records_and_replays() {
    let out = run_to_end(&["demo"], TIMEOUT);
    assert!(out.status.success(), "{out:?}");
    // Part 1: the local kill-primary drill.
    assert!(
        out.stdout
            .contains("drill kill-primary (local, FT pair): PASS"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("went live: hostB"), "{}", out.stdout);
    assert!(out.stdout.contains("0 lost"), "{}", out.stdout);
    // Part 2: record/replay.
    assert!(out.stdout.contains("hello: done\n"), "{}", out.stdout);
    assert!(out.stdout.contains("storm: done\n"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("replay: final state identical to the recording"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("demo: the replayed console is identical"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("demo: divergence detected as expected"),
        "{}",
        out.stdout
    );
}
