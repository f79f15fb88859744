//! Every divergence detector of the replay, proven: each test makes the
//! backup wrong in exactly one way (a guest whose one exit changes kind, the
//! hidden `replay --test-perturb` hook, a log edited with the library's own
//! reader and writer) and requires the replay to report that divergence, or
//! refuse the log, naming the right thing — never "identical".

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{run_to_end, Finished, TempDir};
use twinvm::replay::log::{EndReason, LogHeader, LogReader, LogWriter, Record};

const TIMEOUT: Duration = Duration::from_secs(180);

fn path_in(dir: &TempDir, name: &str) -> String {
    dir.0.join(name).to_str().unwrap().to_string()
}

fn record(dir: &TempDir, name: &str, guest: &str, extra: &[&str]) -> String {
    let log = path_in(dir, name);
    let kernel = format!("builtin:{guest}");
    let mut args = vec!["record", "--log", &log, "--kernel", &kernel, "--mem", "64M"];
    args.extend_from_slice(extra);
    let out = run_to_end(&args, TIMEOUT);
    assert!(out.status.success(), "record {guest}: {out:?}");
    log
}

fn replay(log: &str, guest: &str, extra: &[&str]) -> Finished {
    let kernel = format!("builtin:{guest}");
    let mut args = vec!["replay", "--log", log, "--kernel", &kernel, "--mem", "64M"];
    args.extend_from_slice(extra);
    run_to_end(&args, TIMEOUT)
}

fn identical(out: &Finished) -> bool {
    out.status.success()
        && out
            .stdout
            .contains("replay: final state identical to the recording")
}

/// The replay failed, said so, and its error contains `needle`.
fn assert_refused(out: &Finished, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        !out.stdout.contains("identical to the recording"),
        "{out:?}"
    );
    assert!(out.stderr.contains("NOT identical"), "{}", out.stderr);
    assert!(
        out.stderr.contains(needle),
        "expected {needle:?}: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

/// The replay reported divergence with `needle` in its message; returns the
/// landmark it named.
fn assert_diverged(out: &Finished, needle: &str) -> u64 {
    assert_refused(out, needle);
    diverged_at(&out.stderr).unwrap_or_else(|| panic!("no landmark named: {}", out.stderr))
}

/// `L` in "replay diverged at landmark L:".
fn diverged_at(stderr: &str) -> Option<u64> {
    let rest = stderr.split("replay diverged at landmark ").nth(1)?;
    rest.split(':').next()?.parse().ok()
}

fn read_log(path: &str) -> (LogHeader, Vec<Record>) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut reader = LogReader::new(file).unwrap();
    let header = reader.header().clone();
    let mut records = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        records.push(r);
    }
    (header, records)
}

fn log_bytes(header: &LogHeader, records: &[Record]) -> Vec<u8> {
    let mut w = LogWriter::new(Vec::new(), header).unwrap();
    for r in records {
        w.append(r).unwrap();
    }
    w.into_inner()
}

fn write_log(path: &str, header: &LogHeader, records: &[Record]) {
    std::fs::write(path, log_bytes(header, records)).unwrap();
}

/// Landmark numbers that carry a record of the kind `is`.
fn landmarks_with(records: &[Record], is: impl Fn(&Record) -> bool) -> BTreeSet<u64> {
    records
        .iter()
        .filter(|r| is(r))
        .map(Record::landmark)
        .collect()
}

/// A Trace record: landmark, RIP, the landmark's own signature.
type Trace = (u64, u64, [u8; 16]);

/// Each Trace record of a log.
fn traces(records: &[Record]) -> Vec<Trace> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Trace {
                landmark,
                rip,
                signature,
            } => Some((*landmark, *rip, *signature)),
            _ => None,
        })
        .collect()
}

/// Replay `log` of the `exitkind` guest until the backup has taken both
/// branches (bounded): an identical replay when it took the recording's,
/// and a divergence naming `needle` when it took the other. Returns the
/// divergence's stderr.
fn replay_exitkind_until_both_branches(log: &str, needle: &str) -> String {
    const TRIES: usize = 24;
    let mut same = 0;
    let mut diverged = None;
    for _ in 0..TRIES {
        let out = replay(log, "exitkind", &[]);
        if identical(&out) {
            same += 1;
        } else {
            assert_diverged(&out, needle);
            diverged = Some(out.stderr);
        }
        if same > 0 && diverged.is_some() {
            break;
        }
    }
    assert!(same > 0, "no replay of {TRIES} took the recording's branch");
    diverged.unwrap_or_else(|| panic!("no replay of {TRIES} took the other branch"))
}

#[test]
fn an_in_where_the_recording_made_an_out_is_caught_by_the_landmark_signature() {
    let dir = TempDir::new("dv-exitkind");
    // Both branches occur, and they differ in exactly one landmark's exit:
    // record (traced) until two recordings disagree, comparing each
    // landmark's own signature.
    let mut logs: Vec<(String, Vec<Trace>)> = Vec::new();
    for i in 0..24 {
        let log = record(
            &dir,
            &format!("traced-{i}.log"),
            "exitkind",
            &["--trace-landmarks"],
        );
        let t = traces(&read_log(&log).1);
        if logs.iter().all(|(_, other)| *other == t) {
            logs.push((log, t));
            continue;
        }
        logs.push((log, t));
        break;
    }
    let (first, last) = (&logs[0].1, &logs[logs.len() - 1].1);
    assert_ne!(first, last, "{} recordings all took one branch", logs.len());
    assert_eq!(
        first.len(),
        last.len(),
        "the branches made different landmarks"
    );
    let differing: Vec<u64> = first
        .iter()
        .zip(last)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.0)
        .collect();
    assert_eq!(differing.len(), 1, "landmarks {differing:?} differ");
    let the_landmark = differing[0];

    // Traced: the replay stops at that very landmark and says its exit differs.
    let stderr = replay_exitkind_until_both_branches(
        &logs[0].0,
        "this landmark's exit differs from the primary's",
    );
    assert_eq!(diverged_at(&stderr), Some(the_landmark), "{stderr}");

    // Untraced: the next digest catches it by the running signature alone;
    // registers, memory and devices are the same on both branches.
    let log = record(&dir, "plain.log", "exitkind", &[]);
    let stderr = replay_exitkind_until_both_branches(
        &log,
        "the landmarks since the last digest differ from the primary's",
    );
    for other in [
        "vCPU state differs",
        "memory differs",
        "device state differs",
    ] {
        assert!(!stderr.contains(other), "{stderr}");
    }
    assert!(diverged_at(&stderr) > Some(the_landmark), "{stderr}");
}

#[test]
fn a_page_only_the_backup_wrote_is_caught_by_the_whole_memory_hash() {
    let dir = TempDir::new("dv-page");
    let log = record(&dir, "hello.log", "hello", &["--digest-interval", "16"]);
    // 48 MiB: a page the guest never touches.
    let out = replay(
        &log,
        "hello",
        &["--test-perturb", "write-page:0x3000000@10"],
    );
    let at = assert_diverged(
        &out,
        "memory differs: the backup wrote pages the primary did not (first: 0x3000000)",
    );
    // Caught at the first digest after the write.
    assert_eq!(at, 16, "{}", out.stderr);
    for other in [
        "vCPU state differs",
        "device state differs",
        "landmarks since",
    ] {
        assert!(!out.stderr.contains(other), "{}", out.stderr);
    }
}

#[test]
fn a_device_state_difference_is_caught() {
    let dir = TempDir::new("dv-device");
    let log = record(&dir, "hello.log", "hello", &["--digest-interval", "16"]);
    let out = replay(&log, "hello", &["--test-perturb", "device:rtc@10"]);
    let at = assert_diverged(&out, "digest mismatch: device state differs");
    assert_eq!(at, 16, "{}", out.stderr);
    for other in ["vCPU state differs", "memory differs", "landmarks since"] {
        assert!(!out.stderr.contains(other), "{}", out.stderr);
    }
}

#[test]
fn a_sync_state_check_catches_a_device_difference_first() {
    let dir = TempDir::new("dv-sync-state");
    // Every sync point with state (each followed by a digest, which the
    // state check comes before); no periodic digests.
    let log = record(
        &dir,
        "storm.log",
        "storm",
        &["--sync-state-every-ms", "0", "--digest-interval", "1000000"],
    );
    let out = replay(&log, "storm", &["--test-perturb", "device:rtc@50"]);
    let at = assert_diverged(&out, "at a sync point with state: device state differs");
    assert!(at > 50 && at < 1000, "{}", out.stderr);
    assert!(!out.stderr.contains("digest mismatch"), "{}", out.stderr);
}

#[test]
fn a_vcpu_state_difference_is_caught_and_named() {
    let dir = TempDir::new("dv-vcpu");
    let log = record(&dir, "hello.log", "hello", &["--digest-interval", "16"]);
    // IA32_KERNEL_GS_BASE: hello never executes SWAPGS.
    let out = replay(&log, "hello", &["--test-perturb", "msr:0xc0000102@10"]);
    let at = assert_diverged(&out, "digest mismatch: vCPU state differs (MSRs)");
    assert_eq!(at, 16, "{}", out.stderr);
    for other in ["device state differs", "memory differs", "landmarks since"] {
        assert!(!out.stderr.contains(other), "{}", out.stderr);
    }
}

#[test]
fn the_test_hook_is_hidden_and_refuses_what_it_cannot_do() {
    let dir = TempDir::new("dv-hook");
    let log = record(&dir, "hello.log", "hello", &[]);
    let help = run_to_end(&["replay", "--help"], TIMEOUT);
    assert!(!help.stdout.contains("perturb"), "{}", help.stdout);
    let out = replay(&log, "hello", &["--test-perturb", "write-page:0x1000"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("expected KIND@LANDMARK"),
        "{}",
        out.stderr
    );
    let out = replay(&log, "hello", &["--test-perturb", "write-page:0x8000000@3"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("not in the guest's RAM (64 MiB)"),
        "{}",
        out.stderr
    );
    // A landmark the replay never reaches perturbs nothing: an error, not
    // an "identical" a test could take for a detector that missed it.
    let out = replay(&log, "hello", &["--test-perturb", "device:rtc@99999999"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!out.stdout.contains("identical"), "{}", out.stdout);
    assert!(
        out.stderr.contains("so nothing was perturbed"),
        "{}",
        out.stderr
    );
}

/// A ticker recording: timer interrupts, polls and sync points.
fn ticker_log(dir: &TempDir) -> (String, LogHeader, Vec<Record>) {
    // Every tick within the sync bound (no sync-point budget): the edits
    // below need ticks whose handler's first landmark logs nothing, and
    // under the budget a 1 kHz guest's next tick is usually raised (a Poll
    // record) at that landmark already, so runs could lack enough of them.
    let log = record(dir, "ticker.log", "ticker", &["--sync-budget-percent", "0"]);
    let (header, records) = read_log(&log);
    assert!(
        records
            .iter()
            .filter(|r| matches!(r, Record::Interrupt { .. }))
            .count()
            >= 20,
        "too few interrupts recorded"
    );
    (log, header, records)
}

/// Index of the `n`th record whose index matches `is` at a landmark without a digest
/// (a digest there would compare the state before the check under test).
fn nth_without_digest(records: &[Record], n: usize, is: impl Fn(usize) -> bool) -> usize {
    let digests = landmarks_with(records, |r| matches!(r, Record::Digest { .. }));
    records
        .iter()
        .enumerate()
        .filter(|(i, r)| is(*i) && !digests.contains(&r.landmark()))
        .nth(n)
        .map(|(i, _)| i)
        .expect("not enough such records")
}

#[test]
fn a_missing_interrupt_record_is_caught_where_the_interrupt_waits() {
    let dir = TempDir::new("dv-nointr");
    let (_, header, mut records) = ticker_log(&dir);
    let i = nth_without_digest(&records, 5, |i| {
        matches!(records[i], Record::Interrupt { .. })
    });
    let landmark = records.remove(i).landmark();
    let edited = path_in(&dir, "edited.log");
    write_log(&edited, &header, &records);
    let out = replay(&edited, "ticker", &[]);
    let at = assert_diverged(
        &out,
        "an interrupt the guest can take is waiting here, but the log injects none",
    );
    assert_eq!(at, landmark, "{}", out.stderr);
}

#[test]
fn a_second_interrupt_at_one_landmark_is_caught() {
    let dir = TempDir::new("dv-twointr");
    let (_, header, mut records) = ticker_log(&dir);
    let i = nth_without_digest(&records, 5, |i| {
        matches!(records[i], Record::Interrupt { .. })
    });
    let landmark = records[i].landmark();
    records.insert(i + 1, records[i].clone());
    let edited = path_in(&dir, "edited.log");
    write_log(&edited, &header, &records);
    let out = replay(&edited, "ticker", &[]);
    let at = assert_diverged(&out, "a second time at one landmark");
    assert_eq!(at, landmark, "{}", out.stderr);
}

#[test]
fn a_poll_the_backup_would_not_make_is_caught() {
    let dir = TempDir::new("dv-poll");
    let (_, header, records) = ticker_log(&dir);
    let is_poll = |r: &Record| matches!(r, Record::Poll { .. });

    // A second Poll right after one that raised IRQ0: the primary never
    // polls while an interrupt waits.
    let mut twice = records.clone();
    // The n-th Poll that raised IRQ0, injected at once at its landmark.
    let i = nth_without_digest(&twice, 5, |i| {
        is_poll(&twice[i])
            && matches!(twice.get(i + 1), Some(Record::Interrupt { landmark, .. }) if *landmark == twice[i].landmark())
    });
    let landmark = twice[i].landmark();
    twice.insert(i + 1, twice[i].clone());
    let edited = path_in(&dir, "twice.log");
    write_log(&edited, &header, &twice);
    let out = replay(&edited, "ticker", &[]);
    let at = assert_diverged(
        &out,
        "the log advances the timers, but an interrupt is waiting here",
    );
    assert_eq!(at, landmark, "{}", out.stderr);

    // A Poll to a time at which no timer is due: the previous poll's time.
    let mut early = records.clone();
    let polls: Vec<usize> = (0..early.len()).filter(|&i| is_poll(&early[i])).collect();
    let (previous, this) = (polls[4], polls[5]);
    let Record::Poll { now: before, .. } = early[previous] else {
        unreachable!()
    };
    let landmark = early[this].landmark();
    early[this] = Record::Poll {
        landmark,
        now: before,
    };
    let edited = path_in(&dir, "early.log");
    write_log(&edited, &header, &early);
    let out = replay(&edited, "ticker", &[]);
    let at = assert_diverged(
        &out,
        &format!("the log advances the timers to {before} ns, but no timer is due by then here"),
    );
    assert_eq!(at, landmark, "{}", out.stderr);
}

#[test]
fn a_logged_value_the_backup_does_not_ask_for_or_cannot_take_is_caught() {
    let dir = TempDir::new("dv-values");
    let (_, header, records) = ticker_log(&dir);

    // A clock-port access (the PIT programmed at start) without its IoTime.
    let mut no_time = records.clone();
    let i = no_time
        .iter()
        .position(|r| matches!(r, Record::IoTime { .. }))
        .expect("no IoTime record");
    let landmark = no_time.remove(i).landmark();
    let edited = path_in(&dir, "no-time.log");
    write_log(&edited, &header, &no_time);
    let out = replay(&edited, "ticker", &[]);
    let at = assert_diverged(&out, "the guest read a clock device but the log holds");
    assert_eq!(at, landmark, "{}", out.stderr);

    // An interrupt of another vector than the backup's PIC holds.
    let mut other_vector = records.clone();
    let i = nth_without_digest(&other_vector, 5, |i| {
        matches!(other_vector[i], Record::Interrupt { .. })
    });
    let Record::Interrupt { landmark, vector } = other_vector[i] else {
        unreachable!()
    };
    other_vector[i] = Record::Interrupt {
        landmark,
        vector: vector + 1,
    };
    let edited = path_in(&dir, "other-vector.log");
    write_log(&edited, &header, &other_vector);
    let out = replay(&edited, "ticker", &[]);
    let at = assert_diverged(
        &out,
        &format!(
            "the log injects vector {:#x}, the platform has Some({vector:x})",
            vector + 1
        ),
    );
    assert_eq!(at, landmark, "{}", out.stderr);

    // An interrupt at the next landmark, inside the timer handler (IF=0).
    let mut in_handler = records.clone();
    let i = nth_without_digest(&in_handler, 5, |i| {
        matches!(in_handler[i], Record::Interrupt { .. })
            && in_handler
                .get(i + 1)
                .is_none_or(|next| next.landmark() > in_handler[i].landmark() + 1)
    });
    let Record::Interrupt { landmark, vector } = in_handler[i] else {
        unreachable!()
    };
    in_handler.insert(
        i + 1,
        Record::Interrupt {
            landmark: landmark + 1,
            vector,
        },
    );
    let edited = path_in(&dir, "in-handler.log");
    write_log(&edited, &header, &in_handler);
    let out = replay(&edited, "ticker", &[]);
    let at = assert_diverged(
        &out,
        &format!("the log injects vector {vector:#x} but the guest cannot take interrupts here"),
    );
    assert_eq!(at, landmark + 1, "{}", out.stderr);

    // More serial input than the UART's FIFO can take at one landmark.
    let dir2 = TempDir::new("dv-values-hello");
    let log = record(&dir2, "hello.log", "hello", &["--digest-interval", "16"]);
    let (header, mut records) = read_log(&log);
    let after = records
        .iter()
        .position(|r| matches!(r, Record::Digest { landmark: 32, .. }))
        .unwrap();
    records.insert(
        after + 1,
        Record::SerialInput {
            landmark: 40,
            bytes: vec![b'x'; 100],
        },
    );
    let edited = path_in(&dir2, "flood.log");
    write_log(&edited, &header, &records);
    let out = replay(&edited, "hello", &[]);
    let at = assert_diverged(&out, "the UART took 64 of 100 logged input bytes");
    assert_eq!(at, 40, "{}", out.stderr);
}

#[test]
fn a_missing_random_record_is_caught() {
    let dir = TempDir::new("dv-random");
    let log = record(&dir, "entropy.log", "entropy", &[]);
    let (header, mut records) = read_log(&log);
    let i = records
        .iter()
        .position(|r| matches!(r, Record::Random { .. }))
        .expect("no Random record");
    let landmark = records.remove(i).landmark();
    let edited = path_in(&dir, "edited.log");
    write_log(&edited, &header, &records);
    let out = replay(&edited, "entropy", &[]);
    let at = assert_diverged(&out, "the guest executed RDRAND/RDSEED but the log holds");
    assert_eq!(at, landmark, "{}", out.stderr);
}

#[test]
fn an_end_record_that_does_not_match_the_backup_is_caught() {
    let dir = TempDir::new("dv-end");
    let log = record(&dir, "hello.log", "hello", &["--digest-interval", "16"]);
    let (header, records) = read_log(&log);
    let Some(Record::End { landmark, reason }) = records.last().cloned() else {
        panic!("no End record last: {records:?}");
    };
    assert_eq!(reason, EndReason::ResetRequested);

    // The guest asked for a reset; the log says it halted for good.
    let mut halted = records.clone();
    *halted.last_mut().unwrap() = Record::End {
        landmark,
        reason: EndReason::HaltedForGood,
    };
    let edited = path_in(&dir, "halted.log");
    write_log(&edited, &header, &halted);
    let out = replay(&edited, "hello", &[]);
    let at = assert_diverged(
        &out,
        "the log ends with the guest halted, but this landmark is not a HLT here",
    );
    assert_eq!(at, landmark, "{}", out.stderr);

    // A reset request at a landmark where the guest made none: the log cut
    // after the digest at 32 and ended there "by a reset".
    let mut early: Vec<Record> = records
        .iter()
        .filter(|r| r.landmark() <= 32)
        .cloned()
        .collect();
    assert!(matches!(
        early.last(),
        Some(Record::Digest { landmark: 32, .. })
    ));
    early.push(Record::End {
        landmark: 32,
        reason: EndReason::ResetRequested,
    });
    let edited = path_in(&dir, "early.log");
    write_log(&edited, &header, &early);
    let out = replay(&edited, "hello", &[]);
    let at = assert_diverged(
        &out,
        "the log ends with a reset request, but the guest made none here",
    );
    assert_eq!(at, 32, "{}", out.stderr);
}

/// Replay `log` and measure the process's peak resident memory (KiB, from
/// wait4's rusage); killed after [`TIMEOUT`].
fn replay_with_peak_rss(log: &str, guest: &str) -> (Finished, i64) {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let kernel = format!("builtin:{guest}");
    // Reaped by wait4 below (std's wait would not give the rusage).
    #[allow(clippy::zombie_processes)]
    let mut child = Command::new(env!("CARGO_BIN_EXE_twinvm"))
        .args(["replay", "--log", log, "--kernel", &kernel, "--mem", "64M"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let pid = child.id() as libc::pid_t;
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waits for our own, not yet reaped child; status and usage
        // point at live locals.
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if reaped == pid {
            break;
        }
        assert_eq!(reaped, 0, "wait4: {}", std::io::Error::last_os_error());
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("replay of {log} did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let finished = Finished {
        status: std::process::ExitStatus::from_raw(status),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    (finished, usage.ru_maxrss)
}

#[test]
fn malformed_logs_are_refused_with_clear_errors() {
    let dir = TempDir::new("dv-malformed");
    let log = record(&dir, "hello.log", "hello", &["--digest-interval", "16"]);
    let (header, records) = read_log(&log);
    let digest_at = |l: u64| {
        records
            .iter()
            .position(|r| matches!(r, Record::Digest { landmark, .. } if *landmark == l))
            .unwrap()
    };

    // A record that goes back in landmark order.
    let mut backwards = records.clone();
    backwards.insert(
        digest_at(64) + 1,
        Record::Poll {
            landmark: 40,
            now: 1,
        },
    );
    let edited = path_in(&dir, "backwards.log");
    write_log(&edited, &header, &backwards);
    assert_refused(
        &replay(&edited, "hello", &[]),
        "is malformed: landmark 40 comes after landmark 64: records out of order",
    );

    // Sync-point pages that are not followed by their sync point.
    let mut orphan = records.clone();
    orphan.insert(
        digest_at(64) + 1,
        Record::SyncPages {
            landmark: 70,
            pages: vec![(0x3000000, vec![0x5a; 4096].into())],
        },
    );
    let edited = path_in(&dir, "orphan.log");
    write_log(&edited, &header, &orphan);
    assert_refused(
        &replay(&edited, "hello", &[]),
        "sync-point pages for landmark 70 are followed by a digest record for landmark 80",
    );

    // A frame announcing 200 MiB with 100 bytes behind it: truncated, and
    // the reader allocates only what arrives.
    let whole = log_bytes(&header, &records[..=digest_at(64)]);
    let mut huge = whole.clone();
    huge.extend_from_slice(&(200u32 << 20).to_le_bytes());
    huge.push(0x11);
    huge.extend_from_slice(&[0u8; 100]);
    let edited = path_in(&dir, "huge.log");
    std::fs::write(&edited, &huge).unwrap();
    let (out, huge_rss) = replay_with_peak_rss(&edited, "hello");
    assert_refused(&out, "log truncated in record");
    assert!(
        out.stderr
            .contains("last complete record was at landmark Some(64)"),
        "{}",
        out.stderr
    );
    // The same log cut cleanly there, for the memory a replay needs anyway.
    let edited = path_in(&dir, "cut.log");
    std::fs::write(&edited, &whole).unwrap();
    let (out, cut_rss) = replay_with_peak_rss(&edited, "hello");
    assert_refused(&out, "without an end record");
    eprintln!("peak RSS: {huge_rss} KiB behind a 200 MiB frame length, {cut_rss} KiB cut cleanly");
    assert!(
        huge_rss < cut_rss + 32 * 1024,
        "a 200 MiB frame length made the reader allocate: {huge_rss} KiB peak against {cut_rss} KiB"
    );
}
