# memwrite: user-mode stores over a working set at a set rate, 250 Hz timer
#
# The log-bandwidth workload (docs/benchmarks.md, "Log bandwidth"). User
# mode (CPL3, native speed on the development hosts) runs an xorshift64
# loop and, every `every` rounds, stores the state (a random 8-byte word)
# at a random 8-byte slot of a working set of `ws` KiB at 16 MiB. Before
# the loop the working set is filled with random words, so every page
# holds incompressible data. Meanwhile the PIT interrupts at `hz`; the
# timer handler counts and sends EOI (a landmark), like a kernel tick, so
# a recording makes a sync point per tick that lands in the loop.
#
# Command line (all optional; other words are ignored):
#   ws=KIB       working set in KiB, a power of two from 4 to 131072;
#                default 4096. It starts at 16 MiB: the guest needs at
#                least 16 MiB + ws of memory.
#   every=N      xorshift rounds per store; 0 = no stores (compute only);
#                default 1 (a store every round)
#   rounds=N     rounds of the loop; default 100000000
#   hz=N         timer interrupts per second (19-100000); default 250
# A malformed value prints `memwrite: bad command line argument: WORD` and
# powers off.
#
# Console:
#   memwrite: ws=4096 every=1 rounds=100000000 hz=250
#   memwrite: ticks=T stores=S hash=H      (H: xor of the working set's words)
#   memwrite: done
.include "rt.S"

.set CMDLINE_MAX, 2048
.set WS_BASE, 0x1000000             # 16 MiB
.set PIT_HZ, 1193182

.text
kmain:
    call parse_cmdline
    lea rdi, [rip + msg_ws]
    mov rsi, [rip + ws_kib]
    call rt_put_label_dec
    lea rdi, [rip + msg_every]
    mov rsi, [rip + every]
    call rt_put_label_dec
    lea rdi, [rip + msg_rounds]
    mov rsi, [rip + rounds]
    call rt_put_label_dec
    lea rdi, [rip + msg_hz]
    mov rsi, [rip + hz]
    call rt_put_label_dec
    mov dil, 10
    call rt_putc
    mov eax, PIT_HZ
    xor edx, edx
    div qword ptr [rip + hz]
    mov esi, eax                    # PIT divisor
    lea rdi, [rip + on_timer]
    lea rdx, [rip + user_main]
    jmp rt_enter_user_with_timer

on_timer:
    incq [rip + ticks]
    jmp rt_pic_eoi

user_exited:
    mov rbx, rdi
    call rt_timer_stop
    lea rdi, [rip + msg_ticks]
    mov rsi, [rip + ticks]
    call rt_put_label_dec
    lea rdi, [rip + msg_stores]
    mov rsi, [rip + stores]
    call rt_put_label_dec
    lea rdi, [rip + msg_hash]
    mov rsi, rbx
    call rt_put_label_hex
    lea rdi, [rip + msg_done]
    jmp rt_end_line_and_finish

# User mode: fill, loop, hash; exit code = the hash.
user_main:
    mov r9, WS_BASE
    mov r10, [rip + ws_kib]
    shl r10, 7                      # words in the working set
    mov rax, 0x9e3779b97f4a7c15
    xor ecx, ecx
1:  mov rdx, rax                    # fill with random words
    shl rdx, 13
    xor rax, rdx
    mov rdx, rax
    shr rdx, 7
    xor rax, rdx
    mov rdx, rax
    shl rdx, 17
    xor rax, rdx
    mov [r9 + rcx*8], rax
    inc rcx
    cmp rcx, r10
    jb 1b
    dec r10                         # slot mask
    mov r8, [rip + every]
    mov r11, r8
    test r8, r8
    jnz 2f
    mov r8, -1                      # never store
    mov r11, r8
2:  mov rcx, [rip + rounds]
    xor ebx, ebx                    # stores made
    test rcx, rcx
    jz 5f
3:  mov rdx, rax                    # xorshift64
    shl rdx, 13
    xor rax, rdx
    mov rdx, rax
    shr rdx, 7
    xor rax, rdx
    mov rdx, rax
    shl rdx, 17
    xor rax, rdx
    dec r11
    jnz 4f
    mov r11, r8
    mov rdx, rax
    shr rdx, 17                     # slot from other bits than the value's low ones
    and rdx, r10
    mov [r9 + rdx*8], rax
    inc rbx
4:  dec rcx
    jnz 3b
5:  mov [rip + stores], rbx
    xor eax, eax                    # hash: xor of every word, rotated
    xor ecx, ecx
6:  rol rax, 1
    xor rax, [r9 + rcx*8]
    inc rcx
    cmp rcx, r10
    jbe 6b
    mov rdi, rax
    mov eax, SYS_EXIT
    int3                            # system call
    ud2

# ---- command line ----------------------------------------------------------
# parse_cmdline: ws=, every=, rounds=, hz= into their variables. Words are
# separated by blanks (any byte <= ' ').
parse_cmdline:
    push rbx
    push r12
    call rt_cmdline
    test rax, rax
    jz .Lpc_done
    mov rbx, rax                    # the current word
    lea r12, [rax + CMDLINE_MAX]
.Lpc_word:
    cmp rbx, r12
    jae .Lpc_done
    movzx eax, byte ptr [rbx]
    test al, al
    jz .Lpc_done
    cmp al, ' '
    ja .Lpc_key
    inc rbx
    jmp .Lpc_word
.Lpc_key:
    lea rdi, [rip + key_ws]
    lea rdx, [rip + ws_kib]
    call .Lpc_try
    lea rdi, [rip + key_every]
    lea rdx, [rip + every]
    call .Lpc_try
    lea rdi, [rip + key_rounds]
    lea rdx, [rip + rounds]
    call .Lpc_try
    lea rdi, [rip + key_hz]
    lea rdx, [rip + hz]
    call .Lpc_try
.Lpc_skip:                          # past this word
    cmp rbx, r12
    jae .Lpc_done
    cmp byte ptr [rbx], ' '
    jbe .Lpc_word
    inc rbx
    jmp .Lpc_skip

# .Lpc_try(rdi = key, rdx = variable): if the word at rbx is key=N, store N
# (checked below) and go on with the next word.
.Lpc_try:
    push rdx
    mov rsi, rbx
    call match_key
    pop rdx
    test rax, rax
    jz 1f
    push rdx
    mov rdi, rax
    call parse_dec
    pop rdi
    jc .Lpc_bad
    cmp byte ptr [rdx], ' '
    ja .Lpc_bad
    mov [rdi], rax
    call check_values
    jc .Lpc_bad
    add rsp, 8                      # not back to .Lpc_key: next word
    jmp .Lpc_skip
1:  ret

.Lpc_bad:                           # name the word, then stop
    lea rdi, [rip + msg_bad_arg]
    call rt_puts
1:  cmp rbx, r12
    jae 2f
    movzx edi, byte ptr [rbx]
    cmp dil, ' '
    jbe 2f
    call rt_putc
    inc rbx
    jmp 1b
2:  mov dil, 10
    call rt_putc
    jmp rt_poweroff

.Lpc_done:
    pop r12
    pop rbx
    ret

# check_values: CF set unless ws is a power of two in 4..131072 and hz in
# 19..100000 (the PIT divisor must fit in 16 bits and be at least 11).
check_values:
    mov rax, [rip + ws_kib]
    cmp rax, 4
    jb 1f
    cmp rax, 131072
    ja 1f
    lea rdx, [rax - 1]
    test rax, rdx
    jnz 1f
    mov rax, [rip + hz]
    cmp rax, 19
    jb 1f
    cmp rax, 100000
    ja 1f
    clc
    ret
1:  stc
    ret

# match_key(rdi = NUL-terminated key, rsi = word) -> rax = the byte after
# the key if the word starts with it, else 0.
match_key:
1:  movzx eax, byte ptr [rdi]
    test al, al
    jz 2f
    cmp al, [rsi]
    jne 3f
    inc rdi
    inc rsi
    jmp 1b
2:  mov rax, rsi
    ret
3:  xor eax, eax
    ret

# parse_dec(rdi = text) -> rax = value, rdx = first byte after the digits;
# CF set if there is no digit or the value does not fit in 64 bits.
parse_dec:
    xor eax, eax
    mov r8, rdi
    mov r9d, 10
1:  movzx ecx, byte ptr [r8]
    sub ecx, '0'
    cmp ecx, 9
    ja 2f
    mul r9                          # rdx:rax = rax * 10
    jc 3f
    add rax, rcx
    jc 3f
    inc r8
    jmp 1b
2:  cmp r8, rdi
    je 3f                           # no digit
    mov rdx, r8
    clc
    ret
3:  stc
    ret

.section .rodata
msg_ws: .asciz "memwrite: ws="
msg_every: .asciz " every="
msg_rounds: .asciz " rounds="
msg_hz: .asciz " hz="
msg_ticks: .asciz "memwrite: ticks="
msg_stores: .asciz " stores="
msg_hash: .asciz " hash="
msg_done: .asciz "memwrite: done\n"
msg_bad_arg: .asciz "memwrite: bad command line argument: "
key_ws: .asciz "ws="
key_every: .asciz "every="
key_rounds: .asciz "rounds="
key_hz: .asciz "hz="

.data
ws_kib: .quad 4096
every: .quad 1
rounds: .quad 100000000
hz: .quad 250
ticks: .quad 0
stores: .quad 0
