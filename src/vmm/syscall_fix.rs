//! Completing `syscall`/`sysret` privilege switches the host leaves undone.
//!
//! Measured on the development hosts (guest kernel mode run by KVM's
//! emulator, user mode native): `syscall` at CPL3 saves RCX/R11, masks
//! RFLAGS and jumps to LSTAR, but stays at CPL3 with the user CS/SS. Linux's
//! `entry_SYSCALL_64` lives on a supervisor page, so the very first fetch
//! takes a #PF delivered inside the guest, and the process dies with SIGSEGV:
//! no user program could ever make a system call.
//!
//! The #PF never reaches the VMM, so twinvm plants a trap where it will:
//! 1. at emulation failures (plentiful while a kernel boots, and at the same
//!    instructions on every replica) twinvm reads IDT gate 14 and, once it
//!    points at a handler starting with a NOP-class instruction (Linux's
//!    `ASM_CLAC` slot, or ENDBR64 — never the early boot handlers), replaces
//!    that instruction's first byte with `int3`; it checks again now and then,
//!    since alternatives patching may rewrite those bytes (NOP to CLAC);
//! 2. on that trap, if the hardware frame says "user mode, RIP = LSTAR", it
//!    was a syscall that did not switch privilege: twinvm completes it
//!    (CS/SS from IA32_STAR, RIP = LSTAR, RSP and RFLAGS as the syscall left
//!    them) and drops the frame; otherwise it performs the replaced NOP and
//!    the guest handles its page fault (LSTAR and STAR are read from KVM);
//! 3. a `sysretq` at CPL0 that KVM's emulator gives up on is completed from
//!    RCX, R11 and IA32_STAR.
//!
//! Every step is a deterministic function of guest state, so primary and
//! backup apply it identically. The decisions are pure functions below;
//! [`SyscallFix`] applies them to the vCPU.

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use kvm_bindings::kvm_segment;

use super::emulate::{EmulateError, GuestCpu};
use super::guest_cpu::KvmGuestCpu;
use super::vm::{GuestWrite, Vm};

pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;

const RFLAGS_AC: u64 = 1 << 18;
const RFLAGS_RF: u64 = 1 << 16;
const PF_VECTOR: u64 = 14;

/// The hardware frame of an exception with an error code, as pushed on the
/// kernel stack (lowest address first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExceptionFrame {
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl ExceptionFrame {
    pub fn parse(bytes: &[u8; 48]) -> Self {
        let q = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        ExceptionFrame {
            error_code: q(0),
            rip: q(1),
            cs: q(2),
            rflags: q(3),
            rsp: q(4),
            ss: q(5),
        }
    }

    /// A user-mode fault on fetching the syscall entry itself: a `syscall`
    /// that stayed at CPL3.
    pub fn is_unswitched_syscall(&self, lstar: u64) -> bool {
        self.rip == lstar && self.cs & 3 == 3
    }
}

/// Handler address in a 64-bit IDT gate (16 bytes).
pub fn gate_target(gate: &[u8; 16]) -> u64 {
    let lo = u64::from(u16::from_le_bytes([gate[0], gate[1]]));
    let mid = u64::from(u16::from_le_bytes([gate[6], gate[7]]));
    let hi = u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]));
    lo | (mid << 16) | (hi << 32)
}

/// What the first instruction of the #PF entry is, if it can be replaced by
/// a trap and performed by the VMM: its length, and whether it is CLAC.
pub fn replaceable_entry(code: &[u8], addr: u64) -> Option<(u64, bool)> {
    let insn = Decoder::with_ip(64, code, addr, DecoderOptions::NONE).decode();
    match insn.mnemonic() {
        Mnemonic::Nop | Mnemonic::Endbr64 => Some((insn.len() as u64, false)),
        Mnemonic::Clac => Some((insn.len() as u64, true)),
        _ => None,
    }
}

fn code_segment(selector: u16, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: 0xb,
        present: 1,
        dpl,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn data_segment(selector: u16, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: 0x3,
        present: 1,
        dpl,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Kernel CS and SS selectors `syscall` loads from IA32_STAR.
pub fn syscall_segments(star: u64) -> (kvm_segment, kvm_segment) {
    let base = ((star >> 32) & 0xfffc) as u16;
    (code_segment(base, 0), data_segment(base + 8, 0))
}

/// User CS and SS selectors `sysretq` loads from IA32_STAR.
pub fn sysret_segments(star: u64) -> (kvm_segment, kvm_segment) {
    let base = ((star >> 48) & 0xffff) as u16;
    (
        code_segment((base + 16) | 3, 3),
        data_segment((base + 8) | 3, 3),
    )
}

/// RFLAGS after `sysret`: R11 with RF, VM and reserved bits cleared, bit 1 set.
pub fn sysret_rflags(r11: u64) -> u64 {
    (r11 & 0x3c_7fd7) | 2
}

/// The planted trap at the #PF entry.
#[derive(Debug, Clone, Copy)]
struct EntryTrap {
    addr: u64,
    replaced_len: u64,
    replaced_clac: bool,
}

/// State of the syscall fix for one VM.
#[derive(Debug, Default)]
pub struct SyscallFix {
    entry_trap: Option<EntryTrap>,
    failures_seen: u64,
}

/// Why the fix could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum SyscallFixError {
    #[error("syscall fix: KVM {0}: {1}")]
    Kvm(&'static str, vmm_sys_util::errno::Error),
    #[error("syscall fix: guest address {0:#x} is not mapped")]
    Unmapped(u64),
    #[error("syscall fix: KVM does not let MSR {0:#x} be read")]
    UnreadableMsr(u32),
    #[error("syscall fix: saved state of {0} bytes is malformed (from a sync point)")]
    BadState(usize),
    #[error("syscall fix: {0}")]
    Guest(#[from] EmulateError),
}

fn kvm(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> SyscallFixError {
    move |e| SyscallFixError::Kvm(what, e)
}

fn read_virt(vm: &Vm, gva: u64, buf: &mut [u8]) -> Result<(), SyscallFixError> {
    Ok(KvmGuestCpu { vm }.read_virt(gva, buf)?)
}

fn read_msr(vm: &Vm, index: u32) -> Result<u64, SyscallFixError> {
    super::vm::read_msr(&vm.vcpu, index)
        .map_err(kvm("get MSR"))?
        .ok_or(SyscallFixError::UnreadableMsr(index))
}

impl SyscallFix {
    /// Emulation failures between checks of the planted trap once it is in.
    const RECHECK_EVERY: u64 = 256;

    /// Size of [`SyscallFix::save`]'s output.
    pub const STATE_BYTES: usize = 26;

    /// The state a backup needs when it loads a sync point instead of
    /// executing to it: the primary may have planted the trap, or counted
    /// failures, in between. Layout (little-endian): u64 failures seen,
    /// u8 planted (0/1), u64 trap address, u64 replaced length, u8 clac.
    pub fn save(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::STATE_BYTES);
        b.extend_from_slice(&self.failures_seen.to_le_bytes());
        let trap = self.entry_trap.unwrap_or(EntryTrap {
            addr: 0,
            replaced_len: 0,
            replaced_clac: false,
        });
        b.push(u8::from(self.entry_trap.is_some()));
        b.extend_from_slice(&trap.addr.to_le_bytes());
        b.extend_from_slice(&trap.replaced_len.to_le_bytes());
        b.push(u8::from(trap.replaced_clac));
        b
    }

    /// Load what [`SyscallFix::save`] wrote.
    pub fn restore(&mut self, b: &[u8]) -> Result<(), SyscallFixError> {
        if b.len() != Self::STATE_BYTES || b[8] > 1 || b[25] > 1 {
            return Err(SyscallFixError::BadState(b.len()));
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        self.failures_seen = u64_at(0);
        self.entry_trap = (b[8] == 1).then(|| EntryTrap {
            addr: u64_at(9),
            replaced_len: u64_at(17),
            replaced_clac: b[25] == 1,
        });
        Ok(())
    }

    /// Called at every emulation failure: plant the #PF-entry trap if the
    /// guest has a suitable handler and the trap is not (still) there.
    pub fn ensure_planted(&mut self, vm: &Vm) -> Result<(), SyscallFixError> {
        self.failures_seen += 1;
        if self.entry_trap.is_some() && self.failures_seen % Self::RECHECK_EVERY != 0 {
            return Ok(());
        }
        let sregs = vm.vcpu.get_sregs().map_err(kvm("get sregs"))?;
        const EFER_LMA: u64 = 1 << 10;
        if sregs.efer & EFER_LMA == 0 || u64::from(sregs.idt.limit) < PF_VECTOR * 16 + 15 {
            return Ok(());
        }
        let mut gate = [0u8; 16];
        if read_virt(vm, sregs.idt.base + PF_VECTOR * 16, &mut gate).is_err() {
            return Ok(());
        }
        let entry = gate_target(&gate);
        let mut code = [0u8; 15];
        if read_virt(vm, entry, &mut code).is_err() {
            return Ok(());
        }
        if code[0] == 0xcc && self.entry_trap.is_some_and(|t| t.addr == entry) {
            return Ok(());
        }
        let Some((replaced_len, replaced_clac)) = replaceable_entry(&code, entry) else {
            // An early boot handler, or not Linux: nothing to plant (yet).
            return Ok(());
        };
        let t = vm.vcpu.translate_gva(entry).map_err(kvm("translate"))?;
        vm.write_guest(t.physical_address, &[0xcc], GuestWrite::Vmm)
            .map_err(|_| SyscallFixError::Unmapped(entry))?;
        tracing::info!(
            entry = format_args!("{entry:#x}"),
            "syscall fix: trap planted on the #PF entry"
        );
        self.entry_trap = Some(EntryTrap {
            addr: entry,
            replaced_len,
            replaced_clac,
        });
        Ok(())
    }

    /// Handle an int3 emulation failure at `rip` if it is the #PF entry
    /// trap. Returns whether it was.
    pub fn on_trap(&self, vm: &Vm, rip: u64) -> Result<bool, SyscallFixError> {
        let Some(trap) = self.entry_trap.filter(|t| t.addr == rip) else {
            return Ok(false);
        };
        let mut regs = vm.vcpu.get_regs().map_err(kvm("get regs"))?;
        let mut raw = [0u8; 48];
        read_virt(vm, regs.rsp, &mut raw)?;
        let frame = ExceptionFrame::parse(&raw);
        let lstar = read_msr(vm, MSR_LSTAR)?;
        match frame.is_unswitched_syscall(lstar) {
            true => {
                let mut sregs = vm.vcpu.get_sregs().map_err(kvm("get sregs"))?;
                (sregs.cs, sregs.ss) = syscall_segments(read_msr(vm, MSR_STAR)?);
                regs.rip = lstar;
                regs.rsp = frame.rsp;
                // As the syscall left them (FMASK applied), less RF, which
                // the #PF delivery set and SYSCALL clears.
                regs.rflags = frame.rflags & !RFLAGS_RF;
                vm.vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;
            }
            false => {
                // A real page fault: perform the replaced instruction.
                regs.rip = trap.addr + trap.replaced_len;
                if trap.replaced_clac {
                    regs.rflags &= !RFLAGS_AC;
                }
            }
        }
        vm.vcpu.set_regs(&regs).map_err(kvm("set regs"))?;
        Ok(true)
    }

    /// Complete a `sysretq` at CPL0 that KVM's emulator gave up on. Returns
    /// whether `bytes` was one.
    pub fn on_sysret(&self, vm: &Vm, bytes: &[u8]) -> Result<bool, SyscallFixError> {
        if !bytes.starts_with(&[0x48, 0x0f, 0x07]) {
            return Ok(false);
        }
        let mut sregs = vm.vcpu.get_sregs().map_err(kvm("get sregs"))?;
        if sregs.cs.dpl != 0 {
            return Ok(false);
        }
        let mut regs = vm.vcpu.get_regs().map_err(kvm("get regs"))?;
        (sregs.cs, sregs.ss) = sysret_segments(read_msr(vm, MSR_STAR)?);
        regs.rip = regs.rcx;
        regs.rflags = sysret_rflags(regs.r11);
        vm.vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;
        vm.vcpu.set_regs(&regs).map_err(kvm("set regs"))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_for_sync_points_round_trips_and_rejects_garbage() {
        let mut fix = SyscallFix {
            entry_trap: Some(EntryTrap {
                addr: 0xffff_ffff_8160_0a30,
                replaced_len: 3,
                replaced_clac: true,
            }),
            failures_seen: 513,
        };
        let saved = fix.save();
        assert_eq!(saved.len(), SyscallFix::STATE_BYTES);
        let mut other = SyscallFix::default();
        other.restore(&saved).unwrap();
        assert_eq!(other.save(), saved);
        // An unplanted fix restores to unplanted.
        fix.restore(&SyscallFix::default().save()).unwrap();
        assert!(fix.entry_trap.is_none());
        assert_eq!(fix.failures_seen, 0);
        assert!(matches!(
            other.restore(&saved[..10]),
            Err(SyscallFixError::BadState(10))
        ));
        let mut bad_flag = saved.clone();
        bad_flag[8] = 7;
        assert!(other.restore(&bad_flag).is_err());
    }

    #[test]
    fn gate_targets_assemble_all_three_offset_parts() {
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&0x1234u16.to_le_bytes());
        gate[6..8].copy_from_slice(&0x8100u16.to_le_bytes());
        gate[8..12].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
        assert_eq!(gate_target(&gate), 0xffff_ffff_8100_1234);
    }

    #[test]
    fn only_nop_class_entries_are_replaced() {
        assert_eq!(
            replaceable_entry(&[0x0f, 0x1f, 0x00, 0x48], 0),
            Some((3, false))
        );
        assert_eq!(replaceable_entry(&[0x0f, 0x01, 0xca], 0), Some((3, true)));
        assert_eq!(
            replaceable_entry(&[0xf3, 0x0f, 0x1e, 0xfa], 0),
            Some((4, false))
        );
        assert_eq!(replaceable_entry(&[0x90], 0), Some((1, false)));
        assert_eq!(
            replaceable_entry(&[0x55], 0),
            None,
            "push rbp must not be skipped"
        );
    }

    #[test]
    fn the_unswitched_syscall_is_told_from_real_faults() {
        let mut raw = [0u8; 48];
        for (i, v) in [
            4u64,
            0xffff_ffff_81c0_0000,
            0x33,
            0x10002,
            0x7fff_8938_9790,
            0x2b,
        ]
        .iter()
        .enumerate()
        {
            raw[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        let frame = ExceptionFrame::parse(&raw);
        assert!(frame.is_unswitched_syscall(0xffff_ffff_81c0_0000));
        assert!(!frame.is_unswitched_syscall(0xffff_ffff_81c0_0040));
        let kernel = ExceptionFrame { cs: 0x10, ..frame };
        assert!(!kernel.is_unswitched_syscall(0xffff_ffff_81c0_0000));
    }

    #[test]
    fn selectors_follow_star_as_linux_programs_it() {
        // Linux: STAR = (__USER32_CS << 48) | (__KERNEL_CS << 32)
        let star = (0x23u64 << 48) | (0x10u64 << 32);
        let (cs, ss) = syscall_segments(star);
        assert_eq!((cs.selector, cs.dpl, cs.l), (0x10, 0, 1));
        assert_eq!((ss.selector, ss.dpl), (0x18, 0));
        let (cs, ss) = sysret_segments(star);
        assert_eq!((cs.selector, cs.dpl, cs.l), (0x33, 3, 1));
        assert_eq!((ss.selector, ss.dpl), (0x2b, 3));
        assert_eq!(sysret_rflags(0x246 | (1 << 16) | (1 << 17)), 0x246);
    }
}
