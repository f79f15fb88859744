//! Sync-point pages in formats 4 and 5 (docs/log-format.md, "Pages"), sans-IO.
//!
//! Each page travels as a zero page, as "unchanged", as a sparse XOR delta
//! against the version of it the log carried last, or whole; the block of
//! them is then LZ4-compressed.
//!
//! The base of a delta is not the backup's guest memory: the backup runs
//! the stretch from the previous sync point to the landmark before this one
//! itself, so for a page written in that stretch its memory holds neither
//! the version the log carried last nor the primary's current one. The base
//! is the page cache instead: the last version of each recently carried
//! page, which the writer and every reader of one log (or one live stream)
//! keep alike, because they apply the same page blocks in the same order
//! under the same bounded, deterministic eviction rule. A reader hands out
//! whole pages, so the backup writes them as before; a reader's cache and
//! the records it hands out share those pages (`PageData`), so an
//! unchanged or zero page costs no copy. Every delta and every "unchanged"
//! page names its base by CRC-32: a cache out of step is an error naming
//! the page, never a wrong page.

use std::collections::{HashSet, VecDeque};

use rustc_hash::FxHashMap;

use super::codec::{Dec, Enc};
use super::delta::{apply_runs, encode_runs, put_varint, read_varint};
use super::{PageData, Pages, MAX_PAGES_PER_RECORD, PAGE_SIZE};

/// Pages a writer's cache holds unless told otherwise (64 MiB of contents).
pub const DEFAULT_PAGE_CACHE_PAGES: u32 = 16_384;
/// Most pages a log may ask its readers to cache (256 MiB): a reader
/// refuses a larger cache before it holds a page of it.
pub const MAX_PAGE_CACHE_PAGES: u32 = 65_536;

/// How a page travels.
const KIND_FULL: u8 = 0;
const KIND_ZERO: u8 = 1;
const KIND_SAME: u8 = 2;
const KIND_XOR: u8 = 3;

/// Most bytes one page entry takes unpacked: a 10-byte varint step, the
/// kind, and a whole page (a delta is only sent when it is smaller).
const MAX_ENTRY_BYTES: usize = 10 + 1 + PAGE_SIZE;

/// One cached page: its last contents, or all zero (which takes no memory).
/// A reader's contents are shared with the records it decoded them into.
enum Cached {
    Zero,
    Data(PageData),
}

struct Entry {
    page: Cached,
    crc: u32,
    /// When it was last carried; orders eviction.
    stamp: u64,
}

/// The last version of each recently carried page, least recently carried
/// evicted first beyond its capacity; see the module comment.
pub struct PageCache {
    entries: FxHashMap<u64, Entry>,
    /// (stamp, page) in stamp order, oldest first; an item whose stamp is
    /// no longer its page's (carried again since, or evicted) is stale and
    /// skipped. Cheaper than an ordered map: a sync point touches every
    /// page it carries (docs/benchmarks.md, "sync-point cost"), and the
    /// eviction order is the same.
    by_stamp: VecDeque<(u64, u64)>,
    next_stamp: u64,
    capacity: usize,
    /// Entries holding contents (not zero pages).
    data_pages: usize,
}

/// What the page cache holds and how the pages of sync points travelled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageStats {
    /// Pages sent whole (not cached, or a delta would not be smaller).
    pub full: u64,
    /// All-zero pages.
    pub zero: u64,
    /// Pages equal to the version the log carried last.
    pub same: u64,
    /// Pages sent as a delta against it.
    pub delta: u64,
    /// Pages the cache may hold.
    pub cache_capacity: u64,
    /// Pages it holds, and the bytes of contents they take.
    pub cache_pages: u64,
    pub cache_bytes: u64,
}

fn zero_crc() -> u32 {
    static ZERO_CRC: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ZERO_CRC.get_or_init(|| crc32fast::hash(&[0u8; PAGE_SIZE]))
}

impl PageCache {
    pub fn new(capacity: u32) -> Self {
        PageCache {
            entries: FxHashMap::default(),
            by_stamp: VecDeque::new(),
            next_stamp: 0,
            capacity: capacity as usize,
            data_pages: 0,
        }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity as u32
    }

    /// Pages held, and the bytes of contents they take.
    pub fn usage(&self) -> (u64, u64) {
        (
            self.entries.len() as u64,
            (self.data_pages * PAGE_SIZE) as u64,
        )
    }

    /// The cached contents of `gpa` and their CRC (None when not cached),
    /// without copying a zero page.
    fn get(&self, gpa: u64) -> Option<(&[u8], u32)> {
        const ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        self.entries.get(&gpa).map(|e| {
            let bytes = match &e.page {
                Cached::Zero => &ZERO[..],
                Cached::Data(bytes) => &bytes[..],
            };
            (bytes, e.crc)
        })
    }

    /// The cached contents of `gpa`, shared, and their CRC.
    fn get_shared(&self, gpa: u64) -> Option<(PageData, u32)> {
        self.entries.get(&gpa).map(|e| {
            let page = match &e.page {
                Cached::Zero => PageData::zero(),
                Cached::Data(page) => page.clone(),
            };
            (page, e.crc)
        })
    }

    /// A new stamp for `gpa`, queued; the queue is compacted when stale
    /// items outnumber live ones, so it stays within twice the entries.
    fn stamp(&mut self, gpa: u64) -> u64 {
        // Before queueing the new item: its page's stamp is set after.
        if self.by_stamp.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.by_stamp
                .retain(|(stamp, gpa)| entries.get(gpa).is_some_and(|e| e.stamp == *stamp));
        }
        self.next_stamp += 1;
        self.by_stamp.push_back((self.next_stamp, gpa));
        self.next_stamp
    }

    /// The page was carried again, unchanged.
    fn touch(&mut self, gpa: u64) {
        if self.entries.contains_key(&gpa) {
            let stamp = self.stamp(gpa);
            if let Some(e) = self.entries.get_mut(&gpa) {
                e.stamp = stamp;
            }
        }
    }

    /// The page now holds `data` (a writer's copy).
    fn store(&mut self, gpa: u64, data: &[u8]) {
        self.put(gpa, data, None);
    }

    /// The page now holds `page`, which a decoded record holds too.
    fn store_shared(&mut self, gpa: u64, page: &PageData) {
        self.put(gpa, page, Some(page));
    }

    fn put(&mut self, gpa: u64, data: &[u8], shared: Option<&PageData>) {
        if self.capacity == 0 {
            return;
        }
        let zero = all_zero(data);
        let crc = if zero {
            zero_crc()
        } else {
            crc32fast::hash(data)
        };
        let stamp = self.stamp(gpa);
        // One lookup: a new entry starts as a zero page and is filled below.
        let entry = self.entries.entry(gpa).or_insert(Entry {
            page: Cached::Zero,
            crc,
            stamp,
        });
        let old = std::mem::replace(&mut entry.page, Cached::Zero);
        if matches!(old, Cached::Data(_)) {
            self.data_pages -= 1;
        }
        if !zero {
            self.data_pages += 1;
            entry.page = Cached::Data(match (shared, old) {
                (Some(page), _) => page.clone(),
                // A writer's own copy, never handed out: overwritten in place.
                (None, Cached::Data(mut page)) => match page.unique_mut() {
                    Some(bytes) if bytes.len() == data.len() => {
                        bytes.copy_from_slice(data);
                        page
                    }
                    _ => PageData::from(data),
                },
                (None, Cached::Zero) => PageData::from(data),
            });
        }
        entry.crc = crc;
        entry.stamp = stamp;
    }

    /// Whether the cache holds `data` as the page's last version.
    pub(super) fn holds(&self, gpa: u64, data: &[u8]) -> bool {
        self.get(gpa).is_some_and(|(held, _)| held == data)
    }

    /// Evict the least recently carried pages down to the capacity. Done
    /// after a whole sync point only, never between the records it is split
    /// into (a later one may need a base an earlier one would evict).
    pub(super) fn trim(&mut self) {
        while self.entries.len() > self.capacity {
            let Some((stamp, victim)) = self.by_stamp.pop_front() else {
                break;
            };
            if self.entries.get(&victim).is_some_and(|e| e.stamp == stamp) {
                if let Some(old) = self.entries.remove(&victim) {
                    if matches!(old.page, Cached::Data(_)) {
                        self.data_pages -= 1;
                    }
                }
            }
        }
    }
}

/// A sync-point page as a writer is handed it: its contents, or
/// "unchanged": the caller found it equal to the version the page cache
/// holds ([`super::LogWriter::holds_page`]) and need not keep a copy.
#[derive(Debug, Clone, Copy)]
pub enum SyncPage<'a> {
    Unchanged,
    Contents(&'a [u8]),
}

/// A page's contents as [`encode_pages`] takes them: None for a page known
/// to be unchanged.
pub trait PageContents {
    fn contents(&self) -> Option<&[u8]>;
}

impl PageContents for Vec<u8> {
    fn contents(&self) -> Option<&[u8]> {
        Some(self)
    }
}

impl PageContents for PageData {
    fn contents(&self) -> Option<&[u8]> {
        Some(self)
    }
}

impl PageContents for &[u8] {
    fn contents(&self) -> Option<&[u8]> {
        Some(self)
    }
}

impl PageContents for SyncPage<'_> {
    fn contents(&self) -> Option<&[u8]> {
        match self {
            SyncPage::Unchanged => None,
            SyncPage::Contents(data) => Some(data),
        }
    }
}

/// How one page of an encoded block changes the cache, applied once its
/// record is written (a record refused by the size limit changes nothing).
pub(super) enum PageUpdate<'a> {
    Same(u64),
    Store(u64, &'a [u8]),
}

/// Apply a written block's updates, as every reader does while decoding it.
pub(super) fn commit_pages(cache: &mut PageCache, updates: &[PageUpdate]) {
    for update in updates {
        match update {
            PageUpdate::Same(gpa) => cache.touch(*gpa),
            PageUpdate::Store(gpa, data) => cache.store(*gpa, data),
        }
    }
}

fn all_zero(data: &[u8]) -> bool {
    data.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().unwrap()) == 0)
}

/// A page entry's kind and base for "unchanged" (its step is written).
fn push_same(block: &mut Vec<u8>, crc: u32, stats: &mut PageStats) {
    block.push(KIND_SAME);
    block.extend_from_slice(&crc.to_le_bytes());
    stats.same += 1;
}

/// A page entry's kind and contents for "whole" (its step is written).
fn push_full(block: &mut Vec<u8>, data: &[u8], stats: &mut PageStats) {
    block.push(KIND_FULL);
    block.extend_from_slice(data);
    stats.full += 1;
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

/// Encode `pages` against `cache` into `e`: `u32 count`, `u32` the cache's
/// capacity in pages, then one packed field with an entry per page (see
/// docs/log-format.md), built in `block` (emptied first; a buffer the
/// writer reuses). The cache is not changed; the returned updates are
/// for [`commit_pages`] once the record is written.
pub(super) fn encode_pages<'a, D: PageContents>(
    e: &mut Enc,
    block: &mut Vec<u8>,
    cache: &PageCache,
    pages: &'a [(u64, D)],
    stats: &mut PageStats,
) -> Vec<PageUpdate<'a>> {
    if pages.len() > MAX_PAGES_PER_RECORD {
        e.error.get_or_insert_with(|| {
            format!(
                "{} pages in one record, more than {MAX_PAGES_PER_RECORD}",
                pages.len()
            )
        });
    }
    block.clear();
    let mut updates = Vec::with_capacity(pages.len());
    // Ascending pages (as sync points list them) cannot repeat; any other
    // order is checked with a set.
    let ascending = pages.windows(2).all(|w| w[0].0 < w[1].0);
    let mut seen = HashSet::with_capacity(if ascending { 0 } else { pages.len() });
    let mut previous = 0i64;
    for (gpa, page) in pages {
        let Some(data) = page.contents() else {
            // Known unchanged: the cache must hold it.
            let number = (gpa / PAGE_SIZE as u64) as i64;
            match cache.get(*gpa) {
                Some((_, crc))
                    if gpa % PAGE_SIZE as u64 == 0 && (ascending || seen.insert(*gpa)) =>
                {
                    put_varint(block, zigzag(number.wrapping_sub(previous)));
                    previous = number;
                    push_same(block, crc, stats);
                    updates.push(PageUpdate::Same(*gpa));
                }
                _ => {
                    e.error.get_or_insert_with(|| {
                        format!("page {gpa:#x} is sent as unchanged, but the page cache has no copy of it (or it is not aligned, or appears twice)")
                    });
                }
            }
            continue;
        };
        if data.len() != PAGE_SIZE
            || gpa % PAGE_SIZE as u64 != 0
            || (!ascending && !seen.insert(*gpa))
        {
            e.error.get_or_insert_with(|| {
                format!(
                    "page {gpa:#x} of {} bytes is not one aligned page, or appears twice",
                    data.len()
                )
            });
            continue;
        }
        let number = (gpa / PAGE_SIZE as u64) as i64;
        put_varint(block, zigzag(number.wrapping_sub(previous)));
        previous = number;
        let zero = all_zero(data);
        match cache.get(*gpa) {
            // A zero page whose last version was zero too is unchanged.
            Some((base, crc)) if zero && all_zero(base) => {
                push_same(block, crc, stats);
                updates.push(PageUpdate::Same(*gpa));
                continue;
            }
            _ if zero => {
                block.push(KIND_ZERO);
                stats.zero += 1;
            }
            Some((base, crc)) => {
                // One scan of the page against its base finds both "equal"
                // and the delta (no comparison first: docs/benchmarks.md,
                // "sync-point CPU").
                let at = block.len();
                block.push(KIND_XOR);
                block.extend_from_slice(&crc.to_le_bytes());
                match encode_runs(base, data, PAGE_SIZE, block) {
                    Some(0) => {
                        block.truncate(at);
                        push_same(block, crc, stats);
                        updates.push(PageUpdate::Same(*gpa));
                        continue;
                    }
                    Some(_) => stats.delta += 1,
                    None => {
                        block.truncate(at);
                        push_full(block, data, stats);
                    }
                }
            }
            None => push_full(block, data, stats),
        }
        updates.push(PageUpdate::Store(*gpa, data));
    }
    e.u32(u32::try_from(pages.len()).unwrap_or(u32::MAX));
    e.u32(cache.capacity());
    // Whole pages of real guests compress well (page tables, sparse
    // pages: a Linux boot's sync-point pages took ~700 bytes each under
    // format 3); LZ4 is fast enough to stay off the critical path.
    e.packed(block);
    updates
}

/// A reader's page state: the cache, once the log has said how large it
/// is, and the most pages it may hold here (the guest's page count).
pub(super) struct PageDecoder {
    cache: Option<PageCache>,
    max_pages: usize,
    /// How the pages decoded so far travelled.
    carried: PageStats,
}

impl PageDecoder {
    pub(super) fn new(max_pages: usize) -> Self {
        PageDecoder {
            cache: None,
            max_pages,
            carried: PageStats::default(),
        }
    }

    /// How the pages decoded so far travelled, and the cache.
    pub(super) fn stats(&self) -> PageStats {
        let (capacity, (pages, bytes)) = match &self.cache {
            Some(cache) => (u64::from(cache.capacity()), cache.usage()),
            None => (0, (0, 0)),
        };
        PageStats {
            cache_capacity: capacity,
            cache_pages: pages,
            cache_bytes: bytes,
            ..self.carried
        }
    }

    /// A whole sync point was decoded: evict as the writer did.
    pub(super) fn end_of_sync_point(&mut self) {
        if let Some(cache) = &mut self.cache {
            cache.trim();
        }
    }

    /// The cache this log asks for: set by its first page block, the same
    /// in every later one.
    fn cache_for(&mut self, announced: u32) -> Result<&mut PageCache, String> {
        if announced > MAX_PAGE_CACHE_PAGES {
            return Err(format!(
                "the log asks for a page cache of {announced} pages, more than {MAX_PAGE_CACHE_PAGES}"
            ));
        }
        // More than the guest has pages never evicts either.
        let expected = match u32::try_from(self.max_pages) {
            Ok(0) => announced,
            Ok(max) => announced.min(max),
            Err(_) => announced,
        };
        let cache = self.cache.get_or_insert_with(|| PageCache::new(expected));
        if cache.capacity() != expected {
            return Err(format!(
                "the page cache changes size within the log (to {announced} pages)"
            ));
        }
        Ok(cache)
    }

    /// Inverse of [`encode_pages`], updating the cache as the writer did.
    /// A block that does not decode, or whose bases are not the versions
    /// this cache holds, is an error naming the page.
    pub(super) fn decode(&mut self, d: &mut Dec) -> Result<Pages, String> {
        let n = d.u32()? as usize;
        if n > MAX_PAGES_PER_RECORD {
            return Err(format!(
                "{n} pages is more than a record can hold ({MAX_PAGES_PER_RECORD})"
            ));
        }
        let announced = d.u32()?;
        let block = d
            .packed(n * MAX_ENTRY_BYTES)
            .map_err(|e| format!("page contents: {e}"))?;
        let cache = self.cache_for(announced)?;
        let mut carried = PageStats::default();
        let mut b = Dec(&block);
        let mut pages = Vec::with_capacity(n);
        let mut seen = HashSet::with_capacity(n);
        let mut previous = 0i64;
        for i in 0..n {
            let step = read_varint(&mut b).map_err(|e| format!("page entry {i}: {e}"))?;
            let number = previous.wrapping_add(unzigzag(step));
            previous = number;
            let gpa = u64::try_from(number)
                .ok()
                .and_then(|n| n.checked_mul(PAGE_SIZE as u64))
                .ok_or_else(|| format!("page entry {i}: page number {number} is out of range"))?;
            if !seen.insert(gpa) {
                return Err(format!("page {gpa:#x} appears twice in one record"));
            }
            let kind = b.u8().map_err(|e| format!("page {gpa:#x}: {e}"))?;
            // Only a whole page or a delta is a new copy; the rest share.
            let data = match kind {
                KIND_FULL => PageData::from(b.take(PAGE_SIZE)?),
                KIND_ZERO => PageData::zero(),
                KIND_SAME | KIND_XOR => {
                    let crc = b.u32()?;
                    let held = cache.get_shared(gpa);
                    let base = match held {
                        Some((base, held)) if held == crc => base,
                        _ => {
                            return Err(format!(
                                "page {gpa:#x} is sent against a base with CRC {crc:#010x}, but this reader holds {}: the page caches are out of step",
                                match held {
                                    Some((_, h)) => format!("CRC {h:#010x}"),
                                    None => "no copy of it".to_string(),
                                }
                            ))
                        }
                    };
                    if kind == KIND_XOR {
                        PageData::changed(&base, |bytes| apply_runs(&mut b, bytes, 1))
                            .map_err(|e| format!("page {gpa:#x}: delta: {e}"))?
                    } else {
                        base
                    }
                }
                other => return Err(format!("page {gpa:#x}: unknown page kind {other}")),
            };
            match kind {
                KIND_FULL => carried.full += 1,
                KIND_ZERO => carried.zero += 1,
                KIND_SAME => carried.same += 1,
                _ => carried.delta += 1,
            }
            if kind == KIND_SAME {
                cache.touch(gpa);
            } else {
                cache.store_shared(gpa, &data);
            }
            pages.push((gpa, data));
        }
        b.finish().map_err(|e| format!("page contents: {e}"))?;
        self.carried.full += carried.full;
        self.carried.zero += carried.zero;
        self.carried.same += carried.same;
        self.carried.delta += carried.delta;
        Ok(pages)
    }
}

#[cfg(test)]
#[path = "pages_tests.rs"]
mod tests;
