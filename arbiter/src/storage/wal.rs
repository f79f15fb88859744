//! Checksummed record files: the write-ahead log and the snapshot file.
//!
//! Every record is framed as
//!
//! ```text
//! offset 0  u32 LE  payload length N (1..=MAX_RECORD)
//! offset 4  u32 LE  CRC32 of the 4 length bytes   (a corrupt length is caught before it is trusted)
//! offset 8  u32 LE  CRC32 of the payload
//! offset 12 N bytes payload: 1 kind byte, then the protobuf body
//! ```
//!
//! Recovery rule (see docs/arbiter.md): records are fsynced before anything
//! that depends on them is acknowledged or sent, so only the *last* write can
//! be torn. A scan therefore drops (a) a final record whose bytes end before
//! its verified length says, and (b) a run of zero bytes reaching end of file
//! (space the file system extended but never filled). Every other anomaly — a
//! complete record with a bad payload CRC, a bad length CRC followed by
//! non-zero bytes — is corruption of acknowledged data and is reported with
//! the file and byte offset; nothing is truncated.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const HEADER_LEN: usize = 12;
/// Upper bound on one record; a snapshot of the table is far smaller.
pub const MAX_RECORD: u32 = 256 * 1024 * 1024;

/// Payload kinds (first payload byte).
pub const KIND_ENTRY: u8 = 1;
pub const KIND_HARD_STATE: u8 = 2;
/// The log in this file continues an entry (index, term) that is covered by a snapshot.
pub const KIND_BASE: u8 = 3;
pub const KIND_SNAPSHOT: u8 = 4;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{path}: i/o error: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Acknowledged data is damaged; refuse to guess.
    #[error("{path}: corrupt record at byte offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Appends the framed record for `payload` to `out`.
pub fn encode_record(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    let len = (body.len() + 1) as u32;
    let len_bytes = len.to_le_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[kind]);
    hasher.update(body);
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(&crc32fast::hash(&len_bytes).to_le_bytes());
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.push(kind);
    out.extend_from_slice(body);
}

/// One decoded record: where it starts, its kind and body.
#[derive(Debug)]
pub struct Record<'a> {
    pub offset: u64,
    pub kind: u8,
    pub body: &'a [u8],
}

/// The result of scanning a record file.
#[derive(Debug)]
pub struct Scan<'a> {
    pub records: Vec<Record<'a>>,
    /// Length of the valid prefix; bytes past it are a torn tail.
    pub valid_len: u64,
}

/// Splits `bytes` (the contents of `path`) into records, applying the recovery rule.
pub fn scan<'a>(path: &Path, bytes: &'a [u8]) -> Result<Scan<'a>, WalError> {
    let corrupt = |offset: usize, reason: String| WalError::Corrupt {
        path: path.to_owned(),
        offset: offset as u64,
        reason,
    };
    let mut records = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        if rest.iter().all(|&b| b == 0) {
            break; // zero-filled tail: never written
        }
        if rest.len() < HEADER_LEN {
            break; // header cut short by a crash
        }
        let len_bytes: [u8; 4] = rest[0..4].try_into().expect("4 bytes");
        let len = u32::from_le_bytes(len_bytes);
        let len_crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        let payload_crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
        if crc32fast::hash(&len_bytes) != len_crc {
            return Err(corrupt(pos, "length checksum mismatch".into()));
        }
        if len == 0 || len > MAX_RECORD {
            return Err(corrupt(pos, format!("impossible record length {len}")));
        }
        let end = HEADER_LEN + len as usize;
        if rest.len() < end {
            break; // payload cut short by a crash
        }
        let payload = &rest[HEADER_LEN..end];
        if crc32fast::hash(payload) != payload_crc {
            return Err(corrupt(pos, "payload checksum mismatch".into()));
        }
        records.push(Record {
            offset: pos as u64,
            kind: payload[0],
            body: &payload[1..],
        });
        pos += end;
    }
    Ok(Scan {
        records,
        valid_len: pos as u64,
    })
}

/// Reads a whole file; `Ok(None)` when it does not exist.
pub fn read_file(path: &Path) -> Result<Option<Vec<u8>>, WalError> {
    match File::open(path) {
        Ok(mut f) => {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).map_err(io_err(path))?;
            Ok(Some(buf))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Replaces `path` with `contents` atomically: temp file, fsync, rename, fsync dir.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), WalError> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(contents).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(path)
}

/// fsyncs the directory holding `path` so a rename or create is durable.
pub fn sync_dir(path: &Path) -> Result<(), WalError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// An append handle on the log file.
pub struct WalWriter {
    path: PathBuf,
    file: File,
    pending: Vec<u8>,
}

impl WalWriter {
    /// Opens `path` for appending after truncating it to `valid_len` (drops a torn tail).
    pub fn open(path: &Path, valid_len: u64) -> Result<Self, WalError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        let current = file.metadata().map_err(io_err(path))?.len();
        if current != valid_len {
            tracing::warn!(
                file = %path.display(),
                dropped_bytes = current - valid_len,
                "dropping torn tail of the write-ahead log (never acknowledged)"
            );
            file.set_len(valid_len).map_err(io_err(path))?;
            file.sync_all().map_err(io_err(path))?;
        }
        Ok(WalWriter {
            path: path.to_owned(),
            file,
            pending: Vec::new(),
        })
    }

    pub fn append(&mut self, kind: u8, body: &[u8]) {
        encode_record(&mut self.pending, kind, body);
    }

    /// Writes buffered records; with `fsync` they are durable on return.
    pub fn flush(&mut self, fsync: bool) -> Result<(), WalError> {
        if !self.pending.is_empty() {
            self.file
                .write_all(&self.pending)
                .map_err(io_err(&self.path))?;
            self.pending.clear();
        }
        if fsync {
            self.file.sync_data().map_err(io_err(&self.path))?;
        }
        Ok(())
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(&mut out, KIND_ENTRY, b"first");
        encode_record(&mut out, KIND_HARD_STATE, b"second");
        out
    }

    #[test]
    fn scan_reads_back_records() {
        let bytes = sample();
        let scan = scan(Path::new("wal"), &bytes).unwrap();
        assert_eq!(scan.records.len(), 2);
        assert_eq!(scan.records[0].kind, KIND_ENTRY);
        assert_eq!(scan.records[0].body, b"first");
        assert_eq!(scan.records[1].offset, (HEADER_LEN + 6) as u64);
        assert_eq!(scan.valid_len, bytes.len() as u64);
    }

    #[test]
    fn torn_tail_is_dropped() {
        let mut bytes = sample();
        let full = bytes.len();
        bytes.truncate(full - 3);
        let s = scan(Path::new("wal"), &bytes).unwrap();
        assert_eq!(s.records.len(), 1);
        assert_eq!(s.valid_len, (HEADER_LEN + 6) as u64);

        // Zero-filled extension after the last good record.
        let mut zeros = sample();
        zeros.extend_from_slice(&[0u8; 40]);
        let s = scan(Path::new("wal"), &zeros).unwrap();
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.valid_len, full as u64);
    }

    #[test]
    fn flipped_byte_in_acknowledged_record_is_reported_with_offset() {
        let mut bytes = sample();
        bytes[HEADER_LEN + 2] ^= 0x40; // inside the first payload
        let err = scan(Path::new("/d/wal.log"), &bytes).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/d/wal.log"), "{msg}");
        assert!(msg.contains("offset 0"), "{msg}");

        let mut bytes = sample();
        bytes[HEADER_LEN + 7] ^= 0x01; // length field of the second record
        let msg = scan(Path::new("wal"), &bytes).unwrap_err().to_string();
        assert!(msg.contains(&format!("offset {}", HEADER_LEN + 6)), "{msg}");
    }
}
