//! The interrupted vCPU and its memory, as the emulation fallback sees them.

use iced_x86::Register;
use kvm_bindings::{kvm_fpu, kvm_regs};
use vm_memory::{Bytes, GuestAddress};

use super::emulate::{EmulateError, GuestCpu};
use super::vm::{GuestWrite, Vm};

fn vcpu_err(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> EmulateError {
    move |e| EmulateError::Vcpu(format!("{what}: {e}"))
}

/// The vCPU and its memory as the emulation fallback sees them.
pub struct KvmGuestCpu<'a> {
    pub vm: &'a Vm,
}

impl KvmGuestCpu<'_> {
    /// KVM's translation of `gva` through the guest's page tables, if mapped.
    fn translation(&self, gva: u64) -> Result<kvm_bindings::kvm_translation, EmulateError> {
        let t = self
            .vm
            .vcpu
            .translate_gva(gva)
            .map_err(|e| EmulateError::Vcpu(format!("translate {gva:#x}: {e}")))?;
        if t.valid == 0 {
            return Err(EmulateError::Unmapped(gva));
        }
        Ok(t)
    }

    fn translate(&self, gva: u64) -> Result<u64, EmulateError> {
        Ok(self.translation(gva)?.physical_address)
    }

    /// Visit `len` bytes at `gva` page by page as (guest physical, offset, size).
    fn for_each_page(
        &self,
        gva: u64,
        len: usize,
        mut f: impl FnMut(u64, usize, usize) -> Result<(), EmulateError>,
    ) -> Result<(), EmulateError> {
        let mut done = 0;
        while done < len {
            let addr = gva + done as u64;
            let in_page = (0x1000 - (addr & 0xfff)) as usize;
            let size = in_page.min(len - done);
            f(self.translate(addr)?, done, size)?;
            done += size;
        }
        Ok(())
    }
}

impl GuestCpu for KvmGuestCpu<'_> {
    fn regs(&mut self) -> Result<kvm_regs, EmulateError> {
        self.vm.vcpu.get_regs().map_err(vcpu_err("get regs"))
    }
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), EmulateError> {
        self.vm.vcpu.set_regs(regs).map_err(vcpu_err("set regs"))
    }
    fn fpu(&mut self) -> Result<kvm_fpu, EmulateError> {
        self.vm.vcpu.get_fpu().map_err(vcpu_err("get FPU"))
    }
    fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<(), EmulateError> {
        self.vm.vcpu.set_fpu(fpu).map_err(vcpu_err("set FPU"))
    }
    fn segment_base(&mut self, seg: Register) -> Result<u64, EmulateError> {
        let sregs = self.vm.vcpu.get_sregs().map_err(vcpu_err("get sregs"))?;
        Ok(match seg {
            Register::FS => sregs.fs.base,
            Register::GS => sregs.gs.base,
            _ => 0,
        })
    }
    fn read_virt(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
        let mem = &self.vm.mem;
        self.for_each_page(gva, buf.len(), |gpa, off, size| {
            mem.read_slice(&mut buf[off..off + size], GuestAddress(gpa))
                .map_err(|_| EmulateError::Unmapped(gva))
        })
    }
    fn is_writable(&mut self, gva: u64) -> Result<bool, EmulateError> {
        Ok(self.translation(gva)?.writeable != 0)
    }
    fn write_virt(&mut self, gva: u64, data: &[u8]) -> Result<(), EmulateError> {
        let vm = self.vm;
        self.for_each_page(gva, data.len(), |gpa, off, size| {
            vm.write_guest(gpa, &data[off..off + size], GuestWrite::Vmm)
                .map_err(|_| EmulateError::Unmapped(gva))
        })
    }
}
