//! Writing a log: the header, then records framed and checked against
//! every limit the reader enforces, sync-point pages and vCPU states sent
//! against what every reader will hold.

use std::io::{self, Write};

use super::codec::{
    self, encode_header, encode_record, encode_sync_pages, encode_sync_point, write_frame,
    EncodeBuffers,
};
use super::cpu_state::{StateEncoder, StateStats};
use super::pages::{
    commit_pages, PageCache, PageContents, PageStats, DEFAULT_PAGE_CACHE_PAGES,
    MAX_PAGE_CACHE_PAGES,
};
use super::{
    CpuStateBytes, LogHeader, Record, KIND_HEADER, LOG_MAGIC, LOG_VERSION, MAX_PAGES_PER_RECORD,
};

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
    /// Page blocks and frames, reused from record to record.
    buffers: EncodeBuffers,
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
            buffers: EncodeBuffers::default(),
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
        let frame = encode_record(
            record,
            &self.pages,
            &self.states,
            &mut self.buffers,
            &mut stats,
        )
        .map_err(invalid_record)?;
        let carries_pages = matches!(record, Record::SyncPages { .. } | Record::SyncState { .. });
        self.write_frames(
            record.kind_name(),
            record.landmark(),
            vec![frame],
            carries_pages.then_some(stats),
        )?;
        // Readers trim their cache after a whole sync point and after a
        // sync state (reader.rs), so the writer does too.
        if let Record::SyncState { .. } = record {
            self.pages.trim();
        }
        Ok(())
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
                encode_sync_pages(landmark, chunk, &self.pages, &mut self.buffers, &mut stats)
                    .map_err(invalid_record)?,
            );
        }
        let state = self.states.encode(cpu, vmm_state).map_err(invalid_record)?;
        frames.push(
            encode_sync_point(
                landmark,
                state,
                last,
                &self.pages,
                &mut self.buffers,
                &mut stats,
            )
            .map_err(invalid_record)?,
        );
        self.write_frames("sync-point", landmark, frames, Some(stats))?;
        self.pages.trim();
        Ok(())
    }

    /// Whether the page cache holds `data` as the last version of `gpa`
    /// this log carried: such a page may be handed to
    /// [`LogWriter::append_sync_point`] as
    /// [`SyncPage::Unchanged`](super::SyncPage::Unchanged) (until that sync
    /// point is appended), without keeping a copy.
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
            let size: u64 = frames.iter().map(|frame| frame.frame.len() as u64).sum();
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
            self.out.write_all(&frame.frame)?;
            self.bytes += frame.frame.len() as u64;
            self.records += 1;
            // Readers update their cache and state base as they decode
            // each frame.
            commit_pages(&mut self.pages, &frame.pages);
            if let Some(state) = frame.state {
                self.states.commit(state);
            }
            self.buffers.give_back(frame.frame);
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
