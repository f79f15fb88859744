# echo: echoes serial input using receive interrupts; 'q' ends
#
# Echoes UART input back using receive interrupts (IRQ4); a 'q' ends
# the session.
.include "rt.S"

.text
kmain:
    mov edi, 0x24
    lea rsi, [rip + on_serial]
    call rt_set_handler
    mov edi, 0xef               # only IRQ4
    mov esi, 0xff
    call rt_pic_init
    mov dx, COM1 + 2
    mov al, 0x07                # FIFO on, both FIFOs cleared, trigger at 1 byte
    out dx, al
    mov dx, COM1 + 4
    mov al, 0x0b                # DTR, RTS, OUT2 (gates the IRQ line)
    out dx, al
    mov dx, COM1 + 1
    mov al, 0x01                # interrupt on received data
    out dx, al
    lea rdi, [rip + msg_ready]
    call rt_puts
1:  sti
    hlt
    cli
    cmpq [rip + quit], 0
    je 1b
    lea rdi, [rip + msg_count]
    mov rsi, [rip + received]
    call rt_put_label_dec
    lea rdi, [rip + msg_bye]
    jmp rt_end_line_and_finish

# echo runs no user program; the runtime still needs the symbol.
user_exited:
    jmp rt_poweroff

# Drain the receiver, echoing every byte.
on_serial:
1:  mov dx, COM1 + 5
    in al, dx
    test al, 1
    jz 2f
    mov dx, COM1
    in al, dx
    incq [rip + received]
    cmp al, 'q'
    jne 3f
    movq [rip + quit], 1
    jmp 1b
3:  movzx edi, al
    call rt_putc
    jmp 1b
2:  jmp rt_pic_eoi

.section .rodata
msg_ready: .asciz "echo: ready\n"
msg_count: .asciz "\necho: received="
msg_bye: .asciz "echo: bye\n"

.data
quit: .quad 0
received: .quad 0
