# hello: prints from kernel and user mode; int3 and popcnt at CPL0
#
# Prints from kernel and user mode, exercises the emulation fallback
# (int3 and popcnt at CPL0 fail in KVM's emulator on the development hosts
# and are finished by twinvm), then powers off.
.include "rt.S"

.text
kmain:
    lea rdi, [rip + msg_hello]
    call rt_puts
    # int3 at CPL0: the guest's own #BP handler must run once.
    int3
    lea rdi, [rip + msg_bp]
    mov rsi, [rip + rt_kernel_breakpoints]
    call rt_put_label_dec
    mov dil, 10
    call rt_putc
    # popcnt at CPL0.
    mov rax, 0xf00f000000000ff1
    popcnt rcx, rax
    lea rdi, [rip + msg_popcnt]
    mov rsi, rcx
    call rt_put_label_dec
    mov dil, 10
    call rt_putc
    # A short program in user mode.
    lea rdi, [rip + user_main]
    mov esi, 0x202
    jmp rt_enter_user

# The user program finished with exit(rdi).
user_exited:
    mov rbx, rdi
    lea rdi, [rip + msg_exit]
    mov rsi, rbx
    call rt_put_label_dec
    lea rdi, [rip + msg_done]
    jmp rt_end_line_and_finish

user_main:
    # Sum 1..1_000_000 in user mode (native speed).
    xor eax, eax
    mov ecx, 1000000
1:  add rax, rcx
    dec ecx
    jnz 1b
    mov [rip + user_sum], rax
    lea rdi, [rip + msg_user]
    mov esi, OFFSET msg_user_len
    mov eax, SYS_WRITE
    int3                        # system call
    mov rdi, [rip + user_sum]
    mov eax, SYS_EXIT
    int3                        # system call
    ud2

.section .rodata
msg_hello: .asciz "Hello from the twinvm test guest\n"
msg_bp: .asciz "hello: breakpoints handled="
msg_popcnt: .asciz "hello: popcnt=";
msg_user: .ascii "hello: user mode says hi\n"
.set msg_user_len, . - msg_user
msg_exit: .asciz "hello: user exit code="
msg_done: .asciz "hello: done\n"

.data
user_sum: .quad 0
