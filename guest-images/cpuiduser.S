# cpuiduser: CPUID leaves 1 and 0xB from user mode, stored and printed
#
# CPUID leaves 1 and 0xB from user mode, stored in memory and
# printed. On hosts where KVM emulates only guest kernel code, user-mode
# CPUID runs natively and reports the APIC ID of the host CPU the vCPU
# thread is on (leaf 1 EBX[31:24], leaf 0xB EDX); record and replay pin the
# thread to one host CPU so the replicas agree.
.include "rt.S"

.text
kmain:
    lea rdi, [rip + user_main]
    mov esi, 0x202
    jmp rt_enter_user

user_exited:
    lea rdi, [rip + msg_leaf1]
    mov rsi, [rip + leaf1_ebx]
    call rt_put_label_hex
    lea rdi, [rip + msg_leafb]
    mov rsi, [rip + leafb_edx]
    call rt_put_label_hex
    lea rdi, [rip + msg_done]
    jmp rt_end_line_and_finish

user_main:
    mov eax, 1
    xor ecx, ecx
    cpuid
    mov [rip + leaf1_ebx], rbx
    mov eax, 0xb
    xor ecx, ecx
    cpuid
    mov [rip + leafb_edx], rdx
    xor edi, edi
    mov eax, SYS_EXIT
    int3                        # system call
    ud2

.section .rodata
msg_leaf1: .asciz "cpuiduser: leaf1.ebx="
msg_leafb: .asciz " leafb.edx="
msg_done: .asciz "cpuiduser: done\n"

.data
leaf1_ebx: .quad 0
leafb_edx: .quad 0
