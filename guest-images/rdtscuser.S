# rdtscuser: TSC reads in user mode, which replay must report as divergence
#
# Reads the TSC in user mode, where it cannot be trapped on these
# hosts, and stores the values in memory. Record and replay see different
# values, so replay must report divergence through the digests: this guest
# proves the detector works and must never replay as identical.
.include "rt.S"

.set ROUNDS, 64

.text
kmain:
    lea rdi, [rip + msg_start]
    call rt_puts
    lea rdi, [rip + user_main]
    mov esi, 0x202
    jmp rt_enter_user

user_exited:
    lea rdi, [rip + msg_done]
    call rt_puts
    jmp rt_poweroff

.section .usertext, "ax"
user_main:
    lea rbx, [rip + samples]
    mov ecx, ROUNDS
1:  rdtsc
    mov [rbx], eax
    mov [rbx + 4], edx
    add rbx, 8
    # a little work between samples
    mov edx, 1000
2:  dec edx
    jnz 2b
    dec ecx
    jnz 1b
    xor edi, edi
    mov eax, SYS_EXIT
    int3                        # system call
    ud2

.section .rodata
msg_start: .asciz "rdtscuser: sampling the TSC in user mode\n"
msg_done: .asciz "rdtscuser: done\n"

.bss
.balign 4096
samples: .skip ROUNDS * 8
