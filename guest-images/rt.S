# Runtime shared by the test guests (included by each guest's .S file).
#
# twinvm enters the image in 64-bit mode with identity-mapped, user-accessible
# page tables. This runtime installs its own GDT (kernel and user segments, a
# TSS for the ring-3 -> ring-0 stack switch), an IDT whose 256 stubs funnel
# into one dispatcher, and system calls for user mode.
#
# The system-call trap is `int3` from CPL3. Measured on the development
# hosts (guest kernel run by KVM's emulator, user mode native): `int N` from
# CPL3 reaches the guest as #UD for any N, and `syscall` enters the handler
# without the switch to CPL0; exceptions from CPL3, #BP among them, arrive as
# on real hardware. The #BP handler tells a system call (saved CS is ring 3)
# from a kernel breakpoint.
#
# Kernel-mode code runs through KVM's instruction emulator on the development
# hosts (about 1.4 M instructions/s), so the heavy work is in user mode and
# the kernel parts are kept short.
#
# Guest contract: define `kmain` (kernel mode, IF=0, called once).
# Calling convention: System V (rdi, rsi, rdx, rcx; rax returns).
# The VMM's Linux boot_params pointer (RSI at entry) is kept in
# rt_boot_params; rt_cmdline returns the kernel command line.

.intel_syntax noprefix
.code64

.set COM1, 0x3f8
.set KERNEL_CS, 0x08
.set KERNEL_DS, 0x10
.set USER_DS, 0x18 | 3
.set USER_CS, 0x20 | 3
.set TSS_SEL, 0x28

.set SYS_EXIT, 0
.set SYS_WRITE, 1
.set SYS_SETGS, 2               # IA32_KERNEL_GS_BASE = rdi (a WRMSR, no exit)
.set SYS_INVLPG, 3              # invlpg [rdi]: flush one TLB entry after a PTE change
.set SYS_INB, 4                 # rax = byte read from I/O port rdi (a landmark)
.set SYS_WAIT, 5                # halt until an interrupt unless the u64 at [rdi] != rsi
.set MSR_KERNEL_GS_BASE, 0xc0000102

# Frame built by isr_common: 15 saved registers, then vector, error code and
# the CPU's interrupt frame.
.set FRAME_RAX, 14*8
.set FRAME_RDI, 8*8
.set FRAME_RSI, 9*8
.set FRAME_VECTOR, 15*8
.set FRAME_RIP, 17*8
.set FRAME_CS, 18*8

.section .text.entry, "ax"
.global _start
_start:
    cli
    mov [rip + rt_boot_params], rsi
    lea rsp, [rip + kstack_top]
    call rt_init
    call kmain
    jmp rt_poweroff

.text

# ---- descriptor tables -------------------------------------------------
rt_init:
    # TSS descriptor: base = tss, limit = 103, type 9 (available 64-bit TSS).
    lea rax, [rip + tss]
    mov rdx, rax
    and rdx, 0xffff
    shl rdx, 16
    or rdx, 103
    mov rcx, rax
    shr rcx, 16
    and rcx, 0xff
    shl rcx, 32
    or rdx, rcx
    mov rcx, 0x89
    shl rcx, 40
    or rdx, rcx
    mov rcx, rax
    shr rcx, 24
    and rcx, 0xff
    shl rcx, 56
    or rdx, rcx
    lea rcx, [rip + gdt]
    mov [rcx + TSS_SEL], rdx
    shr rax, 32
    mov [rcx + TSS_SEL + 8], rax
    lea rax, [rip + kstack_top]
    lea rcx, [rip + tss]
    mov [rcx + 4], rax              # RSP0
    mov word ptr [rcx + 102], 104   # no I/O permission bitmap
    lgdt [rip + gdtr]
    # Reload CS through a far return, then the data segments.
    lea rax, [rip + 1f]
    push KERNEL_CS
    push rax
    retfq
1:  mov ax, KERNEL_DS
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov ax, TSS_SEL
    ltr ax
    # IDT: gate i -> isr_stubs + 16*i, interrupt gates, DPL 3 for int3 so
    # user mode may raise it.
    lea rdi, [rip + idt]
    lea rsi, [rip + isr_stubs]
    xor ecx, ecx
2:  mov rax, rsi
    and eax, 0xffff
    mov edx, KERNEL_CS
    shl edx, 16
    or eax, edx
    mov [rdi], eax
    mov rax, rsi
    shr rax, 16
    shl eax, 16
    mov edx, 0x8e00
    cmp ecx, 3
    jne 4f
    mov edx, 0xee00
4:  or eax, edx
    mov [rdi + 4], eax
    mov rax, rsi
    shr rax, 32
    mov [rdi + 8], rax
    add rdi, 16
    add rsi, 16
    inc ecx
    cmp ecx, 256
    jb 2b
    lidt [rip + idtr]
    # Default handlers: every vector is fatal unless a guest installs its own.
    lea rdi, [rip + handlers]
    lea rax, [rip + rt_unexpected]
    mov ecx, 256
5:  mov [rdi], rax
    add rdi, 8
    dec ecx
    jnz 5b
    lea rax, [rip + rt_breakpoint]
    mov [rip + handlers + 3*8], rax
    ret

# rt_set_handler(rdi = vector, rsi = handler(rdi = vector, rsi = frame))
.global rt_set_handler
rt_set_handler:
    lea rax, [rip + handlers]
    mov [rax + rdi*8], rsi
    ret

# ---- interrupt entry ---------------------------------------------------
.balign 16
isr_stubs:
.set vec, 0
.rept 256
    .balign 16
    .if !((vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30))
    push 0
    .endif
    push vec
    jmp isr_common
    .set vec, vec + 1
.endr

isr_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rbp
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, [rsp + FRAME_VECTOR]
    mov rsi, rsp
    lea rax, [rip + handlers]
    call [rax + rdi*8]
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rbp
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

# An exception or interrupt nobody handles: say which and where, then stop
# the machine with a triple fault so the VMM reports a failure.
rt_unexpected:
    mov r12, rdi
    mov r13, [rsi + FRAME_RIP]
    lea rdi, [rip + msg_unexpected]
    mov rsi, r12
    call rt_put_label_hex
    lea rdi, [rip + msg_at]
    mov rsi, r13
    call rt_put_label_hex
    mov dil, 10
    call rt_putc
    jmp rt_triple_fault

.global rt_triple_fault
rt_triple_fault:
    lidt [rip + null_idtr]
    ud2

# #BP: from ring 3 a system call, from ring 0 a kernel breakpoint (counted
# in rt_kernel_breakpoints, then execution goes on after the int3).
rt_breakpoint:
    testq [rsi + FRAME_CS], 3
    jnz 1f
    incq [rip + rt_kernel_breakpoints]
    ret
1:  mov rax, [rsi + FRAME_RAX]
    cmp rax, SYS_EXIT
    je 2f
    cmp rax, SYS_SETGS
    je 4f
    cmp rax, SYS_INVLPG
    je 5f
    cmp rax, SYS_INB
    je 6f
    cmp rax, SYS_WAIT
    je 7f
    cmp rax, SYS_WRITE
    jne 3f
    push rsi
    mov rdi, [rsi + FRAME_RDI]
    mov rsi, [rsi + FRAME_RSI]
    call rt_write
    pop rsi
    mov qword ptr [rsi + FRAME_RAX], 0
    ret
3:  mov qword ptr [rsi + FRAME_RAX], -1
    ret
4:  mov ecx, MSR_KERNEL_GS_BASE
    mov eax, [rsi + FRAME_RDI]
    mov edx, [rsi + FRAME_RDI + 4]
    wrmsr
    mov qword ptr [rsi + FRAME_RAX], 0
    ret
5:  mov rdi, [rsi + FRAME_RDI]
    invlpg [rdi]
    mov qword ptr [rsi + FRAME_RAX], 0
    ret
6:  mov edx, [rsi + FRAME_RDI]
    in al, dx
    movzx eax, al
    mov [rsi + FRAME_RAX], rax
    ret
7:  # Wait: the caller read the counter at [rdi] (which its interrupt
    # handler bumps) as rsi before finding nothing to do. Interrupts are
    # off here, so comparing now and then `sti; hlt` (the interrupt shadow
    # holds any pending interrupt until hlt) loses no wake-up.
    mov rdi, [rsi + FRAME_RDI]
    mov rax, [rsi + FRAME_RSI]
    cmp [rdi], rax
    jne 8f
    sti
    hlt
    cli
8:  mov qword ptr [rsi + FRAME_RAX], 0
    ret
2:  # The user program finished: back on the kernel stack, interrupts off.
    mov rdi, [rsi + FRAME_RDI]
    lea rsp, [rip + kstack_top]
    jmp user_exited

# rt_cmdline: rax = the kernel command line (NUL-terminated), 0 if none.
.global rt_cmdline
rt_cmdline:
    mov rax, [rip + rt_boot_params]
    test rax, rax
    jz 1f
    mov eax, [rax + 0x228]          # boot_params.hdr.cmd_line_ptr
1:  ret

# ---- serial output (COM1, polled) --------------------------------------
.global rt_putc
rt_putc:
    mov dx, COM1 + 5
1:  in al, dx
    test al, 0x20
    jz 1b
    mov dx, COM1
    mov al, dil
    out dx, al
    ret

# rt_write(rdi = ptr, rsi = len)
.global rt_write
rt_write:
    push rbx
    push r12
    mov rbx, rdi
    mov r12, rsi
1:  test r12, r12
    jz 2f
    movzx edi, byte ptr [rbx]
    call rt_putc
    inc rbx
    dec r12
    jmp 1b
2:  pop r12
    pop rbx
    ret

# rt_put_label_hex(rdi = NUL-terminated label, rsi = value): the label, then
# the value in hex.
.global rt_put_label_hex
rt_put_label_hex:
    push rsi
    call rt_puts
    pop rdi
    jmp rt_put_hex

# rt_put_label_dec(rdi = NUL-terminated label, rsi = value): the label, then
# the value in decimal.
.global rt_put_label_dec
rt_put_label_dec:
    push rsi
    call rt_puts
    pop rdi
    jmp rt_put_dec

# rt_end_line_and_finish(rdi = NUL-terminated final line): end the current
# line, print the final one and power off; never returns.
.global rt_end_line_and_finish
rt_end_line_and_finish:
    push rdi
    mov dil, 10
    call rt_putc
    pop rdi
    call rt_puts
    jmp rt_poweroff

# rt_puts(rdi = NUL-terminated string)
.global rt_puts
rt_puts:
    push rbx
    mov rbx, rdi
1:  movzx edi, byte ptr [rbx]
    test edi, edi
    jz 2f
    call rt_putc
    inc rbx
    jmp 1b
2:  pop rbx
    ret

# rt_put_dec(rdi = unsigned value)
.global rt_put_dec
rt_put_dec:
    push rbx
    sub rsp, 32
    mov rax, rdi
    lea rbx, [rsp + 31]
    mov byte ptr [rbx], 0
    mov rcx, 10
1:  xor edx, edx
    div rcx
    add dl, '0'
    dec rbx
    mov [rbx], dl
    test rax, rax
    jnz 1b
    mov rdi, rbx
    call rt_puts
    add rsp, 32
    pop rbx
    ret

# rt_put_hex(rdi = value): 16 hex digits with 0x prefix.
.global rt_put_hex
rt_put_hex:
    push rbx
    push r12
    mov r12, rdi
    mov dil, '0'
    call rt_putc
    mov dil, 'x'
    call rt_putc
    mov ebx, 16
1:  rol r12, 4
    mov rdi, r12
    and edi, 0xf
    lea rax, [rip + hex_digits]
    movzx edi, byte ptr [rax + rdi]
    call rt_putc
    dec ebx
    jnz 1b
    pop r12
    pop rbx
    ret

# ---- periodic timer ------------------------------------------------------
# rt_timer_start(rdi = IRQ0 handler, rsi = PIT divisor): the handler on vector
# 0x20, only IRQ0 unmasked, PIT channel 0 in mode 2 (rate generator).
.global rt_timer_start
rt_timer_start:
    push rsi
    mov rsi, rdi
    mov edi, 0x20
    call rt_set_handler
    mov edi, 0xfe               # only IRQ0
    mov esi, 0xff
    call rt_pic_init
    pop rsi
    mov al, 0x34                # channel 0, lobyte/hibyte, mode 2, binary
    out 0x43, al
    mov eax, esi
    out 0x40, al
    mov al, ah
    out 0x40, al
    ret

# rt_timer_stop: mask every line of the master PIC (the timer's run is over).
.global rt_timer_stop
rt_timer_stop:
    mov al, 0xff
    out 0x21, al
    ret

# rt_enter_user_with_timer(rdi = IRQ0 handler, rsi = PIT divisor,
# rdx = user entry): start the timer, then enter user mode with interrupts
# on; never returns (see rt_enter_user).
.global rt_enter_user_with_timer
rt_enter_user_with_timer:
    push rdx
    call rt_timer_start
    pop rdi
    mov esi, 0x202
    jmp rt_enter_user

# ---- legacy PIC ----------------------------------------------------------
# rt_pic_init(rdi = master mask, rsi = slave mask): vectors 0x20-0x2f.
.global rt_pic_init
rt_pic_init:
    mov al, 0x11
    out 0x20, al
    out 0xa0, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x28
    out 0xa1, al
    mov al, 4
    out 0x21, al
    mov al, 2
    out 0xa1, al
    mov al, 1
    out 0x21, al
    out 0xa1, al
    mov rax, rdi
    out 0x21, al
    mov rax, rsi
    out 0xa1, al
    ret

.global rt_pic_eoi
rt_pic_eoi:
    mov al, 0x20
    out 0x20, al
    ret

# ---- user mode and power -------------------------------------------------
# rt_enter_user(rdi = entry, rsi = rflags); never returns: the program ends
# with the exit system call, which continues at the guest's `user_exited`.
.global rt_enter_user
rt_enter_user:
    push USER_DS
    lea rax, [rip + ustack_top]
    push rax
    push rsi
    push USER_CS
    push rdi
    iretq

# Power off: pulse the CPU reset line through the i8042 (twinvm's shutdown
# path); should that return, halt with interrupts off.
.global rt_poweroff
rt_poweroff:
    mov al, 0xfe
    out 0x64, al
    cli
1:  hlt
    jmp 1b

.section .rodata
hex_digits: .ascii "0123456789abcdef"
msg_unexpected: .asciz "guest: unexpected vector "
msg_at: .asciz " at rip "

.data
.balign 16
gdt:
    .quad 0
    .quad 0x00af9b000000ffff    # 0x08 kernel code
    .quad 0x00cf93000000ffff    # 0x10 kernel data
    .quad 0x00cff3000000ffff    # 0x18 user data
    .quad 0x00affb000000ffff    # 0x20 user code
    .quad 0, 0                  # 0x28 TSS (filled in by rt_init)
gdt_end:
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
idtr:
    .word 256*16 - 1
    .quad idt
null_idtr:
    .word 0
    .quad 0
.global rt_kernel_breakpoints
rt_kernel_breakpoints: .quad 0
.global rt_boot_params
rt_boot_params: .quad 0

.bss
.balign 4096
idt: .skip 256*16
handlers: .skip 256*8
.balign 16
tss: .skip 104
.balign 16
kstack: .skip 16384
kstack_top:
ustack: .skip 16384
ustack_top:
