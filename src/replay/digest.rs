//! State digests and dirty-page bookkeeping, sans-IO.
//!
//! Both sides hash the vCPU state and the pages written since the previous
//! digest; the backup recomputes the primary's digest over the same pages
//! and reports the first mismatch, so divergence is never silent.

use std::collections::BTreeSet;

pub use super::log::CpuHashes;
use super::log::{CpuStateBytes, PageHash, PAGE_SIZE};

/// The parts of the vCPU state a digest hashes separately, so that a
/// mismatch names what differs.
pub const CPU_PARTS: [&str; 6] = [
    "general registers",
    "special registers",
    "FPU/SSE",
    "MSRs",
    "XSAVE area",
    "pending events",
];

/// The architectural part of `kvm_vcpu_events` (uapi layout): the exception
/// being delivered (injected, vector, has-error-code, pending, error code:
/// bytes 0..8), the external interrupt (injected, vector, soft, interrupt
/// shadow: 8..12) and NMI state (injected, pending, masked: 12..15). Left
/// out: the SIPI vector and SMM state (no APs, no SMM here), `flags` (which
/// fields KVM filled in, host bookkeeping) and the exception payload (a
/// copy of CR2/DR6 kept for nested virtualisation; CR2 itself is in sregs).
fn architectural_events(events: &[u8]) -> &[u8] {
    &events[..events.len().min(15)]
}

/// Hashes of the architectural vCPU state.
pub fn cpu_hashes(cpu: &CpuStateBytes) -> CpuHashes {
    // Without the XSAVE header (bytes 512..576): its component bitmap says
    // which components are in use, which a replica may track differently
    // for registers that hold their initial values (KVM then exports the
    // initial values anyway).
    let xsave = if cpu.xsave.len() >= XSAVE_HEADER.end {
        let mut h = blake3::Hasher::new();
        h.update(&cpu.xsave[..XSAVE_HEADER.start]);
        h.update(&cpu.xsave[XSAVE_HEADER.end..]);
        h.finalize().into()
    } else {
        page_hash(&cpu.xsave)
    };
    [
        page_hash(&cpu.regs),
        page_hash(&cpu.sregs),
        page_hash(&cpu.fpu),
        page_hash(&cpu.msrs),
        xsave,
        page_hash(architectural_events(&cpu.events)),
    ]
}

/// Names of the parts whose hashes differ.
pub fn differing_cpu_parts(a: &CpuHashes, b: &CpuHashes) -> Vec<&'static str> {
    CPU_PARTS
        .iter()
        .zip(a.iter().zip(b))
        .filter(|(_, (x, y))| x != y)
        .map(|(name, _)| *name)
        .collect()
}

/// Where the XSAVE header sits in a standard-format XSAVE area.
const XSAVE_HEADER: std::ops::Range<usize> = 512..576;

/// BLAKE3 of a page (or any byte string).
pub fn page_hash(data: &[u8]) -> [u8; 32] {
    blake3::hash(data).into()
}

/// Guest pages written since some point, from KVM's dirty bitmaps and from
/// the VMM's own writes (which KVM does not log).
#[derive(Debug, Default, Clone)]
pub struct DirtyPages {
    /// Ascending and without repeats up to `sorted`; pages added after it
    /// are sorted in when the set is read (cheaper than an ordered set: a
    /// sync point adds its ~1,000 pages to several sets, docs/benchmarks.md,
    /// "sync-point cost").
    pages: Vec<u64>,
    sorted: usize,
}

impl DirtyPages {
    /// Add the pages of a KVM dirty bitmap for a memory slot starting at `base`.
    pub fn add_bitmap(&mut self, base: u64, bitmap: &[u64]) {
        for (word_index, word) in bitmap.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                self.push(base + (word_index as u64 * 64 + bit) * PAGE_SIZE as u64);
            }
        }
    }

    /// Add every page touched by a write of `len` bytes at `gpa`.
    pub fn add_range(&mut self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / PAGE_SIZE as u64;
        let last = (gpa + len - 1) / PAGE_SIZE as u64;
        for page in first..=last {
            self.push(page * PAGE_SIZE as u64);
        }
    }

    pub fn merge(&mut self, other: &DirtyPages) {
        self.normalize();
        if other.sorted != other.pages.len() {
            self.pages.extend_from_slice(&other.pages);
            self.normalize();
            return;
        }
        // Both ascending: one pass.
        let (mut a, mut b) = (self.pages.iter().peekable(), other.pages.iter().peekable());
        let mut merged = Vec::with_capacity(self.pages.len() + other.pages.len());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&x), Some(&&y)) if x < y => a.next(),
                (Some(&&x), Some(&&y)) if y < x => b.next(),
                (Some(_), Some(_)) => {
                    b.next();
                    a.next()
                }
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            merged.extend(next);
        }
        self.sorted = merged.len();
        self.pages = merged;
    }

    /// The page addresses, ascending, and an empty set left behind.
    pub fn take(&mut self) -> Vec<u64> {
        self.normalize();
        self.sorted = 0;
        std::mem::take(&mut self.pages)
    }

    pub fn len(&self) -> usize {
        if self.sorted == self.pages.len() {
            return self.pages.len();
        }
        let mut pages = self.pages.clone();
        pages.sort_unstable();
        pages.dedup();
        pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Append a page; stays sorted while pages come in ascending order, and
    /// repeats are folded often enough that the set stays within about
    /// twice its distinct pages (the VMM may write one page many times).
    fn push(&mut self, gpa: u64) {
        if self.pages.last() == Some(&gpa) {
            return;
        }
        let in_order =
            self.sorted == self.pages.len() && self.pages.last().is_none_or(|&last| last < gpa);
        self.pages.push(gpa);
        if in_order {
            self.sorted = self.pages.len();
        } else if self.pages.len() > 2 * self.sorted + 1024 {
            self.normalize();
        }
    }

    fn normalize(&mut self) {
        if self.sorted != self.pages.len() {
            self.pages.sort_unstable();
            self.pages.dedup();
            self.sorted = self.pages.len();
        }
    }
}

/// Whether every byte is zero. Word by word without an early exit, which
/// the compiler vectorises: a byte loop that stops at the first non-zero
/// byte was about 10x slower here, and a fresh VM's memory hash checks
/// every page of guest RAM (measured: 90-120 ms for 64 MiB on a loaded
/// development machine).
fn all_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    words.fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes(w.try_into().unwrap())
    }) == 0
        && tail.iter().all(|&b| b == 0)
}

/// A hash of all of guest memory that is cheap to keep current: one hash per
/// page, one per group of pages, and a root over the groups. Only pages
/// reported written are rehashed, so each side keeps it from its own dirty
/// tracking; equal roots mean equal memory whichever side wrote what.
pub struct MemoryHash {
    pages: Vec<[u8; 32]>,
    groups: Vec<[u8; 32]>,
    stale_groups: BTreeSet<usize>,
    zero_page: [u8; 32],
}

/// Pages per group of [`MemoryHash`]: a root costs (pages / 256) × 32
/// bytes of hashing, a dirty page 8 KiB for its group.
const PAGES_PER_GROUP: usize = 256;

impl MemoryHash {
    /// Hash every page of `pages` pages, reading each with `read` (a page
    /// that cannot be read counts as zeros, on both sides alike). All-zero
    /// pages, most of a fresh guest, are recognised without hashing.
    pub fn new(pages: usize, mut read: impl FnMut(usize, &mut [u8])) -> Self {
        let zero_page = page_hash(&[0u8; PAGE_SIZE]);
        let mut buf = vec![0u8; PAGE_SIZE];
        let hashes = (0..pages)
            .map(|i| {
                buf.fill(0);
                read(i, &mut buf);
                if all_zero(&buf) {
                    zero_page
                } else {
                    page_hash(&buf)
                }
            })
            .collect();
        let groups = pages.div_ceil(PAGES_PER_GROUP);
        MemoryHash {
            pages: hashes,
            groups: vec![[0; 32]; groups],
            stale_groups: (0..groups).collect(),
            zero_page,
        }
    }

    /// Page `index` now holds `data` (ignored past the end of memory);
    /// returns its hash.
    pub fn update(&mut self, index: usize, data: &[u8]) -> [u8; 32] {
        let h = if all_zero(data) {
            self.zero_page
        } else {
            page_hash(data)
        };
        if let Some(slot) = self.pages.get_mut(index) {
            if *slot != h {
                *slot = h;
                self.stale_groups.insert(index / PAGES_PER_GROUP);
            }
        }
        h
    }

    /// The hash of all of memory.
    pub fn root(&mut self) -> [u8; 32] {
        for g in std::mem::take(&mut self.stale_groups) {
            let end = ((g + 1) * PAGES_PER_GROUP).min(self.pages.len());
            let mut h = blake3::Hasher::new();
            for page in &self.pages[g * PAGES_PER_GROUP..end] {
                h.update(page);
            }
            self.groups[g] = h.finalize().into();
        }
        let mut h = blake3::Hasher::new();
        h.update(&(self.pages.len() as u64).to_le_bytes());
        for group in &self.groups {
            h.update(group);
        }
        h.finalize().into()
    }

    /// The current hash of page `index`.
    pub fn page(&self, index: usize) -> Option<[u8; 32]> {
        self.pages.get(index).copied()
    }
}

/// The running signature of every landmark: what kind of exit each one was,
/// where (port, address, MSR, RIP of a trap) and the data it moved, folded
/// into one hash. The backup folds its own landmarks the same way, so an
/// OUT where the primary did an IN is caught at the next digest even if
/// registers and memory agree there.
#[derive(Debug, Clone, Default)]
pub struct LandmarkSignature {
    running: [u8; 32],
    last: [u8; 16],
}

/// What a landmark was, for its signature (`InterruptWindow`: an
/// interrupt-window exit the engine asked for, engine/interrupt_window.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandmarkKind<'a> {
    PortIn { port: u16, data: &'a [u8] },
    PortOut { port: u16, data: &'a [u8] },
    MmioRead { addr: u64, data: &'a [u8] },
    MmioWrite { addr: u64, data: &'a [u8] },
    Halt,
    TimeTrap { rip: u64 },
    RandomTrap { rip: u64 },
    MsrRead { index: u32 },
    SyncPoint,
    InterruptWindow,
}

impl LandmarkSignature {
    /// Fold landmark `number` in.
    pub fn fold(&mut self, number: u64, kind: LandmarkKind<'_>) {
        let mut one = blake3::Hasher::new();
        one.update(&number.to_le_bytes());
        let (tag, place, data): (u8, u64, &[u8]) = match kind {
            LandmarkKind::PortIn { port, data } => (1, u64::from(port), data),
            LandmarkKind::PortOut { port, data } => (2, u64::from(port), data),
            LandmarkKind::MmioRead { addr, data } => (3, addr, data),
            LandmarkKind::MmioWrite { addr, data } => (4, addr, data),
            LandmarkKind::Halt => (5, 0, &[]),
            LandmarkKind::TimeTrap { rip } => (6, rip, &[]),
            LandmarkKind::RandomTrap { rip } => (7, rip, &[]),
            LandmarkKind::MsrRead { index } => (8, u64::from(index), &[]),
            LandmarkKind::SyncPoint => (9, 0, &[]),
            LandmarkKind::InterruptWindow => (10, 0, &[]),
        };
        one.update(&[tag, data.len() as u8]);
        one.update(&place.to_le_bytes());
        one.update(data);
        let this = one.finalize();
        self.last.copy_from_slice(&this.as_bytes()[..16]);
        let mut h = blake3::Hasher::new();
        h.update(&self.running);
        h.update(this.as_bytes());
        self.running = h.finalize().into();
    }

    /// Fold in an input delivered at the current landmark (a received
    /// frame, serial bytes), so a log whose input was altered is caught at
    /// the next digest even if the guest never looked at the bytes.
    pub fn fold_input(&mut self, data: &[u8]) {
        let mut h = blake3::Hasher::new();
        h.update(&self.running);
        h.update(b"input");
        h.update(blake3::hash(data).as_bytes());
        self.running = h.finalize().into();
    }

    /// Go on from another replica's signature (a clone's snapshot).
    pub fn restore(&mut self, running: [u8; 32], last: [u8; 16]) {
        self.running = running;
        self.last = last;
    }

    /// The running hash over every landmark folded so far.
    pub fn running(&self) -> [u8; 32] {
        self.running
    }

    /// The last landmark's own signature (what `--trace-landmarks` logs).
    pub fn last(&self) -> [u8; 16] {
        self.last
    }
}

/// The 128-bit hash a `NetTx` record carries for a transmitted frame.
pub fn frame_hash(frame: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(frame).as_bytes()[..16]);
    out
}

/// BLAKE3 of a device state's canonical JSON form.
pub fn state_hash<T: serde::Serialize>(state: &T) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    // Writing into a hasher cannot fail; a state that cannot be serialised
    // (a map with non-string keys) hashes its error text on both sides.
    if let Err(e) = serde_json::to_writer(&mut h, state) {
        h.update(e.to_string().as_bytes());
    }
    h.finalize().into()
}

/// Pages whose hash on the backup differs from the primary's, ascending.
pub fn mismatched_pages(
    primary: &[PageHash],
    mut backup_page: impl FnMut(u64) -> Option<[u8; 32]>,
) -> Vec<u64> {
    primary
        .iter()
        .filter(|p| backup_page(p.gpa) != Some(p.hash))
        .map(|p| p.gpa)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_bits_become_page_addresses() {
        let mut d = DirtyPages::default();
        d.add_bitmap(0, &[0b1010, 1 << 63]);
        d.add_bitmap(1 << 32, &[1]);
        assert_eq!(d.take(), vec![0x1000, 0x3000, 127 * 0x1000, 1 << 32]);
        assert!(d.is_empty());
    }

    proptest::proptest! {
        /// Whatever the order of bitmaps, ranges and merges, the set holds
        /// what an ordered set would, ascending and without repeats.
        #[test]
        fn the_set_is_what_an_ordered_set_holds(
            ops in proptest::collection::vec((0u8..3, 0u64..64, 0u64..3), 0..200),
        ) {
            let mut d = DirtyPages::default();
            let mut model = BTreeSet::new();
            for (op, page, len) in ops {
                match op {
                    0 => {
                        d.add_range(page * 4096 + 1, len * 4096);
                        if len > 0 {
                            for p in page..=(page * 4096 + len * 4096) / 4096 {
                                model.insert(p * 4096);
                            }
                        }
                    }
                    1 => {
                        d.add_bitmap(0, &[1 << page]);
                        model.insert(page * 4096);
                    }
                    _ => {
                        let mut other = DirtyPages::default();
                        other.add_range(page * 4096, 4096);
                        other.add_range(((page + 7) % 64) * 4096, 1);
                        d.merge(&other);
                        model.insert(page * 4096);
                        model.insert(((page + 7) % 64) * 4096);
                    }
                }
                proptest::prop_assert_eq!(d.len(), model.len());
            }
            let got = d.take();
            proptest::prop_assert_eq!(got, model.into_iter().collect::<Vec<_>>());
            proptest::prop_assert!(d.is_empty());
        }
    }

    #[test]
    fn ranges_cover_every_touched_page() {
        let mut d = DirtyPages::default();
        d.add_range(0x1ffc, 8);
        d.add_range(0x5000, 0);
        d.add_range(0x9000, 0x1000);
        assert_eq!(d.take(), vec![0x1000, 0x2000, 0x9000]);
    }

    #[test]
    fn digests_see_every_byte() {
        let cpu = CpuStateBytes {
            regs: vec![0; 144],
            sregs: vec![0; 312],
            fpu: vec![0; 416],
            events: vec![0; 64],
            msrs: vec![0; 12],
            xsave: vec![0; 4096],
        };
        let parts = |c: &CpuStateBytes| differing_cpu_parts(&cpu_hashes(&cpu), &cpu_hashes(c));
        let mut other = cpu.clone();
        other.fpu[100] = 1;
        assert_eq!(parts(&other), vec!["FPU/SSE"]);
        let mut msr = cpu.clone();
        msr.msrs[11] = 1;
        msr.sregs[0] = 1;
        assert_eq!(parts(&msr), vec!["special registers", "MSRs"]);
        let mut ymm = cpu.clone();
        ymm.xsave[576] = 1; // first byte of the AVX component
        assert_eq!(parts(&ymm), vec!["XSAVE area"]);
        let mut header = cpu.clone();
        header.xsave[512] = 4; // XSTATE_BV: AVX in use
        assert!(parts(&header).is_empty());
        let mut events = cpu.clone();
        events.events[0] = 1; // an exception being injected
        assert_eq!(parts(&events), vec!["pending events"]);
        let mut bookkeeping = cpu.clone();
        bookkeeping.events[20] = 1; // `flags`: host bookkeeping
        assert!(parts(&bookkeeping).is_empty());
        let page = vec![0u8; PAGE_SIZE];
        let mut page2 = page.clone();
        page2[4095] = 1;
        assert_ne!(page_hash(&page), page_hash(&page2));
    }

    #[test]
    fn mismatches_are_named_in_order() {
        let primary = vec![
            PageHash {
                gpa: 0x1000,
                hash: [1; 32],
            },
            PageHash {
                gpa: 0x2000,
                hash: [2; 32],
            },
            PageHash {
                gpa: 0x3000,
                hash: [3; 32],
            },
        ];
        let backup = |gpa| match gpa {
            0x1000 => Some([1; 32]),
            0x2000 => Some([9; 32]),
            _ => None,
        };
        assert_eq!(mismatched_pages(&primary, backup), vec![0x2000, 0x3000]);
    }

    #[test]
    fn zero_pages_are_recognised_whatever_byte_is_set() {
        let mut page = vec![0u8; PAGE_SIZE + 3];
        assert!(all_zero(&page));
        for i in [0, 7, 8, 4095, PAGE_SIZE + 2] {
            page[i] = 0x80;
            assert!(!all_zero(&page), "byte {i}");
            page[i] = 0;
        }
        assert!(all_zero(&[]));
    }

    #[test]
    fn memory_hash_follows_contents_not_who_reported_the_write() {
        let mut mem = vec![vec![0u8; PAGE_SIZE]; 600];
        mem[3][7] = 1;
        let read = |m: &Vec<Vec<u8>>| {
            let m = m.clone();
            move |i: usize, buf: &mut [u8]| buf.copy_from_slice(&m[i])
        };
        let mut a = MemoryHash::new(600, read(&mem));
        let mut b = MemoryHash::new(600, read(&mem));
        assert_eq!(a.root(), b.root());
        // One side reports a write that left the bytes as they were.
        b.update(3, &mem[3]);
        assert_eq!(a.root(), b.root());
        // A write on one side only (a backup-only write) changes its root.
        mem[599][0] = 9;
        b.update(599, &mem[599]);
        assert_ne!(a.root(), b.root());
        a.update(599, &mem[599]);
        assert_eq!(a.root(), b.root());
        assert_eq!(a.page(599), Some(page_hash(&mem[599])));
        assert_eq!(a.page(600), None);
    }

    #[test]
    fn landmark_signatures_see_kind_place_and_data() {
        let sig = |kinds: &[LandmarkKind]| {
            let mut s = LandmarkSignature::default();
            for (i, k) in kinds.iter().enumerate() {
                s.fold(i as u64 + 1, *k);
            }
            s.running()
        };
        let base = sig(&[LandmarkKind::PortOut {
            port: 0x3f8,
            data: b"a",
        }]);
        assert_ne!(
            base,
            sig(&[LandmarkKind::PortIn {
                port: 0x3f8,
                data: b"a"
            }])
        );
        assert_ne!(
            base,
            sig(&[LandmarkKind::PortOut {
                port: 0x3f9,
                data: b"a"
            }])
        );
        assert_ne!(
            base,
            sig(&[LandmarkKind::PortOut {
                port: 0x3f8,
                data: b"b"
            }])
        );
        assert_eq!(
            base,
            sig(&[LandmarkKind::PortOut {
                port: 0x3f8,
                data: b"a"
            }])
        );
        assert_ne!(
            sig(&[LandmarkKind::Halt, LandmarkKind::SyncPoint]),
            sig(&[LandmarkKind::SyncPoint, LandmarkKind::Halt])
        );
    }
}
