# dmaremap: a received frame rewrites a live page-directory entry (DMA vs KVM's shadow)
#
# The proof guest of the rule for device DMA and KVM's shadow page tables
# (GuestWrite::Device in src/vmm/vm.rs; docs/architecture.md, "The NIC and
# KVM's shadow page tables").
#
# On hosts that shadow guest page tables (KVM without EPT/NPT, as on the
# development machines), KVM learns of page-table changes only by trapping
# the guest's own writes. The NIC's DMA is the VMM writing guest memory from
# userspace, which KVM does not see, and invlpg does not make KVM re-read a
# page-directory entry: a replica whose shadow still maps the window keeps
# reading the old page after the frame, one whose shadow was dropped reads
# the new one. Replay needs both replicas to read the same page.
#
# Steps (user mode unless said otherwise):
#  P. pages A and B are filled (qword i = i * K1 on A, i * K2 on B); a
#     2 MiB window (1 GiB: entry 0 of the identity map's second page
#     directory) is mapped to page A and read for a few milliseconds, so
#     KVM's shadow maps it; no timer runs yet, so no sync point happens;
#  Q. ONE receive buffer is posted at the page-directory entry minus the
#     12-byte virtio_net_hdr, so a frame's first 8 bytes land exactly on
#     the entry; `dmaremap: posted` is printed and the guest sleeps until
#     the frame is in (the host sends one 60-byte frame: page B | 0x87,
#     then the identity values of entries 1-6 and the low half of entry 7,
#     so only the window moves); then invlpg on the window and a read of
#     its qword 1 (`first`: A or B);
#  S. (kernel mode starts a 1 kHz timer first) a spin of about 0.1 s that
#     writes a counter in memory but never touches the window: timer
#     interrupts there become sync points, and a backup that loads them
#     drops its shadow (their pages changed);
#  R. invlpg on the window, a read of its qword 1 (`last`) and a hash of
#     the first 256 KiB read through it.
# Command line: by default (case=sync) the order is P, S, Q, R: the frame
# comes after sync points. With the word `stale` (case=stale) it is P, Q,
# S, R: the frame comes with no sync point since the start, and the sync
# points come after it.
# Console: `dmaremap: ready case=sync mac=...`, `dmaremap: posted`, then
#   `dmaremap: used=72 first=B last=B hash=0x...` and `dmaremap: done`
#   (`?` for a read that saw neither page; used = the frame's used length).
.set VNET_RX_PREFILL, 0         # the one receive buffer is posted in step Q
.include "rt.S"
.include "virtio_net.inc"

.set PIT_DIVISOR, 1193          # 1000.15 Hz
.set WINDOW, 0x40000000         # 1 GiB: entry 0 of the second page directory
.set WINDOW_PDE, 0xC000         # PD_ADDR + 0x1000 (see src/vmm/layout.rs)
.set PAGE_A, 0x02000000         # 32 MiB
.set PAGE_B, 0x02200000         # 34 MiB
.set PDE_FLAGS, 0x87            # present, writable, user, 2 MiB page
.set READ_QWORDS, 32768         # the first 256 KiB of each page are read
.set WARM_READS, 4194304        # step P: a few milliseconds
.set SPIN_ROUNDS, 1 << 26       # step S: about 0.1 s
.set FRAME_LEN, 60              # the one frame the host sends
.set RX_BUF, WINDOW_PDE - NET_HDR_LEN
.set RX_CHAIN_LEN, NET_HDR_LEN + FRAME_LEN   # a longer frame does not fit
.set HASH_SEED, 0x243f6a8885a308d3
.set CMDLINE_MAX, 2048          # Linux COMMAND_LINE_SIZE

.text
kmain:
    call find_stale_word
    mov [rip + stale_case], al
    call vnet_probe
    test eax, eax
    js .Lno_device
    mov edi, eax
    call vnet_init              # the NIC's line is the only one unmasked
    mov edi, 0x20
    lea rsi, [rip + on_timer]
    call rt_set_handler
    lea rdi, [rip + msg_ready]
    call rt_puts
    lea rdi, [rip + msg_case_sync]
    cmp byte ptr [rip + stale_case], 0
    je 1f
    lea rdi, [rip + msg_case_stale]
1:  call rt_puts
    lea rdi, [rip + msg_mac]
    call rt_puts
    call put_mac
    mov dil, 10
    call rt_putc
    lea rdi, [rip + user_first]
    mov esi, 0x202              # IF on
    jmp rt_enter_user

.Lno_device:
    lea rdi, [rip + msg_no_device]
    call rt_puts
    jmp rt_poweroff

on_timer:
    incq [rip + ticks]
    jmp rt_pic_eoi

# The first user program ends: start the 1 kHz timer (IRQ0 unmasked next
# to the NIC's line) and run the second. The second ends: report.
user_exited:
    cmpq [rip + user_programs_done], 0
    jne 1f
    incq [rip + user_programs_done]
    mov al, 0x34                # channel 0, lobyte/hibyte, mode 2, binary
    out 0x43, al
    mov al, PIT_DIVISOR & 0xff
    out 0x40, al
    mov al, PIT_DIVISOR >> 8
    out 0x40, al
    in al, 0x21
    and al, 0xfe
    out 0x21, al
    lea rdi, [rip + user_second]
    mov esi, 0x202
    jmp rt_enter_user
1:  call rt_timer_stop
    lea rdi, [rip + msg_used]
    mov rsi, [rip + used_len]
    call rt_put_label_dec
    lea rdi, [rip + msg_first]
    call rt_puts
    movzx edi, byte ptr [rip + first_page]
    call rt_putc
    lea rdi, [rip + msg_last]
    call rt_puts
    movzx edi, byte ptr [rip + last_page]
    call rt_putc
    lea rdi, [rip + msg_hash]
    mov rsi, [rip + final_hash]
    call rt_put_label_hex
    lea rdi, [rip + msg_done]
    jmp rt_end_line_and_finish

# find_stale_word -> al = 1 if the command line has the word `stale`.
find_stale_word:
    call rt_cmdline
    test rax, rax
    jz 4f
    lea rcx, [rax + CMDLINE_MAX]
    mov rdx, rax                # start of the current word
1:  cmp rax, rcx
    jae 4f
    movzx r8d, byte ptr [rax]
    cmp r8b, ' '
    ja 3f
    # End of a word (or a blank): is [rdx, rax) "stale"?
    mov r9, rax
    sub r9, rdx
    cmp r9, 5
    jne 2f
    cmp dword ptr [rdx], 0x6c617473     # "stal"
    jne 2f
    cmp byte ptr [rdx + 4], 'e'
    jne 2f
    mov al, 1
    ret
2:  test r8b, r8b
    jz 4f
    lea rdx, [rax + 1]
3:  inc rax
    jmp 1b
4:  xor eax, eax
    ret

# put_mac: "52:54:00:12:34:56"
put_mac:
    push rbx
    xor ebx, ebx
1:  lea rax, [rip + vnet_mac]
    movzx edi, byte ptr [rax + rbx]
    shr edi, 4
    lea rax, [rip + hex_lower]
    movzx edi, byte ptr [rax + rdi]
    call rt_putc
    lea rax, [rip + vnet_mac]
    movzx edi, byte ptr [rax + rbx]
    and edi, 0xf
    lea rax, [rip + hex_lower]
    movzx edi, byte ptr [rax + rdi]
    call rt_putc
    inc ebx
    cmp ebx, 6
    je 2f
    mov dil, ':'
    call rt_putc
    jmp 1b
2:  pop rbx
    ret

.section .usertext, "ax"
# Before the timer: P, then Q when case=stale.
user_first:
    call fill_and_warm
    cmp byte ptr [rip + stale_case], 0
    je 1f
    call post_and_wait
1:  xor edi, edi
    mov eax, SYS_EXIT
    int3                        # system call
    ud2

# Under the timer: S, then Q when case=sync; R.
user_second:
    call spin
    cmp byte ptr [rip + stale_case], 0
    jne 1f
    call post_and_wait
1:  call read_window            # R
    mov [rip + last_page], al
    mov [rip + final_hash], rdx
    xor edi, edi
    mov eax, SYS_EXIT
    int3                        # system call
    ud2

# P: fill pages A and B, map the window to A, read through it for a while.
fill_and_warm:
    mov rdi, PAGE_A
    mov rsi, PAGE_B
    xor ecx, ecx
    mov r8, 0x9e3779b97f4a7c15  # K1
    mov r9, 0xc2b2ae3d27d4eb4f  # K2
1:  mov rax, rcx
    imul rax, r8
    mov [rdi + rcx*8], rax
    mov rax, rcx
    imul rax, r9
    mov [rsi + rcx*8], rax
    inc ecx
    cmp ecx, READ_QWORDS
    jb 1b
    mov eax, PAGE_A | PDE_FLAGS
    mov [WINDOW_PDE], rax
    mov edi, WINDOW
    mov eax, SYS_INVLPG
    int3                        # system call
    mov r13, HASH_SEED
    xor ebx, ebx
    mov ecx, WARM_READS
2:  xor r13, [WINDOW + rbx*8]
    rol r13, 7
    imul r13, r8
    inc ebx
    and ebx, READ_QWORDS - 1
    dec ecx
    jnz 2b
    ret

# S: write memory (so the backup's sync points change a page and drop its
# shadow) and never touch the window.
spin:
    mov ecx, SPIN_ROUNDS
1:  incq [rip + spin_count]
    dec ecx
    jnz 1b
    ret

# Q: one receive buffer over the page-directory entry, interrupts on
# completion; tell the device and the host, sleep until it is used; then
# invlpg and the first read through the window.
post_and_wait:
    push rbx
    lea r10, [rip + vnet_rxq]
    mov rdi, [r10 + Q_DESC]
    mov qword ptr [rdi], RX_BUF
    mov dword ptr [rdi + VIRTQ_DESC_LEN], RX_CHAIN_LEN
    mov dword ptr [rdi + VIRTQ_DESC_FLAGS], VIRTQ_DESC_F_WRITE   # and next = 0
    mov rsi, [r10 + Q_AVAIL]
    mov word ptr [rsi], 0       # interrupt when it is used
    mov word ptr [rsi + VIRTQ_RING], 0
    mov word ptr [rsi + VIRTQ_IDX], 1   # after the ring entry (x86 keeps stores in order)
    mov word ptr [r10 + Q_AVAIL_IDX], 1
    mfence
    mov rax, [r10 + Q_NOTIFY]
    mov word ptr [rax], RX_QUEUE
    lea rdi, [rip + msg_posted]
    lea rsi, [rip + msg_posted_end]
    sub rsi, rdi
    mov eax, SYS_WRITE
    int3                        # system call
1:  mov rbx, [rip + vnet_irq_count]
    mov rax, [rip + vnet_rxq + Q_USED]
    cmp word ptr [rax + VIRTQ_IDX], 0
    jne 2f
    lea rdi, [rip + vnet_irq_count]
    mov rsi, rbx
    mov eax, SYS_WAIT
    int3                        # system call
    jmp 1b
2:  mov ecx, [rax + VIRTQ_RING + 4]     # len of used element 0
    mov [rip + used_len], rcx
    call read_window
    mov [rip + first_page], al
    pop rbx
    ret

# read_window: invlpg the window, then al = which page its qword 1 shows
# ('A', 'B' or '?'), rdx = the hash of its first 256 KiB.
read_window:
    mov edi, WINDOW
    mov eax, SYS_INVLPG
    int3                        # system call
    mov rdx, [WINDOW + 8]       # qword 1: K1 on page A, K2 on page B
    mov r8, 0x9e3779b97f4a7c15  # K1
    mov r9, 0xc2b2ae3d27d4eb4f  # K2
    mov r10b, '?'
    mov r11b, 'A'
    cmp rdx, r8
    cmove r10d, r11d
    mov r11b, 'B'
    cmp rdx, r9
    cmove r10d, r11d
    mov rdx, HASH_SEED
    xor ecx, ecx
1:  xor rdx, [WINDOW + rcx*8]
    rol rdx, 7
    imul rdx, r8
    inc ecx
    cmp ecx, READ_QWORDS
    jb 1b
    movzx eax, r10b
    ret

.section .rodata
vnet_msg_prefix: .asciz "dmaremap: "
hex_lower: .ascii "0123456789abcdef"
msg_ready: .asciz "dmaremap: ready case="
msg_case_sync: .asciz "sync"
msg_case_stale: .asciz "stale"
msg_mac: .asciz " mac="
msg_no_device: .asciz "dmaremap: no virtio-net device\n"
msg_posted: .ascii "dmaremap: posted\n"
msg_posted_end:
msg_used: .asciz "dmaremap: used="
msg_first: .asciz " first="
msg_last: .asciz " last="
msg_hash: .asciz " hash="
msg_done: .asciz "dmaremap: done\n"

.data
.balign 8
ticks: .quad 0
user_programs_done: .quad 0
spin_count: .quad 0
final_hash: .quad 0
used_len: .quad 0
first_page: .byte '-'
last_page: .byte '-'
stale_case: .byte 0
