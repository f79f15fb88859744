//! Log records from bytes as they arrive (the logging channel to a live
//! backup): the same frames and checks as a log file, without the file's
//! magic and header (the channel's handshake carries the header).

use super::reader::Assembler;
use super::{LogError, LogHeader, PageStats, Record, FRAME_OVERHEAD};

/// Decodes records from a byte stream pushed in pieces of any size.
pub struct RecordDecoder {
    assembler: Assembler,
    buf: Vec<u8>,
    /// Bytes of `buf` already decoded.
    consumed: usize,
}

impl RecordDecoder {
    /// A decoder for the records of a log with this header.
    pub fn new(header: &LogHeader) -> Self {
        RecordDecoder {
            assembler: Assembler::new(0, header.mem_bytes, super::LOG_VERSION),
            buf: Vec::new(),
            consumed: 0,
        }
    }

    /// More bytes of the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.consumed > 0 && self.consumed == self.buf.len() {
            self.buf.clear();
            self.consumed = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// How the sync-point pages decoded so far travelled, and the page
    /// cache this reader holds.
    pub fn page_stats(&self) -> PageStats {
        self.assembler.sync.page_stats().unwrap_or_default()
    }

    /// Bytes received but not yet decoded (a partial frame).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.consumed
    }

    /// Whether a whole frame is buffered: `next_record` has something to
    /// decode (a record, or an error for a bad frame).
    pub fn holds_a_frame(&self) -> bool {
        let rest = &self.buf[self.consumed..];
        if rest.len() < 4 {
            return false;
        }
        match self.assembler.frame_len(rest[..4].try_into().unwrap()) {
            Ok(len) => rest.len() >= len + FRAME_OVERHEAD - 1,
            Err(_) => true,
        }
    }

    /// The next complete record; None when more bytes are needed. Every
    /// length is checked before anything is allocated, and a frame is
    /// decoded only once it is whole and its checksum holds.
    pub fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        loop {
            let rest = &self.buf[self.consumed..];
            if rest.len() < 4 {
                return Ok(None);
            }
            let len = self.assembler.frame_len(rest[..4].try_into().unwrap())?;
            let total = len + FRAME_OVERHEAD - 1;
            if rest.len() < total {
                return Ok(None);
            }
            let frame = &self.buf[self.consumed..self.consumed + total];
            let record = self.assembler.take_frame(frame)?;
            self.consumed += total;
            if self.consumed == self.buf.len() {
                self.buf.clear();
                self.consumed = 0;
            } else if self.consumed > (1 << 20) && self.consumed * 2 > self.buf.len() {
                // Keep the buffer from growing with what was decoded.
                self.buf.drain(..self.consumed);
                self.consumed = 0;
            }
            if let Some(record) = record {
                return Ok(Some(record));
            }
        }
    }

    /// Whether the stream may end here (between records, no split sync
    /// point half received). A stream cut inside a frame by a dead primary
    /// is not an error for the backup: the partial frame is simply dropped.
    pub fn at_record_boundary(&self) -> bool {
        self.buffered() == 0 && self.assembler.end().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{EndReason, LogWriter};
    use super::*;

    fn header() -> LogHeader {
        LogHeader {
            kernel_hash: [1; 32],
            initrd_hash: None,
            cmdline: String::new(),
            mem_bytes: 64 << 20,
            boot_unix_secs: 0,
            host_cpu: 0,
            net_mac: None,
            tick_delivery: crate::devices::TickDelivery::AtLandmarks,
        }
    }

    fn records() -> Vec<Record> {
        vec![
            Record::Poll {
                landmark: 1,
                now: 5,
            },
            Record::NetRx {
                landmark: 2,
                frame: vec![7; 1514],
            },
            Record::End {
                landmark: 3,
                reason: EndReason::Stopped,
            },
        ]
    }

    /// The bytes a primary streams: the log's frames without magic/header.
    fn stream() -> Vec<u8> {
        let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
        let start = w.written().0 as usize;
        for r in records() {
            w.append(&r).unwrap();
        }
        w.into_inner()[start..].to_vec()
    }

    #[test]
    fn records_come_out_whatever_the_piece_sizes() {
        let bytes = stream();
        for piece in [1, 3, 7, 64, bytes.len()] {
            let mut d = RecordDecoder::new(&header());
            let mut out = Vec::new();
            for chunk in bytes.chunks(piece) {
                d.push(chunk);
                while let Some(r) = d.next_record().unwrap() {
                    out.push(r);
                }
            }
            assert_eq!(out, records(), "pieces of {piece}");
            assert!(d.at_record_boundary());
        }
    }

    /// A sync point with RIP (the first bytes of `kvm_regs`) at `rip`.
    fn sync_point(landmark: u64, rip: u8) -> Record {
        let mut regs = vec![0; 144];
        regs[0] = rip;
        Record::SyncPoint {
            landmark,
            cpu: Box::new(super::super::CpuStateBytes {
                regs,
                xsave: vec![0; 4096],
                ..Default::default()
            }),
            vmm_state: vec![0; 26],
            pages: vec![],
        }
    }

    /// What a clone does: a new stream (a new writer) for the new backup,
    /// whose reader starts afresh. Its first sync point carries the state
    /// whole, so the new backup needs nothing of the old stream.
    #[test]
    fn a_new_stream_starts_with_a_whole_state() {
        let mut old = LogWriter::stream(Vec::new());
        old.append(&sync_point(1, 1)).unwrap();
        old.append(&sync_point(2, 2)).unwrap();
        assert_eq!((old.state_stats().whole, old.state_stats().delta), (1, 1));

        let mut new = LogWriter::stream(Vec::new());
        let records = vec![sync_point(3, 3), sync_point(4, 4)];
        for r in &records {
            new.append(r).unwrap();
        }
        assert_eq!((new.state_stats().whole, new.state_stats().delta), (1, 1));
        let mut d = RecordDecoder::new(&header());
        d.push(&new.into_inner());
        assert_eq!(d.next_record().unwrap().as_ref(), Some(&records[0]));
        assert_eq!(d.next_record().unwrap().as_ref(), Some(&records[1]));
    }

    #[test]
    fn the_reader_reports_its_page_cache_as_the_writer_does() {
        let mut w = LogWriter::stream(Vec::new());
        let page = |fill: u8| super::super::PageData::from(vec![fill; super::super::PAGE_SIZE]);
        for (landmark, pages) in [
            (1, vec![(0x1000, page(1)), (0x2000, page(0))]),
            (2, vec![(0x1000, page(1)), (0x3000, page(3))]),
        ] {
            let Record::SyncPoint { cpu, vmm_state, .. } = sync_point(landmark, 0) else {
                unreachable!()
            };
            w.append(&Record::SyncPoint {
                landmark,
                cpu,
                vmm_state,
                pages,
            })
            .unwrap();
        }
        let mut d = RecordDecoder::new(&header());
        assert_eq!(d.page_stats().cache_capacity, 0, "no block read yet");
        d.push(&w.get_mut()[..]);
        while d.next_record().unwrap().is_some() {}
        let (read, written) = (d.page_stats(), w.page_stats());
        assert_eq!(read, written);
        assert_eq!(
            (
                read.full,
                read.zero,
                read.same,
                read.cache_pages,
                read.cache_bytes
            ),
            (2, 1, 1, 3, 2 * 4096)
        );
    }

    #[test]
    fn a_cut_inside_a_frame_is_not_a_record_boundary() {
        let bytes = stream();
        let mut d = RecordDecoder::new(&header());
        d.push(&bytes[..bytes.len() - 2]);
        while d.next_record().unwrap().is_some() {}
        assert!(!d.at_record_boundary());
        assert!(d.buffered() > 0);
    }

    #[test]
    fn corruption_is_an_error_and_lengths_are_checked_first() {
        let mut bytes = stream();
        bytes[6] ^= 1;
        let mut d = RecordDecoder::new(&header());
        d.push(&bytes);
        assert!(matches!(d.next_record(), Err(LogError::Checksum { .. })));
        let mut d = RecordDecoder::new(&header());
        d.push(&u32::MAX.to_le_bytes());
        let err = d.next_record().unwrap_err();
        assert!(err.to_string().contains("frame length"), "{err}");
    }
}
