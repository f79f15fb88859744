# counter: virtio-net guest answering ARP, ICMP echo and a UDP counter
#
# The guest of the network, record/replay and failover tests. Kernel mode
# finds the virtio-net device and brings it up (virtio_net.inc), then user
# mode runs the whole network stack (virtio_net_rings.inc, net.inc): kernel
# code is emulated on the development hosts, user code runs natively.
#
# Command line (all optional; other words are ignored):
#   ip=A.B.C.D   our IPv4 address, default 10.77.0.2
#   port=N       the counter service's UDP port (1-65535), default 7777
#   max=N        power off after N counter requests; default 0 = serve forever
# A malformed value prints `counter: bad command line argument: WORD` and
# powers off.
#
# The counter service: a UDP datagram to our port whose payload is exactly
# "TWCQ" + u64 request id (little endian) adds one to a u64 counter in guest
# memory and is answered with "TWCR" + the id + the new counter value (u64s
# little endian), checksummed, to the request's source MAC, IP and port.
# ARP requests for our IP are answered, one gratuitous ARP goes out at
# start-up, ICMP echo requests are answered; other frames are counted as
# ignored.
#
# Console (nothing per request: every console byte is a port exit):
#   counter: ready ip=10.77.0.2 port=7777 mac=52:54:00:12:34:56 max=0
#   ... and after `max` requests:
#   counter: frames=F arp=A icmp=I ignored=K
#   counter: requests=N value=V
#   counter: done
# Without a device: `counter: no virtio-net device (ip=... port=... max=...)`;
# a failed initialisation step: one `counter: virtio-net: ...` line. Both
# then power off.
.include "rt.S"
.include "virtio_net.inc"
.include "virtio_net_rings.inc"
.include "net.inc"

.set CMDLINE_MAX, 2048                  # Linux COMMAND_LINE_SIZE
.set DEFAULT_IP, 0x02004d0a             # 10.77.0.2 as it sits in memory
.set DEFAULT_PORT, 7777
.set COUNTER_REQUEST_LEN, 12            # "TWCQ" + u64 id
.set COUNTER_REPLY_LEN, 20              # "TWCR" + u64 id + u64 value
.set MAGIC_REQUEST, 0x51435754          # "TWCQ"
.set MAGIC_REPLY, 0x52435754            # "TWCR"

.text
kmain:
    mov dword ptr [rip + net_ip], DEFAULT_IP
    mov word ptr [rip + net_udp_port], DEFAULT_PORT
    call parse_cmdline
    call vnet_probe
    test eax, eax
    js .Lno_device
    mov edi, eax
    call vnet_init
    lea rdi, [rip + msg_ready]
    call rt_puts
    call put_ip_port
    lea rdi, [rip + msg_mac]
    call rt_puts
    call put_mac
    call put_max
    mov dil, 10
    call rt_putc
    lea rdi, [rip + user_main]
    mov esi, 0x202              # IF on
    jmp rt_enter_user

.Lno_device:
    lea rdi, [rip + msg_no_device]
    call rt_puts
    call put_ip_port
    call put_max
    lea rdi, [rip + msg_close_paren]
    call rt_puts
    jmp rt_poweroff

# The user program stopped after `max` requests: let the last replies
# leave, report, power off.
user_exited:
    call vnet_drain_tx
    lea rdi, [rip + msg_frames]
    mov rsi, [rip + vnet_rx_frames]
    call rt_put_label_dec
    lea rdi, [rip + msg_arp]
    mov rsi, [rip + net_arp_replies]
    call rt_put_label_dec
    lea rdi, [rip + msg_icmp]
    mov rsi, [rip + net_icmp_replies]
    call rt_put_label_dec
    lea rdi, [rip + msg_ignored]
    mov rsi, [rip + net_ignored]
    add rsi, [rip + vnet_rx_bad]
    call rt_put_label_dec
    mov dil, 10
    call rt_putc
    lea rdi, [rip + msg_requests]
    mov rsi, [rip + requests]
    call rt_put_label_dec
    lea rdi, [rip + msg_value]
    mov rsi, [rip + counter]
    call rt_put_label_dec
    lea rdi, [rip + msg_done]
    jmp rt_end_line_and_finish

# ---- command line ----------------------------------------------------------
# parse_cmdline: ip=, port= and max= into net_ip, net_udp_port and
# max_requests. Words are separated by blanks (any byte <= ' ').
parse_cmdline:
    push rbx
    push r12
    call rt_cmdline
    test rax, rax
    jz .Lpc_done
    mov rbx, rax                # the current word
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
    lea rdi, [rip + key_ip]
    mov rsi, rbx
    call match_key
    test rax, rax
    jnz .Lpc_ip
    lea rdi, [rip + key_port]
    mov rsi, rbx
    call match_key
    test rax, rax
    jnz .Lpc_port
    lea rdi, [rip + key_max]
    mov rsi, rbx
    call match_key
    test rax, rax
    jnz .Lpc_max
.Lpc_skip:                      # past this word
    cmp rbx, r12
    jae .Lpc_done
    cmp byte ptr [rbx], ' '
    jbe .Lpc_word
    inc rbx
    jmp .Lpc_skip

.Lpc_ip:
    mov rdi, rax
    call parse_ipv4
    jc .Lpc_bad
    cmp byte ptr [rdx], ' '
    ja .Lpc_bad
    mov [rip + net_ip], eax
    jmp .Lpc_skip
.Lpc_port:
    mov rdi, rax
    call parse_dec
    jc .Lpc_bad
    cmp byte ptr [rdx], ' '
    ja .Lpc_bad
    test rax, rax
    jz .Lpc_bad
    cmp rax, 0xffff
    ja .Lpc_bad
    mov [rip + net_udp_port], ax
    jmp .Lpc_skip
.Lpc_max:
    mov rdi, rax
    call parse_dec
    jc .Lpc_bad
    cmp byte ptr [rdx], ' '
    ja .Lpc_bad
    mov [rip + max_requests], rax
    jmp .Lpc_skip

.Lpc_bad:                       # name the word, then stop
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
    mul r9                      # rdx:rax = rax * 10
    jc 3f
    add rax, rcx
    jc 3f
    inc r8
    jmp 1b
2:  cmp r8, rdi
    je 3f                       # no digit
    mov rdx, r8
    clc
    ret
3:  stc
    ret

# parse_ipv4(rdi = text) -> eax = the address as it sits in memory (network
# order), rdx = first byte after it; CF set if malformed.
parse_ipv4:
    push rbx
    push r12
    push r13
    mov r12, rdi
    xor r13d, r13d              # the address being built
    xor ebx, ebx                # octet index
1:  mov rdi, r12
    call parse_dec
    jc 3f
    cmp rax, 255
    ja 3f
    mov ecx, ebx
    shl ecx, 3
    shl eax, cl
    or r13d, eax
    mov r12, rdx
    inc ebx
    cmp ebx, 4
    je 2f
    cmp byte ptr [r12], '.'
    jne 3f
    inc r12
    jmp 1b
2:  mov eax, r13d
    mov rdx, r12
    clc
    jmp 4f
3:  stc
4:  pop r13
    pop r12
    pop rbx
    ret

# ---- console -----------------------------------------------------------------
# put_ip_port: "ip=A.B.C.D port=P"
put_ip_port:
    push rbx
    lea rdi, [rip + msg_ip]
    call rt_puts
    xor ebx, ebx
1:  lea rax, [rip + net_ip]
    movzx edi, byte ptr [rax + rbx]
    call rt_put_dec
    inc ebx
    cmp ebx, 4
    je 2f
    mov dil, '.'
    call rt_putc
    jmp 1b
2:  lea rdi, [rip + msg_port]
    movzx esi, word ptr [rip + net_udp_port]
    call rt_put_label_dec
    pop rbx
    ret

# put_max: " max=N"
put_max:
    lea rdi, [rip + msg_max]
    mov rsi, [rip + max_requests]
    jmp rt_put_label_dec

# put_mac: "52:54:00:12:34:56"
put_mac:
    push rbx
    xor ebx, ebx
1:  lea rax, [rip + vnet_mac]
    movzx edi, byte ptr [rax + rbx]
    call put_hex_byte
    inc ebx
    cmp ebx, 6
    je 2f
    mov dil, ':'
    call rt_putc
    jmp 1b
2:  pop rbx
    ret

# put_hex_byte(dil): two lowercase hex digits.
put_hex_byte:
    push rbx
    movzx ebx, dil
    mov edi, ebx
    shr edi, 4
    lea rax, [rip + hex_lower]
    movzx edi, byte ptr [rax + rdi]
    call rt_putc
    and ebx, 0xf
    lea rax, [rip + hex_lower]
    movzx edi, byte ptr [rax + rbx]
    call rt_putc
    pop rbx
    ret

# ---- user mode -----------------------------------------------------------------
.section .usertext, "ax"
user_main:
    call net_announce
    call vnet_serve             # returns once `max` requests are served
    xor edi, edi
    mov eax, SYS_EXIT
    int3                        # system call
    ud2

# udp_service(rdi = request payload, esi = length, rdx = reply buffer) ->
# eax = reply length, 0 if the datagram is not a counter request.
udp_service:
    cmp esi, COUNTER_REQUEST_LEN
    jne 1f
    cmp dword ptr [rdi], MAGIC_REQUEST
    jne 1f
    mov rax, [rip + counter]
    inc rax
    mov [rip + counter], rax
    incq [rip + requests]
    mov dword ptr [rdx], MAGIC_REPLY
    mov rcx, [rdi + 4]
    mov [rdx + 4], rcx          # the request id
    mov [rdx + 12], rax         # the new value
    # With a limit, stop serving once it is reached (after this reply).
    mov rax, [rip + max_requests]
    test rax, rax
    jz 2f
    cmp [rip + requests], rax
    jb 2f
    mov byte ptr [rip + vnet_stop], 1
2:  mov eax, COUNTER_REPLY_LEN
    ret
1:  xor eax, eax
    ret

.section .rodata
vnet_msg_prefix: .asciz "counter: "
key_ip: .asciz "ip="
key_port: .asciz "port="
key_max: .asciz "max="
hex_lower: .ascii "0123456789abcdef"
msg_ready: .asciz "counter: ready "
msg_ip: .asciz "ip="
msg_port: .asciz " port="
msg_mac: .asciz " mac="
msg_max: .asciz " max="
msg_no_device: .asciz "counter: no virtio-net device ("
msg_close_paren: .asciz ")\n"
msg_bad_arg: .asciz "counter: bad command line argument: "
msg_frames: .asciz "counter: frames="
msg_arp: .asciz " arp="
msg_icmp: .asciz " icmp="
msg_ignored: .asciz " ignored="
msg_requests: .asciz "counter: requests="
msg_value: .asciz " value="
msg_done: .asciz "counter: done\n"

.data
.balign 8
max_requests: .quad 0
counter: .quad 0                        # the service's state
requests: .quad 0
