//! vCPU exits as owned values. `kvm-ioctls` hands out exits that borrow the
//! vCPU's `kvm_run` page, which would keep the engine from touching the VM
//! while it handles one; here each exit is copied out (a few bytes), handled,
//! and the result of a read is written back with [`complete_read`] before
//! the next KVM_RUN, which is when KVM delivers it to the guest.

use kvm_bindings::{kvm_run, KVM_EXIT_IO, KVM_EXIT_MMIO, KVM_EXIT_X86_RDMSR};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::errno;

/// One vCPU exit, with what it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `in` (or `rep ins`: `count` accesses) of `size` bytes from `port`.
    IoIn {
        port: u16,
        size: usize,
        count: usize,
    },
    /// `out` (or `rep outs`) of `data`, `size` bytes per access.
    IoOut {
        port: u16,
        size: usize,
        data: Vec<u8>,
    },
    MmioRead {
        addr: u64,
        len: usize,
    },
    MmioWrite {
        addr: u64,
        data: Vec<u8>,
    },
    Hlt,
    /// The guest can take an interrupt now: KVM exits so at the first
    /// instruction boundary where IF=1 and no interrupt shadow, when the
    /// VMM asked with [`request_interrupt_window`].
    InterruptWindowOpen,
    Shutdown,
    FailEntry {
        reason: u64,
    },
    InternalError,
    /// A read of an MSR KVM's filter sends to userspace (the time MSRs).
    RdMsr {
        index: u32,
    },
    /// Anything twinvm never asks for, described.
    Other(String),
}

/// Enter the guest until its next exit. EINTR (a kick) comes back as Err.
pub fn run(vcpu: &mut VcpuFd) -> Result<Exit, errno::Error> {
    let exit = match vcpu.run()? {
        VcpuExit::IoIn(port, _) => Exit::IoIn {
            port,
            size: 0,
            count: 0,
        },
        VcpuExit::IoOut(port, data) => Exit::IoOut {
            port,
            size: 0,
            data: data.to_vec(),
        },
        VcpuExit::MmioRead(addr, data) => Exit::MmioRead {
            addr,
            len: data.len(),
        },
        VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite {
            addr,
            data: data.to_vec(),
        },
        VcpuExit::Hlt => Exit::Hlt,
        VcpuExit::IrqWindowOpen => Exit::InterruptWindowOpen,
        VcpuExit::Shutdown => Exit::Shutdown,
        VcpuExit::FailEntry(reason, _) => Exit::FailEntry { reason },
        VcpuExit::InternalError => Exit::InternalError,
        VcpuExit::X86Rdmsr(msr) => Exit::RdMsr { index: msr.index },
        other => Exit::Other(format!("{other:?}")),
    };
    // Port I/O: the access size and repeat count (`rep ins/outs`), read
    // once the exit no longer borrows the vCPU.
    Ok(match exit {
        Exit::IoIn { port, .. } => {
            let (size, count) = io_shape(vcpu);
            Exit::IoIn { port, size, count }
        }
        Exit::IoOut { port, data, .. } => {
            let (size, _) = io_shape(vcpu);
            Exit::IoOut { port, size, data }
        }
        other => other,
    })
}

/// Ask KVM (or stop asking) to exit with [`Exit::InterruptWindowOpen`] as
/// soon as the guest can take an interrupt; KVM reads the request at every
/// KVM_RUN until it is changed.
pub fn request_interrupt_window(vcpu: &mut VcpuFd, on: bool) {
    vcpu.get_kvm_run().request_interrupt_window = u8::from(on);
}

/// Size and count of the port-I/O exit just reported.
fn io_shape(vcpu: &mut VcpuFd) -> (usize, usize) {
    let run: &mut kvm_run = vcpu.get_kvm_run();
    // SAFETY: called right after KVM_RUN reported KVM_EXIT_IO, when the
    // kernel filled the `io` member of the union.
    let io = unsafe { run.__bindgen_anon_1.io };
    (usize::from(io.size), io.count as usize)
}

/// Why a read's result could not be handed back.
#[derive(Debug, thiserror::Error)]
pub enum CompleteError {
    #[error("the last exit (reason {0}) is not a read that takes a value")]
    NotARead(u32),
    #[error("{given} bytes for a read of {expected}")]
    Size { given: usize, expected: usize },
}

/// Give the guest the value of the read it exited for (an `in`, MMIO read
/// or RDMSR); KVM puts it in the register at the next KVM_RUN.
pub fn complete_read(vcpu: &mut VcpuFd, value: &[u8]) -> Result<(), CompleteError> {
    let run: &mut kvm_run = vcpu.get_kvm_run();
    match run.exit_reason {
        KVM_EXIT_IO => {
            // SAFETY: the exit reason says the `io` member is the live one.
            let io = unsafe { run.__bindgen_anon_1.io };
            let expected = usize::from(io.size) * io.count as usize;
            if value.len() != expected || u32::from(io.direction) != kvm_bindings::KVM_EXIT_IO_IN {
                return Err(CompleteError::Size {
                    given: value.len(),
                    expected,
                });
            }
            let base = (run as *mut kvm_run).cast::<u8>();
            // SAFETY: the kernel put the data area `data_offset` bytes into
            // the vCPU's kvm_run mapping, which is mapped in full for the
            // vCPU's lifetime (kvm-ioctls slices the same area for the exit);
            // `expected` is the area's size as the kernel reported it, and
            // no other reference to it is alive (the exit was copied out).
            unsafe {
                let data = base.add(io.data_offset as usize);
                std::ptr::copy_nonoverlapping(value.as_ptr(), data, expected);
            }
            Ok(())
        }
        KVM_EXIT_MMIO => {
            // SAFETY: the exit reason says the `mmio` member is the live one.
            let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
            let len = mmio.len as usize;
            if value.len() != len || len > mmio.data.len() || mmio.is_write != 0 {
                return Err(CompleteError::Size {
                    given: value.len(),
                    expected: len,
                });
            }
            mmio.data[..len].copy_from_slice(value);
            Ok(())
        }
        KVM_EXIT_X86_RDMSR => {
            // SAFETY: the exit reason says the `msr` member is the live one.
            let msr = unsafe { &mut run.__bindgen_anon_1.msr };
            let bytes: [u8; 8] = value.try_into().map_err(|_| CompleteError::Size {
                given: value.len(),
                expected: 8,
            })?;
            msr.data = u64::from_le_bytes(bytes);
            msr.error = 0;
            Ok(())
        }
        other => Err(CompleteError::NotARead(other)),
    }
}
