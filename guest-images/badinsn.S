# badinsn: executes, in kernel mode, an SSE instruction that KVM's emulator
# does not implement on the development hosts and twinvm's fallback does not
# either (movd xmm15, ecx, as met in Linux's SIMD crypto code). twinvm must
# stop with RIP, bytes and disassembly.
.include "rt.S"

.text
kmain:
    lea rdi, [rip + msg]
    call rt_puts
    mov ecx, 0x1234
    movd xmm15, ecx
    lea rdi, [rip + msg_after]
    call rt_puts
    jmp rt_poweroff

user_exited:
    jmp rt_poweroff

.section .rodata
msg: .asciz "badinsn: trying movd\n"
msg_after: .asciz "badinsn: movd completed\n"
