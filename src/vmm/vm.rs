//! Creating a KVM VM with no in-kernel irqchip, PIT or LAPIC, its memory and
//! its one vCPU, and putting a kernel in it.

use kvm_bindings::{kvm_userspace_memory_region, kvm_vcpu_events};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use super::boot::{self, BootError, LoadedKernel};
use super::cpuid;
use super::layout::{ram_ranges, MAX_MEM_BYTES, MIN_MEM_BYTES};

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
}

fn kvm_err(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A built VM, ready to run. Field order is drop order: the vCPU and VM fds
/// go before the memory they map.
pub struct Vm {
    pub vcpu: VcpuFd,
    pub vm_fd: VmFd,
    _kvm: Kvm,
    pub mem: GuestMemoryMmap,
    pub kernel: LoadedKernel,
}

impl Vm {
    /// Build the VM: memory, CPUID model, kernel, boot structures, registers.
    pub fn create(config: &VmConfig) -> Result<Vm, VmError> {
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
        // Only needed by VMX for real-mode emulation; harmless elsewhere.
        vm_fd
            .set_tss_address(0xfffb_d000)
            .map_err(kvm_err("set TSS address"))?;

        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(config.mem_bytes)
            .into_iter()
            .map(|(start, size)| (GuestAddress(start), size as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| VmError::Memory {
            bytes: config.mem_bytes,
            source,
        })?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| VmError::Kvm {
                    what: "map guest memory",
                    source: vmm_sys_util::errno::Error::new(libc::EFAULT),
                })?;
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live anonymous mapping owned by
            // `mem`, which the returned Vm keeps and drops after `vm_fd`; the
            // slots do not overlap (ram_ranges yields disjoint ranges).
            unsafe { vm_fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("register guest memory"))?;
        }

        let kernel = boot::load_kernel(&mem, &config.kernel_name, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(image) => Some((
                boot::load_initrd(&mem, config.mem_bytes, &kernel, image)?,
                image.len() as u64,
            )),
            None => None,
        };
        boot::write_boot_structures(&mem, config.mem_bytes, &kernel, &config.cmdline, initrd)?;

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
        Ok(Vm {
            vcpu,
            vm_fd,
            _kvm: kvm,
            mem,
            kernel,
        })
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
