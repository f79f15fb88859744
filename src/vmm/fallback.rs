//! The KVM side of the emulation fallback: read the failing instruction's
//! bytes from the exit, run `emulate`, reflect an exception into the vCPU.

use super::emulate::{self, EmulateError, Emulated, RandomRequest};
use super::guest_cpu::KvmGuestCpu;
use super::sys;
use super::vm::{Vm, VmError};

/// What the general fallback did with an emulation failure.
pub enum Fallback {
    Performed,
    ExceptionInjected,
    /// RDRAND/RDSEED: the engine supplies the value at a landmark.
    NeedsRandom(RandomRequest),
}

/// Why the fallback could not finish an instruction.
#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    #[error(transparent)]
    Emulation(#[from] EmulateError),
    /// An internal error from KVM that is not an emulation failure.
    #[error("KVM internal error, sub-error {suberror}, data {data:x?}, at RIP {rip:#x}")]
    Internal {
        suberror: u32,
        data: Vec<u64>,
        rip: u64,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("KVM get regs: {0}")]
    Regs(vmm_sys_util::errno::Error),
}

/// Finish an instruction KVM's emulator gave up on, or reflect the exception
/// the guest must take.
pub fn emulation_fallback(vm: &mut Vm) -> Result<Fallback, FallbackError> {
    let info = sys::internal_error(&mut vm.vcpu);
    let rip = vm.vcpu.get_regs().map_err(FallbackError::Regs)?.rip;
    if info.suberror != sys::KVM_INTERNAL_ERROR_EMULATION {
        return Err(FallbackError::Internal {
            suberror: info.suberror,
            data: info.data,
            rip,
        });
    }
    let mut cpu = KvmGuestCpu { vm };
    let bytes = match info.instruction_bytes() {
        Some(bytes) => bytes,
        None => {
            // Older KVMs do not report the bytes: fetch them at RIP.
            let mut buf = [0u8; 15];
            emulate::GuestCpu::read_virt(&mut cpu, rip, &mut buf)?;
            buf.to_vec()
        }
    };
    match emulate::emulate(&mut cpu, &bytes)? {
        Emulated::Performed => Ok(Fallback::Performed),
        Emulated::Exception { vector, error_code } => {
            tracing::trace!("reflecting exception {vector} to the guest at RIP {rip:#x}");
            vm.inject_exception(vector, error_code)?;
            Ok(Fallback::ExceptionInjected)
        }
        Emulated::NeedsRandom(request) => Ok(Fallback::NeedsRandom(request)),
    }
}
