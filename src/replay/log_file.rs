//! A log file that never ends inside a record, written behind the guest.
//!
//! `twinvm record` writes its log through this sink: records are buffered
//! and handed over only at landmark boundaries (where every record handed
//! over is whole) to a writer thread, so the vCPU's thread does not wait
//! for the file (at hundreds of Mbit/s the write was a fifth of the
//! recording thread's time outside the guest: docs/benchmarks.md,
//! "sync-point CPU"). A few buffers may
//! wait for the thread; past that the recording waits for the disk. A write
//! that fails (the disk is full: ENOSPC) cuts the file back to the end of
//! the last whole write and nothing is written after it, so the log on
//! disk is always a sequence of complete frames; the failure is reported at
//! the next landmark boundary or flush. The replay of such a log then says
//! where it stops ("log ends after landmark L without an end record"),
//! never that a record is corrupt.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::engine::LogSink;

/// Buffered bytes are handed to the writer at the next landmark boundary
/// past this.
const WRITE_OUT_AT: usize = 1 << 20;

/// Buffers handed over and not yet written before the recording waits for
/// the disk (each at least `WRITE_OUT_AT`, or one landmark's records).
const QUEUED_BUFFERS: usize = 4;

/// The writer thread starts the disk writes of every this many bytes as
/// it goes, so the fsync at the end of a recording waits for its tail,
/// not for everything (at 500 Mbit/s a 4 s recording left ~250 MB to
/// the final fsync: docs/benchmarks.md, "sync-point buffers").
const WRITEBACK_EVERY: u64 = 8 << 20;

enum ToWriter {
    Write(Vec<u8>),
    /// Answer once everything handed over before is written (or failed).
    Flush(Sender<io::Result<()>>),
}

/// The first failed write; nothing is written after it.
struct Failure {
    kind: io::ErrorKind,
    error: String,
    /// The file's length it was cut back to, and how that went.
    whole: u64,
    cut: Result<(), String>,
    /// Bytes of records not written: the failed write's and every later one.
    lost: u64,
}

impl Failure {
    fn to_error(&self) -> io::Error {
        let (whole, lost) = (self.whole, self.lost);
        let after = match &self.cut {
            Ok(()) => format!(
                "the log was cut back to its last whole record ({whole} bytes; {lost} bytes of records were not written)"
            ),
            Err(c) => format!(
                "cutting the log back to its last whole record ({whole} bytes) failed too: {c}; {lost} bytes of records were not written"
            ),
        };
        io::Error::new(self.kind, format!("{}; {after}", self.error))
    }
}

/// What the sink and its writer thread share.
#[derive(Default)]
struct Written {
    /// Bytes in the file, all of them whole frames (or the magic and
    /// header).
    whole: AtomicU64,
    /// Set with `failure`: checked at every landmark without a lock.
    has_failed: AtomicBool,
    failure: Mutex<Option<Failure>>,
}

impl Written {
    fn failure(&self) -> std::sync::MutexGuard<'_, Option<Failure>> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, failure: Failure) {
        *self.failure() = Some(failure);
        self.has_failed.store(true, Ordering::Release);
    }

    fn failed(&self) -> io::Result<()> {
        if !self.has_failed.load(Ordering::Acquire) {
            return Ok(());
        }
        match &*self.failure() {
            Some(failure) => Err(failure.to_error()),
            None => Ok(()),
        }
    }
}

/// See the module comment.
pub struct LogFile {
    buf: Vec<u8>,
    to_writer: Option<Sender<ToWriter>>,
    /// Written buffers come back here to be filled again.
    spare: Receiver<Vec<u8>>,
    written: Arc<Written>,
    writer: Option<JoinHandle<()>>,
}

impl LogFile {
    /// A sink writing to `file` from its start (a new, empty file), with
    /// its writer thread started.
    pub fn new(file: File) -> io::Result<Self> {
        let (to_writer, requests) = bounded(QUEUED_BUFFERS);
        let (give_back, spare) = bounded(QUEUED_BUFFERS);
        let written = Arc::new(Written::default());
        let shared = Arc::clone(&written);
        let writer = std::thread::Builder::new()
            .name("twinvm-log-writer".to_string())
            .spawn(move || write_behind(file, &requests, &give_back, &shared))
            .map_err(|e| {
                io::Error::new(e.kind(), format!("starting the log writer thread: {e}"))
            })?;
        Ok(LogFile {
            buf: Vec::new(),
            to_writer: Some(to_writer),
            spare,
            written,
            writer: Some(writer),
        })
    }

    /// Bytes known to be in the file.
    pub fn bytes_in_file(&self) -> u64 {
        self.written.whole.load(Ordering::Acquire)
    }

    /// Hand the buffered records to the writer thread (waiting while it has
    /// `QUEUED_BUFFERS` to write); an earlier failure is returned instead.
    fn hand_over(&mut self) -> io::Result<()> {
        self.written.failed()?;
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = self.spare.try_recv().unwrap_or_default();
        let full = std::mem::replace(&mut self.buf, next);
        match &self.to_writer {
            Some(to_writer) if to_writer.send(ToWriter::Write(full)).is_ok() => Ok(()),
            _ => Err(self.writer_gone()),
        }
    }

    fn writer_gone(&self) -> io::Error {
        match self.written.failed() {
            Err(e) => e,
            Ok(()) => io::Error::other("the log writer thread is gone"),
        }
    }

    /// Everything handed over is written (or an error says what was not).
    fn wait_for_writer(&mut self) -> io::Result<()> {
        let (answer, answered) = bounded(1);
        let sent = self
            .to_writer
            .as_ref()
            .is_some_and(|w| w.send(ToWriter::Flush(answer)).is_ok());
        match answered.recv() {
            Ok(result) if sent => result,
            _ => Err(self.writer_gone()),
        }
    }
}

/// The writer thread: write each buffer whole, or cut the file back to
/// the last whole one and write nothing more.
fn write_behind(
    mut file: File,
    requests: &Receiver<ToWriter>,
    give_back: &Sender<Vec<u8>>,
    written: &Written,
) {
    // Where the last writeback started; None once the file refused one (a
    // pipe, a device): it is only a head start for the final fsync.
    let mut writeback_from = Some(0u64);
    for request in requests {
        match request {
            ToWriter::Write(mut buf) => {
                if written.has_failed.load(Ordering::Acquire) {
                    if let Some(failed) = &mut *written.failure() {
                        failed.lost += buf.len() as u64;
                    }
                } else if let Err(e) = file.write_all(&buf) {
                    let whole = written.whole.load(Ordering::Acquire);
                    let cut = file
                        .set_len(whole)
                        .and_then(|()| file.seek(SeekFrom::Start(whole)).map(|_| ()))
                        .map_err(|c| c.to_string());
                    written.fail(Failure {
                        kind: e.kind(),
                        error: e.to_string(),
                        whole,
                        cut,
                        lost: buf.len() as u64,
                    });
                } else {
                    let whole = written.whole.fetch_add(buf.len() as u64, Ordering::Release)
                        + buf.len() as u64;
                    if let Some(from) = writeback_from.filter(|&f| whole - f >= WRITEBACK_EVERY) {
                        writeback_from =
                            match crate::vmm::sys::start_writeback(&file, from, whole - from) {
                                Ok(()) => Some(whole),
                                Err(e) => {
                                    tracing::debug!("the log file takes no early writeback: {e}");
                                    None
                                }
                            };
                    }
                }
                buf.clear();
                let _ = give_back.try_send(buf);
            }
            ToWriter::Flush(answer) => {
                let result = written.failed().and_then(|()| file.flush());
                let _ = answer.send(result);
            }
        }
    }
}

impl Write for LogFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    /// Called by the log writer between records only: returns once every
    /// byte so far is in the file.
    fn flush(&mut self) -> io::Result<()> {
        self.hand_over()?;
        self.wait_for_writer()
    }
}

/// A run that ends in an error (a triple fault, a failed write) drops its
/// log unflushed: what is buffered is whole records (the log writer hands
/// over one whole frame per write), so it is written out, as `BufWriter`
/// would; a failure here is cut back like any other.
impl Drop for LogFile {
    fn drop(&mut self) {
        let handed = self.hand_over();
        // The writer thread ends once it has written what it was handed.
        self.to_writer = None;
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::warn!("the log writer thread panicked");
            }
        }
        if let Err(e) = handed.and_then(|()| self.written.failed()) {
            tracing::warn!("writing out the end of the log: {e}");
        }
    }
}

impl LogSink for LogFile {
    fn landmark_done(&mut self, _landmark: u64) -> io::Result<()> {
        if self.buf.len() >= WRITE_OUT_AT {
            self.hand_over()?;
        }
        // A write that failed behind the guest stops the recording here.
        self.written.failed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_reach_the_file_at_landmark_boundaries_and_on_flush() {
        let dir = std::env::temp_dir().join(format!("twinvm-logfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.log");
        let mut sink = LogFile::new(File::create(&path).unwrap()).unwrap();
        sink.write_all(b"record one").unwrap();
        sink.landmark_done(1).unwrap();
        // Small: still buffered.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        sink.write_all(&vec![7u8; WRITE_OUT_AT]).unwrap();
        sink.landmark_done(2).unwrap();
        // Written behind: the file gets the bytes without a flush.
        let expected = 10 + WRITE_OUT_AT as u64;
        let waited = std::time::Instant::now();
        while std::fs::metadata(&path).unwrap().len() < expected
            && waited.elapsed() < std::time::Duration::from_secs(10)
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), expected);
        sink.write_all(b"end").unwrap();
        sink.flush().unwrap();
        assert_eq!(sink.bytes_in_file(), 13 + WRITE_OUT_AT as u64);
        assert_eq!(std::fs::read(&path).unwrap().len(), 13 + WRITE_OUT_AT);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_dropped_sink_writes_out_what_it_holds() {
        let dir = std::env::temp_dir().join(format!("twinvm-logfile-drop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.log");
        let mut sink = LogFile::new(File::create(&path).unwrap()).unwrap();
        sink.write_all(b"a record").unwrap();
        sink.landmark_done(1).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        drop(sink);
        assert_eq!(std::fs::read(&path).unwrap(), b"a record");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn early_writeback_keeps_every_byte_and_a_file_that_refuses_it_still_works() {
        let dir = std::env::temp_dir().join(format!("twinvm-logfile-wb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.log");
        let piece: Vec<u8> = (0..WRITE_OUT_AT).map(|i| (i % 251) as u8).collect();
        let pieces = 3 * (WRITEBACK_EVERY as usize / WRITE_OUT_AT) + 1;
        // A regular file (writeback started every WRITEBACK_EVERY) and
        // /dev/null (sync_file_range refuses it: written all the same).
        for target in [&path, std::path::Path::new("/dev/null")] {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(*target == path)
                .open(target)
                .unwrap();
            let mut sink = LogFile::new(file).unwrap();
            for landmark in 0..pieces {
                sink.write_all(&piece).unwrap();
                sink.landmark_done(landmark as u64).unwrap();
            }
            sink.flush().unwrap();
            assert_eq!(sink.bytes_in_file(), (pieces * WRITE_OUT_AT) as u64);
        }
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), pieces * WRITE_OUT_AT);
        assert!(bytes.chunks(WRITE_OUT_AT).all(|c| c == piece));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// /dev/full fails every write with ENOSPC.
    fn sink_on_a_full_disk() -> LogFile {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full (Linux has it)");
        LogFile::new(full).unwrap()
    }

    #[test]
    fn a_failed_write_leaves_only_whole_writes_and_says_so() {
        let mut sink = sink_on_a_full_disk();
        sink.write_all(b"a whole record").unwrap();
        let err = sink.flush().unwrap_err();
        assert_eq!(err.raw_os_error(), None, "rewritten with a message");
        assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
        let text = err.to_string();
        assert!(text.contains("No space left on device"), "{text}");
        assert!(text.contains("last whole record (0 bytes"), "{text}");
        assert_eq!(sink.bytes_in_file(), 0);
    }

    #[test]
    fn a_write_failing_behind_the_guest_stops_it_at_a_landmark_and_nothing_follows() {
        let mut sink = sink_on_a_full_disk();
        let mut failed = None;
        for landmark in 1..=1000 {
            sink.write_all(&vec![1u8; WRITE_OUT_AT]).unwrap();
            if let Err(e) = sink.landmark_done(landmark) {
                failed = Some((landmark, e));
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let (landmark, err) = failed.expect("the failure is reported at a landmark");
        assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
        assert!(landmark < 1000, "reported late: landmark {landmark}");
        // Every later landmark and the flush say so too, and the writer
        // wrote nothing after the failure.
        assert!(sink.landmark_done(landmark + 1).is_err());
        let err = sink.flush().unwrap_err().to_string();
        assert!(err.contains("No space left on device"), "{err}");
        assert!(err.contains("bytes of records were not written"), "{err}");
        assert_eq!(sink.bytes_in_file(), 0);
    }
}
