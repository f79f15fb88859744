#!/usr/bin/env python3
"""Cut the compressed payload out of a Linux bzImage, or check its decompression.

    extract-vmlinux.py BZIMAGE PAYLOAD_OUT      write the payload (LZ4 legacy frame)
    extract-vmlinux.py --check PAYLOAD VMLINUX  check VMLINUX has the size the
                                                 payload's trailer announces and is an ELF
"""
import struct
import sys


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def cut(bzimage, payload_out):
    data = open(bzimage, "rb").read()
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        fail(f"{bzimage}: not a bzImage (no HdrS setup header)")
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < 0x208:
        fail(f"{bzimage}: boot protocol {version:#x} has no payload_offset (needs >= 0x208)")
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    if len(payload) != payload_length:
        fail(f"{bzimage}: payload runs past the end of the file")
    magic = struct.unpack_from("<I", payload, 0)[0]
    if magic != 0x184C2102:
        fail(f"{bzimage}: payload magic {magic:#x} is not LZ4 legacy (0x184c2102)")
    open(payload_out, "wb").write(payload)


def check(payload, vmlinux):
    expected = struct.unpack("<I", open(payload, "rb").read()[-4:])[0]
    data = open(vmlinux, "rb").read()
    if len(data) != expected:
        fail(f"{vmlinux}: {len(data)} bytes, the payload announces {expected}")
    if data[:4] != b"\x7fELF":
        fail(f"{vmlinux}: decompressed payload is not an ELF")


if len(sys.argv) == 4 and sys.argv[1] == "--check":
    check(sys.argv[2], sys.argv[3])
elif len(sys.argv) == 3:
    cut(sys.argv[1], sys.argv[2])
else:
    fail(__doc__.strip())
