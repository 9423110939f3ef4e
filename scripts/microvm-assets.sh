#!/usr/bin/env bash
# Builds the micro-VM runtime assets from Debian 12 packages, without installing any of them:
#   kernel  an uncompressed, PVH-bootable vmlinux taken out of linux-image-*-amd64's vmlinuz
#   initrd  a busybox-static initramfs with the virtio modules of that kernel and Torpor's guest init (guest/init)
#   qemu    qemu-system-x86_64 from qemu-system-x86. NOT self-contained: it links some 25 shared libraries of
#           Debian 12 (scripts/setup.sh installs them: QEMU_LIBS there). Debian's smaller qemu-system-x86_64-microvm
#           links fewer but has no TCG, and KVM on a nested/PVM host may not run a stock guest kernel
#   qemu-tcg  accel-tcg-x86_64.so from qemu-system-common: QEMU's TCG accelerator, a loadable module; a runtime
#           without usable KVM puts it in a directory named by QEMU_MODULE_DIR
#   bios    qboot.rom from qemu-system-data (the microvm machine's firmware)
# Each is stored content-addressed as OUTDIR/<name>-<sha256>, with OUTDIR/<name> pointing at it. Prints one line
# per asset: "<name> <sha256> <path>". A second run with the same guest init prints the same assets (about 10 ms).
set -euo pipefail
OUT=${1:?usage: microvm-assets.sh OUTDIR}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
NAMES="kernel initrd qemu qemu-tcg bios"
# The recipe's identity: this script and the guest init. A change to either builds again.
RECIPE=$(cat "${BASH_SOURCE[0]}" "$HERE/guest/init" | sha256sum | cut -d' ' -f1)

print() { for n in $NAMES; do f=$(readlink -f "$OUT/$n"); echo "$n ${f##*-} $f"; done; }
complete() { for n in $NAMES; do [ -e "$OUT/$n" ] || return 1; done; }
if [ "$(cat "$OUT/.recipe" 2>/dev/null)" = "$RECIPE" ] && complete; then print; exit 0; fi

command -v busybox >/dev/null && busybox --list | grep -qx cpio || { echo "needs busybox-static" >&2; exit 1; }
command -v xz >/dev/null || { echo "needs xz-utils" >&2; exit 1; }
A=$(mktemp -d); trap 'rm -rf "$A"' EXIT
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1)
if [ -z "$KPKG" ]; then apt-get update -qq; KPKG=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1); fi
echo "downloading $KPKG qemu-system-x86 qemu-system-common qemu-system-data" >&2
(cd "$A" && apt-get download -qq "$KPKG" qemu-system-x86 qemu-system-common qemu-system-data 2>/dev/null)
for deb in "$A"/*.deb; do dpkg -x "$deb" "$A/x"; done

# kernel: vmlinuz is a bzImage with an xz payload; QEMU's microvm machine boots the ELF inside it (PVH).
VMLINUZ=$(ls "$A"/x/boot/vmlinuz-*); KV=${VMLINUZ##*/vmlinuz-}
OFF=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$VMLINUZ" | head -1 | cut -d: -f1)
# Trailing bytes after the xz stream make xz complain; the output is whole.
tail -c +$((OFF + 1)) "$VMLINUZ" | xz -dc >"$A/kernel" 2>/dev/null || true
[ "$(head -c 4 "$A/kernel" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || { echo "vmlinux extraction failed" >&2; exit 1; }

# initrd: busybox + virtio modules (insmod order matters: there is no modprobe) + Torpor's guest init.
R=$A/root; M=$A/x/lib/modules/$KV/kernel
mkdir -p "$R"/{bin,sbin,proc,sys,dev,tmp,run,lib/modules}
cp "$(command -v busybox)" "$R/bin/busybox"; ln -s busybox "$R/bin/sh"
for m in virtio/virtio_ring virtio/virtio virtio/virtio_mmio virtio/virtio_pci_legacy_dev \
  virtio/virtio_pci_modern_dev virtio/virtio_pci ../net/core/failover net/net_failover net/virtio_net \
  block/virtio_blk char/virtio_console char/hw_random/virtio-rng; do
  cp "$M/drivers/$m.ko" "$R/lib/modules/"; echo "${m##*/}.ko" >>"$R/lib/modules/order"
done
install -m 0755 "$HERE/guest/init" "$R/init"
(cd "$R" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -9) >"$A/initrd"

cp "$A/x/usr/bin/qemu-system-x86_64" "$A/qemu"
cp "$A/x/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so" "$A/qemu-tcg"
cp "$A/x/usr/share/qemu/qboot.rom" "$A/bios"
missing=$(ldd "$A/qemu" | sed -n 's/^\s*\(\S*\) => not found/\1/p' | tr '\n' ' ')
[ -z "$missing" ] || echo "warning: qemu needs libraries this machine lacks: $missing(scripts/setup.sh installs them)" >&2

for n in $NAMES; do
  sha=$(sha256sum "$A/$n" | cut -d' ' -f1)
  mode=0644; [ "$n" = qemu ] && mode=0755
  install -m "$mode" "$A/$n" "$OUT/$n-$sha"
  ln -sfn "$n-$sha" "$OUT/$n"
done
echo "$RECIPE" >"$OUT/.recipe"
echo "kernel $KV, $("$OUT/qemu" --version 2>/dev/null | head -1 || echo 'qemu (libraries missing)')" >&2
print
