//! The byte layout of frames, the header and every record (docs/log-format.md).

use std::io::{self, Write};

use super::cpu_state::{EncodedState, StateDecoder, StateEncoder, XSAVE_BYTES};
use super::pages::{encode_pages, PageCache, PageContents, PageDecoder, PageStats, PageUpdate};
use super::*;

/// Little-endian payload builder. A field too long for its u32 length
/// prefix is remembered as an error (reported by `finish`), never cast
/// silently.
#[derive(Default)]
pub(super) struct Enc {
    pub(super) out: Vec<u8>,
    pub(super) error: Option<String>,
}

impl Enc {
    pub(super) fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn raw(&mut self, v: &[u8]) {
        self.out.extend_from_slice(v);
    }
    /// A length prefix; lengths past the frame limit are refused.
    pub(super) fn len(&mut self, n: usize, what: &str) {
        let n = self.checked_len(n, what);
        self.u32(n);
    }
    /// `n` as a length prefix's value; past the frame limit it is refused
    /// (remembered as the error).
    fn checked_len(&mut self, n: usize, what: &str) -> u32 {
        if n > MAX_FRAME_BYTES as usize {
            self.error
                .get_or_insert_with(|| format!("{what} of {n} bytes exceeds the frame limit"));
        }
        u32::try_from(n).unwrap_or(u32::MAX)
    }
    pub(super) fn bytes(&mut self, v: &[u8]) {
        self.len(v.len(), "a field");
        self.raw(v);
    }
    /// u32 unpacked length, then `u32 length + bytes` of one LZ4 block,
    /// compressed in place (a sync point's pages are megabytes: no block
    /// of its own to allocate and copy; docs/benchmarks.md, "sync-point
    /// buffers").
    pub(super) fn packed(&mut self, v: &[u8]) {
        self.len(v.len(), "a packed field");
        let at = self.out.len();
        let room = lz4_flex::block::get_maximum_output_size(v.len());
        self.out.resize(at + 4 + room, 0);
        match lz4_flex::block::compress_into(v, &mut self.out[at + 4..]) {
            Ok(n) => {
                self.out.truncate(at + 4 + n);
                let n = self.checked_len(n, "a packed field");
                self.out[at..at + 4].copy_from_slice(&n.to_le_bytes());
            }
            Err(e) => {
                self.out.truncate(at);
                self.error
                    .get_or_insert_with(|| format!("LZ4 refused a packed field: {e}"));
            }
        }
    }
    /// A frame's payload builder over `buf` (emptied; its capacity is
    /// reused), with room in front for the frame's length and kind, so
    /// the frame is sealed where it was built (`finish_frame`).
    pub(super) fn frame(mut buf: Vec<u8>) -> Enc {
        buf.clear();
        buf.extend_from_slice(&[0; FRAME_HEAD]);
        Enc {
            out: buf,
            error: None,
        }
    }
    /// The whole frame of kind `kind` (see `write_frame`) around the
    /// payload built since `Enc::frame`.
    pub(super) fn finish_frame(mut self, kind: u8) -> Result<Vec<u8>, String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        seal_frame(&mut self.out, kind).map_err(|e| e.to_string())?;
        Ok(self.out)
    }
    pub(super) fn finish(self) -> Result<Vec<u8>, String> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.out),
        }
    }
}

/// Little-endian payload reader; errors are plain strings the caller places.
pub(super) struct Dec<'a>(pub(super) &'a [u8]);

impl<'a> Dec<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("payload ends {} bytes early", n - self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    pub(super) fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub(super) fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    pub(super) fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    /// Inverse of `Enc::packed`. The unpacked length is checked against
    /// `limit` and against what the block could possibly expand to before
    /// anything is allocated.
    pub(super) fn packed(&mut self, limit: usize) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        if n > limit {
            return Err(format!(
                "{n} bytes unpacked is more than this field may hold ({limit})"
            ));
        }
        let block = self.bytes()?;
        if n > block.len().saturating_mul(LZ4_MAX_RATIO) + 16 {
            return Err(format!(
                "claims {n} bytes unpacked from a {}-byte block, more than LZ4 can expand",
                block.len()
            ));
        }
        let mut out = vec![0u8; n];
        let got = lz4_flex::block::decompress_into(&block, &mut out)
            .map_err(|e| format!("does not decompress: {e}"))?;
        if got != n {
            return Err(format!("decompresses to {got} bytes, expected {n}"));
        }
        Ok(out)
    }
    pub(super) fn finish(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} unexpected trailing bytes", self.0.len()))
        }
    }
}

pub(super) fn encode_header(h: &LogHeader) -> Result<Vec<u8>, String> {
    let mut e = Enc::default();
    e.raw(&h.kernel_hash);
    match &h.initrd_hash {
        Some(hash) => {
            e.u8(1);
            e.raw(hash);
        }
        None => e.u8(0),
    }
    e.u64(h.mem_bytes);
    e.u64(h.boot_unix_secs);
    e.u32(h.host_cpu);
    e.bytes(h.cmdline.as_bytes());
    match &h.net_mac {
        Some(mac) => {
            e.u8(1);
            e.raw(mac);
        }
        None => e.u8(0),
    }
    e.u8(h.tick_delivery.to_byte());
    e.finish()
}

/// A header of a log of format `version` (the tick delivery byte is there
/// from format 6 on; older logs delivered ticks at landmarks).
pub(super) fn decode_header(d: &mut Dec, version: u16) -> Result<LogHeader, String> {
    let kernel_hash = d.array()?;
    let initrd_hash = match d.u8()? {
        0 => None,
        1 => Some(d.array()?),
        other => return Err(format!("initrd flag {other} is neither 0 nor 1")),
    };
    let mem_bytes = d.u64()?;
    let boot_unix_secs = d.u64()?;
    let host_cpu = d.u32()?;
    let cmdline =
        String::from_utf8(d.bytes()?).map_err(|_| "command line is not UTF-8".to_string())?;
    let net_mac = match d.u8()? {
        0 => None,
        1 => Some(d.array()?),
        other => return Err(format!("NIC flag {other} is neither 0 nor 1")),
    };
    let tick_delivery = match version {
        ..=5 => TickDelivery::AtLandmarks,
        _ => {
            let byte = d.u8()?;
            TickDelivery::from_byte(byte)
                .ok_or_else(|| format!("tick delivery {byte} is none of 0, 1 or 2"))?
        }
    };
    d.finish()?;
    Ok(LogHeader {
        kernel_hash,
        initrd_hash,
        cmdline,
        mem_bytes,
        boot_unix_secs,
        host_cpu,
        net_mac,
        tick_delivery,
    })
}

/// How a reader decodes the pages of a sync point: format 3 sent every
/// page whole; formats 4 and 5 against the page cache (`pages.rs`).
enum PageReader {
    Version3,
    Cached(PageDecoder),
}

/// How a reader decodes sync points: their pages as its format sends them
/// and, from format 5, the vCPU state against the previous one.
pub(super) struct SyncPointReader {
    /// The log's format version (records it does not have are refused).
    version: u16,
    pages: PageReader,
    /// None before format 5 (every part of the state whole).
    state: Option<StateDecoder>,
}

impl SyncPointReader {
    pub(super) fn new(version: u16, max_pages: usize) -> Self {
        SyncPointReader {
            version,
            pages: if version == 3 {
                PageReader::Version3
            } else {
                PageReader::Cached(PageDecoder::new(max_pages))
            },
            state: (version >= 5).then(StateDecoder::default),
        }
    }

    fn pages(&mut self, d: &mut Dec) -> Result<Pages, String> {
        match &mut self.pages {
            PageReader::Version3 => decode_pages_v3(d),
            PageReader::Cached(pages) => pages.decode(d),
        }
    }

    /// The vCPU and VMM state of a sync point.
    fn state(&mut self, d: &mut Dec) -> Result<(CpuStateBytes, Vec<u8>), String> {
        match &mut self.state {
            Some(state) => state.decode(d),
            None => {
                let cpu = CpuStateBytes {
                    regs: d.bytes()?,
                    sregs: d.bytes()?,
                    fpu: d.bytes()?,
                    events: d.bytes()?,
                    msrs: d.bytes()?,
                    xsave: d
                        .packed(XSAVE_BYTES)
                        .map_err(|e| format!("XSAVE area: {e}"))?,
                };
                Ok((cpu, d.bytes()?))
            }
        }
    }

    /// How the pages read so far travelled, and the page cache (None for
    /// a format-3 log, which has none).
    pub(super) fn page_stats(&self) -> Option<PageStats> {
        match &self.pages {
            PageReader::Version3 => None,
            PageReader::Cached(pages) => Some(pages.stats()),
        }
    }

    /// A whole sync point was decoded.
    pub(super) fn end_of_sync_point(&mut self) {
        if let PageReader::Cached(pages) = &mut self.pages {
            pages.end_of_sync_point();
        }
    }
}

/// Format 3's page list: `u32 count`, `count × gpa`, then the contents
/// packed.
fn decode_pages_v3(d: &mut Dec) -> Result<Pages, String> {
    let n = d.u32()? as usize;
    if n > MAX_PAGES_PER_RECORD {
        return Err(format!(
            "{n} pages is more than a record can hold ({MAX_PAGES_PER_RECORD})"
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
    let contents = d
        .packed(n * PAGE_SIZE)
        .map_err(|e| format!("page contents: {e}"))?;
    if contents.len() != n * PAGE_SIZE {
        return Err(format!(
            "page contents are {} bytes, expected {} for {n} pages",
            contents.len(),
            n * PAGE_SIZE
        ));
    }
    Ok(gpas
        .into_iter()
        .zip(contents.chunks_exact(PAGE_SIZE))
        .map(|(gpa, data)| (gpa, PageData::from(data)))
        .collect())
}

/// One encoded frame, and what it changes in the writer's page cache and
/// vCPU state base once written.
pub(super) struct EncodedRecord<'r> {
    /// The whole frame: length, kind, payload, CRC.
    pub(super) frame: Vec<u8>,
    pub(super) pages: Vec<PageUpdate<'r>>,
    pub(super) state: Option<EncodedState>,
}

/// A sync point's vCPU and VMM state (encoded by the writer against its
/// base) and (some of) its pages.
pub(super) fn encode_sync_point<'r, D: PageContents>(
    landmark: u64,
    state: EncodedState,
    pages: &'r [(u64, D)],
    cache: &PageCache,
    buffers: &mut EncodeBuffers,
    stats: &mut PageStats,
) -> Result<EncodedRecord<'r>, String> {
    let mut e = Enc::frame(buffers.frame());
    e.u64(landmark);
    e.raw(&state.bytes);
    let updates = encode_pages(&mut e, &mut buffers.block, cache, pages, stats);
    Ok(EncodedRecord {
        frame: e.finish_frame(KIND_SYNC_POINT)?,
        pages: updates,
        state: Some(state),
    })
}

/// Pages of a sync point that did not fit in its record.
pub(super) fn encode_sync_pages<'r, D: PageContents>(
    landmark: u64,
    pages: &'r [(u64, D)],
    cache: &PageCache,
    buffers: &mut EncodeBuffers,
    stats: &mut PageStats,
) -> Result<EncodedRecord<'r>, String> {
    let mut e = Enc::frame(buffers.frame());
    e.u64(landmark);
    let updates = encode_pages(&mut e, &mut buffers.block, cache, pages, stats);
    Ok(EncodedRecord {
        frame: e.finish_frame(KIND_SYNC_PAGES)?,
        pages: updates,
        state: None,
    })
}

/// The rest of the machine's state at a sync point, and the pages written
/// since the previous one with state that the sync point does not carry.
fn encode_sync_state<'r>(
    landmark: u64,
    state: &'r ResumeState,
    cache: &PageCache,
    buffers: &mut EncodeBuffers,
    stats: &mut PageStats,
) -> Result<EncodedRecord<'r>, String> {
    if state.devices.len() > MAX_DEVICES_STATE {
        return Err(format!(
            "a devices' state of {} bytes is larger than {MAX_DEVICES_STATE}",
            state.devices.len()
        ));
    }
    let mut e = Enc::frame(buffers.frame());
    e.u64(landmark);
    e.u64(state.since);
    e.u64(state.clock);
    e.raw(&state.signature);
    e.raw(&state.signature_last);
    e.u8(u8::from(state.device_unflushed));
    e.packed(&state.devices);
    let updates = encode_pages(&mut e, &mut buffers.block, cache, &state.pages, stats);
    Ok(EncodedRecord {
        frame: e.finish_frame(KIND_SYNC_STATE)?,
        pages: updates,
        state: None,
    })
}

pub(super) fn encode_record<'r>(
    r: &'r Record,
    cache: &PageCache,
    states: &StateEncoder,
    buffers: &mut EncodeBuffers,
    stats: &mut PageStats,
) -> Result<EncodedRecord<'r>, String> {
    // Records that carry pages take their own frame buffer.
    match r {
        Record::SyncPoint {
            landmark,
            cpu,
            vmm_state,
            pages,
        } => {
            let state = states.encode(cpu, vmm_state)?;
            return encode_sync_point(*landmark, state, pages, cache, buffers, stats);
        }
        Record::SyncPages { landmark, pages } => {
            return encode_sync_pages(*landmark, pages, cache, buffers, stats)
        }
        Record::SyncState { landmark, state } => {
            return encode_sync_state(*landmark, state, cache, buffers, stats)
        }
        _ => {}
    }
    let mut e = Enc::frame(buffers.frame());
    e.u64(r.landmark());
    let kind = match r {
        Record::IoTime { now, .. } => {
            e.u64(*now);
            KIND_IO_TIME
        }
        Record::Poll { now, .. } => {
            e.u64(*now);
            KIND_POLL
        }
        Record::SerialInput { bytes, .. } => {
            e.bytes(bytes);
            KIND_SERIAL_INPUT
        }
        Record::Interrupt { vector, .. } => {
            e.u8(*vector);
            KIND_INTERRUPT
        }
        Record::TimeRead { value, .. } => {
            e.u64(*value);
            KIND_TIME_READ
        }
        Record::Random { value, .. } => {
            e.u64(*value);
            KIND_RANDOM
        }
        Record::Trace { rip, signature, .. } => {
            e.u64(*rip);
            e.raw(signature);
            KIND_TRACE
        }
        Record::NetRx { frame, .. } => {
            if frame.len() > MAX_NET_FRAME {
                return Err(format!(
                    "a received frame of {} bytes is larger than {MAX_NET_FRAME}",
                    frame.len()
                ));
            }
            e.bytes(frame);
            KIND_NET_RX
        }
        Record::NetTx { len, hash, .. } => {
            e.u32(*len);
            e.raw(hash);
            KIND_NET_TX
        }
        Record::SyncPoint { .. } | Record::SyncPages { .. } => {
            unreachable!("encoded above")
        }
        Record::SyncState { .. } => unreachable!("encoded above"),
        Record::Digest { digest, .. } => {
            for part in &digest.cpu {
                e.raw(part);
            }
            e.raw(&digest.devices);
            e.raw(&digest.signature);
            e.raw(&digest.memory);
            e.len(digest.pages.len(), "a digest's page list");
            for p in &digest.pages {
                e.u64(p.gpa);
                e.raw(&p.hash);
            }
            KIND_DIGEST
        }
        Record::End { reason, .. } => {
            e.u8(*reason as u8);
            KIND_END
        }
    };
    Ok(EncodedRecord {
        frame: e.finish_frame(kind)?,
        pages: Vec::new(),
        state: None,
    })
}

pub(super) fn decode_record(
    kind: u8,
    d: &mut Dec,
    sync: &mut SyncPointReader,
) -> Result<Record, String> {
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
            signature: d.array()?,
        },
        KIND_NET_RX => {
            let frame = d.bytes()?;
            if frame.len() > MAX_NET_FRAME {
                return Err(format!(
                    "a received frame of {} bytes is larger than {MAX_NET_FRAME}",
                    frame.len()
                ));
            }
            Record::NetRx { landmark, frame }
        }
        KIND_NET_TX => Record::NetTx {
            landmark,
            len: d.u32()?,
            hash: d.array()?,
        },
        KIND_SYNC_POINT => {
            let (cpu, vmm_state) = sync.state(d)?;
            let pages = sync.pages(d)?;
            Record::SyncPoint {
                landmark,
                cpu: Box::new(cpu),
                vmm_state,
                pages,
            }
        }
        KIND_SYNC_PAGES => Record::SyncPages {
            landmark,
            pages: sync.pages(d)?,
        },
        KIND_SYNC_STATE if sync.version >= 7 => {
            let since = d.u64()?;
            if since >= landmark {
                return Err(format!(
                    "its previous sync point with state, {since}, is not before it"
                ));
            }
            let clock = d.u64()?;
            let signature = d.array()?;
            let signature_last = d.array()?;
            let device_unflushed = match d.u8()? {
                0 => false,
                1 => true,
                other => return Err(format!("device-write flag {other} is neither 0 nor 1")),
            };
            let devices = d
                .packed(MAX_DEVICES_STATE)
                .map_err(|e| format!("devices' state: {e}"))?;
            let pages = sync.pages(d)?;
            Record::SyncState {
                landmark,
                state: Box::new(ResumeState {
                    clock,
                    signature,
                    signature_last,
                    device_unflushed,
                    devices,
                    since,
                    pages,
                }),
            }
        }
        KIND_DIGEST => {
            let mut cpu = CpuHashes::default();
            for part in &mut cpu {
                *part = d.array()?;
            }
            let devices = d.array()?;
            let signature = d.array()?;
            let memory = d.array()?;
            let n = d.u32()? as usize;
            // 40 bytes per entry: a count the payload cannot hold is refused
            // before the list is allocated.
            if n > d.0.len() / 40 {
                return Err(format!("{n} page hashes do not fit in the record"));
            }
            let mut pages = Vec::with_capacity(n);
            for _ in 0..n {
                pages.push(PageHash {
                    gpa: d.u64()?,
                    hash: d.array()?,
                });
            }
            Record::Digest {
                landmark,
                digest: Box::new(StateDigest {
                    cpu,
                    devices,
                    signature,
                    memory,
                    pages,
                }),
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
pub(super) fn write_frame(out: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<u64> {
    let mut frame = Vec::with_capacity(payload.len() + FRAME_OVERHEAD);
    frame.extend_from_slice(&[0; FRAME_HEAD]);
    frame.extend_from_slice(payload);
    seal_frame(&mut frame, kind)?;
    out.write_all(&frame)?;
    Ok(frame.len() as u64)
}

/// Bytes of a frame before its payload: the u32 length and the kind.
const FRAME_HEAD: usize = 5;

/// Make `frame` (`FRAME_HEAD` bytes of room, then the payload) a whole
/// frame: fill in the length and kind, append the CRC.
fn seal_frame(frame: &mut Vec<u8>, kind: u8) -> io::Result<()> {
    let payload = frame.len() - FRAME_HEAD;
    if payload as u64 + 1 > u64::from(MAX_FRAME_BYTES) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a {payload}-byte record exceeds the log's frame limit of {MAX_FRAME_BYTES} bytes"
            ),
        ));
    }
    let len = payload as u32 + 1;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    frame[4] = kind;
    let crc = crc32fast::hash(frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Buffers a writer reuses from record to record: a sync point's page
/// block and frames are megabytes, and fresh ones cost page faults on
/// every sync point (docs/benchmarks.md, "sync-point buffers").
#[derive(Default)]
pub(super) struct EncodeBuffers {
    /// The page entries of one record before they are packed.
    pub(super) block: Vec<u8>,
    /// Frames written and handed back (`give_back`).
    frames: Vec<Vec<u8>>,
}

impl EncodeBuffers {
    /// Frames and blocks larger than this are not kept (a sync point of a
    /// whole large guest does not pin its buffers).
    const KEEP_BYTES: usize = 16 << 20;
    /// Frame buffers kept (a sync point split in records takes several).
    const KEEP_FRAMES: usize = 4;

    fn frame(&mut self) -> Vec<u8> {
        self.frames.pop().unwrap_or_default()
    }

    /// A written frame's buffer, for the next record.
    pub(super) fn give_back(&mut self, frame: Vec<u8>) {
        if frame.capacity() <= Self::KEEP_BYTES && self.frames.len() < Self::KEEP_FRAMES {
            self.frames.push(frame);
        }
        if self.block.capacity() > Self::KEEP_BYTES {
            self.block = Vec::new();
        }
    }
}
