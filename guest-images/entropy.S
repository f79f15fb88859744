# entropy: RDRAND and RDSEED at CPL0, performed and logged by twinvm
#
# RDRAND and RDSEED in kernel mode, which reach the VMM on hosts
# where KVM emulates guest kernel code. twinvm performs them on the host and
# logs the value, so a replay gets the same numbers. Prints the four values
# and how many reported success (CF=1), then powers off.
.include "rt.S"

.text
kmain:
    xor r12d, r12d              # successes
    rdrand rax
    adc r12, 0
    mov [rip + v64], rax
    mov rax, -1                 # the 32-bit write must zero the upper half
    rdrand eax
    adc r12, 0
    mov [rip + v32], rax
    mov rax, -1                 # the 16-bit write must keep the rest
    rdrand ax
    adc r12, 0
    mov [rip + v16], rax
    rdseed rax
    adc r12, 0
    mov [rip + vseed], rax

    lea rdi, [rip + msg_64]
    mov rsi, [rip + v64]
    call rt_put_label_hex
    lea rdi, [rip + msg_32]
    mov rsi, [rip + v32]
    call rt_put_label_hex
    lea rdi, [rip + msg_16]
    mov rsi, [rip + v16]
    call rt_put_label_hex
    lea rdi, [rip + msg_seed]
    mov rsi, [rip + vseed]
    call rt_put_label_hex
    lea rdi, [rip + msg_ok]
    mov rsi, r12
    call rt_put_label_dec
    lea rdi, [rip + msg_done]
    jmp rt_end_line_and_finish

user_exited:
    jmp rt_poweroff

.section .rodata
msg_64: .asciz "entropy: rdrand64="
msg_32: .asciz " rdrand32="
msg_16: .asciz " rdrand16="
msg_seed: .asciz " rdseed64="
msg_ok: .asciz " successes="
msg_done: .asciz "entropy: done\n"

.data
v64: .quad 0
v32: .quad 0
v16: .quad 0
vseed: .quad 0
