//! Running one guest instruction in Unicorn, the CPU emulator library.
//!
//! KVM's instruction emulator on these hosts lacks much of SSE/SSSE3/AES-NI
//! and more (host-notes.md); a hand-written list of instructions would not
//! end. For an instruction [`super::emulate`] does not handle itself, the
//! vCPU's general-purpose registers, RFLAGS, FS/GS bases, XMM registers and
//! MXCSR are copied into a Unicorn x86-64 CPU, the guest pages it touches are
//! copied in on demand, exactly one instruction runs, and the changed
//! registers and bytes are written back to the vCPU and guest memory.
//!
//! Determinism: Unicorn only ever runs the single instruction that was
//! decoded here, and [`check_runnable`] refuses instructions whose result
//! depends on the host or on system state Unicorn does not have (RDTSC,
//! RDRAND, CPUID, port I/O, control/segment registers, x87, branches...).
//! So Unicorn's own time and random sources are never reached.
//!
//! Memory: Unicorn runs in its "virtual TLB" mode, where a hook translates
//! each virtual page. Guest pages are translated by the vCPU's page tables
//! (through [`GuestCpu`]) and copied into a small pool of Unicorn pages; a
//! page the instruction needs that is not yet copied makes the hook record it
//! and the instruction is rerun from the same starting state with it added.

use std::cell::RefCell;
use std::collections::BTreeMap;

use iced_x86::{FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, Register};
use kvm_bindings::kvm_regs;
use unicorn_engine::{
    Arch, HookType, MemType, Mode, Prot, RegisterX86, TlbEntry, TlbType, Unicorn, X86CpuModel,
};

use super::emulate::{EmulateError, Emulated, GuestCpu};

const PAGE: u64 = 0x1000;
/// Where the page pool sits in Unicorn's physical address space.
const POOL_BASE: u64 = 0x1000_0000;
/// Most guest pages one instruction may touch (code and data, both possibly
/// straddling a page boundary, plus room for stack and string operands).
const POOL_PAGES: u64 = 16;

/// Guest pages copied into Unicorn for the current instruction.
#[derive(Default)]
struct PagePool {
    /// Guest virtual page -> (pool slot, guest page writable).
    pages: BTreeMap<u64, (u64, bool)>,
    /// A page the instruction needed that is not in the pool.
    missing: Option<u64>,
    /// An exception Unicorn raised while running the instruction.
    exception: Option<u32>,
}

type Engine = Unicorn<'static, PagePool>;

thread_local! {
    // Creating an engine costs milliseconds (TCG set-up); one per vCPU thread
    // is reused for every instruction.
    static ENGINE: RefCell<Option<Engine>> = const { RefCell::new(None) };
}

fn uc_err(what: &str) -> impl FnOnce(unicorn_engine::uc_error) -> EmulateError + '_ {
    move |e| EmulateError::Vcpu(format!("Unicorn {what}: {e:?}"))
}

fn new_engine() -> Result<Engine, EmulateError> {
    let mut uc = Unicorn::new_with_data(Arch::X86, Mode::MODE_64, PagePool::default())
        .map_err(uc_err("create"))?;
    // A model with SSE4.2, AES-NI and PCLMULQDQ so TCG decodes what the
    // kernel's SIMD code uses (TCG has no AVX whatever the model).
    uc.ctl_set_cpu_model(X86CpuModel::SKYLAKE_SERVER as i32)
        .map_err(uc_err("set CPU model"))?;
    uc.ctl_set_tlb_type(TlbType::VIRTUAL)
        .map_err(uc_err("set TLB type"))?;
    uc.mem_map(POOL_BASE, POOL_PAGES * PAGE, Prot::ALL)
        .map_err(uc_err("map page pool"))?;
    uc.add_tlb_hook(
        0,
        u64::MAX,
        |uc: &mut Unicorn<PagePool>, vaddr, _: MemType| {
            let page = vaddr & !(PAGE - 1);
            let pool = uc.get_data_mut();
            match pool.pages.get(&page) {
                Some(&(slot, writable)) => {
                    let mut perms = Prot::READ | Prot::EXEC;
                    if writable {
                        perms |= Prot::WRITE;
                    }
                    Some(TlbEntry {
                        paddr: POOL_BASE + slot * PAGE,
                        perms,
                    })
                }
                None => {
                    pool.missing = Some(page);
                    None
                }
            }
        },
    )
    .map_err(uc_err("add TLB hook"))?;
    uc.add_intr_hook(|uc: &mut Unicorn<PagePool>, intno| {
        uc.get_data_mut().exception = Some(intno);
        let _ = uc.emu_stop();
    })
    .map_err(uc_err("add interrupt hook"))?;
    // A page the TLB hook refused: stop, so the caller can add it and rerun.
    uc.add_mem_hook(
        HookType::MEM_UNMAPPED,
        0,
        u64::MAX,
        |_: &mut Unicorn<PagePool>, _: MemType, _, _, _| false,
    )
    .map_err(uc_err("add unmapped-memory hook"))?;
    Ok(uc)
}

/// Why an instruction is not given to Unicorn, or `None` if it may be.
pub fn check_runnable(insn: &Instruction) -> Option<&'static str> {
    use Mnemonic::*;
    match insn.mnemonic() {
        Rdtsc | Rdtscp | Rdrand | Rdseed | Rdpid | Rdpmc => {
            return Some("its value comes from the host (time or entropy)")
        }
        Cpuid => return Some("CPUID must come from the VM's CPU model"),
        Hlt | In | Out | Insb | Insw | Insd | Outsb | Outsw | Outsd | Syscall | Sysret
        | Sysretq | Sysenter | Sysexitq | Sysexit | Swapgs | Iret | Iretd | Iretq | Int | Int1
        | Into | Lgdt | Lidt | Lldt | Ltr | Sgdt | Sidt | Sldt | Str | Rdmsr | Wrmsr | Rdfsbase
        | Rdgsbase | Wrfsbase | Wrgsbase | Invlpg | Invpcid | Wbinvd | Invd | Clts | Lmsw
        | Smsw | Xsave | Xsave64 | Xsaveopt | Xsaveopt64 | Xsavec | Xsavec64 | Xsaves
        | Xsaves64 | Xrstor | Xrstor64 | Xrstors | Xrstors64 | Xgetbv | Xsetbv | Fxsave
        | Fxsave64 | Fxrstor | Fxrstor64 | Monitor | Mwait | Vmcall | Vmmcall | Emms | Femms => {
            return Some("it needs system state the fallback does not model")
        }
        _ => {}
    }
    if insn.flow_control() != FlowControl::Next {
        return Some("it changes control flow (KVM's emulator handles those)");
    }
    let mut factory = InstructionInfoFactory::new();
    for used in factory.info(insn).used_registers() {
        let reg = used.register();
        let writes = !matches!(used.access(), OpAccess::Read | OpAccess::CondRead);
        if reg.is_segment_register() && writes {
            return Some("it writes a segment register");
        }
        if reg.is_cr() || reg.is_dr() || reg.is_tr() {
            return Some("it uses a control, debug or test register");
        }
        if reg.is_st() || reg.is_mm() {
            return Some("it uses x87/MMX state");
        }
        if reg.is_ymm() || reg.is_zmm() || reg.is_k() || reg.is_tmm() {
            return Some("it uses AVX state, which the VM does not have");
        }
    }
    None
}

const GPRS: [RegisterX86; 16] = [
    RegisterX86::RAX,
    RegisterX86::RCX,
    RegisterX86::RDX,
    RegisterX86::RBX,
    RegisterX86::RSP,
    RegisterX86::RBP,
    RegisterX86::RSI,
    RegisterX86::RDI,
    RegisterX86::R8,
    RegisterX86::R9,
    RegisterX86::R10,
    RegisterX86::R11,
    RegisterX86::R12,
    RegisterX86::R13,
    RegisterX86::R14,
    RegisterX86::R15,
];

fn gpr_values(regs: &kvm_regs) -> [u64; 16] {
    [
        regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8,
        regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ]
}

fn set_gpr_values(regs: &mut kvm_regs, v: [u64; 16]) {
    [
        regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8,
        regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ] = v;
}

fn xmm(i: usize) -> RegisterX86 {
    const XMMS: [RegisterX86; 16] = [
        RegisterX86::XMM0,
        RegisterX86::XMM1,
        RegisterX86::XMM2,
        RegisterX86::XMM3,
        RegisterX86::XMM4,
        RegisterX86::XMM5,
        RegisterX86::XMM6,
        RegisterX86::XMM7,
        RegisterX86::XMM8,
        RegisterX86::XMM9,
        RegisterX86::XMM10,
        RegisterX86::XMM11,
        RegisterX86::XMM12,
        RegisterX86::XMM13,
        RegisterX86::XMM14,
        RegisterX86::XMM15,
    ];
    XMMS[i]
}

/// Exceptions that push an error code; Unicorn does not report its value, so
/// the guest gets 0 (what #GP/#SS from SIMD alignment checks use).
fn error_code_for(vector: u8) -> Option<u32> {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 17 | 21).then_some(0)
}

/// Run `insn` (decoded at `regs.rip`) in Unicorn against the vCPU and guest
/// memory, and write the outcome back.
pub fn execute(
    cpu: &mut impl GuestCpu,
    regs: &kvm_regs,
    insn: &Instruction,
) -> Result<Emulated, EmulateError> {
    tracing::debug!(
        "Unicorn runs `{}` at RIP {:#x}",
        super::emulate::disassemble(insn),
        regs.rip
    );
    ENGINE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(new_engine()?);
        }
        let uc = slot.as_mut().expect("engine created above");
        execute_on(uc, cpu, regs, insn)
    })
}

fn execute_on(
    uc: &mut Engine,
    cpu: &mut impl GuestCpu,
    regs: &kvm_regs,
    insn: &Instruction,
) -> Result<Emulated, EmulateError> {
    let fpu = cpu.fpu()?;
    let fs_base = cpu.segment_base(Register::FS)?;
    let gs_base = cpu.segment_base(Register::GS)?;

    // Pages known to be needed up front: the instruction's own bytes.
    let mut wanted: Vec<u64> = vec![regs.rip & !(PAGE - 1)];
    let last = (regs.rip + insn.len() as u64 - 1) & !(PAGE - 1);
    if !wanted.contains(&last) {
        wanted.push(last);
    }
    let mut originals: Vec<(u64, Vec<u8>)>;
    loop {
        // Fresh start every attempt: pool contents, TLB, code cache, registers.
        let pool = uc.get_data_mut();
        pool.pages.clear();
        pool.missing = None;
        pool.exception = None;
        originals = Vec::with_capacity(wanted.len());
        for (slot, &page) in wanted.iter().enumerate() {
            let mut bytes = vec![0u8; PAGE as usize];
            cpu.read_virt(page, &mut bytes)?;
            let writable = cpu.is_writable(page)?;
            uc.get_data_mut()
                .pages
                .insert(page, (slot as u64, writable));
            uc.mem_write(POOL_BASE + slot as u64 * PAGE, &bytes)
                .map_err(uc_err("fill page"))?;
            originals.push((page, bytes));
        }
        uc.ctl_flush_tlb().map_err(uc_err("flush TLB"))?;
        uc.ctl_flush_tb().map_err(uc_err("flush code cache"))?;
        for (reg, value) in GPRS.iter().zip(gpr_values(regs)) {
            uc.reg_write(*reg, value).map_err(uc_err("write GPR"))?;
        }
        uc.reg_write(RegisterX86::RFLAGS, regs.rflags)
            .map_err(uc_err("write RFLAGS"))?;
        uc.reg_write(RegisterX86::FS_BASE, fs_base)
            .map_err(uc_err("write FS base"))?;
        uc.reg_write(RegisterX86::GS_BASE, gs_base)
            .map_err(uc_err("write GS base"))?;
        uc.reg_write(RegisterX86::MXCSR, u64::from(fpu.mxcsr))
            .map_err(uc_err("write MXCSR"))?;
        for (i, value) in fpu.xmm.iter().enumerate() {
            uc.reg_write_long(xmm(i), value)
                .map_err(uc_err("write XMM"))?;
        }

        let result = uc.emu_start(regs.rip, 0, 0, 1);
        let pool = uc.get_data();
        if let Some(page) = pool.missing {
            if wanted.len() as u64 >= POOL_PAGES || wanted.contains(&page) {
                return Err(EmulateError::Vcpu(format!(
                    "Unicorn: instruction at RIP {:#x} needs more than {POOL_PAGES} pages or page {page:#x} again",
                    regs.rip
                )));
            }
            wanted.push(page);
            continue;
        }
        if let Some(vector) = pool.exception {
            // A fault: nothing is written back, RIP stays at the instruction.
            let vector = u8::try_from(vector)
                .map_err(|_| EmulateError::Vcpu(format!("Unicorn raised interrupt {vector}")))?;
            return Ok(Emulated::Exception {
                vector,
                error_code: error_code_for(vector),
            });
        }
        if let Err(e) = result {
            return Err(EmulateError::Vcpu(format!(
                "Unicorn could not run the instruction at RIP {:#x}: {e:?}",
                regs.rip
            )));
        }
        break;
    }

    let rip = uc.reg_read(RegisterX86::RIP).map_err(uc_err("read RIP"))?;
    if rip == regs.rip && !insn.has_rep_prefix() && !insn.has_repe_prefix() {
        return Err(EmulateError::Vcpu(format!(
            "Unicorn did not complete the instruction at RIP {rip:#x}"
        )));
    }
    // Memory first: if writing back fails, the vCPU still sits at the
    // instruction with its old registers.
    for (slot, (page, before)) in originals.iter().enumerate() {
        let mut after = vec![0u8; PAGE as usize];
        uc.mem_read(POOL_BASE + slot as u64 * PAGE, &mut after)
            .map_err(uc_err("read page"))?;
        for (start, end) in changed_ranges(before, &after) {
            cpu.write_virt(page + start as u64, &after[start..end])?;
        }
    }
    let mut new_regs = *regs;
    let mut values = [0u64; 16];
    for (value, reg) in values.iter_mut().zip(GPRS) {
        *value = uc.reg_read(reg).map_err(uc_err("read GPR"))?;
    }
    set_gpr_values(&mut new_regs, values);
    new_regs.rflags = uc
        .reg_read(RegisterX86::RFLAGS)
        .map_err(uc_err("read RFLAGS"))?;
    new_regs.rip = rip;
    let mut new_fpu = fpu;
    let mxcsr = uc
        .reg_read(RegisterX86::MXCSR)
        .map_err(uc_err("read MXCSR"))?;
    new_fpu.mxcsr = u32::try_from(mxcsr).unwrap_or(fpu.mxcsr);
    for (i, slot) in new_fpu.xmm.iter_mut().enumerate() {
        let value = uc.reg_read_long(xmm(i)).map_err(uc_err("read XMM"))?;
        slot.copy_from_slice(&value[..16]);
    }
    if new_fpu.mxcsr != fpu.mxcsr || new_fpu.xmm != fpu.xmm {
        cpu.set_fpu(&new_fpu)?;
    }
    cpu.set_regs(&new_regs)?;
    Ok(Emulated::Performed)
}

/// Byte ranges `[start, end)` where `after` differs from `before`.
fn changed_ranges(before: &[u8], after: &[u8]) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < before.len() {
        if before[i] != after[i] {
            let start = i;
            while i < before.len() && before[i] != after[i] {
                i += 1;
            }
            ranges.push((start, i));
        } else {
            i += 1;
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_ranges_finds_each_run_of_differences() {
        let before = [0u8, 1, 2, 3, 4, 5, 6, 7];
        let after = [9u8, 1, 2, 8, 8, 5, 6, 0];
        assert_eq!(
            changed_ranges(&before, &after),
            vec![(0, 1), (3, 5), (7, 8)]
        );
        assert!(changed_ranges(&before, &before).is_empty());
    }
}
