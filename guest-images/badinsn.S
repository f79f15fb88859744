# badinsn: an AVX instruction at CPL0, which the emulation fallback refuses
#
# Executes, in kernel mode, an AVX instruction that KVM's emulator
# does not implement on the development hosts and twinvm's fallback refuses
# (the VM's CPU model has no AVX). twinvm must stop with RIP, bytes and
# disassembly.
.include "rt.S"

.text
kmain:
    lea rdi, [rip + msg]
    call rt_puts
    vpxor ymm0, ymm1, ymm2
    lea rdi, [rip + msg_after]
    call rt_puts
    jmp rt_poweroff

user_exited:
    jmp rt_poweroff

.section .rodata
msg: .asciz "badinsn: trying vpxor\n"
msg_after: .asciz "badinsn: vpxor completed\n"
