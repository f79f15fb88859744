//! Userspace fallback for instructions KVM's emulator gives up on.
//!
//! On hosts where guest kernel code runs through KVM's instruction emulator
//! (see host-notes.md), some instructions end KVM_RUN with an emulation
//! failure. Here they are decoded with iced-x86; the cheap, known cases are
//! performed directly or turned into the exception the guest expects, and
//! everything else runs in Unicorn (`unicorn.rs`) against the vCPU's
//! registers, SSE state and guest memory. What Unicorn must not run (host
//! time or entropy, system state it does not model) is an error naming the
//! RIP, the bytes, their disassembly and the reason.
//!
//! Sans-IO: the vCPU is reached through [`GuestCpu`], so this is unit-tested
//! without KVM.

use iced_x86::{
    Decoder, DecoderError, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic,
    OpKind, Register,
};
use kvm_bindings::{kvm_fpu, kvm_regs};
use thiserror::Error;

/// Access to the interrupted vCPU that the fallback needs.
pub trait GuestCpu {
    fn regs(&mut self) -> Result<kvm_regs, EmulateError>;
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), EmulateError>;
    fn fpu(&mut self) -> Result<kvm_fpu, EmulateError>;
    fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<(), EmulateError>;
    /// Base of a segment register (only FS and GS are non-zero in 64-bit mode).
    fn segment_base(&mut self, seg: Register) -> Result<u64, EmulateError>;
    /// Read guest memory at a virtual address through the guest's page tables.
    fn read_virt(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), EmulateError>;
    fn write_virt(&mut self, gva: u64, data: &[u8]) -> Result<(), EmulateError>;
    /// Whether the guest's page tables allow kernel writes to the page of `gva`.
    fn is_writable(&mut self, gva: u64) -> Result<bool, EmulateError>;
}

/// What the fallback did with the instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulated {
    /// Performed; RIP now points past it.
    Performed,
    /// The guest must take this exception (RIP already set as the CPU would:
    /// after the instruction for traps such as #BP, at it for faults).
    Exception { vector: u8, error_code: Option<u32> },
    /// RDRAND/RDSEED: nothing done yet. The caller draws (primary) or takes
    /// from the log (backup) a value and finishes with [`complete_random`].
    NeedsRandom(RandomRequest),
}

/// A RDRAND/RDSEED waiting for its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RandomRequest {
    /// Destination register (its size is the operand size).
    pub dest: Register,
    /// RDSEED (full-entropy seed) rather than RDRAND.
    pub seed: bool,
    /// RIP after the instruction.
    pub next_rip: u64,
}

/// Finish a RDRAND/RDSEED with `value`: the destination gets the value cut
/// to its size, CF=1 ("valid random number") and the other arithmetic flags
/// clear, as the CPU does.
pub fn complete_random(
    cpu: &mut impl GuestCpu,
    request: RandomRequest,
    value: u64,
) -> Result<(), EmulateError> {
    let mut regs = cpu.regs()?;
    write_gpr(&mut regs, request.dest, value);
    regs.rflags = (regs.rflags & !ARITH_FLAGS) | FLAG_CF;
    regs.rip = request.next_rip;
    cpu.set_regs(&regs)
}

/// Why the fallback could not go on.
#[derive(Debug, Error)]
pub enum EmulateError {
    /// An instruction the fallback does not implement.
    #[error("unhandled emulation failure at RIP {rip:#x}: bytes [{bytes}] = `{disasm}`{why}")]
    Unhandled {
        rip: u64,
        bytes: String,
        disasm: String,
        /// Why the fallback refused it (empty, or "; " and the reason).
        why: String,
    },
    /// Reading or writing vCPU state failed.
    #[error("vCPU state access for emulation: {0}")]
    Vcpu(String),
    /// A guest virtual address with no mapping (reported to the guest as #PF
    /// by real hardware; the fallback stops instead, as this is unexpected).
    #[error("guest virtual address {0:#x} is not mapped")]
    Unmapped(u64),
}

const FLAG_CF: u64 = 1 << 0;
const FLAG_PF: u64 = 1 << 2;
const FLAG_AF: u64 = 1 << 4;
const FLAG_ZF: u64 = 1 << 6;
const FLAG_SF: u64 = 1 << 7;
const FLAG_OF: u64 = 1 << 11;
const ARITH_FLAGS: u64 = FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF;

/// Exception vectors the fallback raises.
pub const VECTOR_BP: u8 = 3;
pub const VECTOR_UD: u8 = 6;
pub const VECTOR_GP: u8 = 13;

/// Decode `bytes` (fetched at `rip`, 64-bit mode); the error tells an
/// undefined opcode from bytes that ran out.
pub fn decode(rip: u64, bytes: &[u8]) -> (Instruction, DecoderError) {
    let mut decoder = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    (insn, decoder.last_error())
}

/// Intel-syntax text of an instruction, for error messages and logs.
pub fn disassemble(insn: &Instruction) -> String {
    let mut out = String::new();
    IntelFormatter::new().format(insn, &mut out);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Perform or reflect the instruction at `regs.rip` whose bytes KVM reported.
pub fn emulate(cpu: &mut impl GuestCpu, bytes: &[u8]) -> Result<Emulated, EmulateError> {
    let mut regs = cpu.regs()?;
    let rip = regs.rip;
    let (insn, decode_error) = decode(rip, bytes);
    let shown = if insn.is_invalid() {
        bytes.len()
    } else {
        insn.len()
    };
    let unhandled_because = |why: &str| EmulateError::Unhandled {
        rip,
        bytes: hex(&bytes[..shown.min(bytes.len())]),
        disasm: disassemble(&insn),
        why: if why.is_empty() {
            String::new()
        } else {
            format!("; not run in Unicorn: {why}")
        },
    };
    let unhandled = || unhandled_because("");
    match decode_error {
        DecoderError::None => {}
        // An undefined opcode: the CPU raises #UD with RIP at it.
        DecoderError::InvalidInstruction => {
            return Ok(Emulated::Exception {
                vector: VECTOR_UD,
                error_code: None,
            })
        }
        _ => return Err(unhandled()),
    }
    let next = insn.next_ip();
    let outcome = match insn.mnemonic() {
        Mnemonic::Int3 => {
            // A trap: the guest's #BP handler sees RIP after the int3.
            regs.rip = next;
            cpu.set_regs(&regs)?;
            Emulated::Exception {
                vector: VECTOR_BP,
                error_code: None,
            }
        }
        Mnemonic::Ud2 => Emulated::Exception {
            vector: VECTOR_UD,
            error_code: None,
        },
        Mnemonic::Wait | Mnemonic::Pause | Mnemonic::Nop => {
            // No pending x87 exceptions are ever raised by this fallback, so
            // FWAIT completes at once.
            regs.rip = next;
            cpu.set_regs(&regs)?;
            Emulated::Performed
        }
        Mnemonic::Popcnt => {
            let size = operand_size(&insn, 0);
            let src = read_operand(cpu, &regs, &insn, 1, size)?;
            let count = u64::from(src.count_ones());
            write_gpr(&mut regs, insn.op0_register(), count);
            regs.rflags &= !ARITH_FLAGS;
            if src == 0 {
                regs.rflags |= FLAG_ZF;
            }
            regs.rip = next;
            cpu.set_regs(&regs)?;
            Emulated::Performed
        }
        Mnemonic::Rdrand | Mnemonic::Rdseed => Emulated::NeedsRandom(RandomRequest {
            dest: insn.op0_register(),
            seed: insn.mnemonic() == Mnemonic::Rdseed,
            next_rip: next,
        }),
        Mnemonic::Ldmxcsr => {
            let addr = memory_address(cpu, &regs, &insn, 0)?;
            let mut buf = [0u8; 4];
            cpu.read_virt(addr, &mut buf)?;
            let value = u32::from_le_bytes(buf);
            // Reserved bits set: #GP(0), as the CPU does.
            if value & 0xffff_0000 != 0 {
                return Ok(Emulated::Exception {
                    vector: VECTOR_GP,
                    error_code: Some(0),
                });
            }
            let mut fpu = cpu.fpu()?;
            fpu.mxcsr = value;
            cpu.set_fpu(&fpu)?;
            regs.rip = next;
            cpu.set_regs(&regs)?;
            Emulated::Performed
        }
        Mnemonic::Stmxcsr => {
            let addr = memory_address(cpu, &regs, &insn, 0)?;
            let fpu = cpu.fpu()?;
            cpu.write_virt(addr, &fpu.mxcsr.to_le_bytes())?;
            regs.rip = next;
            cpu.set_regs(&regs)?;
            Emulated::Performed
        }
        // Everything else runs in Unicorn, unless its result would depend on
        // the host or on state Unicorn does not model.
        _ => match super::unicorn::check_runnable(&insn) {
            Some(why) => return Err(unhandled_because(why)),
            None => super::unicorn::execute(cpu, &regs, &insn)?,
        },
    };
    Ok(outcome)
}

fn operand_size(insn: &Instruction, op: u32) -> usize {
    match insn.op_kind(op) {
        OpKind::Register => insn.op_register(op).size(),
        _ => insn.memory_size().size(),
    }
}

fn read_operand(
    cpu: &mut impl GuestCpu,
    regs: &kvm_regs,
    insn: &Instruction,
    op: u32,
    size: usize,
) -> Result<u64, EmulateError> {
    match insn.op_kind(op) {
        OpKind::Register => Ok(read_gpr(regs, insn.op_register(op))),
        OpKind::Memory => {
            let addr = memory_address(cpu, regs, insn, op)?;
            let mut buf = [0u8; 8];
            cpu.read_virt(addr, &mut buf[..size])?;
            Ok(u64::from_le_bytes(buf))
        }
        _ => Err(EmulateError::Unhandled {
            rip: regs.rip,
            bytes: String::new(),
            disasm: disassemble(insn),
            why: String::new(),
        }),
    }
}

fn memory_address(
    cpu: &mut impl GuestCpu,
    regs: &kvm_regs,
    insn: &Instruction,
    op: u32,
) -> Result<u64, EmulateError> {
    let seg = insn.memory_segment();
    let seg_base = if matches!(seg, Register::FS | Register::GS) {
        cpu.segment_base(seg)?
    } else {
        0
    };
    insn.virtual_address(op, 0, |reg, _, _| match reg {
        Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
        Register::FS | Register::GS => Some(seg_base),
        Register::RIP => Some(insn.next_ip()),
        r if r.is_gpr() => Some(read_gpr(regs, r)),
        _ => None,
    })
    .ok_or_else(|| EmulateError::Unhandled {
        rip: regs.rip,
        bytes: String::new(),
        disasm: disassemble(insn),
        why: String::new(),
    })
}

fn gpr_slot(regs: &mut kvm_regs, full: Register) -> &mut u64 {
    match full {
        Register::RAX => &mut regs.rax,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RBX => &mut regs.rbx,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

fn is_high_byte(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    )
}

/// Value of a general-purpose register of any width.
pub fn read_gpr(regs: &kvm_regs, reg: Register) -> u64 {
    let mut copy = *regs;
    let full = *gpr_slot(&mut copy, reg.full_register());
    match reg.size() {
        8 => full,
        4 => full & 0xffff_ffff,
        2 => full & 0xffff,
        _ if is_high_byte(reg) => (full >> 8) & 0xff,
        _ => full & 0xff,
    }
}

/// Write a general-purpose register as the CPU does: 32-bit writes zero the
/// upper half, 16- and 8-bit writes keep the rest.
pub fn write_gpr(regs: &mut kvm_regs, reg: Register, value: u64) {
    let high = is_high_byte(reg);
    let size = reg.size();
    let slot = gpr_slot(regs, reg.full_register());
    *slot = match size {
        8 => value,
        4 => value & 0xffff_ffff,
        2 => (*slot & !0xffff) | (value & 0xffff),
        _ if high => (*slot & !0xff00) | ((value & 0xff) << 8),
        _ => (*slot & !0xff) | (value & 0xff),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vCPU held in plain structs with a flat, identity-mapped memory.
    struct TestCpu {
        regs: kvm_regs,
        fpu: kvm_fpu,
        mem: Vec<u8>,
        fs_base: u64,
        /// Pages the guest's page tables map read-only.
        read_only: Vec<u64>,
    }

    impl TestCpu {
        fn new(rip: u64) -> Self {
            TestCpu {
                regs: kvm_regs {
                    rip,
                    rflags: 2,
                    ..Default::default()
                },
                fpu: kvm_fpu {
                    mxcsr: 0x1f80,
                    ..Default::default()
                },
                mem: vec![0; 0x10000],
                fs_base: 0,
                read_only: Vec::new(),
            }
        }
    }

    impl GuestCpu for TestCpu {
        fn regs(&mut self) -> Result<kvm_regs, EmulateError> {
            Ok(self.regs)
        }
        fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), EmulateError> {
            self.regs = *regs;
            Ok(())
        }
        fn fpu(&mut self) -> Result<kvm_fpu, EmulateError> {
            Ok(self.fpu)
        }
        fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<(), EmulateError> {
            self.fpu = *fpu;
            Ok(())
        }
        fn segment_base(&mut self, seg: Register) -> Result<u64, EmulateError> {
            Ok(if seg == Register::FS { self.fs_base } else { 0 })
        }
        fn read_virt(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
            let a = gva as usize;
            let src = self
                .mem
                .get(a..a + buf.len())
                .ok_or(EmulateError::Unmapped(gva))?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn is_writable(&mut self, gva: u64) -> Result<bool, EmulateError> {
            Ok(!self.read_only.contains(&(gva & !0xfff)))
        }
        fn write_virt(&mut self, gva: u64, data: &[u8]) -> Result<(), EmulateError> {
            let a = gva as usize;
            self.mem
                .get_mut(a..a + data.len())
                .ok_or(EmulateError::Unmapped(gva))?
                .copy_from_slice(data);
            Ok(())
        }
    }

    #[test]
    fn int3_becomes_a_breakpoint_trap_after_the_instruction() {
        let mut cpu = TestCpu::new(0x1000);
        assert_eq!(
            emulate(&mut cpu, &[0xcc]).unwrap(),
            Emulated::Exception {
                vector: VECTOR_BP,
                error_code: None
            }
        );
        assert_eq!(cpu.regs.rip, 0x1001);
    }

    #[test]
    fn ud2_faults_at_the_instruction() {
        let mut cpu = TestCpu::new(0x1000);
        assert_eq!(
            emulate(&mut cpu, &[0x0f, 0x0b]).unwrap(),
            Emulated::Exception {
                vector: VECTOR_UD,
                error_code: None
            }
        );
        assert_eq!(cpu.regs.rip, 0x1000);
    }

    #[test]
    fn popcnt_counts_and_sets_flags() {
        let mut cpu = TestCpu::new(0x1000);
        cpu.regs.rcx = 0xf0f0_0000_0000_0003;
        cpu.regs.rax = u64::MAX;
        cpu.regs.rflags = 2 | FLAG_CF | FLAG_ZF | FLAG_SF;
        // popcnt rax, rcx
        emulate(&mut cpu, &[0xf3, 0x48, 0x0f, 0xb8, 0xc1]).unwrap();
        assert_eq!(cpu.regs.rax, 10);
        assert_eq!(cpu.regs.rflags, 2);
        assert_eq!(cpu.regs.rip, 0x1005);
        // popcnt eax, ecx with ecx = 0: ZF, upper half of rax zeroed
        cpu.regs.rcx = 0xffff_ffff_0000_0000;
        cpu.regs.rax = u64::MAX;
        emulate(&mut cpu, &[0xf3, 0x0f, 0xb8, 0xc1]).unwrap();
        assert_eq!(cpu.regs.rax, 0);
        assert_eq!(cpu.regs.rflags, 2 | FLAG_ZF);
    }

    #[test]
    fn popcnt_reads_memory_operands() {
        let mut cpu = TestCpu::new(0x1000);
        cpu.regs.rbx = 0x2000;
        cpu.mem[0x2008..0x2010].copy_from_slice(&0xffu64.to_le_bytes());
        // popcnt rdx, [rbx+8]
        emulate(&mut cpu, &[0xf3, 0x48, 0x0f, 0xb8, 0x53, 0x08]).unwrap();
        assert_eq!(cpu.regs.rdx, 8);
    }

    #[test]
    fn ldmxcsr_and_stmxcsr_move_mxcsr_through_memory() {
        let mut cpu = TestCpu::new(0x1000);
        cpu.regs.rdi = 0x3000;
        cpu.mem[0x3000..0x3004].copy_from_slice(&0x9fc0u32.to_le_bytes());
        // ldmxcsr [rdi]
        emulate(&mut cpu, &[0x0f, 0xae, 0x17]).unwrap();
        assert_eq!(cpu.fpu.mxcsr, 0x9fc0);
        assert_eq!(cpu.regs.rip, 0x1003);
        // stmxcsr [rdi+4]
        emulate(&mut cpu, &[0x0f, 0xae, 0x5f, 0x04]).unwrap();
        assert_eq!(&cpu.mem[0x3004..0x3008], &0x9fc0u32.to_le_bytes());
        // Reserved bits: #GP(0), MXCSR unchanged.
        cpu.mem[0x3000..0x3004].copy_from_slice(&0x1_0000u32.to_le_bytes());
        let rip = cpu.regs.rip;
        assert_eq!(
            emulate(&mut cpu, &[0x0f, 0xae, 0x17]).unwrap(),
            Emulated::Exception {
                vector: VECTOR_GP,
                error_code: Some(0)
            }
        );
        assert_eq!(cpu.fpu.mxcsr, 0x9fc0);
        assert_eq!(cpu.regs.rip, rip);
    }

    #[test]
    fn fs_relative_and_rip_relative_addresses() {
        let mut cpu = TestCpu::new(0x1000);
        cpu.fs_base = 0x4000;
        cpu.mem[0x4010..0x4014].copy_from_slice(&0x1f80u32.to_le_bytes());
        // ldmxcsr fs:[0x10]
        emulate(&mut cpu, &[0x64, 0x0f, 0xae, 0x14, 0x25, 0x10, 0, 0, 0]).unwrap();
        assert_eq!(cpu.fpu.mxcsr, 0x1f80);
        // stmxcsr [rip+0x100]: next ip is 0x1009 + 7
        let rip = cpu.regs.rip;
        emulate(&mut cpu, &[0x0f, 0xae, 0x1d, 0x00, 0x01, 0, 0]).unwrap();
        let at = (rip + 7 + 0x100) as usize;
        assert_eq!(&cpu.mem[at..at + 4], &0x1f80u32.to_le_bytes());
    }

    #[test]
    fn undefined_opcodes_fault_and_truncated_bytes_are_errors() {
        let mut cpu = TestCpu::new(0x1000);
        // 0x0f 0x04 is undefined in 64-bit mode.
        assert_eq!(
            emulate(&mut cpu, &[0x0f, 0x04, 0, 0]).unwrap(),
            Emulated::Exception {
                vector: VECTOR_UD,
                error_code: None
            }
        );
        assert!(matches!(
            emulate(&mut cpu, &[0xf3, 0x48, 0x0f]),
            Err(EmulateError::Unhandled { .. })
        ));
    }

    #[test]
    fn fwait_and_rdrand() {
        let mut cpu = TestCpu::new(0x1000);
        emulate(&mut cpu, &[0x9b]).unwrap();
        assert_eq!(cpu.regs.rip, 0x1001);
        cpu.regs.rax = 0xffff_ffff_0000_0007;
        cpu.regs.rflags = 2 | FLAG_ZF;
        // rdrand eax: asks for a value and changes nothing yet.
        let Emulated::NeedsRandom(request) = emulate(&mut cpu, &[0x0f, 0xc7, 0xf0]).unwrap() else {
            panic!("rdrand must ask for a value");
        };
        assert_eq!(request.dest, Register::EAX);
        assert!(!request.seed);
        assert_eq!(request.next_rip, 0x1004);
        assert_eq!(cpu.regs.rip, 0x1001);
        complete_random(&mut cpu, request, 0x1234_5678_9abc_def0).unwrap();
        // A 32-bit destination is zero-extended; CF=1, ZF cleared.
        assert_eq!(cpu.regs.rax, 0x9abc_def0);
        assert_eq!(cpu.regs.rflags, 2 | FLAG_CF);
        assert_eq!(cpu.regs.rip, 0x1004);
        // rdseed cx (66 0f c7 f9): a 16-bit destination keeps the rest.
        cpu.regs.rcx = 0xaaaa_bbbb_cccc_dddd;
        let Emulated::NeedsRandom(request) = emulate(&mut cpu, &[0x66, 0x0f, 0xc7, 0xf9]).unwrap()
        else {
            panic!("rdseed must ask for a value");
        };
        assert!(request.seed);
        complete_random(&mut cpu, request, 0x1234_5678_9abc_def0).unwrap();
        assert_eq!(cpu.regs.rcx, 0xaaaa_bbbb_cccc_def0);
    }

    #[test]
    fn instructions_unicorn_must_not_run_are_reported_with_rip_bytes_and_disassembly() {
        let mut cpu = TestCpu::new(0xffff_ffff_8100_0000);
        // vpxor ymm0, ymm1, ymm2: the VM has no AVX.
        let err = emulate(&mut cpu, &[0xc5, 0xf5, 0xef, 0xc2]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("0xffffffff81000000"), "{msg}");
        assert!(msg.contains("c5 f5 ef c2"), "{msg}");
        assert!(msg.contains("vpxor ymm0,ymm1,ymm2"), "{msg}");
        assert!(msg.contains("AVX"), "{msg}");
        // wrmsr needs system state; cpuid must come from the CPU model.
        for bytes in [&[0x0f, 0x30][..], &[0x0f, 0xa2][..]] {
            let err = emulate(&mut cpu, bytes).unwrap_err().to_string();
            assert!(err.contains("not run in Unicorn"), "{err}");
        }
        assert_eq!(cpu.regs.rip, 0xffff_ffff_8100_0000);
    }

    /// The instruction bytes at the test CPU's RIP, as KVM reports them.
    fn place(cpu: &mut TestCpu, bytes: &[u8]) {
        let at = cpu.regs.rip as usize;
        cpu.mem[at..at + bytes.len()].copy_from_slice(bytes);
    }

    #[test]
    fn unicorn_runs_sse_moves_between_gprs_and_xmm() {
        let mut cpu = TestCpu::new(0x1000);
        cpu.regs.rcx = 0xdead_beef_1234_5678;
        cpu.fpu.xmm[15] = [0xff; 16];
        // movd xmm15, ecx (what the Linux probe met in SIMD crypto code)
        let movd = [0x66, 0x44, 0x0f, 0x6e, 0xf9];
        place(&mut cpu, &movd);
        assert_eq!(emulate(&mut cpu, &movd).unwrap(), Emulated::Performed);
        let mut want = [0u8; 16];
        want[..4].copy_from_slice(&0x1234_5678u32.to_le_bytes());
        assert_eq!(cpu.fpu.xmm[15], want);
        assert_eq!(cpu.regs.rip, 0x1005);
        // movq rax, xmm15
        let movq = [0x66, 0x4c, 0x0f, 0x7e, 0xf8];
        place(&mut cpu, &movq);
        emulate(&mut cpu, &movq).unwrap();
        assert_eq!(cpu.regs.rax, 0x1234_5678);
        assert_eq!(cpu.regs.rip, 0x100a);
    }

    #[test]
    fn unicorn_runs_ssse3_and_aes_with_memory_operands() {
        let mut cpu = TestCpu::new(0x1000);
        cpu.regs.rsi = 0x2000;
        // pshufb xmm0, [rsi]: reverse the bytes of xmm0.
        let mask: Vec<u8> = (0..16u8).rev().collect();
        cpu.mem[0x2000..0x2010].copy_from_slice(&mask);
        cpu.fpu.xmm[0] = core::array::from_fn(|i| i as u8);
        let pshufb = [0x66, 0x0f, 0x38, 0x00, 0x06];
        place(&mut cpu, &pshufb);
        emulate(&mut cpu, &pshufb).unwrap();
        assert_eq!(cpu.fpu.xmm[0], core::array::from_fn(|i| 15 - i as u8));
        // aesenc xmm1, xmm2 with zero state and key: one AES round of zeros
        // gives 0x63 in every byte after SubBytes; MixColumns of a constant
        // column keeps it (2+3+1+1 = 1 in GF(2^8) times 0x63).
        cpu.regs.rip = 0x1100;
        let aesenc = [0x66, 0x0f, 0x38, 0xdc, 0xca];
        place(&mut cpu, &aesenc);
        emulate(&mut cpu, &aesenc).unwrap();
        assert_eq!(cpu.fpu.xmm[1], [0x63; 16]);
    }

    #[test]
    fn unicorn_writes_memory_back_only_where_it_changed() {
        let mut cpu = TestCpu::new(0x1000);
        cpu.regs.rdi = 0x2ff8; // straddles a page boundary
        cpu.fpu.xmm[3] = [0xab; 16];
        cpu.mem[0x2ff0..0x3010].fill(0x11);
        // movdqu [rdi], xmm3
        let store = [0xf3, 0x0f, 0x7f, 0x1f];
        place(&mut cpu, &store);
        emulate(&mut cpu, &store).unwrap();
        assert_eq!(&cpu.mem[0x2ff8..0x3008], &[0xab; 16]);
        assert_eq!(&cpu.mem[0x2ff0..0x2ff8], &[0x11; 8]);
        assert_eq!(&cpu.mem[0x3008..0x3010], &[0x11; 8]);
        assert_eq!(cpu.regs.rip, 0x1004);
    }

    #[test]
    fn unicorn_faults_become_guest_exceptions_with_state_unchanged() {
        let mut cpu = TestCpu::new(0x1000);
        cpu.regs.rax = 5;
        cpu.regs.rdx = 1;
        cpu.regs.rcx = 0;
        // div rcx with rcx = 0: #DE at the instruction, no error code.
        let div = [0x48, 0xf7, 0xf1];
        place(&mut cpu, &div);
        assert_eq!(
            emulate(&mut cpu, &div).unwrap(),
            Emulated::Exception {
                vector: 0,
                error_code: None
            }
        );
        assert_eq!((cpu.regs.rax, cpu.regs.rdx), (5, 1));
        assert_eq!(cpu.regs.rip, 0x1000);
    }

    #[test]
    fn unicorn_clac_clears_the_alignment_check_flag() {
        let mut cpu = TestCpu::new(0x1000);
        const FLAG_AC: u64 = 1 << 18;
        cpu.regs.rflags = 2 | FLAG_AC;
        let clac = [0x0f, 0x01, 0xca];
        place(&mut cpu, &clac);
        emulate(&mut cpu, &clac).unwrap();
        assert_eq!(cpu.regs.rflags, 2);
        assert_eq!(cpu.regs.rip, 0x1003);
    }

    #[test]
    fn unicorn_refuses_writes_to_read_only_guest_pages() {
        let mut cpu = TestCpu::new(0x1000);
        cpu.regs.rdi = 0x5000;
        cpu.read_only.push(0x5000);
        let store = [0xf3, 0x0f, 0x7f, 0x1f];
        place(&mut cpu, &store);
        assert!(emulate(&mut cpu, &store).is_err());
        assert_eq!(&cpu.mem[0x5000..0x5010], &[0; 16]);
        assert_eq!(cpu.regs.rip, 0x1000);
    }

    #[test]
    fn partial_register_writes() {
        let mut r = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            ..Default::default()
        };
        write_gpr(&mut r, Register::AH, 0xaa);
        assert_eq!(r.rax, 0x1122_3344_5566_aa88);
        write_gpr(&mut r, Register::AX, 0xbeef);
        assert_eq!(r.rax, 0x1122_3344_5566_beef);
        write_gpr(&mut r, Register::EAX, 0x1234);
        assert_eq!(r.rax, 0x1234);
        assert_eq!(read_gpr(&r, Register::AH), 0x12);
        assert_eq!(read_gpr(&r, Register::AL), 0x34);
    }
}
