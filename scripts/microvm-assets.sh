#!/usr/bin/env bash
# Builds the micro-VM runtime assets from Debian 12 packages, without installing any of them:
#   kernel, initrd  the guest scripts/microvm-guest.sh builds (Torpor's guest init, the one the runtime talks to)
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
# The guest first (it caches itself); the recipe's identity is this script and the guest's bytes.
GUEST=$(bash "$HERE/microvm-guest.sh" "$OUT/guest")
RECIPE=$( (cat "${BASH_SOURCE[0]}"; echo "$GUEST") | sha256sum | cut -d' ' -f1)

print() { for n in $NAMES; do f=$(readlink -f "$OUT/$n"); echo "$n ${f##*-} $f"; done; }
complete() { for n in $NAMES; do [ -e "$OUT/$n" ] || return 1; done; }
if [ "$(cat "$OUT/.recipe" 2>/dev/null)" = "$RECIPE" ] && complete; then print; exit 0; fi

A=$(mktemp -d); trap 'rm -rf "$A"' EXIT
echo "downloading qemu-system-x86 qemu-system-common qemu-system-data" >&2
(cd "$A" && apt-get download -qq qemu-system-x86 qemu-system-common qemu-system-data 2>/dev/null)
for deb in "$A"/*.deb; do dpkg -x "$deb" "$A/x"; done

cp "$(readlink -f "$OUT/guest/kernel")" "$A/kernel"
cp "$(readlink -f "$OUT/guest/initrd")" "$A/initrd"

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
echo "$("$OUT/qemu" --version 2>/dev/null | head -1 || echo 'qemu (libraries missing)')" >&2
print
