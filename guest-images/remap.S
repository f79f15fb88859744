# remap: user mode moves a 2 MiB window by rewriting its page-directory entry
#
# A user-mode (CPL3) loop that moves one 2 MiB virtual window between
# two physical pages by rewriting its page-directory entry (the identity
# map's tables are user-writable), flushes the TLB entry through a system
# call, and folds what it reads through the window into a hash, under a
# 1 kHz timer.
#
# On hosts that shadow guest page tables (KVM without EPT/NPT, as on the
# development machines), KVM keeps its own copy of every guest page table
# and learns of changes by trapping the guest's writes. A backup that loads
# a sync point writes the primary's pages from userspace, where KVM does not
# see them: unless it makes KVM drop its copies, it reads through the old
# mapping and the hash differs.
.include "rt.S"

.set PIT_DIVISOR, 1193          # 1000.15 Hz
.set WINDOW, 0x40000000         # 1 GiB: entry 0 of the second page directory
.set WINDOW_PDE, 0xC000         # PD_ADDR + 0x1000 (see src/vmm/layout.rs)
.set PAGE_A, 0x02000000         # 32 MiB
.set PAGE_B, 0x02200000         # 34 MiB
.set PDE_FLAGS, 0x87            # present, writable, user, 2 MiB page
.set READ_QWORDS, 32768         # the first 256 KiB of each page are read
.set SHORT_READS, 1024          # even rounds (page A): well inside the sync bound
.set LONG_READS, 1048576        # odd rounds (page B): about 1 ms
.set ROUNDS, 4000

.text
kmain:
    lea rdi, [rip + msg_start]
    call rt_puts
    lea rdi, [rip + on_timer]
    mov esi, PIT_DIVISOR
    lea rdx, [rip + user_main]
    jmp rt_enter_user_with_timer

on_timer:
    incq [rip + ticks]
    jmp rt_pic_eoi

user_exited:
    mov rbx, rdi
    call rt_timer_stop
    lea rdi, [rip + msg_ticks]
    mov rsi, [rip + ticks]
    call rt_put_label_dec
    lea rdi, [rip + msg_hash]
    mov rsi, rbx
    call rt_put_label_hex
    lea rdi, [rip + msg_done]
    jmp rt_end_line_and_finish

user_main:
    # Page A holds i * K1, page B holds i * K2 (qword i), through their
    # identity-mapped addresses.
    mov rdi, PAGE_A
    mov rsi, PAGE_B
    xor ecx, ecx
    mov r8, 0x9e3779b97f4a7c15
    mov r9, 0xc2b2ae3d27d4eb4f
1:  mov rax, rcx
    imul rax, r8
    mov [rdi + rcx*8], rax
    mov rax, rcx
    imul rax, r9
    mov [rsi + rcx*8], rax
    inc ecx
    cmp ecx, READ_QWORDS
    jb 1b

    xor r12d, r12d              # round
    mov r13, 0x243f6a8885a308d3 # hash
    xor ebx, ebx                # read index (qwords, wraps)
    # Each round starts at a landmark (an IN through a system call), so the
    # backup itself executes the short rounds and reads the window; the
    # long ones outlast the sync bound, so timer interrupts there become
    # sync points taken after the round's page-directory write.
2:  mov edi, 0x21
    mov eax, SYS_INB
    int3                        # system call
    mov eax, PAGE_A
    mov edx, PAGE_B
    test r12d, 1
    cmovnz eax, edx
    or eax, PDE_FLAGS
    mov [WINDOW_PDE], rax
    mov edi, WINDOW
    mov eax, SYS_INVLPG
    int3                        # system call
    mov ecx, SHORT_READS
    mov edx, LONG_READS
    test r12d, 1
    cmovnz ecx, edx
3:  xor r13, [WINDOW + rbx*8]
    rol r13, 7
    imul r13, r8
    inc ebx
    and ebx, READ_QWORDS - 1
    dec ecx
    jnz 3b
    inc r12d
    cmp r12d, ROUNDS
    jb 2b
    mov rdi, r13
    mov eax, SYS_EXIT
    int3                        # system call
    ud2

.section .rodata
msg_start: .asciz "remap: start\n"
msg_ticks: .asciz "remap: ticks="
msg_hash: .asciz " hash="
msg_done: .asciz "remap: done\n"

.data
ticks: .quad 0
