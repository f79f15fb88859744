# storm: long user-mode loops under timer and serial interrupts (hard replay)
#
# Makes exact replay hard. User mode runs long compute loops with no
# exits (hundreds of ms each) while the PIT interrupts at 1 kHz and serial
# input arrives whenever it is typed. Every interrupt records the user loop's
# counter (from the interrupted register frame) and folds it into a hash, so
# an interrupt delivered one instruction off changes the result. Every 4th
# tick the kernel also reads the TSC (rdtsc at CPL0, which twinvm traps, and
# rdmsr IA32_TSC, which KVM's MSR filter sends to twinvm), the PIT counter and
# the RTC seconds, and folds those in too.
.include "rt.S"

.set PIT_DIVISOR, 1193          # about 1 kHz
.set PHASES, 6
.set PHASE_ITERATIONS, 300000000
.set MAX_OBSERVATIONS, 8192
.set FRAME_R12, 3*8

.text
kmain:
    lea rdi, [rip + msg_start]
    call rt_puts
    mov edi, 0x20
    lea rsi, [rip + on_timer]
    call rt_set_handler
    mov edi, 0x24
    lea rsi, [rip + on_serial]
    call rt_set_handler
    mov edi, 0xee               # IRQ0 and IRQ4
    mov esi, 0xff
    call rt_pic_init
    # Serial before timer: make IRQ3 the lowest priority, so IRQ4 outranks
    # IRQ0. Where kernel code is emulated the timer handler outlasts the
    # 1 ms tick, and with the default order IRQ0 would always win.
    mov al, 0xc0 | 3
    out 0x20, al
    mov dx, COM1 + 2
    mov al, 0x07                # FIFO on and cleared, trigger at 1 byte
    out dx, al
    mov dx, COM1 + 4
    mov al, 0x0b                # DTR, RTS, OUT2
    out dx, al
    mov dx, COM1 + 1
    mov al, 0x01                # interrupt on received data
    out dx, al
    rdtsc                       # kernel-mode time read: trapped and logged
    shl rdx, 32
    or rdi, rax
    call mix
    mov al, 0x34                # PIT channel 0, lobyte/hibyte, mode 2
    out 0x43, al
    mov al, PIT_DIVISOR & 0xff
    out 0x40, al
    mov al, PIT_DIVISOR >> 8
    out 0x40, al
    lea rdi, [rip + msg_ready]
    call rt_puts
    lea rdi, [rip + user_main]
    mov esi, 0x202
    jmp rt_enter_user

# mix(rdi): hash = (hash ^ rdi) * FNV-1a 64-bit prime
mix:
    mov rax, [rip + hash]
    xor rax, rdi
    mov rdx, 0x100000001b3
    imul rax, rdx
    mov [rip + hash], rax
    ret

# observe(rsi = frame): remember the user loop counter at this interrupt.
observe:
    mov rdi, [rsi + FRAME_R12]
    mov rcx, [rip + observations]
    cmp rcx, MAX_OBSERVATIONS
    jae 1f
    lea rdx, [rip + observed]
    mov [rdx + rcx*8], rdi
    inc rcx
    mov [rip + observations], rcx
1:  jmp mix

on_timer:
    push rsi
    incq [rip + ticks]
    call observe
    pop rsi
    testq [rip + ticks], 3
    jnz 1f
    rdtsc                       # kernel-mode time read: trapped and logged
    shl rdx, 32
    or rax, rdx
    mov rdi, rax
    call mix
    mov ecx, 0x10               # IA32_TSC through rdmsr: filtered to twinvm and logged
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov rdi, rax
    call mix
    mov al, 0x00                # latch PIT channel 0
    out 0x43, al
    in al, 0x40
    movzx edi, al
    in al, 0x40
    shl eax, 8
    or edi, eax
    call mix
    mov al, 0x00                # RTC seconds
    out 0x70, al
    in al, 0x71
    movzx edi, al
    call mix
1:  jmp rt_pic_eoi

on_serial:
    push rsi
    call observe
    pop rsi
1:  mov dx, COM1 + 5
    in al, dx
    test al, 1
    jz 2f
    mov dx, COM1
    in al, dx
    incq [rip + received]
    movzx edi, al
    call mix
    jmp 1b
2:  jmp rt_pic_eoi

user_exited:
    mov rbx, rdi
    call rt_timer_stop          # the run is over
    lea rdi, [rip + msg_ticks]
    mov rsi, [rip + ticks]
    call rt_put_label_dec
    lea rdi, [rip + msg_rx]
    mov rsi, [rip + received]
    call rt_put_label_dec
    lea rdi, [rip + msg_obs]
    mov rsi, [rip + observations]
    call rt_put_label_dec
    lea rdi, [rip + msg_hash]
    mov rsi, [rip + hash]
    call rt_put_label_hex
    lea rdi, [rip + msg_work]
    mov rsi, rbx
    call rt_put_label_hex
    lea rdi, [rip + msg_done]
    jmp rt_end_line_and_finish

.section .usertext, "ax"
# PHASES compute loops with the counter in r12 (what the interrupts see),
# a system call (a landmark) between phases.
user_main:
    xor r12d, r12d
    mov rax, 0x9e3779b97f4a7c15
    mov r13d, PHASES
1:  mov ecx, PHASE_ITERATIONS
2:  inc r12
    mov rdx, rax
    shl rdx, 13
    xor rax, rdx
    mov rdx, rax
    shr rdx, 7
    xor rax, rdx
    dec ecx
    jnz 2b
    mov r14, rax
    lea rdi, [rip + msg_phase]
    mov esi, OFFSET msg_phase_len
    mov eax, SYS_WRITE
    int3                        # system call
    mov rax, r14
    dec r13d
    jnz 1b
    mov rdi, rax
    mov eax, SYS_EXIT
    int3                        # system call
    ud2

.section .rodata
msg_start: .asciz "storm: start\n"
msg_ready: .asciz "storm: ready\n"
msg_phase: .ascii "storm: phase done\n"
.set msg_phase_len, . - msg_phase
msg_ticks: .asciz "storm: ticks="
msg_rx: .asciz " rx="
msg_obs: .asciz " observations="
msg_hash: .asciz " hash="
msg_work: .asciz " work="
msg_done: .asciz "storm: done\n"

.data
hash: .quad 0xcbf29ce484222325
ticks: .quad 0
received: .quad 0
observations: .quad 0

.bss
.balign 4096
observed: .skip MAX_OBSERVATIONS * 8
