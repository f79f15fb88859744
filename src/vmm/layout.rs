//! Guest physical memory layout shared by the boot code and the VMM.
//!
//! Everything the VMM writes before the first instruction lives below 1 MiB,
//! away from where kernels load (1 MiB for the test guests, 16 MiB for Linux).

/// GDT used at entry: null, null, 64-bit code (0x10), data (0x18), TSS (0x20).
/// The selectors match Linux's 64-bit boot protocol (`__BOOT_CS`/`__BOOT_DS`).
pub const GDT_ADDR: u64 = 0x500;
pub const BOOT_CODE_SELECTOR: u16 = 0x10;
pub const BOOT_DATA_SELECTOR: u16 = 0x18;
pub const BOOT_TSS_SELECTOR: u16 = 0x20;

/// Initial stack (grows down from here); kernels set up their own at once.
pub const BOOT_STACK_TOP: u64 = 0x6000;
/// Linux `boot_params` ("zero page"); RSI points here at entry.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Identity-mapping page tables: PML4, one PDPT, four PDs of 2 MiB pages (4 GiB).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xA000;
pub const PD_ADDR: u64 = 0xB000;
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// Kernel command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Linux x86 `COMMAND_LINE_SIZE`, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the legacy BIOS/EBDA hole reported as reserved in the e820 map.
pub const EBDA_START: u64 = 0x9FC00;
/// First address above the legacy hole.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// RAM below 4 GiB stops here; above it sits the PCI/MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
pub const FOUR_GIB: u64 = 1 << 32;

/// Guest-physical page of the scratch memslot that
/// [`Vm::invalidate_shadow_mmu`](super::vm::Vm::invalidate_shadow_mmu) adds
/// and deletes at once; it is never guest-visible (the vCPU does not run
/// meanwhile), so it may sit in the MMIO hole.
pub const SHADOW_FLUSH_SLOT_GPA: u64 = FOUR_GIB - 0x1000;

/// Smallest and largest guest memory twinvm accepts.
pub const MIN_MEM_BYTES: u64 = 16 << 20;
pub const MAX_MEM_BYTES: u64 = 64 << 30;

/// Physical ranges of guest RAM for a VM of `mem_bytes`: low RAM up to the
/// MMIO hole, the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low)];
    if mem_bytes > low {
        ranges.push((FOUR_GIB, mem_bytes - low));
    }
    ranges
}

/// Guest RAM in pages, numbered across the ranges of [`ram_ranges`].
pub fn ram_pages(mem_bytes: u64) -> usize {
    (mem_bytes / 4096) as usize
}

/// The number of the RAM page holding `gpa` (see [`ram_pages`]), None
/// outside RAM.
pub fn ram_page_index(mem_bytes: u64, gpa: u64) -> Option<usize> {
    let low = mem_bytes.min(MMIO_HOLE_START);
    if gpa < low {
        Some((gpa / 4096) as usize)
    } else if gpa >= FOUR_GIB && gpa - FOUR_GIB < mem_bytes - low {
        Some(((low + gpa - FOUR_GIB) / 4096) as usize)
    } else {
        None
    }
}

/// Inverse of [`ram_page_index`].
pub fn ram_page_gpa(mem_bytes: u64, index: usize) -> u64 {
    let low = mem_bytes.min(MMIO_HOLE_START);
    let offset = index as u64 * 4096;
    if offset < low {
        offset
    } else {
        FOUR_GIB + offset - low
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn page_numbers_skip_the_mmio_hole() {
        let mem = 4 << 30;
        let pages = ram_pages(mem);
        assert_eq!(pages, 1 << 20);
        assert_eq!(ram_page_index(mem, 0x1234), Some(1));
        assert_eq!(ram_page_index(mem, MMIO_HOLE_START), None);
        let first_high = ram_page_index(mem, FOUR_GIB).unwrap();
        assert_eq!(first_high, (MMIO_HOLE_START / 4096) as usize);
        assert_eq!(ram_page_gpa(mem, first_high), FOUR_GIB);
        assert_eq!(ram_page_index(mem, FOUR_GIB + (1 << 30)), None);
        for i in [0, 5, first_high - 1, first_high, pages - 1] {
            assert_eq!(ram_page_index(mem, ram_page_gpa(mem, i)), Some(i));
        }
        assert_eq!(ram_page_index(64 << 20, 64 << 20), None);
    }

    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(
            ranges,
            vec![
                (0, MMIO_HOLE_START),
                (FOUR_GIB, (4 << 30) - MMIO_HOLE_START)
            ]
        );
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let regions = [
            (GDT_ADDR, 6 * 8),
            (0x1000, BOOT_STACK_TOP - 0x1000),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, IDENTITY_MAPPED_GIB * 0x1000),
            (CMDLINE_ADDR, CMDLINE_MAX_SIZE as u64),
        ];
        for (i, a) in regions.iter().enumerate() {
            assert!(a.0 + a.1 <= EBDA_START);
            for b in &regions[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }
}
