//! `twinvm record` with a bounded log, under real KVM onto real files: the
//! size limit ends the recording cleanly (exit status 1, a message, a log
//! within the limit that replays identically up to its end); a limit too
//! small is refused before the log exists; a full disk (ENOSPC on a tiny
//! tmpfs) is a clear error that leaves only whole records, never a hang.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{run_to_end, Finished, TempDir};

const TIMEOUT: Duration = Duration::from_secs(120);

/// The memwrite guest: user-mode stores of random words over a working set
/// under a timer, so every sync point carries many incompressible pages.
fn memwrite(cmdline: &str) -> [&str; 6] {
    [
        "--kernel",
        "builtin:memwrite",
        "--mem",
        "64M",
        "--cmdline",
        cmdline,
    ]
}

fn record(log: &Path, console: &Path, cmdline: &str, extra: &[&str]) -> Finished {
    let log = log.to_str().unwrap();
    let console = console.to_str().unwrap();
    let mut args = vec!["record", "--log", log, "--serial", console];
    args.extend_from_slice(&memwrite(cmdline));
    args.extend_from_slice(extra);
    run_to_end(&args, TIMEOUT)
}

fn replay(log: &Path, console: &Path, cmdline: &str) -> Finished {
    let log = log.to_str().unwrap();
    let console = console.to_str().unwrap();
    let mut args = vec!["replay", "--log", log, "--serial", console];
    args.extend_from_slice(&memwrite(cmdline));
    run_to_end(&args, TIMEOUT)
}

/// Record past a 2-3 MiB limit, then replay: `ending` names how the
/// recording had to end.
fn limit_ends_the_recording_and_the_log_replays(
    limit: &str,
    limit_bytes: u64,
    cmdline: &str,
    ending: &str,
) {
    let dir = TempDir::new(&format!(
        "limit-{limit}-{}",
        cmdline.replace([' ', '='], "-")
    ));
    let log = dir.0.join("a.log");
    let recorded = dir.0.join("recorded.txt");
    let rec = record(&log, &recorded, cmdline, &["--max-log-size", limit]);
    assert_eq!(rec.status.code(), Some(1), "{rec:?}");
    assert!(
        rec.stderr.contains(&format!(
            "the log reached its size limit of {limit_bytes} bytes (--max-log-size): the recording was ended at landmark "
        )),
        "{}",
        rec.stderr
    );
    assert!(rec.stderr.contains(ending), "{}", rec.stderr);
    assert!(
        rec.stderr.contains("replays identically up to there"),
        "{}",
        rec.stderr
    );
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(
        size <= limit_bytes,
        "a {size}-byte log past its {limit_bytes}-byte limit"
    );
    let console = std::fs::read_to_string(&recorded).unwrap();
    assert!(console.contains("memwrite: ws="), "{console}");

    let replayed = dir.0.join("replayed.txt");
    let rep = replay(&log, &replayed, cmdline);
    assert!(rep.status.success(), "replay: {rep:?}");
    assert!(
        rep.stdout
            .contains("replay: final state identical to the recording"),
        "{rep:?}"
    );
    assert_eq!(std::fs::read_to_string(&replayed).unwrap(), console);
}

#[test]
fn the_size_limit_ends_the_recording_with_its_final_digest() {
    // Sync points of ~250-300 pages each (fewer and larger under the
    // sync-point budget; the rounds make sure the log outgrows the limit):
    // the recording ends at a landmark once the next one might not fit.
    // 3 MiB, so that the first one, whose
    // size depends on how far the loop got (seen under load: it did not fit
    // in the ~1.4 MiB a 2 MiB limit leaves beside the final digest's room),
    // always fits and the room rule is what ends the recording.
    limit_ends_the_recording_and_the_log_replays(
        "3M",
        3 << 20,
        "ws=1024 every=1 rounds=400000000",
        "with its final digest and End record",
    );
}

#[test]
fn a_sync_point_bigger_than_the_room_left_ends_the_recording_before_it() {
    // At 19 Hz the first sync point in the loop carries thousands of pages
    // of a 16 MiB working set, far more than the 2 MiB limit holds (about
    // 350 whole pages once the final digest's room is kept). Under heavy
    // host load the guest's first-store faults are slow: a first sync point
    // of 434 pages was seen, which a 3 MiB limit held, so the recording then
    // ended on the room rule instead, correctly but not what this tests.
    limit_ends_the_recording_and_the_log_replays(
        "2M",
        2 << 20,
        "ws=16384 every=1 hz=19",
        "the one before a sync point that did not fit, with its End record but no final digest",
    );
}

#[test]
fn a_limit_too_small_is_refused_before_the_log_exists() {
    let dir = TempDir::new("limit-small");
    let log = dir.0.join("a.log");
    let rec = record(&log, &dir.0.join("c.txt"), "", &["--max-log-size", "1M"]);
    assert!(!rec.status.success(), "{rec:?}");
    assert!(
        rec.stderr
            .contains("a log limit of 1048576 bytes (--max-log-size) is too small"),
        "{}",
        rec.stderr
    );
    assert!(rec.stderr.contains("final digest"), "{}", rec.stderr);
    assert!(!log.exists(), "the refused recording created its log");

    let bad = record(&log, &dir.0.join("c.txt"), "", &["--max-log-size", "2X"]);
    assert!(!bad.status.success(), "{bad:?}");
    assert!(bad.stderr.contains("unknown unit `x`"), "{}", bad.stderr);
    assert!(!log.exists());
}

/// A tmpfs of `size` mounted on `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs on {} (this test needs root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// memwrite's command line for the full-disk test.
const FILLS_THE_DISK: &str = "ws=4096 every=1 rounds=400000000";

#[test]
fn a_full_disk_is_a_clear_error_and_leaves_only_whole_records() {
    let dir = TempDir::new("enospc");
    let small = Tmpfs::mount(dir.0.join("small"), "4m");
    let log = small.0.join("a.log");
    let console = dir.0.join("recorded.txt");

    // The default limit (the free space less 5%, at least 64 MiB) leaves
    // nothing on a 4 MiB filesystem: refused before the log exists.
    let rec = record(&log, &console, "ws=1024 every=1", &[]);
    assert!(!rec.status.success(), "{rec:?}");
    assert!(
        rec.stderr.contains("(the default: the free space"),
        "{}",
        rec.stderr
    );
    assert!(!log.exists());

    // A limit beyond the filesystem: the disk fills first. A store every
    // round over 4 MiB logs ~250 Mbit/s even under the sync-point budget
    // (sync points of ~800 pages, nearly all sent whole), and the first sync
    // point alone carries the working set the guest filled.
    let started = std::time::Instant::now();
    let rec = record(&log, &console, FILLS_THE_DISK, &["--max-log-size", "64M"]);
    assert!(started.elapsed() < Duration::from_secs(60), "{rec:?}");
    assert!(!rec.status.success(), "{rec:?}");
    assert!(
        rec.stderr.contains("No space left on device"),
        "{}",
        rec.stderr
    );
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(
        rec.stderr.contains(&format!(
            "the log was cut back to its last whole record ({size} bytes;"
        )),
        "{size}: {}",
        rec.stderr
    );
    assert!(size > 0, "the header was written first");

    // Whole records only: the replay follows them to the last and says the
    // log ends there; nothing in it is truncated or corrupt.
    let rep = replay(&log, &dir.0.join("replayed.txt"), FILLS_THE_DISK);
    assert!(!rep.status.success(), "{rep:?}");
    assert!(
        rep.stderr.contains("without an end record"),
        "{}",
        rep.stderr
    );
    for bad in ["truncated in record", "malformed", "checksum", "corrupt"] {
        assert!(!rep.stderr.contains(bad), "{bad}: {}", rep.stderr);
    }
    drop(small);
}
