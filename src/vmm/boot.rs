//! Putting a kernel into guest memory and describing the CPU state it starts in.
//!
//! Kernels are entered directly in 64-bit mode, no BIOS and no real-mode
//! code: an ELF (the project's test guests or a Linux `vmlinux`) at its entry
//! point. A bzImage's kernel is taken out of it on the host (bzimage.rs) and
//! booted the same way, with the bzImage's setup header in the zero page;
//! only a bzImage whose payload twinvm cannot decompress is entered at its
//! 64-bit entry (load address + 0x200) and decompresses itself. Either way
//! RSI points at a Linux `boot_params` page, so one boot path serves all.

use std::collections::HashMap;
use std::io::Cursor;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, CAN_USE_HEAP, KEEP_SEGMENTS, LOADED_HIGH,
    XLF_KERNEL_64,
};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::bzimage::{self, BzImageError, Compressor};
use super::layout::*;
use super::traps::{self, PlantedTrap, TrapGap};

/// What went wrong preparing the guest's memory.
#[derive(Debug, Error)]
pub enum BootError {
    /// The file is neither an ELF nor a bzImage.
    #[error("{0}: not a kernel (expected an x86-64 ELF or a Linux bzImage)")]
    NotAKernel(String),
    /// An ELF for another architecture or word size.
    #[error("{name}: ELF is not x86-64 ({what})")]
    WrongElf { name: String, what: &'static str },
    /// A bzImage too old or built without a 64-bit entry point.
    #[error(
        "{0}: bzImage has no 64-bit entry point (boot protocol >= 2.12 with XLF_KERNEL_64 needed)"
    )]
    No64BitEntry(String),
    /// A bzImage whose kernel cannot be taken out (damaged, cut short, too big).
    #[error("{name}: {problem}")]
    BzImage { name: String, problem: BzImageError },
    /// linux-loader refused the image.
    #[error("{name}: cannot load kernel: {source}")]
    Load {
        name: String,
        source: linux_loader::loader::Error,
    },
    /// The command line does not fit the zero page contract.
    #[error("kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    /// The command line has a NUL byte in it.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x} above the kernel (ends {kernel_end:#x}); give the VM more memory")]
    InitrdTooBig {
        size: u64,
        limit: u64,
        kernel_end: u64,
    },
    /// Writing boot structures into guest memory failed.
    #[error("writing {what} into guest memory: {source}")]
    Memory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// The kind of kernel image, decided from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    Elf,
    BzImage,
}

/// Recognise a kernel image from its first bytes, or say clearly why not.
pub fn detect_kernel(name: &str, image: &[u8]) -> Result<KernelKind, BootError> {
    if image.starts_with(b"\x7fELF") {
        if image.len() < 20 {
            return Err(BootError::WrongElf {
                name: name.into(),
                what: "truncated header",
            });
        }
        if image[4] != 2 {
            return Err(BootError::WrongElf {
                name: name.into(),
                what: "not 64-bit",
            });
        }
        if image[5] != 1 {
            return Err(BootError::WrongElf {
                name: name.into(),
                what: "not little-endian",
            });
        }
        if u16::from_le_bytes([image[18], image[19]]) != 62 {
            return Err(BootError::WrongElf {
                name: name.into(),
                what: "machine is not x86-64",
            });
        }
        return Ok(KernelKind::Elf);
    }
    if image.len() > 0x238 && &image[0x202..0x206] == b"HdrS" {
        let version = u16::from_le_bytes([image[0x206], image[0x207]]);
        let xloadflags = u16::from_le_bytes([image[0x236], image[0x237]]);
        if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::No64BitEntry(name.into()));
        }
        return Ok(KernelKind::BzImage);
    }
    Err(BootError::NotAKernel(name.into()))
}

/// The way to the kernel's ELF when twinvm cannot get at it itself.
pub const VMLINUX_ROUTE: &str = "extract its vmlinux on the host (Linux's scripts/extract-vmlinux \
     handles every compressor) and give twinvm that ELF";

/// Why a recording of a kernel could not be replayed: time or entropy reads
/// in its kernel code that cannot be planted as traps, so they would read
/// the host's TSC or entropy unlogged. `run` boots such a kernel; `record`
/// and `replay` refuse it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NotReplayable {
    /// A bzImage whose payload twinvm does not decompress: its kernel code
    /// only exists inside the guest.
    #[error("{0}, so its kernel code cannot be scanned for time and entropy reads (rdtsc, rdrand) to trap; {VMLINUX_ROUTE}")]
    PayloadNotExtracted(BzImageError),
    /// An ELF whose code the trap planter could not fully cover.
    #[error("{0}")]
    Untrapped(TrapGap),
}

/// A kernel ready to load: the bytes that go into guest memory, its planted
/// traps, and whether a recording of it could be replayed.
#[derive(Debug, Clone)]
pub struct PreparedKernel {
    /// What is put in guest memory: an ELF with its traps planted (the
    /// file's, or the one taken out of a bzImage), or a bzImage as given.
    pub image: Vec<u8>,
    /// The setup header of the bzImage the ELF was taken out of: Linux
    /// reads its values from the zero page.
    pub setup_header: Option<setup_header>,
    /// The payload's compressor, when the ELF was taken out of a bzImage.
    pub extracted_from: Option<Compressor>,
    /// Planted time and entropy traps, by guest virtual address.
    pub planted_traps: HashMap<u64, PlantedTrap>,
    /// Why this kernel cannot be recorded, if it cannot.
    pub not_replayable: Option<NotReplayable>,
}

/// Prepare the kernel file `file` for loading: take a bzImage's kernel out,
/// plant traps in the ELF (the file itself is untouched). Sans-IO.
pub fn prepare_kernel(name: &str, file: &[u8]) -> Result<PreparedKernel, BootError> {
    let (mut image, setup_header, extracted_from) = match detect_kernel(name, file)? {
        KernelKind::Elf => (file.to_vec(), None, None),
        KernelKind::BzImage => match bzimage::extract_vmlinux(file) {
            Ok((compressor, elf)) => {
                // An ELF (extract_vmlinux checked the magic), but maybe not x86-64.
                detect_kernel(&format!("{name} (its decompressed kernel)"), &elf)?;
                let header =
                    bzimage::read_setup_header(file).map_err(|problem| BootError::BzImage {
                        name: name.into(),
                        problem,
                    })?;
                tracing::info!(
                    "{name}: bzImage's {compressor} payload decompressed on the host ({} bytes); booting its ELF",
                    elf.len()
                );
                (elf, Some(header), Some(compressor))
            }
            Err(e) if e.is_unsupported_format() => {
                return Ok(PreparedKernel {
                    image: file.to_vec(),
                    setup_header: None,
                    extracted_from: None,
                    planted_traps: HashMap::new(),
                    not_replayable: Some(NotReplayable::PayloadNotExtracted(e)),
                });
            }
            Err(problem) => {
                return Err(BootError::BzImage {
                    name: name.into(),
                    problem,
                })
            }
        },
    };
    let planted = traps::plant_traps(&mut image);
    Ok(PreparedKernel {
        image,
        setup_header,
        extracted_from,
        planted_traps: planted.sites,
        not_replayable: planted.gap.map(NotReplayable::Untrapped),
    })
}

/// Where a loaded kernel starts and how far it extends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadedKernel {
    pub kind: KernelKind,
    pub entry: u64,
    pub end: u64,
    /// The bzImage's own setup header, to be completed in the zero page.
    pub setup_header: Option<linux_loader::bootparam::setup_header>,
}

/// Load a kernel image (already read into memory) into guest RAM.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    name: &str,
    image: &[u8],
) -> Result<LoadedKernel, BootError> {
    let kind = detect_kernel(name, image)?;
    let mut cursor = Cursor::new(image);
    let high = Some(GuestAddress(HIGH_MEMORY_START));
    let load_err = |source| BootError::Load {
        name: name.into(),
        source,
    };
    match kind {
        KernelKind::Elf => {
            let r = Elf::load(mem, None, &mut cursor, high).map_err(load_err)?;
            Ok(LoadedKernel {
                kind,
                entry: r.kernel_load.0,
                end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelKind::BzImage => {
            let r = BzImage::load(mem, None, &mut cursor, high).map_err(load_err)?;
            // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
            Ok(LoadedKernel {
                kind,
                entry: r.kernel_load.0 + 0x200,
                end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
    }
}

/// Load a prepared kernel into guest RAM; an ELF taken out of a bzImage
/// keeps the bzImage's setup header for the zero page.
pub fn load_prepared(
    mem: &GuestMemoryMmap,
    name: &str,
    kernel: &PreparedKernel,
) -> Result<LoadedKernel, BootError> {
    let mut loaded = load_kernel(mem, name, &kernel.image)?;
    if kernel.setup_header.is_some() {
        loaded.setup_header = kernel.setup_header;
    }
    Ok(loaded)
}

/// Place the initrd as high as allowed in low memory, page aligned.
/// Returns its guest address.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &LoadedKernel,
    initrd: &[u8],
) -> Result<u64, BootError> {
    let size = initrd.len() as u64;
    // Linux's default initrd_addr_max for old headers is 0x37ffffff.
    let addr_max = kernel
        .setup_header
        .map_or(0x37ff_ffff, |h| u64::from(h.initrd_addr_max))
        .max(0x37ff_ffff);
    let limit = mem_bytes.min(MMIO_HOLE_START).min(addr_max + 1);
    let too_big = BootError::InitrdTooBig {
        size,
        limit,
        kernel_end: kernel.end,
    };
    let start = limit.checked_sub(size).ok_or(too_big)? & !0xfff;
    if start < kernel.end {
        return Err(BootError::InitrdTooBig {
            size,
            limit,
            kernel_end: kernel.end,
        });
    }
    mem.write_slice(initrd, GuestAddress(start))
        .map_err(|source| BootError::Memory {
            what: "initrd",
            source,
        })?;
    Ok(start)
}

/// The e820 map for a VM of `mem_bytes`.
pub fn e820_map(mem_bytes: u64) -> Vec<boot_e820_entry> {
    const E820_RAM: u32 = 1;
    const E820_RESERVED: u32 = 2;
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIGH_MEMORY_START - EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for (start, size) in ram_ranges(mem_bytes) {
        let start = start.max(HIGH_MEMORY_START);
        let end = if start >= FOUR_GIB {
            start + size
        } else {
            size
        };
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// Write the command line, the zero page, the GDT and the identity page tables.
pub fn write_boot_structures(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let write = |what: &'static str, bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| BootError::Memory { what, source })
    };
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    write("command line", &line, CMDLINE_ADDR)?;

    let mut params = boot_params::default();
    if let Some(h) = kernel.setup_header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = u32::from_le_bytes(*b"HdrS");
    params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP | KEEP_SEGMENTS;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    if kernel.setup_header.is_none() {
        params.hdr.kernel_alignment = 0x100_0000;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem_bytes);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| BootError::Memory {
            what: "zero page",
            source,
        })?;

    for (i, entry) in gdt_entries().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|source| BootError::Memory {
                what: "GDT",
                source,
            })?;
    }
    for (addr, entry) in page_table_entries() {
        mem.write_obj(entry, GuestAddress(addr))
            .map_err(|source| BootError::Memory {
                what: "page tables",
                source,
            })?;
    }
    Ok(())
}

/// Raw GDT descriptors: null, null, 64-bit code, data, 64-bit TSS (two slots).
pub fn gdt_entries() -> [u64; 6] {
    [
        0,
        0,
        0x00af_9b00_0000_ffff, // code: G, L, P, DPL0, execute/read, accessed
        0x00cf_9300_0000_ffff, // data: G, D/B, P, DPL0, read/write, accessed
        0x0000_8b00_0000_0067, // TSS: P, type 11 (busy 64-bit TSS), limit 0x67
        0,
    ]
}

/// Page table entries (address, value) identity-mapping the first 4 GiB with
/// 2 MiB pages. User-accessible so the test guests' CPL3 code can run in
/// them; Linux builds its own tables at once.
pub fn page_table_entries() -> Vec<(u64, u64)> {
    const PRESENT_RW_USER: u64 = 0x7;
    const PAGE_SIZE_2M: u64 = 0x80;
    let mut entries = vec![(PML4_ADDR, PDPT_ADDR | PRESENT_RW_USER)];
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PD_ADDR + gib * 0x1000;
        entries.push((PDPT_ADDR + gib * 8, pd | PRESENT_RW_USER));
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            entries.push((pd + i * 8, phys | PRESENT_RW_USER | PAGE_SIZE_2M));
        }
    }
    entries
}

fn segment(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for 64-bit entry, starting from the vCPU's current ones.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    const CR0_PE: u64 = 1;
    const CR0_MP: u64 = 1 << 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_OSFXSR: u64 = 1 << 9;
    const CR4_OSXMMEXCPT: u64 = 1 << 10;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;

    sregs.cs = segment(BOOT_CODE_SELECTOR, 0xb, 1, 0);
    let data = segment(BOOT_DATA_SELECTOR, 0x3, 0, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: BOOT_TSS_SELECTOR,
        type_: 0xb,
        present: 1,
        s: 0,
        g: 0,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt_entries().len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers at entry: RIP at the kernel entry, RSI at the zero page.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rsi: ZERO_PAGE_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

/// x87/SSE state after FNINIT with the default MXCSR.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_mem(bytes: u64) -> GuestMemoryMmap {
        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(bytes)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    /// A minimal x86-64 ELF: one PT_LOAD of `code` at 1 MiB, entry at its start.
    pub(crate) fn tiny_elf(code: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x78];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16] = 2; // ET_EXEC
        f[18] = 62; // EM_X86_64
        f[20] = 1;
        f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
        f[52] = 0x40; // e_ehsize
        f[54] = 0x38; // e_phentsize
        f[56] = 1; // e_phnum
        let ph = 0x40;
        f[ph] = 1; // PT_LOAD
        f[ph + 4] = 5; // R+X
        f[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // p_offset
        f[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes()); // p_vaddr
        f[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // p_paddr
        f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn non_kernels_are_named_and_refused() {
        let err = detect_kernel("notes.txt", b"hello world, not a kernel at all").unwrap_err();
        assert_eq!(
            err.to_string(),
            "notes.txt: not a kernel (expected an x86-64 ELF or a Linux bzImage)"
        );
        let mut elf32 = tiny_elf(&[0xf4]);
        elf32[4] = 1;
        assert!(detect_kernel("k", &elf32)
            .unwrap_err()
            .to_string()
            .contains("not 64-bit"));
        let mut arm = tiny_elf(&[0xf4]);
        arm[18] = 183;
        assert!(detect_kernel("k", &arm)
            .unwrap_err()
            .to_string()
            .contains("not x86-64"));
        assert!(matches!(
            detect_kernel("k", b"\x7fELF\x02"),
            Err(BootError::WrongElf { .. })
        ));
    }

    #[test]
    fn old_bzimage_without_64bit_entry_is_refused() {
        let mut img = vec![0u8; 0x400];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020bu16.to_le_bytes());
        assert!(matches!(
            detect_kernel("bz", &img),
            Err(BootError::No64BitEntry(_))
        ));
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x236] = 1;
        assert_eq!(detect_kernel("bz", &img).unwrap(), KernelKind::BzImage);
    }

    #[test]
    fn elf_loads_at_its_physical_address() {
        let mem = guest_mem(32 << 20);
        let k = load_kernel(&mem, "tiny", &tiny_elf(&[0x90, 0xf4])).unwrap();
        assert_eq!(k.entry, 0x10_0000);
        assert_eq!(k.end, 0x10_0002);
        let b: u8 = mem.read_obj(GuestAddress(0x10_0001)).unwrap();
        assert_eq!(b, 0xf4);
    }

    #[test]
    fn boot_structures_are_written() {
        let mem = guest_mem(64 << 20);
        let k = load_kernel(&mem, "tiny", &tiny_elf(&[0xf4])).unwrap();
        let initrd = vec![0xabu8; 10_000];
        let at = load_initrd(&mem, 64 << 20, &k, &initrd).unwrap();
        assert_eq!(at % 0x1000, 0);
        assert!(at + initrd.len() as u64 <= 64 << 20);
        write_boot_structures(
            &mem,
            64 << 20,
            &k,
            "console=ttyS0",
            Some((at, initrd.len() as u64)),
        )
        .unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.ramdisk_image }, at as u32);
        assert_eq!(p.e820_entries, 3);
        let mut line = [0u8; 14];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0\0");
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 7);
        // Last 2 MiB page of the 4 GiB identity map.
        let last: u64 = mem
            .read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x87);
    }

    #[test]
    fn bad_cmdline_and_oversized_initrd_are_errors() {
        let mem = guest_mem(16 << 20);
        let k = load_kernel(&mem, "tiny", &tiny_elf(&[0xf4])).unwrap();
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_boot_structures(&mem, 16 << 20, &k, &long, None),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            write_boot_structures(&mem, 16 << 20, &k, "a\0b", None),
            Err(BootError::CmdlineNul)
        ));
        let huge = vec![0u8; 17 << 20];
        assert!(matches!(
            load_initrd(&mem, 16 << 20, &k, &huge),
            Err(BootError::InitrdTooBig { .. })
        ));
    }

    /// The entropy test guest inside a synthetic bzImage, its payload
    /// compressed as `payload` does.
    fn entropy_bzimage(payload: fn(&[u8]) -> Vec<u8>) -> (Vec<u8>, Vec<u8>) {
        let elf = crate::guests::builtin("entropy").unwrap().to_vec();
        (crate::vmm::bzimage::tests::bzimage(&payload(&elf)), elf)
    }

    fn lz4(data: &[u8]) -> Vec<u8> {
        crate::vmm::bzimage::tests::lz4_legacy(data, 8 << 20)
    }

    #[test]
    fn a_bzimage_boots_its_decompressed_elf_with_traps_and_its_setup_header() {
        let (bz, elf) = entropy_bzimage(lz4);
        let k = prepare_kernel("bz", &bz).unwrap();
        assert_eq!(k.extracted_from, Some(Compressor::Lz4));
        assert_eq!(k.not_replayable, None);
        // The same traps as the ELF booted directly.
        let direct = prepare_kernel("elf", &elf).unwrap();
        assert_eq!(k.planted_traps, direct.planted_traps);
        assert_eq!(k.planted_traps.len(), 4);
        assert_eq!(k.image, direct.image);

        let mem = guest_mem(64 << 20);
        let loaded = load_prepared(&mem, "bz", &k).unwrap();
        assert_eq!(loaded.kind, KernelKind::Elf);
        assert_eq!(loaded.entry, 0x10_0000);
        write_boot_structures(&mem, 64 << 20, &loaded, "console=ttyS0", None).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        // The bzImage's own values, completed by the loader's.
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.initrd_addr_max }, 0x7fff_ffff);
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ p.hdr.xloadflags }, 3);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
    }

    #[test]
    fn a_gzip_bzimage_is_decompressed_too() {
        let (bz, elf) = entropy_bzimage(crate::vmm::bzimage::tests::gzip);
        let k = prepare_kernel("bz", &bz).unwrap();
        assert_eq!(k.extracted_from, Some(Compressor::Gzip));
        assert_eq!(
            k.planted_traps,
            prepare_kernel("elf", &elf).unwrap().planted_traps
        );
    }

    #[test]
    fn an_unsupported_compressor_boots_in_guest_but_is_not_replayable() {
        let zstd_payload = |_: &[u8]| vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0];
        let (bz, _) = entropy_bzimage(zstd_payload);
        let k = prepare_kernel("vmlinuz", &bz).unwrap();
        // Booted as given, through its own decompressor: nothing planted.
        assert_eq!(k.image, bz);
        assert!(k.planted_traps.is_empty());
        let why = k.not_replayable.expect("not replayable").to_string();
        assert!(why.contains("zstd-compressed"), "{why}");
        assert!(why.contains("extract its vmlinux"), "{why}");
        let mem = guest_mem(64 << 20);
        let loaded = load_prepared(&mem, "vmlinuz", &prepare_kernel("vmlinuz", &bz).unwrap());
        assert_eq!(loaded.unwrap().kind, KernelKind::BzImage);
    }

    #[test]
    fn a_damaged_bzimage_payload_is_an_error_naming_the_file() {
        let (mut bz, _) = entropy_bzimage(lz4);
        let n = bz.len();
        bz.truncate(n - 100);
        // The header still claims the full payload.
        let err = prepare_kernel("vmlinuz", &bz).unwrap_err();
        assert!(matches!(err, BootError::BzImage { .. }), "{err:?}");
        assert!(err.to_string().starts_with("vmlinuz: "), "{err}");
        // A payload decompressing to an ELF for another machine.
        let mut arm = crate::guests::builtin("hello").unwrap().to_vec();
        arm[18] = 183;
        let bz = crate::vmm::bzimage::tests::bzimage(&lz4(&arm));
        let err = prepare_kernel("vmlinuz", &bz).unwrap_err().to_string();
        assert!(err.contains("(its decompressed kernel)"), "{err}");
        assert!(err.contains("not x86-64"), "{err}");
    }

    #[test]
    fn an_elf_without_section_headers_is_not_replayable() {
        // tiny_elf has program headers only, like a stripped image.
        let k = prepare_kernel("stripped", &tiny_elf(&[0x0f, 0x31, 0xf4])).unwrap();
        assert!(k.planted_traps.is_empty());
        let why = k.not_replayable.expect("not replayable").to_string();
        assert!(why.contains("section headers name no kernel code"), "{why}");
        // The test guests are all fully scanned.
        for name in crate::guests::names() {
            let k = prepare_kernel(name, crate::guests::builtin(name).unwrap()).unwrap();
            assert_eq!(k.not_replayable, None, "{name}");
            assert_eq!(k.extracted_from, None, "{name}");
        }
    }

    #[test]
    fn e820_covers_ram_around_the_holes() {
        let map = e820_map(4 << 30);
        let ram: u64 = map.iter().filter(|e| e.r#type == 1).map(|e| e.size).sum();
        // All RAM except the legacy hole [EBDA_START, 1 MiB).
        assert_eq!(ram, (4u64 << 30) - (HIGH_MEMORY_START - EBDA_START));
        assert!(map.iter().any(|e| e.addr == FOUR_GIB));
    }
}
