#!/usr/bin/env bash
# Boot the same kernel, initramfs and command line under twinvm and under
# qemu-system-x86_64 -enable-kvm, one after the other, and print how long each
# took to reach the userspace marker (or how it ended).
#
#   guest-images/linux/compare-qemu.sh OUTDIR [TIMEOUT_SECONDS]
#
# OUTDIR is build.sh's output (built if missing). Both boot OUTDIR/vmlinux
# (QEMU through its PVH entry, twinvm in 64-bit mode directly) with
# OUTDIR/initrd.img, OUTDIR/cmdline and 256 MiB. Needs root (/dev/kvm);
# installs qemu-system-x86 with apt if missing. Consoles are kept in
# OUTDIR/compare-*.console.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
[ $# -ge 1 ] || { echo "usage: $0 OUTDIR [TIMEOUT_SECONDS]" >&2; exit 2; }
out=$(mkdir -p "$1" && cd "$1" && pwd)
limit=${2:-1800}
[ -s "$out/vmlinux" ] || "$here/build.sh" "$out"
command -v qemu-system-x86_64 >/dev/null 2>&1 || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86
}
(cd "$repo" && cargo build --release -q)
cmdline=$(cat "$out/cmdline")
marker=TWINVM-LINUX-UP

# run NAME CONSOLE COMMAND...: wall time until the marker appears on CONSOLE
# or the command ends, whichever is first; prints one result line.
run() {
    local name=$1 console=$2; shift 2
    rm -f "$console"
    local start end status=running
    start=$(date +%s.%N)
    "$@" >"$out/compare-$name.stderr" 2>&1 &
    local pid=$!
    while :; do
        if grep -q "$marker" "$console" 2>/dev/null; then status="reached $marker"; break; fi
        # QEMU does not exit on a KVM emulation failure: it stops the VM.
        if grep -q "KVM internal error" "$out/compare-$name.stderr" 2>/dev/null; then
            sleep 1
            status="stopped by a KVM internal error: $(grep -m1 -A2 "KVM internal error" "$out/compare-$name.stderr" | tr '\n' ' '); $(grep -m1 '^RIP=' "$out/compare-$name.stderr" | cut -d' ' -f1); code $(grep -m1 '^Code=' "$out/compare-$name.stderr" | cut -c1-90)"
            break
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" && rc=0 || rc=$?
            status="ended (exit $rc) without $marker: $(tail -c 300 "$out/compare-$name.stderr" | tr '\n' ' ')"
            break
        fi
        if (( $(date +%s) - ${start%.*} > limit )); then status="no $marker within ${limit}s"; break; fi
        sleep 0.5
    done
    end=$(date +%s.%N)
    printf '%-8s %8.1f s  %s\n' "$name" "$(echo "$end - $start" | bc)" "$status"
    printf '         last console line: %s\n' "$(grep -a . "$console" 2>/dev/null | tail -n 1 | cut -c1-150)"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

echo "== $(date -u +%FT%TZ) $(nproc) CPUs; kernel $(sha256sum "$out/vmlinux" | cut -c1-16)..."
run twinvm "$out/compare-twinvm.console" \
    "$repo/target/release/twinvm" run --kernel "$out/vmlinux" --initrd "$out/initrd.img" \
    --cmdline "$cmdline" --mem 256M --serial "$out/compare-twinvm.console" --stats
run qemu "$out/compare-qemu.console" \
    qemu-system-x86_64 -enable-kvm -m 256M -nographic -no-reboot -nodefaults \
    -serial "file:$out/compare-qemu.console" -monitor none \
    -kernel "$out/vmlinux" -initrd "$out/initrd.img" -append "$cmdline"
