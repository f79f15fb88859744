#!/usr/bin/env bash
# twinvm's test suite: format and lint checks, unit tests, and the real-KVM
# integration tests (test guests booted under KVM, real processes).
# Needs root (for /dev/kvm). Installs what it needs with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v as >/dev/null 2>&1 || missing+=(binutils)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
if ((${#missing[@]})); then
    echo "== installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "error: /dev/kvm is missing or not accessible: run the tests as root on a host with KVM" >&2
    exit 1
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --release --workspace
