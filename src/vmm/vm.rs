//! Creating a KVM VM with no in-kernel irqchip, PIT or LAPIC, its memory and
//! its one vCPU, and putting a kernel in it.

use std::cell::{Cell, RefCell};
use std::io;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events,
    kvm_xsave, Msrs,
};
use kvm_ioctls::{
    Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd,
};
use thiserror::Error;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use zerocopy::{FromBytes, IntoBytes};

use super::boot::{self, BootError, LoadedKernel, PreparedKernel};
use super::cpuid;
use super::hot_pages::HotPages;
use super::kvm_stats::{KvmCounter, EMULATED_INSTRUCTIONS};
use super::layout::{self, ram_ranges, MAX_MEM_BYTES, MIN_MEM_BYTES, SHADOW_FLUSH_SLOT_GPA};
use super::traps::PlantedTrap;
use crate::devices::virtio::{GuestRam, GuestRamError};
use crate::replay::digest::DirtyPages;
use crate::replay::log::CpuStateBytes;

mod dirty_log;

/// Everything needed to build a guest.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Name shown in messages (a path or `builtin:NAME`).
    pub kernel_name: String,
    pub kernel: Vec<u8>,
    pub initrd: Option<Vec<u8>>,
    pub cmdline: String,
    pub mem_bytes: u64,
}

/// Why a VM could not be built.
#[derive(Debug, Error)]
pub enum VmError {
    /// Memory size outside what twinvm accepts.
    #[error("guest memory of {0} bytes is out of range: use {min} MiB to {max} GiB", min = MIN_MEM_BYTES >> 20, max = MAX_MEM_BYTES >> 30)]
    MemSize(u64),
    /// /dev/kvm missing or not accessible.
    #[error("cannot open /dev/kvm ({0}); twinvm needs KVM and permission to use it (root)")]
    OpenKvm(vmm_sys_util::errno::Error),
    /// A capability twinvm relies on is absent.
    #[error("this host's KVM lacks {0:?}, which twinvm needs")]
    MissingCap(Cap),
    /// A KVM ioctl failed while building the VM.
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        source: vmm_sys_util::errno::Error,
    },
    /// Allocating guest memory failed.
    #[error("allocating {bytes} bytes of guest memory: {source}")]
    Memory {
        bytes: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    /// The CPUID model could not be built.
    #[error("building the CPUID table: {0:?}")]
    Cpuid(vmm_sys_util::fam::Error),
    /// Loading the kernel, initrd or boot structures failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Saved vCPU state of the wrong shape (from a log).
    #[error("vCPU state: {0} has {1} bytes, expected {2}")]
    CpuStateSize(&'static str, usize, usize),
    /// Saved vCPU state with more MSRs than KVM takes at once.
    #[error("vCPU state: {0} MSRs is more than KVM accepts in one call")]
    MsrCount(usize),
    /// Finishing the last exit (before loading state) produced another exit.
    #[error(
        "KVM needed another exit ({0}) to finish the last one before vCPU state could be loaded"
    )]
    PendingExit(String),
    /// KVM refused one MSR of the saved vCPU state.
    #[error("vCPU state: KVM could not {0} MSR {1:#x}")]
    MsrAccess(&'static str, u32),
    /// The VMM's own write fell outside guest RAM.
    #[error("writing {len} bytes of guest memory at {gpa:#x}: outside guest RAM")]
    GuestWrite { gpa: u64, len: usize },
    /// A read of guest memory fell outside guest RAM.
    #[error("reading {len} bytes of guest memory at {gpa:#x}: outside guest RAM")]
    GuestRead { gpa: u64, len: usize },
}

fn kvm_err(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// KVM's description of memslot `slot` backed by `region`'s host mapping.
fn memslot<R: GuestMemoryRegion>(
    slot: u32,
    region: &R,
) -> Result<kvm_userspace_memory_region, VmError> {
    let host = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(|_| VmError::Kvm {
            what: "map guest memory",
            source: vmm_sys_util::errno::Error::new(libc::EFAULT),
        })?;
    Ok(kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: region.start_addr().0,
        memory_size: region.len(),
        userspace_addr: host as u64,
    })
}

/// MSRs whose reads return time (IA32_TSC, MPERF, APERF): they exit to
/// userspace through KVM's MSR filter and become logged time reads.
pub const TIME_MSRS: [u32; 3] = [0x10, 0xe7, 0xe8];

/// Send guest reads of [`TIME_MSRS`] to userspace (writes stay with KVM).
fn trap_time_msrs(kvm: &Kvm, vm_fd: &VmFd) -> Result<(), VmError> {
    if !kvm.check_extension(Cap::X86UserSpaceMsr) {
        return Err(VmError::MissingCap(Cap::X86UserSpaceMsr));
    }
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    vm_fd
        .enable_cap(&cap)
        .map_err(kvm_err("enable user-space MSR exits"))?;
    // A clear bit denies the access, which (with the capability above) exits
    // to userspace instead of raising #GP.
    let deny = [0u8; 1];
    let ranges: Vec<MsrFilterRange> = TIME_MSRS
        .iter()
        .map(|&base| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ,
            base,
            msr_count: 1,
            bitmap: &deny,
        })
        .collect();
    vm_fd
        .set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(kvm_err("set MSR filter"))
}

/// Architectural MSRs a guest changes without an exit (SWAPGS, WRMSR that
/// KVM handles itself): sync points carry them and digests hash them. Time
/// MSRs are not here: their reads are logged instead.
#[rustfmt::skip]
pub const STATE_MSRS: &[u32] = &[
    // SYSENTER_CS/ESP/EIP, MISC_ENABLE, PAT, MTRR default type
    0x174, 0x175, 0x176, 0x1a0, 0x277, 0x2ff,
    // variable MTRRs (base, mask) 0-7
    0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207,
    0x208, 0x209, 0x20a, 0x20b, 0x20c, 0x20d, 0x20e, 0x20f,
    // fixed MTRRs
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
    // STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE
    0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084, 0xc000_0102,
];

/// `(index, value)` pairs in the byte layout of [`CpuStateBytes::msrs`]:
/// u32 index, u64 value, little-endian, 12 bytes per MSR.
pub fn msrs_to_bytes(entries: &[kvm_msr_entry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.len() * 12);
    for e in entries {
        b.extend_from_slice(&e.index.to_le_bytes());
        b.extend_from_slice(&e.data.to_le_bytes());
    }
    b
}

/// Inverse of [`msrs_to_bytes`]; None if the length is not a multiple of 12.
pub fn msrs_from_bytes(b: &[u8]) -> Option<Vec<kvm_msr_entry>> {
    if b.len() % 12 != 0 {
        return None;
    }
    Some(
        b.chunks_exact(12)
            .map(|c| kvm_msr_entry {
                index: u32::from_le_bytes(c[0..4].try_into().unwrap()),
                data: u64::from_le_bytes(c[4..12].try_into().unwrap()),
                ..Default::default()
            })
            .collect(),
    )
}

/// One MSR of the vCPU; None if KVM does not let it be read.
pub fn read_msr(vcpu: &VcpuFd, index: u32) -> Result<Option<u64>, vmm_sys_util::errno::Error> {
    let mut one = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .expect("one entry fits");
    let read = vcpu.get_msrs(&mut one)?;
    Ok((read == 1).then(|| one.as_slice()[0].data))
}

/// The MSRs of [`STATE_MSRS`] this host's KVM can read for the vCPU, in
/// that order.
fn readable_state_msrs(vcpu: &VcpuFd) -> Vec<u32> {
    STATE_MSRS
        .iter()
        .copied()
        .filter(|&index| matches!(read_msr(vcpu, index), Ok(Some(_))))
        .collect()
}

/// Size of `kvm_fpu` in its uapi layout.
pub const FPU_BYTES: usize = 416;

/// `kvm_fpu` in its uapi byte layout (the struct has no zerocopy derive).
pub fn fpu_to_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut b = Vec::with_capacity(FPU_BYTES);
    for r in &f.fpr {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.fcw.to_le_bytes());
    b.extend_from_slice(&f.fsw.to_le_bytes());
    b.push(f.ftwx);
    b.push(0);
    b.extend_from_slice(&f.last_opcode.to_le_bytes());
    b.extend_from_slice(&f.last_ip.to_le_bytes());
    b.extend_from_slice(&f.last_dp.to_le_bytes());
    for x in &f.xmm {
        b.extend_from_slice(x);
    }
    b.extend_from_slice(&f.mxcsr.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b
}

/// Inverse of [`fpu_to_bytes`]; None if the length is wrong.
pub fn fpu_from_bytes(b: &[u8]) -> Option<kvm_fpu> {
    if b.len() != FPU_BYTES {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let mut f = kvm_fpu::default();
    for (i, r) in f.fpr.iter_mut().enumerate() {
        r.copy_from_slice(&b[i * 16..i * 16 + 16]);
    }
    f.fcw = u16_at(128);
    f.fsw = u16_at(130);
    f.ftwx = b[132];
    f.last_opcode = u16_at(134);
    f.last_ip = u64_at(136);
    f.last_dp = u64_at(144);
    for (i, x) in f.xmm.iter_mut().enumerate() {
        x.copy_from_slice(&b[152 + i * 16..168 + i * 16]);
    }
    f.mxcsr = u32::from_le_bytes(b[408..412].try_into().unwrap());
    Some(f)
}

/// A built VM, ready to run. Field order is drop order: the vCPU and VM fds
/// go before the memory they map.
pub struct Vm {
    pub vcpu: VcpuFd,
    pub vm_fd: VmFd,
    _kvm: Kvm,
    pub mem: GuestMemoryMmap,
    /// Guest RAM size.
    pub mem_bytes: u64,
    pub kernel: LoadedKernel,
    /// Planted time and entropy traps in the kernel, by guest virtual address.
    pub planted_traps: std::collections::HashMap<u64, PlantedTrap>,
    slots: Vec<kvm_userspace_memory_region>,
    /// The KVM_GET_MSRS request for the MSRs saved with the vCPU state
    /// ([`STATE_MSRS`] that KVM can read here), built once and reused (KVM
    /// overwrites only the values).
    state_msrs: RefCell<Msrs>,
    /// Guest pages the VMM itself wrote (KVM's dirty log does not see them),
    /// while dirty tracking is on (drained by `collect_dirty_pages`).
    userspace_dirty: RefCell<DirtyPages>,
    dirty_tracking: bool,
    /// KVM's manual dirty-log protection is on: a harvest re-protects only
    /// the pages `hot_pages` lets go (see `hot_pages.rs`).
    manual_protect: bool,
    hot_pages: HotPages,
    /// The scratch memslot of [`Vm::invalidate_shadow_mmu`] and the one
    /// page behind it (kept alive while the Vm is).
    shadow_flush_slot: kvm_userspace_memory_region,
    _shadow_flush_page: GuestMemoryMmap,
    /// The VMM changed guest memory since KVM last dropped its shadow page
    /// tables ([`Vm::refresh_shadow_mmu`]), and whether both replicas make
    /// that change at the same point (then the flush is symmetric).
    shadow_stale: Cell<Option<Symmetry>>,
    /// A sync point happened since the last symmetric flush: the backup's
    /// shadow page tables may differ from the primary's (see
    /// [`GuestWrite::Device`]).
    shadow_asymmetric: Cell<bool>,
    /// A device changed guest memory since the last symmetric flush (both
    /// replicas then share whatever stale entry it left; a sync point would
    /// make them differ).
    device_unflushed: Cell<bool>,
    /// KVM's count of instructions its emulator ran for this vCPU (None
    /// where KVM has no statistics file for it).
    emulated_instructions: Option<KvmCounter>,
}

/// Whether a flush happens at the same point on primary and backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Symmetry {
    Both,
    ThisSideOnly,
}

/// Who writes guest memory through [`Vm::write_guest`], which decides what
/// KVM must be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestWrite {
    /// The VMM on the guest's behalf, at the same point on every replica
    /// (emulation-fallback stores, the syscall fix's trap): noted for sync
    /// points and digests, and KVM's shadow page tables are dropped.
    Vmm,
    /// A sync point's pages loaded on a backup: the primary's guest wrote
    /// them, so they are not the VMM's own writes for its log; the shadow is
    /// dropped (they may be page tables the skipped stretch changed).
    SyncPoint,
    /// A device's DMA (a received frame, a used-ring update) into buffers
    /// the guest handed the device. Noted like `Vmm`, but KVM's shadow page
    /// tables are dropped (on both replicas, at the same point) only when a
    /// sync point and a memory-changing device write have both happened
    /// since the last flush both made, at whichever of the two comes
    /// second. Replay needs the replicas to agree, not the shadow to be
    /// fresh: both start from the same (empty) shadow and build it from the
    /// same accesses; a device write alone leaves both with the same
    /// (possibly stale) entry, a sync point alone only makes the backup
    /// rebuild from memory the primary's shadow still agrees with; only the
    /// two together let the primary keep a stale entry the backup dropped.
    /// A guest that hands a live page table to the NIC then sees the same
    /// translation on both replicas; the `dmaremap` guest proves both
    /// orders (docs/architecture.md, "The NIC and KVM's shadow page tables").
    Device,
}

impl Vm {
    /// Build the VM: memory, CPUID model, kernel, boot structures, registers.
    pub fn create(config: &VmConfig) -> Result<Vm, VmError> {
        let kernel = boot::prepare_kernel(&config.kernel_name, &config.kernel)?;
        if let Some(why) = &kernel.not_replayable {
            tracing::warn!(
                "{}: {why} (it runs; `record` and `replay` refuse it)",
                config.kernel_name
            );
        }
        Vm::create_with_kernel(config, &kernel)
    }

    /// [`Vm::create`] with `config.kernel` already prepared
    /// ([`boot::prepare_kernel`]: a bzImage's kernel taken out, traps planted).
    pub fn create_with_kernel(config: &VmConfig, prepared: &PreparedKernel) -> Result<Vm, VmError> {
        if !(MIN_MEM_BYTES..=MAX_MEM_BYTES).contains(&config.mem_bytes) {
            return Err(VmError::MemSize(config.mem_bytes));
        }
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for cap in [Cap::UserMemory, Cap::Hlt, Cap::ImmediateExit, Cap::ExtCpuid] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let vm_fd = kvm.create_vm().map_err(kvm_err("create VM"))?;
        let manual_protect = dirty_log::enable_manual_protect(&vm_fd);
        // Only needed by VMX for real-mode emulation; harmless elsewhere.
        vm_fd
            .set_tss_address(0xfffb_d000)
            .map_err(kvm_err("set TSS address"))?;

        let mut slots = Vec::new();
        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(config.mem_bytes)
            .into_iter()
            .map(|(start, size)| (GuestAddress(start), size as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| VmError::Memory {
            bytes: config.mem_bytes,
            source,
        })?;
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = memslot(slot as u32, region)?;
            // SAFETY: the host range is a live anonymous mapping owned by
            // `mem`, which the returned Vm keeps and drops after `vm_fd`; the
            // slots do not overlap (ram_ranges yields disjoint ranges).
            unsafe { vm_fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("register guest memory"))?;
            slots.push(region_desc);
        }

        // The prepared image has its time and entropy reads turned into
        // traps (see traps.rs); the file itself is untouched.
        let kernel = boot::load_prepared(&mem, &config.kernel_name, prepared)?;
        let planted_traps = prepared.planted_traps.clone();
        let initrd = match &config.initrd {
            Some(image) => Some((
                boot::load_initrd(&mem, config.mem_bytes, &kernel, image)?,
                image.len() as u64,
            )),
            None => None,
        };
        boot::write_boot_structures(&mem, config.mem_bytes, &kernel, &config.cmdline, initrd)?;

        trap_time_msrs(&kvm, &vm_fd)?;
        let vcpu = vm_fd.create_vcpu(0).map_err(kvm_err("create vCPU"))?;
        let model = cpuid::kvm_cpuid().map_err(VmError::Cpuid)?;
        if let Ok(supported) = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES) {
            for (leaf, reg, bits) in cpuid::unsupported_bits(&supported) {
                tracing::debug!(
                    "CPU model bits KVM does not list as supported: leaf {leaf:#x} {reg} {bits:#x}"
                );
            }
        }
        vcpu.set_cpuid2(&model).map_err(kvm_err("set CPUID"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
        vcpu.set_sregs(&boot::long_mode_sregs(sregs))
            .map_err(kvm_err("set sregs"))?;
        vcpu.set_regs(&boot::entry_regs(kernel.entry))
            .map_err(kvm_err("set regs"))?;
        vcpu.set_fpu(&boot::initial_fpu())
            .map_err(kvm_err("set FPU"))?;
        let state_msr_entries: Vec<kvm_msr_entry> = readable_state_msrs(&vcpu)
            .into_iter()
            .map(|index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let state_msrs = RefCell::new(
            Msrs::from_entries(&state_msr_entries)
                .map_err(|_| VmError::MsrCount(state_msr_entries.len()))?,
        );
        let shadow_flush_page =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(SHADOW_FLUSH_SLOT_GPA), 0x1000)])
                .map_err(|source| VmError::Memory {
                    bytes: 0x1000,
                    source,
                })?;
        let shadow_flush_slot = memslot(
            slots.len() as u32,
            shadow_flush_page
                .iter()
                .next()
                .expect("the scratch page has one region"),
        )?;
        let emulated_instructions = match super::sys::vcpu_stats_file(&vcpu)
            .map_err(io::Error::from)
            .and_then(|file| KvmCounter::open(file, EMULATED_INSTRUCTIONS))
        {
            Ok(counter) => Some(counter),
            Err(e) => {
                tracing::debug!("KVM's emulated-instruction count is not available: {e}");
                None
            }
        };
        Ok(Vm {
            emulated_instructions,
            shadow_flush_slot,
            _shadow_flush_page: shadow_flush_page,
            shadow_stale: Cell::new(None),
            shadow_asymmetric: Cell::new(false),
            device_unflushed: Cell::new(false),
            dirty_tracking: false,
            manual_protect,
            hot_pages: HotPages::new(0),
            state_msrs,
            vcpu,
            vm_fd,
            _kvm: kvm,
            mem,
            mem_bytes: config.mem_bytes,
            kernel,
            planted_traps,
            slots,
            userspace_dirty: RefCell::new(DirtyPages::default()),
        })
    }

    /// Instructions KVM's emulator has run for the vCPU so far (on the
    /// development hosts, nearly all of the guest kernel's); None where KVM
    /// does not say.
    pub fn emulated_instructions(&self) -> Option<u64> {
        self.emulated_instructions.as_ref()?.read().ok()
    }

    /// Make KVM drop its shadow copies of the guest's page tables.
    ///
    /// On hosts without EPT/NPT (the development machines: shadow paging),
    /// KVM keeps its own copy of every guest page table and learns of
    /// changes by trapping the guest's own writes. Pages the VMM writes
    /// itself -- a sync point's -- are invisible to it, so a backup would go
    /// on translating through the mapping the guest had before (measured with
    /// the `remap` test guest). Deleting a memslot makes KVM zap every shadow
    /// page (KVM_X86_QUIRK_SLOT_ZAP_ALL, on by default), so twinvm adds and
    /// deletes a scratch slot; the shadow is rebuilt from guest memory as the
    /// guest touches it. On EPT/NPT hosts this only costs the two ioctls.
    fn invalidate_shadow_mmu(&self) -> Result<(), VmError> {
        let mut scratch = self.shadow_flush_slot;
        // SAFETY: the host page is a live mapping owned by the Vm
        // (`_shadow_flush_page`), the slot number is unused and its range
        // overlaps no RAM slot (it sits in the MMIO hole, above all RAM
        // below 4 GiB); the slot is deleted again just below.
        unsafe { self.vm_fd.set_user_memory_region(scratch) }
            .map_err(kvm_err("add the shadow-flush memslot"))?;
        scratch.memory_size = 0;
        // SAFETY: deleting the slot added above; a zero size removes it.
        unsafe { self.vm_fd.set_user_memory_region(scratch) }
            .map_err(kvm_err("delete the shadow-flush memslot"))?;
        Ok(())
    }

    /// Before the vCPU runs: if the VMM changed guest memory since the last
    /// time, make KVM drop its shadow page tables (see
    /// [`Vm::invalidate_shadow_mmu`]). Returns whether it did.
    pub fn refresh_shadow_mmu(&self) -> Result<bool, VmError> {
        let Some(symmetry) = self.shadow_stale.take() else {
            return Ok(false);
        };
        self.invalidate_shadow_mmu()?;
        if symmetry == Symmetry::Both {
            self.shadow_asymmetric.set(false);
            self.device_unflushed.set(false);
        }
        Ok(true)
    }

    /// A sync point was made (primary) or loaded (backup): from here until
    /// the next flush both replicas make, their shadow page tables may
    /// differ (the primary executed the stretch, the backup did not). If a
    /// device wrote guest memory since that flush, both flush now (see
    /// [`GuestWrite::Device`]).
    pub fn note_sync_point(&self) {
        self.shadow_asymmetric.set(true);
        if self.device_unflushed.get() {
            self.mark_shadow_stale(Symmetry::Both);
        }
    }

    /// Whether a device wrote guest memory since the last flush both
    /// replicas made (see [`GuestWrite::Device`]).
    pub fn device_unflushed(&self) -> bool {
        self.device_unflushed.get()
    }

    /// Backup, before it loads a sync point: the primary ran the stretch
    /// that led to it, and before running made the flush this side still
    /// has pending; count that flush as the primary did (this side's
    /// shadow is still dropped before it runs), so both go on from the
    /// same state of this rule (see [`GuestWrite::Device`]).
    pub fn settle_flush_before_sync_point(&self) {
        if self.shadow_stale.get() == Some(Symmetry::Both) {
            self.shadow_asymmetric.set(false);
            self.device_unflushed.set(false);
            self.shadow_stale.set(Some(Symmetry::ThisSideOnly));
        }
    }

    /// Backup catching up, before it loads a sync point it did not execute
    /// to: take the primary's [`Vm::device_unflushed`] there, and drop its
    /// own shadow page tables whatever changed (they were built at another
    /// point).
    pub fn load_flush_state_at_sync_point(&self, device_unflushed: bool) {
        self.device_unflushed.set(device_unflushed);
        self.shadow_stale.set(Some(Symmetry::ThisSideOnly));
    }

    /// A clone's cut (primary) or resume (new backup): both sides drop
    /// every shadow page table before running on, so the new backup's
    /// empty shadow and the primary's agree from the first instruction
    /// (a stale entry the primary kept would otherwise make the replicas
    /// see different memory).
    pub fn flush_shadow_for_clone(&self) {
        self.mark_shadow_stale(Symmetry::Both);
    }

    fn mark_shadow_stale(&self, symmetry: Symmetry) {
        // A symmetric reason wins: the flush then happens on both sides.
        let merged = match (self.shadow_stale.get(), symmetry) {
            (Some(Symmetry::Both), _) | (_, Symmetry::Both) => Symmetry::Both,
            _ => Symmetry::ThisSideOnly,
        };
        self.shadow_stale.set(Some(merged));
    }

    /// Write guest memory on the VMM's behalf (see [`GuestWrite`] for what
    /// each writer implies). Bytes already there are left alone, so an
    /// unchanged page costs no flush.
    pub fn write_guest(&self, gpa: u64, data: &[u8], writer: GuestWrite) -> Result<(), VmError> {
        let mut current = [0u8; 4096];
        let unchanged = data.chunks(current.len()).enumerate().all(|(i, chunk)| {
            let here = &mut current[..chunk.len()];
            self.mem
                .read_slice(here, GuestAddress(gpa + (i * 4096) as u64))
                .is_ok()
                && here == chunk
        });
        if unchanged {
            return Ok(());
        }
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| VmError::GuestWrite {
                gpa,
                len: data.len(),
            })?;
        if self.dirty_tracking {
            self.userspace_dirty
                .borrow_mut()
                .add_range(gpa, data.len() as u64);
        }
        match writer {
            GuestWrite::Vmm => self.mark_shadow_stale(Symmetry::Both),
            GuestWrite::SyncPoint => self.mark_shadow_stale(Symmetry::ThisSideOnly),
            GuestWrite::Device => {
                if self.shadow_asymmetric.get() {
                    self.mark_shadow_stale(Symmetry::Both);
                } else {
                    self.device_unflushed.set(true);
                }
            }
        }
        Ok(())
    }

    /// Read RAM page `index` (numbered as `layout::ram_page_index`).
    pub fn read_ram_page(&self, index: usize, buf: &mut [u8]) -> Result<(), VmError> {
        let gpa = layout::ram_page_gpa(self.mem_bytes, index);
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| VmError::GuestRead {
                gpa,
                len: buf.len(),
            })
    }

    /// The vCPU's architectural state as raw KVM uapi bytes.
    pub fn cpu_state(&self) -> Result<CpuStateBytes, VmError> {
        let regs = self.vcpu.get_regs().map_err(kvm_err("get regs"))?;
        let sregs = self.vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
        let fpu = self.vcpu.get_fpu().map_err(kvm_err("get FPU"))?;
        let events = self
            .vcpu
            .get_vcpu_events()
            .map_err(kvm_err("get vCPU events"))?;
        let mut msrs = self.state_msrs.borrow_mut();
        let read = self.vcpu.get_msrs(&mut msrs).map_err(kvm_err("get MSRs"))?;
        if read != msrs.as_slice().len() {
            return Err(VmError::MsrAccess("read", msrs.as_slice()[read].index));
        }
        let xsave = self.vcpu.get_xsave().map_err(kvm_err("get XSAVE state"))?;
        Ok(CpuStateBytes {
            regs: regs.as_bytes().to_vec(),
            sregs: sregs.as_bytes().to_vec(),
            fpu: fpu_to_bytes(&fpu),
            events: events.as_bytes().to_vec(),
            msrs: msrs_to_bytes(msrs.as_slice()),
            xsave: xsave.region.as_bytes().to_vec(),
        })
    }

    /// Let KVM finish the exit it reported last without running the guest.
    /// An IN, MMIO read or MSR read exit is completed by the next KVM_RUN
    /// (the value goes into the register and RIP moves on only then), so
    /// state loaded before that run would be overwritten by the stale
    /// completion: a backup loading a sync point right after such a landmark
    /// re-ran the kernel's code from the old instruction (measured on Linux:
    /// a console character printed twice, then a digest mismatch).
    pub fn complete_pending_exit(&mut self) -> Result<(), VmError> {
        self.vcpu.set_kvm_immediate_exit(1);
        let outcome = match self.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(source) => Err(VmError::Kvm {
                what: "complete the last exit",
                source,
            }),
            Ok(exit) => Err(VmError::PendingExit(format!("{exit:?}"))),
        };
        self.vcpu.set_kvm_immediate_exit(0);
        outcome
    }

    /// Load state captured by [`Vm::cpu_state`] (possibly on another host).
    pub fn set_cpu_state(&self, cpu: &CpuStateBytes) -> Result<(), VmError> {
        fn parse<T: FromBytes>(what: &'static str, bytes: &[u8]) -> Result<T, VmError> {
            T::read_from_bytes(bytes)
                .map_err(|_| VmError::CpuStateSize(what, bytes.len(), std::mem::size_of::<T>()))
        }
        let regs: kvm_regs = parse("regs", &cpu.regs)?;
        let sregs: kvm_sregs = parse("sregs", &cpu.sregs)?;
        let fpu = fpu_from_bytes(&cpu.fpu).ok_or(VmError::CpuStateSize(
            "fpu",
            cpu.fpu.len(),
            FPU_BYTES,
        ))?;
        let events: kvm_vcpu_events = parse("vcpu events", &cpu.events)?;
        let entries = msrs_from_bytes(&cpu.msrs).ok_or(VmError::CpuStateSize(
            "msrs",
            cpu.msrs.len(),
            cpu.msrs.len() / 12 * 12,
        ))?;
        let msrs = Msrs::from_entries(&entries).map_err(|_| VmError::MsrCount(entries.len()))?;
        self.vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
        let written = self.vcpu.set_msrs(&msrs).map_err(kvm_err("set MSRs"))?;
        if written != entries.len() {
            return Err(VmError::MsrAccess("write", entries[written].index));
        }
        self.vcpu.set_regs(&regs).map_err(kvm_err("set regs"))?;
        self.vcpu.set_fpu(&fpu).map_err(kvm_err("set FPU"))?;
        // After the FPU: the XSAVE area holds the same legacy state plus the
        // extended components.
        let mut xsave = kvm_xsave::default();
        if cpu.xsave.len() != std::mem::size_of_val(&xsave.region) {
            return Err(VmError::CpuStateSize(
                "xsave",
                cpu.xsave.len(),
                std::mem::size_of_val(&xsave.region),
            ));
        }
        xsave.region.as_mut_bytes().copy_from_slice(&cpu.xsave);
        // SAFETY: KVM_SET_XSAVE reads more than the 4096-byte `kvm_xsave` only
        // for dynamically enabled XSTATE features (AMX), which need
        // arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM); twinvm never asks for them,
        // so the state fits the struct (AVX-512 ends at byte 2688).
        unsafe { self.vcpu.set_xsave(&xsave) }.map_err(kvm_err("set XSAVE state"))?;
        self.vcpu
            .set_vcpu_events(&events)
            .map_err(kvm_err("set vCPU events"))
    }

    /// Make the guest take exception `vector` at its current RIP.
    pub fn inject_exception(&self, vector: u8, error_code: Option<u32>) -> Result<(), VmError> {
        let mut events: kvm_vcpu_events = self
            .vcpu
            .get_vcpu_events()
            .map_err(kvm_err("get vCPU events"))?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = u8::from(error_code.is_some());
        events.exception.error_code = error_code.unwrap_or(0);
        self.vcpu
            .set_vcpu_events(&events)
            .map_err(kvm_err("set vCPU events"))
    }
}

/// The NIC's DMA into guest memory (see [`GuestWrite::Device`]).
impl GuestRam for Vm {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestRamError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| GuestRamError {
                gpa,
                len: buf.len(),
            })
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestRamError> {
        self.write_guest(gpa, data, GuestWrite::Device)
            .map_err(|_| GuestRamError {
                gpa,
                len: data.len(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_bytes_round_trip_and_reject_ragged_lengths() {
        let entries = [
            kvm_msr_entry {
                index: 0xc000_0102,
                data: 0xffff_8880_1234_5000,
                ..Default::default()
            },
            kvm_msr_entry {
                index: 0x174,
                data: 0x10,
                ..Default::default()
            },
        ];
        let bytes = msrs_to_bytes(&entries);
        assert_eq!(bytes.len(), 24);
        assert_eq!(&bytes[0..4], &0xc000_0102u32.to_le_bytes());
        let back = msrs_from_bytes(&bytes).unwrap();
        assert_eq!(
            back.iter().map(|e| (e.index, e.data)).collect::<Vec<_>>(),
            vec![(0xc000_0102, 0xffff_8880_1234_5000), (0x174, 0x10)]
        );
        assert!(msrs_from_bytes(&bytes[..23]).is_none());
        assert_eq!(msrs_from_bytes(&[]).unwrap().len(), 0);
    }

    #[test]
    fn fpu_bytes_round_trip_in_the_uapi_size() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            fsw: 0x1234,
            ftwx: 0x5a,
            last_opcode: 0x7ff,
            last_ip: 0x1122_3344,
            last_dp: u64::MAX,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        f.fpr[7][15] = 9;
        f.xmm[15][0] = 0xee;
        let b = fpu_to_bytes(&f);
        assert_eq!(b.len(), std::mem::size_of::<kvm_fpu>());
        assert_eq!(fpu_from_bytes(&b), Some(f));
        assert_eq!(fpu_from_bytes(&b[1..]), None);
    }
}
