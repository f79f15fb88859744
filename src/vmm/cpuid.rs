//! The one CPU model every twinvm guest sees, whatever the host.
//!
//! A fixed table (not derived from the host) so a guest can move between
//! hosts and primary and backup agree. Modelled on QEMU's migration-safe
//! `kvm64`, minus everything design.md §2 forbids: no XSAVE/AVX, RDRAND/RDSEED,
//! CX16, APIC/x2APIC, TSC-deadline, invariant TSC, RDTSCP, hypervisor/KVM
//! leaves or PMU leaf. `docs/cpu-model.md` is this table in prose.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// One leaf/subleaf of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidLeaf {
    pub function: u32,
    pub index: Option<u32>,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

const fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidLeaf {
    CpuidLeaf {
        function,
        index: None,
        eax,
        ebx,
        ecx,
        edx,
    }
}

const fn le_u32(s: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*s)
}

/// Leaf 1 EDX: fpu de pse tsc msr pae mce cx8 sep mtrr pge mca cmov pat pse36
/// clflush mmx fxsr sse sse2 (bit 9, APIC, deliberately clear).
pub const LEAF1_EDX: u32 = (1 << 0)
    | (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 14)
    | (1 << 15)
    | (1 << 16)
    | (1 << 17)
    | (1 << 19)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);
/// Leaf 1 ECX: sse3 only (no cx16, x2apic, tsc-deadline, xsave, avx, rdrand,
/// hypervisor).
pub const LEAF1_ECX: u32 = 1 << 0;
/// Leaf 0x8000_0001 EDX: syscall, nx, lm (no rdtscp, no 1 GiB pages).
pub const EXT1_EDX: u32 = (1 << 11) | (1 << 20) | (1 << 29);
/// Leaf 0x8000_0001 ECX: lahf_lm.
pub const EXT1_ECX: u32 = 1 << 0;

/// Family 15, model 6, stepping 1 (as `kvm64`).
const SIGNATURE: u32 = (0xf << 8) | (6 << 4) | 1;
/// CLFLUSH line 8 qwords (64 bytes), one logical processor, APIC id 0.
const LEAF1_EBX: u32 = (1 << 16) | (8 << 8);

/// "twinvm virtual CPU", padded with NULs to the 48-byte brand string.
const BRAND: [u8; 48] =
    *b"twinvm virtual CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

fn brand_leaf(function: u32, part: usize) -> CpuidLeaf {
    let word = |i: usize| {
        let o = part * 16 + i * 4;
        u32::from_le_bytes([BRAND[o], BRAND[o + 1], BRAND[o + 2], BRAND[o + 3]])
    };
    leaf(function, word(0), word(1), word(2), word(3))
}

/// The full model, in leaf order.
pub fn model() -> Vec<CpuidLeaf> {
    vec![
        // Max basic leaf 7; vendor "GenuineIntel" (EBX, EDX, ECX order).
        leaf(0, 7, le_u32(b"Genu"), le_u32(b"ntel"), le_u32(b"ineI")),
        leaf(1, SIGNATURE, LEAF1_EBX, LEAF1_ECX, LEAF1_EDX),
        CpuidLeaf {
            function: 7,
            index: Some(0),
            eax: 0,
            ebx: 0,
            ecx: 0,
            edx: 0,
        },
        leaf(0x8000_0000, 0x8000_0008, 0, 0, 0),
        leaf(0x8000_0001, 0, 0, EXT1_ECX, EXT1_EDX),
        brand_leaf(0x8000_0002, 0),
        brand_leaf(0x8000_0003, 1),
        brand_leaf(0x8000_0004, 2),
        // No invariant TSC, no power management features.
        leaf(0x8000_0007, 0, 0, 0, 0),
        // 40 physical, 48 virtual address bits.
        leaf(0x8000_0008, 0x3028, 0, 0, 0),
    ]
}

/// The model as the `KVM_SET_CPUID2` argument.
pub fn kvm_cpuid() -> Result<CpuId, vmm_sys_util::fam::Error> {
    let entries: Vec<kvm_cpuid_entry2> = model()
        .into_iter()
        .map(|l| kvm_cpuid_entry2 {
            function: l.function,
            index: l.index.unwrap_or(0),
            flags: if l.index.is_some() {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: l.eax,
            ebx: l.ebx,
            ecx: l.ecx,
            edx: l.edx,
            ..Default::default()
        })
        .collect();
    CpuId::from_entries(&entries)
}

/// Model bits the host's KVM does not claim to support, as (leaf, register,
/// mask). Reported, not fatal: see docs/cpu-model.md for what a guest
/// actually sees on hosts where CPUID is not fully virtualised.
pub fn unsupported_bits(supported: &CpuId) -> Vec<(u32, &'static str, u32)> {
    let mut missing = Vec::new();
    for l in model() {
        // Vendor, signature, brand and size leaves are values, not feature bits.
        if !matches!(l.function, 1 | 7 | 0x8000_0001) {
            continue;
        }
        let host = supported
            .as_slice()
            .iter()
            .find(|e| e.function == l.function && e.index == l.index.unwrap_or(0));
        let regs = [("ebx", l.ebx), ("ecx", l.ecx), ("edx", l.edx)];
        for (name, want) in regs {
            if l.function == 1 && name == "ebx" {
                continue;
            }
            let have = host.map_or(0, |h| match name {
                "ebx" => h.ebx,
                "ecx" => h.ecx,
                _ => h.edx,
            });
            if want & !have != 0 {
                missing.push((l.function, name, want & !have));
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(function: u32) -> CpuidLeaf {
        model()
            .into_iter()
            .find(|l| l.function == function)
            .unwrap()
    }

    #[test]
    fn forbidden_features_are_clear() {
        let l1 = find(1);
        assert_eq!(l1.edx & (1 << 9), 0, "APIC");
        for (bit, name) in [
            (13, "cx16"),
            (21, "x2apic"),
            (24, "tsc-deadline"),
            (26, "xsave"),
            (27, "osxsave"),
            (28, "avx"),
            (30, "rdrand"),
            (31, "hypervisor"),
        ] {
            assert_eq!(l1.ecx & (1 << bit), 0, "{name}");
        }
        let l7 = find(7);
        assert_eq!(l7.ebx & (1 << 18), 0, "rdseed");
        assert_eq!(l7.ebx & (1 << 5), 0, "avx2");
        assert_eq!(find(0x8000_0001).edx & (1 << 27), 0, "rdtscp");
        assert_eq!(find(0x8000_0007).edx & (1 << 8), 0, "invariant tsc");
        // No hypervisor leaves (0x4000_0000..) and no PMU leaf (0xa).
        assert!(model()
            .iter()
            .all(|l| l.function != 0xa && !(0x4000_0000..0x5000_0000).contains(&l.function)));
    }

    #[test]
    fn max_leaves_cover_the_table() {
        let max_basic = find(0).eax;
        let max_ext = find(0x8000_0000).eax;
        for l in model() {
            if l.function < 0x8000_0000 {
                assert!(l.function <= max_basic);
            } else {
                assert!(l.function <= max_ext);
            }
        }
    }

    #[test]
    fn vendor_and_brand_read_back() {
        let l0 = find(0);
        let mut v = Vec::new();
        for r in [l0.ebx, l0.edx, l0.ecx] {
            v.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&v, b"GenuineIntel");
        let mut brand = Vec::new();
        for f in 0x8000_0002..=0x8000_0004 {
            let l = find(f);
            for r in [l.eax, l.ebx, l.ecx, l.edx] {
                brand.extend_from_slice(&r.to_le_bytes());
            }
        }
        assert!(brand.starts_with(b"twinvm virtual CPU\0"));
    }

    #[test]
    fn kvm_entries_match_the_model() {
        let cpuid = kvm_cpuid().unwrap();
        assert_eq!(cpuid.as_slice().len(), model().len());
        let l7 = cpuid.as_slice().iter().find(|e| e.function == 7).unwrap();
        assert_eq!(l7.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
    }
}
