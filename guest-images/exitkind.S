# exitkind: one exit is IN or OUT by a user-mode TSC bit; nothing else differs
#
# In user mode the guest reads the TSC (native on these hosts, not trapped,
# so it differs from run to run), keeps one bit of it and wipes the value
# from every register; a system call then makes the kernel touch the quiet
# port 0x80 with `in` if the bit is set, `out` if it is clear, and wipe the
# bit from its registers and from the saved user frame. Registers, memory
# and devices end the same whichever branch ran: only the kind of that one
# exit differs. A replay whose backup takes the other branch than the
# recording must be reported by the landmark signature (with
# `record --trace-landmarks`, at that very landmark); a replay taking the
# same branch is identical. No timer runs, so no interrupt can save a
# register holding the TSC.
.include "rt.S"

.set SYS_TOUCH_PORT, 100        # this guest's own system call
.set QUIET_PORT, 0x80           # POST port: reads 0xff, writes vanish
.set TSC_BIT, 10

.text
kmain:
    lea rdi, [rip + msg_start]
    call rt_puts
    mov edi, 3                  # #BP: system calls
    lea rsi, [rip + exitkind_breakpoint]
    call rt_set_handler
    lea rdi, [rip + user_main]
    mov esi, 0x202
    jmp rt_enter_user

# #BP (rdi = vector, rsi = frame): SYS_TOUCH_PORT from user mode, anything
# else to the runtime's handler.
exitkind_breakpoint:
    testq [rsi + FRAME_CS], 3
    jz rt_breakpoint
    cmpq [rsi + FRAME_RAX], SYS_TOUCH_PORT
    jne rt_breakpoint
    mov edx, QUIET_PORT
    xor eax, eax
    testq [rsi + FRAME_RDI], 1
    jz 1f
    in al, dx                   # the IN branch (AL = 0xff)
    jmp 2f
1:  out dx, al                  # the OUT branch (writes 0)
2:  # Wipe the bit: the saved argument, the result, AL; xor leaves the
    # same flags on both branches.
    movq [rsi + FRAME_RDI], 0
    movq [rsi + FRAME_RAX], 0
    xor eax, eax
    xor edx, edx
    ret

user_exited:
    lea rdi, [rip + msg_done]
    call rt_puts
    jmp rt_poweroff

.section .usertext, "ax"
user_main:
    rdtsc
    mov edi, eax
    shr edi, TSC_BIT
    and edi, 1                  # the branch: IN if set
    xor eax, eax                # wipe the TSC; flags now equal on both branches
    xor edx, edx
    mov eax, SYS_TOUCH_PORT
    int3                        # system call; returns with rdi = rax = 0
    mov eax, SYS_EXIT
    int3
    ud2

.section .rodata
msg_start: .asciz "exitkind: one exit's kind follows the TSC\n"
msg_done: .asciz "exitkind: done\n"
