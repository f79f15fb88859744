//! Record a guest under real KVM, replay it from the log, and check the
//! replay ends in the identical state; corrupted, truncated and mismatched
//! logs are refused; a guest whose execution cannot be replayed is caught.

mod common;

use std::time::Duration;

use common::{run_to_end, stats_counter, Finished, Running, TempDir};
use twinvm::replay::log::LogReader;

const TIMEOUT: Duration = Duration::from_secs(180);

fn record(dir: &TempDir, guest: &str, extra: &[&str]) -> (String, Finished) {
    let log = dir
        .0
        .join(format!("{guest}.log"))
        .to_str()
        .unwrap()
        .to_string();
    let kernel = format!("builtin:{guest}");
    let mut args = vec!["record", "--log", &log, "--kernel", &kernel, "--mem", "64M"];
    args.extend_from_slice(extra);
    let out = run_to_end(&args, TIMEOUT);
    assert!(out.status.success(), "record {guest}: {out:?}");
    (log, out)
}

fn replay(log: &str, guest: &str, mem: &str) -> Finished {
    replay_with(log, guest, mem, &[])
}

fn replay_with(log: &str, guest: &str, mem: &str, extra: &[&str]) -> Finished {
    let kernel = format!("builtin:{guest}");
    let mut args = vec!["replay", "--log", log, "--kernel", &kernel, "--mem", mem];
    args.extend_from_slice(extra);
    run_to_end(&args, TIMEOUT)
}

fn stat(stderr: &str, name: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains(" landmarks, "))
        .unwrap_or_else(|| panic!("no summary in {stderr}"));
    let before = line.split(&format!(" {name}")).next().unwrap();
    before
        .rsplit([' ', '('])
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{name} in {line}"))
}

/// The replay succeeded and ended in the recording's final state.
fn assert_ends_identical(replayed: &Finished) {
    assert!(replayed.status.success(), "replay: {replayed:?}");
    assert!(
        replayed
            .stdout
            .contains("replay: final state identical to the recording"),
        "{replayed:?}"
    );
}

fn assert_identical(recorded: &Finished, replayed: &Finished) {
    assert_ends_identical(replayed);
    let console: String = replayed
        .stdout
        .lines()
        .filter(|l| !l.starts_with("replay: "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(console, recorded.stdout, "the replayed console differs");
    assert_eq!(
        stat(&replayed.stderr, "landmarks"),
        stat(&recorded.stderr, "landmarks")
    );
    assert_eq!(
        stat(&replayed.stderr, "interrupts"),
        stat(&recorded.stderr, "interrupts")
    );
}

#[test]
fn hello_replays_identically() {
    let dir = TempDir::new("rr-hello");
    let (log, rec) = record(&dir, "hello", &[]);
    assert_identical(&rec, &replay(&log, "hello", "64M"));
}

#[test]
fn ticker_replays_identically_through_interrupts_and_sync_points() {
    let dir = TempDir::new("rr-ticker");
    let (log, rec) = record(&dir, "ticker", &["--digest-interval", "64"]);
    // The user-mode loop makes no exits: timer interrupts reach it only
    // through sync points.
    assert!(stat(&rec.stderr, "interrupts") >= 20, "{}", rec.stderr);
    assert!(stat(&rec.stderr, "sync points") >= 20, "{}", rec.stderr);
    assert!(stat(&rec.stderr, "digests") >= 5, "{}", rec.stderr);
    let rep = replay(&log, "ticker", "64M");
    assert_identical(&rec, &rep);
    assert_eq!(
        stat(&rep.stderr, "sync points"),
        stat(&rec.stderr, "sync points")
    );
}

/// `N label` from `record`'s line about sync-point pages.
fn page_stat(stderr: &str, name: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("sync-point pages: "))
        .unwrap_or_else(|| panic!("no page line in {stderr}"));
    let before = line.split(&format!(" {name}")).next().unwrap();
    before
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{name} in {line}"))
}

#[test]
fn sync_point_pages_replay_identically_as_deltas_and_whole() {
    let dir = TempDir::new("rr-deltas");
    let (log, rec) = record(&dir, "ticker", &[]);
    // The ticker's sync points keep writing the same few pages (its stack,
    // its counters): after the first time, deltas or unchanged.
    assert!(page_stat(&rec.stderr, "as deltas") >= 20, "{}", rec.stderr);
    let rep = replay(&log, "ticker", "64M");
    assert_identical(&rec, &rep);

    let whole_dir = TempDir::new("rr-whole");
    let (whole_log, whole) = record(&whole_dir, "ticker", &["--page-cache", "0"]);
    assert_eq!(page_stat(&whole.stderr, "as deltas"), 0, "{}", whole.stderr);
    assert_eq!(page_stat(&whole.stderr, "unchanged"), 0, "{}", whole.stderr);
    let rep = replay(&whole_log, "ticker", "64M");
    assert_identical(&whole, &rep);
}

#[test]
fn deferred_ticks_make_fewer_sync_points_and_replay_identically() {
    // The ticker's user-mode loop takes every tick through a sync point;
    // with a 20 ms deferral the ticks it is owed wait and coalesce.
    let dir = TempDir::new("rr-deferral");
    let (_, every_tick) = record(&dir, "ticker", &[]);
    let deferred_dir = TempDir::new("rr-deferral-20");
    let (log, deferred) = record(&deferred_dir, "ticker", &["--tick-deferral-ms", "20"]);
    let (all, fewer) = (
        stat(&every_tick.stderr, "sync points"),
        stat(&deferred.stderr, "sync points"),
    );
    assert!(
        fewer > 0 && fewer * 2 < all,
        "sync points: {fewer} deferred, {all} without\n{}",
        deferred.stderr
    );
    assert_identical(&deferred, &replay(&log, "ticker", "64M"));
}

/// The timer interrupts the ticker guest counted (its `ticks=` line).
fn ticker_ticks(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("ticker: ticks="))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no tick count in {stdout}"))
}

/// The recording's own length, from the end of its summary line (`… 1.234 s`).
fn summary_seconds(stderr: &str) -> f64 {
    let line = stderr
        .lines()
        .find(|l| l.contains(" landmarks, "))
        .unwrap_or_else(|| panic!("no summary in {stderr}"));
    line.trim_end()
        .strip_suffix(" s")
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {line}"))
}

#[test]
fn deferred_ticks_are_caught_up_through_interrupt_windows_and_replay_identically() {
    // 20 ms deferral at 1 kHz: each deferred stretch owes ~20 periods, which
    // the platform raises one per acknowledge and the engine delivers at
    // interrupt-window exits as the handler returns, not at sync points.
    // Every landmark's RIP is logged and checked: a window exit met at
    // another instruction on replay fails at once.
    let dir = TempDir::new("rr-catchup");
    let (log, rec) = record(
        &dir,
        "ticker",
        &[
            "--tick-deferral-ms",
            "20",
            "--tick-delivery",
            "catch-up",
            "--trace-landmarks",
        ],
    );
    let ticks = ticker_ticks(&rec.stdout);
    let caught_up = stat(&rec.stderr, "ticks caught up");
    let windows = stat(&rec.stderr, "interrupt windows");
    let syncs = stat(&rec.stderr, "sync points");
    let periods = summary_seconds(&rec.stderr) * 1000.0;
    eprintln!(
        "ticks={ticks} caught_up={caught_up} windows={windows} syncs={syncs} periods~{periods:.0}"
    );
    assert!(caught_up * 2 > ticks, "{}", rec.stderr);
    assert!(windows >= caught_up, "{}", rec.stderr);
    // About one tick per period of the run (boot and the final output are
    // a small part of it); without catch-up it was one per 24-35 ms.
    assert!(
        ticks as f64 >= 0.7 * periods,
        "{ticks} ticks in ~{periods:.0} periods\n{}",
        rec.stderr
    );
    // Far fewer sync points than ticks: one per deferral, not one per tick.
    assert!(syncs * 4 < ticks, "{syncs} sync points for {ticks} ticks");
    let rep = replay(&log, "ticker", "64M");
    assert_identical(&rec, &rep);
    assert_eq!(stat(&rep.stderr, "interrupt windows"), windows);
    assert_eq!(stat(&rep.stderr, "ticks caught up"), caught_up);
}

#[test]
fn window_exits_without_catch_up_take_waiting_interrupts_and_replay_identically() {
    // The storm guest's handler makes exits with IF=0 (trapped time reads,
    // port I/O) while the next 1 kHz tick or a serial interrupt comes due:
    // the interrupt then goes in at the interrupt-window exit where the
    // handler returns, not at a sync point in the user loop after it.
    // Every landmark's RIP is logged and checked on replay.
    let dir = TempDir::new("rr-windows");
    let (log, rec) = record(
        &dir,
        "storm",
        &["--tick-delivery", "window-exits", "--trace-landmarks"],
    );
    // Not the default: the recording says what it risks.
    assert!(
        rec.stderr.contains(
            "warning: tick delivery `window-exits` makes interrupt-window exits landmarks"
        ),
        "{}",
        rec.stderr
    );
    let windows = stat(&rec.stderr, "interrupt windows");
    assert!(windows > 0, "no interrupt window in {}", rec.stderr);
    assert_eq!(stat(&rec.stderr, "ticks caught up"), 0, "{}", rec.stderr);
    // The replay takes the rule from the log header, not from its flags.
    let rep = replay(&log, "storm", "64M");
    assert_identical(&rec, &rep);
    assert_eq!(stat(&rep.stderr, "interrupt windows"), windows);
    assert_eq!(stat(&rep.stderr, "ticks caught up"), 0);
}

#[test]
fn kernel_rdrand_and_rdseed_are_performed_logged_and_replayed() {
    let dir = TempDir::new("rr-entropy");
    let (log, rec) = record(&dir, "entropy", &[]);
    let values = |out: &Finished| -> String {
        out.stdout
            .lines()
            .find(|l| l.starts_with("entropy: rdrand64="))
            .unwrap_or_else(|| panic!("{}", out.stdout))
            .to_string()
    };
    let line = values(&rec);
    // Every read succeeded (CF=1) and came through the VMM.
    assert!(line.ends_with(" successes=4"), "{line}");
    assert_eq!(stat(&rec.stderr, "random reads"), 4, "{}", rec.stderr);
    // Sizes as the CPU writes them: 32-bit zero-extends, 16-bit merges.
    assert!(line.contains(" rdrand32=0x00000000"), "{line}");
    assert!(line.contains(" rdrand16=0xffffffffffff"), "{line}");
    // Real entropy: a second recording draws other numbers.
    let dir2 = TempDir::new("rr-entropy2");
    let (_, rec2) = record(&dir2, "entropy", &[]);
    assert_ne!(values(&rec2), line);
    // The replay takes the logged values.
    let rep = replay(&log, "entropy", "64M");
    assert_identical(&rec, &rep);
    assert_eq!(values(&rep), line);
}

#[test]
fn user_mode_cpuid_replays_identically_from_another_host_cpu() {
    // User-mode CPUID runs natively here and reports the host CPU's APIC ID.
    // Record started on CPU 1, replay started on CPU 0: the replay must pin
    // itself to the recording's CPU (named in the log header) to agree.
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("user_mode_cpuid: SKIPPED (needs two host CPUs)");
        return;
    }
    let dir = TempDir::new("rr-cpuid");
    let log = dir.0.join("cpuid.log");
    let log = log.to_str().unwrap();
    let guest = ["--kernel", "builtin:cpuiduser", "--mem", "64M"];
    let mut args = vec!["record", "--log", log];
    args.extend(guest);
    let rec = Running::spawn_on_cpu(1, &args).finish(TIMEOUT);
    assert!(rec.status.success(), "record: {rec:?}");
    let mut args = vec!["replay", "--log", log];
    args.extend(guest);
    let rep = Running::spawn_on_cpu(0, &args).finish(TIMEOUT);
    assert_identical(&rec, &rep);
    // And the guest really saw the CPU it was pinned to, not another one.
    let mut args = vec!["run"];
    args.extend(guest);
    let other = Running::spawn_on_cpu(0, &args).finish(TIMEOUT);
    assert!(other.status.success(), "run: {other:?}");
    if other.stdout == rec.stdout {
        eprintln!("user_mode_cpuid: CPUID here does not differ between host CPUs 0 and 1 (CPUID exits on this host)");
    }
}

#[test]
fn avx_state_in_user_mode_survives_sync_points() {
    // User mode runs natively here with the host's AVX/AVX-512 enabled: the
    // guest keeps its loop state in YMM upper halves (and ZMM16-17, k1), and
    // sync points must carry it (KVM_GET_XSAVE) for the replay to agree.
    let dir = TempDir::new("rr-avx");
    let (log, rec) = record(&dir, "avxuser", &["--digest-interval", "64"]);
    let line = rec
        .stdout
        .lines()
        .find(|l| l.starts_with("avxuser: level="))
        .unwrap_or_else(|| panic!("{}", rec.stdout))
        .to_string();
    if line.starts_with("avxuser: level=0 ") {
        // A host where guest user mode has no AVX (CPUID follows the model).
        eprintln!("avx_state: guest user mode has no AVX2 on this host; checking replay only");
    } else {
        assert!(stat(&rec.stderr, "sync points") >= 20, "{}", rec.stderr);
    }
    assert_identical(&rec, &replay(&log, "avxuser", "64M"));
}

/// The hash the remap guest must print: rounds alternate between page A
/// (qword i = i * K1) and page B (i * K2) behind the one window.
fn remap_hash() -> u64 {
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    const K2: u64 = 0xc2b2_ae3d_27d4_eb4f;
    const QWORDS: u64 = 32768;
    let (mut hash, mut index) = (0x243f_6a88_85a3_08d3u64, 0u64);
    for round in 0..4000u32 {
        let (k, reads) = if round & 1 == 1 {
            (K2, 1 << 20)
        } else {
            (K1, 1024)
        };
        for _ in 0..reads {
            hash = (hash ^ index.wrapping_mul(k))
                .rotate_left(7)
                .wrapping_mul(K1);
            index = (index + 1) % QWORDS;
        }
    }
    hash
}

#[test]
fn page_table_changes_in_sync_points_reach_kvm_shadow_paging() {
    // The guest remaps a window by rewriting a page-directory entry in user
    // mode. A sync point taken after such a write is loaded by the backup
    // from userspace, which KVM's shadow paging does not see: without
    // dropping its shadow page tables the backup reads the old page and
    // diverges (measured: digest mismatch at landmark 512).
    let dir = TempDir::new("rr-remap");
    let (log, rec) = record(&dir, "remap", &["--digest-interval", "64", "--stats"]);
    assert!(
        rec.stdout.contains(&format!(" hash={:#x}\n", remap_hash())),
        "{}",
        rec.stdout
    );
    let sync_points = stat(&rec.stderr, "sync points");
    assert!(sync_points >= 20, "{}", rec.stderr);
    // The primary's VMM writes no guest memory here; the backup flushes
    // after every sync point that changed a page.
    assert_eq!(flushes(&rec.stderr), 0, "{}", rec.stderr);
    let rep = replay_with(&log, "remap", "64M", &["--stats"]);
    assert_identical(&rec, &rep);
    let backup_flushes = flushes(&rep.stderr);
    assert!(
        (1..=sync_points).contains(&backup_flushes),
        "{backup_flushes} flushes for {sync_points} sync points: {}",
        rep.stderr
    );
}

/// `shadow-mmu-flushes=N` from `--stats`.
fn flushes(stderr: &str) -> u64 {
    counter(stderr, "shadow-mmu-flushes")
}

/// `NAME=N` from `--stats`.
fn counter(stderr: &str, name: &str) -> u64 {
    stats_counter(stderr, name).unwrap_or_else(|| panic!("no {name} in {stderr}"))
}

#[test]
fn record_and_replay_report_the_instructions_kvm_emulated() {
    // KVM's binary statistics file (vmm/kvm_stats.rs): present on every
    // kernel since 5.14, so "unknown" here means the reader is broken.
    let dir = TempDir::new("rr-emulated");
    let (log, rec) = record(&dir, "ticker", &["--stats"]);
    let recorded = counter(&rec.stderr, "kvm-emulated-instructions");
    let rep = replay_with(&log, "ticker", "64M", &["--stats"]);
    assert!(rep.stdout.contains("identical to the recording"), "{rep:?}");
    let replayed = counter(&rep.stderr, "kvm-emulated-instructions");
    eprintln!("ticker: KVM emulated {recorded} instructions recording, {replayed} replaying");
}

#[test]
fn the_sync_point_budget_defers_the_ticks_of_a_memory_heavy_guest_and_replays_identically() {
    // memwrite storing over 4 MiB from user mode: each sync point carries
    // about a thousand pages (a millisecond or more), so under the default
    // budget (5% of the time) the ticks after one wait instead of making a
    // sync point each (the 250 Hz timer's ticks come due every 4 ms).
    let cmdline = "ws=4096 every=8 rounds=40000000";
    let args = ["--cmdline", cmdline, "--stats"];
    let dir = TempDir::new("rr-budget");
    let (log, rec) = record(&dir, "memwrite", &args);
    assert!(rec.stdout.contains("memwrite: done"), "{}", rec.stdout);
    let deferred = counter(&rec.stderr, "tick-deferrals");
    assert!(deferred > 0, "no tick deferred: {}", rec.stderr);
    let rep = replay_with(&log, "memwrite", "64M", &["--cmdline", cmdline]);
    assert_identical(&rec, &rep);

    // Without the budget (and the default fixed deferral of 0) every tick
    // goes in as soon as the sync bound allows.
    let off = TempDir::new("rr-budget-off");
    let (_, rec) = record(
        &off,
        "memwrite",
        &[&args[..], &["--sync-budget-percent", "0"]].concat(),
    );
    assert_eq!(counter(&rec.stderr, "tick-deferrals"), 0, "{}", rec.stderr);
}

#[test]
fn echo_replays_logged_serial_input() {
    let dir = TempDir::new("rr-echo");
    let log = dir.0.join("echo.log");
    let mut vm = Running::spawn(&[
        "record",
        "--log",
        log.to_str().unwrap(),
        "--kernel",
        "builtin:echo",
        "--mem",
        "64M",
    ]);
    vm.wait_for_stdout("echo: ready\n", TIMEOUT);
    for chunk in [&b"first "[..], b"second ", b"third\n"] {
        vm.write_stdin(chunk);
        std::thread::sleep(Duration::from_millis(30));
    }
    vm.write_stdin(b"q");
    let rec = vm.finish(TIMEOUT);
    assert!(rec.status.success(), "{rec:?}");
    assert!(
        rec.stdout.contains("first second third\n"),
        "{}",
        rec.stdout
    );
    // Replay gets no input from us: it must come from the log.
    let rep = replay(log.to_str().unwrap(), "echo", "64M");
    assert_identical(&rec, &rep);
}

#[test]
fn user_mode_rdtsc_is_detected_as_divergence() {
    let dir = TempDir::new("rr-rdtsc");
    let (log, _) = record(&dir, "rdtscuser", &[]);
    let rep = replay(&log, "rdtscuser", "64M");
    assert_eq!(rep.status.code(), Some(1), "{rep:?}");
    assert!(
        !rep.stdout.contains("identical to the recording"),
        "{}",
        rep.stdout
    );
    assert!(
        rep.stderr.contains("replay diverged at landmark"),
        "{}",
        rep.stderr
    );
    assert!(rep.stderr.contains("digest mismatch"), "{}", rep.stderr);
    assert!(rep.stderr.contains("NOT identical"), "{}", rep.stderr);
}

#[test]
fn a_log_from_another_guest_is_refused() {
    let dir = TempDir::new("rr-header");
    let (log, _) = record(&dir, "hello", &[]);
    let out = replay(&log, "hello", "128M");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr
            .contains("recorded from a different guest: memory was 64 MiB, now 128 MiB"),
        "{}",
        out.stderr
    );
    let out = replay(&log, "ticker", "64M");
    assert!(
        out.stderr.contains("kernel image differs"),
        "{}",
        out.stderr
    );
    let out = replay_with(&log, "hello", "64M", &["--cmdline", "quiet"]);
    assert!(
        out.stderr.contains("the command line was"),
        "{}",
        out.stderr
    );
}

#[test]
fn corrupted_and_truncated_logs_are_clear_errors() {
    let dir = TempDir::new("rr-corrupt");
    let (log, _) = record(&dir, "ticker", &[]);
    let bytes = std::fs::read(&log).unwrap();
    let path = |name: &str| dir.0.join(name).to_str().unwrap().to_string();

    // Flip a bit in the payload of the record that holds the middle byte (a
    // flip in a frame's length field would read as a malformed or cut frame).
    let records = records_with_offsets(&bytes);
    let boundaries: Vec<u64> = records.iter().map(|&(at, _)| at).collect();
    let record_holding = |at: u64| *boundaries.iter().rfind(|&&b| b <= at).unwrap();
    let mut flipped = bytes.clone();
    let after_length_prefix = record_holding(bytes.len() as u64 / 2) + 4;
    flipped[after_length_prefix as usize] ^= 0x01;
    std::fs::write(path("flipped.log"), &flipped).unwrap();
    ticker_replay_refused(
        &path("flipped.log"),
        &["is corrupted: checksum mismatch", "log record "],
    );

    // Cut inside the record that holds byte 2/3 (a cut that happens to fall
    // on a record boundary leaves a shorter log of whole records, which is a
    // different error, checked next).
    let record_start = record_holding(bytes.len() as u64 * 2 / 3);
    let inside = record_start + 1;
    assert!(!boundaries.contains(&inside), "a one-byte record?");
    std::fs::write(path("cut.log"), &bytes[..inside as usize]).unwrap();
    ticker_replay_refused(
        &path("cut.log"),
        &[
            "log truncated in record",
            "last complete record was at landmark",
        ],
    );

    std::fs::write(path("cut-whole.log"), &bytes[..record_start as usize]).unwrap();
    ticker_replay_refused(&path("cut-whole.log"), &["without an end record"]);

    // Cut between two records of one landmark (a sync point and its
    // interrupt): the guest then waits for an interrupt the log lost, and
    // the replay must say the log was cut, not that it diverged.
    let inside_landmark = records
        .windows(2)
        .skip(records.len() * 2 / 3)
        .find(|pair| pair[0].1.is_some() && pair[0].1 == pair[1].1)
        .map(|pair| pair[1].0)
        .expect("a landmark with two records past 2/3 of the log");
    std::fs::write(path("cut-landmark.log"), &bytes[..inside_landmark as usize]).unwrap();
    ticker_replay_refused(&path("cut-landmark.log"), &["without an end record"]);

    std::fs::write(path("header-only.log"), &bytes[..60]).unwrap();
    ticker_replay_refused(&path("header-only.log"), &["truncated"]);

    std::fs::write(path("notalog.log"), b"hello, this is not a log").unwrap();
    let out = replay(&path("notalog.log"), "ticker", "64M");
    assert!(out.stderr.contains("not a twinvm log"), "{}", out.stderr);

    let out = replay(&path("missing.log"), "ticker", "64M");
    assert!(out.stderr.contains("opening log"), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"));
}

/// Replaying the ticker guest from `log` fails (exit 1) with every one of
/// `errors` in its message and never claims an identical replay.
fn ticker_replay_refused(log: &str, errors: &[&str]) {
    let out = replay(log, "ticker", "64M");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    for error in errors {
        assert!(out.stderr.contains(error), "{error:?}: {}", out.stderr);
    }
    assert!(!out.stdout.contains("identical to the recording"));
}

/// Each record's start offset and landmark, and the end of the last one
/// (with no landmark), read with the log reader the replay uses.
fn records_with_offsets(log: &[u8]) -> Vec<(u64, Option<u64>)> {
    let mut reader = LogReader::new(log).expect("the recorded log's header reads");
    let mut out = Vec::new();
    let mut at = reader.offset();
    while let Some(record) = reader.next_record().expect("the recorded log reads") {
        out.push((at, Some(record.landmark())));
        at = reader.offset();
    }
    out.push((at, None));
    out
}

/// A small deterministic generator, so the input timing is random but the
/// test is repeatable.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[test]
fn storm_replays_identically_with_input_at_random_times() {
    let dir = TempDir::new("rr-storm");
    let log = dir.0.join("storm.log");
    let mut vm = Running::spawn(&[
        "record",
        "--log",
        log.to_str().unwrap(),
        "--kernel",
        "builtin:storm",
        "--mem",
        "64M",
    ]);
    vm.wait_for_stdout("storm: ready\n", TIMEOUT);
    let mut rng = Lcg(0x5eed);
    let mut sent = 0;
    while sent < 40 && !vm.stdout_now().contains("storm: done") {
        std::thread::sleep(Duration::from_millis(5 + rng.next(60)));
        let byte = b'a' + rng.next(26) as u8;
        vm.write_stdin(&[byte]);
        sent += 1;
    }
    let rec = vm.finish(TIMEOUT);
    assert!(rec.status.success(), "{rec:?}");
    let summary = rec
        .stdout
        .lines()
        .find(|l| l.starts_with("storm: ticks="))
        .unwrap_or_else(|| panic!("{}", rec.stdout))
        .to_string();
    let rx: u64 = summary
        .split(" rx=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rx > 0, "no serial input reached the guest: {summary}");
    assert!(stat(&rec.stderr, "sync points") >= 100, "{}", rec.stderr);
    assert!(
        stat(&rec.stderr, "trapped time reads") >= 20,
        "{}",
        rec.stderr
    );
    let rep = replay(log.to_str().unwrap(), "storm", "64M");
    assert_identical(&rec, &rep);
    // The hash over every interrupt's observed user counter is the same.
    assert!(rep.stdout.contains(&summary), "{}", rep.stdout);
}

/// A minimal bzImage (boot protocol 2.15, 64-bit entry, one setup sector)
/// whose payload is `payload`, as Linux's build lays it out.
fn synthetic_bzimage(payload: &[u8]) -> Vec<u8> {
    let payload_offset = 0x100u32;
    let mut img = vec![0u8; 2 * 512 + payload_offset as usize];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 0x01; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    img[0x236..0x238].copy_from_slice(&0x0003u16.to_le_bytes()); // XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    img[0x248..0x24c].copy_from_slice(&payload_offset.to_le_bytes());
    img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    img.extend_from_slice(payload);
    img
}

/// `data` in LZ4's legacy frame as `lz4 -l` writes it (8 MiB blocks), with
/// the size trailer Linux appends.
fn lz4_legacy_payload(data: &[u8]) -> Vec<u8> {
    let mut out = 0x184c_2102u32.to_le_bytes().to_vec();
    for block in data.chunks(8 << 20) {
        let compressed = lz4_flex::block::compress(block);
        out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
        out.extend_from_slice(&compressed);
    }
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

#[test]
fn a_bzimage_is_decompressed_on_the_host_and_its_kernel_entropy_reads_replay() {
    // The entropy guest (kernel-mode RDRAND/RDSEED) wrapped in a bzImage:
    // its code is only visible once the payload is decompressed, and the
    // reads must be trapped, logged and replayed as for the ELF.
    let dir = TempDir::new("rr-bzimage");
    let elf = twinvm::guests::builtin("entropy").unwrap();
    let kernel = dir.0.join("vmlinuz");
    std::fs::write(&kernel, synthetic_bzimage(&lz4_legacy_payload(elf))).unwrap();
    let kernel = kernel.to_str().unwrap();
    let log = dir.0.join("bz.log");
    let log = log.to_str().unwrap();
    let guest = ["--kernel", kernel, "--mem", "64M"];
    let mut args = vec!["record", "--log", log];
    args.extend(guest);
    let rec = run_to_end(&args, TIMEOUT);
    assert!(rec.status.success(), "record: {rec:?}");
    assert!(rec.stdout.contains(" successes=4"), "{}", rec.stdout);
    assert_eq!(stat(&rec.stderr, "random reads"), 4, "{}", rec.stderr);
    let mut args = vec!["replay", "--log", log];
    args.extend(guest);
    let rep = run_to_end(&args, TIMEOUT);
    assert_identical(&rec, &rep);
}

#[test]
fn kernels_whose_reads_cannot_be_trapped_are_refused_by_record() {
    let dir = TempDir::new("rr-untrappable");
    let record_kernel = |kernel: &std::path::Path| {
        let log = dir.0.join("refused.log");
        let out = run_to_end(
            &[
                "record",
                "--log",
                log.to_str().unwrap(),
                "--kernel",
                kernel.to_str().unwrap(),
                "--mem",
                "64M",
            ],
            TIMEOUT,
        );
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            out.stderr.contains("cannot be recorded and replayed"),
            "{}",
            out.stderr
        );
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        // Refused before the log was created.
        assert!(!log.exists(), "a refused recording left {}", log.display());
        out.stderr
    };

    // A bzImage whose payload twinvm does not decompress (zstd).
    let zstd = dir.0.join("vmlinuz-zstd");
    let payload = [0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0];
    std::fs::write(&zstd, synthetic_bzimage(&payload)).unwrap();
    let err = record_kernel(&zstd);
    assert!(err.contains("its payload is zstd-compressed"), "{err}");
    assert!(err.contains("extract its vmlinux"), "{err}");

    // An ELF with its section headers stripped: it loads (program headers),
    // but no code section can be scanned for time reads.
    let mut stripped = twinvm::guests::builtin("hello").unwrap().to_vec();
    stripped[0x28..0x30].fill(0); // e_shoff
    stripped[0x3c..0x40].fill(0); // e_shnum, e_shstrndx
    let stripped_path = dir.0.join("stripped.elf");
    std::fs::write(&stripped_path, &stripped).unwrap();
    let err = record_kernel(&stripped_path);
    assert!(err.contains("section headers name no kernel code"), "{err}");
    // `run` still boots it, with a warning.
    let out = run_to_end(
        &[
            "run",
            "--kernel",
            stripped_path.to_str().unwrap(),
            "--mem",
            "64M",
        ],
        TIMEOUT,
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains("`record` and `replay` refuse it"),
        "{}",
        out.stderr
    );
}

/// Replay `log` (of `guest`, 64 MiB) twice: executing everything, which
/// must be identical to `recorded` and check each of its `states` sync
/// states, then with catch-up, which must end identical. The catch-up
/// replay and the landmarks it skipped.
fn replay_then_catch_up(
    log: &str,
    guest: &str,
    recorded: &Finished,
    states: u64,
) -> (Finished, u64) {
    let replayed = replay(log, guest, "64M");
    assert_identical(recorded, &replayed);
    assert_eq!(stat(&replayed.stderr, "with state"), states);
    let caught_up = replay_with(log, guest, "64M", &["--catch-up"]);
    assert_ends_identical(&caught_up);
    let skipped = stat(&caught_up.stderr, "landmarks and");
    (caught_up, skipped)
}

#[test]
fn a_replay_that_catches_up_loads_sync_points_with_state_and_ends_identical() {
    let dir = TempDir::new("catch-up");
    // Every sync point carries the machine's state.
    let (log, recorded) = record(&dir, "storm", &["--sync-state-every-ms", "0"]);
    let states = stat(&recorded.stderr, "with state");
    assert!(states > 100, "{}", recorded.stderr);
    assert_eq!(states, stat(&recorded.stderr, "sync points"));
    // A replay that executes everything checks its state at each of them;
    // one that catches up loads them instead, executes only the last
    // stretch, and its final digest still finds the recording's state.
    let (caught_up, skipped) = replay_then_catch_up(&log, "storm", &recorded, states);
    let jumps = stat(&caught_up.stderr, "times");
    let landmarks = stat(&recorded.stderr, "landmarks");
    assert!(jumps + 2 >= states, "{} of {states}", jumps);
    assert!(
        skipped * 10 > landmarks * 9,
        "{skipped} of {landmarks} skipped"
    );
}

/// portio exits at every port write and takes no ticks: no sync point
/// would ever come from a tick, so the primary makes its own when a sync
/// state is overdue, and a backup behind can still catch up.
#[test]
fn a_guest_that_never_needs_a_sync_point_still_gets_sync_states() {
    let dir = TempDir::new("forced-states");
    let (log, recorded) = record(&dir, "portio", &["--sync-state-every-ms", "10"]);
    let states = stat(&recorded.stderr, "with state");
    let made = stat(&recorded.stderr, "made for one");
    // About one every 40 ms (four intervals) of a ~1 s run.
    assert!(states >= 10, "{}", recorded.stderr);
    assert_eq!(
        made,
        stat(&recorded.stderr, "sync points"),
        "{}",
        recorded.stderr
    );
    assert_eq!(made, states, "{}", recorded.stderr);
    let (_, skipped) = replay_then_catch_up(&log, "portio", &recorded, states);
    let landmarks = stat(&recorded.stderr, "landmarks");
    assert!(
        skipped * 10 > landmarks * 8,
        "{skipped} of {landmarks} skipped"
    );
}
