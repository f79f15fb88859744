# ticker: 1 kHz PIT interrupts over a user-mode compute loop
#
# Programs PIT channel 0 at 1 kHz and counts timer interrupts while a
# user-mode (CPL3) loop computes with no exits; prints both counts. Every
# 2^18 rounds the loop has the kernel put its state (made canonical) in
# IA32_KERNEL_GS_BASE:
# a WRMSR that KVM completes without an exit, so a sync point must carry MSRs.
.include "rt.S"

.set PIT_DIVISOR, 1193          # 1193182 Hz / 1193 = 1000.15 Hz
.set WORK_ITERATIONS, 400000000

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
    call rt_pic_eoi
    # Read the PIC mask back: an IN is the last landmark before the return
    # to the user loop, so the next landmark is often a sync point. KVM
    # completes an IN only at the next KVM_RUN, which the backup must do
    # before it loads the sync point.
    in al, 0x21
    ret

user_exited:
    mov rbx, rdi
    call rt_timer_stop
    lea rdi, [rip + msg_ticks]
    mov rsi, [rip + ticks]
    call rt_put_label_dec
    lea rdi, [rip + msg_work]
    mov rsi, rbx
    call rt_put_label_hex
    lea rdi, [rip + msg_gs]
    call rt_puts
    mov ecx, MSR_KERNEL_GS_BASE
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov rdi, rax
    call rt_put_hex
    lea rdi, [rip + msg_done]
    jmp rt_end_line_and_finish

# xorshift64 for WORK_ITERATIONS rounds; exit code = final state.
user_main:
    mov rax, 0x9e3779b97f4a7c15
    mov ecx, WORK_ITERATIONS
1:  mov rdx, rax
    shl rdx, 13
    xor rax, rdx
    mov rdx, rax
    shr rdx, 7
    xor rax, rdx
    mov rdx, rax
    shl rdx, 17
    xor rax, rdx
    test ecx, 0x3ffff
    jnz 2f
    push rax
    push rcx
    mov rdi, rax
    shl rdi, 16                 # canonical: WRMSR of a base raises #GP otherwise
    sar rdi, 16
    mov eax, SYS_SETGS
    int3                        # system call
    pop rcx
    pop rax
2:  dec ecx
    jnz 1b
    mov rdi, rax
    mov eax, SYS_EXIT
    int3                        # system call
    ud2

.section .rodata
msg_start: .asciz "ticker: start\n"
msg_ticks: .asciz "ticker: ticks="
msg_work: .asciz " work="
msg_gs: .asciz " gs="
msg_done: .asciz "ticker: done\n"

.data
ticks: .quad 0
