//! Planted traps: RDTSC/RDTSCP and RDRAND/RDSEED in the guest kernel
//! rewritten to `int3`.
//!
//! None of them can be trapped through the KVM API here (RDRAND at CPL0 runs
//! on the host's CPU without an exit, measured), and a guest that reads the
//! TSC or the host's entropy directly would make the replicas diverge. Before
//! boot, twinvm decodes the kernel's executable ELF sections (`.text`,
//! `.init.text` and the alternative-replacement sections, so patched-in
//! variants are covered too), and replaces each such instruction with `int3`
//! followed by `nop`s to its length. On these hosts an int3 at CPL0 ends
//! KVM_RUN as an emulation failure at that RIP (host-notes.md); the vCPU loop
//! recognises its own sites by RIP, performs the read (a logged value) and
//! makes it a landmark. An int3 at any other RIP is the guest's own and is
//! reflected.
//!
//! User-mode code is never patched (an int3 at CPL3 goes straight to the
//! guest): user-mode RDTSC/RDRAND stay untrappable and are caught by the digests.
//! What the planter knows it could not cover ([`TrapGap`]: no kernel code
//! sections to scan, replacements copied to places it cannot find) makes a
//! recording of the kernel refused instead of silently diverging.
//! Sans-IO: works on the image bytes.

use std::collections::HashMap;

use iced_x86::{Decoder, DecoderOptions, Mnemonic, Register};
use thiserror::Error;

/// Which instruction a trap stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedTrap {
    Rdtsc,
    Rdtscp,
    /// RDRAND (`seed` false) or RDSEED into `dest`, `len` bytes long.
    Random {
        dest: Register,
        seed: bool,
        len: u8,
    },
}

impl PlantedTrap {
    /// Bytes the original instruction occupied (and the trap replaces).
    pub fn instruction_len(self) -> u64 {
        match self {
            PlantedTrap::Rdtsc => 2,
            PlantedTrap::Rdtscp => 3,
            PlantedTrap::Random { len, .. } => u64::from(len),
        }
    }
}

/// Sections scanned for trap sites: kernel code and the alternatives
/// that may be copied over it at boot.
pub const SCANNED_SECTIONS: &[&str] = &[
    ".text",
    ".init.text",
    ".altinstr_replacement",
    ".altinstr_aux",
];

/// Kernel code whose time and entropy reads the planter knows it could not
/// trap: a recording of such a kernel could not be replayed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TrapGap {
    /// No section headers (a stripped or truncated ELF), or none naming
    /// kernel code: nothing could be scanned.
    #[error("its ELF section headers name no kernel code section ({}) or cannot be read, so its time and entropy reads (rdtsc, rdrand) cannot be found and trapped; give twinvm an ELF that keeps its section headers", SCANNED_SECTIONS.join(", "))]
    NoCodeSections,
    /// Traps inside `.altinstr_replacement` that Linux will copy to places
    /// `.altinstructions` does not tell: there they would be unknown int3s.
    #[error("{sites} time and entropy reads in .altinstr_replacement are copied over kernel code at boot, and where to cannot be told: {why}")]
    UnresolvedAlternatives { sites: usize, why: &'static str },
}

/// The traps planted in a kernel, and what could not be covered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlantedTraps {
    /// Trap sites by guest virtual address.
    pub sites: HashMap<u64, PlantedTrap>,
    /// Why some time or entropy reads could not be trapped, if any.
    pub gap: Option<TrapGap>,
}

/// An executable section of an ELF: name, load address and file bytes range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeSection {
    pub name: String,
    pub addr: u64,
    pub offset: usize,
    pub size: usize,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// Executable sections of an ELF64 image whose names are in `wanted`. An
/// image without section headers (or a malformed table) yields none.
pub fn code_sections(elf: &[u8], wanted: &[&str]) -> Vec<CodeSection> {
    sections(elf, wanted, true)
}

/// Sections of an ELF64 image whose names are in `wanted`, executable ones
/// only if `code_only`. An unreadable section table yields none.
fn sections(elf: &[u8], wanted: &[&str], code_only: bool) -> Vec<CodeSection> {
    read_sections(elf, wanted, code_only).unwrap_or_default()
}

/// [`sections`], or None if the section table cannot be read.
fn read_sections(elf: &[u8], wanted: &[&str], code_only: bool) -> Option<Vec<CodeSection>> {
    const SHF_EXECINSTR: u64 = 4;
    const SHT_NOBITS: u32 = 8;
    if !elf.starts_with(b"\x7fELF") {
        return None;
    }
    let shoff = u64_at(elf, 0x28)? as usize;
    let shentsize = u16_at(elf, 0x3a)? as usize;
    let shnum = u16_at(elf, 0x3c)? as usize;
    let shstrndx = u16_at(elf, 0x3e)? as usize;
    if shoff == 0 || shentsize < 64 || shstrndx >= shnum {
        return None;
    }
    let header = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    let strtab = header(shstrndx)?;
    let str_off = u64_at(elf, strtab + 0x18)? as usize;
    let mut out = Vec::new();
    for i in 0..shnum {
        let h = header(i)?;
        let name_off = u32_at(elf, h)? as usize;
        let kind = u32_at(elf, h + 4)?;
        let flags = u64_at(elf, h + 8)?;
        let addr = u64_at(elf, h + 0x10)?;
        let offset = u64_at(elf, h + 0x18)? as usize;
        let size = u64_at(elf, h + 0x20)? as usize;
        let name_bytes = elf.get(str_off.checked_add(name_off)?..)?;
        let name_end = name_bytes.iter().position(|&c| c == 0)?;
        let name = std::str::from_utf8(&name_bytes[..name_end]).ok()?;
        if (!code_only || flags & SHF_EXECINSTR != 0)
            && kind != SHT_NOBITS
            && wanted.contains(&name)
            && offset.checked_add(size)? <= elf.len()
        {
            out.push(CodeSection {
                name: name.to_string(),
                addr,
                offset,
                size,
            });
        }
    }
    Some(out)
}

/// Time and entropy reads in `code` (loaded at `addr`), found by linear decoding.
pub fn find_trap_sites(code: &[u8], addr: u64) -> Vec<(u64, PlantedTrap)> {
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut found = Vec::new();
    for insn in &mut decoder {
        match insn.mnemonic() {
            Mnemonic::Rdtsc if insn.len() == 2 => found.push((insn.ip(), PlantedTrap::Rdtsc)),
            Mnemonic::Rdtscp if insn.len() == 3 => found.push((insn.ip(), PlantedTrap::Rdtscp)),
            Mnemonic::Rdrand | Mnemonic::Rdseed => found.push((
                insn.ip(),
                PlantedTrap::Random {
                    dest: insn.op0_register(),
                    seed: insn.mnemonic() == Mnemonic::Rdseed,
                    len: insn.len() as u8,
                },
            )),
            _ => {}
        }
    }
    found
}

/// Where Linux's alternatives patching will copy each replacement: for every
/// trap inside a replacement (in `.altinstr_replacement`), the address the
/// same bytes occupy once copied over the original instruction. Read from
/// `.altinstructions` (`struct alt_instr`: s32 instr_offset, s32 repl_offset,
/// then cpuid/flags and two u8 lengths, each offset relative to its own
/// field); the entry size differs between kernel versions, so the size whose
/// every entry points into the replacement section is taken. An error says
/// why the table could not be read (the copies are then unknown).
pub fn alternative_sites(
    elf: &[u8],
    replacement_traps: &[(u64, PlantedTrap)],
) -> Result<Vec<(u64, PlantedTrap)>, &'static str> {
    if replacement_traps.is_empty() {
        return Ok(Vec::new());
    }
    let found = sections(elf, &[".altinstructions", ".altinstr_replacement"], false);
    let (Some(table), Some(repl)) = (
        found.iter().find(|s| s.name == ".altinstructions"),
        found.iter().find(|s| s.name == ".altinstr_replacement"),
    ) else {
        return Err("the ELF has no .altinstructions section");
    };
    let bytes = &elf[table.offset..table.offset + table.size];
    let i32_at = |o: usize| i64::from(i32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()));
    let repl_range = repl.addr..repl.addr + repl.size as u64;
    // (instruction address, replacement address, replacement length) per entry.
    let entries = |size: usize| -> Option<Vec<(u64, u64, u64)>> {
        if size == 0 || bytes.len() % size != 0 {
            return None;
        }
        let mut out = Vec::new();
        for at in (0..bytes.len()).step_by(size) {
            let field = table.addr + at as u64;
            let instr = field.wrapping_add_signed(i32_at(at));
            let replacement = (field + 4).wrapping_add_signed(i32_at(at + 4));
            let repl_len = u64::from(bytes[at + size - 1]);
            if repl_len > 0
                && !(repl_range.contains(&replacement) && replacement + repl_len <= repl_range.end)
            {
                return None;
            }
            out.push((instr, replacement, repl_len));
        }
        Some(out)
    };
    let entries = [12, 14, 13]
        .into_iter()
        .find_map(entries)
        .ok_or(".altinstructions matches no known entry layout (12, 13 or 14 bytes pointing into .altinstr_replacement)")?;
    let mut sites = Vec::new();
    for (instr, replacement, len) in entries {
        for &(addr, trap) in replacement_traps {
            if (replacement..replacement + len).contains(&addr) {
                sites.push((instr + (addr - replacement), trap));
            }
        }
    }
    Ok(sites)
}

/// Rewrite every time and entropy read in the image's kernel sections into a trap.
/// Returns the trap table keyed by guest virtual address and what could not
/// be covered; patches `elf` in place (the caller loads the patched image;
/// the file is untouched).
pub fn plant_traps(elf: &mut [u8]) -> PlantedTraps {
    let mut traps = HashMap::new();
    let mut replacement_traps = Vec::new();
    let sections = code_sections(elf, SCANNED_SECTIONS);
    if sections.is_empty() {
        return PlantedTraps {
            sites: traps,
            gap: Some(TrapGap::NoCodeSections),
        };
    }
    for section in sections {
        let code = &elf[section.offset..section.offset + section.size];
        let sites = find_trap_sites(code, section.addr);
        for (addr, trap) in sites {
            let at = section.offset + (addr - section.addr) as usize;
            elf[at] = 0xcc;
            for b in &mut elf[at + 1..at + trap.instruction_len() as usize] {
                *b = 0x90;
            }
            traps.insert(addr, trap);
            if section.name == ".altinstr_replacement" {
                replacement_traps.push((addr, trap));
            }
        }
    }
    // The same traps where the kernel will copy its alternatives.
    let (copies, gap) = match alternative_sites(elf, &replacement_traps) {
        Ok(copies) => (copies, None),
        Err(why) => {
            tracing::warn!(
                "{why}: time and entropy reads in alternatives will not be trapped once applied"
            );
            let gap = TrapGap::UnresolvedAlternatives {
                sites: replacement_traps.len(),
                why,
            };
            (Vec::new(), Some(gap))
        }
    };
    let in_code = traps.len();
    let copy_sites = copies.len();
    for (addr, trap) in copies {
        traps.insert(addr, trap);
    }
    if !traps.is_empty() {
        tracing::info!(
            in_code,
            in_alternatives = replacement_traps.len(),
            copy_sites,
            planted = traps.len(),
            "trap sites (time and entropy reads) planted in the kernel"
        );
    }
    PlantedTraps { sites: traps, gap }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_decoding_finds_rdtsc_and_rdtscp() {
        // mov eax,1; rdtsc; nop; rdtscp; ret; bytes 0f 31 inside an immediate
        let code = [
            0xb8, 1, 0, 0, 0, 0x0f, 0x31, 0x90, 0x0f, 0x01, 0xf9, 0xc3, 0xb8, 0x0f, 0x31, 0, 0,
        ];
        let found = find_trap_sites(&code, 0x1000);
        assert_eq!(
            found,
            vec![(0x1005, PlantedTrap::Rdtsc), (0x1008, PlantedTrap::Rdtscp)]
        );
    }

    #[test]
    fn linear_decoding_finds_rdrand_and_rdseed_with_their_destinations() {
        // rdrand rax (48 0f c7 f0); rdseed cx (66 0f c7 f9); rdrand r9d (41 0f c7 f1)
        let code = [
            0x48, 0x0f, 0xc7, 0xf0, 0x66, 0x0f, 0xc7, 0xf9, 0x41, 0x0f, 0xc7, 0xf1,
        ];
        let found = find_trap_sites(&code, 0x1000);
        let random = |dest, seed, len| PlantedTrap::Random { dest, seed, len };
        assert_eq!(
            found,
            vec![
                (0x1000, random(Register::RAX, false, 4)),
                (0x1004, random(Register::CX, true, 4)),
                (0x1008, random(Register::R9D, false, 4)),
            ]
        );
    }

    #[test]
    fn the_entropy_guest_has_its_kernel_rdrand_and_rdseed_trapped() {
        let mut image = crate::guests::builtin("entropy")
            .expect("entropy guest")
            .to_vec();
        let planted = plant_traps(&mut image);
        assert_eq!(planted.gap, None);
        let traps = planted.sites;
        let random = traps
            .values()
            .filter(|t| matches!(t, PlantedTrap::Random { .. }))
            .count();
        assert_eq!(random, 4, "{traps:?}");
        // rdrand rax/eax/ax and rdseed rax: int3 plus nops to each length.
        let planted = image
            .windows(3)
            .filter(|w| w[0] == 0xcc && w[1] == 0x90 && w[2] == 0x90)
            .count();
        assert!(planted >= 4, "{planted} trap byte runs");
    }

    /// A minimal ELF with `.altinstr_replacement` (one "lfence; rdtsc" at
    /// 0x2000) and a 12-byte-entry `.altinstructions` at 0x3000 whose entry
    /// says: replace the instruction at 0x1010 with 5 bytes at 0x2000.
    fn elf_with_alternatives() -> Vec<u8> {
        let mut elf = vec![0u8; 0x400];
        elf[..4].copy_from_slice(b"\x7fELF");
        let shoff = 0x200usize;
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&4u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&3u16.to_le_bytes());
        // Section contents.
        elf[0x100..0x105].copy_from_slice(&[0x0f, 0xae, 0xe8, 0x0f, 0x31]); // lfence; rdtsc
        let field = 0x3000u64;
        let instr_off = (0x1010i64 - field as i64) as i32;
        let repl_off = (0x2000i64 - (field as i64 + 4)) as i32;
        elf[0x180..0x184].copy_from_slice(&instr_off.to_le_bytes());
        elf[0x184..0x188].copy_from_slice(&repl_off.to_le_bytes());
        elf[0x18a] = 5; // instrlen
        elf[0x18b] = 5; // replacementlen
        let names = b"\0.altinstr_replacement\0.altinstructions\0.shstrtab\0";
        elf[0x1c0..0x1c0 + names.len()].copy_from_slice(names);
        // name, type, flags, addr, offset, size
        let headers: [(u32, u32, u64, u64, u64, u64); 4] = [
            (0, 0, 0, 0, 0, 0),
            (1, 1, 6, 0x2000, 0x100, 5),
            (23, 1, 2, 0x3000, 0x180, 12),
            (40, 3, 0, 0, 0x1c0, names.len() as u64),
        ];
        for (i, (name, kind, flags, addr, offset, size)) in headers.iter().enumerate() {
            let h = shoff + i * 64;
            elf[h..h + 4].copy_from_slice(&name.to_le_bytes());
            elf[h + 4..h + 8].copy_from_slice(&kind.to_le_bytes());
            elf[h + 8..h + 16].copy_from_slice(&flags.to_le_bytes());
            elf[h + 16..h + 24].copy_from_slice(&addr.to_le_bytes());
            elf[h + 24..h + 32].copy_from_slice(&offset.to_le_bytes());
            elf[h + 32..h + 40].copy_from_slice(&size.to_le_bytes());
        }
        elf
    }

    #[test]
    fn traps_in_alternatives_are_also_known_where_they_will_be_copied() {
        let mut elf = elf_with_alternatives();
        let planted = plant_traps(&mut elf);
        assert_eq!(planted.gap, None);
        let traps = planted.sites;
        // The rdtsc in the replacement (0x2003) and its copy at 0x1010 + 3.
        assert_eq!(traps.get(&0x2003), Some(&PlantedTrap::Rdtsc));
        assert_eq!(traps.get(&0x1013), Some(&PlantedTrap::Rdtsc));
        assert_eq!(traps.len(), 2);
        assert_eq!(&elf[0x103..0x105], &[0xcc, 0x90]);
    }

    #[test]
    fn a_malformed_alternatives_table_adds_nothing_and_is_a_gap() {
        let mut elf = elf_with_alternatives();
        // Point the replacement offset far outside .altinstr_replacement.
        elf[0x184..0x188].copy_from_slice(&0x7fff_0000i32.to_le_bytes());
        let planted = plant_traps(&mut elf);
        assert_eq!(planted.sites.len(), 1);
        assert!(planted.sites.contains_key(&0x2003));
        let gap = planted.gap.expect("the copies are unknown");
        assert!(
            matches!(gap, TrapGap::UnresolvedAlternatives { sites: 1, .. }),
            "{gap:?}"
        );
        assert!(gap.to_string().contains("no known entry layout"), "{gap}");
    }

    #[test]
    fn replacements_without_an_alternatives_table_are_a_gap() {
        let mut elf = elf_with_alternatives();
        // Rename .altinstructions (section 2's name at 0x1c0 + 23).
        elf[0x1c0 + 23 + 1] = b'X';
        let planted = plant_traps(&mut elf);
        assert!(planted.sites.contains_key(&0x2003));
        assert_eq!(
            planted.gap,
            Some(TrapGap::UnresolvedAlternatives {
                sites: 1,
                why: "the ELF has no .altinstructions section"
            })
        );
    }

    #[test]
    fn images_without_sections_plant_nothing() {
        let mut not_elf = vec![0x0f, 0x31, 0x0f, 0x31];
        let planted = plant_traps(&mut not_elf);
        assert!(planted.sites.is_empty());
        assert_eq!(planted.gap, Some(TrapGap::NoCodeSections));
        assert_eq!(not_elf, vec![0x0f, 0x31, 0x0f, 0x31]);
        // Truncated section table: no panic, nothing found.
        let mut elf = b"\x7fELF".to_vec();
        elf.resize(0x40, 0);
        elf[0x28] = 0xff;
        elf[0x3a] = 64;
        elf[0x3c] = 3;
        elf[0x3e] = 1;
        let planted = plant_traps(&mut elf);
        assert!(planted.sites.is_empty());
        assert_eq!(planted.gap, Some(TrapGap::NoCodeSections));
        // Section headers present, but none of them kernel code.
        let mut renamed = elf_with_alternatives();
        renamed[0x1c0 + 1 + 1] = b'X'; // .altinstr_replacement -> .aXtinstr_replacement
        let planted = plant_traps(&mut renamed);
        assert_eq!(planted.gap, Some(TrapGap::NoCodeSections));
        assert!(planted
            .gap
            .unwrap()
            .to_string()
            .contains("name no kernel code section (.text, .init.text"));
    }

    #[test]
    fn test_guest_kernel_sites_are_patched_and_user_code_is_not() {
        let mut storm = crate::guests::builtin("storm")
            .expect("storm guest")
            .to_vec();
        let traps = plant_traps(&mut storm).sites;
        assert!(!traps.is_empty(), "storm has kernel-mode rdtsc");
        for (addr, trap) in &traps {
            assert_eq!(*trap, PlantedTrap::Rdtsc);
            assert!(*addr >= 0x10_0000);
        }
        let mut user = crate::guests::builtin("rdtscuser")
            .expect("rdtscuser guest")
            .to_vec();
        let before = user.clone();
        assert!(
            plant_traps(&mut user).sites.is_empty(),
            "user-mode rdtsc must stay as it is"
        );
        assert_eq!(user, before);
    }

    #[test]
    fn every_test_guest_is_fully_scanned() {
        // No guest is refused by `record` for want of code sections.
        for name in crate::guests::names() {
            let mut image = crate::guests::builtin(name).unwrap().to_vec();
            assert_eq!(plant_traps(&mut image).gap, None, "{name}");
        }
    }
}
