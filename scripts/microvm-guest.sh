#!/usr/bin/env bash
# Builds the micro-VM guest from Debian 12 packages, installing none of them:
#   kernel  an uncompressed, PVH-bootable vmlinux taken out of linux-image-*-amd64's vmlinuz (QEMU's microvm
#           machine boots the ELF)
#   initrd  busybox-static + the kernel's virtio, ext4 and overlayfs modules + Torpor's guest init
#           (src/runtime/microvm/guest/init.sh) and its static helper torpor-spawn (guest/spawn.c)
# Each is stored content-addressed as OUTDIR/<name>-<sha256>, with OUTDIR/<name> pointing at it; prints one line
# per asset: "<name> <sha256> <path>". A rebuild happens only when this script or the guest sources change.
# Usage: microvm-guest.sh [OUTDIR]   (default /var/cache/torpor/assets/microvm-guest; about 10 s)
# Needs: busybox-static, xz-utils, gcc + libc6-dev (static link), apt's package lists.
set -euo pipefail
OUT=${1:-/var/cache/torpor/assets/microvm-guest}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST=$ROOT/src/runtime/microvm/guest
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
NAMES="kernel initrd"
RECIPE=$(cat "${BASH_SOURCE[0]}" "$GUEST/init.sh" "$GUEST/spawn.c" | sha256sum | cut -d' ' -f1)

print() { for n in $NAMES; do f=$(readlink -f "$OUT/$n"); echo "$n ${f##*-} $f"; done; }
complete() { for n in $NAMES; do [ -e "$OUT/$n" ] || return 1; done; }
if [ "$(cat "$OUT/.recipe" 2>/dev/null)" = "$RECIPE" ] && complete; then print; exit 0; fi

busybox --list 2>/dev/null | grep -x cpio >/dev/null || { echo "needs busybox-static" >&2; exit 1; }
command -v xz >/dev/null || { echo "needs xz-utils" >&2; exit 1; }
A=$(mktemp -d); trap 'rm -rf "$A"' EXIT
kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1; }
KPKG=$(kpkg)
if [ -z "$KPKG" ]; then apt-get update -qq; KPKG=$(kpkg); fi
echo "downloading $KPKG" >&2
(cd "$A" && apt-get download -qq "$KPKG" 2>/dev/null)
dpkg -x "$A"/*.deb "$A/x"

VMLINUZ=$(ls "$A"/x/boot/vmlinuz-*); KV=${VMLINUZ##*/vmlinuz-}
# vmlinuz is a bzImage with an xz payload; trailing bytes after the xz stream make xz complain, the output is whole.
OFF=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$VMLINUZ" | head -1 | cut -d: -f1)
tail -c +$((OFF + 1)) "$VMLINUZ" | xz -dc >"$A/kernel" 2>/dev/null || true
[ "$(head -c 4 "$A/kernel" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || { echo "vmlinux extraction failed" >&2; exit 1; }

R=$A/root; M=$A/x/lib/modules/$KV/kernel
mkdir -p "$R"/{bin,proc,sys,dev,tmp,run,lib/modules}
cp "$(command -v busybox)" "$R/bin/busybox"; ln -s busybox "$R/bin/sh"
# insmod order matters (there is no modprobe in the guest): dependencies first.
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_mmio \
  drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci \
  net/core/failover drivers/net/net_failover drivers/net/virtio_net drivers/block/virtio_blk \
  drivers/char/virtio_console drivers/char/hw_random/virtio-rng \
  crypto/crc32c_generic lib/crc16 fs/mbcache fs/jbd2/jbd2 fs/ext4/ext4 fs/overlayfs/overlay; do
  cp "$M/$m.ko" "$R/lib/modules/"; echo "${m##*/}.ko" >>"$R/lib/modules/order"
done
install -m 0755 "$GUEST/init.sh" "$R/init"
cc -O2 -static -o "$R/bin/torpor-spawn" "$GUEST/spawn.c"
strip "$R/bin/torpor-spawn" 2>/dev/null || true
# Fixed timestamps and order: the same sources give the same initrd bytes.
find "$R" -exec touch -h -d @0 {} +
(cd "$R" && find . | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null | gzip -9n) >"$A/initrd"

for n in $NAMES; do
  sha=$(sha256sum "$A/$n" | cut -d' ' -f1)
  install -m 0644 "$A/$n" "$OUT/$n-$sha"
  ln -sfn "$n-$sha" "$OUT/$n"
done
echo "$RECIPE" >"$OUT/.recipe"
echo "kernel $KV" >&2
print
