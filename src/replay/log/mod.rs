//! The record/replay log: a header and a sequence of framed, checksummed
//! records, each tied to a landmark. Byte layout: docs/log-format.md.
//!
//! Sans-IO over `Read`/`Write`; the caller chooses files or sockets and does
//! the fsync.

use std::io::{self, Read, Write};

use crate::devices::TickDelivery;
use thiserror::Error;

mod codec;
mod cpu_state;
mod delta;
mod pages;
mod stream;
#[cfg(test)]
mod tests;

use codec::{
    decode_header, decode_record, encode_header, encode_record, encode_sync_pages,
    encode_sync_point, write_frame, Dec, SyncPointReader,
};
use cpu_state::StateEncoder;
pub use cpu_state::StateStats;
use pages::{commit_pages, PageCache};
pub use pages::{
    PageContents, PageStats, SyncPage, DEFAULT_PAGE_CACHE_PAGES, MAX_PAGE_CACHE_PAGES,
};
pub use stream::RecordDecoder;

/// First bytes of every log.
pub const LOG_MAGIC: [u8; 8] = *b"TWINVMLG";
/// Format version this build writes (and reads, with [`OLDEST_LOG_VERSION`]).
/// Version 4 sends sync-point pages as deltas against a page cache; version
/// 5 also the vCPU state, against the previous sync point's. Version 6
/// has the same records and a header byte, `tick_delivery`: whether its
/// landmarks include interrupt-window exits and its platform catches up
/// missed PIT ticks (docs/log-format.md).
pub const LOG_VERSION: u16 = 6;
/// Oldest format version this build still reads (version 3: every
/// sync-point page whole; 3 and 4: every vCPU state whole).
pub const OLDEST_LOG_VERSION: u16 = 3;
/// Oldest format version this build replays: older logs were recorded by
/// builds whose platform state (in digests) had no owed ticks; they are
/// still read (inspected, converted) as before.
pub const OLDEST_REPLAYABLE_LOG_VERSION: u16 = 6;
/// No frame is larger than this; a corrupted length cannot make the reader
/// allocate gigabytes.
pub const MAX_FRAME_BYTES: u32 = 256 << 20;
/// Guest page size; sync points carry whole pages.
pub const PAGE_SIZE: usize = 4096;
/// Most pages one record may carry (64 MiB uncompressed, so even
/// incompressible contents stay far below the frame limit); the writer
/// splits a larger sync point into `SyncPages` records before it.
pub const MAX_PAGES_PER_RECORD: usize = 16_384;
/// Largest Ethernet frame a `NetRx` record carries (a 64 KiB frame plus the
/// virtio-net header is more than any NIC here receives).
pub const MAX_NET_FRAME: usize = 65_550;
/// LZ4 cannot expand more than this: a packed field claiming more is corrupt
/// and is refused before its buffer is allocated.
const LZ4_MAX_RATIO: usize = 255;
/// Frame bodies are read in pieces of this size, so a corrupted or hostile
/// length makes the reader allocate no more than the bytes that arrive.
const READ_PIECE: usize = 1 << 20;

const KIND_HEADER: u8 = 0x01;
const KIND_IO_TIME: u8 = 0x10;
const KIND_POLL: u8 = 0x11;
const KIND_SERIAL_INPUT: u8 = 0x12;
const KIND_INTERRUPT: u8 = 0x13;
const KIND_TIME_READ: u8 = 0x14;
const KIND_RANDOM: u8 = 0x15;
const KIND_TRACE: u8 = 0x16;
const KIND_NET_RX: u8 = 0x17;
const KIND_NET_TX: u8 = 0x18;
const KIND_SYNC_POINT: u8 = 0x20;
const KIND_SYNC_PAGES: u8 = 0x22;
const KIND_DIGEST: u8 = 0x21;
const KIND_END: u8 = 0x30;

/// What the log was recorded from; replay refuses a different guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogHeader {
    /// BLAKE3 of the kernel image.
    pub kernel_hash: [u8; 32],
    /// BLAKE3 of the initrd, if any.
    pub initrd_hash: Option<[u8; 32]>,
    pub cmdline: String,
    pub mem_bytes: u64,
    /// Wall-clock seconds the RTC started from.
    pub boot_unix_secs: u64,
    /// Host CPU the recording's vCPU thread was pinned to. Guest user-mode
    /// CPUID runs natively on hosts where KVM emulates kernel code, and
    /// reports that CPU's APIC ID: the replay must run on the same CPU.
    pub host_cpu: u32,
    /// MAC address of the guest's virtio-net NIC, if it has one.
    pub net_mac: Option<[u8; 6]>,
    /// How ticks reach the guest (format 6): whether PIT periods missed
    /// between polls are owed and raised later, and whether an interrupt
    /// waiting while the guest cannot take it goes in at an
    /// interrupt-window exit. Both change where landmarks are, so every
    /// replica of the log follows the recording's choice
    /// (docs/architecture.md, "Tick deferral").
    pub tick_delivery: TickDelivery,
}

impl LogHeader {
    /// The header's bytes as a log stores them (the logging channel's Hello
    /// carries them, so the backup can refuse another guest).
    pub fn encode(&self) -> Result<Vec<u8>, LogError> {
        encode_header(self).map_err(|what| LogError::Malformed {
            index: 0,
            offset: 0,
            what,
            last_landmark: None,
        })
    }

    /// Inverse of [`LogHeader::encode`].
    pub fn decode(bytes: &[u8]) -> Result<LogHeader, LogError> {
        let mut d = Dec(bytes);
        decode_header(&mut d, LOG_VERSION)
            .and_then(|h| d.finish().map(|()| h))
            .map_err(|what| LogError::Malformed {
                index: 0,
                offset: 0,
                what,
                last_landmark: None,
            })
    }
}

impl LogHeader {
    /// What differs between a log's header (`self`) and the guest another
    /// replica would run (`ours`), one sentence each; empty if they match.
    /// The boot time and host CPU are the log's to dictate, not compared.
    pub fn differences_from(&self, ours: &LogHeader) -> Vec<String> {
        let mut differences = Vec::new();
        if self.kernel_hash != ours.kernel_hash {
            differences.push("the kernel image differs from the recorded one".to_string());
        }
        if self.initrd_hash != ours.initrd_hash {
            differences.push(match (self.initrd_hash, ours.initrd_hash) {
                (Some(_), None) => "the recording had an initrd and this run has none".to_string(),
                (None, Some(_)) => "this run has an initrd and the recording had none".to_string(),
                _ => "the initrd differs from the recorded one".to_string(),
            });
        }
        if self.cmdline != ours.cmdline {
            differences.push(format!(
                "the command line was {:?}, now {:?}",
                self.cmdline, ours.cmdline
            ));
        }
        if self.mem_bytes != ours.mem_bytes {
            differences.push(format!(
                "memory was {} MiB, now {} MiB",
                self.mem_bytes >> 20,
                ours.mem_bytes >> 20
            ));
        }
        if self.net_mac != ours.net_mac {
            differences.push(match (self.net_mac, ours.net_mac) {
                (Some(_), None) => {
                    "the recording had a NIC (--net) and this run has none".to_string()
                }
                (None, Some(_)) => {
                    "this run has a NIC (--net) and the recording had none".to_string()
                }
                _ => "the NIC's MAC address differs from the recorded one".to_string(),
            });
        }
        differences
    }
}

/// About how many bytes of memory a decoded record holds (to bound a queue
/// of them).
pub fn record_cost(record: &Record) -> u64 {
    let bytes = match record {
        Record::SyncPoint { pages, cpu, .. } => pages.len() * PAGE_SIZE + cpu.xsave.len() + 1024,
        Record::SyncPages { pages, .. } => pages.len() * PAGE_SIZE,
        Record::NetRx { frame, .. } => frame.len(),
        Record::SerialInput { bytes, .. } => bytes.len(),
        Record::Digest { digest, .. } => digest.pages.len() * 40 + 256,
        _ => 0,
    };
    bytes as u64 + 64
}

/// vCPU state as the raw bytes of KVM's x86-64 uapi structs (`kvm_regs`,
/// `kvm_sregs`, `kvm_fpu`, `kvm_vcpu_events`) and the MSRs a guest changes
/// without exits; the codec does not interpret them.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CpuStateBytes {
    pub regs: Vec<u8>,
    pub sregs: Vec<u8>,
    pub fpu: Vec<u8>,
    pub events: Vec<u8>,
    /// `(u32 index, u64 value)` little-endian pairs, 12 bytes each.
    pub msrs: Vec<u8>,
    /// `kvm_xsave` (4096 bytes): the extended state (YMM/ZMM upper parts,
    /// opmasks) guest user mode can use on hosts that leak AVX to it.
    pub xsave: Vec<u8>,
}

/// One BLAKE3 hash per part of the vCPU state (`digest::CPU_PARTS`).
pub type CpuHashes = [[u8; 32]; 6];

/// What a digest compares (docs/log-format.md, "Digest").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDigest {
    /// The vCPU state, per part.
    pub cpu: CpuHashes,
    /// The devices' saved state (`PlatformState`).
    pub devices: [u8; 32],
    /// Running hash of every landmark's signature since the start.
    pub signature: [u8; 32],
    /// All of guest memory (an order-independent sum of page hashes).
    pub memory: [u8; 32],
    /// The pages the primary wrote since the previous digest, to name a
    /// differing page.
    pub pages: Vec<PageHash>,
}

/// One guest page's hash in a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageHash {
    pub gpa: u64,
    pub hash: [u8; 32],
}

/// Why a recording ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    ResetRequested = 1,
    HaltedForGood = 2,
    Stopped = 3,
}

/// One logged event. Every record names the landmark it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Guest time used by a time-dependent port access at this landmark.
    IoTime { landmark: u64, now: u64 },
    /// The platform's timers were advanced to `now` at this landmark.
    Poll { landmark: u64, now: u64 },
    /// Serial input the UART accepted at this landmark.
    SerialInput { landmark: u64, bytes: Vec<u8> },
    /// Interrupt `vector` injected at this landmark.
    Interrupt { landmark: u64, vector: u8 },
    /// A trapped time read (RDTSC at a planted trap) returned `value`.
    TimeRead { landmark: u64, value: u64 },
    /// A RDRAND/RDSEED that reached the VMM returned `value` (CF=1).
    Random { landmark: u64, value: u64 },
    /// The guest's RIP and this landmark's own signature (recorded with
    /// `--trace-landmarks`).
    Trace {
        landmark: u64,
        rip: u64,
        signature: [u8; 16],
    },
    /// An Ethernet frame the NIC received, placed in the guest's receive
    /// ring at this landmark.
    NetRx { landmark: u64, frame: Vec<u8> },
    /// The guest transmitted a frame of `len` bytes at this landmark (its
    /// notify); the backup checks its own frame against the hash.
    NetTx {
        landmark: u64,
        len: u32,
        hash: [u8; 16],
    },
    /// The primary stopped the guest at an arbitrary point, which became this
    /// landmark: full vCPU state, the VMM's own state that can change between
    /// landmarks (opaque here), and the pages written since the previous sync point.
    SyncPoint {
        landmark: u64,
        cpu: Box<CpuStateBytes>,
        vmm_state: Vec<u8>,
        pages: Vec<(u64, Vec<u8>)>,
    },
    /// Pages of the sync point at this landmark that did not fit in its
    /// record (written before it; the reader merges them into it).
    SyncPages {
        landmark: u64,
        pages: Vec<(u64, Vec<u8>)>,
    },
    /// State digest at this landmark.
    Digest {
        landmark: u64,
        digest: Box<StateDigest>,
    },
    /// The recording ended here.
    End { landmark: u64, reason: EndReason },
}

impl Record {
    pub fn landmark(&self) -> u64 {
        match self {
            Record::IoTime { landmark, .. }
            | Record::Poll { landmark, .. }
            | Record::SerialInput { landmark, .. }
            | Record::Interrupt { landmark, .. }
            | Record::TimeRead { landmark, .. }
            | Record::Random { landmark, .. }
            | Record::Trace { landmark, .. }
            | Record::NetRx { landmark, .. }
            | Record::NetTx { landmark, .. }
            | Record::SyncPoint { landmark, .. }
            | Record::SyncPages { landmark, .. }
            | Record::Digest { landmark, .. }
            | Record::End { landmark, .. } => *landmark,
        }
    }

    /// Short name for messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Record::IoTime { .. } => "io-time",
            Record::Poll { .. } => "poll",
            Record::SerialInput { .. } => "serial-input",
            Record::Interrupt { .. } => "interrupt",
            Record::TimeRead { .. } => "time-read",
            Record::Random { .. } => "random",
            Record::Trace { .. } => "trace",
            Record::NetRx { .. } => "net-rx",
            Record::NetTx { .. } => "net-tx",
            Record::SyncPoint { .. } => "sync-point",
            Record::SyncPages { .. } => "sync-pages",
            Record::Digest { .. } => "digest",
            Record::End { .. } => "end",
        }
    }
}

/// A log that cannot be read, with where.
#[derive(Debug, Error)]
pub enum LogError {
    #[error("not a twinvm log (bad magic)")]
    BadMagic,
    #[error("log format version {0} is not supported (this build reads versions {OLDEST_LOG_VERSION} to {LOG_VERSION}); record it again with this build")]
    UnsupportedVersion(u16),
    #[error("log format version {0} was recorded by an older build whose landmarks had no interrupt-window exits and no tick catch-up; this build replays versions {OLDEST_REPLAYABLE_LOG_VERSION} to {LOG_VERSION}: replay it with the build that recorded it, or record it again")]
    NotReplayable(u16),
    #[error("log truncated in record {index} at byte {offset} (last complete record was at landmark {last_landmark:?})")]
    Truncated {
        index: u64,
        offset: u64,
        last_landmark: Option<u64>,
    },
    #[error("log record {index} at byte {offset} is corrupted: checksum mismatch (last good landmark {last_landmark:?})")]
    Checksum {
        index: u64,
        offset: u64,
        last_landmark: Option<u64>,
    },
    #[error("log record {index} at byte {offset} is malformed: {what} (last good landmark {last_landmark:?})")]
    Malformed {
        index: u64,
        offset: u64,
        what: String,
        last_landmark: Option<u64>,
    },
    #[error("log I/O: {0}")]
    Io(#[from] io::Error),
}

fn invalid_record(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("refusing to log a record its replay would refuse: {what}"),
    )
}

/// Writes a log: magic, version, header, then records. It enforces every
/// limit the reader checks, so a recording never holds a record its replay
/// refuses: a sync point with more pages than one record may carry is
/// split (`SyncPages` records before it); anything else out of bounds is
/// an error before a byte of it is written.
pub struct LogWriter<W: Write> {
    out: W,
    bytes: u64,
    records: u64,
    /// No frame is written past this many bytes of log.
    limit: Option<u64>,
    /// The last version of recently carried pages, as every reader of this
    /// log will hold it (sync-point pages are sent against it).
    pages: PageCache,
    /// Whether a page block was written (the cache's size is then fixed).
    pages_sent: bool,
    page_stats: PageStats,
    /// The last sync point's vCPU state, as every reader of this log will
    /// hold it (the next one is sent against it).
    states: StateEncoder,
}

impl<W: Write> LogWriter<W> {
    pub fn new(mut out: W, header: &LogHeader) -> io::Result<Self> {
        out.write_all(&LOG_MAGIC)?;
        out.write_all(&LOG_VERSION.to_le_bytes())?;
        let header = encode_header(header).map_err(invalid_record)?;
        let bytes = 10 + write_frame(&mut out, KIND_HEADER, &header)?;
        Ok(LogWriter::with_bytes(out, bytes))
    }

    fn with_bytes(out: W, bytes: u64) -> Self {
        LogWriter {
            out,
            bytes,
            records: 0,
            limit: None,
            pages: PageCache::new(DEFAULT_PAGE_CACHE_PAGES),
            pages_sent: false,
            page_stats: PageStats::default(),
            states: StateEncoder::default(),
        }
    }

    /// The most pages the page cache holds (each reader of the log holds
    /// as many): 0 sends every page whole. Only before the first sync point.
    pub fn set_page_cache(&mut self, pages: u32) -> io::Result<()> {
        if pages > MAX_PAGE_CACHE_PAGES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a page cache of {pages} pages is more than a log may ask its readers for ({MAX_PAGE_CACHE_PAGES})"
                ),
            ));
        }
        if self.pages_sent {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the page cache's size cannot change once sync points are logged",
            ));
        }
        self.pages = PageCache::new(pages);
        Ok(())
    }

    /// How the pages of sync points travelled so far, and the page cache.
    pub fn page_stats(&self) -> PageStats {
        let (pages, bytes) = self.pages.usage();
        PageStats {
            cache_capacity: u64::from(self.pages.capacity()),
            cache_pages: pages,
            cache_bytes: bytes,
            ..self.page_stats
        }
    }

    /// How the vCPU states of sync points travelled so far.
    pub fn state_stats(&self) -> StateStats {
        self.states.stats()
    }

    /// A writer of records only, for a stream whose magic and header travel
    /// elsewhere (the logging channel's Hello carries the header).
    pub fn stream(out: W) -> Self {
        LogWriter::with_bytes(out, 0)
    }

    /// Never write a frame that would take the log past `bytes` (the
    /// recording ends before it gets there; this is the backstop): such an
    /// append fails with [`io::ErrorKind::StorageFull`] and writes nothing.
    pub fn set_limit(&mut self, bytes: Option<u64>) {
        self.limit = bytes;
    }

    /// Append one record (a sync point with many pages as several frames).
    /// With a limit set, a record that does not fit whole is refused before
    /// any of its frames is written.
    pub fn append(&mut self, record: &Record) -> io::Result<()> {
        if let Record::SyncPoint {
            landmark,
            cpu,
            vmm_state,
            pages,
        } = record
        {
            return self.append_sync_point(*landmark, cpu, vmm_state, pages);
        }
        let mut stats = PageStats::default();
        let frame =
            encode_record(record, &self.pages, &self.states, &mut stats).map_err(invalid_record)?;
        let carries_pages = matches!(record, Record::SyncPages { .. });
        self.write_frames(
            record.kind_name(),
            record.landmark(),
            vec![frame],
            carries_pages.then_some(stats),
        )
    }

    /// Append a sync point, as `append(&Record::SyncPoint { .. })` does
    /// (the same bytes), from pages the caller holds in any buffers (a
    /// recording reads them into one reused buffer instead of a `Vec` per
    /// page).
    pub fn append_sync_point<D: PageContents>(
        &mut self,
        landmark: u64,
        cpu: &CpuStateBytes,
        vmm_state: &[u8],
        pages: &[(u64, D)],
    ) -> io::Result<()> {
        // Every chunk is sent against the cache as it was before the sync
        // point, so no page may come twice (ascending pages, as sync points
        // list them, cannot).
        if !pages.windows(2).all(|w| w[0].0 < w[1].0) {
            let mut seen = std::collections::HashSet::with_capacity(pages.len());
            if let Some((gpa, _)) = pages.iter().find(|(gpa, _)| !seen.insert(*gpa)) {
                return Err(invalid_record(format!(
                    "page {gpa:#x} appears twice in the sync point of landmark {landmark}"
                )));
            }
        }
        let mut frames = Vec::new();
        let mut stats = PageStats::default();
        let split = pages.len().saturating_sub(MAX_PAGES_PER_RECORD);
        let (head, last) = pages.split_at(split);
        for chunk in head.chunks(MAX_PAGES_PER_RECORD) {
            frames.push(
                encode_sync_pages(landmark, chunk, &self.pages, &mut stats)
                    .map_err(invalid_record)?,
            );
        }
        let state = self.states.encode(cpu, vmm_state).map_err(invalid_record)?;
        frames.push(
            encode_sync_point(landmark, state, last, &self.pages, &mut stats)
                .map_err(invalid_record)?,
        );
        self.write_frames("sync-point", landmark, frames, Some(stats))?;
        self.pages.trim();
        Ok(())
    }

    /// Whether the page cache holds `data` as the last version of `gpa`
    /// this log carried: such a page may be handed to
    /// [`LogWriter::append_sync_point`] as [`SyncPage::Unchanged`] (until
    /// that sync point is appended), without keeping a copy.
    pub fn holds_page(&self, gpa: u64, data: &[u8]) -> bool {
        self.pages.holds(gpa, data)
    }

    /// Write a record's frames whole or not at all (the size limit), and
    /// apply what they change in the page cache and state base; `pages`:
    /// how the pages of a record that carries some travelled.
    fn write_frames(
        &mut self,
        kind_name: &str,
        landmark: u64,
        frames: Vec<codec::EncodedRecord<'_>>,
        pages: Option<PageStats>,
    ) -> io::Result<()> {
        if let Some(limit) = self.limit {
            let size: u64 = frames
                .iter()
                .map(|frame| (frame.payload.len() + FRAME_OVERHEAD) as u64)
                .sum();
            if self.bytes + size > limit {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!(
                        "the log reached its size limit of {limit} bytes: the {kind_name} record of landmark {landmark} ({size} bytes) does not fit after {} bytes",
                        self.bytes
                    ),
                ));
            }
        }
        for frame in frames {
            self.bytes += write_frame(&mut self.out, frame.kind, &frame.payload)?;
            self.records += 1;
            // Readers update their cache and state base as they decode
            // each frame.
            commit_pages(&mut self.pages, &frame.pages);
            if let Some(state) = frame.state {
                self.states.commit(state);
            }
        }
        if let Some(stats) = pages {
            self.pages_sent = true;
            self.page_stats.full += stats.full;
            self.page_stats.zero += stats.zero;
            self.page_stats.same += stats.same;
            self.page_stats.delta += stats.delta;
        }
        Ok(())
    }

    /// Bytes and records written so far.
    pub fn written(&self) -> (u64, u64) {
        (self.bytes, self.records)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// The underlying writer (the live channel drains its buffer here).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

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
struct Assembler {
    at: Position,
    /// Pages of a split sync point seen so far, with its landmark.
    pending: Option<(u64, Pages)>,
    /// No sync point may carry more pages than guest memory has.
    max_pages: usize,
    /// How this log's sync points are sent: the page cache, the vCPU
    /// state base.
    sync: SyncPointReader,
}

/// Guest pages and their contents, as records carry them.
pub type Pages = Vec<(u64, Vec<u8>)>;

/// Frame bytes: u32 length, kind, payload, u32 CRC.
const FRAME_OVERHEAD: usize = 9;

impl Assembler {
    fn new(offset: u64, mem_bytes: u64, version: u16) -> Self {
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
    fn frame_len(&self, prefix: [u8; 4]) -> Result<usize, LogError> {
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
    fn take_frame(&mut self, frame: &[u8]) -> Result<Option<Record>, LogError> {
        let (kind, payload) = self.open(frame)?;
        let record = decode_record(kind, &mut Dec(payload), &mut self.sync)
            .map_err(|what| self.at.malformed(what))?;
        if let Record::SyncPoint { .. } = record {
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
    fn end(&self) -> Result<(), LogError> {
        match self.pending {
            Some(_) => Err(self.at.truncated()),
            None => Ok(()),
        }
    }
}

/// Reads a log written by [`LogWriter`], validating every frame.
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
