# triplefault: triple-faults on purpose; twinvm must exit non-zero
#
# Says so, then loads an empty IDT and raises #UD, which
# escalates to a triple fault. twinvm must report it and exit non-zero.
.include "rt.S"

.text
kmain:
    lea rdi, [rip + msg]
    call rt_puts
    jmp rt_triple_fault

user_exited:
    jmp rt_poweroff

.section .rodata
msg: .asciz "triplefault: going down\n"
