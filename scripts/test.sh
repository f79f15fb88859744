#!/usr/bin/env bash
# twinvm's test suite: format and lint checks, unit tests, and the real-KVM
# integration tests (test guests booted under KVM, real processes).
# Needs root (for /dev/kvm). Installs what it needs with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/prereqs.sh
# A real etcd for the arbiter's external-engine test (Debian's etcd-server).
if ! command -v etcd >/dev/null 2>&1; then
    echo "== installing etcd-server"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --release --workspace
