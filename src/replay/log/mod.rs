//! The record/replay log: a header and a sequence of framed, checksummed
//! records, each tied to a landmark. Byte layout: docs/log-format.md.
//!
//! Sans-IO over `Read`/`Write`; the caller chooses files or sockets and does
//! the fsync.

use std::io;

use crate::devices::TickDelivery;
use thiserror::Error;

mod codec;
mod cpu_state;
mod delta;
mod page_data;
mod pages;
mod reader;
mod stream;
#[cfg(test)]
mod tests;
mod writer;

use codec::{decode_header, encode_header, Dec};
pub use cpu_state::StateStats;
pub use page_data::PageData;
pub use pages::{
    PageContents, PageStats, SyncPage, DEFAULT_PAGE_CACHE_PAGES, MAX_PAGE_CACHE_PAGES,
};
pub use reader::LogReader;
pub use stream::RecordDecoder;
pub use writer::LogWriter;

/// First bytes of every log.
pub const LOG_MAGIC: [u8; 8] = *b"TWINVMLG";
/// Format version this build writes (and reads, with [`OLDEST_LOG_VERSION`]).
/// Version 4 sends sync-point pages as deltas against a page cache; version
/// 5 also the vCPU state, against the previous sync point's. Version 6
/// has the same records and a header byte, `tick_delivery`: whether its
/// landmarks include interrupt-window exits and its platform catches up
/// missed PIT ticks (docs/log-format.md). Version 7 adds the `SyncState`
/// record: what a backup needs to go on from a sync point it did not
/// execute up to (catch-up).
pub const LOG_VERSION: u16 = 7;
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
/// Largest devices' state a `SyncState` record carries (a bound on what
/// a corrupted record can make a reader allocate).
pub const MAX_DEVICES_STATE: usize = 1 << 20;
/// LZ4 cannot expand more than this: a packed field claiming more is corrupt
/// and is refused before its buffer is allocated.
const LZ4_MAX_RATIO: usize = 255;
/// Frame bodies are read in pieces of this size, so a corrupted or hostile
/// length makes the reader allocate no more than the bytes that arrive.
const READ_PIECE: usize = 1 << 20;
/// Frame bytes: u32 length, kind, payload, u32 CRC.
const FRAME_OVERHEAD: usize = 9;

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
const KIND_SYNC_STATE: u8 = 0x23;
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
/// of them): every page counts whole, also one it shares with the page
/// cache or the zero page, so this is an upper bound.
pub fn record_cost(record: &Record) -> u64 {
    let bytes = match record {
        Record::SyncPoint { pages, cpu, .. } => pages.len() * PAGE_SIZE + cpu.xsave.len() + 1024,
        Record::SyncPages { pages, .. } => pages.len() * PAGE_SIZE,
        Record::NetRx { frame, .. } => frame.len(),
        Record::SerialInput { bytes, .. } => bytes.len(),
        Record::Digest { digest, .. } => digest.pages.len() * 40 + 256,
        Record::SyncState { state, .. } => state.devices.len() + state.pages.len() * PAGE_SIZE,
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

/// What a backup needs, besides a sync point's pages and vCPU, to go on
/// from that sync point without having executed up to it (catch-up,
/// docs/architecture.md). A backup that did execute up to it checks that
/// its own state is this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeState {
    /// The primary's guest time (its last clock reading, logged or not: a
    /// backup's is never later).
    pub clock: u64,
    /// The landmark signature's running hash and the last landmark's.
    pub signature: [u8; 32],
    pub signature_last: [u8; 16],
    /// A device wrote guest memory since the last shadow flush both
    /// replicas made (`GuestWrite::Device` in vm.rs), as it was before the
    /// sync point.
    pub device_unflushed: bool,
    /// The devices' saved state (`PlatformState` as JSON; opaque here).
    pub devices: Vec<u8>,
    /// The sync point with state before this one (0: the start). Every
    /// page written since then that the sync point does not carry is in
    /// `pages`, so a backup anywhere from there on can load this one.
    pub since: u64,
    /// Those pages, with their contents at the sync point.
    pub pages: Pages,
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
        pages: Pages,
    },
    /// Pages of the sync point at this landmark that did not fit in its
    /// record (written before it; the reader merges them into it).
    SyncPages { landmark: u64, pages: Pages },
    /// The rest of the machine's state at the sync point of this landmark
    /// (written after it; format 7). Not every sync point has one.
    SyncState {
        landmark: u64,
        state: Box<ResumeState>,
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
            | Record::SyncState { landmark, .. }
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
            Record::SyncState { .. } => "sync-state",
            Record::Digest { .. } => "digest",
            Record::End { .. } => "end",
        }
    }
}

/// Guest pages and their contents, as records carry them.
pub type Pages = Vec<(u64, PageData)>;

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
