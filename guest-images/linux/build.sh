#!/usr/bin/env bash
# Build the Linux guest image twinvm boots: Debian's stock cloud kernel and a
# busybox initramfs whose /init prints TWINVM-LINUX-UP, runs a small workload
# and powers the machine off.
#
#   guest-images/linux/build.sh OUTDIR
#
# writes OUTDIR/vmlinuz  the kernel exactly as Debian ships it (bzImage)
#        OUTDIR/vmlinux  the same kernel's payload, decompressed on the host
#                        (LZ4 legacy frame cut out of the bzImage): booting it
#                        skips the in-guest decompressor, which runs at KVM's
#                        emulated speed on hosts like ours
#        OUTDIR/initrd.img  uncompressed newc cpio (the kernel then only
#                        copies it; inflating gzip in an emulated kernel is slow)
#        OUTDIR/cmdline  the kernel command line to boot with
#        OUTDIR/SHA256SUMS
# Inputs are pinned Debian packages fetched with `apt-get download` (nothing
# is installed on the host besides the tools below). The same inputs give
# byte-identical outputs: fixed mtimes, sorted file lists, fixed owners.
# Needs: apt-get, dpkg-deb, cpio, lz4, python3 (installed with apt if missing).
set -euo pipefail

KERNEL_ABI=6.1.0-56-cloud-amd64
KERNEL_VERSION=6.1.192-2
BUSYBOX_VERSION=1:1.35.0-4+deb12u1+b1
# Fixed timestamp for every file in the initramfs (2026-01-01T00:00:00Z).
SOURCE_DATE_EPOCH=1767225600
export SOURCE_DATE_EPOCH LC_ALL=C TZ=UTC

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)

missing=()
command -v cpio >/dev/null 2>&1 || missing+=(cpio)
command -v lz4 >/dev/null 2>&1 || missing+=(lz4)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if ((${#missing[@]})); then
    echo "== installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

debs="$out/debs"
mkdir -p "$debs"
fetch() { # package version
    local pkg=$1 version=$2
    if ! ls "$debs/${pkg}_"*.deb >/dev/null 2>&1; then
        echo "== apt-get download $pkg=$version"
        if ! (cd "$debs" && apt-get download -q "$pkg=$version" 2>/dev/null); then
            apt-get update -qq
            (cd "$debs" && apt-get download -q "$pkg=$version") || {
                echo "error: cannot download $pkg=$version (is it still in the Debian archive? update the pins in $0)" >&2
                exit 1
            }
        fi
    fi
}
fetch "linux-image-$KERNEL_ABI" "$KERNEL_VERSION"
fetch busybox-static "$BUSYBOX_VERSION"

work=$(mktemp -d "${TMPDIR:-/tmp}/twinvm-linux.XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$debs"/linux-image-"$KERNEL_ABI"_*.deb "$work/kernel"
dpkg-deb -x "$debs"/busybox-static_*.deb "$work/busybox"

# The kernel, untouched, and its payload decompressed.
cp "$work/kernel/boot/vmlinuz-$KERNEL_ABI" "$out/vmlinuz"
python3 "$here/extract-vmlinux.py" "$out/vmlinuz" "$work/payload.lz4"
rm -f "$out/vmlinux"
# lz4 reports the 4-byte size trailer the kernel appends as "undecodable
# data" and exits 1; extract-vmlinux.py checks the size instead.
lz4 -d -q "$work/payload.lz4" "$out/vmlinux" || true
python3 "$here/extract-vmlinux.py" --check "$work/payload.lz4" "$out/vmlinux"

# The initramfs tree.
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,root}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
install -m 0755 "$here/init" "$root/init"
moddir="lib/modules/$KERNEL_ABI"
modules=(
    kernel/drivers/virtio/virtio.ko
    kernel/drivers/virtio/virtio_ring.ko
    kernel/drivers/virtio/virtio_pci_modern_dev.ko
    kernel/drivers/virtio/virtio_pci_legacy_dev.ko
    kernel/drivers/virtio/virtio_pci.ko
    kernel/net/core/failover.ko
    kernel/drivers/net/net_failover.ko
    kernel/drivers/net/virtio_net.ko
    kernel/drivers/block/virtio_blk.ko
)
for m in "${modules[@]}"; do
    mkdir -p "$root/$moddir/$(dirname "$m")"
    cp "$work/kernel/$moddir/$m" "$root/$moddir/$m"
done
printf '%s\n' "${modules[@]}" >"$root/$moddir/twinvm-modules"

# Deterministic archive: fixed mtimes and owners, sorted names.
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$root" && find . -mindepth 1 | sort |
    cpio --quiet -o -H newc --reproducible -R 0:0) >"$out/initrd.img"

tr -s ' \n' ' ' <"$here/cmdline" | sed 's/ $//' >"$out/cmdline"

(cd "$out" && sha256sum vmlinuz vmlinux initrd.img cmdline >SHA256SUMS && cat SHA256SUMS)
echo "== kernel linux-image-$KERNEL_ABI $KERNEL_VERSION, busybox-static $BUSYBOX_VERSION"
