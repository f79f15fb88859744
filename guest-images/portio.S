# portio: port writes from kernel mode, one exit each (exit-rate benchmark)
#
# A port-I/O-heavy guest for the exit-rate benchmark: writes the POST
# port 0x80 EXITS times from kernel mode, one exit to the VMM each. (User
# mode with IOPL 3 would be faster but takes #GP on the development hosts.)
.include "rt.S"

.set EXITS, 100000

.text
kmain:
    lea rdi, [rip + msg_start]
    call rt_puts
    mov ecx, EXITS
    xor eax, eax
1:  out 0x80, al
    dec ecx
    jnz 1b
    lea rdi, [rip + msg_done]
    mov rsi, EXITS
    call rt_put_label_dec
    mov dil, 10
    call rt_putc
    jmp rt_poweroff

# portio runs no user program; the runtime still needs the symbol.
user_exited:
    jmp rt_poweroff

.section .rodata
msg_start: .asciz "portio: start\n"
msg_done: .asciz "portio: exits="
