#!/usr/bin/env bash
# Builds the runsc runtime asset: Debian trixie's runsc (20240729) with upstream's root-namespace check fixed,
# stored content-addressed as OUTDIR/runsc-<sha256>, with OUTDIR/runsc pointing at it. Prints the sha256.
#
# Why not bookworm's runsc (20221219): it has no -net-disconnect-ok, so any TCP connection the actor ever closed
# (TIME_WAIT) makes `runsc checkpoint` fail with "save rejected due to unsupported networking state".
# Why the patch: 20240729 decides "am I in the root network namespace?" by the existence of
# /proc/sys/net/core/rmem_default, which newer kernels create in every namespace, so sandbox networking fails
# with "cannot run with network enabled in root network namespace". Upstream (release-20240801+) tests an entry
# that exists only in the root namespace; we apply the same fix as a same-length patch of the path string.
set -euo pipefail
OUT=${1:?usage: runsc-asset.sh OUTDIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
if [ -L "$OUT/runsc" ] && [ -x "$OUT/runsc" ]; then sha256sum "$(readlink -f "$OUT/runsc")" | cut -d' ' -f1; exit 0; fi
A=$(mktemp -d); trap 'rm -rf "$A"' EXIT
mkdir -p "$A"/{lists,archives/partial,parts,cache}
URI=$(sed -n 's/^URIs: //p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
[ -n "$URI" ] || URI=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$URI" > "$A/parts/trixie.sources"
printf 'Dir::Etc::sourcelist "/dev/null";\nDir::Etc::sourceparts "%s/parts";\nDir::State::Lists "%s/lists";\nDir::Cache "%s/cache";\nDir::Cache::archives "%s/archives";\nAPT::Sandbox::User "root";\n' "$A" "$A" "$A" "$A" > "$A/apt.conf"
APT_CONFIG=$A/apt.conf apt-get update -qq
(cd "$A" && APT_CONFIG=$A/apt.conf apt-get download -qq runsc)
dpkg -x "$A"/runsc_*.deb "$A/x"
python3 - "$A/x/usr/bin/runsc" "$A/runsc" <<'PY'
import sys
b = open(sys.argv[1], 'rb').read()
old, new = b'/proc/sys/net/core/rmem_default', b'/proc/sys/net/core/message_cost'
assert len(old) == len(new) and b.count(old) >= 1, "unexpected runsc build: the namespace check moved"
open(sys.argv[2], 'wb').write(b.replace(old, new))
PY
SHA=$(sha256sum "$A/runsc" | cut -d' ' -f1)
install -m 0755 "$A/runsc" "$OUT/runsc-$SHA"
ln -sfn "runsc-$SHA" "$OUT/runsc"
"$OUT/runsc" --version | head -1 >&2
echo "$SHA"
