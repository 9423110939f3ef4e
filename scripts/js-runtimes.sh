#!/usr/bin/env bash
# Bun and Deno, for the test that runs the TypeScript SDK outside Node. Both publish their official Linux binaries as
# npm packages (@oven/bun-linux-x64, @deno/linux-x64-glibc), so this needs only the npm registry.
# Usage: js-runtimes.sh [CACHE_DIR]   -> CACHE_DIR/bun, CACHE_DIR/deno (idempotent; prints both paths)
set -euo pipefail
OUT=${1:-${TORPOR_CACHE:-/var/cache/torpor}/runtimes}
BUN_VERSION=1.4.5
DENO_VERSION=2.9.6
mkdir -p "$OUT"
fetch() { # package version binary-path-in-package target
  local target=$OUT/$4
  [ -x "$target" ] && "$target" --version 2>/dev/null | grep -q "$2" && return 0
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$1@$2" >/dev/null 2>&1 && tar xzf ./*.tgz)
  install -m 0755 "$tmp/package/$3" "$target.tmp" && mv "$target.tmp" "$target"
  rm -rf "$tmp"
}
fetch @oven/bun-linux-x64 "$BUN_VERSION" bin/bun bun
fetch @deno/linux-x64-glibc "$DENO_VERSION" deno deno
echo "bun=$OUT/bun deno=$OUT/deno"
