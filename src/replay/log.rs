//! The record/replay log: a header and a sequence of framed, checksummed
//! records, each tied to a landmark. Byte layout: docs/log-format.md.
//!
//! Sans-IO over `Read`/`Write`; the caller chooses files or sockets and does
//! the fsync.

use std::io::{self, Read, Write};

use thiserror::Error;

/// First bytes of every log.
pub const LOG_MAGIC: [u8; 8] = *b"TWINVMLG";
/// Format version this build writes and reads.
pub const LOG_VERSION: u16 = 2;
/// No frame is larger than this; a corrupted length cannot make the reader
/// allocate gigabytes.
pub const MAX_FRAME_BYTES: u32 = 256 << 20;
/// Guest page size; sync points carry whole pages.
pub const PAGE_SIZE: usize = 4096;
/// Most pages one sync point may carry (256 MiB uncompressed); bounds what a
/// corrupted count makes the reader allocate.
const MAX_SYNC_PAGES: usize = MAX_FRAME_BYTES as usize / PAGE_SIZE;

const KIND_HEADER: u8 = 0x01;
const KIND_IO_TIME: u8 = 0x10;
const KIND_POLL: u8 = 0x11;
const KIND_SERIAL_INPUT: u8 = 0x12;
const KIND_INTERRUPT: u8 = 0x13;
const KIND_TIME_READ: u8 = 0x14;
const KIND_RANDOM: u8 = 0x15;
const KIND_TRACE: u8 = 0x16;
const KIND_SYNC_POINT: u8 = 0x20;
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
}

/// vCPU state as the raw bytes of KVM's x86-64 uapi structs (`kvm_regs`,
/// `kvm_sregs`, `kvm_fpu`, `kvm_vcpu_events`) and the MSRs a guest changes
/// without exits; the codec does not interpret them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
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
pub type CpuHashes = [[u8; 32]; 5];

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
    /// The guest's RIP at this landmark (recorded with `--trace-landmarks`).
    Trace { landmark: u64, rip: u64 },
    /// The primary stopped the guest at an arbitrary point, which became this
    /// landmark: full vCPU state, the VMM's own state that can change between
    /// landmarks (opaque here), and the pages written since the previous sync point.
    SyncPoint {
        landmark: u64,
        cpu: Box<CpuStateBytes>,
        vmm_state: Vec<u8>,
        pages: Vec<(u64, Vec<u8>)>,
    },
    /// State digest at this landmark: hashes of the vCPU state's parts
    /// (`digest::CPU_PARTS`) and of the pages written since the previous digest.
    Digest {
        landmark: u64,
        cpu: CpuHashes,
        pages: Vec<PageHash>,
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
            | Record::SyncPoint { landmark, .. }
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
            Record::SyncPoint { .. } => "sync-point",
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
    #[error("log format version {0} is not supported (this build reads version {LOG_VERSION})")]
    UnsupportedVersion(u16),
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

/// Little-endian payload builder.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    /// u32 unpacked length, then `u32 length + bytes` of one LZ4 block.
    fn packed(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.bytes(&lz4_flex::block::compress(v));
    }
}

/// Little-endian payload reader; errors are plain strings the caller places.
struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("payload ends {} bytes early", n - self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn hash(&mut self) -> Result<[u8; 32], String> {
        Ok(self.take(32)?.try_into().unwrap())
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    /// Inverse of `Enc::packed`; the unpacked length is bounded by the frame
    /// limit before anything is allocated.
    fn packed(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        if n > MAX_FRAME_BYTES as usize {
            return Err(format!(
                "{n} bytes unpacked is more than a record may hold ({MAX_FRAME_BYTES})"
            ));
        }
        let block = self.bytes()?;
        let mut out = vec![0u8; n];
        let got = lz4_flex::block::decompress_into(&block, &mut out)
            .map_err(|e| format!("does not decompress: {e}"))?;
        if got != n {
            return Err(format!("decompresses to {got} bytes, expected {n}"));
        }
        Ok(out)
    }
    fn finish(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} unexpected trailing bytes", self.0.len()))
        }
    }
}

fn encode_header(h: &LogHeader) -> Vec<u8> {
    let mut e = Enc::default();
    e.0.extend_from_slice(&h.kernel_hash);
    match &h.initrd_hash {
        Some(hash) => {
            e.u8(1);
            e.0.extend_from_slice(hash);
        }
        None => e.u8(0),
    }
    e.u64(h.mem_bytes);
    e.u64(h.boot_unix_secs);
    e.u32(h.host_cpu);
    e.bytes(h.cmdline.as_bytes());
    e.0
}

fn decode_header(d: &mut Dec) -> Result<LogHeader, String> {
    let kernel_hash = d.hash()?;
    let initrd_hash = match d.u8()? {
        0 => None,
        1 => Some(d.hash()?),
        other => return Err(format!("initrd flag {other} is neither 0 nor 1")),
    };
    let mem_bytes = d.u64()?;
    let boot_unix_secs = d.u64()?;
    let host_cpu = d.u32()?;
    let cmdline =
        String::from_utf8(d.bytes()?).map_err(|_| "command line is not UTF-8".to_string())?;
    Ok(LogHeader {
        kernel_hash,
        initrd_hash,
        cmdline,
        mem_bytes,
        boot_unix_secs,
        host_cpu,
    })
}

fn encode_record(r: &Record) -> (u8, Vec<u8>) {
    let mut e = Enc::default();
    let kind = match r {
        Record::IoTime { landmark, now } => {
            e.u64(*landmark);
            e.u64(*now);
            KIND_IO_TIME
        }
        Record::Poll { landmark, now } => {
            e.u64(*landmark);
            e.u64(*now);
            KIND_POLL
        }
        Record::SerialInput { landmark, bytes } => {
            e.u64(*landmark);
            e.bytes(bytes);
            KIND_SERIAL_INPUT
        }
        Record::Interrupt { landmark, vector } => {
            e.u64(*landmark);
            e.u8(*vector);
            KIND_INTERRUPT
        }
        Record::TimeRead { landmark, value } => {
            e.u64(*landmark);
            e.u64(*value);
            KIND_TIME_READ
        }
        Record::Random { landmark, value } => {
            e.u64(*landmark);
            e.u64(*value);
            KIND_RANDOM
        }
        Record::Trace { landmark, rip } => {
            e.u64(*landmark);
            e.u64(*rip);
            KIND_TRACE
        }
        Record::SyncPoint {
            landmark,
            cpu,
            vmm_state,
            pages,
        } => {
            e.u64(*landmark);
            e.bytes(&cpu.regs);
            e.bytes(&cpu.sregs);
            e.bytes(&cpu.fpu);
            e.bytes(&cpu.events);
            e.bytes(&cpu.msrs);
            e.packed(&cpu.xsave);
            e.bytes(vmm_state);
            e.u32(pages.len() as u32);
            let mut contents = Vec::with_capacity(pages.len() * PAGE_SIZE);
            for (gpa, data) in pages {
                e.u64(*gpa);
                contents.extend_from_slice(data);
            }
            // Page contents compress well (zeroed and sparse pages, page
            // tables); LZ4 is fast enough to stay off the critical path.
            e.packed(&contents);
            KIND_SYNC_POINT
        }
        Record::Digest {
            landmark,
            cpu,
            pages,
        } => {
            e.u64(*landmark);
            for part in cpu {
                e.0.extend_from_slice(part);
            }
            e.u32(pages.len() as u32);
            for p in pages {
                e.u64(p.gpa);
                e.0.extend_from_slice(&p.hash);
            }
            KIND_DIGEST
        }
        Record::End { landmark, reason } => {
            e.u64(*landmark);
            e.u8(*reason as u8);
            KIND_END
        }
    };
    (kind, e.0)
}

fn decode_record(kind: u8, d: &mut Dec) -> Result<Record, String> {
    let landmark = d.u64()?;
    let record = match kind {
        KIND_IO_TIME => Record::IoTime {
            landmark,
            now: d.u64()?,
        },
        KIND_POLL => Record::Poll {
            landmark,
            now: d.u64()?,
        },
        KIND_SERIAL_INPUT => Record::SerialInput {
            landmark,
            bytes: d.bytes()?,
        },
        KIND_INTERRUPT => Record::Interrupt {
            landmark,
            vector: d.u8()?,
        },
        KIND_TIME_READ => Record::TimeRead {
            landmark,
            value: d.u64()?,
        },
        KIND_RANDOM => Record::Random {
            landmark,
            value: d.u64()?,
        },
        KIND_TRACE => Record::Trace {
            landmark,
            rip: d.u64()?,
        },
        KIND_SYNC_POINT => {
            let cpu = CpuStateBytes {
                regs: d.bytes()?,
                sregs: d.bytes()?,
                fpu: d.bytes()?,
                events: d.bytes()?,
                msrs: d.bytes()?,
                xsave: d.packed()?,
            };
            let vmm_state = d.bytes()?;
            let n = d.u32()? as usize;
            if n > MAX_SYNC_PAGES {
                return Err(format!(
                    "{n} pages is more than a sync point can hold ({MAX_SYNC_PAGES})"
                ));
            }
            let mut gpas = Vec::with_capacity(n);
            for _ in 0..n {
                let gpa = d.u64()?;
                if gpa % PAGE_SIZE as u64 != 0 {
                    return Err(format!("page address {gpa:#x} is not page aligned"));
                }
                gpas.push(gpa);
            }
            let contents = d.packed().map_err(|e| format!("page contents: {e}"))?;
            if contents.len() != n * PAGE_SIZE {
                return Err(format!(
                    "page contents are {} bytes, expected {} for {n} pages",
                    contents.len(),
                    n * PAGE_SIZE
                ));
            }
            let pages = gpas
                .into_iter()
                .zip(contents.chunks_exact(PAGE_SIZE))
                .map(|(gpa, data)| (gpa, data.to_vec()))
                .collect();
            Record::SyncPoint {
                landmark,
                cpu: Box::new(cpu),
                vmm_state,
                pages,
            }
        }
        KIND_DIGEST => {
            let cpu = [d.hash()?, d.hash()?, d.hash()?, d.hash()?, d.hash()?];
            let n = d.u32()? as usize;
            let mut pages = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                pages.push(PageHash {
                    gpa: d.u64()?,
                    hash: d.hash()?,
                });
            }
            Record::Digest {
                landmark,
                cpu,
                pages,
            }
        }
        KIND_END => {
            let reason = match d.u8()? {
                1 => EndReason::ResetRequested,
                2 => EndReason::HaltedForGood,
                3 => EndReason::Stopped,
                other => return Err(format!("unknown end reason {other}")),
            };
            Record::End { landmark, reason }
        }
        other => return Err(format!("unknown record kind {other:#04x}")),
    };
    d.finish()?;
    Ok(record)
}

/// Frame: u32 length of (kind + payload), kind byte, payload, CRC-32 of all
/// the preceding bytes of the frame.
fn write_frame(out: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<u64> {
    if payload.len() as u64 + 1 > u64::from(MAX_FRAME_BYTES) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a {}-byte record exceeds the log's frame limit of {MAX_FRAME_BYTES} bytes",
                payload.len()
            ),
        ));
    }
    let len = payload.len() as u32 + 1;
    let mut frame = Vec::with_capacity(payload.len() + 9);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.push(kind);
    frame.extend_from_slice(payload);
    let crc = crc32fast::hash(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    out.write_all(&frame)?;
    Ok(frame.len() as u64)
}

/// Writes a log: magic, version, header, then records.
pub struct LogWriter<W: Write> {
    out: W,
    bytes: u64,
    records: u64,
}

impl<W: Write> LogWriter<W> {
    pub fn new(mut out: W, header: &LogHeader) -> io::Result<Self> {
        out.write_all(&LOG_MAGIC)?;
        out.write_all(&LOG_VERSION.to_le_bytes())?;
        let bytes = 10 + write_frame(&mut out, KIND_HEADER, &encode_header(header))?;
        Ok(LogWriter {
            out,
            bytes,
            records: 0,
        })
    }

    pub fn append(&mut self, record: &Record) -> io::Result<()> {
        let (kind, payload) = encode_record(record);
        self.bytes += write_frame(&mut self.out, kind, &payload)?;
        self.records += 1;
        Ok(())
    }

    /// Bytes and records written so far.
    pub fn written(&self) -> (u64, u64) {
        (self.bytes, self.records)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Reads a log written by [`LogWriter`], validating every frame.
pub struct LogReader<R: Read> {
    input: R,
    header: LogHeader,
    offset: u64,
    index: u64,
    last_landmark: Option<u64>,
}

/// Read exactly `buf.len()` bytes; Ok(false) on a clean EOF before the first byte.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<Result<(), usize>> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => return Ok(Err(got)),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Ok(()))
}

impl<R: Read> LogReader<R> {
    pub fn new(mut input: R) -> Result<Self, LogError> {
        let mut start = [0u8; 10];
        if read_full(&mut input, &mut start)?.is_err() || start[..8] != LOG_MAGIC {
            return Err(LogError::BadMagic);
        }
        let version = u16::from_le_bytes([start[8], start[9]]);
        if version != LOG_VERSION {
            return Err(LogError::UnsupportedVersion(version));
        }
        let mut reader = LogReader {
            input,
            header: LogHeader {
                kernel_hash: [0; 32],
                initrd_hash: None,
                cmdline: String::new(),
                mem_bytes: 0,
                boot_unix_secs: 0,
                host_cpu: 0,
            },
            offset: 10,
            index: 0,
            last_landmark: None,
        };
        let (kind, payload) = match reader.next_frame()? {
            Some(frame) => frame,
            None => {
                return Err(LogError::Truncated {
                    index: 0,
                    offset: 10,
                    last_landmark: None,
                })
            }
        };
        if kind != KIND_HEADER {
            return Err(reader.malformed(format!(
                "first record has kind {kind:#04x}, expected the header"
            )));
        }
        reader.header = decode_header(&mut Dec(&payload)).map_err(|what| reader.malformed(what))?;
        reader.offset += payload.len() as u64 + 9;
        Ok(reader)
    }

    pub fn header(&self) -> &LogHeader {
        &self.header
    }

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

    /// The next frame's kind and payload, None at a clean end of the log.
    fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, LogError> {
        let mut len_bytes = [0u8; 4];
        match read_full(&mut self.input, &mut len_bytes)? {
            Ok(()) => {}
            Err(0) => return Ok(None),
            Err(_) => return Err(self.truncated()),
        }
        let len = u32::from_le_bytes(len_bytes);
        if len == 0 || len > MAX_FRAME_BYTES {
            return Err(self.malformed(format!("frame length {len} is out of range")));
        }
        let mut body = vec![0u8; len as usize + 4];
        if read_full(&mut self.input, &mut body)?.is_err() {
            return Err(self.truncated());
        }
        let (content, crc_bytes) = body.split_at(len as usize);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&len_bytes);
        hasher.update(content);
        if hasher.finalize() != u32::from_le_bytes(crc_bytes.try_into().unwrap()) {
            return Err(LogError::Checksum {
                index: self.index,
                offset: self.offset,
                last_landmark: self.last_landmark,
            });
        }
        let kind = content[0];
        let payload = content[1..].to_vec();
        Ok(Some((kind, payload)))
    }

    /// The next record, None at the end of the log.
    pub fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        let frame_start = self.offset;
        let Some((kind, payload)) = self.next_frame()? else {
            return Ok(None);
        };
        let record =
            decode_record(kind, &mut Dec(&payload)).map_err(|what| self.malformed(what))?;
        self.index += 1;
        self.offset = frame_start + payload.len() as u64 + 9;
        self.last_landmark = Some(record.landmark());
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> LogHeader {
        LogHeader {
            kernel_hash: [7; 32],
            initrd_hash: Some([9; 32]),
            cmdline: "console=ttyS0".into(),
            mem_bytes: 64 << 20,
            boot_unix_secs: 1_700_000_000,
            host_cpu: 1,
        }
    }

    fn sample_records() -> Vec<Record> {
        vec![
            Record::IoTime {
                landmark: 3,
                now: 12_345,
            },
            Record::Poll {
                landmark: 4,
                now: 1_000_000,
            },
            Record::SerialInput {
                landmark: 4,
                bytes: b"hi\n".to_vec(),
            },
            Record::Interrupt {
                landmark: 4,
                vector: 0x20,
            },
            Record::TimeRead {
                landmark: 9,
                value: u64::MAX - 1,
            },
            Record::Random {
                landmark: 9,
                value: 0x1234_5678_9abc_def0,
            },
            Record::Trace {
                landmark: 9,
                rip: 0xffff_ffff_8100_0000,
            },
            Record::SyncPoint {
                landmark: 10,
                cpu: Box::new(CpuStateBytes {
                    regs: vec![1; 144],
                    sregs: vec![2; 312],
                    fpu: vec![3; 416],
                    events: vec![4; 64],
                    msrs: vec![7; 24],
                    xsave: vec![0x11; 4096],
                }),
                vmm_state: vec![8, 9],
                pages: vec![
                    (0x1000, vec![0xaa; PAGE_SIZE]),
                    (0x7000, vec![0x55; PAGE_SIZE]),
                ],
            },
            Record::Digest {
                landmark: 10,
                cpu: [[5; 32], [6; 32], [7; 32], [8; 32], [9; 32]],
                pages: vec![PageHash {
                    gpa: 0x2000,
                    hash: [6; 32],
                }],
            },
            Record::End {
                landmark: 11,
                reason: EndReason::ResetRequested,
            },
        ]
    }

    fn encoded() -> Vec<u8> {
        let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
        for r in sample_records() {
            w.append(&r).unwrap();
        }
        let (bytes, records) = w.written();
        let out = w.into_inner();
        assert_eq!(bytes, out.len() as u64);
        assert_eq!(records, 10);
        out
    }

    fn read_all(bytes: &[u8]) -> Result<(LogHeader, Vec<Record>), LogError> {
        let mut r = LogReader::new(bytes)?;
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        Ok((r.header().clone(), out))
    }

    #[test]
    fn round_trip() {
        let (h, records) = read_all(&encoded()).unwrap();
        assert_eq!(h, header());
        assert_eq!(records, sample_records());
    }

    #[test]
    fn header_without_initrd_round_trips() {
        let h = LogHeader {
            initrd_hash: None,
            ..header()
        };
        let w = LogWriter::new(Vec::new(), &h).unwrap();
        let bytes = w.into_inner();
        assert_eq!(LogReader::new(&bytes[..]).unwrap().header(), &h);
    }

    #[test]
    fn every_truncation_is_an_error_never_a_silent_success() {
        let full = encoded();
        // Cutting at a frame boundary gives a shorter valid log: the replay
        // engine catches that (no End record). Cutting anywhere else must fail.
        let mut boundaries = vec![];
        let mut r = LogReader::new(&full[..]).unwrap();
        boundaries.push(r.offset);
        while r.next_record().unwrap().is_some() {
            boundaries.push(r.offset);
        }
        for cut in 0..full.len() {
            let result = read_all(&full[..cut]);
            if boundaries.contains(&(cut as u64)) {
                assert!(result.is_ok(), "cut at boundary {cut}");
            } else {
                let err = result.unwrap_err();
                assert!(
                    matches!(err, LogError::Truncated { .. } | LogError::BadMagic),
                    "cut {cut}: {err}"
                );
            }
        }
    }

    #[test]
    fn truncation_names_record_and_last_landmark() {
        let full = encoded();
        let err = read_all(&full[..full.len() - 3]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("truncated in record 9"), "{msg}");
        assert!(msg.contains("landmark Some(10)"), "{msg}");
    }

    /// A sync point with a valid frame (so the CRC passes) but bad insides:
    /// `pages` page addresses, then contents claiming `unpacked` bytes in `block`.
    fn sync_point_frame(pages: u32, unpacked: u32, block: &[u8]) -> Vec<u8> {
        let mut out = LogWriter::new(Vec::new(), &header()).unwrap().into_inner();
        let mut e = Enc::default();
        e.u64(5);
        // regs, sregs, fpu, events, msrs
        for _ in 0..5 {
            e.bytes(&[]);
        }
        e.packed(&[]); // xsave
        e.bytes(&[]); // VMM state
        e.u32(pages);
        for i in 0..pages.min(4) {
            e.u64(u64::from(i) * PAGE_SIZE as u64);
        }
        e.u32(unpacked);
        e.bytes(block);
        write_frame(&mut out, KIND_SYNC_POINT, &e.0).unwrap();
        out
    }

    #[test]
    fn sync_point_contents_are_checked_after_the_checksum() {
        let two = 2 * PAGE_SIZE as u32;
        let block = lz4_flex::block::compress(&vec![0u8; two as usize]);
        read_all(&sync_point_frame(2, two, &block)).unwrap();
        // Contents that are fewer bytes than the pages named.
        let err = read_all(&sync_point_frame(3, two, &block)).unwrap_err();
        assert!(
            err.to_string().contains("expected 12288 for 3 pages"),
            "{err}"
        );
        // A length that does not match what the block holds.
        let err = read_all(&sync_point_frame(2, two + 1, &block)).unwrap_err();
        assert!(matches!(err, LogError::Malformed { .. }), "{err}");
        // Garbage instead of LZ4.
        let err = read_all(&sync_point_frame(2, two, &[0xff; 40])).unwrap_err();
        assert!(err.to_string().contains("does not decompress"), "{err}");
        // Counts and lengths no frame could back are refused before allocating.
        let err = read_all(&sync_point_frame(u32::MAX, two, &block)).unwrap_err();
        assert!(err.to_string().contains("more than a sync point"), "{err}");
        let err = read_all(&sync_point_frame(2, u32::MAX, &block)).unwrap_err();
        assert!(
            err.to_string().contains("more than a record may hold"),
            "{err}"
        );
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let full = encoded();
        for i in 0..full.len() {
            let mut bad = full.clone();
            bad[i] ^= 0x40;
            assert!(read_all(&bad).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn wrong_magic_version_and_huge_lengths() {
        assert!(matches!(
            LogReader::new(&b"NOTALOG!\x01\x00"[..]),
            Err(LogError::BadMagic)
        ));
        assert!(matches!(LogReader::new(&b""[..]), Err(LogError::BadMagic)));
        let mut v = encoded();
        v[8] = 99;
        assert!(matches!(
            LogReader::new(&v[..]),
            Err(LogError::UnsupportedVersion(99))
        ));
        let mut huge = LOG_MAGIC.to_vec();
        huge.extend_from_slice(&LOG_VERSION.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = LogReader::new(&huge[..]).err().unwrap();
        assert!(err.to_string().contains("frame length"), "{err}");
    }

    #[test]
    fn unknown_kinds_with_valid_checksums_are_malformed() {
        let mut bytes = LogWriter::new(Vec::new(), &header()).unwrap().into_inner();
        write_frame(&mut bytes, 0x7f, &5u64.to_le_bytes()).unwrap();
        let err = read_all(&bytes).unwrap_err();
        assert!(
            err.to_string().contains("unknown record kind 0x7f"),
            "{err}"
        );
        let mut bytes = LogWriter::new(Vec::new(), &header()).unwrap().into_inner();
        write_frame(&mut bytes, KIND_INTERRUPT, &[1, 2, 3]).unwrap();
        assert!(read_all(&bytes).unwrap_err().to_string().contains("ends"));
    }
}
