#!/usr/bin/env bash
# Installs what building twinvm needs on a fresh Debian machine, if missing:
# GNU as/ld (the test guests), a C compiler, cmake and libclang (Unicorn's C
# core and its generated bindings: the emulation fallback). Sourced by
# demo.sh and test.sh.
set -euo pipefail

missing=()
command -v as >/dev/null 2>&1 || missing+=(binutils)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
# `ip` (network namespaces, TAP and veth devices in the network tests).
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
# Unicorn's -sys crate generates its bindings with bindgen, which needs libclang.
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
if ((${#missing[@]})); then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "error: /dev/kvm is missing or not accessible: run as root on a host with KVM" >&2
    exit 1
fi
