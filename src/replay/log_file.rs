//! A log file that never ends inside a record.
//!
//! `twinvm record` writes its log through this sink: records are buffered
//! and written out only at landmark boundaries (where every record handed
//! over is whole), and a write that fails (the disk is full: ENOSPC) cuts
//! the file back to the end of the last whole write, so the log on disk is
//! always a sequence of complete frames. The replay of such a log then says
//! where it stops ("log ends after landmark L without an end record"),
//! never that a record is corrupt.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};

use super::engine::LogSink;

/// Buffered bytes are written out at the next landmark boundary past this.
const WRITE_OUT_AT: usize = 1 << 20;

/// See the module comment.
pub struct LogFile {
    file: File,
    buf: Vec<u8>,
    /// Bytes in the file, all of them whole frames (or the magic and
    /// header).
    whole: u64,
}

impl LogFile {
    /// A sink writing to `file` from its start (a new, empty file).
    pub fn new(file: File) -> Self {
        LogFile {
            file,
            buf: Vec::new(),
            whole: 0,
        }
    }

    /// Bytes known to be in the file.
    pub fn bytes_in_file(&self) -> u64 {
        self.whole
    }

    fn write_out(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        match self.file.write_all(&self.buf) {
            Ok(()) => {
                self.whole += self.buf.len() as u64;
                self.buf.clear();
                Ok(())
            }
            Err(e) => {
                let lost = self.buf.len();
                self.buf.clear();
                let whole = self.whole;
                let cut = self
                    .file
                    .set_len(whole)
                    .and_then(|()| self.file.seek(SeekFrom::Start(whole)).map(|_| ()));
                let after = match cut {
                    Ok(()) => format!(
                        "the log was cut back to its last whole record ({whole} bytes; {lost} bytes of records were not written)"
                    ),
                    Err(c) => format!(
                        "cutting the log back to its last whole record ({whole} bytes) failed too: {c}"
                    ),
                };
                Err(io::Error::new(e.kind(), format!("{e}; {after}")))
            }
        }
    }
}

impl Write for LogFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    /// Called by the log writer between records only.
    fn flush(&mut self) -> io::Result<()> {
        self.write_out()?;
        self.file.flush()
    }
}

/// A run that ends in an error (a triple fault, a failed write) drops its
/// log unflushed: what is buffered is whole records (the log writer hands
/// over one whole frame per write), so it is written out, as `BufWriter`
/// would; a failure here is cut back like any other.
impl Drop for LogFile {
    fn drop(&mut self) {
        if let Err(e) = self.write_out() {
            tracing::warn!("writing out the end of the log: {e}");
        }
    }
}

impl LogSink for LogFile {
    fn landmark_done(&mut self, _landmark: u64) -> io::Result<()> {
        if self.buf.len() >= WRITE_OUT_AT {
            self.write_out()?;
        }
        Ok(())
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
        let mut sink = LogFile::new(File::create(&path).unwrap());
        sink.write_all(b"record one").unwrap();
        sink.landmark_done(1).unwrap();
        // Small: still buffered.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        sink.write_all(&vec![7u8; WRITE_OUT_AT]).unwrap();
        sink.landmark_done(2).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            10 + WRITE_OUT_AT as u64
        );
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
        let mut sink = LogFile::new(File::create(&path).unwrap());
        sink.write_all(b"a record").unwrap();
        sink.landmark_done(1).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        drop(sink);
        assert_eq!(std::fs::read(&path).unwrap(), b"a record");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_only_whole_writes_and_says_so() {
        // /dev/full fails every write with ENOSPC.
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full (Linux has it)");
        let mut sink = LogFile::new(full);
        sink.write_all(b"a whole record").unwrap();
        let err = sink.flush().unwrap_err();
        assert_eq!(err.raw_os_error(), None, "rewritten with a message");
        assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
        let text = err.to_string();
        assert!(text.contains("No space left on device"), "{text}");
        assert!(text.contains("last whole record (0 bytes"), "{text}");
        assert_eq!(sink.bytes_in_file(), 0);
    }
}
