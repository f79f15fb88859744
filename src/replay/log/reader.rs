//! Reading a log: frames checked and decoded into records, from a file
//! (`LogReader`) or from bytes as they arrive (the `Assembler` that
//! stream.rs shares).

use std::io::{self, Read};

use super::codec::{decode_header, decode_record, Dec, SyncPointReader};
use super::{
    LogError, LogHeader, Pages, Record, KIND_HEADER, LOG_MAGIC, LOG_VERSION, MAX_FRAME_BYTES,
    OLDEST_LOG_VERSION, OLDEST_REPLAYABLE_LOG_VERSION, PAGE_SIZE, READ_PIECE,
};
use crate::devices::TickDelivery;

/// Where in a log stream the reader is, for error messages.
#[derive(Debug, Clone, Copy, Default)]
struct Position {
    index: u64,
    offset: u64,
    last_landmark: Option<u64>,
}

impl Position {
    fn malformed(&self, what: String) -> LogError {
        LogError::Malformed {
            index: self.index,
            offset: self.offset,
            what,
            last_landmark: self.last_landmark,
        }
    }

    fn truncated(&self) -> LogError {
        LogError::Truncated {
            index: self.index,
            offset: self.offset,
            last_landmark: self.last_landmark,
        }
    }
}

/// Turns whole frames into records, the same way for a file and for bytes
/// arriving from a primary: length and checksum checks, decoding, landmark
/// order, and sync points split over `SyncPages` records put back together.
pub(super) struct Assembler {
    at: Position,
    /// Pages of a split sync point seen so far, with its landmark.
    pending: Option<(u64, Pages)>,
    /// No sync point may carry more pages than guest memory has.
    max_pages: usize,
    /// How this log's sync points are sent: the page cache, the vCPU
    /// state base.
    pub(super) sync: SyncPointReader,
}

impl Assembler {
    pub(super) fn new(offset: u64, mem_bytes: u64, version: u16) -> Self {
        let max_pages = (mem_bytes / PAGE_SIZE as u64) as usize;
        Assembler {
            at: Position {
                offset,
                ..Position::default()
            },
            pending: None,
            max_pages,
            sync: SyncPointReader::new(version, max_pages),
        }
    }

    /// The frame length a 4-byte prefix announces, checked.
    pub(super) fn frame_len(&self, prefix: [u8; 4]) -> Result<usize, LogError> {
        let len = u32::from_le_bytes(prefix);
        if len == 0 || len > MAX_FRAME_BYTES {
            return Err(self
                .at
                .malformed(format!("frame length {len} is out of range")));
        }
        Ok(len as usize)
    }

    /// Check a whole frame's checksum; its kind and payload.
    fn open<'a>(&self, frame: &'a [u8]) -> Result<(u8, &'a [u8]), LogError> {
        let body_end = frame.len() - 4;
        let crc = u32::from_le_bytes(frame[body_end..].try_into().unwrap());
        if crc32fast::hash(&frame[..body_end]) != crc {
            return Err(LogError::Checksum {
                index: self.at.index,
                offset: self.at.offset,
                last_landmark: self.at.last_landmark,
            });
        }
        Ok((frame[4], &frame[5..body_end]))
    }

    /// Take one whole frame; Some(record) when a record is complete.
    pub(super) fn take_frame(&mut self, frame: &[u8]) -> Result<Option<Record>, LogError> {
        let (kind, payload) = self.open(frame)?;
        let record = decode_record(kind, &mut Dec(payload), &mut self.sync)
            .map_err(|what| self.at.malformed(what))?;
        if let Record::SyncPoint { .. } | Record::SyncState { .. } = record {
            self.sync.end_of_sync_point();
        }
        self.at.index += 1;
        self.at.offset += frame.len() as u64;
        if let Some(last) = self.at.last_landmark {
            if record.landmark() < last {
                return Err(self.at.malformed(format!(
                    "landmark {} comes after landmark {last}: records out of order",
                    record.landmark()
                )));
            }
        }
        self.at.last_landmark = Some(record.landmark());
        match (self.pending.take(), record) {
            (None, Record::SyncPages { landmark, pages }) => {
                self.pending = Some((landmark, pages));
                self.check_pending()?;
                Ok(None)
            }
            (None, record) => Ok(Some(record)),
            (Some((landmark, mut pages)), Record::SyncPages { landmark: l, pages: more })
                if l == landmark =>
            {
                pages.extend(more);
                self.pending = Some((landmark, pages));
                self.check_pending()?;
                Ok(None)
            }
            (
                Some((landmark, mut pages)),
                Record::SyncPoint {
                    landmark: l,
                    cpu,
                    vmm_state,
                    pages: last,
                },
            ) if l == landmark => {
                pages.extend(last);
                Ok(Some(Record::SyncPoint {
                    landmark,
                    cpu,
                    vmm_state,
                    pages,
                }))
            }
            (Some((landmark, _)), other) => Err(self.at.malformed(format!(
                "sync-point pages for landmark {landmark} are followed by a {} record for landmark {}",
                other.kind_name(),
                other.landmark()
            ))),
        }
    }

    fn check_pending(&self) -> Result<(), LogError> {
        match &self.pending {
            Some((_, pages)) if pages.len() > self.max_pages => Err(self.at.malformed(format!(
                "a sync point of more than {} pages, more than the guest's memory",
                pages.len()
            ))),
            _ => Ok(()),
        }
    }

    /// The stream ended here: fine between records, an error inside one.
    pub(super) fn end(&self) -> Result<(), LogError> {
        match self.pending {
            Some(_) => Err(self.at.truncated()),
            None => Ok(()),
        }
    }
}

/// Reads a log written by [`LogWriter`](super::LogWriter), validating every frame.
pub struct LogReader<R: Read> {
    input: R,
    version: u16,
    header: LogHeader,
    assembler: Assembler,
}

/// Append exactly `n` bytes from `input` to `buf`, growing it only as bytes
/// arrive. Ok(Err(got)) when the input ends first.
fn read_exact_growing(
    input: &mut impl Read,
    buf: &mut Vec<u8>,
    n: usize,
) -> io::Result<Result<(), usize>> {
    let start = buf.len();
    while buf.len() - start < n {
        let piece = (n - (buf.len() - start)).min(READ_PIECE);
        let at = buf.len();
        buf.resize(at + piece, 0);
        let mut filled = 0;
        while filled < piece {
            match input.read(&mut buf[at + filled..at + piece]) {
                Ok(0) => {
                    buf.truncate(at + filled);
                    return Ok(Err(buf.len() - start));
                }
                Ok(k) => filled += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    buf.truncate(at + filled);
                    return Err(e);
                }
            }
        }
    }
    Ok(Ok(()))
}

impl<R: Read> LogReader<R> {
    pub fn new(mut input: R) -> Result<Self, LogError> {
        let mut start = Vec::new();
        if read_exact_growing(&mut input, &mut start, 10)?.is_err() || start[..8] != LOG_MAGIC {
            return Err(LogError::BadMagic);
        }
        let version = u16::from_le_bytes([start[8], start[9]]);
        if !(OLDEST_LOG_VERSION..=LOG_VERSION).contains(&version) {
            return Err(LogError::UnsupportedVersion(version));
        }
        let mut reader = LogReader {
            input,
            version,
            header: LogHeader {
                kernel_hash: [0; 32],
                initrd_hash: None,
                cmdline: String::new(),
                mem_bytes: 0,
                boot_unix_secs: 0,
                host_cpu: 0,
                net_mac: None,
                tick_delivery: TickDelivery::AtLandmarks,
            },
            assembler: Assembler::new(10, 0, version),
        };
        let Some(frame) = reader.next_frame()? else {
            return Err(reader.assembler.at.truncated());
        };
        let (kind, payload) = reader.assembler.open(&frame)?;
        if kind != KIND_HEADER {
            return Err(reader.assembler.at.malformed(format!(
                "first record has kind {kind:#04x}, expected the header"
            )));
        }
        reader.header = decode_header(&mut Dec(payload), version)
            .map_err(|what| reader.assembler.at.malformed(what))?;
        reader.assembler =
            Assembler::new(10 + frame.len() as u64, reader.header.mem_bytes, version);
        Ok(reader)
    }

    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// The log's format version.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Refuse a log this build reads but cannot replay
    /// ([`OLDEST_REPLAYABLE_LOG_VERSION`]).
    pub fn check_replayable(&self) -> Result<(), LogError> {
        if self.version < OLDEST_REPLAYABLE_LOG_VERSION {
            return Err(LogError::NotReplayable(self.version));
        }
        Ok(())
    }

    /// Bytes of the log read so far (the offset of the next frame).
    pub fn offset(&self) -> u64 {
        self.assembler.at.offset
    }

    /// The next whole frame, None at a clean end of the log.
    fn next_frame(&mut self) -> Result<Option<Vec<u8>>, LogError> {
        let mut frame = Vec::new();
        match read_exact_growing(&mut self.input, &mut frame, 4)? {
            Ok(()) => {}
            Err(0) => return Ok(None),
            Err(_) => return Err(self.assembler.at.truncated()),
        }
        let len = self.assembler.frame_len(frame[..4].try_into().unwrap())?;
        if read_exact_growing(&mut self.input, &mut frame, len + 4)?.is_err() {
            return Err(self.assembler.at.truncated());
        }
        Ok(Some(frame))
    }

    /// The next record, None at the end of the log. A sync point split over
    /// `SyncPages` records comes out whole.
    pub fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        loop {
            let Some(frame) = self.next_frame()? else {
                self.assembler.end()?;
                return Ok(None);
            };
            if let Some(record) = self.assembler.take_frame(&frame)? {
                return Ok(Some(record));
            }
        }
    }
}
