# avxuser: user-mode loop with live AVX/AVX-512 state under a 1 kHz timer
#
# A user-mode loop that keeps its state in YMM upper halves (AVX2)
# and, where available, ZMM16-17 and opmask k1 (AVX-512), under a 1 kHz
# timer, so sync points land while that state is live. On hosts where KVM
# emulates only guest kernel code, user mode runs natively with the host's
# XCR0 and CPUID, AVX included, although twinvm's CPU model has no XSAVE;
# a sync point must then carry the extended state or the replay diverges.
# Prints which vector sets it used and a hash of the final state.
.include "rt.S"

.set PIT_DIVISOR, 1193          # ~1 kHz
.set ROUNDS, 200000000

.text
kmain:
    lea rdi, [rip + on_timer]
    mov esi, PIT_DIVISOR
    lea rdx, [rip + user_main]
    jmp rt_enter_user_with_timer

on_timer:
    incq [rip + ticks]
    jmp rt_pic_eoi

user_exited:
    mov rbx, rdi
    call rt_timer_stop
    lea rdi, [rip + msg_level]
    mov rsi, [rip + level]
    call rt_put_label_dec
    lea rdi, [rip + msg_hash]
    mov rsi, rbx
    call rt_put_label_hex
    lea rdi, [rip + msg_ticks]
    mov rsi, [rip + ticks]
    call rt_put_label_dec
    lea rdi, [rip + msg_done]
    jmp rt_end_line_and_finish

# level: 0 no AVX2 in user mode, 2 AVX2, 512 AVX2 + AVX-512F.
user_main:
    xor r15d, r15d
    mov eax, 1
    xor ecx, ecx
    cpuid
    bt ecx, 27                  # OSXSAVE
    jnc 9f
    bt ecx, 28                  # AVX
    jnc 9f
    xor ecx, ecx
    xgetbv
    mov r14d, eax               # XCR0
    and eax, 6
    cmp eax, 6
    jne 9f
    mov eax, 7
    xor ecx, ecx
    cpuid
    bt ebx, 5                   # AVX2
    jnc 9f
    mov r15d, 2
    bt ebx, 16                  # AVX512F
    jnc 1f
    and r14d, 0xe0
    cmp r14d, 0xe0
    jne 1f
    mov r15d, 512
1:  mov [rip + level], r15
    vmovdqu ymm0, [rip + seed]
    vmovdqu ymm1, [rip + step]
    vpxor ymm2, ymm2, ymm2
    cmp r15d, 512
    jne 2f
    vmovdqu64 zmm16, [rip + seed]
    vmovdqu64 zmm17, [rip + step]
    mov eax, 0xaa
    kmovw k1, eax
2:  mov ecx, ROUNDS
3:  vpaddq ymm0, ymm0, ymm1
    vpxor ymm2, ymm2, ymm0
    vpsllq ymm3, ymm2, 1
    vpxor ymm2, ymm2, ymm3
    cmp r15d, 512
    jne 4f
    vpaddq zmm16{k1}, zmm16, zmm17
    vpxorq zmm17, zmm17, zmm16
4:  dec ecx
    jnz 3b
    # Fold the upper halves (and the ZMM state) into one word.
    vextracti128 xmm4, ymm2, 1
    movq rax, xmm4
    vpextrq rdx, xmm4, 1
    xor rax, rdx
    vextracti128 xmm4, ymm0, 1
    movq rdx, xmm4
    xor rax, rdx
    cmp r15d, 512
    jne 5f
    vextracti64x4 ymm5, zmm16, 1
    vextracti128 xmm5, ymm5, 1
    movq rdx, xmm5
    xor rax, rdx
    vextracti64x4 ymm5, zmm17, 1
    movq rdx, xmm5
    xor rax, rdx
5:  vzeroupper
    mov rdi, rax
    jmp 8f
9:  mov [rip + level], r15
    xor edi, edi
8:  mov eax, SYS_EXIT
    int3                        # system call
    ud2

.section .rodata
msg_level: .asciz "avxuser: level="
msg_hash: .asciz " hash="
msg_ticks: .asciz " ticks="
msg_done: .asciz "avxuser: done\n"
.balign 64
seed: .quad 0x9e3779b97f4a7c15, 0xbf58476d1ce4e5b9, 0x94d049bb133111eb, 0x2545f4914f6cdd1d
      .quad 0x0123456789abcdef, 0xfedcba9876543210, 0x0f1e2d3c4b5a6978, 0x8796a5b4c3d2e1f0
step: .quad 1, 3, 5, 7, 11, 13, 17, 19

.data
ticks: .quad 0
level: .quad 0
