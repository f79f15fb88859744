//! Decoding benchmark: what a live backup's link thread spends turning log
//! bytes into records. Prints figures, asserts nothing about speed
//! (docs/benchmarks.md, "The link thread's decoding").
//!
//! Each log is decoded as the backup does it: its bytes pushed into a
//! `RecordDecoder` 256 KiB at a time (the link thread's read size), every
//! record handed over a bounded channel to a second thread that writes each
//! page into a guest-sized buffer and drops the record (the vCPU thread's
//! share). Reported per log: records, sync-point pages and how they
//! travelled, the decoding thread's CPU time (per page, and log MB per CPU
//! second) and the consuming thread's.
//!
//! Run: `cargo bench --bench decode`. By default it first records two test
//! guests with the `twinvm` binary (memwrite's 365k-stores row of issue 14
//! and the ticker guest, a few seconds each) into the temp dir;
//! `TWINVM_DECODE_LOGS=a.log,b.log` decodes those logs instead (for
//! example a Linux recording: docs/benchmarks.md gives the command).
//! `TWINVM_DECODE_RUNS=N` decodes each log N times (default 3) and prints
//! each run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use twinvm::replay::log::{LogReader, PageStats, Record, RecordDecoder};

/// The link thread's read size (src/ft/link).
const READ_BYTES: usize = 256 << 10;
/// Records in flight between the two threads (the backup bounds its queue
/// by bytes; a count is enough to keep the consumer busy here).
const QUEUE_RECORDS: usize = 4096;

/// CPU time of the calling thread, in seconds.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the
    // call, and CLOCK_THREAD_CPUTIME_ID needs nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// One decoding of one log.
struct Decoded {
    records: u64,
    pages: u64,
    stats: PageStats,
    decode_cpu: f64,
    consume_cpu: f64,
    wall: f64,
}

/// Pages a record carries, as the backup writes them into guest memory.
fn pages_of(record: &Record) -> &[(u64, twinvm::replay::log::PageData)] {
    match record {
        Record::SyncPoint { pages, .. } | Record::SyncPages { pages, .. } => pages,
        Record::SyncState { state, .. } => &state.pages,
        _ => &[],
    }
}

fn decode(path: &Path) -> Result<Decoded> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let reader = LogReader::new(&bytes[..]).with_context(|| format!("{}", path.display()))?;
    let header = reader.header().clone();
    let body = &bytes[reader.offset() as usize..];
    let mem_bytes = usize::try_from(header.mem_bytes).context("guest memory size")?;

    let (tx, rx) = mpsc::sync_channel::<Record>(QUEUE_RECORDS);
    let consumer = thread::spawn(move || {
        let start = thread_cpu_seconds();
        let mut memory = vec![0u8; mem_bytes];
        let mut pages = 0u64;
        for record in rx {
            for (gpa, data) in pages_of(&record) {
                let at = *gpa as usize;
                if let Some(dest) = memory.get_mut(at..at + data.len()) {
                    dest.copy_from_slice(data);
                }
                pages += 1;
            }
        }
        (pages, thread_cpu_seconds() - start)
    });

    let wall = Instant::now();
    let start = thread_cpu_seconds();
    let mut decoder = RecordDecoder::new(&header);
    let mut records = 0u64;
    for chunk in body.chunks(READ_BYTES) {
        decoder.push(chunk);
        while let Some(record) = decoder.next_record().context("decoding")? {
            records += 1;
            if tx.send(record).is_err() {
                bail!("the consuming thread ended early");
            }
        }
    }
    let decode_cpu = thread_cpu_seconds() - start;
    let stats = decoder.page_stats();
    drop(tx);
    let (pages, consume_cpu) = consumer
        .join()
        .map_err(|_| anyhow::anyhow!("the consuming thread panicked"))?;
    Ok(Decoded {
        records,
        pages,
        stats,
        decode_cpu,
        consume_cpu,
        wall: wall.elapsed().as_secs_f64(),
    })
}

/// Record `guest` with the twinvm binary into `dir`.
fn record(dir: &Path, name: &str, guest: &str, cmdline: &str) -> Result<PathBuf> {
    let log = dir.join(format!("{name}.log"));
    let exe = env!("CARGO_BIN_EXE_twinvm");
    eprintln!("recording {name} ({guest} {cmdline}) ...");
    let out = Command::new(exe)
        .args(["record", "--log"])
        .arg(&log)
        .args(["--kernel", guest, "--mem", "64M", "--cmdline", cmdline])
        .output()
        .with_context(|| format!("running {exe}"))?;
    if !out.status.success() {
        bail!(
            "recording {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(log)
}

fn main() -> Result<()> {
    let runs: usize = match std::env::var("TWINVM_DECODE_RUNS") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("TWINVM_DECODE_RUNS={v}: not a number"))?,
        Err(_) => 3,
    };
    let scratch = tempfile::tempdir().context("temp dir")?;
    let logs: Vec<PathBuf> = match std::env::var("TWINVM_DECODE_LOGS") {
        Ok(list) => list.split(',').map(PathBuf::from).collect(),
        Err(_) => vec![
            record(
                scratch.path(),
                "memwrite-365k",
                "builtin:memwrite",
                "ws=4096 every=800 rounds=2100000000",
            )?,
            record(scratch.path(), "ticker", "builtin:ticker", "")?,
        ],
    };
    println!(
        "{:<24} {:>3} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "log",
        "run",
        "MB",
        "records",
        "pages",
        "whole",
        "zero",
        "same",
        "delta",
        "dec s",
        "ns/page",
        "MB/cpu-s",
        "use s"
    );
    for log in &logs {
        let mb = fs::metadata(log)
            .with_context(|| format!("{}", log.display()))?
            .len() as f64
            / 1e6;
        let name = log
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for run in 1..=runs {
            let d = decode(log)?;
            println!(
                "{:<24} {:>3} {:>9.1} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8.3} {:>8.0} {:>9.1} {:>8.3}",
                name,
                run,
                mb,
                d.records,
                d.pages,
                d.stats.full,
                d.stats.zero,
                d.stats.same,
                d.stats.delta,
                d.decode_cpu,
                d.decode_cpu * 1e9 / d.pages.max(1) as f64,
                mb / d.decode_cpu,
                d.consume_cpu
            );
            eprintln!("  wall {:.3} s", d.wall);
        }
    }
    Ok(())
}
