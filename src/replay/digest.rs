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
pub const CPU_PARTS: [&str; 5] = [
    "general registers",
    "special registers",
    "FPU/SSE",
    "MSRs",
    "XSAVE area",
];

/// Hashes of the architectural vCPU state. (`kvm_vcpu_events` is left out:
/// it holds host-side bookkeeping that legitimately differs between hosts.)
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
    pages: BTreeSet<u64>,
}

impl DirtyPages {
    /// Add the pages of a KVM dirty bitmap for a memory slot starting at `base`.
    pub fn add_bitmap(&mut self, base: u64, bitmap: &[u64]) {
        for (word_index, word) in bitmap.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                self.pages
                    .insert(base + (word_index as u64 * 64 + bit) * PAGE_SIZE as u64);
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
            self.pages.insert(page * PAGE_SIZE as u64);
        }
    }

    pub fn merge(&mut self, other: &DirtyPages) {
        self.pages.extend(other.pages.iter().copied());
    }

    /// The page addresses, ascending, and an empty set left behind.
    pub fn take(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pages).into_iter().collect()
    }

    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
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
        events.events[0] = 1;
        assert!(parts(&events).is_empty());
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
}
